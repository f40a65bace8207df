"""The ``native`` backend: token chunks whose row work runs in the C++ extension of csrc/ (CPU; fp32 and fp64).

The matmuls of each chunk are torch's (BLAS); each chunk's logits ``[C, V]`` then go through one vectorised,
multi-threaded C++ pass (minillm_fast/native.py builds and loads the extension; its kernels are the torch.library ops
``torch.ops.minillm_fast_native.*``, :func:`minillm_fast.native.ops`): ``divergence_rows`` for the fused divergence
(row- or vocabulary-major chunks), ``token_logprobs_fwd_rows`` / ``_bwd_rows``,
``rollout_statistics_rows`` and ``mixture_sample_rows`` (inverse-CDF draws from Philox4x32-10 keyed by the seed with
the global row index as counter, so a row's draw does not depend on the thread count or the chunking).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import chunked, native
from ..chunked import ChunkLogits, Draws, HeadGrads, Rows, SparseRows, out_dtype, row_chunks
from .torch import sparse_stats as torch_sparse_stats


def divergence_rows(zs: torch.Tensor, zt: torch.Tensor, row_grad: Optional[torch.Tensor], cfg, grad_s: bool,
                    grad_t: bool):
    """The rows function (chunked.Rows) in C++: zs, zt [C, V] float32 or float64 chunk logits, overwritten in place,
    with contiguous rows or vocabulary-major (the transpose of a row-major [V, C], as chunked.run hands them over for
    ``ROWS.vocab_major``). Returns loss [C], stats [C, 6] and dL/dzs, dL/dzt (the overwritten buffers, in their
    layout) where asked, else None."""
    zs, zt = _rows_or_columns(zs), _rows_or_columns(zt)
    loss, stats = native.ops().divergence_rows(zs, zt, row_grad, grad_s=grad_s, grad_t=grad_t, **cfg.kernel_args)
    return loss, stats, (zs if grad_s else None), (zt if grad_t else None)


def _rows_or_columns(z: torch.Tensor) -> torch.Tensor:
    """z itself when its rows or its columns are contiguous (the two layouts the C++ kernel takes), else a copy."""
    if z.stride(-1) == 1 or (z.dim() == 2 and z.stride(0) == 1 and z.stride(1) >= z.shape[0]):
        return z
    return z.contiguous()


# Vocabulary-major chunks (W h^T): the faster matmuls on CPU (chunked.ChunkLogits explains).
ROWS = Rows(divergence_rows, vocab_major=True)


def token_logprobs_fwd(h, w, b, y, *, scaling, vocab_size, entropy, chunk_size):
    rows_kernels = native.ops()
    n, f = h.shape[0], out_dtype(h)
    logprob = torch.empty(n, dtype=f, device=h.device)
    stats = torch.empty(n, 2, dtype=f, device=h.device)  # row max M, log sum e^(s - M)
    ent = torch.empty(n, dtype=f, device=h.device) if entropy else None
    y = y.long()
    logits = ChunkLogits(w, b, vocab_size, min(chunk_size, n), f)
    for rows in row_chunks(n, chunk_size):
        lp_c, st_c, ent_c = rows_kernels.token_logprobs_fwd_rows(logits(h[rows]), y[rows], scaling.temperature,
                                                                 scaling.softcap, entropy)
        logprob[rows] = lp_c
        stats[rows] = st_c
        if entropy:
            ent[rows] = ent_c
    return logprob, stats, ent


def token_logprobs_bwd(h, w, b, y, stats, ent, g_lp, g_ent, *, scaling, vocab_size, needs, chunk_size):
    rows_kernels = native.ops()
    n, f = h.shape[0], out_dtype(h)
    heads = HeadGrads(h, w, b, needs, vocab_size)
    y, stats, g_lp = y.long(), stats.to(f), g_lp.to(f)
    if g_ent is not None:
        ent, g_ent = ent.to(f), g_ent.to(f)
    logits = ChunkLogits(w, b, vocab_size, min(chunk_size, n), f)
    for rows in row_chunks(n, chunk_size):
        g = logits(h[rows])  # overwritten with dL/dz
        rows_kernels.token_logprobs_bwd_rows(g, y[rows], stats[rows], None if g_ent is None else ent[rows],
                                             g_lp[rows], None if g_ent is None else g_ent[rows], scaling.temperature,
                                             scaling.softcap)
        heads.add(rows, g)
    return heads.result()


def _scalings(student, teacher) -> tuple:
    """The two-model row kernels' ``temperature_s, softcap_s, temperature_t, softcap_t``."""
    return student.temperature, student.softcap, teacher.temperature, teacher.softcap


def rollout_statistics(hs, ws, bs, ht, wt, bt, tokens, *, student, teacher, vocab_size, chunk_size):
    rows_kernels = native.ops()
    n, f = hs.shape[0], out_dtype(hs)
    lq_y, lp_y, rkl = (torch.empty(n, dtype=f, device=hs.device) for _ in range(3))
    y = tokens.long()
    rows_max = min(chunk_size, n)
    zs, zt = ChunkLogits(ws, bs, vocab_size, rows_max, f), ChunkLogits(wt, bt, vocab_size, rows_max, f)
    for rows in row_chunks(n, chunk_size):
        lq_y[rows], lp_y[rows], rkl[rows] = rows_kernels.rollout_statistics_rows(
            zs(hs[rows]), zt(ht[rows]), y[rows], *_scalings(student, teacher))
    return lq_y, lp_y, rkl


def mixture_sample(hs, ws, bs, ht, wt, bt, seed, *, alpha, student, teacher, vocab_size, chunk_size):
    """Component coin and inverse-CDF draw per row (csrc/sampling_cpu.cpp), uniforms from Philox4x32-10 keyed by
    ``seed`` with the global row index as counter."""
    rows_kernels = native.ops()
    n, f = hs.shape[0], out_dtype(hs)
    has_teacher = ht is not None
    draws = Draws(hs, has_teacher)
    rows_max = min(chunk_size, n)
    zs = ChunkLogits(ws, bs, vocab_size, rows_max, f)
    zt = ChunkLogits(wt, bt, vocab_size, rows_max, f) if has_teacher else None
    for rows in row_chunks(n, chunk_size):
        draws.put(rows, *rows_kernels.mixture_sample_rows(zs(hs[rows]), zt(ht[rows]) if has_teacher else None, seed,
                                                          rows.start, alpha, *_scalings(student, teacher)))
    return draws.result()


def sparse_stats(z: torch.Tensor, scaling) -> torch.Tensor:
    """``[C, 2]`` row max and ``log sum e^(s - M)`` by the token log-probs forward row kernel with no target. Under a
    softcap that kernel leaves ``tanh(z / cap)`` in z, which the backward row kernel would take for raw logits: the
    torch rows compute the statistics there instead (a softcap is rare; the sweep is one pass)."""
    if scaling.softcap:
        return torch_sparse_stats(z, scaling)
    no_target = torch.full((z.shape[0],), -1, dtype=torch.int64, device=z.device)
    return native.ops().token_logprobs_fwd_rows(z, no_target, scaling.temperature, 0.0, False)[1]


def sparse_grad(z: torch.Tensor, stats: torch.Tensor, a: torch.Tensor, scaling) -> None:
    """Overwrite the raw chunk logits z [C, V] with ``-a q ds/dz``: the token log-probs backward row kernel with
    upstream ``a`` and no target (its ``a (onehot(y) - q)`` without the one-hot)."""
    no_target = torch.full((z.shape[0],), -1, dtype=torch.int64, device=z.device)
    native.ops().token_logprobs_bwd_rows(z, no_target, stats, None, a, None, scaling.temperature, scaling.softcap)


SPARSE_ROWS = SparseRows(sparse_stats, sparse_grad)


OPS = {
    "fused_divergence": functools.partial(chunked.run, rows=ROWS),
    "sparse_divergence": functools.partial(chunked.sparse_run, rows=SPARSE_ROWS),
    "token_logprobs_fwd": token_logprobs_fwd,
    "token_logprobs_bwd": token_logprobs_bwd,
    "rollout_statistics": rollout_statistics,
    "mixture_sample": mixture_sample,
}
