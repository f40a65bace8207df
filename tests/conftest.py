"""Test configuration shared by the whole suite.

* Without CUDA, Triton kernels run on CPU tensors under the interpreter: ``TRITON_INTERPRET=1`` must be set before
  triton (and so minillm_fast's kernels) is imported, which is why it is the first thing this file does.
* ``impl`` is parametrised over every (backend, strategy) pair that can run on this machine, found by asking
  ``minillm_fast.dispatch.resolve`` (a backend added later, such as ``native``, is picked up when it resolves).
* Every test runs with ``torch.empty`` / ``torch.empty_like`` / ``Tensor.new_empty`` returning NaN-filled floating
  point tensors, so an output element that a kernel forgets to write shows up as NaN.
* ``@pytest.mark.gpu`` tests are skipped at setup (not at import) when CUDA is unavailable.
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import zlib  # noqa: E402

import pytest  # noqa: E402

from helpers import DEVICE, IMPL_IDS, IMPLS  # noqa: E402  (imports minillm_fast, after the line above)


@pytest.fixture(params=IMPLS, ids=IMPL_IDS)
def impl(request) -> tuple[str, str]:
    """One (backend, strategy) pair available on this machine."""
    return request.param


@pytest.fixture
def backends() -> list[tuple[str, str]]:
    """All (backend, strategy) pairs available on this machine, for tests that loop over them."""
    return list(IMPLS)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test id: every test gets fresh inputs, and a failure reproduces.
    ``MINILLM_FAST_TEST_SEED=<int>`` shifts every seed (to look for inputs that a tolerance only just covers)."""
    salt = int(os.environ.get("MINILLM_FAST_TEST_SEED", "0"))
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ salt)


@pytest.fixture
def single_thread():
    """One intra-op thread for the test (restored after): the suite's tensors are tiny, and on a small shared
    machine OpenMP threads spin-waiting for cores make each op ~5x slower. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("single_thread")`` (multi-threaded kernels keep their own tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------------------
# NaN poisoning
# ----------------------------------------------------------------------------------------------------------------------
def _poison(t):
    if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.numel() > 0:
        with torch.no_grad():
            t.fill_(float("nan"))
    return t


def _torch_internal(depth: int = 2) -> bool:
    """Whether the caller of the patched function is PyTorch's own Python (torch/_meta_registrations.py, _refs,
    _decomp, _prims...). There the allocation is an implementation detail, not memory a kernel forgot to write:
    under a ``with torch.device(...)`` context ``torch.zeros`` goes through ``meta_zeros``, which is built on
    ``torch.empty``. Poisoned, it changed zeros that transformers creates, and with them the models' numbers: a
    teacher-cache test saw a 1e-3 mismatch between a live run and a cached one that was not in the code tested."""
    filename = sys._getframe(depth).f_code.co_filename.replace(os.sep, "/")
    return "/torch/_" in filename


@pytest.fixture(autouse=True)
def nan_poisoning(monkeypatch):
    """Uninitialised float memory is NaN for the duration of each test (allocations by PyTorch's own Python
    decompositions excepted, see ``_torch_internal``)."""
    orig_empty, orig_empty_like, orig_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def empty(*args, **kwargs):
        t = orig_empty(*args, **kwargs)
        return t if _torch_internal() else _poison(t)

    def empty_like(*args, **kwargs):
        t = orig_empty_like(*args, **kwargs)
        return t if _torch_internal() else _poison(t)

    def new_empty(self, *args, **kwargs):
        t = orig_new_empty(self, *args, **kwargs)
        return t if _torch_internal() else _poison(t)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    yield


# ----------------------------------------------------------------------------------------------------------------------
# markers
# ----------------------------------------------------------------------------------------------------------------------
def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
