import json
import shutil
import warnings

import pytest
import sentencepiece as spm

from jpsdxl import tokenization as T

CAPTIONS = ["a photo of a cat", "A red CAT, sleeping on the sofa.", "Zürich at 3:45pm, 2024 — café & crème",
            "かわいすぎる子猫", "an astronaut riding a horse on mars, 4k, trending on artstation", "  spaces   everywhere "]


@pytest.fixture(scope="module")
def clip():
    return T.build_sdxl_clip_tokenizers()


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


def test_bang_quirk_of_tokenizer_2(clip):
    tok, tok_2 = clip
    assert tok("wow!")["input_ids"] == [49406, 2781, 256, 49407]
    assert tok_2("wow!")["input_ids"] == [49406, 2781, 0, 49407]  # as SDXL's own tokenizer_2 (diffusers#4153)


def test_clip_byte_pieces(clip):
    rows = T.clip_byte_pieces(clip[0], "かわいすぎる子猫")
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
    assert tok("猫😀")["input_ids"].count(tok.unk_token_id) == 1


def test_long_prompt_warns_with_count(ja_tokenizers):
    tok = ja_tokenizers[0]
    n = len(tok("猫" * 100, verbose=False)["input_ids"])
    with pytest.warns(UserWarning, match=f"{n - 77} token\\(s\\) over"):
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
    assert T.tokens_per_char(clip[0], held_out) > 2 * T.tokens_per_char(ja_tokenizers[0], held_out)
    assert T.overflow_rate(clip[0], ["猫" * 80]) == 1.0 and T.overflow_rate(ja_tokenizers[0], ["猫"]) == 0.0
    rows, n = T.layout(ja_tokenizers[1], "猫"), len(ja_tokenizers[1]("猫")["input_ids"])
    assert [r["role"] for r in rows] == ["bos"] + ["text"] * (n - 2) + ["eos"] + ["pad"] * (77 - n)
    table = T.side_by_side({"a": clip[0], "b": ja_tokenizers[0]}, "猫")
    assert len(table["a"]) == len(table["position"]) == 15
