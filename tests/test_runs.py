import json

import pytest

from jpsdxl.runs import atomic_path, load_metrics, save_metrics, write_json


def test_atomic_file_and_folder(tmp_path):
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("one")
    with atomic_path(tmp_path / "dir") as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("1")
    with atomic_path(tmp_path / "dir") as tmp:  # replacing an existing folder
        tmp.mkdir()
        (tmp / "y").write_text("2")
    assert (tmp_path / "a.txt").read_text() == "one"
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "dir"]  # no temporaries left behind


def test_interrupted_write_leaves_old_version(tmp_path):
    write_json(tmp_path / "m.json", {"step": 1})
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "m.json") as tmp:
            tmp.write_text('{"step": ')  # half written when the run dies
            raise KeyboardInterrupt
    assert json.loads((tmp_path / "m.json").read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_metrics_merge_sorted_and_japanese_readable(tmp_path):
    save_metrics(tmp_path, {"b": 1, "prompt": "子猫"})
    merged = save_metrics(tmp_path, {"a": 2, "b": 3})
    assert list(merged) == ["a", "b", "prompt"] and merged["b"] == 3
    assert load_metrics(tmp_path) == merged and "子猫" in (tmp_path / "metrics.json").read_text(encoding="utf-8")
