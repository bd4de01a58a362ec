import pytest
import torch

from jpsdxl import encoders


@pytest.fixture(scope="module")
def copies(pipelines, ja_tokenizers):
    base = pipelines[0]
    return (encoders.japanese_copy(base.text_encoder, ja_tokenizers[0], base.tokenizer),
            encoders.japanese_copy(base.text_encoder_2, ja_tokenizers[1], base.tokenizer_2))


def test_config_carries_japanese_ids(copies, ja_tokenizers):
    for model, tok in zip(copies, ja_tokenizers):
        assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id == 3
        assert model.config.bos_token_id == 2 and model.config.pad_token_id == tok.pad_token_id


def test_eos_id_2_is_refused(pipelines, ja_tokenizers):
    class Eos2:
        eos_token_id, bos_token_id, pad_token_id = 2, 1, 0

        def __len__(self):
            return 100

    with pytest.raises(ValueError, match="argmax"):
        encoders.japanese_config(pipelines[0].text_encoder.config, Eos2())


def test_weights_kept_except_embeddings(pipelines, copies):
    teacher, student = pipelines[0].text_encoder_2, copies[1]
    t, s = teacher.state_dict(), student.state_dict()
    assert t.keys() == s.keys()
    for k in t:
        if k.endswith("token_embedding.weight"):
            assert s[k].shape[0] == student.config.vocab_size != t[k].shape[0]
        else:
            assert torch.equal(t[k], s[k]), k


def test_special_rows_come_from_teacher(pipelines, copies, ja_tokenizers):
    base = pipelines[0]
    for teacher, student, tok, en_tok in ((base.text_encoder, copies[0], ja_tokenizers[0], base.tokenizer),
                                          (base.text_encoder_2, copies[1], ja_tokenizers[1], base.tokenizer_2)):
        old, new = teacher.get_input_embeddings().weight, student.get_input_embeddings().weight
        assert torch.equal(new[tok.eos_token_id], old[en_tok.eos_token_id])
        assert torch.equal(new[tok.bos_token_id], old[en_tok.bos_token_id])
        assert torch.equal(new[tok.pad_token_id], old[en_tok.pad_token_id])
        assert torch.allclose(new[10], old.mean(0))  # content rows: the mean teacher row by default


def test_rows_argument_picks_teacher_rows(pipelines, ja_tokenizers):
    teacher, tok = pipelines[0].text_encoder, ja_tokenizers[0]
    rows = torch.arange(len(tok)) + 1000
    student = encoders.japanese_copy(teacher, tok, pipelines[0].tokenizer, rows=rows)
    assert torch.equal(student.get_input_embeddings().weight[50], teacher.get_input_embeddings().weight[1050])


@torch.no_grad()
def test_pooled_output_is_read_at_japanese_eos(copies, ja_tokenizers):
    student, tok = copies[1], ja_tokenizers[1]
    with torch.no_grad():  # make rows distinct so that every position's output differs
        student.get_input_embeddings().weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    ids = tok(["赤い猫", "犬がソファの上で寝ている"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    out = student(ids, output_hidden_states=True)
    eos = [row.tolist().index(tok.eos_token_id) for row in ids]
    assert encoders.pooled_position(ids, student.config).tolist() == eos
    for i, pos in enumerate(eos):
        expected = student.text_projection(out.last_hidden_state[i, pos])
        assert torch.allclose(out.text_embeds[i], expected, atol=1e-6)
        wrong = student.text_projection(out.last_hidden_state[i, int(ids[i].argmax())])
        assert not torch.allclose(out.text_embeds[i], wrong)  # what eos_token_id=2 would have read
