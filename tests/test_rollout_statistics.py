"""rollout_statistics against the float64 reference, on every backend that implements it here.

Every field (log q(y), log p(y), log m(y), the importance weight and the full-vocabulary reverse KL) must be within
twice the error of the plain PyTorch reference in the same dtype plus a rounding slack (helpers.py), and finite.
The naive error is the largest of the reference's four summation orders (helpers.ORDERS), as in helpers.py: a
single order is sometimes luckily exact on the one row that decides a maximum (an importance weight q/m ~1e6 is off
by its log's rounding, ~1e-6 relative, which the logits' rounding decides).
"""
from __future__ import annotations

import pytest
import torch

import minillm_fast
from helpers import DEVICE, ORDERS, make_inputs, max_err, reordered, small_term
from minillm_fast import RolloutStatistics, dispatch, reference, rollout_statistics

MODELS = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")


def _runs_here(backend: str) -> bool:
    try:
        dispatch.resolve(backend, DEVICE)
    except Exception:  # noqa: BLE001 - not installed / no CUDA: not parametrised
        return False
    return True


BACKENDS = [b for b in dispatch.BACKENDS if _runs_here(b)]
CHUNKED = [b for b in ("torch", "native") if b in BACKENDS]  # the token-chunked backends (chunk_size, float64)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def call(fn, x: dict, tokens, *, cast=None, **kwargs) -> RolloutStatistics:
    t = {k: (None if v is None else (v if cast is None else v.to(cast))) for k, v in x.items()}
    return fn(*(t[k] for k in MODELS), tokens, student_bias=t["student_bias"], teacher_bias=t["teacher_bias"],
              **kwargs)


def check(backend, x: dict, tokens, **kwargs) -> tuple[RolloutStatistics, RolloutStatistics]:
    """The op against the float64 reference with the error budget; returns (impl, truth)."""
    dtype = x["student_hidden"].dtype
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
    truth = call(reference.rollout_statistics, x, tokens, cast=torch.float64, **ref_kwargs)
    naive = []  # per-row outputs: only the tokens need mapping to a reversed vocabulary
    for flip_vocab, flip_hidden in ORDERS:
        inputs, _, retoken = reordered(x, ref_kwargs.get("vocab_size"), flip_vocab, flip_hidden)
        naive.append(call(reference.rollout_statistics, inputs, retoken(tokens), **ref_kwargs))
    impl = call(rollout_statistics, x, tokens, backend=backend, **kwargs)
    assert isinstance(impl, RolloutStatistics)
    for name, got, t, *nvs in zip(RolloutStatistics._fields, impl, truth, *naive):
        what = f"[{backend}] {name}"
        assert got.shape == tokens.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(tokens.shape)}"
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), f"{what}: {got.dtype}"
        assert torch.isfinite(got).all(), f"{what} is not finite: {got}"
        e_impl, e_naive, small = max_err(got, t), max(max_err(nv, t) for nv in nvs), small_term(t, dtype)
        assert e_impl <= 2 * e_naive + small, (
            f"{what}: error {e_impl:.3e} > 2 x naive {e_naive:.3e} + {small:.3e} "
            f"(max|truth| {t.double().abs().max().item():.3e})")
    return impl, truth


def tokens_for(gen, lead, vocab):
    return torch.randint(0, vocab, tuple(lead), generator=gen).to(DEVICE)


# ----------------------------------------------------------------------------------------------------------------------
# against the reference
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_alpha(backend, alpha, gen):
    x = make_inputs(gen, n=37, hs=24, ht=40, v=131, bias=True)
    impl, truth = check(backend, x, tokens_for(gen, (37,), 131), alpha=alpha)
    assert truth.reverse_kl.min() > 1e-3  # non-trivial
    if alpha == 0.0:  # the mixture is the student: log m = log q exactly, weight 1
        assert torch.equal(impl.mixture_logprobs, impl.student_logprobs)
        assert (impl.importance_weight == 1).all()
    if alpha == 1.0:
        assert torch.equal(impl.mixture_logprobs, impl.teacher_logprobs)


CASES = {
    # id: (lead, V, make_inputs options, op options); V is never a multiple of a tile
    "one-row-V1031": ((1,), 1031, {}, {}),
    "lead3x7": ((3, 7), 131, {}, {}),
    "padded-heads": ((37,), 100, dict(v_student=128, v_teacher=140, bias=True), dict(vocab_size=100)),
    "logits-1e4": ((37,), 131, dict(logit_std=1e4), {}),
    "T0.05": ((37,), 131, dict(logit_std=1.0), dict(temperature=0.05)),
    "T20": ((37,), 131, {}, dict(temperature=20.0)),
    "softcap": ((37,), 131, dict(logit_std=10.0, bias=True), dict(softcap=5.0, temperature=0.7)),
    "per-model-scaling": ((37,), 131, dict(logit_std=10.0, bias=True),
                          dict(student_softcap=5.0, student_logit_scale=2.0, teacher_logit_scale=0.3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case, gen):
    lead, v, make_opts, opts = CASES[case]
    x = make_inputs(gen, lead=lead, hs=24, ht=40, v=v, **make_opts)
    check(backend, x, tokens_for(gen, lead, v), alpha=0.2, **opts)


def test_half_precision(backend, gen):
    x = make_inputs(gen, n=37, hs=32, ht=48, v=131, bias=True, dtype=torch.bfloat16)
    check(backend, x, tokens_for(gen, (37,), 131), alpha=0.2)


@pytest.mark.parametrize("backend", CHUNKED)
def test_float64(backend, gen):
    x = make_inputs(gen, n=17, hs=24, ht=40, v=131, bias=True, dtype=torch.float64)
    tokens = tokens_for(gen, (17,), 131)
    impl = call(rollout_statistics, x, tokens, backend=backend, alpha=0.3, softcap=6.0)
    truth = call(reference.rollout_statistics, x, tokens, alpha=0.3, softcap=6.0)
    for name, got, t in zip(RolloutStatistics._fields, impl, truth):
        assert got.dtype == torch.float64 and max_err(got, t) < 1e-10, name


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_chunk_sizes(backend, chunk_size, gen):
    x = make_inputs(gen, n=23, hs=24, ht=40, v=131, bias=True)
    check(backend, x, tokens_for(gen, (23,), 131), alpha=0.2, chunk_size=chunk_size, softcap=4.0)


def test_same_as_the_separate_ops(backend, gen):
    """One pass gives what token_logprobs (twice) and the fused reverse KL give separately."""
    x = make_inputs(gen, lead=(4, 5), hs=24, ht=40, v=200, bias=True)
    tokens = tokens_for(gen, (4, 5), 200)
    stats = call(rollout_statistics, x, tokens, backend=backend, alpha=0.2, temperature=1.3)
    lq = minillm_fast.token_logprobs(x["student_hidden"], x["student_weight"], tokens, bias=x["student_bias"],
                                     temperature=1.3, backend=backend)
    lp = minillm_fast.token_logprobs(x["teacher_hidden"], x["teacher_weight"], tokens, bias=x["teacher_bias"],
                                     temperature=1.3, backend=backend)
    rkl = minillm_fast.fused_reverse_kl(*(x[k] for k in MODELS), student_bias=x["student_bias"],
                                        teacher_bias=x["teacher_bias"], temperature=1.3, reduction="none",
                                        backend=backend)
    assert max_err(stats.student_logprobs, lq) < 1e-5
    assert max_err(stats.teacher_logprobs, lp) < 1e-5
    assert max_err(stats.reverse_kl, rkl) < 1e-5


def test_no_gradients(backend, gen):
    x = make_inputs(gen, n=7, hs=24, ht=40, v=131)
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in x.items()}
    stats = call(rollout_statistics, leaves, tokens_for(gen, (7,), 131), backend=backend)
    assert not any(t.requires_grad for t in stats)


# ----------------------------------------------------------------------------------------------------------------------
# bad inputs: clear errors naming the argument
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "0.2"])
def test_alpha_out_of_range(alpha, gen):
    x = make_inputs(gen, n=3, hs=8, ht=8, v=20)
    with pytest.raises(ValueError, match=r"alpha=.* must be a number in \[0, 1\]"):
        call(rollout_statistics, x, tokens_for(gen, (3,), 20), alpha=alpha)


def test_tokens_out_of_range(backend, gen):
    x = make_inputs(gen, n=4, hs=8, ht=8, v=100, v_student=128, v_teacher=128)
    tokens = torch.tensor([0, 5, 99, 100], device=DEVICE)
    with pytest.raises(ValueError, match=r"tokens .*outside \[0, vocab_size=100\)"):
        call(rollout_statistics, x, tokens, vocab_size=100, backend=backend)
    with pytest.raises(ValueError, match=r"tokens .*outside \[0, vocab_size=128\), first -100"):
        call(rollout_statistics, x, torch.tensor([0, 5, -100, 3], device=DEVICE), backend=backend)


@pytest.mark.parametrize("what", ["lead", "tokens-shape", "tokens-float", "vocab", "teacher-width", "temperature"])
def test_bad_arguments(what, gen):
    x = make_inputs(gen, n=6, hs=8, ht=12, v=20)
    tokens = tokens_for(gen, (6,), 20)
    kwargs = {}
    err = ValueError
    if what == "lead":
        x["teacher_hidden"], match = x["teacher_hidden"][:5], "must have the same leading shape"
    elif what == "tokens-shape":
        tokens, match = tokens[:5], r"tokens must have the hidden states' leading shape \(6,\)"
    elif what == "tokens-float":
        tokens, err, match = tokens.float(), TypeError, "tokens must be an integer tensor"
    elif what == "vocab":
        x["teacher_weight"], match = x["teacher_weight"][:19], "pass vocab_size="
    elif what == "teacher-width":
        x["teacher_weight"], match = x["teacher_weight"][:, :8], "teacher_weight has width 8"
    else:
        kwargs["temperature"], match = -1.0, "temperature=-1.0 must be a number > 0"
    with pytest.raises(err, match=match):
        call(rollout_statistics, x, tokens, **kwargs)


@pytest.mark.parametrize("backend", CHUNKED)
def test_custom_op_opcheck(backend, gen):
    x = make_inputs(gen, n=6, hs=8, ht=12, v=20, bias=True)
    tokens = tokens_for(gen, (6,), 20)
    args = (x["student_hidden"], x["student_weight"], x["student_bias"], x["teacher_hidden"], x["teacher_weight"],
            x["teacher_bias"], tokens, 0.2, [1 / 0.9, 3.0, 0.5, 0.0], 20, backend, 4)
    torch.library.opcheck(torch.ops.minillm_fast.rollout_statistics.default, args)
