"""SDXL's two CLIP tokenizers rebuilt offline from open_clip_torch's BPE vocabulary: ``tokenizer`` pads with
``<|endoftext|>``, ``tokenizer_2`` with ``"!"`` (id 0); both give 77 ids, BOS, text, EOS, padding, cut on the right
with EOS kept. A leaf: the zoo saves these, and the Japanese tokenizer copies their layout (``tokenization.py``).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from .runs import atomic_path, cache_dir

MAX_LENGTH = 77  # SDXL's text context, both encoders
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def clip_bpe_path() -> Path:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (found without importing open_clip, which pulls in torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip_torch is not installed: `pip install open_clip_torch` (it ships CLIP's BPE).")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


@lru_cache(maxsize=1)
def byte_encoder() -> dict[int, str]:
    """Byte -> printable character: the GPT-2 table that CLIP's BPE is written in (transformers ships it)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def token_bytes(token: str) -> bytes:
    """The UTF-8 bytes a CLIP BPE token stands for (its ``</w>`` word-end mark dropped): maybe not whole characters."""
    decoder = _byte_decoder()
    return bytes(decoder[c] for c in token.removesuffix("</w>") if c in decoder)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    return {v: k for k, v in byte_encoder().items()}


def write_clip_vocab(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` exactly as OpenAI's ``SimpleTokenizer`` builds its vocabulary:
    256 byte symbols, the same with ``</w>``, 48,894 merges, then SOT and EOT: 49,408 entries."""
    out_dir = Path(out_dir)
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    if vocab_file.exists() and merges_file.exists():
        return vocab_file, merges_file
    byte_symbols = list(byte_encoder().values())
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

    Why ``"!"``: open_clip pads with id 0, and id 0 of CLIP's vocabulary *is* the byte symbol ``!``. The
    diffusers-format SDXL repos reproduce the zero padding by declaring ``"!"`` the pad token, and so
    ``tokenizer_2`` also turns every ``!`` inside a prompt into id 0, where open_clip itself would give 256
    (``!</w>``): diffusers#4153. We keep that quirk on purpose: the English teacher's targets must be what
    diffusers' SDXL really computes.
    """
    from transformers import CLIPTokenizer

    vocab, merges = write_clip_vocab(cache_dir("clip_bpe"))
    tok = CLIPTokenizer(str(vocab), str(merges), model_max_length=MAX_LENGTH, pad_token=CLIP_EOS)
    tok_2 = CLIPTokenizer(str(vocab), str(merges), model_max_length=MAX_LENGTH, pad_token="!")
    return tok, tok_2
