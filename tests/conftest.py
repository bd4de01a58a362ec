"""Shared fixtures. Everything runs offline on the tiny profile; slow artefacts come from the shared cache."""

import os
import random
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the Hugging Face cache of every test is the stand-in hub (jpsdxl/rehearsal.py, built by the `standin_hub` fixture):
# set before any library reads it, so that a hub id in `full` or `colab` resolves there through the real loaders
os.environ["HF_HUB_CACHE"] = str(Path(os.environ.get("JPSDXL_CACHE", "~/.cache/jpsdxl")).expanduser() / "standin-hub")
# the stage folders of every test that does not choose its own: a temporary folder, never the checkout's runs/
os.environ["JPSDXL_RUNS"] = tempfile.mkdtemp(prefix="jpsdxl-test-runs-")


@pytest.fixture(scope="session")
def tiny():
    from jpsdxl.core.profiles import load_profile

    return load_profile("tiny")


@pytest.fixture(scope="session")
def splits(tiny):
    from jpsdxl.data import load_pairs

    return load_pairs(tiny)


@pytest.fixture(scope="session")
def small_spm(tmp_path_factory, splits):
    """A small sentencepiece model (vocab 2,000 on 5,000 training sentences): seconds, not minutes."""
    from jpsdxl.tokenization import train_sentencepiece

    texts = [ja for ja, _ in splits.train]
    random.Random(0).shuffle(texts)
    return train_sentencepiece(texts[:5000], tmp_path_factory.mktemp("spm") / "spiece.model", vocab_size=2000,
                               character_coverage=0.995)


@pytest.fixture(scope="session")
def ja_tokenizers(small_spm):
    from jpsdxl.tokenization import sentencepiece_to_fast

    return sentencepiece_to_fast(small_spm, pad_with="eos"), sentencepiece_to_fast(small_spm, pad_with="pad")


@pytest.fixture(scope="session")
def pipelines(tiny):
    from jpsdxl.generation import load_pipelines

    return load_pipelines(tiny)


@pytest.fixture(scope="session")
def standin_hub():
    """The stand-in hub (every repository `full` and `colab` name, small and random), built once per cache."""
    from jpsdxl.rehearsal import build_hub

    return build_hub(os.environ["HF_HUB_CACHE"])
