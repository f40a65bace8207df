"""Ahead-of-time compile check of every Triton kernel for real GPU targets, without a GPU.

Why. ``TRITON_INTERPRET=1`` runs the kernels' semantics on the CPU, but it never lowers them: a global the compiler
refuses, a tile that needs more shared memory than a block may have, or register spills are invisible to it. This
module compiles exactly the launches the package makes, for sm_80 (A100), sm_90 (H100/H200) and gfx942 (MI300X),
with the triton wheel's own toolchain (ptxas ships with it), and reads each kernel's resources.

How. A *case* is one op call (kernel family, divergence, dtypes, rows, flags). :func:`capture` runs the package's own
launchers (kernels/*.py) on ``meta`` tensors (shapes and dtypes, no memory, no device; a CPU build of torch cannot
take views of fake CUDA tensors), with :func:`kernels.configs.device_arch` answering for the target on them (every
device decision of the launchers goes through it) and every ``@triton.jit`` kernel swapped for a recorder that keeps
its grid, arguments, constexprs, ``num_warps`` and ``num_stages``. :func:`compile_launch` specialises the
arguments the way a real launch does (Triton's own binder: an int equal to 1 becomes a constant, multiples of 16 get
a divisibility hint, pointers are taken as 16-byte aligned as the caching allocator gives them) and compiles with
``triton.compile(ASTSource(...), target=GPUTarget(...))``. Registers and spills come from the ``ptxas -v`` log on
NVIDIA and from the AMDGPU kernel descriptor on gfx942; shared memory from the compiled metadata.

A launch **fails** on a compile error or on shared memory over the target's per-block limit (the ``OutOfResources``
a real launch would raise). Spills and low occupancy are reported, not failed; the committed table
(bench/results/compile-check-<target>.md) shows them.

Usage::

    python -m minillm_fast.kernels.compile_check                   # the CI subset, every target; exit 1 on failure
    python -m minillm_fast.kernels.compile_check --matrix full --out bench/results   # whole matrix, tables per target
    python -m minillm_fast.kernels.compile_check --target sm_90 --kernel tiled_bwd --jobs 2

Run it without ``TRITON_INTERPRET=1`` (under the interpreter ``@triton.jit`` makes interpreter functions, which do not
compile); it refuses to start otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Optional

# ----------------------------------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A compile target: Triton's (backend, arch, warp size), the per-block shared-memory limit, the register file
    and the multiprocessor count of its reference device (for the vocabulary splits the launchers size by it)."""

    name: str
    backend: str
    arch: object
    warp_size: int
    max_shared: int     # bytes a block may use (OutOfResources above it)
    regs_per_sm: int    # 32-bit registers per SM (NVIDIA); VGPRs per SIMD lane (AMD)
    max_threads_sm: int  # resident threads per SM / waves x 64 per CU
    sm_count: int

    def gpu_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.arch, self.warp_size)


TARGETS = {
    # CUDA C programming guide, compute capability tables: 64K registers and 2048 threads per SM on both.
    "sm_80": Target("sm_80", "cuda", 80, 32, 166912, 65536, 2048, 108),   # A100
    "sm_90": Target("sm_90", "cuda", 90, 32, 232448, 65536, 2048, 132),   # H100 SXM / H200
    # CDNA3: 64 KiB LDS per workgroup; 512 VGPRs per lane of a SIMD (shared with AGPRs), 8 waves per SIMD at most.
    "gfx942": Target("gfx942", "hip", "gfx942", 64, 65536, 512, 2048, 304),  # MI300X
}

# ----------------------------------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------------------------------
OPS = ("tiled", "chunked", "token_logprobs", "rollout_statistics", "mixture_sample", "sample_tokens")
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
# (student dtype, teacher dtype, TF32 allowed)
DTYPES = {
    "bf16": ("bfloat16", "bfloat16", False),
    "fp16": ("float16", "float16", False),
    "fp32": ("float32", "float32", False),
    "tf32": ("float32", "float32", True),
    "bf16-fp32": ("bfloat16", "float32", False),  # a bf16 student with an fp32 teacher
}
# Rows a launcher specialises on: one (a decode step; the int 1 becomes a constant), a few, many (a training batch).
ROWS = {"one": 1, "few": 7, "many": 4096}
# Llama-3-like heads (the shapes): V=128256, Hs=2048, Ht=4096.
SHAPE = dict(vocab=128256, hs=2048, ht=4096)
# Which models soft-cap their logits (each model has its own softcap, hence its own constexpr flag).
SOFTCAPS = ("both", "student", "teacher")
# Gradient sets of the fused divergence: the student's hidden + head (training), + its bias, every input, none.
GRADS = {"student": (1, 1, 0, 0, 0, 0), "student+bias": (1, 1, 1, 0, 0, 0), "all": (1, 1, 1, 1, 1, 1),
         "hidden": (1, 0, 0, 0, 0, 0), "none": (0, 0, 0, 0, 0, 0)}


@dataclass(frozen=True)
class Case:
    """One op call whose launches are captured. Fields that an op does not use are ignored by it."""

    op: str
    divergence: str = "reverse_kl"
    dtype: str = "bf16"
    rows: str = "many"
    softcap: str = ""       # which models soft-cap their logits: "" (none), "both", "student" or "teacher"
    bias: bool = False
    entropy: bool = False   # token_logprobs
    grads: str = "student"  # tiled and chunked fused divergence

    @property
    def id(self) -> str:
        parts = [self.op]
        if self.op in ("tiled", "chunked"):
            parts += [self.divergence, f"grads={self.grads}"]
        parts += [self.dtype, f"rows={self.rows}"]
        parts += [f"softcap={self.softcap}"] if self.softcap else []
        parts += [flag for flag, on in (("bias", self.bias), ("entropy", self.entropy)) if on]
        return "-".join(parts)


def ci_matrix() -> list[Case]:
    """A representative subset (every kernel on its default paths, the risky flags once each): a few minutes."""
    return [
        Case("tiled", "reverse_kl", "bf16"),
        Case("tiled", "jsd", "fp32", softcap="both", bias=True, grads="all"),
        Case("tiled", "skew_reverse_kl", "tf32", rows="one"),
        Case("chunked", "reverse_kl", "bf16"),
        Case("chunked", "skew_forward_kl", "fp32", softcap="both", grads="all"),
        Case("token_logprobs", dtype="bf16", entropy=True, bias=True),
        Case("token_logprobs", dtype="tf32", softcap="both", rows="few"),
        Case("rollout_statistics", dtype="bf16-fp32", rows="few", softcap="teacher"),
        Case("mixture_sample", dtype="bf16", rows="one", softcap="student"),
        Case("sample_tokens", dtype="fp32", rows="few", bias=True),
    ]


def full_matrix() -> list[Case]:
    """Every kernel x every divergence x every dtype; every specialisation the launchers make (rows, softcap,
    biases, entropy, each gradient set) x every dtype, one at a time and all together (the register-heaviest
    combination); duplicates compile once. (The full cross product, ~1000 distinct compiles per target, adds
    nothing: the flags act on separate code, and the heaviest combination bounds the others' resources.)"""
    cases: list[Case] = []
    for op in ("tiled", "chunked"):
        for div, dt in itertools.product(DIVERGENCES, DTYPES):
            cases.append(Case(op, div, dt))
            cases.append(Case(op, div, dt, softcap="both", bias=True, grads="all"))
        for div, dt in itertools.product(("reverse_kl", "jsd"), DTYPES):
            cases += [Case(op, div, dt, rows=rows) for rows in ROWS]
            cases += [Case(op, div, dt, softcap=cap, grads="all") for cap in SOFTCAPS]
            cases += [Case(op, div, dt, bias=True)]
            cases += [Case(op, div, dt, grads=grads) for grads in GRADS]
            cases += [Case(op, div, dt, rows=rows, softcap="both", bias=True, grads="all") for rows in ROWS]
    for op in ("token_logprobs", "rollout_statistics", "mixture_sample", "sample_tokens"):
        entropy = op == "token_logprobs"
        two_models = op in ("rollout_statistics", "mixture_sample")
        for dt, rows in itertools.product(DTYPES, ROWS):
            cases.append(Case(op, dtype=dt, rows=rows))
            cases.append(Case(op, dtype=dt, rows=rows, softcap="both", bias=True, entropy=entropy))
        for dt in DTYPES:
            cases += [Case(op, dtype=dt, softcap=cap) for cap in (SOFTCAPS if two_models else ("both",))]
            cases += [Case(op, dtype=dt, bias=True)]
            cases += [Case(op, dtype=dt, entropy=True)] if entropy else []
    return list(dict.fromkeys(cases))


# ----------------------------------------------------------------------------------------------------------------------
# capture: the launchers on fake CUDA tensors
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pointer:
    """A tensor argument as Triton's binder sees it: a dtype and a 16-byte aligned address (no ``ptr_range``, as
    torch tensors have none)."""

    dtype: object

    @staticmethod
    def data_ptr() -> int:
        return 0


@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""

    module: str
    kernel: str
    grid: tuple
    args: tuple
    kwargs: dict
    cases: list = field(default_factory=list)

    def key(self) -> tuple:
        """What the compiled binary depends on: the kernel, each constexpr's value, the launch options, and how the
        other arguments specialise."""
        import importlib

        params = getattr(importlib.import_module(self.module), self.kernel).params
        constexpr = {p.name for p in params if p.is_constexpr}
        args = tuple(a if p.is_constexpr else _spec(a) for p, a in zip(params, self.args))
        kwargs = tuple(sorted((k, v if (k in constexpr or k not in {p.name for p in params}) else _spec(v))
                              for k, v in self.kwargs.items()))
        return (self.module, self.kernel, args, kwargs)


def _spec(a):
    """A runtime argument reduced to what Triton specialises on: pointers by dtype; ints by being 1 (made a
    constant), a multiple of 16 (a divisibility hint) and 64-bit or not; floats and None as such."""
    if isinstance(a, Pointer):
        return ("ptr", str(a.dtype))
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return ("int", 1 if a == 1 else (16 if a % 16 == 0 else 0), abs(a) >= 2 ** 31)
    if isinstance(a, float):
        return ("float",)
    return a


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel in its module: ``kernel[grid](...)`` records instead of launching."""

    def __init__(self, module: str, name: str, out: list):
        self.module, self.name, self.out = module, name, out

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            import torch

            conv = tuple(Pointer(a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
            self.out.append(Launch(self.module, self.name, tuple(int(g) for g in grid), conv, dict(kwargs)))

        return record


KERNEL_MODULES = ("minillm_fast.kernels.fused_divergence", "minillm_fast.kernels.token_logprobs",
                  "minillm_fast.kernels.sampling")


@contextlib.contextmanager
def _recording(target: Target):
    """Swap every kernel of KERNEL_MODULES for a recorder and ``configs.device_arch`` for ``target``."""
    import importlib

    from triton.runtime.jit import JITFunction

    from minillm_fast.kernels import configs

    launches: list[Launch] = []
    saved = []
    arch = configs.make_arch(target.name, target.sm_count, target.max_shared)
    for modname in KERNEL_MODULES:
        mod = importlib.import_module(modname)
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(modname, name, launches))
    saved.append((configs, "device_arch", configs.device_arch))
    configs.device_arch = lambda device: arch if device.type in ("cuda", "meta") else configs.INTERPRETER
    try:
        yield launches
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def _run_case(case: Case) -> None:
    """Call the launchers of ``case`` as the ops do, on meta tensors."""
    import torch

    from minillm_fast import chunked, divergences
    from minillm_fast.backends import triton as triton_backend
    from minillm_fast.kernels import fused_divergence as kfd
    from minillm_fast.kernels import sampling as ksa
    from minillm_fast.kernels import token_logprobs as ktl
    from minillm_fast.chunked import default_chunk_rows
    from minillm_fast.scaling import Scaling

    s_dt, t_dt, tf32 = DTYPES[case.dtype]
    s_dt, t_dt = getattr(torch, s_dt), getattr(torch, t_dt)
    n, v = ROWS[case.rows], SHAPE["vocab"]
    dev = "meta"
    hs = torch.empty(n, SHAPE["hs"], dtype=s_dt, device=dev)
    ws = torch.empty(v, SHAPE["hs"], dtype=s_dt, device=dev)
    ht = torch.empty(n, SHAPE["ht"], dtype=t_dt, device=dev)
    wt = torch.empty(v, SHAPE["ht"], dtype=t_dt, device=dev)
    bs = torch.empty(v, dtype=s_dt, device=dev) if case.bias else None
    bt = torch.empty(v, dtype=t_dt, device=dev) if case.bias else None
    cap_s = 30.0 if case.softcap in ("both", "student") else 0.0
    cap_t = 50.0 if case.softcap in ("both", "teacher") else 0.0
    pair = dict(inv_temp=(1.0, 0.5), softcap=(cap_s, cap_t), vocab_size=v)
    single = dict(inv_temp=1.0, softcap=cap_s, vocab_size=v)
    env = {"MINILLM_FAST_ALLOW_TF32": "1" if tf32 else "0"}
    with _environ(env):
        if case.op in ("tiled", "chunked"):
            div = divergences.resolve(case.divergence, 0.5, 0.1)
            log_w, log_1mw = div.log_weights
            needs = tuple(bool(x) for x in GRADS[case.grads])
            if not case.bias:
                needs = needs[:2] + (False,) + needs[3:5] + (False,)
            row = torch.empty(n, dtype=torch.float32, device=dev)
            if case.op == "tiled":
                kw = dict(kind=div.kind, log_w=log_w, log_1mw=log_1mw, **pair)
                _, stats = kfd.fused_divergence_fwd(hs, ws, bs, ht, wt, bt, **kw)
                if any(needs):
                    kfd.fused_divergence_bwd(hs, ws, bs, ht, wt, bt, stats, row, needs=needs, **kw)
            else:
                cfg = chunked.DivergenceConfig(div, Scaling(1.0, cap_s), Scaling(0.5, cap_t), v)
                grad_w = sum(v * h * 4 for h, need in ((SHAPE["hs"], needs[1]), (SHAPE["ht"], needs[4])) if need)
                rows = default_chunk_rows(n, v, torch.device("cuda"), "triton", s_dt, head_grad_bytes=grad_w)
                chunked.run(hs, ws, bs, ht, wt, bt, cfg, rows=triton_backend.ROWS, chunk_size=rows,
                            row_grad=row if any(needs) else None, needs=needs)
        elif case.op == "token_logprobs":
            y = torch.empty(n, dtype=torch.int64, device=dev)
            lp, stats, ent = ktl.token_logprobs_fwd(hs, ws, bs, y, entropy=case.entropy, **single)
            g = torch.empty(n, dtype=torch.float32, device=dev)
            ktl.token_logprobs_bwd(hs, ws, bs, y, stats, ent, g, g if case.entropy else None,
                                   needs=(True, True, case.bias), **single)
        elif case.op == "rollout_statistics":
            y = torch.empty(n, dtype=torch.int64, device=dev)
            ksa.rollout_statistics(hs, ws, bs, ht, wt, bt, y, **pair)
        elif case.op in ("mixture_sample", "sample_tokens"):
            seed = torch.empty(1, dtype=torch.int64, device=dev)
            if case.op == "mixture_sample":
                ksa.sample(hs, ws, bs, ht, wt, bt, seed, alpha=0.2, **pair)
            else:
                ksa.sample(hs, ws, bs, None, None, None, seed, alpha=0.0, **pair)
        else:
            raise ValueError(f"unknown op {case.op!r}; expected one of {OPS}")


@contextlib.contextmanager
def _environ(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def capture(case: Case, target: Target) -> list[Launch]:
    """The kernel launches ``case`` makes on ``target`` (nothing runs; no GPU needed)."""
    with _recording(target) as launches:
        _run_case(case)
    for launch in launches:
        launch.cases.append(case.id)
    return launches


# ----------------------------------------------------------------------------------------------------------------------
# compile
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """Resources of one compiled launch on one target; ``error`` is set when it does not compile or cannot run."""

    target: str
    kernel: str
    config: str
    cases: list
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None   # spill stores + loads per thread (NVIDIA); VGPR spills x 4 B (AMD)
    sgpr_spills: int = 0                # AMD: scalar registers spilled to VGPR lanes (no memory traffic)
    shared: Optional[int] = None
    blocks_per_sm: Optional[int] = None
    seconds: float = 0.0
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _config_label(launch: Launch) -> str:
    kw = launch.kwargs
    blocks = "x".join(str(kw[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H") if k in kw)
    return f"{blocks} w{kw.get('num_warps', 4)} s{kw.get('num_stages', 3)}"


def _occupancy(target: Target, regs: int, shared: int, num_warps: int) -> int:
    """Blocks resident per SM (NVIDIA) or per CU (AMD) by registers, shared memory and threads."""
    threads = num_warps * target.warp_size
    if target.backend == "cuda":
        per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
        by_regs = target.regs_per_sm // (per_warp * num_warps) if regs else 32
        by_smem = (228 * 1024 if target.arch >= 90 else 164 * 1024) // (shared + 1024) if shared else 32
    else:
        # 4 SIMDs per CU; a wave holds its VGPRs on one SIMD (granule 8); waves of a block spread over the SIMDs.
        waves_per_simd = min(8, target.regs_per_sm // max(8, -(-regs // 8) * 8)) if regs else 8
        by_regs = (4 * waves_per_simd) // num_warps
        by_smem = 65536 // shared if shared else 32
    by_threads = target.max_threads_sm // threads
    return max(0, min(by_regs, by_smem, by_threads))


def compile_launch(launch: Launch, target: Target) -> Result:
    """Compile ``launch`` for ``target`` as a real launch would, and read its resources."""
    import importlib

    import triton
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    result = Result(target.name, launch.kernel, _config_label(launch), list(launch.cases))
    start = time.perf_counter()
    log = io.StringIO()
    try:
        backend = make_backend(target.gpu_target())
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        kwargs = dict(launch.kwargs)
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        src = ASTSource(fn, signature, constexprs, attrs)
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target.gpu_target(), options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - every compile failure is a finding, reported with its message
        result.error = _describe(e)
        result.seconds = time.perf_counter() - start
        return result
    result.seconds = time.perf_counter() - start
    result.shared = int(kernel.metadata.shared)
    num_warps = int(kernel.metadata.num_warps)
    if target.backend == "cuda":
        text = log.getvalue()
        regs = [int(x) for x in _PTXAS_REGS.findall(text)]
        spills = [int(a) + int(b) for a, b in _PTXAS_SPILL.findall(text)]
        result.registers = max(regs) if regs else None
        result.spill_bytes = max(spills) if spills else 0
    else:
        asm = kernel.asm.get("amdgcn", "")
        result.registers = _amd_field(asm, "vgpr_count")
        result.spill_bytes = 4 * (_amd_field(asm, "vgpr_spill_count") or 0)
        result.sgpr_spills = _amd_field(asm, "sgpr_spill_count") or 0
    result.blocks_per_sm = _occupancy(target, result.registers or 0, result.shared, num_warps)
    if result.shared > target.max_shared:
        result.error = (f"OutOfResources: shared memory {result.shared} B > {target.max_shared} B per block on "
                        f"{target.name}")
    return result


def _amd_field(asm: str, name: str) -> Optional[int]:
    m = re.search(rf"\.{name}:\s+(\d+)", asm)
    return int(m.group(1)) if m else None


def _describe(error: BaseException) -> str:
    """The message of a compile failure, down to its root cause: an error inside a ``@triton.jit`` helper reaches
    us as a CompilationError at the kernel's call site whose ``__cause__`` holds the helper's error (and that one, in
    turn, the NameError or TypeError that says what is wrong)."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 16:
        chain.append(chain[-1].__cause__)
    parts = [f"{type(e).__name__}: {_first_lines(str(e))}" for e in chain if str(e).strip()]
    return "; caused by ".join(parts) if parts else type(error).__name__


def _first_lines(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    # Triton's CompilationError puts the offending source line and the reason last.
    return " | ".join(lines[:2] + (["..."] if len(lines) > n else []) + lines[-(n - 2):]) if lines else text


def _compile_job(job):
    launch, target_name = job
    return compile_launch(launch, TARGETS[target_name])


def run(cases: Iterable[Case], targets: Iterable[str], *, jobs: int = 1, kernels: Optional[set] = None,
        progress=None) -> list[Result]:
    """Capture every case on every target, compile each distinct launch once, return the results."""
    todo: dict[tuple, tuple[Launch, str]] = {}
    for name in targets:
        target = TARGETS[name]
        for case in cases:
            for launch in capture(case, target):
                if kernels and launch.kernel not in kernels:
                    continue
                key = (name,) + launch.key()
                if key in todo:
                    todo[key][0].cases.extend(launch.cases)
                else:
                    todo[key] = (launch, name)
    jobs_list = list(todo.values())
    results = []
    with _fresh_cache():
        if jobs <= 1:
            for i, job in enumerate(jobs_list):
                results.append(_compile_job(job))
                if progress:
                    progress(i + 1, len(jobs_list), results[-1])
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                for i, res in enumerate(pool.map(_compile_job, jobs_list)):
                    results.append(res)
                    if progress:
                        progress(i + 1, len(jobs_list), res)
    return results


@contextlib.contextmanager
def _fresh_cache():
    """A private Triton cache: a cached binary would skip ptxas, and with it the register and spill report."""
    with tempfile.TemporaryDirectory(prefix="minillm-fast-compile-check-") as d:
        with _environ({"TRITON_CACHE_DIR": d}):
            from triton import knobs

            old = knobs.cache.dir
            knobs.cache.dir = d
            try:
                yield
            finally:
                knobs.cache.dir = old


# ----------------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------------
def table(results: list[Result], target: Optional[str] = None) -> str:
    """A markdown table, one row per distinct compiled launch."""
    rows = ["| target | kernel | config (BN x BV x BH, warps, stages) | registers | spills (B) | shared (KiB / limit) "
            "| blocks/SM | cases | status |", "| --- " * 9 + "|"]
    for r in sorted(results, key=lambda r: (r.target, r.kernel, r.config, r.cases[0])):
        if target and r.target != target:
            continue
        limit = TARGETS[r.target].max_shared / 1024
        shared = "-" if r.shared is None else f"{r.shared / 1024:.1f} / {limit:.0f}"
        cases = f"{r.cases[0]}" + (f" (+{len(r.cases) - 1})" if len(r.cases) > 1 else "")
        status = "ok" if r.ok else r.error.replace("|", "/")
        spills = _dash(r.spill_bytes) + (f" ({r.sgpr_spills} SGPRs to VGPR lanes)" if r.sgpr_spills else "")
        rows.append(f"| {r.target} | {r.kernel} | {r.config} | {_dash(r.registers)} | {spills} | "
                    f"{shared} | {_dash(r.blocks_per_sm)} | {cases} | {status} |")
    return "\n".join(rows)


def _dash(x):
    return "-" if x is None else str(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minillm_fast.kernels.compile_check",
                                description="Compile every Triton kernel launch for real GPU targets (no GPU needed) "
                                            "and report registers, spills and shared memory.")
    p.add_argument("--matrix", choices=("ci", "full"), default="ci",
                   help="ci: a representative subset (minutes); full: every kernel x divergence x dtype x flag")
    p.add_argument("--target", default=",".join(TARGETS), help=f"comma-separated, from {', '.join(TARGETS)}")
    p.add_argument("--kernel", default="", help="only these kernels (comma-separated function names)")
    p.add_argument("--op", default="", help=f"only cases of these ops, from {', '.join(OPS)}")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--out", default="", help="a folder: write compile-check-<target>.md there (one per target)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: TRITON_INTERPRET=1 is set; @triton.jit then builds interpreter functions, which do not "
              "compile. Run it without TRITON_INTERPRET.", file=sys.stderr)
        return 2
    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        print(f"compile_check: unknown --target {','.join(unknown)}; expected from {', '.join(TARGETS)}",
              file=sys.stderr)
        return 2
    cases = ci_matrix() if args.matrix == "ci" else full_matrix()
    if args.op:
        ops = set(args.op.split(","))
        cases = [c for c in cases if c.op in ops]
    kernels = set(args.kernel.split(",")) if args.kernel else None

    t0 = time.perf_counter()

    def progress(i, total, res):
        if not args.quiet:
            status = "ok" if res.ok else "FAIL"
            print(f"[{i}/{total} {time.perf_counter() - t0:6.0f}s] {res.target} {res.kernel} {res.config}: "
                  f"{status} regs={res.registers} spills={res.spill_bytes} shared={res.shared}", file=sys.stderr)

    results = run(cases, targets, jobs=args.jobs, kernels=kernels, progress=progress)
    text = table(results)
    print(text)
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results)} launches compiled for {', '.join(targets)} from {len(cases)} cases in "
          f"{time.perf_counter() - t0:.0f} s: {len(failed)} failed", file=sys.stderr)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        import triton

        for t in targets:
            path = os.path.join(args.out, f"compile-check-{t}.md")
            with open(path, "w") as f:
                f.write(f"# Triton compile check: {t} ({args.matrix} matrix)\n\n"
                        f"`python -m minillm_fast.kernels.compile_check --matrix {args.matrix} --target {t}` with "
                        f"triton {triton.__version__}; shapes {SHAPE}. One row per distinct compiled launch; "
                        f"`cases` names one case that makes it (+ how many others).\n\n")
                f.write(table(results, t) + "\n")
            print(f"wrote {path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
