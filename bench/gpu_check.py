"""``python -m bench.gpu_check`` / ``make gpu-check``: the whole GPU verification in one command, for the day a CUDA
machine is at hand. See bench/README.md ("GPU check").

On a CUDA machine it runs, each stage a subprocess with its own time limit inside one overall budget (default 570 s,
so that it ends within 10 minutes on one H100), printing a progress line per stage and a heartbeat while one runs:

1. ``bench-headline`` (alone on the machine): ``python -m bench`` at Liger-Kernel's headline shape (N=8192, Hs=2048,
   Ht=4096, V=128256, bf16, forward+backward of the fused reverse KL) for every backend and strategy of ours, the
   naive baseline and Liger's chunked loss; the 4-matmul floor is always measured in the same run; peak memory from
   ``torch.cuda.max_memory_allocated``. Its three ratios against the issue's targets are printed right away.
2. Two lanes side by side (neither is timed, and they share 16 cores and the GPU's memory easily):
   ``native-build`` (compile the CUDA native extension, minillm_fast/native_cuda.py) then ``native-tests``
   (tests/test_native_cuda.py); and ``tests-gpu`` (every ``gpu``-marked test), ``tests-ops`` (the op test files)
   then ``tests-rest`` (the rest of the suite), all on CUDA. Together the three test stages are the whole suite
   but for tests/test_native_cuda.py, which ``native-tests`` runs.
3. Alone again, while time remains: ``bench-peers`` (Liger's Triton loss, torchtune), ``bench-presets`` (qwen2.5 at
   N=8192), ``bench-ops`` (token log-probs, rollout statistics and the sampler at the headline shape).

Everything goes to ``bench/results/gpu-check-<device>-<date>/`` (``--out``) as it happens: a log per stage, the
bench's CSV and plots, ``summary.md`` and ``summary.json`` (rewritten after every stage, so a run cut short keeps
what it measured). ``--archive FILE.tar.gz`` also packs that folder after every stage (for a machine whose working
tree does not come back). Stages whose tool is missing (pytest, Triton, nvcc, ninja) are skipped with a line saying
so; a stage that would start with less than 30 s of the budget left is skipped as out of time.

Exit status: 0 when every stage that ran passed and none was skipped for lack of time; 1 when a stage failed or
timed out; 3 when none failed but the budget skipped some; 2 without CUDA (one line on stderr, nothing else).
The issue's performance targets are reported (PASS / MISS / N/A) but do not change the exit status.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
NO_CUDA_EXIT = 2
DEFAULT_BUDGET_S = 570.0
MIN_START_S = 30.0  # a stage is not started with less of the budget left
END_MARGIN_S = 10.0  # kept for the summary and the archive
HEARTBEAT_S = 30.0

# Liger-Kernel's headline benchmark: the fused reverse KL, forward + backward (bench preset ``gpu``).
HEADLINE = dict(op="fused_divergence", variant="reverse_kl", tokens=8192, hs=2048, ht=4096, vocab=128256,
                dtype="bfloat16", mode="fwd_bwd")
HEADLINE_LABEL = "fused reverse KL fwd+bwd, N=8192 Hs=2048 Ht=4096 V=128256 bf16"
OURS = "ours:triton"  # what backend="auto" runs on CUDA: the targets are judged on it
PEER = "liger:chunked"
LIGER_PUBLISHED_MS = 60.7  # Liger-Kernel's published figure for this benchmark on an H100
# (label, what, comparison, target)
TARGETS = (("time / 4-matmul floor", "x_floor", "<=", 1.3),
           ("Liger chunked time / ours", "peer_speedup", ">=", 1.5),
           ("extra memory ours / Liger", "mem_vs_peer", "<=", 0.5))

OP_TEST_FILES = ("test_fused_divergence.py", "test_fused_divergence_errors.py", "test_token_logprobs.py",
                 "test_rollout_statistics.py", "test_sampling.py")
NATIVE_TEST_FILE = "test_native_cuda.py"

NATIVE_BUILD = r"""
import sys, time
t0 = time.perf_counter()
from minillm_fast import native_cuda
print("nvcc:", native_cuda.find_nvcc(), flush=True)
try:
    mod = native_cuda.load()
except native_cuda.NativeCudaBuildError as e:
    print(f"native CUDA extension NOT built ({time.perf_counter() - t0:.1f} s): {e}", flush=True)
    sys.exit(1)
print(f"native CUDA extension loaded in {time.perf_counter() - t0:.1f} s: {getattr(mod, '__file__', mod)}", flush=True)
"""


# ----------------------------------------------------------------------------------------------------------------------
# small pure helpers (tested on CPU: tests/test_gpu_check.py)
# ----------------------------------------------------------------------------------------------------------------------
def slug(name: str, max_len: int = 48) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``: lower case, runs of anything else than letters and
    digits turned into one dash, no leading or trailing dash, at most ``max_len`` characters; ``gpu`` if empty."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:max_len].strip("-")
    return s or "gpu"


def clock(seconds: float) -> str:
    """Elapsed time as ``m:ss``."""
    s = max(0, int(seconds))
    return f"{s // 60}:{s % 60:02d}"


def last_line(path: Path, size: int = 8192) -> str:
    """The last non-empty line of a log (progress bars' carriage returns count as line ends), or ''."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [x.strip() for x in re.split(r"[\r\n]+", text) if x.strip()]
    return lines[-1] if lines else ""


_PYTEST_COUNT = re.compile(r"\b\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b")


def pytest_summary(log_text: str) -> str:
    """pytest's final count line (``3 failed, 120 passed, 4 skipped in 81.2s``), or '' when there is none (the run
    was cut short)."""
    for line in reversed(log_text.splitlines()):
        line = line.strip().strip("=").strip()
        if _PYTEST_COUNT.search(line) or line.startswith("no tests ran"):
            return line
    return ""


@dataclass
class Stage:
    name: str
    about: str
    argv: list
    cap_s: float  # the stage's own time limit (the overall budget may leave it less)
    needs: tuple = ()  # requirement names (see ``requirements``); a stage whose needs are not met is skipped
    kind: str = "run"  # run | pytest | bench
    retry_of: str = ""  # run only if that stage failed or timed out (its compile caches are warm by then)


@dataclass
class Result:
    name: str
    about: str = ""
    status: str = "pending"  # pending | running | ok | failed | timeout | skipped
    seconds: float = 0.0
    limit_s: float = 0.0
    rc: Optional[int] = None
    detail: str = ""
    log: str = ""


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the stage's process group (pytest's children, nvcc, ninja...), SIGKILL what is left after grace_s."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# Each stage in a process group of its own, so that a time limit kills its children too; in this session where the
# Python allows it (a process that leaves the session may outlive a killed parent), else in a new session.
_NEW_GROUP = dict(process_group=0) if sys.version_info >= (3, 11) else dict(start_new_session=True)
_RUNNING: set = set()  # Popen objects of the stages in flight (killed on Ctrl-C)
_RUNNING_LOCK = threading.Lock()


def run_command(argv: list, log_path: Path, timeout_s: float, cwd: Path, env: Optional[dict] = None,
                heartbeat_s: float = HEARTBEAT_S, beat: Optional[Callable[[float, str], None]] = None,
                grace_s: float = 10.0) -> tuple:
    """Run ``argv`` in a new process group with stdout and stderr appended to ``log_path``; kill the whole group after
    ``timeout_s``. Every ``heartbeat_s`` while it runs, ``beat(elapsed, last log line)``. Returns ``(returncode,
    seconds)``, returncode None when it was killed for time."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(str(a) for a in argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen([str(a) for a in argv], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, **_NEW_GROUP)
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
        try:
            while True:
                left = timeout_s - (time.monotonic() - t0)
                if left <= 0:
                    _kill_group(proc, grace_s)
                    rc = None
                    break
                try:
                    rc = proc.wait(timeout=min(heartbeat_s, left))
                    break
                except subprocess.TimeoutExpired:
                    if beat is not None and time.monotonic() - t0 < timeout_s:
                        beat(time.monotonic() - t0, last_line(log_path))
        except BaseException:  # Ctrl-C / SIGTERM while waiting here: the stage goes with us
            _kill_group(proc, 2.0)
            raise
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)
        seconds = time.monotonic() - t0
        if rc is None:
            log.write(f"\ngpu-check: killed after {seconds:.0f} s (stage limit {timeout_s:.0f} s)\n".encode())
    return rc, seconds


# ----------------------------------------------------------------------------------------------------------------------
# the bench's CSV -> the headline ratios
# ----------------------------------------------------------------------------------------------------------------------
def _num(v) -> Optional[float]:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None  # NaN -> None


def read_rows(path: Path) -> list:
    """The rows of a bench CSV as dicts of strings ([] when the file does not exist yet)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def headline(rows: list, ours: str = OURS, peer: str = PEER) -> Optional[dict]:
    """The headline comparison from bench CSV rows: the rows at the headline shape and mode (any preset), from one
    bench run (rows sharing a ``date``): the latest run in which ``ours`` ran, else the latest one at that shape.
    Returns None when there is no such row; else a dict: ``date``, ``floor_ms``, ``impls`` (one dict per
    implementation with ``impl, status, median_ms, x_floor, peer_speedup, peak_mib, mem_vs_peer, notes``) and
    ``targets`` (label, value, comparison, target, verdict PASS / MISS / N/A, and why N/A)."""
    sel = [r for r in rows if all(str(r.get(k, "")) == str(v) for k, v in HEADLINE.items())]
    if not sel:
        return None
    runs: dict = {}
    for r in sel:
        runs.setdefault(r.get("date", ""), []).append(r)
    with_ours = [d for d, rs in runs.items() if any(r["impl"] == ours and r["status"] == "ok" for r in rs)]
    date = max(with_ours or runs)
    run = {r["impl"]: r for r in runs[date]}  # one row per implementation at one shape and mode

    def ok(name):
        r = run.get(name)
        return r if r is not None and r.get("status") == "ok" and _num(r.get("median_ms")) is not None else None

    floor, liger = ok("floor"), ok(peer)
    floor_ms = _num(floor["median_ms"]) if floor else None
    peer_ms = _num(liger["median_ms"]) if liger else None
    peer_mib = _num(liger.get("peak_extra_mib")) if liger else None
    impls = []
    for name, r in run.items():
        if name == "floor":
            continue
        ms = _num(r.get("median_ms")) if r.get("status") == "ok" else None
        mib = _num(r.get("peak_extra_mib")) if r.get("status") == "ok" else None
        impls.append(dict(impl=name, status=r.get("status", ""), median_ms=ms, peak_mib=mib, notes=r.get("notes", ""),
                          x_floor=ms / floor_ms if ms and floor_ms else None,
                          peer_speedup=peer_ms / ms if ms and peer_ms else None,
                          mem_vs_peer=mib / peer_mib if mib is not None and peer_mib else None))
    mine = next((i for i in impls if i["impl"] == ours), None)
    targets = []
    for label, key, cmp, target in TARGETS:
        value = mine[key] if mine else None
        if value is None:
            if mine is None:
                why = f"{ours} did not run"
            elif mine["status"] != "ok":
                why = f"{ours}: {mine['status']} {mine['notes']}".strip()
            elif key == "x_floor":
                why = "the floor did not run"
            elif liger is None:
                why = f"{peer}: " + (f"{run[peer]['status']} {run[peer].get('notes', '')}".strip() if peer in run
                                     else "not run")
            else:
                why = "no peak memory figure"
            targets.append(dict(label=label, value=None, cmp=cmp, target=target, verdict="N/A", why=why[:200]))
        else:
            good = value <= target if cmp == "<=" else value >= target
            targets.append(dict(label=label, value=value, cmp=cmp, target=target, verdict="PASS" if good else "MISS",
                                why=""))
    return dict(date=date, floor_ms=floor_ms, peer_ms=peer_ms, peer_mib=peer_mib, impls=impls, targets=targets,
                ours=ours, peer=peer, ours_ms=mine["median_ms"] if mine else None,
                ours_mib=mine["peak_mib"] if mine else None)


def _f(v, spec: str, empty: str = "-") -> str:
    return empty if v is None else format(v, spec)


def headline_lines(h: Optional[dict]) -> list:
    """The three target lines (and what they were computed from), for the console and summary.md."""
    if h is None:
        return [f"{HEADLINE_LABEL}: no measurement (the bench-headline stage wrote no row at that shape)"]
    out = [f"{HEADLINE_LABEL} (bench run {h['date']}; judged on {h['ours']}, the CUDA default):"]
    for t in h["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        out.append(f"  {t['label']:<27s} {value:>5s}  (target {t['cmp']} {t['target']})  {t['verdict']}"
                   + (f"  [{t['why']}]" if t["why"] else ""))
    out.append(f"  ours {_f(h['ours_ms'], '.1f')} ms, floor {_f(h['floor_ms'], '.1f')} ms, Liger chunked "
               f"{_f(h['peer_ms'], '.1f')} ms (Liger publishes {LIGER_PUBLISHED_MS} ms on an H100); extra memory "
               f"ours {_f(h['ours_mib'], '.0f')} MiB, Liger {_f(h['peer_mib'], '.0f')} MiB")
    return out


def headline_table(h: Optional[dict]) -> list:
    if h is None:
        return []
    lines = ["| impl | status | median ms | x floor | Liger / this | peak extra MiB | this / Liger memory |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| floor | {'ok' if h['floor_ms'] else '-'} | {_f(h['floor_ms'], '.2f')} | 1.00 | | | |"]
    for i in h["impls"]:
        status = i["status"] if i["status"] == "ok" else f"{i['status']}: {i['notes'][:80]}"
        lines.append(f"| {i['impl']} | {status} | {_f(i['median_ms'], '.2f')} | {_f(i['x_floor'], '.2f')} | "
                     f"{_f(i['peer_speedup'], '.2f')} | {_f(i['peak_mib'], '.0f')} | {_f(i['mem_vs_peer'], '.2f')} |")
    return lines


def render_summary(env: dict, results: list, h: Optional[dict], budget_s: float, elapsed_s: float,
                   done: bool) -> str:
    """summary.md: the device and versions, the headline targets and table, and every stage's outcome."""
    lines = [f"# GPU check: {env.get('device', '?')}", "",
             f"{env.get('date', '')}, commit {env.get('commit', 'unknown')}, "
             + (f"finished in {clock(elapsed_s)}" if done else f"in progress ({clock(elapsed_s)} so far)")
             + f" of a {budget_s:.0f} s budget (`python -m bench.gpu_check`, bench/README.md).", "",
             "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in env.items() if k not in ("date", "commit")]
    lines += ["", "## Headline: Liger-Kernel's benchmark shape", "", "```"] + headline_lines(h) + ["```", ""]
    lines += headline_table(h)
    lines += ["", "## Stages", "", "| stage | what | status | time | limit | detail | log |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        t = f"{r.seconds:.0f} s" if r.status not in ("pending", "skipped") else ""
        limit = f"{r.limit_s:.0f} s" if r.limit_s else ""
        lines.append(f"| {r.name} | {r.about} | {r.status} | {t} | {limit} | {r.detail.replace('|', '/')} | "
                     f"{r.log} |")
    return "\n".join(lines) + "\n"


def exit_status(results: list) -> int:
    """1 if a stage failed or timed out, else 3 if one was skipped for lack of time, else 0."""
    if any(r.status in ("failed", "timeout") for r in results):
        return 1
    if any(r.status == "skipped" and r.detail.startswith("out of time") for r in results):
        return 3
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------------------------------
def _bench(py: str, out: Path, preset: str, tokens: str, impls: Optional[str], plot: bool,
           ops: str = "fused_divergence", modes: str = "fwd_bwd") -> list:
    argv = [py, "-m", "bench", "--device", "cuda", "--preset", preset, "--tokens", tokens, "--dtype", "bfloat16",
            "--op", ops, "--divergence", "reverse_kl", "--mode", modes, "--out", str(out)]
    return argv + (["--impl", impls] if impls else []) + ([] if plot else ["--no-plot"])


def _pytest(py: str, out: Path, name: str, *args) -> list:
    return [py, "-m", "pytest", "-q", "-rfEs", "--durations=10", "-p", "no:cacheprovider",
            "--continue-on-collection-errors", f"--junitxml={out / (name + '.xml')}", *args]


def plan(py: str, out: Path, plot: bool = True, tests_dir: Path = REPO / "tests") -> list:
    """The stages, as steps: each step a list of lanes run side by side, each lane a list of stages run in order."""
    t = lambda f: f"tests/{f}"  # noqa: E731  (pytest runs in the repository root)
    op_files = [t(f) for f in OP_TEST_FILES if (tests_dir / f).exists()]
    not_rest = [f"--ignore={f}" for f in op_files + [t(NATIVE_TEST_FILE)]]
    headline_impls = "naive,ours:torch,ours:native,ours:triton,ours:triton-tiled,liger:chunked"
    return [
        [[Stage("bench-headline", "bench at N=8192 Hs=2048 Ht=4096 V=128256 bf16, fwd+bwd: " + headline_impls
                + " and the floor", _bench(py, out, "gpu", "8192", headline_impls, plot), 270, ("triton",), "bench")]],
        [[Stage("native-build", "compile the CUDA native extension (minillm_fast/native_cuda.py)",
                [py, "-c", NATIVE_BUILD], 200, ("nvcc", "ninja")),
          Stage("native-tests", "tests/" + NATIVE_TEST_FILE, _pytest(py, out, "native-tests", t(NATIVE_TEST_FILE)),
                200, ("pytest",), "pytest")],
         [Stage("tests-gpu", "every gpu-marked test but tests/" + NATIVE_TEST_FILE,
                _pytest(py, out, "tests-gpu", "-m", "gpu", "tests", f"--ignore={t(NATIVE_TEST_FILE)}"), 150,
                ("pytest",), "pytest"),
          *([Stage("tests-ops", "the op tests on CUDA (not gpu-marked): " + ", ".join(OP_TEST_FILES),
                   _pytest(py, out, "tests-ops", "-m", "not gpu", *op_files), 180, ("pytest",), "pytest")]
            if op_files else []),
          Stage("tests-rest", "the rest of the suite on CUDA (not gpu-marked)",
                _pytest(py, out, "tests-rest", "-m", "not gpu", "tests", *not_rest), 420, ("pytest",), "pytest")]],
        [[Stage("bench-headline-retry", "bench-headline again, ours:triton and liger:chunked alone, if it failed",
                _bench(py, out, "gpu", "8192", "ours:triton,liger:chunked", plot), 200, ("triton",), "bench",
                retry_of="bench-headline"),
          Stage("bench-peers", "bench, headline shape: liger:triton, torchtune:chunked (and the floor)",
                _bench(py, out, "gpu", "8192", "liger:triton,torchtune:chunked", plot), 120, ("triton",), "bench"),
          Stage("bench-presets", "bench, qwen2.5 at N=8192 bf16 fwd+bwd, every implementation",
                _bench(py, out, "qwen2.5", "8192", None, plot), 180, ("triton",), "bench"),
          Stage("bench-ops", "bench, token_logprobs / rollout_statistics / mixture_sample at the headline shape",
                _bench(py, out, "gpu", "8192", None, plot, "token_logprobs,rollout_statistics,mixture_sample",
                       "fwd,bwd,fwd_bwd"), 180, ("triton",), "bench")]],
    ]


def stages_of(steps: list) -> list:
    return [s for step in steps for lane in step for s in lane]


# ----------------------------------------------------------------------------------------------------------------------
# the machine
# ----------------------------------------------------------------------------------------------------------------------
def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _out(argv: list, timeout: float = 20) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        return p.stdout.strip() if p.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def find_nvcc() -> Optional[str]:
    """nvcc as minillm_fast.native_cuda.find_nvcc finds it (torch's CUDA_HOME, $CUDA_HOME, $CUDA_PATH, PATH)."""
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        CUDA_HOME = None
    for home in (CUDA_HOME, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def requirements() -> dict:
    """name -> None when present, else why it is missing (the line printed for the stages that need it)."""
    def has(mod):
        try:
            return importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            return False

    try:
        from torch.utils.cpp_extension import is_ninja_available
        ninja = is_ninja_available()
    except ImportError:
        ninja = False
    return {
        "pytest": None if has("pytest") else "pytest is not installed in this python: the test stages are skipped",
        "triton": None if has("triton") else ("Triton is not installed in this python: the bench times CUDA with "
                                              "triton.testing.do_bench, so the bench stages are skipped (the triton "
                                              "backend too)"),
        "nvcc": None if find_nvcc() else ("nvcc not found (torch's CUDA_HOME, $CUDA_HOME, $CUDA_PATH, PATH): the "
                                          "native CUDA extension cannot be compiled here"),
        "ninja": None if ninja else "ninja not found: torch compiles the native CUDA extension with it",
    }


def environment(torch) -> dict:
    props = torch.cuda.get_device_properties(0)
    nvcc = find_nvcc()
    nvcc_version = _out([nvcc, "--version"]).splitlines()[-1:] if nvcc else []
    driver = _out(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()[:1]
    sha = _out(["git", "rev-parse", "--short=12", "HEAD"])
    dirty = _out(["git", "status", "--porcelain", "--untracked-files=no"]) if sha else ""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": (sha + ("-dirty" if dirty else "")) if sha else "unknown",
        "device": torch.cuda.get_device_name(0),
        "devices": f"{torch.cuda.device_count()} visible; device 0: sm_{props.major}{props.minor}, "
                   f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs",
        "driver": driver[0] if driver else "unknown (nvidia-smi not found)",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN {cudnn})",
        "triton": _version("triton") if importlib.util.find_spec("triton") else "missing",
        "liger-kernel": _version("liger-kernel"),
        "torchtune": _version("torchtune"),
        "nvcc": f"{nvcc} ({nvcc_version[0]})" if nvcc_version else (nvcc or "not found"),
        "python": f"{platform.python_version()} ({sys.executable})",
        "host": f"{platform.node()}, {os.cpu_count()} logical CPUs",
    }


def child_env() -> dict:
    """The stages' environment: this checkout first on PYTHONPATH (an installed or bare checkout alike: the package
    maps the top-level kernels/ to minillm_fast.kernels itself), unbuffered output, no TRITON_INTERPRET (the Makefile
    exports it; on a GPU the kernels must be compiled, not interpreted)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


# ----------------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"overall seconds (default {DEFAULT_BUDGET_S:.0f}: within 10 minutes)")
    p.add_argument("--stages", help="comma-separated stages to run (default: all; see --list)")
    p.add_argument("--skip", help="comma-separated stages not to run")
    p.add_argument("--serial", action="store_true", help="run the lanes of step 2 one after the other")
    p.add_argument("--out", type=Path, help="results folder (default bench/results/gpu-check-<device>-<date>/)")
    p.add_argument("--archive", type=Path, help="also pack the results folder into this .tar.gz after every stage")
    p.add_argument("--list", action="store_true", help="print the stages and their commands, then exit")
    return p


class Check:
    """One run: the stages' results, the console lines and the files, guarded by a lock (lanes are threads)."""

    def __init__(self, args, env: dict, steps: list, out: Path, budget_s: float, t0: Optional[float] = None):
        self.args, self.env, self.steps, self.out, self.budget_s = args, env, steps, out, budget_s
        self.t0 = time.monotonic() if t0 is None else t0  # the budget counts from the start of the command
        self.deadline = self.t0 + budget_s - END_MARGIN_S
        self.lock = threading.Lock()
        self.results = {s.name: Result(s.name, s.about) for s in stages_of(steps)}
        self.rows_csv = out / "bench.csv"
        self.stopping = False  # set on Ctrl-C / SIGTERM: the lanes start nothing more

    def say(self, msg: str) -> None:
        with self.lock:
            print(f"[{clock(time.monotonic() - self.t0)}] {msg}", flush=True)

    def headline(self) -> Optional[dict]:
        try:
            return headline(read_rows(self.rows_csv))
        except (OSError, csv.Error, KeyError) as e:
            self.say(f"could not read {self.rows_csv}: {e}")
            return None

    def write(self, done: bool = False) -> None:
        h = self.headline()
        results = list(self.results.values())
        elapsed = time.monotonic() - self.t0
        with self.lock:
            (self.out / "summary.md").write_text(render_summary(self.env, results, h, self.budget_s, elapsed, done))
            (self.out / "summary.json").write_text(json.dumps(
                dict(env=self.env, budget_s=self.budget_s, elapsed_s=round(elapsed, 1), done=done,
                     stages=[asdict(r) for r in results], headline=h), indent=1, default=str))
            if self.args.archive:
                self.args.archive.parent.mkdir(parents=True, exist_ok=True)
                part = self.args.archive.with_name(self.args.archive.name + ".part")
                with tarfile.open(part, "w:gz") as tar:
                    tar.add(self.out, arcname=self.out.name)
                os.replace(part, self.args.archive)

    def run_stage(self, stage: Stage, env: dict, missing: dict) -> None:
        r = self.results[stage.name]
        if self.stopping:
            r.status, r.detail = "skipped", "interrupted"
            return
        first = self.results.get(stage.retry_of)
        if stage.retry_of and (first is None or first.status not in ("failed", "timeout")):
            r.status, r.detail = "skipped", f"not needed ({stage.retry_of}: {first.status if first else 'not run'})"
            self.write()
            return
        lacking = [missing[n] for n in stage.needs if missing.get(n)]
        if lacking:
            r.status, r.detail = "skipped", lacking[0]
            self.say(f"{stage.name}: SKIPPED: {lacking[0]}")
            self.write()
            return
        left = self.deadline - time.monotonic()
        if left < MIN_START_S:
            r.status, r.detail = "skipped", f"out of time ({max(left, 0):.0f} s of the budget left)"
            self.say(f"{stage.name}: SKIPPED: {r.detail}")
            self.write()
            return
        r.limit_s = min(stage.cap_s, left)
        log = self.out / f"{stage.name}.log"
        r.log, r.status = log.name, "running"
        self.say(f"{stage.name}: start (limit {r.limit_s:.0f} s): {stage.about}; log {log}")
        self.write()
        rc, r.seconds = run_command(stage.argv, log, r.limit_s, REPO, env,
                                    beat=lambda t, line: self.say(f"{stage.name}: running {t:.0f} s | {line[:110]}"))
        r.rc = rc
        text = log.read_text(errors="replace") if log.exists() else ""
        if stage.kind == "pytest":
            r.detail = pytest_summary(text)
        elif stage.kind == "bench":
            m = re.findall(r"\((\d+) rows appended\)", text)
            r.detail = f"{m[-1]} rows in bench.csv" if m else ""
        if rc is None:
            r.status = "timeout"
            r.detail = (f"killed at its {r.limit_s:.0f} s limit" + (f"; {r.detail}" if r.detail else "") +
                        f"; last: {last_line(log)[:120]}")
        elif rc == 0 or (stage.kind == "pytest" and rc == 5):  # 5: pytest collected nothing (all deselected)
            r.status = "ok"
            if not r.detail:
                r.detail = last_line(log)[:160]
        else:
            r.status = "failed"
            r.detail = ("interrupted; " if self.stopping else "") + f"exit {rc}" + \
                (f"; {r.detail}" if r.detail else f"; last: {last_line(log)[:120]}")
        self.say(f"{stage.name}: {r.status.upper()} in {r.seconds:.0f} s: {r.detail}")
        if stage.name == "bench-headline":
            for line in headline_lines(self.headline()):
                self.say(line)
        self.write()

    def run(self, env: dict, missing: dict) -> None:
        for step in self.steps:
            lanes = [lane for lane in step if lane]
            if len(lanes) == 1 or self.args.serial:
                for lane in lanes:
                    for s in lane:
                        self.run_stage(s, env, missing)
                continue
            pool = concurrent.futures.ThreadPoolExecutor(len(lanes))
            futures = [pool.submit(lambda ln=lane: [self.run_stage(s, env, missing) for s in ln]) for lane in lanes]
            pool.shutdown(wait=False)  # not a `with`: on Ctrl-C, main() must get control back at once
            for f in futures:
                f.result()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _select(steps: list, only: Optional[str], skip: Optional[str]) -> list:
    names = [s.name for s in stages_of(steps)]
    want = [x.strip() for x in (only or "").split(",") if x.strip()]
    drop = [x.strip() for x in (skip or "").split(",") if x.strip()]
    bad = [x for x in want + drop if x not in names]
    if bad:
        raise SystemExit(f"gpu-check: unknown stage(s) {bad}; expected some of {names}")
    keep = lambda s: (not want or s.name in want) and s.name not in drop  # noqa: E731
    return [[[s for s in lane if keep(s)] for lane in step] for step in steps]


def main(argv=None) -> int:
    t0 = time.monotonic()
    args = build_parser().parse_args(argv)
    py = sys.executable
    if args.list:
        steps = plan(py, args.out or RESULTS / "gpu-check-<device>-<date>")
        for k, step in enumerate(steps, 1):
            print(f"step {k}" + (" (lanes side by side)" if len(step) > 1 else ""))
            for lane in step:
                for s in lane:
                    print(f"  {s.name} (limit {s.cap_s:.0f} s{', needs ' + ', '.join(s.needs) if s.needs else ''}): "
                          f"{s.about}\n    $ {shlex.join(s.argv) if s.name != 'native-build' else py + ' -c <build>'}")
        return 0
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - whatever breaks the import, one line
        print(f"gpu-check: torch is not importable ({type(e).__name__}: {e}); run it on a machine with a CUDA build "
              "of torch and an NVIDIA GPU", file=sys.stderr)
        return NO_CUDA_EXIT
    if not torch.cuda.is_available():
        build = "" if torch.version.cuda else f"; torch {torch.__version__} is a CPU-only build"
        print(f"gpu-check: no CUDA device (torch.cuda.is_available() is False{build}); run it on a machine with an "
              "NVIDIA GPU", file=sys.stderr)
        return NO_CUDA_EXIT

    try:
        env = environment(torch)
    except Exception as e:  # noqa: BLE001 - a device that is visible but broken: one line, not a traceback
        print(f"gpu-check: CUDA is visible but its device cannot be queried ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.out or RESULTS / f"gpu-check-{slug(env['device'])}-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    missing = requirements()
    has_plot = importlib.util.find_spec("matplotlib") is not None
    steps = _select(plan(py, out, plot=has_plot), args.stages, args.skip)
    check = Check(args, env, steps, out, args.budget, t0)
    check.say(f"gpu-check on {env['device']} ({env['devices']}); torch {env['torch']}, triton {env['triton']}, "
              f"liger-kernel {env['liger-kernel']}; results in {out}; budget {args.budget:.0f} s")
    for name, why in missing.items():
        if why:
            check.say(f"missing: {why}")
    if not has_plot:
        check.say("missing: matplotlib: the bench writes its CSV without plots")
    if env["liger-kernel"] == "missing":
        check.say("missing: liger-kernel: the Liger rows are reported as missing and the Liger targets as N/A")
    check.write()
    signal.signal(signal.SIGTERM, _interrupt)  # a killed check must not leave its stages running
    try:
        check.run(child_env(), missing)
    except KeyboardInterrupt:
        check.stopping = True
        with _RUNNING_LOCK:
            procs = list(_RUNNING)
        for p in procs:
            _kill_group(p, 2.0)
        for r in check.results.values():
            if r.status == "running":
                r.status, r.detail = "failed", "interrupted"
        check.say("interrupted: the running stages were killed")
        check.write(done=True)
        return 130
    check.write(done=True)
    results = list(check.results.values())
    print("\n" + "\n".join(headline_lines(check.headline())), flush=True)
    print("\nstages:", flush=True)
    for r in results:
        print(f"  {r.name:15s} {r.status:8s} {r.seconds:5.0f} s  {r.detail[:150]}", flush=True)
    status = exit_status(results)
    print(f"\ngpu-check: done in {clock(time.monotonic() - check.t0)}; exit {status}; {out / 'summary.md'}"
          + (f"; archive {args.archive}" if args.archive else ""), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
