"""The fused linear divergence: the public function, its torch.library custom ops and their autograd formula.

:func:`fused_divergence` checks and flattens the inputs, turns labels / mask / token weights into one per-row scale,
picks the backend (minillm_fast/dispatch.py) and calls the custom op ``minillm_fast::fused_divergence_fwd``, which
runs the backend's implementation and returns the scaled loss (a scalar, or per row for ``reduction="none"``). Its
autograd formula (``torch.library.register_autograd``) either scales gradients the forward already made (chunked
strategy, scalar output: 4 matmuls in all) or calls ``minillm_fast::fused_divergence_bwd``. The ops' fake
implementations let ``torch.compile`` trace through them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import dispatch, divergences
from ..checks import check_models, check_positive, check_reduction, check_rows
from ..chunked import DivergenceConfig, Needs, chunk_rows, out_dtype
from ..divergences import Divergence
from ..scaling import Scaling, two_model_scalings

STRATEGIES = ("auto", "chunked", "tiled")


def _config(kind: int, weight: float, scaling: list[float], vocab_size: int) -> DivergenceConfig:
    """The config from the custom ops' flat arguments; ``scaling`` = [inv_temp_s, softcap_s, inv_temp_t, softcap_t]."""
    it_s, cap_s, it_t, cap_t = scaling
    return DivergenceConfig(Divergence(kind, weight), Scaling(it_s, cap_s), Scaling(it_t, cap_t), vocab_size)


def _implementation(backend: str, strategy: str):
    return dispatch.implementation("fused_divergence_tiled" if strategy == "tiled" else "fused_divergence", backend)


def _empty_if_none(grads, like: Tensor):
    return tuple(like.new_empty(0) if g is None else g for g in grads)


def _scaled(loss: Tensor, row_scale: Tensor, reduce: bool) -> Tensor:
    """``sum_i row_scale_i L_i`` or per row; rows with scale 0 give exactly 0 (even where L is not finite)."""
    per_row = torch.where(row_scale != 0, loss * row_scale.to(loss.dtype), torch.zeros_like(loss))
    return per_row.sum() if reduce else per_row


# ----------------------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("minillm_fast::fused_divergence_fwd", mutates_args=())
def _fwd_op(hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Tensor, wt: Tensor, bt: Optional[Tensor],
            row_scale: Tensor, kind: int, weight: float, scaling: list[float], vocab_size: int,
            backend: str, strategy: str, chunk_size: int, grads: list[bool], reduce: bool
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``out`` (``sum row_scale * L`` when ``reduce``, else per row), ``stats [N, 6]`` and, where ``grads`` asks, the
    gradients of ``sum(row_scale * L)`` (made in the same sweep; empty tensors elsewhere)."""
    cfg = _config(kind, weight, scaling, vocab_size)
    needs = Needs(*grads)
    loss, stats, g = _implementation(backend, strategy)(hs, ws, bs, ht, wt, bt, cfg, chunk_size=chunk_size,
                                                        row_grad=row_scale if any(needs) else None, needs=needs)
    return (_scaled(loss, row_scale, reduce), stats, *_empty_if_none(g, hs))


@_fwd_op.register_fake
def _(hs, ws, bs, ht, wt, bt, row_scale, kind, weight, scaling, vocab_size, backend, strategy, chunk_size, grads,
      reduce):
    f, n = out_dtype(hs), hs.shape[0]
    out = hs.new_empty((), dtype=f) if reduce else hs.new_empty(n, dtype=f)
    return (out, hs.new_empty(n, 6, dtype=f), *_fake_grads(hs, ws, bs, ht, wt, bt, grads))


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
    _, _, g = _implementation(backend, strategy)(hs, ws, bs, ht, wt, bt, cfg, chunk_size=chunk_size,
                                                 row_grad=row_grad, needs=Needs(*grads), want_loss=False,
                                                 saved_stats=stats)
    return _empty_if_none(g, hs)


@_bwd_op.register_fake
def _(hs, ws, bs, ht, wt, bt, stats, row_grad, kind, weight, scaling, vocab_size, backend, strategy, chunk_size,
      grads):
    return _fake_grads(hs, ws, bs, ht, wt, bt, grads)


# ----------------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    hs, ws, bs, ht, wt, bt, row_scale, kind, weight, scaling, vocab_size, backend, strategy, chunk_size, grads, \
        _ = inputs
    _, stats, *g = output
    ctx.mark_non_differentiable(stats, *g)
    ctx.precomputed = any(grads)
    ctx.op_args = (kind, weight, scaling, vocab_size, backend, strategy, chunk_size)
    if ctx.precomputed:
        ctx.save_for_backward(*(x if need else None for x, need in zip(g, grads)))
    else:
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, stats, row_scale)


def _backward(ctx, grad_out, *_):
    needs = Needs(*ctx.needs_input_grad[:6])
    if ctx.precomputed:
        # The buffers are ours alone: scale in place (a second backward through a retained graph is refused by
        # autograd's saved-tensor version check rather than silently doubled).
        grads = tuple(None if g is None or not need else g.mul_(grad_out.to(g.dtype))
                      for g, need in zip(ctx.saved_tensors, needs))
    else:
        hs, ws, bs, ht, wt, bt, stats, row_scale = ctx.saved_tensors
        g = torch.ops.minillm_fast.fused_divergence_bwd(hs, ws, bs, ht, wt, bt, stats, row_scale * grad_out,
                                                        *ctx.op_args, list(needs))
        grads = tuple(x if need else None for x, need in zip(g, needs))
    return (*grads,) + (None,) * 10


torch.library.register_autograd("minillm_fast::fused_divergence_fwd", _backward, setup_context=_setup_context)


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
        backend: ``auto`` | ``triton`` | ``torch`` | ``native`` (see minillm_fast/dispatch.py).
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

    name = dispatch.resolve(backend, hs.device)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not supported; expected one of {STRATEGIES}")
    if strategy == "tiled" and name != "triton":
        raise ValueError(f"strategy='tiled' runs on the triton backend only; backend {name!r} is chunked")
    if strategy == "auto":
        strategy = "chunked"
    grad_w = sum(w[:vocab].numel() * 4 for w in (ws, wt) if w.requires_grad)
    chunk_size = chunk_rows(chunk_size, hs.shape[0], vocab, hs.device, name, hs.dtype, head_grad_bytes=grad_w)

    # Gradients are made in the forward's sweep when the output is a scalar (the chunked strategy's 4-matmul floor).
    needs = [t is not None and t.requires_grad for t in (hs, ws, bs, ht, wt, bt)]
    precompute = reduction != "none" and strategy == "chunked" and torch.is_grad_enabled() and any(needs)
    out, *_ = torch.ops.minillm_fast.fused_divergence_fwd(
        hs, ws, bs, ht, wt, bt, scale, div.kind, div.weight,
        [student.inv_temp, student.softcap, teacher.inv_temp, teacher.softcap], vocab, name, strategy, chunk_size,
        needs if precompute else [False] * 6, reduction != "none")
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
