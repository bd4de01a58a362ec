"""Notebook 01's measurements and tables: how CLIP and the Japanese tokenizer cut the same text.

Small, display-oriented helpers (rows of dicts that the notebook turns into DataFrames). The tokenizers
themselves live in ``core/clip_tokenizer.py`` (SDXL's) and ``tokenization.py`` (the Japanese one). Also notebook 03's
view of a training pair.
"""

from __future__ import annotations

from typing import Sequence

from ..core.clip_tokenizer import MAX_LENGTH, token_bytes
from ..data import normalize_text
from ..tokenization import overflow


def tokens_per_char(tokenizer, texts: Sequence[str]) -> float:
    """Content tokens (no BOS/EOS) per character, over all ``texts``."""
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return sum(map(len, ids)) / max(sum(len(normalize_text(t).replace(" ", "")) for t in texts), 1)


def overflow_rate(tokenizer, texts: Sequence[str], max_length: int = MAX_LENGTH) -> float:
    """Share of ``texts`` longer than ``max_length`` tokens with BOS and EOS."""
    return sum(d > 0 for d in overflow(tokenizer, texts, max_length)) / max(len(texts), 1)


def token_lengths(tokenizer, texts: Sequence[str]) -> list[int]:
    """Sequence length of each text with BOS and EOS, before truncation."""
    return [len(ids) for ids in tokenizer(list(texts), verbose=False)["input_ids"]]


def layout(tokenizer, prompt: str, max_length: int = MAX_LENGTH) -> list[dict]:
    """Position by position, what an encoder is fed: id, token, and its role (bos/text/eos/pad)."""
    ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    n_text = len(tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"])
    rows = []
    for pos, tid in enumerate(ids):
        role = "bos" if pos == 0 else "eos" if pos == n_text - 1 else "text" if pos < n_text else "pad"
        rows.append({"position": pos, "id": tid, "token": tokenizer.convert_ids_to_tokens(tid), "role": role})
    return rows


GAP = "⋮"


def side_by_side(tokenizers: dict, prompt: str, positions: Sequence[int] | None = None) -> dict[str, list[str]]:
    """Columns of ``id:token (role)`` per position for several tokenizers.

    Default positions: every position up to the last EOS of any column and the first padding after it, then a
    ``⋮`` row standing for the padding that repeats, then the last three positions (74-76).
    """
    layouts = {name: layout(tok, prompt) for name, tok in tokenizers.items()}
    length = len(next(iter(layouts.values())))
    if positions is None:
        last_eos = max(next(r["position"] for r in rows if r["role"] == "eos") for rows in layouts.values())
        head = list(range(min(last_eos + 2, length)))
        positions = head + [p for p in range(length - 3, length) if p > head[-1]]
    columns: dict[str, list[str]] = {"position": []}
    for name in layouts:
        columns[name] = []
    previous = None
    for p in positions:
        if previous is not None and p > previous + 1:  # positions left out: say so, never hide them
            columns["position"].append(f"{GAP} {previous + 1}-{p - 1}")
            for name, rows in layouts.items():
                roles = sorted({rows[q]["role"] for q in range(previous + 1, p)})
                columns[name].append(f"{GAP} ({', '.join(roles)})")
        columns["position"].append(str(p))
        for name, rows in layouts.items():
            columns[name].append(f"{rows[p]['id']}:{rows[p]['token']} ({rows[p]['role']})")
        previous = p
    return columns


BYTE_PIECE_COLUMNS = ["id", "token", "bytes", "text", "whole characters"]


def clip_byte_pieces(tokenizer, text: str) -> list[dict]:
    """How CLIP's byte-level BPE cuts ``text``: each token's UTF-8 bytes, and whether they form whole characters."""
    rows = []
    for tid in tokenizer(text, add_special_tokens=False)["input_ids"]:
        token = tokenizer.convert_ids_to_tokens(tid)
        raw = token_bytes(token)
        try:
            shown, whole = raw.decode("utf-8"), True
        except UnicodeDecodeError:
            shown, whole = raw.decode("utf-8", errors="replace"), False
        rows.append({"id": tid, "token": token, "bytes": raw.hex(" "), "text": shown, "whole characters": whole})
    return rows


def normalization_examples(tokenizer, prompts: Sequence[str]) -> list[dict]:
    """For each prompt: what the tokenizer's normaliser makes of it, its pieces, and how many became <unk>."""
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        rows.append({"prompt": repr(prompt), "normalised": tokenizer.backend_tokenizer.normalizer.normalize_str(prompt),
                     "pieces": " ".join(tokenizer.convert_ids_to_tokens(ids)),
                     "unknown": sum(i == tokenizer.unk_token_id for i in ids)})
    return rows


def pair_view(setup, n: int = 5) -> list[dict]:
    """What the two sides of a training pair look like to their encoders: tokens and where EOS falls."""
    from ..data import take

    rows = []
    for ja, en in take(setup.splits.train, n):
        ja_tokens = setup.tokenizer.tokenize(ja)
        en_tokens = setup.teachers.tokenizer.tokenize(en)
        rows.append({"Japanese (student reads)": ja, "English (teacher reads)": en,
                     "JA tokens": " ".join(ja_tokens), "EN tokens": " ".join(en_tokens),
                     "JA EOS at": len(ja_tokens) + 1, "EN EOS at": len(en_tokens) + 1})
    return rows


def over_seeds(summaries: dict[str, dict], keys: Sequence[str]) -> dict[str, dict]:
    """Notebook 03's comparison table: for each variant (``distillation.summary`` of its runs over seeds), each
    metric's mean over the seeds and, beside it, the range the seeds spanned."""
    table = {}
    for name, s in summaries.items():
        row = table[name] = {}
        for key in keys:
            row[key] = s[key]
            row[f"{key} (min-max)"] = "{:.4f}-{:.4f}".format(*s["spread"][key]) if s["seeds"] > 1 else ""
    return table


def ratio_table(ratios: dict) -> dict:
    """``measure.clip_ratios`` as {model: {kind: "ratio (low-high, n)"}}: one column per model, one row per kind."""
    return {name: {kind: f"{r['ratio']:.2f} ({r['low']:.2f}-{r['high']:.2f}, {r['n']})" for kind, r in rows.items()}
            for name, rows in ratios.items()}


def rate(share: float, n: int) -> str:
    """A rate as a reader should see it: "58% (26/45; 43%-71%)", the count and its 95 % Wilson interval."""
    from .measure import wilson

    hits = round(share * n)
    low, high = wilson(hits, n)
    return f"{share:.0%} ({hits}/{n}; {low:.0%}-{high:.0%})"


def rates(scores: dict, keys: Sequence[str] = ("colour", "shape", "both")) -> dict:
    """The judge's ``scores`` (``shapes.score``: shares and ``n``) with each share of ``keys`` as ``rate`` shows it."""
    return {**{k: rate(scores[k], scores["n"]) for k in keys}, "n": scores["n"]}
