"""What training costs: model FLOPs per training pair, and hours for the card's 41.4M pairs at a *measured* rate.

Notebook 03's cost table. Every rate comes from a run (this machine's, or ``benchmarks/distillation_speed.py`` on a
GPU, saved in ``benchmarks/results/``); every hour figure derived from one is an estimate for the named hardware.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch


# Dense bf16 (T4: fp16) tensor-core peaks in TFLOP/s from the vendors' data sheets, by the *exact* name that
# torch.cuda.get_device_name reports: a substring would take an L40S for an L4, or a PCIe H100 for an SXM one.
PEAK_TFLOPS = {
    "NVIDIA H200": 989.0, "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
    "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0, "NVIDIA L40S": 362.0, "NVIDIA L4": 121.0, "NVIDIA A10G": 125.0, "Tesla T4": 65.0,
}


def peak_tflops(device_name: str) -> float | None:
    """The card's dense half-precision peak, or None for a card not in ``PEAK_TFLOPS`` (then no MFU is claimed)."""
    return PEAK_TFLOPS.get(device_name.strip())


def training_flops_per_sample(text_encoder, text_encoder_2, tokens: int = 77, recompute: bool = False) -> dict:
    """Model FLOPs of one training pair: 6 x student parameters x tokens (forward and backward) plus
    2 x teacher parameters x tokens (the teacher's forward); the students have the teachers' sizes up to the
    embedding rows, which are lookups and cost no multiply-adds (so they are left out of both).

    Hardware FLOPs add what the card really computes beyond that: with gradient checkpointing (``recompute``) the
    students' forward pass runs twice, 2 x parameters x tokens more. MFU divides the model FLOPs, HFU the hardware."""
    def dense(te):
        return sum(p.numel() for n, p in te.named_parameters() if "embeddings" not in n)

    params = dense(text_encoder) + dense(text_encoder_2)
    model = (6 + 2) * params * tokens
    return {"dense_parameters": params, "flops_per_pair": model,
            "hardware_flops_per_pair": model + (2 * params * tokens if recompute else 0)}


def estimated_rows(flops_per_pair: float, utilisation: float = 0.4, pairs: int = 41_376_862,
                   cards=("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L4", "Tesla T4")) -> list[dict]:
    """GPU-hours for one epoch of ``pairs`` on each card at ``utilisation`` of its peak: an **estimate** from the
    FLOP count, not a measurement (a card's measured rate goes through ``cost_rows`` instead)."""
    return [{"where": f"{card}: estimate at {utilisation:.0%} of {peak_tflops(card):.0f} TFLOP/s",
             "pairs_per_second": round(peak_tflops(card) * 1e12 * utilisation / flops_per_pair, 1),
             f"GPU-hours for {pairs / 1e6:.1f}M pairs (estimate)":
                 round(pairs * flops_per_pair / (peak_tflops(card) * 1e12 * utilisation) / 3600)}
            for card in cards]


@functools.lru_cache(maxsize=2)
def meta_components(recipe: str = "sdxl") -> dict:
    """A zoo recipe's models built on the meta device: shapes without memory or weights (a few seconds, once)."""
    from ..core.zoo import build_components

    with torch.device("meta"):
        return build_components(recipe, scheduler=False)


def recipe_flops_per_pair(recipe: str = "sdxl") -> dict:
    """``training_flops_per_sample`` for a zoo recipe's text encoders."""
    parts = meta_components(recipe)
    return training_flops_per_sample(parts["text_encoder"], parts["text_encoder_2"])


def measured_gpu_rows(path: str | Path) -> list[dict]:
    """The GPU rows that ``benchmarks/distillation_speed.py`` measured and saved (none until it has run on a GPU)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [{"where": f"{r['device']}, {r['profile']}, {r['settings']}", "pairs_per_second": r["pairs_per_second"],
             "peak GiB": r.get("peak_memory_gib")} for r in rows if r.get("device", "cpu") != "cpu"]


def cost_rows(measured: list[dict], flops_per_pair: float, pairs: int = 41_376_862, gpus=(1, 8)) -> list[dict]:
    """Hours for ``pairs`` training pairs (default: the card's 28,155,494 WMT23 + 13,221,368 caption pairs, one
    epoch) at each *measured* throughput (rows of ``{"where", "pairs_per_second", ...}``), scaled linearly to
    several GPUs (an upper bound: data-parallel scaling is rarely perfect)."""
    out = []
    for row in measured:
        rate = row["pairs_per_second"]
        out.append({**row, "TFLOP/s (model)": round(rate * flops_per_pair / 1e12, 3),
                    **{f"hours for {pairs / 1e6:.1f}M pairs on {g}": round(pairs / rate / g / 3600, 1) for g in gpus}})
    return out



# -----------------------------------------------------------------------------
# memory per stage and card: estimates from parameter counts, until a card has run the stage

E5_LARGE = 559_890_432  # intfloat/multilingual-e5-large's parameters (XLM-R large)


def _activations(profile, counts_cfg: dict, checkpointing: bool) -> float:
    """Bytes of the students' activations for one micro-batch at 77 tokens in half precision: s*b*h*(34 + 5*a*s/h)
    per layer (Korthikanti et al., 2022), or s*b*h*2 (each layer's input) under gradient checkpointing."""
    d, s = profile.distill, 77
    b = d.batch_size // d.grad_accum
    total = 0.0
    for h, layers, heads in counts_cfg:
        per_layer = s * b * h * 2 if checkpointing else s * b * h * (34 + 5 * heads * s / h)
        total += per_layer * layers
    return total


def stage_budgets(profile, recipe: str = "sdxl") -> list[dict]:
    """Peak GPU and host memory (GiB) of stages 02-04 on ``profile``'s settings at SDXL 1.0's shapes, from parameter
    counts: bytes per parameter x parameters resident, plus the students' activations (not a 1024² image's).
    **Estimates**: a card's measured peak replaces them (docs/results.md says which). Stage 04 holds one UNet pair
    shared by every compared model, the English text encoders and one Japanese pair (``generation.compared_models``),
    placed as ``generate.offload`` says."""
    from ..core.zoo import RECIPES
    from ..notebook.overview import recipe_parameter_counts

    gib = 2**30
    n = recipe_parameter_counts(recipe)
    te = n["text_encoder"] + n["text_encoder_2"]
    half = torch.tensor([], dtype=profile.torch_dtype()).element_size()
    d, g = profile.distill, profile.generate
    optimiser = {"adamw": 8, "adamw8bit": 2}[d.optimizer]
    shapes = [(RECIPES[recipe][k]["hidden_size"], RECIPES[recipe][k]["num_hidden_layers"],
               RECIPES[recipe][k]["num_attention_heads"]) for k in ("text_encoder", "text_encoder_2")]
    acts = _activations(profile, shapes, d.gradient_checkpointing)
    embedder = E5_LARGE * half if profile.init.embedder.startswith("st:") else 0
    unets = (n["unet_base"] + n["unet_refiner"] + n["vae"]) * half
    pair = te * half  # a text-encoder pair: the English one stays, one Japanese pair at a time (compared_models)
    gpu_04, host_04, where = {
        "none": (unets + 2 * pair, max(n["unet_base"], te) * half, "everything on the GPU"),
        "text_encoders": (unets + pair, 2 * pair, "UNets and VAE on the GPU, text encoders swapped in"),
        "model": (max(n["unet_base"], te) * half, unets + 2 * pair, "model CPU offload: every part in host RAM"),
    }[g.offload]
    rows = [
        {"stage": "02 init", "resident": "English text encoders + embedder + one Japanese pair at a time",
         "GPU GiB": (2 * pair + embedder) / gib, "host GiB": (2 * pair + embedder) / gib},
        {"stage": "03 distill", "resident": f"students fp32 + gradients + {d.optimizer} state + teachers + activations"
                                            + (" (checkpointed)" if d.gradient_checkpointing else ""),
         "GPU GiB": (te * (4 + 4 + optimiser) + pair + acts) / gib, "host GiB": (te * 4 + pair) / gib},
        {"stage": "04 generate", "resident": f"{where}; the English and one Japanese text-encoder pair",
         "GPU GiB": gpu_04 / gib, "host GiB": host_04 / gib},
    ]
    return [{**r, "GPU GiB": round(r["GPU GiB"], 1), "host GiB": round(r["host GiB"], 1)} for r in rows]


# -----------------------------------------------------------------------------
# time per stage and card: estimates from FLOP counts, until a card has run the stage


@functools.lru_cache(maxsize=8)
def _call_flops(recipe: str, height: int, width: int) -> tuple[int, int, int]:
    """FLOPs of one base UNet call, one refiner UNet call and one VAE decode of a ``height`` x ``width`` image,
    counted by torch's ``FlopCounterMode`` on the meta device (no memory, no weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    parts, counts = meta_components(recipe), []
    with torch.device("meta"):
        latent = torch.zeros(1, 4, height // 8, width // 8)
        for name in ("unet_base", "unet_refiner"):
            unet = parts[name]
            time_ids = (unet.config.projection_class_embeddings_input_dim - 1280) // unet.config.addition_time_embed_dim
            with FlopCounterMode(display=False) as count:
                unet(latent, torch.zeros(1), encoder_hidden_states=torch.zeros(1, 77, unet.config.cross_attention_dim),
                     added_cond_kwargs={"text_embeds": torch.zeros(1, 1280), "time_ids": torch.zeros(1, time_ids)})
            counts.append(count.get_total_flops())
        with FlopCounterMode(display=False) as count:
            parts["vae"].decode(latent)
    return counts[0], counts[1], count.get_total_flops()


def generation_flops_per_image(profile, recipe: str = "sdxl") -> float:
    """Model FLOPs of one two-stage image at ``profile``'s size, steps, guidance and hand-off: the base UNet for
    ``high_noise_frac`` of the steps, the refiner for the rest, each call twice under classifier-free guidance, then
    the VAE's decoder."""
    g = profile.generate
    base, refiner, vae = _call_flops(recipe, g.height, g.width)
    guided = 2 if g.guidance_scale > 1 else 1
    base_steps = round(g.steps * g.high_noise_frac)
    return guided * (base_steps * base + (g.steps - base_steps) * refiner) + vae


def stage_times(profile, card: str, utilisation: float = 0.4, recipe: str = "sdxl", models: int = 4) -> list[dict]:
    """Minutes of stages 03 and 04 on ``card`` at ``utilisation`` of its peak (``PEAK_TFLOPS``), at SDXL 1.0's shapes
    and ``profile``'s settings: 03 trains ``distill.steps`` x ``batch_size`` pairs (the students' forward twice under
    gradient checkpointing), 04 draws ``generate.eval_prompts`` images for each of ``models`` compared models.
    **Estimates** from FLOP counts, until a card has run the stage."""
    parts = meta_components(recipe)
    d, rate = profile.distill, peak_tflops(card) * 1e12 * utilisation
    pair = training_flops_per_sample(parts["text_encoder"], parts["text_encoder_2"],
                                     recompute=d.gradient_checkpointing)["hardware_flops_per_pair"]
    images = profile.generate.eval_prompts * models
    return [{"stage": "03 distill", "work": f"{d.steps:,} steps x {d.batch_size} pairs",
             "minutes (estimate)": round(d.steps * d.batch_size * pair / rate / 60)},
            {"stage": "04 generate", "work": f"{images} images ({models} models x {profile.generate.eval_prompts} "
                                             f"prompts), {profile.generate.steps} steps",
             "minutes (estimate)": round(images * generation_flops_per_image(profile, recipe) / rate / 60)}]
