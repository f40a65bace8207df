"""Fused token log-probs: the public function, its torch.library custom ops and their autograd formula.

:func:`token_logprobs` checks and flattens the inputs, picks the backend (minillm_fast/dispatch.py) and calls the
custom op ``minillm_fast::token_logprobs_fwd``, which runs the backend's implementation (``triton``: the
vocab-tiled kernels of kernels/token_logprobs.py; ``torch`` and ``native``: token chunks with the full vocabulary,
minillm_fast/backends/) and returns the log-probs, the entropy and the O(N) softmax statistics the backward needs.
Its autograd formula calls ``minillm_fast::token_logprobs_bwd`` with the upstream gradients. The fake
implementations let ``torch.compile`` trace through both.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import dispatch
from ..checks import check_model, check_rows, check_token_range
from ..chunked import chunk_rows, out_dtype
from ..scaling import Scaling, checked


# ----------------------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("minillm_fast::token_logprobs_fwd", mutates_args=())
def _fwd_op(h: Tensor, w: Tensor, b: Optional[Tensor], targets: Tensor, inv_temp: float, softcap: float,
            vocab_size: int, ignore_index: int, entropy: bool, backend: str, chunk_size: int
            ) -> tuple[Tensor, Tensor, Tensor]:
    """``logprob [N]`` and ``entropy [N]`` (0 on ignored rows; entropy empty unless asked) and the softmax
    statistics ``[N, 2]`` (row max M and ``log sum e^(s - M)``; lse is their sum)."""
    logprob, stats, ent = dispatch.implementation("token_logprobs_fwd", backend)(
        h, w, b, targets, scaling=Scaling(inv_temp, softcap), vocab_size=vocab_size, entropy=entropy,
        chunk_size=chunk_size)
    keep = targets != ignore_index
    logprob = torch.where(keep, logprob, torch.zeros_like(logprob))
    ent = torch.where(keep, ent, torch.zeros_like(ent)) if entropy else logprob.new_empty(0)
    return logprob, ent, stats


@_fwd_op.register_fake
def _(h, w, b, targets, inv_temp, softcap, vocab_size, ignore_index, entropy, backend, chunk_size):
    n, f = h.shape[0], out_dtype(h)
    return h.new_empty(n, dtype=f), h.new_empty(n if entropy else 0, dtype=f), h.new_empty(n, 2, dtype=f)


@torch.library.custom_op("minillm_fast::token_logprobs_bwd", mutates_args=())
def _bwd_op(h: Tensor, w: Tensor, b: Optional[Tensor], targets: Tensor, stats: Tensor, ent: Optional[Tensor],
            g_lp: Tensor, g_ent: Optional[Tensor], inv_temp: float, softcap: float, vocab_size: int,
            ignore_index: int, backend: str, chunk_size: int, grads: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum(g_lp * logprob + g_ent * entropy)`` w.r.t. h, w, b where ``grads`` asks (empty elsewhere).

    ``ent`` and ``g_ent`` come together or not at all (None: the entropy has no gradient)."""
    keep = targets != ignore_index
    g_lp = torch.where(keep, g_lp, torch.zeros_like(g_lp))
    if g_ent is not None:
        g_ent = torch.where(keep, g_ent, torch.zeros_like(g_ent))
    needs = (grads[0], grads[1], grads[2] and b is not None)
    g = dispatch.implementation("token_logprobs_bwd", backend)(
        h, w, b, targets, stats, ent, g_lp, g_ent, scaling=Scaling(inv_temp, softcap), vocab_size=vocab_size,
        needs=needs, chunk_size=chunk_size)
    return tuple(h.new_empty(0) if x is None else x for x in g)


@_bwd_op.register_fake
def _(h, w, b, targets, stats, ent, g_lp, g_ent, inv_temp, softcap, vocab_size, ignore_index, backend, chunk_size,
      grads):
    return tuple(torch.empty_like(x) if need and x is not None else h.new_empty(0) for need, x in zip(grads, (h, w, b)))


# ----------------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    h, w, b, targets, inv_temp, softcap, vocab_size, ignore_index, entropy, backend, chunk_size = inputs
    _, ent, stats = output
    ctx.mark_non_differentiable(stats)
    if not entropy:
        ctx.mark_non_differentiable(ent)
    ctx.set_materialize_grads(False)
    ctx.entropy = entropy
    ctx.op_args = (inv_temp, softcap, vocab_size, ignore_index, backend, chunk_size)
    ctx.save_for_backward(h, w, b, targets, stats, ent if entropy else None)


def _backward(ctx, g_lp, g_ent, _):
    h, w, b, targets, stats, ent = ctx.saved_tensors
    needs = tuple(bool(x) for x in ctx.needs_input_grad[:3])
    with_ent = ctx.entropy and g_ent is not None
    if not any(needs) or (g_lp is None and not with_ent):
        return (None,) * 11
    if g_lp is None:
        g_lp = stats.new_zeros(stats.shape[0])
    g = torch.ops.minillm_fast.token_logprobs_bwd(h, w, b, targets, stats, ent if with_ent else None, g_lp,
                                                  g_ent if with_ent else None, *ctx.op_args, list(needs))
    return (*(x if need else None for x, need in zip(g, needs)),) + (None,) * 8


torch.library.register_autograd("minillm_fast::token_logprobs_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------------
def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, temperature: float = 1.0,
                   bias: Optional[Tensor] = None, vocab_size: Optional[int] = None, softcap: Optional[float] = None,
                   logit_scale: Optional[float] = None, ignore_index: int = -100, return_entropy: bool = False,
                   backend: str = "auto", chunk_size: Optional[int] = None):
    """Log-probability of each target token under ``softmax(softcap(logit_scale (h W^T + b)) / T)``, from hidden
    states and the lm_head weight, without materialising the ``[N, V]`` logits.

    Equals, up to rounding::

        lq = torch.log_softmax((hidden @ weight.T).float() / T, -1)
        out = lq.gather(-1, targets[..., None])[..., 0]            # 0 where targets == ignore_index
        entropy = -(lq.exp() * lq).sum(-1)                          # with return_entropy

    The gradient ``(onehot(y) - q) / T`` (times the softcap's derivative) is streamed through the vocabulary tiles
    (triton) or token chunks (torch, native); with ``return_entropy`` the entropy is differentiable too
    (``dH/ds = -q (log q + H)``). Used for the PPO ratios of MiniLLM's long-term term (``log q(y_t)``) and for the
    per-token entropy.

    Args:
        hidden: ``[..., H]`` final hidden states (float32, bfloat16, float16; float64 on the torch and native
            backends).
        weight: ``[V, H]`` the lm_head weight, same dtype.
        targets: ``[...]`` int token ids in ``[0, vocab_size)``, or ``ignore_index`` (those rows give 0, no gradient).
            Ids outside the vocabulary (including padded head rows ``>= vocab_size``) raise ValueError; the check
            reads the targets (one host sync per call; skipped under ``torch.compile``).
        temperature: > 0, divides the logits.
        bias: ``[V]`` lm_head bias or None.
        vocab_size: real vocabulary when the head is padded: rows ``>= vocab_size`` are excluded from the softmax.
        softcap: Gemma-style ``softcap * tanh(x / softcap)``, after the logit scale and before the temperature.
        logit_scale: a multiplier on the raw logits, applied first (a model's own scaling: Cohere's
            ``logit_scale``, Granite's ``1 / logits_scaling``); > 0.
        ignore_index: target value of skipped rows.
        return_entropy: also return the per-token entropy of the distribution (0 on ignored rows).
        backend: ``auto`` | ``triton`` | ``native`` | ``torch`` (see minillm_fast/dispatch.py).
        chunk_size: rows per chunk of the torch and native backends (default: as many as fit
            MINILLM_FAST_CHUNK_BYTES).

    Returns:
        ``[...]`` float32 log-probs (float64 for float64 inputs), or the pair ``(logprobs, entropy)``. Gradients
        reach hidden, weight and bias.
    """
    (h, w, b), vocab, lead = check_model(hidden, weight, bias, vocab_size)
    scaling = checked(temperature, softcap, logit_scale)
    if targets is None:
        raise TypeError(f"targets must be a torch.Tensor of token ids with shape {tuple(lead)}, got None")
    y = check_rows("targets", targets, lead, h.device, kind="int")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    check_token_range("targets", y, vocab, ignore_index)
    name = dispatch.resolve(backend, h.device)
    grad_w = w[:vocab].numel() * 4 if w.requires_grad else 0
    chunk = chunk_rows(chunk_size, h.shape[0], vocab, h.device, name, h.dtype, head_grad_bytes=grad_w)

    logprob, ent, _ = torch.ops.minillm_fast.token_logprobs_fwd(h, w, b, y, scaling.inv_temp, scaling.softcap, vocab,
                                                                ignore_index, bool(return_entropy), name, chunk)
    if return_entropy:
        return logprob.reshape(lead), ent.reshape(lead)
    return logprob.reshape(lead)
