"""Fused token log-probs: public function, autograd Function, torch.library ops, the chunked torch and native backends.

Layers, top-down: :func:`token_logprobs` checks and flattens the inputs; ``_TokenLogprobsFunction`` saves the O(N)
row statistics (softmax max and log-sum, entropy) and calls the backward op with the upstream gradients; the two
``torch.library`` custom ops ``minillm_fast::token_logprobs_fwd`` and ``..._bwd`` dispatch to a backend (``triton``:
the vocab-tiled kernels of kernels/token_logprobs.py; ``torch``: token chunks with the full vocabulary, below;
``native``: the same token chunks, each chunk's row work done by one vectorised, multi-threaded C++ pass of
csrc/token_stats_cpu.cpp), and their fake implementations let ``torch.compile`` trace through them.

The helpers here (``resolve_backend``, ``scaled_logits``, ``chunk_rows``, ``check_token_range``)
are shared with the rollout ops of minillm_fast/ops/sampling.py.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import backends, native
from ..checks import check_bias, check_hidden, check_rows, check_weight, resolve_vocab
from ..chunked import ChunkLogits, _chunk_logits, _HeadGrads
from ..scaling import Scaling, checked
from .fused_divergence import default_chunk_rows


# Backends that implement the ops of this file and of ops/sampling.py.
SUPPORTED_BACKENDS = ("triton", "native", "torch")
# The ops that ``backend="auto"`` runs on native where it picks native (CPU tensors): those measured faster there
# than on torch. All four are (bench/, fp32, 2 threads, AMD EPYC; ms native / torch): at N=64, H=768, V=50304
# mixture_sample 115 / 212, sample_tokens 62 / 103, rollout_statistics 108 / 198, token_logprobs forward+backward
# 222 / 327; at N=512, Hs=768, Ht=1024 712 / 1438, 304 / 721, 705 / 1262, 1089 / 1430 (README, Performance). An op
# left out of this set runs on torch under auto; backend="native" or MINILLM_FAST_BACKEND=native runs it on native.
NATIVE_AUTO_OPS = frozenset({"token_logprobs", "rollout_statistics", "mixture_sample", "sample_tokens"})


# ----------------------------------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------------------------------
def _chosen_automatically(backend: str) -> bool:
    """Whether ``backend`` leaves the choice to :func:`minillm_fast.backends.resolve` (no argument, no environment)."""
    return backend == "auto" and os.environ.get(backends.ENV_VAR, "auto").strip().lower() in ("", "auto")


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """:func:`minillm_fast.backends.resolve`, restricted to SUPPORTED_BACKENDS; where it picks native on its own,
    ``op`` runs there only if it is in NATIVE_AUTO_OPS (else on torch)."""
    name = backends.resolve(backend, device)
    if name not in SUPPORTED_BACKENDS:
        if backend == name:  # asked for by name
            raise RuntimeError(f"backend={backend!r} does not implement {op} yet; use one of {SUPPORTED_BACKENDS}")
        return "torch"
    if name == "native" and op not in NATIVE_AUTO_OPS and _chosen_automatically(backend):
        return "torch"
    return name


@functools.lru_cache(maxsize=None)
def triton_module(name: str):
    """``minillm_fast.kernels.<name>``, imported on first use (raises backends' clear error without Triton)."""
    backends.triton_kernels()
    return importlib.import_module(f"minillm_fast.kernels.{name}")


def out_dtype(h: Tensor) -> torch.dtype:
    """Per-token outputs are float32, float64 for float64 inputs (torch and native backends)."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def scaled_logits(h: Tensor, w: Tensor, b: Optional[Tensor], vocab_size: int, scaling: Scaling):
    """``[C, V]`` logits ``softcap(a (h W[:V]^T + b[:V])) / T`` of the model's ``scaling`` in fp32 (fp64 for fp64
    inputs), and the softcap's tanh (None without a softcap; the derivative is ``inv_temp (1 - tanh^2)``)."""
    return scaling.apply(_chunk_logits(h, w[:vocab_size], None if b is None else b[:vocab_size]))


def chunk_rows(chunk_size, n: int, vocab: int, device: torch.device, backend: str,
               dtype: torch.dtype = torch.float32, head_grad_bytes: int = 0) -> int:
    """Rows per chunk of the torch and native backends: ``chunk_size``, or what
    :func:`minillm_fast.ops.fused_divergence.default_chunk_rows` makes of the chunk budget for inputs of ``dtype``
    (``head_grad_bytes``: the fp32 head gradient the chunks will accumulate into, 0 without one)."""
    if chunk_size is None:
        return default_chunk_rows(n, vocab, device, backend, dtype, head_grad_bytes=head_grad_bytes)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
    return chunk_size


def check_token_range(name: str, tokens: Tensor, vocab_size: int, ignore_index: Optional[int] = None) -> None:
    """Raise ValueError when a token (other than ``ignore_index``) is outside ``[0, vocab_size)``.

    This reads the values, so it synchronises with the device once per call; it is skipped while ``torch.compile``
    traces (the kernels never index memory with a token, so a bad one gives a wrong value, never a bad access).
    """
    if torch.compiler.is_compiling():
        return
    bad = (tokens < 0) | (tokens >= vocab_size)
    if ignore_index is not None:
        bad &= tokens != ignore_index
    if bool(bad.any()):
        values = tokens[bad]
        skip = "" if ignore_index is None else f" (or equal ignore_index={ignore_index})"
        raise ValueError(
            f"{name} has {values.numel()} value(s) outside [0, vocab_size={vocab_size}), first {values[0].item()}; "
            f"every {name} entry must be a token id of the real vocabulary{skip}; rows >= vocab_size are padding"
        )


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# ----------------------------------------------------------------------------------------------------------------------
# torch backend (token chunks, memory O(chunk x V))
# ----------------------------------------------------------------------------------------------------------------------
def _torch_fwd(h, w, b, y, *, scaling, vocab_size, entropy, chunk_size):
    n, f = h.shape[0], out_dtype(h)
    logprob = torch.empty(n, dtype=f, device=h.device)
    stats = torch.empty(n, 2, dtype=f, device=h.device)  # row max M, log sum e^(s - M)
    ent = torch.empty(n, dtype=f, device=h.device) if entropy else None
    y = y.clamp(0, vocab_size - 1).unsqueeze(1)  # ignored rows pick any entry; the caller zeroes them
    for rows in _chunks(n, chunk_size):
        s, _ = scaled_logits(h[rows], w, b, vocab_size, scaling)
        big = s.amax(-1, keepdim=True)
        s.sub_(big)  # shifted first, as log_softmax does: s - lse would round at lse's magnitude
        log_l = torch.logsumexp(s, -1, keepdim=True)
        stats[rows] = torch.cat([big, log_l], 1)
        logprob[rows] = (s.gather(1, y[rows]) - log_l).squeeze(1)
        if entropy:
            lq = s.sub_(log_l)
            ent[rows] = -(lq.exp().mul_(lq)).sum(-1)
    return logprob, stats, ent


def _torch_bwd(h, w, b, y, stats, ent, g_lp, g_ent, *, scaling, vocab_size, needs, chunk_size):
    heads = _HeadGrads(h, w, b, needs, vocab_size)
    y = y.clamp(0, vocab_size - 1).unsqueeze(1)
    for rows in _chunks(h.shape[0], chunk_size):
        s, cap = scaled_logits(h[rows], w, b, vocab_size, scaling)
        lq = s.sub_(stats[rows, :1]).sub_(stats[rows, 1:])
        q = lq.exp()
        a = g_lp[rows].unsqueeze(1).to(q.dtype)
        g = (q * -a).scatter_add_(1, y[rows], a)  # a (onehot(y) - q)
        if g_ent is not None:  # - e q (lq + H)
            g -= q.mul_(lq.add_(ent[rows].unsqueeze(1))).mul_(g_ent[rows].unsqueeze(1).to(q.dtype))
        g.mul_(scaling.inv_temp)
        if cap is not None:
            g.mul_(1 - cap * cap)
        heads.add(rows, g)
    return heads.result()


# ----------------------------------------------------------------------------------------------------------------------
# native backend (token chunks; the row work of a chunk in C++, csrc/token_stats_cpu.cpp)
# ----------------------------------------------------------------------------------------------------------------------
def _native_fwd(h, w, b, y, *, scaling, vocab_size, entropy, chunk_size):
    kernels = native.ops()
    n, f = h.shape[0], out_dtype(h)
    logprob = torch.empty(n, dtype=f, device=h.device)
    stats = torch.empty(n, 2, dtype=f, device=h.device)  # row max M, log sum e^(s - M)
    ent = torch.empty(n, dtype=f, device=h.device) if entropy else None
    y = y.long()
    logits = ChunkLogits(w, b, vocab_size, min(chunk_size, n), f)
    for rows in _chunks(n, chunk_size):
        lp_c, st_c, ent_c = kernels.token_logprobs_fwd_rows(logits(h[rows]), y[rows], scaling.temperature,
                                                            scaling.softcap, entropy)
        logprob[rows] = lp_c
        stats[rows] = st_c
        if entropy:
            ent[rows] = ent_c
    return logprob, stats, ent


def _native_bwd(h, w, b, y, stats, ent, g_lp, g_ent, *, scaling, vocab_size, needs, chunk_size):
    kernels = native.ops()
    n, f = h.shape[0], out_dtype(h)
    heads = _HeadGrads(h, w, b, needs, vocab_size)
    y, stats, g_lp = y.long(), stats.to(f), g_lp.to(f)
    if g_ent is not None:
        ent, g_ent = ent.to(f), g_ent.to(f)
    logits = ChunkLogits(w, b, vocab_size, min(chunk_size, n), f)
    for rows in _chunks(n, chunk_size):
        g = logits(h[rows])  # overwritten with dL/dz
        kernels.token_logprobs_bwd_rows(g, y[rows], stats[rows], None if g_ent is None else ent[rows], g_lp[rows],
                                        None if g_ent is None else g_ent[rows], scaling.temperature, scaling.softcap)
        heads.add(rows, g)
    return heads.result()


# ----------------------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("minillm_fast::token_logprobs_fwd", mutates_args=())
def _fwd_op(h: Tensor, w: Tensor, b: Optional[Tensor], targets: Tensor, inv_temp: float, softcap: float,
            vocab_size: int, ignore_index: int, entropy: bool, backend: str, chunk_size: int
            ) -> tuple[Tensor, Tensor, Tensor]:
    """``logprob [N]`` and ``entropy [N]`` (0 on ignored rows; entropy empty unless asked) and the softmax
    statistics ``[N, 2]`` (row max M and ``log sum e^(s - M)``; lse is their sum)."""
    opts = dict(scaling=Scaling(inv_temp, softcap), vocab_size=vocab_size)
    if backend == "triton":
        logprob, stats, ent = triton_module("token_logprobs").token_logprobs_fwd(
            h, w, b, targets, entropy=entropy, inv_temp=inv_temp, softcap=softcap, vocab_size=vocab_size)
    elif backend == "native":
        logprob, stats, ent = _native_fwd(h, w, b, targets, entropy=entropy, chunk_size=chunk_size, **opts)
    else:
        logprob, stats, ent = _torch_fwd(h, w, b, targets, entropy=entropy, chunk_size=chunk_size, **opts)
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
    needs = tuple(grads)
    opts = dict(scaling=Scaling(inv_temp, softcap), vocab_size=vocab_size, needs=needs)
    if backend == "triton":
        g = triton_module("token_logprobs").token_logprobs_bwd(h, w, b, targets, stats, ent, g_lp, g_ent,
                                                               inv_temp=inv_temp, softcap=softcap,
                                                               vocab_size=vocab_size, needs=needs)
    elif backend == "native":
        g = _native_bwd(h, w, b, targets, stats, ent, g_lp, g_ent, chunk_size=chunk_size, **opts)
    else:
        g = _torch_bwd(h, w, b, targets, stats, ent, g_lp, g_ent, chunk_size=chunk_size, **opts)
    return tuple(h.new_empty(0) if x is None else x for x in g)


@_bwd_op.register_fake
def _(h, w, b, targets, stats, ent, g_lp, g_ent, inv_temp, softcap, vocab_size, ignore_index, backend, chunk_size,
      grads):
    return tuple(torch.empty_like(x) if need and x is not None else h.new_empty(0) for need, x in zip(grads, (h, w, b)))


# ----------------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------------
class _TokenLogprobsFunction(torch.autograd.Function):
    """Outputs ``(logprob [N], entropy [N] or [0])``; ignored rows are 0 and pass no gradient."""

    @staticmethod
    def forward(ctx, h, w, b, targets, params: tuple):
        inv_temp, softcap, vocab_size, ignore_index, entropy, backend, chunk_size = params
        logprob, ent, stats = torch.ops.minillm_fast.token_logprobs_fwd(
            h, w, b, targets, inv_temp, softcap, vocab_size, ignore_index, entropy, backend, chunk_size)
        ctx.params = params
        ctx.set_materialize_grads(False)
        if not entropy:
            ctx.mark_non_differentiable(ent)
        ctx.save_for_backward(h, w, b, targets, stats, ent if entropy else None)
        return logprob, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent):
        h, w, b, targets, stats, ent = ctx.saved_tensors
        inv_temp, softcap, vocab_size, ignore_index, entropy, backend, chunk_size = ctx.params
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        with_ent = entropy and g_ent is not None
        if not any(needs) or (g_lp is None and not with_ent):
            return None, None, None, None, None
        if g_lp is None:
            g_lp = stats.new_zeros(stats.shape[0])
        g = torch.ops.minillm_fast.token_logprobs_bwd(
            h, w, b, targets, stats, ent if with_ent else None, g_lp, g_ent if with_ent else None, inv_temp,
            softcap, vocab_size, ignore_index, backend, chunk_size, list(needs))
        return (*(x if need else None for x, need in zip(g, needs)), None, None)


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
        backend: ``auto`` | ``triton`` | ``native`` | ``torch`` (see minillm_fast/backends.py).
        chunk_size: rows per chunk of the torch and native backends (default: as many as fit
            MINILLM_FAST_CHUNK_BYTES).

    Returns:
        ``[...]`` float32 log-probs (float64 for float64 inputs), or the pair ``(logprobs, entropy)``. Gradients
        reach hidden, weight and bias.
    """
    h = check_hidden("hidden", hidden)
    w = check_weight("weight", weight, h, "hidden")
    b = check_bias("bias", bias, w, "weight")
    scaling = checked(temperature, softcap, logit_scale)
    vocab = resolve_vocab(vocab_size, ("weight", w))
    lead = hidden.shape[:-1]
    if targets is None:
        raise TypeError(f"targets must be a torch.Tensor of token ids with shape {tuple(lead)}, got None")
    y = check_rows("targets", targets, lead, h.device, kind="int")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    check_token_range("targets", y, vocab, ignore_index)
    name = resolve_backend(backend, h.device, "token_logprobs")
    grad_w = w[:vocab].numel() * 4 if w.requires_grad else 0
    chunk = chunk_rows(chunk_size, h.shape[0], vocab, h.device, name, h.dtype, head_grad_bytes=grad_w)

    params = (scaling.inv_temp, scaling.softcap, vocab, ignore_index, bool(return_entropy), name, chunk)
    logprob, ent = _TokenLogprobsFunction.apply(h, w, b, y, params)
    if return_entropy:
        return logprob.reshape(lead), ent.reshape(lead)
    return logprob.reshape(lead)
