"""Backend choice: ``backend=`` argument > ``MINILLM_FAST_BACKEND`` > automatic per device.

| backend  | runs on                                   | what it is                                              |
| -------- | ----------------------------------------- | ------------------------------------------------------- |
| triton   | CUDA tensors; CPU with TRITON_INTERPRET=1 | fused Triton kernels (kernels/)                         |
| native   | CPU (C++) and CUDA tensors                | the csrc/ extension, compiled on first use               |
| torch    | any device                                | chunked pure PyTorch: memory bounded by the chunk        |

``auto`` picks triton for CUDA tensors when Triton is importable, else torch; CPU tensors get torch (the native
backend joins ``auto`` once it exists and measures faster). A backend asked for by name that cannot run raises an
error saying why and what to install or set.
"""
from __future__ import annotations

import functools
import importlib
import os

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


def triton_available(device: torch.device) -> bool:
    mod = _triton_kernels()
    if isinstance(mod, ImportError):
        return False
    return device.type == "cuda" or mod.INTERPRET


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
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if backend == "triton":
        mod = _triton_kernels()
        if isinstance(mod, ImportError):
            raise RuntimeError(f"backend='triton' needs Triton (pip install triton): {mod}")
        if device.type != "cuda" and not mod.INTERPRET:
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors, got {device}; set TRITON_INTERPRET=1 before importing "
                "minillm_fast to run the kernels on the CPU (slow, meant for tests), or use backend='torch'"
            )
    if backend == "native":
        raise RuntimeError("backend='native' is not built in this version of minillm-fast; use 'torch' or 'triton'")
    return backend


def triton_kernels():
    mod = _triton_kernels()
    if isinstance(mod, ImportError):
        raise RuntimeError(f"Triton is not importable: {mod}")
    return mod
