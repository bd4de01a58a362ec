"""Stage 4: two-stage SDXL generation, base then refiner, with a latent hand-off.

The base denoises the first ``high_noise_frac`` of the schedule (``denoising_end``) and returns *latents*; the
refiner picks them up at the same point (``denoising_start``) and finishes, then decodes with the VAE. The base
reads both text encoders (their penultimate hidden states concatenated, plus text_encoder_2's pooled
projection); the refiner reads text_encoder_2 only, so it shares that encoder (and tokenizer_2, and the VAE)
with the base. Swapping in Japanese encoders and tokenizers is a keyword argument to ``load_pipelines``.

This file does not train or build models (``zoo.py``, ``hub.py`` load them) and does not assemble the Japanese
model's folders (``assembly.py``).
"""

from __future__ import annotations

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


MEMORY_OPTIONS = ("plain", "vae tiling + slicing", "model CPU offload")  # in order of cost, cumulative


def apply_memory_option(base, refiner, option: str) -> None:
    """One of ``MEMORY_OPTIONS``, in place: VAE tiling and slicing (decode large or batched images in pieces), or
    model CPU offload (each component moves to the GPU only while it runs; needs CUDA)."""
    if option == "vae tiling + slicing":
        base.vae.enable_tiling()  # the refiner shares this VAE
        base.vae.enable_slicing()
    elif option == "model CPU offload":
        base.enable_model_cpu_offload()
        refiner.enable_model_cpu_offload()
    elif option != "plain":
        raise ValueError(f"unknown memory option {option!r}; the options are {', '.join(MEMORY_OPTIONS)}")


def memory_by_option(profile, base, refiner, prompt: str) -> list[dict]:
    """Peak GPU memory of one two-stage image under each memory option (on a CUDA device; else an empty list,
    with a note). Options are applied cumulatively: plain, + VAE tiling and slicing, + model CPU offload."""
    if profile.torch_device().type != "cuda":
        print("No CUDA GPU on this machine: nothing measured (memory options matter on GPUs only).")
        return []
    rows = []
    for option in MEMORY_OPTIONS:
        apply_memory_option(base, refiner, option)
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


def load_clip(model: str = "ViT-L-14/openai", device: str | torch.device = "cpu") -> tuple:
    """(network, image preprocessing, tokenizer) of an open_clip model named ``"<architecture>/<pretrained tag>"``
    (fetched from the hub on first use; a bare architecture name gives random weights, for tests only)."""
    import open_clip

    name, _, pretrained = model.partition("/")
    net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None, device=device)
    return net.eval(), preprocess, open_clip.get_tokenizer(name)


def clip_score(images, prompts, clip: tuple) -> torch.Tensor:
    """``[n]``: the CLIP score of each image with its prompt, torchmetrics' definition (100 x the cosine of the image
    and text embeddings, floored at 0), with a model from ``load_clip``."""
    import numpy as np
    from PIL import Image

    net, preprocess, tokenizer = clip
    device = next(net.parameters()).device
    pil = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]
    with torch.no_grad():
        image = net.encode_image(torch.stack([preprocess(im) for im in pil]).to(device))
        text = net.encode_text(tokenizer(list(prompts)).to(device))
    cos = torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)
    return (100 * cos).clamp(min=0).cpu()


def clip_scores(profile, images_by_model: dict, prompts) -> dict:
    """Mean CLIP score per model of images ``[seeds, prompts, H, W, 3]`` (uint8) against ``prompts`` (the English
    ones: CLIP reads English), with ``generate.clip_model`` (loaded once for all models); profiles without one
    (``tiny``) get an empty dict."""
    model = profile.generate.clip_model
    if not model:
        print(f"profile {profile.name!r} sets no generate.clip_model: no CLIP score (full uses ViT-L-14/openai).")
        return {}
    clip = load_clip(model, profile.torch_device())
    return {name: float(clip_score(images.reshape(-1, *images.shape[2:]), list(prompts) * images.shape[0], clip).mean())
            for name, images in images_by_model.items()}


# -----------------------------------------------------------------------------
# speed: the card's example settings against the fastest that keep the same steps, size and scheduler

# diffusers' speed-up guide ("Accelerate inference of text-to-image diffusion models"), in its order; each applies
# on top of the ones before it
SPEEDUPS = ("fp16 throughout", "channels last", "fused QKV projections", "torch.compile")


def card_settings(base, refiner):
    """The card's example code as written: the base in fp16, the refiner in bf16, generation under bf16 autocast.
    Applied in place; returns the autocast context to generate in. (Here base and refiner share text_encoder_2
    and the VAE, in fp16; the card loads the refiner with its own. Both UNets do the work that matters.)"""
    refiner.unet.to(torch.bfloat16)
    return torch.autocast(base.device.type, dtype=torch.bfloat16)


def apply_speedup(base, refiner, name: str, dtype=torch.float16) -> None:
    """One step of ``SPEEDUPS``, applied to both pipelines in place. None changes the steps, the size or the
    scheduler; ``torch.compile`` pays its compilation on the first call after it."""
    if name == "fp16 throughout":  # undoes card_settings: one half-precision dtype, no autocast
        refiner.unet.to(dtype)
    elif name == "channels last":  # NHWC: the layout the GPU's convolution kernels prefer
        for module in (base.unet, refiner.unet, base.vae):
            module.to(memory_format=torch.channels_last)
    elif name == "fused QKV projections":  # one matmul for query, key and value in every attention block
        base.fuse_qkv_projections()
        refiner.fuse_qkv_projections(vae=False)  # the shared VAE is fused once
    elif name == "torch.compile":
        for pipe in (base, refiner):
            pipe.unet.compile(fullgraph=True)
    else:
        raise ValueError(f"unknown speed-up {name!r}; the speed-ups are {', '.join(SPEEDUPS)}")


# -----------------------------------------------------------------------------
# the command line's input and output


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
