"""Stage 3's checkpoints: written atomically, resumed bit-exactly, checked before they are trusted.

A checkpoint is accelerate's ``save_state`` folder (model, optimiser, RNG states: tensors only) plus our
``trainer_state.json`` (step, log, scheduler as JSON, the settings and input hashes it was made for, each file's
size). This file does not train (``distillation.py``).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from itertools import islice
from pathlib import Path

import torch

from .core.runs import atomic_path, refuse_link, write_json

_CKPT = re.compile(r"step-(\d{7})")


def checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoints under ``folder/checkpoints``, newest first (a checkpoint appears only once complete)."""
    root = Path(folder) / "checkpoints"
    found = [p for p in root.glob("step-*") if _CKPT.fullmatch(p.name) and (p / "trainer_state.json").exists()]
    return sorted(found, reverse=True)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint under ``folder/checkpoints``, or None."""
    found = checkpoints(folder)
    return found[0] if found else None


def _damage(ckpt: Path, state: dict) -> str | None:
    """What is wrong with a checkpoint's files, or None: each file has the size recorded when it was written (a cut
    copy or a full disk shows here), and the RNG states load as plain tensors (accelerate would skip a bad one
    silently, and the resumed run would quietly draw other data)."""
    for name, size in state.get("files", {}).items():
        path = ckpt / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is {path.stat().st_size if path.is_file() else 'missing'} bytes of {size:,}"
    from accelerate.utils import load  # torch.load, weights_only, plus the numpy types an RNG state holds

    for rng in ckpt.glob("random_states_*.pkl"):
        try:
            load(rng)
        except Exception as e:  # noqa: BLE001 - any failure means the state cannot be restored
            return f"{rng.name} does not load as plain tensors ({type(e).__name__})"
    return None


class CheckpointNotWritten(OSError):
    """A checkpoint could not be written (a full disk, a folder that went away): its partial folder is removed."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: training stopped; the last good checkpoint is kept."""


def write_log(folder: Path, log: list[dict]) -> None:
    """``folder/log.csv``: the run's log rows so far, written atomically beside each checkpoint."""
    keys = list(dict.fromkeys(k for row in log for k in row))
    with atomic_path(folder / "log.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows(log)


def restore(accelerator, scheduler, folder: Path | None, fixed: dict,
            resume: bool = True) -> tuple[int, list[dict], int | None]:
    """(step, log, resumed_from) from the newest readable checkpoint in ``folder``, or a fresh start. accelerate's
    ``load_state`` restores model, optimiser and every RNG (tensors only: ``weights_only`` loading), the scheduler
    comes back from JSON: together they make a resumed run bit-exact, and nothing in a checkpoint can run code.
    A damaged checkpoint (cut short, a file missing) is passed over for the next older one, and the run says so.
    ``resume=False``: a fresh start, and the folder's old checkpoints are deleted (a fresh run must never keep, or
    later resume into, another run's checkpoints)."""
    if folder:
        for path in (folder, folder / "checkpoints"):  # never write or prune through a link
            refuse_link(path)
    if folder and not resume and accelerator.is_main_process and (folder / "checkpoints").exists():
        shutil.rmtree(folder / "checkpoints")  # --fresh: what cannot be removed stops the run, not skipped
    accelerator.wait_for_everyone()
    found = checkpoints(folder) if folder and resume else []
    passed_over = []
    for ckpt in found:
        state, problem = _checked_state(ckpt, fixed)
        problem = problem or _damage(ckpt, state)
        if problem is None:
            try:
                accelerator.load_state(str(ckpt))
            except Exception as e:  # noqa: BLE001 - unreadable in some other way: try the next older one
                problem = f"{type(e).__name__}: {str(e)[:120]}"
        if problem is None:
            if passed_over:
                print(f"resuming from {ckpt.name}; passed over {'; '.join(passed_over)}", file=sys.stderr)
            scheduler.load_state_dict(state["scheduler"])
            return state["step"], state["log"], state["step"]
        passed_over.append(f"{ckpt.name} ({problem})")
    if passed_over:
        raise ValueError(f"no checkpoint in {folder / 'checkpoints'} can be read: {'; '.join(passed_over)}. Start "
                         f"fresh (--fresh, or resume=False).")
    return 0, [], None


def _checked_state(ckpt: Path, fixed: dict) -> tuple[dict, str | None]:
    """(trainer_state.json, None), or ({}, what is wrong) if it is unreadable; after the refusals that no older
    checkpoint would answer: pickled state (loading it could run code), settings that differ from the profile's."""
    pickles = sorted(p.name for p in ckpt.glob("custom_checkpoint_*.pkl"))
    if pickles:  # accelerate would unpickle these with weights_only=False, i.e. run whatever they hold
        raise ValueError(f"{ckpt} holds {', '.join(pickles)}: pickled state this trainer never writes (loading it "
                         f"could run code). Start fresh (--fresh, or resume=False), or delete {ckpt.parent}.")
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return {}, f"trainer_state.json unreadable: {type(e).__name__}"
    if "scheduler" not in state:
        raise ValueError(f"{ckpt} was written without its scheduler state (by an older jpsdxl): start fresh "
                         f"(--fresh, or resume=False).")
    saved = state["settings"]  # present in every checkpoint that has the scheduler's JSON (checked above)
    differ = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in fixed.items() if saved.get(k) != v]
    if differ:  # the optimiser, schedule and data position were made for the old values: refuse, do not mix
        raise ValueError(f"{ckpt} was written with other settings or inputs ({'; '.join(differ)}). Resume with the "
                         f"same ones, or start fresh (jpsdxl distill --fresh, or resume=False).")
    return state, None


# what a checkpoint's optimiser, schedule and data position were made for: a resumed run must not change them
_FIXED = ("batch_size", "steps", "lr", "embedding_lr", "schedule", "warmup_steps", "weight_decay", "loss_weights",
          "shapes_share", "empty_share")
STREAM_PAIRS_HASHED = 10_000  # a streamed corpus is known by its first pairs: reading all of it would take hours


def fixed_settings(cfg, seed: int, inputs: dict | None = None) -> dict:
    return {"seed": seed, **{k: getattr(cfg, k) for k in _FIXED}, **(inputs or {})}


def input_hashes(students, pairs) -> dict:
    """Content hashes of what a run's checkpoints were made from: both Japanese tokenizers (every piece and id) and
    the training pairs (all of a list corpus and the extra pairs; a streamed one's first ``STREAM_PAIRS_HASHED``).
    A resume across another tokenizer or other data is refused, not continued into wrong rows."""
    import hashlib

    def digest(lines) -> str:  # one join, one hash: 200k Tatoeba pairs in a few hundredths of a second
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]

    corpus = islice(pairs.corpus, STREAM_PAIRS_HASHED) if pairs.streamed else pairs.corpus
    vocab = [f"{piece}\t{i}" for t in (students.tokenizer, students.tokenizer_2)
             for piece, i in sorted(t.get_vocab().items())]
    return {"tokenizers": digest(vocab), "data": digest(f"{ja}\t{en}" for ja, en in [*corpus, *pairs.extra])}


def save(accelerator, model, scheduler, folder: Path | None, step: int, cfg, fixed: dict, log: list[dict]) -> None:
    """``folder/checkpoints/step-NNNNNNN`` via accelerate's ``save_state``, written under a temporary name and
    renamed only once complete (an atomic write: a reader never sees half a checkpoint); older ones pruned."""
    if folder is None:
        return
    if not all(torch.isfinite(p).all() for p in model.parameters()):  # only finite weights are a good checkpoint
        raise NonFiniteLoss(f"the weights are no longer finite at step {step}: no checkpoint written. Lower "
                            f"distill.lr, then start over: jpsdxl distill --fresh (resume=False).")
    dest = folder / "checkpoints" / f"step-{step:07d}"
    tmp = dest.with_name(f".{dest.name}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except (OSError, RuntimeError) as e:  # a full disk: torch's writer says "enforce fail at inline_container.cc"
        shutil.rmtree(tmp, ignore_errors=True)  # never a half-written folder left filling the disk
        last = latest_checkpoint(folder)
        raise CheckpointNotWritten(
            f"checkpoint {dest} could not be written ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]}): "
            f"free space on that disk or give another --out; "
            + (f"rerun to continue from {last}" if last else "no checkpoint was written yet")) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / "trainer_state.json", {"step": step, "pairs_seen": step * cfg.batch_size, "log": log,
                                                 "scheduler": scheduler.state_dict(),  # JSON: no pickle
                                                 "settings": fixed,
                                                 "files": files})  # sizes: a cut file is noticed on resume
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        for old in sorted(p for p in dest.parent.glob("step-*") if _CKPT.fullmatch(p.name))[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        write_log(folder, log)
    accelerator.wait_for_everyone()
