"""Loss terms of every method, from final hidden states and lm_head weights (never logits).

Each function returns *sums* over the kept tokens (and the caller divides by the token count of the whole global
batch, so gradient accumulation and data parallelism give the gradient of one big batch):

* :func:`lm_terms`: the label cross-entropy ``-log q(y)`` (through :func:`minillm_fast.token_logprobs`) and, with a
  teacher, the forward KL ``KL(p || q)`` (through :func:`minillm_fast.fused_divergence`). The KD objective of the
  reference is ``(1 - r) CE + r soft-CE(p, q)`` with ``soft-CE(p, q) = -sum_v p log q = KL(p || q) + H(p)``; the
  teacher entropy ``H(p)`` does not depend on the student, so the gradient is the same. We optimise and **report the
  forward KL** (``kd`` in the metrics; 0 when the student matches the teacher), which is the reference's ``ds_loss``
  minus ``H(p)``.
* :func:`ppo_terms`: MiniLLM's long-term term, the PPO clipped surrogate ``max(-A ratio, -A clip(ratio, 1-e, 1+e))``
  with ``ratio = exp(log q - log q_old) * w`` (``w = q_old / mixture``, fixed at rollout time), and the single-step
  term, the full-vocabulary reverse KL ``sum_v q (log q - log p)`` with gradient through ``q``
  (:func:`minillm_fast.fused_reverse_kl`; ``token_weights=w`` for the paper's Eq. 5 variant).

``naive=True`` computes the same numbers on materialised logits with :mod:`minillm_fast.reference` (for the
benchmark and for debugging); the default path allocates nothing of size tokens x vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..ops.fused_divergence import fused_divergence
from ..ops.sparse_divergence import sparse_divergence
from ..ops.token_logprobs import token_logprobs
from .data import IGNORE_INDEX
from .heads import Head


@dataclass
class LossOptions:
    vocab_size: Optional[int] = None     # real vocabulary (heads may be padded)
    backend: str = "auto"                # backend of the fused ops
    naive: bool = False                  # materialise logits (reference ops) instead


def logprobs(hidden: Tensor, head: Head, targets: Tensor, opts: LossOptions, *, temperature: float = 1.0) -> Tensor:
    """``log q(targets)`` per position ``[...]`` float32 (0 where targets == IGNORE_INDEX), differentiable."""
    kw = dict(temperature=temperature, vocab_size=opts.vocab_size, ignore_index=IGNORE_INDEX, **head.options())
    if opts.naive:
        return reference.token_logprobs(hidden, head.weight, targets, **kw)
    return token_logprobs(hidden, head.weight, targets, backend=opts.backend, **kw)


def divergence_sum(student_hidden: Tensor, s_head: Head, teacher_hidden: Tensor, t_head: Head, opts: LossOptions, *,
                   divergence: str, labels: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                   token_weights: Optional[Tensor] = None, temperature: float = 1.0, beta: float = 0.5) -> Tensor:
    kw = dict(divergence=divergence, labels=labels, ignore_index=IGNORE_INDEX, mask=mask, token_weights=token_weights,
              temperature=temperature, beta=beta, reduction="sum", vocab_size=opts.vocab_size,
              **s_head.options("student"), **t_head.options("teacher"))
    if opts.naive:
        return reference.fused_divergence(student_hidden, s_head.weight, teacher_hidden, t_head.weight, **kw)
    return fused_divergence(student_hidden, s_head.weight, teacher_hidden, t_head.weight, backend=opts.backend, **kw)


def cached_kd_sum(student_hidden: Tensor, s_head: Head, teacher_ids: Tensor, teacher_logprobs: Tensor,
                  labels: Tensor, opts: LossOptions, *, tail: str) -> Tensor:
    """``sum KL(p || q)`` over the labelled positions, ``p`` a stored teacher top k (``teacher_ids,
    teacher_logprobs [B, T, K]``, id -1 = empty; distill/teacher_cache.py) and ``tail`` how the rest of its mass
    counts (:func:`minillm_fast.sparse_divergence`)."""
    kw = dict(divergence="forward_kl", tail=tail, labels=labels, ignore_index=IGNORE_INDEX, reduction="sum",
              vocab_size=opts.vocab_size, student_bias=s_head.bias, softcap=s_head.softcap,
              logit_scale=s_head.logit_scale)
    if opts.naive:
        return reference.sparse_divergence(student_hidden, s_head.weight, teacher_ids, teacher_logprobs, **kw)
    return sparse_divergence(student_hidden, s_head.weight, teacher_ids, teacher_logprobs, backend=opts.backend, **kw)


def lm_terms(student_hidden: Tensor, s_head: Head, labels: Tensor, opts: LossOptions, *,
             teacher_hidden: Optional[Tensor] = None, t_head: Optional[Head] = None,
             teacher_topk: Optional[tuple[Tensor, Tensor]] = None, tail: str = "bucket") -> dict:
    """Sums over the positions whose label is not IGNORE_INDEX (hidden states already aligned with their labels:
    ``hidden[:, :-1]`` with ``labels[:, 1:]``). The teacher is either live (``teacher_hidden [B, T, Ht]`` and
    ``t_head``: the full-vocabulary KL) or a stored top k (``teacher_topk = (ids, logprobs)``, each ``[B, T, K]``:
    :func:`cached_kd_sum` with ``tail``).

    Returns ``{"ce": sum -log q(y), "kd": sum KL(p || q) or None, "tokens": count}`` (tensors; ``tokens`` int64).
    """
    lp = logprobs(student_hidden, s_head, labels, opts)
    out = {"ce": -lp.sum(), "kd": None, "tokens": (labels != IGNORE_INDEX).sum()}
    if teacher_hidden is not None:
        out["kd"] = divergence_sum(student_hidden, s_head, teacher_hidden, t_head, opts, divergence="forward_kl",
                                   labels=labels)
    elif teacher_topk is not None:
        out["kd"] = cached_kd_sum(student_hidden, s_head, *teacher_topk, labels, opts, tail=tail)
    return out


def kd_objective(terms: dict, kd_ratio: float) -> Tensor:
    """``(1 - kd_ratio) CE + kd_ratio KL(p || q)`` as sums (divide by the token count)."""
    if terms["kd"] is None or kd_ratio == 0:
        return terms["ce"]
    return (1 - kd_ratio) * terms["ce"] + kd_ratio * terms["kd"]


def ppo_terms(student_hidden: Tensor, s_head: Head, response_ids: Tensor, mask: Tensor, old_logprobs: Tensor,
              advantages: Tensor, importance_weight: Tensor, opts: LossOptions, *, cliprange: float = 0.2,
              temperature: float = 1.0, teacher_hidden: Optional[Tensor] = None, t_head: Optional[Head] = None,
              single_step: bool = True, single_step_weighted: bool = False) -> dict:
    """MiniLLM's two RL terms as sums over the valid response tokens.

    Shapes: ``student_hidden [B, R, Hs]`` (the hidden state that predicts each response token),
    ``teacher_hidden [B, R, Ht]``; ``response_ids, mask, old_logprobs, advantages, importance_weight [B, R]``.

    Returns ``{"pg": sum of the clipped surrogate, "single_step": sum of (w_t x) KL(q || p) or None,
    "clipped": count of clipped tokens, "approx_kl": sum of (r - 1) - log r with r = q / q_old,
    "ratio": sum of the importance-weighted ratio, "tokens": count}``.
    """
    m = mask.to(torch.float32)
    targets = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, IGNORE_INDEX))
    lp = logprobs(student_hidden, s_head, targets, opts, temperature=temperature)
    log_ratio = (lp - old_logprobs) * m
    ratio = torch.exp(log_ratio) * importance_weight
    surrogate = torch.maximum(-advantages * ratio,
                              -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange))
    out = {"pg": (surrogate * m).sum(), "single_step": None, "tokens": mask.sum()}
    with torch.no_grad():
        out["clipped"] = (((ratio - 1.0).abs() > cliprange).float() * m).sum()
        out["approx_kl"] = ((torch.exp(log_ratio) - 1.0 - log_ratio) * m).sum()
        out["ratio"] = (ratio * m).sum()
    if single_step:
        if teacher_hidden is None:
            raise ValueError("the single-step term needs the teacher's hidden states")
        out["single_step"] = divergence_sum(
            student_hidden, s_head, teacher_hidden, t_head, opts, divergence="reverse_kl", mask=mask.bool(),
            token_weights=importance_weight if single_step_weighted else None, temperature=temperature)
    return out
