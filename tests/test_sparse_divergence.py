"""minillm_fast.sparse_divergence and token_topk: offline distillation from a stored teacher top k.

Every backend against minillm_fast/reference.py (full log-softmax, gathered): float64 to ~1e-12 on the torch and
native backends; fp32 (and triton under the interpreter) within the suite's budget, at most twice the error of the
same reference computed in fp32 plus the rounding of what cancels (for the bucket's tail, tail_cancellation). Awkward shapes (V not a
tile multiple, K not a power of two, padded and repeated ids, rows with no id, ignored rows, padded heads).
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import DEVICE, max_err, randn, rounding_slack
from minillm_fast import dispatch, fused_divergence, reference, sparse_divergence, token_topk
from minillm_fast.divergences import TAILS

pytestmark = pytest.mark.usefixtures("single_thread")


def _runs_here(backend: str) -> bool:
    try:
        dispatch.resolve(backend, DEVICE)
    except Exception:  # noqa: BLE001 - not available here
        return False
    return True


BACKENDS = [b for b in dispatch.BACKENDS if _runs_here(b)]
FP64 = [b for b in ("torch", "native") if b in BACKENDS]
DIVS = ("forward_kl", "reverse_kl", "jsd")


def inputs(gen, n=29, h=24, v=131, k=13, *, v_pad=None, bias=True, dtype=torch.float64, logit_std=3.0):
    """Student hidden/head/bias, and a teacher's top k (of a random teacher) with awkward entries: a padded slot, a
    repeated id, a row with no id at all."""
    rows = v_pad or v
    x = dict(student_hidden=randn(gen, n, h, dtype=dtype),
             student_weight=randn(gen, rows, h, scale=logit_std / h ** 0.5, dtype=dtype),
             student_bias=randn(gen, rows, dtype=dtype) if bias else None)
    ht, wt = randn(gen, n, 16, dtype=torch.float64), randn(gen, v, 16, scale=logit_std / 4, dtype=torch.float64)
    top = reference.token_topk(ht, wt, k)
    ids, lp = top.ids.clone(), top.logprobs.clone()
    ids[0, k // 2] = -1                 # a padded slot
    ids[1, k - 1] = ids[1, 0]           # a repeated id (counts once)
    ids[2] = -1                         # a row without teacher ids: skipped
    return x, ids.to(DEVICE), lp.to(DEVICE)


def run(fn, x, ids, lp, cast=None, **kw):
    leaves = {k: None if t is None else (t.detach().clone() if cast is None else t.detach().to(cast)).requires_grad_()
              for k, t in x.items()}
    out = fn(leaves["student_hidden"], leaves["student_weight"], ids, lp, student_bias=leaves["student_bias"], **kw)
    up = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    live = {k: t for k, t in leaves.items() if t is not None}
    grads = torch.autograd.grad((out * up).sum(), list(live.values()))
    return {"out": out.detach(), **{f"grad {k}": g for k, g in zip(live, grads)}}


def check(backend, x, ids, lp, **kw):
    """Float64 inputs: exact to ~1e-12 (torch, native). Otherwise: the suite's budget against the float64 truth."""
    dtype = x["student_hidden"].dtype
    truth = run(reference.sparse_divergence, x, ids, lp, cast=torch.float64, **kw)
    got = run(sparse_divergence, x, ids, lp, backend=backend, **kw)
    if dtype == torch.float64:
        for key, t in truth.items():
            assert torch.allclose(got[key], t, rtol=1e-10, atol=1e-12 * (1 + t.abs().max().item())), key
        return got, truth
    naive = run(reference.sparse_divergence, x, ids, lp, **kw)
    tail = tail_cancellation(x, ids, lp, dtype, **kw) if kw.get("tail", "bucket") == "bucket" else 0.0
    for key, t in truth.items():
        g = got[key].double()
        assert torch.isfinite(g).all(), key
        budget = 2 * max_err(naive[key].double(), t) + rounding_slack(t, dtype) + tail * t.abs().max().item()
        assert max_err(g, t) <= budget, f"[{backend}] {key}: {max_err(g, t):.3e} > budget {budget:.3e}"
    return got, truth


def tail_cancellation(x, ids, lp, dtype, vocab_size=None, temperature=1.0, softcap=None, logit_scale=None, **_):
    """The relative slack the bucket's tail needs in ``dtype``: the op forms the student's tail ``1 - sum_k q_k``
    from log-probs whose log-normaliser is rounded otherwise than a materialised log-softmax's (a separate sweep over
    the vocabulary on the composed path, the logits rounded in another order; the same logits summed in another order
    in the one sweep), so the terms that cancel carry ``~8 eps |s|max`` each, relative to the tail that is left and
    amplified by the bucket's ``P / Q`` (the teacher's and the student's tails); a materialised log-softmax forms both
    from the same rounded logits and does not pay it. Largest over the rows; 0 in float64."""
    s = reference.logits(x["student_hidden"].double(), x["student_weight"].double(),
                         None if x["student_bias"] is None else x["student_bias"].double(), vocab_size=vocab_size,
                         temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    lq = torch.log_softmax(s, -1)
    valid = ids >= 0
    top = torch.where(valid, lq.gather(-1, ids.clamp(min=0)).exp(), torch.zeros_like(lq[:, :1])).sum(-1)
    p_rest = (1 - torch.where(valid, lp.double().exp(), torch.zeros_like(top[:, None])).sum(-1)).clamp(min=1e-20)
    q_rest = (1 - top).clamp(min=1e-20)
    rows = valid.any(-1)
    amp = (top / q_rest * torch.maximum(p_rest / q_rest, torch.ones_like(q_rest)))[rows].max().item()
    return 8 * torch.finfo(dtype).eps * s.abs().max().item() * amp


@pytest.mark.parametrize("backend", FP64)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_float64_equals_reference(backend, tail, divergence, reduction, gen):
    """Per row (the composed path: log-normaliser and gathered logits, each swept again in the backward) and mean (one
    sweep that makes the gradients)."""
    x, ids, lp = inputs(gen)
    got, _ = check(backend, x, ids, lp, tail=tail, divergence=divergence, reduction=reduction)
    if reduction == "none":
        assert got["out"][2] == 0 and (got["out"] != 0).sum() >= 20


def _ops_asked(monkeypatch) -> list:
    """The dispatch ops each call asks for, recorded."""
    asked, implementation = [], dispatch.implementation
    monkeypatch.setattr(dispatch, "implementation", lambda op, backend: asked.append(op) or implementation(op, backend))
    return asked


@pytest.mark.parametrize("backend", FP64)
def test_a_scalar_loss_takes_one_sweep_and_per_row_gradients_the_composed_ops(backend, gen, monkeypatch):
    """The one-sweep path (3 matmuls: logits and the two gradient matmuls) for a scalar loss with head gradients and
    for any loss without them; the composed ops (4) where the upstream gradient is per row, or the stored log-probs
    want one. The values of both are tested above."""
    x, ids, lp = inputs(gen)
    asked = _ops_asked(monkeypatch)
    run(sparse_divergence, x, ids, lp, backend=backend, reduction="mean")
    assert asked == ["sparse_divergence"]
    asked.clear()
    with torch.no_grad():
        per_row = sparse_divergence(x["student_hidden"], x["student_weight"], ids, lp, student_bias=x["student_bias"],
                                    reduction="none", backend=backend)
    assert asked == ["sparse_divergence"]
    asked.clear()
    composed = run(sparse_divergence, x, ids, lp, backend=backend, reduction="none")
    assert asked == ["token_logprobs_fwd", "token_logprobs_bwd"]
    assert torch.allclose(per_row, composed["out"], rtol=1e-12, atol=1e-14)
    asked.clear()
    run(sparse_divergence, x, ids, lp.clone().requires_grad_(True), backend=backend, reduction="sum")
    assert asked == ["token_logprobs_fwd", "token_logprobs_bwd"]


def test_the_sweep_gradients_are_scaled_once(gen):
    """The sweep's gradients are scaled in place by the upstream scalar: a second backward through a retained graph
    is refused, not silently doubled; a scaled upstream scales them."""
    x, ids, lp = inputs(gen)
    h = x["student_hidden"].clone().requires_grad_(True)
    out = sparse_divergence(h, x["student_weight"], ids, lp, backend="torch")
    (g1,) = torch.autograd.grad(3.0 * out, h, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, h)
    (g0,) = torch.autograd.grad(sparse_divergence(h, x["student_weight"], ids, lp, backend="torch"), h)
    assert torch.allclose(g1, 3.0 * g0, rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
def test_float32_within_budget(backend, tail, gen):
    x, ids, lp = inputs(gen, dtype=torch.float32)
    for divergence in DIVS:
        check(backend, x, ids, lp, tail=tail, divergence=divergence, reduction="sum")


@pytest.mark.parametrize("backend", FP64)
def test_options_padded_head_and_ignored_rows(backend, gen):
    """Temperature, softcap and logit scale of the student; a padded head (rows >= vocab_size excluded); labels,
    token weights and a mean over the kept rows."""
    x, ids, lp = inputs(gen, v=100, v_pad=128, k=7)
    labels = torch.arange(ids.shape[0], device=DEVICE) % 5 - 1
    labels[labels == 3] = -100
    weights = torch.rand(ids.shape[0], generator=gen, dtype=torch.float64).to(DEVICE)
    got, _ = check(backend, x, ids, lp, tail="bucket", divergence="jsd", beta=0.3, vocab_size=100, temperature=1.7,
                   softcap=4.0, logit_scale=0.6, labels=labels, token_weights=weights)
    assert (got["grad student_weight"][100:] == 0).all() and (got["grad student_bias"][100:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_bucket_equals_the_full_divergence_when_the_top_k_holds_all_the_mass(divergence, dtype, backend, gen):
    """K = V: the K+1 outcomes are the whole vocabulary (the tail is empty), so the divergence is the full one, and
    so are its gradients: the empty tail sits at the floor, where the gradient is 0 (it was NaN: the derivative of
    ``log(1 - e^x)`` at ``x = 0`` times the floor's zero). float64: equal to the full op to ~1e-12; float32: finite
    and within the suite's budget (check), whose float64 truth the float64 case shows to be the full op's."""
    if dtype == torch.float64 and backend not in FP64:
        pytest.skip("float64 runs on torch and native")
    n, h, v = 11, 16, 37
    x = dict(student_hidden=randn(gen, n, h, dtype=dtype), student_weight=randn(gen, v, h, scale=0.7, dtype=dtype),
             student_bias=None)
    ht, wt = randn(gen, n, 12, dtype=torch.float64), randn(gen, v, 12, scale=0.9, dtype=torch.float64)
    top = token_topk(ht, wt, v, backend="torch")
    ids, lp = top.ids.to(DEVICE), top.logprobs.to(dtype).to(DEVICE)

    def full(hs, ws, _ids, _lp, student_bias=None, tail=None, **kw):
        return fused_divergence(hs, ws, ht.to(hs), wt.to(hs), backend="torch", **kw)

    for tail in ("bucket", "renorm"):
        if dtype == torch.float32:
            check(backend, x, ids, lp, divergence=divergence, tail=tail)
            continue
        truth = run(full, x, ids, lp, divergence=divergence)
        got = run(sparse_divergence, x, ids, lp, divergence=divergence, tail=tail, backend=backend)
        for key, t in truth.items():
            assert max_err(got[key], t) <= 1e-12 * (1 + t.abs().max().item()), (tail, key)


def test_tails_differ_as_documented(gen):
    """With a partial top k the three tails give three different numbers; ``ignore`` is not a divergence (it can be
    negative for the reverse KL) while ``bucket`` and ``renorm`` are >= 0 per row."""
    x, ids, lp = inputs(gen, k=5)
    vals = {t: sparse_divergence(x["student_hidden"], x["student_weight"], ids, lp, student_bias=x["student_bias"],
                                 tail=t, divergence="reverse_kl", reduction="none", backend="torch") for t in TAILS}
    assert (vals["bucket"] >= -1e-12).all() and (vals["renorm"] >= -1e-12).all()
    assert not torch.allclose(vals["bucket"], vals["renorm"]) and not torch.allclose(vals["bucket"], vals["ignore"])


# ----------------------------------------------------------------------------------------------------------------------
# token_topk
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_matches_the_full_softmax(backend, gen):
    h, w = randn(gen, 3, 5, 24), randn(gen, 131, 24, scale=0.5)
    b = randn(gen, 131)
    top = token_topk(h, w, 9, bias=b, temperature=0.8, softcap=6.0, backend=backend, chunk_size=4)
    ref = reference.token_topk(h.double(), w.double(), 9, bias=b.double(), temperature=0.8, softcap=6.0)
    assert top.ids.shape == (3, 5, 9) and top.ids.dtype == torch.int64
    assert torch.equal(top.ids, ref.ids)
    assert max_err(top.logprobs.double(), ref.logprobs) < 1e-5


def test_topk_breaks_ties_by_lower_id_and_excludes_padding(gen):
    w = torch.zeros(10, 4, dtype=torch.float64)
    w[[2, 5, 7]] = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)  # three tied maxima
    w[8:] = 100.0                                                       # padding rows, larger than anything
    top = token_topk(torch.ones(1, 4, dtype=torch.float64), w, 4, vocab_size=8, backend="torch")
    assert top.ids[0].tolist()[:3] == [2, 5, 7] and top.ids[0, 3] == 0
    assert abs(torch.logsumexp(top.logprobs[0, :3], -1).exp().item() - 3 * math.e / (3 * math.e + 5)) < 1e-12


# ----------------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("what, match", [
    ("id-range", r"teacher_ids has 1 id\(s\) outside \[0, vocab_size=131\)"),
    ("padded-row-id", r"outside \[0, vocab_size=100\)"),
    ("k-mismatch", r"teacher_ids \(29, 13\) and teacher_logprobs \(29, 12\) must have the same shape"),
    ("positive", r"teacher_logprobs has values above 0"),
    ("mass", r"sum to more than 1"),
    ("nan", r"non-finite values"),
    ("float-ids", r"teacher_ids must be an integer tensor"),
    ("lead", r"teacher_ids must have shape \(29,\) \+ \(K,\)"),
    ("tail", r"tail='rest' is not supported"),
    ("divergence", r"divergence='tvd' is not supported by sparse_divergence"),
])
def test_bad_input_names_it(what, match, gen):
    x, ids, lp = inputs(gen)
    kw = dict(backend="torch")
    if what == "id-range":
        ids[3, 2] = 131
    elif what == "padded-row-id":
        kw["vocab_size"] = 100
        ids[3, 2] = 110
        ids = torch.where(ids >= 100, torch.full_like(ids, 110), ids)
    elif what == "k-mismatch":
        lp = lp[:, :12]
    elif what == "positive":
        lp[4, 0] = 0.5
    elif what == "mass":
        lp[4] = math.log(0.5)
    elif what == "nan":
        lp[4, 1] = float("nan")
    elif what == "float-ids":
        ids = ids.double()
    elif what == "lead":
        ids, lp = ids[None], lp[None]
    elif what == "tail":
        kw["tail"] = "rest"
    elif what == "divergence":
        kw["divergence"] = "tvd"
    with pytest.raises((ValueError, TypeError), match=match):
        sparse_divergence(x["student_hidden"], x["student_weight"], ids, lp, student_bias=x["student_bias"], **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_tail_log_has_a_finite_gradient_next_to_zero(dtype):
    """log(1 - e^x) for a top-k log-mass x just below 0 (the whole mass up to rounding: float32 K = V rows give
    x = -2^-25, where e^x rounds to 1): finite value and gradient at every x <= 0, on both sides of the switch at
    -log 2 and at the floor. Both branches of the switch are differentiated; the one not taken saw e^x = 1 (NaN)."""
    from minillm_fast.divergences import TAIL_FLOOR, _log_rest

    x = torch.tensor([-2.0 ** -25, -1e-8, -1e-6, -0.5, -math.log(2.0), -0.9, -30.0, -1e-30, 0.0], dtype=dtype, requires_grad=True)
    y = _log_rest(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(g).all(), (y, g)
    expected = torch.log(-torch.expm1(x.detach().double())).clamp(min=math.log(TAIL_FLOOR))
    keep = x.detach() < -TAIL_FLOOR
    assert torch.allclose(y.double()[keep], expected[keep], rtol=1e-6 if dtype == torch.float32 else 1e-12)
    assert (g[~keep] == 0).all() and (y[~keep] == math.log(TAIL_FLOOR)).all()
