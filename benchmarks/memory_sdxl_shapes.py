"""Benchmark: each stage's peak memory at SDXL 1.0's real shapes, on a CPU, and how many full-size pipelines it
holds at once: the proof, without a GPU, that the `full` path holds what it should.

The profile is `tiny`'s offline data, tokenizer and embedder with the `sdxl` zoo recipe (SDXL 1.0's exact text
encoders, UNets and VAE; random weights) in bfloat16, at 128x128 and a few steps. Host memory stands in for GPU
memory: every model lives on the CPU, so a stage's peak resident set is what it would need on one device (plus
the libraries). Each stage runs in a process of its own, through the functions its notebook calls:

  build     the `sdxl` recipe into the zoo cache, one component at a time
  init      notebook 02: SDXL's English text encoders alone (encoders.load_english) and stage 2 (embedding_init.run)
  distill   notebook 03: stage 3's trainer (distillation.distil) for 2 steps, bf16 autocast, checkpoint, save
  generate  notebook 04: the English pipelines, the assembled Japanese model and the compared variants
            (generation.compared_models: one UNet pair, one Japanese text-encoder pair at a time), one judged batch each

Beside each peak: the bound expected from parameter counts (bytes per parameter x parameters alive) over the
libraries' own footprint (measured at the stage's start), and the UNets alive at the end (2 = one base+refiner pair).
Not in CI: about 5 minutes once the data caches are warm, 20 GB of RAM on 2 cores, 25 GB of disk while it
runs (the zoo's 11 GB stay in the cache; the scratch runs folder is removed at the end unless --keep).

Usage:  python benchmarks/memory_sdxl_shapes.py [--stages build init distill generate] [--runs DIR]
Writes benchmarks/results/memory_sdxl_shapes.json (a stage left out keeps its earlier row); docs/results.md shows
it. `build` measures only a build: with zoo:sdxl already in the cache it stops and says so.
"""

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "memory_sdxl_shapes.json"
GIB = 2**30


def profile():
    from jpsdxl.core.profiles import derive, load_profile

    return derive(load_profile("tiny"), name="sdxl-shapes-cpu", dtype="bfloat16",
                  models={"base": "zoo:sdxl/base", "refiner": "zoo:sdxl/refiner"},
                  distill={"steps": 2, "batch_size": 4, "eval_pairs": 8, "eval_every": 2, "checkpoint_every": 2,
                           "mixed_precision": "bf16", "cache_teacher": False, "shapes_share": 0.3},
                  generate={"height": 128, "width": 128, "steps": 4, "batch_size": 4})


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: kilobytes


def params(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def live_unets() -> int:
    from diffusers import UNet2DConditionModel

    gc.collect()
    return sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects())


def build(P) -> dict:
    from jpsdxl.core import zoo
    from jpsdxl.core.models import resolve_profile
    from jpsdxl.core.runs import cache_dir

    import torch

    cached = (cache_dir("zoo") / zoo.cache_key("sdxl") / "zoo.json").exists()
    if cached:
        sys.exit("zoo:sdxl is already built: remove it from the cache to measure the build "
                 f"({cache_dir('zoo') / zoo.cache_key('sdxl')}), or leave `build` out of --stages")
    resolve_profile(P)  # builds zoo:sdxl into the cache
    unets = live_unets()
    with torch.device("meta"):  # parameter counts without memory
        largest = max(params(m) for m in zoo.build_components("sdxl", scheduler=False).values())
    return {"bound_gib": largest * 4 / GIB, "bound": "the largest component (base UNet) in fp32, cast in place",
            "unets": unets}


def init(P) -> dict:
    from jpsdxl import embedding_init, encoders

    english = encoders.load_english(P)  # what notebook 02 holds: the two English text encoders, no UNet, no VAE
    mapping = embedding_init.run(P, progress=False)
    te = params(english.text_encoder, english.text_encoder_2)
    return {"bound_gib": te * 2 / GIB, "bound": "both English text encoders in bf16 (+ the embedder)",
            "unets": live_unets(), "pieces_mapped": len(mapping.ja)}


def distill(P) -> dict:
    from jpsdxl import distillation as D
    from jpsdxl.core.runs import stage_dir

    setup = D.prepare(P, reference_sentences=64)  # the teacher's mean over 64 sentences, not 5,000: a CPU minute
    out = stage_dir(P, "distill")
    run = D.distil(setup, out, resume=False, progress=False)
    D.save_students(run.students, out)
    student, teacher = params(run.students), params(setup.teachers.text_encoder, setup.teachers.text_encoder_2)
    return {"bound_gib": (student * 16 + teacher * 2) / GIB, "unets": live_unets(), "steps": run.steps,
            "bound": "students fp32 (weights 4 + gradients 4 + AdamW 8 bytes each) + teachers bf16",
            "student_parameters": student, "loss_before": run.before["loss"], "loss_after": run.after["loss"]}


def generate(P) -> dict:
    from jpsdxl import assembly as A
    from jpsdxl import generation as G
    from jpsdxl import shapes
    from jpsdxl.core.runs import stage_dir
    from jpsdxl.notebook import measure

    english = G.load_pipelines(P)
    students, model_dir = stage_dir(P, "distill"), stage_dir(P, "generate") / "model"
    A.assemble(P, students, model_dir)
    models = G.compared_models(P, students, model_dir, english)
    ja, en, targets = shapes.held_out_prompts()
    for name, load in models.items():  # each loaded, judged, dropped: one Japanese text-encoder pair at a time
        measure.evaluate(P, *load(), (en if name.startswith("English") else ja)[:4], targets[:4], seeds=[0])
    base, refiner = english
    pair = params(base.unet, refiner.unet, base.vae, base.text_encoder, base.text_encoder_2)
    extra = params(base.text_encoder, base.text_encoder_2)  # the Japanese pair alive: the English pair's sizes
    # make_students(dtype=None) builds each compared copy in the pipelines' dtype: no float32 pair, even for a moment
    return {"bound_gib": (pair + extra) * 2 / GIB, "unets": live_unets(), "models": len(models),
            "bound": "one base+refiner pair in bf16 + one Japanese text-encoder pair in bf16"}


STAGES = {"build": build, "init": init, "distill": distill, "generate": generate}


def worker(stage: str) -> None:
    import torch  # noqa: F401  (the libraries' footprint is part of the start)
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    start_gib, t0 = rss_gib(), time.perf_counter()
    row = STAGES[stage](profile())
    row.update(stage=stage, libraries_gib=round(start_gib, 2), peak_rss_gib=round(rss_gib(), 2),
               expected_gib=round(start_gib + row["bound_gib"], 2), bound_gib=round(row["bound_gib"], 2),
               seconds=round(time.perf_counter() - t0, 1))
    print("RESULT " + json.dumps(row))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", nargs="*", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--runs", default="/tmp/jpsdxl-memory-runs", help="scratch runs folder (JPSDXL_RUNS; about 14 GB "
                                                                      "at these shapes, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch runs folder")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    env = dict(os.environ, JPSDXL_RUNS=args.runs, HF_HUB_OFFLINE="1")
    rows = []
    for stage in args.stages:  # one process each: a stage's peak is its own, not the largest so far
        done = subprocess.run([sys.executable, __file__, "--worker", stage], env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"stage {stage} failed:\n{done.stderr[-4000:]}")
        row = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
        rows.append(row)
        print(f"{stage:9s} peak {row['peak_rss_gib']:6.2f} GiB  expected {row['expected_gib']:6.2f} GiB "
              f"(libraries {row['libraries_gib']:.2f} + {row['bound_gib']:.2f}: {row['bound']})  UNets alive "
              f"{row['unets']}  {row['seconds']:.0f} s", flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    earlier = json.loads(RESULTS.read_text())["stages"] if RESULTS.exists() else []
    rows = [r for r in earlier if r["stage"] not in args.stages] + rows  # stages not run this time: kept
    rows.sort(key=lambda r: list(STAGES).index(r["stage"]))
    RESULTS.write_text(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
                                              f"cores (CPU: host memory stands in for GPU memory)",
                                   "profile": "sdxl-shapes-cpu (benchmarks/memory_sdxl_shapes.py)",
                                   "stages": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    if not args.keep:  # checkpoints and students at SDXL's shapes: gigabytes nobody reads again
        shutil.rmtree(args.runs, ignore_errors=True)


if __name__ == "__main__":
    main()
