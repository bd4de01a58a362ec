import json
import os

import pytest

from jpsdxl.core.runs import atomic_path, load_metrics, save_metrics, write_json


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


def test_a_killed_writers_temporaries_are_removed_by_the_next(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited: its temporaries are stale
    (tmp_path / f".model.{pid}.abc123").mkdir()
    (tmp_path / f".model.{pid}.abc123" / "half").write_text("x")
    (tmp_path / f".model.old-{pid}.zz").mkdir()
    alive = tmp_path / f".model.{os.getppid()}.live"  # a running process's temporary must stay
    alive.mkdir()
    with atomic_path(tmp_path / "model") as tmp:
        tmp.write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", alive.name])


def test_summary_is_merged_not_replaced(tmp_path):
    from jpsdxl.runner import write_summary

    path = tmp_path / "summary.json"
    write_summary(path, "tiny", [{"notebook": "00_overview", "seconds": 1.0}, {"notebook": "01_x", "seconds": 2.0}])
    merged = write_summary(path, "tiny", [{"notebook": "00_overview", "seconds": 3.0}])
    assert [r["notebook"] for r in merged["notebooks"]] == ["00_overview", "01_x"]
    assert merged["notebooks"][0]["seconds"] == 3.0 and merged["total_seconds"] == 5.0
