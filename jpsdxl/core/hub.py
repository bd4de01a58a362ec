"""A hub id or a local folder in, a folder out: fetches only what ``from_pretrained`` reads (a pipeline through
diffusers' own ``DiffusionPipeline.download``, in the profile's variant; a model its config and one weights file; a
tokenizer its files), never a repo's Flax/ONNX/single-file copies. Offline, a missing model fails at once, named,
with what to do. It builds nothing (``zoo.py``) and does not choose between the two (``models.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

ADVICE = """What to do:
  * on a machine with internet: unset HF_HUB_OFFLINE (or run `hf download <model id>` once to cache it);
  * without internet: point the profile at a local folder holding a copy of it;
  * or use the offline profile: --profile tiny (papermill: -p profile tiny)."""

KINDS = ("pipeline", "model", "tokenizer", "sentence-transformers")
TOKENIZER_FILES = ["*.model", "tokenizer*.json", "special_tokens_map.json", "vocab*", "merges.txt"]
# what SentenceTransformer(folder) reads: its module list and configs, the safetensors weights, the tokenizer
SENTENCE_TRANSFORMERS_FILES = ["*.json", "model.safetensors", "1_Pooling/*", "sentencepiece.bpe.model", "*.txt"]


class ModelNotAvailable(RuntimeError):
    """Models the profile names cannot be had: offline and not cached, or not found. One line per model."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems) + "\n" + ADVICE)


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def model_files(variant: str | None = None) -> list[str]:
    """What ``ModelMixin.from_pretrained`` reads from a single-model repo (e.g. a replacement VAE)."""
    weights = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    return ["config.json", f"{weights}.safetensors", f"{weights}.safetensors.index.json", f"{weights}-*.safetensors"]


def _download(spec: str, kind: str, variant: str | None) -> Path:
    offline = is_offline()
    if kind == "pipeline":
        from diffusers import DiffusionPipeline

        try:
            return Path(DiffusionPipeline.download(spec, variant=variant, use_safetensors=True,
                                                   local_files_only=offline))
        except ValueError as e:  # diffusers refuses a variant the repo lacks (SD-XL 1.0-jp has plain files only):
            if not variant or "no such modeling files are available" not in str(e):  # take the plain files then
                raise
        return Path(DiffusionPipeline.download(spec, use_safetensors=True, local_files_only=offline))
    from huggingface_hub import snapshot_download

    patterns = {"model": model_files(variant), "tokenizer": TOKENIZER_FILES,
                "sentence-transformers": SENTENCE_TRANSFORMERS_FILES}[kind]
    return Path(snapshot_download(spec, allow_patterns=patterns, local_files_only=offline))


def resolve(spec: str, what: str = "model", kind: str = "pipeline", variant: str | None = None) -> Path:
    """Local folder for ``spec``. ``what`` names the role in error messages (e.g. "SDXL base").

    ``kind``: "pipeline" (a diffusers pipeline repo), "model" (one diffusers model, e.g. a VAE), "tokenizer", or
    "sentence-transformers" (stage 2's embedder).
    ``variant``: the weights variant to fetch ("fp16" for SDXL's half-precision files), hub ids only.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    if spec.startswith("zoo:"):
        raise ValueError(f"{spec!r} is built by the zoo, not fetched: use jpsdxl.core.models.resolve")
    path = Path(spec).expanduser()
    if path.exists():
        if kind == "pipeline" and not (path / "model_index.json").is_file():
            raise ModelNotAvailable([f"{what} {spec!r}: a folder without model_index.json, so not a diffusers pipeline "
                                     f"folder (give the folder that holds model_index.json, or a hub id)"])
        return path
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelNotAvailable([f"{what} {spec!r}: no such folder, and not a hub id of the form 'owner/name'"])
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return _download(spec, kind, variant)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        why = "HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache" if is_offline() else f"{e}"
        raise ModelNotAvailable([f"{what} {spec!r} is not available: {why}"]) from None
    except Exception as e:  # network down, repo gated or renamed: say which model, keep the cause
        raise ModelNotAvailable([f"{what} {spec!r} is not available: {type(e).__name__}: {e}"]) from e


def folder_size(folder: str | Path) -> int:
    """Bytes of the files in ``folder`` (following the hub cache's links to its blobs): what a run fetched."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
