"""Offline distillation from stored teacher top-k log-probs: :func:`sparse_divergence` and :func:`token_topk`.

The teacher ran once and kept, per token, its k most likely ids and their log-probs (``token_topk``; k ~ 8-128
instead of the V x 4 bytes of a full distribution). The student's side needs, per row, its log-probs at those k ids
and nothing else of the vocabulary but its log-normaliser, so the op never makes ``[N, V]`` logits. Two ways:

* one sweep (torch and native backends, a scalar loss, or any loss without gradients): ``chunked.sparse_run`` makes
  each row chunk's logits ``[C, V]`` once, takes the log-normaliser ``lse = M + log L`` and the log-probs at the ids
  ``lq = (s_k - M) - log L`` from them, the divergence and its gradient ``g = dL/dlq`` on ``[C, K]``, and writes
  ``dL/ds = scatter(g) - (sum_k g_k) q`` over the logits for the two gradient matmuls: 3 matmuls in all, the
  gradients made in the forward and scaled by the upstream scalar in the backward (as fused_divergence's chunked
  strategy does);
* composed ops (per-row gradients, where the upstream is not known in the forward; gradients wanted by the stored
  log-probs or the token weights; ``torch.compile``; the triton backend): the log-normaliser
  (``minillm_fast::log_normalizer``: one sweep over the vocabulary, the token log-probs forward of the backend; its
  gradient ``q`` from the token log-probs backward without a one-hot) and the student's logits at the k ids,
  ``z_k = h . W[id_k] (+ b[id_k])``, by a gathered product in row chunks (``minillm_fast::gathered_logits``; its
  gradient scatters into the k head rows), scaled as the model does (logit scale, softcap, temperature): 4 matmuls.

The divergence is then between two distributions over a few outcomes, computed on ``[N, K]`` tensors by autograd:

* ``tail="bucket"`` (default): the k ids and one more outcome holding the rest of the mass (``1 - sum_k p_k`` for the
  teacher, ``1 - sum_k q_k`` for the student): a proper divergence over K+1 outcomes, equal to the full-vocabulary
  one when the teacher's top k holds all its mass. Both tail masses are floored at ``TAIL_FLOOR`` (1e-20): a top k
  holding all the teacher's mass would otherwise make a reverse KL infinite, and a tail that rounds to 0 on both
  sides would give 0 log(0/0); the floor changes the divergence by at most ~1e-18;
* ``tail="renorm"``: both sides renormalised over the k ids (the divergence between the two conditionals);
* ``tail="ignore"``: ``sum_k phi(p_k, q_k)`` over the k ids only, the common and biased choice (for the forward KL it
  is the cross-entropy against the truncated teacher, minus its entropy: it pushes mass onto the k ids without
  ever accounting for the student's mass elsewhere).

Accuracy: float64 inputs match the materialised computation to ~1e-12. In fp32 the bucket's student tail
``1 - sum_k q_k`` carries the rounding of the log-probs at the ids as an absolute error (the composed path's
log-normaliser comes from a separate sweep, the logits rounded in another order, ~eps max|s|; the one sweep's from the
same logits, summed in another order than a materialised log-softmax sums them), which the tail divides by its own
mass: where the student's top-k mass is close to 1 and the teacher's is not, this term is a few times less accurate
than a materialised log-softmax (tests: tail_cancellation).

Teacher log-probs are taken as given: the temperature applies to the student only (a tempered teacher's top k cannot
be recovered from an untempered one: store a tempered teacher if you want one).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import dispatch, divergences
from ..checks import check_model, check_reduction
from ..chunked import chunk_rows, out_dtype, row_chunks
from ..scaling import Scaling, checked
from .fused_divergence import row_scale

SPARSE_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
# Stored log-probs may be fp16: a top k whose masses sum to 1 + this is still accepted (rounding), not more.
MASS_SLACK = 1e-2


# ----------------------------------------------------------------------------------------------------------------------
# the student's log-normaliser and its logits at given ids
# ----------------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("minillm_fast::log_normalizer", mutates_args=())
def _log_normalizer_op(h: Tensor, w: Tensor, b: Optional[Tensor], inv_temp: float, softcap: float, vocab_size: int,
                       backend: str, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Each row's max ``M [N]`` and ``log L [N]`` with ``L = sum_v e^(s_v - M)`` (so ``lse = M + log L``), by the
    backend's token log-probs forward (targets -1: no target is read)."""
    y = torch.full((h.shape[0],), -1, dtype=torch.int64, device=h.device)
    _, stats, _ = dispatch.implementation("token_logprobs_fwd", backend)(
        h, w, b, y, scaling=Scaling(inv_temp, softcap), vocab_size=vocab_size, entropy=False, chunk_size=chunk_size)
    return stats[:, 0].contiguous(), stats[:, 1].contiguous()


@_log_normalizer_op.register_fake
def _(h, w, b, inv_temp, softcap, vocab_size, backend, chunk_size):
    n, f = h.shape[0], out_dtype(h)
    return h.new_empty(n, dtype=f), h.new_empty(n, dtype=f)


def _log_normalizer_setup(ctx, inputs, output):
    h, w, b, inv_temp, softcap, vocab_size, backend, chunk_size = inputs
    m, log_l = output
    ctx.mark_non_differentiable(m)
    ctx.args = (inv_temp, softcap, vocab_size, backend, chunk_size)
    ctx.save_for_backward(h, w, b, torch.stack([m, log_l], 1))


def _log_normalizer_backward(ctx, _, g):
    """``d log L / ds = q`` (M is a constant of the row: its own derivative cancels): the token log-probs backward
    with upstream ``-g`` and no target (targets -1), which is ``g q`` times ``ds/dz``."""
    h, w, b, stats = ctx.saved_tensors
    inv_temp, softcap, vocab_size, backend, chunk_size = ctx.args
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and b is not None)
    y = torch.full((h.shape[0],), -1, dtype=torch.int64, device=h.device)
    grads = dispatch.implementation("token_logprobs_bwd", backend)(
        h, w, b, y, stats, None, -g, None, scaling=Scaling(inv_temp, softcap), vocab_size=vocab_size, needs=needs,
        chunk_size=chunk_size)
    return (*grads, None, None, None, None, None)


torch.library.register_autograd("minillm_fast::log_normalizer", _log_normalizer_backward,
                                setup_context=_log_normalizer_setup)


@torch.library.custom_op("minillm_fast::gathered_logits", mutates_args=())
def _gathered_op(h: Tensor, w: Tensor, b: Optional[Tensor], ids: Tensor, chunk_size: int) -> Tensor:
    """``z [N, K] = h [N, H] . w[ids] [N, K, H] (+ b[ids])``: the product in the inputs' dtype, then fp32 (fp64 for
    fp64 inputs), ``chunk_size`` rows at a time (the gathered rows are ``[C, K, H]``)."""
    z = torch.empty(ids.shape, dtype=out_dtype(h), device=h.device)
    for rows in row_chunks(h.shape[0], chunk_size):
        zc = torch.bmm(w[ids[rows]], h[rows, :, None])[..., 0]
        if b is not None:
            zc = zc + b[ids[rows]]
        z[rows] = zc
    return z


@_gathered_op.register_fake
def _(h, w, b, ids, chunk_size):
    return h.new_empty(ids.shape, dtype=out_dtype(h))


@torch.library.custom_op("minillm_fast::gathered_logits_bwd", mutates_args=())
def _gathered_bwd_op(g: Tensor, h: Tensor, w: Tensor, b: Optional[Tensor], ids: Tensor, chunk_size: int,
                     grads: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum g * z`` w.r.t. h, w, b where ``grads`` asks (fp32 accumulation of the scattered rows)."""
    acc = out_dtype(h)
    gh = torch.empty_like(h) if grads[0] else h.new_empty(0)
    gw = torch.zeros(w.shape, dtype=acc, device=w.device) if grads[1] else h.new_empty(0)
    gb = torch.zeros(w.shape[0], dtype=acc, device=w.device) if grads[2] and b is not None else h.new_empty(0)
    for rows in row_chunks(h.shape[0], chunk_size):
        gc, idc = g[rows], ids[rows]
        if grads[0]:
            gh[rows] = torch.bmm(gc[:, None, :].to(w.dtype), w[idc])[:, 0, :]
        if grads[1]:
            gw.index_add_(0, idc.reshape(-1), (gc[:, :, None] * h[rows, None, :].to(acc)).reshape(-1, h.shape[1]))
        if gb.numel():
            gb.index_add_(0, idc.reshape(-1), gc.reshape(-1).to(acc))
    return gh, gw.to(w.dtype) if grads[1] else gw, gb.to(w.dtype) if gb.numel() else gb


@_gathered_bwd_op.register_fake
def _(g, h, w, b, ids, chunk_size, grads):
    return (torch.empty_like(h) if grads[0] else h.new_empty(0), torch.empty_like(w) if grads[1] else h.new_empty(0),
            torch.empty_like(b) if grads[2] and b is not None else h.new_empty(0))


def _gathered_setup(ctx, inputs, output):
    h, w, b, ids, chunk_size = inputs
    ctx.chunk_size = chunk_size
    ctx.save_for_backward(h, w, b, ids)


def _gathered_backward(ctx, g):
    h, w, b, ids = ctx.saved_tensors
    needs = [bool(x) for x in ctx.needs_input_grad[:3]]
    gh, gw, gb = torch.ops.minillm_fast.gathered_logits_bwd(g, h, w, b, ids, ctx.chunk_size, needs)
    return (gh if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None, None, None)


torch.library.register_autograd("minillm_fast::gathered_logits", _gathered_backward, setup_context=_gathered_setup)


# ----------------------------------------------------------------------------------------------------------------------
# sparse divergence
# ----------------------------------------------------------------------------------------------------------------------
def _check_teacher(ids, logprobs, lead, device, vocab: int) -> tuple[Tensor, Tensor]:
    """The teacher's top k as ``[N, K]`` ids and log-probs, checked; raises naming what is wrong."""
    for name, t in (("teacher_ids", ids), ("teacher_logprobs", logprobs)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {tuple(lead)} + (K,), got {type(t).__name__}")
        if t.dim() != len(lead) + 1 or t.shape[:-1] != lead or t.shape[-1] == 0:
            raise ValueError(f"{name} must have shape {tuple(lead)} + (K,) with K > 0 (the hidden states' leading "
                             f"shape, then the stored top k), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the hidden states are on {device}")
    if ids.shape != logprobs.shape:
        raise ValueError(f"teacher_ids {tuple(ids.shape)} and teacher_logprobs {tuple(logprobs.shape)} must have the "
                         f"same shape (K ids and their K log-probs per token)")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must be an integer tensor (token ids; -1 pads), got dtype {ids.dtype}")
    if not logprobs.dtype.is_floating_point:
        raise TypeError(f"teacher_logprobs must be a floating-point tensor, got dtype {logprobs.dtype}")
    k = ids.shape[-1]
    ids, logprobs = ids.reshape(-1, k), logprobs.reshape(-1, k)
    if torch.compiler.is_compiling():
        return ids, logprobs
    pad = ids == -1
    bad = ~pad & ((ids < 0) | (ids >= vocab))
    if bool(bad.any()):
        raise ValueError(f"teacher_ids has {int(bad.sum())} id(s) outside [0, vocab_size={vocab}) (first "
                         f"{ids[bad][0].item()}); ids must be tokens of the real vocabulary (rows >= vocab_size are "
                         f"padding), or -1 for an empty slot")
    lp = logprobs.double()
    if not bool(torch.isfinite(lp[~pad]).all()):
        raise ValueError("teacher_logprobs has non-finite values at real ids (NaN or inf); a stored log-prob must "
                         "be finite (use id -1 for an empty slot)")
    tol = max(MASS_SLACK, 4 * torch.finfo(logprobs.dtype).eps)
    if bool((lp[~pad] > tol).any()):
        raise ValueError(f"teacher_logprobs has values above 0 (max {lp[~pad].max().item():.3g}); they must be "
                         f"log-probabilities (<= 0)")
    mass = torch.where(pad, torch.zeros_like(lp), lp.exp()).sum(-1)
    if bool((mass > 1 + tol).any()):
        raise ValueError(f"the teacher's top-k probabilities sum to more than 1 in some rows (max "
                         f"{mass.max().item():.4f}); were they stored as logits, or with repeated ids?")
    return ids, logprobs


def sparse_divergence(student_hidden: Tensor, student_weight: Tensor, teacher_ids: Tensor,
                      teacher_logprobs: Tensor, *, divergence: str = "forward_kl", tail: str = "bucket",
                      beta: float = 0.5, labels: Optional[Tensor] = None, ignore_index: int = -100,
                      mask: Optional[Tensor] = None, token_weights: Optional[Tensor] = None,
                      temperature: float = 1.0, student_bias: Optional[Tensor] = None,
                      vocab_size: Optional[int] = None, softcap: Optional[float] = None,
                      logit_scale: Optional[float] = None, reduction: str = "mean", backend: str = "auto",
                      chunk_size: Optional[int] = None) -> Tensor:
    """Divergence between a student's next-token distribution and a teacher's stored top k, from the student's
    hidden states and lm_head weight, without materialising ``[N, V]`` logits.

    Equals, up to rounding (``tail="bucket"``, forward KL)::

        lq = log_softmax(softcap(logit_scale * (h @ W.T + b)) / T, -1).gather(-1, teacher_ids)   # [..., K]
        p, q = teacher_logprobs.exp(), lq.exp()
        P, Q = 1 - p.sum(-1), 1 - q.sum(-1)                                                     # the tail outcome
        per_token = (p * (teacher_logprobs - lq)).sum(-1) + P * (log P - log Q)

    then weighted, masked and reduced as :func:`minillm_fast.fused_divergence` does.

    Args:
        student_hidden: ``[..., H]`` the student's final hidden states (float32, bfloat16, float16; float64 on the
            torch and native backends); student_weight ``[V, H]`` its lm_head weight; student_bias ``[V]`` or None.
        teacher_ids: ``[..., K]`` int, the teacher's top-k ids per token (any order; ``-1`` pads a row with fewer
            than K; a repeated id counts once).
        teacher_logprobs: ``[..., K]`` float, their log-probs under the teacher (fp16 storage is fine).
        divergence: ``forward_kl`` (KL(p || q), the usual KD), ``reverse_kl`` (KL(q || p)) or ``jsd`` (``beta``
            weights the teacher in the mixture), over the outcomes that ``tail`` defines.
        tail: ``bucket`` | ``renorm`` | ``ignore`` (module docstring: what each means and when to prefer it).
        labels, ignore_index, mask, token_weights, reduction, temperature, vocab_size, softcap, logit_scale,
            backend, chunk_size: as in :func:`minillm_fast.fused_divergence`, for the student (the temperature
            divides the student's logits only). A row whose teacher ids are all padding is skipped.

    Returns:
        float32 scalar (``mean``/``sum``) or ``[...]`` (``none``); float64 for float64 inputs. Gradients reach the
        student's hidden states, weight and bias.
    """
    if divergence not in SPARSE_DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is not supported by sparse_divergence; expected one of "
                         f"{SPARSE_DIVERGENCES}")
    div = divergences.resolve(divergence, beta)
    if tail not in divergences.TAILS:
        raise ValueError(f"tail={tail!r} is not supported; expected one of {divergences.TAILS}")
    reduction = check_reduction(reduction)
    (h, w, b), vocab, lead = check_model(student_hidden, student_weight, student_bias, vocab_size)
    scaling = checked(temperature, softcap, logit_scale)
    ids, lp = _check_teacher(teacher_ids, teacher_logprobs, lead, h.device, vocab)
    n, k = ids.shape
    name = dispatch.resolve(backend, h.device)
    chunk = chunk_rows(chunk_size, n, vocab, h.device, name, h.dtype)

    # which entries count: real ids, each once
    valid = ids >= 0
    valid &= ~((ids[:, :, None] == ids[:, None, :]) & torch.ones(k, k, dtype=torch.bool, device=ids.device)
               .tril(-1)).any(-1)
    has_any = valid.any(-1)
    safe_ids = torch.where(valid, ids, torch.zeros_like(ids)).long()

    scale = row_scale(lead, h.device, labels=labels, ignore_index=ignore_index, mask=mask,
                      token_weights=token_weights, reduction="none", dtype=out_dtype(h))
    keep = scale.ne(0) & has_any
    if reduction == "mean":
        scale = scale / keep.sum().clamp(min=1)
    needs = tuple(torch.is_grad_enabled() and x is not None and x.requires_grad for x in (h, w, b))
    if _one_sweep(name, reduction, any(needs), lp, token_weights):
        weight = torch.where(keep, scale, torch.zeros_like(scale))
        outcome = functools.partial(_chunk_outcome, lp=lp, valid=valid, div=div, tail=tail)
        with torch.no_grad():
            per_row, grads = dispatch.implementation("sparse_divergence", name)(
                h, w, b, safe_ids, outcome, scaling, vocab, chunk_size=chunk,
                row_grad=weight if any(needs) else None, needs=needs)
        out = _reduce(per_row, keep, scale, reduction, lead)
        return _PrecomputedGradients.apply(out, h, w, b, *grads) if any(needs) else out

    # the student's log-probs at the ids, (s_k - M) - log L: the log-normaliser by one sweep over the vocabulary, the
    # logits at the ids by a gathered product; autograd on [N, K] from there, and each sweep again in the backward
    m, log_l = torch.ops.minillm_fast.log_normalizer(h, w, b, scaling.inv_temp, scaling.softcap, vocab, name, chunk)
    z = torch.ops.minillm_fast.gathered_logits(h, w, b, safe_ids, max(1, chunk * vocab // (k * h.shape[1] + 1)))
    lq = (scaling.apply(z)[0] - m[:, None]) - log_l[:, None]
    per_row = divergences.outcome_divergence(lq, lp.to(lq.dtype), valid, div, tail)
    return _reduce(per_row, keep, scale, reduction, lead)


def _one_sweep(backend: str, reduction: str, head_grads: bool, lp: Tensor, token_weights: Optional[Tensor]) -> bool:
    """Whether the op runs as one sweep with its gradients made in it (``chunked.sparse_run``: 3 matmuls, where the
    composed ops take 4). Not where the upstream gradient must be known per row before the sweep
    (``reduction="none"`` with gradients), where something besides the head wants a gradient (the stored log-probs
    or the token weights), under ``torch.compile`` (the sweep runs autograd inside; the composed path is made of
    custom ops it can trace), or on a backend without it (triton: its token log-probs kernels are composed)."""
    grad = torch.is_grad_enabled()
    others = grad and (lp.requires_grad or (token_weights is not None and token_weights.requires_grad))
    return (dispatch.provides("sparse_divergence", backend) and not torch.compiler.is_compiling() and not others
            and (reduction != "none" or not head_grads))


def _chunk_outcome(rows: slice, lq: Tensor, *, lp: Tensor, valid: Tensor, div, tail: str) -> Tensor:
    """The per-row divergence of the rows ``rows`` from the student's log-probs at their ids ``lq [C, K]``."""
    return divergences.outcome_divergence(lq, lp[rows].to(lq.dtype), valid[rows], div, tail)


def _reduce(per_row: Tensor, keep: Tensor, scale: Tensor, reduction: str, lead) -> Tensor:
    """Rows kept scaled (exactly 0 elsewhere, even where the divergence is not finite), summed or per row."""
    out = torch.where(keep, per_row * scale, torch.zeros_like(per_row))
    return out.reshape(lead) if reduction == "none" else out.sum()


class _PrecomputedGradients(torch.autograd.Function):
    """``loss`` with the gradients (of h, w, b) that the sweep made; the backward scales them by the upstream
    scalar, in place (they are ours alone; autograd refuses a second backward through them rather than doubling)."""

    @staticmethod
    def forward(ctx, loss, h, w, b, gh, gw, gb):
        ctx.save_for_backward(gh, gw, gb)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_out):
        grads = tuple(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in ctx.saved_tensors)
        return (None, *grads, None, None, None)


# ----------------------------------------------------------------------------------------------------------------------
# the teacher's side: top k, fused
# ----------------------------------------------------------------------------------------------------------------------
class TopK(NamedTuple):
    """A model's k most likely tokens per row, most likely first (exact ties: lower id first)."""

    ids: Tensor       # [..., k] int64
    logprobs: Tensor  # [..., k] float32 (float64 for float64 inputs)


@torch.library.custom_op("minillm_fast::token_topk", mutates_args=())
def _topk_op(h: Tensor, w: Tensor, b: Optional[Tensor], k: int, inv_temp: float, softcap: float, vocab_size: int,
             chunk_size: int) -> tuple[Tensor, Tensor]:
    from ..chunked import scaled_logits
    from ..scaling import Scaling

    n = h.shape[0]
    ids = torch.empty(n, k, dtype=torch.int64, device=h.device)
    logprobs = torch.empty(n, k, dtype=out_dtype(h), device=h.device)
    for rows in row_chunks(n, chunk_size):
        s = scaled_logits(h[rows], w, b, vocab_size, Scaling(inv_temp, softcap))[0]
        lse = torch.logsumexp(s, -1, keepdim=True)
        # a stable sort keeps the lower id first among exact ties (torch.topk promises no order there)
        top, idx = torch.sort(s, dim=-1, descending=True, stable=True)
        ids[rows] = idx[:, :k]
        logprobs[rows] = top[:, :k] - lse
    return ids, logprobs


@_topk_op.register_fake
def _(h, w, b, k, inv_temp, softcap, vocab_size, chunk_size):
    n = h.shape[0]
    return h.new_empty(n, k, dtype=torch.int64), h.new_empty(n, k, dtype=out_dtype(h))


def token_topk(hidden: Tensor, weight: Tensor, k: int, *, bias: Optional[Tensor] = None,
               vocab_size: Optional[int] = None, temperature: float = 1.0, softcap: Optional[float] = None,
               logit_scale: Optional[float] = None, backend: str = "auto", chunk_size: Optional[int] = None) -> TopK:
    """The ``k`` most likely tokens of each row under ``softmax(softcap(logit_scale (h W^T + b)) / T)`` and their
    log-probs, by token chunks (memory O(chunk x V), no ``[N, V]``), most likely first, exact ties broken by the
    lower id. What the teacher cache stores (``minillm-fast teacher-cache``). No gradients.

    Equals ``torch.topk(log_softmax(logits / T, -1), k)`` up to the order of exact ties. ``backend`` picks the
    chunk size rule (every backend runs the same PyTorch chunks: a sort over the vocabulary, not worth a kernel).
    """
    (h, w, b), vocab, lead = check_model(hidden, weight, bias, vocab_size)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= vocab:
        raise ValueError(f"k={k!r} must be an int in [1, vocab_size={vocab}]")
    scaling = checked(temperature, softcap, logit_scale)
    name = dispatch.resolve(backend, h.device)
    chunk = chunk_rows(chunk_size, h.shape[0], vocab, h.device, name, h.dtype)
    with torch.no_grad():
        ids, logprobs = torch.ops.minillm_fast.token_topk(h.detach(), w.detach(), None if b is None else b.detach(),
                                                          k, scaling.inv_temp, scaling.softcap, vocab, chunk)
    return TopK(ids.reshape(*lead, k), logprobs.reshape(*lead, k))
