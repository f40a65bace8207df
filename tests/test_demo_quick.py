"""The built-in demo end to end: ``minillm-fast demo --quick`` in a subprocess, as a user runs it.

One run (about a minute and a half on two cores) writes the whole pipeline's outputs; the tests read them: the
report's table has a row per method with numeric test Rouge-L, the plots exist, every distill run wrote its
config and metrics, the MiniLLM ablations really ran with their switch flipped, the valid/test files carry every
reference phrasing, and the CBD rows (a chain of two anchors, a student interpolated between them, its two controls)
were measured before and after training. A second, cached run is not started here (it retrains the students: another minute).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

CBD_ROWS = ("cbd", "cbd_nearest", "cbd_scratch")
ROWS = ("teacher", "sft", "kd", "seqkd", "minillm", "minillm_no_length_norm", "minillm_no_teacher_mix",
        "minillm_no_single_step", "okd", *CBD_ROWS)
NUMBER_PM = re.compile(r"^(\d+\.\d+) ± (\d+\.\d+)$")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_quick") / "run"
    proc = subprocess.run([sys.executable, "-m", "minillm_fast", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc.stdout


def _table(markdown: str) -> dict:
    """``{model: {column: cell}}`` of the first markdown table whose header starts with ``| model |``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_report_table_has_a_row_per_method_with_numbers(demo_run):
    out, _ = demo_run
    rows = _table((out / "report.md").read_text())
    assert list(rows) == list(ROWS)
    for name, row in rows.items():
        m = NUMBER_PM.match(row["test Rouge-L"])
        assert m, f"{name}: test Rouge-L cell {row['test Rouge-L']!r} is not 'mean ± std'"
        assert 0.0 <= float(m.group(1)) <= 100.0
        assert NUMBER_PM.match(row["test exact match"]), row
        if name != "teacher":                               # the students' training time (the teacher may be cached)
            assert float(row["train time (s)"]) > 0, row


def test_terminal_ends_with_the_table(demo_run):
    _, stdout = demo_run
    rows = _table(stdout)
    assert list(rows) == list(ROWS)
    assert "report:" in stdout.splitlines()[-1]


def test_plots_exist(demo_run):
    out, _ = demo_run
    for name in ("rougeL.png", "rev_kl.png", "exaccerr.png", "measures.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    report = (out / "report.md").read_text()
    for name in ("rougeL.png", "rev_kl.png", "exaccerr.png", "measures.png"):
        assert f"]({name})" in report, name


def test_every_student_has_the_papers_other_measurements_and_paired_tests(demo_run):
    out, _ = demo_run
    report = (out / "report.md").read_text()
    for name in ROWS:
        res = json.loads((out / "eval" / name / "results.json").read_text())
        assert 0.0 <= res["ece"] <= 1.0 and res["length_mean"] > 0, name
        assert len(res["per_example"]["10"]["rougeL"]) == res["n_examples"], name
        if name != "teacher":                   # the students' exposure bias against the teacher's own samples
            curve = res["exposure_bias"]
            assert curve["lengths"][0] == 1 and abs(curve["exaccerr"][0]) < 1e-6, name   # same prompts at step 1
    cells = {row: cols for row, cols in _table(report).items()}
    for row in ROWS:
        lo, hi = (float(x) for x in cells[row]["test Rouge-L 95% CI"].strip("[]").split(", "))
        assert lo <= float(NUMBER_PM.match(cells[row]["test Rouge-L"]).group(1)) <= hi, row
    assert "## Paired tests" in report and "Wilcoxon" in report and "## The paper's other measurements" in report


def test_results_are_over_five_seeds_on_the_test_split(demo_run):
    out, _ = demo_run
    for name in ROWS:
        res = json.loads((out / "eval" / name / "results.json").read_text())
        assert res["seeds"] == [10, 20, 30, 40, 50], name
        assert res["n_examples"] == sum(1 for line in (out / "data" / "test_refs.jsonl").open() if line.strip())


def test_runs_use_the_distill_configs_and_ablation_switches(demo_run):
    out, _ = demo_run
    expected = {"minillm": {}, "minillm_no_length_norm": {"length_norm": False},
                "minillm_no_teacher_mix": {"alpha": 0.0}, "minillm_no_single_step": {"single_step": False}}
    resolved = {}
    for name in ROWS:
        cfg = yaml.safe_load((out / "runs" / name / "config.yaml").read_text())   # written by the trainer
        assert (out / "runs" / name / "metrics.jsonl").stat().st_size > 0
        assert (out / "runs" / name / "best" / "config.json").exists()
        resolved[name] = cfg
    assert resolved["teacher"]["method"] == "sft" and resolved["sft"]["method"] == "sft"
    assert resolved["kd"]["method"] == "kd" and resolved["seqkd"]["method"] == "seqkd"
    assert resolved["okd"]["method"] == "okd" and resolved["okd"]["student"] == resolved["kd"]["student"]
    assert (out / "runs" / "okd" / "teacher_adapter" / "adapter_config.json").exists()
    base = resolved["minillm"]
    assert base["method"] == "minillm" and base["length_norm"] and base["single_step"] and base["alpha"] == 0.2
    for name, flips in expected.items():
        diff = {k: v for k, v in resolved[name].items() if base[k] != v and k != "output_dir"}
        assert diff == flips, name
    # MiniLLM starts from the SFT checkpoint of lowest validation loss, not from SFT's best-Rouge-L checkpoint
    assert base["student"].endswith("sft_min_valid_loss")


def test_eval_splits_carry_every_reference(demo_run):
    out, _ = demo_run
    for split in ("valid", "test"):
        src = [json.loads(line) for line in (out / "data" / f"{split}.jsonl").open()]
        refs = [json.loads(line) for line in (out / "data" / f"{split}_refs.jsonl").open()]
        assert len(src) == len(refs)
        for a, b in zip(src, refs):
            assert b["response"][0] == a["response"]
            assert sorted(b["response"]) == sorted(set(a["references"]) | {a["response"]})


def test_timings_are_recorded(demo_run):
    out, _ = demo_run
    timings = json.loads((out / "timings.json").read_text())
    for stage in ("data", "tokenizer", "init", "teacher", "sft", "minillm", "okd", "eval_teacher", "total (wall)"):
        assert stage in timings and timings[stage]["seconds"] >= 0.0, stage
    assert "## Timing" in (out / "report.md").read_text()


def test_cbd_rows_start_from_the_chain_and_are_measured_before_and_after(demo_run):
    out, _ = demo_run
    chain = json.loads((out / "cbd" / "chain" / "chain.json").read_text())
    members = chain["members"]
    assert [m["name"] for m in members] == ["teacher", "anchor_mid", "anchor_small"]
    assert members[0]["params"] > members[1]["params"] > members[2]["params"]
    cbd = json.loads((out / "init" / "cbd" / "cbd_init.json").read_text())
    near = json.loads((out / "init" / "cbd_nearest" / "cbd_init.json").read_text())
    assert (cbd["big"]["name"], cbd["small"]["name"]) == ("anchor_mid", "anchor_small")
    assert members[2]["params"] < cbd["student_params"] < members[1]["params"]
    assert 0.0 < cbd["alpha"] < 1.0 and near["alpha"] in (0.0, 1.0)
    # the nearer anchor in parameters: a = 0 takes anchor_mid, a = 1 anchor_small
    p_mid, p_small, p = members[1]["params"], members[2]["params"], cbd["student_params"]
    assert near["alpha"] == (0.0 if p_mid - p <= p - p_small else 1.0)
    for name in CBD_ROWS:
        cfg = yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
        assert cfg["method"] == "kd" and cfg["eval_on_start"] and cfg["student"].endswith(f"init/{name}")
        evals = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").open() if '"eval/loss"' in line]
        assert evals[0]["step"] == 0 and len(evals) >= 2, name
        res = json.loads((out / "eval" / f"{name}_init" / "results.json").read_text())
        assert res["seeds"] == [10, 20, 30, 40, 50]
    report = (out / "report.md").read_text()
    section = report[report.index("## Chain-based distillation"):report.index("## Timing")]
    table = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| row", "| ---"))]
    assert len(table) == 3, section
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for cell in cells[2:4]:                             # valid loss and valid Rouge-L: before -> after
            before, after = (float(x) for x in cell.split(" -> "))
            assert before >= 0 and after >= 0
        assert NUMBER_PM.match(cells[4]) and NUMBER_PM.match(cells[5]), line
    assert "](cbd_valid_loss.png)" in report and (out / "cbd_valid_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_jobs_start_by_their_critical_path():
    """A job that a chain of others waits on (the CBD chain: initialisations, KD runs, evaluations) outranks a longer
    job nothing waits for; a job's rank is its cost plus the longest chain of dependents."""
    from minillm_fast.demo.pipeline import Job, critical_path

    jobs = [Job("teacher", "train", [], cost=100.0), Job("okd", "train", [], deps=["teacher"], cost=60.0),
            Job("chain", "train", [], deps=["teacher"], cost=50.0), Job("init", "init", [], deps=["chain"], cost=2.0),
            Job("cbd", "train", [], deps=["init", "teacher"], cost=45.0),
            Job("eval_cbd", "eval", [], deps=["cbd"], cost=5.0)]
    rank = critical_path(jobs)
    assert rank == {"teacher": 202.0, "okd": 60.0, "chain": 102.0, "init": 52.0, "cbd": 50.0, "eval_cbd": 5.0}
    assert rank["chain"] > rank["okd"]            # the chain starts first when the teacher is done
