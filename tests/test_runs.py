import json
import os
from pathlib import Path

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


def test_runs_go_to_the_working_directory_never_the_install_location(tmp_path, monkeypatch):
    from jpsdxl.core.runs import runs_dir, runs_root

    monkeypatch.delenv("JPSDXL_RUNS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert runs_root() == tmp_path / "runs" and runs_dir("tiny", "01_x") == tmp_path / "runs" / "tiny" / "01_x"
    checkout = tmp_path / "repo"
    (checkout / "jpsdxl").mkdir(parents=True)
    (checkout / "jpsdxl" / "__init__.py").write_text("")
    (checkout / "notebooks").mkdir()
    monkeypatch.chdir(checkout / "notebooks")  # Jupyter's working directory for a notebook
    assert runs_root() == checkout / "runs"
    monkeypatch.setenv("JPSDXL_RUNS", str(tmp_path / "drive"))
    assert runs_root() == tmp_path / "drive"


def test_a_missing_stage_output_names_the_command_that_makes_it(tmp_path, monkeypatch):
    from jpsdxl.core.runs import STAGES, StageOutputMissing, record, require, stage_dir

    monkeypatch.setenv("JPSDXL_RUNS", str(tmp_path))
    with pytest.raises(StageOutputMissing, match=r"mapping.pt: run `jpsdxl init --profile tiny` \(or notebook "
                                                 r"02_embedding_init\) first"):
        require("tiny", "init", "mapping.pt")
    assert not (tmp_path / "tiny").exists()  # only looked at, not created
    folder = stage_dir("tiny", "tokenizer")
    for name in ("tokenizer", "tokenizer_2"):
        (folder / name).mkdir()
        (folder / name / "tokenizer.json").write_text(name)
    record(folder, "tokenizer", {})
    assert require("tiny", "tokenizer") == tmp_path / "tiny" / STAGES["tokenizer"].folder


def _fake_stages_1_and_2(tmp_path, monkeypatch):
    """Stage 1's two tokenizer folders and stage 2's mapping, each recorded as its stage records it."""
    from jpsdxl.core.runs import outputs_hash, record, stage_dir

    monkeypatch.setenv("JPSDXL_RUNS", str(tmp_path))
    one, two = stage_dir("tiny", "tokenizer"), stage_dir("tiny", "init")
    for name in ("tokenizer", "tokenizer_2"):
        (one / name).mkdir()
        (one / name / "tokenizer.json").write_text(f"{name}: 8,000 pieces")
    record(one, "tokenizer", {"data": "tatoeba"})
    for name in ("mapping.pt", "mapping.tsv"):
        (two / name).write_text("made from the 8,000 pieces")
    record(two, "init", {"tokenizer": outputs_hash("tiny", "tokenizer")})
    return one, two


def test_an_output_made_from_another_predecessor_output_is_refused(tmp_path, monkeypatch):
    """The stage contract: stage 2's mapping records the hash of the tokenizers it was made from; stage 1 run again
    (other pieces), the mapping is refused in one line that says to run stage 2 again, until it does."""
    from jpsdxl.core.runs import StaleStageOutput, outputs_hash, record, require

    one, two = _fake_stages_1_and_2(tmp_path, monkeypatch)
    assert require("tiny", "init") == two
    (one / "tokenizer" / "tokenizer.json").write_text("tokenizer: 2,500 pieces")  # stage 1 again, other data
    record(one, "tokenizer", {"data": "my.tsv"})
    with pytest.raises(StaleStageOutput, match=r"made from other tokenizer outputs than .*01_tokenizer_alignment "
                                               r"holds now: run `jpsdxl init --profile tiny`"):
        require("tiny", "init")
    record(two, "init", {"tokenizer": outputs_hash("tiny", "tokenizer")})  # stage 2 again
    assert require("tiny", "init") == two


def test_an_output_changed_after_its_stage_wrote_it_is_refused_and_a_mere_copy_is_not(tmp_path, monkeypatch):
    """Files edited (or half copied) after the record: refused. The same bytes with new times (a copy to Drive
    without its times): hashed again and accepted. No record at all (an older version, or by hand): refused."""
    import os

    from jpsdxl.core.runs import RECORD, StaleStageOutput, require

    _, two = _fake_stages_1_and_2(tmp_path, monkeypatch)
    os.utime(two / "mapping.pt", ns=(1, 1))
    assert require("tiny", "init") == two
    (two / "mapping.pt").write_text("edited by hand")
    with pytest.raises(StaleStageOutput, match=r"outputs changed after the stage wrote them.*`jpsdxl init"):
        require("tiny", "init")
    (two / RECORD).unlink()
    with pytest.raises(StaleStageOutput, match=r"no record of what its outputs were made from"):
        require("tiny", "init")


def test_the_notebooks_travel_with_an_installed_package():
    """pyproject.toml maps notebooks/ to jpsdxl.tutorial, the folder the runner falls back to outside a checkout."""
    import tomllib
    from pathlib import Path

    from jpsdxl import runner

    root = Path(runner.__file__).resolve().parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["jpsdxl.tutorial"] == "notebooks"
    assert "*.ipynb" in setuptools["package-data"]["jpsdxl.tutorial"]
    assert runner.NOTEBOOK_DIR == root / "notebooks"


def test_a_rerun_reuses_each_notebook_whose_fingerprint_has_not_changed(tmp_path, monkeypatch):
    """`jpsdxl run` twice: the second run executes nothing; an edited notebook runs again and so does every notebook
    after it (their inputs are its outputs), not the ones before; another profile or `force` runs them all; a file
    written into an earlier notebook's folder (a stage command's new outputs) runs the later ones again. The kernels
    are stood in for by a fake papermill here (the real one runs in test_cli and test_notebooks)."""
    import shutil

    import nbformat
    import papermill

    from jpsdxl import runner
    from jpsdxl.core.profiles import derive, load_profile, save_profile

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    for stem in ("00_a", "01_b", "02_c"):
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"# {stem}")]), nbs / f"{stem}.ipynb")
    executed = []

    def fake(source, output, parameters, **_):
        shutil.copy(source, output)
        save_metrics(parameters["run_dir"], {"ran": Path(source).stem})
        executed.append(Path(source).stem)

    monkeypatch.setattr(papermill, "execute_notebook", fake)
    run = lambda profile="tiny", **kw: runner.run_notebooks(profile, runs_root=tmp_path / "runs", notebook_dir=nbs,  # noqa: E731
                                                            html=False, progress=False, **kw)
    run()
    assert executed == ["00_a", "01_b", "02_c"]
    summary = run()
    assert executed == ["00_a", "01_b", "02_c"] and all(r["reused"] for r in summary)
    assert [r["metrics"]["ran"] for r in summary] == ["00_a", "01_b", "02_c"]
    (nbs / "01_b.ipynb").write_text((nbs / "01_b.ipynb").read_text().replace("# 01_b", "# 01_b, edited"))
    run()
    assert executed[3:] == ["01_b", "02_c"]
    run(force=True)
    assert executed[5:] == ["00_a", "01_b", "02_c"]
    other = save_profile(derive(load_profile("tiny"), name="tiny", seed=1), tmp_path / "tiny.toml")  # same name
    run(str(other))
    assert executed[8:] == ["00_a", "01_b", "02_c"]
    (tmp_path / "runs" / "tiny" / "02_c" / "metrics.json").unlink()  # an output gone: run again, whatever the hash
    run(str(other))
    assert executed[11:] == ["02_c"]
    (tmp_path / "runs" / "tiny" / "01_b" / "students.bin").write_bytes(b"new")  # a stage command wrote into 01's folder
    run(str(other))
    assert executed[12:] == ["02_c"]


def test_another_library_version_is_another_fingerprint(tmp_path, monkeypatch):
    """A library upgrade can move every number: the notebooks run again after one, and only then."""
    import importlib.metadata

    import nbformat

    from jpsdxl import runner
    from jpsdxl.core.profiles import load_profile

    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "00_a.ipynb")
    before = runner.fingerprint(tmp_path / "00_a.ipynb", load_profile("tiny"), tmp_path)
    assert runner.fingerprint(tmp_path / "00_a.ipynb", load_profile("tiny"), tmp_path) == before
    # the same when the checkout is on sys.path (python -m pytest, or the CLI started from it): its egg-info is
    # found again there, the versions are not new
    monkeypatch.syspath_prepend(str(Path(runner.__file__).resolve().parents[1]))
    assert runner.fingerprint(tmp_path / "00_a.ipynb", load_profile("tiny"), tmp_path) == before
    installed = list(importlib.metadata.distributions())
    torch = next(d for d in installed if d.metadata["Name"] == "torch")

    class Upgraded:
        metadata, version = torch.metadata, torch.version + ".post1"

    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [Upgraded if d is torch else d for d in installed])
    assert runner.fingerprint(tmp_path / "00_a.ipynb", load_profile("tiny"), tmp_path) != before


def test_a_notebook_is_reused_only_while_its_data_file_and_its_outputs_are_what_they_were(tmp_path, monkeypatch):
    """The probes: the content of the profile's data file replaced (same path), then a stage output (mapping.pt)
    deleted by hand: each time the notebook runs again instead of being 'reused'."""
    import shutil

    import nbformat
    import papermill

    from jpsdxl import runner
    from jpsdxl.core.profiles import derive, load_profile, save_profile

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("# 02")]), nbs / "02_embedding_init.ipynb")
    executed = []

    def fake(source, output, parameters, **_):
        shutil.copy(source, output)
        for name in ("mapping.pt", "mapping.tsv"):
            (Path(parameters["run_dir"]) / name).write_text("made")
        save_metrics(parameters["run_dir"], {"ran": True})
        executed.append(Path(source).stem)

    monkeypatch.setattr(papermill, "execute_notebook", fake)
    data = tmp_path / "my.tsv"
    data.write_text("猫\tcat\n", encoding="utf-8")
    profile = save_profile(derive(load_profile("tiny"), name="mine", data={"pairs": str(data)}), tmp_path / "mine.toml")
    run = lambda: runner.run_notebooks(str(profile), runs_root=tmp_path / "runs", notebook_dir=nbs,  # noqa: E731
                                       html=False, progress=False)
    run(), run()
    assert executed == ["02_embedding_init"]  # the second run reused it
    data.write_text("犬\tdog\n", encoding="utf-8")  # new content, same path
    run()
    assert executed == ["02_embedding_init"] * 2
    (tmp_path / "runs" / "mine" / "02_embedding_init" / "mapping.pt").unlink()
    run()
    assert executed == ["02_embedding_init"] * 3


def test_notebook_00s_map_finds_the_notebooks():
    """Notebook 00's map said every notebook was missing: it looked in jpsdxl/notebooks/. It looks where the runner
    does (the checkout's notebooks/, or the copy an installed package ships)."""
    from jpsdxl.notebook.overview import notebook_map
    from jpsdxl.runner import NOTEBOOK_DIR, notebooks

    rows = notebook_map()
    assert rows and all(row["available"] for row in rows)
    assert {row["notebook"] for row in rows} == {nb.stem for nb in notebooks(NOTEBOOK_DIR)}


def test_one_place_holds_the_repositorys_address_and_one_command_moves_every_copy(tmp_path):
    """pyproject.toml's [project.urls] Repository is the address; every notebook's badge and clone cell and the docs
    name it; `make repository URL=...` (a fork) points them all at another, leaving no copy behind."""
    import shutil
    import subprocess
    import sys

    from jpsdxl.notebook.colab import addresses, repository

    root = Path(__file__).resolve().parents[1]
    mine = repository(root)
    found = addresses(root)
    assert {f"notebooks/{nb.name}" for nb in root.glob("notebooks/[0-9][0-9]_*.ipynb")} <= set(found)
    assert all(names == {mine} for names in found.values()), found
    copy = tmp_path / "fork"
    copy.mkdir()
    for part in ("pyproject.toml", "README.md", "Makefile", "jpsdxl", "notebooks", "docs"):
        (shutil.copytree if (root / part).is_dir() else shutil.copy)(root / part, copy / part)
    subprocess.run(["make", "-s", "repository", "URL=https://github.com/someone/jpsdxl-fork", f"PYTHON={sys.executable}"],
                   cwd=copy, check=True, capture_output=True)
    assert repository(copy) == "someone/jpsdxl-fork"
    assert addresses(copy).keys() == found.keys()
    assert all(names == {"someone/jpsdxl-fork"} for names in addresses(copy).values())


def test_the_fingerprint_covers_the_zoo_build_a_profile_reads(tmp_path, monkeypatch):
    """A notebook reads the zoo's build of tiny's models from the cache: a build rebuilt or edited there is another
    input, so the notebook runs again (a cache keyed by content, such as the embeddings, needs no such entry)."""
    import nbformat

    from jpsdxl import runner
    from jpsdxl.core.profiles import load_profile
    from jpsdxl.core.zoo import cache_key

    monkeypatch.setenv("JPSDXL_CACHE", str(tmp_path / "cache"))
    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "04_generation.ipynb")
    build = tmp_path / "cache" / "zoo" / cache_key("shapes") / "base" / "unet"
    build.mkdir(parents=True)
    (build / "config.json").write_text("{}")
    tiny = load_profile("tiny")
    before = runner.fingerprint(tmp_path / "04_generation.ipynb", tiny, tmp_path)
    assert runner.fingerprint(tmp_path / "04_generation.ipynb", tiny, tmp_path) == before
    (build / "config.json").write_text('{"edited": true}')
    assert runner.fingerprint(tmp_path / "04_generation.ipynb", tiny, tmp_path) != before


def fake_stage_1(profile):
    """A stand-in for stage 1's `run`, for the test below: writes the two folders and records them."""
    from jpsdxl.core.runs import record, settings_hash, stage_dir

    folder = stage_dir(profile, "tokenizer")
    for name in ("tokenizer", "tokenizer_2"):
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "tokenizer.json").write_text(f"{profile.tokenizer.vocab_size} pieces")
    record(folder, "tokenizer", {"settings": settings_hash(profile, "tokenizer")})


def test_a_stage_is_run_again_only_when_its_outputs_are_not_current(tmp_path, monkeypatch, capsys):
    """The all-stages notebook's rule (`colab.run_stage`): run a stage whose outputs are missing, kept otherwise;
    run it again when the profile's settings for it changed, or its data file's content did (same path)."""
    from jpsdxl.core.profiles import derive, load_profile, save_profile
    from jpsdxl.core.runs import STAGES
    from jpsdxl.notebook.colab import run_stage

    monkeypatch.setenv("JPSDXL_RUNS", str(tmp_path / "runs"))
    monkeypatch.setitem(STAGES, "tokenizer", STAGES["tokenizer"]._replace(run="tests.test_runs:fake_stage_1"))
    data = tmp_path / "my.tsv"
    data.write_text("猫\tcat\n", encoding="utf-8")
    mine = save_profile(derive(load_profile("tiny"), name="mine", data={"pairs": str(data)}), tmp_path / "mine.toml")
    profile = load_profile(mine)
    assert run_stage(profile, "tokenizer") is True  # nothing there
    assert run_stage(profile, "tokenizer") is False and "current, kept" in capsys.readouterr().out
    assert run_stage(derive(profile, tokenizer={"vocab_size": 2000}), "tokenizer") is True  # other settings
    assert run_stage(profile, "tokenizer") is True  # and back
    assert run_stage(derive(profile, init={"top_k": 3}), "tokenizer") is False  # a section stage 1 does not read
    data.write_text("犬がいる。\tThere is a dog.\n", encoding="utf-8")  # new content, same path
    assert run_stage(profile, "tokenizer") is True
