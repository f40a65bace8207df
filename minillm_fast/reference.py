"""Pure-PyTorch references: every op of the package written the plain way, on materialised logits.

These are the ground truth for the tests (run on float64 copies of the inputs) and the "naive" baseline of the
benchmarks (run on the inputs as they are). They allocate ``[N, V]`` tensors on purpose; the fast paths never do.
Gradients come from autograd through these formulas, so they check the kernels' closed-form gradients independently.

Logits are computed in the inputs' dtype (as a model's lm_head would) and then upcast: to float64 for float64 inputs,
to float32 otherwise; that is the naive computation whose error the fast paths are measured against.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import divergences
from .scaling import per_model


def logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           *, vocab_size: Optional[int] = None, softcap: Optional[float] = None,
           temperature: float = 1.0, logit_scale: Optional[float] = None) -> torch.Tensor:
    """``[..., V]`` scaled logits ``softcap(logit_scale * (h W^T + b)) / T`` over the first ``vocab_size`` rows of
    the head, in that order, as a model and a distillation loss apply them (minillm_fast/scaling.py).

    hidden [..., H], weight [V_pad, H], bias [V_pad] or None. Computed in the inputs' dtype, returned as float64 for
    float64 inputs and float32 otherwise.
    """
    v = weight.shape[0] if vocab_size is None else vocab_size
    z = hidden @ weight[:v].T
    if bias is not None:
        z = z + bias[:v]
    z = z.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    if logit_scale is not None:
        z = z * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _two_logits(hs, ws, bs, ht, wt, bt, vocab_size, temperature, softcap, logit_scale, student_softcap,
                teacher_softcap, student_logit_scale, teacher_logit_scale):
    """Both models' scaled logits, each with its own softcap and logit scale (given for both or per model)."""
    caps = per_model("softcap", softcap, student_softcap, teacher_softcap)
    scales = per_model("logit_scale", logit_scale, student_logit_scale, teacher_logit_scale)
    s = logits(hs, ws, bs, vocab_size=vocab_size, softcap=caps[0], temperature=temperature, logit_scale=scales[0])
    t = logits(ht, wt, bt, vocab_size=vocab_size, softcap=caps[1], temperature=temperature, logit_scale=scales[1])
    return s, t


def fused_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
                     divergence: str = "reverse_kl", labels=None, ignore_index: int = -100, mask=None,
                     token_weights=None, temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                     reduction: str = "mean", student_bias=None, teacher_bias=None, vocab_size=None,
                     softcap=None, logit_scale=None, student_softcap=None, teacher_softcap=None,
                     student_logit_scale=None, teacher_logit_scale=None) -> torch.Tensor:
    """Reference of :func:`minillm_fast.fused_divergence` (same arguments, no ``backend``).

    student_hidden [..., Hs], student_weight [V, Hs], teacher_hidden [..., Ht], teacher_weight [V, Ht];
    labels / mask / token_weights [...]. Returns a scalar (mean over kept tokens, or sum) or ``[...]`` (none).
    """
    div = divergences.resolve(divergence, beta, skew)
    s, t = _two_logits(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                       vocab_size, temperature, softcap, logit_scale, student_softcap, teacher_softcap,
                       student_logit_scale, teacher_logit_scale)
    per_token = divergences.phi(torch.log_softmax(s, -1), torch.log_softmax(t, -1), div).sum(-1)  # [...]
    return _weighted(per_token, labels, ignore_index, mask, token_weights, reduction)


def _weighted(per_token, labels, ignore_index, mask, token_weights, reduction, keep=None):
    """Skip rows (labels == ignore_index, mask False, ``keep`` False), weight, reduce: mean over kept rows, sum or
    none (0 on skipped rows)."""
    keep = torch.ones(per_token.shape, dtype=torch.bool, device=per_token.device) if keep is None else keep
    if labels is not None:
        keep = keep & (labels != ignore_index)
    if mask is not None:
        keep = keep & mask.bool()
    weighted = per_token if token_weights is None else per_token * token_weights.detach().to(per_token.dtype)
    weighted = torch.where(keep, weighted, torch.zeros_like(weighted))
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    return weighted.sum() / keep.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------------
# token log-probs, rollout statistics, mixture sampling (minillm_fast/ops/token_logprobs.py, ops/sampling.py)
# ----------------------------------------------------------------------------------------------------------------------
def token_logprobs(hidden, weight, targets, *, temperature: float = 1.0, bias=None, vocab_size=None, softcap=None,
                   logit_scale=None, ignore_index: int = -100, return_entropy: bool = False):
    """Reference of :func:`minillm_fast.token_logprobs` (same arguments, no ``backend``).

    hidden [..., H], weight [V, H], targets [...] int. Returns ``log_softmax(s)[target]`` ``[...]`` (0 where
    ``targets == ignore_index``) and, with ``return_entropy``, the pair with the entropy ``-sum q log q`` ``[...]``
    (also 0 on ignored rows). Gradients by autograd.
    """
    lq = torch.log_softmax(logits(hidden, weight, bias, vocab_size=vocab_size, softcap=softcap,
                                  temperature=temperature, logit_scale=logit_scale), -1)
    keep = targets != ignore_index
    picked = lq.gather(-1, torch.where(keep, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros_like(picked)
    out = torch.where(keep, picked, zero)
    if not return_entropy:
        return out
    entropy = -(lq.exp() * lq).sum(-1)
    return out, torch.where(keep, entropy, zero)


def mixture_probs(student_hidden, student_weight, teacher_hidden, teacher_weight, *, alpha: float = 0.2,
                  temperature: float = 1.0, student_bias=None, teacher_bias=None, vocab_size=None,
                  softcap=None, logit_scale=None, student_softcap=None, teacher_softcap=None,
                  student_logit_scale=None, teacher_logit_scale=None) -> torch.Tensor:
    """``[..., V]`` the rollout distribution ``alpha softmax(t) + (1 - alpha) softmax(s)`` (teacher weighted by
    alpha), the exact law that :func:`minillm_fast.mixture_sample` draws from."""
    s, t = _two_logits(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                       vocab_size, temperature, softcap, logit_scale, student_softcap, teacher_softcap,
                       student_logit_scale, teacher_logit_scale)
    return alpha * torch.softmax(t, -1) + (1 - alpha) * torch.softmax(s, -1)


def rollout_statistics(student_hidden, student_weight, teacher_hidden, teacher_weight, tokens, *,
                       alpha: float = 0.2, temperature: float = 1.0, student_bias=None, teacher_bias=None,
                       vocab_size=None, softcap=None, logit_scale=None, student_softcap=None, teacher_softcap=None,
                       student_logit_scale=None, teacher_logit_scale=None):
    """Reference of :func:`minillm_fast.rollout_statistics` (same arguments, no ``backend``), returning the same
    ``RolloutStatistics`` of ``[...]`` tensors: log q(y), log p(y), log m(y) with ``m = alpha p + (1 - alpha) q``,
    the importance weight ``q(y) / m(y)`` and the full-vocabulary ``KL(q || p)``; q the student, p the teacher."""
    from .ops.sampling import RolloutStatistics  # the result type lives with the op

    s, t = _two_logits(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                       vocab_size, temperature, softcap, logit_scale, student_softcap, teacher_softcap,
                       student_logit_scale, teacher_logit_scale)
    lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    idx = tokens.long().unsqueeze(-1)
    lq_y, lp_y = lq.gather(-1, idx).squeeze(-1), lp.gather(-1, idx).squeeze(-1)
    lm_y = divergences._log_mix(lp_y, lq_y, alpha)
    reverse_kl = divergences.phi(lq, lp, divergences.Divergence(divergences.REVERSE_KL, 0.0)).sum(-1)
    return RolloutStatistics(lq_y, lp_y, lm_y, torch.exp(lq_y - lm_y), reverse_kl)


# ----------------------------------------------------------------------------------------------------------------------
# offline distillation from a stored top k (minillm_fast/ops/sparse_divergence.py)
# ----------------------------------------------------------------------------------------------------------------------
def sparse_divergence(student_hidden, student_weight, teacher_ids, teacher_logprobs, *, divergence="forward_kl",
                      tail="bucket", beta=0.5, labels=None, ignore_index=-100, mask=None, token_weights=None,
                      temperature=1.0, student_bias=None, vocab_size=None, softcap=None, logit_scale=None,
                      reduction="mean"):
    """Reference of :func:`minillm_fast.sparse_divergence` (same arguments, no ``backend``): the student's full
    log-softmax, its log-probs at the valid teacher ids (ids >= 0, each counted once) and, for ``tail="bucket"``, each
    side's tail ``1 - sum_k`` of its top-k mass, floored at TAIL_FLOOR."""
    div = divergences.resolve(divergence, beta)
    lq_full = torch.log_softmax(logits(student_hidden, student_weight, student_bias, vocab_size=vocab_size,
                                       softcap=softcap, temperature=temperature, logit_scale=logit_scale), -1)
    ids, lp = teacher_ids.long(), teacher_logprobs.to(lq_full.dtype)
    k = ids.shape[-1]
    earlier = (ids[..., :, None] == ids[..., None, :]) & torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)
    valid = (ids >= 0) & ~earlier.any(-1)
    safe = torch.where(valid, ids, torch.zeros_like(ids))
    lq = lq_full.gather(-1, safe)
    zero = torch.zeros_like(lq)
    lq, lp = torch.where(valid, lq, zero), torch.where(valid, lp, zero)
    if tail == "renorm":
        lq = lq - torch.logsumexp(torch.where(valid, lq, zero - math.inf), -1, keepdim=True)
        lp = lp - torch.logsumexp(torch.where(valid, lp, zero - math.inf), -1, keepdim=True)
    per_token = torch.where(valid, divergences.phi(lq, lp, div), zero).sum(-1)
    if tail == "bucket":
        # Each side's tail is 1 - its top-k mass, as a materialised implementation forms it from the gathered
        # log-probs: the plain way, whose error in the inputs' dtype the fused op is measured against (summing the
        # rest of the vocabulary instead would be more accurate where the top k holds nearly all the mass).
        q_rest = (1 - torch.where(valid, lq.exp(), zero).sum(-1)).clamp(min=divergences.TAIL_FLOOR)
        p_rest = (1 - torch.where(valid, lp.exp(), zero).sum(-1)).clamp(min=divergences.TAIL_FLOOR)
        per_token = per_token + divergences.phi(torch.log(q_rest), torch.log(p_rest), div)
    return _weighted(per_token, labels, ignore_index, mask, token_weights, reduction, keep=valid.any(-1))


def token_topk(hidden, weight, k, *, bias=None, vocab_size=None, temperature=1.0, softcap=None, logit_scale=None):
    """Reference of :func:`minillm_fast.token_topk`: ``torch.topk`` of the full log-softmax (``(values, ids)`` as
    ``TopK(ids, logprobs)``; the order of exact ties is torch's)."""
    from .ops.sparse_divergence import TopK

    lq = torch.log_softmax(logits(hidden, weight, bias, vocab_size=vocab_size, softcap=softcap,
                                  temperature=temperature, logit_scale=logit_scale), -1)
    values, ids = torch.topk(lq, k, dim=-1)
    return TopK(ids, values)
