"""Notebook 00's helpers: the environment check, SDXL's conditioning read off the profile's model configs (nothing
loaded: the tiny zoo and the real SDXL draw their own widths), the diagram, parameter counts. No recipe logic.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

from ..core import runs
from ..core.models import PIPELINE_ROLES, resolve_profile
from ..core.profiles import available_profiles, load_profile

# notebook stem -> (stage, module, what it teaches)
NOTEBOOKS = {
    "00_overview": ("overview", "jpsdxl.overview", "what SD-XL 1.0-jp changes, profiles, environment"),
    "01_tokenizer_alignment": ("1. tokenizer alignment", "jpsdxl.tokenization",
                               "what the encoders see; a Japanese tokenizer with SDXL's conventions"),
    "02_embedding_init": ("2. embedding initialisation", "jpsdxl.embedding_init",
                          "start each Japanese row from its most similar English token"),
    "03_distillation": ("3. distillation", "jpsdxl.distillation",
                        "train Japanese encoders to output what the English ones output"),
    "04_generation": ("4. two-stage generation", "jpsdxl.generation",
                      "base + refiner from a Japanese prompt, latent hand-off"),
}

PACKAGES = ["torch", "transformers", "diffusers", "tokenizers", "open_clip_torch", "sentence-transformers",
            "sentencepiece", "accelerate", "datasets", "papermill", "matplotlib"]


def environment_report() -> dict:
    """Versions, CPU, memory and GPU: what a bug report needs."""
    import torch

    report = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
              "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
              "cuda": torch.cuda.is_available(), "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE", "")}
    for name in PACKAGES:
        try:
            report[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            report[name] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                      bf16=torch.cuda.is_bf16_supported(including_emulation=False))
    return report


def profile_table() -> list[dict]:
    rows = []
    for name in available_profiles():
        p = load_profile(name)
        rows.append({"profile": name, "device": p.device, "dtype": p.dtype, "base": p.models.base,
                     "tokenizer": p.tokenizer.source, "image": f"{p.generate.width}x{p.generate.height}",
                     "measured minutes (notebooks so far)": round(sum(p.expected_minutes.values()), 1)
                     if p.expected_minutes else "not measured yet", "what for": p.description})
    return rows


def notebook_map(notebook_dir: str | Path | None = None) -> list[dict]:
    folder = Path(notebook_dir or runs.notebook_dir())  # the checkout's notebooks/, or the installed copy
    return [{"notebook": stem, "stage": stage, "code": module, "you learn": what,
             "available": (folder / f"{stem}.ipynb").exists()} for stem, (stage, module, what) in NOTEBOOKS.items()]


def _config(folder: Path, sub: str) -> dict:
    path = folder / sub / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def conditioning_shapes(profile) -> dict:
    """What SDXL's UNets are fed, from the configs of the profile's base and refiner folders."""
    profile.check_device()  # the zoo would otherwise build full-size models on a machine that cannot run them
    folders = resolve_profile(profile, PIPELINE_ROLES)  # offline, one message names every missing one
    base, refiner = folders["SDXL base"], folders["SDXL refiner"]
    te1, te2 = _config(base, "text_encoder"), _config(base, "text_encoder_2")
    ub, ur = _config(base, "unet"), _config(refiner, "unet")
    t = ub["addition_time_embed_dim"]
    shapes = {
        "context": te1["max_position_embeddings"],
        "te1_width": te1["hidden_size"], "te1_layers": te1["num_hidden_layers"],
        "te2_width": te2["hidden_size"], "te2_layers": te2["num_hidden_layers"], "te2_pooled": te2["projection_dim"],
        "base_cross_attention": ub["cross_attention_dim"], "base_added_cond": ub["projection_class_embeddings_input_dim"],
        "refiner_cross_attention": ur["cross_attention_dim"],
        "refiner_added_cond": ur["projection_class_embeddings_input_dim"], "time_embed": t,
    }
    shapes["consistent"] = (
        shapes["base_cross_attention"] == shapes["te1_width"] + shapes["te2_width"]
        and shapes["refiner_cross_attention"] == shapes["te2_width"]
        and shapes["base_added_cond"] == shapes["te2_pooled"] + 6 * t
        and shapes["refiner_added_cond"] == shapes["te2_pooled"] + 5 * t)
    return shapes


def draw_conditioning(shapes: dict, ax=None):
    """Boxes and arrows: prompt -> two tokenizers -> two encoders -> what base and refiner UNets read."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    if ax is None:
        _, ax = plt.subplots(figsize=(12, 5.5))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 6)
    ax.axis("off")
    s, L = shapes, shapes["context"]

    def box(x, y, text, color, w=2.2, h=0.8):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=color, ec="black", lw=1))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8.5)
        return (x, y, w, h)

    def arrow(a, b):
        ax.annotate("", xy=(b[0], b[1] + b[3] / 2), xytext=(a[0] + a[2], a[1] + a[3] / 2),
                    arrowprops=dict(arrowstyle="->", lw=1))

    new, frozen = "#ffd9a8", "#d7e8f7"
    prompt = box(0.1, 2.6, "プロンプト\n「かわいすぎる子猫」", "white", w=1.8)
    t1 = box(2.4, 4.1, f"tokenizer\n{L} ids, pad=EOS", new)
    t2 = box(2.4, 1.1, f"tokenizer_2\n{L} ids, pad=\"!\"", new)
    e1 = box(5.0, 4.1, f"text_encoder (CLIP ViT-L)\n{s['te1_layers']} layers, width {s['te1_width']}", new, w=2.5)
    e2 = box(5.0, 1.1, f"text_encoder_2 (bigG)\n{s['te2_layers']} layers, width {s['te2_width']}", new, w=2.5)
    cat = box(8.1, 3.3, f"concat h[-2]\n{L} x {s['base_cross_attention']}", frozen, w=1.6)
    pool = box(8.1, 2.0, f"pooled {s['te2_pooled']}\n+ 6 size ids", frozen, w=1.6)
    refc = box(8.1, 0.4, f"h[-2] {L} x {s['te2_width']}\npooled + 5 ids", frozen, w=1.6)
    base = box(10.2, 2.6, "base UNet\n(frozen)", frozen, w=1.6, h=1.2)
    ref = box(10.2, 0.3, "refiner UNet\n(frozen)", frozen, w=1.6, h=1.0)
    for a, b in [(prompt, t1), (prompt, t2), (t1, e1), (t2, e2), (e1, cat), (e2, cat), (e2, pool), (e2, refc),
                 (cat, base), (pool, base), (refc, ref)]:
        arrow(a, b)
    ax.text(0.1, 5.6, "オレンジ = SD-XL 1.0-jp で置き換える部分 (tokenizers, text encoders);  青 = そのまま (frozen)",
            fontsize=9)
    ax.annotate("", xy=(11.0, 1.3), xytext=(11.0, 2.6), arrowprops=dict(arrowstyle="->", lw=1.5, color="crimson"))
    ax.text(11.1, 1.95, "latents\ndenoising_end →\ndenoising_start", fontsize=7, color="crimson", va="center")
    return ax


def component_table(base, refiner) -> list[dict]:
    """Each pipeline component, its size, and whether SD-XL 1.0-jp retrains it."""
    rows = []
    for pipe_name, pipe in (("base", base), ("refiner", refiner)):
        for name, module in pipe.components.items():
            if module is None or not hasattr(module, "parameters"):
                continue
            shared = pipe_name == "refiner" and any(module is m for m in base.components.values())
            rows.append({"pipeline": pipe_name, "component": name, "class": type(module).__name__,
                         "parameters (M)": round(sum(p.numel() for p in module.parameters()) / 1e6, 3),
                         "retrained for Japanese": name.startswith("text_encoder"),
                         "shared with base": shared})
    return rows


def recipe_parameter_counts(recipe: str = "sdxl") -> dict[str, int]:
    """Parameters of each component of a zoo recipe, counted on the meta device (no memory, no download).

    For the ``sdxl`` recipe these are SDXL 1.0's published sizes (a test pins them), so the real model's share
    of retrained parameters can be shown on any machine.
    """
    import torch

    from ..core.zoo import build_components

    with torch.device("meta"):
        parts = build_components(recipe, scheduler=False)
    return {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}


def retrained_share(counts: dict[str, int]) -> float:
    """Share of all parameters (base + refiner, shared parts once) that SD-XL 1.0-jp retrains: the text encoders."""
    return sum(v for k, v in counts.items() if k.startswith("text_encoder")) / sum(counts.values())
