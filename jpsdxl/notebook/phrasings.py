"""Notebook 04's experiment: which training phrasings teach stage 3 a Japanese phrasing it never saw? Stage 3 on
nested mixes of the shapes world's phrasings (equal steps, several seeds, with or without the general sentence
pairs), each student judged on the phrasings its mix lacks, by kind (``shapes.phrasing_kind``). Keeps no model.
"""

from __future__ import annotations

import dataclasses

from ..distillation import distil
from ..generation import place, with_text_parts
from ..shapes.world import (TRAINED_JAPANESE_TEMPLATES, caption_pairs, combinations, japanese_captions, judge,
                            phrasing_kind)
from .measure import evaluate

# k phrasings -> which (JAPANESE_TEMPLATES indices), nested; the largest is stage 3's default mix
MIXES = {1: [0], 2: [0, 5], 4: [0, 5, 1, 6]}
TESTED = [2, 5, 6]  # judged where a mix lacks them: 2 is stage 4's held-out phrasing (7 reads like 2: left out, for time)
assert sorted(MIXES[max(MIXES)]) == sorted(TRAINED_JAPANESE_TEMPLATES)


def with_captions(setup, templates: list[int], general: bool = True):
    """Stage 3's setup training on the shapes captions in ``templates``: beside the general sentence pairs (as
    ``distill.shapes_share`` mixes them), or (``general=False``) alone, as the whole training split."""
    captions = caption_pairs("train", templates)
    if general:
        return dataclasses.replace(setup, extra_pairs=captions)
    return dataclasses.replace(setup, splits=dataclasses.replace(setup.splits, train=captions), extra_pairs=[])


def run(setup, english, steps: int, seeds: int = 2, eval_seeds=(1000,), mixes: dict = MIXES,
        without_general: tuple = (max(MIXES),), progress: bool = True) -> list[dict]:
    """One row per (mix, general pairs or not, seed, tested phrasing): the judge's hits on every combination in that
    phrasing (``n`` images: combinations x ``eval_seeds``), its kind, and each image's asked and judged colour.
    Every mix trains with the general pairs; those in ``without_general`` also without them."""
    from tqdm.auto import tqdm

    p = setup.profile
    todo = [(k, general, seed) for k in mixes for general in ((True, False) if k in without_general else (True,))
            for seed in range(p.seed, p.seed + seeds)]
    quiet = setup.validation(2)  # the students are judged by their images: the trainer's own evaluation on 2 pairs
    rows, targets = [], combinations()
    for k, general, seed in tqdm(todo, desc="phrasing mixes", disable=not progress):
        trained = dataclasses.replace(with_captions(setup, mixes[k], general), held_out=quiet)
        students = distil(trained, steps=steps, seed=seed, eval_every=steps, progress=False,
                          shapes_share=p.distill.shapes_share if general else 0.0).students.eval()
        pipes = place(p, *with_text_parts(english, students.text_encoder, students.text_encoder_2,
                                          setup.tokenizer, setup.tokenizer_2))
        for template in (t for t in TESTED if t not in mixes[k]):
            prompts = [japanese_captions(c, s)[template] for c, s in targets]
            scores, images = evaluate(p, *pipes, prompts, targets, seeds=eval_seeds)
            seen = [judge(image).colour for image in images.reshape(-1, *images.shape[2:])]
            rows.append({"k": k, "general pairs": general, "seed": seed, "phrasing": template,
                         "example": prompts[0], "kind": phrasing_kind(template, mixes[k]),
                         "hits": round(scores["both"] * scores["n"]), "n": scores["n"],
                         "colours": list(zip([c for c, _ in targets] * len(eval_seeds), seen))})
        del students, pipes
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """The rows' seeds pooled: one row per (k, general pairs, phrasing) with hits, n and the rate."""
    out = {}
    for r in rows:
        key = (r["k"], r["general pairs"], r["phrasing"])
        if key not in out:
            out[key] = {**{k: r[k] for k in ("k", "general pairs", "phrasing", "example", "kind")}, "hits": 0, "n": 0,
                        "seeds": 0}
        out[key]["hits"] += r["hits"]
        out[key]["n"] += r["n"]
        out[key]["seeds"] += 1
    return [{**r, "both right": r["hits"] / r["n"]} for r in out.values()]


def colour_confusion(rows: list[dict], phrasing: int, k: int) -> dict[str, dict[str, int]]:
    """{asked colour: {judged colour: images}} for one tested phrasing at one k (with the general pairs, every seed):
    where the colours go when a student misreads them (``None``: no colour found)."""
    table: dict = {}
    for r in rows:
        if r["phrasing"] == phrasing and r["k"] == k and r["general pairs"]:
            for asked, seen in r["colours"]:
                table.setdefault(asked, {}).setdefault(str(seen), 0)
                table[asked][str(seen)] += 1
    return table
