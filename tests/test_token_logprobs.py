"""token_logprobs against the float64 reference, on every backend that implements it here.

Error budget as in helpers.py: every output (log-probs, entropy) and every gradient must be within twice the error
that the plain PyTorch reference makes in the same dtype, plus a rounding slack relative to the truth's magnitude,
and free of NaN (conftest poisons uninitialised memory with NaN). Upstream gradients are random, signs mixed. The
naive error is the largest of the reference's four summation orders (helpers.ORDERS), as in helpers.py: with logits
~1e4 the entropy (~1e-15) is decided by the logits' rounding (~1e-3), which a single order may get luckily right.
"""
from __future__ import annotations

import pytest
import torch

from helpers import DEVICE, ORDERS, Result, labels_with_ignored, max_err, randn, reordered, small_term
from minillm_fast import dispatch, reference, token_logprobs


def _runs_here(backend: str) -> bool:
    try:
        dispatch.resolve(backend, DEVICE)
    except Exception:  # noqa: BLE001 - not installed / no CUDA: not parametrised
        return False
    return True


BACKENDS = [b for b in dispatch.BACKENDS if _runs_here(b)]
# the token-chunked backends (chunk_size, float64)
CHUNKED = [b for b in ("torch", "native") if b in BACKENDS]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def make(gen, lead=(37,), h=24, v=131, *, v_pad=None, bias=False, logit_std=3.0, dtype=torch.float32):
    """hidden [*lead, h], weight [v_pad or v, h] with logits of std ~logit_std, bias [v_pad or v] or None."""
    rows = v_pad or v
    hidden = randn(gen, *lead, h, dtype=dtype)
    weight = randn(gen, rows, h, scale=logit_std / h ** 0.5, dtype=dtype)
    return hidden, weight, (randn(gen, rows, dtype=dtype) if bias else None)


def run(fn, hidden, weight, bias, targets, *, up_lp, up_ent=None, cast=None, **kwargs) -> dict:
    """Outputs and gradients of ``sum(up_lp * logprobs + up_ent * entropy)`` w.r.t. hidden / weight / bias, by name.

    up_lp or up_ent None: that output is left out of the sum (its upstream gradient is None)."""
    leaves = [None if t is None else (t.detach().clone() if cast is None else t.detach().to(cast)).requires_grad_()
              for t in (hidden, weight, bias)]
    entropy = up_ent is not None
    out = fn(leaves[0], leaves[1], targets, bias=leaves[2], return_entropy=entropy, **kwargs)
    lp, ent = out if entropy else (out, None)
    terms = []
    if up_lp is not None:
        terms.append((lp * up_lp.to(lp.dtype)).sum())
    if entropy:
        terms.append((ent * up_ent.to(ent.dtype)).sum())
    live = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(sum(terms), live)
    named = {"logprobs": lp.detach()}
    if entropy:
        named["entropy"] = ent.detach()
    named.update((f"grad {k}", g) for k, g in zip(("hidden", "weight", "bias"), grads))
    return named


GRAD_KEYS = {"grad hidden": "student_hidden", "grad weight": "student_weight", "grad bias": "student_bias"}


def naive_runs(hidden, weight, bias, targets, *, vocab_size=None, **kwargs) -> list[dict]:
    """``run`` of the reference in the inputs' dtype in each of the four summation orders, mapped back."""
    out = []
    for flip_vocab, flip_hidden in ORDERS:
        x, restore, retoken = reordered({"student_hidden": hidden, "student_weight": weight, "student_bias": bias},
                                        vocab_size, flip_vocab, flip_hidden)
        named = run(reference.token_logprobs, x["student_hidden"], x["student_weight"], x["student_bias"],
                    retoken(targets), vocab_size=vocab_size, **kwargs)
        grads = restore(Result(None, {GRAD_KEYS[k]: g for k, g in named.items() if k in GRAD_KEYS})).grads
        named.update((k, grads[GRAD_KEYS[k]]) for k in named if k in GRAD_KEYS)
        out.append(named)
    return out


def assert_budget(impl: dict, truth: dict, naive, dtype, what: str = "") -> None:
    """``naive``: one naive run or several (the largest error counts)."""
    assert impl.keys() == truth.keys()
    naive = [naive] if isinstance(naive, dict) else list(naive)
    for name, x in impl.items():
        t = truth[name]
        assert x.shape == t.shape, f"{what}{name}: shape {tuple(x.shape)}, expected {tuple(t.shape)}"
        assert torch.isfinite(x).all(), f"{what}{name} is not finite: {x}"
        e_impl, e_naive, small = max_err(x, t), max(max_err(nv[name], t) for nv in naive), small_term(t, dtype)
        assert e_impl <= 2 * e_naive + small, (
            f"{what}{name}: error {e_impl:.3e} > 2 x naive {e_naive:.3e} + {small:.3e} "
            f"(max|truth| {t.double().abs().max().item():.3e})")


def check(backend, hidden, weight, bias, targets, *, up_lp, up_ent=None, **kwargs) -> tuple[dict, dict]:
    """The op against the float64 reference with the error budget; returns (impl, truth)."""
    dtype = hidden.dtype
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
    truth = run(reference.token_logprobs, hidden, weight, bias, targets, up_lp=up_lp, up_ent=up_ent,
                cast=torch.float64, **ref_kwargs)
    naive = naive_runs(hidden, weight, bias, targets, up_lp=up_lp, up_ent=up_ent, **ref_kwargs)
    impl = run(token_logprobs, hidden, weight, bias, targets, up_lp=up_lp, up_ent=up_ent, backend=backend, **kwargs)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert impl["logprobs"].dtype == out_dtype
    for name, like in (("grad hidden", hidden), ("grad weight", weight), ("grad bias", bias)):
        if name in impl:
            assert impl[name].dtype == like.dtype, f"{name} has dtype {impl[name].dtype}, expected {like.dtype}"
    assert_budget(impl, truth, naive, dtype, f"[{backend}] ")
    return impl, truth


# ----------------------------------------------------------------------------------------------------------------------
# against the reference: shapes, vocabularies, temperatures, softcap, logit scale (all with entropy and ignored rows)
# ----------------------------------------------------------------------------------------------------------------------
CASES = {
    # id: (lead, H, V, make options, op options); V is never a multiple of a tile
    "N37-V131-bias": ((37,), 24, 131, dict(bias=True), {}),
    "one-row-V1031": ((1,), 16, 1031, {}, {}),
    "lead3x7": ((3, 7), 24, 131, {}, {}),
    "padded-vocab": ((37,), 24, 100, dict(v_pad=128, bias=True), dict(vocab_size=100)),
    "logits-1e4": ((37,), 24, 131, dict(logit_std=1e4), {}),
    # logit std 1 (s std ~20 at T=0.05): still sharp, but several rows keep a non-trivial entropy; at std 3 nearly
    # every row is one-hot and the max error is taken over a couple of rows, a noisy statistic for the 2x budget.
    "T0.05": ((37,), 24, 131, dict(logit_std=1.0), dict(temperature=0.05)),
    "T20": ((37,), 24, 131, {}, dict(temperature=20.0)),
    "softcap": ((37,), 24, 131, dict(logit_std=10.0, bias=True), dict(softcap=5.0, temperature=0.7)),
    "logit-scale": ((37,), 24, 131, dict(logit_std=10.0, bias=True), dict(logit_scale=0.25, temperature=0.7)),
    "logit-scale-softcap": ((37,), 24, 131, dict(logit_std=10.0, bias=True), dict(logit_scale=3.0, softcap=5.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case, gen):
    lead, h, v, make_opts, opts = CASES[case]
    hidden, weight, bias = make(gen, lead, h, v, **make_opts)
    targets = labels_with_ignored(gen, lead, v, frac=0.2)
    impl, truth = check(backend, hidden, weight, bias, targets, up_lp=randn(gen, *lead), up_ent=randn(gen, *lead),
                        **opts)
    ignored = targets == -100
    assert impl["logprobs"].shape == lead and impl["entropy"].shape == lead
    assert (impl["logprobs"][ignored] == 0).all() and (impl["entropy"][ignored] == 0).all()
    assert (impl["logprobs"][~ignored] < 0).any()  # a non-trivial case
    if "v_pad" in make_opts:  # padded head rows get no gradient
        assert (impl["grad weight"][v:] == 0).all() and (impl["grad bias"][v:] == 0).all()


def test_without_entropy(backend, gen):
    hidden, weight, bias = make(gen, (29,), 24, 131, bias=True)
    targets = labels_with_ignored(gen, (29,), 131)
    out = token_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    assert isinstance(out, torch.Tensor) and out.shape == (29,)
    check(backend, hidden, weight, bias, targets, up_lp=randn(gen, 29))


def test_entropy_gradient_alone(backend, gen):
    """Only the entropy is used: the log-prob's upstream gradient is None."""
    hidden, weight, _ = make(gen, (21,), 24, 131)
    targets = torch.randint(0, 131, (21,), generator=gen).to(DEVICE)
    check(backend, hidden, weight, None, targets, up_lp=None, up_ent=randn(gen, 21))


def test_only_weight_requires_grad(backend, gen):
    hidden, weight, _ = make(gen, (19,), 24, 131)
    targets = torch.randint(0, 131, (19,), generator=gen).to(DEVICE)
    w = weight.clone().requires_grad_()
    (token_logprobs(hidden, w, targets, backend=backend) * 2).sum().backward()
    w64 = weight.double().requires_grad_()
    (reference.token_logprobs(hidden.double(), w64, targets) * 2).sum().backward()
    assert max_err(w.grad, w64.grad) < 1e-5


def test_all_rows_ignored(backend, gen):
    hidden, weight, bias = make(gen, (11,), 24, 131, bias=True)
    targets = torch.full((11,), -100, device=DEVICE)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = token_logprobs(h, w, targets, bias=bias, return_entropy=True, backend=backend)
    assert (lp == 0).all() and (ent == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()


def test_custom_ignore_index(backend, gen):
    hidden, weight, _ = make(gen, (13,), 24, 131)
    targets = torch.randint(0, 131, (13,), generator=gen).to(DEVICE)
    targets[::3] = 7  # an in-vocabulary id used as the ignore marker
    lp = token_logprobs(hidden, weight, targets, ignore_index=7, backend=backend)
    ref = reference.token_logprobs(hidden.double(), weight.double(), targets, ignore_index=7)
    assert (lp[targets == 7] == 0).all()
    assert max_err(lp, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_half_precision(backend, dtype, gen):
    hidden, weight, bias = make(gen, (37,), 32, 131, bias=True, dtype=dtype)
    targets = labels_with_ignored(gen, (37,), 131)
    check(backend, hidden, weight, bias, targets, up_lp=randn(gen, 37), up_ent=randn(gen, 37))


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["plain", "softcap"])
def test_float64(backend, softcap, gen):
    """float64 in, float64 out, equal to the reference to float64 rounding (the naive error is 0 here, so the
    budget is an absolute tolerance)."""
    hidden, weight, bias = make(gen, (17,), 24, 131, bias=True, dtype=torch.float64)
    targets = labels_with_ignored(gen, (17,), 131)
    up = dict(up_lp=randn(gen, 17, dtype=torch.float64), up_ent=randn(gen, 17, dtype=torch.float64))
    opts = dict(softcap=softcap, temperature=0.7)
    impl = run(token_logprobs, hidden, weight, bias, targets, backend=backend, **up, **opts)
    truth = run(reference.token_logprobs, hidden, weight, bias, targets, **up, **opts)
    assert impl["logprobs"].dtype == torch.float64 and impl["grad hidden"].dtype == torch.float64
    for name in impl:
        assert max_err(impl[name], truth[name]) < 1e-10, name


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_chunk_sizes(backend, chunk_size, gen):
    hidden, weight, bias = make(gen, (23,), 24, 131, bias=True)
    targets = labels_with_ignored(gen, (23,), 131)
    check(backend, hidden, weight, bias, targets, up_lp=randn(gen, 23), up_ent=randn(gen, 23),
          chunk_size=chunk_size, softcap=4.0)


def test_backends_agree(gen):
    """Every backend gives the same values within fp32 rounding."""
    hidden, weight, bias = make(gen, (9, 4), 24, 200, bias=True)
    targets = labels_with_ignored(gen, (9, 4), 200)
    outs = [token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend=b) for b in BACKENDS]
    for lp, ent in outs[1:]:
        assert max_err(lp, outs[0][0]) < 1e-4 and max_err(ent, outs[0][1]) < 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# bad inputs: clear errors naming the argument
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    (131, r"targets .*outside \[0, vocab_size=131\)"),
    (-1, r"targets .*outside \[0, vocab_size=131\).*ignore_index=-100"),
    (10 ** 6, r"targets .*first 1000000"),
], ids=["V", "negative", "huge"])
def test_target_out_of_range(backend, bad, match, gen):
    hidden, weight, _ = make(gen, (5,), 8, 131)
    targets = torch.tensor([1, 2, bad, 3, -100], device=DEVICE)
    with pytest.raises(ValueError, match=match):
        token_logprobs(hidden, weight, targets, backend=backend)


def test_target_in_padded_rows_rejected(backend, gen):
    hidden, weight, _ = make(gen, (4,), 8, 100, v_pad=128)
    targets = torch.tensor([1, 2, 110, 3], device=DEVICE)
    token_logprobs(hidden, weight, targets, backend=backend)  # the padded rows are real without vocab_size
    with pytest.raises(ValueError, match=r"targets .*vocab_size=100.*padding"):
        token_logprobs(hidden, weight, targets, vocab_size=100, backend=backend)


@pytest.mark.parametrize("what", ["targets-shape", "targets-float", "targets-none", "weight-width", "bias-shape",
                                  "temperature", "ignore_index", "vocab_size", "backend"])
def test_bad_arguments(what, gen):
    hidden, weight, _ = make(gen, (2, 3), 8, 20)
    targets = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)
    kwargs = {}
    err, match = ValueError, what
    if what == "targets-shape":
        targets, match = targets.reshape(6), r"targets must have the hidden states' leading shape \(2, 3\)"
    elif what == "targets-float":
        targets, err, match = targets.float(), TypeError, "targets must be an integer tensor"
    elif what == "targets-none":
        targets, err, match = None, TypeError, "targets must be a torch.Tensor"
    elif what == "weight-width":
        weight, match = weight[:, :5], "weight has width 5"
    elif what == "bias-shape":
        kwargs["bias"], match = torch.zeros(19, device=DEVICE), r"bias must have shape \[V\] = \(20,\)"
    elif what == "temperature":
        kwargs["temperature"], match = 0.0, "temperature=0.0 must be a number > 0"
    elif what == "ignore_index":
        kwargs["ignore_index"], err, match = 1.5, TypeError, "ignore_index must be an int"
    elif what == "vocab_size":
        kwargs["vocab_size"], match = 21, "vocab_size=21 exceeds the 20 rows of weight"
    elif what == "backend":
        kwargs["backend"], match = "cuda", "backend='cuda' is not supported"
    with pytest.raises(err, match=match):
        token_logprobs(hidden, weight, targets, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CHUNKED)
def test_custom_ops_opcheck(backend, gen):
    """Schema, fake (meta) implementations and autograd registration of the forward and backward ops."""
    hidden, weight, bias = make(gen, (6,), 8, 20, bias=True)
    targets = torch.tensor([0, 3, -100, 19, 5, 5], device=DEVICE)
    fwd_args = (hidden, weight, bias, targets, 1 / 0.7, 2.0, 20, -100, True, backend, 4)  # inv_temp, softcap
    torch.library.opcheck(torch.ops.minillm_fast.token_logprobs_fwd.default, fwd_args)
    _, ent, stats = torch.ops.minillm_fast.token_logprobs_fwd(*fwd_args)
    g = randn(gen, 6)
    bwd_args = (hidden, weight, bias, targets, stats, ent, g, g, 1 / 0.7, 2.0, 20, -100, backend, 4, [True, True, True])
    torch.library.opcheck(torch.ops.minillm_fast.token_logprobs_bwd.default, bwd_args)


@pytest.mark.parametrize("backend", CHUNKED)
def test_torch_compile(backend, gen):
    """The op traces under torch.compile (fake implementations) and gives the eager values and gradients."""
    hidden, weight, _ = make(gen, (2, 5), 8, 20)
    targets = torch.randint(0, 20, (2, 5), generator=gen).to(DEVICE)

    def f(h, w):
        lp, ent = token_logprobs(h, w, targets, return_entropy=True, backend=backend)
        return lp.sum() + 0.5 * ent.sum()

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    eager = f(h1, w1)
    eager.backward()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(h2, w2)
    compiled.backward()
    assert max_err(compiled, eager) < 1e-5
    assert max_err(h2.grad, h1.grad) < 1e-5 and max_err(w2.grad, w1.grad) < 1e-5
