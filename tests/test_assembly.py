"""Stage 4's model folders and command line: a Japanese SDXL that plain diffusers loads, and `jpsdxl generate`.

The students here are untrained copies (mean rows): what is tested is the folder and the command, not the quality
(notebook 04 measures that).
"""

import subprocess
import sys
import textwrap

import pytest

from jpsdxl import distillation as D
from jpsdxl import assembly as A
from jpsdxl import generation as G
from jpsdxl.cli import main


@pytest.fixture(scope="module")
def model(tiny, ja_tokenizers, tmp_path_factory):
    root = tmp_path_factory.mktemp("assembled")
    teachers = D.load_teachers(tiny)
    students = D.make_students(teachers, *ja_tokenizers, "mean")
    D.save_students(students, root / "students")
    A.assemble(tiny, root / "students", root / "model")
    return root / "model"


def test_assembled_folders_link_instead_of_copying(model):
    base, refiner = model / "base", model / "refiner"
    for part in ("unet", "vae", "scheduler"):
        assert (base / part).is_symlink() and (refiner / part).is_symlink()
    assert not (base / "text_encoder").is_symlink()  # the Japanese parts live in base/ ...
    for part in ("text_encoder_2", "tokenizer_2"):  # ... and the refiner points at them
        assert (refiner / part).is_symlink() and (refiner / part).resolve() == (base / part).resolve()
    assert not (refiner / "text_encoder").exists()


def test_plain_diffusers_loads_and_generates_without_jpsdxl(model, ja_tokenizers, tmp_path):
    ids_1, ids_2 = (t("赤い丸と青い四角", padding="max_length", max_length=77).input_ids for t in ja_tokenizers)
    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
        base = StableDiffusionXLPipeline.from_pretrained({str(model / "base")!r})
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained({str(model / "refiner")!r})
        ids = lambda tok: tok("赤い丸と青い四角", padding="max_length", max_length=77).input_ids
        assert ids(base.tokenizer) == {ids_1!r} and ids(refiner.tokenizer_2) == {ids_2!r}, ids(base.tokenizer)
        assert base.text_encoder.config.vocab_size == len(base.tokenizer) != 49408
        g = torch.Generator().manual_seed(0)
        latents = base("赤い丸", num_inference_steps=4, denoising_end=0.75, output_type="latent", height=32,
                       width=32, generator=g).images
        image = refiner("赤い丸", image=latents, num_inference_steps=4, denoising_start=0.75, generator=g).images[0]
        image.save({str(tmp_path / "red.png")!r})
        assert not [m for m in sys.modules if m.startswith("jpsdxl")]
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "red.png").stat().st_size > 0


def test_generate_writes_images(model, tmp_path, capsys):
    assert main(["generate", "赤い丸", "--model", str(model), "--out", str(tmp_path / "one.png"), "--steps", "4"]) == 0
    assert (tmp_path / "one.png").exists()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("赤い丸\n\n青い四角\n", encoding="utf-8")
    assert main(["generate", "--prompts-file", str(prompts), "--model", str(model), "--out", str(tmp_path / "many.png"),
                 "--steps", "4"]) == 0
    assert sorted(p.name for p in tmp_path.glob("many-*.png")) == ["many-01.png", "many-02.png"]


def test_generate_warns_about_a_long_prompt_in_one_line(model, tmp_path):
    """The project's one line; not the pipelines' and tokenizers' own warnings, each once per encoder (a process of
    its own: those libraries' log handlers write to the stderr they found at import)."""
    long = "赤い丸と青い四角と" * 40
    done = subprocess.run([sys.executable, "-m", "jpsdxl.cli", "generate", long, "--model", str(model), "--out",
                           str(tmp_path / "long.png"), "--steps", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "over the 77-token limit" in done.stderr and "Kept:" in done.stderr and done.stderr.count("\n") == 1, \
        done.stderr


@pytest.mark.parametrize("args, message", [
    (["generate"], "no prompt given"),
    (["generate", "  "], "an empty prompt"),
    (["generate", "--prompts-file", "{tmp}/missing.txt"], "no such file"),
    (["generate", "--prompts-file", "{tmp}/empty.txt"], "no prompts in it"),
    (["generate", "--prompts-file", "{tmp}/latin1.txt"], "not UTF-8"),
    (["generate", "猫", "--out", "{tmp}/cat.gif"], "ending in .png"),
    (["generate", "猫", "--size", "30"], "multiple of 8"),
    (["generate", "猫", "--high-noise-frac", "1.5"], "between 0 and 1"),
    (["generate", "猫", "--model", "{tmp}"], "not a folder holding base/ and refiner/"),
    (["generate", "猫", "--model", "someone/sdxl-jp"], "give both: --model BASE_ID,REFINER_ID"),
    (["generate", "猫", "--offload"], "leave --offload out"),
    (["generate", "猫" * 10_000], "prompt 0 has 10,000 characters"),
    (["generate", "--prompts-file", "{tmp}/huge.txt"], "over the 1,000,000 this command reads at once"),
    (["generate", "猫", "--out", "{tmp}/empty.txt/cat.png"], "empty.txt: cannot write there"),
])
def test_generate_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "huge.txt").write_text("赤い丸\n" * 200_000, encoding="utf-8")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_generate_from_hub_ids_offline_names_both_models_without_a_traceback(capsys):
    assert main(["generate", "猫", "--model", "someone/sdxl-jp-base-1.0"]) == 2
    err = capsys.readouterr().err  # the missing-model message: each model on its line, then what to do
    assert "'someone/sdxl-jp-base-1.0' is not available" in err and "'someone/sdxl-jp-refiner-1.0'" in err
    assert "Traceback" not in err


def test_hub_ids_name_the_refiner_beside_the_base():
    assert A.refiner_id("cl-tohoku/stable-diffusion-xl-jp-base-1.0") == "cl-tohoku/stable-diffusion-xl-jp-refiner-1.0"
    with pytest.raises(ValueError, match="give both"):
        A.refiner_id("someone/sdxl-jp")


def test_hub_ids_resolve_base_and_refiner_through_the_hub_cache(tiny, monkeypatch, tmp_path):
    """``--model BASE,REFINER`` goes through hub.resolve (the path a real hub id takes); here both ids are answered
    from folders, as the hub cache would answer them offline."""
    from jpsdxl.core import hub

    import dataclasses

    fp16 = dataclasses.replace(tiny, models=dataclasses.replace(tiny.models, variant="fp16"))
    asked = []
    monkeypatch.setattr(hub, "_download", lambda spec, kind, variant: asked.append((spec, kind, variant)) or tmp_path)
    found = A.japanese_model(fp16, "someone/jp-base-1.0,other/its-refiner")
    assert asked == [("someone/jp-base-1.0", "pipeline", "fp16"), ("other/its-refiner", "pipeline", "fp16")]
    assert found == A.JapaneseModel(tmp_path, tmp_path, "fp16")


def test_a_gpu_out_of_memory_is_one_line_that_says_what_to_try(model, tmp_path, capsys, monkeypatch):
    import torch

    from jpsdxl import generation

    def too_small(*args, **kwargs):  # what a 16 GB card says at 2048x2048
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(generation, "generate", too_small)
    assert main(["generate", "赤い丸", "--model", str(model), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "ran out of memory: try --offload" in err and "Traceback" not in err and err.count("\n") == 1


def _live(cls) -> int:
    import gc

    gc.collect()
    return sum(isinstance(o, cls) for o in gc.get_objects())


@pytest.fixture
def stage_2_mapping(tiny, pipelines, ja_tokenizers, tmp_path, monkeypatch):
    """Stage 1's tokenizers and a stage-2 mapping made from them (the "init only" model's), in a runs folder of this
    test's own."""
    import torch

    from jpsdxl import embedding_init as E
    from jpsdxl.tokenization import save_tokenizers

    monkeypatch.setenv("JPSDXL_RUNS", str(tmp_path))
    save_tokenizers(tiny, ja_tokenizers)
    ja, en = E.japanese_vocab(ja_tokenizers[0]), E.clip_vocab(pipelines[0].tokenizer)
    rng = torch.Generator().manual_seed(0)
    E.save_mapping(E.Mapping(ja, en, torch.rand(len(ja), 5, generator=rng),
                             torch.as_tensor(en.ids)[torch.randint(len(en), (len(ja), 5), generator=rng)]),
                   tmp_path / "tiny" / "02_embedding_init", tiny)


def test_the_compared_models_share_one_unet_pair_and_hold_one_japanese_pair(tiny, model, pipelines, stage_2_mapping):
    """Notebook 04's models differ only in text encoders and tokenizers: however many it compares, the English UNets
    are the only ones resident (on `full` each further pair would be ~10 GB), and a Japanese text-encoder pair lives
    only while its loader's pipelines are held (five at once do not fit Colab's host RAM beside the UNets)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    unets, encoders = _live(UNet2DConditionModel), _live(CLIPTextModelWithProjection)
    models = G.compared_models(tiny, model.parent / "students", model, pipelines)
    assert list(models) == ["English (original)", "untrained (mean rows)", "init only (similarity)", "distilled"]
    for name, load in models.items():
        base, refiner = load()
        assert base.unet is pipelines[0].unet and refiner.unet is pipelines[1].unet
        assert refiner.text_encoder_2 is base.text_encoder_2 and refiner.config.requires_aesthetics_score
        assert _live(CLIPTextModelWithProjection) <= encoders + 1, name  # this model's pair, no other
        del base, refiner
    assert _live(UNet2DConditionModel) == unets and _live(CLIPTextModelWithProjection) == encoders


def test_the_profiles_vae_reaches_the_assembled_model(tiny, model, tmp_path):
    """full names an fp16-safe VAE: the Japanese model must decode with it, as the English baseline does."""
    import shutil

    from jpsdxl.core.models import resolve
    from jpsdxl.core.profiles import derive

    vae = tmp_path / "my-vae"
    shutil.copytree(resolve(tiny.models.base) / "vae", vae)
    out = A.assemble(derive(tiny, models={"vae": str(vae)}), model.parent / "students", tmp_path / "m")
    assert (out["base"] / "vae").resolve() == vae.resolve() == (out["refiner"] / "vae").resolve()
    plain = A.assemble(tiny, model.parent / "students", tmp_path / "plain")
    assert (plain["base"] / "vae").resolve() != vae.resolve()


def test_offload_replaces_moving_the_pipelines_to_the_gpu(model, monkeypatch):
    """diffusers' SDXL docs: enable_model_cpu_offload instead of .to("cuda"); moving first would hold every
    component on the card at once (a 10.7 GiB spike on full)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    calls = []
    for cls in (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline):
        monkeypatch.setattr(cls, "enable_model_cpu_offload", lambda self, device=None: calls.append(("offload", device)))
        monkeypatch.setattr(cls, "to", lambda self, *a, **k: calls.append(("to", a)) or self)
    A.load_assembled(model, device="cuda", offload=True)
    assert calls == [("offload", "cuda")] * 2
    calls.clear()
    A.load_assembled(model, device="cpu")
    assert calls == [("to", ("cpu",))] * 2


def test_a_model_assembled_from_older_encoders_is_assembled_again(tiny, model, tmp_path, monkeypatch, capsys):
    """`jpsdxl distill --fresh` after an earlier run: `jpsdxl generate` must not draw with the old encoders."""
    import shutil

    from jpsdxl.core.runs import StaleStageOutput, record

    monkeypatch.setenv("JPSDXL_RUNS", str(tmp_path))
    students = tmp_path / "tiny" / "03_distillation"
    shutil.copytree(model.parent / "students", students)
    record(students, "distill", {})  # as stage 3 records what it wrote
    first = A.japanese_model(tiny)  # assembled now (the cache may hold one from other students: then again)
    capsys.readouterr()
    recorded = (first.base.parent / "source.json").read_text()
    assert A.japanese_model(tiny) == first and "assembling it again" not in capsys.readouterr().err
    config = students / "text_encoder" / "config.json"
    config.write_text(config.read_text() + "\n")  # changed by hand: not what stage 3 recorded, refused
    with pytest.raises(StaleStageOutput, match="outputs changed after the stage wrote them"):
        A.japanese_model(tiny)
    record(students, "distill", {})  # stage 3 wrote new encoders
    assert A.japanese_model(tiny) == first
    assert "assembling it again" in capsys.readouterr().err
    assert (first.base.parent / "source.json").read_text() != recorded
    # the profile pointed at other English weights (same encoders): its links must not stay on the old ones
    from jpsdxl.core.models import resolve
    from jpsdxl.core.profiles import derive

    other = tmp_path / "other-base"
    shutil.copytree(resolve(tiny.models.base), other)
    assert A.japanese_model(derive(tiny, models={"base": str(other)})) == first
    assert "assembling it again" in capsys.readouterr().err
    assert (first.base / "unet").resolve() == (other / "unet").resolve()


@pytest.mark.parametrize("damage, message", [
    ("empty base", "no readable model_index.json"),
    ("no unet", "base lacks unet"),
    ("cut weights", "unreadable (Error while deserializing header"),
])
def test_a_model_folder_that_is_half_there_is_one_line(model, tmp_path, capsys, damage, message):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model, copy, symlinks=False)
    if damage == "empty base":
        shutil.rmtree(copy / "base")
        (copy / "base").mkdir()
    elif damage == "no unet":
        shutil.rmtree(copy / "base" / "unet")
    else:
        weights = next((copy / "refiner" / "unet").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["generate", "赤い丸", "--model", str(copy), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and "again" in err and err.count("\n") == 1 and "Traceback" not in err


def test_generate_writes_each_batch_as_it_is_drawn(tiny, model, tmp_path, capsys, monkeypatch):
    """Five prompts in batches of two: each batch's images are on disk before the next batch is drawn, in a folder
    given as --out."""
    from jpsdxl import generation
    from jpsdxl.core.profiles import derive, save_profile

    profile = save_profile(derive(tiny, name="pairs", generate={"batch_size": 2}), tmp_path / "pairs.toml")
    drawn, real = [], generation.generate

    def watched(profile, base, refiner, prompts, **kw):
        drawn.append((len(prompts), sorted(p.name for p in (tmp_path / "images").glob("*.png"))))
        return real(profile, base, refiner, prompts, **kw)

    monkeypatch.setattr(generation, "generate", watched)
    (tmp_path / "images").mkdir()
    prompts = ["赤い丸", "青い四角", "緑の三角", "赤い四角", "青い丸"]
    assert main(["generate", *prompts, "--profile", str(profile), "--model", str(model), "--out",
                 str(tmp_path / "images"), "--steps", "2"]) == 0
    assert drawn == [(2, []), (2, ["image-01.png", "image-02.png"]),
                     (1, ["image-01.png", "image-02.png", "image-03.png", "image-04.png"])]
    assert len(list((tmp_path / "images").glob("image-0*.png"))) == 5


def test_the_published_model_joins_the_comparison_where_reachable(tiny, model, pipelines, standin_hub,
                                                                   stage_2_mapping, capsys):
    """Through the stand-in hub, no monkeypatched download: the card's model by hub id joins the comparison and
    shares the English UNets; one that cannot be had offline is left out, in one line."""
    from jpsdxl.core.profiles import derive
    from jpsdxl.rehearsal import JP_BASE

    students = model.parent / "students"
    assert "SD-XL 1.0-jp (published)" not in G.compared_models(tiny, students, model, pipelines)  # tiny names none
    models = G.compared_models(derive(tiny, models={"published": JP_BASE}), students, model, pipelines)
    base, refiner = models["SD-XL 1.0-jp (published)"]()
    assert base.unet is pipelines[0].unet and refiner.unet is pipelines[1].unet  # one UNet pair, shared
    assert "T5Tokenizer" in type(base.tokenizer).__name__ and base.text_encoder is not pipelines[0].text_encoder
    ids = base.tokenizer("赤い丸").input_ids  # the published layout: pieces + EOS, no BOS (ours: BOS first)
    assert ids[-1] == base.tokenizer.eos_token_id
    assert "<|startoftext|>" not in base.tokenizer.convert_ids_to_tokens(ids)
    capsys.readouterr()
    gone = G.compared_models(derive(tiny, models={"published": "nobody/jp-base-1.0"}), students, model, pipelines)
    assert "SD-XL 1.0-jp (published)" not in gone
    err = capsys.readouterr().err
    assert "nobody/jp-base-1.0 is left out of the comparison" in err and err.count("\n") == 1


def test_a_stage_3_folder_draws_through_the_english_unets(model, pipelines, ja_tokenizers, tmp_path):
    students = model.parent / "students"
    base, refiner = G.with_students(pipelines, students)
    assert base.unet is pipelines[0].unet and refiner.unet is pipelines[1].unet
    assert base.text_encoder.config.vocab_size == len(ja_tokenizers[0]) and refiner.text_encoder_2 is base.text_encoder_2
    assert base.tokenizer("赤い丸").input_ids == ja_tokenizers[0]("赤い丸").input_ids
    with pytest.raises(FileNotFoundError, match="lacks text_encoder"):
        G.with_students(pipelines, tmp_path)


def test_a_tokenizer_that_does_not_fit_its_text_encoder_is_refused_before_drawing(tiny, model, tmp_path, splits,
                                                                                  capsys):
    """A 1,800-piece tokenizer beside a 2,000-row embedding (another run's tokenizer copied in): one line, exit 2,
    no image drawn from meaningless ids."""
    import shutil

    from jpsdxl.cli import main
    from jpsdxl.tokenization import sentencepiece_to_fast, train_sentencepiece

    copy = tmp_path / "model"
    shutil.copytree(model, copy, symlinks=True)  # the base's text parts are copies; its tokenizer is replaced
    other = sentencepiece_to_fast(train_sentencepiece([j for j, _ in splits.train[:5000]], tmp_path / "o.model",
                                                      vocab_size=1800, character_coverage=0.98))
    shutil.rmtree(copy / "base" / "tokenizer")
    other.save_pretrained(copy / "base" / "tokenizer")
    with pytest.raises(ValueError, match=r"tokenizer has 1,800 pieces but text_encoder has 2,000 embedding rows"):
        A.japanese_model(tiny, copy)
    out = tmp_path / "x.png"
    assert main(["generate", "赤い丸", "--model", str(copy), "--out", str(out), "--steps", "1"]) == 2
    assert not out.exists() and "not trained together" in capsys.readouterr().err


def test_a_tokenizer_saved_with_its_language_models_length_pads_to_what_its_encoder_reads(model, tmp_path):
    """LINE's tokenizer files say 2048 (its language model's context); loaded beside a text encoder of 77 positions,
    both loaders cap the tokenizer at 77, or padding to "max_length" would make ids the encoder cannot read."""
    import json
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model, copy, symlinks=True)
    for part in ("tokenizer", "tokenizer_2"):
        config = copy / "base" / part / "tokenizer_config.json"
        config.write_text(json.dumps(json.loads(config.read_text()) | {"model_max_length": 2048}))
    te, te_2, tok, tok_2 = A.text_parts(copy / "base")
    base, _ = A.load_assembled(copy)
    assert te.config.max_position_embeddings == 77 and te_2.config.max_position_embeddings == 77
    assert tok.model_max_length == tok_2.model_max_length == 77
    assert base.tokenizer.model_max_length == base.tokenizer_2.model_max_length == 77
