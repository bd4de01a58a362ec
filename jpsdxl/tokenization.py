"""Stage 1: tokenizers. SDXL's two CLIP tokenizers, and a Japanese tokenizer that follows their conventions.

SDXL reads every prompt twice: ``tokenizer`` (for CLIP ViT-L, pads with ``<|endoftext|>``) and ``tokenizer_2``
(for OpenCLIP bigG, pads with ``"!"``, id 0). Both emit exactly 77 ids: ``<|startoftext|>``, the text,
``<|endoftext|>``, padding; a longer prompt is cut so that EOS stays last. We build both from the byte-level BPE
vocabulary that open_clip_torch ships, so no hub access is needed.

The Japanese tokenizer is a sentencepiece model (trained locally on ``tiny``; LINE's 51k-piece ``spiece.model``
on ``full``) rebuilt as a ``tokenizers`` Unigram inside a transformers fast tokenizer, with the same layout:
BOS, text, EOS, padding to 77, truncation that keeps EOS. Two variants mirror SDXL's pair: ``tokenizer``
pads with EOS, ``tokenizer_2`` with ``<pad>``. They load with ``from_pretrained`` and drop into
``StableDiffusionXLPipeline(tokenizer=..., tokenizer_2=...)`` unchanged.

Why rebuild instead of ``T5Tokenizer(vocab_file=...)``: in transformers 5 that route silently yields a
3-4 token vocabulary (and ``from_pretrained`` needs protobuf and re-segments differently).

This file does not touch model weights (``encoders.py``) or choose embeddings (stage 2).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

from .data import normalize_text
from .runs import atomic_path, cache_dir

MAX_LENGTH = 77  # SDXL's text context, both encoders
FAST_LAYOUT_VERSION = 2  # bump when sentencepiece_to_fast changes, so cached fast tokenizers are rebuilt
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# Names of the Japanese special pieces when we train the model ourselves: CLIP's own names, so that layouts
# read the same side by side. Ids: pad 0, unk 1, bos 2, eos 3 (never eos 2: see encoders.py).
JA_SPECIALS = dict(pad="<pad>", unk="<unk>", bos=CLIP_BOS, eos=CLIP_EOS)


# -----------------------------------------------------------------------------
# SDXL's CLIP tokenizers, from open_clip's bundled BPE


def clip_bpe_path() -> Path:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (found without importing open_clip, which pulls in torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip_torch is not installed: `pip install open_clip_torch` (it ships CLIP's BPE).")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_vocab(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` exactly as OpenAI's ``SimpleTokenizer`` builds its vocabulary:
    256 byte symbols, the same with ``</w>``, 48,894 merges, then SOT and EOT: 49,408 entries."""
    out_dir = Path(out_dir)
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    if vocab_file.exists() and merges_file.exists():
        return vocab_file, merges_file
    byte_symbols = list(_bytes_to_unicode().values())
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    with atomic_path(vocab_file) as tmp:
        tmp.write_text(json.dumps({v: i for i, v in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    with atomic_path(merges_file) as tmp:
        tmp.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_file, merges_file


def build_sdxl_clip_tokenizers():
    """(tokenizer, tokenizer_2) with SDXL's conventions: 77 ids; pad = ``<|endoftext|>`` / ``"!"`` (id 0).

    tokenizer_2 keeps SDXL's quirk on purpose (diffusers#4153): ``"!"`` is its pad token, so every ``!`` in a
    prompt also becomes id 0 (open_clip would give 256 for ``!</w>``). Fidelity to what SDXL really sees wins.
    """
    from transformers import CLIPTokenizer

    vocab, merges = write_clip_vocab(cache_dir("clip_bpe"))
    tok = CLIPTokenizer(str(vocab), str(merges), model_max_length=MAX_LENGTH, pad_token=CLIP_EOS)
    tok_2 = CLIPTokenizer(str(vocab), str(merges), model_max_length=MAX_LENGTH, pad_token="!")
    return tok, tok_2


# -----------------------------------------------------------------------------
# the Japanese tokenizer


def train_sentencepiece(sentences: Sequence[str], out_file: str | Path, vocab_size: int = 8000, seed: int = 0,
                        threads: int = 2, character_coverage: float = 0.9995) -> Path:
    """Train a sentencepiece unigram model on ``sentences`` (already NFKC-normalised), deterministically."""
    import sentencepiece as spm

    out_file = Path(out_file)
    with atomic_path(out_file.with_suffix("")) as tmp:
        tmp.mkdir()
        corpus = tmp / "corpus.txt"
        corpus.write_text("\n".join(s.replace("\n", " ") for s in sentences) + "\n", encoding="utf-8")
        spm.set_random_generator_seed(seed)
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(tmp / "spiece"), vocab_size=vocab_size, model_type="unigram",
            character_coverage=character_coverage, num_threads=threads, minloglevel=2,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=JA_SPECIALS["pad"], unk_piece=JA_SPECIALS["unk"],
            bos_piece=JA_SPECIALS["bos"], eos_piece=JA_SPECIALS["eos"],
            normalization_rule_name="nfkc",  # plain NFKC: the same rule our fast tokenizer applies
        )
        (tmp / "spiece.model").rename(out_file)
    return out_file


def sentencepiece_to_fast(model_file: str | Path, specials: dict[str, str] | None = None, pad_with: str = "pad",
                          max_length: int = MAX_LENGTH):
    """A transformers fast tokenizer equal to a sentencepiece model, laid out like SDXL's CLIP tokenizers.

    ``specials`` names the bos/eos/pad/unk pieces (default: the model's own). ``pad_with="eos"`` pads with EOS
    (like SDXL's ``tokenizer``), ``"pad"`` with the pad piece (like ``tokenizer_2``).

    If the model's EOS has id 2 (LINE's does), EOS trades ids with the pad piece: transformers' CLIP text model
    treats ``eos_token_id == 2`` as a legacy config and pools at ``argmax(input_ids)``, i.e. on some content token.
    """
    import sentencepiece as spm
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    own = dict(pad=sp.pad_id(), unk=sp.unk_id(), bos=sp.bos_id(), eos=sp.eos_id())
    specials = dict(specials) if specials else {role: sp.id_to_piece(i) for role, i in own.items() if i >= 0}
    ids = {role: sp.piece_to_id(piece) for role, piece in specials.items()}  # unknown pieces map to unk's id
    for role in ("bos", "eos"):
        if ids.get(role, sp.unk_id()) == sp.unk_id():
            raise ValueError(f"{model_file}: no {role} piece among {specials}; pass specials={{'{role}': '<piece>'}}")
    specials.setdefault("unk", sp.id_to_piece(sp.unk_id()))
    if ids.get("pad", sp.unk_id()) == sp.unk_id():  # no pad piece: pad with EOS, as SDXL's first tokenizer does
        specials["pad"], ids["pad"] = specials["eos"], ids["eos"]

    order = list(range(sp.get_piece_size()))  # fast id -> sentencepiece id
    if ids["eos"] == 2:
        other = ids["pad"] if ids["pad"] != ids["eos"] else next(
            (i for i in range(3, len(order)) if sp.is_control(i) or sp.is_unused(i)), None)
        if other is None:
            raise ValueError(f"{model_file}: EOS has id 2 and no other control piece to trade ids with")
        order[2], order[other] = order[other], order[2]
    # Control pieces never come out of sentencepiece's segmentation; give them a score no text would pick.
    floor = min(sp.get_score(i) for i in order) - 10.0
    vocab = [(sp.id_to_piece(i), floor if sp.is_control(i) else sp.get_score(i)) for i in order]
    byte_fallback = any(sp.is_byte(i) for i in order)
    unk_id = order.index(sp.unk_id())

    tk = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=byte_fallback))
    # NFKC first (tokenizers' Precompiled alone splits half-width ｶﾞ into カ + an unknown mark), then the model's
    # own table (NFKC for ours; nmt_nfkc for LINE's adds e.g. zero-width space -> space), then whitespace runs
    # -> one space, trimmed, as sentencepiece does.
    table = _normalization_table(model_file)
    tk.normalizer = normalizers.Sequence([normalizers.NFKC()] + ([normalizers.Precompiled(table)] if table else []) + [
        normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bos, eos = specials["bos"], specials["eos"]
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, order.index(ids["bos"])), (eos, order.index(ids["eos"]))])
    pad = specials["eos"] if pad_with == "eos" else specials["pad"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token=specials["unk"], pad_token=pad,
        model_max_length=max_length, padding_side="right", truncation_side="right")


def _normalization_table(model_file: str | Path) -> bytes:
    """The precompiled character map in a sentencepiece model (empty for the "identity" rule). Needs protobuf."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto.normalizer_spec.precompiled_charsmap


def _specials_from_folder(folder: Path) -> dict[str, str] | None:
    """Special pieces a hub tokenizer declares in its tokenizer_config.json / special_tokens_map.json."""
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).exists():
            cfg = json.loads((folder / name).read_text(encoding="utf-8"))
            for role in ("bos", "eos", "pad", "unk"):
                value = cfg.get(f"{role}_token")
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    out.setdefault(role, value)
    return out or None


def sentencepiece_model(profile, japanese_texts: Sequence[str] | None = None) -> tuple[Path, dict | None]:
    """The profile's sentencepiece model file (trained and cached, or from a hub/local tokenizer folder)."""
    cfg = profile.tokenizer
    if cfg.source != "sentencepiece":
        from .hub import resolve

        folder = resolve(cfg.source, "Japanese tokenizer", allow_patterns=["*.model", "*.json"])
        found = sorted(folder.glob("*.model"))
        if not found:
            raise FileNotFoundError(f"{cfg.source}: no sentencepiece *.model file in {folder}")
        return found[0], _specials_from_folder(folder)
    if japanese_texts is None:
        from .data import load_pairs

        japanese_texts = [ja for ja, _ in load_pairs(profile).train]
    texts = sorted(set(japanese_texts))
    random.Random(profile.seed).shuffle(texts)
    texts = texts[: cfg.train_sentences]
    key = hashlib.sha256(json.dumps([cfg.vocab_size, profile.seed, texts], ensure_ascii=False).encode()).hexdigest()[:12]
    model = cache_dir("tokenizers", f"spm-{cfg.vocab_size}-{key}") / "spiece.model"
    if not model.exists():
        print(f"Training a {cfg.vocab_size:,}-piece sentencepiece model on {len(texts):,} sentences (once; cached in "
              f"{model.parent})")
        train_sentencepiece(texts, model, cfg.vocab_size, profile.seed)
    return model, None


def japanese_tokenizers(profile, japanese_texts: Sequence[str] | None = None):
    """(tokenizer, tokenizer_2) for the profile's Japanese encoders, saved and reloaded via ``from_pretrained``.

    ``japanese_texts``: training sentences for a locally trained model (default: the profile's training split).
    """
    from transformers import AutoTokenizer

    model, specials = sentencepiece_model(profile, japanese_texts)
    key = hashlib.sha256(model.read_bytes() + f"{FAST_LAYOUT_VERSION}{specials}".encode()).hexdigest()[:12]
    folder = model.parent / f"fast-{key}"
    if not (folder / "tokenizer_2").exists():
        with atomic_path(folder) as tmp:
            for sub, pad_with in (("tokenizer", "eos"), ("tokenizer_2", "pad")):
                sentencepiece_to_fast(model, specials, pad_with, profile.tokenizer.max_length).save_pretrained(tmp / sub)
    return (AutoTokenizer.from_pretrained(folder / "tokenizer"), AutoTokenizer.from_pretrained(folder / "tokenizer_2"))


def sentencepiece_agreement(model_file: str | Path, tokenizer, texts: Sequence[str], show: int = 5) -> dict:
    """Share of ``texts`` on which the fast tokenizer yields sentencepiece's own ids, and examples where not.

    Our ids are mapped to sentencepiece's through the piece strings (they differ by design when EOS was moved
    off id 2). Ids, not surface strings, are compared: sentencepiece shows an unknown character as itself
    although its id is ``<unk>``.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    same, examples = 0, []
    for text in texts:
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
        ours = [sp.piece_to_id(p) for p in pieces]
        theirs = sp.encode(text)
        if ours == theirs:
            same += 1
        elif len(examples) < show:
            examples.append({"text": text, "fast": pieces, "sentencepiece": [sp.id_to_piece(i) for i in theirs]})
    return {"agreement": same / max(len(texts), 1), "n": len(texts), "differ": len(texts) - same, "examples": examples}


# -----------------------------------------------------------------------------
# prompts in, ids out


def overflow(tokenizer, prompts: Sequence[str], max_length: int = MAX_LENGTH) -> list[int]:
    """How many tokens each prompt loses to truncation at ``max_length`` (BOS and EOS included)."""
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True, verbose=False)["input_ids"]]
    return [max(0, n - max_length) for n in lengths]


def encode_prompts(tokenizer, prompts: str | Sequence[str], max_length: int = MAX_LENGTH, return_tensors="pt"):
    """Tokenize as SDXL does (pad to 77, truncate keeping EOS), warning about every prompt that loses tokens.

    Full-width letters, half-width katakana and whitespace runs are normalised (NFKC) by the tokenizer itself;
    an empty prompt is valid (SDXL's unconditional prompt): BOS, EOS, padding.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    for i, dropped in enumerate(overflow(tokenizer, prompts, max_length)):
        if dropped:
            kept = tokenizer.decode(tokenizer(prompts[i], truncation=True, max_length=max_length,
                                              add_special_tokens=True)["input_ids"], skip_special_tokens=True)
            warnings.warn(f"prompt {i} is {dropped} token(s) over the {max_length}-token limit; they were dropped. "
                          f"Kept: {kept[-30:]!r}... Shorten the prompt or split it.", stacklevel=2)
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors=return_tensors)


def unknown_characters(tokenizer, texts: Sequence[str]) -> Counter:
    """Which characters the tokenizer maps to ``<unk>`` (emoji, rare kanji ...), with counts."""
    found: Counter = Counter()
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        norm = tokenizer.backend_tokenizer.normalizer.normalize_str(text)
        for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if tid == tokenizer.unk_token_id:
                found[text[a:b] if b > a else norm] += 1
    return found


# -----------------------------------------------------------------------------
# measurements for notebook 01


def tokens_per_char(tokenizer, texts: Sequence[str]) -> float:
    """Content tokens (no BOS/EOS) per character, over all ``texts``."""
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return sum(map(len, ids)) / max(sum(len(normalize_text(t).replace(" ", "")) for t in texts), 1)


def overflow_rate(tokenizer, texts: Sequence[str], max_length: int = MAX_LENGTH) -> float:
    """Share of ``texts`` longer than ``max_length`` tokens with BOS and EOS."""
    return sum(d > 0 for d in overflow(tokenizer, texts, max_length)) / max(len(texts), 1)


def layout(tokenizer, prompt: str, max_length: int = MAX_LENGTH) -> list[dict]:
    """Position by position, what an encoder is fed: id, token, and its role (bos/text/eos/pad)."""
    ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    n_text = len(tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"])
    rows = []
    for pos, tid in enumerate(ids):
        role = "bos" if pos == 0 else "eos" if pos == n_text - 1 else "text" if pos < n_text else "pad"
        rows.append({"position": pos, "id": tid, "token": tokenizer.convert_ids_to_tokens(tid), "role": role})
    return rows


def clip_byte_pieces(tokenizer, text: str) -> list[dict]:
    """How CLIP's byte-level BPE cuts ``text``: each token's UTF-8 bytes, and whether they form whole characters."""
    byte_decoder = {v: k for k, v in _bytes_to_unicode().items()}
    rows = []
    for tid in tokenizer(text, add_special_tokens=False)["input_ids"]:
        token = tokenizer.convert_ids_to_tokens(tid)
        raw = bytes(byte_decoder[c] for c in token.removesuffix("</w>") if c in byte_decoder)
        try:
            shown, whole = raw.decode("utf-8"), True
        except UnicodeDecodeError:
            shown, whole = raw.decode("utf-8", errors="replace"), False
        rows.append({"id": tid, "token": token, "bytes": raw.hex(" "), "text": shown, "whole characters": whole})
    return rows


def _bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character, as GPT-2 and CLIP do (same table as open_clip.tokenizer.bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def sdxl_tokenizers(profile):
    """(tokenizer, tokenizer_2) exactly as the profile's SDXL base pipeline loads them."""
    from transformers import AutoTokenizer

    from .hub import resolve

    base = resolve(profile.models.base, "SDXL base")
    return AutoTokenizer.from_pretrained(base / "tokenizer"), AutoTokenizer.from_pretrained(base / "tokenizer_2")


def token_lengths(tokenizer, texts: Sequence[str]) -> list[int]:
    """Sequence length of each text with BOS and EOS, before truncation."""
    return [len(ids) for ids in tokenizer(list(texts), verbose=False)["input_ids"]]


def side_by_side(tokenizers: dict, prompt: str, positions: Sequence[int] | None = None) -> dict[str, list[str]]:
    """Columns of ``id:token`` per position for several tokenizers (default positions: 0-11 and 74-76)."""
    positions = list(positions) if positions is not None else [*range(12), 74, 75, 76]
    columns = {"position": [str(p) for p in positions]}
    for name, tok in tokenizers.items():
        rows = layout(tok, prompt)
        columns[name] = [f"{rows[p]['id']}:{rows[p]['token']} ({rows[p]['role']})" for p in positions]
    return columns


def normalization_table(tokenizer, prompts: Sequence[str]) -> list[dict]:
    """For each prompt: what the tokenizer's normaliser makes of it, its pieces, and how many became <unk>."""
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        rows.append({"prompt": repr(prompt), "normalised": tokenizer.backend_tokenizer.normalizer.normalize_str(prompt),
                     "pieces": " ".join(tokenizer.convert_ids_to_tokens(ids)),
                     "unknown": sum(i == tokenizer.unk_token_id for i in ids)})
    return rows
