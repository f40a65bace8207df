"""The demo report's learning curves and compute: every student's validation reverse KL and Rouge-L against its training
cost, so that methods are compared at equal compute and not at their last step.

Read from each run's ``runs/<name>/metrics.jsonl`` (distill/base.py writes one record per optimiser step with
``time/step_s``, MiniLLM's rollouts included, and ``train/tokens``, the tokens carrying the loss; and one per
evaluation with ``eval/rev_kl``, ``eval/rougeL``). Cost is cumulative over the steps before an evaluation. MiniLLM
and its ablations start from the SFT checkpoint of lowest validation loss, so their cost starts at what SFT spent to
reach it (the paper's comparison: MiniLLM = SFT + the policy optimisation); the other students start from scratch.

* :func:`series`: one run's evaluations with the cost spent before each;
* :func:`compute_lines`: the report's compute table and the sentence that says at what compute the methods compare;
* :func:`eval_noise`: how much the validation reverse KL moves between consecutive evaluations of one run (one
  sampling seed), the yardstick for the gaps between methods;
* :func:`plot_curves`: ``curves.png``, reverse KL and Rouge-L against seconds and against tokens.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from ..distill.plots import read_metrics

STARTS_FROM_SFT = ("minillm", "minillm_no_length_norm", "minillm_no_teacher_mix", "minillm_no_single_step")


def series(run_dir: Path, start: Optional[Mapping[str, float]] = None, until_step: Optional[int] = None) -> List[dict]:
    """``[{"step", "seconds", "tokens", "rev_kl", "rougeL"}]``: each evaluation of the run with the optimiser seconds
    and training tokens spent before it, plus ``start`` (``{"seconds", "tokens"}``, the cost of the checkpoint the run
    starts from). ``until_step``: only up to that step (an evaluation at it included)."""
    seconds = start.get("seconds", 0.0) if start else 0.0
    tokens = start.get("tokens", 0.0) if start else 0.0
    out = []
    for r in read_metrics(Path(run_dir) / "metrics.jsonl"):
        if until_step is not None and r.get("step", 0) > until_step:
            break
        seconds += r.get("time/step_s", 0.0)
        tokens += r.get("train/tokens", 0.0)
        if "eval/rougeL" in r or "eval/rev_kl" in r:
            out.append({"step": r["step"], "seconds": seconds, "tokens": tokens, "rev_kl": r.get("eval/rev_kl"),
                        "rougeL": r.get("eval/rougeL")})
    return out


def _cost(run_dir: Path, until_step: Optional[int] = None) -> Dict[str, float]:
    """Optimiser seconds and training tokens of a run (up to ``until_step``)."""
    recs = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if until_step is None or r.get("step", 0) <= until_step]
    return {"seconds": sum(r.get("time/step_s", 0.0) for r in recs),
            "tokens": sum(r.get("train/tokens", 0.0) for r in recs),
            "steps": max((r.get("step", 0) for r in recs), default=0)}


def all_series(out_dir: Path, names: Sequence[str], sft_step: Optional[int]) -> Dict[str, List[dict]]:
    """:func:`series` of every run in ``names`` that exists, MiniLLM's starting at SFT's cost up to ``sft_step``."""
    runs = Path(out_dir) / "runs"
    start = _cost(runs / "sft", sft_step) if sft_step is not None else None
    out = {}
    for name in names:
        s = series(runs / name, start if name in STARTS_FROM_SFT else None)
        if s:
            out[name] = s
    return out


def eval_noise(curves: Mapping[str, List[dict]]) -> Optional[float]:
    """The median absolute change of the validation reverse KL between consecutive evaluations in the second half of
    each run: how much one sampling seed's measurement moves while the model changes little."""
    steps = []
    for s in curves.values():
        kl = [p["rev_kl"] for p in s if p["rev_kl"] is not None]
        half = kl[len(kl) // 2:]
        steps += [abs(b - a) for a, b in zip(half, half[1:])]
    return statistics.median(steps) if steps else None


def compute_lines(out_dir: Path, labels: Mapping[str, str], sft_step: Optional[int]) -> List[str]:
    """The compute table (steps, optimiser seconds, training tokens; MiniLLM's with the SFT run it starts from) and
    the ratio of MiniLLM's compute to KD's."""
    runs = Path(out_dir) / "runs"
    sft = _cost(runs / "sft", sft_step) if sft_step is not None else None
    lines = ["| model | steps | optimiser seconds | training tokens | counted from |", "| --- | --- | --- | --- | --- |"]
    cost = {}
    for name, label in labels.items():
        if name == "teacher" or name.startswith("cbd") or not (runs / name / "metrics.jsonl").is_file():
            continue                       # the CBD rows train another student from their own initialisations
        c = _cost(runs / name)
        frm = "scratch"
        if name in STARTS_FROM_SFT and sft is not None:
            c = {"steps": c["steps"], "seconds": c["seconds"] + sft["seconds"], "tokens": c["tokens"] + sft["tokens"]}
            frm = f"SFT step {sft_step} ({sft['seconds']:.0f} s, {sft['tokens']:.0f} tokens) + its own"
        cost[name] = c
        lines.append(f"| {name} | {c['steps']} | {c['seconds']:.0f} | {c['tokens']:.0f} | {frm} |")
    if "minillm" in cost and "kd" in cost and cost["kd"]["seconds"] > 0:
        ratio = cost["minillm"]["seconds"] / cost["kd"]["seconds"]
        lines += ["", f"MiniLLM with its SFT run took {ratio:.2f}x KD's optimiser seconds "
                      f"({cost['minillm']['seconds']:.0f} s against {cost['kd']['seconds']:.0f} s; "
                      f"{cost['minillm']['tokens'] / max(cost['kd']['tokens'], 1):.2f}x its training tokens): the "
                      f"methods are compared at "
                      + ("about equal compute." if 0.75 <= ratio <= 1.33 else
                         "unequal compute, which the comparison must be read with.")]
    return lines


def plot_curves(curves: Mapping[str, List[dict]], labels: Mapping[str, str], path, plt_factory,
                start: str = "MiniLLM: from its SFT init's cost") -> Optional[Path]:
    """``curves.png``: validation reverse KL (top) and Rouge-L (bottom) against optimiser seconds (left) and training
    tokens (right), one line per student; MiniLLM's runs start at their SFT initialisation's cost (``start`` says
    where the axes start). None when no run has evaluations."""
    if not curves:
        return None
    plt = plt_factory()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex="col")
    # one colour per run in every panel (SFT has no reverse KL: a shared colour cycle would shift between panels)
    palette = iter(["C0", "C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9"])
    for name, s in curves.items():
        colour = "#d62728" if name == "minillm" else next(palette, "#777777")
        style = dict(lw=2.2) if name == "minillm" else dict(lw=1, ls="--") if name.startswith("minillm") \
            else dict(lw=1.2)
        style["color"] = colour
        for col, x in enumerate(("seconds", "tokens")):
            for row, y in enumerate(("rev_kl", "rougeL")):
                pts = [(p[x], p[y]) for p in s if p[y] is not None]
                if pts:
                    axes[row][col].plot(*zip(*pts), marker="o", ms=2.5, label=labels.get(name, name), **style)
    axes[0][0].set_ylabel("validation reverse KL(student || teacher)", fontsize=8)
    axes[1][0].set_ylabel("validation Rouge-L (one seed)", fontsize=8)
    axes[1][0].set_xlabel(f"optimiser seconds ({start})", fontsize=8)
    axes[1][1].set_xlabel(f"training tokens ({start})", fontsize=8)
    for ax in (a for row in axes for a in row):
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[1][1].legend(fontsize=6, ncol=2)
    fig.suptitle("Learning curves at equal compute: every student against its training cost", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
