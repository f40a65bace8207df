"""``python -m bench.gpu_check`` (``make gpu-check``) on a machine without CUDA, and its parts that need no GPU.

The GPU run itself cannot happen here; what is checked: the no-CUDA path (one line on stderr, exit 2, no traceback,
nothing written), ``--list``, that every bench stage's command line is one ``python -m bench`` accepts, the stage
runner (exit codes, heartbeats, the time limit killing a whole process group), the stage scheduler (lanes, skips for
a missing tool or for time, summary.md / summary.json / the archive written), the headline ratios and verdicts from a
synthetic bench CSV, and the stages' environment (the package itself maps kernels/ in a bare checkout: test_checkout.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not part of the installed package (a bare `pytest` does not see it)
    sys.path.insert(0, str(REPO))

from bench import cli, gpu_check, report  # noqa: E402
from bench.gpu_check import Check, Result, Stage  # noqa: E402

PY = sys.executable


def _env(**extra) -> dict:
    env = dict(os.environ, **extra)
    env.pop("TRITON_INTERPRET", None)
    return env


# ----------------------------------------------------------------------------------------------------------------------
# the command line without CUDA
# ----------------------------------------------------------------------------------------------------------------------
def test_no_cuda_says_so_in_one_line_and_exits_2():
    before = set(gpu_check.RESULTS.glob("gpu-check-*"))
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this also checks the no-CUDA path on a GPU machine.
    proc = subprocess.run([PY, "-m", "bench.gpu_check"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=_env(CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == gpu_check.NO_CUDA_EXIT == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpu-check: no CUDA device (torch.cuda.is_available() is False")
    assert "NVIDIA GPU" in lines[0] and "Traceback" not in proc.stderr
    assert set(gpu_check.RESULTS.glob("gpu-check-*")) == before  # nothing written


def test_main_without_cuda_returns_2_in_process(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu-check: no CUDA device")


def test_list_needs_no_cuda():
    proc = subprocess.run([PY, "-m", "bench.gpu_check", "--list"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=_env(CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr
    for name in ("bench-headline", "native-build", "native-tests", "tests-gpu", "tests-ops", "tests-rest",
                 "bench-peers"):
        assert name in proc.stdout
    assert "--tokens 8192" in proc.stdout and "liger:chunked" in proc.stdout


def test_unknown_stage_is_refused():
    steps = gpu_check.plan(PY, Path("/tmp/x"))
    with pytest.raises(SystemExit, match="unknown stage"):
        gpu_check._select(steps, "bench-headline,nope", None)
    kept = gpu_check.stages_of(gpu_check._select(steps, None, "tests-rest,bench-ops"))
    assert "tests-rest" not in [s.name for s in kept] and "bench-headline" in [s.name for s in kept]


# ----------------------------------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------------------------------
def test_bench_stages_are_valid_bench_command_lines(tmp_path):
    """Every bench stage's arguments pass bench/cli.py's own checks (presets, ops, modes, implementations), here with
    --device cpu in place of cuda; the headline stage measures the headline shape with every backend and Liger."""
    stages = [s for s in gpu_check.stages_of(gpu_check.plan(PY, tmp_path)) if s.kind == "bench"]
    assert [s.name for s in stages] == ["bench-headline", "bench-headline-retry", "bench-peers", "bench-presets",
                                        "bench-ops"]
    for s in stages:
        assert s.argv[:3] == [PY, "-m", "bench"] and "triton" in s.needs
        argv = [("cpu" if a == "cuda" else a) for a in s.argv[3:]]
        args = cli.build_parser().parse_args(argv)
        assert args.out == tmp_path
        sweeps, op_cases, modes, divs = cli._selection(args, torch.device("cpu"))
        if s.name == "bench-headline":
            (preset, shapes), = sweeps
            assert [(x.tokens, x.hs, x.ht, x.vocab, x.dtype) for x in shapes] == [(8192, 2048, 4096, 128256,
                                                                                    "bfloat16")]
            assert modes == ["fwd_bwd"] and divs == ["reverse_kl"] and [c.op for c in op_cases] == ["fused_divergence"]
            ours = {i.name for i in op_cases[0].impls if i.name.startswith("ours:")}
            assert ours <= set(args.impl) and "liger:chunked" in args.impl and "naive" in args.impl


def _marker(argv: list) -> str:
    """The pytest -m expression of a stage's command line (after ``python -m pytest``)."""
    k = argv.index("pytest") + 1
    return argv[argv.index("-m", k) + 1]


def test_test_stages_cover_the_suite_once(tmp_path):
    """tests-gpu (-m gpu) + tests-ops and tests-rest (-m 'not gpu', the op files and the rest) + native-tests: every
    test file in exactly one of the file selections."""
    stages = {s.name: s for s in gpu_check.stages_of(gpu_check.plan(PY, tmp_path))}
    ops = [a for a in stages["tests-ops"].argv if a.startswith("tests/")]
    rest = stages["tests-rest"].argv
    ignored = [a.split("=", 1)[1] for a in rest if a.startswith("--ignore=")]
    assert _marker(rest) == "not gpu" and _marker(stages["tests-ops"].argv) == "not gpu" and "tests" in rest
    assert sorted(ignored) == sorted(ops + ["tests/test_native_cuda.py"])
    assert stages["native-tests"].argv[-1] == "tests/test_native_cuda.py"
    gpu = stages["tests-gpu"].argv
    assert _marker(gpu) == "gpu" and "--ignore=tests/test_native_cuda.py" in gpu
    assert all((REPO / f).exists() for f in ops) and len(ops) == len(gpu_check.OP_TEST_FILES)


# ----------------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, want", [("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
                                        ("NVIDIA H200", "nvidia-h200"), ("  A100-SXM4-40GB (MIG 1g.5gb) ",
                                                                          "a100-sxm4-40gb-mig-1g-5gb"),
                                        ("///", "gpu"), ("x" * 80, "x" * 48)])
def test_slug(name, want):
    assert gpu_check.slug(name) == want


def test_bench_progress_without_tqdm(capsys):
    bar = cli._Lines(total=3, desc="bench", dynamic_ncols=True)
    bar.set_postfix_str("gpu fused_divergence N=8192 ours:triton")
    bar.update(1)
    bar.close()
    assert capsys.readouterr().err.splitlines() == ["bench: 0/3 jobs done; now gpu fused_divergence N=8192 ours:triton",
                                                    "bench: 1/3 jobs done"]


def test_clock_and_pytest_summary():
    assert gpu_check.clock(0) == "0:00" and gpu_check.clock(125.7) == "2:05"
    log = "....F..\nFAILED tests/x.py::t - boom\n===== 1 failed, 6 passed, 2 skipped in 3.21s =====\n"
    assert gpu_check.pytest_summary(log) == "1 failed, 6 passed, 2 skipped in 3.21s"
    assert gpu_check.pytest_summary("12 passed in 1.0s\n") == "12 passed in 1.0s"
    assert gpu_check.pytest_summary("collecting ...\n....") == ""


def test_last_line_reads_progress_bars(tmp_path):
    p = tmp_path / "log"
    p.write_text("first\nbench:  10%|#   | 1/10\rbench:  20%|##  | 2/10\r\n\n")
    assert gpu_check.last_line(p) == "bench:  20%|##  | 2/10"
    assert gpu_check.last_line(tmp_path / "absent") == ""


# ----------------------------------------------------------------------------------------------------------------------
# the stage runner
# ----------------------------------------------------------------------------------------------------------------------
def test_run_command_exit_code_log_and_heartbeat(tmp_path):
    beats = []
    code = "import time, sys\nfor i in range(3):\n    print('step', i, flush=True); time.sleep(0.4)\nsys.exit(3)"
    rc, secs = gpu_check.run_command([PY, "-c", code], tmp_path / "a.log", 30, tmp_path, heartbeat_s=0.25,
                                     beat=lambda t, line: beats.append(line))
    assert rc == 3 and 1.0 < secs < 20
    text = (tmp_path / "a.log").read_text()
    assert text.startswith("$ ") and "step 2" in text and "killed" not in text
    assert beats and all(b.startswith("step") for b in beats)


def _assert_dies(pid: int, within_s: float = 5.0) -> None:
    """The process is gone (or a zombie: dead, not reaped yet) within a few seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except (OSError, IndexError):
            return
        time.sleep(0.1)
    pytest.fail(f"process {pid} survived the stage's kill")


def test_run_command_timeout_kills_the_process_group(tmp_path):
    """A stage past its limit is killed with its children (a grandchild sleeping on must not survive)."""
    pid_file = tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("started", flush=True)
        time.sleep(120)
    """)
    t0 = time.monotonic()
    rc, secs = gpu_check.run_command([PY, "-c", code], tmp_path / "b.log", 3.0, tmp_path, heartbeat_s=1.0,
                                     grace_s=2.0)
    assert rc is None and secs < 30 and time.monotonic() - t0 < 30
    text = (tmp_path / "b.log").read_text()
    assert "started" in text and "gpu-check: killed after" in text
    _assert_dies(int(pid_file.read_text()))


def _args(tmp_path, **kw):
    return argparse.Namespace(**dict(dict(archive=tmp_path / "out" / "check.tar.gz", serial=False), **kw))


def test_check_runs_lanes_skips_and_writes_the_summary(tmp_path):
    """A fake plan through the real scheduler: an ok and a failing stage in one lane, a timing-out one beside them, a
    stage needing a missing tool, a pytest stage; then one that finds too little of the budget left."""
    out = tmp_path / "run"
    out.mkdir()
    py = lambda code: [PY, "-c", code]  # noqa: E731
    steps = [
        [[Stage("ok", "prints", py("print('fine')"), 20),
          Stage("fails", "exits 1", py("import sys; print('bad news'); sys.exit(1)"), 20),
          Stage("needs-x", "needs a missing tool", py("print(1)"), 20, ("x",)),
          Stage("pytest-like", "prints a pytest summary", py("print('== 2 passed, 1 skipped in 0.1s ==')"), 20,
                kind="pytest")],
         [Stage("slow", "sleeps past its limit", py("import time; time.sleep(60)"), 4)]],
        [[Stage("late", "would start after the budget", py("print(1)"), 20)]],
    ]
    # 33 s of the budget at the start (a stage starts with 30 s left), under 30 s once "slow" is killed at 4 s
    env = {"device": "Fake GPU 9000", "devices": "1 visible", "date": "2026-12-03T10:00:00", "commit": "abc"}
    check = Check(_args(tmp_path), env, steps, out, budget_s=gpu_check.END_MARGIN_S + gpu_check.MIN_START_S + 3)
    check.run(gpu_check.child_env(), {"x": "x is not installed"})
    r = check.results
    assert (r["ok"].status, r["ok"].rc, r["ok"].detail) == ("ok", 0, "fine")
    assert r["fails"].status == "failed" and r["fails"].rc == 1 and "bad news" in r["fails"].detail
    assert r["slow"].status == "timeout" and r["slow"].rc is None and r["slow"].limit_s == 4
    assert r["needs-x"].status == "skipped" and r["needs-x"].detail == "x is not installed"
    assert r["pytest-like"].status == "ok" and r["pytest-like"].detail == "2 passed, 1 skipped in 0.1s"
    assert r["late"].status == "skipped" and r["late"].detail.startswith("out of time")
    assert gpu_check.exit_status(list(r.values())) == 1
    check.write(done=True)
    md = (out / "summary.md").read_text()
    assert md.startswith("# GPU check: Fake GPU 9000") and "| slow | sleeps past its limit | timeout |" in md
    assert "no measurement" in md  # no bench ran
    js = json.loads((out / "summary.json").read_text())
    assert js["done"] and [s["name"] for s in js["stages"]] == ["ok", "fails", "needs-x", "pytest-like", "slow",
                                                                 "late"]
    with tarfile.open(tmp_path / "out" / "check.tar.gz") as tar:
        names = tar.getnames()
    assert "run/summary.md" in names and "run/ok.log" in names


def test_retry_stage_runs_only_after_a_failure(tmp_path):
    py = lambda code: [PY, "-c", code]  # noqa: E731
    steps = [[[Stage("good", "", py("print(1)"), 20), Stage("bad", "", py("import sys; sys.exit(2)"), 20)]],
             [[Stage("good-again", "", py("print(2)"), 20, retry_of="good"),
               Stage("bad-again", "", py("print('second try')"), 20, retry_of="bad")]]]
    check = Check(_args(tmp_path, archive=None), {"device": "Fake"}, steps, tmp_path, budget_s=300)
    check.run(gpu_check.child_env(), {})
    r = check.results
    assert (r["good-again"].status, r["good-again"].detail) == ("skipped", "not needed (good: ok)")
    assert (r["bad-again"].status, r["bad-again"].detail) == ("ok", "second try")
    assert gpu_check.exit_status(list(r.values())) == 1  # the first failure still counts


def test_exit_status():
    mk = lambda *s: [Result(f"s{i}", status=x, detail=d) for i, (x, d) in enumerate(s)]  # noqa: E731
    assert gpu_check.exit_status(mk(("ok", ""), ("skipped", "pytest is not installed"))) == 0
    assert gpu_check.exit_status(mk(("ok", ""), ("skipped", "out of time (3 s of the budget left)"))) == 3
    assert gpu_check.exit_status(mk(("timeout", ""), ("skipped", "out of time"))) == 1


# ----------------------------------------------------------------------------------------------------------------------
# the headline ratios from a bench CSV
# ----------------------------------------------------------------------------------------------------------------------
def _rows(date, tokens=8192, **impls):
    base = dict(date=date, commit="abc", device="Fake GPU", device_type="cuda", preset="gpu", op="fused_divergence",
                variant="reverse_kl", tokens=tokens, hs=2048, ht=4096, vocab=128256, vocab_pad=128256,
                dtype="bfloat16", mode="fwd_bwd")
    rows = []
    for name, spec in impls.items():
        impl = name.replace("__", ":").replace("_", "-")
        if isinstance(spec, str):
            rows.append(dict(base, impl=impl, status=spec.split(":")[0], notes=spec.split(":", 1)[-1].strip()))
        else:
            ms, mib = spec
            rows.append(dict(base, impl=impl, status="ok", median_ms=ms, peak_extra_mib=mib))
    return rows


def _csv(tmp_path, rows) -> Path:
    return report.write_csv(rows, tmp_path)


def test_headline_pass(tmp_path):
    rows = (_rows("2026-12-03T09:00:00", floor=(10.0, 0), ours__triton=(99.0, 1))  # an older run: ignored
            + _rows("2026-12-03T10:00:00", floor=(40.0, 0), naive=(120.0, 9000), ours__triton=(50.0, 1000),
                    ours__triton_tiled=(60.0, 800), ours__native="unsupported: not on CUDA",
                    liger__chunked=(90.0, 3000))
            + _rows("2026-12-03T10:00:00", tokens=4096, floor=(20.0, 0), ours__triton=(200.0, 1)))  # other shape
    h = gpu_check.headline(gpu_check.read_rows(_csv(tmp_path, rows)))
    assert h["date"] == "2026-12-03T10:00:00" and h["floor_ms"] == 40.0
    got = {t["label"]: (round(t["value"], 3), t["verdict"]) for t in h["targets"]}
    assert got == {"time / 4-matmul floor": (1.25, "PASS"), "Liger chunked time / ours": (1.8, "PASS"),
                   "extra memory ours / Liger": (0.333, "PASS")}
    impls = {i["impl"]: i for i in h["impls"]}
    assert impls["ours:triton-tiled"]["x_floor"] == 1.5 and impls["naive"]["peer_speedup"] == 0.75
    assert impls["ours:native"]["status"] == "unsupported" and impls["ours:native"]["x_floor"] is None
    text = "\n".join(gpu_check.headline_lines(h))
    assert "1.25  (target <= 1.3)  PASS" in text and "1.80  (target >= 1.5)  PASS" in text
    assert "60.7 ms" in text and "ours 50.0 ms, floor 40.0 ms, Liger chunked 90.0 ms" in text
    table = "\n".join(gpu_check.headline_table(h))
    assert "| ours:triton | ok | 50.00 | 1.25 | 1.80 | 1000 | 0.33 |" in table
    assert "| ours:native | unsupported: not on CUDA |" in table


def test_headline_miss_and_not_available(tmp_path):
    rows = _rows("2026-12-03T10:00:00", floor=(40.0, 0), ours__triton=(60.0, 2000), liger__chunked=(80.0, 3000))
    h = gpu_check.headline(gpu_check.read_rows(_csv(tmp_path / "a", rows)))
    assert [t["verdict"] for t in h["targets"]] == ["MISS", "MISS", "MISS"]
    rows = _rows("2026-12-03T10:00:00", floor=(40.0, 0), ours__triton=(50.0, 1000),
                 liger__chunked="missing: liger-kernel is not installed")
    h = gpu_check.headline(gpu_check.read_rows(_csv(tmp_path / "b", rows)))
    assert [t["verdict"] for t in h["targets"]] == ["PASS", "N/A", "N/A"]
    assert "liger-kernel is not installed" in h["targets"][1]["why"]
    rows = _rows("2026-12-03T10:00:00", floor=(40.0, 0), ours__triton="mismatch: loss err 0.5",
                 liger__chunked=(90.0, 3000))
    h = gpu_check.headline(gpu_check.read_rows(_csv(tmp_path / "c", rows)))
    assert [t["verdict"] for t in h["targets"]] == ["N/A"] * 3 and "mismatch" in h["targets"][0]["why"]
    assert gpu_check.headline([]) is None and gpu_check.read_rows(tmp_path / "none.csv") == []
    assert "no measurement" in gpu_check.headline_lines(None)[0]


def test_render_summary(tmp_path):
    rows = _rows("2026-12-03T10:00:00", floor=(40.0, 0), ours__triton=(50.0, 1000), liger__chunked=(90.0, 3000))
    h = gpu_check.headline(gpu_check.read_rows(_csv(tmp_path, rows)))
    env = {"date": "2026-12-03T10:00:00", "commit": "abc", "device": "NVIDIA H100 80GB HBM3",
           "torch": "2.5.1 (CUDA 12.4, cuDNN 90100)", "triton": "3.1.0"}
    results = [Result("bench-headline", "bench", "ok", 123.4, 240, 0, "7 rows in bench.csv", "bench-headline.log"),
               Result("tests-rest", "rest", "skipped", detail="out of time (12 s of the budget left)")]
    md = gpu_check.render_summary(env, results, h, 570, 500, done=True)
    assert md.startswith("# GPU check: NVIDIA H100 80GB HBM3\n") and "finished in 8:20 of a 570 s budget" in md
    assert "| torch | 2.5.1 (CUDA 12.4, cuDNN 90100) |" in md and "PASS" in md
    assert "| bench-headline | bench | ok | 123 s | 240 s | 7 rows in bench.csv | bench-headline.log |" in md
    assert "| tests-rest | rest | skipped |  |  | out of time (12 s of the budget left) |" in md


# ----------------------------------------------------------------------------------------------------------------------
# the environment of the stages
# ----------------------------------------------------------------------------------------------------------------------
def test_environment_with_a_pretend_device():
    """The CUDA-only part of the environment, on a stand-in for torch with an H100's properties."""
    from types import SimpleNamespace as NS

    props = NS(major=9, minor=0, total_memory=80 * 2**30, multi_processor_count=132)
    fake = NS(cuda=NS(get_device_properties=lambda i: props, get_device_name=lambda i: "NVIDIA H100 80GB HBM3",
                      device_count=lambda: 1),
              __version__="2.5.1+cu124", version=NS(cuda="12.4"), backends=torch.backends)
    env = gpu_check.environment(fake)
    assert env["device"] == "NVIDIA H100 80GB HBM3"
    assert env["devices"] == "1 visible; device 0: sm_90, 80.0 GiB, 132 SMs"
    assert env["torch"].startswith("2.5.1+cu124 (CUDA 12.4, cuDNN ") and env["commit"] and env["nvcc"] and env["driver"]
    assert set(gpu_check.requirements()) == {"pytest", "triton", "nvcc", "ninja"}


def test_child_env_drops_triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = gpu_check.child_env()
    assert "TRITON_INTERPRET" not in env and env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/elsewhere"]


# ----------------------------------------------------------------------------------------------------------------------
# main() end to end, with a pretend GPU and pretend stages
# ----------------------------------------------------------------------------------------------------------------------
DRIVER = """
import json, sys
sys.path.insert(0, {repo!r})
import torch
from bench import gpu_check as g

torch.cuda.is_available = lambda: True
g.environment = lambda torch: {{"date": "2026-12-03T10:00:00", "commit": "abc", "device": "Fake GPU 9000",
                                "devices": "1 visible", "torch": "x", "triton": "x", "liger-kernel": "missing"}}
g.requirements = lambda: {{"pytest": None, "triton": None, "nvcc": "nvcc not found (pretend)", "ninja": None}}
steps = json.loads(sys.argv[1])
g.plan = lambda py, out, plot=True, tests_dir=None: [
    [[g.Stage(n, n, [sys.executable, "-c", c], cap, tuple(needs)) for n, c, cap, needs in lane] for lane in step]
    for step in steps]
sys.exit(g.main(sys.argv[2:]))
"""


def _driver(tmp_path, steps, *args, **popen):
    (tmp_path / "driver.py").write_text(DRIVER.format(repo=str(REPO)))
    return subprocess.Popen([PY, str(tmp_path / "driver.py"), json.dumps(steps), *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), **popen)


def test_main_runs_the_stages_and_reports(tmp_path):
    steps = [[[["first", "print('hello')", 20, []]]],
             [[["native-ish", "print('x')", 20, ["nvcc"]]], [["second", "print('== 3 passed in 0.1s ==')", 20, []]]]]
    proc = _driver(tmp_path, steps, "--out", str(tmp_path / "run"), "--budget", "200")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out + err
    assert "gpu-check on Fake GPU 9000" in out and "missing: nvcc not found (pretend)" in out
    assert "missing: liger-kernel" in out and "native-ish: SKIPPED: nvcc not found (pretend)" in out
    assert "first: OK" in out and "no measurement" in out and "gpu-check: done in" in out
    js = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {s["name"]: s["status"] for s in js["stages"]} == {"first": "ok", "native-ish": "skipped", "second": "ok"}
    assert js["done"]


def test_sigterm_kills_the_running_stage_and_exits_130(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(120)']); open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(120)")
    steps = [[[["sleepy", code, 200, []]], [["sleepy2", "import time; time.sleep(120)", 200, []]]],
             [[["never", "print(1)", 20, []]]]]
    proc = _driver(tmp_path, steps, "--out", str(tmp_path / "run"), "--budget", "300")
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    time.sleep(0.5)
    proc.terminate()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    _assert_dies(int(pid_file.read_text()))
    js = json.loads((tmp_path / "run" / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in js["stages"]}
    assert status["sleepy"] == status["sleepy2"] == "failed" and status["never"] in ("pending", "skipped")
    assert "interrupted" in out
