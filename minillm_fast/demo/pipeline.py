"""``minillm-fast demo``: the whole MiniLLM mission end to end on a CPU, in minutes, with nothing downloaded.

The paper's Table 1 (teacher, SFT w/o KD, KD, SeqKD, MiniLLM; Rouge-L over 5 seeds) and Table 4 (MiniLLM without
length normalisation, without teacher-mixed sampling, without the single-step term), at toy scale. ``DemoRun`` runs
the stages, one method each (``DemoPaths`` says where each writes):

=========  ==========================================================================================================
stage      what it does (outputs under ``--out``, default ``runs/demo``)
=========  ==========================================================================================================
data       ``tasks.write_splits`` (train/valid/test) and ``tasks.write_pretrain_corpus``; valid and test are also
           written as ``{split}_refs.jsonl`` whose ``response`` is the list of every reference phrasing (the stored
           one first), so validation and test Rouge-L take the max over references
tokenizer  ``tokenizer.build_tokenizer`` on the rendered examples and the corpus, saved with ``save_pretrained``
init       the teacher and the student built from ``configs`` (``build_model``; the ``quick`` shapes, 0.8M and
           0.2M parameters, for both schedules: the default 5M teacher does not become good on a CPU in the
           budget), saved with the tokenizer
teacher    SFT of the teacher (``minillm-fast distill``; best checkpoint by validation Rouge-L)
students   SFT, KD, SeqKD and OKD of the student (best by validation Rouge-L, as the reference selects baselines; OKD
           trains a LoRA module on the teacher along with the student, distill/methods/okd.py); MiniLLM
           initialised from the SFT checkpoint of lowest validation loss (paper, appendix B.1), and its three
           ablations: ``length_norm=false``, ``alpha=0``, ``single_step=false``
cbd        chain-based distillation (demo/cbd.py): a chain teacher -> anchor (0.50M) -> anchor (the students'
           size) by KD links, a 0.27M student initialised by interpolating the two anchors, from the nearer anchor
           alone, and at random, each then trained by KD on KD's schedule; evaluated before and after
eval       every model on the test split, seeds 10 20 30 40 50 (``minillm-fast evaluate``: sampling at temperature
           1, ``no_repeat_ngram_size=6``, Rouge-L and exact match, max over references; next-token ECE, response
           length, distinct-4; for the students also ExAccErr against the teacher's own test samples)
report     ``report.md`` (the table with 95% intervals, paired tests against KD and SFT, what it shows and does
           not, the paper's other measurements, the CBD section, timings, notes), ``rougeL.png``, ``rev_kl.png``,
           ``exaccerr.png``, ``measures.png``, ``cbd_valid_loss.png``
=========  ==========================================================================================================

Every training and evaluation job is the command a user runs, ``python -m minillm_fast distill --config X.yaml`` or
``python -m minillm_fast evaluate ...``, started as a subprocess with its log in ``logs/`` and its YAML config in
``configs/`` (so any stage can be re-run by hand). ``--jobs`` of them run side by side (default: one per core, at
most 2) with ``--threads`` each (default 1), in dependency order, longest first; the teacher, which every other
job but SFT waits for, runs alone with all the threads (on 2 free
cores, 2 threads made its steps 1.7x faster; two processes with 2 threads each on 2 cores were 1.5-3x slower than
with one, OpenMP spin-waiting). Ready jobs start by critical path (``critical_path``). The full demo, OKD, the CBD
rows and the report's measurements included, took 13.9 minutes (835 s, ``--fresh``, 30 jobs) on the 2-core
development machine (AMD EPYC), within the 15-minute budget but close to it; a second run reuses the cached teacher
and the chain (about 3.5 minutes of it). The C++ extension of the fused ops compiles once per machine first (about a
minute).

Caching: the data, the tokenizer, the initial models, the teacher (with its SeqKD responses and its test evaluation)
are reused by the next run when the settings that made them are unchanged (``cache.json`` records them); ``--fresh``
rebuilds everything. The students are trained again on every run.

``--quick`` runs the same pipeline on a smaller data set with short schedules: a smoke test of the plumbing (138 s on
two cores), whose numbers mean nothing. ``--profile long`` (``LONG``) runs it with a 2.6M teacher and 0.5M students,
twice the data and the steps: about 1 to 2 hours on two cores (docs/results/ holds one run's report).
``--reuse-runs`` keeps the student runs of an earlier demo in ``--out`` whose configs and inputs are unchanged, so a
changed evaluation or report reruns without training again.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import cbd

__all__ = ["Schedule", "FULL", "QUICK", "LONG", "PROFILES", "METHODS", "run_demo", "main"]

# The rows of the report, in order: (name, what it is).
METHODS = (
    ("teacher", "teacher (SFT)"),
    ("sft", "SFT w/o KD"),
    ("kd", "KD"),
    ("seqkd", "SeqKD"),
    ("minillm", "MiniLLM"),
    ("minillm_no_length_norm", "MiniLLM w/o length norm."),
    ("minillm_no_teacher_mix", "MiniLLM w/o teacher-mixed sampling"),
    ("minillm_no_single_step", "MiniLLM w/o single-step term"),
    ("okd", "OKD"),
    *cbd.ROWS,
)
MINILLM_ABLATIONS = {
    "minillm": {},
    "minillm_no_length_norm": {"length_norm": False},
    "minillm_no_teacher_mix": {"alpha": 0.0},
    "minillm_no_single_step": {"single_step": False},
}
CACHE_VERSION = 1


@dataclass(frozen=True)
class Schedule:
    """Everything a demo run trains and evaluates with. The dicts are ``distill`` config keys (``--help-config``)."""

    name: str
    models: str                             # a key of configs.MODEL_SETS: the shapes of the teacher, students, CBD
    sizes: Dict[str, int]                   # examples per split
    pretrain_lines: int
    common: Dict[str, object] = field(default_factory=dict)    # keys of every distill run
    teacher: Dict[str, object] = field(default_factory=dict)
    sft: Dict[str, object] = field(default_factory=dict)
    kd: Dict[str, object] = field(default_factory=dict)
    seqkd: Dict[str, object] = field(default_factory=dict)
    minillm: Dict[str, object] = field(default_factory=dict)
    okd: Dict[str, object] = field(default_factory=dict)
    cbd_link: Dict[str, object] = field(default_factory=dict)    # each link of the CBD chain (the rows train on kd)
    eval_batch_size: int = 100
    seeds: Sequence[int] = (10, 20, 30, 40, 50)


# the demo's longest prompt is 140 tokens, its longest response 56 (with EOS); no prompt is dropped
_COMMON = dict(max_length=200, max_prompt_length=144, max_new_tokens=56, device="auto", progress_bar=False,
               plots=False, final_eval=False, overwrite=True, eval_batch_size=100)

FULL = Schedule(
    name="full",
    models="quick",         # the 5.3M default teacher cannot become good in the budget on a CPU (see report notes)
    sizes={"train": 4000, "valid": 200, "test": 200},
    pretrain_lines=3000,
    common=dict(_COMMON, max_valid_samples=100),
    teacher=dict(batch_size=16, total_iters=1500, lr=3e-3, warmup_steps=30, eval_interval=250),
    sft=dict(batch_size=16, total_iters=600, lr=3e-3, warmup_steps=30, eval_interval=100),
    kd=dict(batch_size=16, total_iters=600, lr=3e-3, warmup_steps=30, eval_interval=100),
    seqkd=dict(batch_size=16, total_iters=600, lr=3e-3, warmup_steps=30, eval_interval=100, rollout_batch_size=100),
    minillm=dict(batch_size=16, num_rollouts=64, rollout_batch_size=64, ppo_epochs=2, total_iters=160, lr=5e-4,
                 warmup_steps=8, eval_interval=32, pt_batch_size=8),
    # KD's schedule (300 steps reached only 15 test Rouge-L, with okd_lr 3e-3 or 5e-4)
    okd=dict(batch_size=16, total_iters=600, lr=3e-3, warmup_steps=30, eval_interval=100),
    # the chain's links: half of KD's steps, validated by loss alone (no sampling), to keep the demo within 15 min
    cbd_link=dict(batch_size=16, total_iters=200, lr=3e-3, warmup_steps=20, eval_interval=100, eval_generate=False,
                  select_metric="loss"),
)

QUICK = Schedule(
    name="quick",
    models="quick",
    sizes={"train": 400, "valid": 20, "test": 20},
    pretrain_lines=200,
    common=dict(_COMMON, max_new_tokens=32, max_valid_samples=20, eval_batch_size=20),
    teacher=dict(batch_size=8, total_iters=60, lr=3e-3, warmup_steps=5, eval_interval=30),
    sft=dict(batch_size=8, total_iters=30, lr=3e-3, warmup_steps=5, eval_interval=15),
    kd=dict(batch_size=8, total_iters=30, lr=3e-3, warmup_steps=5, eval_interval=15),
    seqkd=dict(batch_size=8, total_iters=30, lr=3e-3, warmup_steps=5, eval_interval=15, max_train_samples=48,
               rollout_batch_size=48),
    minillm=dict(batch_size=8, num_rollouts=8, rollout_batch_size=8, ppo_epochs=1, total_iters=2, lr=5e-4,
                 warmup_steps=1, eval_interval=1, pt_batch_size=4),
    okd=dict(batch_size=8, total_iters=30, lr=3e-3, warmup_steps=5, eval_interval=15),
    cbd_link=dict(batch_size=8, total_iters=30, lr=3e-3, warmup_steps=5, eval_interval=15, eval_generate=False,
                  select_metric="loss"),
    eval_batch_size=20,
)

def _longer(stage: dict, factor: int = 2) -> dict:
    """A stage's keys with ``factor`` times the steps, warm-up and evaluation interval."""
    return dict(stage, **{k: factor * stage[k] for k in ("total_iters", "warmup_steps", "eval_interval") if k in stage})


# The long profile (``--profile long``, about 1 to 2 hours on 2 cores): a 2.6M teacher and 0.5M students (3x and 2.3x
# the default profile's), twice the data and every stage's steps, 200 validation samples per evaluation (half the
# variance of the valid reverse KL), 300 test prompts. Compute is not equalised by construction: in the default
# profile MiniLLM with its SFT run costs about 1.2x KD; in the long profile's committed run 1.89x (the larger teacher
# makes rollouts dearer); the report's compute table states the ratio of each run.
LONG = dataclasses.replace(
    FULL,
    name="long",
    models="long",
    sizes={"train": 8000, "valid": 300, "test": 300},
    pretrain_lines=6000,
    common=dict(FULL.common, max_valid_samples=200),
    teacher=dict(_longer(FULL.teacher), lr=2e-3),
    **{stage: _longer(getattr(FULL, stage)) for stage in ("sft", "kd", "seqkd", "minillm", "okd", "cbd_link")},
)

PROFILES = {"default": FULL, "quick": QUICK, "long": LONG}


# ----------------------------------------------------------------------------------------------------------------------
# jobs
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One subprocess, ``python -m minillm_fast <argv>``: a ``distill`` run (kind "train") or an ``evaluate`` run."""

    name: str
    kind: str                                  # "train" | "eval" | "init" (minillm-fast init of a CBD student)
    argv: List[str]                            # arguments after ``python -m minillm_fast``
    deps: List[str] = field(default_factory=list)
    cost: float = 1.0                          # relative wall time, for longest-first scheduling
    total_steps: int = 0                       # distill: optimiser steps (progress from metrics.jsonl)
    run_dir: Optional[str] = None
    after: Optional[object] = None             # callable run in this process when the job succeeds
    cached: bool = False
    exclusive: bool = False                    # runs alone, with every job slot's threads
    # filled while running
    proc: Optional[subprocess.Popen] = None
    log: Optional[str] = None
    start: float = 0.0
    end: float = 0.0

    def progress(self) -> float:
        """Fraction done (0..1) of a running job."""
        if self.kind != "train" or not self.total_steps or not self.run_dir:
            return 0.0
        path = os.path.join(self.run_dir, "metrics.jsonl")
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 4096))
                lines = f.read().decode("utf-8", "replace").splitlines()
            for line in reversed(lines):
                if line.startswith('{"step"'):
                    return min(1.0, json.loads(line)["step"] / self.total_steps)
        except (OSError, ValueError, KeyError):
            pass
        return 0.0


class DemoError(RuntimeError):
    """A stage of the demo failed; the message names the log to read."""


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONWARNINGS="ignore")
    return env


def _summary(job: Job) -> str:
    """A few words on a finished job: the best validation Rouge-L of a run, the test Rouge-L of an evaluation."""
    try:
        if job.kind == "train" and job.run_dir:
            with open(os.path.join(job.run_dir, "metrics.jsonl")) as f:
                scores = [json.loads(line)["eval/rougeL"] for line in f if '"eval/rougeL"' in line]
            return f"best valid Rouge-L {max(scores):.2f}" if scores else ""
        if job.kind == "eval":
            out = job.argv[job.argv.index("--output") + 1]
            with open(os.path.join(out, "results.json")) as f:
                res = json.load(f)
            return f"test Rouge-L {res['rougeL_mean']:.2f} ± {res['rougeL_std']:.2f}"
    except (OSError, ValueError, KeyError):
        pass
    return ""


def _running_status(running: Sequence[Job]) -> str:
    """The running jobs, each training run with its progress: ``"teacher 40%, eval_sft"``."""
    return ", ".join(f"{j.name} {100 * j.progress():.0f}%" if j.kind == "train" else j.name for j in running)


def critical_path(jobs: Sequence[Job]) -> Dict[str, float]:
    """Each job's cost plus the longest chain of costs that waits on it: the order to start ready jobs in (a short job
    that a long chain depends on, such as a CBD initialisation, goes before a long job that nothing waits for)."""
    dependents: Dict[str, List[str]] = {j.name: [] for j in jobs}
    for j in jobs:
        for d in j.deps:
            dependents.setdefault(d, []).append(j.name)
    cost = {j.name: j.cost for j in jobs}
    memo: Dict[str, float] = {}

    def path(name: str) -> float:
        if name not in memo:
            memo[name] = cost.get(name, 0.0) + max((path(d) for d in dependents.get(name, [])), default=0.0)
        return memo[name]

    return {j.name: path(j.name) for j in jobs}


def run_jobs(jobs: List[Job], *, n_parallel: int, threads: int, log_dir: Path, timings: Dict[str, dict],
             say=print) -> None:
    """Run ``jobs`` (subprocesses) respecting their dependencies, ``n_parallel`` at a time, longest critical path
    first (``critical_path``). On a
    terminal a tqdm bar shows the jobs done (fractions from each running run's metrics) and which are running;
    otherwise a status line is printed every 30 s. Each finished job prints a line."""
    from tqdm import tqdm

    by_name = {j.name: j for j in jobs}
    priority = critical_path(jobs)
    pending = [j for j in jobs if not j.cached]
    done = {j.name for j in jobs if j.cached}
    running: List[Job] = []
    log_dir.mkdir(parents=True, exist_ok=True)
    tty = sys.stderr.isatty()
    bar = tqdm(total=len(pending), desc="demo", unit="job", dynamic_ncols=True, file=sys.stderr, disable=not tty,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} jobs [{elapsed}<{remaining}]{postfix}")
    write = bar.write if tty else (lambda msg: print(msg, file=sys.stderr, flush=True))
    finished, n_total, t0 = 0, len(pending), time.perf_counter()
    last_status = t0

    try:
        while pending or running:
            ready = sorted((j for j in pending if all(d in done for d in j.deps)), key=lambda j: -priority[j.name])
            while ready and len(running) < n_parallel and not any(j.exclusive for j in running):
                if ready[0].exclusive and running:
                    break                           # let the running jobs finish, then run it alone
                job = ready.pop(0)
                pending.remove(job)
                job.log = str(log_dir / f"{job.name}.log")
                job.start = time.perf_counter()
                env = _child_env(threads * n_parallel if job.exclusive else threads)
                with open(job.log, "w") as log:
                    job.proc = subprocess.Popen([sys.executable, "-m", "minillm_fast", *job.argv], stdout=log,
                                                stderr=subprocess.STDOUT, env=env)
                running.append(job)
            if not running:
                missing = sorted({d for j in pending for d in j.deps} - done - set(by_name))
                raise DemoError(f"jobs {[j.name for j in pending]} wait on jobs that do not exist: {missing}")
            time.sleep(0.5)
            for job in list(running):
                rc = job.proc.poll()
                if rc is None:
                    continue
                job.end = time.perf_counter()
                running.remove(job)
                if rc != 0:
                    tail = Path(job.log).read_text(errors="replace").splitlines()[-25:]
                    raise DemoError(f"job {job.name!r} failed (exit {rc}); last lines of {job.log}:\n" +
                                    "\n".join(tail))
                if job.after is not None:
                    job.after()
                done.add(job.name)
                finished += 1
                timings[job.name] = {"seconds": job.end - job.start, "kind": job.kind, "cached": False}
                write(f"  done {job.name:28s} {job.end - job.start:6.1f} s  {_summary(job)}")
            if tty:
                bar.n = finished + sum(j.progress() for j in running)
                bar.set_postfix_str(_running_status(running), refresh=False)
                bar.refresh()
            elif time.perf_counter() - last_status >= 30 and running:
                last_status = time.perf_counter()
                write(f"  [{last_status - t0:5.0f} s] {finished}/{n_total} jobs done; running: "
                      f"{_running_status(running)}")
    except BaseException:
        for job in running:
            if job.proc is not None and job.proc.poll() is None:
                job.proc.terminate()
                try:
                    job.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    job.proc.kill()
        raise
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------------------------------
class Cache:
    """``cache.json``: for each cached artefact, the settings that made it; reused only when they match."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.entries = {}
        if path.exists() and not fresh:
            try:
                self.entries = json.loads(path.read_text())
            except ValueError:
                self.entries = {}

    def valid(self, name: str, key: dict, *paths: Path) -> bool:
        return self.entries.get(name) == _jsonable(key) and all(Path(p).exists() for p in paths)

    def store(self, name: str, key: dict) -> None:
        self.entries[name] = _jsonable(key)
        self._write()

    def drop(self, name: str) -> None:
        if self.entries.pop(name, None) is not None:
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=2, sort_keys=True))
        os.replace(tmp, self.path)


def _jsonable(x):
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def write_reference_split(src: Path, dst: Path) -> Path:
    """``src`` (tasks' layout) rewritten with ``response`` = every reference phrasing, the stored response first: the
    trainer's validation loss uses the first, Rouge-L and exact match the max over all."""
    from ..distill.data import read_jsonl, write_jsonl

    write_jsonl(dst, [{"instruction": ex["instruction"], "context": ex.get("context", ""),
                       "response": [ex["response"]] + [r for r in ex.get("references", []) if r != ex["response"]],
                       "task": ex.get("task")} for ex in read_jsonl(src)])
    return dst


def _write_yaml(path: Path, values: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(values, f, sort_keys=False)
    return path


def export_min_loss_checkpoint(run_dir: Path, init_dir: Path, out_dir: Path) -> dict:
    """Save (``save_pretrained``) the checkpoint of ``run_dir`` with the lowest validation loss in ``metrics.jsonl``:
    the MiniLLM initialisation (the paper selects it by validation loss; the baselines by Rouge-L). Checkpoints are
    written at every evaluation (``save_interval = eval_interval``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..distill import checkpoint as ckpt

    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"eval/loss"' in line]
    if not evals:
        raise DemoError(f"{run_dir}/metrics.jsonl has no validation loss to select the MiniLLM initialisation by")
    best = min(evals, key=lambda r: r["eval/loss"])
    path = ckpt.path_for(str(run_dir / "checkpoints"), best["step"])
    if not os.path.exists(path):
        raise DemoError(f"no checkpoint {path} for step {best['step']} (the step of lowest validation loss); keep "
                        f"save_interval = eval_interval and enough keep_checkpoints")
    model = AutoModelForCausalLM.from_pretrained(str(init_dir), local_files_only=True)
    model.load_state_dict(ckpt.load(path)["model"])
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(init_dir), local_files_only=True).save_pretrained(str(out_dir))
    return {"step": best["step"], "eval/loss": best["eval/loss"], "eval/rougeL": best.get("eval/rougeL"),
            "eval/rev_kl": best.get("eval/rev_kl")}


def run_demo(out: str = "runs/demo", *, quick: bool = False, profile: Optional[str] = None, fresh: bool = False,
             reuse_runs: bool = False, family: str = "llama", jobs: Optional[int] = None, threads: int = 1,
             seed: int = 0, say=print) -> dict:
    """Run the demo into ``out``; returns ``{"report": path, "rows": [...], "timings": {...}}``. ``profile``: a key of
    ``PROFILES`` (default ``"default"``; ``quick=True`` is ``profile="quick"``)."""
    name = profile or ("quick" if quick else "default")
    if name not in PROFILES or (quick and name != "quick"):
        raise ValueError(f"profile={profile!r} (quick={quick}) is not one of {tuple(PROFILES)}")
    demo = DemoRun(out, PROFILES[name], family=family, seed=seed,
                   n_parallel=jobs or max(1, min(2, os.cpu_count() or 1)), threads=threads, say=say,
                   reuse_runs=reuse_runs)
    return demo.run(fresh=fresh)


class DemoPaths:
    """Where each stage writes, under ``--out``."""

    FRESH = ("data", "tokenizer", "init", "models", "runs", "eval", "configs", "logs", "cbd", "cache.json")  # --fresh removes

    def __init__(self, out: Path):
        self.out = out
        self.data = out / "data"
        self.pretrain = self.data / "pretrain.txt"
        self.tokenizer = out / "tokenizer"
        self.configs = out / "configs"
        self.logs = out / "logs"
        self.teacher = self.run("teacher") / "best"                 # the trained teacher every distillation reads
        self.seqkd_data = out / "models" / "seqkd_train.jsonl"       # the teacher's SeqKD responses, kept with it
        self.sft_init = out / "models" / "sft_min_valid_loss"        # MiniLLM's start: SFT of lowest valid loss
        self.chain = out / "cbd" / "chain"                           # the CBD chain folder (chain.json, anchors/)

    def split(self, name: str) -> Path:
        """``data/{name}.jsonl``: a split as ``tasks.write_splits`` writes it."""
        return self.data / f"{name}.jsonl"

    def refs(self, name: str) -> Path:
        """``data/{name}_refs.jsonl``: the split with every reference phrasing (``write_reference_split``)."""
        return self.data / f"{name}_refs.jsonl"

    def init(self, what: str) -> Path:
        """``init/teacher``, ``init/student`` or ``init/<cbd row>``: a model before training, with the tokenizer."""
        return self.out / "init" / what

    def cbd_config(self, what: str) -> Path:
        """``cbd/configs/{what}``: the config.json of a chain anchor or of the CBD student (``cbd.configs``)."""
        return self.out / "cbd" / "configs" / what

    def run(self, name: str) -> Path:
        return self.out / "runs" / name

    def eval(self, name: str) -> Path:
        return self.out / "eval" / name

    def config(self, name: str) -> Path:
        return self.configs / f"{name}.yaml"


class DemoRun:
    """One ``minillm-fast demo`` run, one method per stage in the order :meth:`run` calls them: ``data``,
    ``tokenizer``, ``initial_models``, ``native_extension`` (set-up, timed, cached when their settings are
    unchanged), the jobs (``teacher_job``, one method per student, ``eval_jobs``) run by ``train_and_evaluate``, then
    ``report``.

    What a stage leaves for the later ones is on ``self``: ``keys[name]`` (the settings that made a cached artefact,
    the cache key of everything built from it) and ``cached[name]`` (reused from an earlier run), ``tok``, ``params``
    (parameter counts), ``sft_selection`` (filled when the SFT job ends), ``timings`` (the report's table, in order).
    """

    def __init__(self, out, sched: Schedule, *, family: str, seed: int, n_parallel: int, threads: int, say=print,
                 reuse_runs: bool = False):
        self.paths = DemoPaths(Path(out).resolve())
        self.sched, self.family, self.seed, self.reuse_runs = sched, family, seed, reuse_runs
        self.n_parallel, self.threads, self.say = n_parallel, threads, say
        # every distill run's keys beyond its schedule's (the teacher's cache key includes them)
        self.common = dict(sched.common, tokenizer=str(self.paths.tokenizer), train_data=str(self.paths.split("train")),
                           valid_data=str(self.paths.refs("valid")), seed=10)
        self.timings: Dict[str, dict] = {}
        self.keys: Dict[str, dict] = {}
        self.cached: Dict[str, bool] = {}
        self.sft_selection: dict = {}
        self.tok = None
        self.params: Dict[str, int] = {}
        self.cache: Optional[Cache] = None

    def run(self, fresh: bool = False) -> dict:
        t_start = time.perf_counter()
        self.prepare(fresh)
        self.data()
        self.tokenizer()
        self.initial_models()
        self.native_extension()
        self.cbd_models()
        jobs = [self.teacher_job(), self.sft_job(), self.kd_job(), self.seqkd_job(), *self.minillm_jobs(),
                self.okd_job(), *self.cbd_jobs(), *self.eval_jobs()]
        self.train_and_evaluate(jobs)
        return self.report(t_start)

    # set-up stages ----------------------------------------------------------------------------------------------------
    def prepare(self, fresh: bool) -> None:
        """The output directory (emptied of every stage's outputs with ``fresh``) and its cache."""
        out = self.paths.out
        if fresh:
            for sub in DemoPaths.FRESH:
                path = out / sub
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        self.cache = Cache(out / "cache.json", fresh)
        self.say(f"minillm-fast demo ({self.sched.name}): output in {out}, {self.n_parallel} job(s) at a time, "
                 f"{self.threads} thread(s) each")

    def data(self) -> None:
        """train/valid/test splits, the pre-training corpus, and the valid/test files with every reference."""
        p = self.paths
        key = {"v": CACHE_VERSION, "seed": self.seed, "sizes": self.sched.sizes,
               "pretrain_lines": self.sched.pretrain_lines}
        outputs = [p.split(s) for s in ("train", "valid", "test")] + [p.refs(s) for s in ("valid", "test")]
        self._setup_stage("data", key, [*outputs, p.pretrain], self._write_data)

    def _write_data(self) -> None:
        from . import tasks

        p = self.paths
        tasks.write_splits(p.data, seed=self.seed, sizes=self.sched.sizes)
        tasks.write_pretrain_corpus(p.pretrain, seed=self.seed, n_lines=self.sched.pretrain_lines)
        for split in ("valid", "test"):
            write_reference_split(p.split(split), p.refs(split))

    def tokenizer(self) -> None:
        """The BPE tokenizer trained on the rendered data (``tokenizer.build_tokenizer``); loaded into ``tok``."""
        from .tokenizer import load_tokenizer

        self._setup_stage("tokenizer", {"data": self.keys["data"]}, [self.paths.tokenizer / "tokenizer.json"],
                          self._write_tokenizer, after="data")
        self.tok = load_tokenizer(self.paths.tokenizer)

    def _write_tokenizer(self) -> None:
        from .tokenizer import build_tokenizer, demo_tokenizer_texts

        build_tokenizer(demo_tokenizer_texts(self.paths.data), self.paths.tokenizer)

    def initial_models(self) -> None:
        """The teacher and the student before training, from ``configs``, saved with the tokenizer."""
        from .configs import MODEL_SETS, num_parameters, shape_config, special_token_ids

        ids, vocab, shapes = special_token_ids(self.tok), len(self.tok), MODEL_SETS[self.sched.models]
        configs = {"teacher": shape_config(shapes.teacher, vocab, self.family, **ids),
                   "student": shape_config(shapes.student, vocab, self.family, **ids)}
        self.params = {what: num_parameters(cfg) for what, cfg in configs.items()}
        key = {"tokenizer": self.keys["tokenizer"], "family": self.family, "seed": self.seed,
               **({"quick": True} if self.sched.models == "quick" else {"models": self.sched.models})}
        self._setup_stage("init", key, [self.paths.init(w) / "config.json" for w in configs],
                          functools.partial(self._write_initial_models, configs), after="tokenizer")
        t, s = self.params["teacher"], self.params["student"]
        self.say(f"  teacher {t / 1e6:.2f}M parameters, student {s / 1e6:.2f}M ({t / s:.1f}x smaller), "
                 f"{self.family}, vocabulary {len(self.tok)}")

    def _write_initial_models(self, configs: dict) -> None:
        from .configs import build_model

        _quiet_transformers()
        seeds = {"teacher": self.seed, "student": self.seed + 1}
        for what, cfg in configs.items():
            build_model(cfg, seed=seeds[what]).save_pretrained(str(self.paths.init(what)))
            self.tok.save_pretrained(str(self.paths.init(what)))

    def cbd_models(self) -> None:
        """The CBD anchors' and student's configs (``cbd.configs``) and the student's random initialisation (the
        ``cbd_scratch`` row's start)."""
        from .configs import num_parameters, special_token_ids

        configs = cbd.configs(len(self.tok), self.family, self.sched.models, **special_token_ids(self.tok))
        counts = {what: num_parameters(cfg) for what, cfg in configs.items()}
        self.params.update({name: counts["student"] for name, _ in cbd.ROWS},
                           **{name: counts[name] for name in cbd.ANCHORS})
        self.cbd_alpha_nearest = cbd.nearest_alpha(counts["anchor_mid"], counts["anchor_small"], counts["student"])
        key = {"init": self.keys["init"], "v": 1}
        outputs = [self.paths.cbd_config(w) / "config.json" for w in configs] + \
                  [self.paths.init("cbd_scratch") / "config.json"]
        self._setup_stage("cbd_init", key, outputs, functools.partial(self._write_cbd_models, configs), after="init")

    def _write_cbd_models(self, configs: dict) -> None:
        from .configs import build_model

        for what, cfg in configs.items():
            cfg.save_pretrained(str(self.paths.cbd_config(what)))
        build_model(configs["student"], seed=self.seed + 2).save_pretrained(str(self.paths.init("cbd_scratch")))
        self.tok.save_pretrained(str(self.paths.init("cbd_scratch")))

    def native_extension(self) -> None:
        """The fused ops' C++ extension compiles on first use (about a minute, once per machine): here, once, rather
        than inside the first jobs that need it."""
        self._timed("native extension", self._warm_native, cached=False)

    def _warm_native(self) -> None:
        try:
            import torch

            from .. import dispatch

            if not torch.cuda.is_available():
                dispatch.native_available(torch.device("cpu"))
        except Exception as e:  # noqa: BLE001 - the jobs fall back to the torch backend and say why
            self.say(f"  (native extension not available: {e})")

    def _timed(self, name: str, build, cached: bool) -> None:
        t0 = time.perf_counter()
        if not cached:
            build()
        seconds = 0.0 if cached else time.perf_counter() - t0
        self.timings[name] = {"seconds": seconds, "kind": "setup", "cached": cached}
        self.say(f"  {'cached' if cached else 'done'} {name:24s} {seconds:7.1f} s")

    def _reusable(self, name: str, key: dict, outputs: Sequence[Path], after: Optional[str] = None) -> bool:
        """Record ``name``'s cache key; whether its outputs from an earlier run can be reused (the settings that made
        them, and what ``after`` names, unchanged). An entry that cannot be reused is dropped from the cache."""
        cached = (after is None or self.cached[after]) and self.cache.valid(name, key, *outputs)
        self.keys[name], self.cached[name] = key, cached
        if not cached:
            self.cache.drop(name)
        return cached

    def _setup_stage(self, name: str, key: dict, outputs: Sequence[Path], build, after: Optional[str] = None) -> None:
        cached = self._reusable(name, key, outputs, after)
        self._timed(name, functools.partial(self._build_and_store, name, build), cached)

    def _build_and_store(self, name: str, build) -> None:
        build()
        self.cache.store(name, self.keys[name])

    # jobs -------------------------------------------------------------------------------------------------------------
    def _distill_job(self, name: str, values: dict, deps: List[str], cost: float, **job) -> Job:
        """A ``minillm-fast distill`` job: its config (``common`` + ``values``) written to ``configs/{name}.yaml``.
        With ``reuse_runs`` a student run of an earlier demo in ``--out`` is reused (not trained again) when its config
        and everything upstream of it (initial models, teacher, CBD chain, the runs it starts from) are unchanged."""
        values = dict(self.common, **values, output_dir=str(self.paths.run(name)))
        path = _write_yaml(self.paths.config(name), values)
        if "cached" not in job:             # the teacher decides its own reuse
            job = self._reusable_run(name, values, deps, job)
        return Job(name, "train", ["distill", "--config", str(path)], deps=deps, cost=cost,
                   total_steps=int(values["total_iters"]), run_dir=str(self.paths.run(name)), **job)

    def _reusable_run(self, name: str, values: dict, deps: List[str], job: dict) -> dict:
        """``job`` with ``after`` recording the run's cache key when it has trained (always, so that a later
        ``--reuse-runs`` can reuse it) and, with ``reuse_runs``, ``cached`` when the recorded key matches."""
        upstream = {k: self.keys.get(k) for k in ("init", "teacher", "cbd_init", "cbd_chain")}
        key = {"values": values, "upstream": upstream, "runs": {d: self.keys.get(f"run:{d}") for d in deps}}
        outputs = [self.paths.run(name) / "best" / "config.json"]
        cached = self.reuse_runs and self.cache.valid(f"run:{name}", key, *outputs)
        self.keys[f"run:{name}"] = key
        then = job.get("after")
        store = functools.partial(self.cache.store, f"run:{name}", key)
        if cached:
            self._record_cached(name, "train")
            self.say(f"  cached {name:24s} {0.0:7.1f} s")
            if then is not None:
                then()          # what a finished run leaves for the later stages (the SFT selection, SeqKD data)
        else:
            self.cache.drop(f"run:{name}")
        return dict(job, cached=cached, after=store if then is None else (lambda: (then(), store())))

    def _eval_job(self, name: str, model_dir: Path, deps: List[str], cost: float, *, with_teacher: bool = False,
                  **job) -> Job:
        """A ``minillm-fast evaluate`` job of ``model_dir`` on the test split, over the schedule's seeds (with the
        calibration, length and distinct-4 of distill/fidelity.py). ``with_teacher``: also the exposure bias against
        the teacher, whose own test samples (``eval_teacher``'s results.json) are the oracle prefixes; the job then
        waits for ``eval_teacher``."""
        c, sched = self.common, self.sched
        argv = ["evaluate", "--model", str(model_dir), "--data", str(self.paths.refs("test")), "--output",
                str(self.paths.eval(name)), "--seeds", *map(str, sched.seeds), "--max-length", str(c["max_length"]),
                "--max-prompt-length", str(c["max_prompt_length"]), "--max-new-tokens", str(c["max_new_tokens"]),
                "--batch-size", str(sched.eval_batch_size)]
        if with_teacher:
            argv += ["--teacher", str(self.paths.teacher), "--teacher-predictions",
                     str(self.paths.eval("teacher") / "results.json")]
            deps = deps + ["eval_teacher"]
        return Job(name=f"eval_{name}", kind="eval", argv=argv, deps=deps, cost=cost, **job)

    def _record_cached(self, name: str, kind: str) -> None:
        self.timings[name] = {"seconds": 0.0, "kind": kind, "cached": True}

    def teacher_job(self) -> Job:
        """SFT of the teacher, alone with every thread (every job but SFT waits for it); reused when cached."""
        key = {"init": self.keys["init"], "common": self.common, "teacher": self.sched.teacher}
        cached = self._reusable("teacher", key, [self.paths.teacher / "config.json"], after="init")
        values = dict(self.sched.teacher, method="sft", student=str(self.paths.init("teacher")))
        job = self._distill_job("teacher", values, [], 100.0, cached=cached, exclusive=True,
                                after=functools.partial(self.cache.store, "teacher", key))
        if cached:
            self._record_cached("teacher", "train")
            self.say(f"  cached {'teacher':24s} {0.0:7.1f} s")
        return job

    def sft_job(self) -> Job:
        """SFT of the student, without the teacher (it would only score SFT's validation samples, 80 s of the
        15-minute budget); a checkpoint at every evaluation, for ``_after_sft``'s selection."""
        sft = self.sched.sft
        n_evals = -(-int(sft["total_iters"]) // int(sft["eval_interval"]))
        return self._distill_job("sft", dict(sft, method="sft", student=str(self.paths.init("student")),
                                             save_interval=sft["eval_interval"], keep_checkpoints=n_evals + 1),
                                 [], 20.0, after=self._after_sft)

    def _after_sft(self) -> None:
        self.sft_selection.update(export_min_loss_checkpoint(self.paths.run("sft"), self.paths.init("student"),
                                                             self.paths.sft_init))

    def _from_teacher(self, method: str, values: dict) -> dict:
        """A student run from the initial student against the trained teacher."""
        return dict(values, method=method, student=str(self.paths.init("student")), teacher=str(self.paths.teacher))

    def kd_job(self) -> Job:
        return self._distill_job("kd", self._from_teacher("kd", self.sched.kd), ["teacher"], 40.0)

    def seqkd_job(self) -> Job:
        """SeqKD; the teacher's responses of an earlier run are reused when the teacher is, and kept for the next."""
        key = {"teacher": self.keys["teacher"], "seqkd": self.sched.seqkd}
        cached = self._reusable("seqkd_data", key, [self.paths.seqkd_data], after="teacher")
        values = self._from_teacher("seqkd", self.sched.seqkd)
        if cached:
            values["seqkd_data"] = str(self.paths.seqkd_data)
        return self._distill_job("seqkd", values, ["teacher"], 45.0, after=self._after_seqkd)

    def _after_seqkd(self) -> None:
        src = self.paths.run("seqkd") / "seqkd_train.jsonl"
        if src.exists() and not self.cached["seqkd_data"]:
            self.paths.seqkd_data.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, self.paths.seqkd_data)
            self.cache.store("seqkd_data", self.keys["seqkd_data"])

    def minillm_jobs(self) -> List[Job]:
        """MiniLLM from the SFT checkpoint of lowest validation loss (paper, appendix B.1) and its three ablations."""
        return [self._distill_job(name, dict(self.sched.minillm, method="minillm", student=str(self.paths.sft_init),
                                             teacher=str(self.paths.teacher), pt_data=str(self.paths.pretrain),
                                             **overrides), ["teacher", "sft"], 50.0)
                for name, overrides in MINILLM_ABLATIONS.items()]

    def okd_job(self) -> Job:
        """OKD from the same initial student as KD (no SFT phase, no sampling)."""
        return self._distill_job("okd", self._from_teacher("okd", self.sched.okd), ["teacher"], 60.0)

    def cbd_jobs(self) -> List[Job]:
        """The chain (teacher -> anchor_mid -> anchor_small; reused with the teacher), the CBD and nearest-anchor
        initialisations (``minillm-fast init``), the three rows' KD runs (with ``eval_on_start``) and the test
        evaluations of their initialisations (demo/cbd.py)."""
        p, chain_yaml = self.paths, self.paths.config("cbd_chain")
        key = {"teacher": self.keys["teacher"], "cbd_init": self.keys["cbd_init"], "link": self.sched.cbd_link}
        cached = self._reusable("cbd_chain", key, [p.chain / "chain.json"], after="teacher")
        if not cached and p.chain.exists():
            shutil.rmtree(p.chain)                      # a stale chain would be continued, not rebuilt
        _write_yaml(chain_yaml, cbd.chain_config(
            teacher=p.teacher, tokenizer=p.tokenizer, output_dir=p.chain,
            anchor_dirs={a: p.cbd_config(a) for a in cbd.ANCHORS}, common=self.common, link=self.sched.cbd_link))
        jobs = [Job("cbd_chain", "train", ["chain", "--config", str(chain_yaml)], deps=["teacher"], cost=50.0,
                    cached=cached, after=functools.partial(self.cache.store, "cbd_chain", key))]
        if cached:
            self._record_cached("cbd_chain", "train")
        student_cfg = str(p.cbd_config("student"))
        for name, alpha in (("cbd", None), ("cbd_nearest", self.cbd_alpha_nearest)):
            argv = ["init", "--chain", str(p.chain), "--student-config", student_cfg, "--out", str(p.init(name))]
            jobs.append(Job(f"init_{name}", "init", argv + ([] if alpha is None else ["--alpha", str(alpha)]),
                            deps=["cbd_chain"], cost=2.0))
        for name, _ in cbd.ROWS:
            deps = ["teacher"] + ([] if name == "cbd_scratch" else [f"init_{name}"])
            values = dict(self.sched.kd, method="kd", student=str(p.init(name)), teacher=str(p.teacher),
                          eval_on_start=True)
            jobs.append(self._distill_job(name, values, deps, 45.0))
            jobs.append(self._eval_job(f"{name}_init", p.init(name), deps[1:], 5.0))
        return jobs

    def eval_jobs(self) -> List[Job]:
        """Every model on the test split, every student with its exposure bias against the teacher; the teacher's
        evaluation is reused with the teacher."""
        # "fidelity": results.json with the prompt fingerprint and per-example scores the students' jobs and the
        # report read (an older cached evaluation lacks them)
        key = {"teacher": self.keys["teacher"], "test": str(self.paths.refs("test")), "seeds": list(self.sched.seeds),
               "batch": self.sched.eval_batch_size, "fidelity": 1}
        cached = self._reusable("eval_teacher", key, [self.paths.eval("teacher") / "results.json"], after="teacher")
        jobs = [self._eval_job("teacher", self.paths.teacher, ["teacher"], 15.0, cached=cached,
                               after=functools.partial(self.cache.store, "eval_teacher", key))]
        if cached:
            self._record_cached("eval_teacher", "eval")
        return jobs + [self._eval_job(name, self.paths.run(name) / "best", [name], 5.0, with_teacher=True)
                       for name, _ in METHODS[1:]]

    def train_and_evaluate(self, jobs: List[Job]) -> None:
        self.say(f"training and evaluation: {sum(not j.cached for j in jobs)} jobs (configs in "
                 f"{self.paths.configs}, logs in {self.paths.logs})")
        t0 = time.perf_counter()
        run_jobs(jobs, n_parallel=self.n_parallel, threads=self.threads, log_dir=self.paths.logs,
                 timings=self.timings)
        self.timings["jobs (wall)"] = {"seconds": time.perf_counter() - t0, "kind": "wall", "cached": False}

    # report -----------------------------------------------------------------------------------------------------------
    def report(self, t_start: float) -> dict:
        """``report.md`` and its plots (``report.write_report``), ``timings.json``; the run's result."""
        from . import report as R

        t0 = time.perf_counter()
        rows = R.collect_rows(self.paths.out, METHODS, self.params)
        self.timings["total (wall)"] = {"seconds": time.perf_counter() - t_start, "kind": "wall", "cached": False}
        info = {"schedule": dataclasses.asdict(self.sched), "family": self.family, "params": self.params,
                "n_parallel": self.n_parallel, "threads": self.threads, "sft_selection": self.sft_selection,
                "seed": self.seed}
        from ..distill.cbd.init import INIT_RECORD

        cbd_section = cbd.report_lines(self.paths.out, self.paths.chain,
                                       {n: self.paths.init(n) / INIT_RECORD for n in ("cbd", "cbd_nearest")},
                                       self.params)
        path = R.write_report(self.paths.out, rows, self.timings, info,
                              minillm_runs={n: self.paths.run(n) for n in MINILLM_ABLATIONS},
                              init_point=self.sft_selection, extra_sections=[cbd_section],
                              extra_plots={"cbd_valid_loss.png": functools.partial(cbd.plot_before_after,
                                                                                   self.paths.out)})
        self.timings["report"] = {"seconds": time.perf_counter() - t0, "kind": "setup", "cached": False}
        (self.paths.out / "timings.json").write_text(json.dumps(self.timings, indent=2))
        return {"report": str(path), "rows": rows, "timings": self.timings, "table": R.markdown_table(rows)}


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# ----------------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="minillm-fast demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The built-in default job: generate an instruction data set and a tokenizer, train a small "
                    "teacher, distil students with SFT, KD, SeqKD, MiniLLM (and MiniLLM's three ablations), OKD and "
                    "CBD (a chain of anchors, a student initialised from it, and its controls), "
                    "evaluate everything over 5 seeds and write a report. No download; minutes on a CPU.",
        epilog="Outputs: OUT/report.md (table, plots, timings), OUT/runs/<method>/ (distill run directories), "
               "OUT/eval/<method>/results.{json,md}, OUT/configs/*.yaml, OUT/logs/*.log.")
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller data and short schedules: a ~2-minute smoke run whose numbers mean nothing "
                             "(the same as --profile quick)")
    parser.add_argument("--profile", choices=tuple(PROFILES), default=None,
                        help="default: the ~15-minute run; quick: the smoke run; long: larger models, twice the data "
                             "and steps, about 1 to 2 hours on 2 cores (docs/results/ has one)")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="reuse the student runs of an earlier demo in --out whose configs and inputs are "
                             "unchanged (evaluation and the report run again)")
    parser.add_argument("--fresh", action="store_true",
                        help="rebuild the cached data, tokenizer and teacher instead of reusing them")
    parser.add_argument("--family", default="llama", choices=("gpt2", "llama"),
                        help="model family (default llama: it learned faster than gpt2 at these sizes)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="training / evaluation jobs run side by side (default: CPU cores, at most 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="data and initialisation seed (default 0)")
    parser.add_argument("--loss-only", action="store_true",
                        help="instead: the seconds-long example of the fused reverse KL alone (minillm_fast.example)")
    parser.add_argument("--steps", type=int, default=200, help="--loss-only: optimiser steps (default 200)")
    args = parser.parse_args(argv)
    if args.loss_only:
        from ..example import run_example

        run_example(steps=args.steps, seed=args.seed)
        return 0
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs={args.jobs} must be >= 1")
    if args.threads < 1:
        parser.error(f"--threads={args.threads} must be >= 1")
    if args.quick and args.profile not in (None, "quick"):
        parser.error(f"--quick and --profile {args.profile} contradict each other (--quick is --profile quick)")
    if args.fresh and args.reuse_runs:
        parser.error("--fresh removes the runs that --reuse-runs would reuse: pass one of them")
    _quiet_transformers()
    try:
        result = run_demo(args.out, quick=args.quick, profile=args.profile, fresh=args.fresh,
                          reuse_runs=args.reuse_runs, family=args.family, jobs=args.jobs, threads=args.threads,
                          seed=args.seed)
    except DemoError as e:
        print(f"minillm-fast demo: error: {e}", file=sys.stderr)
        return 1
    print()
    print(result["table"])
    total = result["timings"]["total (wall)"]["seconds"]
    print(f"\nreport: {result['report']} (total {total:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
