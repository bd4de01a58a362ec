"""The tutorial end to end: every notebook executed once by papermill on `tiny` (as `make tutorial` does); every
claim its readings make (checked in the notebook beside its text: ``claims.reading``) must hold, and the stages'
outputs must be what the later stages read.

The committed notebooks' form (clean, tagged, opening and closing as the brief says) is checked without executing
them. ``make test-fast`` leaves out everything marked ``notebooks``.
"""

import json
import re

import nbformat
import pytest

from jpsdxl.notebook import claims
from jpsdxl.runner import NOTEBOOK_DIR, notebooks, run_notebooks

EXPECTED = {
    "00_overview": {"conditioning_consistent", "retrained_parameter_share", "sdxl_retrained_parameter_share",
                    "download_mb", "two_stage_seconds", "judge_on_ground_truth", "english_colour_accuracy",
                    "english_shape_accuracy", "english_both_accuracy", "base_only_both_accuracy"},
    "01_tokenizer_alignment": {"clip_tokens_per_char", "ja_tokens_per_char", "clip_overflow_rate_77",
                               "ja_overflow_rate_77", "sentencepiece_agreement"},
    "02_embedding_init": {"lexicon_top1_all", "lexicon_top5_all", "lexicon_top1_latin", "lexicon_by_embedder", "step0",
                          "pool_chance", "mapping"},
    "03_distillation": {"default", "inits", "alternative", "compare_steps", "held_out_pairs", "pool_chance",
                        "samples_per_second", "flops_per_pair", "sdxl_flops_per_pair", "bad_lines_skipped"},
    "04_generation": {"held_out_captions", "held_out_by_kind", "phrasing_experiment", "sentences", "base_alone_distilled",
                      "stage_seconds", "eval_seeds"},
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


def test_the_all_stages_notebook_is_clean_and_well_formed():
    """Colab's one notebook (executed by `make rehearse`, twice): no outputs, one parameters cell, the opening and
    closing every notebook has, and each stage run through `run_stage`, so that a second run repeats nothing."""
    nb = nbformat.read(NOTEBOOK_DIR / "colab_all_stages.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    first, last = nb.cells[0].source, nb.cells[-1].source
    assert "What you will learn" in first and "How long it takes" in first and "概要" in first
    assert "What to check" in last and "Exercise" in last
    text = "\n".join(c.source for c in code)
    assert all(f'run_stage(P, "{stage}"' in text for stage in ("tokenizer", "init", "distill"))


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return root, run_notebooks("tiny", runs_root=root, progress=False)


@pytest.mark.notebooks
def test_tutorial_runs_end_to_end(tutorial):
    root, summary = tutorial
    assert [r["notebook"] for r in summary] == sorted(EXPECTED)
    for row in summary:
        folder = root / "tiny" / row["notebook"]
        assert (folder / f"{row['notebook']}.ipynb").exists() and (folder / f"{row['notebook']}.html").exists()
        assert EXPECTED[row["notebook"]] <= set(_metrics(root, row["notebook"]))
        nb = nbformat.read(folder / f"{row['notebook']}.ipynb", as_version=4)
        assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert json.loads((root / "tiny" / "summary.json").read_text())["profile"] == "tiny"


@pytest.mark.notebooks
def test_every_claim_the_notebooks_make_holds_on_tiny(tutorial):
    """Each reading's claims are checked in the notebook beside the text (``claims.reading``) and saved with its
    metrics: on ``tiny`` every one applies and every one holds. An experiment change is one edit, in the notebook."""
    root, _ = tutorial
    for name in EXPECTED:
        made = _metrics(root, name)["claims"]
        assert made, f"{name} checks no claim"
        assert None not in made.values(), f"{name}: a claim not checked on tiny"
        assert not claims.failed(made), f"{name}: this run contradicts {claims.failed(made)}"


@pytest.mark.notebooks
def test_stage_2_writes_its_mapping_as_a_table(tutorial):
    root, _ = tutorial
    tsv = (root / "tiny" / "02_embedding_init" / "mapping.tsv").read_text(encoding="utf-8").splitlines()
    assert tsv[0] == "ja_piece\ten_token\tscore" and len(tsv) == _metrics(root, "02_embedding_init")["ja_pieces"] + 1


@pytest.mark.notebooks
def test_stage_3_writes_diffusers_components_and_a_log(tutorial):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root, _ = tutorial
    folder = root / "tiny" / "03_distillation"
    assert CLIPTextModel.from_pretrained(folder / "text_encoder").config.vocab_size == 8000
    assert CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").config.eos_token_id == 3
    assert (folder / "log.csv").read_text().startswith("step,")
    assert _metrics(root, "03_distillation")["sdxl_flops_per_pair"] == 8 * 716_375_040 * 77  # SDXL 1.0's towers


@pytest.mark.notebooks
def test_stage_4_saves_its_figure_and_the_phrasing_experiment_by_kind(tutorial):
    root, _ = tutorial
    m = _metrics(root, "04_generation")
    assert (root / "tiny" / "04_generation" / "judged.png").stat().st_size > 0
    rows = m["phrasing_experiment"]
    assert {r["k"] for r in rows} == {1, 2, 4} and {r["kind"] for r in rows} >= {"new order", "new forms", "both new"}
    assert all(r["seeds"] == 2 and r["n"] == 2 * 18 * 2 for r in rows)  # two training seeds x 18 combinations x 2


def test_a_claim_is_recorded_and_shown_as_this_run_found_it():
    """``claims.reading`` records what each check found, ``None`` where a claim does not apply, and ``failed`` names
    exactly the contradicted ones."""
    claims.reading("a {x:.0%} reading", {"holds": 2 > 1, "fails": 1 > 2, "elsewhere": None}, x=0.5)
    made = claims.recorded()
    assert (made["holds"], made["fails"], made["elsewhere"]) == (True, False, None)
    assert claims.failed({k: made[k] for k in ("holds", "fails", "elsewhere")}) == ["fails"]
    shown = claims.render("a {x:.0%} reading", {"holds": True, "fails": False, "elsewhere": None}, x=0.5)
    assert shown.splitlines() == ["a 50% reading", "", "- ✓ holds", "- ✗ fails: **this run disagrees**; believe the "
                                  "numbers above, not the text", "- ○ elsewhere (not checked on this profile)"]
    assert claims.within(1.02, 1.0) and not claims.within(1.04, 1.0) and claims.within(-0.99, -1.0)

def _metrics(root, notebook: str) -> dict:
    """What a notebook of the tiny run saved as its headline numbers."""
    return json.loads((root / "tiny" / notebook / "metrics.json").read_text())


@pytest.mark.notebooks
def test_notebook_01_reproduces_under_nbval(tutorial):
    """Determinism, by nbval: re-executing notebook 01's executed copy gives the same outputs in the cells tagged
    nbval-check-output (the cheapest notebook; the others' seeded computations are pinned by unit tests)."""
    import subprocess
    import sys

    root, _ = tutorial
    executed = root / "tiny" / "01_tokenizer_alignment" / "01_tokenizer_alignment.ipynb"
    done = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(executed.parent), str(executed)], capture_output=True, text=True,
                          cwd=NOTEBOOK_DIR)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]


def _exercise_toml(notebook: str) -> str:
    nb = nbformat.read(NOTEBOOK_DIR / notebook, as_version=4)
    return re.search(r"```toml\n(.*?)```", nb.cells[-1].source, re.S).group(1)


@pytest.mark.slow
def test_exercise_profiles_run_as_written(tmp_path, splits):
    """Notebook 01's exercise 2: the [tokenizer] section it prints, pasted into a copy of tiny.toml, trains."""
    from jpsdxl.core.profiles import PROFILE_DIR, TokenizerConfig, derive, load_profile
    from jpsdxl.tokenization import VocabularyTooLarge, japanese_tokenizers

    tiny = (PROFILE_DIR / "tiny.toml").read_text()
    section = _exercise_toml("01_tokenizer_alignment.ipynb")
    start = tiny.index("[tokenizer]")
    end = tiny.index("\n[", start + 1)
    (tmp_path / "mytiny.toml").write_text(tiny[:start] + section + tiny[end:])
    profile = load_profile(tmp_path / "mytiny.toml")
    assert profile.tokenizer.vocab_size == 2000
    # 30,000 sentences (2 s instead of 11 for the profile's 100,000), still with the ~2,560 distinct characters that
    # make the default coverage fail at 2,000 pieces: the exercise's reason to set character_coverage
    texts = [ja for ja, _ in splits.train[:30_000]]
    tok, _ = japanese_tokenizers(profile, texts)
    assert len(tok) == 2000
    default = derive(profile, tokenizer={"character_coverage": TokenizerConfig.character_coverage})
    with pytest.raises(VocabularyTooLarge, match="character_coverage"):
        japanese_tokenizers(default, texts)
