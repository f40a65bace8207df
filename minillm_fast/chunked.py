"""Token-chunked strategy of the fused divergence: the torch backend, and the triton backend's default.

Rows are taken C at a time; each chunk's full-vocabulary logits ``[C, V]`` are computed with one matmul per model
(BLAS / cuBLAS), turned into per-row losses and the gradient ``G = dL/dz`` by a *rows function* (pure PyTorch here,
or the Triton row kernel), and G goes straight into the gradient matmuls. Memory is O(C x V) whatever N is.

When the loss is reduced to a scalar, the gradients are computed during the forward pass (4 matmuls in all, the
floor of DESIGN.md section 4) and the backward only scales them by the upstream scalar. For ``reduction="none"`` the
upstream gradient is per row and unknown in the forward, so the backward recomputes the chunks (6 matmuls).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import divergences, hugepages
from .divergences import Divergence
from .scaling import Scaling


@dataclass(frozen=True)
class DivergenceConfig:
    """What every backend needs to know about the op besides the tensors: the divergence, each model's logit
    scaling (minillm_fast/scaling.py) and the real vocabulary."""

    div: Divergence
    student: Scaling
    teacher: Scaling
    vocab_size: int

    @property
    def kernel_args(self) -> dict:
        """The native row kernel's keywords: the divergence and each model's effective temperature and softcap."""
        log_w, log_1mw = self.div.log_weights
        return dict(kind=self.div.kind, log_w=log_w, log_1mw=log_1mw,
                    temperature_s=self.student.temperature, softcap_s=self.student.softcap,
                    temperature_t=self.teacher.temperature, softcap_t=self.teacher.softcap)

    @property
    def triton_args(self) -> dict:
        """The Triton launchers' keywords: the divergence, and each model's ``inv_temp`` and ``softcap``."""
        log_w, log_1mw = self.div.log_weights
        return dict(kind=self.div.kind, log_w=log_w, log_1mw=log_1mw,
                    inv_temp=(self.student.inv_temp, self.teacher.inv_temp),
                    softcap=(self.student.softcap, self.teacher.softcap))


# A rows function: (zs [C, V], zt [C, V], row_grad [C] | None, cfg, grad_s, grad_t) -> (loss [C], stats [C, 6],
# dL/dzs [C, V] | None, dL/dzt [C, V] | None). It may overwrite zs and zt. stats = (m_s, log l_s, m_t, log l_t, c_s,
# c_t): row max and log-sum-exp about it, kept apart (kernels/fused_divergence.py explains why), and the sums of q*g
# and p*h. A rows function with the attribute ``vocab_major = True`` is handed chunks laid out vocabulary-major (the
# [C, V] transpose of a row-major [V, C], see ChunkLogits) and returns its gradients in that layout.
RowsFn = Callable[..., tuple]


def torch_rows(zs: torch.Tensor, zt: torch.Tensor, row_grad: Optional[torch.Tensor], cfg: DivergenceConfig,
               grad_s: bool, grad_t: bool):
    """The rows function in plain PyTorch (closed-form gradients of divergences.terms)."""
    (s, cap_s), (t, cap_t) = cfg.student.apply(zs), cfg.teacher.apply(zt)
    m_s, m_t = s.amax(-1, keepdim=True), t.amax(-1, keepdim=True)
    # (s - m) - log l, never s - lse: lse is rounded at the size of the largest logit
    ll_s = torch.log(torch.exp(s - m_s).sum(-1, keepdim=True))
    ll_t = torch.log(torch.exp(t - m_t).sum(-1, keepdim=True))
    lq, lp = (s - m_s) - ll_s, (t - m_t) - ll_t
    phi, qg, ph = divergences.terms(lq, lp, cfg.div)
    loss, c_s, c_t = phi.sum(-1), qg.sum(-1), ph.sum(-1)
    stats = torch.cat([m_s, ll_s, m_t, ll_t, c_s[:, None], c_t[:, None]], dim=1)
    g_s = g_t = None
    if grad_s:
        g_s = (qg - lq.exp() * c_s[:, None]) * (row_grad * cfg.student.inv_temp)[:, None]
        if cap_s is not None:
            g_s = g_s * (1 - cap_s * cap_s)
    if grad_t:
        g_t = (ph - lp.exp() * c_t[:, None]) * (row_grad * cfg.teacher.inv_temp)[:, None]
        if cap_t is not None:
            g_t = g_t * (1 - cap_t * cap_t)
    return loss, stats, g_s, g_t


def triton_rows(zs, zt, row_grad, cfg: DivergenceConfig, grad_s: bool, grad_t: bool):
    from .backends import triton_kernels

    if row_grad is None:
        row_grad = zs.new_zeros(zs.shape[0])
    return triton_kernels().divergence_rows(zs, zt, row_grad.float().contiguous(), grad_s=grad_s, grad_t=grad_t,
                                            **cfg.triton_args)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """Logits ``[C, V]`` of one chunk: the matmul in the inputs' dtype, then fp32 (fp64 for fp64 inputs)."""
    z = h @ w.T if b is None else torch.addmm(b, h, w.T)
    return z.to(torch.float64 if h.dtype == torch.float64 else torch.float32)


class ChunkLogits:
    """Raw logits ``h W[:V]^T + b[:V]`` ``[C, V]`` of successive row chunks, in fp32 (fp64 for fp64 inputs), as
    ``_chunk_logits`` computes them, written into one buffer of ``rows`` rows that every chunk reuses: the rows
    functions may overwrite it in place, and a fresh ``[C, V]`` per chunk would hold a third buffer while the last
    chunk's is still referenced, and cost its page faults again each time. A returned chunk is valid until the next
    call.

    ``vocab_major``: the chunk is computed as ``W h^T`` into a row-major ``[V, C]`` buffer and returned as its
    transpose (a ``[C, V]`` view with strides ``(1, C)``), for rows functions that take that layout
    (``rows_fn.vocab_major``, the native CPU kernel): on CPU, MKL runs ``W h^T`` and the gradient matmuls on a
    ``[V, C]`` G at the speed of the full-size matmuls, where ``h W^T`` loses ~5% at a few hundred rows
    (bench/README.md, "Chunk layout")."""

    def __init__(self, w: torch.Tensor, b: Optional[torch.Tensor], vocab_size: int, rows: int, dtype: torch.dtype,
                 vocab_major: bool = False):
        self.w = w[:vocab_size]
        self.b = None if b is None else b[:vocab_size]
        self.vocab_major = vocab_major
        self.buf = hugepages.empty(rows * vocab_size, dtype=dtype, device=w.device)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        c, v = h.shape[0], self.w.shape[0]
        if self.vocab_major:  # [V, C] contiguous for this chunk's C (the last chunk may be shorter)
            out = self.buf[: v * c].view(v, c)
            a, m, bias = self.w, h.T, (None if self.b is None else self.b[:, None])
        else:
            out = self.buf[: c * v].view(c, v)
            a, m, bias = h, self.w.T, self.b
        if h.dtype != out.dtype:  # bf16 / fp16: the product in the inputs' dtype, then fp32
            out.copy_(a @ m if bias is None else torch.addmm(bias, a, m))
        elif bias is None:
            torch.mm(a, m, out=out)
        else:
            torch.addmm(bias, a, m, out=out)
        return out.T if self.vocab_major else out


class _HeadGrads:
    """Gradient buffers of one model (hidden, head, bias), accumulated in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, h, w, b, needs, vocab_size):
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        self.h, self.w, self.vocab_size = h, w[:vocab_size], vocab_size
        # contiguous whatever the input's strides: the ops promise (and their fakes declare) row-major gradients
        self.gh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if needs[0] else None
        # The head gradient's first chunk is written, not added (no memset of [V, H] before it): `gw_written` says
        # whether it has been. Rows past the vocabulary (padding) get no gradient: zeroed here.
        self.gw = hugepages.empty(*w.shape, dtype=acc, device=w.device) if needs[1] else None
        if self.gw is not None:
            self.gw[vocab_size:].zero_()
        self.gw_written = False
        self.gb = torch.zeros(w.shape[0], dtype=acc, device=w.device) if (needs[2] and b is not None) else None
        self.w_dtype = w.dtype

    @property
    def any(self) -> bool:
        return self.gh is not None or self.gw is not None or self.gb is not None

    def add(self, rows: slice, g: torch.Tensor) -> None:
        """Fold ``g = dL/dz`` of the chunk ``rows`` ([C, V] fp32, row- or vocabulary-major) into the buffers."""
        g_in = g.to(self.h.dtype)  # the gradient matmuls run in the inputs' dtype, as autograd's would
        if self.gh is not None:
            torch.mm(g_in, self.w, out=self.gh[rows])
        if self.gw is not None:
            gw = self.gw[: self.vocab_size]
            if g_in.dtype != gw.dtype:
                part = (g_in.T @ self.h[rows]).to(gw.dtype)
                if self.gw_written:
                    gw.add_(part)
                else:
                    gw.copy_(part)
            elif not self.gw_written:
                torch.mm(g_in.T, self.h[rows], out=gw)
            else:
                gw.addmm_(g_in.T, self.h[rows])
            self.gw_written = True
        if self.gb is not None:
            self.gb[: self.vocab_size] += g.sum(0).to(self.gb.dtype)

    def result(self):
        if self.gw is not None and not self.gw_written:  # no rows: a zero gradient
            self.gw.zero_()
        return (self.gh,
                None if self.gw is None else self.gw.to(self.w_dtype),
                None if self.gb is None else self.gb.to(self.w_dtype))


def run(hs, ws, bs, ht, wt, bt, cfg: DivergenceConfig, *, rows_fn: RowsFn, chunk_size: int,
        row_grad: Optional[torch.Tensor], needs: tuple, want_loss: bool = True):
    """One sweep over the rows, chunk by chunk.

    hs [N, HS], ws [V_pad, HS], bs [V_pad] | None, likewise the teacher; row_grad [N] fp32 (the upstream gradient of
    each row's loss: row scales in a forward that computes gradients, upstream x scales in a backward) or None.
    needs: six bools (grads of hs, ws, bs, ht, wt, bt). Returns ``loss [N]`` and ``stats [N, 6]`` (or None when not
    want_loss) and the six gradients (None where not needed).
    """
    n, v = hs.shape[0], cfg.vocab_size
    f = torch.float64 if hs.dtype == torch.float64 else torch.float32
    loss = torch.empty(n, dtype=f, device=hs.device) if want_loss else None
    stats = torch.empty(n, 6, dtype=f, device=hs.device) if want_loss else None
    student = _HeadGrads(hs, ws, bs, needs[:3], v)
    teacher = _HeadGrads(ht, wt, bt, needs[3:], v)
    vocab_major = getattr(rows_fn, "vocab_major", False)
    student_logits = ChunkLogits(ws, bs, v, min(chunk_size, n), f, vocab_major)
    teacher_logits = ChunkLogits(wt, bt, v, min(chunk_size, n), f, vocab_major)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        zs, zt = student_logits(hs[rows]), teacher_logits(ht[rows])
        rg = None if row_grad is None else row_grad[rows]
        l_c, st_c, g_s, g_t = rows_fn(zs, zt, rg, cfg, student.any, teacher.any)
        if want_loss:
            loss[rows] = l_c
            stats[rows] = st_c
        if g_s is not None:
            student.add(rows, g_s)
        if g_t is not None:
            teacher.add(rows, g_t)
    return loss, stats, (*student.result(), *teacher.result())
