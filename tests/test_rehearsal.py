"""The `full` and `colab` loading paths, through the stand-in hub: the libraries' own offline code (diffusers'
variant filtering over the cached tree listing, transformers' and sentence-transformers' readers, datasets), no
monkeypatched download. The notebooks themselves run on the rehearsal profiles in `make rehearse`."""

import json

import pytest

from jpsdxl.core.profiles import ProfileError, load_profile
from jpsdxl.rehearsal import E5, JP_BASE, LINE, SDXL_BASE


def test_standin_hub_holds_real_layouts(standin_hub):
    base = next((standin_hub / f"models--{SDXL_BASE.replace('/', '--')}" / "snapshots").iterdir())
    names = {p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file() or p.is_symlink()}
    assert {"unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors",
            "tokenizer/vocab.json", "tokenizer/merges.txt", "sd_xl_base_1.0.safetensors"} <= names
    commit = base.name
    tree = json.loads((base.parents[1] / "trees" / f"{commit}.json").read_text())["files"]
    assert set(tree) == names  # the cached listing diffusers filters offline
    published = next((standin_hub / f"models--{JP_BASE.replace('/', '--')}" / "snapshots").iterdir())
    assert not list(published.rglob("*.fp16.*")) and (published / "tokenizer" / "spiece.model").exists()


def test_every_model_of_full_and_colab_resolves_offline(standin_hub):
    from jpsdxl.core.models import resolve_profile

    for name in ("full", "colab"):
        folders = resolve_profile(load_profile(name))
        assert set(folders) == {"SDXL base", "SDXL refiner", "VAE", "Japanese tokenizer", "embedder"}
    unet = folders["SDXL base"] / "unet"
    assert (unet / "diffusion_pytorch_model.fp16.safetensors").exists()


def test_published_model_by_hub_id_loads_without_an_fp16_variant(standin_hub):
    """The card's SD-XL 1.0-jp holds plain weight files only: with the profile's variant = "fp16", diffusers refuses
    it ('no such modeling files are available'); it must then load its plain files, not drop out."""
    from jpsdxl.assembly import japanese_model, load_assembled

    profile = load_profile("rehearse-colab")
    assert profile.models.variant == "fp16"
    model = japanese_model(profile, JP_BASE)
    base, refiner = load_assembled(model)
    assert base.text_encoder.config.vocab_size == len(base.tokenizer) and refiner.text_encoder is None
    assert base.tokenizer.model_max_length <= 77  # pads to the encoder's positions, whatever its config says


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["rehearse-full", "rehearse-colab"])  # colab: text encoders swapped in
def test_generate_draws_with_the_published_model_by_hub_id(standin_hub, tmp_path, profile):
    from PIL import Image

    from jpsdxl.cli import main

    out = tmp_path / "kitten.png"
    assert main(["generate", "かわいすぎる子猫", "--profile", profile, "--model", JP_BASE,
                 "--out", str(out), "--steps", "2"]) == 0
    assert Image.open(out).size == (64, 64)


def test_streamed_dataset_reads_offline_from_the_cached_snapshot(standin_hub):
    from jpsdxl.data import load_pairs

    splits = load_pairs(load_profile("rehearse-full"))
    first = next(iter(splits.test))
    assert all(isinstance(side, str) and side for side in first)


def test_line_tokenizer_and_e5_embedder_load_from_the_standin(standin_hub):
    from jpsdxl.embedding_init import make_embedder
    from jpsdxl.tokenization import japanese_tokenizers

    profile = load_profile("rehearse-full")
    assert profile.tokenizer.source == LINE and profile.init.embedder == f"st:{E5}"
    tok, tok_2 = japanese_tokenizers(profile)
    assert tok.eos_token_id != 2 and tok("猫")["input_ids"][-1] == tok.eos_token_id  # LINE's EOS 2 moved
    vectors = make_embedder(profile.init.embedder).encode(["猫", "cat"])
    assert vectors.shape[0] == 2 and abs(float((vectors[0] ** 2).sum()) - 1) < 1e-4


# -----------------------------------------------------------------------------
# profiles that extend others


def test_colab_extends_full_and_keeps_what_it_does_not_change():
    full, colab = load_profile("full"), load_profile("colab")
    assert colab.models == full.models and colab.data == full.data and colab.init == full.init
    assert colab.distill.optimizer == "adamw8bit" and colab.distill.lr == full.distill.lr
    assert colab.generate.offload and colab.generate.steps == 30 and colab.generate.height == full.generate.height
    assert colab.distill.resume and not full.distill.resume and colab.distill.keep_checkpoints == 1
    rehearsal = load_profile("rehearse-colab")
    assert rehearsal.device == "cpu" and rehearsal.models == colab.models and rehearsal.distill.gradient_checkpointing


def test_extends_reads_paths_against_the_file_that_wrote_them(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "pairs.tsv").write_text("猫\tcat\n", encoding="utf-8")
    (tmp_path / "a" / "parent.toml").write_text('description = "p"\n[models]\nbase = "zoo:tiny/base"\n'
                                                'refiner = "zoo:tiny/refiner"\n[data]\npairs = "pairs.tsv"\n')
    (tmp_path / "child.toml").write_text('extends = "a/parent.toml"\n[generate]\nsteps = 3\n')
    child = load_profile(tmp_path / "child.toml")
    assert child.name == "child" and child.generate.steps == 3 and child.description == "p"
    assert child.data.pairs == str(tmp_path / "a" / "pairs.tsv")


def test_extends_refuses_a_loop_and_a_missing_parent(tmp_path):
    (tmp_path / "x.toml").write_text('extends = "y.toml"\n')
    (tmp_path / "y.toml").write_text('extends = "x.toml"\n')
    with pytest.raises(ProfileError, match="extends itself"):
        load_profile(tmp_path / "x.toml")
    (tmp_path / "z.toml").write_text('extends = "nope"\n')
    with pytest.raises(ProfileError, match="no such profile"):
        load_profile(tmp_path / "z.toml")


def test_colab_settings_fit_a_t4_by_estimate_and_fulls_do_not():
    """The point of colab's distill settings (8-bit AdamW, gradient checkpointing): stage 3 under a T4's 14.7 GiB by
    the parameter-count estimate, where plain AdamW without checkpointing is over it."""
    from jpsdxl.core.profiles import derive
    from jpsdxl.notebook.costs import stage_budgets

    colab = load_profile("colab")
    fits = {r["stage"]: r for r in stage_budgets(colab)}["03 distill"]["GPU GiB"]
    plain = derive(colab, distill={"optimizer": "adamw", "gradient_checkpointing": False})
    assert fits < 14.7 < {r["stage"]: r for r in stage_budgets(plain)}["03 distill"]["GPU GiB"]
    # stage 4: text encoders swapped in keep the host under Colab's 12.7 GB; diffusers' model offload does not
    swapped = {r["stage"]: r for r in stage_budgets(colab)}["04 generate"]
    offloaded = {r["stage"]: r for r in stage_budgets(derive(colab, generate={"offload": "model"}))}["04 generate"]
    assert swapped["GPU GiB"] < 14.7 and swapped["host GiB"] < 11.8 < offloaded["host GiB"]


def test_time_estimates_count_the_flops_of_what_each_stage_runs():
    """Stage 4's FLOPs per image at SDXL 1.0's shapes (counted on the meta device): one base UNet call at 1024² is
    several TFLOP; guidance doubles the UNet calls, the steps scale them, a 512² image costs about a quarter. Stage
    3's minutes scale with its steps; stage 4's with the prompts drawn."""
    from jpsdxl.core.profiles import derive, load_profile
    from jpsdxl.notebook.costs import generation_flops_per_image, stage_times

    colab = load_profile("colab")
    one = derive(colab, generate={"steps": 1, "guidance_scale": 1.0, "high_noise_frac": 0.5})
    two = derive(colab, generate={"steps": 2, "guidance_scale": 1.0, "high_noise_frac": 0.5})
    guided = derive(colab, generate={"steps": 2, "guidance_scale": 7.5, "high_noise_frac": 0.5})
    small = derive(colab, generate={"steps": 2, "guidance_scale": 1.0, "high_noise_frac": 0.5, "height": 512,
                                    "width": 512})
    per_step = generation_flops_per_image(two) - generation_flops_per_image(one)  # a base or refiner call
    assert 5e12 < per_step < 9e12
    unets = generation_flops_per_image(two) - (generation_flops_per_image(one) - per_step)
    assert generation_flops_per_image(guided) - generation_flops_per_image(two) == pytest.approx(unets, rel=0.05)
    assert 0.2 < generation_flops_per_image(small) / generation_flops_per_image(two) < 0.3
    base = stage_times(colab, "Tesla T4")
    more = stage_times(derive(colab, distill={"steps": 4 * colab.distill.steps},
                              generate={"eval_prompts": 2 * colab.generate.eval_prompts}), "Tesla T4")
    assert more[0]["minutes (estimate)"] == pytest.approx(4 * base[0]["minutes (estimate)"], abs=2)
    assert more[1]["minutes (estimate)"] == pytest.approx(2 * base[1]["minutes (estimate)"], abs=2)


def test_colabs_cost_as_the_readme_and_notebooks_quote_it_is_what_the_estimates_compute():
    """README, notebook 00 and the all-stages notebook quote a T4 run's minutes and memory: the figures must be the
    ones `costs.stage_times` and `costs.stage_budgets` compute for `colab` (change the code, the text must follow)."""
    from pathlib import Path

    from jpsdxl.notebook.costs import stage_budgets, stage_times

    colab = load_profile("colab")
    minutes = {r["stage"]: r["minutes (estimate)"] for r in stage_times(colab, "Tesla T4")}
    budgets = stage_budgets(colab)
    gpu, host = max(r["GPU GiB"] for r in budgets), max(r["host GiB"] for r in budgets)
    root = Path(__file__).resolve().parents[1]
    for name in ("README.md", "notebooks/00_overview.ipynb", "notebooks/colab_all_stages.ipynb"):
        text = " ".join((root / name).read_text(encoding="utf-8").replace('\\n",\n    "', " ").split())
        assert f"{minutes['03 distill']} minutes" in text and f"{minutes['04 generate']}" in text, name
        if name != "notebooks/colab_all_stages.ipynb":  # that one prints the memory table itself
            assert f"{gpu} GiB of the T4's 14.7" in text and f"{host} GiB of host RAM" in text, name
