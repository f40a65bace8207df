"""The ``native`` backend on CUDA tensors: the CUDA row kernels of csrc/cuda/, compiled on first use.

What it is. The token-chunked strategy (chunked.py) computes each chunk's logits ``[C, V]`` with one cuBLAS matmul
per model and hands them to a *rows function*; :func:`cuda_rows` is that function on the GPU (the CPU one is
native.native_rows), with the ``chunked.RowsFn`` signature. The rollout-time row kernels come with it:
:func:`cuda_mixture_sample_rows` (one token per row from ``alpha p + (1 - alpha) q``, Gumbel-max with the Triton
sampler's Philox counters) and :func:`cuda_rollout_statistics_rows`. Sources: ``csrc/cuda/divergence_rows.cu``,
``sampling.cu`` (kernels and launchers, CUDA headers only) and ``bindings.cpp`` (ATen wrappers).

Loading. :func:`load` imports ``minillm_fast._native_cuda`` where an ahead-of-time build installed it (setup.py
does not build it yet: see :func:`extension_kwargs`); otherwise it compiles the sources with
``torch.utils.cpp_extension.load`` (nvcc, the host C++ compiler and ninja; a minute or two, printing one line first
that names the build folder) into torch's extensions cache (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions/<python>_<cuda>``), where later processes find it in about a second. As for the CPU
extension (native.py, "The JIT cache"), the folder is ``minillm_fast_native_cuda_<key>``, the key hashing the
sources' and headers' bytes, the flags, the target architectures, torch and the toolkit (:func:`build_name`), and a
finished build is imported without torch's lock: installs with different sources coexist, none rebuilds another's.
It needs a CUDA build of torch (``torch.version.cuda`` set), a visible GPU and a CUDA toolkit (``nvcc`` under
torch's ``CUDA_HOME``); otherwise it raises :class:`NativeCudaBuildError` saying which is missing and what to do.
The kernels are compiled for the visible GPUs' architectures, or for ``TORCH_CUDA_ARCH_LIST`` when it is set (as
every torch JIT extension). :func:`is_available` / :func:`build_error` report the outcome; the build is tried once
per process.

This module imports nothing from the package except native.py's error class and JIT cache helpers (setup.py may load
it by path, without them: it only needs :func:`extension_kwargs`).
"""
from __future__ import annotations

import functools
import importlib
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

SOURCES = ("cuda/bindings.cpp", "cuda/divergence_rows.cu", "cuda/sampling.cu")
HEADERS = ("cuda/common.cuh", "cuda/divergence_rows.cuh", "cuda/sampling.cuh", "cuda/launchers.h")
MODULE_NAME = "minillm_fast_native_cuda"  # the JIT build's, before its key (build_name)
PREBUILT_NAME = "_native_cuda"  # an ahead-of-time build's, inside the package
# torch adds its COMMON_NVCC_FLAGS (no implicit half conversions: the kernels convert explicitly) and the -gencode
# flags of the target GPUs. Never --use_fast_math: the kernels rely on the accurate expf / logf / tanhf.
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
CXX_FLAGS = ["-O3", "-std=c++17"]

try:  # the CPU backend's error class, so that callers can catch either with one except, and its JIT cache
    from . import native as _native
    from .native import NativeBuildError as _Base
except ImportError:  # loaded by path (setup.py)
    _native = None
    _Base = RuntimeError


class NativeCudaBuildError(_Base):
    """The native CUDA extension cannot be built or loaded here; the message says why and what to do."""


def source_dir() -> Path:
    """The folder holding ``cuda/``: csrc/ inside the installed package, else at the repository root."""
    here = Path(__file__).resolve().parent
    for d in (here / "csrc", here.parent / "csrc"):
        if all((d / s).is_file() for s in SOURCES + HEADERS):
            return d
    raise NativeCudaBuildError(f"the native CUDA sources ({', '.join(SOURCES)}) are not in {here / 'csrc'} or "
                               f"{here.parent / 'csrc'}; reinstall minillm-fast from a complete source tree")


def _torch_cuda_home() -> Optional[str]:
    """The toolkit torch's extension builder compiles with (torch.utils.cpp_extension.CUDA_HOME), or None."""
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return None
    return CUDA_HOME


def find_nvcc() -> Optional[str]:
    """nvcc of the toolkit torch would build with (``CUDA_HOME``), else the one on PATH, else None."""
    for home in (_torch_cuda_home(), os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _check_toolchain() -> None:
    """Raise NativeCudaBuildError unless torch, the device and the toolchain allow a CUDA build."""
    from torch.utils.cpp_extension import is_ninja_available

    if torch.version.cuda is None:
        raise NativeCudaBuildError(
            f"the native CUDA kernels need a CUDA build of torch, but this one ({torch.__version__}) is CPU-only "
            "(torch.version.cuda is None): install a CUDA wheel (https://pytorch.org/get-started/locally/); or use "
            "backend='triton' or 'torch'")
    if not torch.cuda.is_available():
        raise NativeCudaBuildError("the native CUDA kernels need a visible CUDA device, and torch.cuda.is_available() "
                                   "is False (driver missing, CUDA_VISIBLE_DEVICES empty?); use backend='torch'")
    home = _torch_cuda_home()
    if not home or not (Path(home) / "bin" / "nvcc").is_file():
        nvcc = find_nvcc()
        if nvcc is None:
            raise NativeCudaBuildError(
                f"the native CUDA kernels are compiled on first use with nvcc, which was not found: install the CUDA "
                f"toolkit {torch.version.cuda} (the version torch was built with; conda: conda install "
                f"cuda-nvcc={torch.version.cuda}) and set CUDA_HOME to it; or use backend='triton'")
        raise NativeCudaBuildError(
            f"found {nvcc}, but torch's extension builder sees no CUDA toolkit there (CUDA_HOME={home!r}): set "
            "CUDA_HOME to the toolkit's root (the folder holding bin/nvcc and include/) before starting Python")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise NativeCudaBuildError(f"the native CUDA kernels need a host C++ compiler, and {cxx!r} was not found: "
                                   "install one (Debian/Ubuntu: apt-get install g++) or point CXX at it")
    if not is_ninja_available():
        raise NativeCudaBuildError("the native CUDA kernels are compiled on first use with ninja, which was not "
                                   "found: pip install ninja; or use backend='triton'")


def extension_kwargs(root: Optional[Path] = None) -> dict:
    """Sources (under ``root``, default the source dir; setup.py passes the relative ``Path("csrc")``) and flags, for
    the JIT build below and for an ahead-of-time one:
    ``CUDAExtension(f"minillm_fast.{PREBUILT_NAME}", **extension_kwargs(Path("csrc")))``."""
    src = source_dir() if root is None else root
    return dict(sources=[str(src / s) for s in SOURCES], include_dirs=[str(src / "cuda")],
                extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)})


def _arch_list() -> str:
    """The architectures torch compiles for: ``TORCH_CUDA_ARCH_LIST``, else the visible GPUs' capabilities."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    return ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))


def build_settings() -> dict:
    return dict(_native.toolchain_settings(), cuda=torch.version.cuda, cuda_home=_torch_cuda_home(),
                arch=_arch_list(), nvcc_flags=list(NVCC_FLAGS), cxx_flags=list(CXX_FLAGS))


def build_name(src: Optional[Path] = None) -> str:
    """``minillm_fast_native_cuda_<key>``: the JIT build's module and folder name for the sources under ``src``
    (default :func:`source_dir`) with this torch, toolkit and target architectures."""
    src = source_dir() if src is None else Path(src)
    return f"{MODULE_NAME}_{_native.content_key(src, SOURCES + HEADERS, build_settings())}"


def _jit_build():
    from torch.utils.cpp_extension import load as cpp_load

    _check_toolchain()
    if _native is None:
        raise NativeCudaBuildError("native_cuda.py was loaded outside the minillm_fast package: import "
                                   "minillm_fast.native_cuda to build the extension")
    kw = extension_kwargs()
    name = folder = None

    def build():
        return cpp_load(name=name, sources=kw["sources"], extra_include_paths=kw["include_dirs"],
                        extra_cflags=kw["extra_compile_args"]["cxx"],
                        extra_cuda_cflags=kw["extra_compile_args"]["nvcc"], build_directory=str(folder),
                        verbose=False)

    try:
        name = build_name()
        folder = _native.build_dir(name)
        return _native.load_keyed(name, folder, build, "the native CUDA extension", "1-2 min",
                                  dict(build_settings(), sources=str(source_dir())))
    except Exception as e:  # compiler errors come back as RuntimeError / CalledProcessError with the log
        where = f" in {folder}" if folder else ""
        raise NativeCudaBuildError(f"building the native CUDA extension from {source_dir() / 'cuda'}{where} failed: "
                                   f"{e}\nUse backend='triton' (or 'torch') meanwhile.") from e


def _import_prebuilt():
    """``minillm_fast._native_cuda`` if an ahead-of-time build installed it (setup.py, see extension_kwargs), or
    None."""
    try:
        return importlib.import_module(f"minillm_fast.{PREBUILT_NAME}")
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def _load():
    """The extension module, or the NativeCudaBuildError saying why there is none (tried once per process)."""
    if torch.version.cuda is not None and torch.cuda.is_available():
        mod = _import_prebuilt()
        if mod is not None:
            return mod
    try:
        return _jit_build()
    except NativeCudaBuildError as e:
        return e


def load():
    """The compiled CUDA extension (building it on first use); raises NativeCudaBuildError if it cannot be had."""
    mod = _load()
    if isinstance(mod, NativeCudaBuildError):
        raise mod
    return mod


def is_available() -> bool:
    return not isinstance(_load(), NativeCudaBuildError)


def build_error() -> Optional[str]:
    mod = _load()
    return str(mod) if isinstance(mod, NativeCudaBuildError) else None


# ----------------------------------------------------------------------------------------------------------------------
# rows functions
# ----------------------------------------------------------------------------------------------------------------------
def cuda_rows(zs: torch.Tensor, zt: torch.Tensor, row_grad: Optional[torch.Tensor], cfg, grad_s: bool,
              grad_t: bool):
    """The rows function of the chunked strategy (see minillm_fast/chunked.py) in CUDA: zs, zt [C, V] float32,
    bfloat16, float16 or float64 CUDA chunk logits, overwritten in place with the gradients where asked (left alone
    otherwise). Returns loss [C], stats [C, 6] (float32; float64 for float64 logits) and dL/dzs, dL/dzt (the
    overwritten buffers, in the logits' dtype) where asked, else None."""
    args = kernel_args(cfg)
    if zs.stride(-1) != 1:
        zs = zs.contiguous()
    if zt.stride(-1) != 1:
        zt = zt.contiguous()
    loss, stats = load().divergence_rows(zs, zt, row_grad, grad_s=grad_s, grad_t=grad_t, **args)
    return loss, stats, (zs if grad_s else None), (zt if grad_t else None)


def kernel_args(cfg) -> dict:
    """The CUDA row kernel's keywords for ``cfg`` (a chunked.DivergenceConfig): its binding takes one ``temperature,
    softcap`` for both models, so the two models' scalings must be equal (ValueError otherwise)."""
    if cfg.student != cfg.teacher:
        raise ValueError(f"the CUDA row kernels take one scaling for both models; got student {cfg.student} and "
                         f"teacher {cfg.teacher} (use the 'triton' or 'torch' backend for per-model scalings)")
    a = dict(cfg.kernel_args)
    for key in ("temperature_s", "softcap_s", "temperature_t", "softcap_t"):
        a.pop(key)
    return dict(a, temperature=cfg.student.temperature, softcap=cfg.student.softcap)


def cuda_mixture_sample_rows(zs: torch.Tensor, zt: Optional[torch.Tensor], seed: torch.Tensor, row_offset: int, *,
                             alpha: float, temperature: float = 1.0, softcap: float = 0.0):
    """One token per row of the CUDA chunk logits from ``alpha softmax(zt / T) + (1 - alpha) softmax(zs / T)`` (from
    the student alone when zt is None). seed: [1] int64 on the device (the Philox key; no host sync); row_offset:
    global index of the chunk's first row (draws do not depend on the chunking). Returns tokens [C] int64 and
    log q(y), log p(y), log m(y) [C] (the last two empty without a teacher). The logits are not modified."""
    return load().mixture_sample_rows(zs.contiguous(), None if zt is None else zt.contiguous(), seed, row_offset,
                                      alpha, temperature, softcap)


def cuda_rollout_statistics_rows(zs: torch.Tensor, zt: torch.Tensor, tokens: torch.Tensor, *,
                                 temperature: float = 1.0, softcap: float = 0.0):
    """log q(y), log p(y) of tokens [C] (ids in [0, V), validated by the caller) and KL(q || p) over the vocabulary,
    from CUDA chunk logits zs, zt [C, V]; each [C]."""
    return load().rollout_statistics_rows(zs.contiguous(), zt.contiguous(), tokens, temperature, softcap)
