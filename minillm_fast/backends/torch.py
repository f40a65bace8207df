"""The ``torch`` backend: every op in plain PyTorch over token chunks (memory O(chunk x V), any device, fp64 too).

Also the reference-grade rows function of the fused divergence (:func:`divergence_rows`: the closed-form gradients
of minillm_fast/divergences.py), against which the native and Triton row kernels are tested.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import chunked, divergences
from ..chunked import DivergenceConfig, Draws, HeadGrads, Rows, SparseRows, out_dtype, row_chunks, scaled_logits


def divergence_rows(zs: torch.Tensor, zt: torch.Tensor, row_grad: Optional[torch.Tensor], cfg: DivergenceConfig,
                    grad_s: bool, grad_t: bool):
    """The rows function (chunked.Rows) in plain PyTorch: ``zs, zt [C, V]`` raw chunk logits -> ``loss [C]``,
    ``stats [C, 6]`` and ``dL/dzs``, ``dL/dzt`` (times ``row_grad [C]``) where asked."""
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


ROWS = Rows(divergence_rows)


def token_logprobs_fwd(h, w, b, y, *, scaling, vocab_size, entropy, chunk_size):
    """``logprob [N]`` (meaningless on ignored rows), ``stats [N, 2]`` (row max M, ``log sum e^(s - M)``) and the
    entropy ``[N]`` (None unless asked)."""
    n, f = h.shape[0], out_dtype(h)
    logprob = torch.empty(n, dtype=f, device=h.device)
    stats = torch.empty(n, 2, dtype=f, device=h.device)
    ent = torch.empty(n, dtype=f, device=h.device) if entropy else None
    y = y.clamp(0, vocab_size - 1).unsqueeze(1)  # ignored rows pick any entry; the caller zeroes them
    for rows in row_chunks(n, chunk_size):
        s, _ = scaled_logits(h[rows], w, b, vocab_size, scaling)
        big = s.amax(-1, keepdim=True)
        s.sub_(big)  # shifted first, as log_softmax does: s - lse would round at lse's magnitude
        log_l = torch.logsumexp(s, -1, keepdim=True)
        stats[rows] = torch.cat([big, log_l], 1)
        logprob[rows] = (s.gather(1, y[rows]) - log_l).squeeze(1)
        if entropy:
            lq = s.sub_(log_l)
            ent[rows] = -(lq.exp().mul_(lq)).sum(-1)
    return logprob, stats, ent


def token_logprobs_bwd(h, w, b, y, stats, ent, g_lp, g_ent, *, scaling, vocab_size, needs, chunk_size):
    """Gradients (h, w, b) of ``sum(g_lp * logprob + g_ent * entropy)``: ``a (onehot(y) - q) - e q (lq + H)``
    times ``ds/dz``, through the two gradient matmuls. A negative target has no one-hot: ``-a q``, the gradient of
    ``-a log sum e^s`` (what minillm_fast.ops.sparse_divergence's log-normaliser asks for)."""
    heads = HeadGrads(h, w, b, needs, vocab_size)
    hot = (y >= 0).unsqueeze(1)  # a negative target: no one-hot (the log-normaliser's gradient alone)
    y = y.clamp(0, vocab_size - 1).unsqueeze(1)
    for rows in row_chunks(h.shape[0], chunk_size):
        s, cap = scaled_logits(h[rows], w, b, vocab_size, scaling)
        lq = s.sub_(stats[rows, :1]).sub_(stats[rows, 1:])
        q = lq.exp()
        a = g_lp[rows].unsqueeze(1).to(q.dtype)
        g = (q * -a).scatter_add_(1, y[rows], torch.where(hot[rows], a, torch.zeros_like(a)))  # a (onehot(y) - q)
        if g_ent is not None:  # - e q (lq + H)
            g -= q.mul_(lq.add_(ent[rows].unsqueeze(1))).mul_(g_ent[rows].unsqueeze(1).to(q.dtype))
        g.mul_(scaling.inv_temp)
        if cap is not None:
            g.mul_(1 - cap * cap)
        heads.add(rows, g)
    return heads.result()


def rollout_statistics(hs, ws, bs, ht, wt, bt, tokens, *, student, teacher, vocab_size, chunk_size):
    """``[N]`` log q(y), log p(y) and the full-vocabulary KL(q || p)."""
    n, f = hs.shape[0], out_dtype(hs)
    lq_y, lp_y, rkl = (torch.empty(n, dtype=f, device=hs.device) for _ in range(3))
    y = tokens.long().unsqueeze(1)
    for rows in row_chunks(n, chunk_size):
        lq = torch.log_softmax(scaled_logits(hs[rows], ws, bs, vocab_size, student)[0], -1)
        lp = torch.log_softmax(scaled_logits(ht[rows], wt, bt, vocab_size, teacher)[0], -1)
        lq_y[rows] = lq.gather(1, y[rows]).squeeze(1)
        lp_y[rows] = lp.gather(1, y[rows]).squeeze(1)
        rkl[rows] = (lq.exp() * (lq - lp)).sum(-1)
    return lq_y, lp_y, rkl


def mixture_sample(hs, ws, bs, ht, wt, bt, seed, *, alpha, student, teacher, vocab_size, chunk_size):
    """Component coin per row, then Gumbel-max over the chosen model's chunk logits (noise from a generator seeded
    with ``seed``: one host sync on CUDA). Returns ``tokens [N]``, log q(y) and log p(y) (None without a teacher)."""
    n = hs.shape[0]
    has_teacher = ht is not None
    gen = torch.Generator(device=hs.device)
    gen.manual_seed(int(seed.item()))
    # The coins are drawn with or without a teacher, so that alpha = 0 draws what sample_tokens draws (as on triton).
    use_t = torch.rand(n, generator=gen, device=hs.device) < alpha
    draws = Draws(hs, has_teacher)
    for rows in row_chunks(n, chunk_size):
        s = scaled_logits(hs[rows], ws, bs, vocab_size, student)[0]
        x = s
        if has_teacher:
            t = scaled_logits(ht[rows], wt, bt, vocab_size, teacher)[0]
            x = torch.where(use_t[rows].unsqueeze(1), t, s)
        u = torch.rand(x.shape, generator=gen, device=hs.device, dtype=x.dtype)
        y = (x - torch.log(-torch.log(u))).argmax(-1, keepdim=True)  # u = 0 gives -inf: never chosen
        draws.put(rows, y.squeeze(1), torch.log_softmax(s, -1).gather(1, y).squeeze(1),
                  torch.log_softmax(t, -1).gather(1, y).squeeze(1) if has_teacher else None)
    return draws.result()


def sparse_stats(z: torch.Tensor, scaling) -> torch.Tensor:
    """``[C, 2]``: each row's max M and ``log sum e^(s - M)`` of ``s = scaling(z)`` (z [C, V] raw, left as it is)."""
    s, _ = scaling.apply(z)
    big = s.amax(-1, keepdim=True)
    return torch.cat([big, torch.logsumexp(s.sub_(big), -1, keepdim=True)], 1)


def sparse_grad(z: torch.Tensor, stats: torch.Tensor, a: torch.Tensor, scaling) -> None:
    """Overwrite the raw chunk logits z [C, V] with ``-a q ds/dz`` (a [C]), from :func:`sparse_stats`' statistics."""
    s, cap = scaling.apply(z)
    g = s.sub_(stats[:, :1]).sub_(stats[:, 1:]).exp_().mul_((-a * scaling.inv_temp).unsqueeze(1).to(s.dtype))
    if cap is not None:
        g.mul_(1 - cap * cap)
    z.copy_(g)


SPARSE_ROWS = SparseRows(sparse_stats, sparse_grad)


OPS = {
    "fused_divergence": functools.partial(chunked.run, rows=ROWS),
    "sparse_divergence": functools.partial(chunked.sparse_run, rows=SPARSE_ROWS),
    "token_logprobs_fwd": token_logprobs_fwd,
    "token_logprobs_bwd": token_logprobs_bwd,
    "rollout_statistics": rollout_statistics,
    "mixture_sample": mixture_sample,
}
