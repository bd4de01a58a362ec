"""Benchmark: stage-3 training throughput (pairs per second), peak memory and model FLOPs utilisation (MFU).

Runs the real trainer (``distillation.distil``) for a few steps after a warm-up and prints pairs/s, peak memory
(GPU: torch.cuda.max_memory_allocated; CPU: peak resident set size) and, on a GPU, MFU against the card's dense
bf16/fp16 peak: model FLOPs per pair = 6 x student dense parameters x 77 + 2 x teacher dense parameters x 77.
``--profile full-random`` trains SDXL 1.0's real text-encoder shapes (random weights, no download).
``--cap-gib 14.5`` caps the process's GPU memory (torch.cuda.set_per_process_memory_fraction) to stand in for a
16 GB card such as Colab's T4 (about 14.5 GiB of it is usable). MFU divides model FLOPs by the card's peak, HFU
the FLOPs the card really computes (with gradient checkpointing, the students' forward twice); the held-out
evaluations stay outside the timed window, and an unknown card name gets no MFU rather than a guessed peak.
Each result is appended to benchmarks/results/distillation_speed.json, which notebook 03's cost table reads.

Usage:  python benchmarks/distillation_speed.py [--profile tiny] [--steps 20] [--set key=value ...] [--cap-gib G]
"""

import argparse
import json
import resource
from pathlib import Path

def _value(text: str):
    return json.loads(text) if text.lower() not in ("none",) else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--set", nargs="*", default=[], help='distill overrides, e.g. train=\\"embeddings\\" batch_size=16')
    ap.add_argument("--cap-gib", type=float, default=None)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    import torch

    from jpsdxl import distillation as D
    from jpsdxl.notebook import costs
    from jpsdxl.core.profiles import load_profile

    profile = load_profile(args.profile)
    overrides = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    cuda = profile.torch_device().type == "cuda"
    if cuda and args.cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib / total))
    setup = D.prepare(profile)
    quiet = dict(progress=False, eval_every=10**9, checkpoint_every=10**9, init=overrides.pop("init", "mean"))
    D.distil(setup, steps=args.warmup, **quiet, **overrides)  # kernels, allocator, caches
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = D.distil(setup, steps=args.steps, **quiet, **overrides)
    cfg = profile.distill
    pairs_per_second = run.samples_per_second  # the training loop only: not the step-0 held-out evaluation
    recompute = overrides.get("gradient_checkpointing", cfg.gradient_checkpointing)
    count = costs.training_flops_per_sample(setup.teachers.text_encoder, setup.teachers.text_encoder_2,
                                            recompute=recompute)
    flops, hardware = count["flops_per_pair"], count["hardware_flops_per_pair"]
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = costs.peak_tflops(device) if cuda else None
    memory = (torch.cuda.max_memory_allocated() / 2**30 if cuda
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    row = {"device": device, "profile": profile.name, "settings": ", ".join(f"{k}={v}" for k, v in overrides.items())
           or "profile defaults", "mixed_precision": overrides.get("mixed_precision", cfg.mixed_precision),
           "pairs_per_second": round(pairs_per_second, 2), "peak_memory_gib": round(memory, 2),
           "model_tflops": round(pairs_per_second * flops / 1e12, 3), "cap_gib": args.cap_gib,
           "mfu": round(pairs_per_second * flops / (peak * 1e12), 4) if peak else None,
           "hfu": round(pairs_per_second * hardware / (peak * 1e12), 4) if peak else None, "steps": args.steps,
           "held_out_loss_after": round(run.after["loss"], 4)}
    print(f"{device} | {profile.name} | {row['settings']} | {pairs_per_second:.1f} pairs/s | "
          f"{row['model_tflops']} model TFLOP/s" + (f" | MFU {row['mfu']:.1%} of {peak:.0f}" if peak else "")
          + f" | peak {'GPU' if cuda else 'RSS'} memory {memory:.2f} GiB")
    if not args.no_save:
        path = Path(__file__).parent / "results" / "distillation_speed.json"
        path.parent.mkdir(exist_ok=True)
        rows = json.loads(path.read_text()) if path.exists() else []
        key = lambda r: (r["device"], r["profile"], r["settings"], r.get("cap_gib"))  # noqa: E731
        rows = [r for r in rows if key(r) != key(row)] + [row]
        path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
