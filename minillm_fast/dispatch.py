"""Which implementation runs an op: one table and one :func:`resolve`.

| backend  | runs on                                   | implementations                                           |
| -------- | ----------------------------------------- | --------------------------------------------------------- |
| triton   | CUDA tensors; CPU with TRITON_INTERPRET=1 | minillm_fast/backends/triton.py (the kernels of kernels/) |
| native   | CPU tensors (1)                           | minillm_fast/backends/native.py (the C++ of csrc/)        |
| torch    | any device                                | minillm_fast/backends/torch.py (plain PyTorch)            |

The choice: the ``backend=`` argument, else ``MINILLM_FAST_BACKEND``, else automatic per device: triton for CUDA
tensors, native for CPU tensors; where that backend cannot run (Triton not importable, no C++ compiler), torch, with
one warning that says why. A backend asked for by name that cannot run raises an error saying why and what to
install or set. Every public op calls :func:`resolve` once and its custom op calls :func:`implementation` once.

The table: each backend module exports ``OPS = {op: function}`` with one signature per op, so
``TABLE[op][backend]`` is ``backends.<backend>.OPS[op]``, imported on first use (the triton module imports the
kernels, and so Triton itself; the native module builds the extension only when called).

| op | what it computes |
| --- | --- |
| ``fused_divergence`` | per-row divergence and statistics, gradients where asked (``chunked.run``'s signature) |
| ``fused_divergence_tiled`` | the same by vocabulary tiles (triton only: ``strategy="tiled"``) |
| ``token_logprobs_fwd`` / ``token_logprobs_bwd`` | log q(y), softmax statistics, entropy; their gradients |
| ``rollout_statistics`` | log q(y), log p(y), KL(q || p) |
| ``mixture_sample`` | one draw per row from alpha p + (1 - alpha) q (q alone without a teacher) |
| ``sparse_divergence`` | a student against stored top-k outcomes, one sweep with its gradients (torch, native) |

(1) The CUDA row kernels of csrc/cuda (minillm_fast/native_cuda.py) compile and pass their host-emulation tests, but
have not run on a GPU yet, so ``native`` does not route CUDA tensors to them: this is the one place that says so.

Hops from a public function to the code that does the arithmetic (each arrow a call), per backend:

    fused_divergence (chunked)  -> custom op -> chunked.run -> rows function (torch: PyTorch; native: C++ torch.library op;
                                                                               triton: launcher -> row kernel)
    fused_divergence (tiled)    -> custom op -> backends.triton.fused_divergence_tiled -> launcher -> kernels
    token_logprobs              -> custom op -> backend function (torch: PyTorch; native: chunk loop -> C++;
                                                                  triton: launcher -> kernel)
    rollout_statistics, mixture_sample, sample_tokens: as token_logprobs
    sparse_divergence (torch, native) -> chunked.sparse_run -> row functions (torch: PyTorch; native: C++ op)

so at most four (triton chunked and tiled, native chunked); docs/design.md section 8 has the list.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Callable

import torch

BACKENDS = ("triton", "native", "torch")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "MINILLM_FAST_BACKEND"
OPS = ("fused_divergence", "fused_divergence_tiled", "token_logprobs_fwd", "token_logprobs_bwd",
       "rollout_statistics", "mixture_sample", "sparse_divergence")


# ----------------------------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _backend_module(backend: str):
    return importlib.import_module(f"minillm_fast.backends.{backend}")


def implementation(op: str, backend: str) -> Callable:
    """``TABLE[op][backend]``: the function of ``backend`` that computes ``op`` (a resolved backend name)."""
    table = _backend_module(backend).OPS
    if op not in table:
        have = [b for b in BACKENDS if op in _backend_module(b).OPS] if op in OPS else []
        raise ValueError(f"the {backend} backend has no {op!r} (ops: {', '.join(OPS)}; {op!r} runs on: "
                         f"{', '.join(have) or 'none'})")
    return table[op]


def provides(op: str, backend: str) -> bool:
    """Whether ``backend`` (a resolved name) has an implementation of ``op``."""
    return op in _backend_module(backend).OPS


# ----------------------------------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _triton_import_error():
    """None when the Triton backend imports, else the ImportError explaining why it cannot."""
    try:
        _backend_module("triton")
    except ImportError as e:  # triton missing or broken
        return e
    return None


def _interpreting() -> bool:
    """Whether the Triton kernels run under TRITON_INTERPRET (read when they were first imported)."""
    return importlib.import_module("minillm_fast.kernels.configs").INTERPRET


def triton_available(device: torch.device) -> bool:
    return _triton_import_error() is None and (device.type == "cuda" or _interpreting())


def native_available(device: torch.device) -> bool:
    """Whether the native extension runs on ``device`` (CPU only so far; building it on first call)."""
    if device.type != "cpu":
        return False
    from . import native

    return native.is_available()


@functools.lru_cache(maxsize=None)
def _triton_for_auto() -> bool:
    """triton for ``auto`` on CUDA; if its kernels cannot be imported, say why once and let torch run."""
    err = _triton_import_error()
    if err is None:
        return True
    warnings.warn(f"minillm-fast: backend='auto' falls back to 'torch' on CUDA because the Triton kernels cannot be "
                  f"imported ({type(err).__name__}: {err}); pip install triton, or set {ENV_VAR}=torch to choose "
                  "torch explicitly", RuntimeWarning, stacklevel=3)
    return False


@functools.lru_cache(maxsize=None)
def _native_for_auto() -> bool:
    """native for ``auto`` on CPU; if it cannot be built, say so once and let torch run."""
    from . import native

    if native.is_available():
        return True
    warnings.warn(f"minillm-fast: backend='auto' falls back to 'torch' on CPU: {native.build_error()} "
                  f"(set {ENV_VAR}=torch to choose it explicitly)", RuntimeWarning, stacklevel=3)
    return False


# ----------------------------------------------------------------------------------------------------------------------
# the choice
# ----------------------------------------------------------------------------------------------------------------------
def resolve(backend: str, device: torch.device) -> str:
    """Name the backend that will run an op on ``device``; raises if a named one cannot."""
    if backend not in CHOICES:
        raise ValueError(f"backend={backend!r} is not supported; expected one of {CHOICES}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if env not in CHOICES:
            raise ValueError(f"{ENV_VAR}={env!r} is not a backend; expected one of {CHOICES}")
        backend = env
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if _triton_for_auto() else "torch"
        return "native" if device.type == "cpu" and _native_for_auto() else "torch"
    if backend == "triton":
        err = _triton_import_error()
        if err is not None:
            raise RuntimeError(f"backend='triton' needs Triton (pip install triton): {err}")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors, got {device}; set TRITON_INTERPRET=1 before importing "
                "minillm_fast to run the kernels on the CPU (slow, meant for tests), or use backend='torch'"
            )
    if backend == "native":
        _check_native(device)
    return backend


def _check_native(device: torch.device) -> None:
    if device.type != "cpu":
        raise RuntimeError(f"backend='native' runs on CPU tensors only so far (its CUDA row kernels, csrc/cuda and "
                           f"minillm_fast/native_cuda.py, compile but have not run on a GPU yet, so they are not "
                           f"dispatched to), got {device}; use backend='triton' (or 'torch') there")
    from . import native

    if not native.is_available():
        raise RuntimeError(f"backend='native' is not available: {native.build_error()}")
