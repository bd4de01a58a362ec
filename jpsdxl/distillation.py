"""Stage 3: distillation. Japanese copies of both text encoders learn to output, on a Japanese sentence, what the
frozen English encoders output on its English translation (what is matched, the loss and the metrics: ``targets.py``;
checkpoints: ``checkpoints.py``). Read top to bottom: 1. the held-out set, 2. students and teachers, 3. batches,
4. the trainer (on accelerate: several GPUs with ``accelerate launch``, no code change), 5. the stage as one call
(``prepare``, ``distil``, ``run``), 6. the students saved as diffusers components. It picks no starting rows (stage 2).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from . import checkpoints as ckpt
from .checkpoints import CheckpointNotWritten, NonFiniteLoss, checkpoints, latest_checkpoint  # noqa: F401 (D.<name>)
from .core.runs import atomic_path
from .data import TrainingPairs
from .targets import (  # noqa: F401  (stage 3's names, re-exported for notebooks and tests)
    TARGETS, Outputs, TokenIds, after_both_eos, centred_cosines, encode, forward, held_out_metrics, loss_terms,
    mean_pooled, pool_retrieval, positions_needed, token_ids, weighted_loss)


# -----------------------------------------------------------------------------
# 1. the held-out set


@dataclass
class HeldOut:
    """Held-out pairs with their teacher outputs and the teacher's mean pooled output, computed once; and the
    teacher's outputs on the empty prompt, which classifier-free guidance encodes through the refiner's
    ``text_encoder_2`` (its ``force_zeros_for_empty_prompt`` is false): the student must match it too."""

    ja: list[str]
    en: list[str]
    teacher: Outputs
    teacher_mean: torch.Tensor
    teacher_empty: Outputs | None = None

    @classmethod
    def build(cls, teachers: "Teachers", pairs, reference_english) -> "HeldOut":
        return cls([p[0] for p in pairs], [p[1] for p in pairs], teachers.encode([p[1] for p in pairs]),
                   mean_pooled(teachers.text_encoder_2, teachers.tokenizer_2, list(reference_english)),
                   teachers.encode([""]))

    def measure(self, students: "Students") -> dict:
        was_training = students.training
        students.eval()
        texts = self.ja + ([""] if self.teacher_empty is not None else [])
        out = encode(students.text_encoder, students.text_encoder_2, students.tokenizer, students.tokenizer_2, texts)
        students.train(was_training)
        n = len(self.ja)
        metrics = held_out_metrics(out[:n], self.teacher, self.teacher_mean)
        if self.teacher_empty is not None:  # summed MSE of the three targets on "", as the held-out loss is
            metrics["empty_prompt_loss"] = float(sum(loss_terms(out[n:], self.teacher_empty).values()))
        return metrics


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
    _ids: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for te in (self.text_encoder, self.text_encoder_2):
            te.requires_grad_(False).eval()

    def encode(self, sentences: list[str]) -> Outputs:
        return encode(self.text_encoder, self.text_encoder_2, self.tokenizer, self.tokenizer_2, sentences)

    def token_ids(self, tokenizer) -> TokenIds:
        """``TokenIds`` for ``tokenizer`` (the teachers' own or a student's), memoised along with the outputs when
        caching: small data brings the same sentences back in every epoch and every run of a comparison."""
        if tokenizer not in self._ids:
            self._ids[tokenizer] = TokenIds(tokenizer, memo=self.cache is not None)
        return self._ids[tokenizer]

    @torch.no_grad()  # not inference_mode: the targets enter the loss's autograd graph
    def targets(self, sentences: list[str], device, n: int = 77) -> Outputs:
        """The teachers' outputs for ``sentences`` through position ``n``: a causal encoder's first ``n`` outputs
        do not depend on what follows, so a batch the students compute through ``n`` positions needs no more (the
        pooled output reads the EOS position, which the trainer keeps inside ``n``). Cached, each sentence keeps the
        longest prefix computed so far and is computed again only when a batch asks for more."""
        def through_n(texts):
            ids = (self.token_ids(self.tokenizer)(texts)[:, :n], self.token_ids(self.tokenizer_2)(texts)[:, :n])
            return forward(self.text_encoder, self.text_encoder_2, *ids)

        if self.cache is None:
            return through_n(sentences).to(device, torch.float32)
        short = list(dict.fromkeys(s for s in sentences if s not in self.cache or len(self.cache[s].h1) < n))
        if short:
            out = through_n(short).to(torch.float16)
            for i, s in enumerate(short):
                self.cache[s] = out[i]
        rows = [self.cache[s] for s in sentences]
        return Outputs(torch.stack([r.h1[:n] for r in rows]), torch.stack([r.h2[:n] for r in rows]),
                       torch.stack([r.pooled for r in rows])).to(device, torch.float32)


def load_teachers(profile, cache: bool | None = None) -> Teachers:
    """The profile's English text encoders and tokenizers (``encoders.load_english``: no UNet, no VAE) as frozen
    teachers; with ``cache`` (default: ``distill.cache_teacher``) each sentence's outputs are kept once computed."""
    from .encoders import load_english

    use_cache = profile.distill.cache_teacher if cache is None else cache
    return Teachers(*load_english(profile), {} if use_cache else None)


def starting_rows(profile, override: str | None = None) -> str:
    """The stage-2 strategy the students start from: ``override``, else ``distill.init``, else ``init.strategy`` (the
    one rule, for the trainer, the CLI and notebook 03)."""
    return override or profile.distill.init or profile.init.strategy


def make_students(teachers: Teachers, tokenizer, tokenizer_2, strategy: str = "similarity", mapping=None,
                  causal: bool = True, seed: int = 0, dtype: torch.dtype | None = torch.float32,
                  **options) -> Students:
    """Japanese copies of both teachers, their rows started by a stage-2 ``strategy``: in float32 for training, or
    with ``dtype=None`` in the teachers' own dtype (stage 4's untrained copies: at SDXL's shapes a float32 pair
    would be 3 GB more, built only to be cast down).

    ``mapping`` (stage 2's ``mapping.pt``, via ``embedding_init.load_mapping``) is needed by every strategy but
    ``mean`` and ``random``. ``causal=False`` gives a non-causal student: transformers 5 keeps a CLIP text model
    causal under SDPA even with ``config.is_causal=False`` (it passes ``is_causal=True`` to the kernel), so the
    student also switches to eager attention, which honours the mask alone.
    """
    from .embedding_init import check_mapping, initial_rows, needs_mapping
    from .encoders import japanese_copy

    if mapping is None and needs_mapping(strategy):
        raise ValueError(f"init strategy {strategy!r} needs stage 2's mapping: run notebook 02 (it writes "
                         f"runs/<profile>/02_embedding_init/mapping.pt), or use strategy 'mean' or 'random'.")
    if mapping is not None and needs_mapping(strategy):
        check_mapping(mapping, tokenizer)  # made for this tokenizer, piece by piece, or refused
    copies = []
    for teacher, tok, teacher_tok in ((teachers.text_encoder, tokenizer, teachers.tokenizer),
                                      (teachers.text_encoder_2, tokenizer_2, teachers.tokenizer_2)):
        rows = initial_rows(strategy, mapping, teacher.get_input_embeddings().weight, len(tok), seed=seed, **options)
        student = japanese_copy(teacher, tok, teacher_tok, rows=rows, dtype=dtype)
        if not causal:
            student.config.is_causal = False
            student.set_attn_implementation("eager")
        copies.append(student.train())
    return Students(copies[0], copies[1], tokenizer, tokenizer_2)


# -----------------------------------------------------------------------------
# 3. batches


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
# 4. the trainer


@dataclass
class Run:
    """What a training run leaves: the trained students and what happened on the way."""

    students: Students | None  # None for ``compare``'s runs: their students are freed
    log: list[dict]  # one row per logged step: train loss terms, lr and (every eval_every) held-out metrics
    before: dict  # held-out metrics at step 0
    after: dict  # held-out metrics at the last step
    steps: int
    seconds: float  # training time in this process (without the held-out evaluations)
    samples_per_second: float
    peak_memory_gb: float | None  # CUDA peak allocated memory (None on a CPU)
    bad_lines: str  # the data report: bad lines met, with their numbers
    resumed_from: int | None = None
    folder: Path | None = None
    mixed_precision: str = "no"  # what ran: the profile's, or an accelerate launch config's
    made_from: dict | None = None  # the earlier stages' outputs it started from (``save_students`` records them)


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
    # fused: one kernel over all parameters, on the GPU and on the CPU. Left to itself, torch takes foreach only for
    # CUDA tensors and a per-tensor loop on the CPU (a tenth of tiny's training time); foreach on the CPU is as fast
    # but holds a temporary copy of the parameters (2 GiB more at SDXL's shapes: benchmarks/memory_sdxl_shapes.py)
    return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu", "mps") or None)


def _scheduler(optimizer, cfg):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)


def _precision(profile_precision: str) -> str:
    """The precision to run: an ``accelerate launch`` config or flag (which sets ``ACCELERATE_MIXED_PRECISION``)
    wins over the profile, and a difference is said, not silently applied either way."""
    import os

    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched and launched != profile_precision:
        print(f"mixed precision: {launched}, from accelerate launch (the profile says {profile_precision!r}; give "
              f"launch --mixed_precision {profile_precision} to run the profile's)")
        return launched
    return profile_precision


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


def _prepare_students(students: Students, cfg) -> None:
    """What trains and how: the unread layers frozen, only the rows on ``train = "embeddings"``, and activation
    checkpointing (recompute in the backward pass instead of storing: the small-card setting)."""
    students.freeze_unread()
    if cfg.train == "embeddings":  # small cards: only the rows learn; the transformer stays the teacher's
        students.requires_grad_(False)
        for p in students.embeddings():
            p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        for te in (students.text_encoder, students.text_encoder_2):
            if hasattr(te, "activation_checkpointing_enable"):  # its name since transformers 5.x (the rehearsal's
                te.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})  # find)
            else:  # older transformers 5 releases
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _loss_positions(accelerator, students: Students, teachers: Teachers, ids_1, en_ids, cfg):
    """(n, masks): how many of the 77 positions this batch computes, and which of them the loss reads.

    With ``pad_positions``, a causal student stops after the batch's last EOS (either language) + n pads: the outputs
    there are exactly the 77-position ones. ``n`` is one length for the whole global batch (a max over processes
    with ``gather``), so the loss is the mean over the same positions one process with the whole batch would take.
    """
    trim = cfg.pad_positions is not None and cfg.causal  # a non-causal student's every output reads all 77
    n, masks = ids_1.shape[1], None
    if not (trim or cfg.positions == "after_eos"):
        return n, masks
    eos = (ids_1, en_ids, students.tokenizer.eos_token_id, teachers.tokenizer.eos_token_id)
    if trim:
        n = positions_needed(*eos, cfg.pad_positions)
        if accelerator.num_processes > 1:
            n = int(accelerator.gather(torch.tensor([n], device=accelerator.device)).max())
    if cfg.positions == "after_eos":
        masks = after_both_eos(*eos)[:, :n]
    return n, masks


def _forward_backward(accelerator, model, students: Students, teachers: Teachers, batch: list, cfg,
                      ids: tuple) -> torch.Tensor:
    """One optimiser step's forward and backward passes over this process's ``batch``, in ``grad_accum``
    micro-batches (gradients add up; DDP syncs only on the last one). ``ids``: ``TokenIds`` for the students' two
    tokenizers and the teacher's. Returns the loss terms, averaged over processes."""
    micro = len(batch) // cfg.grad_accum
    ja, en = [p[0] for p in batch], [p[1] for p in batch]
    ids_1, ids_2 = ids[0](ja), ids[1](ja)
    n, masks = _loss_positions(accelerator, students, teachers, ids_1, ids[2](en), cfg)
    totals = dict.fromkeys(TARGETS, 0.0)
    for m in range(cfg.grad_accum):
        part = slice(m * micro, (m + 1) * micro)
        target = teachers.targets(en[part], accelerator.device, n)
        mask = masks[part].to(accelerator.device) if masks is not None else None
        sync = nullcontext() if m == cfg.grad_accum - 1 else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            h1, h2, pooled = model(ids_1[part, :n], ids_2[part, :n])
            terms = loss_terms(Outputs(h1, h2, pooled), target, mask)
            loss = weighted_loss(terms, cfg.loss_weights) / cfg.grad_accum
        accelerator.backward(loss)
        for t in TARGETS:
            totals[t] += float(terms[t].detach()) / cfg.grad_accum
    return accelerator.reduce(torch.tensor([totals[t] for t in TARGETS], device=accelerator.device), "mean")


MAX_OVERFLOWS = 20  # fp16: overflowed steps in a row the loss scaler may skip (its scale halves each time) before
#                    training stops: a few are how fp16 finds its scale, twenty in a row is divergence


def _non_finite(reduced: torch.Tensor, norm, step: int, folder: Path | None, precision: str) -> NonFiniteLoss:
    last = latest_checkpoint(folder) if folder else None
    # bf16 keeps fp32's range; only suggest it where the card has it (a T4, sm75, has not)
    bf16 = (precision == "fp16" and torch.cuda.is_available()  # in hardware: emulated bf16 (a T4's) is slow
            and torch.cuda.is_bf16_supported(including_emulation=False))
    return NonFiniteLoss(
        f"the training loss became {reduced.sum().item()} (gradient norm {float(norm)}) at step {step + 1}: training "
        f"stopped before the step was taken. "
        + (f"The last checkpoint, with finite weights, is kept: {last} (resumed with the same settings, it would "
           f"likely diverge again). " if last else "No checkpoint was written yet. ")
        + "Lower distill.lr (or embedding_lr), add warmup_steps or lower distill.loss_weights"
        + (", or use mixed_precision = 'bf16' instead of 'fp16'" if bf16 else "")
        + "; then start over: jpsdxl distill --fresh (resume=False).")


def train(teachers: Teachers, students: Students, pairs, held_out: HeldOut, cfg, seed: int = 0,
          folder: str | Path | None = None, resume: bool = True, progress: bool = True, stop_after: int | None = None,
          log_every: int = 10) -> Run:
    """Distil ``teachers`` into ``students`` for ``cfg.steps`` optimiser steps on ``pairs`` (a
    ``data.TrainingPairs``; ``cfg``: a profile's ``distill`` section).

    With ``folder``, checkpoints go to ``folder/checkpoints/step-NNNNNNN`` every ``checkpoint_every`` steps and at
    the end (``checkpoints.py``: a killed run, started again with ``resume=True``, continues from the newest one and
    reaches the same weights), and ``log.csv`` holds the log. ``stop_after``: leave after that many steps, as a
    killed run would (for tests and demonstrations).
    """
    from tqdm.auto import tqdm

    accelerator, model, optimizer, scheduler = _training_setup(students, cfg, seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    folder = Path(folder) if folder else None
    fixed = ckpt.fixed_settings(cfg, seed, ckpt.input_hashes(students, pairs))
    step, log, resumed_from = ckpt.restore(accelerator, scheduler, folder, fixed, resume)
    before = log[0] if log else {"step": 0, **{f"eval_{k}": v for k, v in held_out.measure(students).items()}}
    log = log or [before]
    # the data position is part of the state: a resumed run skips exactly the pairs it has seen
    stream = pairs.stream(step * cfg.batch_size // (world if pairs.streamed else 1), rank, world)
    # at most one refresh a second: in a notebook every refresh is a widget message, and a long cell's burst of
    # them can overflow the kernel's message queue (nbval then misses the end of the cell)
    bar = tqdm(total=cfg.steps, initial=step, desc="distillation", mininterval=1.0,
               disable=not progress or not accelerator.is_main_process)
    started, first_step, evaluating, overflows = time.perf_counter(), step, 0.0, 0
    ids = tuple(teachers.token_ids(t) for t in (students.tokenizer, students.tokenizer_2, teachers.tokenizer))
    model.train()
    try:  # an error mid-run closes the bar first: its line ends before the error's
        for batch in batches(stream, cfg.batch_size, rank, world, pairs.streamed):
            if step >= cfg.steps or (stop_after is not None and step - first_step >= stop_after):
                break
            reduced = _forward_backward(accelerator, model, students, teachers, batch, cfg, ids)
            overflows = _optimiser_step(accelerator, model, optimizer, scheduler, reduced, cfg, overflows, step, folder)
            step += 1
            bar.update()
            row, seconds = _log_row(step, scheduler.get_last_lr()[-1], reduced, held_out, students, cfg)
            evaluating += seconds  # held-out evaluations are not training time: kept out of the rate
            if "eval_loss" in row:
                bar.set_postfix(loss=f"{row['eval_loss']:.4f}", top1=f"{row['eval_pool100_top1']:.1%}")
            if step % log_every == 0 or "eval_loss" in row:
                log.append(row)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                ckpt.save(accelerator, model, scheduler, folder, step, cfg, fixed, log)
    finally:
        bar.close()
    seconds = time.perf_counter() - started - evaluating
    after = next((r for r in reversed(log) if "eval_loss" in r), before)
    return Run(students=accelerator.unwrap_model(model), log=log, before=_eval_part(before), after=_eval_part(after),
               steps=step, seconds=seconds,
               samples_per_second=(step - first_step) * cfg.batch_size / seconds if seconds > 0 else float("nan"),
               peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
               bad_lines=str(pairs.report), resumed_from=resumed_from, folder=folder,
               mixed_precision=accelerator.mixed_precision)


def _training_setup(students: Students, cfg, seed: int):
    """(accelerator, model, optimizer, scheduler): the students made trainable as ``cfg`` says, on the device, seeded;
    the optimiser wrapped by accelerate (the scheduler is checkpointed as JSON, by us)."""
    from accelerate.utils import set_seed

    accelerator = _accelerator(_precision(cfg.mixed_precision))
    if cfg.batch_size % (accelerator.num_processes * cfg.grad_accum):
        raise ValueError(f"distill.batch_size = {cfg.batch_size} must split evenly over {accelerator.num_processes} "
                         f"process(es) x {cfg.grad_accum} accumulation step(s)")
    set_seed(seed)
    _prepare_students(students, cfg)
    students.to(accelerator.device)
    optimizer = _optimizer(students, cfg, accelerator.device)
    scheduler = _scheduler(optimizer, cfg)
    model, optimizer = accelerator.prepare(students, optimizer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return accelerator, model, optimizer, scheduler


def _optimiser_step(accelerator, model, optimizer, scheduler, reduced, cfg, overflows: int, step: int,
                    folder: Path | None) -> int:
    """Clip, step, schedule, clear: one optimiser step after ``_forward_backward``. A non-finite loss or gradient stops
    training (``NonFiniteLoss``), unless fp16's loss scaler may skip it (up to ``MAX_OVERFLOWS`` in a row). Returns
    the overflows in a row so far."""
    norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    finite = bool(torch.isfinite(reduced).all() and torch.isfinite(norm))  # a term or a gradient overflowed?
    if not finite and (accelerator.scaler is None or overflows >= MAX_OVERFLOWS):
        raise _non_finite(reduced, norm, step, folder, accelerator.mixed_precision)
    optimizer.step()  # fp16: the loss scaler skips a step whose gradients overflowed and lowers its scale
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return 0 if finite else overflows + 1


def _log_row(step: int, lr: float, reduced: torch.Tensor, held_out: HeldOut, students: Students, cfg):
    """(row, seconds): an optimiser step's log row, with the held-out metrics every ``eval_every`` steps and at the
    last, and the seconds that evaluation took."""
    row = {"step": step, "lr": lr, **{f"train_{t}": round(float(v), 6) for t, v in zip(TARGETS, reduced)}}
    if step % cfg.eval_every and step != cfg.steps:
        return row, 0.0
    t0 = time.perf_counter()
    row.update({f"eval_{k}": v for k, v in held_out.measure(students).items()})
    return row, time.perf_counter() - t0


def _eval_part(row: dict) -> dict:
    return {k.removeprefix("eval_"): v for k, v in row.items() if k.startswith("eval_")}


# -----------------------------------------------------------------------------
# 5. the stage as one call


@dataclass
class Setup:
    """Everything a stage-3 run reads, loaded once: data splits, the extra pairs mixed into training (the shapes
    world's training captions), Japanese tokenizers, teachers, held-out set, and stage 2's mapping (None if stage 2
    has not run: only the ``mean`` and ``random`` starts work without it)."""

    profile: object
    splits: object
    extra_pairs: list
    tokenizer: object
    tokenizer_2: object
    teachers: Teachers
    held_out: HeldOut
    mapping: object = None
    made_from: dict = field(default_factory=dict)  # content hashes of the stage outputs read: stage name -> hash

    def pairs(self, share: float, empty_share: float = 0.0, seed: int | None = None) -> TrainingPairs:
        """The training stream: the training split with ``share`` of the items drawn from ``extra_pairs`` and
        ``empty_share`` of them the empty pair, in the order ``seed`` (default: the profile's) draws."""
        return TrainingPairs(self.splits.train, self.extra_pairs, share,
                             self.profile.seed if seed is None else seed, self.splits.report, empty_share)

    def validation(self, n: int) -> HeldOut:
        """The first ``n`` pairs of the validation split (``data.valid_fraction``), with the held-out set's teacher
        mean: what runs that choose a setting are scored on, so that the test pairs only ever report results."""
        from .data import DataError, take

        pairs = take(self.splits.valid, n)
        if len(pairs) < 2:  # the metrics compare pairs with each other: two at least
            raise DataError(f"{self.profile.data.pairs}: the validation split has {len(pairs)} pair(s) "
                            f"(data.valid_fraction = {self.profile.data.valid_fraction}): raise it, or give more pairs.")
        ja, en = [p[0] for p in pairs], [p[1] for p in pairs]
        return HeldOut(ja, en, self.teachers.encode(en), self.held_out.teacher_mean, self.held_out.teacher_empty)


def prepare(profile, reference_sentences: int = 5000) -> Setup:
    """Load what ``distil`` needs for ``profile``: the held-out set is ``distill.eval_pairs`` test pairs, the
    teacher's mean output is taken over ``reference_sentences`` randomly drawn training sentences (5,000: a few
    seconds on ``tiny``, a minute of a GPU on SDXL's encoders, far longer on a CPU), and the extra pairs are the shapes
    world's *training* captions (its held-out combinations and phrasings stay out: stage 4 tests on them)."""
    from .core.runs import outputs_hash
    from .data import DataError, load_pairs, sample, take
    from .embedding_init import stage_mapping
    from .shapes.world import caption_pairs
    from .tokenization import stage_tokenizers

    splits = load_pairs(profile)
    held_out_pairs = take(splits.test, profile.distill.eval_pairs)
    if len(held_out_pairs) < 2:  # the held-out metrics compare pairs with each other: two at least
        raise DataError(f"{profile.data.pairs}: the held-out split has {len(held_out_pairs)} pair(s) "
                        f"(data.test_fraction = {profile.data.test_fraction}): raise data.test_fraction, or give "
                        f"more pairs.")
    tok, tok_2 = stage_tokenizers(profile)  # stage 1's outputs: what stage 4 will read beside the encoders
    mapping = stage_mapping(profile, required=False)
    made_from = {"tokenizer": outputs_hash(profile, "tokenizer")}
    if mapping is not None:
        made_from["init"] = outputs_hash(profile, "init")
    teachers = load_teachers(profile)
    reference = [en for _, en in sample(splits.train, reference_sentences, profile.seed)]
    held_out = HeldOut.build(teachers, held_out_pairs, reference)
    return Setup(profile, splits, caption_pairs("train"), tok, tok_2, teachers, held_out, mapping, made_from)


def distil(setup: Setup, folder: str | Path | None = None, resume: bool = True, progress: bool = True,
           stop_after: int | None = None, seed: int | None = None, **overrides) -> Run:
    """One training run on ``setup``: the profile's ``[distill]`` settings, with any of them overridden by keyword
    (``init="mean"``, ``steps=150``, ``causal=False``, ...). ``seed`` (default: the profile's) sets the random
    starting rows, the data order and every other draw of the run."""
    import dataclasses

    from accelerate import PartialState

    from .core.runs import exclusive, require, settings_hash
    from .embedding_init import needs_mapping

    p = setup.profile
    seed = p.seed if seed is None else seed
    cfg = dataclasses.replace(p.distill, **overrides)
    strategy = starting_rows(p, cfg.init)
    if setup.mapping is None and needs_mapping(strategy):
        require(p, "init")  # raises: says to run `jpsdxl init`
    students = make_students(setup.teachers, setup.tokenizer, setup.tokenizer_2, strategy, setup.mapping,
                             causal=cfg.causal, seed=seed, top_k=p.init.top_k, temperature=p.init.temperature,
                             threshold=p.init.threshold)
    pairs = setup.pairs(cfg.shapes_share, cfg.empty_share, seed)
    # one run per folder: a second one would share its checkpoints' temporary names and prune the first's
    main = PartialState(cpu=not torch.cuda.is_available()).is_main_process  # as the trainer's Accelerator sees it
    lock = exclusive(folder, "--out") if folder is not None and main else nullcontext()
    with lock:
        run = train(setup.teachers, students, pairs, setup.held_out, cfg, seed=seed, folder=folder,
                    resume=resume, progress=progress, stop_after=stop_after)
    used = {k: v for k, v in setup.made_from.items() if k != "init" or needs_mapping(strategy)}
    run.made_from = {**used, "init_strategy": strategy, "steps": cfg.steps, "seed": seed,
                     "settings": settings_hash(p, "distill", distill=cfg, seed=seed)}
    return run


def run(profile, out: str | Path | None = None, resume: bool = True, progress: bool = True, **overrides) -> Run:
    """Stage 3 (``jpsdxl distill``): train on the profile's data from stage 2's starting rows, resuming from the
    newest checkpoint in ``out`` (default ``runs/<profile>/03_distillation``) unless ``resume=False``, and save
    the students there as diffusers components (main process only, under ``accelerate launch``)."""
    from accelerate import PartialState

    from .core.runs import ensure_writable, require, stage_dir
    from .embedding_init import needs_mapping

    require(profile, "tokenizer")  # before anything loads: says to run `jpsdxl tokenizer`
    if needs_mapping(starting_rows(profile, overrides.get("init"))):
        require(profile, "init")  # and `jpsdxl init`
    out = ensure_writable(Path(out).resolve() if out else stage_dir(profile, "distill"), "--out")
    result = distil(prepare(profile), out, resume=resume, progress=progress, **overrides)
    if PartialState().is_main_process:
        save_students(result.students, out, profile.torch_dtype(), result.made_from)
    return result


SUMMARY_KEYS = ("loss", "mse_h1", "mse_h2", "mse_pooled", "centred_cos_matched", "centred_cos_mismatched",
                "pool100_top1")


def summary(run: Run | list[Run]) -> dict:
    """The numbers a notebook table or metrics.json shows for a run: held-out metrics before and after. For the runs
    of one variant over several seeds (``compare``): their means, the seed count, and each metric's ``[min, max]``
    over the seeds under ``spread``."""
    if isinstance(run, list):
        each = [summary(r) for r in run]
        numbers = [k for k, v in each[0].items() if isinstance(v, (int, float))]
        mean = {k: round(sum(e[k] for e in each) / len(each), 4) for k in numbers}
        spread = {k: [min(e[k] for e in each), max(e[k] for e in each)]
                  for k in numbers if k.endswith(("_before", "_after"))}
        return {**mean, "seeds": len(each), "spread": spread}
    return {"steps": run.steps, **{f"{k}_before": round(run.before[k], 4) for k in SUMMARY_KEYS},
            **{f"{k}_after": round(run.after[k], 4) for k in SUMMARY_KEYS}, "pool_chance": run.after["pool_chance"],
            "samples_per_second": round(run.samples_per_second, 1), "seconds": round(run.seconds, 1)}


def compare(setup: Setup, variants: dict[str, dict], steps: int, seeds: int | None = None, points: int = 4,
            progress: bool = True) -> dict[str, list[Run]]:
    """Runs that differ only in one thing: for each variant (its keyword overrides), one run per seed, all with the
    same budget and held-out set. ``seeds`` runs per variant (default: ``distill.compare_seeds``), seeded from the
    profile's seed up: the random starting rows and the data order change with the seed, so the spread over seeds
    shows how much of a difference between variants is luck.

    Each run is evaluated ``points`` times along the way (and at step 0), on the first ``distill.compare_eval_pairs``
    pairs of the validation split (these runs choose settings: the test pairs stay for the results). The warm-up is
    scaled to the budget (the same share of it as in the profile's run), so a short run is not mostly warm-up. The
    runs keep their logs and metrics, not their students (freed as each run ends)."""
    import dataclasses

    from tqdm.auto import tqdm

    p, cfg = setup.profile, setup.profile.distill
    on = dataclasses.replace(setup, held_out=setup.validation(cfg.compare_eval_pairs or cfg.eval_pairs))
    common = {"steps": steps, "warmup_steps": round(cfg.warmup_steps * steps / cfg.steps),
              "eval_every": max(1, steps // points)}
    todo = [(name, seed) for name in variants for seed in range(p.seed, p.seed + (seeds or cfg.compare_seeds))]
    runs = {name: [] for name in variants}
    for name, seed in tqdm(todo, desc="runs", disable=not progress):
        run = distil(on, progress=False, seed=seed, **(common | variants[name]))
        run.students = None  # only the numbers are compared: never hold every run's students at once
        runs[name].append(run)
    return runs


# -----------------------------------------------------------------------------
# 6. the students as diffusers components


def save_students(students: Students, folder: str | Path, dtype: torch.dtype | None = None,
                  made_from: dict | None = None) -> Path:
    """``folder/{text_encoder,text_encoder_2,tokenizer,tokenizer_2}``: what stage 4 puts into the pipelines, each
    loadable with ``from_pretrained`` (safetensors), each written atomically. ``dtype``: the weights stored in it
    (the profile's, in which the pipelines load them: half the bytes on a half-precision profile, nothing that stage
    4 reads lost; the checkpoints keep training's float32). ``made_from`` (a run's): recorded as stage 3's outputs."""
    from .core.runs import TEXT_PARTS, quiet_hf_progress, record

    folder = Path(folder)
    for name in TEXT_PARTS:
        part = getattr(students, name)
        cast = dtype is not None and isinstance(part, torch.nn.Module)  # the encoders; tokenizers are files
        kw = {"state_dict": {k: v.to(dtype) for k, v in part.state_dict().items()}} if cast else {}
        with atomic_path(folder / name) as tmp, quiet_hf_progress():
            part.save_pretrained(tmp, **kw)
    if made_from is not None:
        record(folder, "distill", made_from)
    return folder
