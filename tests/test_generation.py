import dataclasses

import numpy as np
import pytest
import torch

from jpsdxl import encoders, generation


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


def test_base_alone_runs_every_step_and_no_refiner(tiny, pipelines, monkeypatch):
    base, refiner = pipelines
    base_calls, refiner_calls = _count_calls(monkeypatch, base.unet), _count_calls(monkeypatch, refiner.unet)
    images, latents = generation.generate(tiny, base, refiner, ["a cat", "a dog"], refine=False, steps=6,
                                          output_type="np")
    assert (len(base_calls), len(refiner_calls)) == (6, 0) and latents is None
    assert images.shape == (2, tiny.generate.height, tiny.generate.width, 3)
