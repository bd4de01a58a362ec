"""Stage 3: the trainer. Resuming, two processes, NaN handling, bad data lines, saved folders, the student variants.

Runs use a small profile (a 3,000-pair TSV with bad lines in it, a 2,000-piece tokenizer, a few steps of batch 8)
on the shapes world's tiny teachers: seconds per run, and every path the full run takes (accelerate, checkpoints,
from_pretrained folders) except the GPU's precisions.
"""

import copy
import dataclasses
import json
import os
import random
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

from jpsdxl import cli
from jpsdxl import distillation as D
from jpsdxl import shapes
from jpsdxl.notebook import phrasings
from jpsdxl.data import pair_stream
from jpsdxl.core.profiles import DistillConfig, derive, load_profile, save_profile

STEPS = 6


@pytest.fixture(scope="module")
def small_profile(tmp_path_factory, splits):
    """A profile on a TSV of 3,000 Tatoeba pairs with three bad lines (lines 5, 9 and 3003)."""
    folder = tmp_path_factory.mktemp("distill_profile")
    pairs = random.Random(0).sample(splits.train, 2800) + splits.test[:200]
    lines = [f"{ja}\t{en}" for ja, en in pairs]
    lines.insert(4, "only one column")
    lines.insert(8, "\tempty Japanese side")
    lines.append("a\tb\tc")
    (folder / "pairs.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # tiny's settings but its [distill] section, which becomes a few steps of batch 8 on the defaults
    return derive(load_profile("tiny"), name="small",
                  data={"pairs": str(folder / "pairs.tsv"), "valid_fraction": 0.02, "test_fraction": 0.05},
                  tokenizer={"vocab_size": 2000, "character_coverage": 0.98, "train_sentences": 3000},
                  distill=DistillConfig(steps=6, batch_size=8, lr=3e-4, warmup_steps=1, eval_pairs=64, eval_every=3,
                                        checkpoint_every=2, cache_teacher=True, init="mean", shapes_share=0.25))


@pytest.fixture(scope="module")
def setup(small_profile):
    from jpsdxl.tokenization import run as stage_1

    stage_1(small_profile)  # the tokenizers stage 3 reads
    return D.prepare(small_profile)


def weights(students):
    return {k: v.detach().clone() for k, v in students.state_dict().items()}


def assert_same_step(a: dict, b: dict, lr: float, steps: int = 2, atol: float = 1e-5) -> None:
    """The same weights after the same optimiser steps, up to another CPU's rounding. Adam normalises each step, so a
    parameter whose gradient is zero up to rounding (an attention key bias: softmax ignores a constant added to
    every key of a query) moves by up to ``lr`` a step on rounding alone: it is held to that bound instead."""
    for k in a:
        diff = float((a[k] - b[k]).abs().max())
        if k.endswith("k_proj.bias"):
            assert diff <= 2 * lr * steps, (k, diff)
        else:
            assert diff <= atol, (k, diff)


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    return D.distil(setup, folder, progress=False), folder


def test_training_lowers_the_held_out_loss_and_logs_it(straight):
    run, folder = straight
    assert run.steps == STEPS and run.after["loss"] < run.before["loss"]
    rows = (folder / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) >= 3  # step 0 (held-out), then eval rows at 3 and 6
    assert D.latest_checkpoint(folder).name == f"step-{STEPS:07d}"
    assert len(list((folder / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints


def test_a_killed_run_resumes_to_the_same_weights(setup, straight, tmp_path):
    run, _ = straight
    # "killed" after 3 steps: the checkpoint at step 2 exists, step 3 is lost, as with kill -9
    first = D.distil(setup, tmp_path, progress=False, stop_after=3)
    assert first.steps == 3 and D.latest_checkpoint(tmp_path).name == "step-0000002"
    partial = tmp_path / "checkpoints" / ".step-0000004.partial"  # half-written by the killed process: ignored
    partial.mkdir()
    (partial / "trainer_state.json").write_text('{"step": 4}')
    resumed = D.distil(setup, tmp_path, progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == STEPS
    a, b = weights(run.students), weights(resumed.students)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.log == run.log  # the same losses at the same steps, held-out rows included
    # and a run that does not resume starts again from step 0
    fresh = D.distil(setup, tmp_path, progress=False, resume=False, steps=2)
    assert fresh.resumed_from is None and fresh.steps == 2


@pytest.mark.parametrize("pad_positions", [None, 0])  # 0: each step computes only through its batch's last EOS
def test_gradient_accumulation_gives_the_same_step_as_one_big_batch(setup, pad_positions):
    one = D.distil(setup, progress=False, steps=2, pad_positions=pad_positions)
    two = D.distil(setup, progress=False, steps=2, grad_accum=2, pad_positions=pad_positions)
    a, b = weights(one.students), weights(two.students)
    assert_same_step(a, b, setup.profile.distill.lr)
    assert not torch.equal(a["text_encoder.embeddings.token_embedding.weight"],
                           weights(D.make_students(setup.teachers, setup.tokenizer, setup.tokenizer_2, "mean"))[
                               "text_encoder.embeddings.token_embedding.weight"])


def test_resuming_with_other_settings_is_refused(setup, straight):
    _, folder = straight
    with pytest.raises(ValueError, match="batch_size 8"):
        D.distil(setup, folder, progress=False, batch_size=4)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    students = D.make_students(setup.teachers, setup.tokenizer, setup.tokenizer_2, "mean")
    calls = []

    def poison(module, args, output):  # from the 4th training batch on, the encoder's output is NaN
        calls.append(1)
        if len(calls) > 4 and module.training:
            output.text_embeds = output.text_embeds * float("nan")
        return output

    students.text_encoder_2.register_forward_hook(poison)
    with pytest.raises(D.NonFiniteLoss,
                       match=r"became nan .*at step \d.*checkpoint, with finite weights, is kept: .*step-0000002"):
        D.train(setup.teachers, students, setup.pairs(0.0), setup.held_out, setup.profile.distill, folder=tmp_path,
                progress=False)
    good = D.latest_checkpoint(tmp_path)
    assert good.name == "step-0000002"
    assert json.loads((good / "trainer_state.json").read_text())["step"] == 2


def test_bad_lines_are_reported_with_their_numbers_and_skipped(straight):
    run, _ = straight
    assert "skipped 3:" in run.bad_lines
    assert "1 x wrong column count (expected 2, got 1) (lines 5)" in run.bad_lines
    assert "1 x empty Japanese side (lines 9)" in run.bad_lines
    assert "1 x wrong column count (expected 2, got 3) (lines 3003)" in run.bad_lines
    assert run.steps == STEPS  # and training went on past them


def test_saved_folders_load_with_from_pretrained(straight, tmp_path):
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    run, _ = straight
    D.save_students(run.students, tmp_path)
    te1 = CLIPTextModel.from_pretrained(tmp_path / "text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(tmp_path / "text_encoder_2")
    tok1 = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "tokenizer_2")
    sentences = ["赤い丸", "猫が好きです。"]
    assert torch.equal(D.token_ids(tok1, sentences), D.token_ids(run.students.tokenizer, sentences))
    assert torch.equal(D.token_ids(tok2, sentences), D.token_ids(run.students.tokenizer_2, sentences))
    again = D.encode(te1, te2, tok1, tok2, sentences)
    direct = D.encode(run.students.text_encoder, run.students.text_encoder_2, run.students.tokenizer,
                      run.students.tokenizer_2, sentences)
    assert all(torch.allclose(getattr(again, t), getattr(direct, t), atol=1e-6) for t in D.TARGETS)


@pytest.mark.slow
def test_two_processes_through_accelerate_launch_give_the_same_loss(small_profile, tmp_path, capsys):
    """The same global batch over 2 CPU processes (gloo) as over 1: the same losses, the same weights; with
    pad_positions too (the processes agree on one length per step)."""
    profile = save_profile(derive(small_profile, name="small_pad", distill={"pad_positions": 0}),
                           tmp_path / "small_pad.toml")  # a file: the launched processes read --profile FILE

    def log(out):
        rows = [r.split(",") for r in (out / "log.csv").read_text().splitlines()]
        return [dict(zip(rows[0], r)) for r in rows[1:]], out

    # one process: the CLI in this process (a third interpreter would only start, import and load again)
    assert cli.main(["tokenizer", "--profile", str(profile)]) == 0  # stage 1, read by both runs
    assert cli.main(["distill", "--profile", str(profile), "--out", str(tmp_path / "one"), "--steps", "4"]) == 0
    assert "processes: 1" in capsys.readouterr().out
    one, out1 = log(tmp_path / "one")
    # --multi_gpu is accelerate's launcher for N local processes (torch.distributed.run); on a machine without CUDA
    # the trainer asks accelerate for CPU processes, which then form a gloo group
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29502",
           "-m", "jpsdxl.cli", "distill", "--profile", str(profile), "--out", str(tmp_path / "two"), "--steps", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes: 2" in done.stdout  # really 2 processes in one group, not 2 separate runs
    two, out2 = log(tmp_path / "two")
    for a, b in zip(one, two):
        for key in ("train_h1", "train_h2", "train_pooled"):
            if a.get(key):
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4), (a["step"], key)
    from safetensors.torch import load_file

    w1, w2 = (load_file(o / "text_encoder_2" / "model.safetensors") for o in (out1, out2))
    assert_same_step({f"text_encoder_2.{k}": v for k, v in w1.items()}, {f"text_encoder_2.{k}": v for k, v in w2.items()},
                     small_profile.distill.lr, steps=4)


def test_processes_split_each_global_batch_without_overlap():
    seq = [(f"ja{i}", f"en{i}") for i in range(40)]
    one = list(D.batches(iter(seq), 8, rank=0, world=1, streamed=False))
    halves = [list(D.batches(iter(seq), 8, rank=r, world=2, streamed=False)) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == one


def test_pair_stream_is_seeded_resumable_and_mixes_in_shapes():
    corpus = [(f"ja{i}", f"en{i}") for i in range(1000)]
    shapes = [("赤い丸", "a red circle")]
    first = list(islice(pair_stream(corpus, shapes, 0.2, seed=1), 3000))
    assert list(islice(pair_stream(corpus, shapes, 0.2, seed=1, start=1234), 100)) == first[1234:1334]
    share = sum(p == shapes[0] for p in first) / len(first)
    assert 0.17 < share < 0.23
    other = list(islice(pair_stream(corpus, shapes, 0.2, seed=2), 3000))
    assert other != first
    assert set(p for p in first[:1500] if p != shapes[0]) <= set(corpus)


def test_non_causal_student_reads_the_future_and_causal_does_not(setup):
    ids = D.token_ids(setup.tokenizer, ["赤い丸と青い四角", "赤い丸と青い三角"])
    assert not torch.equal(ids[0], ids[1])
    differ = int((ids[0] != ids[1]).nonzero()[0])
    for causal in (True, False):
        s = D.make_students(setup.teachers, setup.tokenizer, setup.tokenizer_2, "random", causal=causal).eval()
        with torch.no_grad():
            h = s.text_encoder(ids, output_hidden_states=True).hidden_states[-1]
        same_prefix = torch.allclose(h[0, :differ], h[1, :differ], atol=1e-6)
        assert same_prefix is causal


def test_after_both_eos_keeps_the_positions_where_both_sides_have_read_everything():
    student = torch.tensor([[5, 6, 3, 0, 0, 0], [5, 3, 0, 0, 0, 0]])
    teacher = torch.tensor([[9, 7, 7, 8, 8, 8], [9, 7, 7, 7, 7, 8]])
    mask = D.after_both_eos(student, teacher, student_eos=3, teacher_eos=8)
    assert mask.tolist() == [[False, False, False, True, True, True], [False, False, False, False, False, True]]


def test_weighted_loss_uses_the_weights():
    terms = {"h1": torch.tensor(1.0), "h2": torch.tensor(2.0), "pooled": torch.tensor(3.0)}
    assert float(D.weighted_loss(terms, {"h1": 1, "h2": 1, "pooled": 1})) == 6.0
    assert float(D.weighted_loss(terms, {"pooled": 0.0})) == 3.0  # missing weights count 1


def test_positions_needed_reaches_the_latest_eos_of_the_batch_plus_the_padding():
    student = torch.tensor([[5, 6, 3, 0, 0, 0, 0, 0, 0, 0], [5, 3, 0, 0, 0, 0, 0, 0, 0, 0]])
    teacher = torch.tensor([[9, 7, 7, 8, 8, 8, 8, 8, 8, 8], [9, 7, 7, 7, 7, 8, 8, 8, 8, 8]])
    assert D.positions_needed(student, teacher, 3, 8, pad_positions=0) == 6  # through the teacher's EOS at 5
    assert D.positions_needed(student, teacher, 3, 8, pad_positions=2) == 8
    assert D.positions_needed(student, teacher, 3, 8, pad_positions=50) == 10  # never more than there are


def test_a_causal_student_gives_the_same_outputs_on_the_positions_it_computes(setup):
    s = D.make_students(setup.teachers, setup.tokenizer, setup.tokenizer_2, "random").eval()
    ids = [D.token_ids(t, ["赤い丸と青い四角", "猫が好きです。"]) for t in (setup.tokenizer, setup.tokenizer_2)]
    n = D.positions_needed(ids[0], ids[0], setup.tokenizer.eos_token_id, setup.tokenizer.eos_token_id, 3)
    with torch.no_grad():
        full, short = D.forward(s.text_encoder, s.text_encoder_2, *ids), D.forward(
            s.text_encoder, s.text_encoder_2, ids[0][:, :n], ids[1][:, :n])
    assert n < 77 and short.h1.shape[1] == n
    for t in D.TARGETS:
        assert torch.allclose(getattr(full.first(n), t), getattr(short, t), atol=1e-5), t


def test_pad_positions_shortens_a_causal_students_loss_and_leaves_a_non_causal_one_alone(setup):
    state = lambda **kw: weights(D.distil(setup, progress=False, steps=2, **kw).students)  # noqa: E731
    full, everything, short = state(), state(pad_positions=77), state(pad_positions=0)
    assert all(torch.allclose(full[k], everything[k], atol=1e-6) for k in full)  # all positions: the same run
    assert not all(torch.allclose(full[k], short[k], atol=1e-6) for k in full)  # fewer positions: another loss
    # a non-causal student's every output reads all 77 positions: cutting them would change it, so it is not cut
    a, b = state(causal=False), state(causal=False, pad_positions=0)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_comparison_runs_scale_the_warm_up_to_their_budget(setup):
    p = setup.profile  # 6 steps; with a 6-step warm-up, a 3-step comparison would stop half-way up the ramp
    longer = dataclasses.replace(setup, profile=dataclasses.replace(p, distill=dataclasses.replace(
        p.distill, warmup_steps=6)))
    run = D.compare(longer, {"default": {}}, steps=3, progress=False)["default"][0]
    last = [row for row in run.log if row["step"] == 3][-1]
    assert last["lr"] == pytest.approx(p.distill.lr)  # warm-up 3 of 3 steps: the peak rate at the end


def test_comparisons_run_each_variant_over_seeds_evaluating_along_the_way(setup):
    """Notebook 03's init comparison: each variant once per seed, evaluated ``points`` times and at step 0; another
    seed is another data order; the summary of a variant is the seeds' mean with their range."""
    runs = D.compare(setup, {"mean": {"init": "mean"}}, steps=4, seeds=2, points=2, progress=False)["mean"]
    assert [[row["step"] for row in run.log if "eval_loss" in row] for run in runs] == [[0, 2, 4], [0, 2, 4]]
    assert runs[0].log[1]["train_h1"] != runs[1].log[1]["train_h1"]
    again = D.compare(setup, {"mean": {"init": "mean"}}, steps=4, seeds=1, points=2, progress=False)["mean"][0]
    assert again.after == runs[0].after  # the first seed is the profile's: the same run again
    each = [D.summary(run)["loss_after"] for run in runs]
    both = D.summary(runs)
    assert both["seeds"] == 2 and both["loss_after"] == pytest.approx(sum(each) / 2, abs=1e-4)
    assert both["spread"]["loss_after"] == sorted(each)


def test_gradient_checkpointing_recomputes_and_gives_the_same_step(setup):
    # colab.toml's small-card setting, on the tiny students: activations are recomputed in the backward pass
    import warnings

    plain = D.distil(setup, progress=False, steps=2)
    with warnings.catch_warnings():  # no deprecated call on the way (the rehearsal printed one in every run)
        warnings.filterwarnings("error", message=".*gradient_checkpointing_enable.*is deprecated")
        saved = D.distil(setup, progress=False, steps=2, gradient_checkpointing=True)
    assert saved.students.text_encoder.is_gradient_checkpointing
    assert not plain.students.text_encoder.is_gradient_checkpointing
    a, b = weights(plain.students), weights(saved.students)
    assert_same_step(a, b, setup.profile.distill.lr)


@pytest.mark.parametrize("pad_positions", [None, 0])
def test_after_eos_positions_train_on_their_own_loss(setup, pad_positions):
    default = weights(D.distil(setup, progress=False, steps=2).students)
    masked = weights(D.distil(setup, progress=False, steps=2, positions="after_eos",
                              pad_positions=pad_positions).students)
    assert all(torch.isfinite(v).all() for v in masked.values())
    assert not all(torch.allclose(default[k], masked[k], atol=1e-6) for k in default)


def test_held_out_evaluations_are_not_counted_as_training_time(setup, monkeypatch):
    """The rate a benchmark reports is the training loop's: the held-out evaluations inside the loop are left out.
    A fake clock jumps an hour in each evaluation: no sleep, and no real time compared (any machine, any load)."""
    import time
    from types import SimpleNamespace

    jumped, measure = [0.0], D.HeldOut.measure

    def slow(self, students):
        jumped[0] += 3600.0
        return measure(self, students)

    monkeypatch.setattr(D, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + jumped[0]))
    monkeypatch.setattr(D.HeldOut, "measure", slow)
    run = D.distil(setup, progress=False, steps=2, eval_every=1)  # two evaluations in the loop: 2 hours if counted
    evaluations_counted = run.seconds >= 3600  # only the fake clock's jumps could make it an hour: no real time
    assert not evaluations_counted and [r["step"] for r in run.log if "eval_loss" in r] == [0, 1, 2]


def test_card_peaks_match_exact_device_names_and_count_the_recompute():
    from jpsdxl.notebook import costs

    assert costs.peak_tflops("NVIDIA L4") == 121.0 and costs.peak_tflops("NVIDIA L40S") == 362.0  # no substring
    assert costs.peak_tflops("NVIDIA H100 PCIe") < costs.peak_tflops("NVIDIA H100 80GB HBM3")
    assert costs.peak_tflops("Some Future GPU") is None
    from jpsdxl.core.zoo import build_components

    parts = build_components("tiny", scheduler=False)
    plain, recompute = (costs.training_flops_per_sample(parts["text_encoder"], parts["text_encoder_2"], recompute=r)
                        for r in (False, True))
    assert plain["hardware_flops_per_pair"] == plain["flops_per_pair"]
    assert recompute["hardware_flops_per_pair"] == plain["flops_per_pair"] * 10 // 8  # the students' forward again
    rows = costs.estimated_rows(costs.recipe_flops_per_pair("sdxl")["flops_per_pair"])
    assert all("estimate" in r["where"] for r in rows) and len(rows) == 4


def test_an_accelerate_launch_precision_wins_over_the_profile_and_says_so(setup, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --config_file ...` sets
    run = D.distil(setup, progress=False, steps=1)
    assert run.mixed_precision == "bf16" and setup.profile.distill.mixed_precision == "no"
    assert "mixed precision: bf16, from accelerate launch (the profile says 'no'" in capsys.readouterr().out
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert D.distil(setup, progress=False, steps=1).mixed_precision == "no"


def test_the_empty_pair_is_mixed_in_on_its_own_stream_and_resumes():
    from jpsdxl.data import TrainingPairs

    corpus = [(f"ja{i}", f"en{i}") for i in range(500)]
    plain = list(islice(TrainingPairs(corpus, [], 0.0, seed=3).stream(), 2000))
    mixed = TrainingPairs(corpus, [], 0.0, seed=3, empty_share=0.05)
    seq = list(islice(mixed.stream(), 2000))
    assert 0.03 < seq.count(("", "")) / len(seq) < 0.07
    assert [p for p in seq if p != ("", "")] == plain[:len(seq) - seq.count(("", ""))]  # the rest unchanged
    assert list(islice(mixed.stream(start=777), 50)) == seq[777:827]


def test_training_on_the_empty_pair_teaches_the_empty_prompt(setup):
    """The reader drops empty sides, so without ("", "") pairs the student never sees the prompt that guidance
    encodes for every image: measured against the teacher's "" before and after."""
    without = D.distil(setup, progress=False, steps=6)
    with_empty = D.distil(setup, progress=False, steps=6, empty_share=0.3)
    assert without.before["empty_prompt_loss"] == with_empty.before["empty_prompt_loss"]
    assert with_empty.after["empty_prompt_loss"] < 0.8 * without.after["empty_prompt_loss"]


class _Payload:
    """What a planted pickle does when loaded: here, leave a file behind."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_checkpoint_payload_never_runs(setup, tmp_path):
    """Resuming is the default, so a shared or planted checkpoint folder must not be able to run code: the scheduler
    is JSON, accelerate loads tensors with weights_only, and a pickle the trainer never writes is refused unread."""
    D.distil(setup, tmp_path / "run", progress=False, steps=2)
    ckpt = D.latest_checkpoint(tmp_path / "run")
    assert not list(ckpt.glob("*.pkl")) or all("random_states" in p.name for p in ckpt.glob("*.pkl"))
    assert "scheduler" in json.loads((ckpt / "trainer_state.json").read_text())
    torch.save(_Payload(tmp_path / "ran-custom"), ckpt / "custom_checkpoint_0.pkl")
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl: pickled state this trainer never writes"):
        D.distil(setup, tmp_path / "run", progress=False, steps=2)
    (ckpt / "custom_checkpoint_0.pkl").unlink()
    rngs = list(ckpt.glob("random_states_*.pkl"))
    for rng in rngs:  # accelerate's own pickles: read as tensors only, so a payload is refused, not run (and not
        torch.save(_Payload(tmp_path / "ran-rng"), rng)  # skipped either, as accelerate would skip it, silently)
    with pytest.raises(ValueError, match=r"no checkpoint .* can be read: step-0000002 \(random_states_0.pkl"):
        D.distil(setup, tmp_path / "run", progress=False, steps=2)
    state = json.loads((ckpt / "trainer_state.json").read_text())  # without the recorded sizes (an older
    del state["files"]  # checkpoint, or a planted one): the RNG state itself is checked
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"random_states_0.pkl does not load as plain tensors"):
        D.distil(setup, tmp_path / "run", progress=False, steps=2)
    assert rngs and not (tmp_path / "ran-custom").exists() and not (tmp_path / "ran-rng").exists()


def test_resuming_with_another_learning_rate_or_schedule_is_refused(setup, straight):
    _, folder = straight
    with pytest.raises(ValueError, match=r"lr 0.0003 -> 0.1.*--fresh"):
        D.distil(setup, folder, progress=False, lr=0.1)
    with pytest.raises(ValueError, match=r"schedule 'cosine' -> 'linear'"):
        D.distil(setup, folder, progress=False, schedule="linear")


def test_an_overflowing_loss_weight_stops_before_it_poisons_a_checkpoint(setup, tmp_path):
    """h1 weighted by 1e39: each term is finite, the weighted loss and its gradients are not. The step must not be
    taken, no checkpoint with NaN weights written, and the message must lead to a fresh start (resuming with other
    settings is refused)."""
    with pytest.raises(D.NonFiniteLoss, match=r"at step 1: training stopped before the step.*--fresh") as err:
        D.distil(setup, tmp_path, progress=False, loss_weights={"h1": 1e39, "h2": 1.0, "pooled": 1.0})
    assert "No checkpoint was written yet" in str(err.value) and D.latest_checkpoint(tmp_path) is None


def test_a_fresh_run_clears_the_old_runs_checkpoints(setup, tmp_path):
    """Finished 6-step run, then a fresh one killed after 3 steps, then a plain rerun: it must continue the fresh
    run (from its step 2), not the old run's step 6 (pruning by name once deleted the new checkpoints as written)."""
    D.distil(setup, tmp_path, progress=False)
    D.distil(setup, tmp_path, progress=False, resume=False, stop_after=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-0000002"]
    assert D.distil(setup, tmp_path, progress=False, stop_after=1).resumed_from == 2


def test_a_corpus_too_small_for_its_held_out_split_says_which_setting(tmp_path):
    from jpsdxl.data import DataError

    (tmp_path / "few.tsv").write_text("猫がいる。\tThere is a cat.\n犬がいる。\tThere is a dog.\n", encoding="utf-8")
    profile = derive(load_profile("tiny"), data={"pairs": str(tmp_path / "few.tsv"), "test_fraction": 0.01})
    with pytest.raises(DataError, match=r"held-out split has 0 pair\(s\).*raise data.test_fraction"):
        D.prepare(profile)


def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(setup, straight, tmp_path, capsys):
    """optimizer.bin cut short in the newest checkpoint (a full disk, a copy that stopped): the run resumes from the
    older one, says which it passed over, and still reaches the uninterrupted run's weights."""
    run, _ = straight
    D.distil(setup, tmp_path, progress=False, stop_after=5)  # checkpoints at steps 2 and 4
    newest = D.latest_checkpoint(tmp_path)
    cut = newest / "optimizer.bin"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    resumed = D.distil(setup, tmp_path, progress=False)
    assert resumed.resumed_from == 2 and "passed over step-0000004 (optimizer.bin is" in capsys.readouterr().err
    a, b = weights(run.students), weights(resumed.students)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a checkpoint from before sizes were recorded: accelerate's own error is the sign, with the same fallback
    for ckpt in D.checkpoints(tmp_path):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        del state["files"]
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
        (ckpt / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ValueError, match=r"no checkpoint .* can be read: step-0000006 \(.*step-0000004.*--fresh"):
        D.distil(setup, tmp_path, progress=False)


def test_two_runs_on_one_folder_cannot_overlap(setup, tmp_path):
    """A second run on a folder in use stops at once, naming the first; a killed holder leaves no lock behind."""
    from jpsdxl.core.runs import RunInProgress

    hold = ("import sys, time\nfrom jpsdxl.core.runs import exclusive\n"
            "with exclusive(sys.argv[1], '--out'):\n    print('held', flush=True)\n    time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInProgress, match=f"in use by process {holder.pid} .*another folder \\(--out\\)"):
            D.distil(setup, tmp_path, progress=False, steps=2)
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert D.distil(setup, tmp_path, progress=False, steps=2).steps == 2


def test_an_output_folder_that_cannot_be_written_stops_before_the_work(small_profile, tmp_path, monkeypatch):
    from jpsdxl.core.runs import OutputNotWritable

    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(D, "prepare", lambda profile: pytest.fail("the data loaded before --out was checked"))
    with pytest.raises(OutputNotWritable, match=r"--out .*afile/out: cannot write there"):
        D.run(small_profile, tmp_path / "afile" / "out")


def test_token_ids_memo_gives_the_same_ids_and_tokenizes_each_sentence_once(setup):
    from jpsdxl.targets import TokenIds, token_ids

    sentences = [ja for ja, _ in setup.splits.train[:20]] * 2
    calls = []
    tok = setup.tokenizer

    class Counting:  # the tokenizer, counting the sentences it is asked for
        def __call__(self, texts, **kw):
            calls.append(len(texts))
            return tok(texts, **kw)

    memo = TokenIds(Counting())
    assert torch.equal(memo(sentences[:25]), token_ids(tok, sentences[:25]))
    assert torch.equal(memo(sentences), token_ids(tok, sentences)) and calls == [20]  # 20 distinct, once each
    plain = TokenIds(Counting(), memo=False)
    plain(sentences)
    plain(sentences)
    assert calls == [20, 40, 40] and plain.memo is None
    assert setup.teachers.token_ids(tok) is setup.teachers.token_ids(tok)  # one memo per tokenizer, kept by the run


def test_teacher_targets_through_n_positions_are_the_first_n_of_all_77(setup):
    """The trainer asks the teachers for only the positions the students compute: those must be the full 77-position
    outputs cut at n (a causal encoder; the pooled output reads the EOS inside n), cached or not, and a cached
    sentence asked for more positions later is computed again, not served short."""
    sentences = ["a red circle", "two dogs are running on the beach this morning"]
    full = setup.teachers.encode(sentences)
    cached, uncached = (dataclasses.replace(setup.teachers, cache=cache) for cache in ({}, None))
    for n in (14, 20, 77):  # 14: past the longer sentence's EOS
        for teachers, atol in ((uncached, 1e-5), (cached, 2e-3)):  # the cache keeps float16
            got = teachers.targets(sentences, "cpu", n)
            assert got.h1.shape[1] == got.h2.shape[1] == n
            for t in D.TARGETS:
                assert torch.allclose(getattr(got, t), getattr(full.first(n), t), atol=atol), (n, t)
        assert len(cached.cache["a red circle"].h1) == n  # grown on demand


def test_students_train_in_float32_or_keep_the_teachers_dtype(setup):
    """Training copies are float32; stage 4's untrained copies (``dtype=None``) are built in the teachers' dtype
    directly, never as a float32 pair first (3 GB more at SDXL's shapes)."""
    t = setup.teachers
    half = D.Teachers(*(m.to(torch.bfloat16) for m in (copy.deepcopy(t.text_encoder), copy.deepcopy(t.text_encoder_2))),
                      t.tokenizer, t.tokenizer_2)
    trained = D.make_students(half, setup.tokenizer, setup.tokenizer_2, "mean")
    kept = D.make_students(half, setup.tokenizer, setup.tokenizer_2, "mean", dtype=None)
    assert {p.dtype for p in trained.parameters()} == {torch.float32}
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}


def test_the_teachers_mean_pooled_output_reads_only_what_pools(setup):
    """The centred metrics subtract the teacher's mean pooled output: computed through text_encoder_2 alone, each
    batch only as far as its last EOS, it must equal the mean of the full encode's pooled outputs."""
    sentences = [en for _, en in setup.splits.train[:300]]
    full = setup.teachers.encode(sentences).pooled.mean(0)
    short = D.mean_pooled(setup.teachers.text_encoder_2, setup.teachers.tokenizer_2, sentences, batch_size=64)
    assert torch.allclose(short, full, atol=1e-5)


def test_bf16_is_suggested_only_where_the_card_has_it_in_hardware(monkeypatch):
    """A T4 (sm75) says yes to is_bf16_supported() by emulation: an fp16 overflow there must not be answered with
    'use bf16', which would run emulated and slow."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    message = str(D._non_finite(torch.tensor([float("inf")]), float("inf"), 0, None, "fp16"))
    assert "bf16" not in message
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert "mixed_precision = 'bf16'" in str(D._non_finite(torch.tensor([float("inf")]), float("inf"), 0, None, "fp16"))


def test_students_are_saved_in_the_profiles_dtype_and_stay_float32_in_training(straight, tmp_path):
    """colab keeps its runs on Google Drive: the saved encoders in the dtype the pipelines load them in (half the
    bytes), while the students in memory, and the checkpoints, keep training's float32."""
    from safetensors import safe_open
    from transformers import CLIPTextModelWithProjection

    run, _ = straight
    D.save_students(run.students, tmp_path, torch.bfloat16)
    with safe_open(tmp_path / "text_encoder_2" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert {p.dtype for p in run.students.parameters()} == {torch.float32}
    loaded = CLIPTextModelWithProjection.from_pretrained(tmp_path / "text_encoder_2", dtype=torch.bfloat16)
    expected = run.students.text_encoder_2.text_projection.weight.to(torch.bfloat16)
    assert torch.equal(loaded.text_projection.weight, expected)


def test_a_checkpoint_that_cannot_be_written_leaves_no_partial_folder_and_says_so_in_one_line(
        small_profile, tmp_path, monkeypatch, capsys):
    """A full disk during save_state (torch says "enforce fail at inline_container.cc"): the partial folder is
    removed, not left filling the disk, and the command ends with one line naming the checkpoint, no traceback."""
    from accelerate import Accelerator

    def full_disk(self, output_dir=None, **kwargs):
        (Path(output_dir) / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"x" * 1000)  # half written, then the disk is full
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 1000")

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    profile = save_profile(small_profile, tmp_path / "small.toml")
    assert cli.main(["distill", "--profile", str(profile), "--out", str(tmp_path / "run"), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # (progress bars write there too)
    assert "Traceback" not in err and len(errors) == 1 and "step-0000002 could not be written" in errors[0]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir()]  # no .partial left behind


def test_a_resume_across_another_tokenizer_or_other_data_is_refused(setup, ja_tokenizers, tmp_path):
    """distill, then the data file's content replaced (or the tokenizer retrained), then the same command: the run
    must not "resume" into rows and a data position made for other inputs (a probe printed the old run's metrics)."""
    D.distil(setup, tmp_path, progress=False, stop_after=2)  # a checkpoint of step 2
    other_data = dataclasses.replace(setup, splits=dataclasses.replace(setup.splits, train=setup.splits.train[::-1]))
    with pytest.raises(ValueError, match=r"other settings or inputs \(data .*--fresh"):
        D.distil(other_data, tmp_path, progress=False, stop_after=1)
    other_tokenizer = dataclasses.replace(setup, tokenizer=ja_tokenizers[0], tokenizer_2=ja_tokenizers[1])
    with pytest.raises(ValueError, match=r"other settings or inputs \(tokenizers "):
        D.distil(other_tokenizer, tmp_path, progress=False, stop_after=1)
    assert D.distil(setup, tmp_path, progress=False, stop_after=1).resumed_from == 2  # the same inputs: resumes


def test_a_linked_checkpoint_folder_is_refused_and_its_target_left_alone(setup, tmp_path):
    """runs/<p>/03_distillation/checkpoints made a link to another folder: `distill --fresh` once wrote its
    checkpoints there and deleted that folder's own step-0000001/. Now: refused before anything is written."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "step-0000001").mkdir(parents=True)
    (elsewhere / "step-0000001" / "keep.txt").write_text("someone else's")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(elsewhere)
    for resume in (False, True):
        with pytest.raises(OSError, match="is a link .*replace the link with a real folder"):
            D.distil(setup, run, progress=False, resume=resume, stop_after=1)
    assert [p.name for p in elsewhere.iterdir()] == ["step-0000001"]
    assert (elsewhere / "step-0000001" / "keep.txt").exists()


def test_a_linked_stage_folder_is_refused(tiny, tmp_path, monkeypatch):
    from jpsdxl.core.runs import LinkInRuns, stage_dir

    monkeypatch.setenv("JPSDXL_RUNS", str(tmp_path / "runs"))
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "03_distillation").symlink_to(tmp_path)
    with pytest.raises(LinkInRuns, match="03_distillation is a link"):
        stage_dir(tiny, "distill")


# -----------------------------------------------------------------------------
# notebook 04's phrasing experiment, on a few steps: one row per mix, seed and tested phrasing


def test_phrasing_mixes_train_on_their_own_captions_with_or_without_the_general_pairs(setup):
    with_general = phrasings.with_captions(setup, [0, 5])
    alone = phrasings.with_captions(setup, [0, 5], general=False)
    assert with_general.extra_pairs == shapes.caption_pairs("train", [0, 5]) and len(with_general.extra_pairs) == 30
    assert alone.splits.train == shapes.caption_pairs("train", [0, 5]) and alone.extra_pairs == []
    assert with_general.splits.train is setup.splits.train


def test_the_phrasing_experiment_judges_each_student_on_the_phrasings_its_mix_lacks(setup, pipelines):
    rows = phrasings.run(setup, pipelines, steps=2, seeds=1, eval_seeds=(1000,), progress=False,
                         mixes={1: [0], 2: [0, 5]}, without_general=(2,))
    tested = {(r["k"], r["general pairs"], r["phrasing"]) for r in rows}
    assert tested == {(1, True, 2), (1, True, 5), (1, True, 6), (2, True, 2), (2, True, 6), (2, False, 2), (2, False, 6)}
    assert {r["kind"] for r in rows if r["k"] == 2 and r["phrasing"] == 6} == {"new order"}
    assert all(r["n"] == 18 and len(r["colours"]) == 18 and 0 <= r["hits"] <= 18 for r in rows)
    pooled = phrasings.summary(rows + rows)
    assert all(r["n"] == 36 and r["seeds"] == 2 for r in pooled) and len(pooled) == len(rows)
    table = phrasings.colour_confusion(rows, 2, 1)
    assert sum(sum(row.values()) for row in table.values()) == 18 and set(table) == set(shapes.COLOURS)
