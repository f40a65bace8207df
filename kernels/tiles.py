"""Tile helpers shared by the Triton kernels (``@triton.jit`` functions inlined into every kernel that calls them).

Notation of the kernels: ``o_n`` row offsets of a block, ``o_v`` vocabulary offsets, ``o_h`` hidden offsets; ``z``
raw logits, ``s`` / ``t`` the student's / teacher's scaled logits ``softcap(z) * inv_temp``; ``m`` a running row max
and ``l`` the running sum of ``e^(x - m)`` (online softmax, as flash-attention keeps it).

Each model has its own ``inv_temp`` and ``softcap``: a model's logit multiplier (Cohere's ``logit_scale``,
Granite's ``1 / logits_scaling``) is folded into them by the ops, since ``softcap_c(a z) / T =
softcap_{c / a}(z) * (a / T)`` for ``a > 0``.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Triton reads a global inside a kernel only when it is a tl.constexpr object: a plain float, annotated or not, makes
# the compiler raise NameError (which TRITON_INTERPRET does not check; kernels/compile_check.py does).
LOG_ZERO = tl.constexpr(-1.0e30)  # finite "log 0": exp() of it is 0 and LOG_ZERO - LOG_ZERO is not NaN


@triton.jit
def _row_block(N, BLOCK_N: tl.constexpr):
    """This program's rows (grid axis 0): offsets ``o_n`` [BN] and their mask."""
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return o_n, o_n < N


@triton.jit
def _tile_2d(N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """This program's (row block, vocabulary block) of a 2D grid: ``o_n`` [BN], ``o_v`` [BV], the row mask and the
    [BN, BV] mask of real entries."""
    o_n, m_n = _row_block(N, BLOCK_N)
    o_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    return o_n, o_v, m_n, m_n[:, None] & (o_v < V)[None, :]


@triton.jit
def _split_range(V, SPLIT_V):
    """The vocabulary entries ``[start, stop)`` of this program's split (grid axis 1) of a split-vocabulary sweep."""
    start = tl.program_id(1) * SPLIT_V
    return start, tl.minimum(start + SPLIT_V, V)


@triton.jit
def _softmax_start(BLOCK_N: tl.constexpr):
    """A model's running row max (LOG_ZERO) and sum-exp (0) before the first tile, [BN] each."""
    return tl.full((BLOCK_N,), LOG_ZERO, tl.float32), tl.zeros((BLOCK_N,), tl.float32)


@triton.jit
def _tanh(x):
    # libdevice.tanh does not run under the CPU interpreter; exp-based forms lose relative accuracy near 0
    # (1 - e^(-2|x|) cancels), so small |x| takes the odd Taylor series (error < 1e-9 relative at |x| = 0.2).
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    r = tl.where(ax < 0.2, small, big)
    return tl.where(x < 0, -r, r)


@triton.jit
def _logaddexp(a, b):
    m = tl.maximum(a, b)
    return m + tl.log(tl.exp(a - m) + tl.exp(b - m))


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, o_n, o_v, N, V, H, stride_h, stride_w,
                 HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Raw logits ``h[o_n] @ w[o_v]^T (+ b[o_v])`` as a [BLOCK_N, BLOCK_V] fp32 tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        o_h = k + tl.arange(0, BLOCK_H)
        b_h = tl.load(h_ptr + o_n[:, None] * stride_h + o_h[None, :],
                      mask=(o_n[:, None] < N) & (o_h[None, :] < H), other=0.0)
        b_w = tl.load(w_ptr + o_v[:, None] * stride_w + o_h[None, :],
                      mask=(o_v[:, None] < V) & (o_h[None, :] < H), other=0.0)
        acc = tl.dot(b_h, tl.trans(b_w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + o_v, mask=o_v < V, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _scale(z, inv_temp, softcap, USE_SOFTCAP: tl.constexpr):
    """``softcap(z) * inv_temp`` and the softcap's tanh (for its derivative ``1 - tanh^2``; z itself when unused)."""
    if USE_SOFTCAP:
        c = _tanh(z / softcap)
        return softcap * c * inv_temp, c
    else:
        return z * inv_temp, z


@triton.jit
def _online_update(x, m, l):
    """Fold a [BN, BV] tile (masked entries LOG_ZERO) into running max ``m`` and sum-exp ``l`` [BN]."""
    m_new = tl.maximum(m, tl.max(x, 1))
    l_new = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
    return m_new, l_new


@triton.jit
def _kl_update(a, b, valid, m_a, l_a, m_b, m_a_new, m_b_new, acc):
    """Online ``acc = sum e^(a - m_a) ((a - m_a) - (b - m_b))`` (KL(softmax a || softmax b) numerator).

    Old terms are rebased to the new maxima: each one's bracket grows by (m_b_new - m_b) - (m_a_new - m_a), and its
    weight shrinks by e^(m_a - m_a_new). ``l_a`` is the running sum *before* this tile.
    """
    acc = (acc + ((m_b_new - m_b) - (m_a_new - m_a)) * l_a) * tl.exp(m_a - m_a_new)
    da = a - m_a_new[:, None]
    db = b - m_b_new[:, None]
    return acc + tl.sum(tl.where(valid, tl.exp(da) * (da - db), 0.0), 1)


@triton.jit
def _gather(x, o_v, idx):
    """``x[i, idx[i]]`` for the rows whose index falls in this tile (0 elsewhere); [BN, BV] -> [BN]."""
    return tl.sum(tl.where(o_v[None, :] == idx[:, None], x, 0.0), 1)


@triton.jit
def _accumulate_head_grads(g, h_ptr, w_ptr, gh_ptr, gw_ptr, gb_ptr, o_n, o_v, N, V, H, stride_h, stride_w,
                           NEED_GH: tl.constexpr, NEED_GW: tl.constexpr, NEED_GB: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, BLOCK_H: tl.constexpr):
    """Add ``g @ W[o_v]`` into grad_h[o_n] and ``g^T @ h[o_n]`` into grad_W[o_v] (fp32, atomics), column block by
    column block of H so the [BN, H] and [BV, H] products never need to fit in registers at once. ``g`` is cast to
    the model's dtype first: the gradient matmuls run in the inputs' precision, as autograd's would."""
    m_nv = o_n[:, None] < N
    m_vv = o_v[:, None] < V
    if NEED_GB:
        tl.atomic_add(gb_ptr + o_v, tl.sum(g, 0), mask=o_v < V)
    for k in range(0, H, BLOCK_H):
        o_h = k + tl.arange(0, BLOCK_H)
        m_h = (o_h < H)[None, :]
        if NEED_GH:
            b_w = tl.load(w_ptr + o_v[:, None] * stride_w + o_h[None, :], mask=m_vv & m_h, other=0.0)
            gh = tl.dot(g.to(b_w.dtype), b_w, input_precision=DOT_PRECISION)
            tl.atomic_add(gh_ptr + o_n[:, None] * H + o_h[None, :], gh, mask=m_nv & m_h)
        if NEED_GW:
            b_h = tl.load(h_ptr + o_n[:, None] * stride_h + o_h[None, :], mask=m_nv & m_h, other=0.0)
            gw = tl.dot(tl.trans(g.to(b_h.dtype)), b_h, input_precision=DOT_PRECISION)
            tl.atomic_add(gw_ptr + o_v[:, None] * H + o_h[None, :], gw, mask=m_vv & m_h)
