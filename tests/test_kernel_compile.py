"""Ahead-of-time compile check of the Triton kernels (kernels/compile_check.py) for sm_80, sm_90 and gfx942.

The interpreter that runs the other Triton tests on the CPU checks semantics only; these tests compile the launches
the package really makes, for real targets, with the triton wheel's own ptxas and AMD backend (no GPU needed). They
run in subprocesses: under ``TRITON_INTERPRET=1`` (set by conftest for this process) ``@triton.jit`` builds
interpreter functions, which cannot be compiled.

The last two tests show that the check can fail: they plant the two defects it exists for (a global the compiler
refuses, the bug that kept 6 of 7 kernels from compiling; a tile over a target's shared memory) and expect it to
report them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences Triton 3.9's notice; fusion stays on, as by default
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _script(body: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return _run(["-c", textwrap.dedent(body)], timeout)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_sm90_gfx942():
    """The CI subset: every kernel on its default paths and the riskiest flags, on the three targets; the command
    exits 1 on any compile error or shared memory over a target's per-block limit."""
    proc = _run(["-m", "minillm_fast.kernels.compile_check", "--matrix", "ci", "--jobs", str(os.cpu_count() or 1),
                 "--quiet"], timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| sm_") or ln.startswith("| gfx")]
    kernels = {ln.split("|")[2].strip() for ln in rows}
    assert kernels == {"_fused_divergence_fwd_kernel", "_fused_divergence_bwd_kernel", "_divergence_rows_kernel",
                       "_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel", "_rollout_statistics_kernel",
                       "_sample_kernel"}, kernels
    assert {ln.split("|")[1].strip() for ln in rows} == {"sm_80", "sm_90", "gfx942"}
    assert all(ln.rstrip().endswith("| ok |") for ln in rows)


def test_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "minillm_fast.kernels.compile_check"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "TRITON_INTERPRET=1 is set" in proc.stderr


def test_catches_a_global_the_compiler_refuses():
    """LOG_ZERO as a plain float (the defect that kept 6 of 7 kernels from compiling) is reported as a failure."""
    proc = _script("""
        from minillm_fast.kernels import compile_check as cc, tiles
        tiles.LOG_ZERO = -1.0e30  # what the kernels had: a float, not a tl.constexpr
        results = cc.run([cc.Case("chunked", "reverse_kl", "bf16")], ["sm_90"])
        assert results and all(not r.ok for r in results), [r.error for r in results]
        print(results[0].error)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NameError" in proc.stdout and "LOG_ZERO" in proc.stdout


def test_catches_shared_memory_over_the_limit():
    """A tile that needs more shared memory than an sm_80 block may have (163 KiB) fails as a launch would."""
    proc = _script("""
        from minillm_fast.kernels import compile_check as cc, configs
        big = configs.Tiles(128, 256, 64, num_warps=8, num_stages=5)
        orig = configs.launch_config
        configs.launch_config = lambda kernel, arch, precision="half": big if kernel == "sample" else orig(
            kernel, arch, precision)
        results = cc.run([cc.Case("sample_tokens", dtype="bf16")], ["sm_80"])
        assert len(results) == 1, results
        print(results[0].shared, results[0].error)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared, _, error = proc.stdout.strip().splitlines()[-1].partition(" ")
    assert int(shared) > 166912 and error.startswith("OutOfResources: shared memory")
