"""``python -m minillm_fast.demo.same_init``: KD, SeqKD and MiniLLM from one SFT checkpoint, for the same number of
optimiser steps, with learning curves: does MiniLLM lower its own objective faster than the others at equal cost?

The demo trains KD and SeqKD from the initial student and MiniLLM from the SFT checkpoint of lowest validation loss
(as the paper does), so its table compares methods that start from different places. This experiment takes a
finished demo run (``--demo``, default ``runs/demo``) and trains the three from that same SFT checkpoint with the
demo's own settings (its ``configs/*.yaml``), MiniLLM for as many steps as KD (at its own lr and at KD's), each
evaluated at step 0 and every ``--eval-interval`` steps on ``--valid-samples`` validation prompts (the validation
reverse KL on the student's own samples and Rouge-L). It writes ``OUT/same_init.md`` (the table: each method's
numbers at step 0, at the end, and at KD's optimiser seconds) and ``OUT/curves.png`` (demo/curves.py), with the runs
under ``OUT/runs/``.

    python -m minillm_fast.demo.same_init --demo runs/demo --out runs/same_init
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from . import curves
from .pipeline import DemoError, Job, _write_yaml, run_jobs

METHODS = (("kd", "KD"), ("seqkd", "SeqKD"), ("minillm", "MiniLLM"), ("minillm_kd_lr", "MiniLLM at KD's lr"))


def configs(demo: Path, out: Path, *, eval_interval: int, valid_samples: int) -> Dict[str, dict]:
    """Each method's demo config with the SFT checkpoint as the student, KD's step count, more frequent evaluations
    and an evaluation at step 0; SeqKD reads the teacher's responses the demo stored."""
    sft_init, seqkd_data = demo / "models" / "sft_min_valid_loss", demo / "models" / "seqkd_train.jsonl"
    for path, what in ((sft_init / "config.json", "the SFT checkpoint MiniLLM starts from"),
                       (seqkd_data, "the teacher's SeqKD responses")):
        if not path.exists():
            raise FileNotFoundError(f"--demo {str(demo)!r} has no {path.relative_to(demo)} ({what}): pass the folder "
                                    f"of a finished 'minillm-fast demo' run")
    out_cfgs = {}
    for name in ("kd", "seqkd", "minillm"):
        path = demo / "configs" / f"{name}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"--demo {str(demo)!r} has no configs/{name}.yaml")
        out_cfgs[name] = yaml.safe_load(path.read_text())
    # the demo's MiniLLM lr is 6x smaller than KD's (tuned for stability at 160 steps): the same run at KD's lr tells
    # whether the gap between them is the method or the step size
    out_cfgs["minillm_kd_lr"] = dict(out_cfgs["minillm"], lr=out_cfgs["kd"]["lr"])
    steps = int(out_cfgs["kd"]["total_iters"])
    for name, cfg in out_cfgs.items():
        cfg.update(student=str(sft_init), output_dir=str(out / "runs" / name), total_iters=steps,
                   eval_interval=eval_interval, save_interval=steps, eval_on_start=True,
                   max_valid_samples=valid_samples, warmup_steps=min(int(cfg.get("warmup_steps") or 0), steps // 10))
        if name == "seqkd":
            cfg["seqkd_data"] = str(seqkd_data)
    return out_cfgs


def _at_seconds(series: List[dict], seconds: float) -> Optional[dict]:
    """The last evaluation of ``series`` made within ``seconds`` of optimiser time."""
    within = [p for p in series if p["seconds"] <= seconds]
    return within[-1] if within else None


def summary(out: Path) -> List[str]:
    """The markdown table of the runs under ``out/runs``: step 0, the end, and each run at KD's optimiser seconds."""
    runs = {name: curves.series(out / "runs" / name) for name, _ in METHODS}
    runs = {name: s for name, s in runs.items() if s}
    kd_end = runs["kd"][-1]["seconds"] if runs.get("kd") else None
    lines = ["| method | steps | optimiser seconds | valid rev. KL: step 0 -> end | valid Rouge-L: step 0 -> end | "
             "at KD's seconds: step, rev. KL, Rouge-L |", "| --- | --- | --- | --- | --- | --- |"]
    for name, label in METHODS:
        s = runs.get(name)
        if not s:
            continue
        first, last = s[0], s[-1]
        at = _at_seconds(s, kd_end) if kd_end is not None else None
        at_cell = "n/a" if at is None else f"{at['step']}, {at['rev_kl']:.3f}, {at['rougeL']:.2f}"
        lines.append(f"| {label} | {last['step']} | {last['seconds']:.0f} | {first['rev_kl']:.3f} -> "
                     f"{last['rev_kl']:.3f} | {first['rougeL']:.2f} -> {last['rougeL']:.2f} | {at_cell} |")
    noise = curves.eval_noise(runs)
    if noise is not None:
        lines += ["", f"One sampling seed per evaluation: late in a run the validation reverse KL moves by {noise:.3f} "
                      f"between consecutive evaluations (median over the runs), the yardstick for these gaps."]
    return lines


def run(demo: Path, out: Path, *, eval_interval: int, valid_samples: int, jobs: int, say=print) -> Path:
    """Train the three runs (``jobs`` at a time, one thread each) and write ``same_init.md`` and ``curves.png``."""
    from .report import _plt

    cfgs = configs(demo, out, eval_interval=eval_interval, valid_samples=valid_samples)
    job_list = []
    for name, cfg in cfgs.items():
        path = _write_yaml(out / "configs" / f"{name}.yaml", cfg)
        job_list.append(Job(name, "train", ["distill", "--config", str(path)], cost=float(cfg["total_iters"]),
                            total_steps=int(cfg["total_iters"]), run_dir=cfg["output_dir"]))
    run_jobs(job_list, n_parallel=jobs, threads=1, log_dir=out / "logs", timings={}, say=say)
    labels = dict(METHODS)
    png = curves.plot_curves({n: curves.series(out / "runs" / n) for n in labels}, labels, out / "curves.png", _plt,
                             start="all from the same SFT checkpoint, at 0")
    md = ["# KD, SeqKD and MiniLLM from the same SFT checkpoint", "",
          f"Demo run: `{demo}`; every run starts from its SFT checkpoint of lowest validation loss and trains "
          f"{cfgs['kd']['total_iters']} optimiser steps with the demo's settings otherwise (`configs/`), evaluated at "
          f"step 0 and every {eval_interval} steps on {valid_samples} validation prompts (one sampling seed).", "",
          *summary(out), "", f"![learning curves]({png.name})" if png else ""]
    path = out / "same_init.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm_fast.demo.same_init", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="a finished demo run's folder (default runs/demo)")
    parser.add_argument("--out", default="runs/same_init", help="output folder (default runs/same_init)")
    parser.add_argument("--eval-interval", type=int, default=50, help="optimiser steps between evaluations")
    parser.add_argument("--valid-samples", type=int, default=200, help="validation prompts per evaluation")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (default 2)")
    args = parser.parse_args(argv)
    for key in ("eval_interval", "valid_samples", "jobs"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")
    try:
        path = run(Path(args.demo).resolve(), Path(args.out).resolve(), eval_interval=args.eval_interval,
                   valid_samples=args.valid_samples, jobs=args.jobs)
    except (FileNotFoundError, DemoError) as e:
        print(f"same_init: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
