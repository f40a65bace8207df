"""The demo report's statistics (demo/stats.py) and how the report uses them (demo/report.py, demo/measures.py): the
t-interval covers the mean, the paired test flags a planted difference and not identical inputs, the report says
"significant" only when p < 0.05, per-prompt scores are recomputed from stored predictions when results.json lacks
them, and the measurements' table reads results.json."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as S

from minillm_fast.demo import measures, report, stats

RNG = np.random.default_rng(0)


def test_t_interval_covers_the_mean_and_matches_scipy():
    x = [24.1, 25.3, 23.8, 26.0, 24.9]
    mean, lo, hi = stats.mean_ci(x)
    assert lo < mean < hi and mean == pytest.approx(np.mean(x))
    want = S.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=S.sem(x))
    assert (lo, hi) == pytest.approx(want)
    assert stats.mean_ci([3.0]) == (3.0, None, None)


def test_paired_test_flags_a_planted_difference_and_not_identical_inputs():
    base = RNG.uniform(0, 60, size=200)
    planted = stats.paired_comparison(base + 2.0 + RNG.normal(0, 1, size=200), base)
    assert planted["significant"] and planted["p"] < 1e-6
    assert planted["ci_low"] < planted["mean_diff"] < planted["ci_high"] and planted["ci_low"] > 0
    same = stats.paired_comparison(base, base)
    assert not same["significant"] and same["p"] == 1.0 and same["mean_diff"] == 0.0
    noise = stats.paired_comparison(base + RNG.normal(0, 1, size=200), base)
    assert noise["ci_low"] < 0 < noise["ci_high"]
    with pytest.raises(ValueError, match="same prompts"):
        stats.paired_comparison([1.0, 2.0], [1.0, 2.0, 3.0])


def test_verdict_says_significant_only_below_alpha():
    assert "significant" in stats.verdict(0.049)
    assert "significant" not in stats.verdict(0.05) and "significant" not in stats.verdict(0.3)


def _row(name, label, per_prompt, **extra):
    seeds = [np.mean(per_prompt) + d for d in (-0.5, 0.0, 0.5)]
    return dict(name=name, label=label, params=1, rougeL_mean=float(np.mean(seeds)), rougeL_std=float(np.std(seeds)),
                exact_match_mean=0.0, exact_match_std=0.0, valid_rougeL=None, valid_step=None, valid_rev_kl=None,
                valid_length=None, n_examples=len(per_prompt), seeds=[10, 20, 30], train_seconds=1.0,
                rougeL_ci=stats.mean_ci(seeds)[1:], per_prompt=list(per_prompt), **extra)


def test_report_calls_a_difference_significant_only_when_the_test_does():
    base = RNG.uniform(0, 60, size=100)
    rows = [_row("teacher", "teacher (SFT)", base + 10), _row("sft", "SFT w/o KD", base),
            _row("kd", "KD", base + RNG.normal(0, 0.5, size=100)),       # noise around SFT
            _row("seqkd", "SeqKD", base + 3 + RNG.normal(0, 0.5, size=100)),
            _row("minillm", "MiniLLM", base + 3 + RNG.normal(0, 0.5, size=100))]
    lines = report.findings(rows)
    by_pair = {line.split(":")[0]: line for line in lines if " vs " in line.split(":")[0]}
    assert "significant (p =" in by_pair["MiniLLM vs KD"] and "not distinguishable" not in by_pair["MiniLLM vs KD"]
    assert "significant" not in by_pair["MiniLLM vs SeqKD"]          # the same +3 with other noise
    for line in lines:                                   # every p-value the findings quote agrees with the word used
        if "(p = " in line:
            p = float(line.split("(p = ")[1].split()[0])
            assert ("significant" in line.split("(p = ")[0][-30:]) == (p < 0.05), line
    table = report.paired_table(rows)
    kd_row = next(line for line in table.splitlines() if line.startswith("| kd |"))
    assert "**" not in kd_row                            # KD vs SFT: noise, not bold
    mini_row = next(line for line in table.splitlines() if line.startswith("| minillm |"))
    assert mini_row.count("**") == 4                     # significant against both KD and SFT


def test_per_prompt_scores_are_recomputed_from_predictions_when_not_stored():
    refs = [["the cat sat"], ["a red dog"]]
    res = {"predictions": {"10": ["the cat sat", "blue"], "20": ["cat", "a red dog"]}}
    got = report.per_prompt_rouge(res, refs)
    from minillm_fast.distill.evaluate import rouge_l

    assert got == pytest.approx([(100 + 100 * rouge_l("cat", "the cat sat")) / 2, (0 + 100) / 2])
    stored = {"per_example": {"10": {"rougeL": [10.0, 20.0]}, "20": {"rougeL": [30.0, 40.0]}}}
    assert report.per_prompt_rouge(stored) == [20.0, 30.0]
    assert report.per_prompt_rouge({}, refs) is None


def test_collect_rows_reads_the_measurements_and_the_interval(tmp_path):
    res = {"n_examples": 2, "seeds": [10, 20], "per_seed": {"10": {"rougeL": 20.0}, "20": {"rougeL": 30.0}},
           "rougeL_mean": 25.0, "rougeL_std": 5.0, "exact_match_mean": 0.0, "exact_match_std": 0.0,
           "per_example": {"10": {"rougeL": [10.0, 30.0]}, "20": {"rougeL": [20.0, 40.0]}},
           "ece": 0.123, "exaccerr": {"8": 4.5, "16": -2.0}, "length_mean": 21.5, "distinct4_mean": 97.0,
           "exposure_bias": {"lengths": [1, 2], "exaccerr": [0.0, 4.5]}, "rev_kl": 0.75,
           "rev_kl_per_example": [0.5, 1.0]}
    (tmp_path / "eval" / "kd").mkdir(parents=True)
    (tmp_path / "eval" / "kd" / "results.json").write_text(json.dumps(res))
    rows = report.collect_rows(tmp_path, [("kd", "KD"), ("sft", "SFT w/o KD")], {"student": 1})
    kd = rows[0]
    assert kd["per_prompt"] == [15.0, 35.0] and kd["ece"] == 0.123
    lo, hi = kd["rougeL_ci"]
    assert lo < 25.0 < hi
    table = measures.markdown_table(rows)
    assert "| kd | 0.750 | +4.5 | -2.0 | n/a | 0.123 | 21.5 | 97.0 |" in table
    assert "| sft | n/a | n/a | n/a | n/a | n/a | n/a | n/a |" in table
    assert kd["rev_kl_per_example"] == [0.5, 1.0]
    assert "[" in report.markdown_table(rows).splitlines()[2]


def test_minillms_objective_is_compared_prompt_by_prompt():
    """The test reverse KL ranks the students, and MiniLLM against each other student is called significant only
    where the paired test says so."""
    base = [0.5 + 0.01 * i for i in range(40)]
    rows = [dict(name="teacher", label="teacher", test_rev_kl=None),
            dict(name="kd", label="KD", test_rev_kl=0.9, rev_kl_per_example=[x + 0.3 for x in base]),
            dict(name="seqkd", label="SeqKD", test_rev_kl=0.7,
                 rev_kl_per_example=[x + (0.01 if i % 2 else -0.01) for i, x in enumerate(base)]),
            dict(name="minillm", label="MiniLLM", test_rev_kl=0.7, rev_kl_per_example=base),
            dict(name="cbd", label="CBD", test_rev_kl=0.1, rev_kl_per_example=[0.1] * 40)]
    lines = measures.objective_findings(rows)
    assert "MiniLLM is number 1 of 3" in lines[0] or "MiniLLM is number 2 of 3" in lines[0]
    vs_kd = next(line for line in lines if line.startswith("MiniLLM vs KD"))
    vs_seqkd = next(line for line in lines if line.startswith("MiniLLM vs SeqKD"))
    assert "-0.300" in vs_kd and vs_kd.count("significant (p") == 1
    assert "not distinguishable from noise" in vs_seqkd
    assert not any("CBD" in line for line in lines)
    assert measures.objective_findings(rows[:2]) == []


def test_measures_plots_are_written(tmp_path):
    rows = [dict(name="kd", label="KD", ece=0.1, length_mean=20.0, distinct4_mean=99.0,
                 exposure_curve={"lengths": [1, 2, 3], "exaccerr": [0.0, 3.0, 5.0]}),
            dict(name="teacher", label="teacher", ece=0.05, length_mean=22.0, distinct4_mean=98.0,
                 exposure_curve=None)]
    for draw, name in ((measures.plot_exaccerr, "exaccerr.png"), (measures.plot_measures, "measures.png")):
        path = draw(rows, tmp_path / name, report._plt)
        assert path.read_bytes()[:4] == b"\x89PNG", name
    assert measures.plot_exaccerr([dict(name="kd", label="KD")], tmp_path / "none.png", report._plt) is None
