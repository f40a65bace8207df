"""The demo's profiles (``--profile default | quick | long``) and ``--reuse-runs``, without training anything: the
long profile's models are the sizes it promises and fit the CBD rows; a student run is reused only when its config
and everything upstream are unchanged and its checkpoint exists. (``tests/test_demo_quick.py`` runs the pipeline.)"""
from __future__ import annotations

import dataclasses

import pytest

from minillm_fast.demo import cbd, configs, pipeline
from minillm_fast.demo.pipeline import LONG, PROFILES, QUICK, Cache, DemoRun


def _shapes(models: str) -> dict:
    sizes = configs.MODEL_SETS[models]
    return {role: configs.SHAPES[getattr(sizes, role)] for role in ("teacher", "student", "anchor_mid", "cbd_student")}


def test_the_long_profile_is_larger_in_models_data_and_steps():
    vocab = 1795
    count = {p: {role: configs.num_parameters(configs.shape_config(key, vocab, "llama"))
                 for role, key in dataclasses.asdict(configs.MODEL_SETS[PROFILES[p].models]).items()}
             for p in ("default", "long")}
    assert count["long"]["teacher"] > 2.5 * count["default"]["teacher"]
    assert count["long"]["student"] > 2 * count["default"]["student"]
    assert count["long"]["teacher"] > 4 * count["long"]["student"]           # still a distillation
    full = PROFILES["default"]
    assert LONG.sizes["train"] == 2 * full.sizes["train"] and LONG.sizes["test"] > full.sizes["test"]
    for stage in ("teacher", "sft", "kd", "seqkd", "minillm", "okd"):
        assert getattr(LONG, stage)["total_iters"] == 2 * getattr(full, stage)["total_iters"], stage


@pytest.mark.parametrize("models", sorted(configs.MODEL_SETS))
def test_every_profile_can_build_its_cbd_rows(models):
    """The CBD rows map heads one to one, so every model of a profile has the same head width, and the CBD student
    lies between the two anchors in parameters."""
    widths = {role: s.hidden // s.heads for role, s in _shapes(models).items()}
    if models != "default":                      # the default shapes are only used by hand (the demo runs quick)
        assert len(set(widths.values())) == 1, widths
    cfgs = cbd.configs(1795, "llama", models)
    n = {k: configs.num_parameters(c) for k, c in cfgs.items()}
    assert n["anchor_small"] < n["student"] < n["anchor_mid"], n


def test_profile_arguments_are_checked(capsys):
    with pytest.raises(ValueError, match="profile='huge'"):
        pipeline.run_demo("unused", profile="huge")
    with pytest.raises(ValueError, match="quick=True"):
        pipeline.run_demo("unused", quick=True, profile="long")
    for argv, message in ((["--quick", "--profile", "long"], "contradict"),
                          (["--fresh", "--reuse-runs"], "pass one of them")):
        with pytest.raises(SystemExit):
            pipeline.main(argv)
        assert message in capsys.readouterr().err


def _demo(tmp_path, reuse: bool) -> DemoRun:
    demo = DemoRun(tmp_path, QUICK, family="llama", seed=0, n_parallel=1, threads=1, say=lambda *_: None,
                   reuse_runs=reuse)
    demo.cache = Cache(tmp_path / "cache.json", fresh=False)
    demo.keys.update(init={"i": 1}, teacher={"t": 1})
    return demo


def test_a_student_run_is_reused_only_when_nothing_upstream_changed(tmp_path):
    after_sft = []
    first = _demo(tmp_path, reuse=True)
    job = first._distill_job("sft", dict(QUICK.sft, method="sft"), [], 1.0, after=lambda: after_sft.append(1))
    assert not job.cached                                    # nothing recorded yet
    (tmp_path / "runs" / "sft" / "best").mkdir(parents=True)
    (tmp_path / "runs" / "sft" / "best" / "config.json").write_text("{}")
    job.after()                                              # the run finished: its hook, then its key recorded
    assert after_sft == [1]

    again = _demo(tmp_path, reuse=True)
    job = again._distill_job("sft", dict(QUICK.sft, method="sft"), [], 1.0, after=lambda: after_sft.append(2))
    assert job.cached and after_sft == [1, 2]                # reused, and what it leaves for later stages redone
    assert again.timings["sft"]["cached"]
    assert not _demo(tmp_path, reuse=False)._distill_job("sft", dict(QUICK.sft, method="sft"), [], 1.0).cached

    changed_config = _demo(tmp_path, reuse=True)
    assert not changed_config._distill_job("sft", dict(QUICK.sft, method="sft", lr=1e-3), [], 1.0).cached
    job.after()                                              # recorded again with the original config
    changed_teacher = _demo(tmp_path, reuse=True)
    changed_teacher.keys["teacher"] = {"t": 2}
    assert not changed_teacher._distill_job("sft", dict(QUICK.sft, method="sft"), [], 1.0).cached
    job.after()
    (tmp_path / "runs" / "sft" / "best" / "config.json").unlink()
    assert not _demo(tmp_path, reuse=True)._distill_job("sft", dict(QUICK.sft, method="sft"), [], 1.0).cached
