import pytest

from jpsdxl.cli import main


def test_profiles_lists_all(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("tiny", "full", "full-random"))


def test_bad_profile_is_a_clear_error(capsys):
    assert main(["run", "--profile", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No profile 'nope'") and "tiny" in err


def test_env_prints_versions(capsys):
    assert main(["env"]) == 0
    assert '"torch"' in capsys.readouterr().out


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    from jpsdxl import runner

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_notebooks", interrupted)
    assert main(["run"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted") and "Traceback" not in err


def test_relative_profile_runs_and_data_paths_work_inside_the_notebooks(tmp_path, monkeypatch):
    """The notebooks run with notebooks/ as their working directory: paths the user typed must still mean
    what they meant where the user typed them."""
    import json

    import nbformat

    from jpsdxl.core.runs import load_metrics

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}})
    nb.cells = [nbformat.v4.new_code_cell('profile = "tiny"\nrun_dir = None', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(
                    "from pathlib import Path\nfrom jpsdxl.core.profiles import load_profile\nfrom jpsdxl.core.runs import save_metrics\n"
                    "P = load_profile(profile)\n"
                    "save_metrics(run_dir, {'name': P.name, 'pairs_exist': Path(P.data.pairs).is_file()})")]
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, tmp_path / "nbs" / "00_probe.ipynb")
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "pairs.tsv").write_text("猫\tcat\n")
    (work / "mytiny.toml").write_text('description = "x"\n[models]\nbase = "zoo:tiny/base"\nrefiner = "zoo:tiny/refiner"\n'
                                      '[data]\npairs = "data/pairs.tsv"\n')
    monkeypatch.chdir(work)
    from jpsdxl import runner

    runner.run_notebooks("mytiny.toml", runs_root="myruns", notebook_dir=tmp_path / "nbs", html=False, progress=False)
    assert load_metrics(work / "myruns" / "mytiny" / "00_probe") == {"name": "mytiny", "pairs_exist": True}
    assert json.loads((work / "myruns" / "mytiny" / "summary.json").read_text())["notebooks"][0]["notebook"] == "00_probe"


def test_each_stage_says_what_to_run_when_its_input_is_missing(tmp_path, monkeypatch, capsys):
    """A fresh runs folder: init and distill need stage 1's tokenizers, generate stage 3's encoders; one line each,
    exit 2."""
    monkeypatch.setenv("JPSDXL_RUNS", str(tmp_path))
    for stage in ("init", "distill"):
        assert main([stage, "--profile", "tiny"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "run `jpsdxl tokenizer --profile tiny`" in err and "Traceback" not in err
    assert main(["generate", "赤い丸", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "run `jpsdxl distill --profile tiny`" in err and "text_encoder" in err
    with pytest.raises(SystemExit):  # a start that does not exist is refused by the parser, before anything loads
        main(["distill", "--profile", "tiny", "--init", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["distill", "--steps", "0"], "0: give a whole number of at least 1"),
    (["distill", "--steps", "-5"], "-5: give a whole number of at least 1"),
    (["generate", "猫", "--steps", "0"], "0: give a whole number of at least 1"),
    (["generate", "猫", "--seed", str(2**70)], "--seed 1180591620717411303424: a whole number from 0 to 2**63 - 1"),
    (["generate", "猫", "--guidance", "nan"], "nan: give a finite number"),
])
def test_bad_numbers_are_refused_before_anything_runs(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_an_image_size_that_cannot_fit_and_a_runs_folder_that_is_a_file_are_one_line(tmp_path, monkeypatch, capsys):
    assert main(["generate", "猫", "--size", "1000000", "--out", str(tmp_path / "x.png")]) == 2
    assert "at most 4096" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("JPSDXL_RUNS", str(tmp_path / "afile"))
    assert main(["distill", "--profile", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file: point it at a folder" in err


def test_train_shapes_checks_its_output_folder_before_training(tmp_path, monkeypatch, capsys):
    """The weights are written after about 25 minutes of training: an unwritable --out must stop it first."""
    from jpsdxl.core import zoo

    monkeypatch.setattr(zoo, "build_components", lambda name: pytest.fail("training started before --out was checked"))
    (tmp_path / "afile").write_text("x")
    assert main(["train-shapes", "--out", str(tmp_path / "afile" / "weights")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "afile: cannot write there" in err and err.count("\n") == 1


def test_stage_2_and_the_runner_check_the_runs_folder_before_the_work(tmp_path, monkeypatch, capsys):
    from jpsdxl import data

    monkeypatch.setattr(data, "load_pairs", lambda profile: pytest.fail("the data loaded before the runs folder was checked"))
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("JPSDXL_RUNS", str(tmp_path / "afile" / "runs"))
    assert main(["init", "--profile", "tiny"]) == 2
    assert "afile/runs/tiny/02_embedding_init: cannot write there" in capsys.readouterr().err
    assert main(["run", "--runs", str(tmp_path / "afile" / "runs"), "--no-html"]) == 2
    err = capsys.readouterr().err
    assert "--runs" in err and "cannot write there" in err and err.count("\n") == 1


def test_a_full_disk_when_the_image_is_saved_is_one_line_and_leaves_no_half_image(standin_hub, tmp_path, monkeypatch,
                                                                                   capsys):
    """The drawing is done, the disk is full: one line naming the file (no traceback), and nothing half-written."""
    import errno

    from PIL import Image

    from jpsdxl.cli import main

    def full(self, fp, format=None, **kwargs):
        open(fp, "wb").write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "red.png"
    assert main(["generate", "赤い丸", "--profile", "rehearse-full", "--model",
                 "tohoku-nlp/stable-diffusion-xl-jp-base-1.0", "--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and "No space left on device" in errors[0]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_a_pipe_or_a_folder_as_input_and_a_link_as_output_get_their_own_line(tmp_path, capsys):
    """A FIFO as --prompts-file or as data.pairs must not hang, nor be called 'no such file'; --out that is a link
    to a file must not write through it."""
    import os

    from jpsdxl.core.profiles import derive, load_profile, save_profile

    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    for source, message in ((fifo, "not a regular file"), (tmp_path, "a folder, not a file")):
        assert main(["generate", "--prompts-file", str(source), "--out", str(tmp_path / "x.png")]) == 2
        assert message in capsys.readouterr().err
    os.mkfifo(tmp_path / "pairs.tsv")
    profile = save_profile(derive(load_profile("tiny"), name="piped", data={"pairs": str(tmp_path / "pairs.tsv")}),
                           tmp_path / "p.toml")
    assert main(["tokenizer", "--profile", str(profile)]) == 2  # returns at once: nothing opened the pipe
    assert "not a regular file" in capsys.readouterr().err
    target = tmp_path / "precious.png"
    target.write_bytes(b"keep")
    (tmp_path / "link.png").symlink_to(target)
    assert main(["generate", "赤い丸", "--out", str(tmp_path / "link.png")]) == 2
    assert "is a link" in capsys.readouterr().err and target.read_bytes() == b"keep"


def test_two_generate_runs_into_one_out_do_not_overwrite_each_other(tmp_path, capsys):
    """A second `jpsdxl generate` into the --out another is drawing: refused at once, in one line, the first's image
    left alone (two runs both exited 0 and reported the same file: one image lost)."""
    from jpsdxl.cli import output_lock

    out = tmp_path / "same.png"
    with output_lock(out):  # the first run, still drawing
        assert main(["generate", "赤い丸", "--out", str(out)]) == 2
    assert "is in use by" in capsys.readouterr().err and not out.exists()


def lora_run(profile):
    """A fifth stage's `run`, for the test below: what a real one would return, its output folder."""
    from jpsdxl.core.runs import stage_dir

    return stage_dir(profile, "lora")


def test_a_stage_is_one_module_and_one_row(tmp_path, monkeypatch, capsys):
    """A new row in the stage table (a sketch of a LoRA stage): `jpsdxl --help` lists its command, the command calls
    its `run`, the runner executes its notebook after its inputs' notebooks, and a missing output names its command."""
    import nbformat

    from jpsdxl import runner
    from jpsdxl.core.runs import STAGES, Stage, StageOutputMissing, require

    monkeypatch.setitem(STAGES, "lora", Stage("05_lora", "lora", "tests.test_cli:lora_run",
                                              "stage 5: LoRA on the UNet with Japanese captions", ("distill",),
                                              ("unet_lora",)))
    monkeypatch.setenv("JPSDXL_RUNS", str(tmp_path / "runs"))
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "stage 5: LoRA on the UNet with Japanese captions" in capsys.readouterr().out
    assert main(["lora", "--profile", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "runs" / "tiny" / "05_lora")
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    for stem in ("03_distillation", "05_lora", "00_overview", "04_extra"):
        nbformat.write(nbformat.v4.new_notebook(), nbs / f"{stem}.ipynb")
    assert [nb.stem for nb in runner.notebooks(nbs)] == ["00_overview", "03_distillation", "05_lora", "04_extra"]
    with pytest.raises(StageOutputMissing, match=r"lacks unet_lora: run `jpsdxl lora --profile tiny` \(or notebook "
                                                 r"05_lora\)"):
        require("tiny", "lora")
