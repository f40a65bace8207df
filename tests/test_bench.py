"""Smoke test of the benchmark harness (bench/): ``python -m bench --quick`` end to end, in a subprocess, into a
temporary folder; then the CSV, the verification against the reference, and the plots are checked.

The numbers themselves are not checked (tiny shapes on a shared machine); what is checked is that every part of the
harness ran: the naive baseline, our implementations and the matmul floor each have measured rows, every measured
implementation agreed with the fp32 reference, and the ratios and PNGs were written. The same for the end-to-end
bench (``python -m bench e2e --quick``: a training step and a rollout, fused and materialised, on the demo's quick
models), for ``python -m bench plot`` (PNGs redrawn from a results CSV) and for ``python -m bench.kd_cache_step`` (a kd
step from a teacher cache and from the live teacher, tiny sizes).
"""
from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--threads", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    with open(out / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, proc.stdout, rows


def _ok(rows, op, impl):
    return [r for r in rows if r["op"] == op and r["impl"] == impl and r["status"] == "ok"]


def test_quick_has_naive_ours_and_floor_rows(quick_run):
    _, _, rows = quick_run
    for impl in ("floor", "naive", "ours:torch"):
        got = _ok(rows, "fused_divergence", impl)
        assert {r["mode"] for r in got} == {"fwd", "bwd", "fwd_bwd"}, impl
        assert {int(r["tokens"]) for r in got} == {64, 128}, impl
        assert all(float(r["median_ms"]) > 0 for r in got)
    for r in _ok(rows, "fused_divergence", "ours:torch") + _ok(rows, "fused_divergence", "naive"):
        assert float(r["floor_ratio"]) > 0
        assert float(r["peak_extra_mib"]) >= 0
        assert r["mem_ratio_naive"] != ""
    assert all(float(r["mem_ratio_naive"]) == 1.0 for r in _ok(rows, "fused_divergence", "naive"))


def test_quick_rows_carry_the_environment(quick_run):
    _, _, rows = quick_run
    r = _ok(rows, "fused_divergence", "naive")[0]
    assert r["device"] and r["commit"] and r["date"] and r["torch"]
    assert r["threads"] == "1" and r["dtype"] == "float32" and r["preset"] == "tiny"


def test_quick_measured_implementations_match_the_reference(quick_run):
    _, _, rows = quick_run
    measured = [r for r in rows if r["status"] == "ok" and r["impl"] != "floor" and r["verify_loss_err"] != ""]
    assert measured
    for r in measured:
        assert float(r["verify_loss_err"]) < 1e-3 and float(r["verify_grad_err"]) < 1e-3, r
    assert not [r for r in rows if r["status"] in ("mismatch", "error", "oom")]


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_quick_liger_computes_our_objective(quick_run):
    _, _, rows = quick_run
    got = _ok(rows, "fused_divergence", "liger:chunked")
    assert len(got) == 6  # 2 token counts x 3 modes, each verified before timing
    assert all(float(r["verify_loss_err"]) < 1e-5 for r in got)


def test_quick_writes_plots_and_a_table(quick_run):
    out, stdout, _ = quick_run
    assert list(out.glob("*fused_divergence-reverse_kl*fwd_bwd*.png"))
    assert "x floor" in stdout and "ours:torch" in stdout


def test_package_cli_points_to_the_checkout_bench():
    """The package never imports the repository's bench/ (it is not installed with it): ``minillm-fast bench`` says
    where the benchmarks are, in one line, exit 2."""
    proc = subprocess.run([sys.executable, "-m", "minillm_fast", "bench", "--list"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "python -m bench" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "bench", "--list"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "issue3" in proc.stdout and "liger-cpu" in proc.stdout and "fused_divergence" in proc.stdout


# ----------------------------------------------------------------------------------------------------------------------
# end to end: python -m bench e2e --quick (the demo's quick models, tiny sizes, one worker process)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-e2e")
    proc = subprocess.run([sys.executable, "-m", "bench", "e2e", "--quick", "--threads", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    with open(out / "e2e.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, proc.stdout, rows


def test_e2e_quick_measures_every_step_and_implementation(e2e_run):
    _, _, rows = e2e_run
    assert {(r["step"], r["impl"]) for r in rows} == {(s, i) for s in ("train", "rollout")
                                                      for i in ("fused", "materialised")}
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["median_ms"]) > 0 and float(r["tokens_per_s"]) > 0 and int(r["tokens"]) > 0
        assert r["peak_extra_mib"] != "" and r["mem_method"]
        assert r["speedup"] != "" and r["mem_ratio"] != ""
        assert r["device"] and r["commit"] and r["date"] and r["torch"] and r["transformers"]
        assert r["threads"] == "1" and r["family"] == "gpt2" and r["student"] == "64/2/2"
    rollout = [r for r in rows if r["step"] == "rollout"]
    assert all(int(r["tokens"]) == int(r["batch"]) * int(r["new_tokens"]) for r in rollout)


def test_e2e_quick_fused_training_step_computes_the_materialised_loss(e2e_run):
    _, _, rows = e2e_run
    fused = next(r for r in rows if r["step"] == "train" and r["impl"] == "fused")
    assert float(fused["value_rel_diff"]) < 1e-4, fused


def test_e2e_quick_prints_a_table_and_draws_a_plot(e2e_run):
    out, stdout, _ = e2e_run
    assert "| step | model | V |" in stdout and "materialised" in stdout
    assert list(out.glob("*_e2e_gpt2_float32_*.png"))


def test_replot_draws_a_png_per_group_from_a_csv(e2e_run, tmp_path):
    out, _, _ = e2e_run
    with open(REPO / "bench" / "results" / "bench.csv", newline="") as f:
        reader = csv.DictReader(f)
        decode = [r for r in reader if r["preset"] == "decode"]   # a committed single-N run: two op groups
        header = reader.fieldnames
    assert decode
    with open(tmp_path / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(decode)
    proc = subprocess.run([sys.executable, "-m", "bench", "plot", str(tmp_path / "bench.csv"), str(out / "e2e.csv"),
                           "--out", str(tmp_path / "png")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(p.name for p in (tmp_path / "png").glob("*.png"))
    assert len(pngs) == 3, pngs
    assert sum("_e2e_" in p for p in pngs) == 1


def test_floor_keeps_the_faster_layout_per_phase():
    """The floor is a lower bound: of two layouts of the same matmuls, the engine keeps the faster one per phase
    (here made slower on purpose), and names its choice."""
    import time

    import torch

    sys.path.insert(0, str(REPO))
    from bench import measure

    ran = []

    def call(name, delay):
        return lambda: (ran.append(name), time.sleep(delay))

    matmuls = {"fwd": {"token-major": [call("fwd-tm", 0.02)], "vocab-major": [call("fwd-vm", 0.0)]},
               "bwd": {"token-major": [call("bwd-tm", 0.0)], "vocab-major": [call("bwd-vm", 0.02)]},
               "extra": [call("plain", 0.0)]}
    chosen, note = measure._pick_layouts(matmuls, torch.device("cpu"))
    assert note == "fwd vocab-major, bwd token-major"
    ran.clear()
    for calls in chosen.values():
        for c in calls:
            c()
    assert ran == ["fwd-vm", "bwd-tm", "plain"]


def test_quick_floor_rows_name_their_layouts(quick_run):
    _, _, rows = quick_run
    floors = [r for r in rows if r["impl"] == "floor" and r["op"] == "fused_divergence" and r["status"] == "ok"]
    assert floors and all("faster layout per phase: fwd " in r["notes"] for r in floors)


# ----------------------------------------------------------------------------------------------------------------------
# offline KD: python -m bench.kd_cache_step at a tiny size (a kd step from a teacher cache against the live teacher)
# ----------------------------------------------------------------------------------------------------------------------
def test_kd_cache_step_measures_both_teachers_on_the_same_batch(tmp_path):
    out = tmp_path / "kd_cache_step.csv"
    proc = subprocess.run([sys.executable, "-m", "bench.kd_cache_step", "--impl", "live,cache", "--vocab", "512",
                           "--batch", "2", "--max-length", "48", "--max-prompt-length", "40", "--top-k", "8",
                           "--reps", "1", "--threads", "1", "--csv", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert "| live teacher |" in proc.stdout and "| cache k=8 fp16 |" in proc.stdout and "B/token" in proc.stdout
    with open(out, newline="") as f:
        rows = {r["impl"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"live", "cache"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert float(r["tokens_per_s"]) > 0 and float(r["median_ms"]) > 0 and r["peak_extra_mib"] != ""
        assert 0 < float(r["teacher_share"]) < 1 and float(r["kl_ms"]) > 0 and float(r["kd"]) > 0
        assert r["machine"] and r["commit"] and r["same_tokens_every_step"] == "True"
    assert rows["live"]["tokens"] == rows["cache"]["tokens"] == rows["live"]["cache_rows"]   # one batch, all of it
    assert 8 * 6 <= float(rows["cache"]["cache_bytes_per_token"]) < 8 * 6 + 40             # k x (int32 + fp16)


# ----------------------------------------------------------------------------------------------------------------------
# TRL: python -m bench.trl_step at a tiny size (one GKD step, TRL's loss and the fused one, each in its own process)
# ----------------------------------------------------------------------------------------------------------------------
def test_trl_step_measures_both_losses_on_the_same_inputs(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "trl_step.csv"
    proc = subprocess.run([sys.executable, "-m", "bench.trl_step", "--vocab", "512", "--batch", "2", "--seq", "64",
                           "--prompt", "16", "--reps", "1", "--threads", "1", "--csv", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    with open(out, newline="") as f:
        rows = {r["impl"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"trl", "fused"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert float(r["tokens_per_s"]) > 0 and float(r["median_ms"]) > 0 and float(r["peak_extra_mib"]) >= 0
        assert int(r["loss_tokens"]) > 0 and r["machine"]
    # the same inputs through TRL's generalized_jsd_loss and fused_divergence(jsd): fp32 round-off apart
    assert float(rows["fused"]["loss"]) == pytest.approx(float(rows["trl"]["loss"]), rel=1e-4)
