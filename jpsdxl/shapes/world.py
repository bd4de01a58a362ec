"""The shapes world: one coloured shape on white at 32x32 (six colours x three shapes), seeded images and captions in
several phrasings (which combinations and phrasings stage 3 never sees is fixed here, ``HELD_OUT_*``), and a judge
with no learning (dominant hue against the palette; shape from the mask's geometry). What ``tiny`` measures with. It
trains nothing (``training.py``) and builds no pipeline (``core/zoo.py``).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from itertools import product

import numpy as np

__all__ = [
    "IMAGE_SIZE", "COLOURS", "SHAPES", "ENGLISH_TEMPLATES", "JAPANESE_TEMPLATES", "SHAPE_FIRST",
    "TRAINED_JAPANESE_TEMPLATES", "HELD_OUT_COMBINATIONS", "HELD_OUT_JAPANESE_TEMPLATES", "phrasing_kind",
    "combinations", "english_captions", "japanese_captions", "caption_pairs", "held_out_prompts", "held_out_kinds",
    "held_out_phrasings", "Shape", "render", "random_shape", "sample", "PALETTE_HUES", "Verdict", "judge", "marks",
    "score", "english_prompts", "EVAL_SEEDS", "draws_shapes", "judged_seeds", "judged_sample",
]

IMAGE_SIZE = 32

# name -> (RGB, Japanese forms). Hues 0, 60, 120, 180, 240 and 282 degrees: saturated, far apart on the wheel.
#   adj: attributive (赤い丸), mod: "colour-noun + の" (赤色の円), pred: predicate after a te-form (丸くて赤い),
#   noun: the bare colour noun (色は赤)
COLOURS = {
    "red": dict(rgb=(255, 0, 0), adj="赤い", mod="赤色の", pred="赤い", noun="赤"),
    "yellow": dict(rgb=(255, 255, 0), adj="黄色い", mod="黄色の", pred="黄色い", noun="黄色"),
    "green": dict(rgb=(0, 255, 0), adj="緑の", mod="緑色の", pred="緑色の", noun="緑"),
    "cyan": dict(rgb=(0, 255, 255), adj="水色の", mod="水色の", pred="水色の", noun="水色"),
    "blue": dict(rgb=(0, 0, 255), adj="青い", mod="青色の", pred="青い", noun="青"),
    "purple": dict(rgb=(180, 0, 255), adj="紫の", mod="紫色の", pred="紫色の", noun="紫"),
}
# name -> Japanese forms: short noun (赤い丸), formal noun (赤色の円), te-form (丸くて赤い図形)
SHAPES = {
    "circle": dict(short="丸", formal="円", te="丸くて"),
    "square": dict(short="四角", formal="正方形", te="四角くて"),
    "triangle": dict(short="三角", formal="三角形", te="三角形で"),
}
ENGLISH_TEMPLATES = ["a {colour} {shape}", "a {shape} that is {colour}", "{colour} {shape} on a white background"]
# A family of Japanese phrasings that vary word order, particles and word forms independently (notebook 04's
# experiment): colour first or shape first, adjective or の-form, short or formal noun, te-form, 色は/形は labels.
JAPANESE_TEMPLATES = [
    "{adj}{short}",             # 0 赤い丸
    "{mod}{formal}",            # 1 赤色の円
    "{te}{pred}図形",            # 2 丸くて赤い図形   shape first
    "{adj}{formal}",            # 3 赤い円
    "{mod}{short}",             # 4 赤色の丸
    "色は{noun}、形は{short}",    # 5 色は赤、形は丸
    "形は{short}、色は{noun}",    # 6 形は丸、色は赤   shape first
    "{te}{pred}もの",            # 7 丸くて赤いもの   shape first
]
SHAPE_FIRST = {2, 6, 7}

# Stage 3 trains on these phrasings (notebook 04's experiment: the mix that teaches an unseen phrasing best), and
# never on three combinations (one per shape, no colour twice) nor on phrasing 2: stage 4 tests on those.
TRAINED_JAPANESE_TEMPLATES = [0, 1, 5, 6]
HELD_OUT_COMBINATIONS = [("cyan", "circle"), ("purple", "square"), ("yellow", "triangle")]
HELD_OUT_JAPANESE_TEMPLATES = [2]


def combinations() -> list[tuple[str, str]]:
    return list(product(COLOURS, SHAPES))


def english_captions(colour: str, shape: str) -> list[str]:
    return [t.format(colour=colour, shape=shape) for t in ENGLISH_TEMPLATES]


def japanese_captions(colour: str, shape: str) -> list[str]:
    """The combination in every phrasing of ``JAPANESE_TEMPLATES``, in order."""
    return [t.format(**COLOURS[colour], **SHAPES[shape]) for t in JAPANESE_TEMPLATES]


def caption_pairs(split: str = "train", templates: list[int] | None = None) -> list[tuple[str, str]]:
    """(Japanese, English) caption pairs: ``"train"``, the training combinations in the phrasings ``templates``
    (default: stage 3's, ``TRAINED_JAPANESE_TEMPLATES``); ``"held_out"``, stage 4's test: the held-out combinations
    in those phrasings, then every combination in the held-out phrasings. Each Japanese phrasing is paired with the
    first English phrasing ("a red circle"), the one the English model is tested with."""
    trained = TRAINED_JAPANESE_TEMPLATES if templates is None else templates
    return [(ja, en) for ja, en, _, kind, _ in _captions(trained) if (kind == "trained") == (split == "train")]


def _captions(trained: list[int]):
    """(Japanese, English, (colour, shape), kind, phrasing) for every combination in ``trained`` and the held-out
    phrasings; kind: what stage 3 never saw about it ("trained" if nothing)."""
    for colour, shape in combinations():
        en, captions = english_captions(colour, shape)[0], japanese_captions(colour, shape)
        for i in dict.fromkeys([*trained, *HELD_OUT_JAPANESE_TEMPLATES]):
            combo, phrasing = (colour, shape) in HELD_OUT_COMBINATIONS, i not in trained
            kind = ("both new" if combo and phrasing else "new combination" if combo else
                    "new phrasing" if phrasing else "trained")
            yield captions[i], en, (colour, shape), kind, i


def phrasing_kind(template: int, trained: list[int]) -> str:
    """What a phrasing brings that the ``trained`` ones lack: ``"new order"`` (only words they use, in an order
    none of them has), ``"new forms"`` (words none of them uses, in an order one has), ``"both new"``, or
    ``"new pairing"`` (their words, in their orders)."""
    def words(i):  # every word the phrasing can put in a caption, its fixed words split at the comma
        marked = ({k: f"|{v}|" for k, v in {**COLOURS[c], **SHAPES[s]}.items() if k != "rgb"}
                  for c, s in combinations())
        return {w for m in marked for w in JAPANESE_TEMPLATES[i].format(**m).replace("、", "|").split("|") if w}
    forms = words(template) <= set().union(*(words(i) for i in trained))
    order = (template in SHAPE_FIRST) in {i in SHAPE_FIRST for i in trained}
    return {(True, True): "new pairing", (True, False): "new order", (False, True): "new forms"}.get((forms, order),
                                                                                                    "both new")


def held_out_prompts() -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Stage 4's test: the held-out Japanese captions, their English captions and the (colour, shape) each asks for."""
    held = _held_out()
    return [c[0] for c in held], [c[1] for c in held], [c[2] for c in held]


def _held_out() -> list[tuple]:
    """The captions stage 4 tests on (every ``_captions`` entry not "trained"): one order for the three lists."""
    return [c for c in _captions(TRAINED_JAPANESE_TEMPLATES) if c[3] != "trained"]


def held_out_kinds() -> list[str]:
    """For each of ``held_out_prompts()``, what about it stage 3 never saw: ``"new combination"`` (a held-out
    colour-shape pair in a trained phrasing), ``"new phrasing"`` (a trained pair in a held-out phrasing) or
    ``"both new"``."""
    return [c[3] for c in _held_out()]


def held_out_phrasings() -> list[int]:
    """For each of ``held_out_prompts()``, its phrasing (an index of ``JAPANESE_TEMPLATES``)."""
    return [c[4] for c in _held_out()]


# -----------------------------------------------------------------------------
# images


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: float  # half-width in pixels
    cx: float
    cy: float


def render(s: Shape, size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """uint8 ``[size, size, 3]``: the shape in its colour on white, anti-aliased by supersampling."""
    n = size * supersample
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / supersample
    dx, dy = x - s.cx, y - s.cy
    if s.shape == "circle":
        inside = dx**2 + dy**2 <= s.size**2
    elif s.shape == "square":
        inside = (np.abs(dx) <= s.size) & (np.abs(dy) <= s.size)
    elif s.shape == "triangle":  # upright isosceles: apex at the top, base at the bottom
        height = 2 * s.size
        t = (dy + s.size) / height  # 0 at the apex row, 1 at the base row
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= s.size * t)
    else:
        raise ValueError(f"unknown shape {s.shape!r}; shapes are {list(SHAPES)}")
    cover = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))[..., None]
    colour = np.array(COLOURS[s.colour]["rgb"], dtype=np.float64)
    return np.round(255 * (1 - cover) + colour * cover).astype(np.uint8)


def random_shape(rng: np.random.Generator, colour: str | None = None, shape: str | None = None,
                 size: int = IMAGE_SIZE) -> Shape:
    """A random shape (colour and shape drawn unless given): half-width 5-10 px, fully inside the image."""
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(list(SHAPES))
    half = float(rng.uniform(5, 10)) * size / IMAGE_SIZE
    margin = half + 1
    cx, cy = (float(v) for v in rng.uniform(margin, size - margin, 2))
    return Shape(str(colour), str(shape), half, cx, cy)


def sample(n: int, seed: int | np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[Shape]]:
    """``n`` images (uint8 ``[n, size, size, 3]``) and what is in them, from ``seed`` (or a generator to draw
    from): same seed, same images."""
    rng = np.random.default_rng(seed)
    shapes = [random_shape(rng, size=size) for _ in range(n)]
    return np.stack([render(s, size) for s in shapes]), shapes


# -----------------------------------------------------------------------------
# the judge


PALETTE_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in spec["rgb"]))[0] * 360 for name, spec in COLOURS.items()}


@dataclass(frozen=True)
class Verdict:
    colour: str | None  # None: no shape found
    shape: str | None
    fill: float  # mask area / bounding-box area (circle ~0.79, square ~1, triangle ~0.5): shown, not decisive
    pixels: int


def judge(image: np.ndarray, min_saturation: float = 0.35, min_pixels: int = 6) -> Verdict:
    """What a 32x32-ish RGB image (uint8 or float in [0, 1]) shows: colour and shape of its saturated blob."""
    img = np.asarray(image, dtype=np.float64)
    img = img / 255 if img.max() > 1.0 else img
    mx, mn = img.max(-1), img.min(-1)
    saturation = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-8), 0)
    mask = (saturation > min_saturation) & (mx > 0.25)
    if mask.sum() < min_pixels:
        return Verdict(None, None, 0.0, int(mask.sum()))
    # dominant hue: the circular mean of the blob's hues, weighted by saturation
    r, g, b = (img[..., i][mask] for i in range(3))
    hue = np.array([colorsys.rgb_to_hsv(*px)[0] for px in zip(r, g, b)]) * 2 * math.pi
    w = saturation[mask]
    mean = math.atan2((w * np.sin(hue)).sum(), (w * np.cos(hue)).sum()) % (2 * math.pi) * 180 / math.pi
    colour = min(PALETTE_HUES, key=lambda c: min(abs(mean - PALETTE_HUES[c]), 360 - abs(mean - PALETTE_HUES[c])))
    # shape from the mask's geometry in its bounding box: a triangle narrows upwards; a square fills its corners,
    # a circle leaves them empty (soft, generated edges lower a square's overall fill, not its corners much)
    ys, xs = np.nonzero(mask)
    box = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w_ = box.shape
    fill = box.mean()
    rows = box.sum(1)
    top, bottom = rows[: max(1, h // 3)].mean(), rows[-max(1, h // 3):].mean()
    ch, cw = max(1, round(h / 5)), max(1, round(w_ / 5))
    corners = np.mean([box[:ch, :cw].mean(), box[:ch, -cw:].mean(), box[-ch:, :cw].mean(), box[-ch:, -cw:].mean()])
    if top < 0.6 * bottom:
        shape = "triangle"
    elif corners > 0.5:
        shape = "square"
    else:
        shape = "circle"
    return Verdict(colour, shape, float(fill), int(mask.sum()))


def marks(images, targets: list[tuple[str, str]]) -> list[tuple[bool, bool]]:
    """(right colour, right shape) for each image against its target (colour, shape)."""
    verdicts = [judge(im) for im in images]
    return [(v.colour == c, v.shape == s) for v, (c, s) in zip(verdicts, targets)]


def score(images, targets: list[tuple[str, str]]) -> dict:
    """Share of images whose judged colour, shape, and both match ``targets`` [(colour, shape), ...]."""
    colour, shape = zip(*marks(images, targets)) if len(targets) else ((), ())
    return {"colour": float(np.mean(colour)), "shape": float(np.mean(shape)),
            "both": float(np.mean([a and b for a, b in zip(colour, shape)])), "n": len(targets),
            "chance_colour": 1 / len(COLOURS), "chance_shape": 1 / len(SHAPES),
            "chance_both": 1 / (len(COLOURS) * len(SHAPES))}


# -----------------------------------------------------------------------------
# measuring a pipeline on the shapes world


def english_prompts() -> tuple[list[str], list[tuple[str, str]]]:
    """"a {colour} {shape}" for every combination, and the targets the judge checks them against."""
    combos = combinations()
    return [english_captions(c, s)[0] for c, s in combos], combos


EVAL_SEEDS = tuple(range(1000, 1008))  # never used in training (its generators are seeded 0-500)


def draws_shapes(profile) -> bool:
    """Is the profile's SDXL the one trained on this world (the zoo's ``shapes`` recipe)? Only then does the judge
    read anything meaningful in its images; a real SDXL draws a red circle its own way, at 1024²."""
    return profile.models.base.startswith("zoo:shapes/")


def judged_seeds(profile, seeds: int = len(EVAL_SEEDS)) -> tuple[int, ...]:
    """The first ``seeds`` evaluation seeds in the shapes world; one on any other model, where the judge's numbers
    say nothing and the images only show the pipeline at work (each seed is an image per prompt, at 1024²)."""
    return EVAL_SEEDS[:seeds] if draws_shapes(profile) else EVAL_SEEDS[:1]


def judged_sample(profile, prompts: list, targets: list, seeds: int = len(EVAL_SEEDS)) -> tuple[list, list, tuple]:
    """(prompts, targets, seeds) a notebook draws for the judge: all of them in the shapes world; on any other model
    the first six prompts with one seed, at a bounded cost (every combination with eight seeds is 144 images, hours
    at 1024² on a T4)."""
    keep = None if draws_shapes(profile) else 6
    return list(prompts)[:keep], list(targets)[:keep], judged_seeds(profile, seeds)


