"""Profiles: one code path, several sizes.

A profile is data (a TOML file in ``jpsdxl/profiles/``) that names the models (a hub id, a local folder, or
``zoo:<recipe>/<part>`` for a model built locally from configs), the data, the Japanese tokenizer, sizes,
steps, dtype and device. Notebooks take it as a papermill parameter and the CLI as ``--profile``; the code
never branches on a profile's *name*, only on what the profile says.

Shipped profiles:

* ``tiny``        offline, CPU, minutes: tiny random-init SDXL built locally (the default; what CI runs).
* ``full``        the real recipe: SDXL 1.0 base/refiner and the LINE tokenizer from the hub, on a GPU.
* ``full-random`` the real SDXL shapes with random weights, built locally: speed and memory without downloads.

This file is not where models are loaded (``zoo.py``) or data read (``data.py``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILE_DIR = Path(__file__).parent / "profiles"


@dataclass(frozen=True)
class ModelsConfig:
    base: str  # hub id | local folder | zoo:<recipe>/base
    refiner: str  # hub id | local folder | zoo:<recipe>/refiner
    vae: str | None = None  # optional replacement VAE, e.g. an fp16-safe one


@dataclass(frozen=True)
class DataConfig:
    pairs: str = "tatoeba"  # "tatoeba" | a .tsv/.jsonl file | "hf:<dataset id or folder>"
    ja_field: str = "ja"  # column/field names for jsonl and datasets sources
    en_field: str = "en"
    valid_fraction: float = 0.01
    test_fraction: float = 0.01
    max_pairs: int | None = None  # cap on pairs read (None: all)
    streaming: bool = False  # datasets sources: stream instead of downloading everything


@dataclass(frozen=True)
class TokenizerConfig:
    source: str = "sentencepiece"  # "sentencepiece" (train locally) | hub id or folder holding spiece.model
    vocab_size: int = 8000  # locally trained sentencepiece only
    train_sentences: int = 100_000  # locally trained sentencepiece only
    max_length: int = 77  # SDXL's text context


@dataclass(frozen=True)
class GenerateConfig:
    height: int = 1024
    width: int = 1024
    steps: int = 40
    guidance_scale: float = 7.5
    high_noise_frac: float = 0.8  # base denoises [0, 0.8), the refiner [0.8, 1]


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    models: ModelsConfig
    device: str = "auto"  # "cpu" | "cuda" | "auto" (cuda when available)
    dtype: str = "float32"  # "float32" | "float16" | "bfloat16"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    expected_minutes: dict[str, float] = field(default_factory=dict)  # notebook stem -> minutes, for the docs

    def torch_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"models": ModelsConfig, "data": DataConfig, "tokenizer": TokenizerConfig, "generate": GenerateConfig}


def _build(cls, values: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    return cls(**values)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path | Profile = "tiny") -> Profile:
    """Load a shipped profile by name (``"tiny"``) or any profile TOML file by path."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise FileNotFoundError(
            f"No profile {str(name_or_path)!r}. Pick one of {available_profiles()} or pass the path of a .toml file "
            f"shaped like {PROFILE_DIR / 'tiny.toml'}."
        )
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    raw.setdefault("name", path.stem)
    for key, cls in _SECTIONS.items():
        if key in raw:
            raw[key] = _build(cls, raw[key], f"{path.name} [{key}]")
    if "models" not in raw:
        raise ValueError(f"{path.name}: a profile needs a [models] section naming base and refiner")
    return _build(Profile, raw, path.name)
