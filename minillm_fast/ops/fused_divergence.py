"""The fused linear divergence: public function, nn.Module, autograd Function and torch.library ops.

Layers, top-down: :func:`fused_divergence` checks and flattens the inputs and turns labels / mask / token weights
into one per-row scale; ``_FusedDivergenceFunction`` decides whether gradients are made in the forward (chunked
strategy, scalar output) or the backward; the two ``torch.library`` custom ops ``minillm_fast::fused_divergence_fwd``
and ``..._bwd`` dispatch to a backend, and their fake implementations let ``torch.compile`` trace through them.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .. import backends, chunked, divergences
from ..checks import check_models, check_positive, check_reduction, check_rows
from ..chunked import DivergenceConfig
from ..divergences import Divergence
from ..scaling import Scaling, two_model_scalings

STRATEGIES = ("auto", "chunked", "tiled")
# Bytes of chunk temporaries the chunked strategy may hold (MINILLM_FAST_CHUNK_BYTES overrides).
DEFAULT_CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 1 << 30}
# [C, V] temporaries (fp32, fp64 for fp64 inputs) alive at once per chunk row: the torch rows function keeps about a
# dozen; the Triton row kernel and the native rows function work in place on the two logits buffers, which
# chunked.run allocates once for fp32/fp64 inputs; half-precision inputs add the matmul's output and its cast.
_TEMPS_PER_ROW = {"torch": 12, "triton": 2, "native": 2}
_CAST_TEMPS = 2


def default_chunk_rows(n_rows: int, vocab: int, device: torch.device, backend: str,
                       dtype: torch.dtype = torch.float32, head_grad_bytes: int = 0) -> int:
    """Rows per chunk so that the chunk temporaries fit MINILLM_FAST_CHUNK_BYTES when set, else the larger of
    DEFAULT_CHUNK_BYTES and ``head_grad_bytes`` (the size of the fp32 head gradient the chunks accumulate into).

    Why the second term: every chunk reads and writes the whole ``[V, H]`` head gradient once (its ``addmm_``), so
    chunks whose logits are much smaller than that gradient spend their time streaming it. Logits about as large as
    the gradient keep that traffic a small part of the chunk's matmuls, for at most the memory of the gradient the
    caller holds anyway (measured on CPU at N=512, H=1024/2048, V=128256: 128 MiB chunks 1.33x the floor, 1.27x
    for Liger's chunked loss; chunks of the 512 MiB gradient's size are faster, see bench/README.md)."""
    env = os.environ.get("MINILLM_FAST_CHUNK_BYTES")
    budget = int(env) if env else max(DEFAULT_CHUNK_BYTES.get(device.type, 1 << 30), head_grad_bytes)
    full = dtype in (torch.float32, torch.float64)
    temps = _TEMPS_PER_ROW.get(backend, 12) + (0 if full else _CAST_TEMPS)
    per_row = vocab * (8 if dtype == torch.float64 else 4) * temps
    return max(1, min(n_rows, budget // per_row))


def _config(kind: int, weight: float, scaling: list[float], vocab_size: int) -> DivergenceConfig:
    """The config from the custom ops' flat arguments; ``scaling`` = [inv_temp_s, softcap_s, inv_temp_t, softcap_t]."""
    it_s, cap_s, it_t, cap_t = scaling
    return DivergenceConfig(Divergence(kind, weight), Scaling(it_s, cap_s), Scaling(it_t, cap_t), vocab_size)


def _rows_fn(backend: str):
    if backend == "native":
        from .. import native

        return native.native_rows
    return chunked.torch_rows if backend == "torch" else chunked.triton_rows


def _empty_if_none(grads, like: Tensor):
    return tuple(like.new_empty(0) if g is None else g for g in grads)


# ----------------------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("minillm_fast::fused_divergence_fwd", mutates_args=())
def _fwd_op(hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Tensor, wt: Tensor, bt: Optional[Tensor],
            row_scale: Tensor, kind: int, weight: float, scaling: list[float], vocab_size: int,
            backend: str, strategy: str, chunk_size: int, grads: list[bool]
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row loss [N], stats [N, 6] and, where ``grads`` asks, the gradients of sum(row_scale * loss)."""
    cfg = _config(kind, weight, scaling, vocab_size)
    needs = tuple(grads)
    if strategy == "tiled":
        k = backends.triton_kernels()
        loss, stats = k.fused_divergence_fwd(hs, ws, bs, ht, wt, bt, vocab_size=vocab_size, **cfg.triton_args)
        g = (None,) * 6
        if any(needs):
            g = k.fused_divergence_bwd(hs, ws, bs, ht, wt, bt, stats, row_scale, vocab_size=vocab_size,
                                       needs=needs, **cfg.triton_args)
    else:
        loss, stats, g = chunked.run(hs, ws, bs, ht, wt, bt, cfg, rows_fn=_rows_fn(backend), chunk_size=chunk_size,
                                     row_grad=row_scale if any(needs) else None, needs=needs)
    return (loss, stats, *_empty_if_none(g, hs))


@_fwd_op.register_fake
def _(hs, ws, bs, ht, wt, bt, row_scale, kind, weight, scaling, vocab_size, backend, strategy, chunk_size, grads):
    f = torch.float64 if hs.dtype == torch.float64 else torch.float32
    n = hs.shape[0]
    return (hs.new_empty(n, dtype=f), hs.new_empty(n, 6, dtype=f), *_fake_grads(hs, ws, bs, ht, wt, bt, grads))


def _fake_grads(hs, ws, bs, ht, wt, bt, grads):
    """Gradients are contiguous whatever the inputs' strides (a transposed head gives a row-major gradient)."""
    like = (hs, ws, bs, ht, wt, bt)
    return tuple(x.new_empty(x.shape) if need and x is not None else hs.new_empty(0) for need, x in zip(grads, like))


@torch.library.custom_op("minillm_fast::fused_divergence_bwd", mutates_args=())
def _bwd_op(hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Tensor, wt: Tensor, bt: Optional[Tensor],
            stats: Tensor, row_grad: Tensor, kind: int, weight: float, scaling: list[float], vocab_size: int,
            backend: str, strategy: str, chunk_size: int, grads: list[bool]
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of sum(row_grad * loss) with respect to the six inputs that ``grads`` names (empty elsewhere)."""
    cfg = _config(kind, weight, scaling, vocab_size)
    needs = tuple(grads)
    if strategy == "tiled":
        g = backends.triton_kernels().fused_divergence_bwd(hs, ws, bs, ht, wt, bt, stats, row_grad,
                                                           vocab_size=vocab_size, needs=needs, **cfg.triton_args)
    else:
        _, _, g = chunked.run(hs, ws, bs, ht, wt, bt, cfg, rows_fn=_rows_fn(backend), chunk_size=chunk_size,
                              row_grad=row_grad, needs=needs, want_loss=False)
    return _empty_if_none(g, hs)


@_bwd_op.register_fake
def _(hs, ws, bs, ht, wt, bt, stats, row_grad, kind, weight, scaling, vocab_size, backend, strategy, chunk_size,
      grads):
    return _fake_grads(hs, ws, bs, ht, wt, bt, grads)


# ----------------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------------
class _FusedDivergenceFunction(torch.autograd.Function):
    """Output: ``sum_i row_scale_i L_i`` (reduce) or ``row_scale_i L_i`` per row; rows with scale 0 give exactly 0."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, row_scale, reduce: bool, params: tuple):
        kind, weight, scaling, vocab_size, backend, strategy, chunk_size = params
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:6])
        # With a scalar output the upstream gradient is one number: make the gradients now, in the same sweep as
        # the loss, and only scale them in backward (4 matmuls instead of 6).
        precompute = reduce and strategy == "chunked" and any(needs)
        loss, stats, *g = torch.ops.minillm_fast.fused_divergence_fwd(
            hs, ws, bs, ht, wt, bt, row_scale, kind, weight, scaling, vocab_size, backend, strategy,
            chunk_size, list(needs) if precompute else [False] * 6)
        per_row = torch.where(row_scale != 0, loss * row_scale.to(loss.dtype), torch.zeros_like(loss))
        ctx.precomputed, ctx.needs, ctx.reduce, ctx.params = precompute, needs, reduce, params
        if precompute:
            ctx.save_for_backward(*(x if need else None for x, need in zip(g, needs)))
        else:
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, stats, row_scale)
        return per_row.sum() if reduce else per_row

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.precomputed:
            # The buffers are ours alone: scale in place (a second backward through a retained graph is refused by
            # autograd's saved-tensor version check rather than silently doubled).
            grads = tuple(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in ctx.saved_tensors)
        else:
            hs, ws, bs, ht, wt, bt, stats, row_scale = ctx.saved_tensors
            kind, weight, scaling, vocab_size, backend, strategy, chunk_size = ctx.params
            row_grad = row_scale * grad_out
            g = torch.ops.minillm_fast.fused_divergence_bwd(
                hs, ws, bs, ht, wt, bt, stats, row_grad, kind, weight, scaling, vocab_size, backend,
                strategy, chunk_size, list(ctx.needs))
            grads = tuple(x if need else None for x, need in zip(g, ctx.needs))
        return (*grads, None, None, None)


# ----------------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------------
def row_scale(lead_shape, device, *, labels=None, ignore_index=-100, mask=None, token_weights=None,
              reduction="mean", dtype=torch.float32) -> Tensor:
    """``[N]`` per-row factor (float32; float64 for float64 inputs): 0 for ignored rows, the token weight (1 by default) for kept rows, divided by
    the number of kept rows for ``mean`` (no host sync: an all-ignored batch gives all zeros)."""
    labels = check_rows("labels", labels, lead_shape, device, kind="int")
    mask = check_rows("mask", mask, lead_shape, device, kind="bool")
    token_weights = check_rows("token_weights", token_weights, lead_shape, device, kind="float")
    n = lead_shape.numel()
    keep = torch.ones(n, dtype=torch.bool, device=device)
    if labels is not None:
        keep &= labels != ignore_index
    if mask is not None:
        keep &= mask != 0
    scale = keep.to(dtype)
    if token_weights is not None:
        scale = scale * token_weights.detach().to(dtype)
    if reduction == "mean":
        scale = scale / keep.sum().clamp(min=1)
    return scale


def fused_divergence(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                     *, divergence: str = "reverse_kl", labels: Optional[Tensor] = None, ignore_index: int = -100,
                     mask: Optional[Tensor] = None, token_weights: Optional[Tensor] = None,
                     temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1, reduction: str = "mean",
                     student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                     vocab_size: Optional[int] = None, softcap: Optional[float] = None,
                     logit_scale: Optional[float] = None, student_softcap: Optional[float] = None,
                     teacher_softcap: Optional[float] = None, student_logit_scale: Optional[float] = None,
                     teacher_logit_scale: Optional[float] = None, backend: str = "auto",
                     strategy: str = "auto", chunk_size: Optional[int] = None) -> Tensor:
    """Divergence between a student's and a teacher's next-token distributions, from hidden states and lm_head
    weights, without materialising the ``[N, V]`` logits.

    Per token, with ``q = softmax(softcap_s(a_s (h_s W_s^T + b_s)) / T)`` (student) and ``p = softmax(softcap_t(a_t
    (h_t W_t^T + b_t)) / T)`` (teacher), ``a`` each model's logit scale, the loss is ``L = sum_v phi(p_v, q_v)`` for the chosen divergence
    (minillm_fast/divergences.py has the table): ``reverse_kl`` = KL(q || p) (MiniLLM), ``forward_kl`` =
    KL(p || q), ``jsd`` (``beta`` weights the teacher in the mixture; beta=0 / 1 give forward / reverse KL as in
    Liger-Kernel), ``tvd``, ``skew_forward_kl`` = KL(p || skew p + (1-skew) q) and ``skew_reverse_kl`` =
    KL(q || skew q + (1-skew) p) (DistiLLM). For the reverse KL this equals, up to rounding::

        s = (student_hidden @ student_weight.T).float() / T
        t = (teacher_hidden @ teacher_weight.T).float() / T
        per_token = (s.softmax(-1) * (s.log_softmax(-1) - t.log_softmax(-1))).sum(-1)

    then weighted, masked and reduced as below.

    Args:
        student_hidden: ``[..., Hs]`` final hidden states of the student (float32, bfloat16, float16; float64 on
            the torch backend).
        student_weight: ``[V, Hs]`` the student's lm_head weight, same dtype as student_hidden.
        teacher_hidden: ``[..., Ht]`` the teacher's, same leading shape (Ht may differ from Hs).
        teacher_weight: ``[V, Ht]`` the teacher's lm_head weight.
        labels: ``[...]`` int; rows equal to ``ignore_index`` are skipped (the labels are not otherwise used).
        mask: ``[...]`` bool; False rows are skipped.
        token_weights: ``[...]`` float, multiplies each row's divergence (detached); MiniLLM's weighted
            single-step term is ``fused_reverse_kl(..., token_weights=w_t)``.
        temperature: > 0, divides both models' logits.
        reduction: ``mean`` over kept rows (0 when none is kept), ``sum``, or ``none`` (``[...]``, 0 on skipped rows).
        student_bias, teacher_bias: ``[V]`` lm_head biases or None.
        vocab_size: real vocabulary when heads are padded: rows ``>= vocab_size`` are excluded from both softmaxes.
            Heads with different row counts need it.
        softcap: Gemma-style ``softcap * tanh(x / softcap)`` on both models' logits, after the logit scale and before
            the temperature; ``student_softcap`` / ``teacher_softcap`` give each model its own (not with
            ``softcap``).
        logit_scale: a multiplier on both models' raw logits, applied first (Cohere's ``logit_scale``, Granite's
            ``1 / logits_scaling``); ``student_logit_scale`` / ``teacher_logit_scale`` per model. > 0.
        backend: ``auto`` | ``triton`` | ``torch`` | ``native`` (see minillm_fast/backends.py).
        strategy: ``chunked`` (token chunks with the full vocabulary; gradients made in the forward when the output
            is a scalar: the 4-matmul floor), ``tiled`` (vocabulary tiles, O(N) memory, triton only; backward
            recomputes the logits tiles), or ``auto`` (chunked).
        chunk_size: rows per chunk for the chunked strategy (default: as many as fit MINILLM_FAST_CHUNK_BYTES).

    Returns:
        float32 scalar (``mean``/``sum``) or ``[...]`` float32 (``none``); float64 for float64 inputs. Gradients
        reach the student's hidden states, weight and bias, and the teacher's too where those require grad.
    """
    div = divergences.resolve(divergence, beta, skew)
    (hs, ws, bs, ht, wt, bt), vocab, lead = check_models(student_hidden, student_weight, teacher_hidden,
                                                         teacher_weight, student_bias, teacher_bias, vocab_size)
    temperature = check_positive("temperature", temperature)
    student, teacher = two_model_scalings(temperature, softcap, logit_scale, student_softcap, teacher_softcap,
                                          student_logit_scale, teacher_logit_scale)
    reduction = check_reduction(reduction)
    scale = row_scale(lead, hs.device, labels=labels, ignore_index=ignore_index, mask=mask,
                      token_weights=token_weights, reduction=reduction,
                      dtype=torch.float64 if hs.dtype == torch.float64 else torch.float32)

    name = backends.resolve(backend, hs.device)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not supported; expected one of {STRATEGIES}")
    if strategy == "tiled" and name != "triton":
        raise ValueError(f"strategy='tiled' runs on the triton backend only; backend {name!r} is chunked")
    if strategy == "auto":
        strategy = "chunked"
    if chunk_size is None:
        grad_w = sum(w[:vocab].numel() * 4 for w in (ws, wt) if w.requires_grad)
        chunk_size = default_chunk_rows(hs.shape[0], vocab, hs.device, name, hs.dtype, head_grad_bytes=grad_w)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")

    params = (div.kind, div.weight, [student.inv_temp, student.softcap, teacher.inv_temp, teacher.softcap], vocab,
              name, strategy, chunk_size)
    out = _FusedDivergenceFunction.apply(hs, ws, bs, ht, wt, bt, scale, reduction != "none", params)
    return out if reduction != "none" else out.reshape(lead)


def fused_reverse_kl(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                     **kwargs) -> Tensor:
    """MiniLLM's objective ``KL(q_student || p_teacher)`` per token: :func:`fused_divergence` with
    ``divergence="reverse_kl"`` (same arguments and shapes)."""
    if "divergence" in kwargs:
        raise TypeError("fused_reverse_kl() fixes divergence='reverse_kl'; call fused_divergence() for another")
    return fused_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                            divergence="reverse_kl", **kwargs)


class FusedDivergenceLoss(torch.nn.Module):
    """:func:`fused_divergence` as a module taking the two models' ``nn.Linear`` lm_heads (weight and bias).

    Example::

        loss_fn = FusedDivergenceLoss("reverse_kl", temperature=1.0)
        loss = loss_fn(student_hidden, student.lm_head, teacher_hidden, teacher.lm_head, labels=labels)
    """

    def __init__(self, divergence: str = "reverse_kl", **options):
        super().__init__()
        divergences.resolve(divergence, options.get("beta", 0.5), options.get("skew", 0.1))  # fail early
        self.divergence, self.options = divergence, options

    def forward(self, student_hidden: Tensor, student_lm_head: torch.nn.Linear, teacher_hidden: Tensor,
                teacher_lm_head: torch.nn.Linear, *, labels: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                token_weights: Optional[Tensor] = None) -> Tensor:
        for name, head in (("student_lm_head", student_lm_head), ("teacher_lm_head", teacher_lm_head)):
            if not isinstance(head, torch.nn.Linear):
                raise TypeError(f"{name} must be an nn.Linear (the model's lm_head), got {type(head).__name__}")
        return fused_divergence(student_hidden, student_lm_head.weight, teacher_hidden, teacher_lm_head.weight,
                                divergence=self.divergence, labels=labels, mask=mask, token_weights=token_weights,
                                student_bias=student_lm_head.bias, teacher_bias=teacher_lm_head.bias,
                                **self.options)

    def extra_repr(self) -> str:
        return f"divergence={self.divergence!r}" + "".join(f", {k}={v!r}" for k, v in self.options.items())
