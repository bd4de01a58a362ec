"""Where artefacts live, and how they are written.

Everything a run produces goes under ``runs/<profile>/<notebook>/`` (executed notebook, HTML export,
``metrics.json``); everything that is slow to make and safe to share between runs (downloaded data, the
tiny model zoo, trained tokenizers) goes under the cache, ``$JPSDXL_CACHE`` or ``~/.cache/jpsdxl``.

Writes are atomic: a file or folder is written next to its destination and renamed into place, so an
interrupted run never leaves a half-written artefact that a later run would trust.

This file is not the notebook runner (see ``runner.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir(*parts: str) -> Path:
    """The shared cache (``$JPSDXL_CACHE``, default ``~/.cache/jpsdxl``), created on demand."""
    root = Path(os.environ.get("JPSDXL_CACHE", Path.home() / ".cache" / "jpsdxl")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir(profile: str, notebook: str | None = None, root: str | Path | None = None) -> Path:
    """``runs/<profile>[/<notebook>]``; ``root`` (or ``$JPSDXL_RUNS``) overrides ``<repo>/runs``."""
    base = Path(root or os.environ.get("JPSDXL_RUNS") or REPO_ROOT / "runs")
    path = base / profile / notebook if notebook else base / profile
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success rename it onto ``dest``.

    Works for files and folders (an existing folder is moved aside, then replaced: two renames). On error the
    temporary is removed and ``dest`` is untouched, so a reader never sees half an artefact.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    target = tmp / "payload"
    try:
        yield target
        if dest.is_dir() and not dest.is_symlink():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(target, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
