"""The offline model zoo: SDXL base + refiner built deterministically from configs (``tiny``: small, text encoders of
different widths so a mix-up fails loudly; ``shapes``: tiny with the shipped trained weights; ``sdxl``: SDXL 1.0's
real shapes, random) into ``<cache>/zoo/<recipe>-<hash>/``, with SDXL's two CLIP tokenizers, then loaded as any
model is, by ``from_pretrained(<folder>)``. It fetches nothing (``hub.py``) and trains nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

from .runs import atomic_path, cache_dir, quiet_hf_progress


def _text_encoder(hidden: int, layers: int, heads: int, projection: int, act: str) -> dict:
    # The special ids are those of stabilityai's SDXL configs: legacy (bos 0, eos 2, pad 1), which makes
    # transformers pool at argmax(input_ids), i.e. at <|endoftext|> = 49407, the largest CLIP id. A Japanese
    # copy must not inherit eos_token_id=2 (see encoders.py).
    return dict(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection, hidden_act=act,
                layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)


_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                  timestep_spacing="leading", prediction_type="epsilon", num_train_timesteps=1000)


def _recipe(te1: dict, te2: dict, time_dim: int, base_unet: dict, refiner_unet: dict, vae: dict, seed: int = 0) -> dict:
    """Wire the UNet widths to the text encoders exactly as SDXL does."""
    return dict(
        seed=seed, text_encoder=te1, text_encoder_2=te2, vae=vae, scheduler=_SCHEDULER,
        unet_base=dict(base_unet, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                       # the base reads concat(h[-2] of te1, h[-2] of te2) ...
                       cross_attention_dim=te1["hidden_size"] + te2["hidden_size"],
                       # ... and pooled te2 + 6 size/crop ids (original size, crop top-left, target size)
                       projection_class_embeddings_input_dim=6 * time_dim + te2["projection_dim"]),
        unet_refiner=dict(refiner_unet, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                          cross_attention_dim=te2["hidden_size"],  # the refiner sees text_encoder_2 only
                          # pooled te2 + 5 ids (original size, crop, aesthetic score)
                          projection_class_embeddings_input_dim=5 * time_dim + te2["projection_dim"]),
    )


_TINY_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                  use_linear_projection=True, transformer_layers_per_block=(1, 2), norm_num_groups=32)

_TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), sample_size=64,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 norm_num_groups=32)

RECIPES = {
    "tiny": _recipe(
        te1=_text_encoder(64, 4, 4, 64, "quick_gelu"),
        te2=_text_encoder(96, 4, 4, 96, "gelu"),
        time_dim=8,
        base_unet=_TINY_UNET,
        refiner_unet=_TINY_UNET,
        vae=_TINY_VAE,
    ),
    # The same tiny SDXL, trained on the shapes world (32x32 images, 4x16x16 latents): the text encoders stay the
    # random frozen ones (seeded, rebuilt, never shipped); VAE and UNets come from the weights shipped in
    # jpsdxl/zoo_weights/shapes/, which carry this recipe's hash. Rebuild them with `jpsdxl train-shapes`.
    "shapes": _recipe(
        te1=_text_encoder(64, 4, 4, 64, "quick_gelu"),
        te2=_text_encoder(96, 4, 4, 96, "gelu"),
        time_dim=8,
        base_unet=dict(_TINY_UNET, sample_size=16),
        refiner_unet=dict(_TINY_UNET, sample_size=16),
        vae=dict(_TINY_VAE, sample_size=32),
    ) | {"weights": "shapes", "train": dict(
        seed=0, vae_steps=1000, vae_batch=32, vae_lr=2e-3, vae_kl=1e-6, latents=20_000, base_steps=3000,
        refiner_steps=1000, batch=32, lr=1e-3, warmup=100, ema=0.999, caption_dropout=0.1, min_snr_gamma=5.0,
        refiner_max_timestep=300)},
    "sdxl": _recipe(  # stabilityai/stable-diffusion-xl-{base,refiner}-1.0 shapes
        te1=_text_encoder(768, 12, 12, 768, "quick_gelu"),  # CLIP ViT-L/14 text tower
        te2=_text_encoder(1280, 32, 20, 1280, "gelu"),  # OpenCLIP ViT-bigG/14 text tower
        time_dim=256,
        base_unet=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                       block_out_channels=(320, 640, 1280),
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                       use_linear_projection=True, norm_num_groups=32),
        refiner_unet=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                          block_out_channels=(384, 768, 1536, 1536),
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                          attention_head_dim=(6, 12, 24, 24), transformer_layers_per_block=4,
                          use_linear_projection=True, norm_num_groups=32),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=2, sample_size=1024, scaling_factor=0.13025, norm_num_groups=32),
    ) | {"save_dtype": "float16"},  # 5.7B random parameters: store them as the hub's fp16 variant would (11 GB)
}


WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "zoo_weights"  # jpsdxl/zoo_weights/<recipe>/


class StaleWeights(RuntimeError):
    """Shipped weights that a different recipe made: rebuild them rather than load them silently."""


def load_trained(name: str, components: dict) -> dict:
    """Put a recipe's shipped trained weights into its freshly built ``components`` (checked against its hash)."""
    from safetensors import safe_open

    folder = WEIGHTS_DIR / RECIPES[name]["weights"]
    key = recipe_key(name)
    info = training_record(name) if (folder / "training.json").exists() else {}
    if info.get("recipe") != key:
        raise StaleWeights(f"{folder}: the shipped weights were made by recipe {info.get('recipe')!r}, but the "
                           f"recipe is now {key!r}. Rebuild them: jpsdxl train-shapes (see docs/shapes-world.md).")
    for part in ("vae", "unet_base", "unet_refiner"):
        if part not in components:  # built one at a time (build_recipe): each gets its own weights
            continue
        path = folder / f"{part}.safetensors"
        with safe_open(path, "pt") as f:
            if f.metadata().get("recipe") != key:
                raise StaleWeights(f"{path} carries recipe {f.metadata().get('recipe')!r}, expected {key!r}: "
                                   f"rebuild with jpsdxl train-shapes")
            module = components[part]
            module.load_state_dict({k: f.get_tensor(k).to(module.dtype) for k in f.keys()})
    if "vae" in components:
        components["vae"].register_to_config(scaling_factor=info["scaling_factor"])
    return components


def training_record(name: str = "shapes") -> dict:
    """What training a recipe's shipped weights recorded: time, settings, loss curves, the VAE's judge scores."""
    return json.loads((WEIGHTS_DIR / RECIPES[name]["weights"] / "training.json").read_text())


def recipe_key(name: str) -> str:
    """Folder name of a recipe: changes whenever the recipe (configs or seed) changes."""
    blob = json.dumps(RECIPES[name], sort_keys=True, default=list).encode()
    return f"{name}-{hashlib.sha256(blob).hexdigest()[:10]}"


def build_components(name: str, scheduler: bool = True, only: tuple[str, ...] | None = None):
    """Instantiate a recipe's models, each from ``torch.manual_seed(seed)``: same seed, same weights.

    ``scheduler=False`` leaves the scheduler out (it cannot be built on the meta device, used to count parameters);
    ``only`` builds just the named components (the same weights as in a full build: each has its own seed).
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    r = copy.deepcopy(RECIPES[name])
    makers = dict(
        text_encoder=lambda: CLIPTextModel(CLIPTextConfig(**r["text_encoder"])),
        text_encoder_2=lambda: CLIPTextModelWithProjection(CLIPTextConfig(**r["text_encoder_2"])),
        vae=lambda: AutoencoderKL(**r["vae"]),
        unet_base=lambda: UNet2DConditionModel(**r["unet_base"]),
        unet_refiner=lambda: UNet2DConditionModel(**r["unet_refiner"]),
    )
    parts = {}
    for offset, (part, make) in enumerate(makers.items()):
        if only is None or part in only:
            torch.manual_seed(r["seed"] + offset)  # one seed per component: a change to one leaves the others alone
            parts[part] = make()
    if scheduler:
        parts["scheduler"] = EulerDiscreteScheduler(**r["scheduler"])
    return parts


# where each component goes: the refiner shares the base's text_encoder_2 and VAE, as the real pair does
_LAYOUT = {"text_encoder": ("base",), "text_encoder_2": ("base", "refiner"), "vae": ("base", "refiner"),
           "unet_base": ("base",), "unet_refiner": ("refiner",)}


def pipelines(components: dict):
    """(base, refiner) pipeline objects over ``components``: what the folders' model_index.json files describe."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from .clip_tokenizer import build_sdxl_clip_tokenizers

    c = components
    tokenizer, tokenizer_2 = build_sdxl_clip_tokenizers()
    base = StableDiffusionXLPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"], tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=c["unet_base"], scheduler=c["scheduler"], force_zeros_for_empty_prompt=True)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=c["vae"], text_encoder=None, text_encoder_2=c["text_encoder_2"], tokenizer=None, tokenizer_2=tokenizer_2,
        unet=c["unet_refiner"], scheduler=c["scheduler"], requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False)
    return base, refiner


def build_recipe(name: str, out_dir: str | Path) -> Path:
    """Build recipe ``name`` into ``out_dir/{base,refiner}`` as diffusers pipeline folders.

    One component at a time: built, given its shipped weights (if the recipe has some), cast to the recipe's save
    dtype, written and freed before the next, so the peak is one component in fp32 (the ``sdxl`` recipe's base
    UNet, 10 GB) instead of all of them (23 GB). The pipelines' own files (model_index.json, tokenizers, scheduler)
    come from pipeline objects built on the meta device: no memory, and exactly what ``save_pretrained`` writes.
    """
    import torch

    if name not in RECIPES:
        raise ValueError(f"No zoo recipe {name!r}; available: {sorted(RECIPES)}")
    out_dir = Path(out_dir)
    dtype = getattr(torch, RECIPES[name].get("save_dtype", "float32"))
    with torch.device("meta"):
        shells = build_components(name, scheduler=False)
    shells["scheduler"] = build_components(name, only=())["scheduler"]
    with quiet_hf_progress():
        for role, pipe in zip(("base", "refiner"), pipelines(shells)):
            pipe.save_config(out_dir / role)  # model_index.json
            pipe.scheduler.save_pretrained(out_dir / role / "scheduler")
            for sub in ("tokenizer", "tokenizer_2"):
                if getattr(pipe, sub, None) is not None:
                    getattr(pipe, sub).save_pretrained(out_dir / role / sub)
        for part, roles in _LAYOUT.items():
            built = build_components(name, scheduler=False, only=(part,))
            if "weights" in RECIPES[name]:
                load_trained(name, built)
            module = built.pop(part)
            if module.dtype != dtype:  # parameter by parameter: the fp32 copy is freed as the cast goes
                module = module.to(dtype)
            sub = "unet" if part.startswith("unet") else part
            module.save_pretrained(out_dir / roles[0] / sub)
            del module
            for role in roles[1:]:  # the same files: hard links, not a second copy
                shutil.copytree(out_dir / roles[0] / sub, out_dir / role / sub, copy_function=os.link)
    (out_dir / "zoo.json").write_text(json.dumps({"recipe": name, **RECIPES[name]}, indent=2, default=list))
    return out_dir


def cache_key(name: str) -> str:
    """Cache folder name of a built recipe: its recipe key, plus a hash of its shipped weights when it has some
    (retrained weights under an unchanged recipe must not be served from an old build)."""
    key = recipe_key(name)
    if "weights" not in RECIPES[name]:
        return key
    h = hashlib.sha256()
    for path in sorted((WEIGHTS_DIR / RECIPES[name]["weights"]).glob("*.safetensors")):
        h.update(path.read_bytes())
    return f"{key}-{h.hexdigest()[:8]}"


def build_from_zoo(spec: str) -> Path:
    """``zoo:<recipe>/<part>`` -> the cached folder of that part, building the recipe on first use."""
    name, _, part = spec.removeprefix("zoo:").partition("/")
    if name not in RECIPES or part not in ("base", "refiner"):
        raise ValueError(f"{spec!r}: expected zoo:<recipe>/base or zoo:<recipe>/refiner, recipes {sorted(RECIPES)}")
    folder = cache_dir("zoo") / cache_key(name)
    if not (folder / "zoo.json").exists():
        with atomic_path(folder) as tmp:
            build_recipe(name, tmp)
    return folder / part
