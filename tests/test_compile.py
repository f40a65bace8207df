"""The custom ops survive torch.library checks and torch.compile.

``torch.library.opcheck`` runs each op for real and under FakeTensor (the fake implementation must give the same
shapes, dtypes and strides), checks the schema (no hidden mutation or aliasing) and traces it with AOT autograd.
"""
from __future__ import annotations

import pytest
import torch

from helpers import DEVICE, IMPLS, STUDENT, make_inputs, randn
from minillm_fast import divergences, fused_divergence

pytestmark = pytest.mark.usefixtures("single_thread")

torch.ops.import_module("minillm_fast.ops.fused_divergence")  # registers minillm_fast::fused_divergence_fwd/_bwd
FWD = torch.ops.minillm_fast.fused_divergence_fwd.default
BWD = torch.ops.minillm_fast.fused_divergence_bwd.default

# (backend, strategy, divergence, bias, grads): a few representative argument sets, each a different code path
CASES = [
    ("torch", "chunked", "reverse_kl", False, [True, True, False, False, False, False]),
    ("torch", "chunked", "jsd", True, [True, True, True, True, True, True]),
    ("torch", "chunked", "tvd", True, [False] * 6),
    ("triton", "chunked", "forward_kl", True, [True, False, True, False, False, False]),
    ("triton", "tiled", "skew_reverse_kl", True, [True, True, True, False, True, False]),
]
CASE_IDS = [f"{b}-{s}-{d}-{'bias' if bias else 'nobias'}-{''.join('1' if g else '0' for g in grads)}"
            for b, s, d, bias, grads in CASES]


def _op_args(gen, backend, strategy, divergence, bias, n=11, hs=8, ht=12, v=37):
    x = make_inputs(gen, n=n, hs=hs, ht=ht, v=v, bias=bias)
    div = divergences.resolve(divergence)
    row_scale = torch.rand(n, generator=gen).to(DEVICE)
    tensors = (x["student_hidden"], x["student_weight"], x["student_bias"], x["teacher_hidden"],
               x["teacher_weight"], x["teacher_bias"])
    # kind, weight, scaling (each model's inv_temp and softcap: different on purpose), vocab_size, backend, strategy,
    # chunk_size
    scalars = (div.kind, div.weight, [1 / 1.5, 0.0, 0.8, 3.0], v, backend, strategy, 4)
    return tensors, row_scale, scalars


def _available(backend, strategy):
    return (backend, strategy) in IMPLS


@pytest.mark.parametrize("backend, strategy, divergence, bias, grads", CASES, ids=CASE_IDS)
def test_opcheck_fwd(backend, strategy, divergence, bias, grads, gen):
    if not _available(backend, strategy):
        pytest.skip(f"{backend}-{strategy} not available on this machine")
    tensors, row_scale, scalars = _op_args(gen, backend, strategy, divergence, bias)
    # reduce=True exactly when gradients are made in the forward, as fused_divergence calls it
    torch.library.opcheck(FWD, (*tensors, row_scale, *scalars, grads, any(grads)))


@pytest.mark.parametrize("backend, strategy, divergence, bias, grads", CASES, ids=CASE_IDS)
def test_opcheck_bwd(backend, strategy, divergence, bias, grads, gen):
    if not _available(backend, strategy):
        pytest.skip(f"{backend}-{strategy} not available on this machine")
    tensors, row_scale, scalars = _op_args(gen, backend, strategy, divergence, bias)
    _, stats, *_ = FWD(*tensors, row_scale, *scalars, [False] * 6, False)
    torch.library.opcheck(BWD, (*tensors, stats, row_scale * 0.5, *scalars, grads))


@pytest.mark.parametrize("backend, strategy", IMPLS, ids=[f"{b}-{s}" for b, s in IMPLS])
@pytest.mark.parametrize("op", ["fwd", "bwd"])
def test_fake_strides_match_real_on_transposed_inputs(backend, strategy, op, gen):
    """Column-major hidden states and heads (``W.t()`` of an [H, V] projection is a valid [V, H] head): the fake
    gradients must have the strides the real ones have, or compiled graphs read them wrongly."""
    tensors, row_scale, scalars = _op_args(gen, backend, strategy, "reverse_kl", True)
    hs, ws, bs, ht, wt, bt = (None if t is None else (t.t().contiguous().t() if t.dim() == 2 else t) for t in tensors)
    assert hs.stride() == (1, hs.shape[0]) and ws.stride() == (1, ws.shape[0])
    scalars = (*scalars[:4], backend, strategy, *scalars[6:])
    if op == "fwd":
        args = (hs, ws, bs, ht, wt, bt, row_scale, *scalars, [True] * 6, True)
        fn = FWD
    else:
        _, stats, *_ = FWD(hs, ws, bs, ht, wt, bt, row_scale, *scalars, [False] * 6, False)
        args = (hs, ws, bs, ht, wt, bt, stats, row_scale, *scalars, [True] * 6)
        fn = BWD
    torch.library.opcheck(fn, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction, gen):
    """fused_divergence inside a torch.compile(fullgraph=True) function: same loss and gradients as eager."""
    n = 9
    x = make_inputs(gen, n=n, hs=8, ht=12, v=37, bias=True)
    labels = torch.randint(0, 37, (n,), generator=gen).to(DEVICE)
    labels[2] = -100
    upstream = randn(gen, n) if reduction == "none" else torch.tensor(1.0, device=DEVICE)

    def step(hs, ws, bs, ht, wt, bt, labels):
        loss = fused_divergence(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, labels=labels,
                                divergence="reverse_kl", temperature=2.0, reduction=reduction, backend="torch")
        return loss * 3.0  # something after the op, so the graph is more than the op alone

    def run(fn):
        leaves = [x[k].clone().requires_grad_(k in STUDENT or k == "student_bias") for k in
                  ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
                   "teacher_bias")]
        out = fn(*leaves, labels)
        grads = torch.autograd.grad(out, leaves[:3], grad_outputs=upstream)
        return out.detach(), grads

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out_c, grads_c = run(compiled)
    out_e, grads_e = run(step)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=0)
    for gc, ge in zip(grads_c, grads_e):
        assert not torch.isnan(gc).any()
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-9)
