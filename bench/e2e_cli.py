"""``python -m bench e2e``: tokens/s and peak memory of a MiniLLM training step and of a
rollout on the demo's models, fused ops against materialised logits (bench/e2e.py has the workloads; bench/README.md
the method).

    python -m bench e2e                                   # train + rollout, V = 2048 (demo), 32000, 50257, 2 threads
    python -m bench e2e --vocab 50257 --threads 1,2       # one vocabulary, both thread counts
    python -m bench e2e --quick                           # tiny models and sizes: checks the harness end to end
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from . import e2e, report
from .runner import DEFAULT_OUT, Runner, csv_list

# The demo's MiniLLM schedule (minillm_fast/demo/pipeline.py): batch_size 16, pt_batch_size 8, rollout_batch_size 64,
# max_new_tokens 56. Prompts of 64 tokens (ragged, 33-64) and corpus rows of 128 tokens are this benchmark's choice.
DEFAULTS = dict(batch=16, pt_rows=8, pt_len=128, rollout_batch=64, prompt_len=64, new_tokens=56)
QUICK = dict(batch=2, pt_rows=2, pt_len=12, rollout_batch=2, prompt_len=6, new_tokens=4)
QUICK_VOCAB = 515


def _vocab(s: str) -> list:
    out = []
    for x in csv_list(s):
        out.append(e2e.DEMO_VOCAB if x == "demo" else int(x))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", type=csv_list, default=list(e2e.STEPS), help="train, rollout (default both)")
    p.add_argument("--impl", type=csv_list, default=list(e2e.IMPLS), help="fused, materialised (default both)")
    p.add_argument("--vocab", type=_vocab, help=f"comma-separated vocabularies; 'demo' = {e2e.DEMO_VOCAB} "
                   f"(default demo,32000,50257; {QUICK_VOCAB} with --quick)")
    p.add_argument("--family", type=csv_list, default=["gpt2"], help="gpt2, llama: the demo config family "
                   "(default gpt2)")
    p.add_argument("--threads", type=lambda s: [int(x) for x in csv_list(s)], default=[2],
                   help="comma-separated torch thread counts on CPU (default 2)")
    p.add_argument("--reps", type=int, help="timed calls per case (default 3; 1 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed calls before the memory call (default 1; 0 with --quick)")
    p.add_argument("--backend", default="auto", help="backend of the fused ops (default auto: native on CPU when "
                   "built, triton on CUDA)")
    p.add_argument("--alpha", type=float, default=0.2, help="teacher weight of the rollout mixture (default 0.2)")
    for key, what in (("batch", "rollouts per training step"), ("pt_rows", "corpus rows per training step"),
                      ("pt_len", "tokens per corpus row"), ("rollout_batch", "prompts per rollout"),
                      ("prompt_len", "prompt tokens (ragged: half to all of it)"),
                      ("new_tokens", "response tokens (train: ragged, up to it; rollout: decoding steps)")):
        p.add_argument("--" + key.replace("_", "-"), type=int, dest=key,
                       help=f"{what} (default {DEFAULTS[key]}; {QUICK[key]} with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="the demo's quick models, tiny sizes, one worker: a smoke run")
    p.add_argument("--out", type=Path, help=f"folder for e2e.csv and the PNG (default {DEFAULT_OUT}; its quick/ "
                   "subfolder with --quick)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per case")
    p.add_argument("--in-process", action="store_true",
                   help="run CPU cases in this process (debugging; memory numbers are then not isolated)")
    return p


def _check(args, device: torch.device) -> None:
    for key in DEFAULTS:
        if getattr(args, key) is None:
            setattr(args, key, (QUICK if args.quick else DEFAULTS)[key])
    if args.vocab is None:
        args.vocab = [QUICK_VOCAB] if args.quick else [e2e.DEMO_VOCAB, 32000, 50257]
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    problems = [f"--step {s!r} is not one of {e2e.STEPS}" for s in args.step if s not in e2e.STEPS]
    problems += [f"--impl {i!r} is not one of {e2e.IMPLS}" for i in args.impl if i not in e2e.IMPLS]
    problems += [f"--family {f!r} is not one of {e2e.FAMILIES}" for f in args.family if f not in e2e.FAMILIES]
    if min(args.threads) < 1 or args.reps < 1 or args.warmup < 0:
        problems.append("--threads and --reps must be >= 1, --warmup >= 0")
    if min(args.vocab) <= e2e.FIRST_ID:
        problems.append(f"--vocab must be > {e2e.FIRST_ID}")
    if min(getattr(args, k) for k in DEFAULTS) < 1 or args.prompt_len < 2:
        problems.append("sizes must be >= 1 (--prompt-len >= 2)")
    if args.prompt_len + args.new_tokens > 256 or args.pt_len > 256:
        problems.append("the demo models have 256 positions: --prompt-len + --new-tokens and --pt-len must fit")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    if device.type == "cuda":
        args.threads = [args.threads[0]]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    _check(args, device)
    out_dir = args.out or (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    print(f"device: {report.environment(device, args.threads[0])['device']}"
          + (f", torch threads: {','.join(map(str, args.threads))}" if device.type == "cpu" else ""))
    quick = ", quick shapes" if args.quick else ""
    print(f"models: demo configs ({','.join(args.family)}{quick}), random init, fp32 | "
          f"train: {args.batch} rollouts ({args.prompt_len} prompt + <= {args.new_tokens} response tokens) + "
          f"{args.pt_rows} corpus rows of {args.pt_len} | rollout: {args.rollout_batch} prompts x {args.new_tokens} "
          f"new tokens")
    print(f"timing: median of {args.reps} calls after {args.warmup} warm-up call(s) and 1 memory call; memory: "
          + ("peak RSS above the models and inputs, each case in a fresh worker process" if device.type == "cpu"
             and not (args.quick or args.in_process) else
             "torch.cuda.max_memory_allocated above the models and inputs" if device.type == "cuda" else
             "peak RSS above the models and inputs (one worker for all cases)" if args.quick else
             "peak RSS above the models and inputs, in this process"))

    cases = [(threads, step, family, vocab, impl) for threads in args.threads for step in args.step
             for family in args.family for vocab in args.vocab for impl in args.impl]
    rows = []
    with tempfile.TemporaryDirectory(prefix="minillm-bench-e2e-") as tmp:
        for threads in args.threads:
            env = report.environment(device, threads)
            env["transformers"] = report._version("transformers")
            mine = [c for c in cases if c[0] == threads]
            specs = [e2e.spec_of(step=s, impl=i, family=f, vocab=v, threads=t, device=str(device), args=args)
                     for t, s, f, v, i in mine]
            run = Runner(args.in_process or device.type == "cuda", Path(tmp), args.timeout, threads)
            if args.quick and not run.in_process:
                results = run(specs)
            else:
                results = []
                for spec in specs:
                    print(f"  {spec['step']:<8} {spec['family']} V={spec['vocab']:<6} {spec['impl']:<12} "
                          f"threads={threads} ...", end="", flush=True)
                    res = run([spec])[0]
                    print(f" {res.get('tokens_per_s', 0):.0f} tokens/s" if res.get("status") == "ok" else
                          f" {res.get('status')}: {res.get('error', '')[:200]}", flush=True)
                    results.append(res)
            for spec, res in zip(specs, results):
                rows.append(report.e2e_row(env, spec, res))
    report.e2e_add_ratios(rows)
    print()
    report.publish(rows, out_dir, report.e2e_table, None if args.no_plot else report.e2e_plot, name="e2e.csv",
                   columns=report.E2E_COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
