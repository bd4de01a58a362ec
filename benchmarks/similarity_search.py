"""Benchmark: stage 2's chunked nearest-neighbour search against a plain matmul of the same shape.

For queries [N, d] and keys [M, d] (unit rows), ``embedding_init.topk_cosine`` computes similarities ``chunk`` query
rows at a time and keeps the top-k; a plain ``queries @ keys.T`` computes the whole N x M matrix at once. Printed:
the search's throughput as a ratio of the matmul's (goal: at least 0.7), and each one's peak memory, measured in a
fresh process each (CPU: peak resident set size; GPU: torch.cuda.max_memory_allocated), against the budget
``inputs + chunk x M similarities``.

Usage:  python benchmarks/similarity_search.py [--shape tiny|full] [--device cpu|cuda] [--chunk 1024]
  tiny: 7,739 x 48,854 x 512 (the tiny profile: Japanese pieces x CLIP tokens x USE width)
  full: 51,200 x 49,408 x 1,024 (LINE's vocabulary x CLIP's x multilingual-e5-large width)
"""

import argparse
import json
import resource
import subprocess
import sys
import time

SHAPES = {"tiny": (7_739, 48_854, 512), "full": (51_200, 49_408, 1_024)}


def one(kind: str, n: int, m: int, d: int, chunk: int, device: str) -> dict:
    import torch

    from jpsdxl.embedding_init import topk_cosine

    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    k = torch.nn.functional.normalize(torch.randn(m, d), dim=1)
    if device == "cuda":
        q, k = q.cuda(), k.cuda()
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    if kind == "search":
        topk_cosine(q, k, k=5, chunk=chunk, device=device)
    else:
        sims = q @ k.T
        del sims
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"seconds": seconds, "peak_gib": peak, "inputs_gib": (n + m) * d * 4 / 2**30, "before_gib": base_rss}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    n, m, d = SHAPES[args.shape]
    if args._one:  # child process: one measurement, so that each peak is its own
        print(json.dumps(one(args._one, n, m, d, args.chunk, args.device)))
        return
    import torch

    threads = torch.get_num_threads()
    results = {}
    for kind in ("matmul", "search"):
        out = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--device", args.device,
                              "--chunk", str(args.chunk), "--_one", kind], capture_output=True, text=True, check=True)
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    flops = 2 * n * m * d
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {threads} threads"
    print(f"shape {n:,} x {m:,} x {d:,} ({args.shape}), chunk {args.chunk}, {device}")
    for kind, r in results.items():
        print(f"  {kind:7s} {r['seconds']:8.2f} s  {flops / r['seconds'] / 1e9:8.1f} GFLOP/s  peak {r['peak_gib']:.2f} GiB")
    print(f"  search throughput / matmul throughput = {results['matmul']['seconds'] / results['search']['seconds']:.2f}")
    for kind, r in results.items():
        print(f"  {kind:7s} memory added by the call: {r['peak_gib'] - r['before_gib']:.2f} GiB "
              f"(process before it, inputs included: {r['before_gib']:.2f} GiB)")
    print(f"  search's budget, chunk x M similarities: {args.chunk * m * 4 / 2**30:.2f} GiB; "
          f"the full N x M matrix: {n * m * 4 / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
