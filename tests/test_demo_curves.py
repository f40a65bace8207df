"""The demo report's learning curves and compute table (minillm_fast/demo/curves.py) on hand-written metrics files:
costs accumulate over the steps before each evaluation, MiniLLM's start at its SFT initialisation's cost, the
compute sentence says equal only when it is, and the noise yardstick is the median step-to-step change."""
from __future__ import annotations

import json

import pytest

from minillm_fast.demo import curves


def _run(root, name, steps, seconds, tokens, evals):
    """A metrics.jsonl with ``steps`` optimiser steps of ``seconds`` and ``tokens`` each and ``evals = {step: (rev_kl,
    rougeL)}``, written as distill/base.py writes them (a step record, then the evaluation's)."""
    d = root / "runs" / name
    d.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        lines.append({"step": s, "train/loss": 1.0, "time/step_s": seconds, "train/tokens": tokens})
        if s in evals:
            lines.append({"step": s, "eval/rev_kl": evals[s][0], "eval/rougeL": evals[s][1]})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"step\": 9")   # a torn last line


def test_costs_accumulate_and_minillm_starts_at_its_sft_cost(tmp_path):
    _run(tmp_path, "sft", 10, 0.5, 100, {5: (None, 10.0), 10: (None, 20.0)})
    _run(tmp_path, "kd", 10, 1.0, 100, {5: (2.0, 15.0), 10: (1.0, 25.0)})
    _run(tmp_path, "minillm", 4, 2.0, 50, {2: (0.9, 26.0), 4: (0.7, 27.0)})
    got = curves.all_series(tmp_path, ["sft", "kd", "minillm", "okd"], sft_step=5)
    assert set(got) == {"sft", "kd", "minillm"}                        # no run, no curve
    assert [(p["step"], p["seconds"], p["tokens"]) for p in got["kd"]] == [(5, 5.0, 500), (10, 10.0, 1000)]
    # SFT's first 5 steps (2.5 s, 500 tokens), then MiniLLM's own
    assert [(p["seconds"], p["tokens"], p["rev_kl"]) for p in got["minillm"]] == [(6.5, 600, 0.9), (10.5, 700, 0.7)]
    assert got["sft"][0]["rev_kl"] is None and got["sft"][1]["rougeL"] == 20.0


@pytest.mark.parametrize("minillm_seconds, equal", [(2.0, True), (8.0, False)])
def test_the_compute_sentence_says_equal_only_when_it_is(tmp_path, minillm_seconds, equal):
    _run(tmp_path, "sft", 10, 0.5, 100, {10: (None, 20.0)})
    _run(tmp_path, "kd", 10, 1.0, 100, {10: (1.0, 25.0)})
    _run(tmp_path, "minillm", 4, minillm_seconds, 50, {4: (0.7, 27.0)})
    lines = curves.compute_lines(tmp_path, {"sft": "SFT", "kd": "KD", "minillm": "MiniLLM", "cbd": "CBD"}, 10)
    table = "\n".join(lines)
    assert "| kd | 10 | 10 | 1000 | scratch |" in table and "| cbd |" not in table
    total = 5.0 + 4 * minillm_seconds
    assert f"| minillm | 4 | {total:.0f} | 1200 |" in table
    assert f"{total / 10:.2f}x KD's optimiser seconds" in table
    assert ("about equal compute" in table) == equal and ("unequal compute" in table) == (not equal)


def test_eval_noise_is_the_median_late_change(tmp_path):
    runs = {"a": [{"rev_kl": x} for x in (3.0, 2.0, 1.0, 1.2, 0.9)],      # second half 1.0, 1.2, 0.9: 0.2, 0.3
            "b": [{"rev_kl": x} for x in (2.0, 1.5, 1.5, 1.6)],           # second half 1.5, 1.6: 0.1
            "sft": [{"rev_kl": None}]}
    assert curves.eval_noise(runs) == pytest.approx(0.2)
    assert curves.eval_noise({}) is None


def test_the_plot_is_written(tmp_path):
    _run(tmp_path, "kd", 4, 1.0, 10, {2: (2.0, 15.0), 4: (1.0, 25.0)})
    _run(tmp_path, "sft", 4, 1.0, 10, {2: (None, 15.0), 4: (None, 25.0)})

    def plt():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as p
        return p

    path = curves.plot_curves(curves.all_series(tmp_path, ["sft", "kd"], None), {"kd": "KD", "sft": "SFT"},
                              tmp_path / "curves.png", plt)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert curves.plot_curves({}, {}, tmp_path / "none.png", plt) is None
