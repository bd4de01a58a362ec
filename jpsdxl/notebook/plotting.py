"""Plots with readable Japanese, and small display helpers for the notebooks; nothing here is a measurement.
Matplotlib's default font has no Japanese glyphs (tofu boxes □□□), so we register IPAexGothic from the
``matplotlib-fontja`` wheel (offline, CI and Colab alike), locating its file without importing the package, which
would restyle matplotlib as a side effect.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

JAPANESE_FONT = "IPAexGothic"


def japanese_font_path() -> Path:
    spec = importlib.util.find_spec("matplotlib_fontja")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("matplotlib-fontja is not installed: `pip install matplotlib-fontja` (Japanese font).")
    return Path(list(spec.submodule_search_locations)[0]) / "fonts" / "ipaexg.ttf"


def use_japanese_font() -> str:
    """Register IPAexGothic with matplotlib and make it the default; returns the family name."""
    import matplotlib
    from matplotlib import font_manager

    font_manager.fontManager.addfont(str(japanese_font_path()))
    matplotlib.rcParams["font.family"] = [JAPANESE_FONT, "DejaVu Sans"]
    matplotlib.rcParams["axes.unicode_minus"] = False  # IPAexGothic lacks U+2212; use ASCII minus
    return JAPANESE_FONT


def missing_glyphs(text: str, family: str = JAPANESE_FONT) -> list[str]:
    """Characters of ``text`` that ``family`` cannot draw (they would show as tofu boxes)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    font = FT2Font(font_manager.findfont(family, fallback_to_default=False))
    charmap = font.get_charmap()
    return sorted({c for c in text if not c.isspace() and ord(c) not in charmap})


def bar_compare(ax, labels, series: dict[str, list[float]], title: str = "", ylabel: str = "", fmt: str = "{:.2f}"):
    """Grouped bars: one group per label, one bar per series, values written on the bars."""
    import numpy as np

    x = np.arange(len(labels))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8)
    ax.set_xticks(x, labels)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend()
    return ax


def image_grid(images, titles=None, columns: int | None = None, scale: float = 1.3, title: str = ""):
    """A figure of images (``[n, H, W, 3]`` uint8 or float) with optional (Japanese) titles under each."""
    import matplotlib.pyplot as plt
    import numpy as np

    images = np.asarray(images)
    n = len(images)
    columns = columns or min(n, 9)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * scale, rows * (scale + 0.35)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def demo_grid(real: dict, scale: float = 2.2):
    """The demo grid of ``measure.real_prompts``: one row per model, one column per demo prompt, each titled by the
    prompt that model drew (the English model the English, the others the Japanese)."""
    import numpy as np

    names, demo = list(real["demo"]), [p for p in real["prompts"] if p.demo]
    return image_grid(np.concatenate([real["demo"][n] for n in names]),
                      [f"{n}\n{p.en if n.startswith('English') else p.ja}" for n in names for p in demo],
                      columns=len(demo), scale=scale)


def _two_lines(caption: str, width: int = 6) -> str:
    """A caption longer than ``width`` characters over two lines (at the space nearest its middle, else after 、, て
    or で where it has one), so that neighbouring column titles do not run into each other."""
    if len(caption) <= width:
        return caption
    spaces = [i for i, c in enumerate(caption) if c == " "]
    if spaces:
        cut = min(spaces, key=lambda i: abs(i - len(caption) / 2))
        return caption[:cut] + "\n" + caption[cut + 1:]
    cut = next((caption.index(c) + 1 for c in "、てで" if c in caption[1:-1]), len(caption) // 2)
    return caption[:cut] + "\n" + caption[cut:]


def judged_grid(images: dict, marks: dict[str, list[tuple[bool, bool]]], titles: list[str],
                groups: list[str] | None = None, scale: float = 0.85):
    """One panel per group of prompts (``groups``: a label per prompt, e.g. ``shapes.held_out_kinds()``), in it
    one row per model (``images[name]``: ``[prompts, H, W, 3]``) and one column per prompt, each image framed by what
    the judge found (``marks[name]``: (right colour, right shape) per image, from ``shapes.marks``): green both right,
    orange one of the two, red neither. Each row says how many of its panel's images are right."""
    import matplotlib.pyplot as plt
    import numpy as np

    frame = {2: "#1a9850", 1: "#fdae61", 0: "#d73027"}
    groups = groups or [""] * len(titles)
    panels = {g: [i for i, x in enumerate(groups) if x == g] for g in dict.fromkeys(groups)}
    names, width = list(images), max(len(p) for p in panels.values())
    fig = plt.figure(figsize=(width * scale + 1.8, len(panels) * (len(names) * scale + 0.9) + 0.4),
                     layout="constrained")
    for sub, (group, columns) in zip(np.atleast_1d(fig.subfigures(len(panels), 1)), panels.items()):
        axes = sub.subplots(len(names), width, squeeze=False)
        for r, name in enumerate(names):
            for c, ax in enumerate(axes[r]):
                ax.set_xticks([])
                ax.set_yticks([])
                if c >= len(columns):  # a narrower panel: blank cells on the right
                    ax.axis("off")
                    continue
                ax.imshow(images[name][columns[c]], interpolation="nearest")
                for spine in ax.spines.values():
                    spine.set_color(frame[sum(marks[name][columns[c]])])
                    spine.set_linewidth(3)
                if r == 0:
                    ax.set_title(_two_lines(titles[columns[c]]), fontsize=7)
            right = sum(all(marks[name][i]) for i in columns)
            axes[r][0].set_ylabel(f"{name}\n{right}/{len(columns)}", fontsize=8, rotation=0, ha="right", va="center")
        if group:
            sub.suptitle(f"{group} ({len(columns)} caption{'' if len(columns) == 1 else 's'})", fontsize=10,
                         fontweight="bold")
    fig.suptitle("緑: 色と形が正しい / 橙: どちらか一方 / 赤: どちらも違う "
                 "(green: colour and shape right, orange: one of them, red: neither)", fontsize=9)
    return fig


def training_curves(logs: dict[str, list], keys=("eval_loss", "eval_pool100_top1"), chance: float | None = None,
                    titles=("held-out loss (lower is better)", "pool-100 top-1 (higher is better)")):
    """One panel per logged metric, one line per run, over optimiser steps (stage 3's ``Run.log`` rows). A run given
    as a list of logs (the same run over several seeds) is drawn as the seeds' mean with their range shaded."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 3.4), squeeze=False)
    for ax, key, title in zip(axes[0], keys, titles):
        for name, log in logs.items():
            seeds = log if log and isinstance(log[0], list) else [log]
            rows = [[r for r in one if r.get(key) not in (None, "")] for one in seeds]
            steps = [r["step"] for r in rows[0]]
            values = np.array([[float(r[key]) for r in one] for one in rows])  # seeds x evaluations
            line, = ax.plot(steps, values.mean(0), marker="o", ms=3,
                            label=name if len(seeds) == 1 else f"{name} (mean of {len(seeds)} seeds)")
            if len(seeds) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2, lw=0)
        if chance is not None and "top1" in key:
            ax.axhline(chance, color="crimson", ls="--", lw=1, label="chance")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def phrasing_curve(summary: list[dict], held_out: int, title: str = ""):
    """Both-right rate on each tested phrasing against k, the number of phrasings stage 3 trained on (rows of
    ``phrasings.summary``), with 95 % Wilson intervals; hollow markers: trained without the general sentence pairs."""
    import matplotlib.pyplot as plt

    from .measure import wilson

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for phrasing in sorted({r["phrasing"] for r in summary}):
        for general in (True, False):
            rows = sorted((r for r in summary if r["phrasing"] == phrasing and r["general pairs"] == general),
                          key=lambda r: r["k"])
            if not rows:
                continue
            ks, rates = [r["k"] for r in rows], [r["both right"] for r in rows]
            low, high = zip(*(wilson(r["hits"], r["n"]) for r in rows))
            label = f"「{rows[0]['example']}」" + (" (held out of stage 3)" if phrasing == held_out else "")
            ax.errorbar(ks, rates, yerr=[[r - lo for r, lo in zip(rates, low)], [hi - r for r, hi in zip(rates, high)]],
                        marker="o", capsize=3, mfc="white" if not general else None, ls="-" if general else "none",
                        label=label + ("" if general else ", captions only"))
    ax.axhline(0.8, color="grey", ls=":", lw=1)
    ax.set_xticks(sorted({r["k"] for r in summary}))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("学習した言い回しの数 k (phrasings stage 3 trained on)")
    ax.set_ylabel("both right (95 % interval)")
    ax.set_title(title or "見たことのない言い回し (phrasings never trained on)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def colour_confusion(table: dict[str, dict[str, int]], title: str = ""):
    """A heat map of ``phrasings.colour_confusion``: asked colour (rows) against the colour the judge found."""
    import matplotlib.pyplot as plt
    import numpy as np

    asked = list(table)
    found = asked + sorted({f for row in table.values() for f in row} - set(asked))
    counts = np.array([[table[a].get(f, 0) for f in found] for a in asked])
    fig, ax = plt.subplots(figsize=(0.55 * len(found) + 2, 0.45 * len(asked) + 1.4))
    ax.imshow(counts, cmap="Blues")
    for (r, c), v in np.ndenumerate(counts):
        if v:
            ax.text(c, r, v, ha="center", va="center", fontsize=8, color="white" if v > counts.max() / 2 else "black")
    ax.set_xticks(range(len(found)), found, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(asked)), asked, fontsize=8)
    ax.set_xlabel("judged colour")
    ax.set_ylabel("asked colour")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
