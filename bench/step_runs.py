"""What the training-step benches (bench/trl_step.py, bench/kd_cache_step.py) share: each case in a fresh Python
process (one case's allocator state and warmed caches cannot leak into the next), the machine's name, and the
append-only CSV they write."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

from bench import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> str:
    """``"<CPU model>, <n> logical cores"``: the machine a step bench ran on, for its table and CSV."""
    return f"{report.cpu_model()}, {os.cpu_count()} logical cores"


def commit() -> str:
    return report.commit()


def run_in_subprocess(module: str, spec: dict, timeout: float, env: dict) -> dict:
    """``python -m <module> --case <spec as JSON>`` from the repository root with ``env`` added to the environment;
    the case's result is the last line of its stdout that starts with ``{`` (JSON). A failure or a timeout is a
    result too: ``{"status": "error", "error": <last line of stderr>}`` or ``{"status": "timeout"}``."""
    try:
        proc = subprocess.run([sys.executable, "-m", module, "--case", json.dumps(spec)], cwd=ROOT,
                              env=dict(os.environ, **env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(status="timeout")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return dict(status="error", error=((proc.stderr or proc.stdout).strip().splitlines() or ["?"])[-1])
    return json.loads(lines[-1])


def ratios(res: dict, ref: dict) -> tuple[str, str]:
    """``(speed-up, memory ratio)`` of a case against the reference case's, formatted; empty when the reference did
    not run."""
    if ref.get("status") != "ok":
        return "", ""
    return (f"{res['tokens_per_s'] / ref['tokens_per_s']:.2f}", f"{res['peak_extra_mib'] / ref['peak_extra_mib']:.2f}")


def append_csv(path: str, rows: list) -> None:
    """Append ``rows`` (dicts) to the CSV at ``path``, with the header of the file when it exists (keys it lacks
    are dropped), else with every key of ``rows`` in first-seen order."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    new = not os.path.exists(path)
    if not new:
        with open(path) as f:
            keys = next(csv.reader(f), keys)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
