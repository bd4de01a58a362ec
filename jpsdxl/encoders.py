"""Japanese copies of SDXL's text encoders: every weight of the English teacher, a new token-embedding matrix for the
Japanese pieces, and the Japanese tokenizer's special ids (``japanese_config``: an inherited ``eos_token_id = 2``
would make transformers pool at the largest id, silently wrong). Built on the meta device from the teacher's tensors;
float32 by default (students are trained). How the new rows start is stage 2's (``embedding_init.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class EnglishEncoders(NamedTuple):
    text_encoder: torch.nn.Module  # CLIP ViT-L text tower
    text_encoder_2: torch.nn.Module  # OpenCLIP ViT-bigG text tower, with its projection
    tokenizer: object
    tokenizer_2: object


def load_english(profile) -> EnglishEncoders:
    """The profile's English text encoders and tokenizers, read from the base pipeline's folder in the profile's
    dtype, on its device: only what stages 2 and 3 read (on ``full`` about 1.6 GB in fp16, where the whole base and
    refiner pair is about 11 GB)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .core.models import resolve_profile

    profile.check_device()
    folder = resolve_profile(profile, ("SDXL base",))["SDXL base"]
    variant = {"variant": profile.models.variant} if profile.models.variant else {}
    kw = dict(dtype=profile.torch_dtype(), **variant)
    te1 = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw).to(profile.torch_device())
    te2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **kw)
    te2 = te2.to(profile.torch_device())
    return EnglishEncoders(te1, te2, CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                           CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))


def japanese_config(teacher_config, tokenizer):
    """The teacher's config with the Japanese vocabulary size and special ids. transformers' CLIP text model pools at
    ``argmax(input_ids)`` when ``eos_token_id == 2`` (a legacy rule kept for SDXL's own configs, where it hits
    <|endoftext|> = 49407, the largest CLIP id), else at the first EOS: a Japanese copy must not inherit 2."""
    eos = tokenizer.eos_token_id
    if eos is None or eos == 2:
        raise ValueError(
            f"The Japanese tokenizer's EOS id is {eos}. transformers pools CLIP text at argmax(input_ids) when "
            f"eos_token_id == 2, which would read a content token. Rebuild the tokenizer with "
            f"jpsdxl.tokenization.sentencepiece_to_fast (it moves EOS off id 2).")
    cfg = teacher_config.to_dict()
    cfg.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
               pad_token_id=tokenizer.pad_token_id)
    return type(teacher_config).from_dict(cfg)


def starting_embedding(teacher, vocab_size: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The ``[vocab_size, hidden]`` matrix a copy's embedding starts from (float32, on the teacher's device).

    ``rows`` is either an index (LongTensor ``[vocab_size]``: row i = teacher row ``rows[i]``), or a ready float
    matrix ``[vocab_size, hidden]`` (e.g. a similarity-weighted mean of several teacher rows), or None: every row
    the mean teacher row.
    """
    old = teacher.get_input_embeddings().weight.detach()
    if rows is None:
        return old.float().mean(0, keepdim=True).expand(vocab_size, -1).clone()
    rows = torch.as_tensor(rows, device=old.device)
    if rows.dtype in (torch.int32, torch.int64):
        if rows.shape != (vocab_size,):
            raise ValueError(f"rows: an index needs shape ({vocab_size},), got {tuple(rows.shape)}")
        if rows.numel() and (rows.min() < 0 or rows.max() >= old.shape[0]):
            raise ValueError(f"rows: indices must lie in [0, {old.shape[0]}) (the teacher's vocabulary)")
        return old[rows].float()
    if rows.shape != (vocab_size, old.shape[1]):
        raise ValueError(f"rows: a matrix needs shape ({vocab_size}, {old.shape[1]}), got {tuple(rows.shape)}")
    return rows.detach().float().clone()


@torch.no_grad()
def japanese_copy(teacher, tokenizer, teacher_tokenizer, rows: torch.Tensor | None = None,
                  dtype: torch.dtype | None = torch.float32):
    """A copy of ``teacher`` (CLIPTextModel or CLIPTextModelWithProjection) for ``tokenizer``'s vocabulary.

    ``rows``: see ``starting_embedding`` (an index into the teacher's rows, a float matrix, or None for the mean row).
    Either way the special rows map to the teacher's: BOS -> BOS, EOS -> EOS, pad -> the teacher tokenizer's pad.
    ``dtype``: of the copy (default float32, for training; ``None`` keeps the teacher's). The copy shares no
    storage with the teacher.
    """
    dtype = dtype or teacher.dtype
    config = japanese_config(teacher.config, tokenizer)
    with torch.device("meta"):  # shapes only: nothing is allocated or randomly initialised
        student = type(teacher)(config)
    device = teacher.device
    state = {k: v.detach().to(device=device, dtype=dtype, copy=True) for k, v in teacher.state_dict().items()
             if not k.endswith("token_embedding.weight")}
    missing, unexpected = student.load_state_dict(state, strict=False, assign=True)
    embedding_keys = [k for k in student.state_dict() if k.endswith("token_embedding.weight")]
    if unexpected or missing != embedding_keys:
        raise RuntimeError(f"teacher and copy differ beyond the embedding: missing {missing}, unexpected {unexpected}")
    # buffers left out of state_dict (position_ids) are still on the meta device: take them from the teacher
    teacher_buffers = dict(teacher.named_buffers())
    for name, buffer in student.named_buffers():
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            module = student.get_submodule(module_name)
            module._buffers[buffer_name] = teacher_buffers[name].detach().clone()

    old = teacher.get_input_embeddings().weight
    new = starting_embedding(teacher, len(tokenizer), rows)
    for ja_id, en_id in ((tokenizer.bos_token_id, teacher_tokenizer.bos_token_id),
                         (tokenizer.eos_token_id, teacher_tokenizer.eos_token_id),
                         (tokenizer.pad_token_id, teacher_tokenizer.pad_token_id)):
        if ja_id is not None and en_id is not None:
            new[ja_id] = old[en_id].float()
    student.get_input_embeddings().weight = torch.nn.Parameter(new.to(dtype))
    leftover = [n for n, t in [*student.named_parameters(), *student.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"copy has tensors without values: {leftover}")
    return student.eval()

