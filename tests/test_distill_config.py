"""Config: docs/design.md section 3 defaults, YAML + key=value overrides, and early, clear failures."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from distill_utils import config, workspace

from minillm_fast.distill.config import ConfigError, DistillConfig, parse_overrides
from minillm_fast.distill.heads import real_vocab_size
from minillm_fast.distill.models import ModelLoadError, load_model, load_tokenizer


def test_reference_defaults():
    p = workspace("gpt2")
    cfg = DistillConfig(student=p["student"], teacher=p["teacher"], train_data=p["train_data"],
                        output_dir="/tmp/unused").resolve()
    # docs/design.md section 3 / the reference's gpt2 minillm script
    assert (cfg.method, cfg.alpha, cfg.gamma, cfg.cliprange, cfg.reward_scaling, cfg.cliprange_reward) == \
        ("minillm", 0.2, 0.95, 0.2, 0.5, 100.0)
    assert (cfg.num_rollouts, cfg.ppo_epochs, cfg.batch_size, cfg.lr, cfg.warmup_steps, cfg.weight_decay) == \
        (256, 4, 64, 5e-6, 100, 1e-6)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.grad_clip, cfg.max_length, cfg.max_prompt_length) == \
        (0.9, 0.95, 1.0, 512, 256)
    assert cfg.length_norm and cfg.single_step and not cfg.single_step_weighted and cfg.disable_dropout
    assert (cfg.kd_ratio, cfg.lm_coef, cfg.temperature, cfg.top_k, cfg.top_p) == (0.5, 1.0, 1.0, 0, 1.0)
    assert cfg.eval_seeds == [10, 20, 30, 40, 50] and cfg.no_repeat_ngram_size == 6
    assert cfg.max_new_tokens == 256 and cfg.tokenizer == p["student"] and cfg.micro_batch_size == 64
    kd = DistillConfig(method="kd", student=p["student"], teacher=p["teacher"], train_data=p["train_data"],
                       output_dir="/tmp/unused").resolve(world_size=2)
    assert (kd.lr, kd.lr_schedule, kd.weight_decay, kd.batch_size, kd.micro_batch_size) == \
        (5e-4, "cosine", 1e-2, 32, 16)


def test_yaml_then_overrides(tmp_path):
    p = workspace("gpt2")
    path = tmp_path / "run.yaml"
    path.write_text(f"method: kd\nstudent: {p['student']}\nteacher: {p['teacher']}\ntrain_data: {p['train_data']}\n"
                    f"output_dir: {tmp_path}\nlr: 1e-5\neval_seeds: [1, 2]\n")
    cfg = DistillConfig.from_sources(str(path), ["lr=3e-4", "alpha=0", "reward_scaling=null", "length_norm=false"])
    assert cfg.lr == 3e-4 and cfg.alpha == 0.0 and cfg.reward_scaling is None and cfg.length_norm is False
    assert DistillConfig.from_sources(str(path)).lr == 1e-5          # "1e-5" is a string to PyYAML: coerced
    assert cfg.resolve().eval_seeds == [1, 2]
    assert parse_overrides(["eval_seeds=[3]", "resume=true"]) == {"eval_seeds": [3], "resume": True}


@pytest.mark.parametrize("overrides, message", [
    (dict(method="distil"), "method='distil' is not supported"),
    (dict(student="/no/such/student"), "student='/no/such/student' does not exist"),
    (dict(teacher=None), "teacher is required for method='minillm'"),
    (dict(alpha=1.5), "alpha=1.5 must be <= 1"),
    (dict(lr=-1.0), "lr=-1.0 must be > 0"),
    (dict(batch_size=6, num_rollouts=8), "num_rollouts=8 must be a multiple of batch_size=6"),
    (dict(top_k=50), "top_k=50, top_p=1.0: MiniLLM rollouts sample the full mixture"),
    (dict(max_prompt_length=80), "max_prompt_length=80 must be < max_length=80"),
    (dict(advantage="papr"), "did you mean 'paper'"),
    (dict(micro_batch_size=3), "micro_batch_size=3 must divide"),
], ids=["method", "missing-path", "no-teacher", "alpha", "lr", "rollouts", "top_k", "prompt-length", "advantage",
        "micro"])
def test_bad_values_fail_early(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        config(tmp_path, **overrides).resolve()


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        DistillConfig.from_sources(None, ["learning_rate=1e-4"])
    with pytest.raises(ConfigError, match="did you mean ppo_epochs"):
        DistillConfig.from_dict({"ppo_epoch": 2})


def test_vocab_mismatch_and_missing_model(tmp_path):
    from minillm_fast.distill.toy import build_model

    p = workspace("gpt2")
    tok = load_tokenizer(p["tokenizer"])
    small = build_model("gpt2", vocab_size=len(tok) - 10, hidden=16, layers=1)
    with pytest.raises(ModelLoadError, match=f"tokenizer has {len(tok)} tokens but the teacher's lm_head has "
                                             f"{len(tok) - 10} rows"):
        real_vocab_size(tok, load_model(p["student"]), small)
    assert real_vocab_size(tok, load_model(p["student"])) == len(tok)      # padded head (512 rows) is fine
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nothing"))
    # the trainer fails before training for the same reason
    small.save_pretrained(tmp_path / "small")
    from minillm_fast.distill.trainer import Trainer

    with pytest.raises(ModelLoadError, match="vocabulary mismatch"):
        Trainer(config(tmp_path, teacher=str(tmp_path / "small")))


def test_cli_reports_config_errors(tmp_path):
    torch.manual_seed(0)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}

    env.update({k: v for k, v in os.environ.items() if k.startswith(("PYTHON", "HOME", "VIRTUAL"))})
    res = subprocess.run([sys.executable, "-m", "minillm_fast.distill", "method=minilm", "--dry-run"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2
    assert "error: method='minilm' is not supported (did you mean 'minillm'?)" in res.stderr


def _cli_args(cfg, **extra) -> list[str]:
    values = {k: cfg.to_dict()[k] for k in ("method", "student", "teacher", "train_data", "valid_data",
                                            "output_dir")}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_dry_run_catches_eval_generate_off_with_the_default_select_metric(tmp_path, capsys):
    """select_metric defaults to rougeL, which needs sampled responses: --dry-run stops there, not the run's start."""
    from minillm_fast import cli as package_cli

    cfg = config(tmp_path, method="sft")
    message = "select_metric='rougeL' needs eval_generate=true (or select_metric=loss / none)"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(tmp_path, method="sft", eval_generate=False, select_metric=None).resolve()
    assert package_cli.main(["distill", *_cli_args(cfg, eval_generate="false"), "--dry-run"]) == 2
    assert f"error: {message}" in capsys.readouterr().err
    for ok in (dict(eval_generate="false", select_metric="loss"), dict(eval_generate="true")):
        assert package_cli.main(["distill", *_cli_args(cfg, **ok), "--dry-run"]) == 0
    capsys.readouterr()
    assert config(tmp_path, eval_generate=False, select_metric=None, valid_data=None).resolve().select_metric == \
        "rougeL"                                         # no validation set: nothing to select with


def test_dry_run_catches_an_output_dir_of_an_earlier_run(tmp_path, capsys):
    from minillm_fast import cli as package_cli

    cfg = config(tmp_path, method="sft")
    os.makedirs(os.path.join(cfg.output_dir, "checkpoints"))
    open(os.path.join(cfg.output_dir, "checkpoints", "step_00000007.pt"), "wb").close()
    assert package_cli.main(["distill", *_cli_args(cfg), "--dry-run"]) == 2
    assert "holds checkpoints of an earlier run (up to step 7)" in capsys.readouterr().err
    for ok in ("overwrite=true", "resume=true"):
        assert package_cli.main(["distill", *_cli_args(cfg), ok, "--dry-run"]) == 0


def test_every_key_has_help_in_the_cli_and_the_docs():
    """Each field carries its help as metadata; --help-config prints it; docs/distill.md names every key."""
    import dataclasses

    from minillm_fast.distill.cli import config_help

    text = config_help()
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "distill.md")) as f:
        docs = f.read()
    fields = dataclasses.fields(DistillConfig)
    assert len(fields) >= 80                             # the whole config, not an empty one
    for f in fields:
        help_ = f.metadata.get("help", "")
        assert len(help_) > 5, f"config key {f.name} has no help"
        line = next((x for x in text.splitlines() if x.split()[:1] == [f.name]), None)
        assert line is not None and line.endswith(help_), f.name
        assert f"`{f.name}`" in docs, f"docs/distill.md does not mention config key {f.name}"
    assert "lr_min                 null" in text and "eval_seeds             [10, 20, 30, 40, 50]" in text


def test_every_method_has_one_registered_implementation():
    from minillm_fast.distill import config as C
    from minillm_fast.distill.base import Method
    from minillm_fast.distill.trainer import METHODS

    assert sorted(METHODS) == sorted(C.METHODS)
    for name, cls in METHODS.items():
        assert issubclass(cls, Method) and cls.__module__.startswith("minillm_fast.distill.methods."), name
