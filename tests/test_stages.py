"""The recipe's stages as commands, chained only through their outputs: the caches make them faster, nothing else.

Stages 1-4 run twice through the ``jpsdxl`` command on a small copy of ``tiny``: once with the caches kept, once in a
cache of their own that loses everything but the models and the downloads before each stage. Same mapping, same
students (bit for bit: the same computation on the same machine), same images.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jpsdxl.cli import main
from jpsdxl.core.profiles import derive, load_profile, save_profile

KEPT = ("zoo", "pkgs", "standin-hub")  # the models and the downloads: what a new runtime fetches, not a cache


def _stages(profile: str, out: Path, before_each=lambda: None) -> None:
    for args in (["tokenizer"], ["init"], ["distill", "--steps", "4"],
                 ["generate", "赤い丸", "青い四角", "--out", str(out / "image.png")]):
        before_each()
        assert main([*args, "--profile", profile]) == 0, args


def _outputs(runs: Path, out: Path) -> dict:
    mapping = torch.load(runs / "02_embedding_init" / "mapping.pt", weights_only=True)
    students = {name: load_file(runs / "03_distillation" / name / "model.safetensors")
                for name in ("text_encoder", "text_encoder_2")}
    return {"mapping": mapping, "students": students,
            "images": [p.read_bytes() for p in sorted(out.glob("image-*.png"))]}


@pytest.mark.slow
def test_stages_1_to_4_give_the_same_outputs_with_every_cache_deleted_between_them(tmp_path, monkeypatch, capsys):
    shared = Path(os.environ.get("JPSDXL_CACHE", "~/.cache/jpsdxl")).expanduser()
    profile = save_profile(derive(load_profile("tiny"), name="chain",
                                  tokenizer={"vocab_size": 2000, "train_sentences": 20_000, "character_coverage": 0.98},
                                  init={"candidates": "latin_words"}, distill={"eval_pairs": 200}),
                           tmp_path / "chain.toml")

    monkeypatch.setenv("JPSDXL_RUNS", str(tmp_path / "kept"))
    _stages(str(profile), tmp_path / "kept")
    kept = _outputs(tmp_path / "kept" / "chain", tmp_path / "kept")

    own = tmp_path / "cache"
    own.mkdir()
    for name in KEPT:
        if (shared / name).exists():
            (own / name).symlink_to(shared / name)

    def lose_the_caches():
        for entry in own.iterdir():
            if entry.name not in KEPT:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    monkeypatch.setenv("JPSDXL_CACHE", str(own))
    monkeypatch.setenv("JPSDXL_RUNS", str(tmp_path / "lost"))
    _stages(str(profile), tmp_path / "lost", lose_the_caches)
    lost = _outputs(tmp_path / "lost" / "chain", tmp_path / "lost")

    assert {k for k in os.listdir(own)} - set(KEPT), "the stages wrote no cache: nothing was deleted between them"
    rows = (tmp_path / "lost" / "chain" / "02_embedding_init" / "mapping.tsv").read_text(encoding="utf-8").splitlines()
    best = {r.split("\t")[0]: r.split("\t")[1] for r in rows[1:]}  # what `jpsdxl init` alone writes, readable
    assert rows[0] == "ja_piece\ten_token\tscore" and len(rows) == len(lost["mapping"]["ja_ids"]) + 1
    assert best["猫"] == "cat" and best["犬"] == "dog"
    assert kept["mapping"].keys() == lost["mapping"].keys()
    for key, value in kept["mapping"].items():
        assert torch.equal(value, lost["mapping"][key]) if torch.is_tensor(value) else value == lost["mapping"][key]
    for name, weights in kept["students"].items():
        assert all(torch.equal(weights[k], lost["students"][name][k]) for k in weights), name
    assert len(kept["images"]) == 2 and kept["images"] == lost["images"]
