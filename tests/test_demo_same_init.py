"""``python -m minillm_fast.demo.same_init`` without training: the configs it derives from a demo run (every method
from the SFT checkpoint, KD's step count, an evaluation at step 0, MiniLLM also at KD's lr), the error for a folder
that is not a finished demo, and the summary table read from the runs' metrics."""
from __future__ import annotations

import json

import pytest
import yaml

from minillm_fast.demo import same_init


def _demo(root):
    (root / "models" / "sft_min_valid_loss").mkdir(parents=True)
    (root / "models" / "sft_min_valid_loss" / "config.json").write_text("{}")
    (root / "models" / "seqkd_train.jsonl").write_text("")
    (root / "configs").mkdir()
    for name, values in (("kd", dict(method="kd", total_iters=600, lr=3e-3, warmup_steps=30, student="init")),
                         ("seqkd", dict(method="seqkd", total_iters=600, lr=3e-3, warmup_steps=30, student="init")),
                         ("minillm", dict(method="minillm", total_iters=160, lr=5e-4, warmup_steps=8, student="sft"))):
        (root / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(values))
    return root


def test_every_method_starts_from_the_sft_checkpoint_for_kds_steps(tmp_path):
    demo = _demo(tmp_path / "demo")
    cfgs = same_init.configs(demo, tmp_path / "out", eval_interval=50, valid_samples=200)
    assert list(cfgs) == [name for name, _ in same_init.METHODS]
    for name, cfg in cfgs.items():
        assert cfg["student"] == str(demo / "models" / "sft_min_valid_loss"), name
        assert cfg["total_iters"] == 600 and cfg["eval_on_start"] and cfg["eval_interval"] == 50, name
        assert cfg["output_dir"] == str(tmp_path / "out" / "runs" / name)
    assert cfgs["minillm"]["lr"] == 5e-4 and cfgs["minillm_kd_lr"]["lr"] == 3e-3
    assert cfgs["minillm_kd_lr"]["method"] == "minillm" and cfgs["seqkd"]["seqkd_data"].endswith("seqkd_train.jsonl")


def test_a_folder_that_is_not_a_finished_demo_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="--demo .*sft_min_valid_loss"):
        same_init.configs(tmp_path, tmp_path / "out", eval_interval=50, valid_samples=200)
    demo = _demo(tmp_path / "demo")
    (demo / "configs" / "kd.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="configs/kd.yaml"):
        same_init.configs(demo, tmp_path / "out", eval_interval=50, valid_samples=200)


def test_the_summary_reads_each_run_at_kds_seconds(tmp_path):
    def write(name, seconds, evals):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        recs = [{"step": 0, "eval/rev_kl": 1.0, "eval/rougeL": 20.0}]
        for step in range(1, 5):
            recs.append({"step": step, "time/step_s": seconds, "train/tokens": 10})
            if step in evals:
                recs.append({"step": step, "eval/rev_kl": evals[step], "eval/rougeL": 20.0 + step})
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))

    write("kd", 1.0, {2: 0.8, 4: 0.6})          # ends at 4 s
    write("minillm", 1.5, {2: 0.7, 4: 0.5})     # 3 s at step 2, 6 s at step 4: at KD's 4 s, its step 2
    table = "\n".join(same_init.summary(tmp_path))
    assert "| KD | 4 | 4 | 1.000 -> 0.600 | 20.00 -> 24.00 | 4, 0.600, 24.00 |" in table
    assert "| MiniLLM | 4 | 6 | 1.000 -> 0.500 | 20.00 -> 24.00 | 2, 0.700, 22.00 |" in table
    assert "SeqKD" not in table                 # no run, no row
