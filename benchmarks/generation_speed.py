"""Benchmark: two-stage SDXL generation (base -> refiner) on a profile: seconds per image and peak memory.

Prints the base and refiner shares of the time (refiner / base ratio), seconds per image, and peak memory
(GPU: torch.cuda.max_memory_allocated; CPU: peak resident set size). On a GPU machine,
``--profile full-random`` measures SDXL 1.0's real shapes without downloading anything.

Usage:  python benchmarks/generation_speed.py [--profile tiny] [--images 4] [--steps N]
"""

import argparse
import resource
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None, help="override the profile's steps")
    args = ap.parse_args()

    import torch

    from jpsdxl import generation
    from jpsdxl.notebook import measure
    from jpsdxl.core.profiles import load_profile

    profile = load_profile(args.profile)
    g = profile.generate
    steps = args.steps or g.steps
    start = time.perf_counter()
    base, refiner = generation.load_pipelines(profile)
    load = time.perf_counter() - start
    cuda = profile.torch_device().type == "cuda"
    generation.generate(profile, base, refiner, "warm-up", steps=steps)  # first call pays for kernels and caches
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prompts = ["a photo of a very cute kitten"] * args.images
    t = measure.stage_seconds(profile, base, refiner, prompts, num_inference_steps=steps)
    base_s, refiner_s = t["base_seconds"], t["refiner_seconds"]
    peak = (torch.cuda.max_memory_allocated() / 2**30 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"profile {profile.name} on {device}, {profile.dtype}, {g.width}x{g.height}, {steps} steps, "
          f"hand-off at {g.high_noise_frac}, batch {args.images}")
    print(f"load {load:.1f} s | base {base_s:.2f} s | refiner {refiner_s:.2f} s | refiner/base {refiner_s / base_s:.2f}"
          f" | {(base_s + refiner_s) / args.images:.3f} s/image | peak {'GPU' if cuda else 'RSS'} memory {peak:.2f} GiB")


if __name__ == "__main__":
    main()
