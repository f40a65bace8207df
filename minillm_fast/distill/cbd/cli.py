"""``minillm-fast cbd`` (also ``python -m minillm_fast.distill.cbd``): build a chain, initialise a student from it."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

USAGE = """\
Chain-based distillation (docs/cbd.md):

    minillm-fast cbd chain --config chain.yaml [--dry-run]
        distil teacher -> anchor 1 -> anchor 2 -> ... (each link an ordinary distill run); anchors, chain.json
        and the links' runs go to the config's output_dir; run it again to continue an interrupted chain
    minillm-fast cbd init --chain runs/chain --student-config config.json --out runs/student-init [--alpha A]
        a student of that config from its two neighbouring anchors, mapped to its shape and interpolated:
        w = (1 - a) w_big + a w_small, a = (P_big - P_student) / (P_big - P_small) unless --alpha
"""


def _log(msg: str) -> None:
    print(f"[minillm-fast cbd] {msg}", file=sys.stderr if msg.startswith("warning") else sys.stdout, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="minillm-fast cbd", description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    c = sub.add_parser("chain", help="build (or continue) a chain of anchors from a YAML config")
    c.add_argument("--config", required=True, help="chain YAML: output_dir, teacher, distill:, anchors: [...]")
    c.add_argument("--dry-run", action="store_true", help="check everything and print the plan; train nothing")
    i = sub.add_parser("init", help="initialise a student from a chain by mapping and interpolation")
    i.add_argument("--chain", required=True, help="the chain folder (holds chain.json)")
    i.add_argument("--student-config", required=True, help="the student's config.json (or a directory with one)")
    i.add_argument("--out", required=True, help="where to write the student (save_pretrained)")
    i.add_argument("--alpha", type=float, default=None,
                   help="weight of the smaller anchor in [0, 1] (default: normalised parameter-count difference)")
    i.add_argument("--allow-extrapolate", action="store_true",
                   help="a student outside the chain's range starts from the nearest member alone")
    i.add_argument("--importance", default="norm", choices=("norm", "leading"),
                   help="which channels a shrinking width keeps (default: norm)")
    i.add_argument("--tokenizer", default=None, help="check that the student's tokenizer is the anchors'")
    args = parser.parse_args(argv)
    if args.action == "chain":
        from .chain import run_chain

        run_chain(args.config, dry_run=args.dry_run, log=_log)
        return 0
    from .init import init_student

    init_student(args.chain, args.student_config, args.out, alpha=args.alpha,
                 allow_extrapolate=args.allow_extrapolate, importance=args.importance, tokenizer=args.tokenizer,
                 log=_log)
    return 0
