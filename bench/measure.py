"""The measuring engine: runs one job (the ground truth, the floor, or one implementation on one shape) and returns
plain data. It knows nothing about any op; bench/cases.py supplies inputs, floor, truth and implementations.

On CPU each job runs in a fresh subprocess (bench/worker.py) so that one implementation's allocator state, thread
pools or torch.compile caches cannot leak into another's numbers; on CUDA jobs run in-process.

Per implementation job: build the inputs; one forward+backward that warms up and is checked against the ground
truth (an implementation that computes another objective is reported as ``mismatch`` and not timed); then per mode
one untimed run that measures peak memory, ``warmup`` untimed runs and ``reps`` timed runs (CPU), or
``triton.testing.do_bench`` (CUDA). See bench/README.md for the definitions.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import threading
import time
import traceback
from typing import Callable, Optional

import torch

from . import cases
from .shapes import Shape

MODES = ("fwd", "bwd", "fwd_bwd")
MODE_ALIASES = {"forward": "fwd", "backward": "bwd", "both": "fwd_bwd", "fwd+bwd": "fwd_bwd", "full": "fwd_bwd",
                **{m: m for m in MODES}}
# Relative error allowed between an implementation and the fp32 ground truth (loss, and a projection of every
# gradient). An objective that differs (another divergence, a CE term, another normalisation) is off by O(1).
# bf16 inputs give ~1e-2 here whoever computes (the logits are rounded to bf16 by the matmul), so 1e-1 there.
TOLERANCE = {"float32": 1e-3, "bfloat16": 1e-1, "float16": 5e-2}
MIB = float(1 << 20)


# ----------------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------------
def _quantile(xs: list, q: float) -> float:
    s = sorted(xs)
    if not s:
        return math.nan
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times_ms: list) -> dict:
    return dict(median_ms=_quantile(times_ms, 0.5), p20_ms=_quantile(times_ms, 0.2), p80_ms=_quantile(times_ms, 0.8),
                min_ms=min(times_ms) if times_ms else math.nan, max_ms=max(times_ms) if times_ms else math.nan,
                reps=len(times_ms))


# ----------------------------------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------------------------------
def _malloc_trim() -> None:
    """Give glibc's freed heap pages back to the OS, so that the next allocations show up in RSS again."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _statm_rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reset_hwm() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS: ``echo 5 > /proc/self/clear_refs`` (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class CpuPeak:
    """Peak resident memory of this process during a ``with`` block, minus the resident memory at its start.

    Method ``vmhwm``: reset the kernel's high-water mark, read VmHWM at the end (exact). Fallback ``sampled``:
    a thread reads /proc/self/statm every 0.2 ms (may miss short spikes). ``None`` when neither works.
    """

    def __init__(self):
        self.method = None
        if _status_kib("VmHWM") is not None and _reset_hwm():
            self.method = "vmhwm"
        elif _statm_rss_bytes() is not None:
            self.method = "sampled"
        self.extra_bytes = math.nan

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        if self.method == "vmhwm":
            self.base = _status_kib("VmRSS") * 1024
            _reset_hwm()
        elif self.method == "sampled":
            self.base = self.peak = _statm_rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _statm_rss_bytes() or 0)
            time.sleep(0.0002)

    def __exit__(self, *exc):
        if self.method == "vmhwm":
            self.extra_bytes = _status_kib("VmHWM") * 1024 - self.base
        elif self.method == "sampled":
            self._stop.set()
            self._thread.join()
            self.extra_bytes = max(self.peak, _statm_rss_bytes() or 0) - self.base
        return False


class CudaPeak:
    """``torch.cuda.max_memory_allocated`` during the block minus ``memory_allocated`` at its start."""

    method = "cuda_max_allocated"

    def __init__(self, device):
        self.device = device
        self.extra_bytes = math.nan

    def __enter__(self):
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def restart(self):
        """Forget the peak so far (used to measure the backward alone), keeping the baseline."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.extra_bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        return False


def _peak(device: torch.device):
    return CudaPeak(device) if device.type == "cuda" else CpuPeak()


# ----------------------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------------------
def _cpu_times(setup: Callable, run: Callable, reps: int, warmup: int) -> list:
    """Wall time of ``run(setup())`` in ms; ``setup`` and freeing what ``run`` returns are not timed."""
    times = []
    for i in range(warmup + reps):
        state = setup()
        t0 = time.perf_counter()
        out = run(state)
        dt = time.perf_counter() - t0
        del state, out
        if i >= warmup:
            times.append(dt * 1e3)
    return times


def _cuda_times(setup: Callable, run: Callable, reps: int, warmup: int, grads: list, timed_setup_free: bool,
                opts: dict) -> list:
    """CUDA: ``triton.testing.do_bench`` when nothing needs to happen untimed before each run; else CUDA events
    around ``run`` after an untimed ``setup`` (the backward alone), with the L2 cache flushed as do_bench does."""
    if timed_setup_free:
        import triton.testing

        fn = lambda: run(setup())  # noqa: E731  (setup only clears grads, which do_bench does via grad_to_none)
        try:
            times = triton.testing.do_bench(fn, warmup=opts["gpu_warmup_ms"], rep=opts["gpu_rep_ms"],
                                            grad_to_none=grads, return_mode="all")
            return [float(t) for t in times]
        except TypeError:  # an older Triton without return_mode="all": keep its quantiles
            q = triton.testing.do_bench(fn, warmup=opts["gpu_warmup_ms"], rep=opts["gpu_rep_ms"],
                                        grad_to_none=grads, quantiles=[0.2, 0.5, 0.8])
            return [float(t) for t in q]
    cache = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    times = []
    for i in range(warmup + reps):
        state = setup()
        cache.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = run(state)
        end.record()
        torch.cuda.synchronize()
        del state, out
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return times


# ----------------------------------------------------------------------------------------------------------------------
# verification
# ----------------------------------------------------------------------------------------------------------------------
def fingerprint(grads: dict) -> dict:
    """Two random projections of every gradient (``u @ G`` and ``G @ w``, fixed seeds): small enough to store, and a
    different objective cannot match them by accident."""
    out = {}
    for name, g in grads.items():
        if g is None:
            continue
        g2 = g.detach().float().reshape(g.shape[0], -1)
        gen = torch.Generator(device=g.device).manual_seed(1234)
        u = torch.randn(g2.shape[0], generator=gen, device=g.device)
        w = torch.randn(g2.shape[1], generator=gen, device=g.device)
        out[name] = torch.cat([u @ g2, g2 @ w]).double().cpu()
    return out


def compare(truth: dict, loss: float, fp: dict) -> dict:
    lt = truth["loss"]
    loss_err = abs(loss - lt) / max(abs(lt), 1e-30)
    grad_err = 0.0
    for name, ref in truth["fp"].items():
        if name not in fp:
            return dict(loss_err=loss_err, grad_err=math.inf, missing_grad=name)
        grad_err = max(grad_err, float((fp[name] - ref).norm() / ref.norm().clamp_min(1e-300)))
    return dict(loss_err=loss_err, grad_err=grad_err)


# ----------------------------------------------------------------------------------------------------------------------
# jobs
# ----------------------------------------------------------------------------------------------------------------------
def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(e).lower()


def _error(e: BaseException) -> dict:
    if _is_oom(e):
        return dict(status="oom", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    return dict(status="error", error=f"{type(e).__name__}: {e}"[:300], traceback=traceback.format_exc()[-2000:])


def run_job(spec: dict) -> dict:
    """Run one job described by plain data (bench/cli.py ``Job.spec``) and return plain data."""
    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(spec["threads"])
    case = cases.get(spec["op"])
    shape = Shape(**spec["shape"])
    opts = spec["opts"]
    try:
        x = case.make_inputs(shape, device, spec["seed"], opts)
        if spec["kind"] == "truth":
            loss, grads = case.truth(x, opts)
            torch.save(dict(loss=float(loss), fp=fingerprint(grads)), spec["truth_path"])
            return dict(status="ok")
        if spec["kind"] == "floor":
            return _floor_job(case, x, shape, spec)
        return _impl_job(case, x, shape, spec, device)
    except Exception as e:  # noqa: BLE001  (reported as a row, the other jobs go on)
        return _error(e)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pick_layouts(matmuls: dict, device) -> tuple[dict, str]:
    """A phase's matmuls may come as ``{layout: [calls]}`` (the same products in different memory layouts): keep,
    per phase, the layout that ran faster in one timed run after a warm-up run. Returns the plain ``{phase:
    [calls]}`` and a note naming the layouts chosen ("" when there was no choice)."""
    chosen, notes = {}, []
    for phase, calls in matmuls.items():
        if not isinstance(calls, dict):
            chosen[phase] = calls
            continue
        best = None
        for layout, cs in calls.items():
            def once(cs=cs):
                for c in cs:
                    c()
                _sync(device)
            once()
            t0 = time.perf_counter()
            once()
            dt = time.perf_counter() - t0
            if best is None or dt < best[0]:
                best = (dt, layout, cs)
        chosen[phase] = best[2]
        notes.append(f"{phase} {best[1]}")
    return chosen, ", ".join(notes)


def _floor_job(case, x, shape, spec) -> dict:
    device = torch.device(spec["device"])
    matmuls, flops = case.floor(x, shape)
    matmuls, layouts = _pick_layouts(matmuls, device)
    out = {}
    for mode in spec["modes"]:
        calls = {"fwd": matmuls["fwd"], "bwd": matmuls["bwd"], "fwd_bwd": matmuls["fwd"] + matmuls["bwd"]}[mode]
        n_flops = {"fwd": flops["fwd"], "bwd": flops["bwd"], "fwd_bwd": flops["fwd"] + flops["bwd"]}[mode]

        def run(_state, calls=calls):
            for c in calls:
                c()
            _sync(device)

        if device.type == "cuda":
            times = _cuda_times(lambda: None, run, spec["reps"], spec["warmup"], [], True, spec["opts"])
        else:
            times = _cpu_times(lambda: None, run, spec["reps"], max(1, spec["warmup"]))
        out[mode] = dict(status="ok", flops=n_flops, **summarize(times))
    return dict(status="ok", modes=out, layouts=layouts)


def _impl_job(case, x, shape, spec, device) -> dict:
    opts = spec["opts"]
    impl = case.impl(spec["impl"])
    step = impl.make(x, opts)
    grads = [x[n] for n in case.grad_names]

    def clear():
        for g in grads:
            g.grad = None

    result = dict(status="ok", modes={})
    # Warm-up (compiles, lazy initialisation) and verification against the ground truth.
    clear()
    loss = step()
    if grads:
        loss.backward()
    _sync(device)
    if spec.get("truth_path") and os.path.exists(spec["truth_path"]):
        truth = torch.load(spec["truth_path"])
        v = compare(truth, float(loss.detach()), fingerprint({n: x[n].grad for n in case.grad_names}))
        v["tol"] = spec["tol"]
        result["verify"] = v
        if not (v["loss_err"] <= spec["tol"] and v["grad_err"] <= spec["tol"]):
            result["status"] = "mismatch"
            result["error"] = (f"differs from the reference: loss rel. err {v['loss_err']:.2e}, gradient rel. err "
                               f"{v['grad_err']:.2e} > {spec['tol']:.0e}; not timed")
            return result
    del loss
    clear()

    setups = {
        "fwd": lambda: clear(),
        "bwd": lambda: (clear(), step())[1],
        "fwd_bwd": lambda: clear(),
    }
    runs = {
        "fwd": lambda s: step(),
        "bwd": lambda s: s.backward(),
        "fwd_bwd": lambda s: step().backward(),
    }
    for mode in spec["modes"]:
        try:
            result["modes"][mode] = _measure_mode(mode, setups[mode], runs[mode], step, clear, grads, spec, device)
        except Exception as e:  # noqa: BLE001
            clear()
            gc.collect()
            result["modes"][mode] = _error(e)
    return result


def _measure_mode(mode, setup, run, step, clear, grads, spec, device) -> dict:
    # Peak memory above the inputs: one untimed run. For the backward alone the forward runs first and its peak is
    # forgotten; what it saved for the backward is still counted (it is alive during the backward).
    clear()
    peak = _peak(device)
    with peak:
        if mode == "bwd":
            out = step()
            _sync(device)
            if isinstance(peak, CudaPeak):
                peak.restart()
            elif peak.method == "vmhwm":
                _reset_hwm()
            out.backward()
        elif mode == "fwd":
            out = step()
        else:
            step().backward()
            out = None
        _sync(device)
    del out
    clear()

    if device.type == "cuda":
        times = _cuda_times(setup, lambda s: (run(s), None)[1], spec["reps"], spec["warmup"], grads,
                            timed_setup_free=(mode != "bwd"), opts=spec["opts"])
    else:
        times = _cpu_times(setup, run, spec["reps"], spec["warmup"])
    clear()
    return dict(status="ok", peak_extra_bytes=peak.extra_bytes, mem_method=peak.method, **summarize(times))
