"""The native (C++) rows function against the PyTorch one, and the native backend's build, dispatch and checks.

The end-to-end op on the native backend is covered by test_fused_divergence.py (parametrised over every backend that
resolves). Here: the rows function alone, on raw chunk logits, for every divergence, with and without temperature
and softcap, at vocabulary sizes that are below one vector, straddle the kernel's 512-entry blocks, or end in a
partial vector, and with each model's own scaling (softcap on one model only, different logit scales and
temperatures: minillm_fast/scaling.py). Error budget: ``|native - truth| <= 2 |torch_rows(fp32) - truth| + 8 ulps x
max|truth|`` for the loss, each statistic and both gradients (for a gradient, at least one fp32 rounding of the terms
that cancel in it: helpers.rows_cancellation_scales), with the truth from torch_rows in float64. The
two-model ops of token_stats_cpu.cpp / sampling_cpu.cpp (rollout statistics, sampler) with per-model scalings are
checked here too, against log_softmax of each model's ``Scaling.apply`` logits in float64.

If no C++ compiler or ninja is installed the kernel tests are skipped (the toolchain tests still run); if the
toolchain is there, a build failure fails them.
"""
from __future__ import annotations

import os
import shutil
import warnings
import zlib

import pytest
import torch

from helpers import assert_rows_within_budget, max_err, rows_cancellation_scales, small_term
from minillm_fast import dispatch, divergences, native
from minillm_fast.backends import native as native_backend, torch as torch_backend
from minillm_fast.chunked import DivergenceConfig
from minillm_fast.scaling import Scaling

# (temperature, softcap), the same for both models
SETTINGS = {"plain": (1.0, 0.0), "T2.5": (2.5, 0.0), "T0.7-cap5": (0.7, 5.0), "T1.5-cap30": (1.5, 30.0)}
# (student, teacher): each model its own scaling (Scaling.of(temperature, softcap, logit_scale))
PER_MODEL = {
    "student-cap": (Scaling.of(1.0, 5.0), Scaling.of(1.0)),
    "teacher-cap": (Scaling.of(1.0), Scaling.of(1.0, 5.0)),
    "scales": (Scaling.of(1.3, None, 0.25), Scaling.of(1.3, 30.0, 2.0)),
    "T-and-caps": (Scaling.of(0.7, 8.0), Scaling.of(2.0, 20.0, 1.5)),
}


def _toolchain_missing() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available()


@pytest.fixture(scope="module")
def ext():
    if _toolchain_missing():
        pytest.skip("no C++ compiler or ninja: the native extension cannot be built here")
    return native.load()  # raises (fails the test) if the build itself is broken


def _cfg(name: str, temperature: float = 1.0, softcap: float = 0.0, vocab: int = 0, beta=0.3, skew=0.2,
         student: Scaling = None, teacher: Scaling = None):
    """The op's config: both models scaled by (temperature, softcap), unless ``student`` / ``teacher`` give their
    own."""
    both = Scaling.of(temperature, softcap or None)
    return DivergenceConfig(divergences.resolve(name, beta, skew), student or both, teacher or both, vocab)


def _chunk(gen, c, v, std=3.0, offset=1.0, dtype=torch.float32):
    zs = (torch.randn(c, v, generator=gen) * std).to(dtype)
    zt = (torch.randn(c, v, generator=gen) * std + offset).to(dtype)
    row_grad = torch.randn(c, generator=gen).to(dtype)  # signs mixed, as a reduction='none' upstream
    return zs, zt, row_grad


def _untie_tvd(zs, zt, cfg):
    """Nudge teacher logits off near-ties ``q ~= p``: TVD's sign(q - p) is discontinuous there, so an entry within
    a few ulps of a tie may flip either way in fp32 (worth q itself in c_s and the gradient) in any implementation."""
    lq = torch.log_softmax(cfg.student.apply(zs.double())[0], -1)
    for _ in range(20):
        close = (lq - torch.log_softmax(cfg.teacher.apply(zt.double())[0], -1)).abs() < 1e-5
        if not close.any():
            return zt
        zt = zt + 0.01 * close
    raise AssertionError("could not untie the TVD inputs")


# The two memory layouts the C++ kernel takes: contiguous rows (the row kernel), and vocabulary-major chunks, the
# [C, V] transpose of a row-major [V, C] (the column kernel, which chunked.run feeds on CPU).
LAYOUTS = ["rows", "columns"]


def _laid_out(z: torch.Tensor, layout: str) -> torch.Tensor:
    return z.T.contiguous().T if layout == "columns" else z.contiguous()


def _run(fn, zs, zt, row_grad, cfg, grad_s=True, grad_t=True, dtype=None, layout="rows"):
    """A rows function on copies (they are overwritten), optionally cast, in ``layout``; returns (loss, stats, g_s,
    g_t)."""
    cast = (lambda x: x.clone()) if dtype is None else (lambda x: x.to(dtype).clone())
    zs, zt = cast(zs), cast(zt)
    if fn is native_backend.divergence_rows:
        zs, zt = _laid_out(zs, layout), _laid_out(zt, layout)
        assert layout == "rows" or zs.shape[0] == 1 or zs.stride(0) == 1
    return fn(zs, zt, None if row_grad is None else cast(row_grad), cfg, grad_s, grad_t)


# ----------------------------------------------------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("v", [5, 1031, 2048 + 517], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name", list(divergences.DIVERGENCES))
def test_rows_match_torch(ext, name, setting, v, layout):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}-{setting}-{v}".encode()))
    temperature, softcap = SETTINGS[setting]
    cfg = _cfg(name, temperature, softcap, v)
    zs, zt, rg = _chunk(gen, 13, v)
    if name == "tvd":
        zt = _untie_tvd(zs, zt, cfg)
    truth = _run(torch_backend.divergence_rows, zs, zt, rg, cfg, dtype=torch.float64)
    naive = _run(torch_backend.divergence_rows, zs, zt, rg, cfg)
    got = _run(native_backend.divergence_rows, zs, zt, rg, cfg, layout=layout)
    assert_rows_within_budget(got, naive, truth, f"[{name} {setting} V={v} {layout}] ",
                              scales=rows_cancellation_scales(zs, zt, rg, cfg))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd"])
def test_large_offsets_and_peaked_rows(ext, name, layout):
    """Logits far from 0 (teacher shifted by 1000) and peaked rows whose small probabilities underflow in fp32: the
    shifted accumulators keep the error at the level of torch's."""
    gen = torch.Generator().manual_seed(7)
    cfg = _cfg(name, vocab=777)
    zs, zt, rg = _chunk(gen, 6, 777, std=30.0, offset=1000.0)
    truth = _run(torch_backend.divergence_rows, zs, zt, rg, cfg, dtype=torch.float64)
    naive = _run(torch_backend.divergence_rows, zs, zt, rg, cfg)
    got = _run(native_backend.divergence_rows, zs, zt, rg, cfg, layout=layout)
    assert_rows_within_budget(got, naive, truth, f"[{name} offset {layout}] ",
                              scales=rows_cancellation_scales(zs, zt, rg, cfg))
    # The divergence does not depend on a per-row shift of either model's logits.
    got0 = _run(native_backend.divergence_rows, zs, zt - 1000.0, rg, cfg, layout=layout)
    assert torch.allclose(got0[0], got[0], rtol=1e-5, atol=1e-4 * got[0].abs().max().item())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(divergences.DIVERGENCES))
def test_float64(ext, name, layout):
    gen = torch.Generator().manual_seed(11)
    cfg = _cfg(name, 1.3, 7.0, 300)
    zs, zt, rg = _chunk(gen, 5, 300, dtype=torch.float64)
    want = _run(torch_backend.divergence_rows, zs, zt, rg, cfg)
    got = _run(native_backend.divergence_rows, zs, zt, rg, cfg, layout=layout)
    for x, w in zip(got, want):
        assert x.dtype == torch.float64
        torch.testing.assert_close(x, w, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("setting", list(PER_MODEL))
@pytest.mark.parametrize("name", list(divergences.DIVERGENCES))
def test_rows_per_model_scaling(ext, name, setting, layout):
    """Each model its own multiplier, softcap (on one model only, or both) and gradient scale row_grad / T: fp32
    within the budget of torch_rows, fp64 equal to it to ~1e-12 (loss, stats, both gradients)."""
    student, teacher = PER_MODEL[setting]
    cfg = _cfg(name, vocab=1031, student=student, teacher=teacher)
    gen = torch.Generator().manual_seed(zlib.crc32(f"per-model-{name}-{setting}".encode()))
    zs, zt, rg = _chunk(gen, 13, 1031)
    if name == "tvd":
        zt = _untie_tvd(zs, zt, cfg)
    truth = _run(torch_backend.divergence_rows, zs, zt, rg, cfg, dtype=torch.float64)
    naive = _run(torch_backend.divergence_rows, zs, zt, rg, cfg)
    got = _run(native_backend.divergence_rows, zs, zt, rg, cfg, layout=layout)
    assert_rows_within_budget(got, naive, truth, f"[{name} {setting} {layout}] ",
                              scales=rows_cancellation_scales(zs, zt, rg, cfg))
    got64 = _run(native_backend.divergence_rows, zs, zt, rg, cfg, dtype=torch.float64, layout=layout)
    for what, x, w in zip(("loss", "stats", "g_s", "g_t"), got64, truth):
        assert x.dtype == torch.float64
        torch.testing.assert_close(x, w, rtol=1e-11, atol=1e-12, msg=lambda m: f"[{name} {setting} {layout}] "
                                                                               f"{what}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("grad_s,grad_t", [(True, False), (False, True), (False, False)], ids=["s", "t", "none"])
def test_gradients_in_place_and_only_where_asked(ext, grad_s, grad_t, layout):
    gen = torch.Generator().manual_seed(3)
    cfg = _cfg("skew_reverse_kl", 1.0, 0.0, 200)
    zs, zt, rg = _chunk(gen, 4, 200)
    want = torch_backend.divergence_rows(zs.double(), zt.double(), rg.double(), cfg, True, True)
    bs, bt = _laid_out(zs.clone(), layout), _laid_out(zt.clone(), layout)
    loss, stats, g_s, g_t = native_backend.divergence_rows(bs, bt, rg if (grad_s or grad_t) else None, cfg, grad_s, grad_t)
    assert (g_s is bs) == grad_s and (g_s is None) != grad_s
    assert (g_t is bt) == grad_t and (g_t is None) != grad_t
    torch.testing.assert_close(loss.double(), want[0], rtol=1e-5, atol=1e-6)
    if grad_s:
        torch.testing.assert_close(g_s.double(), want[2], rtol=1e-4, atol=1e-7)
    else:  # without a softcap a buffer whose gradient is not asked for is left alone
        assert torch.equal(bs, zs)
    if grad_t:
        torch.testing.assert_close(g_t.double(), want[3], rtol=1e-4, atol=1e-7)
    else:
        assert torch.equal(bt, zt)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_row_grad_gives_zero_gradient_rows(ext, layout):
    gen = torch.Generator().manual_seed(5)
    cfg = _cfg("tvd", 1.0, 0.0, 100)
    zs, zt, rg = _chunk(gen, 6, 100)
    rg[::2] = 0.0
    _, _, g_s, g_t = _run(native_backend.divergence_rows, zs, zt, rg, cfg, layout=layout)
    assert torch.equal(g_s[::2], torch.zeros_like(g_s[::2])) and torch.equal(g_t[::2], torch.zeros_like(g_t[::2]))
    assert (g_s[1::2] != 0).any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_stays_in_its_row(ext, layout):
    gen = torch.Generator().manual_seed(9)
    cfg = _cfg("reverse_kl", 1.0, 0.0, 600)
    zs, zt, rg = _chunk(gen, 20, 600)  # 20 rows: in the column layout, rows 0-15 share one lane group
    zs[2, 555] = float("nan")
    loss, stats, g_s, _ = _run(native_backend.divergence_rows, zs, zt, rg, cfg, layout=layout)
    assert torch.isnan(loss[2]) and torch.isnan(g_s[2]).all()
    keep = [r for r in range(20) if r != 2]
    assert torch.isfinite(loss[keep]).all() and torch.isfinite(stats[keep]).all() and torch.isfinite(g_s[keep]).all()


# ----------------------------------------------------------------------------------------------------------------------
# determinism: one row, one thread, a fixed order
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["reverse_kl", "jsd"])
def test_independent_of_thread_count_and_chunking(ext, name, layout):
    gen = torch.Generator().manual_seed(13)
    cfg = _cfg(name, 1.0, 10.0, 1031)
    zs, zt, rg = _chunk(gen, 96, 1031)  # 96 rows of ~1k entries: parallel_for splits them over the threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(native_backend.divergence_rows, zs, zt, rg, cfg, layout=layout)
        torch.set_num_threads(max(2, before))
        many = _run(native_backend.divergence_rows, zs, zt, rg, cfg, layout=layout)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    # a row's result does not depend on which chunk it is in (columns: rows 40-56 of a [1031, 96] buffer, ld 96,
    # starting mid lane group)
    zs_l, zt_l = _laid_out(zs, layout), _laid_out(zt, layout)
    part = native_backend.divergence_rows(zs_l[40:57].clone() if layout == "rows" else zs_l[40:57],
                              zt_l[40:57].clone() if layout == "rows" else zt_l[40:57], rg[40:57], cfg, True, True)
    for a, b in zip(part, many):
        assert torch.equal(a, b[40:57])


# ----------------------------------------------------------------------------------------------------------------------
# the other two-model kernels (torch.ops.minillm_fast_native.*) with each model's own scaling
# ----------------------------------------------------------------------------------------------------------------------
def _scaling_args(student: Scaling, teacher: Scaling) -> tuple:
    """The ops' trailing (temperature_s, softcap_s, temperature_t, softcap_t)."""
    return student.temperature, student.softcap, teacher.temperature, teacher.softcap


def _log_probs(z: torch.Tensor, scaling: Scaling) -> torch.Tensor:
    return torch.log_softmax(scaling.apply(z)[0], -1)


def _rollout_reference(zs, zt, y, student, teacher):
    lq, lp = _log_probs(zs, student), _log_probs(zt, teacher)
    return {"lq_y": lq.gather(1, y[:, None])[:, 0], "lp_y": lp.gather(1, y[:, None])[:, 0],
            "rkl": (lq.exp() * (lq - lp)).sum(-1)}


@pytest.mark.parametrize("v", [5, 1031], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("setting", list(PER_MODEL))
def test_rollout_statistics_per_model_scaling(ext, setting, v):
    """log q(y), log p(y), KL(q || p) with each model's scaling: fp64 equal to log_softmax of Scaling.apply to
    ~1e-12, fp32 within 2 x torch's fp32 error + 8 ulps."""
    student, teacher = PER_MODEL[setting]
    gen = torch.Generator().manual_seed(zlib.crc32(f"rollout-per-model-{setting}-{v}".encode()))
    zs, zt, _ = _chunk(gen, 13, v)
    y = torch.randint(0, v, (13,), generator=gen)
    truth = _rollout_reference(zs.double(), zt.double(), y, student, teacher)
    naive = _rollout_reference(zs, zt, y, student, teacher)
    k = native.ops()
    for dtype in (torch.float64, torch.float32):
        got = dict(zip(("lq_y", "lp_y", "rkl"), k.rollout_statistics_rows(
            zs.to(dtype).clone(), zt.to(dtype).clone(), y, *_scaling_args(student, teacher))))
        for name, t in truth.items():
            x = got[name]
            assert x.dtype == dtype and x.shape == t.shape, f"[{setting} V={v}] {name}: {x.dtype} {tuple(x.shape)}"
            if dtype == torch.float64:
                torch.testing.assert_close(x, t, rtol=1e-11, atol=1e-12, msg=lambda m: f"[{setting}] {name}: {m}")
            else:
                e, e_naive, small = max_err(x, t), max_err(naive[name], t), small_term(t, dtype)
                assert e <= 2 * e_naive + small, (f"[{setting} V={v}] {name}: error {e:.3e} > 2 x torch's "
                                                  f"{e_naive:.3e} + {small:.3e}")


def _uniforms(seed: int, row: int):
    """The sampler's (coin, u) of a row: Philox4x32-10 with counter (row, 0, 0, 0) and key seed (sampling_cpu.cpp)."""
    r = native.ops().philox4x32_10([row & 0xFFFFFFFF, row >> 32, 0, 0], [seed & 0xFFFFFFFF, seed >> 32])
    coin = ((r[0] << 32 | r[1]) >> 11) * 2.0 ** -53
    u = ((r[2] << 32 | r[3]) >> 11) * 2.0 ** -53
    return coin, u


def _inverse_cdf_tokens(lq, lp, seed, offset, alpha):
    """The documented draw: coin < alpha picks the teacher, then the first token whose cumulative probability
    exceeds u."""
    tokens = []
    for r in range(lq.shape[0]):
        coin, u = _uniforms(seed, offset + r)
        cdf = torch.cumsum((lp[r] if coin < alpha else lq[r]).exp(), 0)
        tokens.append(int(torch.searchsorted(cdf, u * cdf[-1], right=True)))
    return torch.tensor(tokens)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("setting", list(PER_MODEL))
def test_sampler_per_model_scaling(ext, setting, alpha):
    """The mixture sampler with each model's scaling: in fp64 the token is the inverse CDF of the row's uniforms
    under the chosen model's own scaled probabilities, and log q(y), log p(y) are those of log_softmax of each model's
    Scaling.apply (to ~1e-12); in fp32 the same tokens (but for at most one draw at a CDF boundary) and log q(y),
    log p(y) within 2 x torch's fp32 error + 8 ulps."""
    student, teacher = PER_MODEL[setting]
    gen = torch.Generator().manual_seed(zlib.crc32(f"sampler-per-model-{setting}-{alpha}".encode()))
    zs, zt, _ = _chunk(gen, 40, 1031)
    seed, offset = (1 << 40) + 987, 300
    k = native.ops()
    lq, lp = _log_probs(zs.double(), student), _log_probs(zt.double(), teacher)
    want = _inverse_cdf_tokens(lq, lp, seed, offset, alpha)
    tok, lq_y, lp_y = k.mixture_sample_rows(zs.double(), zt.double(), torch.tensor([seed]), offset, alpha,
                                            *_scaling_args(student, teacher))
    assert torch.equal(tok, want), f"[{setting} alpha={alpha}] tokens {tok.tolist()} vs {want.tolist()}"
    torch.testing.assert_close(lq_y, lq.gather(1, tok[:, None])[:, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(lp_y, lp.gather(1, tok[:, None])[:, 0], rtol=0, atol=1e-12)

    tok32, lq32, lp32 = k.mixture_sample_rows(zs.clone(), zt.clone(), torch.tensor([seed]), offset, alpha,
                                              *_scaling_args(student, teacher))
    assert (tok32 != want).sum().item() <= 1, f"[{setting} alpha={alpha}] {tok32.tolist()} vs {want.tolist()}"
    naive_q, naive_p = _log_probs(zs, student), _log_probs(zt, teacher)
    for name, x, t, nv in (("lq_y", lq32, lq, naive_q), ("lp_y", lp32, lp, naive_p)):
        t, nv = t.gather(1, tok32[:, None])[:, 0], nv.gather(1, tok32[:, None])[:, 0]
        assert x.dtype == torch.float32
        e, e_naive, small = max_err(x, t), max_err(nv, t), small_term(t, torch.float32)
        assert e <= 2 * e_naive + small, (f"[{setting} alpha={alpha}] {name}: error {e:.3e} > 2 x {e_naive:.3e} "
                                          f"+ {small:.3e}")


def test_sampler_without_teacher_ignores_the_teacher_scaling(ext):
    """Without a teacher only the student's scaling counts: the teacher's pair is neither used nor checked."""
    student = Scaling.of(0.8, 6.0, 1.5)
    gen = torch.Generator().manual_seed(23)
    zs = _chunk(gen, 20, 1031, dtype=torch.float64)[0]
    k = native.ops()
    a = k.mixture_sample_rows(zs.clone(), None, torch.tensor([5]), 0, 0.0, student.temperature, student.softcap,
                              1.0, 0.0)
    b = k.mixture_sample_rows(zs.clone(), None, torch.tensor([5]), 0, 0.0, student.temperature, student.softcap,
                              0.0, -1.0)  # not a valid scaling: ignored
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    lq = _log_probs(zs, student)
    assert torch.equal(a[0], _inverse_cdf_tokens(lq, lq, 5, 0, 0.0)) and a[2].shape == (0,)
    torch.testing.assert_close(a[1], lq.gather(1, a[0][:, None])[:, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("call,match", [
    (lambda k: k.rollout_statistics_rows(Z(3, 8), Z(3, 8), Y(3), 0.0, 0.0, 1.0, 0.0), "temperature_s must be finite"),
    (lambda k: k.rollout_statistics_rows(Z(3, 8), Z(3, 8), Y(3), 1.0, -1.0, 1.0, 0.0), "softcap_s must be finite"),
    (lambda k: k.rollout_statistics_rows(Z(3, 8), Z(3, 8), Y(3), 1.0, 0.0, -2.0, 0.0), "temperature_t must be finite"),
    (lambda k: k.rollout_statistics_rows(Z(3, 8), Z(3, 8), Y(3), 1.0, 0.0, 1.0, float("inf")),
     "softcap_t must be finite"),
    (lambda k: k.mixture_sample_rows(Z(3, 8), Z(3, 8), torch.tensor([1]), 0, 0.2, float("nan"), 0.0, 1.0, 0.0),
     "temperature_s must be finite"),
    (lambda k: k.mixture_sample_rows(Z(3, 8), Z(3, 8), torch.tensor([1]), 0, 0.2, 1.0, 0.0, 1.0, -3.0),
     "softcap_t must be finite"),
], ids=["rollout-temperature_s", "rollout-softcap_s", "rollout-temperature_t", "rollout-softcap_t",
        "sample-temperature_s", "sample-softcap_t"])
def test_two_model_ops_name_the_bad_scaling(ext, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(native.ops())


# ----------------------------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------------------------
def _call(ext, zs, zt, row_grad=None, kind=0, temperature_s=1.0, softcap_s=0.0, temperature_t=1.0, softcap_t=0.0,
          grad_s=False, grad_t=False, log_w=divergences.LOG_ZERO, log_1mw=0.0):
    return native.ops().divergence_rows(zs, zt, row_grad, kind=kind, log_w=log_w, log_1mw=log_1mw,
                                        temperature_s=temperature_s, softcap_s=softcap_s,
                                        temperature_t=temperature_t, softcap_t=softcap_t, grad_s=grad_s,
                                        grad_t=grad_t)


Z = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype)  # noqa: E731
Y = lambda n: torch.zeros(n, dtype=torch.int64)  # noqa: E731


@pytest.mark.parametrize("args,match", [
    (dict(zs=Z(3, 8, dtype=torch.float16), zt=Z(3, 8, dtype=torch.float16)), "zs must be float32 or float64"),
    (dict(zs=Z(8), zt=Z(8)), r"zs must be 2-D \[C, V\]"),
    (dict(zs=Z(3, 0), zt=Z(3, 0)), "zs must have at least one vocabulary entry"),
    (dict(zs=Z(3, 16)[:, ::2], zt=Z(3, 8)), r"zs must have contiguous rows \(stride\(1\) == 1\) or contiguous columns"),
    (dict(zs=Z(8, 3).T, zt=Z(3, 8)), r"zt must have the memory layout of zs"),
    (dict(zs=Z(3, 8), zt=Z(3, 9)), r"zt must have the shape of zs"),
    (dict(zs=Z(3, 8), zt=Z(3, 8, dtype=torch.float64)), "zt must have the dtype of zs"),
    (dict(kind=6), r"kind must be in \[0, 5\]"),
    (dict(temperature_s=0.0), "temperature_s must be finite and > 0"),
    (dict(softcap_s=-1.0), "softcap_s must be finite and >= 0"),
    (dict(temperature_t=float("inf")), "temperature_t must be finite and > 0"),
    (dict(softcap_t=float("nan")), "softcap_t must be finite and >= 0"),
    (dict(log_w=0.5), "log_w and log_1mw must be logs of weights"),
    (dict(grad_s=True), r"row_grad \[C\] is required"),
    (dict(grad_t=True, row_grad=Z(4)), r"row_grad must have shape \[3\]"),
    (dict(grad_t=True, row_grad=torch.zeros(3, dtype=torch.int64)), "row_grad must be a floating-point"),
], ids=["dtype", "1d", "empty-vocab", "strided-rows", "layouts-differ", "zt-shape", "zt-dtype", "kind",
        "temperature_s", "softcap_s", "temperature_t", "softcap_t", "log_w", "no-row-grad", "row-grad-shape",
        "row-grad-dtype"])
def test_bad_inputs_name_the_argument(ext, args, match):
    args = dict(args)
    zs = args.pop("zs", Z(3, 8))
    zt = args.pop("zt", Z(3, 8))
    with pytest.raises(RuntimeError, match=match):
        _call(ext, zs, zt, **args)


def test_same_buffer_refused(ext):
    z = Z(3, 8)
    with pytest.raises(RuntimeError, match="zs and zt must be distinct buffers"):
        _call(ext, z, z)


def test_empty_chunk(ext):
    loss, stats = _call(ext, Z(0, 8), Z(0, 8))
    assert loss.shape == (0,) and stats.shape == (0, 6)


# ----------------------------------------------------------------------------------------------------------------------
# backend selection and the build
# ----------------------------------------------------------------------------------------------------------------------
def test_resolves_on_cpu(ext, monkeypatch):
    cpu = torch.device("cpu")
    assert native.ops().capability() == native.capability()
    assert dispatch.resolve("native", cpu) == "native"
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve("auto", cpu) == "native"
    monkeypatch.setenv(dispatch.ENV_VAR, "native")
    assert dispatch.resolve("auto", cpu) == "native"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.resolve("auto", cpu) == "torch"


def test_not_on_cuda_tensors():
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        dispatch.resolve("native", torch.device("cuda"))


def test_end_to_end_float64(ext, monkeypatch):
    """fp64 inputs run the fp64 kernel: agreement with the fp64 reference to ~1e-12."""
    from minillm_fast import fused_divergence, reference

    gen = torch.Generator().manual_seed(17)
    hs, ws = torch.randn(9, 16, generator=gen, dtype=torch.float64), torch.randn(70, 16, generator=gen,
                                                                             dtype=torch.float64) * 0.7
    ht, wt = torch.randn(9, 12, generator=gen, dtype=torch.float64), torch.randn(70, 12, generator=gen,
                                                                             dtype=torch.float64) * 0.7
    outs = []
    for f, kw in ((fused_divergence, dict(backend="native")), (reference.fused_divergence, {})):
        leaves = [x.clone().requires_grad_() for x in (hs, ws)]
        loss = f(leaves[0], leaves[1], ht, wt, divergence="jsd", softcap=4.0, temperature=1.7, **kw)
        loss.backward()
        outs.append((loss.detach(), leaves[0].grad, leaves[1].grad))
    for a, b in zip(*outs):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.fixture
def fresh_native_state(monkeypatch):
    """Clears the once-per-process caches around a test that fakes a missing toolchain (the loaded module is set
    aside and restored by monkeypatch, never loaded twice)."""
    monkeypatch.setattr(native, "_MODULE", None)
    native._load.cache_clear()
    dispatch._native_for_auto.cache_clear()
    yield
    native._load.cache_clear()
    dispatch._native_for_auto.cache_clear()


def test_missing_compiler_message(monkeypatch, fresh_native_state):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(native, "_import_prebuilt", lambda cap: None)
    with pytest.raises(native.NativeBuildError, match="apt-get install g\\+\\+"):
        native.load()
    assert not native.is_available() and "compiler" in native.build_error()
    with pytest.raises(RuntimeError, match="backend='native' is not available: .*apt-get install g\\+\\+"):
        dispatch.resolve("native", torch.device("cpu"))


def test_missing_ninja_message(monkeypatch, fresh_native_state):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(cpp, "is_ninja_available", lambda: False)
    monkeypatch.setattr(native, "_import_prebuilt", lambda cap: None)
    with pytest.raises(native.NativeBuildError, match="pip install ninja"):
        native.load()


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch, fresh_native_state):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(native, "_import_prebuilt", lambda cap: None)
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match="falls back to 'torch'"):
        assert dispatch.resolve("auto", cpu) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve("auto", cpu) == "torch"  # said once


def test_capability_flags_are_consistent():
    cap = native.capability()
    assert cap in native.CAPABILITY_FLAGS
    assert f"-DCPU_CAPABILITY={cap}" in native.cflags(cap)
    assert native.module_name(cap) == f"_native_{cap.lower()}"
    assert all((native.source_dir() / s).is_file() for s in native.SOURCES)


def test_auto_on_cuda_warns_once_when_triton_cannot_be_imported(monkeypatch):
    """On CUDA, ``auto`` falls back to torch when the kernels do not import, and says why once (naming the error)."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_triton_import_error", lambda: ImportError("No module named 'triton'"))
    dispatch._triton_for_auto.cache_clear()
    try:
        cuda = torch.device("cuda")
        with pytest.warns(RuntimeWarning, match=r"falls back to 'torch' on CUDA .*ImportError: No module named 'triton'"):
            assert dispatch.resolve("auto", cuda) == "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert dispatch.resolve("auto", cuda) == "torch"  # said once
        with pytest.raises(RuntimeError, match="needs Triton"):
            dispatch.resolve("triton", cuda)
    finally:
        dispatch._triton_for_auto.cache_clear()
