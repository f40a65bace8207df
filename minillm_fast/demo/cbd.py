"""The demo's chain-based distillation rows (docs/cbd.md): a chain of anchors from the trained teacher down to the
student's size, a student of an intermediate size initialised from it, and the paper's two controls.

=================  =========================================================================================
what               how (outputs under ``--out``)
=================  =========================================================================================
anchors            ``cbd/configs/anchor_mid`` and ``anchor_small`` (config.json): the chain's members between
                   the teacher and the students: ``SHAPES["quick_anchor"]`` (96 / 3 / 3, 0.50M llama) and the
                   students' own shape (64 / 2 / 2, 0.22M)
chain (job)        ``minillm-fast chain --config configs/cbd_chain.yaml``: teacher -> anchor_mid -> anchor_small,
                   each link KD on the schedule's ``cbd_link`` keys, each anchor starting from its predecessor
                   mapped to its shape; folder ``cbd/chain`` (``chain.json``, ``anchors/``)
the student        ``SHAPES["quick_cbd_student"]`` (64 / 3 / 2, 0.27M): between the two anchors in size, so that
                   its initialisation maps both (width 96 -> 64 from anchor_mid, depth 2 -> 3 from
                   anchor_small) before interpolating them
inits (jobs)       ``cbd``: ``minillm-fast init --chain cbd/chain`` (both neighbours mapped to its shape,
                   ``a`` from the parameter counts); ``cbd_nearest``: the same with ``--alpha`` 0 or 1, the
                   nearer anchor alone; ``cbd_scratch``: the config at a random initialisation (written in the
                   set-up)
training (jobs)    each of the three: KD from the teacher on the schedule's ``kd`` keys, the same short
                   schedule as the KD row, with ``eval_on_start`` (the validation loss before training)
evaluation (jobs)  each initialisation on the test split over the demo's seeds (``eval/<row>_init``), and each
                   trained model (``eval/<row>``, as every other row)
=================  =========================================================================================

The report's CBD section (:func:`report_lines`) puts before and after side by side: validation loss and Rouge-L at
step 0 and at the selected checkpoint, test Rouge-L of the initialisation and of the trained model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..distill.plots import read_metrics

# The rows this stage adds to the demo's table, after the others: (name, what it is).
ROWS = (
    ("cbd", "CBD: interpolated anchors + KD"),
    ("cbd_nearest", "nearest anchor alone + KD"),
    ("cbd_scratch", "random init (same size) + KD"),
)
ANCHORS = ("anchor_mid", "anchor_small")


def configs(vocab_size: int, family: str, models: str, **ids) -> Dict[str, object]:
    """The anchors' and the CBD student's configs: ``{"anchor_mid", "anchor_small", "student"}`` for the profile's
    ``models`` (a key of ``configs.MODEL_SETS``). The smallest anchor has the demo students' shape; ``anchor_mid`` lies
    between it and the teacher; the student between the two anchors."""
    from .configs import MODEL_SETS, shape_config

    shapes = MODEL_SETS[models]
    return {"anchor_mid": shape_config(shapes.anchor_mid, vocab_size, family, **ids),
            "anchor_small": shape_config(shapes.student, vocab_size, family, **ids),
            "student": shape_config(shapes.cbd_student, vocab_size, family, **ids)}


def nearest_alpha(p_mid: int, p_small: int, p_student: int) -> float:
    """``--alpha`` that initialises the student from the anchor nearer to it in parameters alone: 0 takes the
    bigger neighbour (``anchor_mid``), 1 the smaller."""
    return 0.0 if p_mid - p_student <= p_student - p_small else 1.0


def chain_config(*, teacher: Path, tokenizer: Path, output_dir: Path, anchor_dirs: Dict[str, Path],
                 common: dict, link: dict) -> dict:
    """The chain YAML's contents: every link a KD run on ``common`` + ``link`` keys (those the chain sets itself
    removed from ``common``)."""
    reserved = ("student", "teacher", "tokenizer", "output_dir", "resume", "overwrite", "method")
    distill = {k: v for k, v in dict(common, **link).items() if k not in reserved}
    return {"output_dir": str(output_dir), "teacher": str(teacher), "tokenizer": str(tokenizer), "method": "kd",
            "distill": distill,
            "anchors": [{"name": name, "config": str(anchor_dirs[name])} for name in ANCHORS]}


# ----------------------------------------------------------------------------------------------------------------------
# the report's section
# ----------------------------------------------------------------------------------------------------------------------
def _results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _pm(res: dict) -> str:
    return "n/a" if res.get("rougeL_mean") is None else f"{res['rougeL_mean']:.2f} ± {res['rougeL_std']:.2f}"


def _num(x: Optional[float], fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def row_numbers(out_dir: Path, name: str) -> dict:
    """Before and after of one row: the step-0 validation line and the selected checkpoint's (best/, else the last
    evaluation), test Rouge-L of the initialisation and of the trained model."""
    evals = [r for r in read_metrics(out_dir / "runs" / name / "metrics.jsonl") if "eval/loss" in r]
    start = next((r for r in evals if r["step"] == 0), {})
    trained = [r for r in evals if r["step"] > 0]
    best = next((r for r in reversed(trained) if r.get("eval/best")), trained[-1] if trained else {})
    return {"valid_loss_before": start.get("eval/loss"), "valid_loss_after": best.get("eval/loss"),
            "valid_rougeL_before": start.get("eval/rougeL"), "valid_rougeL_after": best.get("eval/rougeL"),
            "after_step": best.get("step"),
            "test_before": _results(out_dir / "eval" / f"{name}_init" / "results.json"),
            "test_after": _results(out_dir / "eval" / name / "results.json")}


def _gap(a: dict, b: dict) -> Optional[tuple]:
    if a.get("rougeL_mean") is None or b.get("rougeL_mean") is None:
        return None
    return a["rougeL_mean"] - b["rougeL_mean"], math.hypot(a["rougeL_std"], b["rougeL_std"])


def report_lines(out_dir: Path, chain_dir: Path, init_records: Dict[str, Path], params: Dict[str, int]) -> List[str]:
    """The report's "Chain-based distillation" section: the chain, how each row started, before and after."""
    out_dir = Path(out_dir)
    lines = ["## Chain-based distillation (CBD)", ""]
    manifest = _results(Path(chain_dir) / "chain.json")
    members = manifest.get("members", [])
    if members:
        chain = " -> ".join(f"{m['name']} ({m['params'] / 1e6:.2f}M)" for m in members)
        lines += [f"The chain: {chain}, each link KD from its predecessor, each anchor starting from its predecessor "
                  f"mapped to its shape (docs/cbd.md). The CBD student has {params['cbd'] / 1e6:.2f}M parameters, "
                  f"between the two anchors; the three rows below train it with the KD row's schedule from three "
                  f"starts.", ""]
    starts = {}
    for name, path in init_records.items():
        rec = _results(Path(path))
        if rec:
            if rec["big"]["name"] == rec["small"]["name"]:
                starts[name] = f"{rec['big']['name']} mapped"
            else:
                starts[name] = (f"(1 - a) {rec['big']['name']} + a {rec['small']['name']}, a = {rec['alpha']:.3f}"
                                if 0 < rec["alpha"] < 1 else
                                f"{rec['big']['name'] if rec['alpha'] == 0 else rec['small']['name']} mapped "
                                f"(a = {rec['alpha']:.0f})")
    starts.setdefault("cbd_scratch", "random initialisation")
    lines += ["| row | start | valid loss: before -> after | valid Rouge-L: before -> after | test Rouge-L before "
              "training | test Rouge-L after |", "| --- | --- | --- | --- | --- | --- |"]
    nums = {}
    for name, label in ROWS:
        n = nums[name] = row_numbers(out_dir, name)
        lines.append(f"| {label} | {starts.get(name, 'n/a')} | {_num(n['valid_loss_before'])} -> "
                     f"{_num(n['valid_loss_after'])} | {_num(n['valid_rougeL_before'], '{:.2f}')} -> "
                     f"{_num(n['valid_rougeL_after'], '{:.2f}')} | {_pm(n['test_before'])} | "
                     f"{_pm(n['test_after'])} |")
    lines += ["", "What it shows (one training run per row; ± is sampling noise over the seeds):", ""]
    for when, key in (("before training", "test_before"), ("after the short KD schedule", "test_after")):
        for other in ("cbd_nearest", "cbd_scratch"):
            g = _gap(nums["cbd"][key], nums[other][key])
            if g is None:
                continue
            d, spread = g
            verdict = "within" if abs(d) <= spread else "beyond"
            lines.append(f"* {when}: CBD vs {dict(ROWS)[other]}: {d:+.2f} test Rouge-L, {verdict} the seed-to-seed "
                         f"spread (±{spread:.2f}).")
    before = {k: v["valid_loss_before"] for k, v in nums.items() if v["valid_loss_before"] is not None}
    if len(before) == len(ROWS):
        order = sorted(before, key=before.get)
        lines.append("* validation loss at initialisation, lowest first: " +
                     ", ".join(f"{dict(ROWS)[k]} {before[k]:.3f}" for k in order) + ".")
    lines.append("* The paper's claim is about initialisation: a CBD start should beat a random start and match or "
                 "beat the nearest anchor, most visibly before and early in training; at this toy scale and with a "
                 "schedule this short, differences within the spread are not evidence either way.")
    return lines + [""]


def plot_before_after(out_dir: Path, path: Path, plt_factory: Callable) -> Optional[Path]:
    """Validation loss against the optimiser step for the three CBD rows (step 0 = the initialisation)."""
    plt = plt_factory()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    drawn = 0
    for name, label in ROWS:
        recs = [r for r in read_metrics(Path(out_dir) / "runs" / name / "metrics.jsonl") if "eval/loss" in r]
        if recs:
            ax.plot([r["step"] for r in recs], [r["eval/loss"] for r in recs], marker="o", ms=3, label=label)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("KD optimiser step (0: the initialisation)", fontsize=8)
    ax.set_ylabel("validation loss", fontsize=8)
    ax.set_title("CBD: validation loss from three starts", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
