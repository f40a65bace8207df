"""``minillm-fast distill`` and ``minillm-fast evaluate`` entry points (``main(argv)`` each; the package CLI and
``python -m minillm_fast.distill`` call them)."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

USAGE = """\
Run SFT, KD, SeqKD, MiniLLM or OKD distillation from a YAML config, with key=value overrides:

    minillm-fast distill --config run.yaml [key=value ...]
    torchrun --nproc_per_node 8 -m minillm_fast.distill --config run.yaml     # data parallel

Writes into output_dir: config.yaml (resolved), metrics.jsonl, checkpoints/, best/ and final/ (save_pretrained),
plots/*.png, eval/results.{json,md}. resume=true continues from the latest checkpoint.
"""


def config_help() -> str:
    """The config keys, their defaults and their help (each field's ``metadata["help"]`` in config.py)."""
    from .config import help_text

    return help_text()


def distill_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="minillm-fast distill", description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (values parsed as YAML)")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    parser.add_argument("--dry-run", action="store_true", help="resolve and check the config, print it, stop")
    args = parser.parse_args(argv)
    if args.help_config:
        print(config_help())
        return 0

    from . import ranks
    from .config import DistillConfig

    # a user's mistake (config, paths, data, models) raises; minillm_fast.cli reports it in one paragraph, exit 2
    try:
        cfg = DistillConfig.from_sources(args.config, args.overrides)
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(cfg.resolve().to_dict(), sort_keys=False))
            return 0
        from .trainer import Trainer

        Trainer(cfg).train()
    except BaseException:
        ranks.destroy(finished=False)
        raise
    ranks.destroy()
    return 0


def evaluate_main(argv: Optional[Sequence[str]] = None) -> int:
    from .evaluate import main

    return main(argv)


main = distill_main
