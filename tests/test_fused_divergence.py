"""fused_divergence against the float64 reference, on every backend available here.

Every numeric check goes through ``helpers.check_op``: the loss and each gradient must be within twice the error
that plain PyTorch makes in the same dtype (plus a rounding slack relative to the truth's magnitude), and free of
NaN; outputs a kernel forgets to write are NaN thanks to conftest's poisoning.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minillm_fast
from helpers import (DEVICE, DIVERGENCES, IMPL_IDS, IMPLS, REDUCTIONS, STUDENT, TENSOR_NAMES, Result,
                     assert_within_budget, cancellation_scales, check_op, fused, ground_truth_and_naive,
                     labels_with_ignored, make_inputs, randn, run, tvd_ties, untie_tvd)
from minillm_fast import FusedDivergenceLoss, fused_divergence, fused_reverse_kl, reference

pytestmark = pytest.mark.usefixtures("single_thread")

# edge cases: fewer rows than the matrix (the interpreter's cost grows with them), still no tile multiple
SHAPE = dict(n=19, hs=24, ht=40, v=131)
CHUNKED_IMPLS = [i for i in IMPLS if i[1] == "chunked"]
CHUNKED_IDS = [f"{b}-{s}" for b, s in CHUNKED_IMPLS]


def _upstream(gen, reduction, lead, value=1.0):
    """Per-row random upstream gradient (signs mixed) for ``none``, else the scalar ``value``."""
    if reduction == "none":
        return randn(gen, *lead)
    return torch.tensor(value, device=DEVICE)


def test_nan_poisoning_is_active():
    """conftest's fixture really poisons; otherwise the 'no NaN' checks below would prove nothing."""
    assert torch.isnan(torch.empty(3)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(2, 2))).all()
    assert torch.isnan(torch.zeros(1).new_empty(4)).all()
    assert not torch.empty(3, dtype=torch.int64).dtype.is_floating_point  # ints are left alone


def test_torch_backend_always_parametrised():
    assert ("torch", "chunked") in IMPLS
    if minillm_fast.dispatch.triton_available(DEVICE):
        assert ("triton", "chunked") in IMPLS and ("triton", "tiled") in IMPLS


# ----------------------------------------------------------------------------------------------------------------------
# the matrix: divergence x reduction x temperature x backend/strategy, forward and backward, awkward shape
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.5], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matrix(impl, divergence, reduction, temperature, gen):
    backend, strategy = impl
    n = 21  # N=21 rows (2 row tiles of 16, 3 row blocks of 8), Hs=24, Ht=40, V=131: no multiple of any tile
    x = make_inputs(gen, n=n, hs=24, ht=40, v=131)
    if divergence == "tvd":
        x = untie_tvd(gen, x, temperature=temperature)  # no q ~= p within rounding, where sign(q - p) is a coin flip
    # gradients of both hidden states and the student head: every divergence's student and teacher formulas
    out, truth = check_op(x, STUDENT + ("teacher_hidden",), backend=backend, strategy=strategy, divergence=divergence,
                          reduction=reduction, temperature=temperature, upstream=_upstream(gen, reduction, (n,)))
    assert out.out.shape == ((n,) if reduction == "none" else ())
    assert truth.out.abs().max() > 1e-3  # the inputs make a non-trivial divergence


# ----------------------------------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------------------------------
def test_vocab_not_multiple_of_tile(impl, gen):
    x = make_inputs(gen, n=9, hs=16, ht=24, v=1031)
    check_op(x, STUDENT, backend=impl[0], strategy=impl[1], divergence="reverse_kl")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_row(impl, reduction, gen):
    x = make_inputs(gen, n=1, hs=24, ht=40, v=131)
    check_op(x, STUDENT, backend=impl[0], strategy=impl[1], divergence="forward_kl", reduction=reduction)


def test_leading_dims(impl, gen):
    lead = (3, 7)  # [B, T, H]
    x = make_inputs(gen, lead=lead, hs=24, ht=40, v=131)
    labels = labels_with_ignored(gen, lead, 131)
    out, _ = check_op(x, STUDENT, backend=impl[0], strategy=impl[1], labels=labels, reduction="none",
                      upstream=randn(gen, *lead))
    assert out.out.shape == lead
    assert (out.out[labels == -100] == 0).all()
    assert out.grads["student_hidden"].shape == (*lead, 24)


@pytest.mark.parametrize("chunk_size", [1, 1000], ids=["chunk1", "chunk_gt_N"])
@pytest.mark.parametrize("chunked_impl", CHUNKED_IMPLS, ids=CHUNKED_IDS)
def test_chunk_size(chunked_impl, chunk_size, gen):
    """Chunks of one row, and one chunk larger than N (13 rows)."""
    backend, strategy = chunked_impl
    x = make_inputs(gen, n=13, hs=24, ht=40, v=131)
    check_op(x, STUDENT, backend=backend, strategy=strategy, chunk_size=chunk_size, divergence="jsd", reduction="sum")
    check_op(x, STUDENT, backend=backend, strategy=strategy, chunk_size=chunk_size, divergence="reverse_kl",
             reduction="none", upstream=randn(gen, 13))


def test_non_contiguous_inputs(impl, gen):
    """Hidden states with a column stride (a transposed buffer) and a sliced head give the same results."""
    x = make_inputs(gen, **SHAPE)
    y = dict(x)
    y["student_hidden"] = x["student_hidden"].t().contiguous().t()  # strides (1, N)
    y["teacher_weight"] = torch.cat([x["teacher_weight"], x["teacher_weight"]], 1)[:, :40]  # row stride 80
    assert not y["student_hidden"].is_contiguous() and not y["teacher_weight"].is_contiguous()
    check_op(y, STUDENT, backend=impl[0], strategy=impl[1], divergence="reverse_kl")


# ----------------------------------------------------------------------------------------------------------------------
# rows, weights and upstream gradients
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(impl, reduction, gen):
    n = 11
    x = make_inputs(gen, n=n, hs=24, ht=40, v=131)
    labels = torch.full((n,), -100, device=DEVICE)
    for divergence in ("reverse_kl", "jsd"):
        out = fused(x, STUDENT, backend=impl[0], strategy=impl[1], labels=labels, reduction=reduction,
                    divergence=divergence, upstream=_upstream(gen, reduction, (n,)))
        assert torch.equal(out.out, torch.zeros_like(out.out)), out.out  # exactly 0, no NaN (0/0 of a mean)
        for k, g in out.grads.items():
            assert torch.equal(g, torch.zeros_like(g)), f"grad {k} is not exactly 0: {g}"


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_upstream_gradient_not_one(impl, reduction, gen):
    n = SHAPE["n"]
    x = make_inputs(gen, n=n, hs=24, ht=40, v=131)
    check_op(x, STUDENT, backend=impl[0], strategy=impl[1], divergence="skew_reverse_kl", reduction=reduction,
             upstream=_upstream(gen, reduction, (n,), value=-3.25))


@pytest.mark.parametrize("grad_names, reduction", [
    (("student_weight",), "mean"), (("student_hidden",), "none"), (("student_bias", "teacher_weight"), "sum"),
], ids=["weight_only-mean", "hidden_only-none", "student_bias_teacher_weight-sum"])
def test_some_inputs_require_grad(impl, grad_names, reduction, gen):
    n = SHAPE["n"]
    x = make_inputs(gen, **SHAPE, bias=True)
    check_op(x, grad_names, backend=impl[0], strategy=impl[1], divergence="reverse_kl", reduction=reduction,
             upstream=_upstream(gen, reduction, (n,)))


def test_no_input_requires_grad(impl, gen):
    x = make_inputs(gen, **SHAPE)
    check_op(x, (), backend=impl[0], strategy=impl[1], divergence="tvd")


@pytest.mark.parametrize("reduction", ["mean", "none"])  # the two gradient paths: forward-made, backward
def test_labels_ignore_index_and_mask(impl, reduction, gen):
    n = SHAPE["n"]
    x = make_inputs(gen, n=n, hs=24, ht=40, v=131)
    labels = labels_with_ignored(gen, (n,), 131, ignore_index=7)  # a non-default ignore_index
    labels[1] = -100  # an ordinary token id here, since ignore_index is 7
    mask = torch.rand(n, generator=gen).to(DEVICE) > 0.3
    mask[0] = True
    out, _ = check_op(x, STUDENT, backend=impl[0], strategy=impl[1], labels=labels, ignore_index=7, mask=mask,
                      divergence="forward_kl", reduction=reduction, upstream=_upstream(gen, reduction, (n,)))
    dropped = (labels == 7) | ~mask
    assert dropped.any() and (~dropped).any()
    gh = out.grads["student_hidden"]
    assert (gh[dropped] == 0).all(), "ignored rows must get exactly zero gradient"
    if reduction == "none":
        assert (out.out[dropped] == 0).all()


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_token_weights(impl, reduction, gen):
    n = SHAPE["n"]
    x = make_inputs(gen, n=n, hs=24, ht=40, v=131)
    weights = (torch.rand(n, generator=gen) * 2).to(DEVICE)
    weights[3] = 0.0
    labels = labels_with_ignored(gen, (n,), 131)
    check_op(x, STUDENT, backend=impl[0], strategy=impl[1], token_weights=weights, labels=labels,
             divergence="reverse_kl", reduction=reduction, upstream=_upstream(gen, reduction, (n,)))


def test_token_weights_are_detached(impl, gen):
    x = make_inputs(gen, n=5, hs=8, ht=8, v=19)
    weights = torch.rand(5, generator=gen).to(DEVICE).requires_grad_()
    hs = x["student_hidden"].clone().requires_grad_()
    loss = fused_divergence(hs, x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                            token_weights=weights, backend=impl[0], strategy=impl[1])
    loss.backward()
    assert weights.grad is None
    assert hs.grad is not None and torch.isfinite(hs.grad).all()


# ----------------------------------------------------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "skew_reverse_kl"])
def test_huge_logits(impl, divergence, gen):
    """Logits of magnitude ~1e4 (hidden states scaled up): nearly one-hot distributions, no overflow or NaN."""
    x = make_inputs(gen, **SHAPE)
    for k in ("student_hidden", "teacher_hidden"):
        x[k] = x[k] * 3e3
    z = x["student_hidden"] @ x["student_weight"].T
    assert z.abs().max() > 1e4
    check_op(x, STUDENT, backend=impl[0], strategy=impl[1], divergence=divergence, reduction="sum")


@pytest.mark.parametrize("temperature, divergence", [(0.05, "reverse_kl"), (0.05, "tvd"), (20.0, "forward_kl")],
                         ids=["T0.05-reverse_kl", "T0.05-tvd", "T20-forward_kl"])
def test_extreme_temperature(impl, temperature, divergence, gen):
    """T=0.05 and T=20, with raw logits of std 0.15 x T so that z/T has std ~3, as elsewhere.

    This checks the temperature's handling (1/T inside the softmax and in every gradient); with std-3 raw logits,
    T=0.05 makes z/T ~ 60 and fp32 cannot resolve the gradient at all (errors thousands of ulps for any
    implementation, PyTorch's included), so the 2x rule would only compare noise. test_huge_logits covers that
    regime. Per-row losses and upstream: the budget compares maxima over rows, not one rounded scalar.
    """
    x = make_inputs(gen, **SHAPE, logit_std=3.0 * temperature)
    if divergence == "tvd":
        x = untie_tvd(gen, x, temperature=temperature)
    check_op(x, STUDENT, backend=impl[0], strategy=impl[1], divergence=divergence, temperature=temperature,
             reduction="none", upstream=randn(gen, SHAPE["n"]))


def test_softcap(impl, gen):
    x = make_inputs(gen, **SHAPE, bias=True, logit_std=12.0)  # many logits past the cap
    for divergence in ("reverse_kl", "skew_forward_kl"):
        check_op(x, STUDENT + ("teacher_hidden",), backend=impl[0], strategy=impl[1], divergence=divergence,
                 softcap=5.0, temperature=1.5)


@pytest.mark.parametrize("scaling", [
    dict(student_softcap=5.0),                                       # Gemma student, plain teacher
    dict(teacher_softcap=4.0, teacher_logit_scale=0.3),              # Cohere-like scale, then a cap, on the teacher
    dict(student_logit_scale=2.5, teacher_logit_scale=0.125, student_softcap=8.0, teacher_softcap=3.0),
    dict(logit_scale=0.5, softcap=6.0)],                              # both models, one value each
    ids=["student-cap", "teacher-scale-cap", "both-different", "shared"])
def test_logit_scale_and_per_model_softcap(impl, scaling, gen):
    """Each model's own ``softcap(logit_scale * z) / T``, forward and backward, gradients to both sides."""
    x = make_inputs(gen, **SHAPE, bias=True, logit_std=12.0)  # many logits past the caps
    for divergence in ("reverse_kl", "jsd"):
        check_op(x, STUDENT + ("teacher_hidden", "student_bias"), backend=impl[0], strategy=impl[1],
                 divergence=divergence, temperature=1.5, **scaling)


def test_biases(impl, gen):
    x = make_inputs(gen, **SHAPE, bias=True)
    check_op(x, STUDENT + ("student_bias",), backend=impl[0], strategy=impl[1], divergence="jsd", beta=0.3)


@pytest.mark.parametrize("divergence, reduction", [("forward_kl", "mean"), ("skew_forward_kl", "none")])
def test_teacher_side_gradients(impl, divergence, reduction, gen):
    """All six tensors require grad (the matrix covers the teacher hidden states for every divergence)."""
    n = SHAPE["n"]
    x = make_inputs(gen, **SHAPE, bias=True)
    check_op(x, TENSOR_NAMES, backend=impl[0], strategy=impl[1], divergence=divergence, reduction=reduction,
             upstream=_upstream(gen, reduction, (n,)))


def test_padded_vocab(impl, gen):
    """Student head 140 rows, teacher head 131, vocab_size=131: padded rows are outside both softmaxes and get
    exactly zero gradient."""
    v, vs = 131, 140
    x = make_inputs(gen, n=SHAPE["n"], hs=24, ht=40, v=v, v_student=vs, v_teacher=v, bias=True)
    # padded rows with huge logits: if they leaked into the softmax they would take all of its mass
    x["student_weight"][v:] = 50.0
    x["student_bias"][v:] = 1e4
    names = STUDENT + ("student_bias",)
    out, _ = check_op(x, names, backend=impl[0], strategy=impl[1], vocab_size=v, divergence="reverse_kl")
    assert torch.equal(out.grads["student_weight"][v:], torch.zeros(vs - v, 24, device=DEVICE))
    assert torch.equal(out.grads["student_bias"][v:], torch.zeros(vs - v, device=DEVICE))
    assert out.grads["student_weight"][:v].abs().max() > 0


@pytest.mark.parametrize("dtype, divergence", [(torch.bfloat16, "reverse_kl"), (torch.bfloat16, "jsd"),
                                               (torch.float16, "tvd")], ids=["bf16-reverse_kl", "bf16-jsd", "fp16-tvd"])
def test_half_precision(impl, divergence, dtype, gen):
    """bf16 / fp16 inputs: the same budget rule, so looser by exactly as much as PyTorch's own error grows."""
    x = make_inputs(gen, **SHAPE, bias=True, dtype=dtype)
    if divergence == "tvd":  # fp16 logits: q and p within ~1e-3 of each other make sign(q - p) a coin flip
        x = untie_tvd(gen, x)
    check_op(x, STUDENT + ("student_bias",), backend=impl[0], strategy=impl[1], divergence=divergence)


def assert_close_fp64(out, ref, rtol, what=""):
    for (name, a), (_, b) in zip(out.items(), ref.items()):
        assert a.dtype == torch.float64, f"{what}{name} is {a.dtype}"
        assert not torch.isnan(a).any(), f"{what}{name} has NaN"
        err, mag = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= rtol * mag, f"{what}{name}: error {err:.3e} > {rtol:g} x max|truth| {mag:.3e}"


def test_float64_torch_backend_matches_reference(gen):
    x = make_inputs(gen, **SHAPE, bias=True, dtype=torch.float64)
    for divergence in DIVERGENCES:
        for reduction in REDUCTIONS:
            up = randn(gen, SHAPE["n"], dtype=torch.float64) if reduction == "none" else None
            kw = dict(divergence=divergence, reduction=reduction, upstream=up, temperature=1.7)
            out = fused(x, TENSOR_NAMES, backend="torch", **kw)
            ref = run(reference.fused_divergence, x, TENSOR_NAMES, **kw)
            assert_close_fp64(out, ref, 1e-12, f"{divergence}/{reduction} ")


# ----------------------------------------------------------------------------------------------------------------------
# API equivalences
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta, same_as", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_endpoints(impl, beta, same_as, gen):
    x = make_inputs(gen, **SHAPE)
    kw = dict(backend=impl[0], strategy=impl[1])
    a = fused(x, STUDENT, divergence="jsd", beta=beta, **kw)
    b = fused(x, STUDENT, divergence=same_as, **kw)
    assert torch.equal(a.out, b.out)
    for k in STUDENT:
        assert torch.equal(a.grads[k], b.grads[k])
    # the general JSD is a different divergence (not silently one of the KLs)
    mid = fused(x, STUDENT, divergence="jsd", beta=0.5, **kw)
    assert not torch.allclose(mid.out, b.out)


def test_fused_reverse_kl_is_fused_divergence(impl, gen):
    x = make_inputs(gen, **SHAPE, bias=True)
    kw = dict(backend=impl[0], strategy=impl[1], temperature=1.3, reduction="sum")
    a = run(fused_reverse_kl, x, STUDENT, **kw)
    b = run(fused_divergence, x, STUDENT, divergence="reverse_kl", **kw)
    assert torch.equal(a.out, b.out)
    for k in STUDENT:
        assert torch.equal(a.grads[k], b.grads[k])


def test_default_divergence_is_reverse_kl(gen):
    x = make_inputs(gen, n=7, hs=8, ht=8, v=19)
    a = run(fused_divergence, x, (), backend="torch")
    b = run(fused_divergence, x, (), backend="torch", divergence="reverse_kl")
    assert torch.equal(a.out, b.out)


def _linear_head(h: int, v: int, bias: bool) -> torch.nn.Linear:
    head = torch.nn.Linear(h, v, bias=bias).to(DEVICE)
    with torch.no_grad():  # uniform(+-1/sqrt(h)) has std 1/sqrt(3h): scale to logits of ~3 units, as make_inputs
        head.weight.mul_(3 * 3 ** 0.5)
    return head


def test_loss_module_with_linear_heads(impl, gen):
    n, hs, ht, v = SHAPE["n"], SHAPE["hs"], SHAPE["ht"], SHAPE["v"]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    student, teacher = _linear_head(hs, v, bias=True), _linear_head(ht, v, bias=True)
    h_s, h_t = randn(gen, n, hs).requires_grad_(), randn(gen, n, ht)
    labels = labels_with_ignored(gen, (n,), v)
    opts = dict(skew=0.2, temperature=2.0)
    loss_fn = FusedDivergenceLoss("skew_forward_kl", backend=impl[0], strategy=impl[1], **opts)
    assert "skew_forward_kl" in repr(loss_fn)
    loss = loss_fn(h_s, student, h_t, teacher, labels=labels)
    names = STUDENT + ("student_bias",)
    grads = torch.autograd.grad(loss, [h_s, student.weight, student.bias])

    x = {"student_hidden": h_s.detach(), "student_weight": student.weight.detach(), "teacher_hidden": h_t,
         "teacher_weight": teacher.weight.detach(), "student_bias": student.bias.detach(),
         "teacher_bias": teacher.bias.detach()}
    out, truth = check_op(x, names, backend=impl[0], strategy=impl[1], labels=labels, divergence="skew_forward_kl",
                          **opts)
    # the module is the function called with both heads' weight and bias
    assert torch.equal(loss.detach(), out.out)
    for g, k in zip(grads, names):
        assert torch.equal(g, out.grads[k]), k
    no_bias = fused({**x, "student_bias": None, "teacher_bias": None}, (), backend=impl[0], strategy=impl[1],
                    labels=labels, divergence="skew_forward_kl", **opts)
    assert not torch.allclose(no_bias.out, out.out)  # so the biases were really picked up


def test_loss_module_without_bias(gen):
    n, hs, ht, v = 7, 8, 12, 19
    student, teacher = _linear_head(hs, v, bias=False), _linear_head(ht, v, bias=False)
    h_s, h_t = randn(gen, n, hs), randn(gen, n, ht)
    loss = FusedDivergenceLoss("tvd", backend="torch", reduction="none")(h_s, student, h_t, teacher)
    expected = fused_divergence(h_s, student.weight, h_t, teacher.weight, divergence="tvd", backend="torch",
                                reduction="none")
    assert torch.equal(loss, expected)


# ----------------------------------------------------------------------------------------------------------------------
# the budget itself (helpers.py): its slack follows what cancels, and it still fails wrong results
# ----------------------------------------------------------------------------------------------------------------------
def _huge_logit_inputs(gen):
    x = make_inputs(gen, **SHAPE)
    for k in ("student_hidden", "teacher_hidden"):
        x[k] = x[k] * 3e3  # logits ~1e4: one-hot rows, as test_huge_logits
    return x


@pytest.mark.parametrize("case", ["plain", "one_hot"])
def test_cancellation_scales(case, gen):
    """Every gradient's scale is at least |truth|, elementwise; with plain inputs it is of the truth's order; in
    one-hot rows the student's true gradients are ~1e-16 or 0 while their scales stay at |q g| |W| ~ 1 (hidden
    states) and |q g| |h| ~ 1e4 (head; hidden states ~3e3)."""
    x = make_inputs(gen, **SHAPE, bias=True) if case == "plain" else _huge_logit_inputs(gen)
    names = TENSOR_NAMES if case == "plain" else STUDENT + ("teacher_hidden",)
    kw = dict(divergence="skew_reverse_kl", reduction="none", temperature=1.5, upstream=randn(gen, SHAPE["n"]))
    truth = run(reference.fused_divergence, x, names, cast=torch.float64, **kw)
    scales = cancellation_scales(x, names, **kw)
    assert scales.keys() == {f"grad {k}" for k in names}
    for k in names:
        t, sc = truth.grads[k].abs(), scales[f"grad {k}"]
        assert sc.shape == t.shape and (sc >= t * (1 - 1e-12)).all(), k
        if case == "plain":
            assert sc.max() < 100 * t.max(), k
        elif k == "student_hidden":
            assert 0.1 < sc.max() < 1e3 and t.max() < 1e-6 * sc.max(), (sc.max().item(), t.max().item())
        elif k == "student_weight":
            assert 1e2 < sc.max() < 1e7 and t.max() < 1e-6 * sc.max(), (sc.max().item(), t.max().item())


@pytest.mark.parametrize("case", ["plain", "one_hot"])
def test_budget_fails_wrong_gradients(case, gen):
    """The budget passes the torch backend's result and fails it once any one gradient is offset by 1e-5 of its
    natural scale (max of its cancellation scale, ~1 for hidden states; 1e-5 absolute in the plain case too) or,
    where the gradient is not ~0, scaled by 1.001: in the one-hot regime the slack is one fp32 rounding of what
    cancels (~1e-7 of that scale), no blanket tolerance."""
    x = make_inputs(gen, **SHAPE) if case == "plain" else _huge_logit_inputs(gen)
    names = STUDENT + ("teacher_hidden",)
    kw = dict(divergence="skew_reverse_kl", reduction="sum")
    truth, naive = ground_truth_and_naive(x, names, **kw)
    scales = cancellation_scales(x, names, **kw)
    good = fused(x, names, backend="torch", strategy="chunked", **kw)
    assert_within_budget(good, truth, naive, torch.float32, scales=scales)
    for name in names:
        offset = 1e-5 * max(1.0, scales[f"grad {name}"].max().item())
        wrongs = [lambda g: g + offset] + ([lambda g: g * 1.001] if case == "plain" else [])
        for wrong in wrongs:
            bad = Result(good.out, {**good.grads, name: wrong(good.grads[name])})
            with pytest.raises(AssertionError, match=f"grad {name}: error"):
                assert_within_budget(bad, truth, naive, torch.float32, scales=scales)


def test_untie_tvd(gen):
    """tvd_ties finds exact and near ties (the teacher a copy of the student, then nudged by less than fp16
    rounding), and untie_tvd redraws the teacher rows that have one."""
    x = make_inputs(gen, n=5, hs=8, ht=8, v=19, dtype=torch.float16)
    x["teacher_hidden"], x["teacher_weight"] = x["student_hidden"].clone(), x["student_weight"].clone()
    x["teacher_hidden"][1:3] *= 1.0 + 2 ** -9  # about an fp16 ulp: still within the rounding of the logits
    x["teacher_hidden"][3:] = randn(gen, 2, 8, scale=3.0, dtype=torch.float16)
    ties = tvd_ties(x)
    assert ties[:3].all()
    y = untie_tvd(gen, x)
    assert not tvd_ties(y).any()
    assert torch.equal(y["teacher_hidden"][~ties], x["teacher_hidden"][~ties])
    assert torch.equal(y["student_hidden"], x["student_hidden"])


# ----------------------------------------------------------------------------------------------------------------------
# random shapes (torch backend)
# ----------------------------------------------------------------------------------------------------------------------
@settings(max_examples=int(os.environ.get("MINILLM_FAST_HYPOTHESIS_EXAMPLES", "25")), deadline=None,
          derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), hs=st.integers(1, 33), ht=st.integers(1, 33), v=st.integers(1, 300),
       chunk_size=st.integers(1, 50), divergence=st.sampled_from(DIVERGENCES),
       reduction=st.sampled_from(REDUCTIONS), temperature=st.sampled_from([0.5, 1.0, 3.0]),
       bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_torch_backend(n, hs, ht, v, chunk_size, divergence, reduction, temperature, bias, seed):
    """Shapes and chunkings at random, in float64 against the float64 reference.

    Float64 on purpose: a shape or chunking bug gives an error of the order of the result, which 1e-7 x
    max|truth| catches with room to spare (1e-7, not ~1e-15: with Hs=1 a gradient is one sum over V with heavy
    cancellation); in fp32 the 2x-naive rule is a coin flip at N=1, V=7 (one or two rounded elements decide it),
    while the fixed shapes above check the fp32 budget. Examples are derandomized (reproducible);
    MINILLM_FAST_HYPOTHESIS_EXAMPLES raises their number for a longer search.
    """
    gen = torch.Generator().manual_seed(seed)
    x = make_inputs(gen, n=n, hs=hs, ht=ht, v=v, bias=bias, dtype=torch.float64)
    names = TENSOR_NAMES if bias else STUDENT + ("teacher_hidden",)
    up = randn(gen, n, dtype=torch.float64) if reduction == "none" else torch.tensor(0.75, dtype=torch.float64)
    kw = dict(divergence=divergence, reduction=reduction, temperature=temperature, upstream=up)
    out = fused(x, names, backend="torch", strategy="chunked", chunk_size=chunk_size, **kw)
    ref = run(reference.fused_divergence, x, names, **kw)
    assert_close_fp64(out, ref, 1e-7)


# ----------------------------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("impl_gpu", IMPLS, ids=IMPL_IDS)
def test_llama3_vocab_gpu(impl_gpu, gen):
    """A 128256-entry vocabulary (Llama 3) on CUDA: many vocab tiles, large row sums."""
    x = make_inputs(gen, n=64, hs=64, ht=96, v=128256)
    check_op(x, STUDENT, backend=impl_gpu[0], strategy=impl_gpu[1], divergence="reverse_kl")
