"""Train the shapes world's VAE, base UNet and refiner UNet on a CPU (``jpsdxl train-shapes``), with the tiny zoo's
random frozen text encoders as the English teachers and every caption encoded as the SDXL pipelines encode prompts;
10 % of captions dropped for classifier-free guidance. ``train_shapes_world`` writes fp16 weights stamped with the
recipe's hash, which ``core/zoo.py`` builds the ``shapes`` recipe from. It judges nothing (``world.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world as S
from ..core.runs import atomic_path, write_json


@dataclass(frozen=True)
class TrainConfig:
    """How the shapes world is trained. The defaults live in ``zoo.RECIPES["shapes"]["train"]`` (so that they are
    part of the recipe's hash); this class only gives them names and types."""

    seed: int
    vae_steps: int
    vae_batch: int
    vae_lr: float
    vae_kl: float
    latents: int  # images encoded once for UNet training
    base_steps: int
    refiner_steps: int
    batch: int
    lr: float
    warmup: int
    ema: float
    caption_dropout: float
    min_snr_gamma: float
    refiner_max_timestep: int  # the refiner learns t < this (hand-off at 0.8 of the steps: t ~ 200)
    threads: int = 2

    @classmethod
    def from_recipe(cls, **overrides) -> "TrainConfig":
        from ..core.zoo import RECIPES

        return cls(**{**RECIPES["shapes"]["train"], **overrides})


def _schedule(optimizer, warmup: int, total: int):
    # not diffusers' get_cosine_schedule_with_warmup: its warm-up starts at 0 (step / warmup), ours one step ahead
    # ((step + 1) / warmup). The same shape, but another recipe: switching means retraining the shipped weights.
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _images(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[S.Shape]]:
    """``n`` fresh shape images as a ``[n, 3, H, W]`` tensor in [-1, 1] (the VAE's range), and what they show."""
    pixels, shapes = S.sample(n, rng)
    return torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2), shapes


def train_vae(vae, cfg: TrainConfig, progress=None) -> list[float]:
    rng = np.random.default_rng(cfg.seed + 100)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = _schedule(opt, cfg.warmup, cfg.vae_steps)
    vae.train()
    losses = []
    for step in range(cfg.vae_steps):
        x, _ = _images(rng, cfg.vae_batch)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + cfg.vae_kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress:
            progress(step, losses[-1])
    return losses


@torch.no_grad()
def encode_dataset(vae, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, list[S.Shape], float]:
    """(means, stds, shapes, scaling_factor) of ``cfg.latents`` images: the UNets' training set."""
    vae.eval()
    rng = np.random.default_rng(cfg.seed + 200)
    means, stds, all_shapes = [], [], []
    for start in range(0, cfg.latents, 500):
        x, shapes = _images(rng, min(500, cfg.latents - start))
        dist = vae.encode(x).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        all_shapes += shapes
    means, stds = torch.cat(means), torch.cat(stds)
    sample = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(cfg.seed))
    return means, stds, all_shapes, float(1 / sample.std())


@torch.no_grad()
def caption_conditioning(base, refiner):
    """Every English caption encoded as the two pipelines encode prompts, plus each pipeline's unconditional input.

    Returns a dict: captions, and per pipeline the prompt embeddings, pooled embeddings and time ids (each
    ``[n_captions, ...]``), the unconditional ones as index ``-1``.
    """
    captions = [c for colour, shape in S.combinations() for c in S.english_captions(colour, shape)]
    size = (S.IMAGE_SIZE, S.IMAGE_SIZE)
    b_embeds, _, b_pooled, _ = base.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    # base: force_zeros_for_empty_prompt, so the unconditional branch is zeros
    b_embeds = torch.cat([b_embeds, torch.zeros_like(b_embeds[:1])])
    b_pooled = torch.cat([b_pooled, torch.zeros_like(b_pooled[:1])])
    proj = int(b_pooled.shape[-1])
    b_time = base._get_add_time_ids(size, (0, 0), size, dtype=torch.float32, text_encoder_projection_dim=proj)
    b_time = b_time.expand(len(captions) + 1, -1)
    r_embeds, _, r_pooled, _ = refiner.encode_prompt(captions + [""], device="cpu", do_classifier_free_guidance=False)
    pos, neg = refiner._get_add_time_ids(size, (0, 0), size, 6.0, 2.5, size, (0, 0), size, dtype=torch.float32,
                                         text_encoder_projection_dim=proj)
    r_time = torch.cat([pos.expand(len(captions), -1), neg])
    return {"captions": captions, "base": (b_embeds, b_pooled, b_time), "refiner": (r_embeds, r_pooled, r_time)}


def caption_index(shape: S.Shape, rng: np.random.Generator) -> int:
    """Index of a random English phrasing of ``shape``'s caption in ``caption_conditioning``'s list."""
    combo = S.combinations().index((shape.colour, shape.shape))
    return combo * len(S.ENGLISH_TEMPLATES) + int(rng.integers(len(S.ENGLISH_TEMPLATES)))


def train_unet(unet, conditioning, means, stds, shapes, scaling_factor, cfg: TrainConfig, steps: int,
               max_timestep: int = 1000, seed_offset: int = 0, progress=None):
    """Epsilon-prediction training with min-SNR weights (diffusers' ``compute_snr``) and an exponential moving
    average of the weights (diffusers' ``EMAModel``); returns (the UNet holding the EMA weights, losses)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr

    from ..core.zoo import RECIPES

    noise_schedule = DDPMScheduler(**{k: v for k, v in RECIPES["tiny"]["scheduler"].items() if k != "steps_offset"})
    embeds, pooled, time_ids = conditioning
    uncond = embeds.shape[0] - 1
    rng = np.random.default_rng(cfg.seed + 300 + seed_offset)
    gen = torch.Generator().manual_seed(cfg.seed + 400 + seed_offset)
    # decay min(ema, (1 + k) / (10 + k)) at update k, as the shipped weights were trained, but 0 at the first update
    # (theirs: 0.1): a difference multiplied by every later decay, below float precision within about 100 steps
    ema = EMAModel(unet.parameters(), decay=cfg.ema)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = _schedule(opt, cfg.warmup, steps)
    unet.train()
    losses = []
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, means.shape[0], cfg.batch))
        x0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling_factor
        caps = [caption_index(shapes[i], rng) for i in idx.tolist()]
        caps = torch.tensor([uncond if rng.random() < cfg.caption_dropout else c for c in caps])
        t = torch.randint(0, max_timestep, (cfg.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = noise_schedule.add_noise(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=embeds[caps],
                    added_cond_kwargs={"text_embeds": pooled[caps], "time_ids": time_ids[caps]}).sample
        snr = compute_snr(noise_schedule, t)
        weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR-gamma, epsilon prediction
        loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        if progress:
            progress(step, losses[-1])
    ema.copy_to(unet.parameters())
    return unet.eval(), losses


def _smooth(values: list[float], every: int = 50) -> list[float]:
    return [round(float(np.mean(values[i:i + every])), 5) for i in range(0, len(values), every)]


def train_shapes_world(out_dir: str | Path, cfg: TrainConfig | None = None, log=print) -> dict:
    """Train VAE, base and refiner from the ``shapes`` recipe's untrained components; write them to ``out_dir``."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..core.runs import ensure_writable
    from ..core.zoo import build_components, pipelines, recipe_key

    ensure_writable(Path(out_dir).parent, "--out")  # written after about 25 minutes of training: checked first
    cfg = cfg or TrainConfig.from_recipe()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    c = build_components("shapes")
    base, refiner = pipelines(c)  # the same pipelines the zoo saves
    seconds = {}

    def bar(total, desc):
        pbar = tqdm(total=total, desc=desc, mininterval=5)

        def update(step, loss):
            pbar.update(1)
            if step % 50 == 0:
                pbar.set_postfix(loss=f"{float(loss):.4f}")
            if step == total - 1:
                pbar.close()
        return update

    t0 = time.perf_counter()
    vae_losses = train_vae(c["vae"], cfg, bar(cfg.vae_steps, "VAE"))
    seconds["vae"] = time.perf_counter() - t0
    c["vae"].requires_grad_(False)
    t0 = time.perf_counter()
    means, stds, shapes, scaling_factor = encode_dataset(c["vae"], cfg)
    conditioning = caption_conditioning(base, refiner)
    seconds["encode"] = time.perf_counter() - t0
    with torch.no_grad():  # can the VAE carry colour and shape? judge its reconstructions of fresh images
        x, truth = _images(np.random.default_rng(cfg.seed + 500), 300)
        recon = ((c["vae"].decode(c["vae"].encode(x).latent_dist.mode()).sample + 1) * 127.5).clamp(0, 255)
        vae_judge = S.score(recon.permute(0, 2, 3, 1).round().to(torch.uint8).numpy(), [(t.colour, t.shape) for t in truth])
    log(f"VAE done: final loss {np.mean(vae_losses[-50:]):.5f}; latent scaling factor {scaling_factor:.4f}; "
        f"judge on its reconstructions: {vae_judge}")
    t0 = time.perf_counter()
    unet_base, base_losses = train_unet(c["unet_base"], conditioning["base"], means, stds, shapes, scaling_factor,
                                        cfg, cfg.base_steps, progress=bar(cfg.base_steps, "base UNet"))
    seconds["base"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    unet_refiner, refiner_losses = train_unet(c["unet_refiner"], conditioning["refiner"], means, stds, shapes,
                                              scaling_factor, cfg, cfg.refiner_steps, cfg.refiner_max_timestep,
                                              seed_offset=1, progress=bar(cfg.refiner_steps, "refiner UNet"))
    seconds["refiner"] = time.perf_counter() - t0

    key = recipe_key("shapes")
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        meta = {"recipe": key, "scaling_factor": repr(scaling_factor)}
        for name, module in (("vae", c["vae"]), ("unet_base", unet_base), ("unet_refiner", unet_refiner)):
            state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
            save_file(state, tmp / f"{name}.safetensors", metadata=meta)
        write_json(tmp / "training.json", {
            "recipe": key, "scaling_factor": scaling_factor, "config": dataclasses.asdict(cfg),
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "total_seconds": round(time.perf_counter() - started, 1), "threads": torch.get_num_threads(),
            "vae_reconstruction_judge": vae_judge,
            "loss_every_50_steps": {"vae": _smooth(vae_losses), "base": _smooth(base_losses),
                                    "refiner": _smooth(refiner_losses)},
        })
    return json.loads((out_dir / "training.json").read_text())


def judge_shipped(folder: str | Path, profile="tiny", seeds=S.EVAL_SEEDS) -> dict:
    """Score freshly built pipelines from the weights in ``folder`` on every English prompt (held-out seeds), with
    and without the refiner, and write ``judge.json`` beside the weights. ``folder`` must hold this recipe's weights."""
    from ..core.profiles import load_profile
    from ..generation import load_pipelines
    from ..notebook.measure import evaluate

    profile = load_profile(profile)
    base, refiner = load_pipelines(profile)
    prompts, targets = S.english_prompts()
    both, _ = evaluate(profile, base, refiner, prompts, targets, seeds=seeds)
    base_only, _ = evaluate(profile, base, refiner, prompts, targets, seeds=seeds, refine=False)
    truth_images, truth = S.sample(2000, seed=12345)
    result = {"profile": profile.name, "settings": dataclasses.asdict(profile.generate), "seeds": list(seeds),
              "judge_on_ground_truth": S.score(truth_images, [(s.colour, s.shape) for s in truth]),
              "english_base_and_refiner": both, "english_base_alone": base_only}
    write_json(Path(folder) / "judge.json", result)
    return result
