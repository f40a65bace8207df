"""``minillm-fast`` command line.

  demo      the built-in default job
  distill   SFT / KD / SeqKD / MiniLLM distillation from a YAML config (minillm_fast/distill/)
  evaluate  sampled responses, Rouge-L and exact match over seeds
  teacher-cache  a teacher's top-k log-probs over the training responses, for offline KD (teacher_cache: in a config)
  cbd       chain-based distillation: `cbd chain` distils a chain of anchors, `cbd init` a student from it (docs/cbd.md)
  chain     the same as `cbd chain`
  init      the same as `cbd init`

The microbenchmarks are not part of the package: `python -m bench` from a source checkout (bench/README.md).
Each subcommand has its own ``--help``. ``--debug`` (anywhere on the line) shows the traceback of an error that is
otherwise reported in one paragraph.
"""
from __future__ import annotations

import sys

# What a user's mistake raises (a config, a path, data, a model or a pair of models the package refuses, a missing
# extra): reported in one paragraph with exit code 2, the traceback only with --debug. Anything else is a bug and
# keeps its traceback.
EXIT_USER_ERROR = 2
# The modules of the `train` extra (pyproject.toml) and what they are imported as.
TRAIN_MODULES = {"transformers", "tokenizers", "rouge_score", "yaml", "tqdm", "matplotlib"}


def _demo(argv: list) -> int:
    from .demo.pipeline import main as demo_main

    return demo_main(argv)


def _distill(argv: list) -> int:
    from .distill.cli import distill_main

    return distill_main(argv)


def _evaluate(argv: list) -> int:
    from .distill.cli import evaluate_main

    return evaluate_main(argv)


def _teacher_cache(argv: list) -> int:
    from .distill.teacher_cache import main as cache_main

    return cache_main(argv)


def _cbd(argv: list) -> int:
    from .distill.cbd.cli import main as cbd_main

    return cbd_main(argv)


def _chain(argv: list) -> int:
    return _cbd(["chain", *argv])


def _init(argv: list) -> int:
    return _cbd(["init", *argv])


COMMANDS = {"demo": _demo, "distill": _distill, "evaluate": _evaluate, "teacher-cache": _teacher_cache, "cbd": _cbd,
            "chain": _chain, "init": _init}


def _user_error(e: BaseException) -> bool:
    from .native import NativeBuildError

    return isinstance(e, (ValueError, OSError, ImportError, NativeBuildError)) or type(e).__name__ in (
        "OutOfMemoryError", "DemoError", "TrainingError")


def describe(e: BaseException) -> str:
    """One paragraph for a user's error (a missing extra says which to install)."""
    if isinstance(e, ImportError):
        missing = (getattr(e, "name", None) or "").split(".")[0]
        if missing in TRAIN_MODULES:
            return (f"this command needs the optional dependencies of the 'train' extra (missing module "
                    f"{missing!r}): pip install 'minillm-fast[train]'")
        if missing == "peft":
            return "method=okd needs peft, the 'okd' extra: pip install 'minillm-fast[okd]'"
    text = str(e).strip() or type(e).__name__
    return text if isinstance(e, ValueError) else f"{type(e).__name__}: {text}"


def run_command(name: str, fn, argv: list, debug: bool = False) -> int:
    """Run a subcommand; a user's error becomes one paragraph on stderr and exit code 2 (``debug``: re-raised)."""
    try:
        return fn(argv)
    except KeyboardInterrupt:
        print(f"minillm-fast {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted below: user errors are reported, bugs re-raised
        if debug or not _user_error(e):
            raise
        print(f"minillm-fast {name}: error: {describe(e)}\n(run again with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_USER_ERROR


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] == "bench":
        print("minillm-fast: the benchmarks ship with the source checkout, not the package: run `python -m bench` "
              "there (bench/README.md)", file=sys.stderr)
        return EXIT_USER_ERROR
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nminillm-fast: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}",
                  file=sys.stderr)
            return 2
        return 0 if argv else 2
    return run_command(argv[0], COMMANDS[argv[0]], argv[1:], debug)


if __name__ == "__main__":
    sys.exit(main())
