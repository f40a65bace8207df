"""MiniLLM's rewards and advantages (paper section 2.2; docs/design.md section 3).

Per response token ``t`` (valid tokens: the generated ones up to and including EOS):

* reward ``r_t = (log p(y_t) - log q_old(y_t)) / reward_scaling``, clipped to ``+-cliprange_reward`` (reference:
  scaling 0.5, clip 100); 0 on padding.
* ``advantage="reference"`` (default, what microsoft/LMOps minillm does):
  ``A_t = sum_{t' >= t} gamma^(t'-t) r_t' / N_t`` with ``N_t`` the number of valid tokens from t to the end
  (``length_norm=False`` drops the division).
* ``advantage="paper"`` (Eq. 6): ``A_t = R_{t+1} / (number of tokens after t)`` with
  ``R_{t+1} = sum_{t' > t} gamma^(t'-t-1) r_t'`` (the paper writes ``1/(T-t-1)``; we divide by the number of summed
  terms, ``T-t`` for a 1-based t, and by 1 for the last token, whose ``R_{T+1} = 0``). Set ``gamma=1`` for the
  paper's undiscounted sum.
* whitening (``whiten_advantages``): ``(A - mean) / sqrt(var + 1e-8)`` with the mean and (population) variance over
  the valid tokens of the whole mini-batch, all-reduced across ranks when a process group is up.

Known difference from the reference: it whitens over every position of the padded [B, R] tensor (padding counts as
zeros), and its ``--length-norm`` flag only changes the logged statistics (the division by ``N_t`` is unconditional
there); here ``length_norm`` really switches the division, for the ablation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ranks


def rewards(teacher_logprobs: Tensor, student_logprobs: Tensor, mask: Tensor, *,
            reward_scaling: Optional[float] = 0.5, cliprange_reward: Optional[float] = 100.0) -> Tensor:
    """``[B, R]`` per-token rewards ``log p - log q_old`` (scaled, clipped, 0 on padding)."""
    m = mask.to(torch.float32)
    r = (teacher_logprobs.float() - student_logprobs.float()) * m
    if reward_scaling is not None:
        r = r / reward_scaling
    if cliprange_reward is not None:
        r = r.clamp(-cliprange_reward, cliprange_reward)
    return r * m


def discounted_returns(r: Tensor, gamma: float) -> Tensor:
    """``G_t = sum_{t' >= t} gamma^(t'-t) r_t'`` along the last dimension."""
    out = torch.empty_like(r)
    acc = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        acc = r[..., t] + gamma * acc
        out[..., t] = acc
    return out


def remaining_tokens(mask: Tensor) -> Tensor:
    """``N_t``: valid tokens from t to the end, t included."""
    m = mask.to(torch.float32)
    return m.flip(-1).cumsum(-1).flip(-1)


def advantages(r: Tensor, mask: Tensor, *, gamma: float = 0.95, length_norm: bool = True,
               variant: str = "reference", whiten: bool = True, group=None) -> Tensor:
    """``[B, R]`` advantages of the long-term term (see the module docstring), 0 on padding, no gradient."""
    m = mask.to(torch.float32)
    g = discounted_returns(r.float() * m, gamma)
    n = remaining_tokens(m)
    if variant == "reference":
        a = g / n.clamp(min=1.0) if length_norm else g
    elif variant == "paper":
        g_next = torch.zeros_like(g)
        g_next[..., :-1] = g[..., 1:]
        a = g_next / (n - 1.0).clamp(min=1.0) if length_norm else g_next
    else:
        raise ValueError(f"advantage variant {variant!r} is not supported; expected 'reference' or 'paper'")
    a = a * m
    if whiten:
        a = masked_whiten(a, m, group=group)
    return a.detach()


def masked_whiten(x: Tensor, mask: Tensor, *, eps: float = 1e-8, group=None) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (of every rank), 0 elsewhere."""
    m = mask.to(x.dtype)
    stats = torch.stack([(x * m).sum(), m.sum()]).double()
    ranks.all_reduce_sum(stats, group=group)
    mean = (stats[0] / stats[1].clamp(min=1)).to(x.dtype)
    sq = ((x - mean) ** 2 * m).sum().double().reshape(1)
    ranks.all_reduce_sum(sq, group=group)
    var = (sq[0] / stats[1].clamp(min=1)).to(x.dtype)
    return (x - mean) * torch.rsqrt(var + eps) * m


def sequence_reward(r: Tensor, mask: Tensor, gamma: float, length_norm: bool = True) -> Tensor:
    """``[B]`` the logged reward of a rollout: ``G_0`` (divided by its length with ``length_norm``), as the
    reference logs it."""
    g0 = discounted_returns(r.float() * mask.float(), gamma)[..., 0]
    return g0 / mask.float().sum(-1).clamp(min=1) if length_norm else g0
