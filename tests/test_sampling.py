"""mixture_sample and sample_tokens, tested statistically and exactly.

* Goodness of fit: many draws of a few rows (each row repeated REP times in one call) are binned per row and
  compared with the exact law ``reference.mixture_probs`` by Pearson's chi-square (scipy), df = R (V - 1). Seeds
  are fixed, so the tests are deterministic; the threshold p > 1e-3 makes a false alarm rare for any seed. A
  companion test shows the check has power: draws from a wrong mixture fail it by a wide margin.
* The returned log-probs equal the float64 reference at the drawn tokens (error budget as in helpers.py).
* Exact properties: reproducibility per seed, alpha = 0 / 1 draw what the single-model sampler draws from the same
  seed, padded vocabulary rows are never drawn, near one-hot distributions give the argmax.
"""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from helpers import DEVICE, make_inputs, max_err, small_term
from minillm_fast import MixtureSample, TokenSample, dispatch, mixture_sample, reference, sample_tokens

MODELS = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")
P_MIN = 1e-3  # chi-square p-value threshold


def _runs_here(backend: str) -> bool:
    try:
        dispatch.resolve(backend, DEVICE)
    except Exception:  # noqa: BLE001 - not installed / no CUDA: not parametrised
        return False
    return True


BACKENDS = [b for b in dispatch.BACKENDS if _runs_here(b)]
CHUNKED = [b for b in ("torch", "native") if b in BACKENDS]  # the token-chunked backends (chunk_size)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def seeded(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def draw(x: dict, **kwargs) -> MixtureSample:
    return mixture_sample(*(x[k] for k in MODELS), student_bias=x["student_bias"], teacher_bias=x["teacher_bias"],
                          **kwargs)


def exact_probs(x: dict, **kwargs) -> torch.Tensor:
    d = {k: (None if v is None else v.double()) for k, v in x.items()}
    return reference.mixture_probs(*(d[k] for k in MODELS), student_bias=d["student_bias"],
                                   teacher_bias=d["teacher_bias"], **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# goodness of fit
# ----------------------------------------------------------------------------------------------------------------------
V, V_PAD, R, REP = 13, 16, 3, 2000  # 3 rows x 2000 draws over a 13-token vocabulary (head padded to 16 rows)
LAW = dict(vocab_size=V, temperature=0.8)


@pytest.fixture(scope="module")
def rows() -> dict:
    """R distinct student/teacher rows with a padded head whose padding rows carry a +50 bias (a sampler that let
    them in would draw nothing else), each row's law having every expected count >= 5 (chi-square's validity)."""
    gen = torch.Generator().manual_seed(20261122)
    x = make_inputs(gen, n=R, hs=8, ht=12, v=V, v_student=V_PAD, v_teacher=V_PAD, bias=True, logit_std=0.5)
    for k in ("student_bias", "teacher_bias"):
        x[k][V:] = 50.0
    for alpha in (0.0, 0.2, 1.0):
        assert exact_probs(x, alpha=alpha, **LAW).min() * REP >= 5
    return x


def repeated(x: dict) -> dict:
    """Each row REP times (row r occupies draws r*REP .. (r+1)*REP - 1)."""
    return {k: (v.repeat_interleave(REP, 0) if k.endswith("hidden") else v) for k, v in x.items()}


def chi2_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square of per-row counts against ``probs [R, V]``, df = R (V - 1)."""
    assert tokens.dtype == torch.int64 and tokens.shape == (R * REP,)
    assert ((tokens >= 0) & (tokens < V)).all(), f"drew tokens outside the vocabulary: {tokens.unique()}"
    counts = torch.stack([torch.bincount(t, minlength=V) for t in tokens.view(R, REP).cpu()])
    expected = probs.cpu() * REP
    return float(chisquare(counts.flatten().numpy(), expected.flatten().numpy(), ddof=R - 1).pvalue)


def assert_logprobs_match(got: torch.Tensor, fn, what: str, *args, **kwargs) -> None:
    """``got`` within the error budget of the reference ``fn`` (float64 truth vs the fp32 naive run)."""
    truth = fn(*(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args),
               **{k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in kwargs.items()})
    naive = fn(*args, **kwargs)
    e_impl, e_naive = max_err(got, truth), max_err(naive, truth)
    small = small_term(truth, args[0].dtype)
    assert e_impl <= 2 * e_naive + small, f"{what}: error {e_impl:.3e} > 2 x naive {e_naive:.3e} + {small:.3e}"


def assert_mixture_logprobs_match(out: MixtureSample, x: dict, alpha: float, **law) -> None:
    fields = (("student_logprobs", 0), ("teacher_logprobs", 1), ("mixture_logprobs", 2))
    for name, i in fields:
        def ref(*args, i=i, **kwargs):
            return reference.rollout_statistics(*args, **kwargs)[i]

        assert_logprobs_match(getattr(out, name), ref, name, *(x[k] for k in MODELS), out.tokens, alpha=alpha,
                              student_bias=x["student_bias"], teacher_bias=x["teacher_bias"], **law)


def test_mixture_chi_square_per_model_scaling(backend, rows):
    """The law with each model's own logit scale and softcap (a Gemma-2-like teacher, a scaled student)."""
    law = dict(LAW, student_logit_scale=0.7, teacher_softcap=2.0, teacher_logit_scale=1.5)
    out = draw(repeated(rows), alpha=0.4, generator=seeded(11), backend=backend, **law)
    p = chi2_pvalue(out.tokens, exact_probs(rows, alpha=0.4, **law))
    assert p > P_MIN, f"draws do not fit the per-model law: chi-square p = {p:.2e}"


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_mixture_chi_square(backend, alpha, rows):
    x = repeated(rows)
    out = draw(x, alpha=alpha, generator=seeded(7), backend=backend, **LAW)
    assert isinstance(out, MixtureSample) and out.tokens.shape == (R * REP,)
    p = chi2_pvalue(out.tokens, exact_probs(rows, alpha=alpha, **LAW))
    assert p > P_MIN, f"draws do not fit alpha={alpha}: chi-square p = {p:.2e}"
    assert_mixture_logprobs_match(out, x, alpha, **LAW)
    assert torch.allclose(out.importance_weight, torch.exp(out.student_logprobs - out.mixture_logprobs))


def test_sample_tokens_chi_square(backend, rows):
    x = repeated(rows)
    out = sample_tokens(x["teacher_hidden"], x["teacher_weight"], bias=x["teacher_bias"], generator=seeded(11),
                        backend=backend, **LAW)
    assert isinstance(out, TokenSample)
    p = chi2_pvalue(out.tokens, exact_probs(rows, alpha=1.0, **LAW))
    assert p > P_MIN, f"draws do not fit the teacher's softmax: chi-square p = {p:.2e}"
    assert_logprobs_match(out.logprobs, reference.token_logprobs, "logprobs", x["teacher_hidden"],
                          x["teacher_weight"], out.tokens, bias=x["teacher_bias"], **LAW)


def test_chi_square_has_power(rows):
    """The goodness-of-fit check rejects draws from a wrong law by a wide margin: alpha 0.5 instead of 0.2, the
    student alone instead of the mixture (a sampler that ignores the coin), the temperature ignored."""
    x = repeated(rows)
    right = exact_probs(rows, alpha=0.2, **LAW)
    wrong_alpha = draw(x, alpha=0.5, generator=seeded(3), backend="torch", **LAW).tokens
    assert chi2_pvalue(wrong_alpha, right) < 1e-8
    student_only = draw(x, alpha=0.0, generator=seeded(4), backend="torch", **LAW).tokens
    assert chi2_pvalue(student_only, right) < 1e-8
    no_temperature = draw(x, alpha=0.2, generator=seeded(5), backend="torch", vocab_size=V).tokens
    assert chi2_pvalue(no_temperature, right) < 1e-8


# ----------------------------------------------------------------------------------------------------------------------
# exact properties
# ----------------------------------------------------------------------------------------------------------------------
def test_reproducible(backend, gen):
    x = make_inputs(gen, n=16, hs=8, ht=12, v=70, bias=True)
    a = draw(x, generator=seeded(1), backend=backend)
    b = draw(x, generator=seeded(1), backend=backend)
    for f in MixtureSample._fields:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert not torch.equal(a.tokens, draw(x, generator=seeded(2), backend=backend).tokens)
    g = seeded(1)  # one generator advances: consecutive draws differ
    first, second = draw(x, generator=g, backend=backend), draw(x, generator=g, backend=backend)
    assert torch.equal(first.tokens, a.tokens) and not torch.equal(second.tokens, first.tokens)
    torch.manual_seed(5)  # the default generator when none is given
    c = draw(x, backend=backend).tokens
    torch.manual_seed(5)
    assert torch.equal(draw(x, backend=backend).tokens, c)
    s1 = sample_tokens(x["student_hidden"], x["student_weight"], generator=seeded(9), backend=backend)
    s2 = sample_tokens(x["student_hidden"], x["student_weight"], generator=seeded(9), backend=backend)
    assert torch.equal(s1.tokens, s2.tokens) and torch.equal(s1.logprobs, s2.logprobs)


def test_alpha_endpoints_draw_one_model(backend, gen):
    """alpha = 0 draws exactly what sample_tokens draws from the student with the same seed, alpha = 1 what it draws
    from the teacher; the mixture log-prob is then that model's log-prob."""
    x = make_inputs(gen, n=40, hs=8, ht=12, v=131, bias=True)
    for alpha, side in ((0.0, "student"), (1.0, "teacher")):
        mix = draw(x, alpha=alpha, generator=seeded(21), backend=backend)
        one = sample_tokens(x[f"{side}_hidden"], x[f"{side}_weight"], bias=x[f"{side}_bias"], generator=seeded(21),
                            backend=backend)
        assert torch.equal(mix.tokens, one.tokens), alpha
        assert torch.equal(mix.mixture_logprobs, getattr(mix, f"{side}_logprobs"))
        assert max_err(getattr(mix, f"{side}_logprobs"), one.logprobs) < 1e-5


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available")
def test_triton_draw_independent_of_tiling(gen):
    """The triton noise depends only on (seed, row, token): a row draws the same token whatever the row blocks and
    vocabulary splits (300 rows take other tile sizes and splits than 40 rows)."""
    x = make_inputs(gen, n=300, hs=8, ht=12, v=200)
    big = draw(x, generator=seeded(4), backend="triton")
    small = draw({k: (v[:40] if k.endswith("hidden") else v) for k, v in x.items()}, generator=seeded(4),
                 backend="triton")
    assert torch.equal(big.tokens[:40], small.tokens)


@pytest.mark.skipif("native" not in BACKENDS, reason="native backend not available")
def test_native_draw_independent_of_chunking_and_threads(gen):
    """The native draw of a row depends only on (seed, row) and the row's logits: the same tokens whatever the chunk
    size and the number of threads (parallel_for splits the rows of a chunk over the threads). The log-probs agree to
    the rounding of the logits, which BLAS may compute in another order for another chunk shape (the row kernel
    itself is bitwise independent of both: test_native_ops.py)."""
    x = make_inputs(gen, n=300, hs=8, ht=12, v=200)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = draw(x, generator=seeded(4), backend="native", chunk_size=300)
        torch.set_num_threads(2)
        two = draw(x, generator=seeded(4), backend="native", chunk_size=300)
        chunked = draw(x, generator=seeded(4), backend="native", chunk_size=7)
    finally:
        torch.set_num_threads(before)
    for other in (two, chunked):
        assert torch.equal(one.tokens, other.tokens)
        for f in MixtureSample._fields[1:]:
            torch.testing.assert_close(getattr(other, f), getattr(one, f), rtol=1e-5, atol=1e-5, msg=f)


def test_one_hot_rows_give_the_argmax(backend, gen):
    x = make_inputs(gen, lead=(3, 4), hs=8, ht=12, v=131, logit_std=1e4)
    for alpha, side in ((0.0, "student"), (1.0, "teacher")):
        out = draw(x, alpha=alpha, generator=seeded(0), backend=backend)
        argmax = (x[f"{side}_hidden"] @ x[f"{side}_weight"].T).argmax(-1)
        assert torch.equal(out.tokens, argmax), alpha
        assert (getattr(out, f"{side}_logprobs").abs() < 1e-3).all()
        assert torch.isfinite(out.student_logprobs).all() and torch.isfinite(out.teacher_logprobs).all()


@pytest.mark.parametrize("law", [dict(temperature=1.3, softcap=4.0),
                                 dict(temperature=1.3, teacher_softcap=4.0, student_logit_scale=0.5,
                                      teacher_logit_scale=3.0)], ids=["softcap", "per-model"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logprobs_at_drawn_tokens(backend, dtype, law, gen):
    """Awkward sizes (V not a multiple of a tile, leading dims, softcap, each model's own logit scale and softcap),
    the log-probs at the drawn tokens."""
    x = make_inputs(gen, lead=(5, 7), hs=24, ht=40, v=131, bias=True, dtype=dtype)
    out = draw(x, alpha=0.2, generator=seeded(1), backend=backend, **law)
    assert out.tokens.shape == (5, 7) and out.student_logprobs.dtype == torch.float32
    assert_mixture_logprobs_match(out, x, 0.2, **law)


def test_no_gradients(backend, gen):
    x = make_inputs(gen, n=7, hs=8, ht=12, v=131)
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in x.items()}
    out = draw(leaves, generator=seeded(0), backend=backend)
    assert not any(t.requires_grad for t in out)
    assert not sample_tokens(leaves["student_hidden"], leaves["student_weight"], backend=backend).logprobs.requires_grad


# ----------------------------------------------------------------------------------------------------------------------
# bad inputs: clear errors naming the argument
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [-0.01, 1.01, float("inf"), None])
def test_alpha_out_of_range(alpha, gen):
    x = make_inputs(gen, n=3, hs=8, ht=8, v=20)
    with pytest.raises(ValueError, match=r"alpha=.* must be a number in \[0, 1\]"):
        draw(x, alpha=alpha)


@pytest.mark.parametrize("what", ["generator", "lead", "student-width", "vocab", "temperature", "softcap",
                                  "single-weight", "single-bias"])
def test_bad_arguments(what, gen):
    x = make_inputs(gen, n=6, hs=8, ht=12, v=20)
    kwargs, err, single = {}, ValueError, what.startswith("single")
    if what == "generator":
        kwargs["generator"], err, match = 123, TypeError, "generator must be a torch.Generator or None, got int"
    elif what == "lead":
        x["teacher_hidden"], match = x["teacher_hidden"][:5], "must have the same leading shape"
    elif what == "student-width":
        x["student_weight"], match = x["student_weight"][:, :4], "student_weight has width 4"
    elif what == "vocab":
        x["student_weight"], match = x["student_weight"][:18], "pass vocab_size="
    elif what == "temperature":
        kwargs["temperature"], match = 0, "temperature=0 must be a number > 0"
    elif what == "softcap":
        kwargs["softcap"], match = -2.0, "softcap=-2.0 must be a number > 0"
    elif what == "single-weight":
        match = r"weight must have shape \[V, H\]"
    else:
        kwargs["bias"], match = torch.zeros(3, device=DEVICE), r"bias must have shape \[V\] = \(20,\)"
    with pytest.raises(err, match=match):
        if single:
            w = x["student_weight"][0] if what == "single-weight" else x["student_weight"]
            sample_tokens(x["student_hidden"], w, **kwargs)
        else:
            draw(x, **kwargs)


@pytest.mark.parametrize("backend", CHUNKED)
def test_custom_op_opcheck(backend, gen):
    x = make_inputs(gen, n=6, hs=8, ht=12, v=20, bias=True)
    seed = torch.tensor([12345], device=DEVICE)
    args = (x["student_hidden"], x["student_weight"], x["student_bias"], x["teacher_hidden"], x["teacher_weight"],
            x["teacher_bias"], seed, 0.2, [1 / 0.9, 3.0, 0.5, 0.0], 20, backend, 4)
    torch.library.opcheck(torch.ops.minillm_fast.mixture_sample.default, args)
    single = (x["student_hidden"], x["student_weight"], None, None, None, None, seed, 0.0, [1.0, 0.0, 1.0, 0.0], 20, backend, 4)
    torch.library.opcheck(torch.ops.minillm_fast.mixture_sample.default, single)
