import pytest
import torch

from jpsdxl import encoders
from jpsdxl.targets import pooled_position


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
def test_pooled_output_is_read_at_japanese_eos(pipelines, ja_tokenizers):
    tok = ja_tokenizers[1]
    # a copy of its own (the module fixture stays untouched), with distinct rows so every position's output differs
    rows = torch.randn(len(tok), pipelines[0].text_encoder_2.config.hidden_size, generator=torch.Generator().manual_seed(0))
    student = encoders.japanese_copy(pipelines[0].text_encoder_2, tok, pipelines[0].tokenizer_2, rows=rows * 0.02)
    ids = tok(["赤い猫", "犬がソファの上で寝ている"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    out = student(ids, output_hidden_states=True)
    eos = [row.tolist().index(tok.eos_token_id) for row in ids]
    assert pooled_position(ids, student.config).tolist() == eos
    for i, pos in enumerate(eos):
        expected = student.text_projection(out.last_hidden_state[i, pos])
        assert torch.allclose(out.text_embeds[i], expected, atol=1e-6)
        wrong = student.text_projection(out.last_hidden_state[i, int(ids[i].argmax())])
        assert not torch.allclose(out.text_embeds[i], wrong)  # what eos_token_id=2 would have read


def test_legacy_pooling_reads_clip_eos(pipelines):
    """SDXL's own configs (eos_token_id=2): the pooled position is the largest id, CLIP's EOS, not the smallest."""
    base = pipelines[0]
    for tok, te in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
        assert te.config.eos_token_id == 2
        ids = tok(["a red cat on the sofa"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
        eos = ids[0].tolist().index(49407)
        assert pooled_position(ids, te.config).tolist() == [eos]


def test_float_matrix_rows_and_dtype(pipelines, ja_tokenizers):
    teacher, tok = pipelines[0].text_encoder, ja_tokenizers[0]
    rows = torch.linspace(-1, 1, len(tok) * teacher.config.hidden_size).reshape(len(tok), -1)
    student = encoders.japanese_copy(teacher, tok, pipelines[0].tokenizer, rows=rows, dtype=torch.bfloat16)
    weight = student.get_input_embeddings().weight
    assert weight.dtype == torch.bfloat16 and {p.dtype for p in student.parameters()} == {torch.bfloat16}
    assert torch.equal(weight[50], rows[50].to(torch.bfloat16))
    with pytest.raises(ValueError, match="shape"):
        encoders.japanese_copy(teacher, tok, pipelines[0].tokenizer, rows=rows[:10])


def test_half_precision_teacher_gives_float32_student_sharing_nothing(pipelines, ja_tokenizers):
    import copy

    teacher = copy.deepcopy(pipelines[0].text_encoder_2).half()
    student = encoders.japanese_copy(teacher, ja_tokenizers[1], pipelines[0].tokenizer_2)
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert all(p.requires_grad for p in student.parameters())
    pointers = {t.data_ptr() for t in teacher.state_dict().values()}
    assert not pointers & {t.data_ptr() for t in [*student.parameters(), *student.buffers()]}
    assert torch.equal(student.text_model.embeddings.position_ids, teacher.text_model.embeddings.position_ids)
    assert encoders.japanese_copy(teacher, ja_tokenizers[1], pipelines[0].tokenizer_2, dtype=None).dtype == torch.float16


def test_no_random_initialisation_is_computed(pipelines, ja_tokenizers, monkeypatch):
    """The copy is built on the meta device: no weight is randomly initialised in real memory and thrown away."""
    from transformers.models.clip import modeling_clip

    real = modeling_clip.CLIPPreTrainedModel._init_weights
    devices = []

    def spy(self, module):
        devices.extend(p.device.type for p in module.parameters(recurse=False))
        return real(self, module)

    monkeypatch.setattr(modeling_clip.CLIPPreTrainedModel, "_init_weights", spy)
    type(pipelines[0].text_encoder)(pipelines[0].text_encoder.config)  # control: a plain build is seen initialising
    assert "cpu" in devices
    devices.clear()
    encoders.japanese_copy(pipelines[0].text_encoder_2, ja_tokenizers[1], pipelines[0].tokenizer_2)
    assert set(devices) <= {"meta"}
