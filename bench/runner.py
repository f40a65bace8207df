"""Where bench results go, and how a batch of measurement jobs runs (a fresh subprocess per batch on CPU, so that
one job's allocations and thread pools do not leak into the next; in this process on CUDA). Shared by
``python -m bench`` (bench/cli.py) and ``python -m bench e2e`` (bench/e2e_cli.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"


def csv_list(s: str) -> list:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (an argparse type)."""
    return [x.strip() for x in s.split(",") if x.strip()]


class Runner:
    """Runs a batch of job specs in one fresh subprocess (CPU) or in this process (CUDA, or --in-process)."""

    def __init__(self, in_process: bool, tmp: Path, timeout: float, threads: int):
        self.in_process, self.tmp, self.timeout, self.threads = in_process, tmp, timeout, threads
        self.count = 0

    def __call__(self, specs: list) -> list:
        if self.in_process:
            from .worker import run_spec

            results = [run_spec(s) for s in specs]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return results
        self.count += 1
        spec_path, result_path = self.tmp / f"job{self.count}.json", self.tmp / f"job{self.count}.result.json"
        log_path = self.tmp / f"job{self.count}.log"
        spec_path.write_text(json.dumps(specs))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                   OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        timeout = self.timeout * len(specs)
        try:
            with open(log_path, "w") as log:
                proc = subprocess.run([sys.executable, "-m", "bench.worker", str(spec_path), str(result_path)],
                                      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [dict(status="error", error=f"timed out after {timeout:.0f} s (--timeout)")] * len(specs)
        if proc.returncode == 0 and result_path.exists():
            return json.loads(result_path.read_text())
        tail = log_path.read_text()[-600:].strip().replace("\n", " | ")
        if proc.returncode in (-9, 137):
            failed = dict(status="oom", error=f"worker killed (signal 9: out of memory?) {tail}")
        else:
            failed = dict(status="error", error=f"worker exited with {proc.returncode}: {tail}")
        return [failed] * len(specs)
