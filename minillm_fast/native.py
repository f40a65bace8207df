"""The ``native`` backend: the C++ extension of csrc/, compiled on first use (or ahead of time by setup.py).

Loading. :func:`load` imports ``minillm_fast._native_<isa>`` when ``MINILLM_FAST_BUILD_EXT=1 pip install
--no-build-isolation .`` built it ahead of time; otherwise it compiles the ``SOURCES`` of ``csrc/`` with
``torch.utils.cpp_extension.load`` (g++ and ninja, about a minute) into torch's extensions cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), where later processes find it in about a second.
Either way it happens once per process; :func:`is_available` reports whether it worked and :func:`build_error`
why not.

What it holds. ``divergence_rows`` (fused_divergence_cpu.cpp, the module's pybind function: the rows function of the
chunked fused divergence, :func:`native_rows`) and the row kernels of the other ops, registered as torch.library ops
``torch.ops.minillm_fast_native.*`` (:func:`ops`): ``token_logprobs_fwd_rows`` / ``_bwd_rows`` and
``rollout_statistics_rows`` (token_stats_cpu.cpp), ``mixture_sample_rows`` (sampling_cpu.cpp). Each takes one
chunk's logits ``[C, V]``; the chunk loops and matmuls are Python's (minillm_fast/ops/).

Instruction set. The kernels are written with ``at::vec::Vectorized``, whose width is fixed when the file is compiled
(by ``CPU_CAPABILITY`` and the ``-m`` flags). The extension is built for the capability ATen itself runs with on this
machine (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2 or DEFAULT), with the flags ATen's own CPU kernels
use for it, and the capability is part of the module's name. So a cache shared by machines with different CPUs (a
network home, a CI cache) never hands one a build for instructions it lacks, ``ATEN_CPU_CAPABILITY=default`` selects
the portable build, and an ahead-of-time install carries one module per capability and imports the right one at
run time. ``-march=native`` is avoided on purpose: it bakes in whatever the build machine has under a name that does
not say so.

This module imports nothing from the package (setup.py loads it by path to share the flags and sources).
"""
from __future__ import annotations

import functools
import importlib
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

SOURCES = ("fused_divergence_cpu.cpp", "divergence_cols_cpu.cpp", "token_stats_cpu.cpp", "sampling_cpu.cpp")
# Included by the sources (ninja tracks them for rebuilds; listed so that a stale build is announced and an incomplete
# csrc/ is refused).
HEADERS = ("native_common.h", "divergence_math.h", "philox.h")
# The torch.library namespace of the row kernels of token_stats_cpu.cpp and sampling_cpu.cpp (the pybind module,
# fused_divergence_cpu.cpp's, carries divergence_rows): torch.ops.minillm_fast_native.* once the library is loaded.
OPS_NAMESPACE = "minillm_fast_native"
# -fopenmp: at::parallel_for is an inline template over `#pragma omp parallel` and runs serially without it. The
# library then needs libgomp.so.1, which resolves to the copy torch has loaded, so torch.set_num_threads governs it.
_COMMON_FLAGS = ["-O3", "-fopenmp"]
CAPABILITY_FLAGS = {
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"],
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma"],
}
LDFLAGS = ["-fopenmp"]


class NativeBuildError(RuntimeError):
    """The native extension cannot be built or loaded here; the message says why and what to do."""


def capability() -> str:
    """The instruction set to build for: ATen's own choice on this machine, DEFAULT off x86-64."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in CAPABILITY_FLAGS else "DEFAULT"


def cflags(cap: str) -> list[str]:
    return _COMMON_FLAGS + CAPABILITY_FLAGS[cap]


def module_name(cap: str) -> str:
    """Name of the extension module built for ``cap`` (the ahead-of-time one lives in the package)."""
    return f"_native_{cap.lower()}"


def source_dir() -> Path:
    """csrc/: inside the installed package (package data), else at the repository root (source tree, editable)."""
    here = Path(__file__).resolve().parent
    for d in (here / "csrc", here.parent / "csrc"):
        if all((d / s).is_file() for s in SOURCES + HEADERS):
            return d
    raise NativeBuildError(f"the native extension's sources ({', '.join(SOURCES + HEADERS)}) are not in "
                           f"{here / 'csrc'} or {here.parent / 'csrc'}; reinstall minillm-fast from a complete source "
                           "tree")


def _check_toolchain() -> None:
    from torch.utils.cpp_extension import is_ninja_available

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise NativeBuildError(
            f"backend='native' compiles a C++ extension on first use, but the compiler {cxx!r} was not found: install "
            "one (Debian/Ubuntu: apt-get install g++; conda: conda install gxx_linux-64) or point CXX at it; or use "
            "backend='torch'")
    if not is_ninja_available():
        raise NativeBuildError("backend='native' compiles a C++ extension on first use with ninja, which was not "
                               "found: pip install ninja; or use backend='torch'")


def _needs_compile(name: str, sources: list[str]) -> bool:
    """Whether torch's JIT loader will have to compile (no cached library, or older than a source or header)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lib = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
        return not lib.is_file() or lib.stat().st_mtime < max(Path(s).stat().st_mtime for s in sources)
    except Exception:  # private helper moved: say it, harmlessly, every first load
        return True


def _jit_build(cap: str):
    from torch.utils.cpp_extension import load as cpp_load

    _check_toolchain()
    src = source_dir()
    sources = [str(src / s) for s in SOURCES]
    name = "minillm_fast" + module_name(cap)
    if _needs_compile(name, sources + [str(src / h) for h in HEADERS]):
        print("minillm-fast: compiling the native extension (first use, ~1 min)...", file=sys.stderr, flush=True)
    try:
        return cpp_load(name=name, sources=sources, extra_cflags=cflags(cap), extra_ldflags=LDFLAGS, verbose=False)
    except Exception as e:  # compiler errors come back as RuntimeError / CalledProcessError with the log
        raise NativeBuildError(f"building the native extension ({cap}) from {src} failed: {e}\nUse backend='torch' "
                               "meanwhile; MINILLM_FAST_BACKEND=torch makes it the default.") from e


def _import_prebuilt(cap: str):
    """The module setup.py built ahead of time for ``cap``, or None."""
    try:
        return importlib.import_module(f"minillm_fast.{module_name(cap)}")
    except ImportError:
        return None


# The module once loaded in this process. Loading the extension a second time (after the cache below is cleared,
# as tests do to fake a missing toolchain) could dlopen another build of it, whose torch.library ops would be
# registered twice: a fatal error, not an exception. So a module that loaded is kept for the process's lifetime.
_MODULE = None


@functools.lru_cache(maxsize=None)
def _load():
    """The extension module, or the NativeBuildError saying why there is none (tried once per process)."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    cap = capability()
    mod = _import_prebuilt(cap)
    if mod is None:
        try:
            mod = _jit_build(cap)
        except NativeBuildError as e:
            return e
    _MODULE = mod
    return mod


def load():
    """The compiled extension (building it on first use); raises NativeBuildError if it cannot be had."""
    mod = _load()
    if isinstance(mod, NativeBuildError):
        raise mod
    return mod


# A constant to torch.compile: backend resolution calls this while dynamo traces a model, which must not trace into the
# loader (it queries the CPU capability, a torch.* call that returns a str, and breaks a fullgraph trace).
@torch.compiler.assume_constant_result
def is_available() -> bool:
    return not isinstance(_load(), NativeBuildError)


def build_error() -> Optional[str]:
    mod = _load()
    return str(mod) if isinstance(mod, NativeBuildError) else None


def ops():
    """``torch.ops.minillm_fast_native``: the row kernels of the token log-probs, rollout statistics and sampler
    (registered with torch.library when the extension loads; building it on first use)."""
    load()
    return getattr(torch.ops, OPS_NAMESPACE)


def native_rows(zs: torch.Tensor, zt: torch.Tensor, row_grad: Optional[torch.Tensor], cfg, grad_s: bool,
                grad_t: bool):
    """The rows function of the chunked strategy (see minillm_fast/chunked.py) in C++: zs, zt [C, V] float32 or
    float64 CPU chunk logits, overwritten in place, either with contiguous rows or vocabulary-major (the transpose of
    a row-major [V, C], which is how chunked.run hands them over: ``vocab_major`` below). Returns loss [C], stats
    [C, 6] and dL/dzs, dL/dzt (the overwritten buffers, in their layout) where asked, else None."""
    zs, zt = _rows_or_columns(zs), _rows_or_columns(zt)
    loss, stats = load().divergence_rows(zs, zt, row_grad, grad_s=grad_s, grad_t=grad_t, **cfg.kernel_args)
    return loss, stats, (zs if grad_s else None), (zt if grad_t else None)


# chunked.run computes the chunks as W h^T for this rows function: the faster matmuls on CPU (ChunkLogits explains)
native_rows.vocab_major = True


def _rows_or_columns(z: torch.Tensor) -> torch.Tensor:
    """z itself when its rows or its columns are contiguous (the two layouts the C++ kernel takes), else a copy."""
    if z.stride(-1) == 1 or (z.dim() == 2 and z.stride(0) == 1 and z.stride(1) >= z.shape[0]):
        return z
    return z.contiguous()
