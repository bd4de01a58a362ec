"""Where artefacts live and how they are written: ``runs/<profile>/<stage folder>/`` (``$JPSDXL_RUNS``, else ``./runs``)
for what a run produces, the cache (``$JPSDXL_CACHE``) for what is slow and keyed by content; atomic writes, no
write through a link. ``STAGES`` is the recipe's table, and ``require`` the stage contract: a stage reads an earlier
one's outputs only if the record they were written with (``stage.json``) still holds. Not the runner (``runner.py``).
"""

from __future__ import annotations

import hashlib
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
# the recipe's stages: one row each. The CLI's stage commands, the runner's notebook order, the "run this first"
# messages and the stage contract below all read this table: a new stage is a module with a ``run`` and a row here.


class Stage(NamedTuple):
    folder: str  # runs/<profile>/<folder>/ holds its outputs; notebooks/<folder>.ipynb teaches it
    command: str | None  # `jpsdxl <command>` runs it (None: only its notebook)
    run: str | None  # "module:function" the command calls, with the profile as its first argument
    help: str  # one line for `jpsdxl --help`
    inputs: tuple[str, ...] = ()  # the stages whose outputs it reads
    outputs: tuple[str, ...] = ()  # what it leaves for later stages (besides metrics.json): the stage contract
    settings: tuple[str, ...] = ()  # the profile's sections (and fields) its outputs depend on

    def function(self):
        """The stage's ``run``, imported from its module (by name: this table sits below the stages it lists)."""
        import importlib

        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)

    def how(self, profile: str) -> str:
        """The command that makes this stage's outputs, for a "run this first" message."""
        command = f"jpsdxl {self.command}" if self.command else f"jpsdxl run --only {self.folder[:2]}"
        return f"`{command} --profile {profile}` (or notebook {self.folder})"


TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")  # what the Japanese SDXL swaps in

STAGES = {
    "overview": Stage("00_overview", None, None, "the recipe, the profiles, this machine"),
    "tokenizer": Stage("01_tokenizer_alignment", "tokenizer", "jpsdxl.tokenization:run",
                       "stage 1: train the Japanese tokenizer and save both tokenizers with SDXL's conventions",
                       (), ("tokenizer", "tokenizer_2"), ("seed", "data", "tokenizer")),
    "init": Stage("02_embedding_init", "init", "jpsdxl.embedding_init:run",
                  "stage 2: map every Japanese piece to its most similar English CLIP tokens (mapping.pt, .tsv)",
                  ("tokenizer",), ("mapping.pt", "mapping.tsv"), ("init",)),
    "distill": Stage("03_distillation", "distill", "jpsdxl.distillation:run",
                     "stage 3: train the Japanese text encoders; resumes from the newest checkpoint unless --fresh",
                     ("tokenizer", "init"), TEXT_PARTS, ("seed", "data", "distill", "dtype")),
    "generate": Stage("04_generation", "generate", "jpsdxl.generation:run",
                      "stage 4: draw from Japanese prompts, base then refiner, as the SD-XL 1.0-jp card does",
                      ("distill",), ("judged.png",), ("generate",)),
}


class StageOutputMissing(FileNotFoundError):
    """A stage's input, written by an earlier stage, is not there; the message says what to run."""


class StaleStageOutput(ValueError):
    """A stage's outputs no longer match what they were made from (or were changed after they were written)."""


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


# -----------------------------------------------------------------------------
# the stage contract: each stage's folder records what its outputs were made from (``stage.json``), and a stage reads
# its predecessor's outputs only through ``require``, which checks that record against what is there now


RECORD = "stage.json"


def _files(folder: Path, names) -> list[Path]:
    return sorted(f for n in names for f in ([folder / n] if (folder / n).is_file() else (folder / n).rglob("*"))
                  if f.is_file())


def file_listing(folder: Path, names) -> dict[str, list[int]]:
    return {f.relative_to(folder).as_posix(): [f.stat().st_size, f.stat().st_mtime_ns] for f in _files(folder, names)}


def content_hash(folder: str | Path, names) -> str:
    """sha256 of the named files and folders under ``folder``: each file's path and bytes, in a fixed order."""
    folder, h = Path(folder), hashlib.sha256()
    for f in _files(folder, names):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0")
        with open(f, "rb") as stream:
            while block := stream.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:16]


def settings_hash(profile, stage: str, **effective) -> str:
    """A hash of the profile settings ``stage``'s outputs depend on (its row's ``settings``), with any section replaced
    by the value a run really used (``distill=cfg`` after overrides), and the size and time of a local data file (its
    content, not its name). A stage records it in ``made_from["settings"]``; ``settings_changed`` compares."""
    import dataclasses

    values = {name: effective.get(name, getattr(profile, name)) for name in STAGES[stage].settings}
    values = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in values.items()}
    data = Path(str(profile.data.pairs).removeprefix("hf:")).expanduser()
    if "data" in values and data.is_file():
        values["data file"] = [data.stat().st_size, data.stat().st_mtime_ns]
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings_changed(profile, stage: str) -> bool:
    """Were ``stage``'s outputs for ``profile`` made with other settings than the profile holds now (or with an
    override, such as ``jpsdxl distill --steps``)? What a re-run of every stage (the all-stages notebook) asks; like
    ``require``, it raises when the outputs are missing or stale."""
    return _checked(profile, stage)[1]["made_from"].get("settings") != settings_hash(profile, stage)


def record(folder: str | Path, stage: str, made_from: dict[str, Any]) -> dict:
    """Write ``folder/stage.json`` once the stage's outputs are there: the content hash of those outputs (with each
    file's size and time, so a reader hashes again only what changed) and what they were ``made_from``: the output
    hash of each earlier stage it read, under that stage's name (``require`` checks these), and any other input."""
    folder = Path(folder)
    names = STAGES[stage].outputs
    entry = {"stage": stage, "made_from": made_from, "outputs": content_hash(folder, names),
             "files": file_listing(folder, names)}
    write_json(folder / RECORD, entry)
    return entry


def _recorded(folder: Path, stage: str, profile: str) -> dict:
    """The folder's record, checked to describe the outputs there now."""
    s = STAGES[stage]
    path = folder / RECORD
    entry = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if entry is None or entry.get("stage") != stage:
        raise StaleStageOutput(f"{folder} has no record of what its outputs were made from ({RECORD}; written by "
                               f"another version, or by hand): run {s.how(profile)} again")
    if file_listing(folder, s.outputs) != entry["files"] and content_hash(folder, s.outputs) != entry["outputs"]:
        raise StaleStageOutput(f"{folder}: its outputs changed after the stage wrote them (edited or partly copied): "
                               f"run {s.how(profile)} again")
    return entry


def outputs_hash(profile, stage: str) -> str:
    """The content hash of ``stage``'s outputs as ``require`` found them: what a later stage records it read."""
    return _checked(profile, stage)[1]["outputs"]


def require(profile, stage: str, *names: str) -> Path:
    """The folder of ``stage``'s outputs, checked: ``names`` (default: all it declares) are there, they are what the
    stage recorded, and every earlier stage they were made from still holds the same outputs. Else one error naming
    what to run."""
    return _checked(profile, stage, *names)[0]


def _checked(profile, stage: str, *names: str) -> tuple[Path, dict]:
    """(folder, record) of ``stage``'s outputs after ``require``'s checks: the one place they are made."""
    name, s = getattr(profile, "name", profile), STAGES[stage]
    folder = stage_dir(profile, stage, create=False)
    missing = [n for n in names or s.outputs if not (folder / n).exists()]
    if missing:
        raise StageOutputMissing(f"{folder} lacks {', '.join(missing)}: run {s.how(name)} first.")
    entry = _recorded(folder, stage, name)
    for earlier, made_from in entry["made_from"].items():
        if earlier in STAGES and made_from != outputs_hash(profile, earlier):
            raise StaleStageOutput(
                f"{folder} was made from other {earlier} outputs than {stage_dir(profile, earlier, create=False)} "
                f"holds now: run {s.how(name)} again")
    return folder, entry


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
