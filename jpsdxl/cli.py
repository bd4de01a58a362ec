"""``jpsdxl``: the command line. ``jpsdxl run --profile tiny`` executes the whole tutorial.

Sub-commands: ``run`` (notebooks, in order, by papermill), ``prepare`` (fetch data, build the zoo and the
tokenizer ahead of a run), ``train-shapes`` (rebuild the shapes world's shipped weights), ``env`` (versions and
hardware), ``profiles`` (what each profile is for).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jpsdxl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks with papermill; outputs under runs/<profile>/")
    run.add_argument("--profile", default="tiny", help="profile name (tiny, full, full-random) or a .toml path")
    run.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 00 01")
    run.add_argument("--runs", default=None, help="output root (default: <repo>/runs)")
    run.add_argument("--no-html", action="store_true", help="skip the HTML export")
    prep = sub.add_parser("prepare", help="fetch data, build the zoo and the Japanese tokenizer")
    prep.add_argument("--profile", default="tiny")
    train = sub.add_parser("train-shapes", help="retrain the shapes world (tiny VAE, base and refiner UNets) from "
                                                "its recipe and seed, into jpsdxl/zoo_weights/shapes/")
    train.add_argument("--out", default=None, help="output folder (default: the shipped weights' folder)")
    sub.add_parser("env", help="print versions, CPU, memory, GPU")
    sub.add_parser("profiles", help="list the profiles")
    args = parser.parse_args(argv)
    from .hub import ModelNotAvailable

    try:
        return _dispatch(args)
    except (FileNotFoundError, ValueError, ModelNotAvailable, ModuleNotFoundError) as e:  # bad profile/data, missing model
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; finished artefacts stay, temporaries are cleaned
        print("interrupted: what finished is kept under runs/ and the cache; rerun to continue", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    if args.command == "run":
        from .runner import NotebookFailed, run_notebooks

        try:
            summary = run_notebooks(args.profile, args.only, args.runs, html=not args.no_html)
        except NotebookFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{len(summary)} notebooks, {sum(r['seconds'] for r in summary):.1f} s")
    elif args.command == "prepare":
        from .data import load_pairs
        from .hub import resolve_profile
        from .profiles import load_profile
        from .tokenization import japanese_tokenizers

        profile = load_profile(args.profile)
        profile.check_device()
        splits = load_pairs(profile)
        print(f"pairs: {splits.sizes()}")
        for role, folder in resolve_profile(profile).items():
            print(f"{role}: {folder}")
        tok, _ = japanese_tokenizers(profile, None if splits.streamed else [ja for ja, _ in splits.train])
        print(f"Japanese tokenizer: {len(tok):,} pieces")
    elif args.command == "train-shapes":
        from pathlib import Path

        from .shapes_training import train_shapes_world
        from .zoo import RECIPES, WEIGHTS_DIR

        out = Path(args.out).resolve() if args.out else WEIGHTS_DIR / RECIPES["shapes"]["weights"]
        info = train_shapes_world(out)
        print(f"wrote {out} in {info['total_seconds'] / 60:.1f} min (recipe {info['recipe']})")
        if out == WEIGHTS_DIR / RECIPES["shapes"]["weights"]:
            from .shapes_training import judge_shipped

            scores = judge_shipped(out)["english_base_and_refiner"]
            print(f"English prompts, judged: colour {scores['colour']:.1%}, shape {scores['shape']:.1%}")
    elif args.command == "env":
        from .overview import environment_report

        print(json.dumps(environment_report(), indent=2))
    elif args.command == "profiles":
        from .overview import profile_table

        for row in profile_table():
            print(f"{row['profile']:12s} {row['device']:5s} {row['dtype']:9s} {row['what for']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
