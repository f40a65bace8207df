"""The trainer base: set-up, the loop, optimisation, evaluation, checkpoints and metrics, for every method.

What a method is. :class:`Trainer` knows no method by name: ``cfg.method`` is looked up in :data:`METHODS`, a registry
that the method modules fill (``@register("sft", "kd")`` on a :class:`Method` subclass in ``methods/lm.py``; likewise
``methods/seqkd.py``, ``methods/minillm.py``, ``methods/okd.py``). The methods import this module, never the
reverse: the registry is filled by importing the ``methods`` package, which the public entry point
``minillm_fast.distill.trainer`` does (so ``from minillm_fast.distill.trainer import Trainer`` always has every
method).

The step interface (:class:`Method`; one instance per run, bound to its trainer as ``self.trainer``). The trainer
calls, in this order:

* ``load_train_set()``: the training examples (and whatever else the method reads), once the models are loaded;
* ``default_total_iters()``: the run's length when ``total_iters`` is null;
* ``setup()``: once the student's optimiser exists (OKD adds its LoRA module and its own optimiser here);
* ``step() -> metrics``: one optimiser step (``train/*`` numbers and ``_seen``, the training tokens forwarded);
* ``evaluation()``: a context around every validation (OKD disables its adapter);
* ``state_dict()`` / ``load_state_dict(checkpoint)``: the method's own entries of a checkpoint;
* ``save_final(run_dir)``: rank 0, after ``final/`` is written.

and gives it public helpers: the micro-batch scaffold (:meth:`Trainer.train_microbatches`,
:meth:`Trainer.accumulate`), the optimiser set-up and step (:meth:`Trainer.make_optimizer`,
:meth:`Trainer.step_optimizer`, :meth:`Trainer.optimizer_step`), forwards (:meth:`Trainer.student_hidden`,
:meth:`Trainer.teacher_hidden`, :meth:`Trainer.student_head`), collectives (:meth:`Trainer.sum_all`) and logging.

One optimiser step = one global batch (``batch_size`` sequences over all ranks), split into micro-batches of
``micro_batch_size`` per rank; every loss is a sum over tokens divided by the token count of the global batch, so
accumulation and data parallelism reproduce the one-big-batch gradient. AdamW (0.9, 0.95), weight decay on matrices
only, warm-up then constant / cosine / linear learning rate, global-norm clipping.

Determinism: batches, rollout seeds and buffer shuffles are pure functions of (seed, counters); the global RNGs
(dropout) are checkpointed. A run resumed from a checkpoint writes the same metrics as an uninterrupted one on CPU.
Outputs (rank 0): ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step_*.pt``, ``best/`` and ``final/``
(save_pretrained), ``plots/*.png``, ``eval/results.{json,md}``.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import sys
import time
from typing import Any, Callable, ContextManager, Optional, Sequence

import numpy as np
import torch

from . import checkpoint as ckpt
from . import data as D
from . import faults, fsdp, heads, losses, models, ranks, rollout
from .config import ConfigError, DistillConfig, dump_yaml, needs_teacher

_MIX = 1_000_003


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and machines)."""
    h = 0
    for p in parts:
        h = (h * _MIX + int(p) + 0x9E3779B9) % (1 << 63)
    return h


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, lr: float, lr_min: float) -> float:
    """Multiplier of the base lr before optimiser step ``step`` (0-based): linear warm-up to 1 over ``warmup`` steps,
    then constant, or cosine / linear decay to ``lr_min`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = lr_min / lr
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * (1 - progress)


def to_float(t) -> float:
    """A detached Python float of a tensor or a number."""
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


# ----------------------------------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------------------------------
class Method:
    """One training method (see the module docstring for when the trainer calls what). The defaults are those of a
    method that trains on the training set's (prompt, response) pairs and keeps no state of its own."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.cfg = trainer.cfg

    def load_train_set(self) -> list:
        """The training examples: the instructions of ``train_data`` with their responses."""
        return self.trainer.load_examples(self.cfg.train_data, max_samples=self.cfg.max_train_samples, log_as="train")

    def default_total_iters(self) -> int:
        return self.cfg.epochs * self.trainer.steps_per_epoch

    def setup(self) -> None:
        """After the student's optimiser and schedule exist."""

    def step(self) -> dict:
        """One optimiser step: ``{"train/loss": ..., ..., "_seen": training tokens forwarded}``."""
        raise NotImplementedError

    def evaluation(self) -> ContextManager:
        """The context every validation runs in."""
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        """Entries this method adds to a checkpoint. Every rank calls it (it may gather); rank 0's is saved."""
        return {}

    def load_state_dict(self, checkpoint: dict) -> None:
        """Restore from a whole checkpoint dict (the method reads its own entries of :meth:`state_dict`)."""

    def save_final(self, run_dir: str) -> None:
        """Rank 0, at the end of training, after ``final/`` is written."""


METHODS: dict[str, type[Method]] = {}


def register(*names: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``cfg.method`` in ``names`` runs with this :class:`Method`."""
    def add(cls: type[Method]) -> type[Method]:
        for name in names:
            if METHODS.get(name, cls) is not cls:
                raise RuntimeError(f"method {name!r} is registered twice ({METHODS[name].__name__}, {cls.__name__})")
            METHODS[name] = cls
        return cls

    return add


# ----------------------------------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------------------------------
class Trainer:
    """``Trainer(config).train()``. ``hooks`` (for tests and tools): ``{"after_backward": fn(trainer),
    "after_step": fn(trainer, metrics)}``. ``self.method`` is the run's :class:`Method`; ``self.step`` counts the
    optimiser steps taken."""

    def __init__(self, config: DistillConfig, *, env: Optional[ranks.DistEnv] = None,
                 hooks: Optional[dict[str, Callable]] = None):
        self.env = env or ranks.init(config.device)
        self.cfg = cfg = config.resolve(self.env.world_size)
        if cfg.method not in METHODS:
            raise ConfigError(f"method={cfg.method!r} has no implementation registered; import the trainer as "
                              f"minillm_fast.distill.trainer, which registers every method")
        self.hooks = hooks or {}
        self.device = self.env.device
        self.rank, self.world = self.env.rank, self.env.world_size
        self.main = self.env.is_main
        self.run_dir = cfg.output_dir
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        if self.main:
            # before any model is loaded: a folder that cannot be written fails here, not at the first checkpoint
            faults.check_writable(self.run_dir)
            for path in faults.remove_stale_temporaries(self.run_dir, self.ckpt_dir):
                self.log(f"removed {path}, left by a save that was killed")
            if cfg.resume is False:     # overwrite=true (the config refuses earlier checkpoints otherwise)
                for _, path in ckpt.list_checkpoints(self.ckpt_dir):
                    os.unlink(path)
            os.makedirs(self.ckpt_dir, exist_ok=True)
            dump_yaml(cfg, os.path.join(self.run_dir, "config.yaml"))
        ranks.barrier()

        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (1 << 32))
        torch.manual_seed(cfg.seed + self.rank)

        # models ------------------------------------------------------------------------------------------------------
        self.tokenizer = models.load_tokenizer(cfg.tokenizer)
        # the student keeps fp32 master weights; dtype=bf16 runs its forwards under bf16 autocast and the fused ops
        # on bf16 hidden states and a bf16 copy of the head (AdamW on bf16 weights would lose lr-5e-6 updates)
        self.compute_dtype = models.DTYPES[cfg.dtype]
        self.student = models.load_model(cfg.student, dtype="fp32", device=self.device,
                                         attn_implementation=cfg.attn_implementation, what="student")
        # the teacher trains (kd, minillm, okd), writes the SeqKD data, or, when given, scores validation (reverse KL)
        self.teacher = None
        if needs_teacher(cfg) or (cfg.teacher is not None and cfg.valid_data is not None):
            self.teacher = models.load_model(cfg.teacher, dtype=cfg.teacher_dtype, device=self.device,
                                             attn_implementation=cfg.attn_implementation, what="teacher")
            self.teacher.requires_grad_(False).eval()
        self.vocab_size = heads.real_vocab_size(self.tokenizer, self.student, self.teacher)
        # the fused path must reproduce each model's own logits (scale, softcap, anything after its decoder); a model
        # it does not is refused here, before any rollout or step (distill/heads.py)
        for what, model in (("student", self.student), ("teacher", self.teacher)):
            if model is not None:
                heads.probe(model, self.vocab_size, what=what, backend=cfg.backend)
        # parallel=fsdp shards both models over the ranks (distill/fsdp.py); one process has nothing to shard
        self.fsdp = cfg.parallel == "fsdp" and self.world > 1
        if self.fsdp and self.teacher is not None:
            fsdp.shard_teacher(self.teacher, self.device)
        if cfg.disable_dropout:
            models.disable_dropout(self.student)
        self.student.train()
        self.t_head = heads.head_of(self.teacher, self.compute_dtype) if self.teacher is not None else None
        self.opts = losses.LossOptions(vocab_size=self.vocab_size, backend=cfg.backend)
        if self.fsdp:
            self.module = fsdp.shard_student(models.HiddenStates(self.student), self.device)
        else:
            self.module = ranks.wrap_ddp(models.HiddenStates(self.student), self.env)
        self.pad_id, self.eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        self.method: Method = METHODS[cfg.method](self)

        # data --------------------------------------------------------------------------------------------------------
        self.valid = []
        if cfg.valid_data:
            self.valid = self.load_examples(cfg.valid_data, max_samples=cfg.max_valid_samples, log_as="valid")
        self.train_set = self.method.load_train_set()
        self.train_stream = D.IndexStream(len(self.train_set), cfg.seed)
        self.steps_per_epoch = max(1, len(self.train_set) // cfg.batch_size)

        # optimisation --------------------------------------------------------------------------------------------
        self.total_iters = cfg.total_iters if cfg.total_iters is not None else self.method.default_total_iters()
        self.eval_interval = cfg.eval_interval or self.steps_per_epoch
        decay, no_decay = [], []
        for p in self.student.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        self.optimizer, self.scheduler = self.make_optimizer(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], cfg.lr)
        self.method.setup()

        # loop state ---------------------------------------------------------------------------------------------------
        self.step = 0
        self.best: Optional[float] = None
        self.resumed_from: Optional[str] = None
        self.guard = faults.NonFiniteGuard(cfg.max_bad_steps)

    # ------------------------------------------------------------------------------------------------------------------
    # helpers for the methods
    # ------------------------------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.main:
            print(f"[minillm-fast distill] {msg}", file=sys.stderr, flush=True)

    def load_examples(self, path: str, *, max_samples: Optional[int], require_response: bool = True,
                      log_as: Optional[str] = None) -> list:
        """Instruction JSONL, tokenised with the run's lengths; ``log_as``: report prompts dropped as too long."""
        cfg = self.cfg
        examples, dropped = D.load_instructions(path, self.tokenizer, max_samples=max_samples,
                                                require_response=require_response, max_length=cfg.max_length,
                                                max_prompt_length=cfg.max_prompt_length)
        if dropped and log_as:
            self.log(f"{log_as}: dropped {len(dropped)} of {len(examples) + len(dropped)} prompt(s) longer than "
                     f"max_prompt_length={cfg.max_prompt_length} tokens: {D.describe_lines(path, dropped)}")
        return examples

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    def autocast(self):
        return models.autocast(self.compute_dtype, self.device)

    def teacher_hidden(self, input_ids, attention_mask):
        """The (frozen) teacher's final hidden states in the compute dtype, without gradients."""
        with torch.no_grad(), self.autocast():
            return models.hidden_states(self.teacher, input_ids, attention_mask).to(self.compute_dtype)

    def student_hidden(self, input_ids, attention_mask, module=None):
        """Final hidden states in the compute dtype (through the DDP wrapper unless ``module`` is given)."""
        with self.autocast():
            if module is None:
                hs = self.module(input_ids, attention_mask)
            else:
                hs = models.hidden_states(module, input_ids, attention_mask)
        return hs.to(self.compute_dtype)

    def student_head(self) -> heads.Head:
        self.gather_student()
        return heads.head_of(self.student, self.compute_dtype)

    def gather_student(self) -> None:
        """FSDP: unshard the student's root group (embeddings, head), which rollouts and the fused losses read
        outside the wrapper's forward. Nothing otherwise."""
        if self.fsdp:
            fsdp.gather_root(self.module)

    @property
    def rollout_dtype(self):
        return None if self.compute_dtype == torch.float32 else self.compute_dtype

    def no_sync(self, last: bool):
        """Around a micro-batch's forward and backward: gradients are synchronised over ranks on the last only."""
        if self.fsdp:
            return fsdp.no_gradient_sync(self.module, not last)
        if self.world > 1 and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def sum_all(self, values: list) -> list[float]:
        """Sums over all ranks (float64)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        ranks.all_reduce_sum(t)
        return t.tolist()

    def train_microbatches(self) -> tuple[list[dict], float]:
        """This rank's share of the next global training batch as collated micro-batches (on the CPU; ``index``
        ``[B]`` holds each row's position in the training set), and the number of response tokens of the whole
        global batch (all ranks): the denominator of every loss."""
        cfg = self.cfg
        idx = D.rank_slice(self.train_stream.take(cfg.batch_size), self.rank, self.world)
        micro = [{**D.collate_full([self.train_set[i] for i in m], self.pad_id), "index": torch.tensor(m)}
                 for m in D.split(idx, cfg.micro_batch_size)]
        n_tokens = self.sum_all([sum(int((b["labels"][:, 1:] != D.IGNORE_INDEX).sum()) for b in micro)])[0]
        return micro, n_tokens

    def accumulate(self, items: Sequence, loss_of: Callable[[Any], tuple[torch.Tensor, dict]],
                   keys: Sequence[str]) -> dict[str, float]:
        """Gradient accumulation: for each micro-batch, ``loss, numbers = loss_of(item)`` and ``loss.backward()``
        (gradients synchronised over ranks on the last one only); returns the sums over micro-batches and ranks of
        the ``numbers`` named by ``keys`` (the same keys on every rank; a missing one counts 0)."""
        sums = dict.fromkeys(keys, 0.0)
        for j, item in enumerate(items):
            with self.no_sync(j == len(items) - 1):
                loss, numbers = loss_of(item)
                loss.backward()
            for k in keys:
                sums[k] += numbers.get(k, 0.0)
        return dict(zip(keys, self.sum_all([sums[k] for k in keys])))

    def make_optimizer(self, groups: list, lr: float):
        """AdamW over parameter ``groups`` with the config's betas and eps, and the config's warm-up and schedule
        from ``lr`` (to ``min(lr_min, lr)``) over ``total_iters``: ``(optimizer, scheduler)``."""
        cfg = self.cfg
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
        sched = dict(warmup=cfg.warmup_steps, total=self.total_iters, schedule=cfg.lr_schedule, lr=lr,
                     lr_min=min(cfg.lr_min, lr))
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, **sched))

    def step_optimizer(self, params: list, optimizer, scheduler) -> float:
        """Clip ``params``' gradients to ``grad_clip`` (0: measure only), step, advance the schedule, clear the
        gradients; returns the norm before clipping."""
        # max_norm=inf measures the norm without clipping; under FSDP the norm is a DTensor over all shards
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        norm = float(fsdp.full_tensor(norm))      # the same on every rank: the gradients are already reduced
        if not self.guard.allows(norm):
            # a NaN or inf gradient never reaches the weights (nor, through them, a checkpoint): drop it, keep the
            # schedule in step with the step counter
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            return norm
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def optimizer_step(self) -> tuple[float, float]:
        """The student's optimiser step (after the ``after_backward`` hook): ``(grad_norm, lr used)``."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        lr = self.scheduler.get_last_lr()[0]      # the lr this step uses
        if "after_backward" in self.hooks:
            self.hooks["after_backward"](self)
        return self.step_optimizer(params, self.optimizer, self.scheduler), lr

    # ------------------------------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """:meth:`validation_metrics` in the method's evaluation context (OKD: against the original teacher)."""
        with self.method.evaluation():
            return self.validation_metrics()

    @torch.no_grad()
    def validation_metrics(self) -> dict:
        """Validation loss (CE and, with a teacher, KD), and with ``eval_generate``: Rouge-L / exact match of
        responses sampled from the student (temperature 1, no top-k/top-p), their length, and the reverse KL
        ``KL(q || p)`` of the teacher on them (full vocabulary, token mean; ``rev_kl_seq``: the reference's
        length-normalised sequence estimate)."""
        from .evaluate import compute_metrics

        cfg = self.cfg
        mine = [i for i in range(len(self.valid)) if i % self.world == self.rank]
        ce = kd = tokens = 0.0
        was_training = self.student.training
        self.student.eval()
        self.gather_student()
        for idx in D.split(mine, cfg.eval_batch_size):
            b = self.to_device(D.collate_full([self.valid[i] for i in idx], self.pad_id))
            hs = self.student_hidden(b["input_ids"], b["attention_mask"], module=self.student)[:, :-1]
            ht = self.teacher_hidden(b["input_ids"], b["attention_mask"])[:, :-1] if self.teacher is not None \
                else None
            t = losses.lm_terms(hs, self.student_head(), b["labels"][:, 1:], self.opts, teacher_hidden=ht,
                                t_head=self.t_head)
            ce += float(t["ce"])
            kd += float(t["kd"]) if t["kd"] is not None else 0.0
            tokens += float(t["tokens"])
        self.student.train(was_training)
        ce, kd, tokens = self.sum_all([ce, kd, tokens])
        out = {"eval/loss": ce / max(tokens, 1)}
        if self.teacher is not None:
            out["eval/kd"] = kd / max(tokens, 1)
        if cfg.eval_generate:
            preds, rkl, rkl_seq, n_tok, n_seq = [], 0.0, 0.0, 0.0, 0.0
            for k, idx in enumerate(D.split(list(range(len(self.valid))), cfg.eval_batch_size)):
                if k % self.world != self.rank:
                    continue
                batch = self.to_device(D.collate_prompts([self.valid[i] for i in idx], self.pad_id))
                gen = torch.Generator(self.device).manual_seed(mix_seed(cfg.eval_seeds[0], 4, k))
                ro = rollout.generate(self.student, self.teacher, batch["input_ids"], batch["attention_mask"],
                                      max_new_tokens=cfg.eval_max_new_tokens, eos_token_id=self.eos_id,
                                      pad_token_id=self.pad_id, alpha=0.0, temperature=cfg.temperature,
                                      generator=gen, vocab_size=self.vocab_size, backend=cfg.backend,
                                      with_reverse_kl=self.teacher is not None,
                                      compute_dtype=self.rollout_dtype)
                for i, row in zip(idx, ro.unbatch()):
                    ids = row["response_ids"].tolist()
                    preds.append((i, self.tokenizer.decode(ids, skip_special_tokens=True).strip()))
                    n = len(ids)
                    n_tok += n
                    n_seq += 1
                    if self.teacher is not None and n:
                        rkl += float(row["reverse_kl"].sum())
                        lr = row["teacher_logprobs"] - row["student_logprobs"]   # log p/q, k3 estimator
                        rkl_seq += float((torch.exp(lr) - 1 - lr).sum()) / n
            rkl, rkl_seq, n_tok, n_seq = self.sum_all([rkl, rkl_seq, n_tok, n_seq])
            gathered = sorted(x for part in ranks.all_gather_object(preds) for x in part)
            scores = compute_metrics([p for _, p in gathered], [self.valid[i].references for i, _ in gathered])
            out.update({"eval/rougeL": scores["rougeL"], "eval/exact_match": scores["exact_match"],
                        "eval/length": n_tok / max(n_seq, 1)})
            if self.teacher is not None:
                out.update({"eval/rev_kl": rkl / max(n_tok, 1), "eval/rev_kl_seq": rkl_seq / max(n_seq, 1)})
        return out

    def _maybe_best(self, metrics: dict) -> None:
        sel = self.cfg.select_metric
        if sel == "none":
            return
        key, sign = ("eval/rougeL", 1.0) if sel == "rougeL" else ("eval/loss", -1.0)
        if key not in metrics:
            return
        value = sign * metrics[key]
        if self.best is None or value > self.best:
            self.best = value
            metrics["eval/best"] = True
            self._save_pretrained("best")

    # ------------------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------------------
    def _rng_state(self) -> dict:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _model_state(self) -> dict:
        """The student's state dict, whole (under FSDP a collective: every rank must call it)."""
        return fsdp.full_model_state(self.module, self.student) if self.fsdp else self.student.state_dict()

    def _save_pretrained(self, name: str) -> None:
        """``save_pretrained`` of the student into ``run_dir/name`` by rank 0, atomically."""
        state = self._model_state() if self.fsdp else None
        if self.main:
            ckpt.atomic_save_pretrained(self.student, self.tokenizer, os.path.join(self.run_dir, name),
                                        state_dict=state)
        ranks.barrier()

    def save_checkpoint(self) -> Optional[str]:
        method_state = self.method.state_dict()
        rngs = ranks.all_gather_object(self._rng_state())
        model_state = self._model_state()
        optim_state = (fsdp.full_optimizer_state(self.module, self.student, self.optimizer) if self.fsdp
                       else self.optimizer.state_dict())
        path = None
        if self.main:
            state = {"version": 1, "step": self.step, "world_size": self.world, "config": self.cfg.to_dict(),
                     "parallel": "fsdp" if self.fsdp else "ddp", "model": model_state, "optimizer": optim_state,
                     "scheduler": self.scheduler.state_dict(), "rng": rngs, "best": self.best,
                     "train_stream": self.train_stream.state_dict(), "nonfinite": self.guard.state_dict(),
                     **method_state}
            bad = faults.first_non_finite(model_state)
            if bad is not None:     # the guard keeps them out; this is the last line of defence
                raise faults.TrainingError(f"step {self.step}: the student's {bad} holds NaN or inf: not checkpointed; "
                                           f"the last good checkpoint is {ckpt.latest(self.ckpt_dir)}")
            path = ckpt.path_for(self.ckpt_dir, self.step)
            try:
                ckpt.atomic_save(state, path)
            except OSError as e:    # a full disk, a folder gone read-only: the earlier checkpoints are untouched
                raise faults.TrainingError(f"step {self.step}: writing the checkpoint {path} failed ({e}); the "
                                           f"earlier checkpoints are intact (latest: {ckpt.latest(self.ckpt_dir)}): "
                                           f"free space and run again with resume=true") from None
            ckpt.prune(self.ckpt_dir, self.cfg.keep_checkpoints)
        ranks.barrier()
        return path

    def load_checkpoint(self, path: str) -> None:
        state = ckpt.load(path)
        if self.fsdp != (state.get("parallel") == "fsdp"):
            raise ConfigError(f"{path} was written with parallel={state.get('parallel', 'ddp')}, this run uses "
                              f"parallel={'fsdp' if self.fsdp else 'ddp'} (their optimiser states are keyed "
                              f"differently); resume with the same parallel setting")
        if self.fsdp:
            fsdp.load_full_state(self.module, self.student, self.optimizer, state["model"], state["optimizer"])
        else:
            self.student.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best = int(state["step"]), state["best"]
        self.train_stream.load_state_dict(state["train_stream"])
        self.guard.load_state_dict(state.get("nonfinite"))
        self.method.load_state_dict(state)
        same_world = state["world_size"] == self.world
        rng = state["rng"][self.rank] if same_world else state["rng"][0]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.resumed_from = path
        if self.main:   # drop metrics logged after the checkpoint (the resumed run writes them again)
            kept = [line for line in _read_lines(self.metrics_path) if _record_step(line) <= self.step]
            # a new file swapped in: a kill during this rewrite leaves the old file or the new one, never a part
            ckpt.atomic_write_text(self.metrics_path, "".join(kept))
        ranks.barrier()

    def _maybe_resume(self) -> None:
        res = self.cfg.resume
        if res is False:
            if self.main and os.path.exists(self.metrics_path):
                os.unlink(self.metrics_path)
            return
        path = res if isinstance(res, str) else ckpt.latest(self.ckpt_dir)
        if path is None:
            self.log(f"resume=true but no checkpoint in {self.ckpt_dir}: starting from scratch")
            if self.main and os.path.exists(self.metrics_path):
                os.unlink(self.metrics_path)
            return
        self.load_checkpoint(path)
        self.log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------------------------
    def _write_metrics(self, rec: dict) -> None:
        if self.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def train(self) -> dict:
        """Run to ``total_iters`` optimiser steps (from the checkpoint with ``resume``); returns the last metrics.
        SIGTERM / SIGINT end it early (faults.Preemption): the last metrics plus ``preempted`` (the signal) and
        ``checkpoint`` (the one a resume starts from), and no ``final/``."""
        from tqdm import tqdm

        cfg = self.cfg
        self._maybe_resume()
        if self.step == 0:
            self.log(f"{cfg.method}: {len(self.train_set)} training examples, {self.total_iters} optimiser steps, "
                     f"world size {self.world}, device {self.device}")
        bar = tqdm(total=self.total_iters, initial=self.step, desc=f"distill {cfg.method}", dynamic_ncols=True,
                   disable=not (self.main and cfg.progress_bar), file=sys.stderr)
        if cfg.eval_on_start and self.step == 0 and self.valid:
            # the initial student's validation numbers (what a run starts from); not a best/ candidate: best/ is a
            # trained checkpoint
            self._write_metrics({"step": 0, **self.evaluate()})
        latest = functools.partial(ckpt.latest, self.ckpt_dir)
        try:
            with faults.Preemption(cfg.preempt_timeout, latest, self.log) as preempt:
                last = self._steps(bar, preempt, latest)
        finally:
            bar.close()
        if "preempted" not in last:
            self._finish()
        return last

    def _steps(self, bar, preempt: "faults.Preemption", latest: Callable[[], Optional[str]]) -> dict:
        """The optimiser steps to ``total_iters``, each with its metrics, evaluation and checkpoint; after a
        preemption signal, a checkpoint and an early return. Returns the last metrics."""
        cfg = self.cfg
        last: dict = {}
        while self.step < self.total_iters:
            t0 = time.perf_counter()
            metrics = self.method.step()
            self.step += 1
            if self.guard.end_step(self.step, latest) or self.guard.total:
                metrics["train/skipped_steps"] = self.guard.total    # non-finite steps so far, none applied
            elapsed = time.perf_counter() - t0
            seen = metrics.pop("_seen")
            metrics["time/step_s"] = elapsed
            # training tokens (student forward rows, padding excluded) per second, rollout time excluded
            metrics["time/tokens_per_s"] = seen / max(elapsed - metrics.get("time/rollout_s", 0.0), 1e-9)
            rec = {"step": self.step, **metrics}
            if self.step % cfg.log_interval == 0 or self.step == self.total_iters:
                self._write_metrics(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
            last = rec
            if self.valid and (self.step % self.eval_interval == 0 or self.step == self.total_iters):
                ev = self.evaluate()
                self._maybe_best(ev)
                self._write_metrics({"step": self.step, **ev})
                last = {**rec, **ev}
            if "after_step" in self.hooks:
                self.hooks["after_step"](self, rec)
            saved = None
            if (cfg.save_interval and self.step % cfg.save_interval == 0) or self.step == self.total_iters:
                saved = self.save_checkpoint()
            if self._stop_requested(preempt) and self.step < self.total_iters:
                saved = saved or self.save_checkpoint() or latest()
                signal_name = preempt.requested or "a signal to another rank"
                self.log(f"{signal_name}: stopped after step {self.step} of {self.total_iters}; checkpoint {saved}; "
                         f"run again with resume=true to continue")
                return {**last, "preempted": signal_name, "checkpoint": saved}
        return last

    def _stop_requested(self, preempt: "faults.Preemption") -> bool:
        """Whether any rank got SIGTERM/SIGINT (they stop together: every rank joins the checkpoint's gathers)."""
        flag = preempt.requested is not None
        if self.world > 1:
            flag = self.sum_all([float(flag)])[0] > 0
        return flag

    def _finish(self) -> None:
        cfg = self.cfg
        self._save_pretrained("final")
        if self.main:
            self.method.save_final(self.run_dir)
            if cfg.plots:
                from .plots import plot_metrics

                plot_metrics(self.metrics_path, os.path.join(self.run_dir, "plots"))
            if cfg.final_eval and self.valid:
                from .evaluate import evaluate_model, write_results

                which = "best" if os.path.isdir(os.path.join(self.run_dir, "best")) else "final"
                model = models.load_model(os.path.join(self.run_dir, which), dtype=cfg.dtype, device=self.device,
                                          attn_implementation=cfg.attn_implementation, what=f"{which} model")
                res = evaluate_model(model, self.tokenizer, self.valid, seeds=cfg.eval_seeds,
                                     max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size,
                                     no_repeat_ngram_size=cfg.no_repeat_ngram_size)
                res["model"] = which
                write_results(res, os.path.join(self.run_dir, "eval"))
                self.log(f"final evaluation of {which}/: Rouge-L {res['rougeL_mean']:.2f} +- "
                         f"{res['rougeL_std']:.2f}, exact match {res['exact_match_mean']:.2f}")
        ranks.barrier()


def _read_lines(path: str) -> list[str]:
    """The complete records of a metrics file, each ending in a newline: a line torn by a kill mid-write (the last
    one, or one a later append ran on into) does not parse and is dropped; the resumed run writes its step again."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                if isinstance(json.loads(line), dict):
                    out.append(line if line.endswith("\n") else line + "\n")
            except ValueError:
                continue
    return out


def _record_step(line: str) -> int:
    return int(json.loads(line).get("step", 0))
