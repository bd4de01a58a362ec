"""The tutorial end to end: every notebook executed by papermill on `tiny`, then re-executed by nbval.

nbval (lax mode) re-runs the executed copies and compares the outputs of the cells tagged
``nbval-check-output``: a check that the tutorial's numbers are reproducible from its seed.
"""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from jpsdxl.runner import NOTEBOOK_DIR, notebooks, run_notebooks

EXPECTED = {
    "00_overview": {"conditioning_consistent", "retrained_parameter_share", "two_stage_seconds"},
    "01_tokenizer_alignment": {"clip_tokens_per_char", "ja_tokens_per_char", "clip_overflow_rate_77",
                               "ja_overflow_rate_77", "sentencepiece_agreement"},
}


def test_committed_notebooks_are_clean_and_well_formed():
    found = notebooks()
    assert [nb.stem for nb in found] == sorted(EXPECTED)
    for path in found:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
        assert any("nbval-check-output" in c.metadata.get("tags", []) for c in code), f"{path.name}: nothing for nbval"
        first, last = nb.cells[0].source, nb.cells[-1].source
        assert "What you will learn" in first and "How long it takes" in first and "概要" in first
        assert "What to check" in last and "Exercise" in last


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return root, run_notebooks("tiny", runs_root=root, progress=False)


@pytest.mark.slow
def test_tutorial_runs_end_to_end(tutorial):
    root, summary = tutorial
    assert [r["notebook"] for r in summary] == sorted(EXPECTED)
    for row in summary:
        folder = root / "tiny" / row["notebook"]
        assert (folder / f"{row['notebook']}.ipynb").exists() and (folder / f"{row['notebook']}.html").exists()
        assert EXPECTED[row["notebook"]] <= set(json.loads((folder / "metrics.json").read_text()))
        nb = nbformat.read(folder / f"{row['notebook']}.ipynb", as_version=4)
        assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert json.loads((root / "tiny" / "summary.json").read_text())["profile"] == "tiny"


@pytest.mark.slow
def test_tutorial_numbers_say_what_the_text_says(tutorial):
    root, _ = tutorial
    m0 = json.loads((root / "tiny" / "00_overview" / "metrics.json").read_text())
    m1 = json.loads((root / "tiny" / "01_tokenizer_alignment" / "metrics.json").read_text())
    assert m0["conditioning_consistent"] is True
    assert m1["sentencepiece_agreement"] == 1.0 and m1["pooled_at_eos"] is True
    assert m1["clip_tokens_per_char"] > 2 * m1["ja_tokens_per_char"]
    assert m1["clip_overflow_rate_77"] > m1["ja_overflow_rate_77"]


def _nbval(root, notebooks):
    return subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(root), *map(str, notebooks)], capture_output=True, text=True,
                          cwd=NOTEBOOK_DIR)


@pytest.mark.slow
def test_outputs_reproduce_under_nbval(tutorial):
    root, _ = tutorial
    done = _nbval(root, sorted((root / "tiny").glob("*/*.ipynb")))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


@pytest.mark.slow
def test_nbval_catches_a_changed_number(tutorial, tmp_path):
    """The reproducibility check can fail: alter one checked output of notebook 00 and nbval must object."""
    root, _ = tutorial
    nb = nbformat.read(root / "tiny" / "00_overview" / "00_overview.ipynb", as_version=4)
    checked = [c for c in nb.cells if "nbval-check-output" in c.metadata.get("tags", [])]
    for output in checked[0].outputs:
        if "data" in output:
            output.data = {"text/plain": output.data["text/plain"] + " (altered)"}
    nbformat.write(nb, tmp_path / "00_overview.ipynb")
    done = _nbval(tmp_path, [tmp_path / "00_overview.ipynb"])
    assert done.returncode != 0 and "1 failed" in done.stdout, done.stdout[-2000:]
