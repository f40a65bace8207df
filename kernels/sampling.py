"""Triton kernels of rollout time: mixture sampling and rollout statistics (minillm_fast.ops.sampling).

Notation as in docs/design.md section 2: student ``s = softcap(h_s W_s^T + b_s) / T``, ``q = softmax(s)``; teacher
``t``, ``p``; the MiniLLM rollout distribution is the mixture ``m = alpha p + (1 - alpha) q`` (alpha weights the
teacher).

Mixture sampling (`_sample_kernel`), exact and in one pass over the vocabulary. A draw from a two-component mixture
is "pick the component (teacher with probability alpha), then draw from it"; a draw from ``softmax(x)`` is the
Gumbel-max ``argmax_v x_v + G_v`` with i.i.d. standard Gumbel ``G_v = -log(-log U_v)``. Both need no normalisation,
so one sweep over the vocabulary tiles does everything: it streams both rows' online max / sum-exp (for the lse),
keeps the running best ``x + G`` of the chosen component with its token and the two models' logits there, and the
launcher returns ``log q(y) = (s_y - M_s) - log L_s`` and ``log p(y)``, from which the caller forms ``log m(y) =
logaddexp(log alpha + log p(y), log(1 - alpha) + log q(y))``. ``sample`` with one model skips the teacher tiles.

Random numbers come from Triton's Philox (``tl.philox``, the generator behind ``tl.rand``) keyed by a 64-bit seed
that the caller draws from a torch generator, with counters ``(v, row, stream, 0)``: stream 0 gives the Gumbel noise
of entry (row, v), stream 1 the component coin of the row. The noise of an entry depends only on (seed, row, v), so
the draw does not depend on the tile sizes or on how the vocabulary is split across programs (a test checks this).
``tl.philox`` runs under TRITON_INTERPRET as well: the interpreter executes the same Philox integer arithmetic on
numpy, so the CPU tests need no stand-in generator (bit equality with a GPU's draws follows from that, but the suite
does not check it). ``U`` comes from ``tl.uint_to_uniform_float`` (31 random bits): U = 0 gives G = -inf (never
chosen), and the float32 spacing below 1 caps G near -log(2^-24) ~ 16.6, a truncation of probability ~1e-7 per
entry, as in every float32 Gumbel / exponential-race sampler.

Rollout statistics (`_rollout_statistics_kernel`): the same sweep over both models' tiles, collecting the online
max / sum-exp of both, the two logits at the given token and the reverse-KL numerator of ``_kl_update``; one pass
gives ``log q(y)``, ``log p(y)`` and ``KL(q || p)`` (hence ``log m(y)`` and the importance weight ``q(y) / m(y)``).

Both kernels split the vocabulary across programs as well as the rows (grid ``[row blocks, vocab splits]``, see
kernels/token_logprobs.py) and write O(N S) partials that the launchers merge. No gradients: rollouts are data.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import check_supported, dot_precision, interpreter_safe, rowmajor, scaling_args
from .tiles import (LOG_ZERO, _gather, _kl_update, _logits_tile, _online_update, _row_block, _scale, _softmax_start,
                    _split_range)
from .token_logprobs import merge_lse, split_config

__all__ = ["rollout_statistics", "sample"]

# Partials per (row, split) of the rollout statistics and of the sampler, in this order along the last axis.
_M_S, _L_S, _M_T, _L_T, _ACC, _S_Y, _T_Y = range(7)
_BEST = _ACC  # the sampler keeps its best Gumbel score where the statistics keep the KL numerator


@triton.jit
def _uniform(seed, c0, c1, STREAM: tl.constexpr):
    """U[0, 1) float32 from Philox with counters (c0, c1, STREAM, 0); c0, c1 int32 blocks of one shape."""
    c2 = c0 * 0 + STREAM
    r, _, _, _ = tl.philox(seed, c0, c1, c2, c0 * 0)
    return tl.uint_to_uniform_float(r)


@triton.jit
def _student_teacher_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, o_n, o_v, valid, N, V, HS, HT,
                           stride_hs, stride_ws, stride_ht, stride_wt,
                           inv_temp_s, softcap_s, inv_temp_t, softcap_t,
                           HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr,
                           TEACHER: tl.constexpr, DOT_S: tl.constexpr, DOT_T: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Scaled logits tiles ``s`` and ``t`` (LOG_ZERO outside the vocabulary); ``t`` is ``s`` without a teacher."""
    z = _logits_tile(hs_ptr, ws_ptr, bs_ptr, o_n, o_v, N, V, HS, stride_hs, stride_ws,
                     HAS_BS, DOT_S, BLOCK_N, BLOCK_V, BLOCK_H)
    s, _ = _scale(z, inv_temp_s, softcap_s, SOFTCAP_S)
    s = tl.where(valid, s, LOG_ZERO)
    if TEACHER:
        z = _logits_tile(ht_ptr, wt_ptr, bt_ptr, o_n, o_v, N, V, HT, stride_ht, stride_wt,
                         HAS_BT, DOT_T, BLOCK_N, BLOCK_V, BLOCK_H)
        t, _ = _scale(z, inv_temp_t, softcap_t, SOFTCAP_T)
        t = tl.where(valid, t, LOG_ZERO)
    else:
        t = s
    return s, t


@triton.jit
def _store_partials(part_ptr, o_n, m_n, i_s, n_s, m_s, l_s, m_t, l_t, acc, s_y, t_y):
    base = part_ptr + (o_n * n_s + i_s) * 7
    tl.store(base + 0, m_s, mask=m_n)
    tl.store(base + 1, l_s, mask=m_n)
    tl.store(base + 2, m_t, mask=m_n)
    tl.store(base + 3, l_t, mask=m_n)
    tl.store(base + 4, acc, mask=m_n)
    tl.store(base + 5, s_y, mask=m_n)
    tl.store(base + 6, t_y, mask=m_n)


# ----------------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _rollout_statistics_kernel(
    # data ptrs
    hs_ptr, ws_ptr, bs_ptr,   # student hidden [N, HS], head [V_pad, HS], bias [V_pad]
    ht_ptr, wt_ptr, bt_ptr,   # teacher hidden [N, HT], head [V_pad, HT], bias [V_pad]
    y_ptr,                    # tokens [N] int64, in [0, V)
    part_ptr,                 # out [N, S, 7] fp32: m_s, l_s, m_t, l_t, KL numerator, s[y], t[y]
    # shapes
    N, V, HS, HT,
    SPLIT_V,                  # vocabulary entries per split (a multiple of BLOCK_V)
    # strides (rows; the last dimension is contiguous)
    stride_hs, stride_ws, stride_ht, stride_wt,
    # constants: each model's logits are softcap(z) * inv_temp (softcap 0: none)
    inv_temp_s, softcap_s, inv_temp_t, softcap_t,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr,
    DOT_S: tl.constexpr, DOT_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    o_n, m_n = _row_block(N, BLOCK_N)
    i_s = tl.program_id(1)  # this program's vocabulary split, of n_s
    n_s = tl.num_programs(1)
    y = tl.load(y_ptr + o_n, mask=m_n, other=-1)

    m_s, l_s = _softmax_start(BLOCK_N)
    m_t, l_t = _softmax_start(BLOCK_N)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    s_y = tl.zeros((BLOCK_N,), tl.float32)
    t_y = tl.zeros((BLOCK_N,), tl.float32)
    v_start, v_stop = _split_range(V, SPLIT_V)
    for v0 in range(v_start, v_stop, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        valid = (o_v < V)[None, :]
        s, t = _student_teacher_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, o_n, o_v, valid, N, V, HS, HT,
                                      stride_hs, stride_ws, stride_ht, stride_wt,
                                      inv_temp_s, softcap_s, inv_temp_t, softcap_t, HAS_BS, HAS_BT,
                                      SOFTCAP_S, SOFTCAP_T, True, DOT_S, DOT_T, BLOCK_N, BLOCK_V, BLOCK_H)
        s_y += _gather(s, o_v, y)
        t_y += _gather(t, o_v, y)
        m_s_new, l_s_new = _online_update(s, m_s, l_s)
        m_t_new, l_t_new = _online_update(t, m_t, l_t)
        acc = _kl_update(s, t, valid, m_s, l_s, m_t, m_s_new, m_t_new, acc)
        m_s, l_s, m_t, l_t = m_s_new, l_s_new, m_t_new, l_t_new
    _store_partials(part_ptr, o_n, m_n, i_s, n_s, m_s, l_s, m_t, l_t, acc, s_y, t_y)


@triton.jit
def _sample_kernel(
    # data ptrs
    hs_ptr, ws_ptr, bs_ptr,   # student hidden [N, HS], head [V_pad, HS], bias [V_pad]
    ht_ptr, wt_ptr, bt_ptr,   # teacher (unused without TEACHER)
    seed_ptr,                 # [1] int64 Philox key
    part_ptr,                 # out [N, S, 7] fp32: m_s, l_s, m_t, l_t, best score, s[best], t[best]
    tok_ptr,                  # out [N, S] int32: the split's best token
    # shapes
    N, V, HS, HT,
    SPLIT_V,
    # strides
    stride_hs, stride_ws, stride_ht, stride_wt,
    # constants
    inv_temp_s, softcap_s, inv_temp_t, softcap_t,
    alpha,                    # probability of the teacher component (0 without TEACHER)
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr,
    TEACHER: tl.constexpr, DOT_S: tl.constexpr, DOT_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    o_n, m_n = _row_block(N, BLOCK_N)
    i_s = tl.program_id(1)  # this program's vocabulary split, of n_s
    n_s = tl.num_programs(1)
    seed = tl.load(seed_ptr)
    # The component coin of each row: the same in every split, since it only depends on (seed, row).
    use_t = _uniform(seed, o_n * 0, o_n, 1) < alpha

    m_s, l_s = _softmax_start(BLOCK_N)
    m_t, l_t = _softmax_start(BLOCK_N)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    tok = tl.zeros((BLOCK_N,), tl.int32)
    s_b = tl.zeros((BLOCK_N,), tl.float32)
    t_b = tl.zeros((BLOCK_N,), tl.float32)
    v_start, v_stop = _split_range(V, SPLIT_V)
    for v0 in range(v_start, v_stop, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        valid = (o_v < V)[None, :]
        s, t = _student_teacher_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, o_n, o_v, valid, N, V, HS, HT,
                                      stride_hs, stride_ws, stride_ht, stride_wt,
                                      inv_temp_s, softcap_s, inv_temp_t, softcap_t, HAS_BS, HAS_BT,
                                      SOFTCAP_S, SOFTCAP_T, TEACHER, DOT_S, DOT_T, BLOCK_N, BLOCK_V, BLOCK_H)
        m_s, l_s = _online_update(s, m_s, l_s)
        if TEACHER:
            m_t, l_t = _online_update(t, m_t, l_t)
            x = tl.where(use_t[:, None], t, s)
        else:
            x = s
        u = _uniform(seed, o_v[None, :] + 0 * o_n[:, None], o_n[:, None] + 0 * o_v[None, :], 0)
        score = tl.where(valid, x - tl.log(-tl.log(u)), float("-inf"))
        tile_best = tl.max(score, 1)
        tile_tok = tl.argmax(score, 1) + v0
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        tok = tl.where(better, tile_tok, tok)
        s_b = tl.where(better, _gather(s, o_v, tile_tok), s_b)
        t_b = tl.where(better, _gather(t, o_v, tile_tok), t_b)
    _store_partials(part_ptr, o_n, m_n, i_s, n_s, m_s, l_s, m_t, l_t, best, s_b, t_b)
    tl.store(tok_ptr + o_n * n_s + i_s, tok, mask=m_n)


# ----------------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------------
def rollout_statistics(hs, ws, bs, ht, wt, bt, tokens, *, inv_temp: tuple, softcap: tuple, vocab_size: int):
    """One pass over both models' vocabulary tiles. hs [N, HS], ws [V_pad, HS], bs [V_pad] | None, likewise the
    teacher; tokens [N] int in [0, vocab_size); ``inv_temp``, ``softcap`` (student, teacher) pairs.

    Returns fp32 ``[N]`` tensors log q(y), log p(y) and KL(q || p) (the caller forms the mixture terms).
    """
    check_supported(hs, ws, bs, ht, wt, bt)
    n = hs.shape[0]
    dots = dict(DOT_S=dot_precision(hs.dtype), DOT_T=dot_precision(ht.dtype))
    cfg = split_config(n, vocab_size, hs.device, hs.dtype, ht.dtype)
    hs, ws, bs, ht, wt, bt = interpreter_safe(*(rowmajor(x) for x in (hs, ws, bs, ht, wt, bt)))
    scaling, flags = scaling_args(inv_temp, softcap)
    splits = cfg.pop("splits")
    part = torch.empty(n, splits, 7, device=hs.device, dtype=torch.float32)
    _rollout_statistics_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), splits)](
        hs, ws, bs, ht, wt, bt, tokens.to(torch.int64).contiguous(), part,
        n, vocab_size, hs.shape[1], ht.shape[1], cfg.pop("SPLIT_V"),
        hs.stride(0), ws.stride(0), ht.stride(0), wt.stride(0),
        *scaling,
        HAS_BS=bs is not None, HAS_BT=bt is not None, **flags, **dots, **cfg,
    )
    big_s, tot_s, w_s = merge_lse(part[..., _M_S], part[..., _L_S])
    big_t, tot_t, _ = merge_lse(part[..., _M_T], part[..., _L_T])
    # Rebase each split's KL numerator to the global maxima (as _kl_update does tile by tile), then
    # KL = num / L_s - log L_s + log L_t.
    shift = (part[..., _M_S] - big_s[:, None]) - (part[..., _M_T] - big_t[:, None])
    num = (w_s * (part[..., _ACC] + part[..., _L_S] * shift)).sum(1)
    rkl = num / tot_s - torch.log(tot_s) + torch.log(tot_t)
    lq = (part[..., _S_Y].sum(1) - big_s) - torch.log(tot_s)
    lp = (part[..., _T_Y].sum(1) - big_t) - torch.log(tot_t)
    return lq, lp, rkl


def sample(hs, ws, bs, ht, wt, bt, seed, *, alpha: float, inv_temp: tuple, softcap: tuple, vocab_size: int):
    """Draw one token per row from ``alpha p + (1 - alpha) q`` (from q alone when ht is None); ``inv_temp``,
    ``softcap`` (student, teacher) pairs (the teacher's ignored without a teacher).

    seed: [1] int64 tensor on the device (the Philox key). Returns ``tokens [N]`` int64 and fp32 ``[N]`` log q(y)
    and log p(y) (None without a teacher); the caller forms log m(y).
    """
    teacher = ht is not None
    check_supported(hs, ws, bs, ht, wt, bt)
    if not teacher:  # pointers the kernel never reads
        ht, wt, bt, alpha = hs, ws, None, 0.0
        inv_temp, softcap = (inv_temp[0], inv_temp[0]), (softcap[0], softcap[0])
    n = hs.shape[0]
    dots = dict(DOT_S=dot_precision(hs.dtype), DOT_T=dot_precision(ht.dtype))
    cfg = split_config(n, vocab_size, hs.device, hs.dtype, ht.dtype, kernel="sample")
    hs, ws, bs, ht, wt, bt = interpreter_safe(*(rowmajor(x) for x in (hs, ws, bs, ht, wt, bt)))
    scaling, flags = scaling_args(inv_temp, softcap)
    splits = cfg.pop("splits")
    part = torch.empty(n, splits, 7, device=hs.device, dtype=torch.float32)
    tok = torch.empty(n, splits, device=hs.device, dtype=torch.int32)
    _sample_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), splits)](
        hs, ws, bs, ht, wt, bt, seed, part, tok,
        n, vocab_size, hs.shape[1], ht.shape[1], cfg.pop("SPLIT_V"),
        hs.stride(0), ws.stride(0), ht.stride(0), wt.stride(0),
        *scaling, float(alpha),
        HAS_BS=bs is not None, HAS_BT=bt is not None, **flags, TEACHER=teacher, **dots, **cfg,
    )
    j = part[..., _BEST].argmax(1, keepdim=True)  # the best split of each row
    tokens = tok.gather(1, j)[:, 0].to(torch.int64)
    lq = _logprob_at(part, j, _S_Y, _M_S, _L_S)
    if not teacher:
        return tokens, lq, None
    return tokens, lq, _logprob_at(part, j, _T_Y, _M_T, _L_T)


def _logprob_at(part, j, i_x, i_m, i_l):
    """``(x - M) - log L`` for the logit ``x`` kept by split ``j [N, 1]`` of each row."""
    big, total, _ = merge_lse(part[..., i_m], part[..., i_l])
    return (part[..., i_x].gather(1, j)[:, 0] - big) - torch.log(total)
