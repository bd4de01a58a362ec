"""The notebook runner: each stage's notebook in the stage table's order, executed by papermill on one profile into
``runs/<profile>/<notebook>/`` (the executed copy, an HTML export, the ``metrics.json`` it saved; ``summary.json``
beside them). A notebook whose ``fingerprint`` (its text, settings, code, libraries, local inputs, the earlier
notebooks' outputs) is unchanged is reused; ``run_all_stages`` runs Colab's all-stages notebook. Not the CLI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .core.hub import is_offline
from .core.models import resolve_profile
from .core.profiles import load_profile
from .core.runs import STAGES, atomic_path, ensure_writable, load_metrics, notebook_dir, runs_dir, write_json
from .core.runs import runs_root as default_runs_root


NOTEBOOK_DIR = notebook_dir()


class NotebookFailed(RuntimeError):
    pass


def notebooks(notebook_dir: str | Path = NOTEBOOK_DIR, only: list[str] | None = None) -> list[Path]:
    """The notebooks to execute, in the recipe's order: each stage's (``runs.STAGES``) that is there, then any other
    ``NN_*.ipynb`` in the folder, by name."""
    folder = Path(notebook_dir)
    staged = [folder / f"{s.folder}.ipynb" for s in STAGES.values()]
    found = [nb for nb in staged if nb.is_file()]
    found += [nb for nb in sorted(folder.glob("[0-9][0-9]_*.ipynb")) if nb not in staged]
    if only:
        found = [nb for nb in found if any(nb.stem.startswith(o) for o in only)]
    return found


def export_html(executed: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    out = executed.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


def _caller_path(value: str | Path | None) -> str | None:
    """A relative path the caller typed, made absolute against the caller's working directory.

    The notebooks run with ``notebooks/`` as their working directory; a relative path passed on unchanged
    would silently point somewhere else there.
    """
    return None if value is None else str(Path(value).expanduser().resolve())


FINGERPRINT = "fingerprint"


def fingerprint(notebook: Path, profile, root: Path) -> str:
    """One hash of everything a notebook's outputs depend on: its own text, the profile's settings and the local
    files it names (``local_inputs``: size, time and inode of each), every file of the package (code, profiles, the
    shapes world's weights), every installed distribution's version, and what the
    notebooks before it left: their fingerprints and the size and time of every file in their folders (their outputs
    are its inputs: a rerun of 02, or ``jpsdxl distill`` writing new students into 03's folder, makes 04 stale)."""
    h = hashlib.sha256(notebook.read_bytes())
    h.update(json.dumps(dataclasses.asdict(profile), sort_keys=True, default=str).encode())
    package = Path(__file__).resolve().parent
    for f in sorted(package.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts:
            h.update(f.relative_to(package).as_posix().encode() + f.read_bytes())
    # a set: with a checkout on sys.path (``python -m pytest`` puts the working directory there) its egg-info
    # lists jpsdxl again, and a fingerprint must not depend on how the runner was started
    h.update(" ".join(sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()}))
             .encode())
    for path in local_inputs(profile):  # the data file, a local tokenizer or model: their content, not their names
        h.update(f"{path} {_stat(path)}".encode())
    order = notebooks(notebook.parent)
    for earlier in order[:order.index(notebook)] if notebook in order else ():
        folder = runs_dir(profile.name, earlier.stem, root, create=False)
        h.update((folder / FINGERPRINT).read_bytes() if (folder / FINGERPRINT).exists() else b"not run")
        for f in sorted(folder.rglob("*")) if folder.is_dir() else ():
            if f.is_file() and f.suffix != ".html":  # the HTML export is a view, no later notebook reads it
                h.update(f"{f.relative_to(folder).as_posix()} {f.stat().st_size} {f.stat().st_mtime_ns}".encode())
    return h.hexdigest()


class PeakMemory:
    """The largest resident memory of this process's children (the notebook's kernel) while the block runs, in MB,
    sampled every 0.2 s by a thread (``psutil``): what a notebook needs of the machine's RAM."""

    def __init__(self, every: float = 0.2):
        self.every, self.mb = every, 0.0

    def __enter__(self):
        import threading

        import psutil

        me, self._stop = psutil.Process(), threading.Event()

        def sample():
            while not self._stop.wait(self.every):
                rss = 0
                for child in me.children(recursive=True):
                    try:
                        rss += child.memory_info().rss
                    except psutil.Error:  # a child that ended between listing and reading
                        pass
                self.mb = max(self.mb, round(rss / 2**20, 1))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def local_inputs(profile) -> list[Path]:
    """The local files and folders a profile names (its data file, a tokenizer or model folder) and the zoo's builds
    of the models it names (a cache the notebooks read: rebuilt or edited, it is another input). Hub ids (immutable
    snapshots) and Tatoeba (pinned by its checksum) are not paths; the other caches are keyed by their content."""
    from .core.runs import cache_dir
    from .core.zoo import cache_key

    m = profile.models
    named = (profile.data.pairs.removeprefix("hf:"), profile.tokenizer.source, m.base, m.refiner, m.vae, m.published)
    zoo = {cache_dir("zoo") / cache_key(p.removeprefix("zoo:").partition("/")[0]) for p in named
           if p and p.startswith("zoo:")}
    paths = [Path(p).expanduser() for p in named if p and not p.startswith("zoo:")]
    return [p for p in [*paths, *sorted(zoo)] if p.exists()]


def _stat(path: Path) -> str:
    """Size, modification time and inode of a file, or of every file in a folder: a changed file changes it (a
    content hash of a 7 GB model folder would cost a minute on every run)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return " ".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}:{f.stat().st_ino}" for f in files)


def missing_outputs(notebook: Path, folder: Path) -> list[str]:
    """The outputs the notebook's stage declares (``runs.STAGES``) that its folder lacks: such a run is not reused."""
    declared = next((s.outputs for s in STAGES.values() if s.folder == notebook.stem), ())
    return [name for name in declared if not (folder / name).exists()]


def run_notebooks(profile: str = "tiny", only: list[str] | None = None, runs_root: str | Path | None = None,
                  notebook_dir: str | Path = NOTEBOOK_DIR, html: bool = True, progress: bool = True,
                  force: bool = False) -> list[dict]:
    """Execute the notebooks in order; stop at the first failure with the cell that failed. A notebook whose
    ``fingerprint`` matches its last successful execution's is reused, not executed again, unless ``force``.

    ``summary.json`` is merged: a run of some notebooks replaces their entries and keeps the others'.
    """
    try:
        import papermill  # noqa: F401
    except ModuleNotFoundError:
        raise ModuleNotFoundError("running the notebooks needs the notebooks extra: pip install -e '.[notebooks]' "
                                  "(make tutorial installs it)") from None
    if str(profile).endswith(".toml"):
        profile = _caller_path(profile)
    root = Path(_caller_path(runs_root) or default_runs_root())
    loaded = load_profile(profile)  # fail early on a bad profile, before any kernel starts
    loaded.check_device()
    if is_offline():
        resolve_profile(loaded)  # offline, every missing model is named now, not in some cell minutes later
    name = loaded.name
    ensure_writable(root / name, "--runs")  # each notebook's outputs land there as it ends: checked before the first
    todo = notebooks(notebook_dir, only)
    if not todo:
        raise FileNotFoundError(f"No notebooks matching {only or 'NN_*.ipynb'} in {notebook_dir}")
    with _kernels_write_under(root):
        return _run_all(todo, profile, loaded, root, html, progress, force)


@contextmanager
def _kernels_write_under(root: Path) -> Iterator[None]:
    """``JPSDXL_RUNS=root`` for a block: the kernels inherit it, so every stage a notebook reads or writes resolves
    under the same root."""
    previous, os.environ["JPSDXL_RUNS"] = os.environ.get("JPSDXL_RUNS"), str(root)
    try:
        yield
    finally:
        os.environ.pop("JPSDXL_RUNS") if previous is None else os.environ.update(JPSDXL_RUNS=previous)


def _execute(notebook: Path, executed: Path, profile: str, run_dir: Path, what: str = "") -> tuple[float, float]:
    """Execute ``notebook`` into ``executed`` with papermill (parameters ``profile`` and ``run_dir``); returns
    (seconds, the kernel's peak resident MB). A failing cell is a ``NotebookFailed`` naming it and the copy."""
    import papermill

    start = time.perf_counter()
    try:
        with PeakMemory() as peak:
            papermill.execute_notebook(str(notebook), str(executed), cwd=str(notebook.parent), progress_bar=False,
                                       parameters={"profile": str(profile), "run_dir": str(run_dir)},
                                       kernel_name="python3",
                                       # the kernel's "running over TCP without encryption" notice is noise on
                                       # a kernel that only this process talks to, on this machine
                                       extra_arguments=["--IPKernelApp.log_level=ERROR"])
    except papermill.PapermillExecutionError as e:
        raise NotebookFailed(f"{notebook.name}{what} failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
                             f"The executed copy with the traceback: {executed}") from None
    return round(time.perf_counter() - start, 1), peak.mb


def _run_all(todo: list[Path], profile: str, loaded, root: Path, html: bool, progress: bool,
             force: bool) -> list[dict]:
    from tqdm.auto import tqdm

    name, summary = loaded.name, []
    summary_path = runs_dir(name, root=root) / "summary.json"
    before = {r["notebook"]: r for r in read_summary(summary_path).get("notebooks", [])}
    for nb in tqdm(todo, desc=f"notebooks ({name})", disable=not progress):
        out_dir = runs_dir(name, nb.stem, root)
        executed, saved, current = out_dir / nb.name, out_dir / FINGERPRINT, fingerprint(nb, loaded, root)
        kept = load_metrics(out_dir) if not force and saved.exists() and executed.exists() else {}
        if kept and saved.read_text() == current and not missing_outputs(nb, out_dir):
            if html and not executed.with_suffix(".html").exists():  # the last run was --no-html
                export_html(executed)
            summary.append({**before.get(nb.stem, {"notebook": nb.stem, "seconds": 0.0, "executed": str(executed)}),
                            "metrics": kept, "reused": True})
            tqdm.write(f"{nb.stem}: unchanged since its last run (same notebook, profile, code, libraries and "
                       f"inputs): reused; --force runs it again")
            continue
        saved.unlink(missing_ok=True)  # written again only when this execution succeeds
        (out_dir / "metrics.json").unlink(missing_ok=True)  # a stale file must not pass for this run's
        seconds, peak_mb = _execute(nb, executed, profile, out_dir)
        if html:
            export_html(executed)
        metrics = load_metrics(out_dir)
        if not metrics:
            raise NotebookFailed(f"{nb.name} ran but saved no metrics.json in {out_dir}")
        summary.append({"notebook": nb.stem, "seconds": seconds, "peak_rss_mb": peak_mb, "executed": str(executed),
                        "metrics": metrics})
        with atomic_path(saved) as tmp:
            tmp.write_text(current)
        tqdm.write(f"{nb.stem}: {seconds:.1f} s")
    write_summary(summary_path, name, summary)
    return summary


def read_summary(path: Path) -> dict:
    """``summary.json`` as written by ``write_summary``, or ``{}`` before the first run."""
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def write_summary(path: Path, profile: str, rows: list[dict]) -> dict:
    """Merge this run's rows into ``summary.json``: entries of notebooks not run now are kept."""
    old = read_summary(path)
    merged = {row["notebook"]: row for row in old.get("notebooks", [])} | {row["notebook"]: row for row in rows}
    notebooks_ = [merged[k] for k in sorted(merged)]
    summary = {"profile": profile, "total_seconds": round(sum(r["seconds"] for r in notebooks_), 1),
               "notebooks": notebooks_, "cache": os.environ.get("JPSDXL_CACHE", "~/.cache/jpsdxl")}
    write_json(path, summary)
    return summary


ALL_STAGES = "colab_all_stages"  # the all-stages notebook: Colab's one-notebook path, not part of `jpsdxl run`


def run_all_stages(profile: str, runs_root: str | Path, times: int = 2,
                   notebook_dir: str | Path = NOTEBOOK_DIR) -> list[dict]:
    """Execute the all-stages notebook ``times`` times on one runs folder (``runs_root``, emptied first), as a Colab
    learner whose runtime was cut off runs it again: the first run makes every stage's outputs, every later one must
    repeat no stage and draw no image (``metrics.json``: ``ran`` and ``drawn`` empty). Returns each run's seconds,
    kernel peak memory and metrics; a later run that repeated work is a ``NotebookFailed``."""
    from .core.runs import refuse_link

    loaded = load_profile(profile)
    root = refuse_link(Path(_caller_path(runs_root)))
    if (root / loaded.name).is_dir():  # a fresh start: the first run must make every output
        import shutil

        shutil.rmtree(refuse_link(root / loaded.name))
    notebook, out = Path(notebook_dir) / f"{ALL_STAGES}.ipynb", runs_dir(loaded.name, ALL_STAGES, root)
    rows = []
    with _kernels_write_under(root):
        for attempt in range(1, times + 1):
            executed = out / f"{ALL_STAGES}-{attempt}.ipynb"
            seconds, peak_mb = _execute(notebook, executed, profile, out, f" (run {attempt})")
            metrics = load_metrics(out)
            rows.append({"run": attempt, "seconds": seconds, "peak_rss_mb": peak_mb, "ran": metrics["ran"],
                         "drawn": metrics["drawn"], "metrics": metrics})
            if attempt > 1 and (metrics["ran"] or metrics["drawn"]):
                raise NotebookFailed(f"{notebook.name} run {attempt} repeated work whose outputs were current: "
                                     f"stages {metrics['ran']}, models drawn {metrics['drawn']} ({executed})")
    return rows
