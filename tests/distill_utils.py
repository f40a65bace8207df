"""Shared pieces of the distillation tests (tests/test_distill_*.py).

* One thread: the CI machine has two shared cores, and OpenMP spinning makes tiny matmuls ~500x slower with two.
* :func:`workspace` builds the toy workspace of ``minillm_fast.distill.toy`` (the one of the docs' quick start: a
  generated instruction set, the demo's byte-level BPE trainer run on it and saved with save_pretrained, random
  GPT-2 / Llama students and peaked random teachers from configs) once per arch per test session.
* :func:`config` makes a tiny CPU config for it (a few steps, no progress bar, no final evaluation).
"""
from __future__ import annotations

import functools
import json
import os
import tempfile

import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from minillm_fast.distill import toy  # noqa: E402
from minillm_fast.distill.config import DistillConfig  # noqa: E402

ARCHS = ("gpt2", "llama")


@functools.lru_cache(maxsize=None)
def workspace(arch: str = "gpt2") -> dict:
    root = tempfile.mkdtemp(prefix=f"minillm-distill-{arch}-")
    return toy.make_workspace(root, arch=arch, n_train=32, n_valid=4)


def config(tmp_path, method: str = "minillm", arch: str = "gpt2", **overrides) -> DistillConfig:
    p = workspace(arch)
    values = dict(method=method, student=p["student"], teacher=p["teacher"], train_data=p["train_data"],
                  valid_data=p["valid_data"], pt_data=p["pt_data"], output_dir=str(tmp_path / f"run-{method}"),
                  max_length=80, max_prompt_length=64, max_new_tokens=8, batch_size=4, num_rollouts=8,
                  rollout_batch_size=4, ppo_epochs=2, total_iters=4, lr=1e-3, warmup_steps=0, eval_interval=100,
                  save_interval=0, eval_batch_size=4, final_eval=False, progress_bar=False, plots=False,
                  eval_generate=False, select_metric="none", seed=1)
    values.update(overrides)
    return DistillConfig.from_dict(values)


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def without_timing(records: list[dict]) -> list[dict]:
    """Metrics minus wall-clock entries (``time/*``), which differ between runs by nature."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def torchrun(nproc: int, script: str, *args: str, env: dict, timeout: float = 240):
    """``torchrun --standalone --nproc_per_node nproc script args`` on this host; returns the CompletedProcess.

    --standalone makes torchrun bind its rendezvous store on port 0 itself. Picking a free port here and passing it as
    --master_port raced with other processes on the machine (the port could be taken between the pick and the bind;
    it happened once in CI while other jobs ran torchrun)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), script, *args], env=env, capture_output=True, text=True, timeout=timeout)
