"""Faults and bad input (docs/distill.md, "Faults and bad input"): SIGKILL at seeded moments resumes to the
uninterrupted run's weights and metrics bit for bit; SIGTERM / SIGINT write a checkpoint and exit 0; a non-finite
step never reaches the weights; storage and data errors are reported before training, with file and line."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from distill_utils import config, read_metrics, without_timing

from minillm_fast.distill import checkpoint as ckpt
from minillm_fast.distill import faults
from minillm_fast.distill.config import ConfigError, DistillConfig
from minillm_fast.distill.trainer import Trainer

SEED = int(os.environ.get("MINILLM_FAST_TEST_SEED", "0"))


def _write_config(tmp_path, name: str, **overrides) -> str:
    cfg = config(tmp_path, output_dir=str(tmp_path / name), **overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if v is not None}))
    return str(path)


def _distill(cfg_path: str, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "minillm_fast", "distill", "--config", cfg_path, *overrides],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _final_weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


# ----------------------------------------------------------------------------------------------------------------------
# kill -9 anywhere
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kd", "minillm"])
def test_sigkill_at_seeded_moments_resumes_to_the_same_numbers(tmp_path, method):
    """Each attempt starts `minillm-fast distill ... resume=true` and is SIGKILLed after a delay drawn by a seeded RNG
    (anywhere: start-up, a step, rollouts, evaluation, a checkpoint or best/ being written) until one finishes.
    The finished run equals one never interrupted: final/ bit for bit, metrics.jsonl record for record (each step
    once), and every checkpoint left on disk loads."""
    common = dict(method=method, total_iters=6, save_interval=1, eval_interval=3, keep_checkpoints=3,
                  select_metric="loss")
    ref_cfg = _write_config(tmp_path, "ref", **common)
    ref = _distill(ref_cfg)
    t0 = time.perf_counter()
    _, err = ref.communicate(timeout=300)
    duration = time.perf_counter() - t0
    assert ref.returncode == 0, err[-3000:]

    cfg = _write_config(tmp_path, "killed", **common)
    rng = random.Random(SEED * 1000 + (method == "minillm"))
    kills = 0
    for attempt in range(12):
        proc = _distill(cfg, "resume=true")
        delay = rng.uniform(0.3, duration) if attempt < 8 else None   # then let it finish
        try:
            proc.communicate(timeout=delay if delay is not None else 300)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            kills += 1
            continue
        if proc.returncode == 0:
            break
    assert proc.returncode == 0 and kills >= 2, (kills, proc.returncode)

    a, b = _final_weights(tmp_path / "ref"), _final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = without_timing(read_metrics(tmp_path / "ref")), without_timing(read_metrics(tmp_path / "killed"))
    assert ra == rb
    steps = [r["step"] for r in rb if "train/loss" in r]
    assert steps == list(range(1, 7))
    for _, path in ckpt.list_checkpoints(str(tmp_path / "killed" / "checkpoints")):
        assert ckpt.load(path)["step"] >= 1
    assert not [p for p in os.listdir(tmp_path / "killed") if p.startswith((".tmp-", ".old-"))]


def test_a_torn_metrics_line_is_dropped_and_its_step_written_again(tmp_path):
    """A kill mid-append leaves a torn last line of metrics.jsonl: the resume drops it (and every line after the
    checkpoint) and writes those steps again, so the file ends as an uninterrupted run's."""
    ref = config(tmp_path / "ref", method="kd", total_iters=4, save_interval=2)
    Trainer(ref).train()
    cfg = config(tmp_path / "cut", method="kd", total_iters=4, save_interval=2)
    Trainer(cfg).train()
    os.unlink(ckpt.path_for(os.path.join(cfg.output_dir, "checkpoints"), 4))     # as if killed after step 3
    with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "train/lo')                                          # torn mid-write
    cfg.resume = True
    Trainer(cfg).train()
    assert without_timing(read_metrics(cfg.output_dir)) == without_timing(read_metrics(ref.output_dir))


def test_metrics_rewrite_is_all_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')

    def killed(*args):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(ckpt.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_write_text(str(path), '{"step": 1}\n')
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n' and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_temporaries_of_a_killed_save_are_removed_at_start(tmp_path):
    cfg = config(tmp_path, method="sft", total_iters=1)
    run = cfg.output_dir
    os.makedirs(os.path.join(run, ".tmp-best-abc"))
    os.makedirs(os.path.join(run, ".old-best-def"))
    os.makedirs(os.path.join(run, "checkpoints"))
    open(os.path.join(run, "checkpoints", ".tmp-x.pt"), "wb").close()
    cfg.resume = True
    Trainer(cfg)
    assert not os.path.exists(os.path.join(run, ".tmp-best-abc"))
    assert not os.path.exists(os.path.join(run, ".old-best-def"))
    assert os.listdir(os.path.join(run, "checkpoints")) == []


# ----------------------------------------------------------------------------------------------------------------------
# preemption
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_writes_a_checkpoint_and_exits_zero(tmp_path, sig):
    cfg = _write_config(tmp_path, "run", method="kd", total_iters=100000, save_interval=0)
    proc = _distill(cfg)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or metrics.stat().st_size == 0):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)          # preempt_timeout's default: the step and the checkpoint fit in it
    assert proc.returncode == 0, err[-3000:]
    saved = ckpt.list_checkpoints(str(tmp_path / "run" / "checkpoints"))
    assert len(saved) == 1
    step, path = saved[0]
    assert f"{sig.name}: stopped after step {step} of 100000; checkpoint {path}" in err
    assert ckpt.load(path)["step"] == step >= 1
    assert not (tmp_path / "run" / "final").exists()


def test_a_step_that_outlasts_the_timeout_is_abandoned(monkeypatch, capsys):
    """The watchdog: past preempt_timeout after the signal, the process exits (128 + signal) naming the checkpoint
    a resume starts from. os._exit is replaced here by a recorder."""
    exits = []
    monkeypatch.setattr(faults.os, "_exit", exits.append)
    with faults.Preemption(0.2, lambda: "ckpt/step-000007.pt", print) as p:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert p.requested == "SIGTERM" and not exits
        time.sleep(0.5)
    assert exits == [128 + signal.SIGTERM]
    assert "resume=true continues from ckpt/step-000007.pt" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not p._handle       # handlers restored


# ----------------------------------------------------------------------------------------------------------------------
# non-finite steps
# ----------------------------------------------------------------------------------------------------------------------
def test_a_poisoned_gradient_is_skipped_and_counted(tmp_path):
    def poison(trainer):
        if trainer.step == 1:                     # the second optimiser step
            next(p for p in trainer.student.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")

    cfg = config(tmp_path, method="kd", total_iters=4, save_interval=1, keep_checkpoints=4)
    Trainer(cfg, hooks={"after_backward": poison}).train()
    states = {s: ckpt.load(p)["model"] for s, p in ckpt.list_checkpoints(os.path.join(cfg.output_dir, "checkpoints"))}
    assert all(torch.equal(states[1][k], states[2][k]) for k in states[1])    # step 2 changed nothing
    assert not all(torch.equal(states[2][k], states[3][k]) for k in states[2])
    train = [r for r in read_metrics(cfg.output_dir) if "train/loss" in r]
    assert [r.get("train/skipped_steps") for r in train] == [None, 1, 1, 1]
    assert all(torch.isfinite(v).all() for v in _final_weights(cfg.output_dir).values())


def test_an_absurd_learning_rate_stops_the_run_without_a_nan_checkpoint(tmp_path):
    cfg = config(tmp_path, method="kd", total_iters=20, save_interval=1, lr=1e6, max_bad_steps=3)
    with pytest.raises(faults.TrainingError, match=r"step \d+: 3 optimiser steps in a row had a non-finite") as e:
        Trainer(cfg).train()
    assert "last good checkpoint" in str(e.value)
    saved = ckpt.list_checkpoints(os.path.join(cfg.output_dir, "checkpoints"))
    assert saved
    for _, path in saved:
        assert faults.first_non_finite(ckpt.load(path)["model"]) is None
    assert not os.path.exists(os.path.join(cfg.output_dir, "final"))


@pytest.mark.parametrize("key,value", [("lr", float("inf")), ("lr", float("nan")), ("max_bad_steps", 0),
                                       ("preempt_timeout", 0.0)])
def test_config_refuses_values_that_cannot_train(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key):
        config(tmp_path, method="kd", **{key: value}).resolve()


# ----------------------------------------------------------------------------------------------------------------------
# storage
# ----------------------------------------------------------------------------------------------------------------------
def test_an_output_dir_that_cannot_be_written_is_refused_before_loading(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = config(tmp_path, method="kd", output_dir=str(blocker / "run"))
    monkeypatch.setattr("minillm_fast.distill.models.load_model",
                        lambda *a, **k: pytest.fail("a model was loaded before output_dir was checked"))
    with pytest.raises(ConfigError, match="output_dir=.*cannot be written"):
        Trainer(cfg)


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = config(tmp_path, method="kd", total_iters=4, save_interval=1, keep_checkpoints=4)
    real_save = torch.save

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 3:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", save)
    with pytest.raises(faults.TrainingError, match=r"step 3: writing the checkpoint .* failed .*No space left"):
        Trainer(cfg).train()
    saved = ckpt.list_checkpoints(os.path.join(cfg.output_dir, "checkpoints"))
    assert [s for s, _ in saved] == [1, 2] and ckpt.load(saved[-1][1])["step"] == 2
    assert not [p for p in os.listdir(os.path.join(cfg.output_dir, "checkpoints")) if p.startswith(".tmp-")]


# ----------------------------------------------------------------------------------------------------------------------
# bad data: file:line, before training
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line,expected", [
    ("{not json", r"train\.jsonl:3: not valid JSON"),
    ('{"instruction": "say hi"}', r"train\.jsonl:3: no 'response'"),
    ("{}", r"train\.jsonl:3: needs an 'instruction'"),
    ('["a", "list"]', r"train\.jsonl:3: expected a JSON object"),
])
def test_a_bad_record_is_reported_with_file_and_line(tmp_path, line, expected):
    good = json.dumps({"instruction": "add 1 and 2", "response": "3"})
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    cfg = config(tmp_path, method="sft", train_data=str(path))
    with pytest.raises(ValueError, match=expected):
        Trainer(cfg)


def test_an_empty_data_file_and_corpus_are_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no records"):
        Trainer(config(tmp_path, method="sft", train_data=str(empty)))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("")
    with pytest.raises(ValueError, match="corpus.*is empty"):
        Trainer(config(tmp_path, method="minillm", pt_data=str(corpus)))


def test_long_prompts_are_counted_and_located(tmp_path, capsys):
    short = json.dumps({"instruction": "add 1 and 2", "response": "3"})
    long = json.dumps({"instruction": "word " * 200, "response": "3"})
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([short, long, short, long, short]) + "\n")
    Trainer(config(tmp_path, method="sft", train_data=str(path), total_iters=1))
    err = capsys.readouterr().err
    assert f"dropped 2 of 5 prompt(s) longer than max_prompt_length=64 tokens: {path}:2, {path}:4" in err


def test_dry_run_checks_what_a_start_would(tmp_path):
    """A config that --dry-run passes does not fail at start for a configuration reason: here the same refusals."""
    from minillm_fast.distill.cli import distill_main

    cfg = _write_config(tmp_path, "dry", method="kd")
    assert distill_main(["--config", cfg, "--dry-run"]) == 0
    for bad in ("lr=.inf", "max_bad_steps=0", "batch_size=0", "method=nope"):
        with pytest.raises(ConfigError):
            distill_main(["--config", cfg, "--dry-run", bad])
    assert DistillConfig.from_sources(cfg, []).resolve().max_bad_steps == 5
