"""The divergence family: names, parameters and the closed-form per-vocabulary-entry terms.

Per token row, with student log-probs ``lq = log softmax(z_s / T)`` and teacher log-probs ``lp = log softmax(z_t / T)``,
every divergence is a sum over the vocabulary ``L = sum_v phi(p_v, q_v)``. With ``g = dphi/dq`` and ``h = dphi/dp``
the gradients with respect to the temperature-scaled logits are

    dL/ds = q * g - q * sum_u q_u g_u          dL/dt = p * h - p * sum_u p_u h_u

so a kernel needs, per entry, ``phi``, ``q*g`` and ``p*h`` (products, never ``g`` or ``h`` alone: ``h = -q/p`` for
the reverse KL overflows where ``p`` underflows, while ``p*h = -q`` is always finite). Mixtures ``m`` are formed
in log space (``logaddexp``) so that two underflowing probabilities never give ``0/0``.

| divergence        | phi(p, q)                                  | q*g                              | p*h                            |
| ----------------- | ------------------------------------------ | -------------------------------- | ------------------------------ |
| reverse_kl        | q (lq - lp)                                | q (lq - lp + 1)                  | -q                             |
| forward_kl        | p (lp - lq)                                | -p                               | p (lp - lq + 1)                |
| jsd (b), m=bp+(1-b)q | b p (lp - lm) + (1-b) q (lq - lm)       | (1-b) q (lq - lm)                | b p (lp - lm)                  |
| tvd               | 0.5 abs(p - q)                             | 0.5 q sign(q - p)                | 0.5 p sign(p - q)              |
| skew_forward_kl (a), m=ap+(1-a)q | p (lp - lm)                 | -(1-a) p q / m                   | p (lp - lm + 1 - a p / m)      |
| skew_reverse_kl (a), m=aq+(1-a)p | q (lq - lm)                 | q (lq - lm + 1 - a q / m)        | -(1-a) p q / m                 |

``q`` is always the student and ``p`` the teacher. ``jsd`` follows Liger-Kernel's convention at the ends of its
range: ``beta=0`` is the forward KL and ``beta=1`` the reverse KL (the formula itself is identically 0 there).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

REVERSE_KL, FORWARD_KL, JSD, TVD, SKEW_FORWARD_KL, SKEW_REVERSE_KL = range(6)
DIVERGENCES = {
    "reverse_kl": REVERSE_KL,
    "forward_kl": FORWARD_KL,
    "jsd": JSD,
    "tvd": TVD,
    "skew_forward_kl": SKEW_FORWARD_KL,
    "skew_reverse_kl": SKEW_REVERSE_KL,
}
NAMES = {v: k for k, v in DIVERGENCES.items()}

# log(0) stand-in handed to kernels: exp(x + LOG_ZERO) == 0 for any finite x, and unlike -inf it never makes
# inf - inf in a logaddexp.
LOG_ZERO = -1.0e30


class Divergence(NamedTuple):
    """A resolved divergence: its kernel id and the mixture weight ``w`` (beta or skew; 0 where unused)."""

    kind: int
    weight: float

    @property
    def name(self) -> str:
        return NAMES[self.kind]

    @property
    def log_weights(self) -> tuple[float, float]:
        """``(log w, log(1 - w))`` with log(0) replaced by LOG_ZERO."""
        w = self.weight
        return (math.log(w) if w > 0 else LOG_ZERO, math.log1p(-w) if w < 1 else LOG_ZERO)


def resolve(divergence: str, beta: float = 0.5, skew: float = 0.1) -> Divergence:
    """Check a divergence name and its parameter; map ``jsd`` at beta 0 / 1 to the forward / reverse KL."""
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is not supported; expected one of {sorted(DIVERGENCES)}")
    kind = DIVERGENCES[divergence]
    if kind == JSD:
        _check_unit("beta", beta)
        if beta == 0.0:
            return Divergence(FORWARD_KL, 0.0)
        if beta == 1.0:
            return Divergence(REVERSE_KL, 0.0)
        return Divergence(JSD, float(beta))
    if kind in (SKEW_FORWARD_KL, SKEW_REVERSE_KL):
        _check_unit("skew", skew)
        return Divergence(kind, float(skew))
    return Divergence(kind, 0.0)


def _check_unit(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name}={value!r} must be a number in [0, 1]")


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) from log a and log b, stable for underflowing a and b."""
    return torch.logaddexp(log_a + _log(w), log_b + _log(1.0 - w))


def phi(log_q: torch.Tensor, log_p: torch.Tensor, div: Divergence) -> torch.Tensor:
    """The per-entry divergence ``phi(p, q)`` written plainly, for the reference (its gradient comes from autograd)."""
    q, p = log_q.exp(), log_p.exp()
    if div.kind == REVERSE_KL:
        return q * (log_q - log_p)
    if div.kind == FORWARD_KL:
        return p * (log_p - log_q)
    if div.kind == JSD:
        b = div.weight
        log_m = _log_mix(log_p, log_q, b)
        return b * p * (log_p - log_m) + (1 - b) * q * (log_q - log_m)
    if div.kind == TVD:
        return 0.5 * (p - q).abs()
    if div.kind == SKEW_FORWARD_KL:
        return p * (log_p - _log_mix(log_p, log_q, div.weight))
    if div.kind == SKEW_REVERSE_KL:
        return q * (log_q - _log_mix(log_q, log_p, div.weight))
    raise AssertionError(f"unknown divergence kind {div.kind}")


def terms(log_q: torch.Tensor, log_p: torch.Tensor, div: Divergence):
    """Closed-form ``(phi, q*g, p*h)`` per entry (see the module table), for the chunked torch backend."""
    q, p = log_q.exp(), log_p.exp()
    if div.kind == REVERSE_KL:
        d = log_q - log_p
        return q * d, q * (d + 1), -q
    if div.kind == FORWARD_KL:
        d = log_p - log_q
        return p * d, -p, p * (d + 1)
    if div.kind == JSD:
        b = div.weight
        log_m = _log_mix(log_p, log_q, b)
        qg = (1 - b) * q * (log_q - log_m)
        ph = b * p * (log_p - log_m)
        return qg + ph, qg, ph
    if div.kind == TVD:
        sign = torch.sign(q - p)
        return 0.5 * (p - q).abs(), 0.5 * q * sign, -0.5 * p * sign
    if div.kind == SKEW_FORWARD_KL:
        a = div.weight
        log_m = _log_mix(log_p, log_q, a)
        d = log_p - log_m
        cross = torch.exp(log_p + log_q - log_m)  # p q / m, finite even where m underflows
        a_p_over_m = torch.exp(d + _log(a))  # a p / m <= 1; exp(log a + d) stays 0 at a = 0 where p / m may overflow
        return p * d, -(1 - a) * cross, p * (d + 1 - a_p_over_m)
    if div.kind == SKEW_REVERSE_KL:
        a = div.weight
        log_m = _log_mix(log_q, log_p, a)
        d = log_q - log_m
        cross = torch.exp(log_p + log_q - log_m)
        a_q_over_m = torch.exp(d + _log(a))
        return q * d, q * (d + 1 - a_q_over_m), -(1 - a) * cross
    raise AssertionError(f"unknown divergence kind {div.kind}")


# ----------------------------------------------------------------------------------------------------------------------
# divergences over a stored top k (minillm_fast/ops/sparse_divergence.py)
# ----------------------------------------------------------------------------------------------------------------------
TAILS = ("bucket", "renorm", "ignore")
TAIL_FLOOR = 1e-20  # the smallest tail mass of either side (bucket)


def _log_rest(log_mass: torch.Tensor) -> torch.Tensor:
    """``log(max(1 - e^x, TAIL_FLOOR))`` for a log-mass ``x <= 0``, accurate at both ends (Maechler's switch at
    -log 2). Where the rest is below the floor the value is the floor's and the gradient 0: the log is taken at a
    stand-in there, since ``log(1 - e^0)`` has an infinite derivative and 0 x inf would be NaN."""
    x = log_mass.clamp(max=0.0)
    above = x < -TAIL_FLOOR                      # 1 - e^x > ~TAIL_FLOOR
    stand_in = torch.full_like(x, -1.0)
    safe = torch.where(above, x, stand_in)
    # each branch of the switch sees only inputs it is finite at: torch.where differentiates both, and the branch not
    # taken still multiplies its derivative by 0 (log1p(-e^x) at x = -3e-8 rounds e^x to 1 in fp32: 0 x inf = NaN)
    near = safe > -math.log(2.0)
    rest = torch.where(near, torch.log(-torch.expm1(torch.where(near, safe, stand_in))),
                       torch.log1p(-torch.exp(torch.where(near, stand_in, safe))))
    return torch.where(above, rest.clamp(min=math.log(TAIL_FLOOR)), torch.full_like(x, math.log(TAIL_FLOOR)))


def _masked_lse(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """logsumexp over the valid entries; the finite LOG_ZERO fill keeps a row with none finite, and its gradient too
    (an all -inf row would give NaN, which a masked-out row would still pass on: 0 x NaN)."""
    return torch.logsumexp(torch.where(valid, x, torch.full_like(x, LOG_ZERO)), -1)


def outcome_divergence(lq: torch.Tensor, lp: torch.Tensor, valid: torch.Tensor, div: Divergence,
                       tail: str) -> torch.Tensor:
    """The divergence per row between two distributions over a few outcomes (minillm_fast.sparse_divergence): the
    valid ids of ``lq, lp [N, K]`` (student, teacher log-probs there) and, with ``tail="bucket"``, one more outcome
    holding the rest of each side's mass (floored at TAIL_FLOOR); ``renorm`` renormalises both over the ids;
    ``ignore`` sums the per-id terms only (ops/sparse_divergence.py explains the three)."""
    zero = torch.zeros_like(lq)
    lq, lp = torch.where(valid, lq, zero), torch.where(valid, lp, zero)  # finite everywhere: no NaN in a gradient
    if tail == "renorm":
        lq = lq - _masked_lse(lq, valid)[:, None]
        lp = lp - _masked_lse(lp, valid)[:, None]
    per = torch.where(valid, phi(lq, lp, div), zero).sum(-1)
    if tail == "bucket":
        lq_rest, lp_rest = _log_rest(_masked_lse(lq, valid)), _log_rest(_masked_lse(lp, valid))
        per = per + phi(lq_rest, lp_rest, div)
    return per
