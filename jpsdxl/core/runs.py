"""Where artefacts live, how they are written, and which stage wrote what.

Everything a run produces goes under ``runs/<profile>/<stage folder>/`` (executed notebook, HTML export,
``metrics.json``, the stage's outputs); ``runs/`` is ``$JPSDXL_RUNS`` if set, else ``./runs`` in the working
directory (from a source checkout's ``notebooks/`` folder: the checkout's ``runs/``), never the install location.
Everything that is slow to make and safe to share between runs (downloaded data, the tiny model zoo, trained
tokenizers) goes under the cache, ``$JPSDXL_CACHE`` or ``~/.cache/jpsdxl``.

``STAGES`` is the one place that knows the stage folders: a stage reads its predecessor's outputs through
``require``, which names the command that makes them when they are missing (one rule for every caller).

Writes are atomic: a file or folder is written next to its destination and renamed into place, so an
interrupted run never leaves a half-written artefact that a later run would trust. Long work checks first that it
can write where it will (``ensure_writable``), and a training run holds its folder (``exclusive``).

This file is not the notebook runner (see ``runner.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple


def cache_dir(*parts: str) -> Path:
    """The shared cache (``$JPSDXL_CACHE``, default ``~/.cache/jpsdxl``), created on demand."""
    root = Path(os.environ.get("JPSDXL_CACHE", Path.home() / ".cache" / "jpsdxl")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_root() -> Path:
    """``$JPSDXL_RUNS``, else ``./runs``; inside a checkout's ``notebooks/`` (Jupyter's working directory for a
    notebook) the checkout's own ``runs/``, so the notebooks and the ``jpsdxl`` command share their outputs."""
    if os.environ.get("JPSDXL_RUNS"):
        root = Path(os.environ["JPSDXL_RUNS"]).expanduser().resolve()
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"JPSDXL_RUNS={root} is a file: point it at a folder (it is made if missing)")
        return root
    cwd = Path.cwd()
    if cwd.name == "notebooks" and (cwd.parent / "jpsdxl" / "__init__.py").is_file():
        return cwd.parent / "runs"
    return cwd / "runs"


def notebook_dir() -> Path:
    """The checkout's ``notebooks/``; in an installed (non-editable) package, the copy shipped inside it
    (``jpsdxl/tutorial``): where the runner finds the notebooks and notebook 00's map looks for them."""
    package = Path(__file__).resolve().parents[1]
    checkout = package.parent / "notebooks"
    return checkout if checkout.is_dir() else package / "tutorial"


def runs_dir(profile: str, notebook: str | None = None, root: str | Path | None = None, create: bool = True) -> Path:
    """``runs/<profile>[/<notebook>]``; ``root`` overrides ``runs_root()``. ``create=False`` only names it (for a
    file that may or may not be there, such as stage 2's mapping)."""
    base = Path(root) if root else runs_root()
    if base.exists() and not base.is_dir():
        raise NotADirectoryError(f"{base} is a file, not a folder for the runs: give a folder (--runs DIR)")
    path = base / profile / notebook if notebook else base / profile
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


# -----------------------------------------------------------------------------
# the recipe's stages: where each writes, and what makes it


class Stage(NamedTuple):
    folder: str  # under runs/<profile>/: also the notebook's name
    command: str  # the CLI sub-command that makes the stage's outputs
    outputs: tuple[str, ...] = ()  # what its notebook leaves besides metrics.json: a run is reused only with all of it


STAGES = {
    "overview": Stage("00_overview", "run --only 00"),
    "tokenizer": Stage("01_tokenizer_alignment", "tokenizer"),
    "init": Stage("02_embedding_init", "init", ("mapping.pt", "mapping.tsv")),
    "distill": Stage("03_distillation", "distill", ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")),
    "generate": Stage("04_generation", "generate", ("judged.png",)),
}


class StageOutputMissing(FileNotFoundError):
    """A stage's input, written by an earlier stage, is not there; the message says what to run."""


def stage_dir(profile, stage: str, create: bool = True) -> Path:
    """``runs/<profile>/<stage folder>`` (``profile``: a Profile or its name); a stage folder that is a link is
    refused (``refuse_link``)."""
    name = getattr(profile, "name", profile)
    folder = runs_dir(name, STAGES[stage].folder, create=False)
    refuse_link(folder)
    return runs_dir(name, STAGES[stage].folder, create=create)


class LinkInRuns(OSError):
    """A stage or checkpoint folder is a link: a stage writes and deletes only inside its runs folder."""


def refuse_link(folder: str | Path) -> Path:
    """``folder`` as a Path, unless it is a link: writing through it would fill, and pruning would delete, whatever
    it points at (another run's checkpoints, say)."""
    folder = Path(folder)
    if folder.is_symlink():
        raise LinkInRuns(f"{folder} is a link (to {os.readlink(folder)}): jpsdxl writes and deletes only inside its "
                         f"runs folder; replace the link with a real folder (or point JPSDXL_RUNS / --out elsewhere)")
    return folder


def require(profile, stage: str, *names: str) -> Path:
    """The folder of ``stage``'s outputs, checked to hold ``names``; else one error naming what to run."""
    folder = stage_dir(profile, stage, create=False)
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        name, s = getattr(profile, "name", profile), STAGES[stage]
        raise StageOutputMissing(
            f"{folder} lacks {', '.join(missing)}: run `jpsdxl {s.command} --profile {name}` (or notebook "
            f"{s.folder}) first.")
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(dest: Path) -> None:
    """Remove what a killed run left beside ``dest``: temporaries named ``.<name>.<pid>.*`` whose process is gone."""
    prefix = f".{dest.name}."
    if not dest.parent.is_dir():
        return
    for sibling in dest.parent.iterdir():
        if not sibling.name.startswith(prefix):
            continue
        pid = sibling.name[len(prefix):].removeprefix("old-").split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success rename it onto ``dest``.

    Works for files and folders (an existing folder is moved aside, then replaced: two renames). On error the
    temporary is removed and ``dest`` is untouched, so a reader never sees half an artefact. Temporaries carry
    the writer's process id, so the next writer removes those of a run that was killed (``kill -9``) mid-write.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", dir=dest.parent))
    target = tmp / "payload"
    try:
        yield target
        if dest.is_dir() and not dest.is_symlink():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}.{tmp.name[-8:]}")
            os.replace(dest, old)
            os.replace(target, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class OutputNotWritable(ValueError):
    """An output folder cannot be written: found before the long work starts, not after it."""


def ensure_writable(folder: str | Path, what: str) -> Path:
    """Make ``folder`` (and its parents) and write a probe file in it, so that a run that would write there at the end
    fails now, in one line naming ``what`` (the flag or setting that chose the folder). Returns the folder."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test."):
            pass
    except OSError as e:
        raise OutputNotWritable(f"{what} {folder}: cannot write there ({e.strerror or e}); choose a folder you can "
                                f"write to") from None
    return folder


class RunInProgress(RuntimeError):
    """Another process is writing the same output folder."""


@contextmanager
def exclusive(folder: str | Path, what: str) -> Iterator[None]:
    """Hold ``folder/.lock`` for a block: a second process that tries the same folder stops at once with one line
    naming the first. An OS file lock (``flock``): it is released when its holder exits, however it exits, so a
    killed run never leaves a lock behind. (Where ``fcntl`` does not exist, Windows, the block runs unlocked.)"""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = ensure_writable(folder, what) / ".lock"
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunInProgress(f"{folder} is in use by {holder}: wait for it to end, or give this run another "
                                f"folder ({what})") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} ({' '.join([Path(sys.argv[0]).name, *sys.argv[1:2]])})")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as pretty UTF-8 JSON, atomically (Japanese stays readable: no ``\\u`` escapes)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(path)


def save_metrics(run_dir: str | Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Merge ``metrics`` into ``<run_dir>/metrics.json`` (a notebook may call this several times); return all."""
    merged = dict(sorted({**load_metrics(run_dir), **metrics}.items()))  # same order on every run
    write_json(Path(run_dir) / "metrics.json", merged)
    return merged


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


@contextmanager
def quiet_hf_progress(enabled: bool = False) -> Iterator[None]:
    """Switch transformers' and diffusers' own progress bars (loading, "Writing model shards") on or off for a block.

    In a notebook those bars are noise for small models and freeze at 0 % in saved outputs.
    """
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    libs = (diffusers_logging, transformers_logging)
    before = [lib.is_progress_bar_enabled() for lib in libs]
    for lib in libs:
        lib.enable_progress_bar() if enabled else lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in zip(libs, before):
            lib.enable_progress_bar() if was else lib.disable_progress_bar()
