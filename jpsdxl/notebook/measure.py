"""Measurements the notebooks and benchmarks show: judged generation on the shapes world, whether Japanese prompts
lead to the images their translations lead to, the CLIP score, time and memory per stage, and the speed-ups of
diffusers' guide.

Measurement only: the pipelines themselves are stage 4's (``generation.py``), the judge is the shapes world's.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ..generation import apply_memory_option, generate, MEMORY_OPTIONS
from ..shapes.world import EVAL_SEEDS, score
from ..targets import centred_cosines, matched_and_mismatched


# -----------------------------------------------------------------------------
# judged generation on the shapes world


def evaluate(profile, base, refiner, prompts: list[str], targets: list[tuple[str, str]], seeds=EVAL_SEEDS,
             refine: bool = True, **overrides) -> tuple[dict, np.ndarray]:
    """Generate every prompt with every seed at the profile's settings and judge the images.

    ``refine=False`` runs the base alone over the whole schedule, to measure what the refiner changes. Seeds
    default to ones the training never used. Prompts go through in batches of ``generate.batch_size``. Returns
    (scores, images ``[seeds, prompts, H, W, 3]`` uint8).
    """
    images = np.stack([_uint8(generate(profile, base, refiner, prompts, refine=refine, seed=seed, output_type="np",
                                       **overrides)[0]) for seed in seeds])
    return score(images.reshape(-1, *images.shape[2:]), list(targets) * len(seeds)), images


def _uint8(images: np.ndarray) -> np.ndarray:
    """A pipeline's ``output_type="np"`` images (floats in [0, 1]) as the 8-bit pixels the judge and CLIP read."""
    return (images * 255).round().clip(0, 255).astype(np.uint8)


def denoising_snapshots(profile, base, refiner, prompt: str, count: int = 8) -> list[tuple[str, np.ndarray]]:
    """The two-stage schedule watched: (label, image) after ``count`` of the denoising steps, evenly spread, always
    with the base's last (the hand-off) and the final image (the one ``generate`` returns); each latent decoded by
    the VAE as the final one is, one at a time (at 1024² a decode is the costly part)."""
    seen = []

    def keep(stage):
        def callback(pipe, step, timestep, kwargs):
            seen.append((f"{stage} {step + 1}\nt={int(timestep)}", kwargs["latents"].detach().clone()))
            return kwargs
        return callback

    images, _ = generate(profile, base, refiner, prompt, output_type="np", callbacks=(keep("base"), keep("refiner")))
    hand_off = max(i for i, (label, _) in enumerate(seen) if label.startswith("base"))
    chosen = sorted({*np.linspace(0, len(seen) - 1, count).round().astype(int).tolist(), hand_off})
    out, vae = [], base.vae
    for i in chosen[:-1]:
        label, latents = seen[i]
        with torch.no_grad():
            decoded = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
        out.append((label, base.image_processor.postprocess(decoded, output_type="np")[0]))
    return out + [(seen[-1][0], images[0])]


def breakdown(images: np.ndarray, targets: list[tuple[str, str]], groups: list[str]) -> dict[str, dict]:
    """The judge's scores per group of prompts: ``images`` as ``evaluate`` returns them ([seeds, prompts, H, W, 3]),
    ``groups`` one label per prompt (e.g. ``shapes.held_out_kinds()``). {label: scores}, in first-seen order."""
    out = {}
    for label in dict.fromkeys(groups):
        keep = [i for i, g in enumerate(groups) if g == label]
        part = images[:, keep]
        out[label] = score(part.reshape(-1, *part.shape[2:]), [targets[i] for i in keep] * images.shape[0])
    return out


# -----------------------------------------------------------------------------
# free-form sentences, CLIP score, time and memory


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
    """Wall-clock seconds of the base stage and of the refiner stage for one batch (the first
    ``generate.batch_size`` of ``prompts``): ``generate``, with the clock read at the base's last step."""
    import time

    prompts = list(prompts)[:profile.generate.batch_size]
    sync = torch.cuda.synchronize if profile.torch_device().type == "cuda" else (lambda: None)
    base_done = []

    def mark(pipe, step, timestep, kwargs):
        sync()
        base_done.append(time.perf_counter())
        return kwargs

    sync()
    start = time.perf_counter()
    generate(profile, base, refiner, prompts, callbacks=(mark, None), **overrides)
    sync()
    return {"base_seconds": base_done[-1] - start, "refiner_seconds": time.perf_counter() - base_done[-1],
            "images": len(prompts)}


def final_latents(profile, pipelines, prompts, seeds=(0, 1)) -> torch.Tensor:
    """``[seeds, prompts, C*H*W]``: the refiner's final latents for each prompt and seed (float32, CPU)."""
    base, refiner = pipelines
    return torch.stack([torch.as_tensor(generate(profile, base, refiner, prompts, seed=s, output_type="latent")[0])
                        .float().flatten(1).cpu() for s in seeds])


def agreement(japanese: torch.Tensor, english: torch.Tensor) -> dict:
    """Do Japanese prompts lead to the images their English translations lead to? ``final_latents`` of JA_i and
    EN_i (same seeds), each set minus its own mean over the prompts (with a shared seed, raw latents of *any* two
    prompts are alike: a cosine of about 0.95 on ``tiny``, printed in notebook 04), then the cosine of JA_i with
    EN_j: matched (i = j) against mismatched, and how often EN_i is the nearest of all EN_j (chance 1 / prompts)."""
    n = japanese.shape[1]
    matched = mismatched = hits = 0.0
    for ja, en in zip(japanese, english):
        sim = centred_cosines(ja, en, en.mean(0), ja.mean(0))
        same, other = matched_and_mismatched(sim)
        matched, mismatched = matched + same, mismatched + other
        hits += int((sim.argmax(1) == torch.arange(n)).sum())
    seeds = japanese.shape[0]
    return {"centred_cos_matched": matched / seeds, "centred_cos_mismatched": mismatched / seeds,
            "nearest_rate": hits / (n * seeds), "chance": 1 / n, "pairs": n, "seeds": seeds}


def load_clip(model: str = "ViT-L-14/openai", device: str | torch.device = "cpu") -> tuple:
    """(network, image preprocessing, tokenizer) of an open_clip model named ``"<architecture>/<pretrained tag>"``
    (fetched from the hub on first use; a bare architecture name gives random weights, for tests only)."""
    import open_clip

    # "hf-hub:<repo>" reads the architecture from the repo's open_clip_config.json (the rehearsal's stand-in CLIP)
    name, _, pretrained = (model, "", "") if model.startswith("hf-hub:") else model.partition("/")
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
    ones: CLIP reads English), with ``generate.clip_model`` (loaded once for all models; batches of
    ``generate.batch_size``); profiles without one (``tiny``) get an empty dict."""
    model = profile.generate.clip_model
    if not model:
        print(f"profile {profile.name!r} sets no generate.clip_model: no CLIP score (full uses ViT-L-14/openai).")
        return {}
    clip = load_clip(model, profile.torch_device())
    return {name: float(clip_per_image(profile, images.reshape(-1, *images.shape[2:]), list(prompts) * images.shape[0],
                                       clip).mean())
            for name, images in images_by_model.items()}



# -----------------------------------------------------------------------------
# real prompts: each image's CLIP score against the English prompt, as a ratio to the English model's


REAL_PROMPT_MODELS = ("English (original)", "init only (similarity)", "distilled", "SD-XL 1.0-jp (published)")


def eval_sample(prompts: list, n: int) -> list:
    """``n`` of the evaluation prompts: the demo grid's first, then one of each kind in turn (every kind early)."""
    demo, rest = [p for p in prompts if p.demo], [p for p in prompts if not p.demo]
    kinds = list(dict.fromkeys(p.kind for p in rest))
    by_kind = {k: [p for p in rest if p.kind == k] for k in kinds}
    turns = [group[i] for i in range(max(map(len, by_kind.values()), default=0)) for group in by_kind.values()
             if i < len(group)]
    return (demo + turns)[:n]


def clip_per_image(profile, images: np.ndarray, prompts: list[str], clip: tuple) -> np.ndarray:
    """``[n]`` CLIP scores (``clip_score``) of ``images`` against ``prompts``, in batches of ``generate.batch_size``."""
    size = profile.generate.batch_size
    return np.concatenate([clip_score(images[i:i + size], prompts[i:i + size], clip).numpy()
                           for i in range(0, len(prompts), size)])


def real_prompts(profile, models: dict, folder, prompts: list | None = None) -> dict:
    """Each of ``REAL_PROMPT_MODELS`` that ``models`` (``generation.compared_models``) holds draws
    ``generate.eval_prompts`` evaluation prompts at the profile's settings (the English model the English, the others
    the Japanese), and each image gets its CLIP score against the English prompt. Each model's scores and demo images
    are saved in ``folder`` as it finishes (a cut-off runtime continues at the next model) and reused while the
    prompts, settings and stage outputs they were made from are the same. Returns {"prompts", "scores": {model:
    [n]}, "demo": {model: images}, "drawn": the models drawn now}; ``{}`` where the profile draws the shapes world
    (its judge measures it) or names no CLIP model."""
    import hashlib
    import json
    from dataclasses import asdict
    from pathlib import Path

    from ..core.runs import atomic_path, outputs_hash
    from ..data import eval_prompts
    from ..shapes import draws_shapes

    if draws_shapes(profile) or not profile.generate.clip_model:
        print(f"profile {profile.name!r} draws the shapes world (or names no generate.clip_model): the judge above is "
              f"its measure; real prompts are measured on full and colab")
        return {}
    prompts = prompts or eval_sample(eval_prompts(), profile.generate.eval_prompts)
    made_from = {"prompts": [(p.ja, p.en) for p in prompts], "generate": asdict(profile.generate), "seed": profile.seed,
                 **{s: outputs_hash(profile, s) for s in ("tokenizer", "init", "distill")}}
    key = hashlib.sha256(json.dumps(made_from, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder, clip = Path(folder), None
    folder.mkdir(parents=True, exist_ok=True)
    out = {"prompts": prompts, "scores": {}, "demo": {}, "drawn": []}
    demo = [i for i, p in enumerate(prompts) if p.demo]
    for name in [m for m in REAL_PROMPT_MODELS if m in models]:
        saved = folder / (re.sub(r"[^\w]+", "-", name).strip("-").lower() + ".npz")
        if saved.exists() and _key(saved) == key:
            print(f"{name}: drawn earlier from the same prompts and stage outputs ({saved.name}): reused")
        else:
            english = name.startswith("English")
            base, refiner = models[name]()
            images = _uint8(generate(profile, base, refiner, [p.en if english else p.ja for p in prompts],
                                     output_type="np")[0])
            del base, refiner
            clip = clip or load_clip(profile.generate.clip_model, profile.torch_device())
            scores = clip_per_image(profile, images, [p.en for p in prompts], clip)
            with atomic_path(saved) as tmp, open(tmp, "wb") as f:
                np.savez(f, key=key, scores=scores, demo=images[demo])
            out["drawn"].append(name)
        with np.load(saved) as found:
            out["scores"][name], out["demo"][name] = found["scores"], found["demo"]
    return out


def _key(saved) -> str:
    with np.load(saved) as found:
        return str(found["key"])


def wilson(hits: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a rate of ``hits`` in ``n``: unlike rate ± 1.96·SE it stays inside [0, 1] and
    is honest for small ``n`` and for rates near 0 or 1 (4 of 9 images: 19-73 %)."""
    from statistics import NormalDist

    if n == 0:
        return 0.0, 1.0
    z, p = NormalDist().inv_cdf((1 + level) / 2), hits / n
    centre, half = p + z * z / (2 * n), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    low, high = (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)
    return (0.0 if hits == 0 else low), (1.0 if hits == n else high)  # exact at the ends, not -0 % by rounding


def bootstrap_ratio(scores: np.ndarray, english: np.ndarray, draws: int = 2000, level: float = 0.95,
                    seed: int = 0) -> dict:
    """mean(``scores``) / mean(``english``) over the same prompts, with a paired percentile bootstrap interval
    (prompts drawn with replacement, each draw the ratio of the two means)."""
    scores, english = np.asarray(scores, dtype=float), np.asarray(english, dtype=float)
    draw = np.random.default_rng(seed).integers(0, len(scores), size=(draws, len(scores)))
    ratios = scores[draw].mean(1) / english[draw].mean(1)
    low, high = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return {"ratio": float(scores.mean() / english.mean()), "low": float(low), "high": float(high),
            "n": len(scores)}


def clip_ratios(real: dict, english: str = "English (original)", **bootstrap) -> dict:
    """{model: {"all": ratio, <kind>: ratio, ...}} for every model of ``real_prompts`` but ``english``: its CLIP
    score as a share of the English model's on the same prompts, with the interval of ``bootstrap_ratio``."""
    if not real:
        return {}
    kinds = [p.kind for p in real["prompts"]]
    base = real["scores"][english]
    out = {}
    for name, scores in real["scores"].items():
        if name == english:
            continue
        out[name] = {"all": bootstrap_ratio(scores, base, **bootstrap)}
        for kind in dict.fromkeys(kinds):
            keep = [i for i, k in enumerate(kinds) if k == kind]
            out[name][kind] = bootstrap_ratio(scores[keep], base[keep], **bootstrap)
    return out


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

