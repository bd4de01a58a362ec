"""What SDXL reads from its text encoders (``hidden_states[-2]`` of both, ``text_encoder_2``'s ``text_embeds``: the card
says only "hidden states", so which ones is this tutorial's reading, a departure), the loss, and the held-out metrics
(MSE, cosines centred on the teacher's mean output, matched against mismatched, retrieval among pools of 100). A
leaf shared by stages 2 (step 0) and 3; it does not train (``distillation.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TARGETS = ("h1", "h2", "pooled")  # te1 hidden_states[-2], te2 hidden_states[-2], te2 text_embeds


# -----------------------------------------------------------------------------
# 1. targets and loss


@dataclass
class Outputs:
    """What one pair of encoders gives for a batch of sentences: the three targets."""

    h1: torch.Tensor  # [n, 77, width_1]
    h2: torch.Tensor  # [n, 77, width_2]
    pooled: torch.Tensor  # [n, projection]

    def __getitem__(self, idx) -> "Outputs":
        return Outputs(self.h1[idx], self.h2[idx], self.pooled[idx])

    def first(self, n: int) -> "Outputs":
        """The first ``n`` positions of the hidden states (the pooled vector is kept as it is)."""
        return Outputs(self.h1[:, :n], self.h2[:, :n], self.pooled)

    def to(self, *args, **kwargs) -> "Outputs":
        return Outputs(*(getattr(self, t).to(*args, **kwargs) for t in TARGETS))

    @staticmethod
    def cat(parts: list["Outputs"]) -> "Outputs":
        return Outputs(*(torch.cat([getattr(p, t) for p in parts]) for t in TARGETS))


def token_ids(tokenizer, sentences, max_length: int = 77) -> torch.Tensor:
    """SDXL's way: every sentence padded (with the tokenizer's own pad) or truncated to exactly 77 ids."""
    return tokenizer(list(sentences), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt")["input_ids"]


class TokenIds:
    """``token_ids`` for one tokenizer, with a memo: each sentence is tokenized once (small data, where every epoch
    brings the same sentences back). ``memo=False`` tokenizes every call (streamed data: the memo would only grow).
    The ids are the same either way: each sentence is padded to 77 on its own."""

    def __init__(self, tokenizer, memo: bool = True):
        self.tokenizer, self.memo = tokenizer, ({} if memo else None)

    def __call__(self, sentences) -> torch.Tensor:
        if self.memo is None:
            return token_ids(self.tokenizer, sentences)
        missing = list(dict.fromkeys(s for s in sentences if s not in self.memo))
        if missing:
            self.memo.update(zip(missing, token_ids(self.tokenizer, missing)))
        return torch.stack([self.memo[s] for s in sentences])


def forward(text_encoder, text_encoder_2, ids_1, ids_2) -> Outputs:
    """The three targets for token ids, as diffusers' ``encode_prompt`` reads them."""
    out_1 = text_encoder(ids_1.to(text_encoder.device), output_hidden_states=True)
    out_2 = text_encoder_2(ids_2.to(text_encoder_2.device), output_hidden_states=True)
    return Outputs(out_1.hidden_states[-2], out_2.hidden_states[-2], out_2.text_embeds)


def pooled_position(input_ids: torch.Tensor, config) -> torch.Tensor:
    """Where transformers reads the pooled output for ``input_ids`` under ``config``: per row, a position."""
    if config.eos_token_id == 2:
        return input_ids.to(torch.int).argmax(dim=-1)
    return (input_ids == config.eos_token_id).int().argmax(dim=-1)


@torch.no_grad()
def mean_pooled(text_encoder_2, tokenizer_2, sentences, batch_size: int = 256) -> torch.Tensor:
    """``text_encoder_2``'s pooled output (``text_embeds``) averaged over ``sentences``: the teacher's mean output
    that the centred metrics subtract. Only the encoder that pools runs, each batch only through its last pooled
    position (a causal encoder's output there does not depend on what follows): a fifth of ``encode``'s work."""
    total = 0.0
    for start in range(0, len(sentences), batch_size):
        ids = token_ids(tokenizer_2, list(sentences[start:start + batch_size]))
        n = int(pooled_position(ids, text_encoder_2.config).max()) + 1
        total = total + text_encoder_2(ids[:, :n].to(text_encoder_2.device)).text_embeds.float().sum(0).cpu()
    return total / len(sentences)


@torch.no_grad()
def encode(text_encoder, text_encoder_2, tokenizer, tokenizer_2, sentences, batch_size: int = 256,
           max_length: int = 77) -> Outputs:
    """The three targets for ``sentences`` (float32, on the CPU), in batches."""
    parts = []
    for start in range(0, len(sentences), batch_size):
        batch = list(sentences[start:start + batch_size])
        out = forward(text_encoder, text_encoder_2, token_ids(tokenizer, batch, max_length),
                      token_ids(tokenizer_2, batch, max_length))
        parts.append(out.to("cpu", torch.float32))
    return Outputs.cat(parts)


def loss_terms(student: Outputs, teacher: Outputs, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Mean squared error per target, over every position and channel; with ``mask`` ([n, 77] bool), the hidden
    states only at the positions it keeps."""
    terms = {}
    for t in TARGETS:
        a, b = getattr(student, t).float(), getattr(teacher, t).float()
        if mask is not None and t != "pooled":
            terms[t] = ((a - b) ** 2).mean(-1)[mask].mean()
        else:
            terms[t] = F.mse_loss(a, b)
    return terms


def later_eos(student_ids: torch.Tensor, teacher_ids: torch.Tensor, student_eos: int, teacher_eos: int):
    """``[n]``: for each pair, the position of the later of the two sentences' (first) EOS tokens."""
    first = lambda ids, eos: (ids == eos).int().argmax(1)  # noqa: E731  (both tokenizers always add one)
    return torch.maximum(first(student_ids, student_eos), first(teacher_ids, teacher_eos))


def after_both_eos(student_ids: torch.Tensor, teacher_ids: torch.Tensor, student_eos: int, teacher_eos: int):
    """``[n, 77]``: True at the positions at or after the later of the two EOS tokens, the only positions where,
    under causal attention, both sides have read the whole sentence (an alternative to matching all 77)."""
    start = later_eos(student_ids, teacher_ids, student_eos, teacher_eos)
    return torch.arange(student_ids.shape[1])[None] >= start[:, None]


def positions_needed(student_ids: torch.Tensor, teacher_ids: torch.Tensor, student_eos: int, teacher_eos: int,
                     pad_positions: int) -> int:
    """How many leading positions a batch needs for the loss: through the latest EOS in the batch (either side) and
    ``pad_positions`` padding positions after it. Under causal attention output i reads positions 0..i only, so the
    first L outputs of an L-position forward are those of the 77-position one: a causal student can skip the rest."""
    return min(student_ids.shape[1], int(later_eos(student_ids, teacher_ids, student_eos, teacher_eos).max()) + 1
               + pad_positions)


def weighted_loss(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The training loss: the per-target MSEs, weighted (a missing weight counts 1, as in the card's reading)."""
    return sum(weights.get(t, 1.0) * terms[t] for t in TARGETS)


# -----------------------------------------------------------------------------
# 2. held-out metrics


def centred_cosines(student_pooled: torch.Tensor, teacher_pooled: torch.Tensor, teacher_mean: torch.Tensor,
                    student_mean: torch.Tensor | None = None):
    """``[n, n]`` cosine similarities of student(JA_i) and teacher(EN_j), both minus the teacher's mean output (or
    each minus its own mean, with ``student_mean``: stage 4's images, where no reference mean exists)."""
    a = F.normalize(student_pooled - (teacher_mean if student_mean is None else student_mean), dim=-1)
    b = F.normalize(teacher_pooled - teacher_mean, dim=-1)
    return a @ b.T


def matched_and_mismatched(similarity: torch.Tensor) -> tuple[float, float]:
    """The mean of the diagonal (JA_i with its own EN_i) and of everything off it (JA_i with EN_j, j != i)."""
    n = similarity.shape[0]
    diagonal = similarity.diagonal()
    return float(diagonal.mean()), float((similarity.sum() - diagonal.sum()) / (n * n - n))


def pool_retrieval(similarity: torch.Tensor, pool: int = 100, pools: int = 50, seed: int = 0) -> float:
    """Share of Japanese sentences whose own English translation is the most similar among ``pool`` candidates
    (random pools of held-out pairs; chance = 1 / pool)."""
    n = similarity.shape[0]
    pool = min(pool, n)
    g = torch.Generator().manual_seed(seed)
    hits = total = 0
    for _ in range(pools):
        idx = torch.randperm(n, generator=g)[:pool]
        sub = similarity[idx][:, idx]
        hits += int((sub.argmax(dim=1) == torch.arange(pool)).sum())
        total += pool
    return hits / total


def held_out_metrics(student: Outputs, teacher: Outputs, teacher_mean: torch.Tensor, pool: int = 100) -> dict:
    """Loss per target, centred cosine matched vs mismatched, pool-``pool`` retrieval (with its chance)."""
    terms = loss_terms(student, teacher)
    sim = centred_cosines(student.pooled, teacher.pooled, teacher_mean)
    n = sim.shape[0]
    matched, mismatched = matched_and_mismatched(sim)
    return {"loss": float(sum(terms.values())), **{f"mse_{t}": float(v) for t, v in terms.items()},
            "centred_cos_matched": matched, "centred_cos_mismatched": mismatched,
            f"pool{pool}_top1": pool_retrieval(sim, pool), "pool_chance": 1 / min(pool, n)}
