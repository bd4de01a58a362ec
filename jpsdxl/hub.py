"""Resolve a model source to a local folder: a hub id, a local folder, or ``zoo:<recipe>/<part>``.

Every loader in jpsdxl calls ``from_pretrained(resolve(...))``: on the ``tiny`` profile that is a folder the
zoo built from configs, on ``full`` a hub snapshot. Offline (``HF_HUB_OFFLINE=1``) a hub model that is not in
the local cache fails here, at once, with a message that names the model and says what to do, instead of a
stack trace from deep inside huggingface_hub halfway through a notebook.

This file builds nothing itself; zoo recipes live in ``zoo.py``.
"""

from __future__ import annotations

import os
from pathlib import Path


ADVICE = """What to do:
  * on a machine with internet: unset HF_HUB_OFFLINE (or run `hf download <model id>` once to cache it);
  * without internet: point the profile at a local folder holding a copy of it;
  * or use the offline profile: --profile tiny (papermill: -p profile tiny)."""


class ModelNotAvailable(RuntimeError):
    """Models the profile names cannot be had: offline and not cached, or not found. One line per model."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems) + "\n" + ADVICE)


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve(spec: str, what: str = "model", allow_patterns: list[str] | None = None) -> Path:
    """Local folder for ``spec``. ``what`` names the role in error messages (e.g. "SDXL base")."""
    if spec.startswith("zoo:"):
        from .zoo import build_from_zoo

        return build_from_zoo(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelNotAvailable([f"{what} {spec!r}: no such folder, and not a hub id of the form 'owner/name'"])
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, allow_patterns=allow_patterns, local_files_only=is_offline()))
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache" if is_offline() else f"{e}"
        raise ModelNotAvailable([f"{what} {spec!r} is not available: {why}"]) from None
    except Exception as e:  # network down, repo gated or renamed: say which model, keep the cause
        raise ModelNotAvailable([f"{what} {spec!r} is not available: {type(e).__name__}: {e}"]) from e


def resolve_all(specs: dict[str, str | None]) -> dict[str, Path]:
    """Resolve several models (role -> spec; None is skipped); report *every* missing one in one error."""
    found, problems = {}, []
    for what, spec in specs.items():
        if spec is None:
            continue
        try:
            found[what] = resolve(spec, what)
        except ModelNotAvailable as e:
            problems += e.problems
    if problems:
        raise ModelNotAvailable(problems)
    return found
