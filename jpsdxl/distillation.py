"""Stage 3: distillation. Japanese copies of both text encoders learn to output, on a Japanese sentence, what the
frozen English encoders output on its English translation.

The targets are what SDXL's UNets consume from the text side (diffusers' ``encode_prompt``): the penultimate hidden
states (``hidden_states[-2]``) of ``text_encoder`` and ``text_encoder_2`` on all 77 positions, and
``text_encoder_2``'s pooled, projected ``text_embeds``. The English teacher reads the English sentence tokenized and
padded exactly as the SDXL pipeline does; the Japanese student reads its translation. (The card says only "hidden
states": which layers, and all 77 positions, is this tutorial's reading of it.) Position i of the student is asked to
match position i of the teacher although the two sentences do not align token by token (other word order, other
lengths): under causal attention position i summarises the sentence *so far*, so only the positions at and after
both EOS tokens, which have seen the whole sentence, have a meaning both sides share.

Measuring closeness honestly needs two precautions (../shared/calibration-tiny.md): raw pooled cosines are dominated
by a component every sentence shares (two unrelated English sentences score ~0.74 through the tiny teacher), so
cosines are taken after subtracting the teacher's mean output; and matched pairs are compared against mismatched
ones, with retrieval among pools of 100 pairs (chance 1 %).

Read top to bottom (the targets, loss and metrics themselves live in ``targets.py``, shared with stage 2):
1. the held-out set, 2. students and teachers, 3. the training stream, 4. checkpoints, 5. the trainer (on
``accelerate``: one process, several GPUs or nodes with ``accelerate launch`` and no code change), 6. saving the
students as diffusers components. It does not assemble pipelines (stage 4,
``assembly.py``) or pick the starting rows (stage 2, ``embedding_init.py``).
"""

from __future__ import annotations

import csv
import json
import random
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path

import numpy as np
import torch

from .runs import atomic_path, write_json
from .targets import (  # noqa: F401  (stage 3's names, re-exported for notebooks and tests)
    TARGETS, Outputs, after_both_eos, centred_cosines, encode, forward, held_out_metrics, loss_terms, pool_retrieval,
    positions_needed, token_ids, weighted_loss)


# -----------------------------------------------------------------------------
# 1. the held-out set


@dataclass
class HeldOut:
    """Held-out pairs with their teacher outputs and the teacher's mean pooled output, computed once."""

    ja: list[str]
    en: list[str]
    teacher: Outputs
    teacher_mean: torch.Tensor

    @classmethod
    def build(cls, teachers: "Teachers", pairs, reference_english) -> "HeldOut":
        return cls([p[0] for p in pairs], [p[1] for p in pairs], teachers.encode([p[1] for p in pairs]),
                   teachers.encode(list(reference_english)).pooled.mean(0))

    def measure(self, students: "Students") -> dict:
        was_training = students.training
        students.eval()
        out = encode(students.text_encoder, students.text_encoder_2, students.tokenizer, students.tokenizer_2, self.ja)
        students.train(was_training)
        return held_out_metrics(out, self.teacher, self.teacher_mean)


# -----------------------------------------------------------------------------
# 2. students and teachers


class Students(torch.nn.Module):
    """Both Japanese encoders as one module: one optimiser, one DDP wrapper, one checkpoint."""

    def __init__(self, text_encoder, text_encoder_2, tokenizer, tokenizer_2):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2  # plain attributes: not parameters

    def forward(self, ids_1, ids_2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = forward(self.text_encoder, self.text_encoder_2, ids_1, ids_2)
        return out.h1, out.h2, out.pooled  # tensors, so that DDP and autocast see them

    def freeze_unread(self) -> None:
        """SDXL reads ``text_encoder``'s penultimate layer only: its last layer and final norm reach no target, so
        they get no gradient (and DDP refuses parameters that never get one). They stay the teacher's."""
        model = self.text_encoder  # transformers 5: the text transformer's parts sit on the model itself
        model.encoder.layers[-1].requires_grad_(False)
        model.final_layer_norm.requires_grad_(False)

    def embeddings(self) -> list[torch.nn.Parameter]:
        return [self.text_encoder.get_input_embeddings().weight, self.text_encoder_2.get_input_embeddings().weight]


@dataclass
class Teachers:
    """The frozen English encoders and SDXL's tokenizers. With ``cache``, each sentence's outputs are computed once
    and kept (float16, on the CPU): for small data, many runs share them; for large data, leave it off."""

    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizer: object
    tokenizer_2: object
    cache: dict | None = None

    def __post_init__(self):
        for te in (self.text_encoder, self.text_encoder_2):
            te.requires_grad_(False).eval()

    def encode(self, sentences: list[str]) -> Outputs:
        return encode(self.text_encoder, self.text_encoder_2, self.tokenizer, self.tokenizer_2, sentences)

    @torch.no_grad()  # not inference_mode: the targets enter the loss's autograd graph
    def targets(self, sentences: list[str], device) -> Outputs:
        if self.cache is None:
            ids = (token_ids(self.tokenizer, sentences), token_ids(self.tokenizer_2, sentences))
            return forward(self.text_encoder, self.text_encoder_2, *ids).to(device, torch.float32)
        missing = list(dict.fromkeys(s for s in sentences if s not in self.cache))
        if missing:
            out = self.encode(missing).to(torch.float16)
            for n, s in enumerate(missing):
                self.cache[s] = out[n]
        return Outputs(*(torch.stack([getattr(self.cache[s], t) for s in sentences]) for t in TARGETS)).to(
            device, torch.float32)


def load_teachers(profile, cache: bool | None = None) -> Teachers:
    """The profile's English text encoders and tokenizers, read from the base pipeline's folder (the UNets and
    the VAE are not loaded), in the profile's dtype, on its device."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .hub import resolve_profile

    profile.check_device()
    folder = resolve_profile(profile)["SDXL base"]
    variant = {"variant": profile.models.variant} if profile.models.variant else {}
    kw = dict(dtype=profile.torch_dtype(), **variant)
    te1 = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw).to(profile.torch_device())
    te2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **kw).to(profile.torch_device())
    tok1 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
    use_cache = profile.distill.cache_teacher if cache is None else cache
    return Teachers(te1, te2, tok1, tok2, {} if use_cache else None)


def make_students(teachers: Teachers, tokenizer, tokenizer_2, strategy: str = "similarity", mapping=None,
                  causal: bool = True, seed: int = 0, **options) -> Students:
    """Japanese copies of both teachers (float32), their rows started by a stage-2 ``strategy``.

    ``mapping`` (stage 2's ``mapping.pt``, via ``embedding_init.load_mapping``) is needed by every strategy but
    ``mean`` and ``random``. ``causal=False`` gives a non-causal student: transformers 5 keeps a CLIP text model
    causal under SDPA even with ``config.is_causal=False`` (it passes ``is_causal=True`` to the kernel), so the
    student also switches to eager attention, which honours the mask alone.
    """
    from .embedding_init import initial_rows
    from .encoders import japanese_copy

    if mapping is None and strategy not in ("mean", "random"):
        raise ValueError(f"init strategy {strategy!r} needs stage 2's mapping: run notebook 02 (it writes "
                         f"runs/<profile>/02_embedding_init/mapping.pt), or use strategy 'mean' or 'random'.")
    copies = []
    for teacher, tok, teacher_tok in ((teachers.text_encoder, tokenizer, teachers.tokenizer),
                                      (teachers.text_encoder_2, tokenizer_2, teachers.tokenizer_2)):
        rows = initial_rows(strategy, mapping, teacher.get_input_embeddings().weight, len(tok), seed=seed, **options)
        student = japanese_copy(teacher, tok, teacher_tok, rows=rows)
        if not causal:
            student.config.is_causal = False
            student.set_attn_implementation("eager")
        copies.append(student.train())
    return Students(copies[0], copies[1], tokenizer, tokenizer_2)


# -----------------------------------------------------------------------------
# 3. the training stream


def training_pairs(splits, shapes_share: float = 0.0) -> tuple[list | object, list]:
    """(corpus, shapes captions) for training: the corpus's training split and, with ``shapes_share`` > 0, the shapes
    world's *training* caption pairs (its held-out combinations and phrasings stay out: stage 4 tests on them)."""
    from .shapes import caption_pairs

    return splits.train, (caption_pairs("train") if shapes_share > 0 else [])


def pair_stream(corpus, shapes: list, shapes_share: float, seed: int, start: int = 0):
    """The training sequence from item ``start`` on, the same on every run with the same seed.

    A list corpus is reshuffled each epoch (seeded by seed and epoch); a streamed one is read in its order. Shapes
    captions are interleaved so that they make up ``shapes_share`` of the items. Resuming skips ``start`` items of
    the same sequence, so a resumed run sees exactly the pairs the uninterrupted one would have.
    """
    def forever():
        for epoch in count():
            rng = random.Random(f"{seed}/{epoch}")
            order = (corpus[i] for i in np.random.default_rng([seed, epoch]).permutation(len(corpus))) \
                if isinstance(corpus, list) else iter(corpus)
            seen = False
            for pair in order:
                while shapes and rng.random() < shapes_share:
                    yield rng.choice(shapes)
                seen = True
                yield pair
            if not seen:
                raise ValueError("the training split is empty: check data.pairs and the split fractions")

    return islice(forever(), start, None)


def batches(stream, global_batch: int, rank: int, world: int, streamed: bool):
    """This process's share of each optimiser step's batch. A list corpus: every process walks the same global
    sequence and takes its slice, so N processes see exactly what one process with the same global batch sees.
    A streamed corpus is already sharded per process (``StreamedSplit.sharded``): it takes local batches."""
    local = global_batch // world
    while True:
        if streamed:
            batch = list(islice(stream, local))
        else:
            batch = list(islice(stream, global_batch))[rank * local:(rank + 1) * local]
        if len(batch) < local:
            return
        yield batch


# -----------------------------------------------------------------------------
# 4. checkpoints


_CKPT = re.compile(r"step-(\d{7})")


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint under ``folder/checkpoints`` (a checkpoint appears only once complete)."""
    root = Path(folder) / "checkpoints"
    found = sorted(p for p in root.glob("step-*") if _CKPT.fullmatch(p.name) and (p / "trainer_state.json").exists())
    return found[-1] if found else None


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: training stopped; the last good checkpoint is kept."""


# -----------------------------------------------------------------------------
# 5. the trainer


@dataclass
class Run:
    """What a training run leaves: the trained students and what happened on the way."""

    students: Students
    log: list[dict]  # one row per logged step: train loss terms, lr and (every eval_every) held-out metrics
    before: dict  # held-out metrics at step 0
    after: dict  # held-out metrics at the last step
    steps: int
    seconds: float  # training time in this process (without the step-0 evaluation)
    samples_per_second: float
    peak_memory_gb: float | None  # CUDA peak allocated memory (None on a CPU)
    bad_lines: str  # the data report: bad lines met, with their numbers
    resumed_from: int | None = None
    folder: Path | None = None


def _optimizer(students: Students, cfg, device):
    """AdamW with two groups: embedding rows (``embedding_lr``, no weight decay) and the rest."""
    emb = {id(p) for p in students.embeddings()}
    params = [p for p in students.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in emb], "lr": cfg.embedding_lr or cfg.lr, "weight_decay": 0.0},
              {"params": [p for p in params if id(p) not in emb], "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ModuleNotFoundError:
            raise ModuleNotFoundError("distill.optimizer = 'adamw8bit' needs bitsandbytes (a CUDA GPU): "
                                      "pip install bitsandbytes, or use optimizer = 'adamw'") from None
        return bnb.optim.AdamW8bit(groups)
    fused = device.type == "cuda"  # one kernel for all parameters; foreach (the default) elsewhere
    return torch.optim.AdamW(groups, fused=fused or None)


def _scheduler(optimizer, cfg):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)


def _accelerator(mixed_precision: str):
    """accelerate keeps one global state per process; a notebook comparing runs with different precisions in one
    kernel needs it reset between them (only ever in a single process: a launched job has one precision)."""
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        AcceleratorState._reset_state()
    # cpu=True without CUDA: several launched CPU processes then form a gloo group (accelerate's MULTI_CPU)
    # instead of each training alone
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def _write_log(folder: Path, log: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in log for k in row))
    with atomic_path(folder / "log.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows(log)


def train(teachers: Teachers, students: Students, splits, held_out: HeldOut, cfg, seed: int = 0,
          folder: str | Path | None = None, resume: bool = True, progress: bool = True, stop_after: int | None = None,
          log_every: int = 10) -> Run:
    """Distil ``teachers`` into ``students`` for ``cfg.steps`` optimiser steps (``cfg``: a profile's ``distill``).

    With ``folder``, checkpoints go to ``folder/checkpoints/step-NNNNNNN`` every ``checkpoint_every`` steps and at
    the end (model, optimiser, scheduler, RNG states, data position: a killed run, started again with
    ``resume=True``, continues from the newest one and reaches the same weights), and ``log.csv`` holds the log.
    ``stop_after``: leave after that many steps, as a killed run would (for tests and demonstrations).
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    accelerator = _accelerator(cfg.mixed_precision)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"distill.batch_size = {cfg.batch_size} must split evenly over {world} process(es) x "
                         f"{cfg.grad_accum} accumulation step(s)")
    set_seed(seed)
    students.freeze_unread()
    if cfg.train == "embeddings":  # small cards: only the rows learn; the transformer stays the teacher's
        students.requires_grad_(False)
        for p in students.embeddings():
            p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        for te in (students.text_encoder, students.text_encoder_2):
            te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    students.to(device)
    optimizer = _optimizer(students, cfg, device)
    scheduler = _scheduler(optimizer, cfg)
    model, optimizer = accelerator.prepare(students, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    folder = Path(folder) if folder else None
    step, log, resumed_from = 0, [], None
    ckpt = latest_checkpoint(folder) if folder and resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        step, log, resumed_from = state["step"], state["log"], state["step"]
        if state["batch_size"] != cfg.batch_size or state["seed"] != seed:
            raise ValueError(f"{ckpt} was written with batch_size {state['batch_size']} and seed {state['seed']}; "
                             f"this run has {cfg.batch_size} and {seed}. Resume with the same settings, or pass "
                             f"resume=False (--fresh) to start over.")
    before = log[0] if log else {"step": 0, **{f"eval_{k}": v for k, v in held_out.measure(students).items()}}
    if not log:
        log.append(before)

    corpus, shapes = training_pairs(splits, cfg.shapes_share)
    streamed = not isinstance(corpus, list)
    if streamed and world > 1:
        corpus = corpus.sharded(rank, world)
    per_process = step * cfg.batch_size // (world if streamed else 1)
    stream = pair_stream(corpus, shapes, cfg.shapes_share, seed, start=per_process)
    micro = cfg.batch_size // world // cfg.grad_accum
    weights = dict(cfg.loss_weights)

    def save(at_step: int) -> None:
        if folder is None:
            return
        dest = folder / "checkpoints" / f"step-{at_step:07d}"
        tmp = dest.with_name(f".{dest.name}.partial")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:  # complete before it gets its name: a reader never sees half a checkpoint
            write_json(tmp / "trainer_state.json", {"step": at_step, "batch_size": cfg.batch_size, "seed": seed,
                                                     "pairs_seen": at_step * cfg.batch_size, "log": log})
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
            for old in sorted(p for p in dest.parent.glob("step-*") if _CKPT.fullmatch(p.name))[:-cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            _write_log(folder, log)
        accelerator.wait_for_everyone()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # at most one refresh a second: in a notebook every refresh is a widget message, and a long cell's burst of
    # them can overflow the kernel's message queue (nbval then misses the end of the cell)
    bar = tqdm(total=cfg.steps, initial=step, desc="distillation", mininterval=1.0,
               disable=not progress or not accelerator.is_main_process)
    started, first_step = time.perf_counter(), step
    model.train()
    for batch in batches(stream, cfg.batch_size, rank, world, streamed):
        if step >= cfg.steps or (stop_after is not None and step - first_step >= stop_after):
            break
        totals = dict.fromkeys(TARGETS, 0.0)
        ja, en = [p[0] for p in batch], [p[1] for p in batch]
        ids_1, ids_2 = token_ids(students.tokenizer, ja), token_ids(students.tokenizer_2, ja)
        trim = cfg.pad_positions is not None and cfg.causal  # a non-causal student's every output reads all 77
        n, masks = ids_1.shape[1], None
        if trim or cfg.positions == "after_eos":  # both need where each side's sentence ends
            eos = (ids_1, token_ids(teachers.tokenizer, en), students.tokenizer.eos_token_id,
                   teachers.tokenizer.eos_token_id)
        if trim:
            # one length for the whole global batch (every micro-batch, every process): the loss stays the mean
            # over the same positions as one process with the whole batch would take
            n = positions_needed(*eos, cfg.pad_positions)
            n = int(accelerator.gather(torch.tensor([n], device=device)).max()) if world > 1 else n
        if cfg.positions == "after_eos":
            masks = after_both_eos(*eos)[:, :n]
        for m in range(cfg.grad_accum):
            part = slice(m * micro, (m + 1) * micro)
            target = teachers.targets(en[part], device).first(n)
            ids = ids_1[part, :n], ids_2[part, :n]
            mask = masks[part].to(device) if masks is not None else None
            sync = nullcontext() if m == cfg.grad_accum - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                h1, h2, pooled = model(*ids)
                terms = loss_terms(Outputs(h1, h2, pooled), target, mask)
                loss = weighted_loss(terms, weights) / cfg.grad_accum
            accelerator.backward(loss)
            for t in TARGETS:
                totals[t] += float(terms[t].detach()) / cfg.grad_accum
        reduced = accelerator.reduce(torch.tensor([totals[t] for t in TARGETS], device=device), "mean")
        if not torch.isfinite(reduced).all():
            last = latest_checkpoint(folder) if folder else None
            raise NonFiniteLoss(
                f"the training loss became {reduced.sum().item()} at step {step + 1}: training stopped. "
                + (f"The last good checkpoint is kept: {last}. " if last else "No checkpoint was written yet. ")
                + "Lower distill.lr (or embedding_lr), add warmup_steps, or use mixed_precision = 'bf16' "
                  "instead of 'fp16'; then resume.")
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update()
        row = {"step": step, "lr": scheduler.get_last_lr()[-1],
               **{f"train_{t}": round(float(v), 6) for t, v in zip(TARGETS, reduced)}}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row.update({f"eval_{k}": v for k, v in held_out.measure(students).items()})
            bar.set_postfix(loss=f"{row['eval_loss']:.4f}", top1=f"{row['eval_pool100_top1']:.1%}")
        if step % log_every == 0 or "eval_loss" in row:
            log.append(row)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save(step)
    bar.close()
    seconds = time.perf_counter() - started
    after = next((r for r in reversed(log) if "eval_loss" in r), before)
    report = splits.report
    return Run(students=accelerator.unwrap_model(model), log=log, before=_eval_part(before), after=_eval_part(after),
               steps=step, seconds=seconds,
               samples_per_second=(step - first_step) * cfg.batch_size / seconds if seconds > 0 else float("nan"),
               peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
               bad_lines=str(report), resumed_from=resumed_from, folder=folder)


def _eval_part(row: dict) -> dict:
    return {k.removeprefix("eval_"): v for k, v in row.items() if k.startswith("eval_")}


@dataclass
class Setup:
    """Everything a stage-3 run reads, loaded once: data splits, Japanese tokenizers, teachers, held-out set,
    stage 2's mapping (None if notebook 02 has not run)."""

    profile: object
    splits: object
    tokenizer: object
    tokenizer_2: object
    teachers: Teachers
    held_out: HeldOut
    mapping: object = None


def prepare(profile, mapping_path: str | Path | None = None) -> Setup:
    """Load what ``distil`` needs for ``profile``: the held-out set is ``distill.eval_pairs`` test pairs, and the
    teacher's mean output is taken over 5,000 randomly drawn training sentences."""
    from .data import load_pairs, sample, take
    from .embedding_init import load_mapping
    from .tokenization import japanese_tokenizers

    splits = load_pairs(profile)
    tok, tok_2 = japanese_tokenizers(profile, None if splits.streamed else [ja for ja, _ in splits.train])
    teachers = load_teachers(profile)
    held_out = HeldOut.build(teachers, take(splits.test, profile.distill.eval_pairs),
                             [en for _, en in sample(splits.train, 5000, profile.seed)])
    mapping = None
    if mapping_path is not None and Path(mapping_path).exists():
        mapping, _ = load_mapping(mapping_path)
    return Setup(profile, splits, tok, tok_2, teachers, held_out, mapping)


def distil(setup: Setup, folder: str | Path | None = None, resume: bool = True, progress: bool = True,
           stop_after: int | None = None, **overrides) -> Run:
    """One training run on ``setup``: the profile's ``[distill]`` settings, with any of them overridden by keyword
    (``init="mean"``, ``steps=150``, ``causal=False``, ...)."""
    import dataclasses

    p = setup.profile
    cfg = dataclasses.replace(p.distill, **overrides)
    strategy = cfg.init or p.init.strategy
    students = make_students(setup.teachers, setup.tokenizer, setup.tokenizer_2, strategy, setup.mapping,
                             causal=cfg.causal, seed=p.seed, top_k=p.init.top_k, temperature=p.init.temperature,
                             threshold=p.init.threshold)
    return train(setup.teachers, students, setup.splits, setup.held_out, cfg, seed=p.seed, folder=folder,
                 resume=resume, progress=progress, stop_after=stop_after)


def summary(run: Run) -> dict:
    """The numbers a notebook table or metrics.json shows for a run: held-out metrics before and after."""
    keys = ("loss", "mse_h1", "mse_h2", "mse_pooled", "centred_cos_matched", "centred_cos_mismatched", "pool100_top1")
    return {"steps": run.steps, **{f"{k}_before": round(run.before[k], 4) for k in keys},
            **{f"{k}_after": round(run.after[k], 4) for k in keys}, "pool_chance": run.after["pool_chance"],
            "samples_per_second": round(run.samples_per_second, 1), "seconds": round(run.seconds, 1)}


def compare(setup: Setup, variants: dict[str, dict], steps: int, progress: bool = True) -> dict[str, Run]:
    """One run per variant (its keyword overrides), all with the same budget, seed and data order. The warm-up is
    scaled to the budget (the same share of it as in the profile's run), so a short run is not mostly warm-up."""
    from tqdm.auto import tqdm

    cfg = setup.profile.distill
    common = {"steps": steps, "warmup_steps": round(cfg.warmup_steps * steps / cfg.steps)}
    return {name: distil(setup, progress=False, **(common | overrides))
            for name, overrides in tqdm(variants.items(), desc="runs", disable=not progress)}


def pair_view(setup: Setup, n: int = 5) -> list[dict]:
    """What the two sides of a training pair look like to their encoders: tokens and where EOS falls."""
    from .data import take

    rows = []
    for ja, en in take(setup.splits.train, n):
        ja_tokens = setup.tokenizer.tokenize(ja)
        en_tokens = setup.teachers.tokenizer.tokenize(en)
        rows.append({"Japanese (student reads)": ja, "English (teacher reads)": en,
                     "JA tokens": " ".join(ja_tokens), "EN tokens": " ".join(en_tokens),
                     "JA EOS at": len(ja_tokens) + 1, "EN EOS at": len(en_tokens) + 1})
    return rows


def training_flops_per_sample(text_encoder, text_encoder_2, tokens: int = 77) -> dict:
    """Model FLOPs of one training pair: 6 x student parameters x tokens (forward and backward) plus
    2 x teacher parameters x tokens (the teacher's forward); the students have the teachers' sizes up to the
    embedding rows, which are lookups and cost no multiply-adds (so they are left out of both)."""
    def dense(te):
        return sum(p.numel() for n, p in te.named_parameters() if "embeddings" not in n)

    params = dense(text_encoder) + dense(text_encoder_2)
    return {"dense_parameters": params, "flops_per_pair": (6 + 2) * params * tokens}


def recipe_flops_per_pair(recipe: str = "sdxl") -> dict:
    """``training_flops_per_sample`` for a zoo recipe's text encoders, built on the meta device (no memory)."""
    from .zoo import build_components

    with torch.device("meta"):
        parts = build_components(recipe, scheduler=False)
    return training_flops_per_sample(parts["text_encoder"], parts["text_encoder_2"])


BENCHMARK_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "distillation_speed.json"


def measured_gpu_rows(path: str | Path = BENCHMARK_RESULTS) -> list[dict]:
    """The GPU rows that ``benchmarks/distillation_speed.py`` measured and saved (none until it has run on a GPU)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [{"where": f"{r['device']}, {r['profile']}, {r['settings']}", "pairs_per_second": r["pairs_per_second"],
             "peak GiB": r.get("peak_memory_gib")} for r in rows if r.get("device", "cpu") != "cpu"]


def cost_rows(measured: list[dict], flops_per_pair: float, pairs: int = 41_376_862, gpus=(1, 8)) -> list[dict]:
    """Hours for ``pairs`` training pairs (default: the card's 28,155,494 WMT23 + 13,221,368 caption pairs, one
    epoch) at each *measured* throughput (rows of ``{"where", "pairs_per_second", ...}``), scaled linearly to
    several GPUs (an upper bound: data-parallel scaling is rarely perfect)."""
    out = []
    for row in measured:
        rate = row["pairs_per_second"]
        out.append({**row, "TFLOP/s (model)": round(rate * flops_per_pair / 1e12, 3),
                    **{f"hours for {pairs / 1e6:.1f}M pairs on {g}": round(pairs / rate / g / 3600, 1) for g in gpus}})
    return out


# -----------------------------------------------------------------------------
# 6. the students as diffusers components


def save_students(students: Students, folder: str | Path) -> Path:
    """``folder/{text_encoder,text_encoder_2,tokenizer,tokenizer_2}``: what stage 4 puts into the pipelines, each
    loadable with ``from_pretrained`` (safetensors), each written atomically."""
    folder = Path(folder)
    from .runs import quiet_hf_progress

    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        with atomic_path(folder / name) as tmp, quiet_hf_progress():
            getattr(students, name).save_pretrained(tmp)
    return folder
