import dataclasses

import numpy as np
import pytest
import torch

from jpsdxl import encoders, generation
from jpsdxl.notebook import measure


def test_base_to_refiner_hand_off(tiny, pipelines):
    base, refiner = pipelines
    assert refiner.text_encoder_2 is base.text_encoder_2 and refiner.vae is base.vae
    images, latents = generation.generate(tiny, base, refiner, ["a photo of a cat", "a dog"], output_type="np")
    h, w = tiny.generate.height, tiny.generate.width
    assert latents.shape == (2, 4, h // base.vae_scale_factor, w // base.vae_scale_factor)
    assert images.shape == (2, h, w, 3) and np.isfinite(images).all()


def test_same_seed_same_image_independent_of_batch(tiny, pipelines):
    a, _ = generation.generate(tiny, *pipelines, ["a cat", "a dog"], output_type="np")
    b, _ = generation.generate(tiny, *pipelines, ["a cat"], output_type="np")
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)


def test_handoff_point_changes_the_result(tiny, pipelines):
    a, _ = generation.generate(tiny, *pipelines, "a cat", output_type="np")
    b, _ = generation.generate(tiny, *pipelines, "a cat", high_noise_frac=0.5, output_type="np")
    assert not np.allclose(a, b)


def test_japanese_prompt_string_runs(tiny, pipelines, ja_tokenizers):
    base = pipelines[0]
    te = encoders.japanese_copy(base.text_encoder, ja_tokenizers[0], base.tokenizer)
    te_2 = encoders.japanese_copy(base.text_encoder_2, ja_tokenizers[1], base.tokenizer_2)
    ja_base, ja_refiner = generation.load_pipelines(tiny, text_encoder=te, text_encoder_2=te_2,
                                                    tokenizer=ja_tokenizers[0], tokenizer_2=ja_tokenizers[1])
    assert ja_refiner.tokenizer_2 is ja_tokenizers[1] and ja_refiner.text_encoder_2 is ja_base.text_encoder_2
    images, latents = generation.generate(tiny, ja_base, ja_refiner, "かわいすぎる子猫", output_type="np")
    assert images.shape == (1, tiny.generate.height, tiny.generate.width, 3) and np.isfinite(images).all()


def test_reduced_precision_path(tiny):
    """full runs in half precision on a GPU; the same dtype plumbing runs here in bfloat16 on the CPU."""
    profile = dataclasses.replace(tiny, dtype="bfloat16")
    base, refiner = generation.load_pipelines(profile)
    assert base.unet.dtype == refiner.unet.dtype == base.text_encoder_2.dtype == torch.bfloat16
    images, latents = generation.generate(profile, base, refiner, "a cat", steps=4, output_type="np")
    assert latents.dtype == torch.bfloat16 and np.isfinite(images).all()


def _count_calls(monkeypatch, unet):
    calls = []
    forward = unet.forward
    monkeypatch.setattr(unet, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    return calls


@pytest.mark.parametrize("steps, frac, base_steps", [(10, 0.8, 8), (10, 0.5, 5)])
def test_each_stage_runs_its_share_of_the_schedule(tiny, pipelines, monkeypatch, steps, frac, base_steps):
    """The base denoises the first ``high_noise_frac`` of the steps, the refiner the rest: one UNet call per step
    (classifier-free guidance batches both branches into one call)."""
    base, refiner = pipelines
    base_calls, refiner_calls = _count_calls(monkeypatch, base.unet), _count_calls(monkeypatch, refiner.unet)
    generation.generate(tiny, base, refiner, "a cat", steps=steps, high_noise_frac=frac, output_type="latent")
    assert (len(base_calls), len(refiner_calls)) == (base_steps, steps - base_steps)


def test_the_denoising_snapshots_follow_the_schedule_and_end_on_the_generated_image(tiny, pipelines):
    """Snapshots spread over the steps, the base's first, always with the hand-off; the last is the image
    ``generate`` draws, and the first (one step from pure noise) is far from it."""
    shots = measure.denoising_snapshots(tiny, *pipelines, "a red circle", count=4)
    g = tiny.generate
    base_steps = round(g.steps * g.high_noise_frac)
    labels = [label.split()[:2] for label, _ in shots]
    assert labels[0] == ["base", "1"] and ["base", str(base_steps)] in labels
    assert labels[-1] == ["refiner", str(g.steps - base_steps)] and 4 <= len(shots) <= 5
    final, _ = generation.generate(tiny, *pipelines, "a red circle", output_type="np")
    assert np.array_equal(shots[-1][1], final[0]) and not np.allclose(shots[0][1], final[0], atol=0.05)
    assert all(image.shape == final[0].shape for _, image in shots)


def test_the_stage_clock_times_one_batch_in_two_parts(tiny, pipelines, monkeypatch):
    """The clock is read at the start, at every base step (the last one splits the two stages) and at the end: a
    fake clock that ticks once per reading makes the split exact, with no real time compared."""
    import time

    ticks = iter(range(10_000))
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))
    g = tiny.generate
    timing = measure.stage_seconds(tiny, *pipelines, ["a cat"] * 5)
    assert timing["images"] == min(5, g.batch_size)
    assert timing["base_seconds"] == round(g.steps * g.high_noise_frac) and timing["refiner_seconds"] == 1


def test_base_alone_runs_every_step_and_no_refiner(tiny, pipelines, monkeypatch):
    base, refiner = pipelines
    base_calls, refiner_calls = _count_calls(monkeypatch, base.unet), _count_calls(monkeypatch, refiner.unet)
    images, latents = generation.generate(tiny, base, refiner, ["a cat", "a dog"], refine=False, steps=6,
                                          output_type="np")
    assert (len(base_calls), len(refiner_calls)) == (6, 0) and latents is None
    assert images.shape == (2, tiny.generate.height, tiny.generate.width, 3)


def test_speedups_change_the_layout_not_the_images(tiny):
    """The fast settings the GPU benchmark times must draw the same images (float32 here: same numbers up to
    rounding); torch.compile and the half-precision rows need a GPU and are timed there."""
    base, refiner = generation.load_pipelines(tiny)
    before, _ = generation.generate(tiny, base, refiner, ["a red circle", "a blue square"], steps=6, output_type="np")
    for name in ("channels last", "fused QKV projections"):
        measure.apply_speedup(base, refiner, name)
    assert base.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert refiner.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all("Fused" in type(p).__name__ for p in base.unet.attn_processors.values())
    assert all("Fused" in type(p).__name__ for p in refiner.unet.attn_processors.values())
    after, _ = generation.generate(tiny, base, refiner, ["a red circle", "a blue square"], steps=6, output_type="np")
    np.testing.assert_allclose(after, before, atol=1e-4)
    with pytest.raises(ValueError, match="unknown speed-up"):
        measure.apply_speedup(base, refiner, "warp drive")


def test_card_settings_put_the_refiner_in_bfloat16_under_autocast(tiny):
    base, refiner = generation.load_pipelines(tiny)
    with measure.card_settings(base, refiner):
        images, _ = generation.generate(tiny, base, refiner, "a red circle", steps=4, output_type="np")
    assert refiner.unet.dtype == torch.bfloat16 and base.unet.dtype == torch.float32 and np.isfinite(images).all()


@pytest.fixture
def tiny_clip(tmp_path):
    """A random open_clip model from a config written here: the code path of full's ViT-L-14/openai, offline."""
    import json

    import open_clip

    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "jpsdxl-test-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "jpsdxl-test-clip.json")
    return "jpsdxl-test-clip"


def test_clip_score_pairs_each_image_with_its_own_prompt(tiny, tiny_clip):
    from jpsdxl.shapes import world as shapes

    torch.manual_seed(0)  # clip_scores below draws the same random weights from the same seed
    clip = measure.load_clip(tiny_clip)

    def score(images, prompts):
        return measure.clip_score(images, prompts, clip)

    images = [shapes.render(shapes.Shape(c, s, 8, 16, 16)) for c, s in (("red", "circle"), ("blue", "square"))]
    prompts = ["a red circle", "a blue square"]
    scores = score(images, prompts)
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 100)).all()
    torch.testing.assert_close(score(images[::-1], prompts[::-1]), scores.flip(0))
    assert not torch.allclose(score(images, prompts[::-1]), scores)
    with_model = dataclasses.replace(tiny, generate=dataclasses.replace(tiny.generate, clip_model=tiny_clip))
    torch.manual_seed(0)
    by_model = measure.clip_scores(with_model, {"m": np.stack(images)[None]}, prompts)
    assert by_model["m"] == pytest.approx(float(scores.mean()), abs=1e-4)
    assert measure.clip_scores(tiny, {"m": np.stack(images)[None]}, prompts) == {}  # tiny: no CLIP model


def test_memory_options_are_applied_in_place(tiny):
    base, refiner = generation.load_pipelines(tiny)
    generation.apply_memory_option(base, refiner, "plain")
    assert not base.vae.use_tiling
    generation.apply_memory_option(base, refiner, "vae tiling + slicing")
    assert base.vae.use_tiling and base.vae.use_slicing and refiner.vae is base.vae
    with pytest.raises(ValueError, match="unknown memory option"):
        generation.apply_memory_option(base, refiner, "download more RAM")


def test_judged_generation_in_bounded_batches_draws_the_same_images(tiny, pipelines):
    """notebook 04 on `full` renders its held-out prompts generate.batch_size at a time (memory bound); the images do
    not depend on it, so `tiny` can take them all at once."""
    import dataclasses

    from jpsdxl.shapes import world

    prompts, targets = world.english_prompts()
    small = dataclasses.replace(tiny, generate=dataclasses.replace(tiny.generate, batch_size=5, steps=4))
    large = dataclasses.replace(small, generate=dataclasses.replace(small.generate, batch_size=64))
    calls = []
    base, refiner = pipelines
    original = type(base).__call__
    type(base).__call__ = lambda self, *a, **k: calls.append(len(k["prompt"])) or original(self, *a, **k)
    try:
        scores_small, images_small = measure.evaluate(small, base, refiner, prompts, targets, seeds=(1000,))
    finally:
        type(base).__call__ = original
    scores_large, images_large = measure.evaluate(large, base, refiner, prompts, targets, seeds=(1000,))
    assert calls == [5, 5, 5, 3]
    assert np.abs(images_small.astype(int) - images_large.astype(int)).max() <= 1 and scores_small == scores_large


def test_generate_draws_in_calls_of_the_profiles_batch_size(tiny):
    """colab draws at 1024² one image per call: a list of prompts must never go to the UNet in one batch."""
    from types import SimpleNamespace

    from jpsdxl.core.profiles import derive
    from jpsdxl.generation import generate

    calls = []

    def pipe(prompt, output_type="pil", **kw):
        calls.append(len(prompt))
        return SimpleNamespace(images=torch.full((len(prompt), 4, 2, 2), float(len(calls))))

    profile = derive(tiny, generate={"batch_size": 2})
    images, latents = generate(profile, pipe, pipe, ["a", "b", "c", "d", "e"], output_type="latent")
    assert calls == [2, 2, 2, 2, 1, 1] and images.shape[0] == latents.shape[0] == 5
    calls.clear()
    assert generate(profile, pipe, pipe, ["a", "b", "c"], refine=False, output_type="latent")[0].shape[0] == 3
    assert calls == [2, 1]


def test_text_encoders_swapped_in_draw_what_the_plain_placement_draws(tiny):
    """colab's generate.offload = "text_encoders": accelerate hooks move each text encoder in to encode (the UNets
    and VAE stay): the same images as everything in place, here on a CPU where the hooks have nowhere else to go."""
    from jpsdxl.core.profiles import derive

    swapping = derive(tiny, generate={"offload": "text_encoders"})
    plain, swapped = generation.load_pipelines(tiny), generation.load_pipelines(swapping)
    assert all(hasattr(te, "_hf_hook") for te in (swapped[0].text_encoder, swapped[0].text_encoder_2))
    assert not hasattr(swapped[0].unet, "_hf_hook") or swapped[0].unet.device == tiny.torch_device()
    a = generation.generate(tiny, *plain, ["a red circle", "a blue square"], output_type="latent")[0]
    b = generation.generate(swapping, *swapped, ["a red circle", "a blue square"], output_type="latent")[0]
    assert torch.equal(a, b)


def test_the_evaluation_sample_takes_the_demo_grid_first_then_every_kind_in_turn():
    from jpsdxl.data import EVAL_KINDS, eval_prompts
    from jpsdxl.notebook.measure import eval_sample

    prompts = eval_prompts()
    demo = [p for p in prompts if p.demo]
    ten = eval_sample(prompts, len(demo) + len(EVAL_KINDS))
    assert ten[:len(demo)] == demo and {p.kind for p in ten[len(demo):]} == set(EVAL_KINDS)
    assert eval_sample(prompts, 3) == demo[:3] and sorted(eval_sample(prompts, 1000), key=prompts.index) == prompts


def test_the_clip_ratio_is_a_ratio_of_means_with_a_paired_bootstrap_interval():
    """A model scoring 80 % of the English model on every prompt: ratio 0.8, a tight interval that holds it. Scores
    that only agree on average: the same ratio, a wide interval; per kind, each kind's own prompts."""
    from types import SimpleNamespace

    from jpsdxl.notebook.measure import bootstrap_ratio, clip_ratios

    rng = np.random.default_rng(0)
    english = rng.uniform(20, 35, 40)
    tight = bootstrap_ratio(0.8 * english, english)
    assert tight["ratio"] == pytest.approx(0.8) and tight["low"] == pytest.approx(0.8) == tight["high"]
    noisy = 0.8 * english * rng.uniform(0.5, 1.5, 40)
    wide = bootstrap_ratio(noisy, english)
    assert wide["low"] < wide["ratio"] < wide["high"] and wide["high"] - wide["low"] > 0.1
    assert wide["ratio"] == pytest.approx(noisy.mean() / english.mean()) and wide["n"] == 40
    prompts = [SimpleNamespace(kind="animals" if i < 10 else "food") for i in range(40)]
    half = np.where(np.arange(40) < 10, 0.5, 1.0) * english
    ratios = clip_ratios({"prompts": prompts, "scores": {"English (original)": english, "distilled": half}})
    assert list(ratios) == ["distilled"] and list(ratios["distilled"]) == ["all", "animals", "food"]
    assert ratios["distilled"]["animals"]["ratio"] == pytest.approx(0.5)
    assert ratios["distilled"]["food"]["ratio"] == pytest.approx(1.0) and ratios["distilled"]["animals"]["n"] == 10


def test_rates_carry_their_count_and_wilson_interval():
    """Wilson's 95 % interval against published values (4 of 9: 18.9-73.3 %), inside [0, 1] at the ends, and the
    rate as the notebooks print it."""
    from jpsdxl.notebook import tables

    low, high = measure.wilson(4, 9)
    assert round(low, 3) == 0.189 and round(high, 3) == 0.733
    assert measure.wilson(0, 10)[0] == 0.0 and measure.wilson(10, 10)[1] == 1.0 and measure.wilson(0, 0) == (0.0, 1.0)
    assert tables.rate(26 / 45, 45) == "58% (26/45; 43%-71%)"


def test_the_refiner_can_read_a_prompt_of_its_own_in_every_batch(tiny, pipelines):
    """``refiner_prompt`` reaches the refiner, batch by batch: the same prompts draw the same images, another prompt
    for the refiner alone changes them (notebook 04 lets an English refiner finish Japanese base latents)."""
    g = dataclasses.replace(tiny.generate, batch_size=1)
    profile = dataclasses.replace(tiny, generate=g)
    plain, _ = generation.generate(profile, *pipelines, ["a red circle", "a blue square"], output_type="np")
    same, _ = generation.generate(profile, *pipelines, ["a red circle", "a blue square"], output_type="np",
                                  refiner_prompt=["a red circle", "a blue square"])
    other, _ = generation.generate(profile, *pipelines, ["a red circle", "a blue square"], output_type="np",
                                   refiner_prompt=["a red circle", "a green triangle"])
    assert np.array_equal(plain, same) and np.array_equal(plain[0], other[0]) and not np.allclose(plain[1], other[1])
