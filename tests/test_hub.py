import time

import pytest

from jpsdxl.hub import ModelNotAvailable, resolve
from jpsdxl.profiles import load_profile


def test_offline_full_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants  # an empty cache, whatever this machine holds

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    from jpsdxl.generation import load_pipelines

    start = time.perf_counter()
    with pytest.raises(ModelNotAvailable) as err:
        load_pipelines(load_profile("full"))
    message = str(err.value)
    assert time.perf_counter() - start < 10
    assert "stabilityai/stable-diffusion-xl-base-1.0" in message and "SDXL base" in message
    assert "stabilityai/stable-diffusion-xl-refiner-1.0" in message and "madebyollin/sdxl-vae-fp16-fix" in message
    assert "HF_HUB_OFFLINE" in message and "--profile tiny" in message
    assert err.value.__cause__ is None  # no chained stack trace from huggingface_hub


def test_local_folder_passes_through(tmp_path):
    assert resolve(str(tmp_path)) == tmp_path


def test_nonsense_spec():
    with pytest.raises(ModelNotAvailable, match="no such folder"):
        resolve("./not/here")


def test_offline_hub_tokenizer_names_itself(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    from jpsdxl.tokenization import japanese_tokenizers

    with pytest.raises(ModelNotAvailable, match="Japanese tokenizer 'line-corporation/japanese-large-lm-3.6b'"):
        japanese_tokenizers(load_profile("full"), japanese_texts=["猫"])
