"""Stage 1: a Japanese sentencepiece tokenizer rebuilt as a fast tokenizer laid out like SDXL's two CLIP tokenizers
(BOS, text, EOS, padded and cut to 77 with EOS kept; ``tokenizer`` pads with EOS, ``tokenizer_2`` with ``<pad>``: this
tutorial's layout, a departure, since the card describes none), and ``encode_prompts``, the one way prompts become
ids. It does not touch weights (``encoders.py``) or build SDXL's own tokenizers (``core/clip_tokenizer.py``).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import sys
import unicodedata
import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

from .core.clip_tokenizer import CLIP_BOS, CLIP_EOS, MAX_LENGTH
from .core.runs import atomic_path, cache_dir

FAST_LAYOUT_VERSION = 3  # bump when sentencepiece_to_fast changes, so cached fast tokenizers are rebuilt
# Names of the Japanese special pieces when we train the model ourselves: CLIP's own names, so that layouts
# read the same side by side. Ids: pad 0, unk 1, bos 2, eos 3 (never eos 2: see encoders.py).
JA_SPECIALS = dict(pad="<pad>", unk="<unk>", bos=CLIP_BOS, eos=CLIP_EOS)
# Pieces that stand for no text: control pieces (<pad>, <unk>, <s>, </s>, <|endoftext|>) and byte pieces (<0xE3>).
# Whether a tokenizer declares them special or not (tokenizer pads with EOS, so its <pad> is an ordinary entry).
CONTROL_PIECE = re.compile(r"<[^<>\s]+>")


# -----------------------------------------------------------------------------
# training a sentencepiece model


class VocabularyTooLarge(ValueError):
    """The data cannot support the requested vocabulary: the message says which size it can."""


MAX_SENTENCE_BYTES = 4192  # sentencepiece's own default, named: longer training sentences are skipped


def train_sentencepiece(sentences: Sequence[str], out_file: str | Path, vocab_size: int = 8000, seed: int = 0,
                        threads: int = 2, character_coverage: float = 0.9995, byte_fallback: bool = True) -> Path:
    """Train a sentencepiece unigram model on ``sentences`` (already NFKC-normalised), deterministically.

    Sentences go in through an iterator and the model comes back as bytes, so no path reaches sentencepiece
    (its ``input=`` splits on commas) and the model file records no temporary path: same data, same bytes.
    ``byte_fallback`` spells characters outside the vocabulary (emoji, rare kanji) as UTF-8 byte pieces
    instead of ``<unk>``, so that no prompt loses a character outright.
    """
    import sentencepiece as spm

    sentences = [s.replace("\n", " ") for s in sentences]
    too_long = sum(len(s.encode()) > MAX_SENTENCE_BYTES for s in sentences)  # sentencepiece skips these unsaid
    if too_long == len(sentences):
        raise ValueError(f"all {len(sentences):,} tokenizer training sentence(s) are longer than sentencepiece's "
                         f"{MAX_SENTENCE_BYTES:,}-byte limit (longest: {max(len(s.encode()) for s in sentences):,} "
                         f"bytes): split the Japanese text into sentences, one per line")
    if too_long:
        warnings.warn(f"{too_long:,} of {len(sentences):,} tokenizer training sentences are over "
                      f"{MAX_SENTENCE_BYTES:,} bytes; sentencepiece leaves them out", stacklevel=2)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="unigram",
            character_coverage=character_coverage, num_threads=threads, minloglevel=2, byte_fallback=byte_fallback,
            max_sentence_length=MAX_SENTENCE_BYTES,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=JA_SPECIALS["pad"], unk_piece=JA_SPECIALS["unk"],
            bos_piece=JA_SPECIALS["bos"], eos_piece=JA_SPECIALS["eos"],
            normalization_rule_name="nfkc",  # plain NFKC: the same rule our fast tokenizer applies
        )
    except RuntimeError as e:
        raise _vocabulary_error(e, len(sentences), vocab_size, character_coverage) from None
    out_file = Path(out_file)
    with atomic_path(out_file) as tmp:
        tmp.write_bytes(model.getvalue())
    return out_file


def _vocabulary_error(e: RuntimeError, n: int, vocab_size: int, coverage: float) -> Exception:
    """Turn sentencepiece's two vocabulary-size failures into messages that say what to set."""
    text = str(e)
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", text):
        return VocabularyTooLarge(
            f"{n:,} training sentences support at most {int(m[2]):,} sentencepiece pieces, not vocab_size = "
            f"{vocab_size:,}. Set `vocab_size = {int(m[2])}` (or less) in your profile's [tokenizer] section, "
            f"or give it more Japanese text.")
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", text):
        return VocabularyTooLarge(
            f"vocab_size = {vocab_size:,} is smaller than the {int(m[2]):,} distinct characters that "
            f"character_coverage = {coverage} keeps. In your profile's [tokenizer] section raise vocab_size above "
            f"{int(m[2]):,}, or lower character_coverage (0.98 keeps far fewer rare characters).")
    return e


# -----------------------------------------------------------------------------
# sentencepiece model -> transformers fast tokenizer


def sentencepiece_to_fast(model_file: str | Path, specials: dict[str, str] | None = None, pad_with: str = "pad",
                          max_length: int = MAX_LENGTH):
    """A transformers fast tokenizer equal to a sentencepiece model, laid out like SDXL's CLIP tokenizers: a
    ``tokenizers`` Unigram (``T5Tokenizer(vocab_file=...)`` in transformers 5 silently yields a 3-4 token vocabulary).

    ``specials`` names the bos/eos/pad/unk pieces (default: the model's own). ``pad_with="eos"`` pads with EOS
    (like SDXL's ``tokenizer``), ``"pad"`` with the pad piece (like ``tokenizer_2``).

    If the model's EOS has id 2 (LINE's does), EOS trades ids with the pad piece, or with another control
    piece when there is no pad: transformers' CLIP text model treats ``eos_token_id == 2`` as a legacy config
    and pools at ``argmax(input_ids)``, i.e. on some content token.
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
    # -> one space, trimmed, as sentencepiece does. "Whitespace" here is every Unicode space (tab, newline,
    # U+2028 ...), as in the data loader; a sentencepiece model trained with plain NFKC keeps those characters
    # (as <unk> or bytes): the one documented difference, pinned down by a test.
    charsmap = _precompiled_charsmap(model_file)
    tk.normalizer = normalizers.Sequence([normalizers.NFKC()] + ([normalizers.Precompiled(charsmap)] if charsmap else [])
                                         + [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always",
                                                                               split=True)])
    bos, eos = specials["bos"], specials["eos"]
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, order.index(ids["bos"])), (eos, order.index(ids["eos"]))])
    pad = specials["eos"] if pad_with == "eos" else specials["pad"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token=specials["unk"], pad_token=pad,
        model_max_length=max_length, padding_side="right", truncation_side="right")


def _model_proto(model_file: str | Path):
    """A sentencepiece model as its protobuf message. Needs protobuf."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def _precompiled_charsmap(model_file: str | Path) -> bytes:
    """The normaliser's precompiled character map inside a sentencepiece model (empty for "identity")."""
    return _model_proto(model_file).normalizer_spec.precompiled_charsmap


def _content_key(model_file: str | Path) -> str:
    """A hash of what a model *is* (pieces, scores, normaliser), not of how it was trained or where."""
    proto = _model_proto(model_file)
    proto.ClearField("trainer_spec")  # input paths, thread counts ...: not content
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


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


# -----------------------------------------------------------------------------
# the profile's Japanese tokenizers


def _readable(model_file: Path) -> bool:
    """Does the file load as a sentencepiece model, with its normalisation table (what the fast tokenizer reads)?"""
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=str(model_file))
        _model_proto(model_file)
    except Exception:  # noqa: BLE001 - sentencepiece says RuntimeError or OSError, protobuf DecodeError
        return False
    return True


def sentencepiece_model(profile, japanese_texts: Sequence[str] | None = None) -> tuple[Path, dict | None]:
    """The profile's sentencepiece model file: trained on ``japanese_texts`` (and cached by their content), or from a
    hub/local tokenizer folder (``tokenizer.source``; the texts are then not needed)."""
    cfg = profile.tokenizer
    if cfg.source != "sentencepiece":
        from .core.models import resolve

        folder = resolve(cfg.source, "Japanese tokenizer", kind="tokenizer")
        found = sorted(folder.glob("*.model"))
        if not found:
            raise FileNotFoundError(f"{cfg.source}: no sentencepiece *.model file in {folder}")
        return found[0], _specials_from_folder(folder)
    if japanese_texts is None:
        raise ValueError("a locally trained sentencepiece needs its training sentences: pass the Japanese side of "
                         "the training split (data.japanese_side(splits.train, profile.tokenizer.train_sentences))")
    texts = sorted(set(japanese_texts))
    random.Random(profile.seed).shuffle(texts)
    texts = texts[: cfg.train_sentences]
    settings = [cfg.vocab_size, cfg.character_coverage, cfg.byte_fallback, profile.seed]
    key = hashlib.sha256(json.dumps([settings, texts], ensure_ascii=False).encode()).hexdigest()[:12]
    model = cache_dir("tokenizers", f"spm-{cfg.vocab_size}-{key}") / "spiece.model"
    if model.exists() and not _readable(model):  # a cache file cut short or damaged: rebuilt, never trusted
        print(f"{model} is damaged (not a readable sentencepiece model): training it again", file=sys.stderr)
        model.unlink()
    if not model.exists():
        print(f"Training a {cfg.vocab_size:,}-piece sentencepiece model on {len(texts):,} sentences (once; cached in "
              f"{model.parent})")
        train_sentencepiece(texts, model, cfg.vocab_size, profile.seed, character_coverage=cfg.character_coverage,
                            byte_fallback=cfg.byte_fallback)
    return model, None


def japanese_tokenizers(profile, japanese_texts: Sequence[str] | None = None):
    """(tokenizer, tokenizer_2) for the profile's Japanese encoders, saved and reloaded via ``from_pretrained``.

    ``japanese_texts``: training sentences for a locally trained model (the Japanese side of the training split).
    The cached folder's name depends only on content (model, layout version, specials, length), so two runs at
    once build the same folder.
    """
    model, specials = sentencepiece_model(profile, japanese_texts)
    layout = f"{FAST_LAYOUT_VERSION}{sorted((specials or {}).items())}{MAX_LENGTH}"
    key = hashlib.sha256((_content_key(model) + layout).encode()).hexdigest()[:12]
    folder = model.parent / f"fast-{key}"
    if not (folder / "tokenizer_2").exists():
        with atomic_path(folder) as tmp:
            for sub, pad_with in (("tokenizer", "eos"), ("tokenizer_2", "pad")):
                sentencepiece_to_fast(model, specials, pad_with, MAX_LENGTH).save_pretrained(tmp / sub)
    return tokenizer_pair(folder)


def tokenizer_pair(folder: str | Path):
    """(tokenizer, tokenizer_2) from a folder in the diffusers layout (a pipeline, stage 1's or stage 3's outputs)."""
    from transformers import AutoTokenizer

    return tuple(AutoTokenizer.from_pretrained(Path(folder) / name) for name in ("tokenizer", "tokenizer_2"))


def sdxl_tokenizers(profile):
    """(tokenizer, tokenizer_2) exactly as the profile's SDXL base pipeline loads them."""
    from .core.models import resolve

    return tokenizer_pair(resolve(profile.models.base, "SDXL base", variant=profile.models.variant))


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


MAX_PROMPT_CHARS = 1000  # far more than 77 tokens hold in any language


def check_prompts(prompts) -> list[str]:
    """``prompts`` as a list of strings, or a ValueError that says what was wrong and what is expected."""
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, (list, tuple)):
        prompts = list(prompts)
    else:
        raise ValueError(f"prompts must be a string or a list of strings, not {type(prompts).__name__}"
                         + (" (pass list(d.values()) for a dict's texts)" if isinstance(prompts, dict) else ""))
    if not prompts:
        raise ValueError("no prompts: pass at least one string (\"\" is SDXL's unconditional prompt)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} is {type(p).__name__} {p!r}, not a string")
        if len(p) > MAX_PROMPT_CHARS:  # whatever is past the 77th token is cut anyway: refuse, do not tokenize a book
            raise ValueError(f"prompt {i} has {len(p):,} characters; the encoders read its first {MAX_LENGTH} tokens "
                             f"(a few hundred characters at most): shorten it to at most {MAX_PROMPT_CHARS:,}")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"prompt {i} holds a lone surrogate {p[e.start:e.end]!r} at character {e.start}: not valid "
                             f"text. Re-read it as UTF-8 (errors='replace') or remove that character.") from None
    return prompts


def overflow(tokenizer, prompts: Sequence[str], max_length: int = MAX_LENGTH) -> list[int]:
    """How many tokens each prompt loses to truncation at ``max_length`` (BOS and EOS included)."""
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True, verbose=False)["input_ids"]]
    return [max(0, n - max_length) for n in lengths]


def encode_prompts(tokenizer, prompts: str | Sequence[str], max_length: int = MAX_LENGTH, return_tensors="pt"):
    """Tokenize as SDXL does (pad to 77, truncate keeping EOS), warning about what any prompt loses.

    Full-width letters, half-width katakana and whitespace runs are normalised (NFKC) by the tokenizer itself;
    an empty prompt is valid (SDXL's unconditional prompt): BOS, EOS, padding. Two warnings: tokens past
    ``max_length`` (they are cut), and characters outside the vocabulary (``<unk>``, or raw bytes with byte
    fallback), each named.
    """
    prompts = check_prompts(prompts)
    for i, dropped in enumerate(overflow(tokenizer, prompts, max_length)):
        if dropped:
            kept = tokenizer.decode(tokenizer(prompts[i], truncation=True, max_length=max_length,
                                              add_special_tokens=True)["input_ids"], skip_special_tokens=True)
            warnings.warn(f"prompt {i} is {dropped} token(s) over the {max_length}-token limit; they were dropped. "
                          f"Kept: ...{kept[-30:]!r} (the end of what was kept). Shorten the prompt or split it.",
                          stacklevel=2)
    for i, prompt in enumerate(prompts):
        if unknown := unknown_characters(tokenizer, [prompt]):
            how = "spelled as raw UTF-8 bytes" if _byte_fallback(tokenizer) else "read as <unk>"
            warnings.warn(f"prompt {i}: {describe_characters(unknown)} not in the vocabulary, {how}. "
                          f"Rephrase with common characters if the meaning matters.", stacklevel=2)
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors=return_tensors)


def _byte_fallback(tokenizer) -> bool:
    return bool(json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("byte_fallback"))


def _vocabulary_characters(tokenizer) -> frozenset[str]:
    cached = getattr(tokenizer, "_jpsdxl_chars", None)
    if cached is None:
        cached = frozenset("".join(p for p in tokenizer.get_vocab() if not CONTROL_PIECE.fullmatch(p)))
        tokenizer._jpsdxl_chars = cached
    return cached


def unknown_characters(tokenizer, texts: Sequence[str]) -> Counter:
    """Characters of the *normalised* texts that no piece of the vocabulary contains, with counts.

    A sentencepiece unigram model keeps every character it covers as a piece of its own, so it falls back (to
    ``<unk>``, or to bytes) exactly on the characters that occur in no text piece. This names the character as the
    tokenizer sees it: ``"cafe\\u0301"`` normalises to ``"café"`` and the unknown character is ``é``, not ``e``.
    """
    known, found = _vocabulary_characters(tokenizer), Counter()
    normalizer = tokenizer.backend_tokenizer.normalizer
    for text in texts:
        for c in normalizer.normalize_str(text) if normalizer else text:
            if c != " " and c not in known:
                found[c] += 1
    return found


def describe_characters(chars) -> str:
    """``'😀' (U+1F600 GRINNING FACE), ...``: readable even for invisible characters."""
    return ", ".join(f"{c!r} (U+{ord(c):04X} {unicodedata.name(c, 'unnamed')})" for c in chars)


# -----------------------------------------------------------------------------
# stage 1 as one call


def save_tokenizers(profile, tokenizers, folder: str | Path | None = None) -> Path:
    """Stage 1's outputs: ``tokenizer`` and ``tokenizer_2`` in ``folder`` (default ``runs/<profile>/01_tokenizer_
    alignment``), each written atomically, and the stage's record of what made them. What stages 2-4 read."""
    import dataclasses

    from .core.runs import record, settings_hash, stage_dir

    folder = Path(folder) if folder else stage_dir(profile, "tokenizer")
    for name, tokenizer in zip(("tokenizer", "tokenizer_2"), tokenizers):
        with atomic_path(folder / name) as tmp:
            tokenizer.save_pretrained(tmp)
    record(folder, "tokenizer", {"settings": settings_hash(profile, "tokenizer"), "data": profile.data.pairs,
                                 **dataclasses.asdict(profile.tokenizer)})
    return folder


def stage_tokenizers(profile):
    """(tokenizer, tokenizer_2) as stage 1 saved them for ``profile``: missing, an error that says what to run."""
    from .core.runs import require

    return tokenizer_pair(require(profile, "tokenizer"))


def run(profile) -> Path:
    """Stage 1 (``jpsdxl tokenizer``): train (or fetch) the profile's Japanese tokenizer on the Japanese side of the
    training split and save both, SDXL's conventions applied (``save_tokenizers``)."""
    from .data import japanese_side, load_pairs

    splits = load_pairs(profile)
    return save_tokenizers(profile, japanese_tokenizers(profile, japanese_side(splits.train,
                                                                               profile.tokenizer.train_sentences)))
