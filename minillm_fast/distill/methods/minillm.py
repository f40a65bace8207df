"""MiniLLM (paper Algorithm 1 as the reference runs it): collect ``num_rollouts`` rollouts from the teacher-mixed
distribution (rank r generates the chunks ``c = r mod world_size``, each with a generator seeded by the run seed,
the collection index and ``c``), then ``ppo_epochs`` passes over the rollout buffer in mini-batches of
``batch_size``; each mini-batch step adds the PPO surrogate, the single-step reverse KL and the pre-training term
``lm_coef (0.5 CE + 0.5 KD)`` on a corpus batch, in one student forward (rollout rows and corpus rows concatenated,
as the reference does). Then collect again. Checkpoints hold the collection counters, every rank's rollout buffer
and the corpus position, so a resumed run continues mid-buffer."""
from __future__ import annotations

import random
import time
from typing import Optional

import torch

from .. import data as D
from .. import losses, ppo, ranks, rollout
from ..base import Method, mix_seed, register, to_float


@register("minillm")
class MiniLLM(Method):
    def __init__(self, trainer):
        super().__init__(trainer)
        self.collection = 0          # rollout collections so far
        self.ppo_epoch = 0           # inner epoch over the current buffer
        self.minibatch = 0           # next mini-batch of that epoch
        self.buffer: Optional[list[dict]] = None
        self.pending: dict = {}      # rollout statistics, logged with the next step
        self.pt_blocks = None

    # ---- set-up ----------------------------------------------------------------------------------------------------
    def load_train_set(self) -> list:
        """The training prompts (responses not needed: the student samples its own), and the pre-training corpus."""
        tr, cfg = self.trainer, self.cfg
        train = tr.load_examples(cfg.train_data, max_samples=cfg.max_train_samples, require_response=False,
                                 log_as="train")
        if cfg.pt_data and cfg.lm_coef > 0:
            self.pt_blocks = D.load_pretrain_blocks(cfg.pt_data, tr.tokenizer, cfg.max_length)
            self.pt_stream = D.IndexStream(len(self.pt_blocks), mix_seed(cfg.seed, 7))
        else:
            tr.log("no pt_data (or lm_coef=0): MiniLLM runs without the pre-training term")
        return train

    def default_total_iters(self) -> int:
        return 5000

    # ---- rollouts --------------------------------------------------------------------------------------------------
    def collect(self) -> None:
        """Fill the rollout buffer with this rank's share of ``num_rollouts`` teacher-mixed rollouts."""
        tr, cfg = self.trainer, self.cfg
        t0 = time.perf_counter()
        prompts = tr.train_stream.take(cfg.num_rollouts)
        chunks = D.split(prompts, cfg.rollout_batch_size)
        rows = []
        keep_hidden = cfg.single_step and cfg.cache_teacher_hidden
        tr.gather_student()
        for c, idx in enumerate(chunks):
            if c % tr.world != tr.rank:
                continue
            batch = tr.to_device(D.collate_prompts([tr.train_set[i] for i in idx], tr.pad_id))
            gen = torch.Generator(tr.device).manual_seed(mix_seed(cfg.seed, 1, self.collection, c))
            ro = rollout.generate(tr.student, tr.teacher, batch["input_ids"], batch["attention_mask"],
                                  max_new_tokens=cfg.max_new_tokens, eos_token_id=tr.eos_id,
                                  pad_token_id=tr.pad_id, alpha=cfg.alpha, temperature=cfg.temperature,
                                  generator=gen, vocab_size=tr.vocab_size, backend=cfg.backend,
                                  keep_teacher_hidden=keep_hidden, compute_dtype=tr.rollout_dtype)
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
            stats[5] += int(bool(len(r["response_ids"])) and int(r["response_ids"][-1]) == tr.eos_id)
        n_rows, n_tok, reward, logratio, w, eos = tr.sum_all(stats)
        elapsed = time.perf_counter() - t0
        self.pending = {"rollout/length": n_tok / n_rows, "rollout/reward": reward / n_rows,
                        "rollout/log_ratio": logratio / n_rows, "rollout/importance_weight": w / max(n_tok, 1),
                        "rollout/eos_fraction": eos / n_rows, "time/rollout_s": elapsed,
                        "time/rollout_tokens_per_s": n_tok / max(elapsed, 1e-9)}

    # ---- the step ----------------------------------------------------------------------------------------------------
    def step(self) -> dict:
        tr, cfg = self.trainer, self.cfg
        if self.buffer is None or self.ppo_epoch >= cfg.ppo_epochs:
            self.collect()
        local_bs = cfg.batch_size // tr.world
        perm = list(range(len(self.buffer)))
        random.Random(mix_seed(cfg.seed, 2, self.collection, self.ppo_epoch, tr.rank)).shuffle(perm)
        picked = perm[self.minibatch * local_bs:(self.minibatch + 1) * local_bs]
        ro = rollout.collate_rows([self.buffer[i] for i in picked], tr.pad_id)
        ro = _to_device(ro, tr.device)
        mask = ro.response_mask
        rew = ppo.rewards(ro.teacher_logprobs, ro.student_logprobs, mask, reward_scaling=cfg.reward_scaling,
                          cliprange_reward=cfg.cliprange_reward)
        adv = ppo.advantages(rew, mask, gamma=cfg.gamma, length_norm=cfg.length_norm, variant=cfg.advantage,
                             whiten=cfg.whiten_advantages)
        weight = ro.importance_weight if cfg.alpha > 0 else torch.ones_like(ro.student_logprobs)
        n_micro = local_bs // cfg.micro_batch_size
        ppo_tokens = tr.sum_all([int(mask.sum())])[0]

        pt_micro, pt_tokens = [None] * n_micro, 1.0
        if self.pt_blocks is not None:
            pt_idx = D.rank_slice(self.pt_stream.take(cfg.pt_batch_size), tr.rank, tr.world)
            pt_micro = [D.collate_blocks([self.pt_blocks[i] for i in m], tr.pad_id)
                        for m in D.split(pt_idx, len(pt_idx) // n_micro)]
            pt_tokens = tr.sum_all([sum(int((b["labels"][:, 1:] != D.IGNORE_INDEX).sum()) for b in pt_micro)])[0]

        mb = cfg.micro_batch_size

        def loss_of(j):
            rows = slice(j * mb, (j + 1) * mb)
            return self.micro_loss(_slice_rollouts(ro, rows), adv[rows], weight[rows], pt_micro[j], ppo_tokens,
                                   pt_tokens)

        keys = ("pg", "single_step", "pt_ce", "pt_kd", "clipped", "approx_kl", "ratio", "seen")
        tot = tr.accumulate(range(n_micro), loss_of, keys)
        grad_norm, lr = tr.optimizer_step()
        n, npt = max(ppo_tokens, 1), max(pt_tokens, 1)
        out = {"train/pg_loss": tot["pg"] / n, "train/clipfrac": tot["clipped"] / n,
               "train/approx_kl": tot["approx_kl"] / n, "train/ratio": tot["ratio"] / n,
               "train/grad_norm": grad_norm, "train/lr": lr,
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
        out.update(self.pending)
        self.pending = {}
        return out

    def micro_loss(self, ro, adv, weight, pt_batch, ppo_tokens: float, pt_tokens: float):
        """Loss of one micro-batch: rollout rows (and corpus rows) through one student forward."""
        tr, cfg = self.trainer, self.cfg
        ro = _trim(ro)
        p, r = ro.prompt_ids.shape[1], ro.response_ids.shape[1]
        adv, weight = adv[:, :r], weight[:, :r]
        ids = torch.cat([ro.prompt_ids, ro.response_ids], 1)
        msk = torch.cat([ro.prompt_mask, ro.response_mask.long()], 1)
        b1 = ids.shape[0]
        if pt_batch is not None:
            pt = tr.to_device(pt_batch)
            ids, msk = _cat_rows([ids, pt["input_ids"]], [msk, pt["attention_mask"]], tr.pad_id)
        hs = tr.student_hidden(ids, msk)                              # [b1 + b2, T, H]
        s_head = tr.student_head()
        # teacher states: the rollout's (cached) for the single-step term, one no-grad forward otherwise
        ht_ppo = ht_pt = None
        if cfg.single_step and ro.teacher_hidden is None:
            ht_all = tr.teacher_hidden(ids, msk)
            ht_ppo, ht_pt = ht_all[:b1, p - 1:p + r - 1], ht_all[b1:]
        else:
            ht_ppo = ro.teacher_hidden if cfg.single_step else None
            if pt_batch is not None and cfg.kd_ratio > 0:
                ht_pt = tr.teacher_hidden(ids[b1:], msk[b1:])
        terms = losses.ppo_terms(hs[:b1, p - 1:p + r - 1], s_head, ro.response_ids, ro.response_mask,
                                 ro.student_logprobs, adv, weight, tr.opts, cliprange=cfg.cliprange,
                                 temperature=cfg.temperature, teacher_hidden=ht_ppo, t_head=tr.t_head,
                                 single_step=cfg.single_step, single_step_weighted=cfg.single_step_weighted)
        scale = tr.world / max(ppo_tokens, 1)
        loss = terms["pg"] * scale
        parts = {"pg": to_float(terms["pg"]), "clipped": to_float(terms["clipped"]),
                 "approx_kl": to_float(terms["approx_kl"]), "ratio": to_float(terms["ratio"]),
                 "seen": to_float(msk[:b1].sum())}
        if terms["single_step"] is not None:
            loss = loss + terms["single_step"] * scale
            parts["single_step"] = to_float(terms["single_step"])
        if pt_batch is not None:
            labels = pt["labels"][:, 1:]
            length = labels.shape[1]
            pt_terms = losses.lm_terms(hs[b1:, :length], s_head, labels, tr.opts,
                                       teacher_hidden=ht_pt[:, :length] if cfg.kd_ratio > 0 else None,
                                       t_head=tr.t_head)
            loss = loss + cfg.lm_coef * losses.kd_objective(pt_terms, cfg.kd_ratio) * (tr.world / max(pt_tokens, 1))
            parts["pt_ce"] = to_float(pt_terms["ce"])
            parts["pt_kd"] = to_float(pt_terms["kd"]) if pt_terms["kd"] is not None else 0.0
            parts["seen"] += to_float(pt["attention_mask"].sum())
        return loss, parts

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``minillm``: the counters and every rank's rollout buffer (gathered: all ranks call this); ``pt_stream``."""
        buf = None if self.buffer is None else [{k: v.cpu() for k, v in row.items()} for row in self.buffer]
        buffers = ranks.all_gather_object(buf)
        return {"pt_stream": self.pt_stream.state_dict() if self.pt_blocks is not None else None,
                "minillm": {"collection": self.collection, "ppo_epoch": self.ppo_epoch, "minibatch": self.minibatch,
                            "buffers": buffers, "pending": self.pending}}

    def load_state_dict(self, checkpoint: dict) -> None:
        """A checkpoint of another method (no ``minillm`` entry) starts with a new collection."""
        tr = self.trainer
        if self.pt_blocks is not None and checkpoint.get("pt_stream") is not None:
            self.pt_stream.load_state_dict(checkpoint["pt_stream"])
        mini = checkpoint.get("minillm") or {"collection": 0, "ppo_epoch": 0, "minibatch": 0,
                                             "buffers": [None] * checkpoint["world_size"]}
        self.collection, self.ppo_epoch, self.minibatch = mini["collection"], mini["ppo_epoch"], mini["minibatch"]
        self.pending = mini.get("pending") or {}
        same_world = checkpoint["world_size"] == tr.world
        buf = mini["buffers"][tr.rank] if same_world else None
        self.buffer = None if buf is None else [{k: v.to(tr.device) for k, v in row.items()} for row in buf]
        if not same_world and mini["buffers"][0] is not None:
            tr.log(f"checkpoint written with {checkpoint['world_size']} ranks, resuming on {tr.world}: the rollout "
                   f"buffer is dropped and a new collection starts")
            self.ppo_epoch = self.cfg.ppo_epochs


# ----------------------------------------------------------------------------------------------------------------------
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
