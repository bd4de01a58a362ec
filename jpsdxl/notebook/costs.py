"""What training costs: model FLOPs per training pair, and hours for the card's 41.4M pairs at a *measured* rate.

Notebook 03's cost table. Every rate comes from a run (this machine's, or ``benchmarks/distillation_speed.py`` on a
GPU, saved in ``benchmarks/results/``); every hour figure derived from one is an estimate for the named hardware.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def training_flops_per_sample(text_encoder, text_encoder_2, tokens: int = 77) -> dict:
    """Model FLOPs of one training pair: 6 x student parameters x tokens (forward and backward) plus
    2 x teacher parameters x tokens (the teacher's forward); the students have the teachers' sizes up to the
    embedding rows, which are lookups and cost no multiply-adds (so they are left out of both)."""
    def dense(te):
        return sum(p.numel() for n, p in te.named_parameters() if "embeddings" not in n)

    params = dense(text_encoder) + dense(text_encoder_2)
    return {"dense_parameters": params, "flops_per_pair": (6 + 2) * params * tokens}


def recipe_flops_per_pair(recipe: str = "sdxl") -> dict:
    """``training_flops_per_sample`` for a zoo recipe's text encoders, built on the meta device (no memory)."""
    from ..core.zoo import build_components

    with torch.device("meta"):
        parts = build_components(recipe, scheduler=False)
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

