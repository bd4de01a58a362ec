"""Stage 4's model folders: the Japanese SDXL as ``base`` and ``refiner`` diffusers folders that plain
``from_pretrained`` loads, as the published SD-XL 1.0-jp's do. Unchanged parts are links, so it lives in the cache
(``assembled_dir``), never in a runs folder (Google Drive refuses links); ``japanese_model`` is what stage 4 draws
with. It does not run pipelines (``generation.py``) or train (``distillation.py``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch

from .core.models import PIPELINE_ROLES, resolve_profile
from .core.runs import TEXT_PARTS, file_listing, quiet_hf_progress


def _link(src: Path, dest: Path, final_parent: Path, copy: bool) -> None:
    """``dest`` (inside a temporary folder that becomes ``final_parent``) as a copy of ``src`` or a link to it; links
    are relative to where the folder ends up, so a folder moved together with its source keeps working."""
    if copy:
        shutil.copytree(src, dest, symlinks=False) if src.is_dir() else shutil.copy2(src, dest)
    else:
        os.symlink(os.path.relpath(src.resolve(), final_parent.resolve()), dest)


def students_folder(folder: str | Path) -> Path:
    """``folder`` as a Path, checked to hold stage 3's four parts (``save_students``); else one line saying what
    writes them."""
    folder = Path(folder)
    missing = [p for p in TEXT_PARTS if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: run notebook 03 or `jpsdxl distill` (they "
                                f"write these four folders) first.")
    return folder


def assemble(profile, students_dir: str | Path, out: str | Path, copy: bool = False) -> dict[str, Path]:
    """``out/base`` and ``out/refiner``: the profile's English pipelines with the Japanese encoders and tokenizers of
    ``students_dir`` (stage 3's ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2`` folders).

    ``copy=False`` links the unchanged parts (a folder to share or upload: ``copy=True``, which copies them).
    """
    from .core.runs import atomic_path, write_json

    students_dir = students_folder(students_dir)
    folders = resolve_profile(profile, PIPELINE_ROLES)
    english = {"base": Path(folders["SDXL base"]), "refiner": Path(folders["SDXL refiner"])}
    # the profile's replacement VAE (full: the fp16-safe one) is the one the English baseline decodes with too
    vae = Path(folders["VAE"]) if "VAE" in folders else None
    out = Path(out).resolve()
    result = {}
    for role in ("base", "refiner"):
        with atomic_path(out / role) as tmp:
            tmp.mkdir()
            index = json.loads((english[role] / "model_index.json").read_text())
            for name in ("tokenizer", "tokenizer_2"):  # the class diffusers instantiates: not CLIP's BPE any more
                if index.get(name, [None])[0] is not None:
                    index[name] = ["transformers", "PreTrainedTokenizerFast"]
            for name in index:
                if name.startswith("_") or not (english[role] / name).exists():
                    continue
                if name in TEXT_PARTS:  # the Japanese parts: the base's are the students', the refiner's the base's
                    src = students_dir / name if role == "base" else out / "base" / name
                    _link(src, tmp / name, out / role, copy=copy or role == "base")
                elif name == "vae" and vae is not None:
                    _link(vae, tmp / name, out / role, copy=copy)
                else:
                    _link(english[role] / name, tmp / name, out / role, copy=copy)
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        result[role] = out / role
    write_json(out / "source.json", sources(students_dir, folders))
    return result


def sources(students_dir: str | Path, english: dict) -> dict:
    """What an assembled model is made of (``source.json``): stage 3's students (``fingerprint``) and the English
    folders it links to or copies (base, refiner, VAE: another snapshot is another folder)."""
    return {"students": str(Path(students_dir).resolve()), "fingerprint": fingerprint(students_dir),
            "english": {role: str(Path(folder).resolve()) for role, folder in sorted(english.items())}}


def fingerprint(students_dir: str | Path) -> str:
    """What stage 3 left, in a few bytes: every file of the four parts with its size and modification time. An
    assembled model records it (``source.json``), so a model assembled from older encoders is noticed."""
    import hashlib

    listing = file_listing(Path(students_dir), TEXT_PARTS)
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]


def describe_assembled(folder: str | Path) -> list[dict]:
    """One row per component of an assembled model: where each of base's and refiner's parts really lives."""
    from .core.hub import folder_size

    folder = Path(folder).resolve()
    rows = []
    for role in ("base", "refiner"):
        for part in sorted(p for p in (folder / role).iterdir() if p.is_dir()):
            target = part.resolve()
            inside = target.is_relative_to(folder)
            rows.append({"folder": role, "component": part.name,
                         "stored": "here" if not part.is_symlink() else
                         f"link to {target.relative_to(folder)}" if inside else "link to the English model",
                         "MB": round(folder_size(target) / 1e6, 1)})
    return rows


class JapaneseModel(NamedTuple):
    """Where a Japanese SDXL's two pipelines are, and the weights variant to load them in (hub downloads only)."""

    base: Path
    refiner: Path
    variant: str | None = None


def has_variant(folder: str | Path, variant: str | None) -> bool:
    """Does a pipeline folder hold ``variant`` weight files (``unet/*.fp16.safetensors``)? The published SD-XL 1.0-jp
    repos hold none, so loading them with the profile's ``variant="fp16"`` must fall back to the plain files."""
    return bool(variant) and any(f".{variant}." in p.name for p in (Path(folder) / "unet").glob("*"))


def check_pipeline_folder(folder: str | Path, what: str = "--model") -> None:
    """One line for a pipeline folder that is half there (a copy or download that stopped early): no
    ``model_index.json``, a component it names missing, or a weights file cut short. Checked before anything loads."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    again = "copy or download it again, or assemble it again (notebook 04, assembly.assemble)"
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{what} {folder}: no readable model_index.json ({type(e).__name__}), so not a "
                                f"diffusers pipeline folder: {again}") from None
    parts = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
    missing = [k for k in parts if not (folder / k).is_dir()]
    if missing:
        raise FileNotFoundError(f"{what} {folder} lacks {', '.join(missing)}: {again}")
    for weights in sorted(p for k in parts for p in (folder / k).glob("*.safetensors")):
        try:
            with safe_open(weights, "pt"):  # reads the header, which also checks the file's length
                pass
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{what} {weights}: unreadable ({e}): {again}") from None
    check_text_parts(folder, what)


def check_text_parts(folder: str | Path, what: str = "--model") -> None:
    """Each tokenizer's pieces against its text encoder's embedding rows: a tokenizer that was not made with the
    encoder (a 2,000-piece one beside 8,000 rows) would draw from meaningless ids, or fail on one past the table."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if not (folder / encoder / "config.json").is_file() or not (folder / tokenizer).is_dir():
            continue
        rows = json.loads((folder / encoder / "config.json").read_text())["vocab_size"]
        pieces = len(AutoTokenizer.from_pretrained(folder / tokenizer))
        if pieces != rows:
            raise ValueError(f"{what} {folder}: {tokenizer} has {pieces:,} pieces but {encoder} has {rows:,} "
                             f"embedding rows, so they were not trained together: assemble the model again from "
                             f"one stage-3 folder (notebook 04, assembly.assemble), or give the matching tokenizer")


def from_pretrained_pair(base_dir: str | Path, refiner_dir: str | Path, dtype=torch.float32, variant: str | None = None,
                         progress: bool = False, **base_parts):
    """The one way a (base, refiner) pair is loaded: diffusers' ``from_pretrained`` on two folders, the refiner sharing
    the base's ``text_encoder_2``, ``tokenizer_2`` and VAE; ``base_parts``: components given instead of loaded."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    with quiet_hf_progress(progress):  # loading bars are noise in notebooks; keep them for big models
        base = StableDiffusionXLPipeline.from_pretrained(str(base_dir), dtype=dtype, variant=variant, **base_parts)
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            str(refiner_dir), dtype=dtype, variant=variant, text_encoder_2=base.text_encoder_2,
            tokenizer_2=base.tokenizer_2, vae=base.vae)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=not progress)
    return base, refiner


def text_parts(folder: str | Path, variant: str | None = None, dtype=None) -> tuple:
    """(text_encoder, text_encoder_2, tokenizer, tokenizer_2) from a folder holding the four (stage 3's outputs, an
    assembled or published ``base``), in eval mode, in ``dtype`` (default: transformers' own):
    what a Japanese model brings to pipelines whose UNets it shares."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .tokenization import tokenizer_pair

    folder = students_folder(folder)
    variant = variant if has_variant(folder, variant) else None
    with quiet_hf_progress():
        kw = {"variant": variant} | ({"dtype": dtype} if dtype is not None else {})
        te, te_2 = (cls.from_pretrained(folder / name, **kw).eval() for cls, name in
                    ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")))
    tok, tok_2 = tokenizer_pair(folder)
    _fit_lengths((tok, te), (tok_2, te_2))
    return te, te_2, tok, tok_2


def _fit_lengths(*pairs) -> None:
    """Each (tokenizer, text encoder) pair: the tokenizer pads and truncates to what its encoder can read, not to the
    length its file was saved with (LINE's: its language model's 2048)."""
    for tok, te in pairs:
        if tok is not None and te is not None:
            tok.model_max_length = min(tok.model_max_length, te.config.max_position_embeddings)


def load_assembled(folder: str | Path | JapaneseModel, dtype=torch.float32, device="cpu", variant: str | None = None,
                   offload: bool = False):
    """(base, refiner) from an ``assemble`` folder, or from a ``JapaneseModel`` (``japanese_model``): plain
    diffusers. The weights variant is used only where the folder has it. ``offload``: model CPU offload *instead of*
    moving the pipelines to ``device`` (moving first would hold every part on the GPU at once); ``device=None``
    leaves them where they load (for ``generation.place``)."""
    if isinstance(folder, JapaneseModel):
        base_dir, refiner_dir, variant = folder.base, folder.refiner, folder.variant or variant
    else:
        base_dir, refiner_dir = Path(folder) / "base", Path(folder) / "refiner"
    variant = variant if has_variant(base_dir, variant) else None
    base, refiner = from_pretrained_pair(base_dir, refiner_dir, dtype, variant)
    _fit_lengths((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2))
    for pipe in (base, refiner):
        if offload:
            pipe.enable_model_cpu_offload(device=device)
        elif device is not None:
            pipe.to(device)
    return base, refiner


def refiner_id(base_id: str) -> str:
    """The refiner's hub id beside a base's, by the naming the published pairs use
    (``cl-tohoku/stable-diffusion-xl-jp-base-1.0`` -> ``...-jp-refiner-1.0``)."""
    owner, _, name = base_id.partition("/")
    if name.count("-base") != 1:
        raise ValueError(f"--model {base_id}: cannot tell its refiner's hub id; give both: --model BASE_ID,REFINER_ID")
    return f"{owner}/{name.replace('-base', '-refiner')}"


def assembled_dir(profile) -> Path:
    """Where the profile's assembled model lives: the cache (``$JPSDXL_CACHE/assembled/<profile>``), not the runs
    folder, since its unchanged parts are links (which Google Drive refuses) and it is rebuilt from stage 3."""
    from .core.runs import cache_dir

    return cache_dir("assembled") / profile.name


def japanese_model(profile, model: str | Path | None = None) -> JapaneseModel:
    """The base and refiner folders ``jpsdxl generate`` draws with. ``model``: a folder holding base/ and refiner/,
    or hub ids (``BASE_ID`` with the refiner found by name, or ``BASE_ID,REFINER_ID``; fetched once, in the
    profile's weights variant). Default: the profile's assembled model under runs/, assembled from stage 3's
    students if needed (missing students: an error that says to run ``jpsdxl distill``)."""
    import sys

    from .core.models import resolve_all
    from .core.runs import require

    if model is not None:
        folder = Path(model).expanduser()
        if (folder / "base").is_dir() and (folder / "refiner").is_dir():
            for role in ("base", "refiner"):
                check_pipeline_folder(folder / role)
            return JapaneseModel(folder / "base", folder / "refiner")
        if folder.exists() or str(model).count("/") != str(model).count(",") + 1:
            raise FileNotFoundError(f"--model {model}: not a folder holding base/ and refiner/ (notebook 04 writes "
                                    f"~/.cache/jpsdxl/assembled/<profile>; assembly.assemble makes one), nor hub ids "
                                    f"(owner/name, or base,refiner)")
        base_id, _, refiner = str(model).partition(",")
        variant = profile.models.variant
        found = resolve_all({"Japanese SDXL base": (base_id, "pipeline", variant),
                             "Japanese SDXL refiner": (refiner or refiner_id(base_id), "pipeline", variant)})
        for role, path in found.items():
            check_text_parts(path, role)
        return JapaneseModel(found["Japanese SDXL base"], found["Japanese SDXL refiner"], variant)
    out = assembled_dir(profile)
    students = require(profile, "distill")  # missing or stale encoders: says to run `jpsdxl distill`
    built = (out / "base").is_dir() and (out / "refiner").is_dir()
    recorded = json.loads((out / "source.json").read_text()) if built and (out / "source.json").exists() else {}
    if recorded != sources(students, resolve_profile(profile, PIPELINE_ROLES)):
        if built:
            print(f"stage 3's encoders in {students} or the profile's English model changed since {out} was "
                  f"assembled: assembling it again", file=sys.stderr)
        assemble(profile, students, out)
    check_text_parts(out / "base", "the assembled model")
    return JapaneseModel(out / "base", out / "refiner")
