"""Stage 4: SDXL base then refiner with a latent hand-off (``denoising_end`` / ``denoising_start``), the models stage 4
compares (each sharing the English UNets, VAE and scheduler) and ``run``, what ``jpsdxl generate`` calls. The
refiner reads ``text_encoder_2`` only, so it shares that encoder, ``tokenizer_2`` and the VAE with the base. It does
not assemble the model's folders (``assembly.py``) or measure (``notebook/measure.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .core.models import PIPELINE_ROLES, resolve_profile
from .core.runs import quiet_hf_progress


def load_pipelines(profile, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                   progress: bool = False):
    """(base, refiner) pipelines for ``profile``, optionally with replacement encoders/tokenizers.

    Replacement encoders are cast to the profile's dtype (in place, as ``nn.Module.to`` does) and shared by both
    pipelines: the refiner gets the base's ``text_encoder_2``, ``tokenizer_2`` and VAE. Hub pipelines are fetched
    and loaded in the profile's weights variant (``models.variant``, e.g. fp16), and nothing else.
    """
    from diffusers import AutoencoderKL

    from .assembly import from_pretrained_pair

    profile.check_device()  # before anything large is built or downloaded
    dtype, m = profile.torch_dtype(), profile.models
    swap = {k: v for k, v in dict(text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                  tokenizer_2=tokenizer_2).items() if v is not None}
    swap = {k: v.to(dtype) if isinstance(v, torch.nn.Module) else v for k, v in swap.items()}
    # resolve everything first: offline, one message names every missing model before anything loads
    folders = resolve_profile(profile, PIPELINE_ROLES)
    if "VAE" in folders:
        with quiet_hf_progress(progress):
            swap["vae"] = AutoencoderKL.from_pretrained(folders["VAE"], dtype=dtype)
    pair = from_pretrained_pair(folders["SDXL base"], folders["SDXL refiner"], dtype, m.variant, progress, **swap)
    return place(profile, *pair)


def place(profile, base, refiner):
    """Put both pipelines where ``generate.offload`` says, and return them:

    * ``none``: everything on the profile's device;
    * ``text_encoders``: UNets and VAE on the device, the text encoders in host memory, each moved in by an
      accelerate hook when it encodes and moved out when the next part runs: a pipeline pair compared after another
      brings only its text encoders (colab: a T4 holds both UNets, the VAE and one text-encoder pair);
    * ``model``: diffusers' model CPU offload (every part in host memory, each on the device only while it runs).

    Offloading adds VAE tiling and slicing (1024² images decoded in pieces). On a CPU the hooks have nowhere else to
    move a part: the same calls, a rehearsal of the path."""
    from accelerate import cpu_offload_with_hook

    device, how = profile.torch_device(), profile.generate.offload
    if how == "model":
        for option in MEMORY_OPTIONS[1:]:
            apply_memory_option(base, refiner, option, device)
        return base, refiner
    if how == "none":
        return base.to(device), refiner.to(device)
    apply_memory_option(base, refiner, "vae tiling + slicing")
    hook = None  # a hook replaces the one a shared part got when another pair was placed
    for te in (base.text_encoder, base.text_encoder_2):  # text_encoder_2 is the refiner's too
        if te is not None:
            _, hook = cpu_offload_with_hook(te.to("cpu"), device, prev_module_hook=hook)
    for pipe in (base, refiner):  # a UNet's call moves the last text encoder out; the UNet itself stays
        pipe.vae.to(device)
        cpu_offload_with_hook(pipe.unet.to(device), device, prev_module_hook=hook)
    return base, refiner


def with_text_parts(pipelines, text_encoder, text_encoder_2, tokenizer, tokenizer_2):
    """New (base, refiner) that share ``pipelines``' UNets, VAE and scheduler and read prompts through the given
    encoders and tokenizers (cast to the pipelines' dtype and device): a model to compare costs its text parts only."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base, refiner = pipelines
    te1, te2 = (te.to(base.unet.device, base.unet.dtype) for te in (text_encoder, text_encoder_2))
    new_base = StableDiffusionXLPipeline(**_settings(base), **{**base.components, "text_encoder": te1,
                                         "text_encoder_2": te2, "tokenizer": tokenizer, "tokenizer_2": tokenizer_2})
    new_refiner = StableDiffusionXLImg2ImgPipeline(**_settings(refiner), **{**refiner.components,
                                                   "text_encoder_2": te2, "tokenizer_2": tokenizer_2})
    for pipe in (new_base, new_refiner):
        pipe.set_progress_bar_config(disable=True)
    return new_base, new_refiner


# -----------------------------------------------------------------------------
# the models stage 4 compares, each sharing the English UNets, VAE and scheduler


def compared_models(profile, students_dir: str | Path, model_dir: str | Path, english) -> dict:
    """The models stage 4 compares, each as a loader: ``name -> load()`` giving its (base, refiner), placed as
    ``generate.offload`` says. The English original; copies with every row the mean English row (untrained) and with
    stage 2's similarity rows (init only; stage 2's mapping, checked by ``runs.require``), both with stage
    3's saved tokenizers; the distilled model assembled in ``model_dir``; and, where the profile names one and it can
    be had, the published Japanese SDXL (``models.published``; else left out, in one line).

    Every Japanese model shares ``english``'s UNets, VAE and scheduler, and its text encoders exist only while what
    ``load()`` returned is held: call, use, drop, and one Japanese text-encoder pair is resident at a time (at SDXL's
    shapes, 1.6 GB in fp16 each; five at once do not fit Colab's host RAM beside the UNets)."""
    import sys

    from .assembly import japanese_model, text_parts
    from .core.hub import ModelNotAvailable
    from .distillation import Teachers, make_students
    from .embedding_init import stage_mapping
    from .tokenization import tokenizer_pair

    tok, tok_2 = tokenizer_pair(students_dir)
    base = english[0]
    teachers = Teachers(base.text_encoder, base.text_encoder_2, base.tokenizer, base.tokenizer_2)
    mapping = stage_mapping(profile)

    def copies(strategy: str, mapping):
        def load():
            s = make_students(teachers, tok, tok_2, strategy, mapping, seed=profile.seed, dtype=None)  # as the pipes
            return place(profile, *with_text_parts(english, s.text_encoder.eval(), s.text_encoder_2.eval(), tok, tok_2))
        return load

    def folder(base_dir, variant=None):  # an assembled or published model: the text parts of its base folder
        return lambda: place(profile, *with_text_parts(english, *text_parts(base_dir, variant, profile.torch_dtype())))

    loaders = {"English (original)": lambda: place(profile, *english),
               "untrained (mean rows)": copies("mean", None), "init only (similarity)": copies("similarity", mapping),
               "distilled": folder(Path(model_dir) / "base")}
    if profile.models.published:
        try:  # found (or fetched) now: a model that cannot be had is left out before anything is drawn
            published = japanese_model(profile, profile.models.published)
            loaders["SD-XL 1.0-jp (published)"] = folder(published.base, published.variant)
        except ModelNotAvailable as e:
            print(f"{profile.models.published} is left out of the comparison: {str(e).splitlines()[0]}",
                  file=sys.stderr)
    return loaders


def with_students(english, students_dir: str | Path):
    """(base, refiner) that read prompts through a stage-3 output folder's encoders and tokenizers (``save_students``
    layout) and share ``english``'s UNets, VAE and scheduler: nothing is assembled on disk."""
    from .assembly import text_parts

    return with_text_parts(english, *text_parts(students_dir))


def _settings(pipe) -> dict:
    """A pipeline's own settings (the refiner's ``requires_aesthetics_score``, ``force_zeros_for_empty_prompt``):
    the arguments of its constructor that are not components, as its config recorded them."""
    import inspect

    params = inspect.signature(type(pipe).__init__).parameters
    return {k: pipe.config[k] for k in params if k in pipe.config and k not in pipe.components}


@torch.no_grad()
def two_stage(base, refiner, prompt, negative_prompt=None, *, steps: int, guidance_scale: float,
              high_noise_frac: float, height: int, width: int, seed: int = 0, output_type: str = "pil",
              callbacks=(None, None), refiner_prompt=None):
    """Base until ``high_noise_frac`` of the schedule, hand the latents over, refiner to the end.

    Returns the refiner's images (PIL by default) and the hand-off latents. ``callbacks``: diffusers'
    ``callback_on_step_end`` for the base and for the refiner (to watch the latents as they are denoised).
    ``refiner_prompt``: what the refiner reads instead of ``prompt`` (an experiment: another refiner, another language).
    """
    prompts = _listed(prompt)
    make = lambda: _generators(prompts, seed)  # noqa: E731
    latents = base(prompt=prompts, negative_prompt=negative_prompt, num_inference_steps=steps,
                   guidance_scale=guidance_scale, denoising_end=high_noise_frac, height=height, width=width,
                   generator=make(), output_type="latent", callback_on_step_end=callbacks[0]).images
    refined = prompts if refiner_prompt is None else _listed(refiner_prompt)
    images = refiner(prompt=refined, negative_prompt=negative_prompt, image=latents, num_inference_steps=steps,
                     guidance_scale=guidance_scale, denoising_start=high_noise_frac, generator=make(),
                     output_type=output_type, callback_on_step_end=callbacks[1]).images
    return images, latents


def _listed(prompt) -> list[str]:
    """A prompt or a list of prompts, as a list: what the pipelines batch over."""
    return [prompt] if isinstance(prompt, str) else list(prompt)


def _generators(prompts, seed: int):
    # one generator per prompt, all from the same seed: prompt i's noise does not depend on the batch
    return [torch.Generator(device="cpu").manual_seed(seed) for _ in prompts]


@torch.no_grad()
def base_only(base, prompt, negative_prompt=None, *, steps: int, guidance_scale: float, height: int, width: int,
              seed: int = 0, output_type: str = "pil"):
    """The base alone over the whole schedule, decoded: set against ``two_stage`` it shows what the refiner adds."""
    prompts = _listed(prompt)
    return base(prompt=prompts, negative_prompt=negative_prompt, num_inference_steps=steps,
                guidance_scale=guidance_scale, height=height, width=width, generator=_generators(prompts, seed),
                output_type=output_type).images


def batched(items, size: int) -> list[list]:
    """``items`` in runs of at most ``size`` (``generate.batch_size``): each image's noise comes from its own
    generator, so the images are the same whatever the batch, and the memory is bounded by it."""
    items = list(items)
    return [items[i:i + size] for i in range(0, len(items), size)]


def generate(profile, base, refiner, prompt, refine: bool = True, **overrides):
    """``two_stage`` with the profile's sizes, steps and guidance (keyword arguments override them), in calls of
    at most ``generate.batch_size`` prompts (the memory of one call grows with it: 1 on a 16 GB card at 1024²).

    ``refine=False``: ``base_only`` with the same settings; returns (images, None).
    """
    g = profile.generate
    kw = dict(steps=g.steps, guidance_scale=g.guidance_scale, high_noise_frac=g.high_noise_frac, height=g.height,
              width=g.width, seed=profile.seed) | overrides
    prompts = _listed(prompt)
    if not refine:
        kw.pop("high_noise_frac")
        return _joined([base_only(base, part, **kw) for part in batched(prompts, g.batch_size)]), None
    parts, refined = batched(prompts, g.batch_size), kw.pop("refiner_prompt", None)
    refined = [None] * len(parts) if refined is None else batched(_listed(refined), g.batch_size)
    images, latents = zip(*(two_stage(base, refiner, part, refiner_prompt=r, **kw) for part, r in zip(parts, refined)))
    return _joined(images), _joined(latents)


def _joined(parts: list):
    """The batches' outputs as one: PIL lists added, arrays and tensors concatenated along the batch."""
    import numpy as np

    if isinstance(parts[0], list):
        return [image for part in parts for image in part]
    return np.concatenate(parts) if isinstance(parts[0], np.ndarray) else torch.cat(list(parts))


MEMORY_OPTIONS = ("plain", "vae tiling + slicing", "model CPU offload")  # in order of cost, cumulative


def apply_memory_option(base, refiner, option: str, device="cuda") -> None:
    """One of ``MEMORY_OPTIONS``, in place: VAE tiling and slicing (decode large or batched images in pieces), or
    model CPU offload (each component moves to the GPU only while it runs; needs CUDA)."""
    if option == "vae tiling + slicing":
        base.vae.enable_tiling()  # the refiner shares this VAE
        base.vae.enable_slicing()
    elif option == "model CPU offload":
        base.enable_model_cpu_offload(device=device)
        refiner.enable_model_cpu_offload(device=device)
    elif option != "plain":
        raise ValueError(f"unknown memory option {option!r}; the options are {', '.join(MEMORY_OPTIONS)}")


# -----------------------------------------------------------------------------
# stage 4 as one call


def run(profile, prompts: list[str], paths: list, model=None, negative_prompt: str | None = None,
        offload: bool = False, **overrides) -> list:
    """Stage 4 (``jpsdxl generate``): draw each prompt with the profile's Japanese SDXL (stage 3's encoders,
    assembled; or ``model``: a folder with base/ and refiner/, or hub ids) and write it to its path, batch by batch
    as it is drawn (``generate.batch_size``), each file written atomically. ``offload``: diffusers' model CPU offload
    and a VAE in tiles, whatever ``generate.offload`` says. Keyword arguments override ``[generate]``."""
    import sys
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from PIL import Image
    from transformers.utils import logging as transformers_logging

    from .assembly import japanese_model, load_assembled
    from .core.runs import atomic_path
    from .tokenization import encode_prompts

    profile.check_device()
    if offload and profile.torch_device().type != "cuda":
        raise ValueError(f"--offload moves each part between the CPU and a CUDA GPU; profile {profile.name!r} runs on "
                         f"{profile.device}: leave --offload out")
    found = japanese_model(profile, model)
    if offload:  # offloaded as loaded (never moved to the GPU whole); the VAE decodes in tiles and slices
        base, refiner = load_assembled(found, profile.torch_dtype(), profile.torch_device(), offload=True)
        apply_memory_option(base, refiner, "vae tiling + slicing")
    else:  # where the profile's generate.offload puts them (colab: text encoders swapped in)
        base, refiner = place(profile, *load_assembled(found, profile.torch_dtype(), device=None))
    with warnings.catch_warnings(record=True) as caught:  # a prompt over 77 tokens: say once what was cut
        warnings.simplefilter("always")
        encode_prompts(base.tokenizer, prompts)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    for lib in (diffusers_logging, transformers_logging):  # their truncation warnings, once per encoder: said above
        lib.set_verbosity_error()
    size = profile.generate.batch_size
    for batch, batch_paths in zip(batched(prompts, size), batched(paths, size)):
        try:
            images, _ = generate(profile, base, refiner, batch,
                                 negative_prompt=negative_prompt and [negative_prompt] * len(batch), **overrides)
        except torch.cuda.OutOfMemoryError:
            raise ValueError("the GPU ran out of memory: try --offload (model CPU offload + VAE tiling), a smaller "
                             "--size, or generate.batch_size = 1 in the profile") from None
        for image, path in zip(images, batch_paths):
            with atomic_path(path) as tmp:  # a full disk leaves the old file (or none), never half an image
                image.save(tmp, format=Image.registered_extensions().get(Path(path).suffix.lower(), "PNG"))
            print(path, flush=True)
    return paths
