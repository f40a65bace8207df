"""The training loop of every method (sft, kd, seqkd, minillm, okd).

One optimiser step = one global batch (``batch_size`` sequences over all ranks), split into micro-batches of
``micro_batch_size`` per rank; every loss is a sum over tokens divided by the token count of the global batch, so
accumulation and data parallelism reproduce the one-big-batch gradient. AdamW (0.9, 0.95), weight decay on matrices
only, warm-up then constant / cosine / linear learning rate, global-norm clipping.

MiniLLM (paper Algorithm 1 as the reference runs it): collect ``num_rollouts`` rollouts from the teacher-mixed
distribution (rank r generates the chunks ``c = r mod world_size``, each with a generator seeded by the run seed,
the collection index and ``c``), then ``ppo_epochs`` passes over the rollout buffer in mini-batches of
``batch_size``; each mini-batch step adds the PPO surrogate, the single-step reverse KL and the pre-training term
``lm_coef (0.5 CE + 0.5 KD)`` on a corpus batch, in one student forward (rollout rows and corpus rows concatenated,
as the reference does). Then collect again.

OKD: the teacher gets a LoRA module trained with the student on the same batches (distill/okd.py owns it, its
optimiser and the step; the hooks here are the teacher load, the step call, the checkpoint entry and the adapter save).

Determinism: batches, rollout seeds and buffer shuffles are pure functions of (seed, counters); the global RNGs
(dropout) are checkpointed. A run resumed from a checkpoint writes the same metrics as an uninterrupted one on CPU.
Outputs (rank 0): ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step_*.pt``, ``best/`` and ``final/``
(save_pretrained), ``plots/*.png``, ``eval/results.{json,md}``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from typing import Callable, Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from . import data as D
from . import dist, fsdp, heads, losses, models, ppo, rollout
from .config import ConfigError, DistillConfig, dump_yaml

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


class Trainer:
    """``Trainer(config).train()``. ``hooks`` (for tests and tools): ``{"after_backward": fn(trainer),
    "after_step": fn(trainer, metrics)}``."""

    def __init__(self, config: DistillConfig, *, env: Optional[dist.DistEnv] = None,
                 hooks: Optional[dict[str, Callable]] = None):
        self.env = env or dist.init(config.device)
        self.cfg = cfg = config.resolve(self.env.world_size)
        if cfg.select_metric == "rougeL" and cfg.valid_data and not cfg.eval_generate:
            raise ConfigError("select_metric='rougeL' needs eval_generate=true (or select_metric=loss / none)")
        self.hooks = hooks or {}
        self.device = self.env.device
        self.rank, self.world = self.env.rank, self.env.world_size
        self.main = self.env.is_main
        self.run_dir = cfg.output_dir
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        if self.main:
            earlier = ckpt.list_checkpoints(self.ckpt_dir)
            if earlier and cfg.resume is False:
                if not cfg.overwrite:
                    raise ConfigError(f"output_dir={self.run_dir!r} holds checkpoints of an earlier run (up to step "
                                      f"{earlier[-1][0]}); pass resume=true to continue it, overwrite=true to start "
                                      f"afresh there, or another output_dir")
                for _, path in earlier:
                    os.unlink(path)
            os.makedirs(self.ckpt_dir, exist_ok=True)
            dump_yaml(cfg, os.path.join(self.run_dir, "config.yaml"))
        dist.barrier()

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
        # the teacher trains (kd, minillm), writes the SeqKD data, or, when given, scores validation (reverse KL)
        needs_teacher = cfg.method in ("kd", "minillm", "okd") or (
            cfg.method == "seqkd" and (cfg.seqkd_data is None or cfg.seqkd_objective == "kd")) or (
            cfg.teacher is not None and cfg.valid_data is not None)
        self.teacher = None
        if needs_teacher:
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
            self.module = dist.wrap_ddp(models.HiddenStates(self.student), self.env)
        self.pad_id, self.eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id

        # data --------------------------------------------------------------------------------------------------------
        self._load_data()

        # optimisation --------------------------------------------------------------------------------------------
        decay, no_decay = [], []
        for p in self.student.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
        self.total_iters = self._total_iters()
        self.eval_interval = cfg.eval_interval or self.steps_per_epoch
        sched = dict(warmup=cfg.warmup_steps, total=self.total_iters, schedule=cfg.lr_schedule, lr=cfg.lr,
                     lr_min=min(cfg.lr_min, cfg.lr))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, **sched))
        # method=okd: the teacher's LoRA module, its optimiser and schedule, and the OKD step (distill/okd.py)
        self.okd = None
        if cfg.method == "okd":
            from .okd import OnlineTeacher

            self.okd = OnlineTeacher(self)

        # loop state ---------------------------------------------------------------------------------------------------
        self.step = 0
        self.best: Optional[float] = None
        self.collection = 0          # minillm: rollout collections so far
        self.ppo_epoch = 0           # minillm: inner epoch over the current buffer
        self.minibatch = 0           # minillm: next mini-batch of that epoch
        self.buffer: Optional[list[dict]] = None
        self._pending: dict = {}     # rollout statistics, logged with the next step
        self.resumed_from: Optional[str] = None

    # ------------------------------------------------------------------------------------------------------------------
    # data
    # ------------------------------------------------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if self.main:
            print(f"[minillm-fast distill] {msg}", file=sys.stderr, flush=True)

    def _load_data(self) -> None:
        cfg = self.cfg
        kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        self.valid = []
        if cfg.valid_data:
            self.valid, dropped = D.load_instructions(cfg.valid_data, self.tokenizer,
                                                      max_samples=cfg.max_valid_samples, **kw)
            if dropped:
                self._log(f"valid: dropped {dropped} prompt(s) over max_prompt_length={cfg.max_prompt_length}")
        if cfg.method == "seqkd":
            self.train_set = self._seqkd_examples()
        else:
            self.train_set, dropped = D.load_instructions(cfg.train_data, self.tokenizer,
                                                          max_samples=cfg.max_train_samples,
                                                          require_response=cfg.method != "minillm", **kw)
            if dropped:
                self._log(f"train: dropped {dropped} prompt(s) over max_prompt_length={cfg.max_prompt_length}")
        self.train_stream = D.IndexStream(len(self.train_set), cfg.seed)
        self.pt_blocks = None
        if cfg.method == "minillm" and cfg.pt_data and cfg.lm_coef > 0:
            self.pt_blocks = D.load_pretrain_blocks(cfg.pt_data, self.tokenizer, cfg.max_length)
            self.pt_stream = D.IndexStream(len(self.pt_blocks), mix_seed(cfg.seed, 7))
        elif cfg.method == "minillm":
            self._log("no pt_data (or lm_coef=0): MiniLLM runs without the pre-training term")
        self.steps_per_epoch = max(1, len(self.train_set) // cfg.batch_size)

    def _total_iters(self) -> int:
        cfg = self.cfg
        if cfg.total_iters is not None:
            return cfg.total_iters
        return 5000 if cfg.method == "minillm" else cfg.epochs * self.steps_per_epoch

    def _seqkd_examples(self) -> list:
        """SeqKD: the teacher's sampled responses to the training prompts (generated once, saved in the run
        directory as ``seqkd_train.jsonl``, reused on resume), or ``seqkd_data`` when given."""
        cfg = self.cfg
        kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        path = cfg.seqkd_data or os.path.join(self.run_dir, "seqkd_train.jsonl")
        if not os.path.exists(path):
            prompts, _ = D.load_instructions(cfg.train_data, self.tokenizer, max_samples=cfg.max_train_samples,
                                             require_response=False, **kw)
            chunks = D.split(list(range(len(prompts))), cfg.rollout_batch_size)
            mine = []
            for c, idx in enumerate(chunks):
                if c % self.world != self.rank:
                    continue
                batch = D.collate_prompts([prompts[i] for i in idx], self.pad_id)
                gen = torch.Generator(self.device).manual_seed(mix_seed(cfg.seed, 3, c))
                ro = rollout.generate(None, self.teacher, batch["input_ids"].to(self.device),
                                      batch["attention_mask"].to(self.device), max_new_tokens=cfg.max_new_tokens,
                                      eos_token_id=self.eos_id, pad_token_id=self.pad_id, temperature=cfg.temperature,
                                      generator=gen, vocab_size=self.vocab_size, backend=cfg.backend,
                                      compute_dtype=self._rollout_dtype)
                for i, row in zip(idx, ro.unbatch()):
                    ids = row["response_ids"].tolist()
                    if ids and ids[-1] == self.eos_id:
                        ids = ids[:-1]
                    mine.append((i, self.tokenizer.decode(ids, skip_special_tokens=True)))
            gathered = sorted(x for part in dist.all_gather_object(mine) for x in part)
            if self.main:
                D.write_jsonl(path, [{"prompt": prompts[i].prompt, "response": text} for i, text in gathered])
                self._log(f"seqkd: wrote {len(gathered)} teacher responses to {path}")
            dist.barrier()
        examples, _ = D.load_instructions(path, self.tokenizer, max_samples=cfg.max_train_samples, **kw)
        return examples

    # ------------------------------------------------------------------------------------------------------------------
    # forward helpers
    # ------------------------------------------------------------------------------------------------------------------
    def _to(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    def _teacher_hidden(self, input_ids, attention_mask):
        with torch.no_grad(), self._autocast():
            return models.hidden_states(self.teacher, input_ids, attention_mask).to(self.compute_dtype)

    def _autocast(self):
        return models.autocast(self.compute_dtype, self.device)

    def _student_hidden(self, input_ids, attention_mask, module=None):
        """Final hidden states in the compute dtype (through the DDP wrapper unless ``module`` is given)."""
        with self._autocast():
            if module is None:
                hs = self.module(input_ids, attention_mask)
            else:
                hs = models.hidden_states(module, input_ids, attention_mask)
        return hs.to(self.compute_dtype)

    def _student_head(self) -> heads.Head:
        self._gather_student()
        return heads.head_of(self.student, self.compute_dtype)

    def _gather_student(self) -> None:
        """FSDP: unshard the student's root group (embeddings, head), which rollouts and the fused losses read
        outside the wrapper's forward. Nothing otherwise."""
        if self.fsdp:
            fsdp.gather_root(self.module)

    @property
    def _rollout_dtype(self):
        return None if self.compute_dtype == torch.float32 else self.compute_dtype

    def _no_sync(self, last: bool):
        if self.fsdp:
            return fsdp.no_gradient_sync(self.module, not last)
        if self.world > 1 and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def _sum_all(self, values: list) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce_sum(t)
        return t.tolist()

    # ------------------------------------------------------------------------------------------------------------------
    # steps
    # ------------------------------------------------------------------------------------------------------------------
    def _optimizer_step(self) -> float:
        params = [p for p in self.student.parameters() if p.requires_grad]
        self._step_lr = self.scheduler.get_last_lr()[0]      # the lr this step uses
        if "after_backward" in self.hooks:
            self.hooks["after_backward"](self)
        # max_norm=inf measures the norm without clipping; under FSDP the norm is a DTensor over all shards
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        norm = fsdp.full_tensor(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _lm_step(self) -> dict:
        """SFT / KD / SeqKD: (1 - kd_ratio) CE + kd_ratio KL(p || q) on the responses of one global batch."""
        cfg = self.cfg
        kd_ratio = 0.0 if cfg.method == "sft" or (cfg.method == "seqkd" and cfg.seqkd_objective == "sft") \
            else cfg.kd_ratio
        idx = D.rank_slice(self.train_stream.take(cfg.batch_size), self.rank, self.world)
        micro = [D.collate_full([self.train_set[i] for i in m], self.pad_id)
                 for m in D.split(idx, cfg.micro_batch_size)]
        n_tokens = self._sum_all([sum(int((b["labels"][:, 1:] != D.IGNORE_INDEX).sum()) for b in micro)])[0]
        sums = {"ce": 0.0, "kd": 0.0, "seen": 0}
        for j, batch in enumerate(micro):
            b = self._to(batch)
            with self._no_sync(j == len(micro) - 1):
                hs = self._student_hidden(b["input_ids"], b["attention_mask"])
                ht = self._teacher_hidden(b["input_ids"], b["attention_mask"])[:, :-1] if kd_ratio > 0 else None
                terms = losses.lm_terms(hs[:, :-1], self._student_head(), b["labels"][:, 1:], self.opts,
                                        teacher_hidden=ht, t_head=self.t_head)
                loss = losses.kd_objective(terms, kd_ratio) * (self.world / max(n_tokens, 1))
                loss.backward()
            sums["ce"] += _f(terms["ce"])
            sums["kd"] += _f(terms["kd"]) if terms["kd"] is not None else 0.0
            sums["seen"] += int(b["attention_mask"].sum())
        grad_norm = self._optimizer_step()
        ce, kd, seen = self._sum_all([sums["ce"], sums["kd"], sums["seen"]])
        n = max(n_tokens, 1)
        out = {"train/loss": ((1 - kd_ratio) * ce + kd_ratio * kd) / n, "train/ce": ce / n,
               "train/grad_norm": grad_norm, "train/lr": self._step_lr, "train/tokens": n_tokens,
               "_seen": seen}
        if kd_ratio > 0:
            out["train/kd"] = kd / n
        return out

    # ---- MiniLLM ---------------------------------------------------------------------------------------------------
    def _collect(self) -> None:
        """Fill the rollout buffer with this rank's share of ``num_rollouts`` teacher-mixed rollouts."""
        cfg = self.cfg
        t0 = time.perf_counter()
        prompts = self.train_stream.take(cfg.num_rollouts)
        chunks = D.split(prompts, cfg.rollout_batch_size)
        rows = []
        keep_hidden = cfg.single_step and cfg.cache_teacher_hidden
        self._gather_student()
        for c, idx in enumerate(chunks):
            if c % self.world != self.rank:
                continue
            batch = self._to(D.collate_prompts([self.train_set[i] for i in idx], self.pad_id))
            gen = torch.Generator(self.device).manual_seed(mix_seed(self.cfg.seed, 1, self.collection, c))
            ro = rollout.generate(self.student, self.teacher, batch["input_ids"], batch["attention_mask"],
                                  max_new_tokens=cfg.max_new_tokens, eos_token_id=self.eos_id,
                                  pad_token_id=self.pad_id, alpha=cfg.alpha, temperature=cfg.temperature,
                                  generator=gen, vocab_size=self.vocab_size, backend=cfg.backend,
                                  keep_teacher_hidden=keep_hidden, compute_dtype=self._rollout_dtype)
            rows.extend(ro.unbatch())
        self.buffer = rows
        self.collection += 1
        self.ppo_epoch = self.minibatch = 0
        # statistics of the collection (all ranks)
        length = sum(len(r["response_ids"]) for r in rows)
        stats = [len(rows), length, 0.0, 0.0, 0.0, 0.0]
        for r in rows:
            n = max(len(r["response_ids"]), 1)
            lq, lp, lm = r["student_logprobs"], r["teacher_logprobs"], r["mixture_logprobs"]
            m = torch.ones_like(lq, dtype=torch.bool)
            rew = ppo.rewards(lp, lq, m, reward_scaling=cfg.reward_scaling, cliprange_reward=cfg.cliprange_reward)
            stats[2] += float(ppo.sequence_reward(rew[None], m[None], cfg.gamma, cfg.length_norm)[0])
            stats[3] += float((lq - lp).sum()) / n                       # sampled log q/p per token
            stats[4] += float(torch.exp(lq - lm).sum())
            stats[5] += int(bool(len(r["response_ids"])) and int(r["response_ids"][-1]) == self.eos_id)
        n_rows, n_tok, reward, logratio, w, eos = self._sum_all(stats)
        elapsed = time.perf_counter() - t0
        self._pending = {"rollout/length": n_tok / n_rows, "rollout/reward": reward / n_rows,
                         "rollout/log_ratio": logratio / n_rows, "rollout/importance_weight": w / max(n_tok, 1),
                         "rollout/eos_fraction": eos / n_rows, "time/rollout_s": elapsed,
                         "time/rollout_tokens_per_s": n_tok / max(elapsed, 1e-9)}

    def _minillm_step(self) -> dict:
        cfg = self.cfg
        if self.buffer is None or self.ppo_epoch >= cfg.ppo_epochs:
            self._collect()
        local_bs = cfg.batch_size // self.world
        perm = list(range(len(self.buffer)))
        random.Random(mix_seed(cfg.seed, 2, self.collection, self.ppo_epoch, self.rank)).shuffle(perm)
        picked = perm[self.minibatch * local_bs:(self.minibatch + 1) * local_bs]
        ro = rollout.collate_rows([self.buffer[i] for i in picked], self.pad_id)
        ro = _to_device(ro, self.device)
        mask = ro.response_mask
        rew = ppo.rewards(ro.teacher_logprobs, ro.student_logprobs, mask, reward_scaling=cfg.reward_scaling,
                          cliprange_reward=cfg.cliprange_reward)
        adv = ppo.advantages(rew, mask, gamma=cfg.gamma, length_norm=cfg.length_norm, variant=cfg.advantage,
                             whiten=cfg.whiten_advantages)
        weight = ro.importance_weight if cfg.alpha > 0 else torch.ones_like(ro.student_logprobs)
        n_micro = local_bs // cfg.micro_batch_size
        ppo_tokens = self._sum_all([int(mask.sum())])[0]

        pt_micro, pt_tokens = [None] * n_micro, 1.0
        if self.pt_blocks is not None:
            pt_idx = D.rank_slice(self.pt_stream.take(cfg.pt_batch_size), self.rank, self.world)
            pt_micro = [D.collate_blocks([self.pt_blocks[i] for i in m], self.pad_id)
                        for m in D.split(pt_idx, len(pt_idx) // n_micro)]
            pt_tokens = self._sum_all([sum(int((b["labels"][:, 1:] != D.IGNORE_INDEX).sum()) for b in pt_micro)])[0]

        keys = ("pg", "single_step", "pt_ce", "pt_kd", "clipped", "approx_kl", "ratio", "seen")
        sums = dict.fromkeys(keys, 0.0)
        mb = cfg.micro_batch_size
        for j in range(n_micro):
            rows = slice(j * mb, (j + 1) * mb)
            with self._no_sync(j == n_micro - 1):
                loss, parts = self._minillm_micro(_slice_rollouts(ro, rows), adv[rows], weight[rows], pt_micro[j],
                                                  ppo_tokens, pt_tokens)
                loss.backward()
            for k in keys:
                sums[k] += parts.get(k, 0.0)
        grad_norm = self._optimizer_step()
        tot = dict(zip(keys, self._sum_all([sums[k] for k in keys])))
        n, npt = max(ppo_tokens, 1), max(pt_tokens, 1)
        out = {"train/pg_loss": tot["pg"] / n, "train/clipfrac": tot["clipped"] / n,
               "train/approx_kl": tot["approx_kl"] / n, "train/ratio": tot["ratio"] / n,
               "train/grad_norm": grad_norm, "train/lr": self._step_lr,
               "train/tokens": ppo_tokens, "_seen": tot["seen"]}
        rl = out["train/pg_loss"]
        if cfg.single_step:
            out["train/single_step"] = tot["single_step"] / n
            rl += out["train/single_step"]
        out["train/rl_loss"] = rl
        total = rl
        if self.pt_blocks is not None:
            pt = (1 - cfg.kd_ratio) * tot["pt_ce"] / npt + cfg.kd_ratio * tot["pt_kd"] / npt
            out.update({"train/pt_loss": pt, "train/pt_ce": tot["pt_ce"] / npt, "train/pt_kd": tot["pt_kd"] / npt})
            total = rl + cfg.lm_coef * pt
        out["train/loss"] = total
        self.minibatch += 1
        if self.minibatch * cfg.batch_size >= cfg.num_rollouts:
            self.minibatch, self.ppo_epoch = 0, self.ppo_epoch + 1
        out.update(self._pending)
        self._pending = {}
        return out

    def _minillm_micro(self, ro, adv, weight, pt_batch, ppo_tokens: float, pt_tokens: float):
        """Loss of one micro-batch: rollout rows (and corpus rows) through one student forward."""
        cfg = self.cfg
        ro = _trim(ro)
        p, r = ro.prompt_ids.shape[1], ro.response_ids.shape[1]
        adv, weight = adv[:, :r], weight[:, :r]
        ids = torch.cat([ro.prompt_ids, ro.response_ids], 1)
        msk = torch.cat([ro.prompt_mask, ro.response_mask.long()], 1)
        b1 = ids.shape[0]
        if pt_batch is not None:
            pt = self._to(pt_batch)
            ids, msk = _cat_rows([ids, pt["input_ids"]], [msk, pt["attention_mask"]], self.pad_id)
        hs = self._student_hidden(ids, msk)                            # [b1 + b2, T, H]
        s_head = self._student_head()
        # teacher states: the rollout's (cached) for the single-step term, one no-grad forward otherwise
        ht_ppo = ht_pt = None
        if cfg.single_step and ro.teacher_hidden is None:
            ht_all = self._teacher_hidden(ids, msk)
            ht_ppo, ht_pt = ht_all[:b1, p - 1:p + r - 1], ht_all[b1:]
        else:
            ht_ppo = ro.teacher_hidden if cfg.single_step else None
            if pt_batch is not None and cfg.kd_ratio > 0:
                ht_pt = self._teacher_hidden(ids[b1:], msk[b1:])
        terms = losses.ppo_terms(hs[:b1, p - 1:p + r - 1], s_head, ro.response_ids, ro.response_mask,
                                 ro.student_logprobs, adv, weight, self.opts, cliprange=cfg.cliprange,
                                 temperature=cfg.temperature, teacher_hidden=ht_ppo, t_head=self.t_head,
                                 single_step=cfg.single_step, single_step_weighted=cfg.single_step_weighted)
        scale = self.world / max(ppo_tokens, 1)
        loss = terms["pg"] * scale
        parts = {"pg": _f(terms["pg"]), "clipped": _f(terms["clipped"]), "approx_kl": _f(terms["approx_kl"]),
                 "ratio": _f(terms["ratio"]), "seen": _f(msk[:b1].sum())}
        if terms["single_step"] is not None:
            loss = loss + terms["single_step"] * scale
            parts["single_step"] = _f(terms["single_step"])
        if pt_batch is not None:
            labels = pt["labels"][:, 1:]
            length = labels.shape[1]
            pt_terms = losses.lm_terms(hs[b1:, :length], s_head, labels, self.opts,
                                       teacher_hidden=ht_pt[:, :length] if cfg.kd_ratio > 0 else None,
                                       t_head=self.t_head)
            loss = loss + cfg.lm_coef * losses.kd_objective(pt_terms, cfg.kd_ratio) * (self.world / max(pt_tokens, 1))
            parts["pt_ce"] = _f(pt_terms["ce"])
            parts["pt_kd"] = _f(pt_terms["kd"]) if pt_terms["kd"] is not None else 0.0
            parts["seen"] += _f(pt["attention_mask"].sum())
        return loss, parts

    # ------------------------------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
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
        self._gather_student()
        for idx in D.split(mine, cfg.eval_batch_size):
            b = self._to(D.collate_full([self.valid[i] for i in idx], self.pad_id))
            hs = self._student_hidden(b["input_ids"], b["attention_mask"], module=self.student)[:, :-1]
            ht = self._teacher_hidden(b["input_ids"], b["attention_mask"])[:, :-1] if self.teacher is not None \
                else None
            t = losses.lm_terms(hs, self._student_head(), b["labels"][:, 1:], self.opts, teacher_hidden=ht,
                                t_head=self.t_head)
            ce += float(t["ce"])
            kd += float(t["kd"]) if t["kd"] is not None else 0.0
            tokens += float(t["tokens"])
        self.student.train(was_training)
        ce, kd, tokens = self._sum_all([ce, kd, tokens])
        out = {"eval/loss": ce / max(tokens, 1)}
        if self.teacher is not None:
            out["eval/kd"] = kd / max(tokens, 1)
        if cfg.eval_generate:
            preds, rkl, rkl_seq, n_tok, n_seq = [], 0.0, 0.0, 0.0, 0.0
            for k, idx in enumerate(D.split(list(range(len(self.valid))), cfg.eval_batch_size)):
                if k % self.world != self.rank:
                    continue
                batch = self._to(D.collate_prompts([self.valid[i] for i in idx], self.pad_id))
                gen = torch.Generator(self.device).manual_seed(mix_seed(cfg.eval_seeds[0], 4, k))
                ro = rollout.generate(self.student, self.teacher, batch["input_ids"], batch["attention_mask"],
                                      max_new_tokens=cfg.eval_max_new_tokens, eos_token_id=self.eos_id,
                                      pad_token_id=self.pad_id, alpha=0.0, temperature=cfg.temperature,
                                      generator=gen, vocab_size=self.vocab_size, backend=cfg.backend,
                                      with_reverse_kl=self.teacher is not None,
                                      compute_dtype=self._rollout_dtype)
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
            rkl, rkl_seq, n_tok, n_seq = self._sum_all([rkl, rkl_seq, n_tok, n_seq])
            gathered = sorted(x for part in dist.all_gather_object(preds) for x in part)
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
        dist.barrier()

    def save_checkpoint(self) -> Optional[str]:
        buffers = rngs = None
        buf = None if self.buffer is None else [{k: v.cpu() for k, v in row.items()} for row in self.buffer]
        buffers = dist.all_gather_object(buf)
        rngs = dist.all_gather_object(self._rng_state())
        model_state = self._model_state()
        optim_state = (fsdp.full_optimizer_state(self.module, self.student, self.optimizer) if self.fsdp
                       else self.optimizer.state_dict())
        path = None
        if self.main:
            state = {"version": 1, "step": self.step, "world_size": self.world, "config": self.cfg.to_dict(),
                     "parallel": "fsdp" if self.fsdp else "ddp", "model": model_state, "optimizer": optim_state,
                     "scheduler": self.scheduler.state_dict(), "rng": rngs, "best": self.best,
                     "train_stream": self.train_stream.state_dict(),
                     "pt_stream": self.pt_stream.state_dict() if self.pt_blocks is not None else None,
                     "okd": self.okd.state_dict() if self.okd is not None else None,
                     "minillm": {"collection": self.collection, "ppo_epoch": self.ppo_epoch,
                                 "minibatch": self.minibatch, "buffers": buffers, "pending": self._pending}}
            path = ckpt.path_for(self.ckpt_dir, self.step)
            ckpt.atomic_save(state, path)
            ckpt.prune(self.ckpt_dir, self.cfg.keep_checkpoints)
        dist.barrier()
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
        if self.okd is not None:
            self.okd.load_state_dict(state.get("okd"))
        self.step, self.best = int(state["step"]), state["best"]
        self.train_stream.load_state_dict(state["train_stream"])
        if self.pt_blocks is not None and state.get("pt_stream") is not None:
            self.pt_stream.load_state_dict(state["pt_stream"])
        mini = state["minillm"]
        self.collection, self.ppo_epoch, self.minibatch = mini["collection"], mini["ppo_epoch"], mini["minibatch"]
        self._pending = mini.get("pending") or {}
        same_world = state["world_size"] == self.world
        buf = mini["buffers"][self.rank] if same_world else None
        self.buffer = None if buf is None else [{k: v.to(self.device) for k, v in row.items()} for row in buf]
        if not same_world and mini["buffers"][0] is not None:
            self._log(f"checkpoint written with {state['world_size']} ranks, resuming on {self.world}: the rollout "
                      f"buffer is dropped and a new collection starts")
            self.ppo_epoch = self.cfg.ppo_epochs
        rng = state["rng"][self.rank] if same_world else state["rng"][0]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.resumed_from = path
        if self.main:   # drop metrics logged after the checkpoint (the resumed run writes them again)
            kept = [line for line in _read_lines(self.metrics_path) if json.loads(line).get("step", 0) <= self.step]
            with open(self.metrics_path, "w") as f:
                f.writelines(kept)
        dist.barrier()

    def _maybe_resume(self) -> None:
        res = self.cfg.resume
        if res is False:
            if self.main and os.path.exists(self.metrics_path):
                os.unlink(self.metrics_path)
            return
        path = res if isinstance(res, str) else ckpt.latest(self.ckpt_dir)
        if path is None:
            self._log(f"resume=true but no checkpoint in {self.ckpt_dir}: starting from scratch")
            if self.main and os.path.exists(self.metrics_path):
                os.unlink(self.metrics_path)
            return
        self.load_checkpoint(path)
        self._log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------------------------
    def _write_metrics(self, rec: dict) -> None:
        if self.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def train(self) -> dict:
        """Run to ``total_iters`` optimiser steps (from the checkpoint with ``resume``); returns the last metrics."""
        from tqdm import tqdm

        cfg = self.cfg
        self._maybe_resume()
        if self.step == 0:
            self._log(f"{cfg.method}: {len(self.train_set)} training examples, {self.total_iters} optimiser steps, "
                      f"world size {self.world}, device {self.device}")
        bar = tqdm(total=self.total_iters, initial=self.step, desc=f"distill {cfg.method}", dynamic_ncols=True,
                   disable=not (self.main and cfg.progress_bar), file=sys.stderr)
        last: dict = {}
        try:
            while self.step < self.total_iters:
                t0 = time.perf_counter()
                metrics = (self._minillm_step() if cfg.method == "minillm" else self.okd.step() if self.okd is not None
                           else self._lm_step())
                self.step += 1
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
                if (cfg.save_interval and self.step % cfg.save_interval == 0) or self.step == self.total_iters:
                    self.save_checkpoint()
        finally:
            bar.close()
        self._finish()
        return last

    def _finish(self) -> None:
        cfg = self.cfg
        self._save_pretrained("final")
        if self.main:
            if self.okd is not None:     # the adapted teacher module, beside the student
                self.okd.save(os.path.join(self.run_dir, "teacher_adapter"))
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
                self._log(f"final evaluation of {which}/: Rouge-L {res['rougeL_mean']:.2f} +- "
                          f"{res['rougeL_std']:.2f}, exact match {res['exact_match_mean']:.2f}")
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------------
def _f(t) -> float:
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


def _read_lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f if line.strip()]


def _to_device(ro: rollout.Rollouts, device) -> rollout.Rollouts:
    for f in rollout.rollout_fields():
        v = getattr(ro, f)
        if isinstance(v, torch.Tensor):
            setattr(ro, f, v.to(device))
    return ro


def _slice_rollouts(ro: rollout.Rollouts, rows: slice) -> rollout.Rollouts:
    out = rollout.Rollouts(ro.prompt_ids[rows], ro.prompt_mask[rows], ro.response_ids[rows], ro.response_mask[rows])
    for f in ("student_logprobs", "teacher_logprobs", "mixture_logprobs", "teacher_hidden", "reverse_kl"):
        v = getattr(ro, f)
        if v is not None:
            setattr(out, f, v[rows])
    return out


def _trim(ro: rollout.Rollouts) -> rollout.Rollouts:
    """Drop the prompt columns that are padding in every row and the response columns after the longest one."""
    start = int((ro.prompt_mask.sum(0) == 0).long().cumprod(0).sum())
    r = max(int(ro.response_mask.sum(-1).max()), 1)
    out = rollout.Rollouts(ro.prompt_ids[:, start:], ro.prompt_mask[:, start:], ro.response_ids[:, :r],
                           ro.response_mask[:, :r])
    for f in ("student_logprobs", "teacher_logprobs", "mixture_logprobs", "teacher_hidden", "reverse_kl"):
        v = getattr(ro, f)
        if v is not None:
            setattr(out, f, v[:, :r])
    return out


def _cat_rows(ids: list, masks: list, pad_id: int):
    """Concatenate row blocks of different lengths, right-padding the shorter ones."""
    t = max(x.shape[1] for x in ids)
    pad = lambda x, v: torch.nn.functional.pad(x, (0, t - x.shape[1]), value=v)  # noqa: E731
    return torch.cat([pad(x, pad_id) for x in ids]), torch.cat([pad(m, 0) for m in masks])
