"""Subprocess entry point: ``python -m bench.worker SPECS.json RESULTS.json`` runs a list of jobs of bench/measure.py
in order and writes the list of their results.

The parent (bench/cli.py) starts one worker per job on CPU, so every implementation is measured in a fresh
process: its peak resident memory is its own and no allocator or compile cache is shared between implementations.
"""
from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    spec_path, result_path = (argv or sys.argv[1:])[:2]
    with open(spec_path) as f:
        specs = json.load(f)
    from .measure import run_job  # after reading the spec: import costs are not part of any measurement anyway

    results = [run_job(spec) for spec in specs]
    with open(result_path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
