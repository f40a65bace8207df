"""Triton kernels of the fused token log-probs (minillm_fast.token_logprobs).

Math. Per row i with target y, ``s = softcap(h W^T + b) / T`` over the first V rows of the head, ``lq = s - lse(s)``,
``q = exp(lq)``. The op returns ``lq[y]`` and, optionally, the entropy ``H = -sum_v q_v lq_v``. Their gradients with
respect to s are

    d lq[y] / ds = onehot(y) - q            dH / ds = -q * (lq + H)

so for upstream gradients ``a_i`` (log-prob) and ``e_i`` (entropy) the gradient tile is
``G = (a (onehot(y) - q) - e q (lq + H)) / T``, times ``1 - tanh^2(z / softcap)`` under a softcap; it feeds the two
matmuls ``grad_h = G W`` and ``grad_W = G^T h`` (and ``grad_b = sum_rows G``).

Tiling. The forward streams vocabulary tiles through ``tl.dot`` (the logits never leave registers) and keeps per row
an online max ``m`` and sum-exp ``l`` (the helpers of kernels/fused_divergence.py), the target's logit (picked out of
the tile it falls in) and, for the entropy, the shifted accumulator ``sum e^(s - m) (s - m)`` (the KL numerator of
``_kl_update`` against a flat second distribution). The vocabulary is split across programs as well as the rows
(grid ``[row blocks, vocab splits]``): at generation or small-batch time N is a few rows and one program per row
block would leave the GPU idle. Each program writes its partial statistics ``[N, S, 4]`` and the launcher merges
the S partials in O(N S) (``merge_lse``). The forward saves two numbers per row for the backward, the max M and
``log L = log sum e^(s - M)``: log-probs are formed as ``(s - M) - log L``, which stays exact near the max at large
logits (T = 0.05, or logits ~1e4), where ``s - lse`` would round at lse's magnitude. The backward recomputes every
(row block, vocab block) tile on a 2D grid, forms G, and adds its two products into fp32 gradient buffers with
atomics (``_accumulate_head_grads``, shared with the fused divergence; gradient sums are therefore not bitwise
deterministic on GPU), so nothing O(N V) is ever stored: the forward costs one matmul-equivalent, the backward three.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .configs import check_supported, dot_precision, interpreter_safe, rowmajor, tile_config
from .tiles import (LOG_ZERO, _accumulate_head_grads, _gather, _kl_update, _logits_tile, _online_update, _row_block,
                    _scale, _softmax_start, _split_range, _tile_2d)

__all__ = ["merge_lse", "split_config", "token_logprobs_bwd", "token_logprobs_fwd"]

# Partial statistics per (row, vocab split), in this order along the last axis.
_M, _L, _ACC, _SY = range(4)
_N_PART = 4


# ----------------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _token_logprobs_fwd_kernel(
    # data ptrs
    h_ptr, w_ptr, b_ptr,   # hidden [N, H], head [V_pad, H], bias [V_pad]
    y_ptr,                 # targets [N] int64 (ignored rows hold any value; they are masked by the caller)
    part_ptr,              # out [N, S, 4] fp32: running max, sum-exp, entropy numerator, target logit
    # shapes
    N, V, H,
    SPLIT_V,               # vocabulary entries per split (a multiple of BLOCK_V); S = cdiv(V, SPLIT_V)
    # strides (rows; the last dimension is contiguous)
    stride_h, stride_w,
    # constants
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, USE_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    o_n, m_n = _row_block(N, BLOCK_N)
    i_s = tl.program_id(1)  # this program's vocabulary split, of n_s
    n_s = tl.num_programs(1)
    y = tl.load(y_ptr + o_n, mask=m_n, other=-1)

    m, l = _softmax_start(BLOCK_N)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    s_y = tl.zeros((BLOCK_N,), tl.float32)
    flat = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)  # the entropy numerator is a KL numerator against b = 0
    zero_n = tl.zeros((BLOCK_N,), tl.float32)
    v_start, v_stop = _split_range(V, SPLIT_V)
    for v0 in range(v_start, v_stop, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        valid = (o_v < V)[None, :]
        z = _logits_tile(h_ptr, w_ptr, b_ptr, o_n, o_v, N, V, H, stride_h, stride_w,
                         HAS_BIAS, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        s, _ = _scale(z, inv_temp, softcap, USE_SOFTCAP)
        s = tl.where(valid, s, LOG_ZERO)
        s_y += _gather(s, o_v, y)
        m_new, l_new = _online_update(s, m, l)
        if ENTROPY:
            acc = _kl_update(s, flat, valid, m, l, zero_n, m_new, zero_n, acc)
        m, l = m_new, l_new

    base = part_ptr + (o_n * n_s + i_s) * 4
    tl.store(base + 0, m, mask=m_n)
    tl.store(base + 1, l, mask=m_n)
    tl.store(base + 2, acc, mask=m_n)
    tl.store(base + 3, s_y, mask=m_n)


@triton.jit
def _token_logprobs_bwd_kernel(
    # data ptrs
    h_ptr, w_ptr, b_ptr,
    y_ptr,                    # targets [N] int64
    stats_ptr,                # [N, 2] fp32 from the forward: row max M, log sum e^(s - M)
    ent_ptr,                  # [N] fp32 entropy from the forward (only read when ENTROPY)
    g_lp_ptr, g_ent_ptr,      # [N] fp32 upstream gradients of the log-prob and the entropy (0 on ignored rows)
    gh_ptr, gw_ptr, gb_ptr,   # fp32 accumulators [N, H], [V_pad, H], [V_pad] (atomics)
    # shapes
    N, V, H,
    # strides
    stride_h, stride_w,
    # constants
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, USE_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr,
    NEED_GH: tl.constexpr, NEED_GW: tl.constexpr, NEED_GB: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    o_n, o_v, m_n, valid = _tile_2d(N, V, BLOCK_N, BLOCK_V)

    y = tl.load(y_ptr + o_n, mask=m_n, other=-1)
    big = tl.load(stats_ptr + o_n * 2 + 0, mask=m_n, other=0.0)
    log_l = tl.load(stats_ptr + o_n * 2 + 1, mask=m_n, other=0.0)
    g_lp = tl.load(g_lp_ptr + o_n, mask=m_n, other=0.0)

    z = _logits_tile(h_ptr, w_ptr, b_ptr, o_n, o_v, N, V, H, stride_h, stride_w,
                     HAS_BIAS, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    s, cap = _scale(z, inv_temp, softcap, USE_SOFTCAP)
    lq = tl.where(valid, (s - big[:, None]) - log_l[:, None], LOG_ZERO)
    q = tl.exp(lq)
    onehot = tl.where(o_v[None, :] == y[:, None], 1.0, 0.0)
    g = g_lp[:, None] * (onehot - q)
    if ENTROPY:
        ent = tl.load(ent_ptr + o_n, mask=m_n, other=0.0)
        g_ent = tl.load(g_ent_ptr + o_n, mask=m_n, other=0.0)
        g -= g_ent[:, None] * q * (tl.where(valid, lq, 0.0) + ent[:, None])
    g = g * inv_temp
    if USE_SOFTCAP:
        g = g * (1.0 - cap * cap)
    g = tl.where(valid, g, 0.0)
    _accumulate_head_grads(g, h_ptr, w_ptr, gh_ptr, gw_ptr, gb_ptr, o_n, o_v, N, V, H, stride_h, stride_w,
                           NEED_GH, NEED_GW, NEED_GB, DOT_PRECISION, BLOCK_H)


# ----------------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------------
def split_config(n: int, vocab: int, device: torch.device, *dtypes: torch.dtype, kernel: str = "split_fwd") -> dict:
    """Tile sizes and the vocabulary split of the one-pass forward kernels (grid ``[cdiv(n, BLOCK_N), S]``).

    On CUDA the vocabulary is split until there are about two programs per SM (a decode step has a handful of rows);
    under the interpreter it is split in two where it can be, so the merge is always exercised by the tests, and
    large row counts take very large row blocks: the interpreter's cost is per program and per op, hardly per
    element, so the sampler's statistical tests (thousands of rows) run in seconds.
    """
    cfg = tile_config(device, kernel, *dtypes)
    arch = configs.device_arch(device)
    if arch is not configs.INTERPRETER:
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(n)))
        target = 2 * arch.sm_count
    else:
        cfg["BLOCK_N"] = 16 if n <= 256 else 1024
        cfg["BLOCK_V"] = min(cfg["BLOCK_V"], max(16, triton.next_power_of_2(vocab)))
        target = 2
    row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    tiles = triton.cdiv(vocab, cfg["BLOCK_V"])
    splits = max(1, min(tiles, target // row_blocks))
    tiles_per_split = triton.cdiv(tiles, splits)
    cfg["SPLIT_V"] = tiles_per_split * cfg["BLOCK_V"]
    cfg["splits"] = triton.cdiv(tiles, tiles_per_split)  # no split is empty
    return cfg


def merge_lse(m: torch.Tensor, l: torch.Tensor):
    """Merge per-split online-softmax statistics ``m, l [N, S]``: returns the global max ``M [N]``, the total
    ``L [N]`` (so ``lse = M + log L``) and each split's weight ``e^(m - M) [N, S]``.

    Log-probs are formed as ``(x - M) - log L``, not ``x - lse``: at large logits (T = 0.05, |s| ~ 1e2..1e4) lse
    rounds at its own magnitude, while ``x - M`` is exact for the entries that matter."""
    big = m.max(dim=1).values
    w = torch.exp(m - big[:, None])
    return big, (l * w).sum(1), w


def token_logprobs_fwd(h, w, b, y, *, inv_temp: float, softcap: float, vocab_size: int, entropy: bool):
    """Vocab-tiled forward. h [N, H], w [V_pad, H], b [V_pad] | None, y [N] int (in [0, vocab_size) or ignored);
    the logits are ``softcap(h W^T + b) * inv_temp`` (softcap 0: none).

    Returns fp32 ``logprob [N]`` (``lq[y]``; meaningless on ignored rows, which the caller masks), ``stats [N, 2]``
    (the row max M and ``log sum e^(s - M)``: lse = their sum, kept apart for the backward's precision) and
    ``entropy [N]`` (None unless asked).
    """
    check_supported(h, w, b)
    dot = dot_precision(h.dtype)
    n = h.shape[0]
    cfg = split_config(n, vocab_size, h.device, h.dtype)
    h, w, b = interpreter_safe(rowmajor(h), rowmajor(w), b)
    splits = cfg.pop("splits")
    part = torch.empty(n, splits, _N_PART, device=h.device, dtype=torch.float32)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), splits)
    _token_logprobs_fwd_kernel[grid](
        h, w, b, y.to(torch.int64).contiguous(), part,
        n, vocab_size, h.shape[1], cfg.pop("SPLIT_V"),
        h.stride(0), w.stride(0),
        float(inv_temp), float(softcap),
        HAS_BIAS=b is not None, USE_SOFTCAP=softcap > 0, ENTROPY=entropy, DOT_PRECISION=dot, **cfg,
    )
    big, total, wgt = merge_lse(part[..., _M], part[..., _L])
    log_total = torch.log(total)
    logprob = (part[..., _SY].sum(1) - big) - log_total
    ent = None
    if entropy:
        # sum_v e^(s - M) (s - M) over all splits, then H = log L - that / L.
        num = (wgt * (part[..., _ACC] + part[..., _L] * (part[..., _M] - big[:, None]))).sum(1)
        ent = log_total - num / total
    return logprob, torch.stack([big, log_total], 1), ent


def token_logprobs_bwd(h, w, b, y, stats, ent, g_lp, g_ent, *, inv_temp: float, softcap: float, vocab_size: int,
                       needs: tuple):
    """Vocab-tiled backward. ``stats [N, 2]`` from the forward; ``g_lp [N]`` (and ``g_ent [N]`` with ``ent [N]``
    when the entropy has a gradient, else both None) are the upstream gradients, already zero on ignored rows.

    needs: three bools (grad of h, w, b). Returns those gradients (None where not needed) in the inputs' dtypes;
    padded vocabulary rows get zero gradient.
    """
    check_supported(h, w, b)
    dtypes = (h.dtype, w.dtype, w.dtype)
    dot = dot_precision(h.dtype)
    cfg = tile_config(h.device, "logprobs_bwd", h.dtype)
    h, w, b = interpreter_safe(rowmajor(h), rowmajor(w), b)
    f32 = dict(device=h.device, dtype=torch.float32)
    shapes = (h.shape, w.shape, w.shape[:1])
    needs = (needs[0], needs[1], needs[2] and b is not None)
    bufs = [torch.zeros(shape, **f32) if need else None for need, shape in zip(needs, shapes)]
    dummy = torch.empty(1, **f32)  # a pointer for buffers and inputs the kernel is told not to touch
    ptrs = [x if x is not None else dummy for x in bufs]
    with_ent = ent is not None
    n = h.shape[0]
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(vocab_size, cfg["BLOCK_V"]))
    _token_logprobs_bwd_kernel[grid](
        h, w, b, y.to(torch.int64).contiguous(), stats.float().contiguous(),
        ent.float().contiguous() if with_ent else dummy,
        g_lp.float().contiguous(), g_ent.float().contiguous() if with_ent else dummy, *ptrs,
        n, vocab_size, h.shape[1],
        h.stride(0), w.stride(0),
        float(inv_temp), float(softcap),
        HAS_BIAS=b is not None, USE_SOFTCAP=softcap > 0, ENTROPY=with_ent,
        NEED_GH=needs[0], NEED_GW=needs[1], NEED_GB=needs[2], DOT_PRECISION=dot, **cfg,
    )
    return tuple(None if x is None else x.to(dt) for x, dt in zip(bufs, dtypes))
