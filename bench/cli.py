"""``python -m bench``: time and memory of every op against the naive reference, the peers
and the matmul floor, on named shape presets. See bench/README.md.

    python -m bench --quick                                    # tiny shapes, checks the harness end to end
    python -m bench --preset issue3,liger-cpu --mode fwd_bwd   # the issue's CPU tables
    python -m bench --list                                     # presets, ops, implementations
    python -m bench e2e ...                                    # end to end: a MiniLLM training step and a rollout
    python -m bench plot [CSV]                                 # redraw the PNGs of a results CSV (no timing)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import cases, measure, report, shapes
from .runner import DEFAULT_OUT, Runner, csv_list


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", type=csv_list, help="comma-separated presets (default: issue3,liger-cpu on CPU; "
                   "gpu,llama3,qwen2.5 on CUDA; tiny with --quick); see --list")
    p.add_argument("--op", type=csv_list, help="comma-separated ops (default: all benchmarked ops)")
    p.add_argument("--divergence", type=csv_list, default=["reverse_kl"],
                   help="fused_divergence's divergence(s), comma-separated, or 'all' "
                        f"({', '.join(cases.DIVERGENCE_NAMES)}; default reverse_kl)")
    p.add_argument("--mode", type=csv_list, default=list(measure.MODES),
                   help="comma-separated: fwd, bwd, fwd_bwd (default: all three)")
    p.add_argument("--impl", type=csv_list,
                   help="comma-separated implementations (default: all; the floor is always measured)")
    p.add_argument("--tokens", type=lambda s: [int(x) for x in csv_list(s)],
                   help="comma-separated token counts N, overriding the presets' sweeps")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16, overriding the presets' dtype")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU (default 2)")
    p.add_argument("--reps", type=int, help="timed repetitions per mode on CPU (default 5; 3 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed runs per mode before timing, after the memory run "
                   "(default 1; 0 with --quick)")
    p.add_argument("--gpu-warmup-ms", type=float, default=100.0, help="do_bench warm-up budget (CUDA)")
    p.add_argument("--gpu-rep-ms", type=float, default=1000.0, help="do_bench measuring budget (CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.5, help="jsd's beta")
    p.add_argument("--skew", type=float, default=0.1, help="skew_*_kl's skew")
    p.add_argument("--alpha", type=float, default=0.2, help="teacher weight of the rollout mixture (sampling ops)")
    p.add_argument("--chunk-size", type=int, help="rows per chunk of our chunked strategy (default: automatic)")
    p.add_argument("--liger-compile", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile Liger's chunked loss, as it ships (auto: on, off with --quick)")
    p.add_argument("--liger-chunk-size", type=int, default=1024, help="Liger chunked loss chunk_size (its default)")
    p.add_argument("--quick", action="store_true", help="tiny shapes only: checks the harness end to end")
    p.add_argument("--out", type=Path, help=f"output folder for the CSV and the PNGs (default {DEFAULT_OUT}; "
                   "its quick/ subfolder with --quick)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="skip the check against the fp32 reference")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per job (one impl, one shape)")
    p.add_argument("--in-process", action="store_true",
                   help="run CPU jobs in this process (debugging; memory numbers are then not isolated)")
    p.add_argument("--list", action="store_true", help="list presets, ops and implementations, then exit")
    return p


# ----------------------------------------------------------------------------------------------------------------------
# running jobs
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    kind: str  # truth | floor | impl
    case: cases.Case
    shape: shapes.Shape
    opts: dict
    base: dict  # the CSV fields shared by every row of this shape and op variant
    modes: list
    truth_path: str
    impl: Optional[cases.Impl] = None

    def spec(self, args, device: torch.device) -> dict:
        return dict(kind=self.kind, op=self.case.op, opts=self.opts, shape=self.shape.to_dict(), device=str(device),
                    seed=args.seed, threads=args.threads, reps=args.reps, warmup=args.warmup, modes=self.modes,
                    impl=self.impl.name if self.impl else None, truth_path=self.truth_path,
                    tol=measure.TOLERANCE[self.shape.dtype])


def _opts(args, divergence: str) -> dict:
    return dict(divergence=divergence, temperature=args.temperature, beta=args.beta, skew=args.skew, alpha=args.alpha,
                chunk_size=args.chunk_size, liger_compile=args.liger_compile == "on" or
                (args.liger_compile == "auto" and not args.quick), liger_chunk_size=args.liger_chunk_size,
                gpu_warmup_ms=args.gpu_warmup_ms, gpu_rep_ms=args.gpu_rep_ms)


def _base(env: dict, preset, case, opts: dict, shape: shapes.Shape) -> dict:
    return dict(env, preset=preset.name, op=case.op, variant=case.variant(opts), tokens=shape.tokens, hs=shape.hs,
                ht=shape.ht, vocab=shape.vocab, vocab_pad=shape.vocab_pad, dtype=shape.dtype, shape=shape.label())


def _rows_from(result: dict, base: dict, impl: str, modes: list, note: str = "") -> list:
    rows = []
    verify = result.get("verify") or {}
    for mode in modes:
        r = dict(base, impl=impl, mode=mode, verify_loss_err=verify.get("loss_err", ""),
                 verify_grad_err=verify.get("grad_err", ""))
        m = (result.get("modes") or {}).get(mode)
        if result.get("status") != "ok" or m is None:
            r.update(status=result.get("status", "error"), notes=result.get("error", "no result"))
        elif m.get("status") != "ok":
            r.update(status=m["status"], notes=m.get("error", ""))
        else:
            peak = m.get("peak_extra_bytes")
            r.update(status="ok", median_ms=m["median_ms"], p20_ms=m["p20_ms"], p80_ms=m["p80_ms"],
                     min_ms=m["min_ms"], max_ms=m["max_ms"], reps=m["reps"],
                     peak_extra_mib=(peak / measure.MIB) if isinstance(peak, (int, float)) else "",
                     mem_method=m.get("mem_method") or "", floor_flops=m.get("flops", ""), notes=note)
        rows.append(r)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------------
def _list() -> str:
    lines = ["presets:", shapes.describe(), "", "ops and implementations:"]
    for case in cases.CASES.values():
        lines.append(f"  {case.op}: {case.about}")
        lines.append("    " + ", ".join(["floor"] + [i.name for i in case.impls]))
    pending = cases.pending_ops()
    if pending:
        lines.append(f"  in minillm_fast but not benchmarked yet: {', '.join(pending)} (bench/cases.py)")
    lines += ["", "end to end (a MiniLLM training step and a rollout on the demo's models): python -m bench e2e --help"]
    return "\n".join(lines)


def _resolve(args) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return torch.device(args.device)


def _selection(args, device: torch.device):
    """Check the command line against presets, ops, modes, divergences and implementations; SystemExit if wrong."""
    if args.reps is None:
        args.reps = 3 if args.quick else 5
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    if args.threads < 1 or args.reps < 1 or args.warmup < 0:
        raise SystemExit("error: --threads and --reps must be >= 1, --warmup >= 0")
    try:
        presets = [shapes.get(p) for p in (args.preset or (["tiny"] if args.quick else
                                                            list(shapes.DEFAULT_PRESETS[device.type])))]
        op_cases = [cases.get(o) for o in (args.op or list(cases.CASES))]
        modes = [measure.MODE_ALIASES.get(m, m) for m in args.mode]
        bad = [m for m in modes if m not in measure.MODES]
        if bad:
            raise ValueError(f"--mode {bad} is not known; expected some of {measure.MODES}")
        divs = list(cases.DIVERGENCE_NAMES) if args.divergence == ["all"] else args.divergence
        bad = [d for d in divs if d not in cases.DIVERGENCE_NAMES]
        if bad:
            raise ValueError(f"--divergence {bad} is not known; expected some of {cases.DIVERGENCE_NAMES}")
        known = {"floor"} | {i.name for c in op_cases for i in c.impls}
        bad = [i for i in args.impl or [] if i not in known]
        if bad:
            raise ValueError(f"--impl {bad} is not known for the selected ops; expected some of {sorted(known)}")
        if args.quick and args.tokens and max(args.tokens) > 4096:
            raise ValueError("--quick is for tiny sizes; drop --quick to benchmark real shapes")
        sweeps = [(p, p.shapes(device.type, args.tokens, args.dtype)) for p in presets]
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return sweeps, op_cases, modes, divs


def _plan(args, device, env, sweeps, op_cases, modes, divs, tmp: Path):
    """Rows for the implementations that cannot run here, and the batches of jobs for those that can. On CPU each
    batch runs in one fresh worker process: the references and floor of a shape together, then every
    implementation alone on every shape (with --quick, everything in one worker: start-up would dominate)."""
    rows, batches = [], {}
    for k, (preset, sweep, case, opts) in enumerate(
            (p, sw, c, _opts(args, d)) for p, sw in sweeps for c in op_cases
            for d in (divs if c.op == "fused_divergence" else divs[:1])):
        case_modes = [m for m in modes if m in case.modes]
        runnable = []
        for impl in case.impls:
            if args.impl and impl.name not in args.impl:
                continue
            reason = impl.check(device, opts)
            if reason is None:
                runnable.append(impl)
                continue
            status = "missing" if reason.startswith("missing") else "unsupported"
            rows += [dict(_base(env, preset, case, opts, shape), impl=impl.name, mode=m, status=status,
                          notes=reason.split(": ", 1)[-1]) for shape in sweep for m in case_modes]
        for j, shape in enumerate(sweep):
            base = _base(env, preset, case, opts, shape)
            truth = "" if args.no_verify or case.truth is None else str(tmp / f"truth{k}-{j}.pt")
            prep = ([Job("truth", case, shape, opts, base, [], truth)] if truth else []) + \
                [Job("floor", case, shape, opts, base, case_modes, truth)]
            impl_jobs = [Job("impl", case, shape, opts, base, case_modes, truth, i) for i in runnable]
            if args.quick:
                batches.setdefault("all", []).extend(prep + impl_jobs)
            else:
                batches[len(batches)] = prep
                batches.update({len(batches) + i: [job] for i, job in enumerate(impl_jobs)})
    return rows, list(batches.values())  # in order: a shape's references before the implementations using them


class _Lines:
    """tqdm's calls used below, as a printed line per batch of jobs started: for a bare GPU image without tqdm
    (bench/gpu_check.py)."""

    def __init__(self, total: int, desc: str, **_):
        self.total, self.desc, self.n = total, desc, 0

    def set_postfix_str(self, s: str) -> None:
        print(f"{self.desc}: {self.n}/{self.total} jobs done; now {s}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        print(f"{self.desc}: {self.n}/{self.total} jobs done", file=sys.stderr, flush=True)


def _run(args, device, batches: list, tmp: Path) -> list:
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = _Lines

    run = Runner(args.in_process or device.type == "cuda", tmp, args.timeout, args.threads)
    rows, unverified = [], {}
    bar = tqdm(total=sum(len(b) for b in batches), desc="bench", unit="job", dynamic_ncols=True)
    for batch in batches:
        first = batch[0]
        what = first.impl.name if first.impl else "reference+floor"
        bar.set_postfix_str(f"{len(batch)} jobs in one worker" if len(batch) > 2 else
                            f"{first.base['preset']} {first.case.op} N={first.shape.tokens} {what}")
        for job, res in zip(batch, run([j.spec(args, device) for j in batch])):
            if job.kind == "truth":
                if res.get("status") != "ok":
                    unverified[job.truth_path] = f"unverified: reference failed ({res.get('error', '')[:150]})"
            elif job.kind == "floor":
                note = "the matmuls of docs/design.md section 4 alone"
                if res.get("layouts"):
                    note += f" (faster layout per phase: {res['layouts']})"
                rows += _rows_from(res, job.base, "floor", job.modes, note=note)
            else:
                note = "; ".join(filter(None, [job.impl.note(job.opts), unverified.get(job.truth_path, "")]))
                rows += _rows_from(res, job.base, job.impl.name, job.modes, note=note)
            bar.update(1)
    bar.close()
    return rows


def replot(argv=None) -> int:
    """``python -m bench plot [CSV ...] [--out DIR]``: redraw the PNGs of results CSVs without timing anything.
    bench.csv: one set per run (the rows sharing a ``date``), named with that date. e2e.csv: one PNG per model family
    from the latest row of every case (step, vocabulary, threads, implementation), named with the latest date."""
    p = argparse.ArgumentParser(prog="python -m bench plot", description=replot.__doc__)
    p.add_argument("csv", nargs="*", type=Path, default=[DEFAULT_OUT / "bench.csv"],
                   help=f"results CSV(s) (default {DEFAULT_OUT / 'bench.csv'})")
    p.add_argument("--out", type=Path, help="folder for the PNGs (default: the CSV's folder)")
    args = p.parse_args(argv)
    for path in args.csv:
        if not path.exists():
            raise SystemExit(f"error: {path} does not exist")
        rows = report.read_csv(path)
        if not rows:
            continue
        out = args.out or path.parent
        if "step" in rows[0]:  # e2e.csv: the latest measurement of every case, in one plot per family
            latest = {}
            for r in rows:
                latest[(r["device"], r["family"], r["dtype"], r["step"], r["vocab"], r["threads"], r["impl"])] = r
            pngs = report.e2e_plot(list(latest.values()), out, report.stamp_of(max(r["date"] for r in rows)))
        else:
            runs = {}
            for r in rows:
                runs.setdefault(r["date"], []).append(r)
            pngs = [png for date, rs in runs.items() for png in report.plot(rs, out, report.stamp_of(date))]
        for png in pngs:
            print(f"plot: {png}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "e2e":
        from . import e2e_cli

        return e2e_cli.main(argv[1:])
    if argv and argv[0] == "plot":
        return replot(argv[1:])
    args = build_parser().parse_args(argv)
    if args.list:
        print(_list())
        return 0
    device = _resolve(args)
    sweeps, op_cases, modes, divs = _selection(args, device)
    out_dir = args.out or (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    env = report.environment(device, args.threads)
    print(f"device: {env['device']}" + (f", torch threads: {args.threads}" if device.type == "cpu" else "")
          + f" | torch {env['torch']}, triton {env['triton']}, liger-kernel {env['liger_kernel']}, "
          f"torchtune {env['torchtune']} | commit {env['commit']}")
    if device.type == "cpu":
        where = ("in this process (--in-process)" if args.in_process else
                 "all jobs in one worker process (--quick)" if args.quick else "each job in a fresh worker process")
        print(f"timing: median of {args.reps} runs after 1 memory run and {args.warmup} warm-up run(s); "
              f"memory: peak RSS above the inputs; {where}")
    else:
        print("timing: triton.testing.do_bench (CUDA events for the backward alone); memory: "
              "torch.cuda.max_memory_allocated above the inputs")

    with tempfile.TemporaryDirectory(prefix="minillm-bench-") as tmp:
        rows, batches = _plan(args, device, env, sweeps, op_cases, modes, divs, Path(tmp))
        rows += _run(args, device, batches, Path(tmp))

    names = dict.fromkeys(["floor", "naive"] + [i.name for c in op_cases for i in c.impls])
    order = {name: k for k, name in enumerate(names)}
    rows.sort(key=lambda r: (r["preset"], r["op"], r["variant"], r["tokens"], order.get(r["impl"], 99),
                             measure.MODES.index(r["mode"])))
    report.add_ratios(rows)
    report.publish(rows, out_dir, report.table, None if args.no_plot else report.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
