"""Every model a profile names, as a local folder: ``zoo:<recipe>/<part>`` built by ``zoo.py``, anything else (a hub
id or a folder) found or fetched by ``hub.py``. Offline, one error names every model that is missing.

This file builds and fetches nothing itself.
"""

from __future__ import annotations

from pathlib import Path

from .hub import ModelNotAvailable
from .hub import resolve as fetch


def resolve(spec: str, what: str = "model", kind: str = "pipeline", variant: str | None = None) -> Path:
    """Local folder for ``spec``: the zoo's build of a ``zoo:`` spec, else ``hub.resolve`` (a folder or a hub id)."""
    if spec.startswith("zoo:"):
        from .zoo import build_from_zoo

        return build_from_zoo(spec)
    return fetch(spec, what, kind, variant)


def resolve_all(specs: dict[str, tuple[str, str, str | None]]) -> dict[str, Path]:
    """Resolve several models (role -> (spec, kind, variant)); report *every* missing one in one error."""
    found, problems = {}, []
    for what, (spec, kind, variant) in specs.items():
        try:
            found[what] = resolve(spec, what, kind, variant)
        except ModelNotAvailable as e:
            problems += e.problems
    if problems:
        raise ModelNotAvailable(problems)
    return found


def profile_models(profile) -> dict[str, tuple[str, str, str | None]]:
    """Every model a profile names, as role -> (spec, kind, variant): what a run will need to have."""
    m, t = profile.models, profile.tokenizer
    roles = {"SDXL base": (m.base, "pipeline", m.variant), "SDXL refiner": (m.refiner, "pipeline", m.variant)}
    if m.vae:
        roles["VAE"] = (m.vae, "model", None)
    if t.source != "sentencepiece":
        roles["Japanese tokenizer"] = (t.source, "tokenizer", None)
    if profile.init.embedder.startswith("st:"):
        roles["embedder"] = (profile.init.embedder[3:], "sentence-transformers", None)
    return roles


PIPELINE_ROLES = ("SDXL base", "SDXL refiner", "VAE")  # what drawing needs (no tokenizer source, no embedder)


def resolve_profile(profile, roles: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Resolve (and on first use fetch or build) the models of ``profile`` (only those named in ``roles``, if given:
    a fresh Colab runtime then downloads what the notebook uses, not the 2 GB embedder for a drawing); offline, one
    error names all missing."""
    wanted = profile_models(profile)
    return resolve_all({k: v for k, v in wanted.items() if roles is None or k in roles})
