"""Rollouts: batched sampling with both models' KV caches, from hidden states, never logits.

Per step, each model runs one token through its base model with its ``past_key_values``; the last hidden states go to
:func:`minillm_fast.mixture_sample`, which draws ``y_t ~ alpha p + (1 - alpha) q`` and returns ``log q(y_t)``,
``log p(y_t)`` and ``log mixture(y_t)`` in the same pass over the vocabulary. Those are stored as they are (the
reference runs the student and the teacher a second time for them): ``q_old`` for the PPO ratio, ``p`` for the reward,
and the importance weight ``w_t = q_old(y_t) / mixture(y_t)``. With ``keep_teacher_hidden`` the teacher's hidden
states are kept too, so the single-step term needs no second teacher forward.

Prompts are left-padded; positions are ``cumsum(mask) - 1`` so padded rows see the positions of unpadded ones. A row
stops at EOS (the EOS is a valid response token; later positions are ``pad_token_id`` with mask 0), or after
``max_new_tokens``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor

from ..ops.sampling import mixture_sample, rollout_statistics, sample_tokens
from .data import positions_from_mask
from .heads import head_of
from .models import autocast, hidden_states


@dataclass
class Rollouts:
    prompt_ids: Tensor                          # [B, P] left-padded
    prompt_mask: Tensor                         # [B, P] long
    response_ids: Tensor                        # [B, R] pad_token_id after EOS
    response_mask: Tensor                       # [B, R] bool: generated tokens up to and including EOS
    student_logprobs: Optional[Tensor] = None   # [B, R] log q_old(y_t), 0 on padding
    teacher_logprobs: Optional[Tensor] = None   # [B, R] log p(y_t)
    mixture_logprobs: Optional[Tensor] = None   # [B, R] log(alpha p + (1 - alpha) q_old)(y_t)
    teacher_hidden: Optional[Tensor] = None     # [B, R, Ht] teacher states that predict each y_t
    reverse_kl: Optional[Tensor] = None         # [B, R] full-vocabulary KL(q || p), with_reverse_kl only

    @property
    def lengths(self) -> Tensor:
        return self.response_mask.sum(-1)

    @property
    def importance_weight(self) -> Tensor:
        """``[B, R]`` ``q_old(y) / mixture(y)`` (1 on padding)."""
        w = torch.exp(self.student_logprobs - self.mixture_logprobs)
        return torch.where(self.response_mask, w, torch.ones_like(w))

    def unbatch(self) -> list[dict]:
        """One dict per row with the padding removed (prompt: valid tokens; response: valid tokens)."""
        rows = []
        for i in range(self.prompt_ids.shape[0]):
            pm, rm = self.prompt_mask[i].bool(), self.response_mask[i]
            n = int(rm.sum())
            row = {"prompt_ids": self.prompt_ids[i][pm], "response_ids": self.response_ids[i, :n]}
            for f in ("student_logprobs", "teacher_logprobs", "mixture_logprobs", "teacher_hidden", "reverse_kl"):
                v = getattr(self, f)
                if v is not None:
                    row[f] = v[i, :n]
            rows.append(row)
        return rows


def generate(student, teacher, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, eos_token_id: int,
             pad_token_id: int, alpha: float = 0.2, temperature: float = 1.0,
             generator: Optional[torch.Generator] = None, vocab_size: Optional[int] = None, backend: str = "auto",
             keep_teacher_hidden: bool = False, with_reverse_kl: bool = False,
             compute_dtype: Optional[torch.dtype] = None) -> Rollouts:
    """Sample responses to left-padded prompts.

    * ``student`` and ``teacher``: draw from ``alpha p + (1 - alpha) q`` (``alpha=0``: the student alone, with the
      teacher's log-probs still recorded); per-token student, teacher and mixture log-probs are returned.
    * ``teacher=None``: the student alone; ``student=None``: the teacher alone (SeqKD data); the one model's
      log-probs are returned as ``student_logprobs`` / ``teacher_logprobs``.

    ``prompt_ids, prompt_mask [B, P]``. Runs under ``torch.no_grad`` with the models in eval mode (restored after).
    ``compute_dtype=torch.bfloat16``: forwards under bf16 autocast, hidden states and heads cast to bf16 for the
    sampler (the trainer's bf16 mode, whose student keeps fp32 master weights).
    """
    if student is None and teacher is None:
        raise ValueError("generate() needs a student, a teacher, or both")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    models = [m for m in (student, teacher) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            return _generate(student, teacher, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                             eos_token_id=eos_token_id, pad_token_id=pad_token_id, alpha=alpha,
                             temperature=temperature, generator=generator, vocab_size=vocab_size, backend=backend,
                             keep_teacher_hidden=keep_teacher_hidden, with_reverse_kl=with_reverse_kl,
                             compute_dtype=compute_dtype)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _generate(student, teacher, prompt_ids, prompt_mask, *, max_new_tokens, eos_token_id, pad_token_id, alpha,
              temperature, generator, vocab_size, backend, keep_teacher_hidden, with_reverse_kl,
              compute_dtype) -> Rollouts:
    device = prompt_ids.device
    dtype = compute_dtype
    ac = (lambda: autocast(dtype, device)) if dtype is not None else contextlib.nullcontext

    def run(model, ids, msk, pos, past):
        with ac():
            h, past = hidden_states(model, ids, msk, position_ids=pos, past_key_values=past, use_cache=True)
        h = h[:, -1]
        return (h if dtype is None else h.to(dtype)), past

    b = prompt_ids.shape[0]
    mask = prompt_mask.long()
    positions = positions_from_mask(mask)
    both = student is not None and teacher is not None

    s_head = head_of(student, dtype) if student is not None else None
    t_head = head_of(teacher, dtype) if teacher is not None else None
    s_past = t_past = None
    if student is not None:
        hs, s_past = run(student, prompt_ids, mask, positions, None)
    if teacher is not None:
        ht, t_past = run(teacher, prompt_ids, mask, positions, None)

    next_pos = mask.sum(-1)                      # position of the next token of each row
    done = torch.zeros(b, dtype=torch.bool, device=device)
    tokens, valid, lq, lp, lm, th, rkl = [], [], [], [], [], [], []
    for step in range(max_new_tokens):
        if both:
            s = mixture_sample(hs, s_head.weight, ht, t_head.weight, alpha=alpha, temperature=temperature,
                               generator=generator, vocab_size=vocab_size, backend=backend,
                               **s_head.options("student"), **t_head.options("teacher"))
            y, q_y, p_y, m_y = s.tokens, s.student_logprobs, s.teacher_logprobs, s.mixture_logprobs
        else:
            h, head = (hs, s_head) if student is not None else (ht, t_head)
            s = sample_tokens(h, head.weight, temperature=temperature, generator=generator, vocab_size=vocab_size,
                              backend=backend, **head.options())
            y, q_y, p_y, m_y = s.tokens, s.logprobs, None, None
            if student is None:
                q_y, p_y = None, s.logprobs
        live = ~done
        y = torch.where(live, y, torch.full_like(y, pad_token_id))
        tokens.append(y)
        valid.append(live)
        zero = torch.zeros((), device=device)
        lq.append(None if q_y is None else torch.where(live, q_y.float(), zero))
        lp.append(None if p_y is None else torch.where(live, p_y.float(), zero))
        lm.append(None if m_y is None else torch.where(live, m_y.float(), zero))
        if keep_teacher_hidden and teacher is not None:
            th.append(ht)
        if with_reverse_kl and both:
            st = rollout_statistics(hs, s_head.weight, ht, t_head.weight, y, alpha=alpha, temperature=temperature,
                                    vocab_size=vocab_size, backend=backend, **s_head.options("student"),
                                    **t_head.options("teacher"))
            rkl.append(torch.where(live, st.reverse_kl.float(), zero))
        done = done | (live & (y == eos_token_id))
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, live.long().unsqueeze(1)], dim=1)
        step_ids, step_pos = y.unsqueeze(1), next_pos.unsqueeze(1)
        next_pos = next_pos + live.long()
        if student is not None:
            hs, s_past = run(student, step_ids, mask, step_pos, s_past)
        if teacher is not None:
            ht, t_past = run(teacher, step_ids, mask, step_pos, t_past)

    def stack(xs):
        return None if not xs or xs[0] is None else torch.stack(xs, dim=1)

    return Rollouts(prompt_ids=prompt_ids, prompt_mask=prompt_mask.long(), response_ids=stack(tokens),
                    response_mask=stack(valid), student_logprobs=stack(lq), teacher_logprobs=stack(lp),
                    mixture_logprobs=stack(lm), teacher_hidden=stack(th), reverse_kl=stack(rkl))


def collate_rows(rows: list[dict], pad_token_id: int) -> Rollouts:
    """Inverse of :meth:`Rollouts.unbatch` for any subset of rows: prompts left-padded, responses right-padded."""
    from .data import pad_left, pad_right

    dev = rows[0]["prompt_ids"].device
    p = max(len(r["prompt_ids"]) for r in rows)
    rlen = max(max(len(r["response_ids"]) for r in rows), 1)
    prompt_ids = pad_left([r["prompt_ids"].tolist() for r in rows], pad_token_id, p).to(dev)
    prompt_mask = pad_left([[1] * len(r["prompt_ids"]) for r in rows], 0, p).to(dev)
    response_ids = pad_right([r["response_ids"].tolist() for r in rows], pad_token_id, rlen).to(dev)
    response_mask = pad_right([[1] * len(r["response_ids"]) for r in rows], 0, rlen).to(dev).bool()
    out = Rollouts(prompt_ids, prompt_mask, response_ids, response_mask)
    for f in ("student_logprobs", "teacher_logprobs", "mixture_logprobs", "reverse_kl", "teacher_hidden"):
        if f in rows[0]:
            ref = rows[0][f]
            shape = (len(rows), rlen) + tuple(ref.shape[1:])
            t = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
            for i, r in enumerate(rows):
                t[i, :len(r[f])] = r[f]
            setattr(out, f, t)
    return out


def rollout_fields() -> list[str]:
    return [f.name for f in fields(Rollouts)]
