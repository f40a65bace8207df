"""Token chunks: the driver that the chunked implementations of every backend share.

Rows are taken C at a time; each chunk's full-vocabulary logits ``[C, V]`` are computed with one matmul per model
(BLAS / cuBLAS), and a backend's *rows function* turns them into per-row statistics (and, for the fused divergence,
per-row losses and the gradient ``G = dL/dz`` in place of the logits), which go straight into the gradient matmuls.
Memory is O(C x V) whatever N is. The rows functions: :func:`minillm_fast.backends.torch.divergence_rows` (plain
PyTorch), the native C++ kernels (minillm_fast/backends/native.py) and the Triton row kernel
(minillm_fast/backends/triton.py).

For the fused divergence with a scalar loss, the gradients are computed during the forward pass (4 matmuls in all,
the floor of docs/design.md section 4) and the backward only scales them by the upstream scalar; for
``reduction="none"`` the upstream gradient is per row and unknown in the forward, so the backward recomputes the
chunks (6 matmuls).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from . import hugepages
from .divergences import Divergence
from .scaling import Scaling

# Bytes of chunk temporaries the chunked implementations may hold (MINILLM_FAST_CHUNK_BYTES overrides).
DEFAULT_CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 1 << 30}
# [C, V] temporaries (fp32, fp64 for fp64 inputs) alive at once per chunk row: the torch rows function keeps about a
# dozen; the Triton row kernel and the native rows function work in place on the two logits buffers, which
# run() allocates once for fp32/fp64 inputs; half-precision inputs add the matmul's output and its cast.
_TEMPS_PER_ROW = {"torch": 12, "triton": 2, "native": 2}
_CAST_TEMPS = 2


def default_chunk_rows(n_rows: int, vocab: int, device: torch.device, backend: str,
                       dtype: torch.dtype = torch.float32, head_grad_bytes: int = 0) -> int:
    """Rows per chunk so that the chunk temporaries fit MINILLM_FAST_CHUNK_BYTES when set, else the larger of
    DEFAULT_CHUNK_BYTES and ``head_grad_bytes`` (the size of the fp32 head gradient the chunks accumulate into).

    Why the second term: every chunk reads and writes the whole ``[V, H]`` head gradient once (its ``addmm_``), so
    chunks whose logits are much smaller than that gradient spend their time streaming it. Logits about as large as
    the gradient keep that traffic a small part of the chunk's matmuls, for at most the memory of the gradient the
    caller holds anyway (measured on CPU at N=512, H=1024/2048, V=128256: 128 MiB chunks 1.33x the floor, 1.27x
    for Liger's chunked loss; chunks of the 512 MiB gradient's size are faster, see bench/README.md)."""
    env = os.environ.get("MINILLM_FAST_CHUNK_BYTES")
    budget = int(env) if env else max(DEFAULT_CHUNK_BYTES.get(device.type, 1 << 30), head_grad_bytes)
    full = dtype in (torch.float32, torch.float64)
    temps = _TEMPS_PER_ROW.get(backend, 12) + (0 if full else _CAST_TEMPS)
    per_row = vocab * (8 if dtype == torch.float64 else 4) * temps
    return max(1, min(n_rows, budget // per_row))


def chunk_rows(chunk_size, n: int, vocab: int, device: torch.device, backend: str,
               dtype: torch.dtype = torch.float32, head_grad_bytes: int = 0) -> int:
    """Rows per chunk: ``chunk_size`` (checked), or what :func:`default_chunk_rows` makes of the chunk budget."""
    if chunk_size is None:
        return default_chunk_rows(n, vocab, device, backend, dtype, head_grad_bytes=head_grad_bytes)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
    return chunk_size


def row_chunks(n: int, size: int):
    """``slice``s of ``size`` rows covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def out_dtype(h: torch.Tensor) -> torch.dtype:
    """Per-row outputs are float32, float64 for float64 inputs (torch and native backends)."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


class Draws:
    """A sampler's outputs, filled chunk by chunk (:meth:`put`): ``tokens [N]`` int64, ``log q(y) [N]`` and
    ``log p(y) [N]`` (None without a teacher) in the output dtype of ``h``."""

    def __init__(self, h: torch.Tensor, with_teacher: bool):
        n, f = h.shape[0], out_dtype(h)
        self.tokens = torch.empty(n, dtype=torch.int64, device=h.device)
        self.lq = torch.empty(n, dtype=f, device=h.device)
        self.lp = torch.empty(n, dtype=f, device=h.device) if with_teacher else None

    def put(self, rows: slice, tokens: torch.Tensor, lq: torch.Tensor, lp: Optional[torch.Tensor]) -> None:
        self.tokens[rows] = tokens
        self.lq[rows] = lq
        if self.lp is not None:
            self.lp[rows] = lp

    def result(self) -> tuple:
        return self.tokens, self.lq, self.lp


class Needs(NamedTuple):
    """Which of the six inputs of a two-model op want a gradient."""

    student_hidden: bool = False
    student_weight: bool = False
    student_bias: bool = False
    teacher_hidden: bool = False
    teacher_weight: bool = False
    teacher_bias: bool = False

    @property
    def student(self) -> tuple[bool, bool, bool]:
        return self[:3]

    @property
    def teacher(self) -> tuple[bool, bool, bool]:
        return self[3:]


class Stats(NamedTuple):
    """Column indices of the per-row statistics ``stats [N, 6]`` of the fused divergence: each model's row max and
    ``log sum e^(x - max)`` (kept apart: kernels/fused_divergence.py explains why), and the gradient constants
    ``c_s = sum_v q*g``, ``c_t = sum_v p*h``."""

    m_s: int = 0
    log_l_s: int = 1
    m_t: int = 2
    log_l_t: int = 3
    c_s: int = 4
    c_t: int = 5


STATS = Stats()


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


@dataclass(frozen=True)
class Rows:
    """A backend's rows function of the fused divergence and the chunk layout it takes.

    ``fn(zs [C, V], zt [C, V], row_grad [C] | None, cfg, grad_s, grad_t) -> (loss [C], stats [C, 6], dL/dzs | None,
    dL/dzt | None)``; it may overwrite zs and zt (the gradients are returned in their buffers). ``vocab_major``:
    the chunks are handed over vocabulary-major (the [C, V] transpose of a row-major [V, C], see ChunkLogits) and
    the gradients come back in that layout."""

    fn: Callable
    vocab_major: bool = False


def chunk_logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """Logits ``[C, V]`` of one chunk: the matmul in the inputs' dtype, then fp32 (fp64 for fp64 inputs)."""
    z = h @ w.T if b is None else torch.addmm(b, h, w.T)
    return z.to(out_dtype(h))


def scaled_logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], vocab_size: int, scaling: Scaling):
    """``[C, V]`` logits ``softcap(a (h W[:V]^T + b[:V])) / T`` of the model's ``scaling`` in fp32 (fp64 for fp64
    inputs), and the softcap's tanh (None without a softcap; the derivative is ``inv_temp (1 - tanh^2)``)."""
    return scaling.apply(chunk_logits(h, w[:vocab_size], None if b is None else b[:vocab_size]))


class ChunkLogits:
    """Raw logits ``h W[:V]^T + b[:V]`` ``[C, V]`` of successive row chunks, in fp32 (fp64 for fp64 inputs), as
    :func:`chunk_logits` computes them, written into one buffer of ``rows`` rows that every chunk reuses: the rows
    functions may overwrite it in place, and a fresh ``[C, V]`` per chunk would hold a third buffer while the last
    chunk's is still referenced, and cost its page faults again each time. A returned chunk is valid until the next
    call.

    ``vocab_major``: the chunk is computed as ``W h^T`` into a row-major ``[V, C]`` buffer and returned as its
    transpose (a ``[C, V]`` view with strides ``(1, C)``), for rows functions that take that layout
    (``Rows.vocab_major``, the native CPU kernel): on CPU, MKL runs ``W h^T`` and the gradient matmuls on a
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


class HeadGrads:
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


def run(hs, ws, bs, ht, wt, bt, cfg: DivergenceConfig, *, rows: Rows, chunk_size: int,
        row_grad: Optional[torch.Tensor], needs: Needs, want_loss: bool = True,
        saved_stats: Optional[torch.Tensor] = None):
    """One sweep over the rows, chunk by chunk.

    hs [N, HS], ws [V_pad, HS], bs [V_pad] | None, likewise the teacher; row_grad [N] fp32 (the upstream gradient of
    each row's loss: row scales in a forward that computes gradients, upstream x scales in a backward) or None.
    needs: :class:`Needs` (which of hs, ws, bs, ht, wt, bt want a gradient). ``saved_stats`` (of an earlier forward) is
    not needed: the chunks recompute what they use (the signature is the one every fused-divergence implementation
    has, minillm_fast/dispatch.py). Returns ``loss [N]`` and ``stats [N, 6]`` (or None when not
    want_loss) and the six gradients (None where not needed).
    """
    n, v = hs.shape[0], cfg.vocab_size
    f = out_dtype(hs)
    needs = Needs(*needs)
    loss = torch.empty(n, dtype=f, device=hs.device) if want_loss else None
    stats = torch.empty(n, 6, dtype=f, device=hs.device) if want_loss else None
    student = HeadGrads(hs, ws, bs, needs.student, v)
    teacher = HeadGrads(ht, wt, bt, needs.teacher, v)
    vocab_major = rows.vocab_major
    student_logits = ChunkLogits(ws, bs, v, min(chunk_size, n), f, vocab_major)
    teacher_logits = ChunkLogits(wt, bt, v, min(chunk_size, n), f, vocab_major)
    for chunk in row_chunks(n, chunk_size):
        zs, zt = student_logits(hs[chunk]), teacher_logits(ht[chunk])
        rg = None if row_grad is None else row_grad[chunk]
        l_c, st_c, g_s, g_t = rows.fn(zs, zt, rg, cfg, student.any, teacher.any)
        if want_loss:
            loss[chunk] = l_c
            stats[chunk] = st_c
        if g_s is not None:
            student.add(chunk, g_s)
        if g_t is not None:
            teacher.add(chunk, g_t)
    return loss, stats, (*student.result(), *teacher.result())


# ----------------------------------------------------------------------------------------------------------------------
# the sparse divergence (minillm_fast/ops/sparse_divergence.py): one model against stored outcomes
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparseRows:
    """A backend's two row functions of the sparse divergence, on a chunk's raw logits ``z [C, V]`` (row-major):

    * ``stats(z, scaling) -> [C, 2]``: each row's max ``M`` and ``log L = log sum e^(s - M)`` of ``s = scaling(z)``,
      z left as it is;
    * ``grad(z, stats, a [C], scaling)``: overwrite z with ``-a q ds/dz`` (``q = e^(s - M - log L)``), the gradient of
      ``-a log sum e^s``."""

    stats: Callable
    grad: Callable


def sparse_run(h, w, b, ids: torch.Tensor, outcome: Callable, scaling: Scaling, vocab_size: int, *,
               rows: SparseRows, chunk_size: int, row_grad: Optional[torch.Tensor], needs: tuple):
    """The sparse divergence in one sweep over the rows, with its gradients when ``row_grad`` is given.

    h [N, H], w [V_pad, H], b [V_pad] | None; ids [N, K] int64 in [0, V) (padding already replaced); ``outcome(rows,
    lq [C, K]) -> [C]``: the per-row divergence from the student's log-probs at the ids (differentiable PyTorch on
    ``[C, K]``); row_grad [N] | None: the weight of each row in the loss whose gradients are made (rows of weight 0
    get none); needs: which of (h, w, b) want one. Returns ``per_row [N]`` and the three gradients (None where not
    needed).

    Per chunk the logits ``z [C, V]`` are made once: their log-normaliser (``rows.stats``), the student's log-probs at
    the ids ``lq = (s_k - M) - log L``, the divergence, and ``g = dL/dlq`` by autograd on ``[C, K]``; then
    ``dL/ds = scatter(g) - (sum_k g_k) q`` is written over the logits (``rows.grad``, then the scatter) and goes
    straight into the gradient matmuls: three matmuls in all, where a log-normaliser swept in the forward and again in
    the backward costs four. Called under ``torch.no_grad()`` (it turns autograd on for the ``[C, K]`` part only)."""
    n = h.shape[0]
    f = out_dtype(h)
    per_row = torch.empty(n, dtype=f, device=h.device)
    heads = HeadGrads(h, w, b, needs if row_grad is not None else (False, False, False), vocab_size)
    logits = ChunkLogits(w, b, vocab_size, min(chunk_size, n), f)
    for chunk in row_chunks(n, chunk_size):
        z = logits(h[chunk])
        ids_c = ids[chunk]
        z_ids = z.gather(1, ids_c)  # raw, before the row functions overwrite z
        s_ids, cap_ids = scaling.apply(z_ids)
        stats = rows.stats(z, scaling)
        lq = (s_ids - stats[:, :1]) - stats[:, 1:]
        if row_grad is None or not heads.any:
            per_row[chunk] = outcome(chunk, lq)
            continue
        rg = row_grad[chunk].to(f)
        with torch.enable_grad():
            lq = lq.requires_grad_(True)
            per = outcome(chunk, lq)
            weighted = torch.where(rg != 0, per * rg, torch.zeros_like(per)).sum()
            (g_lq,) = torch.autograd.grad(weighted, lq)
        per_row[chunk] = per.detach()
        rows.grad(z, stats, g_lq.sum(-1), scaling)  # z := -(sum_k g_k) q ds/dz
        ds_dz = torch.full_like(g_lq, scaling.inv_temp) if cap_ids is None else scaling.inv_temp * (1 - cap_ids ** 2)
        z.scatter_add_(1, ids_c, g_lq * ds_dz)
        heads.add(chunk, z)
    return per_row, heads.result() if row_grad is not None else (None, None, None)
