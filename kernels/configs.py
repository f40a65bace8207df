"""Launch configurations of the Triton kernels, per GPU architecture and dot precision.

Every launcher asks :func:`launch_config` for its tile sizes, ``num_warps`` and ``num_stages``; nothing else in
kernels/ picks a number. The architecture comes from the tensors' device (:func:`device_arch`), so that the compile
check (kernels/compile_check.py) can capture, on fake CUDA tensors and without a GPU, exactly the launches a real
sm_80 / sm_90 / gfx942 device would get: it swaps :func:`device_arch` for one that names the target.

Why the numbers are what they are is written beside each table entry; the resource table they produce (registers,
spills, shared memory, blocks per SM) is ``python -m minillm_fast.kernels.compile_check --matrix full``, committed
under bench/results/.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Arch:
    """What a launcher needs to know about the device.

    name: ``sm_90``, ``sm_80``, ``sm_89``, ``gfx942``, ... or ``interpreter`` (CPU tensors under TRITON_INTERPRET).
    family: the configuration table it takes (``sm_90``, ``sm_80``, ``small_smem``, ``cdna``, ``interpreter``).
    sm_count: multiprocessors (CUs on AMD), for the vocabulary splits of the one-pass kernels.
    max_shared: shared memory (LDS) a block may use, bytes.
    """

    name: str
    family: str
    sm_count: int
    max_shared: int


INTERPRETER = Arch("interpreter", "interpreter", sm_count=1, max_shared=1 << 30)

# Shared memory a block may opt in to, bytes (CUDA programming guide, "Technical specifications per compute
# capability"; MI300X: 64 KiB of LDS per workgroup), used where torch does not report it.
_MAX_SHARED = {"sm_80": 166912, "sm_87": 166912, "sm_90": 232448, "sm_100": 232448, "gfx942": 65536, "gfx90a": 65536}
_SMALL_SHARED = 101376  # sm_86, sm_89, sm_120: 99 KiB


def _family(name: str, max_shared: int) -> str:
    if name.startswith("gfx"):
        return "cdna"
    major = int(name[3:-1])
    if major >= 9 and max_shared >= _MAX_SHARED["sm_90"]:
        return "sm_90"
    if max_shared >= _MAX_SHARED["sm_80"]:
        return "sm_80"
    return "small_smem"


def make_arch(name: str, sm_count: int, max_shared: int = 0) -> Arch:
    """An :class:`Arch` from its name (``sm_90``, ``gfx942``), with the shared-memory limit of that name unless
    given."""
    max_shared = max_shared or _MAX_SHARED.get(name, _SMALL_SHARED)
    return Arch(name, _family(name, max_shared), sm_count, max_shared)


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> Arch:
    props = torch.cuda.get_device_properties(index)
    if torch.version.hip is not None:
        name = props.gcnArchName.split(":")[0]
    else:
        name = f"sm_{props.major}{props.minor}"
    return make_arch(name, props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", 0))


def device_arch(device: torch.device) -> Arch:
    """The architecture of ``device``: a CUDA (or ROCm) GPU, else the interpreter."""
    if device.type != "cuda":
        return INTERPRETER
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class Tiles:
    """One launch configuration: block sizes (rows, vocabulary entries, hidden columns), warps and pipeline
    stages."""

    block_n: int
    block_v: int
    block_h: int = 0  # kernels without a dot (the row kernel) have none
    num_warps: int = 4
    num_stages: int = 3

    def kwargs(self) -> dict:
        """The launch's keyword arguments (the interpreter takes no warps or stages)."""
        out = dict(BLOCK_N=self.block_n, BLOCK_V=self.block_v)
        if self.block_h:
            out["BLOCK_H"] = self.block_h
        return out

    def options(self, arch: Arch) -> dict:
        return {} if arch is INTERPRETER else dict(num_warps=self.num_warps, num_stages=self.num_stages)


# The kernels, by the name their launchers ask with: the vocab-tiled fused divergence's forward and backward, the
# chunked strategy's row kernel, the one-pass split forward of token log-probs and rollout statistics, the sampler
# (the same sweep plus Philox and the running best draw), and the token log-probs' backward.
KERNELS = ("tiled_fwd", "tiled_bwd", "rows", "split_fwd", "sample", "logprobs_bwd")
PRECISIONS = ("half", "fp32", "tf32")  # bf16/fp16 operands; IEEE fp32 dots; fp32 operands in TF32


def _t(bn, bv, bh=0, w=4, s=3):
    return Tiles(bn, bv, bh, num_warps=w, num_stages=s)


# How the numbers were chosen. Each entry is the largest tile, among a few candidates, that compiles with no spills
# on that family's reference target for the heaviest flags (jsd / skew KLs with softcap, biases and every gradient;
# python -m minillm_fast.kernels.compile_check --matrix full), with at least 2 blocks per SM where one exists, and
# within every member's shared memory (sm_80's table also fits the 99 KiB of sm_86 / sm_89 / sm_120). Rules of
# thumb that came out of it:
# * IEEE fp32 dots are FMA loops whose operands live in registers: half the tile of a bf16 dot, or 8 warps.
# * A 4-warp block may use 255 registers and still leave room for 2 blocks per SM; an 8-warp block needs <= 128.
# * The backward kernels hold two logits tiles, G and a gradient product at once: smaller vocabulary tiles and
#   2 pipeline stages (their second loop reads W and h once per tile; deeper pipelines only cost shared memory).
# * The row kernel (no dot) is memory-bound: one row per program, 1024-entry tiles, 4 warps: 8 floats per thread
#   per load, ~60 registers, 9+ blocks per SM to keep loads in flight (the old 4 x 2048 tile spilled 3.5 KB with
#   softcap and both gradients).
# * ptxas often caps a kernel at 128 (8 warps) or 168 (4 warps) registers to keep 2 or 3 blocks resident, and spills
#   past the cap: the entries are what compiled clean, not a formula (a mixed bf16 student / fp32 teacher takes the
#   fp32 entry, and its register use differs again).
# * CDNA (gfx942) has 64 KiB of LDS per workgroup and 512 VGPRs per lane; its reported SGPR spills go to VGPR lanes,
#   not memory.
_SM90 = {
    "tiled_fwd": {"half": _t(64, 64, 64), "fp32": _t(32, 64, 32), "tf32": _t(64, 64, 32)},
    "tiled_bwd": {"half": _t(32, 64, 32, s=2), "fp32": _t(32, 32, 32, s=2), "tf32": _t(32, 64, 32, w=8, s=2)},
    "rows": _t(1, 1024),
    "split_fwd": {"half": _t(64, 64, 32), "fp32": _t(32, 64, 32, w=8, s=2), "tf32": _t(32, 64, 32, w=8)},
    "sample": {"half": _t(64, 64, 32, w=8), "fp32": _t(32, 32, 32, s=2), "tf32": _t(32, 64, 32, w=8)},
    "logprobs_bwd": {"half": _t(64, 64, 32), "fp32": _t(32, 64, 32, w=8, s=2), "tf32": _t(32, 64, 32, s=2)},
}
_SM80 = {
    "tiled_fwd": {"half": _t(32, 64, 64, w=8), "fp32": _t(32, 64, 32, w=8), "tf32": _t(32, 64, 32, w=8)},
    "tiled_bwd": {"half": _t(32, 64, 32, s=2), "fp32": _t(32, 32, 16, s=2), "tf32": _t(32, 32, 32, s=2)},
    "rows": _t(1, 1024),
    "split_fwd": {"half": _t(64, 64, 32), "fp32": _t(32, 64, 32, w=8, s=2), "tf32": _t(32, 64, 32, w=8)},
    "sample": {"half": _t(64, 64, 32, w=8), "fp32": _t(32, 32, 32, w=8), "tf32": _t(32, 64, 32, w=8)},
    "logprobs_bwd": {"half": _t(64, 64, 32), "fp32": _t(32, 32, 32, s=2), "tf32": _t(32, 64, 32, s=2)},
}
_CDNA = {
    "tiled_fwd": {"half": _t(32, 64, 64), "fp32": _t(32, 64, 32), "tf32": _t(32, 64, 32)},
    "tiled_bwd": {"half": _t(64, 64, 32), "fp32": _t(32, 32, 32, s=2), "tf32": _t(32, 32, 32, s=2)},
    "rows": _t(1, 1024),
    "split_fwd": {"half": _t(64, 64, 32), "fp32": _t(64, 64, 32), "tf32": _t(64, 64, 32)},
    "sample": {"half": _t(64, 64, 32), "fp32": _t(64, 64, 32), "tf32": _t(64, 64, 32)},
    "logprobs_bwd": {"half": _t(64, 64, 32), "fp32": _t(32, 64, 32, s=2), "tf32": _t(32, 64, 32, s=2)},
}
_TABLE = {
    # Under the interpreter, tiles small enough that the tests' awkward sizes straddle tile edges; the
    # interpreter's cost is per program and per op, so large row counts take large row blocks (split_config).
    "interpreter": {
        "tiled_fwd": _t(16, 64, 32), "tiled_bwd": _t(16, 64, 32), "rows": _t(8, 256),
        "split_fwd": _t(16, 64, 32), "sample": _t(16, 64, 32), "logprobs_bwd": _t(16, 64, 32),
    },
    "sm_90": _SM90,
    "sm_80": _SM80,
    "small_smem": _SM80,
    "cdna": _CDNA,
}


def precision_class(*dtypes: torch.dtype, allow_tf32: bool = False) -> str:
    """The class of the widest dot among ``dtypes``: fp32 operands make it ``fp32`` (or ``tf32`` when allowed)."""
    if any(d == torch.float32 for d in dtypes):
        return "tf32" if allow_tf32 else "fp32"
    return "half"


def launch_config(kernel: str, arch: Arch, precision: str = "half") -> Tiles:
    """The configuration of ``kernel`` (one of KERNELS) on ``arch`` for dots of ``precision`` (one of PRECISIONS)."""
    entry = _TABLE[arch.family][kernel]
    return entry[precision] if isinstance(entry, dict) else entry


# ----------------------------------------------------------------------------------------------------------------------
# what the launchers ask
# ----------------------------------------------------------------------------------------------------------------------
def allow_tf32() -> bool:
    return os.environ.get("MINILLM_FAST_ALLOW_TF32") == "1"


def tile_config(device: torch.device, kernel: str, *dtypes: torch.dtype) -> dict:
    """The launch keywords (block sizes, ``num_warps``, ``num_stages``) of ``kernel`` on ``device`` for operands of
    ``dtypes``."""
    arch = device_arch(device)
    tiles = launch_config(kernel, arch, precision_class(*dtypes, allow_tf32=allow_tf32()))
    return {**tiles.kwargs(), **tiles.options(arch)}


def dot_precision(dtype: torch.dtype) -> Optional[str]:
    """``input_precision`` of the dots over one model's operands: IEEE for fp32 unless MINILLM_FAST_ALLOW_TF32=1
    (tf32 costs ~1e-3 relative error in the logits, far outside the fp32 error budget); Triton's default for bf16 /
    fp16. Each model's dots follow that model's dtype (a bf16 student does not put an fp32 teacher in tf32)."""
    if dtype == torch.float32 and not allow_tf32():
        return "ieee"
    return None


def check_supported(*tensors: Optional[torch.Tensor]) -> None:
    """Raise unless every tensor can go to a kernel: fp32 / bf16 / fp16, on a GPU or under the interpreter."""
    for t in tensors:
        if t is None:
            continue
        if t.dtype == torch.float64:
            raise TypeError("the triton backend takes float32, bfloat16 or float16 inputs, got float64; "
                            "use backend='torch' for float64")
        if device_arch(t.device) is INTERPRETER and not INTERPRET:
            raise RuntimeError(f"the triton backend needs CUDA tensors (got {t.device}); set TRITON_INTERPRET=1 "
                               "before importing minillm_fast to run it on the CPU (slow, for tests)")


def rowmajor(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` with a contiguous last dimension (the kernels take one row stride)."""
    return None if t is None else (t if t.stride(-1) == 1 else t.contiguous())


def interpreter_safe(*tensors: Optional[torch.Tensor]) -> tuple:
    """The tensors, with bf16 ones upcast to fp32 when they run under the interpreter (unchanged on a GPU).

    Triton's interpreter (3.x) gets ``tl.dot`` of bf16 operands wrong: it multiplies the raw 16-bit patterns
    (logits ~1e10). The upcast is exact and a GPU's bf16 dot also forms exact products accumulated in fp32, so the
    interpreter still computes what the GPU does, up to accumulation order.
    """
    return tuple(t.float() if t is not None and t.dtype == torch.bfloat16 and device_arch(t.device) is INTERPRETER
                 else t for t in tensors)


def scaling_args(inv_temp: tuple, softcap: tuple) -> tuple:
    """The two-model kernels' ``inv_temp_s, softcap_s, inv_temp_t, softcap_t`` from (student, teacher) pairs
    (softcap 0: none), and their constexpr flags ``SOFTCAP_S``, ``SOFTCAP_T``."""
    (it_s, it_t), (cap_s, cap_t) = inv_temp, softcap
    return (float(it_s), float(cap_s), float(it_t), float(cap_t)), dict(SOFTCAP_S=cap_s > 0, SOFTCAP_T=cap_t > 0)
