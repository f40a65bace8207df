"""Subprocess entry point: ``python -m bench.worker SPECS.json RESULTS.json`` runs a list of jobs in order (those of
bench/measure.py, and the end-to-end cases of bench/e2e.py: ``kind == "e2e"``) and writes the list of their results.

The parent (bench/cli.py) starts one worker per job on CPU, so every implementation is measured in a fresh
process: its peak resident memory is its own and no allocator or compile cache is shared between implementations.
"""
from __future__ import annotations

import json
import sys


def run_spec(spec: dict) -> dict:
    """One job: an end-to-end case (bench/e2e.py) or a microbenchmark job (bench/measure.py)."""
    if spec.get("kind") == "e2e":
        from .e2e import run_case

        return run_case(spec)
    from .measure import run_job

    return run_job(spec)


def main(argv=None) -> int:
    spec_path, result_path = (argv or sys.argv[1:])[:2]
    with open(spec_path) as f:
        specs = json.load(f)
    results = [run_spec(spec) for spec in specs]
    with open(result_path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
