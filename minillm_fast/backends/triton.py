"""The ``triton`` backend: the Triton kernels of kernels/ (installed as ``minillm_fast.kernels``), on CUDA tensors or
on CPU tensors under ``TRITON_INTERPRET=1``. The only module of the package that imports the kernels.

The fused divergence has two strategies here: ``chunked`` (chunked.run with cuBLAS matmuls and the Triton row
kernel: the 4-matmul floor, memory O(chunk x V)) and ``tiled`` (vocabulary tiles streamed through ``tl.dot``, memory
O(N); the backward recomputes the tiles). The other ops are one-pass vocabulary-tiled kernels.
"""
from __future__ import annotations

import functools

from .. import chunked
from ..chunked import Needs, Rows
from ..kernels import fused_divergence as divergence_kernels
from ..kernels import sampling as sampling_kernels
from ..kernels import token_logprobs as logprob_kernels

ROWS = Rows(divergence_kernels.divergence_rows)


def fused_divergence_tiled(hs, ws, bs, ht, wt, bt, cfg, *, chunk_size, row_grad, needs, want_loss=True,
                           saved_stats=None):
    """The vocab-tiled strategy with chunked.run's signature (``chunk_size`` unused): the forward kernel for the loss
    and statistics, then, where gradients are asked, the backward kernel (which takes the forward's statistics)."""
    kw = dict(vocab_size=cfg.vocab_size, **cfg.triton_args)
    loss = stats = None
    if want_loss or saved_stats is None:
        loss, stats = divergence_kernels.fused_divergence_fwd(hs, ws, bs, ht, wt, bt, **kw)
    grads = (None,) * 6
    needs = Needs(*needs)
    if any(needs):
        grads = divergence_kernels.fused_divergence_bwd(hs, ws, bs, ht, wt, bt, stats if saved_stats is None
                                                        else saved_stats, row_grad, needs=needs, **kw)
    return loss, stats, grads


def token_logprobs_fwd(h, w, b, y, *, scaling, vocab_size, entropy, chunk_size):
    return logprob_kernels.token_logprobs_fwd(h, w, b, y, inv_temp=scaling.inv_temp, softcap=scaling.softcap,
                                              vocab_size=vocab_size, entropy=entropy)


def token_logprobs_bwd(h, w, b, y, stats, ent, g_lp, g_ent, *, scaling, vocab_size, needs, chunk_size):
    return logprob_kernels.token_logprobs_bwd(h, w, b, y, stats, ent, g_lp, g_ent, inv_temp=scaling.inv_temp,
                                              softcap=scaling.softcap, vocab_size=vocab_size, needs=needs)


def _pairs(student, teacher) -> dict:
    return dict(inv_temp=(student.inv_temp, teacher.inv_temp), softcap=(student.softcap, teacher.softcap))


def rollout_statistics(hs, ws, bs, ht, wt, bt, tokens, *, student, teacher, vocab_size, chunk_size):
    return sampling_kernels.rollout_statistics(hs, ws, bs, ht, wt, bt, tokens, vocab_size=vocab_size,
                                               **_pairs(student, teacher))


def mixture_sample(hs, ws, bs, ht, wt, bt, seed, *, alpha, student, teacher, vocab_size, chunk_size):
    return sampling_kernels.sample(hs, ws, bs, ht, wt, bt, seed, alpha=alpha, vocab_size=vocab_size,
                                   **_pairs(student, teacher))


OPS = {
    "fused_divergence": functools.partial(chunked.run, rows=ROWS),
    "fused_divergence_tiled": fused_divergence_tiled,
    "token_logprobs_fwd": token_logprobs_fwd,
    "token_logprobs_bwd": token_logprobs_bwd,
    "rollout_statistics": rollout_statistics,
    "mixture_sample": mixture_sample,
}
