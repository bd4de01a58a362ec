import json

import pytest
import torch
from safetensors.torch import load_file

from jpsdxl.core import zoo


def _weights(folder):
    return {f"{p.parent.name}/{k}": v for p in sorted(folder.rglob("*.safetensors")) for k, v in load_file(p).items()}


def test_same_seed_same_weights(tmp_path):
    a, b = zoo.build_recipe("tiny", tmp_path / "a"), zoo.build_recipe("tiny", tmp_path / "b")
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 100
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_other_seed_other_weights(tmp_path, monkeypatch):
    a = _weights(zoo.build_recipe("tiny", tmp_path / "a"))
    monkeypatch.setitem(zoo.RECIPES["tiny"], "seed", 1)
    b = _weights(zoo.build_recipe("tiny", tmp_path / "b"))
    key = next(k for k in a if "unet" in k and k.endswith("weight") and a[k].dim() > 1)
    assert not torch.equal(a[key], b[key])


def test_zoo_folder_layout_and_cache(tiny):
    from jpsdxl.core.models import resolve

    base, refiner = resolve(tiny.models.base), resolve(tiny.models.refiner)
    assert base.parent == refiner.parent and base.parent.name == zoo.cache_key(tiny.models.base[4:].split("/")[0])
    index = json.loads((base / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert json.loads((refiner / "model_index.json").read_text())["text_encoder"] == [None, None]
    assert resolve(tiny.models.base) == base  # second call: cached, not rebuilt


def test_swapped_text_encoders_fail_loudly(pipelines):
    """Why the tiny recipe gives its two text encoders different widths: a mix-up of text_encoder and text_encoder_2
    must stop with an error, not silently condition on the wrong encoder."""
    from diffusers import StableDiffusionXLPipeline

    base, _ = pipelines
    swapped = StableDiffusionXLPipeline(**{**base.components, "text_encoder": base.text_encoder_2,
                                           "text_encoder_2": base.text_encoder})
    swapped.set_progress_bar_config(disable=True)
    with pytest.raises((RuntimeError, AttributeError, ValueError)):
        swapped("a red circle", num_inference_steps=1, height=32, width=32)


def test_real_sdxl_shapes_match_published_parameter_counts():
    """The full-random recipe has SDXL 1.0's exact sizes (instantiated on the meta device: no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    r = zoo.RECIPES["sdxl"]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        assert count(UNet2DConditionModel(**r["unet_base"])) == 2_567_463_684
        assert count(CLIPTextModel(CLIPTextConfig(**r["text_encoder"]))) == 123_060_480
        assert count(CLIPTextModelWithProjection(CLIPTextConfig(**r["text_encoder_2"]))) == 694_659_840
        assert count(AutoencoderKL(**r["vae"])) == 83_653_863


def test_bad_zoo_spec():
    with pytest.raises(ValueError, match="zoo:<recipe>/base"):
        zoo.build_from_zoo("zoo:tiny/unet")
