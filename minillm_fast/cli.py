"""``minillm-fast`` command line.

  demo      the built-in default job
  distill   SFT / KD / SeqKD / MiniLLM distillation from a YAML config (minillm_fast/distill/)
  evaluate  sampled responses, Rouge-L and exact match over seeds
  bench     microbenchmarks of bench/ against the naive reference, Liger-Kernel and the matmul floor

Each subcommand has its own ``--help``.
"""
from __future__ import annotations

import sys


def _demo(argv: list) -> int:
    from .demo.pipeline import main as demo_main

    return demo_main(argv)


def _distill(argv: list) -> int:
    from .distill.cli import distill_main

    return distill_main(argv)


def _evaluate(argv: list) -> int:
    from .distill.cli import evaluate_main

    return evaluate_main(argv)


def _bench(argv: list) -> int:
    """Forward to bench/cli.py, which lives in the source checkout beside the package (not installed with it)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if (root / "bench" / "cli.py").exists() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from bench.cli import main as bench_main
    except ImportError as e:
        print(f"minillm-fast bench: the benchmarks ship with the source checkout (bench/ beside minillm_fast/); "
              f"install from a clone with `pip install -e .[bench]` ({e})", file=sys.stderr)
        return 2
    return bench_main(argv)


COMMANDS = {"demo": _demo, "distill": _distill, "evaluate": _evaluate, "bench": _bench}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nminillm-fast: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}",
                  file=sys.stderr)
            return 2
        return 0 if argv else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
