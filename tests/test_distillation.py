"""Stage 3: the trainer. Resuming, two processes, NaN handling, bad data lines, saved folders, the student variants.

Runs use a small profile (a 3,000-pair TSV with bad lines in it, a 2,000-piece tokenizer, a few steps of batch 8)
on the shapes world's tiny teachers: seconds per run, and every path the full run takes (accelerate, checkpoints,
from_pretrained folders) except the GPU's precisions.
"""

import json
import os
import random
import subprocess
import sys
from itertools import islice

import pytest
import torch

from jpsdxl import distillation as D
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
    return D.prepare(small_profile)


def weights(students):
    return {k: v.detach().clone() for k, v in students.state_dict().items()}


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
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
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
    with pytest.raises(D.NonFiniteLoss, match=r"became nan at step \d.*last good checkpoint is kept: .*step-0000002"):
        D.train(setup.teachers, students, setup.pairs(0.0), setup.held_out, setup.profile.distill, folder=tmp_path,
                progress=False)
    good = D.latest_checkpoint(tmp_path)
    assert good.name == "step-0000002"
    assert json.loads((good / "trainer_state.json").read_text())["step"] == 2


def test_bad_lines_are_reported_with_their_numbers_and_skipped(straight):
    run, _ = straight
    assert "skipped 3" in run.bad_lines and "5" in run.bad_lines and "3003" in run.bad_lines
    assert run.steps == STEPS


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
def test_two_processes_through_accelerate_launch_give_the_same_loss(small_profile, tmp_path):
    """The same global batch over 2 CPU processes (gloo) as over 1: the same losses, the same weights; with
    pad_positions too (the processes agree on one length per step)."""
    profile = save_profile(derive(small_profile, name="small_pad", distill={"pad_positions": 0}),
                           tmp_path / "small_pad.toml")  # a file: the launched processes read --profile FILE

    def launch(n, out):
        # --multi_gpu is accelerate's launcher for N local processes (torch.distributed.run); on a machine without
        # CUDA the trainer asks accelerate for CPU processes, which then form a gloo group
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if n > 1 else []),
               "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(29500 + n), "-m", "jpsdxl.cli", "distill", "--profile", str(profile),
               "--out", str(out), "--steps", "4"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"processes: {n}" in done.stdout  # really n processes in one group, not n separate runs
        rows = [r.split(",") for r in (out / "log.csv").read_text().splitlines()]
        header = rows[0]
        return [dict(zip(header, r)) for r in rows[1:]], out

    one, out1 = launch(1, tmp_path / "one")
    two, out2 = launch(2, tmp_path / "two")
    for a, b in zip(one, two):
        for key in ("train_h1", "train_h2", "train_pooled"):
            if a.get(key):
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4), (a["step"], key)
    from safetensors.torch import load_file

    w1, w2 = (load_file(o / "text_encoder_2" / "model.safetensors") for o in (out1, out2))
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


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
    import dataclasses

    p = setup.profile  # 6 steps; with a 6-step warm-up, a 3-step comparison would stop half-way up the ramp
    longer = dataclasses.replace(setup, profile=dataclasses.replace(p, distill=dataclasses.replace(
        p.distill, warmup_steps=6)))
    run = D.compare(longer, {"default": {}}, steps=3, progress=False)["default"]
    last = [row for row in run.log if row["step"] == 3][-1]
    assert last["lr"] == pytest.approx(p.distill.lr)  # warm-up 3 of 3 steps: the peak rate at the end


def test_gradient_checkpointing_recomputes_and_gives_the_same_step(setup):
    # full.toml's small-card setting, on the tiny students: activations are recomputed in the backward pass
    plain = D.distil(setup, progress=False, steps=2)
    saved = D.distil(setup, progress=False, steps=2, gradient_checkpointing=True)
    assert saved.students.text_encoder.is_gradient_checkpointing
    assert not plain.students.text_encoder.is_gradient_checkpointing
    a, b = weights(plain.students), weights(saved.students)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("pad_positions", [None, 0])
def test_after_eos_positions_train_on_their_own_loss(setup, pad_positions):
    default = weights(D.distil(setup, progress=False, steps=2).students)
    masked = weights(D.distil(setup, progress=False, steps=2, positions="after_eos",
                              pad_positions=pad_positions).students)
    assert all(torch.isfinite(v).all() for v in masked.values())
    assert not all(torch.allclose(default[k], masked[k], atol=1e-6) for k in default)
