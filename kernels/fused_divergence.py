"""Triton kernels of the fused linear divergence (minillm_fast.fused_divergence).

Math (docs/design.md section 2). Per row i, ``s = softcap(h_s W_s^T + b_s) / T`` and
``t = softcap(h_t W_t^T + b_t) / T``; ``lq = s - lse(s)``, ``lp = t - lse(t)``; the loss is ``L = sum_v phi`` and the
gradients with respect to s and t are

    G_s = q*g - q * c_s,   c_s = sum_v q*g        G_t = p*h - p * c_t,   c_t = sum_v p*h

with the per-entry ``phi, q*g, p*h`` of minillm_fast/divergences.py (`_terms` below is the same table in Triton).
The gradient with respect to the raw logits is ``G / T`` times ``1 - tanh^2`` under a softcap; it then feeds two
matmuls per model: ``grad_h = G W`` and ``grad_W = G^T h``.

Two strategies share the tile helpers:

* vocab-tiled (`_fused_divergence_fwd_kernel`, `_fused_divergence_bwd_kernel`): logits never leave registers. The
  forward streams vocabulary tiles through ``tl.dot`` and keeps, per row, online max/sum-exp for both models (as
  flash-attention does), then a second pass sums ``phi``, ``q*g`` and ``p*h`` entry by entry. (A single-pass KL
  accumulator, `_kl_update`, gives the loss alone; but its ``c_s = L + 1`` then does not cancel exactly against the
  per-entry terms the backward recomputes, which costs the gradient ~1e-3 absolute at logits ~1e4 where the
  materialised computation is exact, so the gradient path always takes the second pass.) The forward stores O(N)
  statistics; the backward recomputes each (row block, vocab block) tile on a 2D grid, forms G, and adds its two
  products into fp32 gradient buffers with atomics (so gradient sums are not bitwise deterministic on GPU).
* token-chunked (`_divergence_rows_kernel`): the caller computes a chunk of full-vocabulary logits with cuBLAS;
  this kernel turns them into the per-row loss and statistics and overwrites them with G, ready for the gradient
  matmuls. Minimum matmul count, memory O(chunk x V).

Statistics per row, ``stats [N, 6]``: ``m_s, log l_s, m_t, log l_t, c_s, c_t`` with ``lse = m + log l``. The max and
the log-sum are kept apart because log-probs are formed as ``(s - m) - log l``: ``lse`` itself is rounded at the
magnitude of the largest logit, and ``s - lse`` would carry that rounding into every probability of the row.

fp32 inputs use IEEE fp32 dots unless MINILLM_FAST_ALLOW_TF32=1 (tf32 costs ~1e-3 relative error in the logits,
far outside the fp32 error budget). fp64 is not supported by tl.dot; the torch backend takes fp64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import check_supported, dot_precision, interpreter_safe, rowmajor, scaling_args, tile_config
from .tiles import (LOG_ZERO, _accumulate_head_grads, _logaddexp, _logits_tile, _online_update, _row_block, _scale,
                    _softmax_start, _tile_2d)


# ----------------------------------------------------------------------------------------------------------------------
# divergence helpers
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _terms(lq, lp, KIND: tl.constexpr, log_w, log_1mw):
    """Per-entry ``(phi, q*g, p*h)``; the table in minillm_fast/divergences.py, same order of kinds."""
    q = tl.exp(lq)
    p = tl.exp(lp)
    if KIND == 0:  # reverse KL(q || p)
        d = lq - lp
        phi = q * d
        qg = q * (d + 1.0)
        ph = -q
    elif KIND == 1:  # forward KL(p || q)
        d = lp - lq
        phi = p * d
        qg = -p
        ph = p * (d + 1.0)
    elif KIND == 2:  # generalised JSD, m = beta p + (1 - beta) q
        lm = _logaddexp(lp + log_w, lq + log_1mw)
        qg = tl.exp(lq + log_1mw) * (lq - lm)
        ph = tl.exp(lp + log_w) * (lp - lm)
        phi = qg + ph
    elif KIND == 3:  # total variation
        sgn = tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0))
        phi = 0.5 * tl.abs(p - q)
        qg = 0.5 * q * sgn
        ph = -0.5 * p * sgn
    elif KIND == 4:  # skew forward KL(p || a p + (1 - a) q)
        lm = _logaddexp(lp + log_w, lq + log_1mw)
        d = lp - lm
        phi = p * d
        qg = -tl.exp(log_1mw + lp + lq - lm)
        ph = p * (d + 1.0 - tl.exp(log_w + d))
    else:  # KIND == 5, skew reverse KL(q || a q + (1 - a) p)
        lm = _logaddexp(lq + log_w, lp + log_1mw)
        d = lq - lm
        phi = q * d
        qg = q * (d + 1.0 - tl.exp(log_w + d))
        ph = -tl.exp(log_1mw + lp + lq - lm)
    return phi, qg, ph


@triton.jit
def _store_stats(loss_ptr, stats_ptr, o_n, m_n, m_s, ll_s, m_t, ll_t, loss, c_s, c_t):
    tl.store(loss_ptr + o_n, loss, mask=m_n)
    tl.store(stats_ptr + o_n * 6 + 0, m_s, mask=m_n)
    tl.store(stats_ptr + o_n * 6 + 1, ll_s, mask=m_n)
    tl.store(stats_ptr + o_n * 6 + 2, m_t, mask=m_n)
    tl.store(stats_ptr + o_n * 6 + 3, ll_t, mask=m_n)
    tl.store(stats_ptr + o_n * 6 + 4, c_s, mask=m_n)
    tl.store(stats_ptr + o_n * 6 + 5, c_t, mask=m_n)


@triton.jit
def _log_probs(s, t, valid, m_s, ll_s, m_t, ll_t):
    """``(s - m) - log l`` for both models, 0 on masked entries (see the note on statistics)."""
    lq = tl.where(valid, (s - m_s[:, None]) - ll_s[:, None], 0.0)
    lp = tl.where(valid, (t - m_t[:, None]) - ll_t[:, None], 0.0)
    return lq, lp


@triton.jit
def _row_sums(lq, lp, valid, KIND: tl.constexpr, log_w, log_1mw):
    """Per-row sums of phi, q*g and p*h over one tile: the loss and the two gradient constants."""
    phi, qg, ph = _terms(lq, lp, KIND, log_w, log_1mw)
    return (tl.sum(tl.where(valid, phi, 0.0), 1), tl.sum(tl.where(valid, qg, 0.0), 1),
            tl.sum(tl.where(valid, ph, 0.0), 1))


@triton.jit
def _grad_tiles(s, t, c_soft_s, c_soft_t, valid, m_s, ll_s, m_t, ll_t, c_s, c_t, scale_s, scale_t,
                KIND: tl.constexpr, log_w, log_1mw, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr):
    """dL/dz for both models on one tile; ``scale_s``, ``scale_t`` [BN] are the upstream gradient of each row times
    that model's ``inv_temp``."""
    lq, lp = _log_probs(s, t, valid, m_s, ll_s, m_t, ll_t)
    _, qg, ph = _terms(lq, lp, KIND, log_w, log_1mw)
    g_s = (qg - tl.exp(lq) * c_s[:, None]) * scale_s[:, None]
    g_t = (ph - tl.exp(lp) * c_t[:, None]) * scale_t[:, None]
    if SOFTCAP_S:
        g_s = g_s * (1.0 - c_soft_s * c_soft_s)
    if SOFTCAP_T:
        g_t = g_t * (1.0 - c_soft_t * c_soft_t)
    return tl.where(valid, g_s, 0.0), tl.where(valid, g_t, 0.0)


@triton.jit
def _model_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, o_n, o_v, N, V, HS, HT,
                 stride_hs, stride_ws, stride_ht, stride_wt, inv_temp_s, softcap_s, inv_temp_t, softcap_t,
                 HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr,
                 DOT_S: tl.constexpr, DOT_T: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Scaled logits tiles ``s``, ``t`` [BN, BV] of both models and their softcap tanh (for the gradient)."""
    z = _logits_tile(hs_ptr, ws_ptr, bs_ptr, o_n, o_v, N, V, HS, stride_hs, stride_ws,
                     HAS_BS, DOT_S, BLOCK_N, BLOCK_V, BLOCK_H)
    s, cap_s = _scale(z, inv_temp_s, softcap_s, SOFTCAP_S)
    z = _logits_tile(ht_ptr, wt_ptr, bt_ptr, o_n, o_v, N, V, HT, stride_ht, stride_wt,
                     HAS_BT, DOT_T, BLOCK_N, BLOCK_V, BLOCK_H)
    t, cap_t = _scale(z, inv_temp_t, softcap_t, SOFTCAP_T)
    return s, cap_s, t, cap_t


# ----------------------------------------------------------------------------------------------------------------------
# vocab-tiled strategy
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _fused_divergence_fwd_kernel(
    # data ptrs
    hs_ptr, ws_ptr, bs_ptr,   # student hidden [N, HS], head [V, HS], bias [V]
    ht_ptr, wt_ptr, bt_ptr,   # teacher hidden [N, HT], head [V, HT], bias [V]
    loss_ptr,                 # out [N] fp32: per-row divergence
    stats_ptr,                # out [N, 6] fp32: m_s, log l_s, m_t, log l_t, c_s, c_t
    # shapes
    N, V, HS, HT,
    # strides (rows; the last dimension is contiguous)
    stride_hs, stride_ws, stride_ht, stride_wt,
    # constants: each model's logits are softcap(z) * inv_temp; the divergence's mixture weights
    inv_temp_s, softcap_s, inv_temp_t, softcap_t, log_w, log_1mw,
    KIND: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
    SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr,
    DOT_S: tl.constexpr, DOT_T: tl.constexpr,   # each model's dot precision
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    o_n, m_n = _row_block(N, BLOCK_N)

    # pass 1: online max / sum-exp of both models
    m_s, l_s = _softmax_start(BLOCK_N)
    m_t, l_t = _softmax_start(BLOCK_N)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        valid = (o_v < V)[None, :]
        s, _, t, _ = _model_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, o_n, o_v, N, V, HS, HT,
                                  stride_hs, stride_ws, stride_ht, stride_wt,
                                  inv_temp_s, softcap_s, inv_temp_t, softcap_t, HAS_BS, HAS_BT, SOFTCAP_S, SOFTCAP_T,
                                  DOT_S, DOT_T, BLOCK_N, BLOCK_V, BLOCK_H)
        m_s, l_s = _online_update(tl.where(valid, s, LOG_ZERO), m_s, l_s)
        m_t, l_t = _online_update(tl.where(valid, t, LOG_ZERO), m_t, l_t)
    ll_s = tl.log(l_s)
    ll_t = tl.log(l_t)

    # pass 2: the loss and the gradient constants, entry by entry (as the backward will recompute them)
    loss = tl.zeros((BLOCK_N,), tl.float32)
    c_s = tl.zeros((BLOCK_N,), tl.float32)
    c_t = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        valid = (o_v < V)[None, :]
        s, _, t, _ = _model_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, o_n, o_v, N, V, HS, HT,
                                  stride_hs, stride_ws, stride_ht, stride_wt,
                                  inv_temp_s, softcap_s, inv_temp_t, softcap_t, HAS_BS, HAS_BT, SOFTCAP_S, SOFTCAP_T,
                                  DOT_S, DOT_T, BLOCK_N, BLOCK_V, BLOCK_H)
        lq, lp = _log_probs(s, t, valid, m_s, ll_s, m_t, ll_t)
        d_loss, d_cs, d_ct = _row_sums(lq, lp, valid, KIND, log_w, log_1mw)
        loss += d_loss
        c_s += d_cs
        c_t += d_ct
    _store_stats(loss_ptr, stats_ptr, o_n, m_n, m_s, ll_s, m_t, ll_t, loss, c_s, c_t)


@triton.jit
def _fused_divergence_bwd_kernel(
    # data ptrs
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr,
    stats_ptr,                   # [N, 6] fp32 from the forward
    row_grad_ptr,                # [N] fp32 upstream gradient of each row's loss (0 for ignored rows)
    ghs_ptr, gws_ptr, gbs_ptr,   # fp32 accumulators [N, HS], [V, HS], [V] (atomics)
    ght_ptr, gwt_ptr, gbt_ptr,   # fp32 accumulators [N, HT], [V, HT], [V]
    # shapes
    N, V, HS, HT,
    # strides
    stride_hs, stride_ws, stride_ht, stride_wt,
    # constants (as in the forward)
    inv_temp_s, softcap_s, inv_temp_t, softcap_t, log_w, log_1mw,
    KIND: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
    SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr,
    NEED_GHS: tl.constexpr, NEED_GWS: tl.constexpr, NEED_GBS: tl.constexpr,
    NEED_GHT: tl.constexpr, NEED_GWT: tl.constexpr, NEED_GBT: tl.constexpr,
    DOT_S: tl.constexpr, DOT_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    o_n, o_v, m_n, valid = _tile_2d(N, V, BLOCK_N, BLOCK_V)

    m_s = tl.load(stats_ptr + o_n * 6 + 0, mask=m_n, other=0.0)
    ll_s = tl.load(stats_ptr + o_n * 6 + 1, mask=m_n, other=0.0)
    m_t = tl.load(stats_ptr + o_n * 6 + 2, mask=m_n, other=0.0)
    ll_t = tl.load(stats_ptr + o_n * 6 + 3, mask=m_n, other=0.0)
    c_s = tl.load(stats_ptr + o_n * 6 + 4, mask=m_n, other=0.0)
    c_t = tl.load(stats_ptr + o_n * 6 + 5, mask=m_n, other=0.0)
    row_grad = tl.load(row_grad_ptr + o_n, mask=m_n, other=0.0)

    s, cap_s, t, cap_t = _model_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, o_n, o_v, N, V, HS, HT,
                                      stride_hs, stride_ws, stride_ht, stride_wt,
                                      inv_temp_s, softcap_s, inv_temp_t, softcap_t, HAS_BS, HAS_BT,
                                      SOFTCAP_S, SOFTCAP_T, DOT_S, DOT_T, BLOCK_N, BLOCK_V, BLOCK_H)
    g_s, g_t = _grad_tiles(s, t, cap_s, cap_t, valid, m_s, ll_s, m_t, ll_t, c_s, c_t,
                           row_grad * inv_temp_s, row_grad * inv_temp_t, KIND, log_w, log_1mw, SOFTCAP_S, SOFTCAP_T)
    if NEED_GHS or NEED_GWS or NEED_GBS:
        _accumulate_head_grads(g_s, hs_ptr, ws_ptr, ghs_ptr, gws_ptr, gbs_ptr, o_n, o_v, N, V, HS,
                               stride_hs, stride_ws, NEED_GHS, NEED_GWS, NEED_GBS, DOT_S, BLOCK_H)
    if NEED_GHT or NEED_GWT or NEED_GBT:
        _accumulate_head_grads(g_t, ht_ptr, wt_ptr, ght_ptr, gwt_ptr, gbt_ptr, o_n, o_v, N, V, HT,
                               stride_ht, stride_wt, NEED_GHT, NEED_GWT, NEED_GBT, DOT_T, BLOCK_H)


# ----------------------------------------------------------------------------------------------------------------------
# token-chunked strategy: rows of materialised chunk logits
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_tiles(zs_ptr, zt_ptr, o_n, o_v, valid, stride_zs, stride_zt, inv_temp_s, softcap_s, inv_temp_t, softcap_t,
                 SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr):
    """Scaled logits tiles of both models read from the chunk buffers, and their softcap tanh."""
    s, cap_s = _scale(tl.load(zs_ptr + o_n[:, None] * stride_zs + o_v[None, :], mask=valid, other=0.0),
                      inv_temp_s, softcap_s, SOFTCAP_S)
    t, cap_t = _scale(tl.load(zt_ptr + o_n[:, None] * stride_zt + o_v[None, :], mask=valid, other=0.0),
                      inv_temp_t, softcap_t, SOFTCAP_T)
    return s, cap_s, t, cap_t


@triton.jit
def _divergence_rows_kernel(
    # data ptrs
    zs_ptr, zt_ptr,         # [C, V] fp32 raw logits of the chunk; overwritten with dL/dz when grads are wanted
    loss_ptr,               # out [C] fp32
    stats_ptr,              # out [C, 6] fp32 (see the note on statistics)
    row_grad_ptr,           # [C] fp32 upstream gradient per row
    # shapes
    C, V,
    # strides
    stride_zs, stride_zt,
    # constants (as in the vocab-tiled kernels)
    inv_temp_s, softcap_s, inv_temp_t, softcap_t, log_w, log_1mw,
    KIND: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    o_n, m_n = _row_block(C, BLOCK_N)

    m_s, l_s = _softmax_start(BLOCK_N)
    m_t, l_t = _softmax_start(BLOCK_N)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        valid = m_n[:, None] & (o_v < V)[None, :]
        s, _, t, _ = _chunk_tiles(zs_ptr, zt_ptr, o_n, o_v, valid, stride_zs, stride_zt,
                                  inv_temp_s, softcap_s, inv_temp_t, softcap_t, SOFTCAP_S, SOFTCAP_T)
        m_s, l_s = _online_update(tl.where(valid, s, LOG_ZERO), m_s, l_s)
        m_t, l_t = _online_update(tl.where(valid, t, LOG_ZERO), m_t, l_t)
    ll_s = tl.log(l_s)
    ll_t = tl.log(l_t)

    loss = tl.zeros((BLOCK_N,), tl.float32)
    c_s = tl.zeros((BLOCK_N,), tl.float32)
    c_t = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        valid = m_n[:, None] & (o_v < V)[None, :]
        s, _, t, _ = _chunk_tiles(zs_ptr, zt_ptr, o_n, o_v, valid, stride_zs, stride_zt,
                                  inv_temp_s, softcap_s, inv_temp_t, softcap_t, SOFTCAP_S, SOFTCAP_T)
        lq, lp = _log_probs(s, t, valid, m_s, ll_s, m_t, ll_t)
        d_loss, d_cs, d_ct = _row_sums(lq, lp, valid, KIND, log_w, log_1mw)
        loss += d_loss
        c_s += d_cs
        c_t += d_ct
    _store_stats(loss_ptr, stats_ptr, o_n, m_n, m_s, ll_s, m_t, ll_t, loss, c_s, c_t)

    if GRAD_S or GRAD_T:
        row_grad = tl.load(row_grad_ptr + o_n, mask=m_n, other=0.0)
        for v0 in range(0, V, BLOCK_V):
            o_v = v0 + tl.arange(0, BLOCK_V)
            valid = m_n[:, None] & (o_v < V)[None, :]
            s, cap_s, t, cap_t = _chunk_tiles(zs_ptr, zt_ptr, o_n, o_v, valid, stride_zs, stride_zt,
                                              inv_temp_s, softcap_s, inv_temp_t, softcap_t, SOFTCAP_S, SOFTCAP_T)
            g_s, g_t = _grad_tiles(s, t, cap_s, cap_t, valid, m_s, ll_s, m_t, ll_t, c_s, c_t,
                                   row_grad * inv_temp_s, row_grad * inv_temp_t, KIND, log_w, log_1mw,
                                   SOFTCAP_S, SOFTCAP_T)
            if GRAD_S:
                tl.store(zs_ptr + o_n[:, None] * stride_zs + o_v[None, :], g_s, mask=valid)
            if GRAD_T:
                tl.store(zt_ptr + o_n[:, None] * stride_zt + o_v[None, :], g_t, mask=valid)


# ----------------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------------
def fused_divergence_fwd(hs, ws, bs, ht, wt, bt, *, kind: int, log_w: float, log_1mw: float,
                         inv_temp: tuple, softcap: tuple, vocab_size: int):
    """Vocab-tiled forward. hs [N, HS], ws [V_pad, HS], bs [V_pad] | None, likewise for the teacher; ``inv_temp``
    and ``softcap`` are (student, teacher) pairs (softcap 0: none).

    Returns ``loss [N]`` fp32 (per-row divergence) and ``stats [N, 6]`` fp32 (m_s, log l_s, m_t, log l_t, c_s, c_t).
    """
    check_supported(hs, ws, bs, ht, wt, bt)
    dots = dict(DOT_S=dot_precision(hs.dtype), DOT_T=dot_precision(ht.dtype))
    cfg = tile_config(hs.device, "tiled_fwd", hs.dtype, ht.dtype)
    hs, ws, bs, ht, wt, bt = interpreter_safe(*(rowmajor(x) for x in (hs, ws, bs, ht, wt, bt)))
    n = hs.shape[0]
    loss = torch.empty(n, device=hs.device, dtype=torch.float32)
    stats = torch.empty(n, 6, device=hs.device, dtype=torch.float32)
    scaling, flags = scaling_args(inv_temp, softcap)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _fused_divergence_fwd_kernel[grid](
        hs, ws, bs, ht, wt, bt, loss, stats,
        n, vocab_size, hs.shape[1], ht.shape[1],
        hs.stride(0), ws.stride(0), ht.stride(0), wt.stride(0),
        *scaling, log_w, log_1mw,
        KIND=kind, HAS_BS=bs is not None, HAS_BT=bt is not None, **flags, **dots, **cfg,
    )
    return loss, stats


def fused_divergence_bwd(hs, ws, bs, ht, wt, bt, stats, row_grad, *, kind: int, log_w: float, log_1mw: float,
                         inv_temp: tuple, softcap: tuple, vocab_size: int, needs: tuple):
    """Vocab-tiled backward. ``row_grad [N]`` fp32 is the upstream gradient of each row's loss.

    needs: six bools (grad of hs, ws, bs, ht, wt, bt). Returns those six gradients (None where not needed) in the
    inputs' dtypes; padded vocabulary rows get zero gradient.
    """
    check_supported(hs, ws, bs, ht, wt, bt)
    dtypes = (hs.dtype, ws.dtype, ws.dtype, ht.dtype, wt.dtype, wt.dtype)
    dots = dict(DOT_S=dot_precision(hs.dtype), DOT_T=dot_precision(ht.dtype))
    cfg = tile_config(hs.device, "tiled_bwd", hs.dtype, ht.dtype)
    hs, ws, bs, ht, wt, bt = interpreter_safe(*(rowmajor(x) for x in (hs, ws, bs, ht, wt, bt)))
    f32 = dict(device=hs.device, dtype=torch.float32)
    shapes = (hs.shape, ws.shape, ws.shape[:1], ht.shape, wt.shape, wt.shape[:1])
    bufs = [torch.zeros(shape, **f32) if need else None for need, shape in zip(needs, shapes)]
    dummy = torch.empty(1, **f32)  # a pointer for buffers the kernel is told not to touch
    ptrs = [b if b is not None else dummy for b in bufs]
    n = hs.shape[0]
    scaling, flags = scaling_args(inv_temp, softcap)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(vocab_size, cfg["BLOCK_V"]))
    _fused_divergence_bwd_kernel[grid](
        hs, ws, bs, ht, wt, bt, stats, row_grad.float().contiguous(), *ptrs,
        n, vocab_size, hs.shape[1], ht.shape[1],
        hs.stride(0), ws.stride(0), ht.stride(0), wt.stride(0),
        *scaling, log_w, log_1mw,
        KIND=kind, HAS_BS=bs is not None, HAS_BT=bt is not None, **flags,
        NEED_GHS=needs[0], NEED_GWS=needs[1], NEED_GBS=needs[2],
        NEED_GHT=needs[3], NEED_GWT=needs[4], NEED_GBT=needs[5], **dots, **cfg,
    )
    return tuple(None if b is None else b.to(dt) for b, dt in zip(bufs, dtypes))


def divergence_rows(zs, zt, row_grad, cfg, grad_s: bool, grad_t: bool):
    """The rows function of the chunked strategy (minillm_fast.chunked.Rows): zs, zt [C, V] fp32 raw chunk logits
    (contiguous rows); row_grad [C] fp32 or None (no gradients); ``cfg`` the op's DivergenceConfig (its
    ``triton_args``: the divergence, each model's inv_temp and softcap).

    Returns ``loss [C]``, ``stats [C, 6]``; when grad_s / grad_t, zs / zt are overwritten in place with dL/dz
    (already multiplied by row_grad) and returned, else None.
    """
    check_supported(zs, zt)
    c, v = zs.shape
    args = cfg.triton_args
    if row_grad is None:
        row_grad = zs.new_zeros(c)
    loss = torch.empty(c, device=zs.device, dtype=torch.float32)
    stats = torch.empty(c, 6, device=zs.device, dtype=torch.float32)
    scaling, flags = scaling_args(args["inv_temp"], args["softcap"])
    tiles = tile_config(zs.device, "rows", zs.dtype)
    _divergence_rows_kernel[(triton.cdiv(c, tiles["BLOCK_N"]),)](
        zs, zt, loss, stats, row_grad.float().contiguous(),
        c, v, zs.stride(0), zt.stride(0),
        *scaling, args["log_w"], args["log_1mw"],
        KIND=args["kind"], **flags, GRAD_S=grad_s, GRAD_T=grad_t, **tiles,
    )
    return loss, stats, (zs if grad_s else None), (zt if grad_t else None)
