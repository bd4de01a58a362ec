"""Benchmark: the card's example settings against the fastest settings that keep its steps, size and scheduler.

Times base + refiner (seconds per image) under the card's example code as written (base fp16, refiner bf16, bf16
autocast), then adds diffusers' speed-ups one at a time (``measure.SPEEDUPS``: fp16 throughout, channels last,
fused QKV projections, torch.compile with ``--compile``) and prints each row's speed-up over the card's row and
over the row before it. Same steps, size, guidance, hand-off and scheduler in every row. On a CPU the card's
half-precision rows do not apply: the first row is the profile's dtype.

On a GPU: ``--profile full-random --steps 100`` is the card's setting (1024x1024, guidance 7.5, hand-off 0.8) on
SDXL 1.0's real shapes with random weights (no download). Results are appended to
benchmarks/results/generation_card_vs_fast.json. Not a test: it prints measured ratios.

Usage:  python benchmarks/generation_card_vs_fast.py [--profile tiny] [--steps N] [--images 1] [--compile]
"""

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--steps", type=int, default=None, help="override the profile's steps (the card: 100)")
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="add torch.compile (minutes of compilation first)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    import torch

    from jpsdxl import generation as G
    from jpsdxl.notebook import measure
    from jpsdxl.core.profiles import load_profile

    profile = load_profile(args.profile)
    g = profile.generate
    steps = args.steps or g.steps
    cuda = profile.torch_device().type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base, refiner = G.load_pipelines(profile)
    prompts = ["a photo of a very cute kitten"] * args.images

    def seconds_per_image(context) -> float:
        with context:
            G.generate(profile, base, refiner, prompts[:1], steps=steps, output_type="latent")  # warm-up / compile
            sync()
            start = time.perf_counter()
            G.generate(profile, base, refiner, prompts, steps=steps, output_type="pil")
            sync()
        return (time.perf_counter() - start) / len(prompts)

    rows = []
    if cuda:
        rows.append(("card's code: fp16 base, bf16 refiner, bf16 autocast",
                     seconds_per_image(measure.card_settings(base, refiner))))
        measure.apply_speedup(base, refiner, "fp16 throughout", profile.torch_dtype())
        rows.append(("fp16 throughout", seconds_per_image(nullcontext())))
    else:
        rows.append((f"{profile.dtype} (the card's fp16 / bf16 rows need a GPU)", seconds_per_image(nullcontext())))
    for name in ("channels last", "fused QKV projections") + (("torch.compile",) if args.compile else ()):
        measure.apply_speedup(base, refiner, name, profile.torch_dtype())
        rows.append((f"+ {name}", seconds_per_image(nullcontext())))

    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"profile {profile.name} on {device}, {g.width}x{g.height}, {steps} steps, guidance {g.guidance_scale}, "
          f"hand-off {g.high_noise_frac}, {len(prompts)} image(s) per row")
    first = rows[0][1]
    table = []
    for n, (name, s) in enumerate(rows):
        previous = rows[n - 1][1] if n else s
        table.append({"setting": name, "seconds_per_image": round(s, 3), "speedup_vs_first": round(first / s, 2),
                      "speedup_vs_previous": round(previous / s, 2)})
        print(f"{name:55s} {s:8.3f} s/image   x{first / s:.2f} vs first row   x{previous / s:.2f} vs previous")
    if not args.no_save:
        path = Path(__file__).parent / "results" / "generation_card_vs_fast.json"
        path.parent.mkdir(exist_ok=True)
        saved = json.loads(path.read_text()) if path.exists() else []
        entry = {"device": device, "profile": profile.name, "steps": steps, "size": [g.width, g.height],
                 "images": len(prompts), "rows": table}
        key = lambda e: (e["device"], e["profile"], e["steps"])  # noqa: E731
        saved = [e for e in saved if key(e) != key(entry)] + [entry]
        path.write_text(json.dumps(saved, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
