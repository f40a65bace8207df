"""The native CUDA row kernels (csrc/cuda/): compile checks, their math on the CPU, and the same checks on a GPU.

Three layers, so that a machine without a GPU checks what it can:

1. **nvcc compiles every .cu file** (``nvcc -c -std=c++17 -arch=sm_90``, one architecture, with torch's own nvcc
   defines; every nvcc and host-compiler warning is an error). Runs wherever nvcc is found (skipped, saying so, where
   it is not) and fails on a syntax error or a warning (test_compile_check_can_fail shows it).
2. **Host emulation** (tests/cuda/host_emulation.cu): nvcc builds a host-only library from the kernels' own
   per-thread code (csrc/cuda/*.cuh: the sweeps, the online max / sum-exp with rebasing, masking, the per-entry
   divergence terms and gradients, half / bfloat16 conversions, Philox and the Gumbel-max), with the block
   reductions replayed sequentially, and the tests below run it on CPU tensors: against the float64 reference with
   the suite's error budget (as tests/test_native.py does for the C++ rows), the full op through chunked.run against
   reference.py, the sampler by chi-square against the exact mixture, the rollout statistics, and Philox against
   Triton's ``tl.philox``.
3. **GPU** (``@pytest.mark.gpu``, skipped without CUDA): the same numerics tests on the compiled extension
   (minillm_fast/native_cuda.py), plus argument checks, a 128k vocabulary and agreement with the Triton sampler.

UNVERIFIED until these tests run on a GPU machine (no GPU was available when they were written): the extension's
build (bindings.cpp against torch's CUDA headers and torch's JIT flags), the device-only code (warp-shuffle and
shared-memory block reductions, launch configuration, the device guard and stream), the CUDA math library's
rounding (expf / logf / tanhf, 1-2 ulp, where the emulation uses glibc), and everything about speed. Layer 2 checks
the kernels' arithmetic, not those.
"""
from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

from helpers import (STUDENT, Result, assert_rows_within_budget, assert_within_budget, ground_truth_and_naive,
                     make_inputs, rounding_slack)
from minillm_fast import chunked, divergences, native_cuda
from minillm_fast.backends import torch as torch_backend
from minillm_fast.chunked import DivergenceConfig
from minillm_fast.scaling import Scaling

ROOT = Path(__file__).resolve().parent.parent
CUDA_SRC = ROOT / "csrc" / "cuda"
KERNEL_FILES = ("divergence_rows.cu", "sampling.cu")
EMULATION_SRC = Path(__file__).resolve().parent / "cuda" / "host_emulation.cu"
SMALL_ULPS = 8
# (temperature, softcap)
SETTINGS = {"plain": (1.0, 0.0), "T2.5": (2.5, 0.0), "T0.7-cap5": (0.7, 5.0), "T1.5-cap30": (1.5, 30.0)}
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _nvcc_flags() -> list[str]:
    """torch's own nvcc defines (no implicit half conversions, as in the JIT build) and warnings as errors."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return ["-std=c++17", "-arch=sm_90", "--Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra",
            *COMMON_NVCC_FLAGS]


@pytest.fixture(scope="module")
def nvcc() -> str:
    path = native_cuda.find_nvcc()
    if path is None:
        pytest.skip("nvcc not found (no CUDA toolkit on PATH or under CUDA_HOME): the CUDA sources cannot be compiled "
                    "here")
    return path


def _compile(nvcc: str, args: list[str], what: str) -> None:
    """Run nvcc; fail with its output on an error, or on any line of output mentioning a warning."""
    proc = subprocess.run([nvcc, *args], capture_output=True, text=True, timeout=300)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 or "warning" in out.lower():
        raise AssertionError(f"nvcc {what} failed (exit {proc.returncode}):\n{out}")


# ----------------------------------------------------------------------------------------------------------------------
# 1. the .cu files compile (no GPU needed)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", KERNEL_FILES)
def test_cuda_source_compiles(nvcc, source, tmp_path):
    _compile(nvcc, ["-c", "-O3", *_nvcc_flags(), "-o", str(tmp_path / "k.o"), str(CUDA_SRC / source)], source)
    assert (tmp_path / "k.o").stat().st_size > 0


@pytest.mark.parametrize("bad", ["syntax", "warning"])
def test_compile_check_can_fail(nvcc, bad, tmp_path):
    """The check above is real: a syntax error, or an unused variable in device code, fails it."""
    body = {"syntax": "__global__ void k(float* x) { x[0] = 1.0f }\n",
            "warning": "__global__ void k(float* x) { int unused = 3; x[0] = 1.0f; }\n"}[bad]
    src = tmp_path / "bad.cu"
    src.write_text(f'#include "{CUDA_SRC / "common.cuh"}"\n{body}')
    with pytest.raises(AssertionError, match="nvcc"):
        _compile(nvcc, ["-c", *_nvcc_flags(), "-o", str(tmp_path / "bad.o"), str(src)], "bad.cu")


@pytest.mark.slow  # ~30 s: torch/extension.h is a large header
def test_bindings_compile_against_torch_headers(nvcc, tmp_path):
    """bindings.cpp through the host compiler with torch's headers and the toolkit's (-fsyntax-only: nothing to
    link). A CPU-only torch ships c10/cuda's headers but not the generated cuda_cmake_macros.h: a one-line stand-in
    is put on the include path then, as a CUDA build of torch has it."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no host C++ compiler")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(nvcc).resolve().parent.parent,
             "/usr/local/cuda"]
    cuda_inc = next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").is_file()),
                    None)
    if cuda_inc is None:
        pytest.skip(f"the CUDA toolkit's headers (cuda_runtime.h) were not found beside {nvcc}")
    incs = [*include_paths(), str(cuda_inc), sysconfig.get_paths()["include"]]
    if not any((Path(i) / "c10" / "cuda" / "CUDAStream.h").is_file() for i in incs):
        pytest.skip("torch's c10/cuda headers are not installed")
    if not any((Path(i) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for i in incs):
        stub = tmp_path / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs.append(str(tmp_path))
    cmd = [cxx, "-fsyntax-only", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
           "-DTORCH_EXTENSION_NAME=minillm_fast_native_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *(f"-isystem{i}" for i in incs), str(CUDA_SRC / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bindings.cpp does not compile:\n{proc.stderr[-6000:]}"


def test_sources_and_loader_agree():
    src = native_cuda.source_dir()
    for name in native_cuda.SOURCES + native_cuda.HEADERS:
        assert (src / name).is_file(), name
    assert {Path(s).name for s in native_cuda.SOURCES} >= set(KERNEL_FILES)
    kw = native_cuda.extension_kwargs()
    assert "--use_fast_math" not in kw["extra_compile_args"]["nvcc"]


# ----------------------------------------------------------------------------------------------------------------------
# the loader's errors (run anywhere)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_loader():
    native_cuda._load.cache_clear()
    yield
    native_cuda._load.cache_clear()


def test_cpu_only_torch_is_explained(monkeypatch, fresh_loader):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(native_cuda.NativeCudaBuildError, match="CPU-only"):
        native_cuda.load()
    assert not native_cuda.is_available() and "torch.version.cuda" in native_cuda.build_error()


def test_missing_nvcc_is_explained(monkeypatch, fresh_loader):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(native_cuda, "_torch_cuda_home", lambda: None)
    monkeypatch.setattr(native_cuda, "find_nvcc", lambda: None)
    with pytest.raises(native_cuda.NativeCudaBuildError, match="nvcc, which was not found.*CUDA toolkit 12.4"):
        native_cuda.load()
    native_cuda._load.cache_clear()
    monkeypatch.setattr(native_cuda, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    with pytest.raises(native_cuda.NativeCudaBuildError, match="set CUDA_HOME"):
        native_cuda.load()


def test_no_device_is_explained(monkeypatch, fresh_loader):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(native_cuda.NativeCudaBuildError, match="visible CUDA device"):
        native_cuda.load()


# ----------------------------------------------------------------------------------------------------------------------
# two implementations of the same kernels: the host emulation (CPU tensors) and the extension (CUDA tensors)
# ----------------------------------------------------------------------------------------------------------------------
_P, _I64, _U64, _D, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_double, ctypes.c_int


def _ptr(t):
    return None if t is None else t.data_ptr()


def _math(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class HostEmulation:
    """tests/cuda/host_emulation.cu through ctypes, with the extension's Python signatures (CPU tensors)."""

    device = torch.device("cpu")

    def __init__(self, path: Path):
        lib = self.lib = ctypes.CDLL(str(path))
        lib.emu_threads.argtypes, lib.emu_threads.restype = [_I64], _I
        lib.emu_philox.argtypes, lib.emu_philox.restype = [_P, _U64, _P], None
        lib.emu_uniform.argtypes, lib.emu_uniform.restype = [ctypes.c_uint32], ctypes.c_float
        lib.emu_divergence_rows.argtypes = [_I, _P, _P, _I64, _I64, _I64, _I64, _P, _I, _D, _D, _D, _D, _I, _I, _P,
                                            _P]
        lib.emu_mixture_sample_rows.argtypes = [_I, _P, _P, _I64, _I64, _I64, _I64, _U64, _I64, _D, _D, _D, _P, _P,
                                                _P, _P]
        lib.emu_rollout_statistics_rows.argtypes = [_I, _P, _P, _I64, _I64, _I64, _I64, _P, _D, _D, _P, _P, _P]

    def rows(self, zs, zt, row_grad, cfg, grad_s, grad_t):
        c, v = zs.shape
        m = _math(zs.dtype)
        loss, stats = torch.empty(c, dtype=m), torch.empty(c, 6, dtype=m)
        rg = None if row_grad is None else row_grad.to(m).contiguous()
        a = native_cuda.kernel_args(cfg)  # one temperature and softcap for both models, as the CUDA binding takes
        rc = self.lib.emu_divergence_rows(DTYPE_CODE[zs.dtype], zs.data_ptr(), zt.data_ptr(), zs.stride(0),
                                          zt.stride(0), c, v, _ptr(rg), a["kind"], a["log_w"], a["log_1mw"],
                                          a["temperature"], a["softcap"], int(grad_s), int(grad_t), loss.data_ptr(),
                                          stats.data_ptr())
        assert rc == 0
        return loss, stats, (zs if grad_s else None), (zt if grad_t else None)

    def sample(self, zs, zt, seed: int, row_offset: int, alpha: float, temperature=1.0, softcap=0.0):
        c, v = zs.shape
        m = _math(zs.dtype)
        tokens = torch.full((c,), -1, dtype=torch.int64)
        lq = torch.empty(c, dtype=m)
        lp, lm = (torch.empty(c if zt is not None else 0, dtype=m) for _ in range(2))
        rc = self.lib.emu_mixture_sample_rows(DTYPE_CODE[zs.dtype], zs.data_ptr(), _ptr(zt), zs.stride(0),
                                              0 if zt is None else zt.stride(0), c, v, seed, row_offset, alpha,
                                              temperature, softcap, tokens.data_ptr(), lq.data_ptr(),
                                              _ptr(lp) if zt is not None else None,
                                              _ptr(lm) if zt is not None else None)
        assert rc == 0
        return tokens, lq, lp, lm

    def stats(self, zs, zt, tokens, temperature=1.0, softcap=0.0):
        c, v = zs.shape
        m = _math(zs.dtype)
        lq, lp, rkl = (torch.empty(c, dtype=m) for _ in range(3))
        y = tokens.to(torch.int64).contiguous()
        rc = self.lib.emu_rollout_statistics_rows(DTYPE_CODE[zs.dtype], zs.data_ptr(), zt.data_ptr(), zs.stride(0),
                                                  zt.stride(0), c, v, y.data_ptr(), temperature, softcap,
                                                  lq.data_ptr(), lp.data_ptr(), rkl.data_ptr())
        assert rc == 0
        return lq, lp, rkl


class CudaExtension:
    """minillm_fast/native_cuda.py on CUDA tensors."""

    device = torch.device("cuda")

    def __init__(self):
        self.ext = native_cuda.load()  # a build failure fails the test

    rows = staticmethod(native_cuda.cuda_rows)

    def sample(self, zs, zt, seed: int, row_offset: int, alpha: float, temperature=1.0, softcap=0.0):
        key = torch.tensor([seed], dtype=torch.int64, device=zs.device)
        return native_cuda.cuda_mixture_sample_rows(zs, zt, key, row_offset, alpha=alpha, temperature=temperature,
                                                    softcap=softcap)

    def stats(self, zs, zt, tokens, temperature=1.0, softcap=0.0):
        return native_cuda.cuda_rollout_statistics_rows(zs, zt, tokens, temperature=temperature, softcap=softcap)


@pytest.fixture(scope="module")
def emulation(nvcc, tmp_path_factory) -> HostEmulation:
    so = tmp_path_factory.mktemp("cuda_emulation") / "libminillm_cuda_emulation.so"
    _compile(nvcc, ["-shared", "-Xcompiler", "-fPIC", "-O2", *_nvcc_flags(), "-o", str(so), str(EMULATION_SRC)],
             EMULATION_SRC.name)
    return HostEmulation(so)


def _cuda_toolchain_missing() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return native_cuda.find_nvcc() is None or not is_ninja_available() or torch.version.cuda is None


@pytest.fixture(scope="module")
def cuda_ext() -> CudaExtension:
    if _cuda_toolchain_missing():
        pytest.skip("CUDA device present but no nvcc / ninja / CUDA build of torch: the extension cannot be built")
    return CudaExtension()


@pytest.fixture(params=["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def kern(request):
    """The kernels under test: the host emulation (CPU) or the compiled extension (GPU)."""
    return request.getfixturevalue("emulation" if request.param == "host" else "cuda_ext")


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------
def _cfg(name: str, temperature: float = 1.0, softcap: float = 0.0, vocab: int = 0, beta=0.3, skew=0.2):
    """Both models scaled by (temperature, softcap): the CUDA row kernels take one scaling for both."""
    scaling = Scaling.of(temperature, softcap or None)
    return DivergenceConfig(divergences.resolve(name, beta, skew), scaling, scaling, vocab)


def _seed(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("-".join(map(str, key)).encode()))


def _chunk(gen, c, v, std=3.0, offset=1.0, dtype=torch.float32):
    zs = (torch.randn(c, v, generator=gen) * std).to(dtype)
    zt = (torch.randn(c, v, generator=gen) * std + offset).to(dtype)
    row_grad = torch.randn(c, generator=gen)  # signs mixed, as a reduction='none' upstream
    return zs, zt, row_grad


def _scaled(z, temperature=1.0, softcap=0.0):
    z = z.double()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z / temperature


def _untie_tvd(zs, zt, cfg):
    """Nudge teacher logits off near-ties q ~= p, where TVD's sign(q - p) may flip in any fp32 implementation (in
    the logits' dtype: the nudge must survive the rounding of bf16 / fp16)."""
    lq = torch.log_softmax(cfg.student.apply(zs.double())[0], -1)
    step = 0.01 if zt.dtype in (torch.float32, torch.float64) else 0.1
    for _ in range(20):
        close = (lq - torch.log_softmax(cfg.teacher.apply(zt.double())[0], -1)).abs() < 1e-5
        if not close.any():
            return zt
        zt = (zt.double() + step * close).to(zt.dtype)
    raise AssertionError("could not untie the TVD inputs")


def _run(fn, zs, zt, row_grad, cfg, grad_s=True, grad_t=True, device="cpu", dtype=None):
    """A rows function on copies on ``device`` (they are overwritten), optionally cast; results on the CPU."""
    cast = (lambda x: x.to(device).clone()) if dtype is None else (lambda x: x.to(device=device, dtype=dtype).clone())
    out = fn(cast(zs), cast(zt), None if row_grad is None else cast(row_grad), cfg, grad_s, grad_t)
    return tuple(None if x is None else x.cpu() for x in out)


# ----------------------------------------------------------------------------------------------------------------------
# 2/3. the rows function
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("v", [5, 1031, 2048 + 517], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name", list(divergences.DIVERGENCES))
def test_rows_match_torch(kern, name, setting, v):
    """Every divergence x setting at vocabularies below one thread tile, straddling tiles, and ending mid-tile."""
    gen = _seed(name, setting, v)
    temperature, softcap = SETTINGS[setting]
    cfg = _cfg(name, temperature, softcap, v)
    zs, zt, rg = _chunk(gen, 13, v)
    if name == "tvd":
        zt = _untie_tvd(zs, zt, cfg)
    truth = _run(torch_backend.divergence_rows, zs, zt, rg, cfg, dtype=torch.float64)
    naive = _run(torch_backend.divergence_rows, zs, zt, rg, cfg)
    got = _run(kern.rows, zs, zt, rg, cfg, device=kern.device)
    assert_rows_within_budget(got, naive, truth, f"[{name} {setting} V={v}] ", slack=rounding_slack)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(divergences.DIVERGENCES))
def test_half_precision_logits(kern, name, dtype):
    """bf16 / fp16 logits, fp32 math: loss and stats as accurate as fp32 torch on the same (rounded) logits, the
    gradient (stored back in the logits' dtype) as accurate as fp32 torch's rounded to that dtype."""
    gen = _seed(name, dtype, "half")
    cfg = _cfg(name, 1.3, 20.0, 1031)
    zs, zt, rg = _chunk(gen, 9, 1031, dtype=dtype)
    if name == "tvd":
        zt = _untie_tvd(zs, zt, cfg)
    truth = _run(torch_backend.divergence_rows, zs, zt, rg, cfg, dtype=torch.float64)
    loss, stats, g_s, g_t = _run(torch_backend.divergence_rows, zs, zt, rg, cfg, dtype=torch.float32)
    naive = (loss, stats, g_s.to(dtype), g_t.to(dtype))
    got = _run(kern.rows, zs, zt, rg, cfg, device=kern.device)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype
    assert_rows_within_budget(got, naive, truth, f"[{name} {dtype}] ", slack=rounding_slack)


@pytest.mark.parametrize("name", list(divergences.DIVERGENCES))
def test_float64(kern, name):
    gen = _seed(name, "f64")
    cfg = _cfg(name, 1.3, 7.0, 300)
    zs, zt, rg = _chunk(gen, 5, 300, dtype=torch.float64)
    rg = rg.double()  # (torch_rows scales in row_grad's dtype)
    want = _run(torch_backend.divergence_rows, zs, zt, rg, cfg)
    got = _run(kern.rows, zs, zt, rg, cfg, device=kern.device)
    for x, w in zip(got, want):
        assert x.dtype == torch.float64
        torch.testing.assert_close(x, w, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd"])
def test_large_offsets_and_peaked_rows(kern, name):
    """Logits far from 0 (teacher shifted by 1000) and peaked rows whose small probabilities underflow in fp32."""
    gen = _seed(name, "offset")
    cfg = _cfg(name, vocab=777)
    zs, zt, rg = _chunk(gen, 6, 777, std=30.0, offset=1000.0)
    truth = _run(torch_backend.divergence_rows, zs, zt, rg, cfg, dtype=torch.float64)
    naive = _run(torch_backend.divergence_rows, zs, zt, rg, cfg)
    got = _run(kern.rows, zs, zt, rg, cfg, device=kern.device)
    assert_rows_within_budget(got, naive, truth, f"[{name} offset] ", slack=rounding_slack)
    got0 = _run(kern.rows, zs, zt - 1000.0, rg, cfg, device=kern.device)
    assert torch.allclose(got0[0], got[0], rtol=1e-5, atol=1e-4 * got[0].abs().max().item())


@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["nocap", "cap5"])
@pytest.mark.parametrize("grad_s,grad_t", [(True, False), (False, True), (False, False)], ids=["s", "t", "none"])
def test_gradients_in_place_and_only_where_asked(kern, grad_s, grad_t, softcap):
    gen = _seed("inplace", grad_s, grad_t, softcap)
    cfg = _cfg("skew_reverse_kl", 1.0, softcap, 200)
    zs, zt, rg = _chunk(gen, 4, 200)
    want = torch_backend.divergence_rows(zs.double(), zt.double(), rg.double(), cfg, True, True)
    bs, bt = zs.to(kern.device), zt.to(kern.device)
    loss, stats, g_s, g_t = kern.rows(bs, bt, rg.to(kern.device) if (grad_s or grad_t) else None, cfg, grad_s, grad_t)
    assert (g_s is bs) == grad_s and (g_s is None) != grad_s
    assert (g_t is bt) == grad_t and (g_t is None) != grad_t
    torch.testing.assert_close(loss.cpu().double(), want[0], rtol=1e-5, atol=1e-6)
    if grad_s:
        torch.testing.assert_close(g_s.cpu().double(), want[2], rtol=1e-4, atol=1e-7)
    else:  # a buffer whose gradient is not asked for is left alone (tanh is recomputed, never stored)
        assert torch.equal(bs.cpu(), zs)
    if grad_t:
        torch.testing.assert_close(g_t.cpu().double(), want[3], rtol=1e-4, atol=1e-7)
    else:
        assert torch.equal(bt.cpu(), zt)


def test_zero_row_grad_gives_zero_gradient_rows(kern):
    gen = _seed("zero-rg")
    cfg = _cfg("tvd", 1.0, 0.0, 100)
    zs, zt, rg = _chunk(gen, 6, 100)
    rg[::2] = 0.0
    _, _, g_s, g_t = _run(kern.rows, zs, zt, rg, cfg, device=kern.device)
    assert torch.equal(g_s[::2], torch.zeros_like(g_s[::2])) and torch.equal(g_t[::2], torch.zeros_like(g_t[::2]))
    assert (g_s[1::2] != 0).any()


@pytest.mark.parametrize("name", ["reverse_kl", "jsd"])
def test_nan_stays_in_its_row(kern, name):
    gen = _seed("nan", name)
    cfg = _cfg(name, 1.0, 0.0, 600)
    zs, zt, rg = _chunk(gen, 4, 600)
    zs[2, 555] = float("nan")
    loss, stats, g_s, g_t = _run(kern.rows, zs, zt, rg, cfg, device=kern.device)
    assert torch.isnan(loss[2]) and torch.isnan(g_s[2]).all() and torch.isnan(g_t[2]).all()
    keep = [0, 1, 3]
    assert torch.isfinite(loss[keep]).all() and torch.isfinite(stats[keep]).all() and torch.isfinite(g_s[keep]).all()


def test_row_does_not_depend_on_its_chunk(kern):
    """A row's bits depend on V and its data only (the thread count is a function of V)."""
    gen = _seed("chunking")
    cfg = _cfg("jsd", 1.0, 10.0, 1031)
    zs, zt, rg = _chunk(gen, 96, 1031)
    full = _run(kern.rows, zs, zt, rg, cfg, device=kern.device)
    part = _run(kern.rows, zs[40:57], zt[40:57], rg[40:57], cfg, device=kern.device)
    for a, b in zip(part, full):
        assert torch.equal(a, b[40:57])


def test_strided_rows(kern):
    """Rows of a wider buffer (row stride > V), as a slice of padded logits would give."""
    gen = _seed("strided")
    cfg = _cfg("reverse_kl", 1.0, 0.0, 300)
    zs, zt, rg = _chunk(gen, 7, 320)
    want = _run(kern.rows, zs[:, :300].contiguous(), zt[:, :300].contiguous(), rg, cfg, device=kern.device)
    bs, bt = zs.to(kern.device).clone(), zt.to(kern.device).clone()
    got = kern.rows(bs[:, :300], bt[:, :300], rg.to(kern.device), cfg, True, True)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    assert torch.equal(bs[:, 300:].cpu(), zs[:, 300:])  # the padding is never written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(divergences.DIVERGENCES))
def test_end_to_end_through_chunked_run(kern, name, dtype):
    """The rows function plugged into chunked.run (as backend='native' would on CUDA tensors): loss and student
    gradients against reference.fused_divergence in float64, with the suite's error budget (tests/helpers.py)."""
    gen = _seed("e2e", name, dtype)
    tensors = make_inputs(gen, n=37, hs=24, ht=40, v=1031, bias=True, dtype=dtype)
    kwargs = dict(divergence=name, temperature=1.7, softcap=9.0, reduction="sum", beta=0.3, skew=0.2)
    truth, naive = ground_truth_and_naive(tensors, STUDENT, **kwargs)
    cfg = _cfg(name, 1.7, 9.0, 1031)
    dev = {k: (None if t is None else t.to(kern.device)) for k, t in tensors.items()}
    n = dev["student_hidden"].shape[0]
    loss, _, grads = chunked.run(dev["student_hidden"], dev["student_weight"], dev["student_bias"],
                                 dev["teacher_hidden"], dev["teacher_weight"], dev["teacher_bias"], cfg,
                                 rows=chunked.Rows(kern.rows), chunk_size=16, needs=(True, True, False, False, False, False),
                                 row_grad=torch.ones(n, device=kern.device))
    device = tensors["student_hidden"].device
    impl = Result(loss.sum().to(device), {"student_hidden": grads[0].to(device), "student_weight": grads[1].to(device)})
    assert_within_budget(impl, truth, naive, dtype, f"[{name} {dtype} chunked.run] ")


# ----------------------------------------------------------------------------------------------------------------------
# 2/3. the sampler and the rollout statistics
# ----------------------------------------------------------------------------------------------------------------------
def _logprob_truth(z, y, temperature=1.0, softcap=0.0):
    return torch.log_softmax(_scaled(z, temperature, softcap), -1).gather(1, y[:, None])[:, 0]


def _assert_close_to_truth(x, truth, naive, what):
    e = (x.double() - truth).abs().max().item()
    e_naive = (naive.double() - truth).abs().max().item()
    small = SMALL_ULPS * torch.finfo(torch.float32).eps * max(1.0, truth.abs().max().item())
    assert e <= 2 * e_naive + small, f"{what}: error {e:.3e} > 2 x torch's {e_naive:.3e} + {small:.3e}"


@pytest.mark.parametrize("setting", ["plain", "T0.7-cap5"])
@pytest.mark.parametrize("v", [7, 1031], ids=lambda v: f"V{v}")
def test_sample_logprobs(kern, v, setting):
    temperature, softcap = SETTINGS[setting]
    gen = _seed("sample-lp", v, setting)
    zs, zt, _ = _chunk(gen, 50, v)
    tokens, lq, lp, lm = (x.cpu() for x in kern.sample(zs.to(kern.device), zt.to(kern.device), 12345, 0, 0.3,
                                                         temperature, softcap))
    assert tokens.dtype == torch.int64 and ((tokens >= 0) & (tokens < v)).all()
    truth_q = _logprob_truth(zs, tokens, temperature, softcap)
    truth_p = _logprob_truth(zt, tokens, temperature, softcap)
    naive_q = torch.log_softmax(_scaled(zs, temperature, softcap).float(), -1).gather(1, tokens[:, None])[:, 0]
    naive_p = torch.log_softmax(_scaled(zt, temperature, softcap).float(), -1).gather(1, tokens[:, None])[:, 0]
    _assert_close_to_truth(lq, truth_q, naive_q, "log q(y)")
    _assert_close_to_truth(lp, truth_p, naive_p, "log p(y)")
    truth_m = torch.logaddexp(truth_p + math.log(0.3), truth_q + math.log(0.7))
    _assert_close_to_truth(lm, truth_m, divergences._log_mix(naive_p, naive_q, 0.3), "log m(y)")


@pytest.mark.parametrize("alpha,teacher", [(0.3, True), (0.0, True), (1.0, True), (0.5, False)],
                         ids=["alpha0.3", "alpha0", "alpha1", "student-only"])
def test_sample_distribution_chi_square(kern, alpha, teacher):
    """20000 draws from one row repeated (each row has its own Philox counter) against the exact mixture."""
    from scipy.stats import chisquare

    gen = _seed("chi2", alpha, teacher)
    v, n = 11, 20000
    zs = torch.randn(1, v, generator=gen).expand(n, v).contiguous()
    zt = (torch.randn(1, v, generator=gen) * 1.5).expand(n, v).contiguous()
    q = torch.softmax(_scaled(zs[0], 0.8, 4.0), -1)
    p = torch.softmax(_scaled(zt[0], 0.8, 4.0), -1)
    mix = alpha * p + (1 - alpha) * q if teacher else q
    tokens, _, _, _ = kern.sample(zs.to(kern.device), zt.to(kern.device) if teacher else None, 2024, 0, alpha, 0.8,
                                  4.0)
    counts = torch.bincount(tokens.cpu(), minlength=v).double()
    keep = mix > 0
    assert counts[~keep].sum() == 0
    p_value = chisquare(counts[keep].numpy(), (mix[keep] * n).numpy()).pvalue
    assert p_value > 1e-4, f"chi-square p = {p_value:.2e}: counts {counts.tolist()} vs {(mix * n).tolist()}"


def test_sample_deterministic_and_chunk_independent(kern):
    gen = _seed("sample-det")
    zs, zt, _ = _chunk(gen, 40, 333)
    d = kern.device
    full = kern.sample(zs.to(d), zt.to(d), 77, 100, 0.4)
    again = kern.sample(zs.to(d), zt.to(d), 77, 100, 0.4)
    for a, b in zip(full, again):
        assert torch.equal(a.cpu(), b.cpu())
    head = kern.sample(zs[:15].to(d), zt[:15].to(d), 77, 100, 0.4)
    tail = kern.sample(zs[15:].to(d), zt[15:].to(d), 77, 115, 0.4)
    for a, h, t in zip(full, head, tail):
        assert torch.equal(a.cpu(), torch.cat([h.cpu(), t.cpu()]))
    other = kern.sample(zs.to(d), zt.to(d), 78, 100, 0.4)
    assert not torch.equal(other[0].cpu(), full[0].cpu())


def test_sample_alpha0_draws_what_the_student_alone_draws(kern):
    gen = _seed("alpha0")
    zs, zt, _ = _chunk(gen, 30, 257)
    d = kern.device
    mixed = kern.sample(zs.to(d), zt.to(d), 5, 0, 0.0)
    alone = kern.sample(zs.to(d), None, 5, 0, 0.0)
    assert torch.equal(mixed[0].cpu(), alone[0].cpu()) and torch.equal(mixed[1].cpu(), alone[1].cpu())
    assert alone[2].numel() == 0 and alone[3].numel() == 0
    torch.testing.assert_close(mixed[3].cpu(), mixed[1].cpu())  # log m = log q at alpha 0


def test_sample_nan_row(kern):
    gen = _seed("sample-nan")
    zs, zt, _ = _chunk(gen, 3, 100)
    zs[1, 17] = float("nan")
    tokens, lq, lp, lm = (x.cpu() for x in kern.sample(zs.to(kern.device), zt.to(kern.device), 3, 0, 0.0))
    assert tokens[1] == 0 and torch.isnan(lq[1]) and torch.isnan(lm[1])
    assert torch.isfinite(lq[[0, 2]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("setting", ["plain", "T0.7-cap5"])
def test_rollout_statistics(kern, setting, dtype):
    temperature, softcap = SETTINGS[setting]
    gen = _seed("stats", setting, dtype)
    zs, zt, _ = _chunk(gen, 21, 1031, dtype=dtype)
    tokens = torch.randint(0, 1031, (21,), generator=gen)
    lq, lp, rkl = (x.cpu() for x in kern.stats(zs.to(kern.device), zt.to(kern.device), tokens.to(kern.device),
                                               temperature, softcap))
    assert lq.dtype == _math(dtype)
    s64, t64 = _scaled(zs, temperature, softcap), _scaled(zt, temperature, softcap)
    lq64, lp64 = torch.log_softmax(s64, -1), torch.log_softmax(t64, -1)
    truth = (lq64.gather(1, tokens[:, None])[:, 0], lp64.gather(1, tokens[:, None])[:, 0],
             (lq64.exp() * (lq64 - lp64)).sum(-1))
    if dtype == torch.float64:
        for x, t in zip((lq, lp, rkl), truth):
            torch.testing.assert_close(x, t, rtol=1e-11, atol=1e-12)
        return
    lq32, lp32 = torch.log_softmax(s64.float(), -1), torch.log_softmax(t64.float(), -1)
    naive = (lq32.gather(1, tokens[:, None])[:, 0], lp32.gather(1, tokens[:, None])[:, 0],
             (lq32.exp() * (lq32 - lp32)).sum(-1))
    for what, x, t, nv in zip(("log q(y)", "log p(y)", "KL(q||p)"), (lq, lp, rkl), truth, naive):
        _assert_close_to_truth(x, t, nv, what)


# ----------------------------------------------------------------------------------------------------------------------
# Philox: the same generator as Triton's tl.philox (and Random123's known answers)
# ----------------------------------------------------------------------------------------------------------------------
# Random123 kat_vectors, philox4x32_10: (counter, key) -> output
_PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _emu_philox(emu, counter, seed):
    c = (ctypes.c_uint32 * 4)(*counter)
    out = (ctypes.c_uint32 * 4)()
    emu.lib.emu_philox(ctypes.addressof(c), seed, ctypes.addressof(out))
    return tuple(out)


def test_philox_known_answers(emulation):
    for counter, (k0, k1), want in _PHILOX_KAT:
        assert _emu_philox(emulation, counter, k0 | (k1 << 32)) == want


def test_philox_and_uniforms_match_triton(emulation):
    """Counters (v, row, stream, 0) and the int -> float map of tl.uint_to_uniform_float, against Triton itself
    (its interpreter on CPU machines: the same integer arithmetic)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def _philox_kernel(seed, out_ptr, u_ptr, N: tl.constexpr, STREAM: tl.constexpr):
        o = tl.arange(0, N)
        c0 = o * 7 + 3
        c1 = o * 131 + 11
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c0 * 0 + STREAM, c0 * 0)
        tl.store(out_ptr + o * 4 + 0, r0.to(tl.int32, bitcast=True))
        tl.store(out_ptr + o * 4 + 1, r1.to(tl.int32, bitcast=True))
        tl.store(out_ptr + o * 4 + 2, r2.to(tl.int32, bitcast=True))
        tl.store(out_ptr + o * 4 + 3, r3.to(tl.int32, bitcast=True))
        tl.store(u_ptr + o, tl.uint_to_uniform_float(r0))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    n, seed = 64, 0x1234_5678_9ABC_DEF
    for stream in (0, 1):
        out = torch.empty(n, 4, dtype=torch.int32, device=device)
        u = torch.empty(n, dtype=torch.float32, device=device)
        _philox_kernel[(1,)](seed, out, u, N=n, STREAM=stream)
        out, u = out.cpu(), u.cpu()
        for i in range(n):
            want = tuple(int(x) & 0xFFFFFFFF for x in out[i])
            assert _emu_philox(emulation, (i * 7 + 3, i * 131 + 11, stream, 0), seed) == want, i
            assert emulation.lib.emu_uniform(want[0]) == u[i].item(), i


def test_thread_count_is_a_function_of_v(emulation):
    threads = [emulation.lib.emu_threads(v) for v in (1, 5, 128, 129, 1031, 50304, 128256)]
    assert threads == [32, 32, 32, 64, 256, 256, 256]


# ----------------------------------------------------------------------------------------------------------------------
# GPU only: what the emulation cannot show
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["reverse_kl", "jsd"])
def test_cuda_large_vocabulary(cuda_ext, name):
    """A 128k vocabulary (Llama 3): ~500 entries per thread, sums over many tiles."""
    gen = _seed("large", name)
    cfg = _cfg(name, 1.0, 0.0, 128256)
    zs, zt, rg = _chunk(gen, 6, 128256)
    truth = _run(torch_backend.divergence_rows, zs, zt, rg, cfg, dtype=torch.float64)
    naive = _run(torch_backend.divergence_rows, zs, zt, rg, cfg)
    got = _run(native_cuda.cuda_rows, zs, zt, rg, cfg, device="cuda")
    assert_rows_within_budget(got, naive, truth, f"[{name} V=128256] ", slack=rounding_slack)


@pytest.mark.gpu
def test_cuda_matches_host_emulation(cuda_ext, emulation):
    """The device and the emulation run the same per-thread code: they agree to the reductions' rounding."""
    gen = _seed("device-vs-host")
    cfg = _cfg("skew_forward_kl", 1.2, 0.0, 5000)
    zs, zt, rg = _chunk(gen, 33, 5000)
    dev = _run(native_cuda.cuda_rows, zs, zt, rg, cfg, device="cuda")
    host = _run(emulation.rows, zs, zt, rg, cfg)
    for a, b in zip(dev, host):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7 * b.abs().max().item())
    t_dev = cuda_ext.sample(zs.cuda(), zt.cuda(), 99, 0, 0.5)[0].cpu()
    t_host = emulation.sample(zs, zt, 99, 0, 0.5)[0]
    assert (t_dev != t_host).sum() <= 1  # same uniforms; a flip needs two scores within rounding


@pytest.mark.gpu
def test_cuda_sampler_agrees_with_triton(cuda_ext):
    """Same seed, same Philox counters as kernels/sampling.py: the same tokens but where two Gumbel scores are within
    the rounding of the two paths' logits."""
    from minillm_fast.kernels import sampling as triton_sampling

    gen = _seed("triton-agree")
    t = make_inputs(gen, n=256, hs=32, ht=48, v=4099, device="cuda")
    hs, ws, ht, wt = t["student_hidden"], t["student_weight"], t["teacher_hidden"], t["teacher_weight"]
    seed = torch.tensor([424242], dtype=torch.int64, device="cuda")
    tri, _, _ = triton_sampling.sample(hs, ws, None, ht, wt, None, seed, alpha=0.4, inv_temp=(1.0, 1.0),
                                       softcap=(0.0, 0.0), vocab_size=4099)
    zs, zt = (hs @ ws.T).float(), (ht @ wt.T).float()
    ours = native_cuda.cuda_mixture_sample_rows(zs, zt, seed, 0, alpha=0.4)[0]
    assert (tri != ours).sum().item() <= 2


@pytest.mark.gpu
def test_cuda_runs_on_the_current_stream(cuda_ext):
    gen = _seed("stream")
    cfg = _cfg("reverse_kl", 1.0, 0.0, 999)
    zs, zt, rg = _chunk(gen, 64, 999)
    want = _run(native_cuda.cuda_rows, zs, zt, rg, cfg, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        bs, bt, g = zs.cuda(), zt.cuda(), rg.cuda()
        got = native_cuda.cuda_rows(bs, bt, g, cfg, True, True)
    side.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


def _call(ext, zs, zt, row_grad=None, kind=0, temperature=1.0, softcap=0.0, grad_s=False, grad_t=False,
          log_w=divergences.LOG_ZERO, log_1mw=0.0):
    return ext.divergence_rows(zs, zt, row_grad, kind=kind, log_w=log_w, log_1mw=log_1mw, temperature=temperature,
                               softcap=softcap, grad_s=grad_s, grad_t=grad_t)


def _z(*shape, dtype=torch.float32, device="cuda"):
    return torch.zeros(*shape, dtype=dtype, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("args,match", [
    (dict(zs=lambda: _z(3, 8, device="cpu"), zt=lambda: _z(3, 8)), "zs must be a CUDA tensor"),
    (dict(zs=lambda: _z(3, 8, dtype=torch.int32), zt=lambda: _z(3, 8, dtype=torch.int32)),
     "zs must be float32, float64, float16 or bfloat16"),
    (dict(zs=lambda: _z(8), zt=lambda: _z(8)), r"zs must be 2-D \[C, V\]"),
    (dict(zs=lambda: _z(3, 0), zt=lambda: _z(3, 0)), "zs must have at least one vocabulary entry"),
    (dict(zs=lambda: _z(8, 3).T, zt=lambda: _z(3, 8)), "zs must have contiguous rows"),
    (dict(zt=lambda: _z(3, 9)), "zt must have the shape of zs"),
    (dict(zt=lambda: _z(3, 8, dtype=torch.float64)), "zt must have the dtype of zs"),
    (dict(kind=6), r"kind must be in \[0, 5\]"),
    (dict(temperature=0.0), "temperature must be finite and > 0"),
    (dict(softcap=-1.0), "softcap must be finite and >= 0"),
    (dict(log_w=0.5), "log_w and log_1mw must be logs of weights"),
    (dict(grad_s=True), r"row_grad \[C\] is required"),
    (dict(grad_t=True, row_grad=lambda: _z(4)), r"row_grad must have shape \[3\]"),
    (dict(grad_t=True, row_grad=lambda: _z(3, device="cpu")), "row_grad must be on the device of the logits"),
], ids=["cpu", "dtype", "1d", "empty-vocab", "strided-rows", "zt-shape", "zt-dtype", "kind", "temperature",
        "softcap", "log_w", "no-row-grad", "row-grad-shape", "row-grad-device"])
def test_cuda_bad_inputs_name_the_argument(cuda_ext, args, match):
    args = {k: (v() if callable(v) else v) for k, v in args.items()}
    zs = args.pop("zs", None)
    zs = _z(3, 8) if zs is None else zs
    zt = args.pop("zt", None)
    zt = _z(3, 8) if zt is None else zt
    with pytest.raises(RuntimeError, match=match):
        _call(cuda_ext.ext, zs, zt, **args)


@pytest.mark.gpu
def test_cuda_same_buffer_and_empty_chunk(cuda_ext):
    z = _z(3, 8)
    with pytest.raises(RuntimeError, match="zs and zt must be distinct buffers"):
        _call(cuda_ext.ext, z, z)
    loss, stats = _call(cuda_ext.ext, _z(0, 8), _z(0, 8))
    assert loss.shape == (0,) and stats.shape == (0, 6)
    with pytest.raises(RuntimeError, match=r"alpha must be in \[0, 1\]"):
        cuda_ext.ext.mixture_sample_rows(_z(3, 8), _z(3, 8), torch.zeros(1, dtype=torch.int64), 0, 1.5, 1.0, 0.0)
