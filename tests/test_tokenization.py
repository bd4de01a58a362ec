import json
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import sentencepiece as spm

from jpsdxl.core import clip_tokenizer as C
from jpsdxl import tokenization as T
from jpsdxl.notebook import tables as tables

CAPTIONS = ["a photo of a cat", "A red CAT, sleeping on the sofa.", "Zürich at 3:45pm, 2024 — café & crème",
            "かわいすぎる子猫", "an astronaut riding a horse on mars, 4k, trending on artstation", "  spaces   everywhere "]


@pytest.fixture(scope="module")
def clip():
    return C.build_sdxl_clip_tokenizers()


def test_clip_ids_match_open_clip(clip):
    from open_clip.tokenizer import SimpleTokenizer

    oc = SimpleTokenizer()
    tok, tok_2 = clip
    for caption in CAPTIONS:
        assert tok(caption)["input_ids"][1:-1] == oc.encode(caption), caption
        assert tok_2(caption)["input_ids"][1:-1] == oc.encode(caption), caption  # no "!" in these


def test_clip_conventions_are_sdxls(clip):
    tok, tok_2 = clip
    assert len(tok) == 49408 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok.pad_token_id == 49407 and tok_2.pad_token_id == 0 and tok.model_max_length == 77
    ids = tok("a cat", padding="max_length", max_length=77)["input_ids"]
    assert ids[:4] == [49406, 320, 2368, 49407] and set(ids[4:]) == {49407} and len(ids) == 77
    assert tok_2("a cat", padding="max_length", max_length=77)["input_ids"][4:] == [0] * 73


def test_truncation_keeps_eos_at_76(clip):
    for tok in clip:
        ids = tok("cat " * 200, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert len(ids) == 77 and ids[0] == 49406 and ids[76] == 49407


def test_truncation_cuts_the_end_not_the_start(clip, ja_tokenizers):
    """SDXL keeps the *start* of a long prompt: a prompt that starts and ends with different words shows it."""
    for tok, first, last in [(t, "dog", "bird") for t in clip] + [(t, "犬", "鳥") for t in ja_tokenizers]:
        sep = " " if first.isascii() else ""
        prompt = sep.join([first] + ["cat" if first.isascii() else "猫"] * 150 + [last])
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
        start = tok(first, add_special_tokens=False)["input_ids"]
        end = tok(last, add_special_tokens=False)["input_ids"]
        assert ids[1:1 + len(start)] == start and ids[76] == tok.eos_token_id
        assert ids[76 - len(end):76] != end


def test_byte_table_is_clips(clip):
    from open_clip.tokenizer import bytes_to_unicode

    assert C.byte_encoder() == bytes_to_unicode()


def test_bang_quirk_of_tokenizer_2(clip):
    tok, tok_2 = clip
    assert tok("wow!")["input_ids"] == [49406, 2781, 256, 49407]
    assert tok_2("wow!")["input_ids"] == [49406, 2781, 0, 49407]  # as SDXL's own tokenizer_2 (diffusers#4153)


def test_clip_byte_pieces(clip):
    rows = tables.clip_byte_pieces(clip[0], "かわいすぎる子猫")
    assert b"".join(bytes.fromhex(r["bytes"]) for r in rows).decode() == "かわいすぎる子猫"
    assert sum(not r["whole characters"] for r in rows) > len(rows) / 2


def test_japanese_layout(ja_tokenizers):
    tok, tok_2 = ja_tokenizers
    assert (tok.bos_token_id, tok.eos_token_id) == (2, 3) and tok.pad_token_id == 3 and tok_2.pad_token_id == 0
    for t, pad in ((tok, 3), (tok_2, 0)):
        ids = t("赤い猫", padding="max_length", max_length=77)["input_ids"]
        n = ids.index(3) + 1
        assert ids[0] == 2 and len(ids) == 77 and set(ids[n:]) == {pad}
        long = t("猫" * 300, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert len(long) == 77 and long[0] == 2 and long[76] == 3


def test_japanese_round_trip(ja_tokenizers, tmp_path):
    from transformers import AutoTokenizer

    tok = ja_tokenizers[0]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["赤い猫がソファの上で寝ている。", "", "ｶﾀｶﾅ"]:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.pad_token_id == tok.pad_token_id and again.model_max_length == 77


def test_agreement_with_sentencepiece(small_spm, ja_tokenizers, splits):
    held_out = [ja for ja, _ in splits.test]
    result = T.sentencepiece_agreement(small_spm, ja_tokenizers[0], held_out)
    assert result["n"] == len(held_out) > 1000
    assert result["agreement"] == 1.0, result["examples"]


def test_normalisation_and_odd_prompts(ja_tokenizers):
    tok = ja_tokenizers[0]
    assert tok("ＡＢＣ")["input_ids"] == tok("ABC")["input_ids"]
    assert tok("ｶﾀｶﾅ")["input_ids"] == tok("カタカナ")["input_ids"]
    assert tok("猫   と\t犬")["input_ids"] == tok("猫 と 犬")["input_ids"]
    assert tok("")["input_ids"] == [2, 3] and tok("   ")["input_ids"] == [2, 3]  # SDXL's unconditional prompt
    unknown = T.unknown_characters(tok, ["猫😀が🐈いる", "😀"])
    assert unknown == {"😀": 2, "🐈": 1}
    assert T.unknown_characters(tok, ["猫 と 犬", " "]) == {}  # spaces are not characters a vocabulary lacks
    # "<" and ">" occur only inside control pieces (<pad>, <unk>): that makes them no known text
    spelled = tok.convert_ids_to_tokens(tok("猫<")["input_ids"])
    assert ("<0x3C>" in spelled) == ("<" in T.unknown_characters(tok, ["猫<"]))
    # byte fallback: an emoji becomes its 4 UTF-8 bytes, no <unk>, and decodes back
    ids = tok("猫😀")["input_ids"]
    assert tok.unk_token_id not in ids and "<0xF0>" in tok.convert_ids_to_tokens(ids)
    assert tok.decode(ids, skip_special_tokens=True) == "猫😀"


def test_unknown_characters_are_named_as_normalised():
    """NFKC composes "e" + U+0301 into "é": the unknown character is "é", not "e"."""
    tok = T.sentencepiece_to_fast(_tiny_model(["cafe latte", "猫 犬"] * 50))
    assert T.unknown_characters(tok, ["cafe\u0301"]) == {"é": 1}


def test_encode_prompts_warns_about_unknown_characters(ja_tokenizers):
    tok = ja_tokenizers[0]
    for odd in ("😀", "\u200b", "\ufe0f", "𠮷"):
        if not T.unknown_characters(tok, ["猫" + odd]):
            continue  # NFKC or the vocabulary may cover it
        with pytest.warns(UserWarning, match=f"U\\+{ord(odd):04X}"):
            T.encode_prompts(tok, ["猫" + odd])
    with pytest.warns(UserWarning, match="raw UTF-8 bytes"):
        T.encode_prompts(tok, "猫😀")


@pytest.mark.parametrize("bad, message", [({"猫": 1}, "dict"), ([], "no prompts"), (None, "NoneType"),
                                          (3, "int"), (["猫", 5], "prompt 1 is int"),
                                          (["猫\ud800"], "lone surrogate")])
def test_encode_prompts_refuses_bad_input_clearly(ja_tokenizers, bad, message):
    with pytest.raises(ValueError, match=message):
        T.encode_prompts(ja_tokenizers[0], bad)


def test_unicode_whitespace_is_a_space_documented_difference(small_spm, ja_tokenizers):
    """Every Unicode space (tab, newline, U+2028 ...) reads as a space, as in the data loader. sentencepiece's plain
    NFKC rule keeps such characters: the one documented difference between the two."""
    tok = ja_tokenizers[0]
    spaces = ["\n", "\t", "\r", "\x0b", "\x0c", "\x85", "\u2028", "\u3000"]
    for ws in spaces:
        assert tok(f"猫{ws}犬")["input_ids"] == tok("猫 犬")["input_ids"], repr(ws)
    differ = T.sentencepiece_agreement(small_spm, tok, [f"猫{ws}犬" for ws in spaces])["differ"]
    assert differ == 7  # all but the ideographic space U+3000, which NFKC itself maps to a space


def test_long_prompt_warns_with_count(ja_tokenizers):
    tok = ja_tokenizers[0]
    n = len(tok("猫" * 100, verbose=False)["input_ids"])
    with pytest.warns(UserWarning, match=f"{n - 77} token\\(s\\) over.*Kept: \\.\\.\\.'猫"):
        batch = T.encode_prompts(tok, ["猫" * 100, "犬"])
    assert tuple(batch["input_ids"].shape) == (2, 77) and batch["input_ids"][0, -1].item() == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.encode_prompts(tok, "犬")  # short prompts: no warning


def _line_like_model(tmp_path, splits):
    """A stand-in for LINE's spiece.model: unk 0, <s> 1, </s> 2, <pad> 3 (EOS has id 2)."""
    prefix = tmp_path / "line"
    (tmp_path / "corpus.txt").write_text("\n".join(ja for ja, _ in splits.train[:3000]), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(prefix), vocab_size=1500,
                                   character_coverage=0.99,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2, num_threads=2)
    return prefix.with_suffix(".model")


def _tiny_model(texts, out=None, **kw):
    """A small sentencepiece model trained in memory (seconds)."""
    import io

    f = io.BytesIO()
    args = dict(vocab_size=60, character_coverage=1.0, minloglevel=2, num_threads=1, hard_vocab_limit=False,
                pad_id=0, unk_id=1, bos_id=2, eos_id=3, normalization_rule_name="nfkc")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=f, **{**args, **kw})
    out = out or Path(tempfile.mkdtemp()) / "m.model"
    out.write_bytes(f.getvalue())
    return out


def test_missing_bos_or_eos_is_a_clear_error():
    model = _tiny_model(["猫 犬 鳥"] * 20)
    for role in ("bos", "eos"):
        with pytest.raises(ValueError, match=f"no {role} piece"):
            T.sentencepiece_to_fast(model, specials={"bos": "<s>", "eos": "</s>",
                                                    role: "<nope>"})


def test_eos_id_2_without_pad_trades_with_another_control_piece():
    texts = ["猫 犬 鳥 赤い 青い"] * 20
    model = _tiny_model(texts, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=["<ctrl>"])
    tok = T.sentencepiece_to_fast(model)
    assert tok.eos_token_id != 2 and tok.convert_ids_to_tokens(tok.eos_token_id) == "</s>"
    assert tok.pad_token_id == tok.eos_token_id  # no pad piece: pads with EOS, as SDXL's first tokenizer
    assert tok.convert_ids_to_tokens(2) == "<ctrl>"
    assert T.sentencepiece_agreement(model, tok, texts[:1] + ["赤い猫"])["agreement"] == 1.0
    bare = _tiny_model(texts, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    with pytest.raises(ValueError, match="no other control piece"):
        T.sentencepiece_to_fast(bare)


def test_training_refuses_too_large_a_vocabulary_with_advice(tmp_path):
    with pytest.raises(T.VocabularyTooLarge, match=r"support at most [\d,]+ .*vocab_size = \d+"):
        T.train_sentencepiece(["猫が好き", "犬が好き"] * 10, tmp_path / "m.model", vocab_size=8000)
    with pytest.raises(T.VocabularyTooLarge, match="lower character_coverage"):
        T.train_sentencepiece([chr(0x4E00 + i) * 3 for i in range(400)], tmp_path / "m.model", vocab_size=300,
                              character_coverage=1.0)


def test_training_needs_no_file_path_and_is_reproducible(tmp_path):
    """sentencepiece splits input= on commas; we never hand it a path. Same data, same bytes, any folder."""
    texts = ["猫が好き", "犬が好き", "鳥が好き"] * 30
    a = T.train_sentencepiece(texts, tmp_path / "a,b" / "m.model", vocab_size=268)  # 256 byte pieces + a few
    b = T.train_sentencepiece(texts, tmp_path / "c" / "m.model", vocab_size=268)
    assert a.read_bytes() == b.read_bytes()


def test_eos_id_2_is_moved(tmp_path, splits):
    model = _line_like_model(tmp_path, splits)
    tok = T.sentencepiece_to_fast(model)
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "</s>" and tok.eos_token_id != 2
    assert T.sentencepiece_agreement(model, tok, [ja for ja, _ in splits.test[:300]])["agreement"] == 1.0


def test_nmt_nfkc_model_normalisation_is_reproduced(tmp_path, splits):
    """LINE's model uses sentencepiece's default nmt_nfkc rule: its table is applied, after NFKC."""
    model = _line_like_model(tmp_path, splits)  # trained with the default rule, nmt_nfkc
    tok = T.sentencepiece_to_fast(model)
    same = ["猫\u200b犬", "ｶﾞｷﾞ", "猫\u3000犬", "猫\t犬", "ＡＢＣ", "①番", "  猫  ", "", "猫😀"]
    assert T.sentencepiece_agreement(model, tok, same)["agreement"] == 1.0
    # the one known difference: NFKC maps the full-width tilde to "~" (as our data is); nmt_nfkc keeps it
    assert T.sentencepiece_agreement(model, tok, ["猫～犬"])["agreement"] == 0.0


def test_hub_tokenizer_path_on_local_stand_in(tmp_path, splits, tiny):
    """profile.tokenizer.source = <hub id or folder>: the path `full` takes, on a local folder."""
    import dataclasses

    folder = tmp_path / "japanese-lm"
    folder.mkdir()
    shutil.copy(_line_like_model(tmp_path, splits), folder / "spiece.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "tokenizer_class": "T5Tokenizer"}))
    profile = dataclasses.replace(tiny, tokenizer=dataclasses.replace(tiny.tokenizer, source=str(folder)))
    tok, tok_2 = T.japanese_tokenizers(profile)
    assert len(tok) == 1500 and tok.eos_token_id != 2 and tok_2.pad_token == "<pad>" and tok.pad_token == "</s>"
    assert tok("猫")["input_ids"][-1] == tok.eos_token_id


def test_measurements(clip, ja_tokenizers, splits):
    held_out = [ja for ja, _ in splits.test[:500]]
    assert tables.tokens_per_char(clip[0], held_out) > 2 * tables.tokens_per_char(ja_tokenizers[0], held_out)
    assert tables.overflow_rate(clip[0], ["猫" * 80]) == 1.0 and tables.overflow_rate(ja_tokenizers[0], ["猫"]) == 0.0
    rows, n = tables.layout(ja_tokenizers[1], "猫"), len(ja_tokenizers[1]("猫")["input_ids"])
    assert [r["role"] for r in rows] == ["bos"] + ["text"] * (n - 2) + ["eos"] + ["pad"] * (77 - n)


def test_side_by_side_shows_every_eos_and_marks_the_gap(clip, ja_tokenizers):
    prompt = "かわいすぎる子猫"
    table = tables.side_by_side({"clip": clip[0], "ja": ja_tokenizers[0]}, prompt)
    clip_eos = len(clip[0](prompt)["input_ids"]) - 1  # 16 for this prompt
    assert any(cell.startswith(f"{clip[0].eos_token_id}:") and "(eos)" in cell for cell in table["clip"])
    assert table["position"][clip_eos] == str(clip_eos) and "(eos)" in table["clip"][clip_eos]
    assert "(eos)" in table["ja"][len(ja_tokenizers[0](prompt)["input_ids"]) - 1]
    gap = [i for i, p in enumerate(table["position"]) if p.startswith(tables.GAP)]
    assert len(gap) == 1 and table["position"][gap[0]] == f"{tables.GAP} {clip_eos + 2}-73"
    assert table["position"][-3:] == ["74", "75", "76"] and table["clip"][gap[0]] == f"{tables.GAP} (pad)"


def test_notebook_01s_cells_take_the_empty_prompt(clip, ja_tokenizers):
    """Notebook 01's parameter cell invites "try your own": the empty prompt (SDXL's unconditional one) goes through
    every function its cells call with the prompt, without executing the notebook."""
    assert tables.clip_byte_pieces(clip[0], "") == []
    assert tables.tokens_per_char(clip[0], [""]) == 0 and tables.tokens_per_char(ja_tokenizers[0], [""]) == 0
    table = tables.side_by_side({"clip": clip[0], "ja": ja_tokenizers[0]}, "")
    assert "(eos)" in table["clip"][1] and "(eos)" in table["ja"][1]  # BOS then EOS at once
    batch = T.encode_prompts(ja_tokenizers[0], ["猫", ""])
    assert batch["input_ids"].shape == (2, 77) and batch["input_ids"][1, 1] == ja_tokenizers[0].eos_token_id
    assert tables.normalization_examples(ja_tokenizers[0], [""])


def test_over_long_training_sentences_are_named_not_an_internal_error(tmp_path):
    from jpsdxl.tokenization import MAX_SENTENCE_BYTES, train_sentencepiece

    with pytest.raises(ValueError, match=r"all 1 tokenizer training sentence\(s\) are longer than .*4,192-byte limit"):
        train_sentencepiece(["猫" * 5000], tmp_path / "x.model", vocab_size=100)
    short = [f"猫が{i}匹いる。" for i in range(300)]
    with pytest.warns(UserWarning, match=r"1 of 301 tokenizer training sentences are over 4,192 bytes"):
        train_sentencepiece(short + ["犬" * (MAX_SENTENCE_BYTES // 3 + 1)], tmp_path / "y.model", vocab_size=290)


def test_a_damaged_cached_sentencepiece_model_is_trained_again(tmp_path, monkeypatch, splits, tiny, capsys):
    """A cache file cut short (a full disk, a killed copy): rebuilt, not trusted (it once ended in a DecodeError)."""
    import dataclasses

    monkeypatch.setenv("JPSDXL_CACHE", str(tmp_path))
    profile = dataclasses.replace(tiny, tokenizer=dataclasses.replace(tiny.tokenizer, vocab_size=1800,
                                                                      character_coverage=0.98, train_sentences=3000))
    texts = [ja for ja, _ in splits.train[:3000]]
    model, _ = T.sentencepiece_model(profile, texts)
    good = model.read_bytes()
    model.write_bytes(good[: len(good) // 2])
    again, _ = T.sentencepiece_model(profile, texts)
    assert again == model and again.read_bytes() == good and "damaged" in capsys.readouterr().err
    assert T.japanese_tokenizers(profile, texts)[0]("猫")["input_ids"][-1] == 3  # and it loads
