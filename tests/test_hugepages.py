"""minillm_fast.hugepages: large CPU buffers advised to transparent huge pages (a hint; never changes results)."""
from __future__ import annotations

import pytest
import torch

from minillm_fast import hugepages


def test_empty_is_torch_empty_with_the_interior_advised(monkeypatch):
    calls = []
    monkeypatch.setattr(hugepages, "_madvise", lambda: (lambda start, length, advice: calls.append((start, length,
                                                                                                      advice)) or 0))
    t = hugepages.empty(3, 1 << 20, dtype=torch.float32, device="cpu")  # 12 MiB
    assert t.shape == (3, 1 << 20) and t.dtype == torch.float32 and t.is_contiguous()
    (start, length, advice), = calls
    assert advice == 14  # MADV_HUGEPAGE
    assert start % (2 << 20) == 0 and length % (2 << 20) == 0 and length > 0
    assert t.data_ptr() <= start and start + length <= t.data_ptr() + t.numel() * 4  # inside the buffer only
    t.fill_(1.5)  # the memory is the tensor's own and writable
    assert float(t.sum()) == 1.5 * t.numel()


@pytest.mark.parametrize("shape, dtype", [((1000,), torch.float32), ((64, 1 << 16), torch.int8)],
                         ids=["small", "below-8MiB"])
def test_small_buffers_are_not_advised(monkeypatch, shape, dtype):
    calls = []
    monkeypatch.setattr(hugepages, "_madvise", lambda: (lambda *a: calls.append(a) or 0))
    t = hugepages.empty(*shape, dtype=dtype, device="cpu")
    assert t.shape == shape and not calls


def test_without_madvise_it_is_plain_empty(monkeypatch):
    monkeypatch.setattr(hugepages, "_madvise", lambda: None)
    t = hugepages.empty(4 << 20, dtype=torch.float32, device="cpu")
    assert t.shape == (4 << 20,)


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


def test_real_madvise_accepts_the_range():
    """Where transparent huge pages are on (``madvise`` or ``always``), the real call accepts the range we compute
    (a misaligned start or a range outside the mapping would fail with EINVAL / ENOMEM), and the buffer stays usable."""
    fn = hugepages._madvise()
    if fn is None or _thp_mode() not in ("madvise", "always"):
        pytest.skip(f"no madvise here, or transparent huge pages are {_thp_mode()!r}")
    t = torch.empty(16 << 20, dtype=torch.uint8)
    start = -(-t.data_ptr() // (2 << 20)) * (2 << 20)
    end = (t.data_ptr() + t.numel()) // (2 << 20) * (2 << 20)
    assert fn(start, end - start, 14) == 0
    assert fn(start + 1, 4096, 14) == -1  # the same call on a misaligned address fails: the check above can too
    t.fill_(7)
    assert int(t[-1]) == 7
