"""Rollout-time ops: mixture sampling, plain sampling and rollout statistics (no gradients).

MiniLLM samples rollouts from ``m = alpha p + (1 - alpha) q`` (p the teacher, q the student, alpha = 0.2; paper
Eq. 4) and stores, per token, ``log q(y)``, ``log p(y)`` and the importance weight ``q(y) / m(y)``
(docs/design.md section 3). These ops make those from hidden states and lm_head weights in one pass over the vocabulary,
without ``[N, V]`` logits:

* :func:`mixture_sample`: draw ``y ~ m`` (component coin, then a draw from that component's softmax) and return
  its three log-probs; :func:`sample_tokens`: the same from one model.
* :func:`rollout_statistics`: the same statistics for given tokens, plus the full-vocabulary ``KL(q || p)``.

Layers: public function (checks, seed, the backend from minillm_fast/dispatch.py) -> ``torch.library`` custom op
(``minillm_fast::mixture_sample``, ``minillm_fast::rollout_statistics``, with fake implementations for
``torch.compile``) -> the backend's implementation (``triton``: the kernels of kernels/sampling.py; ``torch``: token
chunks with the full vocabulary; ``native``: the same chunks, each chunk's row work in one C++ pass,
csrc/token_stats_cpu.cpp and csrc/sampling_cpu.cpp; minillm_fast/backends/).

Randomness: the public function draws a 64-bit seed from ``generator`` (the device's default generator when None)
and hands it to the backend: Triton's Philox on the triton backend (Gumbel-max), a ``torch.Generator`` seeded with it
on the torch backend (Gumbel-max; it reads the seed on the host: one sync on CUDA), Philox4x32-10 keyed by it with
the row index as counter on the native backend (inverse CDF; the draw of a row depends only on the seed and the row,
not on the thread count or the chunk size). The same generator state gives the same tokens on the same backend and
device; the backends draw different (equally exact) samples.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import dispatch
from ..checks import check_model, check_models, check_positive, check_rows, check_token_range
from ..chunked import chunk_rows, out_dtype
from ..divergences import _check_unit, _log_mix
from ..scaling import Scaling, checked, two_model_scalings

_SEED_HIGH = 2 ** 62  # seeds are drawn uniformly from [0, 2^62)


class RolloutStatistics(NamedTuple):
    """Per-token rollout statistics, each ``[...]`` float32 (float64 for float64 inputs)."""

    student_logprobs: Tensor   # log q(y)
    teacher_logprobs: Tensor   # log p(y)
    mixture_logprobs: Tensor   # log(alpha p(y) + (1 - alpha) q(y))
    importance_weight: Tensor  # q(y) / (alpha p(y) + (1 - alpha) q(y))
    reverse_kl: Tensor         # KL(q || p) over the whole vocabulary


class MixtureSample(NamedTuple):
    """One draw per token row from ``alpha p + (1 - alpha) q``."""

    tokens: Tensor             # [...] int64
    student_logprobs: Tensor   # [...] log q(y)
    teacher_logprobs: Tensor   # [...] log p(y)
    mixture_logprobs: Tensor   # [...] log(alpha p(y) + (1 - alpha) q(y))

    @property
    def importance_weight(self) -> Tensor:
        """``q(y) / m(y)``: MiniLLM's per-token weight of the rollout (paper's per-step approximation)."""
        return torch.exp(self.student_logprobs - self.mixture_logprobs)


class TokenSample(NamedTuple):
    """One draw per token row from ``softmax(logits / T)``."""

    tokens: Tensor    # [...] int64
    logprobs: Tensor  # [...] log-probability of the drawn token


def _scalings(scaling: list[float]) -> dict:
    """Each model's :class:`Scaling` from the custom ops' ``scaling`` = [inv_temp_s, softcap_s, inv_temp_t,
    softcap_t]."""
    it_s, cap_s, it_t, cap_t = scaling
    return dict(student=Scaling(it_s, cap_s), teacher=Scaling(it_t, cap_t))


# ----------------------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("minillm_fast::rollout_statistics", mutates_args=())
def _rollout_statistics_op(hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Tensor, wt: Tensor, bt: Optional[Tensor],
                           tokens: Tensor, alpha: float, scaling: list[float], vocab_size: int,
                           backend: str, chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``[N]`` log q(y), log p(y), log m(y), q(y) / m(y), KL(q || p)."""
    lq, lp, rkl = dispatch.implementation("rollout_statistics", backend)(
        hs, ws, bs, ht, wt, bt, tokens, vocab_size=vocab_size, chunk_size=chunk_size, **_scalings(scaling))
    lm = _log_mix(lp, lq, alpha)
    return lq, lp, lm, torch.exp(lq - lm), rkl


@_rollout_statistics_op.register_fake
def _(hs, ws, bs, ht, wt, bt, tokens, alpha, scaling, vocab_size, backend, chunk_size):
    n, f = hs.shape[0], out_dtype(hs)
    return tuple(hs.new_empty(n, dtype=f) for _ in range(5))


@torch.library.custom_op("minillm_fast::mixture_sample", mutates_args=())
def _sample_op(hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Optional[Tensor], wt: Optional[Tensor],
               bt: Optional[Tensor], seed: Tensor, alpha: float, scaling: list[float], vocab_size: int,
               backend: str, chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``tokens [N]`` int64 drawn from ``alpha p + (1 - alpha) q`` (q alone when ht is None), log q(y), log p(y) and
    log m(y) (the last two empty without a teacher). ``seed``: [1] int64 on the device."""
    tokens, lq, lp = dispatch.implementation("mixture_sample", backend)(
        hs, ws, bs, ht, wt, bt, seed, alpha=alpha, vocab_size=vocab_size, chunk_size=chunk_size, **_scalings(scaling))
    if lp is None:
        return tokens, lq, lq.new_empty(0), lq.new_empty(0)
    return tokens, lq, lp, _log_mix(lp, lq, alpha)


@_sample_op.register_fake
def _(hs, ws, bs, ht, wt, bt, seed, alpha, scaling, vocab_size, backend, chunk_size):
    n, f = hs.shape[0], out_dtype(hs)
    m = n if ht is not None else 0
    return (hs.new_empty(n, dtype=torch.int64), hs.new_empty(n, dtype=f), hs.new_empty(m, dtype=f),
            hs.new_empty(m, dtype=f))


# ----------------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------------
def _detach(*tensors):
    return tuple(None if t is None else t.detach() for t in tensors)


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _draw_seed(generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """A ``[1]`` int64 seed on ``device`` drawn from ``generator`` (the device's default generator when None)."""
    where = generator.device if generator is not None else device
    seed = torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=where, dtype=torch.int64)
    return seed.to(device)


def _scaling_list(student: Scaling, teacher: Scaling) -> list[float]:
    """The custom ops' flat ``scaling`` argument."""
    return [student.inv_temp, student.softcap, teacher.inv_temp, teacher.softcap]


def _check_alpha(alpha) -> float:
    _check_unit("alpha", alpha)
    return float(alpha)


def rollout_statistics(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                       tokens: Tensor, *, alpha: float = 0.2, temperature: float = 1.0,
                       student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                       vocab_size: Optional[int] = None, softcap: Optional[float] = None,
                       logit_scale: Optional[float] = None, student_softcap: Optional[float] = None,
                       teacher_softcap: Optional[float] = None, student_logit_scale: Optional[float] = None,
                       teacher_logit_scale: Optional[float] = None, backend: str = "auto",
                       chunk_size: Optional[int] = None) -> RolloutStatistics:
    """MiniLLM's per-token rollout statistics for given tokens, in one pass over both models' vocabulary (each
    logits tile computed once), without materialising ``[N, V]`` logits. No gradients.

    With ``q = softmax(softcap_s(a_s (h_s W_s^T + b_s)) / T)`` (student), ``p`` likewise (teacher) and the rollout mixture
    ``m = alpha p + (1 - alpha) q``, equals up to rounding::

        lq, lp = log_softmax(s, -1), log_softmax(t, -1)                     # s, t: the scaled fp32 logits
        student_logprobs = lq.gather(-1, tokens[..., None])[..., 0]         # log q(y)
        teacher_logprobs = lp.gather(-1, tokens[..., None])[..., 0]         # log p(y)
        mixture_logprobs = torch.logaddexp(log(alpha) + teacher_logprobs, log(1 - alpha) + student_logprobs)
        importance_weight = exp(student_logprobs - mixture_logprobs)       # q(y) / m(y)
        reverse_kl = (lq.exp() * (lq - lp)).sum(-1)                         # KL(q || p)

    Args:
        student_hidden: ``[..., Hs]`` the student's final hidden states (float32, bfloat16, float16; float64 on the
            torch and native backends); student_weight ``[V, Hs]`` its lm_head weight.
        teacher_hidden: ``[..., Ht]`` the teacher's, same leading shape; teacher_weight ``[V, Ht]``.
        tokens: ``[...]`` int token ids in ``[0, vocab_size)`` (checked: one host sync, skipped under
            ``torch.compile``).
        alpha: teacher weight of the mixture, in [0, 1].
        temperature, student_bias, teacher_bias, vocab_size, softcap, logit_scale (and their student_ /
            teacher_ forms), backend, chunk_size: as in :func:`minillm_fast.fused_divergence`.

    Returns:
        :class:`RolloutStatistics` of ``[...]`` float32 tensors (float64 for float64 inputs), detached.
    """
    (hs, ws, bs, ht, wt, bt), vocab, lead = check_models(student_hidden, student_weight, teacher_hidden,
                                                          teacher_weight, student_bias, teacher_bias, vocab_size)
    alpha = _check_alpha(alpha)
    temperature = check_positive("temperature", temperature)
    scaling = _scaling_list(*two_model_scalings(temperature, softcap, logit_scale, student_softcap, teacher_softcap,
                                                student_logit_scale, teacher_logit_scale))
    if tokens is None:
        raise TypeError(f"tokens must be a torch.Tensor of token ids with shape {tuple(lead)}, got None")
    y = check_rows("tokens", tokens, lead, hs.device, kind="int")
    check_token_range("tokens", y, vocab)
    name = dispatch.resolve(backend, hs.device)
    chunk = chunk_rows(chunk_size, hs.shape[0], vocab, hs.device, name, hs.dtype)
    with torch.no_grad():
        out = torch.ops.minillm_fast.rollout_statistics(*_detach(hs, ws, bs, ht, wt, bt), y, alpha, scaling, vocab,
                                                        name, chunk)
    return RolloutStatistics(*(x.reshape(lead) for x in out))


def mixture_sample(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor, *,
                   alpha: float = 0.2, temperature: float = 1.0, generator: Optional[torch.Generator] = None,
                   vocab_size: Optional[int] = None, student_bias: Optional[Tensor] = None,
                   teacher_bias: Optional[Tensor] = None, softcap: Optional[float] = None,
                   logit_scale: Optional[float] = None, student_softcap: Optional[float] = None,
                   teacher_softcap: Optional[float] = None, student_logit_scale: Optional[float] = None,
                   teacher_logit_scale: Optional[float] = None, backend: str = "auto",
                   chunk_size: Optional[int] = None) -> MixtureSample:
    """Draw one token per row from MiniLLM's rollout mixture ``alpha p + (1 - alpha) q`` (teacher p weighted by
    alpha, student q), exactly and in one pass over the vocabulary, without materialising ``[N, V]`` logits.

    Per row: the teacher component with probability alpha (else the student), then a draw from that component's
    softmax (Gumbel-max over its scaled logits on triton and torch, inverse CDF on native), while both rows'
    log-sum-exp are streamed; alpha=0 samples the student alone, alpha=1 the teacher alone. In distribution this
    equals::

        probs = alpha * softmax(t, -1) + (1 - alpha) * softmax(s, -1)    # minillm_fast.reference.mixture_probs
        tokens = torch.multinomial(probs, 1)[..., 0]

    Args:
        student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, vocab_size,
            softcap, logit_scale (and their student_ / teacher_ forms), temperature, backend, chunk_size: as in
            :func:`rollout_statistics`.
        alpha: teacher weight of the mixture, in [0, 1] (MiniLLM: 0.2).
        generator: a ``torch.Generator`` (on any device) from which one 64-bit seed is drawn per call; None uses
            the default generator of the hidden states' device. The same generator state gives the same tokens on
            the same backend and device.

    Returns:
        :class:`MixtureSample`: ``tokens`` ``[...]`` int64 and ``student_logprobs`` (log q(y)),
        ``teacher_logprobs`` (log p(y)), ``mixture_logprobs`` (log m(y)) ``[...]`` float32 (float64 for float64
        inputs); ``.importance_weight`` is ``q(y) / m(y)``. No gradients.
    """
    (hs, ws, bs, ht, wt, bt), vocab, lead = check_models(student_hidden, student_weight, teacher_hidden,
                                                          teacher_weight, student_bias, teacher_bias, vocab_size)
    alpha = _check_alpha(alpha)
    temperature = check_positive("temperature", temperature)
    scaling = _scaling_list(*two_model_scalings(temperature, softcap, logit_scale, student_softcap, teacher_softcap,
                                                student_logit_scale, teacher_logit_scale))
    _check_generator(generator)
    name = dispatch.resolve(backend, hs.device)
    chunk = chunk_rows(chunk_size, hs.shape[0], vocab, hs.device, name, hs.dtype)
    seed = _draw_seed(generator, hs.device)
    with torch.no_grad():
        out = torch.ops.minillm_fast.mixture_sample(*_detach(hs, ws, bs, ht, wt, bt), seed, alpha, scaling, vocab,
                                                    name, chunk)
    return MixtureSample(*(x.reshape(lead) for x in out))


def sample_tokens(hidden: Tensor, weight: Tensor, *, temperature: float = 1.0,
                  generator: Optional[torch.Generator] = None, bias: Optional[Tensor] = None,
                  vocab_size: Optional[int] = None, softcap: Optional[float] = None,
                  logit_scale: Optional[float] = None, backend: str = "auto",
                  chunk_size: Optional[int] = None) -> TokenSample:
    """Draw one token per row from ``softmax(softcap(logit_scale (h W^T + b)) / T)`` (Gumbel-max over the vocabulary tiles; inverse
    CDF on native), without materialising ``[N, V]`` logits (:func:`mixture_sample` with one model). In distribution
    the same as ``torch.multinomial(softmax(logits / T), 1)``.

    Args:
        hidden: ``[..., H]``; weight: ``[V, H]``; bias: ``[V]`` or None; the rest as in :func:`mixture_sample`.

    Returns:
        :class:`TokenSample`: ``tokens`` ``[...]`` int64 and their ``logprobs`` ``[...]`` float32 (float64 for float64
        inputs). No gradients.
    """
    (h, w, b), vocab, lead = check_model(hidden, weight, bias, vocab_size)
    scaling = checked(temperature, softcap, logit_scale)
    _check_generator(generator)
    name = dispatch.resolve(backend, h.device)
    chunk = chunk_rows(chunk_size, h.shape[0], vocab, h.device, name, h.dtype)
    seed = _draw_seed(generator, h.device)
    with torch.no_grad():
        tokens, lq, _, _ = torch.ops.minillm_fast.mixture_sample(*_detach(h, w, b), None, None, None, seed, 0.0,
                                                                 _scaling_list(scaling, scaling), vocab, name, chunk)
    return TokenSample(tokens.reshape(lead), lq.reshape(lead))
