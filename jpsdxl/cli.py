"""``jpsdxl``: the command line; ``jpsdxl run --profile tiny`` executes the whole tutorial. One sub-command per row of
the stage table (``core.runs.STAGES``), each the stage's ``run``; and ``run``, ``rehearse``, ``prepare`` (fetch ahead
of a workshop), ``train-shapes``, ``env``, ``profiles``. Several GPUs: ``accelerate launch -m jpsdxl.cli distill``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import get_args

from .core.profiles import Strategy
from .core.runs import STAGES


def _count(text: str) -> int:
    """A whole number of at least 1 (steps): 0 or a negative count is an argument error, not the profile's default."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a whole number of at least 1")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"--seed {text}: a whole number from 0 to 2**63 - 1")
    return value


def _finite(text: str) -> float:
    import math

    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: give a finite number")
    return value


def _distill_arguments(dist) -> None:
    dist.add_argument("--out", default=None, help="output folder (default: runs/<profile>/03_distillation)")
    dist.add_argument("--steps", type=_count, default=None, help="override distill.steps")
    dist.add_argument("--init", default=None, choices=get_args(Strategy), help="override the starting rows")
    dist.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")


def _generate_arguments(gen) -> None:
    gen.add_argument("prompt", nargs="*", help="one or more prompts, e.g. かわいすぎる子猫")
    gen.add_argument("--prompts-file", default=None, help="a UTF-8 text file, one prompt per line")
    gen.add_argument("--out", default="out.png", help="image file; with several prompts, out-01.png, out-02.png, ...; "
                                                   "an existing folder: image.png (image-01.png, ...) inside it")
    gen.add_argument("--model", default=None, help="a folder with base/ and refiner/ (notebook 04 or `assemble`), or "
                                                   "hub ids: BASE_ID (refiner found by name) or BASE_ID,REFINER_ID; "
                                                   "default: the profile's trained Japanese model")
    gen.add_argument("--negative", default=None, help="negative prompt (Japanese works)")
    gen.add_argument("--seed", type=_seed, default=None, help="0 to 2**63 - 1")
    gen.add_argument("--steps", type=_count, default=None)
    gen.add_argument("--size", type=int, default=None, help="height and width in pixels (multiple of 8, at most 4096)")
    gen.add_argument("--guidance", type=_finite, default=None)
    gen.add_argument("--high-noise-frac", type=float, default=None, help="hand-off point base -> refiner, in (0, 1)")
    gen.add_argument("--offload", action="store_true", help="small GPUs: model CPU offload + VAE tiling and slicing")


STAGE_ARGUMENTS = {"distill": _distill_arguments, "generate": _generate_arguments}  # beyond --profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jpsdxl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks with papermill; outputs under runs/<profile>/")
    run.add_argument("--profile", default="tiny", help="profile name (tiny, full, full-random) or a .toml path")
    run.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 00 01")
    run.add_argument("--runs", default=None, help="output root (default: <repo>/runs)")
    run.add_argument("--no-html", action="store_true", help="skip the HTML export")
    run.add_argument("--force", action="store_true", help="execute every notebook, even one whose inputs, code and "
                                                          "settings have not changed since its last run (reused)")
    reh = sub.add_parser("rehearse", help="run the notebooks on rehearse-full and rehearse-colab: `full` and `colab` "
                                          "on this CPU, offline, against a stand-in hub laid out like the real repos")
    reh.add_argument("--hub", default=None, help="the stand-in hub's folder, written first if missing (default: "
                                                 "<cache>/standin-hub); never a real Hugging Face cache")
    reh.add_argument("--build-hub", action="store_true", help="only write the stand-in hub, then print its folder")
    reh.add_argument("--profiles", nargs="*", default=["rehearse-full", "rehearse-colab"])
    reh.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 03 04 (then not the all-stages one)")
    reh.add_argument("--runs", default=None, help="output root (default: <repo>/runs)")
    prep = sub.add_parser("prepare", help="fetch data and models, build the zoo, the Japanese tokenizer and stage 2's "
                                          "mapping: everything slow that the notebooks would do on first use")
    prep.add_argument("--profile", default="tiny")
    for stage in STAGES.values():  # one sub-command per stage row that has one: the stage's `run`
        if stage.command:
            cmd = sub.add_parser(stage.command, help=stage.help)
            cmd.add_argument("--profile", default="tiny")
            STAGE_ARGUMENTS.get(stage.command, lambda _: None)(cmd)
    train = sub.add_parser("train-shapes", help="retrain the shapes world (tiny VAE, base and refiner UNets) from "
                                                "its recipe and seed, into jpsdxl/zoo_weights/shapes/")
    train.add_argument("--out", default=None, help="output folder (default: the shipped weights' folder)")
    sub.add_parser("env", help="print versions, CPU, memory, GPU")
    sub.add_parser("profiles", help="list the profiles")
    args = parser.parse_args(argv)
    from .core.hub import ModelNotAvailable
    from .core.runs import RunInProgress

    try:
        return _dispatch(args)
    except (OSError, ValueError, ModelNotAvailable, ModuleNotFoundError, RunInProgress) as e:  # OSError: a full disk,
        print(f"error: {e}", file=sys.stderr)                                                 # a file, named
        return 2
    except RuntimeError as e:  # a damaged file, a library's own complaint: one line (JPSDXL_TRACEBACK=1: all of it)
        if os.environ.get("JPSDXL_TRACEBACK"):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"error: {type(e).__name__}: {first} (JPSDXL_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; finished artefacts stay, temporaries are cleaned
        print("interrupted: what finished is kept under runs/ and the cache; rerun to continue", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    return COMMANDS.get(args.command, _stage)(args)


def _stage(args) -> int:
    """A stage row without a command of its own here: its ``run(profile)``, and what it returned."""
    from .core.profiles import load_profile

    stage = next(s for s in STAGES.values() if s.command == args.command)
    print(stage.function()(load_profile(args.profile)))
    return 0


def _run(args) -> int:
    from .runner import NotebookFailed, run_notebooks

    try:
        summary = run_notebooks(args.profile, args.only, args.runs, html=not args.no_html, force=args.force)
    except NotebookFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ran = [r for r in summary if not r.get("reused")]
    print(f"{len(summary)} notebooks, {sum(r['seconds'] for r in ran):.1f} s"
          + (f" ({len(summary) - len(ran)} unchanged since their last run, reused)" if len(ran) < len(summary) else ""))
    return 0


def _rehearse(args) -> int:
    """The stand-in hub, then every notebook on each rehearsal profile, offline: a table of time and peak memory."""
    import os

    from .core.runs import cache_dir

    hub = Path(args.hub).expanduser().resolve() if args.hub else cache_dir() / "standin-hub"
    # before anything reads huggingface_hub's constants: every hub id resolves in the stand-in, and only there
    os.environ.update(HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    from .core.runs import runs_root
    from .rehearsal import build_hub
    from .runner import NotebookFailed, run_all_stages, run_notebooks

    print(f"stand-in hub: {build_hub(hub)}", flush=True)
    if args.build_hub:
        return 0
    for profile in args.profiles:
        try:
            summary = run_notebooks(profile, args.only, args.runs, html=False)
        except NotebookFailed as e:
            print(f"error: {profile}: {e}", file=sys.stderr)
            return 1
        for row in summary:
            print(f"{profile:16} {row['notebook']:24} {row['seconds']:7.1f} s  peak {row.get('peak_rss_mb', '?')} MB"
                  + ("  (reused)" if row.get("reused") else ""))
        folder = Path(summary[0]["executed"]).parents[1]
        links = [str(p) for p in folder.rglob("*") if p.is_symlink()]
        if links:  # a Google Drive runs folder refuses links: a stage that writes one fails on Colab
            print(f"error: {profile}: links in the runs folder, which Google Drive refuses: {links[:3]}",
                  file=sys.stderr)
            return 1
    if args.only is None:  # Colab's all-stages notebook, twice on one fresh runs folder: the second repeats nothing
        profile = args.profiles[-1]
        root = Path(args.runs or runs_root()) / "all-stages"
        try:
            rows = run_all_stages(profile, root)
        except NotebookFailed as e:
            print(f"error: {profile}: {e}", file=sys.stderr)
            return 1
        for row in rows:
            print(f"{profile:16} {'colab_all_stages #' + str(row['run']):24} {row['seconds']:7.1f} s  peak "
                  f"{row['peak_rss_mb']} MB  stages run {row['ran'] or 'none'}, models drawn {row['drawn'] or 'none'}")
    return 0


def _prepare(args) -> int:
    from .core.models import resolve_profile
    from .core.profiles import load_profile
    from .embedding_init import run as stage_2
    from .tokenization import run as stage_1

    profile = load_profile(args.profile)  # no device check: preparing caches needs the network, not the GPU
    for role, folder in resolve_profile(profile).items():
        print(f"{role}: {folder}")
    print(f"stage 1: {stage_1(profile)}")
    mapping = stage_2(profile)
    print(f"stage 2: {len(mapping.ja):,} Japanese pieces mapped")
    return 0


def _tokenizer(args) -> int:
    from .core.profiles import load_profile
    from .tokenization import run as stage_1

    folder = stage_1(load_profile(args.profile))
    print(f"wrote {folder}/{{tokenizer,tokenizer_2}}")
    return 0


def _init(args) -> int:
    from .core.profiles import load_profile
    from .core.runs import stage_dir
    from .embedding_init import run as stage_2

    profile = load_profile(args.profile)
    mapping = stage_2(profile)
    best = mapping.rows()
    print(f"{len(best):,} Japanese pieces mapped; e.g. " + ", ".join(
        f"{r['ja_piece']} -> {r['en_token']}" for r in best[100:105]))
    print(f"wrote {stage_dir(profile, 'init')}/mapping.{{pt,tsv}}")
    return 0


def _distill(args) -> int:
    from accelerate import PartialState

    from . import distillation as D
    from .core.profiles import load_profile
    from .core.runs import stage_dir

    profile = load_profile(args.profile)
    overrides = {k: v for k, v in (("steps", args.steps), ("init", args.init)) if v is not None}
    try:
        run = D.run(profile, args.out, resume=not args.fresh, **overrides)
    except D.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    state = PartialState()
    if state.is_main_process:
        print(f"processes: {state.num_processes} ({state.distributed_type})")
        if run.resumed_from is not None:
            print(f"resumed from the checkpoint of step {run.resumed_from}")
        print(run.bad_lines)
        print(json.dumps(D.summary(run), indent=1))
        folder = run.folder or stage_dir(profile, 'distill')
        print(f"wrote {folder}/{{text_encoder,text_encoder_2,tokenizer,tokenizer_2}}")
    return 0


def _train_shapes(args) -> int:
    from .core.zoo import RECIPES, WEIGHTS_DIR
    from .shapes.training import train_shapes_world

    out = Path(args.out).resolve() if args.out else WEIGHTS_DIR / RECIPES["shapes"]["weights"]
    info = train_shapes_world(out)
    print(f"wrote {out} in {info['total_seconds'] / 60:.1f} min (recipe {info['recipe']})")
    if out == WEIGHTS_DIR / RECIPES["shapes"]["weights"]:
        from .shapes.training import judge_shipped

        scores = judge_shipped(out)["english_base_and_refiner"]
        print(f"English prompts, judged: colour {scores['colour']:.1%}, shape {scores['shape']:.1%}")
    return 0


def _env(args) -> int:
    from .notebook.overview import environment_report

    print(json.dumps(environment_report(), indent=2))
    return 0


def _profiles(args) -> int:
    from .notebook.overview import profile_table

    for row in profile_table():
        print(f"{row['profile']:12s} {row['device']:5s} {row['dtype']:9s} {row['what for']}")
    return 0


def output_lock(path: str | Path):
    """An exclusive hold on one --out path (a lock file in the cache, not beside the image): two `jpsdxl generate`
    runs into the same file stop the second at once instead of overwriting each other's image."""
    import hashlib

    from .core.runs import cache_dir, exclusive

    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
    return exclusive(cache_dir("locks", key), f"--out {path}")


def _generate(args) -> int:
    import contextlib

    with contextlib.ExitStack() as held:
        return _generate_holding(args, held)


def _generate_holding(args, held) -> int:
    from . import generation as G
    from .core.profiles import derive, load_profile
    from .core.runs import ensure_writable
    from .tokenization import check_prompts

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)
    if not prompts:
        raise ValueError("no prompt given: jpsdxl generate \"かわいすぎる子猫\" --out kitten.png (or --prompts-file FILE)")
    if any(not p.strip() for p in prompts):
        raise ValueError("an empty prompt: give some text (SDXL's unconditional image needs no tool)")
    check_prompts(prompts)  # before anything loads: a prompt too long to be read is refused now
    paths = output_paths(args.out, len(prompts))
    ensure_writable(paths[0].parent, "--out")  # before minutes of loading and drawing, not after
    held.enter_context(output_lock(paths[0]))  # a second run into the same --out stops here, in one line
    if args.size is not None and (args.size < 8 or args.size % 8 or args.size > 4096):
        raise ValueError(f"--size {args.size}: a multiple of 8 (the VAE halves the size three times), at most 4096")
    profile = load_profile(args.profile)
    if args.high_noise_frac is not None:  # checked as the profile's own value is: one bound for both
        profile = derive(profile, generate={"high_noise_frac": args.high_noise_frac})
    overrides = {k: v for k, v in dict(seed=args.seed, steps=args.steps, guidance_scale=args.guidance).items()
                 if v is not None}
    if args.size:
        overrides.update(height=args.size, width=args.size)
    G.run(profile, prompts, paths, args.model, args.negative, args.offload, **overrides)
    return 0


COMMANDS = {"run": _run, "rehearse": _rehearse, "prepare": _prepare, "tokenizer": _tokenizer, "init": _init,
            "distill": _distill, "generate": _generate, "train-shapes": _train_shapes, "env": _env,
            "profiles": _profiles}


# -----------------------------------------------------------------------------
# generate's input and output


MAX_PROMPTS_FILE = 1_000_000  # bytes: thousands of prompts; a bigger file is almost surely the wrong file


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line (blank lines skipped); a clear error for what cannot be used."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--prompts-file {path}: a folder, not a file (give the text file inside it)")
    if not path.exists():
        raise FileNotFoundError(f"--prompts-file {path}: no such file (write one prompt per line)")
    if not path.is_file():  # a pipe would be read until its writer closes it, a device forever
        raise ValueError(f"--prompts-file {path}: not a regular file (a pipe or a device): write the prompts to a "
                         f"text file first, one per line")
    if path.stat().st_size > MAX_PROMPTS_FILE:
        raise ValueError(f"--prompts-file {path}: {path.stat().st_size:,} bytes, over the {MAX_PROMPTS_FILE:,} this "
                         f"command reads at once; split it into smaller files")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path}: no prompts in it (write one prompt per line)")
    return prompts


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def output_paths(out: str | Path, n: int) -> list[Path]:
    """``out`` for one image; ``stem-01.png``, ``stem-02.png``, ... beside it for several. ``out`` an existing folder
    (or ending in ``/``): the images go inside it, as ``image.png`` or ``image-01.png``, ..."""
    if str(out).endswith(("/", "\\")) or Path(out).is_dir():
        out = Path(out) / "image.png"
    out = Path(out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"--out {out}: give an image file name ending in .png, .jpg or .webp, or a folder")
    width = max(2, len(str(n)))
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}-{i:0{width}d}{out.suffix}") for i in range(1, n + 1)]
    links = [str(p) for p in paths if p.is_symlink()]
    if links:  # writing would replace the link, and a reader of its target would be left with the old image
        raise ValueError(f"--out {links[0]} is a link: jpsdxl writes no image through a link; give a file name")
    return paths


if __name__ == "__main__":
    sys.exit(main())
