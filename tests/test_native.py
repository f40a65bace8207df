"""The native (C++) rows function against the PyTorch one, and the native backend's build, dispatch and checks.

The end-to-end op on the native backend is covered by test_fused_divergence.py (parametrised over every backend that
resolves). Here: the rows function alone, on raw chunk logits, for every divergence, with and without temperature
and softcap, at vocabulary sizes that are below one vector, straddle the kernel's 512-entry blocks, or end in a
partial vector. Error budget: ``|native - truth| <= 2 |torch_rows(fp32) - truth| + 8 ulps x max|truth|`` for the loss,
each statistic and both gradients, with the truth from torch_rows in float64.

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

from helpers import assert_rows_within_budget
from minillm_fast import backends, chunked, divergences, native
from minillm_fast.chunked import DivergenceConfig

# (temperature, softcap)
SETTINGS = {"plain": (1.0, 0.0), "T2.5": (2.5, 0.0), "T0.7-cap5": (0.7, 5.0), "T1.5-cap30": (1.5, 30.0)}


def _toolchain_missing() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available()


@pytest.fixture(scope="module")
def ext():
    if _toolchain_missing():
        pytest.skip("no C++ compiler or ninja: the native extension cannot be built here")
    return native.load()  # raises (fails the test) if the build itself is broken


def _cfg(name: str, temperature: float = 1.0, softcap: float = 0.0, vocab: int = 0, beta=0.3, skew=0.2):
    return DivergenceConfig(divergences.resolve(name, beta, skew), temperature, softcap, vocab)


def _chunk(gen, c, v, std=3.0, offset=1.0, dtype=torch.float32):
    zs = (torch.randn(c, v, generator=gen) * std).to(dtype)
    zt = (torch.randn(c, v, generator=gen) * std + offset).to(dtype)
    row_grad = torch.randn(c, generator=gen).to(dtype)  # signs mixed, as a reduction='none' upstream
    return zs, zt, row_grad


def _untie_tvd(zs, zt, cfg):
    """Nudge teacher logits off near-ties ``q ~= p``: TVD's sign(q - p) is discontinuous there, so an entry within
    a few ulps of a tie may flip either way in fp32 (worth q itself in c_s and the gradient) in any implementation."""
    def scaled(z):
        z = z.double()
        if cfg.softcap:
            z = torch.tanh(z / cfg.softcap) * cfg.softcap
        return z / cfg.temperature

    lq = torch.log_softmax(scaled(zs), -1)
    for _ in range(20):
        close = (lq - torch.log_softmax(scaled(zt), -1)).abs() < 1e-5
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
    if fn is native.native_rows:
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
    truth = _run(chunked.torch_rows, zs, zt, rg, cfg, dtype=torch.float64)
    naive = _run(chunked.torch_rows, zs, zt, rg, cfg)
    got = _run(native.native_rows, zs, zt, rg, cfg, layout=layout)
    assert_rows_within_budget(got, naive, truth, f"[{name} {setting} V={v} {layout}] ")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd"])
def test_large_offsets_and_peaked_rows(ext, name, layout):
    """Logits far from 0 (teacher shifted by 1000) and peaked rows whose small probabilities underflow in fp32: the
    shifted accumulators keep the error at the level of torch's."""
    gen = torch.Generator().manual_seed(7)
    cfg = _cfg(name, vocab=777)
    zs, zt, rg = _chunk(gen, 6, 777, std=30.0, offset=1000.0)
    truth = _run(chunked.torch_rows, zs, zt, rg, cfg, dtype=torch.float64)
    naive = _run(chunked.torch_rows, zs, zt, rg, cfg)
    got = _run(native.native_rows, zs, zt, rg, cfg, layout=layout)
    assert_rows_within_budget(got, naive, truth, f"[{name} offset {layout}] ")
    # The divergence does not depend on a per-row shift of either model's logits.
    got0 = _run(native.native_rows, zs, zt - 1000.0, rg, cfg, layout=layout)
    assert torch.allclose(got0[0], got[0], rtol=1e-5, atol=1e-4 * got[0].abs().max().item())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(divergences.DIVERGENCES))
def test_float64(ext, name, layout):
    gen = torch.Generator().manual_seed(11)
    cfg = _cfg(name, 1.3, 7.0, 300)
    zs, zt, rg = _chunk(gen, 5, 300, dtype=torch.float64)
    want = _run(chunked.torch_rows, zs, zt, rg, cfg)
    got = _run(native.native_rows, zs, zt, rg, cfg, layout=layout)
    for x, w in zip(got, want):
        assert x.dtype == torch.float64
        torch.testing.assert_close(x, w, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("grad_s,grad_t", [(True, False), (False, True), (False, False)], ids=["s", "t", "none"])
def test_gradients_in_place_and_only_where_asked(ext, grad_s, grad_t, layout):
    gen = torch.Generator().manual_seed(3)
    cfg = _cfg("skew_reverse_kl", 1.0, 0.0, 200)
    zs, zt, rg = _chunk(gen, 4, 200)
    want = chunked.torch_rows(zs.double(), zt.double(), rg.double(), cfg, True, True)
    bs, bt = _laid_out(zs.clone(), layout), _laid_out(zt.clone(), layout)
    loss, stats, g_s, g_t = native.native_rows(bs, bt, rg if (grad_s or grad_t) else None, cfg, grad_s, grad_t)
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
    _, _, g_s, g_t = _run(native.native_rows, zs, zt, rg, cfg, layout=layout)
    assert torch.equal(g_s[::2], torch.zeros_like(g_s[::2])) and torch.equal(g_t[::2], torch.zeros_like(g_t[::2]))
    assert (g_s[1::2] != 0).any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_stays_in_its_row(ext, layout):
    gen = torch.Generator().manual_seed(9)
    cfg = _cfg("reverse_kl", 1.0, 0.0, 600)
    zs, zt, rg = _chunk(gen, 20, 600)  # 20 rows: in the column layout, rows 0-15 share one lane group
    zs[2, 555] = float("nan")
    loss, stats, g_s, _ = _run(native.native_rows, zs, zt, rg, cfg, layout=layout)
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
        one = _run(native.native_rows, zs, zt, rg, cfg, layout=layout)
        torch.set_num_threads(max(2, before))
        many = _run(native.native_rows, zs, zt, rg, cfg, layout=layout)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    # a row's result does not depend on which chunk it is in (columns: rows 40-56 of a [1031, 96] buffer, ld 96,
    # starting mid lane group)
    zs_l, zt_l = _laid_out(zs, layout), _laid_out(zt, layout)
    part = native.native_rows(zs_l[40:57].clone() if layout == "rows" else zs_l[40:57],
                              zt_l[40:57].clone() if layout == "rows" else zt_l[40:57], rg[40:57], cfg, True, True)
    for a, b in zip(part, many):
        assert torch.equal(a, b[40:57])


# ----------------------------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------------------------
def _call(ext, zs, zt, row_grad=None, kind=0, temperature=1.0, softcap=0.0, grad_s=False, grad_t=False,
          log_w=divergences.LOG_ZERO, log_1mw=0.0):
    return ext.divergence_rows(zs, zt, row_grad, kind=kind, log_w=log_w, log_1mw=log_1mw, temperature=temperature,
                               softcap=softcap, grad_s=grad_s, grad_t=grad_t)


Z = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype)  # noqa: E731


@pytest.mark.parametrize("args,match", [
    (dict(zs=Z(3, 8, dtype=torch.float16), zt=Z(3, 8, dtype=torch.float16)), "zs must be float32 or float64"),
    (dict(zs=Z(8), zt=Z(8)), r"zs must be 2-D \[C, V\]"),
    (dict(zs=Z(3, 0), zt=Z(3, 0)), "zs must have at least one vocabulary entry"),
    (dict(zs=Z(3, 16)[:, ::2], zt=Z(3, 8)), r"zs must have contiguous rows \(stride\(1\) == 1\) or contiguous columns"),
    (dict(zs=Z(8, 3).T, zt=Z(3, 8)), r"zt must have the memory layout of zs"),
    (dict(zs=Z(3, 8), zt=Z(3, 9)), r"zt must have the shape of zs"),
    (dict(zs=Z(3, 8), zt=Z(3, 8, dtype=torch.float64)), "zt must have the dtype of zs"),
    (dict(kind=6), r"kind must be in \[0, 5\]"),
    (dict(temperature=0.0), "temperature must be finite and > 0"),
    (dict(softcap=-1.0), "softcap must be finite and >= 0"),
    (dict(log_w=0.5), "log_w and log_1mw must be logs of weights"),
    (dict(grad_s=True), r"row_grad \[C\] is required"),
    (dict(grad_t=True, row_grad=Z(4)), r"row_grad must have shape \[3\]"),
    (dict(grad_t=True, row_grad=torch.zeros(3, dtype=torch.int64)), "row_grad must be a floating-point"),
], ids=["dtype", "1d", "empty-vocab", "strided-rows", "layouts-differ", "zt-shape", "zt-dtype", "kind", "temperature", "softcap",
        "log_w", "no-row-grad", "row-grad-shape", "row-grad-dtype"])
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
    assert ext.capability() == native.capability()
    assert backends.resolve("native", cpu) == "native"
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve("auto", cpu) == "native"
    monkeypatch.setenv(backends.ENV_VAR, "native")
    assert backends.resolve("auto", cpu) == "native"
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.resolve("auto", cpu) == "torch"


def test_not_on_cuda_tensors():
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        backends.resolve("native", torch.device("cuda"))


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
    backends._native_for_auto.cache_clear()
    yield
    native._load.cache_clear()
    backends._native_for_auto.cache_clear()


def test_missing_compiler_message(monkeypatch, fresh_native_state):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(native, "_import_prebuilt", lambda cap: None)
    with pytest.raises(native.NativeBuildError, match="apt-get install g\\+\\+"):
        native.load()
    assert not native.is_available() and "compiler" in native.build_error()
    with pytest.raises(RuntimeError, match="backend='native' is not available: .*apt-get install g\\+\\+"):
        backends.resolve("native", torch.device("cpu"))


def test_missing_ninja_message(monkeypatch, fresh_native_state):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(cpp, "is_ninja_available", lambda: False)
    monkeypatch.setattr(native, "_import_prebuilt", lambda cap: None)
    with pytest.raises(native.NativeBuildError, match="pip install ninja"):
        native.load()


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch, fresh_native_state):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(native, "_import_prebuilt", lambda cap: None)
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match="falls back to 'torch'"):
        assert backends.resolve("auto", cpu) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", cpu) == "torch"  # said once


def test_capability_flags_are_consistent():
    cap = native.capability()
    assert cap in native.CAPABILITY_FLAGS
    assert f"-DCPU_CAPABILITY={cap}" in native.cflags(cap)
    assert native.module_name(cap) == f"_native_{cap.lower()}"
    assert all((native.source_dir() / s).is_file() for s in native.SOURCES)
