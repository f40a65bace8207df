"""The loop: every method learns, a resumed run reproduces an uninterrupted one, checkpoints are atomic, DDP and FSDP
on two gloo processes give the one-process gradients and weights."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from distill_utils import config, read_metrics, torchrun, without_timing
from transformers import AutoModelForCausalLM

from minillm_fast.distill import checkpoint as ckpt
from minillm_fast.distill.trainer import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("method", ["sft", "kd", "seqkd", "minillm"])
def test_each_method_loss_falls_on_a_repeated_batch(tmp_path, method):
    cfg = config(tmp_path, method=method, max_train_samples=4, total_iters=8, lr=1e-2, num_rollouts=4,
                 batch_size=4, pt_batch_size=4, plots=True)
    Trainer(cfg).train()
    train = [r for r in read_metrics(cfg.output_dir) if "train/loss" in r]
    assert len(train) == 8
    keys = ["train/loss", "train/ce"] if method != "minillm" else ["train/loss", "train/single_step",
                                                                   "train/pt_loss"]
    if method in ("kd", "seqkd"):
        keys.append("train/kd")
    for key in keys:
        assert train[-1][key] < train[0][key] - 0.1, (key, [r[key] for r in train])
    for sub in ("final", "plots", "checkpoints", "config.yaml"):
        assert os.path.exists(os.path.join(cfg.output_dir, sub)), sub
    assert os.path.isfile(os.path.join(cfg.output_dir, "final", "model.safetensors"))
    assert os.path.isfile(os.path.join(cfg.output_dir, "plots", "train.png"))
    if method == "seqkd":
        assert os.path.isfile(os.path.join(cfg.output_dir, "seqkd_train.jsonl"))
    if method == "minillm":
        assert {"rollout/length", "rollout/reward", "rollout/importance_weight",
                "time/rollout_tokens_per_s"} <= set(train[0])


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["minillm", "sft"])
def test_resume_reproduces_uninterrupted_metrics(tmp_path, method):
    """Interrupted after step 3 (last checkpoint: step 2, in the middle of a MiniLLM rollout buffer), then resumed:
    the metrics file equals the uninterrupted run's, every number (wall-clock entries aside)."""
    common = dict(method=method, total_iters=6, save_interval=2, eval_interval=3, eval_generate=True,
                  disable_dropout=False, lr=5e-3)
    full = config(tmp_path / "a", **common)
    Trainer(full).train()

    part = config(tmp_path / "b", **common)

    def crash(trainer, metrics):
        if trainer.step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(part, hooks={"after_step": crash}).train()
    assert [s for s, _ in ckpt.list_checkpoints(os.path.join(part.output_dir, "checkpoints"))] == [2]
    part.resume = True
    resumed = Trainer(part)
    resumed.train()
    assert resumed.resumed_from.endswith("step_00000002.pt")
    a, b = without_timing(read_metrics(full.output_dir)), without_timing(read_metrics(part.output_dir))
    assert len(a) == len(b) == 6 + 2                      # 6 train lines, evaluations at steps 3 and 6
    assert a == b
    from safetensors.torch import load_file

    wa = load_file(os.path.join(full.output_dir, "final", "model.safetensors"))
    wb = load_file(os.path.join(part.output_dir, "final", "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    cfg = config(tmp_path, method="sft", total_iters=3, save_interval=1)
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    real_save = torch.save

    def crash_midway(trainer, metrics):
        if trainer.step == 2:        # the next save dies half-way through writing the file
            def torn(obj, f, *a, **k):
                f.write(b"\x80\x02partial checkpoint bytes")
                raise KeyboardInterrupt("killed mid-write")
            monkeypatch.setattr(ckpt.torch, "save", torn)

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, hooks={"after_step": crash_midway}).train()
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert sorted(os.listdir(ckpt_dir)) == ["step_00000001.pt"]      # no torn step_2, no temp file left
    state = ckpt.load(os.path.join(ckpt_dir, "step_00000001.pt"))
    assert state["step"] == 1 and "model" in state and "optimizer" in state and "rng" in state

    # a process killed for good leaves its temp file: it is never taken for a checkpoint, and is cleaned up
    with open(os.path.join(ckpt_dir, ".tmp-killed.pt"), "wb") as f:
        f.write(b"garbage")
    assert ckpt.latest(ckpt_dir).endswith("step_00000001.pt")
    cfg.resume = True
    tr = Trainer(cfg)
    tr.train()
    assert tr.resumed_from.endswith("step_00000001.pt") and tr.step == 3
    assert not [n for n in os.listdir(ckpt_dir) if n.startswith(".tmp")]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, parallel):
    """torchrun, 2 gloo processes on CPU vs one process, two MiniLLM steps: the first step's gradients (rollouts
    dealt to ranks by chunk, whitening and token counts all-reduced, one process accumulating two micro-batches) and
    the weights saved in final/ after the second. parallel=fsdp shards both models (gradients gathered whole for the
    comparison, final/ written from the gathered state dict, a mid-run checkpoint gathered as well)."""
    cfg = config(tmp_path, method="minillm", total_iters=2, num_rollouts=8, batch_size=8, rollout_batch_size=4,
                 micro_batch_size=4, pt_batch_size=8, ppo_epochs=2, save_interval=1)
    overrides = [f"{k}={v}" for k, v in cfg.to_dict().items()
                 if k not in ("output_dir", "eval_seeds", "resume") and v is not None]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    worker = os.path.join(HERE, "distill_ddp_worker.py")
    one = subprocess.run([sys.executable, worker, str(tmp_path / "one.pt"), *overrides,
                          f"output_dir={tmp_path / 'one'}"], env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, worker, str(tmp_path / "two.pt"), *overrides, f"parallel={parallel}",
                   f"output_dir={tmp_path / 'two'}", env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world size 2" in two.stdout
    g1, g2 = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=1e-6, rtol=1e-5, msg=name)
    assert max(float(g.abs().max()) for g in g1.values()) > 1e-3       # a real gradient
    w1 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "one" / "final")).state_dict()
    w2 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "two" / "final")).state_dict()
    init = AutoModelForCausalLM.from_pretrained(cfg.student).state_dict()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=1e-4, msg=name)
    assert any(not torch.equal(w1[n], init[n]) for n in w1)          # two steps moved the weights
    saved = torch.load(ckpt.latest(str(tmp_path / "two" / "checkpoints")), weights_only=False)
    assert saved["parallel"] == parallel and saved["step"] == 2
    for name, value in saved["model"].items():                       # whole tensors, not one rank's shards
        assert value.shape == w2[name].shape, name
    if parallel == "fsdp":   # resume the sharded run from its step-1 checkpoint: the same second step
        step1 = ckpt.path_for(str(tmp_path / "two" / "checkpoints"), 1)
        again = torchrun(2, worker, str(tmp_path / "again.pt"), *overrides, f"parallel={parallel}",
                         f"resume={step1}", f"output_dir={tmp_path / 'again'}", env=env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert [r["step"] for r in read_metrics(tmp_path / "again") if "train/loss" in r] == [2]
        w3 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "again" / "final")).state_dict()
        for name in w2:
            torch.testing.assert_close(w3[name], w2[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_keeps_fp32_master_weights(tmp_path):
    """dtype=bf16: bf16 forwards and fused ops, fp32 weights, so that lr=5e-6 updates are not rounded away."""
    cfg = config(tmp_path, method="minillm", dtype="bf16", total_iters=2, lr=5e-6)
    tr = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in tr.student.named_parameters()}
    last = tr.train()
    assert all(p.dtype == torch.float32 for p in tr.student.parameters())
    assert last["train/loss"] == last["train/loss"]
    moved = [n for n, p in tr.student.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)                     # every weight took its small step


@pytest.mark.parametrize("switches", [
    dict(alpha=0.0), dict(length_norm=False), dict(single_step=False), dict(lm_coef=0.0),
    dict(advantage="paper", single_step_weighted=True, cache_teacher_hidden=False),
], ids=["no-teacher-mix", "no-length-norm", "no-single-step", "no-pt", "paper-variants"])
def test_minillm_ablations_run(tmp_path, switches):
    cfg = config(tmp_path, method="minillm", total_iters=2, **switches)
    last = Trainer(cfg).train()
    assert last["train/loss"] == last["train/loss"]
    assert ("train/single_step" in last) == switches.get("single_step", True)
    assert ("train/pt_loss" in last) == (switches.get("lm_coef", 1.0) > 0)
    first = read_metrics(cfg.output_dir)[0]
    if switches.get("alpha") == 0.0:                     # sampling from the student alone: w_t = q / q = 1
        assert first["rollout/importance_weight"] == pytest.approx(1.0, abs=1e-6)
    else:
        assert first["rollout/importance_weight"] != 1.0


def test_sft_keeps_lowest_validation_loss(tmp_path):
    """Phase 1 of MiniLLM: SFT with select_metric=loss writes best/ at the lowest validation loss."""
    cfg = config(tmp_path, method="sft", total_iters=4, eval_interval=2, select_metric="loss", lr=1e-2)
    Trainer(cfg).train()
    evals = [r for r in read_metrics(cfg.output_dir) if "eval/loss" in r]
    assert len(evals) == 2 and evals[0].get("eval/best")
    assert os.path.isfile(os.path.join(cfg.output_dir, "best", "model.safetensors"))
    assert os.path.isfile(os.path.join(cfg.output_dir, "best", "tokenizer.json"))


def test_refuses_to_mix_with_an_earlier_run(tmp_path):
    cfg = config(tmp_path, method="sft", total_iters=1)
    Trainer(cfg).train()
    with pytest.raises(Exception, match="holds checkpoints of an earlier run"):
        Trainer(cfg)
    cfg.overwrite = True
    Trainer(cfg).train()


def test_eval_on_start_measures_the_initial_student(tmp_path):
    """eval_on_start: a step-0 validation line equal to a fresh evaluation of the initial student, which best/ never
    takes (a run whose training only hurts still keeps a trained checkpoint)."""
    cfg = config(tmp_path, method="sft", total_iters=2, eval_interval=1, select_metric="loss", eval_on_start=True,
                 lr=1e-2)
    start = Trainer(cfg).evaluate()                      # the same initial weights, evaluated without training
    cfg.overwrite = True
    Trainer(cfg).train()
    evals = [r for r in read_metrics(cfg.output_dir) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert evals[0]["eval/loss"] == pytest.approx(start["eval/loss"], rel=1e-6)
    assert not evals[0].get("eval/best") and any(r.get("eval/best") for r in evals[1:])
