"""Backend choice: ``backend=`` argument > ``MINILLM_FAST_BACKEND`` > automatic per device.

| backend  | runs on                                    | what it is                                                 |
| -------- | ------------------------------------------ | ---------------------------------------------------------- |
| triton   | CUDA tensors; CPU with TRITON_INTERPRET=1  | fused Triton kernels (kernels/)                            |
| native   | CPU tensors (1)                            | the csrc/ C++ extension, compiled on first use (native.py) |
| torch    | any device                                 | chunked pure PyTorch: memory bounded by the chunk          |

(1) The CUDA row kernels of csrc/cuda (minillm_fast/native_cuda.py) compile, but have not run on a GPU yet, so
``native`` does not dispatch to them.

``auto`` picks triton for CUDA tensors when Triton is importable, else torch; CPU tensors get native (its rows function
is ~10x faster than torch's; end to end, forward + backward of the reverse KL at N=512, H=256, V=8192 fp32, it
measured 1.15x the matmul floor against torch's 1.9-2.2x), and torch, with a one-time warning, where the extension
cannot be built. The token log-prob and rollout ops follow that choice for the ops listed in
``minillm_fast.ops.token_logprobs.NATIVE_AUTO_OPS`` (all of them: each measured faster on native than on torch).
A backend asked for by name that cannot run raises an error saying why and what to install or set.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "native", "torch")
ENV_VAR = "MINILLM_FAST_BACKEND"


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    """The kernels package, or the ImportError explaining why it cannot be loaded."""
    try:
        return importlib.import_module("minillm_fast.kernels.fused_divergence")
    except ImportError as e:  # triton missing or broken
        return e


def _interpreting() -> bool:
    """Whether the Triton kernels run under TRITON_INTERPRET (read when they were first imported)."""
    return importlib.import_module("minillm_fast.kernels.configs").INTERPRET


def triton_available(device: torch.device) -> bool:
    mod = _triton_kernels()
    if isinstance(mod, ImportError):
        return False
    return device.type == "cuda" or _interpreting()


def resolve(backend: str, device: torch.device) -> str:
    """Name the backend that will run an op on ``device``; raises if a named one cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; expected one of {BACKENDS}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r} is not a backend; expected one of {BACKENDS}")
        backend = env
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if triton_available(device) else "torch"
        return "native" if device.type == "cpu" and _native_for_auto() else "torch"
    if backend == "triton":
        mod = _triton_kernels()
        if isinstance(mod, ImportError):
            raise RuntimeError(f"backend='triton' needs Triton (pip install triton): {mod}")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors, got {device}; set TRITON_INTERPRET=1 before importing "
                "minillm_fast to run the kernels on the CPU (slow, meant for tests), or use backend='torch'"
            )
    if backend == "native":
        _check_native(device)
    return backend


def native_available(device: torch.device) -> bool:
    """Whether the native extension runs on ``device`` (CPU only so far; building it on first call)."""
    if device.type != "cpu":
        return False
    from . import native

    return native.is_available()


@functools.lru_cache(maxsize=None)
def _native_for_auto() -> bool:
    """native for ``auto`` on CPU; if it cannot be built, say so once and let torch run."""
    from . import native

    if native.is_available():
        return True
    warnings.warn(f"minillm-fast: backend='auto' falls back to 'torch' on CPU: {native.build_error()} "
                  f"(set {ENV_VAR}=torch to choose it explicitly)", RuntimeWarning, stacklevel=3)
    return False


def _check_native(device: torch.device) -> None:
    if device.type != "cpu":
        raise RuntimeError(f"backend='native' runs on CPU tensors only so far (its CUDA row kernels, csrc/cuda and "
                           f"minillm_fast/native_cuda.py, compile but have not run on a GPU yet, so they are not "
                           f"dispatched to), got {device}; use backend='triton' (or 'torch') there")
    from . import native

    if not native.is_available():
        raise RuntimeError(f"backend='native' is not available: {native.build_error()}")


def triton_kernels():
    mod = _triton_kernels()
    if isinstance(mod, ImportError):
        raise RuntimeError(f"Triton is not importable: {mod}")
    return mod
