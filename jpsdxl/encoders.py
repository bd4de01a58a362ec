"""Japanese copies of SDXL's text encoders: same weights, a new vocabulary, the right special ids.

A Japanese copy keeps every weight of the English teacher (attention, MLPs, positions, final norm, projection)
and replaces only the token-embedding matrix, whose rows now stand for Japanese pieces. Its config must carry the
Japanese tokenizer's ids, and one of them matters more than it looks:

    transformers' CLIPTextTransformer pools the sequence (pooler_output, and text_embeds after projection) at
    ``argmax(input_ids)`` when ``config.eos_token_id == 2`` (a legacy rule kept for old configs such as SDXL's own,
    where it happens to hit <|endoftext|> = 49407, the largest CLIP id), and otherwise at the first position
    whose id equals ``eos_token_id``.

So a copy that inherits ``eos_token_id=2`` pools at whichever Japanese piece has the largest id: wrong, silently.
``japanese_config`` refuses that; ``tokenization.sentencepiece_to_fast`` moves an EOS that has id 2 elsewhere.

How the new rows are initialised is stage 2's subject (embedding initialisation); here the default is the mean
teacher row, with BOS/EOS/pad taken from the teacher's own special rows.
"""

from __future__ import annotations

import torch


def japanese_config(teacher_config, tokenizer):
    """The teacher's config with the Japanese vocabulary size and special ids."""
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


@torch.no_grad()
def japanese_copy(teacher, tokenizer, teacher_tokenizer, rows: torch.Tensor | None = None):
    """A copy of ``teacher`` (CLIPTextModel or CLIPTextModelWithProjection) for ``tokenizer``'s vocabulary.

    ``rows``: optional LongTensor ``[len(tokenizer)]``, the teacher token whose embedding each Japanese row
    starts from (stage 2 computes it). Without it every row starts at the mean teacher row. Either way the
    special rows map to the teacher's: BOS -> BOS, EOS -> EOS, pad -> the teacher tokenizer's pad.
    """
    student = type(teacher)(japanese_config(teacher.config, tokenizer)).to(teacher.dtype)
    state = {k: v for k, v in teacher.state_dict().items() if not k.endswith("token_embedding.weight")}
    missing, unexpected = student.load_state_dict(state, strict=False)
    assert not unexpected and [k for k in missing] == [
        k for k in student.state_dict() if k.endswith("token_embedding.weight")], (missing, unexpected)

    old = teacher.get_input_embeddings().weight
    new = student.get_input_embeddings().weight
    if rows is None:
        new.copy_(old.mean(0, keepdim=True).expand_as(new))
    else:
        new.copy_(old[rows.to(old.device)])
    for ja_id, en_id in ((tokenizer.bos_token_id, teacher_tokenizer.bos_token_id),
                         (tokenizer.eos_token_id, teacher_tokenizer.eos_token_id),
                         (tokenizer.pad_token_id, teacher_tokenizer.pad_token_id)):
        if ja_id is not None and en_id is not None:
            new[ja_id] = old[en_id]
    return student.eval()


def pooled_position(input_ids: torch.Tensor, config) -> torch.Tensor:
    """Where transformers reads the pooled output for ``input_ids`` under ``config``: per row, a position."""
    if config.eos_token_id == 2:
        return input_ids.to(torch.int).argmax(dim=-1)
    return (input_ids == config.eos_token_id).int().argmax(dim=-1)
