"""The demo report's section on the paper's other measurements (section 3.3, appendix B.4/B.5), read from each
model's ``results.json`` (``minillm-fast evaluate``, distill/fidelity.py): a table (ExAccErr at a few generation
lengths, next-token ECE, response length, distinct-4), ``exaccerr.png`` (ExAccErr by generation length, every
student: the paper's Figure 6) and ``measures.png`` (ECE, length and distinct-4 by model).

Every number is of one trained model and its 5 sampling seeds; none has a test behind it, and the section says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from . import stats

LENGTHS = ("8", "16", "32")        # the ExAccErr(l) columns (distill/fidelity.REPORT_LENGTHS)


def row_fields(res: dict) -> dict:
    """The fields of a report row taken from one ``results.json`` (None where the evaluation did not measure them)."""
    return {"ece": res.get("ece"), "exaccerr": res.get("exaccerr"), "exposure_curve": res.get("exposure_bias"),
            "length_mean": res.get("length_mean"), "distinct4_mean": res.get("distinct4_mean"),
            "test_rev_kl": res.get("rev_kl"), "rev_kl_per_example": res.get("rev_kl_per_example")}


def _num(x: Optional[float], fmt: str) -> str:
    return "n/a" if x is None else fmt.format(x)


def markdown_table(rows: Sequence[dict]) -> str:
    """One row per model: ExAccErr(l) in % (students; the teacher is the reference), ECE, mean response length in
    tokens and distinct-4 (x 100), means over the seeds."""
    head = " | ".join(f"ExAccErr({l}) %" for l in LENGTHS)
    lines = [f"| model | rev. KL (test) | {head} | ECE | length (tokens) | Dist-4 |",
             "| --- |" + " --- |" * (len(LENGTHS) + 4)]
    for r in rows:
        exacc = r.get("exaccerr") or {}
        cells = [_num(exacc.get(l), "{:+.1f}") for l in LENGTHS]
        lines.append(f"| {r['name']} | {_num(r.get('test_rev_kl'), '{:.3f}')} | " + " | ".join(cells) +
                     f" | {_num(r.get('ece'), '{:.3f}')} | {_num(r.get('length_mean'), '{:.1f}')} | "
                     f"{_num(r.get('distinct4_mean'), '{:.1f}')} |")
    return "\n".join(lines)


def objective_findings(rows: Sequence[dict]) -> List[str]:
    """Sentences on MiniLLM's own objective measured on the test set: the reverse KL(student || teacher), token mean
    over every seed's samples of every test prompt (``rev_kl`` of distill/fidelity.py; far less noisy than the
    validation number of one seed), students ranked, and MiniLLM against each other student by
    ``stats.paired_comparison`` over the per-prompt values."""
    # the CBD rows train a larger student from other starts (their own section): not compared here
    have = {r["name"]: r for r in rows
            if r.get("test_rev_kl") is not None and r["name"] != "teacher" and not r["name"].startswith("cbd")}
    if "minillm" not in have or len(have) < 2:
        return []
    ranked = sorted(have, key=lambda n: have[n]["test_rev_kl"])
    out = ["Test reverse KL(student || teacher) on the students' own samples, the quantity MiniLLM minimises "
           f"(token mean over {len(have['minillm']['rev_kl_per_example'] or [])} prompts x every seed): "
           + ", ".join(f"{have[n]['label']} {have[n]['test_rev_kl']:.3f}" for n in ranked)
           + f"; MiniLLM is number {ranked.index('minillm') + 1} of {len(ranked)}."]
    for name in ranked:
        if name == "minillm":
            continue
        a, b = have["minillm"].get("rev_kl_per_example"), have[name].get("rev_kl_per_example")
        if not a or not b or len(a) != len(b) or len(a) < 2:
            continue
        t = stats.paired_comparison(a, b)
        out.append(f"MiniLLM vs {have[name]['label']}: {t['mean_diff']:+.3f} per-prompt reverse KL "
                   f"[{t['ci_low']:+.3f}, {t['ci_high']:+.3f}], {stats.verdict(t['p'])}.")
    return out


def findings(rows: Sequence[dict]) -> List[str]:
    """Sentences on the measurements, computed from them (no test: one trained model per method)."""
    students = [r for r in rows if r["name"] != "teacher" and not r["name"].startswith("cbd")]
    out = []
    for l in reversed(LENGTHS):
        have = {r["label"]: r["exaccerr"][l] for r in students if (r.get("exaccerr") or {}).get(l) is not None}
        if len(have) > 1:
            ranked = sorted(have, key=have.get)
            out.append(f"ExAccErr({l}), the excess error of the student's own prefixes over the teacher's (lower is "
                       f"less exposure bias): lowest {ranked[0]} {have[ranked[0]]:+.1f}%, highest {ranked[-1]} "
                       f"{have[ranked[-1]]:+.1f}%; MiniLLM "
                       + (f"{have['MiniLLM']:+.1f}%, number {ranked.index('MiniLLM') + 1} of {len(ranked)}."
                          if "MiniLLM" in have else "n/a."))
            break
    ece = {r["label"]: r["ece"] for r in rows if r.get("ece") is not None and not r["name"].startswith("cbd")}
    if len(ece) > 1:
        ranked = sorted(ece, key=ece.get)
        out.append("Next-token ECE on the test references (lower is better calibrated): "
                   + ", ".join(f"{k} {ece[k]:.3f}" for k in ranked) + ".")
    if out:
        out.append("These are measurements of one trained model per method (ExAccErr and ECE pool the 5 seeds' "
                   "samples): no test stands behind their differences.")
    return out


def plot_exaccerr(rows: Sequence[dict], path, plt_factory) -> Optional[Path]:
    """ExAccErr(l) against the generation length ``l``, one line per student (the paper's Figure 6); None when no
    row has the curve."""
    curves = [r for r in rows if r.get("exposure_curve")]
    if not curves:
        return None
    plt = plt_factory()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in curves:
        c = r["exposure_curve"]
        style = "-" if r["name"] == "minillm" else "--" if r["name"].startswith("minillm") else ":" \
            if r["name"].startswith("cbd") else "-."
        ax.plot(c["lengths"], c["exaccerr"], style, lw=2 if r["name"] == "minillm" else 1, label=r["label"])
    ax.axhline(0.0, color="#999999", lw=0.8)
    ax.set_xlabel("generation length l (tokens; steps where >= 10% of samples still generate)", fontsize=8)
    ax.set_ylabel("ExAccErr(l) (%)")
    ax.set_title("Excess accumulated error of the student's own prefixes (paper Fig. 6)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_measures(rows: Sequence[dict], path, plt_factory) -> Optional[Path]:
    """Three bar charts by model: next-token ECE, mean response length, distinct-4; None when nothing was measured."""
    rows = [r for r in rows if r.get("ece") is not None or r.get("length_mean") is not None]
    if not rows:
        return None
    plt = plt_factory()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    xs = list(range(len(rows)))
    labels = [r["label"].replace("MiniLLM w/o ", "w/o ") for r in rows]
    for ax, key, title in zip(axes, ("ece", "length_mean", "distinct4_mean"),
                              ("next-token ECE (lower: better calibrated)", "response length (tokens, mean)",
                               "distinct-4 (x100, mean over seeds)")):
        ax.bar(xs, [r.get(key) or 0.0 for r in rows],
               color=["#555555" if r["name"] == "teacher" else "#d62728" if r["name"] == "minillm" else "#1f77b4"
                      for r in rows])
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=6)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
