"""Stage 4: two-stage SDXL generation, base then refiner, with a latent hand-off.

The base denoises the first ``high_noise_frac`` of the schedule (``denoising_end``) and returns *latents*; the
refiner picks them up at the same point (``denoising_start``) and finishes, then decodes with the VAE. The base
reads both text encoders (their penultimate hidden states concatenated, plus text_encoder_2's pooled
projection); the refiner reads text_encoder_2 only, so it shares that encoder (and tokenizer_2, and the VAE)
with the base. Swapping in Japanese encoders and tokenizers is a keyword argument to ``load_pipelines``.

``assemble`` writes the Japanese SDXL as two diffusers folders, ``base`` and ``refiner``, that plain
``StableDiffusionXLPipeline.from_pretrained`` / ``StableDiffusionXLImg2ImgPipeline.from_pretrained`` load, the way
the published cl-tohoku/stable-diffusion-xl-jp-{base,refiner}-1.0 folders load: the refiner carries the Japanese
``text_encoder_2`` and ``tokenizer_2``. Unchanged components (UNets, VAE, scheduler) are links to the English
pipeline's folders, and the refiner's text parts are links to the base's: nothing large is stored twice.

This file does not train or build models (``zoo.py``, ``hub.py`` load them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .hub import resolve_profile
from .runs import quiet_hf_progress


def load_pipelines(profile, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                   progress: bool = False):
    """(base, refiner) pipelines for ``profile``, optionally with replacement encoders/tokenizers.

    Replacement encoders are cast to the profile's dtype (in place, as ``nn.Module.to`` does) and shared by both
    pipelines: the refiner gets the base's ``text_encoder_2``, ``tokenizer_2`` and VAE. Hub pipelines are fetched
    and loaded in the profile's weights variant (``models.variant``, e.g. fp16), and nothing else.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    profile.check_device()  # before anything large is built or downloaded
    dtype, device, m = profile.torch_dtype(), profile.torch_device(), profile.models
    swap = {k: v for k, v in dict(text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                  tokenizer_2=tokenizer_2).items() if v is not None}
    swap = {k: v.to(dtype) if isinstance(v, torch.nn.Module) else v for k, v in swap.items()}
    # resolve everything first: offline, one message names every missing model before anything loads
    folders = resolve_profile(profile)
    with quiet_hf_progress(progress):  # loading bars are noise in notebooks; keep them for big models
        if "VAE" in folders:
            swap["vae"] = AutoencoderKL.from_pretrained(folders["VAE"], dtype=dtype)
        variant = {"variant": m.variant} if m.variant else {}
        base = StableDiffusionXLPipeline.from_pretrained(folders["SDXL base"], dtype=dtype, **variant, **swap)
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            folders["SDXL refiner"], dtype=dtype, **variant,
            text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, vae=base.vae)
    for pipe in (base, refiner):
        pipe.to(device)
        pipe.set_progress_bar_config(disable=not progress)
    return base, refiner


@torch.no_grad()
def two_stage(base, refiner, prompt, negative_prompt=None, *, steps: int, guidance_scale: float,
              high_noise_frac: float, height: int, width: int, seed: int = 0, output_type: str = "pil"):
    """Base until ``high_noise_frac`` of the schedule, hand the latents over, refiner to the end.

    Returns the refiner's images (PIL by default) and the hand-off latents.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    make = lambda: _generators(prompts, seed)  # noqa: E731
    latents = base(prompt=prompts, negative_prompt=negative_prompt, num_inference_steps=steps,
                   guidance_scale=guidance_scale, denoising_end=high_noise_frac, height=height, width=width,
                   generator=make(), output_type="latent").images
    images = refiner(prompt=prompts, negative_prompt=negative_prompt, image=latents, num_inference_steps=steps,
                     guidance_scale=guidance_scale, denoising_start=high_noise_frac, generator=make(),
                     output_type=output_type).images
    return images, latents


def _generators(prompts, seed: int):
    # one generator per prompt, all from the same seed: prompt i's noise does not depend on the batch
    return [torch.Generator(device="cpu").manual_seed(seed) for _ in prompts]


@torch.no_grad()
def base_only(base, prompt, negative_prompt=None, *, steps: int, guidance_scale: float, height: int, width: int,
              seed: int = 0, output_type: str = "pil"):
    """The base alone over the whole schedule, decoded: set against ``two_stage`` it shows what the refiner adds."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return base(prompt=prompts, negative_prompt=negative_prompt, num_inference_steps=steps,
                guidance_scale=guidance_scale, height=height, width=width, generator=_generators(prompts, seed),
                output_type=output_type).images


def generate(profile, base, refiner, prompt, refine: bool = True, **overrides):
    """``two_stage`` with the profile's sizes, steps and guidance (keyword arguments override them).

    ``refine=False``: ``base_only`` with the same settings; returns (images, None).
    """
    g = profile.generate
    kw = dict(steps=g.steps, guidance_scale=g.guidance_scale, high_noise_frac=g.high_noise_frac, height=g.height,
              width=g.width, seed=profile.seed) | overrides
    if not refine:
        kw.pop("high_noise_frac")
        return base_only(base, prompt, **kw), None
    return two_stage(base, refiner, prompt, **kw)


def japanese_variants(profile, students_dir: str | Path, model_dir: str | Path, mapping_path=None) -> dict:
    """The Japanese models stage 4 compares, as (base, refiner) pairs: copies with every row the mean English row
    (untrained), copies with stage 2's similarity rows (init only; needs ``mapping_path``) and the distilled model
    assembled in ``model_dir``. All use stage 3's saved tokenizers."""
    from transformers import AutoTokenizer

    from .distillation import load_teachers, make_students
    from .embedding_init import load_mapping

    students_dir = Path(students_dir)
    tok, tok_2 = (AutoTokenizer.from_pretrained(students_dir / t) for t in ("tokenizer", "tokenizer_2"))
    teachers = load_teachers(profile)
    variants = {}
    for name, strategy in (("untrained (mean rows)", "mean"), ("init only (similarity)", "similarity")):
        mapping = None
        if strategy == "similarity":
            if mapping_path is None or not Path(mapping_path).exists():
                continue  # notebook 02 has not run: nothing to measure
            mapping, _ = load_mapping(mapping_path)
        s = make_students(teachers, tok, tok_2, strategy, mapping, seed=profile.seed)
        variants[name] = load_pipelines(profile, text_encoder=s.text_encoder.eval(), text_encoder_2=s.text_encoder_2.eval(),
                                        tokenizer=tok, tokenizer_2=tok_2)
    variants["distilled"] = load_assembled(model_dir, profile.torch_dtype(), profile.torch_device())
    return variants


def memory_by_option(profile, base, refiner, prompt: str) -> list[dict]:
    """Peak GPU memory of one two-stage image under each memory option (on a CUDA device; else an empty list,
    with a note). Options are applied cumulatively: plain, + VAE tiling and slicing, + model CPU offload."""
    if profile.torch_device().type != "cuda":
        print("No CUDA GPU on this machine: nothing measured (memory options matter on GPUs only).")
        return []
    rows = []
    for option in ("plain", "vae tiling + slicing", "model CPU offload"):
        if option == "vae tiling + slicing":
            base.vae.enable_tiling()
            base.vae.enable_slicing()
        if option == "model CPU offload":
            base.enable_model_cpu_offload()
            refiner.enable_model_cpu_offload()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            generate(profile, base, refiner, [prompt])
            peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except torch.cuda.OutOfMemoryError:
            peak = "out of memory"
        rows.append({"option": option, "peak GiB": peak, "device": torch.cuda.get_device_name(0)})
    return rows


def stage_seconds(profile, base, refiner, prompts, **overrides) -> dict:
    """Wall-clock seconds of the base stage and of the refiner stage for one batch of ``prompts``."""
    import time

    g = profile.generate
    kw = dict(num_inference_steps=g.steps, guidance_scale=g.guidance_scale, height=g.height, width=g.width) | overrides
    sync = torch.cuda.synchronize if profile.torch_device().type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    latents = base(prompt=prompts, denoising_end=g.high_noise_frac, output_type="latent",
                   generator=_generators(prompts, profile.seed), **kw).images
    sync()
    t1 = time.perf_counter()
    refiner(prompt=prompts, image=latents, denoising_start=g.high_noise_frac, generator=_generators(prompts, profile.seed),
            **kw)
    sync()
    t2 = time.perf_counter()
    return {"base_seconds": t1 - t0, "refiner_seconds": t2 - t1, "images": len(prompts)}


def final_latents(profile, pipelines, prompts, seeds=(0, 1)) -> torch.Tensor:
    """``[seeds, prompts, C*H*W]``: the refiner's final latents for each prompt and seed (float32, CPU)."""
    base, refiner = pipelines
    out = [torch.as_tensor(generate(profile, base, refiner, prompts, seed=s, output_type="latent")[0]).float().flatten(1)
           for s in seeds]
    return torch.stack(out).cpu()


def agreement(japanese: torch.Tensor, english: torch.Tensor) -> dict:
    """Do Japanese prompts lead to the images their English translations lead to? ``final_latents`` of JA_i and
    EN_i (same seeds), each set minus its own mean over the prompts (with a shared seed, raw latents of *any* two
    prompts are more than 0.99 alike), then the cosine of JA_i with EN_j: matched (i = j) against mismatched, and
    how often EN_i is the nearest of all EN_j (chance 1 / prompts)."""
    n = japanese.shape[1]
    matched = mismatched = hits = 0.0
    for ja, en in zip(japanese, english):
        sim = (torch.nn.functional.normalize(ja - ja.mean(0), dim=1)
               @ torch.nn.functional.normalize(en - en.mean(0), dim=1).T)
        matched += float(sim.diagonal().mean())
        mismatched += float((sim.sum() - sim.diagonal().sum()) / (n * n - n))
        hits += int((sim.argmax(1) == torch.arange(n)).sum())
    seeds = japanese.shape[0]
    return {"centred_cos_matched": matched / seeds, "centred_cos_mismatched": mismatched / seeds,
            "nearest_rate": hits / (n * seeds), "chance": 1 / n, "pairs": n, "seeds": seeds}


# -----------------------------------------------------------------------------
# a Japanese SDXL as two diffusers folders

TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def _link(src: Path, dest: Path, final_parent: Path, copy: bool) -> None:
    """``dest`` (inside a temporary folder that becomes ``final_parent``) as a copy of ``src`` or a link to it; links
    are relative to where the folder ends up, so a folder moved together with its source keeps working."""
    if copy:
        shutil.copytree(src, dest, symlinks=False) if src.is_dir() else shutil.copy2(src, dest)
    else:
        os.symlink(os.path.relpath(src.resolve(), final_parent.resolve()), dest)


def assemble(profile, students_dir: str | Path, out: str | Path, copy: bool = False) -> dict[str, Path]:
    """``out/base`` and ``out/refiner``: the profile's English pipelines with the Japanese encoders and tokenizers of
    ``students_dir`` (stage 3's ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2`` folders).

    ``copy=False`` links the unchanged parts (a folder to share or upload: ``copy=True``, which copies them).
    """
    from .runs import atomic_path

    students_dir = Path(students_dir)
    missing = [p for p in TEXT_PARTS if not (students_dir / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{students_dir} lacks {', '.join(missing)}: run notebook 03 or `jpsdxl distill` "
                                f"(they write these four folders) first.")
    folders = resolve_profile(profile)
    english = {"base": Path(folders["SDXL base"]), "refiner": Path(folders["SDXL refiner"])}
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
                else:
                    _link(english[role] / name, tmp / name, out / role, copy=copy)
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        result[role] = out / role
    return result


def describe_assembled(folder: str | Path) -> list[dict]:
    """One row per component of an assembled model: where each of base's and refiner's parts really lives."""
    from .hub import folder_size

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


def load_assembled(folder: str | Path, dtype=torch.float32, device="cpu", variant: str | None = None):
    """(base, refiner) from an ``assemble`` folder or the two folders of a hub id pair: plain diffusers."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    folder = Path(folder)
    with quiet_hf_progress():
        base = StableDiffusionXLPipeline.from_pretrained(str(folder / "base"), dtype=dtype, variant=variant)
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            str(folder / "refiner"), dtype=dtype, variant=variant, text_encoder_2=base.text_encoder_2,
            tokenizer_2=base.tokenizer_2, vae=base.vae)
    for pipe in (base, refiner):
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line (blank lines skipped); a clear error for what cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-file {path}: no such file (write one prompt per line)")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path}: no prompts in it (write one prompt per line)")
    return prompts


def output_paths(out: str | Path, n: int) -> list[Path]:
    """``out`` for one image; ``stem-01.png``, ``stem-02.png``, ... beside it for several."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"--out {out}: give an image file name ending in .png, .jpg or .webp")
    if n == 1:
        return [out]
    width = max(2, len(str(n)))
    return [out.with_name(f"{out.stem}-{i:0{width}d}{out.suffix}") for i in range(1, n + 1)]


def japanese_model(profile, model: str | Path | None = None) -> Path:
    """The folder ``jpsdxl generate`` draws with: ``model`` if given (it must hold base/ and refiner/), else the
    profile's assembled model under runs/, assembled from stage 3's students if needed, and on a fresh checkout
    those students trained first (``jpsdxl distill``: about 2 minutes on ``tiny``)."""
    import sys

    from .runs import runs_dir

    if model is not None:
        folder = Path(model)
        if not ((folder / "base").is_dir() and (folder / "refiner").is_dir()):
            raise FileNotFoundError(f"--model {model}: not a folder holding base/ and refiner/ (notebook 04 writes "
                                    f"runs/<profile>/04_generation/model; generation.assemble makes one)")
        return folder
    out = runs_dir(profile.name, "04_generation") / "model"
    if (out / "base").is_dir() and (out / "refiner").is_dir():
        return out
    students = runs_dir(profile.name, "03_distillation")
    if not all((students / p).is_dir() for p in TEXT_PARTS):
        from .distillation import distil, prepare, save_students

        print(f"No trained Japanese encoders for profile {profile.name!r} yet: training them now (stage 3, as "
              f"`jpsdxl distill` does) into {students}", file=sys.stderr)
        setup = prepare(profile, runs_dir(profile.name, "02_embedding_init") / "mapping.pt")
        wanted = profile.distill.init or profile.init.strategy
        init = wanted if setup.mapping is not None or wanted in ("mean", "random") else "mean"
        save_students(distil(setup, students, init=init).students, students)
    assemble(profile, students, out)
    return out
