"""The native row kernels of the token log-probs, rollout statistics and sampler (csrc/token_stats_cpu.cpp,
csrc/sampling_cpu.cpp, ``torch.ops.minillm_fast_native.*``) on raw chunk logits, their thread-count independence,
and the per-op choice of ``backend="auto"``.

The ops end to end on the native backend are covered by test_token_logprobs.py, test_rollout_statistics.py and
test_sampling.py (parametrised over every backend that resolves). Here, on chunk logits ``[C, V]`` at vocabulary sizes
below one vector, straddling the kernels' 512-entry blocks and ending in a partial vector, with and without
temperature and softcap: each output against the same math in float64, with the budget of test_native.py
(``|native - truth| <= 2 |torch fp32 - truth| + 8 ulps x max|truth|``); results bit for bit equal with 1 and 2
threads; the sampler's Philox against Random123's known-answer vectors, and its draw recomputed from those uniforms.
"""
from __future__ import annotations

import os
import shutil
import zlib

import pytest
import torch

from helpers import make_inputs, labels_with_ignored, randn
from minillm_fast import dispatch, native, rollout_statistics, token_logprobs
from minillm_fast.backends import native as native_backend

SMALL_ULPS = 8
SETTINGS = {"plain": (1.0, 0.0), "T0.7-cap5": (0.7, 5.0), "T2.5": (2.5, 0.0)}  # (temperature, softcap)
VOCABS = [5, 1031, 2048 + 517]


def _toolchain_missing() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available()


@pytest.fixture(scope="module")
def k():
    if _toolchain_missing():
        pytest.skip("no C++ compiler or ninja: the native extension cannot be built here")
    return native.ops()  # builds (or fails the test if the build itself is broken)


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("-".join(map(str, key)).encode()))


def _logits(gen, c, v, std=3.0, offset=0.0, dtype=torch.float32):
    return (torch.randn(c, v, generator=gen) * std + offset).to(dtype)


def _scaled(z, temperature, softcap):
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z / temperature


def _assert_budget(got, naive, truth, what):
    for name in truth:
        x, nv, t = got[name], naive[name], truth[name]
        assert x.dtype == nv.dtype and x.shape == t.shape, f"{what}{name}: {x.dtype} {tuple(x.shape)}"
        assert torch.isfinite(x).all(), f"{what}{name} is not finite"
        e, e_naive = (x.double() - t).abs().max().item(), (nv.double() - t).abs().max().item()
        small = SMALL_ULPS * torch.finfo(nv.dtype).eps * t.abs().max().item()
        assert e <= 2 * e_naive + small, f"{what}{name}: error {e:.3e} > 2 x torch's {e_naive:.3e} + {small:.3e}"


# ----------------------------------------------------------------------------------------------------------------------
# the math in torch (fp32 for the naive error, fp64 for the truth)
# ----------------------------------------------------------------------------------------------------------------------
def _tlp_torch(z, y, temperature, softcap, a=None, e=None):
    s = _scaled(z, temperature, softcap)
    m = s.amax(-1, keepdim=True)
    log_l = torch.log(torch.exp(s - m).sum(-1, keepdim=True))
    lq = (s - m) - log_l
    q = lq.exp()
    ent = -(q * lq).sum(-1)
    out = {"logprob": lq.gather(1, y[:, None])[:, 0], "m": m[:, 0], "log_l": log_l[:, 0], "entropy": ent}
    if a is not None:
        g = -a[:, None] * q
        g = g.scatter_add(1, y[:, None], a[:, None])
        g = g - e[:, None] * q * (lq + ent[:, None])
        g = g / temperature
        if softcap:
            g = g * (1 - torch.tanh(z / softcap) ** 2)
        out["grad"] = g
    return out


def _rollout_torch(zs, zt, y, temperature, softcap):
    lq = torch.log_softmax(_scaled(zs, temperature, softcap), -1)
    lp = torch.log_softmax(_scaled(zt, temperature, softcap), -1)
    return {"lq_y": lq.gather(1, y[:, None])[:, 0], "lp_y": lp.gather(1, y[:, None])[:, 0],
            "rkl": (lq.exp() * (lq - lp)).sum(-1)}


def _tlp_native_grad(k, z, y, stats, ent, a, e, temperature, softcap):
    g = z.clone()
    k.token_logprobs_bwd_rows(g, y, stats, ent, a, e, temperature, softcap)
    return g


# ----------------------------------------------------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("v", VOCABS, ids=lambda v: f"V{v}")
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_token_logprobs_rows(k, setting, v):
    gen = _gen("tlp", setting, v)
    temperature, softcap = SETTINGS[setting]
    z = _logits(gen, 13, v)
    y = torch.randint(0, v, (13,), generator=gen)
    a, e = torch.randn(13, generator=gen), torch.randn(13, generator=gen)
    truth = _tlp_torch(z.double(), y, temperature, softcap, a.double(), e.double())
    naive = _tlp_torch(z, y, temperature, softcap, a, e)
    buf = z.clone()
    lp, stats, ent = k.token_logprobs_fwd_rows(buf, y, temperature, softcap, True)
    got = {"logprob": lp, "m": stats[:, 0], "log_l": stats[:, 1], "entropy": ent}
    # the backward from the forward's statistics, on fresh raw logits (as the op recomputes them)
    got["grad"] = _tlp_native_grad(k, z, y, stats, ent, a, e, temperature, softcap)
    _assert_budget(got, naive, truth, f"[{setting} V={v}] ")
    # without the entropy: the same log-probs and statistics, an empty entropy
    lp2, stats2, ent2 = k.token_logprobs_fwd_rows(z.clone(), y, temperature, softcap, False)
    assert torch.equal(lp2, lp) and torch.equal(stats2, stats) and ent2.shape == (0,)
    # the entropy's gradient left out: only the log-prob term
    g = _tlp_native_grad(k, z, y, stats, None, a, None, temperature, softcap)
    want = _tlp_torch(z.double(), y, temperature, softcap, a.double(), torch.zeros(13, dtype=torch.float64))
    torch.testing.assert_close(g.double(), want["grad"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("v", VOCABS, ids=lambda v: f"V{v}")
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_rollout_statistics_rows(k, setting, v):
    gen = _gen("rollout", setting, v)
    temperature, softcap = SETTINGS[setting]
    zs, zt = _logits(gen, 13, v), _logits(gen, 13, v, offset=1.0)
    y = torch.randint(0, v, (13,), generator=gen)
    truth = _rollout_torch(zs.double(), zt.double(), y, temperature, softcap)
    naive = _rollout_torch(zs, zt, y, temperature, softcap)
    lq, lp, rkl = k.rollout_statistics_rows(zs.clone(), zt.clone(), y, temperature, softcap, temperature, softcap)
    _assert_budget({"lq_y": lq, "lp_y": lp, "rkl": rkl}, naive, truth, f"[{setting} V={v}] ")


def test_large_offsets_and_peaked_rows(k):
    """Logits far from 0 and peaked rows whose small probabilities underflow in fp32: the shifted accumulators keep
    the entropy and the KL at torch's level of error."""
    gen = _gen("offsets")
    zs, zt = _logits(gen, 6, 777, std=30.0, offset=1000.0), _logits(gen, 6, 777, std=30.0, offset=-500.0)
    y = torch.randint(0, 777, (6,), generator=gen)
    truth = _rollout_torch(zs.double(), zt.double(), y, 1.0, 0.0)
    naive = _rollout_torch(zs, zt, y, 1.0, 0.0)
    lq, lp, rkl = k.rollout_statistics_rows(zs.clone(), zt.clone(), y, 1.0, 0.0, 1.0, 0.0)
    _assert_budget({"lq_y": lq, "lp_y": lp, "rkl": rkl}, naive, truth, "[offsets] ")
    truth, naive = _tlp_torch(zs.double(), y, 1.0, 0.0), _tlp_torch(zs, y, 1.0, 0.0)
    lp, stats, ent = k.token_logprobs_fwd_rows(zs.clone(), y, 1.0, 0.0, True)
    _assert_budget({"logprob": lp, "entropy": ent}, {"logprob": naive["logprob"], "entropy": naive["entropy"]},
                   {"logprob": truth["logprob"], "entropy": truth["entropy"]}, "[offsets] ")


def test_float64_rows(k):
    gen = _gen("fp64")
    zs, zt = _logits(gen, 5, 300, dtype=torch.float64), _logits(gen, 5, 300, dtype=torch.float64)
    y = torch.randint(0, 300, (5,), generator=gen)
    a, e = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    want = _tlp_torch(zs, y, 1.3, 7.0, a, e)
    lp, stats, ent = k.token_logprobs_fwd_rows(zs.clone(), y, 1.3, 7.0, True)
    g = _tlp_native_grad(k, zs, y, stats, ent, a, e, 1.3, 7.0)
    for got, name in ((lp, "logprob"), (ent, "entropy"), (g, "grad")):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want[name], rtol=1e-11, atol=1e-12)
    want = _rollout_torch(zs, zt, y, 1.3, 7.0)
    got_all = k.rollout_statistics_rows(zs.clone(), zt.clone(), y, 1.3, 7.0, 1.3, 7.0)
    for got, name in zip(got_all, ("lq_y", "lp_y", "rkl")):
        torch.testing.assert_close(got, want[name], rtol=1e-11, atol=1e-12)


def test_nan_stays_in_its_row(k):
    gen = _gen("nan")
    zs, zt = _logits(gen, 4, 600), _logits(gen, 4, 600)
    zs[2, 555] = float("nan")
    y = torch.randint(0, 600, (4,), generator=gen)
    lq, _, rkl = k.rollout_statistics_rows(zs.clone(), zt.clone(), y, 1.0, 0.0, 1.0, 0.0)
    lp, _, ent = k.token_logprobs_fwd_rows(zs.clone(), y, 1.0, 0.0, True)
    tok, lq_s, _ = k.mixture_sample_rows(zs.clone(), zt.clone(), torch.tensor([3]), 0, 0.0, 1.0, 0.0, 1.0, 0.0)
    for x in (lq, rkl, lp, ent, lq_s):
        assert torch.isnan(x[2]) and torch.isfinite(x[[0, 1, 3]]).all()
    assert tok[2] == 0 and ((tok >= 0) & (tok < 600)).all()


# ----------------------------------------------------------------------------------------------------------------------
# the sampler: Philox, and the draw recomputed from its uniforms
# ----------------------------------------------------------------------------------------------------------------------
def test_philox_known_answers(k):
    """Random123's known-answer vectors of philox4x32_10 (kat_vectors: counter, key -> output)."""
    kat = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for counter, key, want in kat:
        assert list(k.philox4x32_10(counter, key)) == want


def _uniforms(k, seed: int, row: int):
    r = k.philox4x32_10([row & 0xFFFFFFFF, row >> 32, 0, 0], [seed & 0xFFFFFFFF, seed >> 32])
    coin = ((r[0] << 32 | r[1]) >> 11) * 2.0 ** -53
    u = ((r[2] << 32 | r[3]) >> 11) * 2.0 ** -53
    return coin, u


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("v", [5, 2048 + 517], ids=lambda v: f"V{v}")
def test_draw_is_the_inverse_cdf_of_the_row_uniforms(k, alpha, v):
    """In float64 the kernel's token is the inverse CDF of the documented uniforms: coin < alpha picks the teacher,
    then the first token whose cumulative probability exceeds u (the row offset is the counter)."""
    gen = _gen("icdf", alpha, v)
    zs, zt = _logits(gen, 40, v, dtype=torch.float64), _logits(gen, 40, v, dtype=torch.float64)
    seed, offset, temperature, softcap = (1 << 40) + 12345, 1000, 0.8, 4.0
    tok, lq, lp = k.mixture_sample_rows(zs.clone(), zt.clone(), torch.tensor([seed]), offset, alpha, temperature,
                                        softcap, temperature, softcap)
    ls = torch.log_softmax(_scaled(zs, temperature, softcap), -1)
    lt = torch.log_softmax(_scaled(zt, temperature, softcap), -1)
    for r in range(40):
        coin, u = _uniforms(k, seed, offset + r)
        cdf = torch.cumsum((lt[r] if coin < alpha else ls[r]).exp(), 0)
        want = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
        assert int(tok[r]) == want, (r, coin, u)
    torch.testing.assert_close(lq, ls.gather(1, tok[:, None])[:, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(lp, lt.gather(1, tok[:, None])[:, 0], rtol=0, atol=1e-12)


def test_sampler_without_teacher_and_one_hot_rows(k):
    gen = _gen("single")
    z = _logits(gen, 9, 1031, std=1e4)
    tok, lq, lp = k.mixture_sample_rows(z.clone(), None, torch.tensor([7]), 0, 0.0, 1.0, 0.0, 1.0, 0.0)
    assert torch.equal(tok, z.argmax(-1)) and lp.shape == (0,)
    assert (lq.abs() < 1e-6).all()


# ----------------------------------------------------------------------------------------------------------------------
# determinism: one row, one thread, a fixed order
# ----------------------------------------------------------------------------------------------------------------------
def _with_threads(n, fn):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(before)


def test_rows_independent_of_thread_count(k):
    """96 rows of ~1k entries: parallel_for splits them over the threads; every output is the same bit for bit."""
    gen = _gen("threads")
    zs, zt = _logits(gen, 96, 1031), _logits(gen, 96, 1031, offset=1.0)
    y = torch.randint(0, 1031, (96,), generator=gen)
    a, e = torch.randn(96, generator=gen), torch.randn(96, generator=gen)

    def run():
        lp, stats, ent = k.token_logprobs_fwd_rows(zs.clone(), y, 1.0, 10.0, True)
        g = _tlp_native_grad(k, zs, y, stats, ent, a, e, 1.0, 10.0)
        rs = k.rollout_statistics_rows(zs.clone(), zt.clone(), y, 1.0, 10.0, 1.0, 10.0)
        smp = k.mixture_sample_rows(zs.clone(), zt.clone(), torch.tensor([99]), 5, 0.4, 1.0, 10.0, 1.0, 10.0)
        return (lp, stats, ent, g, *rs, *smp)

    one, two = _with_threads(1, run), _with_threads(2, run)
    for i, (x, w) in enumerate(zip(one, two)):
        assert torch.equal(x, w), i
    # a row's results do not depend on the rows around it (the sampler's counter is the row offset)
    part = k.mixture_sample_rows(zs[40:57].clone(), zt[40:57].clone(), torch.tensor([99]), 45, 0.4, 1.0, 10.0, 1.0,
                                 10.0)
    for x, w in zip(part, two[-3:]):
        assert torch.equal(x, w[40:57])


def test_ops_with_one_and_two_threads(k):
    """End to end (matmuls included): token_logprobs forward + backward and rollout_statistics give the same values
    with 1 and 2 threads, within fp32 rounding of the matmuls (BLAS may split its work by thread count)."""
    gen = _gen("ops-threads")
    x = make_inputs(gen, n=64, hs=32, ht=48, v=1031, bias=True)
    y = labels_with_ignored(gen, (64,), 1031)
    up = randn(gen, 64)

    def run():
        h, w = x["student_hidden"].clone().requires_grad_(), x["student_weight"].clone().requires_grad_()
        lp, ent = token_logprobs(h, w, y, bias=x["student_bias"], return_entropy=True, backend="native", softcap=8.0)
        ((lp * up).sum() + ent.sum()).backward()
        st = rollout_statistics(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                                y.clamp(min=0), backend="native")
        return (lp.detach(), ent.detach(), h.grad, w.grad, *st)

    one, two = _with_threads(1, run), _with_threads(2, run)
    for i, (a, b) in enumerate(zip(one, two)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item(), msg=f"output {i}")


# ----------------------------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------------------------
Z = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype)  # noqa: E731
Y = lambda n: torch.zeros(n, dtype=torch.int64)  # noqa: E731


@pytest.mark.parametrize("call,match", [
    (lambda k: k.token_logprobs_fwd_rows(Z(3, 8, dtype=torch.float16), Y(3), 1.0, 0.0, False),
     "token_logprobs_fwd_rows: z must be float32 or float64"),
    (lambda k: k.token_logprobs_fwd_rows(Z(8), Y(8), 1.0, 0.0, False), r"z must be 2-D \[C, V\]"),
    (lambda k: k.token_logprobs_fwd_rows(Z(8, 3).T, Y(3), 1.0, 0.0, False), "z must have contiguous rows"),
    (lambda k: k.token_logprobs_fwd_rows(Z(3, 8), Y(4), 1.0, 0.0, False), r"targets must have shape \[3\]"),
    (lambda k: k.token_logprobs_fwd_rows(Z(3, 8), Y(3).int(), 1.0, 0.0, False), "targets must be Long"),
    (lambda k: k.token_logprobs_fwd_rows(Z(3, 8), Y(3), 0.0, 0.0, False), "temperature must be finite and > 0"),
    (lambda k: k.token_logprobs_fwd_rows(Z(3, 8), Y(3), 1.0, -1.0, False), "softcap must be finite and >= 0"),
    (lambda k: k.token_logprobs_bwd_rows(Z(3, 8), Y(3), Z(3, 3), None, Z(3), None, 1.0, 0.0),
     r"stats must be the forward's \[3, 2\]"),
    (lambda k: k.token_logprobs_bwd_rows(Z(3, 8), Y(3), Z(3, 2), Z(3), Z(3), None, 1.0, 0.0),
     "ent and g_ent must be given together"),
    (lambda k: k.token_logprobs_bwd_rows(Z(3, 8), Y(3), Z(3, 2), None, Z(3, dtype=torch.float64), None, 1.0, 0.0),
     "g_lp must be Float"),
    (lambda k: k.rollout_statistics_rows(Z(3, 8), Z(3, 9), Y(3), 1.0, 0.0, 1.0, 0.0), "zt must have the shape of zs"),
    (lambda k: k.rollout_statistics_rows(Z(3, 8), Z(3, 8, dtype=torch.float64), Y(3), 1.0, 0.0, 1.0, 0.0),
     "zt must have the dtype of zs"),
    (lambda k: k.mixture_sample_rows(Z(3, 8), None, torch.tensor([1.0]), 0, 0.2, 1.0, 0.0, 1.0, 0.0),
     "seed must be a CPU int64 tensor of one element"),
    (lambda k: k.mixture_sample_rows(Z(3, 8), None, torch.tensor([1]), -1, 0.2, 1.0, 0.0, 1.0, 0.0),
     "row_offset must be >= 0"),
    (lambda k: k.mixture_sample_rows(Z(3, 8), None, torch.tensor([1]), 0, 1.5, 1.0, 0.0, 1.0, 0.0),
     r"alpha must be in \[0, 1\]"),
    (lambda k: k.philox4x32_10([0, 0, 0], [0, 0]), "counter must have 4 words"),
], ids=["dtype", "1d", "strided-rows", "targets-shape", "targets-dtype", "temperature", "softcap", "stats-shape",
        "ent-alone", "g_lp-dtype", "zt-shape", "zt-dtype", "seed", "row-offset", "alpha", "philox-counter"])
def test_bad_inputs_name_the_argument(k, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(k)


def test_same_buffer_refused(k):
    z = Z(3, 8)
    with pytest.raises(RuntimeError, match="zs and zt must be distinct buffers"):
        k.rollout_statistics_rows(z, z, Y(3), 1.0, 0.0, 1.0, 0.0)


def test_empty_chunk(k):
    lp, stats, ent = k.token_logprobs_fwd_rows(Z(0, 8), Y(0), 1.0, 0.0, True)
    assert lp.shape == (0,) and stats.shape == (0, 2) and ent.shape == (0,)
    tok, lq, lp = k.mixture_sample_rows(Z(0, 8), Z(0, 8), torch.tensor([1]), 0, 0.2, 1.0, 0.0, 1.0, 0.0)
    assert tok.shape == (0,) and tok.dtype == torch.int64 and lp.shape == (0,)


# ----------------------------------------------------------------------------------------------------------------------
# backend choice
# ----------------------------------------------------------------------------------------------------------------------
OPS = ("token_logprobs", "rollout_statistics", "mixture_sample", "sample_tokens")


@pytest.mark.parametrize("op", OPS)
def test_auto_runs_every_op_on_native_on_cpu(k, op, monkeypatch):
    """One choice for every op (minillm_fast/dispatch.py): native on CPU under auto, unless the environment says."""
    cpu = torch.device("cpu")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve("auto", cpu) == "native"
    impl = {"token_logprobs": "token_logprobs_fwd", "sample_tokens": "mixture_sample"}.get(op, op)
    assert dispatch.implementation(impl, "native") is native_backend.OPS[impl]
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.resolve("auto", cpu) == "torch"
    assert dispatch.resolve("native", cpu) == "native"  # asked for by name, whatever the environment says
