"""Stage 2: vocabularies as text, embedders (the sentence-transformers path on a local stand-in), the chunked
search against brute force, the embedding cache, and the rows the Japanese copies start from."""

import numpy as np
import pytest
import torch

from jpsdxl import embedding_init as E
from jpsdxl import encoders


@pytest.fixture(scope="module")
def clip():
    from jpsdxl.core.clip_tokenizer import build_sdxl_clip_tokenizers

    return build_sdxl_clip_tokenizers()[0]


def test_japanese_vocab_strips_markers_and_leaves_specials_out(ja_tokenizers):
    tok = ja_tokenizers[0]
    vocab = E.japanese_vocab(tok)
    assert not {tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, ja_tokenizers[1].pad_token_id} & set(vocab.ids)
    assert all("▁" not in t and t == t.strip() and t for t in vocab.texts)
    assert not any(p.startswith("<0x") for p in vocab.pieces)
    pieces = dict(zip(vocab.pieces, vocab.texts))
    marked = next(p for p in pieces if p.startswith("▁") and len(p) > 1)
    assert pieces[marked] == marked[1:]


def test_clip_vocab_decodes_bytes_and_word_ends(clip):
    vocab = E.clip_vocab(clip)
    by_piece = dict(zip(vocab.pieces, vocab.texts))
    assert by_piece["cat</w>"] == "cat" and by_piece["cat"] == "cat"
    assert by_piece[clip.convert_ids_to_tokens(clip("é", add_special_tokens=False)["input_ids"][0])] == "é"
    assert 49406 not in vocab.ids and 49407 not in vocab.ids  # BOS / EOS keep their fixed mapping
    # a fragment of a UTF-8 character (one byte of 猫) is no text: left out
    fragment = clip.convert_ids_to_tokens(clip("猫", add_special_tokens=False)["input_ids"][0])
    assert E.clip_token_text(fragment) is None and fragment not in by_piece
    latin = E.clip_vocab(clip, "latin_words")
    assert all(p.endswith("</w>") and t.isascii() and t.isalpha() for p, t in zip(latin.pieces, latin.texts))
    assert 30_000 < len(latin) < len(vocab) < 49_408


def test_topk_matches_brute_force():
    g = np.random.default_rng(0)
    q = g.normal(size=(257, 16)).astype(np.float32)
    k = g.normal(size=(1000, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    scores, idx = E.topk_cosine(q, k, k=5, chunk=64)  # 5 chunks, the last one partial
    full = q @ k.T
    expected = np.argsort(-full, axis=1)[:, :5]
    assert np.array_equal(idx.numpy(), expected)
    assert np.allclose(scores.numpy(), np.take_along_axis(full, expected, axis=1), atol=1e-6)


class Counting(E.Embedder):
    name, batch_size = "counting", 3

    def __init__(self):
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        return np.array([[len(t), 1.0] for t in texts], np.float32) / np.sqrt(1 + np.array([[len(t)] for t in texts]) ** 2)


def test_embedding_cache_hits_and_invalidates(tmp_path, monkeypatch):
    monkeypatch.setenv("JPSDXL_CACHE", str(tmp_path))
    m = Counting()
    a = E.embed(m, ["猫", "犬", "鳥", "魚"], progress=False)
    assert m.calls == 2 and a.shape == (4, 2)  # batches of 3
    b = E.embed(m, ["猫", "犬", "鳥", "魚"], progress=False)
    assert m.calls == 2 and np.array_equal(a, b)  # served from the cache
    E.embed(m, ["猫", "犬", "鳥", "象"], progress=False)
    assert m.calls == 4  # another text list: computed again
    m.name = "counting-v2"
    E.embed(m, ["猫", "犬", "鳥", "魚"], progress=False)
    assert m.calls == 6  # another embedder: computed again


def _mapping(teacher_vocab=50, k=3):
    ja = E.Vocab(ids=[4, 5, 6], texts=["猫", "。", "犬"], pieces=["▁猫", "。", "犬"])
    en = E.Vocab(ids=[10, 11, 12, 13], texts=["cat", ".", "dog", "the"], pieces=["cat</w>", ".</w>", "dog</w>", "the</w>"])
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.2, 0.1], [0.8, 0.7, 0.2]])
    en_ids = torch.tensor([[10, 13, 12], [13, 11, 10], [12, 10, 13]])
    return E.Mapping(ja, en, scores, en_ids)


def test_initial_rows_copy_the_right_teacher_rows():
    teacher = torch.randn(50, 8)
    m = _mapping()
    sim = E.initial_rows("similarity", m, teacher, vocab_size=7)
    assert torch.equal(sim[4], teacher[10]) and torch.equal(sim[5], teacher[13]) and torch.equal(sim[6], teacher[12])
    assert torch.allclose(sim[0], teacher.mean(0))  # pieces outside the mapping: the mean row
    thr = E.initial_rows("threshold", m, teacher, vocab_size=7, threshold=0.5)
    assert torch.equal(thr[4], teacher[10]) and torch.allclose(thr[5], teacher.mean(0))
    punct = E.initial_rows("punctuation", m, teacher, vocab_size=7)
    assert torch.equal(punct[5], teacher[11])  # 。 -> CLIP's own "."
    top = E.initial_rows("topk", m, teacher, vocab_size=7, top_k=2, temperature=0.1)
    w = torch.softmax(torch.tensor([0.9, 0.5]) / 0.1, 0)
    assert torch.allclose(top[4], w[0] * teacher[10] + w[1] * teacher[13], atol=1e-6)
    assert E.initial_rows("mean", m, teacher, vocab_size=7) is None
    rnd = E.initial_rows("random", m, teacher, vocab_size=7, seed=3)
    assert rnd.shape == (7, 8) and torch.equal(rnd, E.initial_rows("random", m, teacher, vocab_size=7, seed=3))
    with pytest.raises(ValueError, match="strategy"):
        E.initial_rows("nearest", m, teacher, vocab_size=7)


def test_rows_reach_the_japanese_copy(pipelines, ja_tokenizers):
    """The similarity rows go into encoders.japanese_copy as an index; special rows keep the teacher's."""
    base, tok = pipelines[0], ja_tokenizers[0]
    ja = E.japanese_vocab(tok)
    en_ids = torch.tensor([[1000 + (i % 500)] for i in range(len(ja))])
    m = E.Mapping(ja, E.Vocab([], [], []), torch.ones(len(ja), 1), en_ids)
    rows = E.initial_rows("similarity", m, base.text_encoder.get_input_embeddings().weight, len(tok))
    student = encoders.japanese_copy(base.text_encoder, tok, base.tokenizer, rows=rows)
    weight, old = student.get_input_embeddings().weight, base.text_encoder.get_input_embeddings().weight
    assert torch.equal(weight[ja.ids[7]], old[1007]) and torch.equal(weight[tok.eos_token_id], old[49407])


def test_lexicon_accuracy_counts_only_dictionary_headwords():
    m = _mapping()
    result = E.lexicon_accuracy(m, [("猫", "cat"), ("犬", "puppy"), ("犬", "dog"), ("鳥", "bird")])
    # 猫 -> cat right at rank 1; 犬's first gloss "puppy" is no candidate, so its next entry "dog" counts
    assert result["pieces"] == 2 and result["top1"] == 1.0 and result["per_script"]["kanji"]["pieces"] == 2


def test_sentence_transformers_path_on_a_local_tiny_model(tmp_path):
    """The path `full` takes (sentence-transformers, e5's "query: " prefix), on a tiny model built from a config."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    chars = sorted(set("query: 猫犬鳥catdog "))
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]) + "\n")
    bert = tmp_path / "bert"
    BertTokenizerFast(str(tmp_path / "vocab.txt"), do_lower_case=False, tokenize_chinese_chars=True).save_pretrained(bert)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(chars), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    word = models.Transformer(str(bert))
    st = SentenceTransformer(modules=[word, models.Pooling(32, "mean"), models.Normalize()])
    st.save(str(tmp_path / "st"))

    embedder = E.make_embedder(f"st:{tmp_path / 'st'}")
    out = E.embed(embedder, ["猫", "cat", "犬"], cache=False, progress=False)
    assert out.shape == (3, 32) and out.dtype == np.float32 and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    direct = st.encode(["query: 猫"], normalize_embeddings=True)
    assert np.allclose(out[0], direct[0], atol=1e-5)  # the prefix is e5's, as the card uses
    assert not np.allclose(out[0], st.encode(["猫"], normalize_embeddings=True)[0], atol=1e-3)


def test_held_out_metrics_separate_matched_from_shuffled():
    from jpsdxl.distillation import Outputs, held_out_metrics

    g = torch.Generator().manual_seed(0)
    common = torch.randn(1, 16, generator=g) * 5  # the component every sentence shares (anisotropy)
    teacher = Outputs(torch.randn(200, 77, 8, generator=g), torch.randn(200, 77, 12, generator=g),
                      common + torch.randn(200, 16, generator=g))
    same = held_out_metrics(teacher, teacher, teacher.pooled.mean(0))
    assert same["loss"] == 0 and same["centred_cos_matched"] > 0.99 and same["pool100_top1"] == 1.0
    assert abs(same["centred_cos_mismatched"]) < 0.05 and same["pool_chance"] == 0.01
    shuffled = held_out_metrics(teacher[torch.randperm(200, generator=g)], teacher, teacher.pooled.mean(0))
    assert shuffled["pool100_top1"] < 0.1 and shuffled["loss"] > 1


def test_mapping_saves_and_reloads(tmp_path):
    m = _mapping()
    E.save_mapping(m, tmp_path)
    again, settings = E.load_mapping(tmp_path / "mapping.pt")
    assert settings == {} and torch.equal(again.en_ids, m.en_ids)
    lines = (tmp_path / "mapping.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "ja_piece\ten_token\tscore" and lines[1] == "▁猫\tcat\t0.9000" and len(lines) == 4


def test_a_mapping_made_for_another_tokenizer_is_refused(ja_tokenizers, small_spm, tmp_path, splits):
    """jpsdxl init at one vocabulary, then the tokenizer retrained at another: the students must not start from
    other pieces' neighbours (1,718 of 1,739 rows were wrong in a probe), nor crash with an IndexError."""
    from jpsdxl.distillation import Teachers, make_students
    from jpsdxl.generation import load_pipelines
    from jpsdxl.core.profiles import load_profile
    from jpsdxl.tokenization import sentencepiece_to_fast, train_sentencepiece

    tok = ja_tokenizers[0]
    ja, rng = E.japanese_vocab(tok), torch.Generator().manual_seed(0)
    mapping = E.Mapping(ja, ja, torch.rand(len(ja), 5, generator=rng), torch.randint(49408, (len(ja), 5), generator=rng))
    E.check_mapping(mapping, tok)  # its own tokenizer: fine
    for size in (1800, 2500):  # fewer pieces (ids beyond it) and more (ids shifted)
        other = sentencepiece_to_fast(train_sentencepiece([j for j, _ in splits.train[:5000]], tmp_path / f"{size}.model",
                                                          vocab_size=size, character_coverage=0.98))
        with pytest.raises(E.MappingMismatch, match=r"pieces differ .*run `jpsdxl init`"):
            E.check_mapping(mapping, other)
    base, _ = load_pipelines(load_profile("tiny"))
    teachers = Teachers(base.text_encoder, base.text_encoder_2, base.tokenizer, base.tokenizer_2)
    with pytest.raises(E.MappingMismatch):
        make_students(teachers, other, other, "similarity", mapping)
