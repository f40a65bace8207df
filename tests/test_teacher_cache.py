"""minillm-fast teacher-cache: the teacher's top k over the training responses, written once, resumable, checked when
a run opens it (distill/teacher_cache.py)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from distill_utils import workspace
from minillm_fast import cli, reference
from minillm_fast.distill import data, heads, models, teacher_cache

pytestmark = pytest.mark.usefixtures("single_thread")
LIMITS = dict(max_length=80, max_prompt_length=64)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    p = workspace("gpt2")
    out = str(tmp_path_factory.mktemp("cache") / "cache")
    manifest = teacher_cache.build(p["teacher"], p["train_data"], out, top_k=8, batch_size=3, shard_examples=5,
                                   backend="torch", progress=False, **LIMITS)
    return p, out, manifest


def _examples(p):
    tok = models.load_tokenizer(p["teacher"])
    return tok, data.load_instructions(p["train_data"], tok, **LIMITS)[0]


def test_rows_are_the_teachers_top_k(built):
    """Each example's rows equal the top 8 of the teacher's full log-softmax at its response positions."""
    p, out, manifest = built
    tok, examples = _examples(p)
    assert manifest["complete"] and manifest["n_examples"] == len(examples) and len(manifest["shards"]) > 1
    cache = teacher_cache.TeacherCache.open(out, tok, p["train_data"], n_examples=len(examples), **LIMITS)
    teacher = models.load_model(p["teacher"])
    head = heads.head_of(teacher)
    for i in (0, len(examples) // 2, len(examples) - 1):
        ex = examples[i]
        ids = torch.tensor([ex.prompt_ids + ex.response_ids])
        with torch.no_grad():
            h = models.hidden_states(teacher, ids)[0, len(ex.prompt_ids) - 1:-1]
            ref = reference.token_topk(h.double(), head.weight.double(), 8, bias=None if head.bias is None else
                                       head.bias.double(), vocab_size=len(tok))
        got_ids, got_lp = cache.rows(i)
        assert got_ids.shape == (len(ex.response_ids), 8)
        assert (got_ids == ref.ids).float().mean() > 0.99        # fp16 storage may swap near-ties
        assert (got_lp - ref.logprobs).abs().max() < 2e-2 * (1 + ref.logprobs.abs().max())


def test_batch_aligns_with_the_labels(built):
    p, out, _ = built
    tok, examples = _examples(p)
    cache = teacher_cache.TeacherCache.open(out, tok, p["train_data"], n_examples=len(examples), **LIMITS)
    chosen = [3, 0, 7]
    batch = data.collate_full([examples[i] for i in chosen], tok.pad_token_id)
    labels = batch["labels"][:, 1:]
    ids, lps = cache.batch(chosen, [len(examples[i].prompt_ids) for i in chosen], labels.shape[1], "cpu")
    assert ((ids[..., 0] >= 0) == (labels != data.IGNORE_INDEX)).all()   # one row per response token, nowhere else
    assert torch.equal(ids[1, len(examples[0].prompt_ids) - 1], cache.rows(0)[0][0])


def test_resumes_after_an_interruption(built, tmp_path, monkeypatch):
    """A run stopped after its first shard keeps it; the next run continues and gives the same cache."""
    p, out, manifest = built
    calls = {"n": 0}
    real = teacher_cache.teacher_rows

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # two batches of 3 = the first shard of 5 examples, then the crash
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(teacher_cache, "teacher_rows", dying)
    half = str(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        teacher_cache.build(p["teacher"], p["train_data"], half, top_k=8, batch_size=3, shard_examples=5,
                            backend="torch", progress=False, **LIMITS)
    first = json.load(open(os.path.join(half, "manifest.json")))
    assert not first["complete"] and len(first["shards"]) == 1
    mtime = os.path.getmtime(os.path.join(half, "shard-00000.safetensors"))
    monkeypatch.setattr(teacher_cache, "teacher_rows", real)
    again = teacher_cache.build(p["teacher"], p["train_data"], half, top_k=8, batch_size=3, shard_examples=5,
                                backend="torch", progress=False, **LIMITS)
    assert again["complete"] and again["shards"] == manifest["shards"]
    assert os.path.getmtime(os.path.join(half, "shard-00000.safetensors")) == mtime   # not redone
    from safetensors.torch import load_file

    for s in manifest["shards"]:
        a, b = load_file(os.path.join(out, s["file"])), load_file(os.path.join(half, s["file"]))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_a_cache_of_other_inputs(built, tmp_path):
    p, out, _ = built
    tok, examples = _examples(p)
    other = tmp_path / "train.jsonl"
    shutil.copy(p["train_data"], other)
    with open(other, "a") as f:
        f.write(json.dumps({"instruction": "one more", "response": "yes"}) + "\n")
    with pytest.raises(teacher_cache.CacheError, match=r"the data file .* differ"):
        teacher_cache.TeacherCache.open(out, tok, str(other), n_examples=len(examples), **LIMITS)
    with pytest.raises(teacher_cache.CacheError, match=r"max_length \(80 vs 96\) differ"):
        teacher_cache.TeacherCache.open(out, tok, p["train_data"], n_examples=len(examples), max_length=96,
                                        max_prompt_length=64)
    tok.add_tokens(["<brand-new-token>"])
    with pytest.raises(teacher_cache.CacheError, match="the tokenizer"):
        teacher_cache.TeacherCache.open(out, tok, p["train_data"], n_examples=len(examples), **LIMITS)
    with pytest.raises(teacher_cache.CacheError, match="no teacher cache at"):
        teacher_cache.TeacherCache.open(str(tmp_path / "nowhere"), tok, p["train_data"], n_examples=1, **LIMITS)


def test_cli_builds_and_reports_mistakes(tmp_path, capsys):
    p = workspace("gpt2")
    out = str(tmp_path / "c")
    args = ["teacher-cache", "--teacher", p["teacher"], "--data", p["train_data"], "--out", out, "--top-k", "4",
            "--max-samples", "4", "--no-progress", "--backend", "torch", "--max-length", "80",
            "--max-prompt-length", "64"]
    assert cli.main(args) == 0
    assert json.load(open(os.path.join(out, "manifest.json")))["n_examples"] == 4
    assert cli.main([*args[:-6], "--top-k", "4", "--max-samples", "5", "--no-progress", "--backend", "torch"]) == 2
    assert "made with other settings" in capsys.readouterr().err
    assert cli.main(["teacher-cache", "--teacher", str(tmp_path / "none"), "--data", p["train_data"], "--out",
                     out]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# training from the cache (teacher_cache: in the config; distill/methods/lm.py)
# ----------------------------------------------------------------------------------------------------------------------
def _train(cfg, monkeypatch=None):
    from distill_utils import read_metrics
    from minillm_fast.distill.trainer import Trainer

    if monkeypatch is not None:   # a run from the cache must never load the teacher
        real = models.load_model

        def no_teacher(path, *a, what="model", **k):
            assert what != "teacher", "the teacher was loaded"
            return real(path, *a, what=what, **k)

        monkeypatch.setattr(models, "load_model", no_teacher)
    Trainer(cfg).train()
    return [r for r in read_metrics(cfg.output_dir) if "train/kd" in r]


def test_kd_from_a_full_cache_equals_kd_from_the_live_teacher(tmp_path, monkeypatch):
    """With every id cached (k = V, fp32 log-probs) the bucket tail is empty and the sparse KL is the full KL: the
    cached run's losses equal the live-teacher run's, step by step, to fp32 round-off; and its KD term falls."""
    from distill_utils import config

    p = workspace("gpt2")
    vocab = len(models.load_tokenizer(p["teacher"]))
    out = str(tmp_path / "full")
    teacher_cache.build(p["teacher"], p["train_data"], out, top_k=vocab, dtype="fp32", batch_size=8,
                        backend="torch", progress=False, **LIMITS)
    common = dict(method="kd", valid_data=None, total_iters=4, kd_ratio=0.7)
    live = _train(config(tmp_path / "live", **common))
    cached = _train(config(tmp_path / "cached", teacher=None, teacher_cache=out, **common), monkeypatch)
    assert len(live) == len(cached) == 4
    for a, b in zip(live, cached):
        for key in ("train/kd", "train/ce", "train/loss"):
            assert abs(a[key] - b[key]) <= 1e-5 * (1 + abs(a[key])), (key, a[key], b[key])
    assert cached[-1]["train/kd"] < 0.9 * cached[0]["train/kd"]


@pytest.mark.parametrize("method", ["kd", "seqkd"])
def test_kd_from_a_top_k_cache_trains(built, tmp_path, monkeypatch, method):
    """k=8 of the teacher, fp16: the run never loads the teacher and its KD term (bucket tail) falls. seqkd reads
    its teacher responses from seqkd_data, the file the cache was made over (here the training set itself)."""
    from distill_utils import config

    p, out, _ = built
    extra = dict(seqkd_data=p["train_data"]) if method == "seqkd" else {}
    rows = _train(config(tmp_path, method=method, teacher=None, teacher_cache=out, valid_data=None, total_iters=4,
                         **extra), monkeypatch)
    assert all(r["train/kd"] >= 0 for r in rows) and rows[-1]["train/kd"] < 0.9 * rows[0]["train/kd"]


def test_a_cache_that_does_not_fit_the_run_is_refused(built, tmp_path):
    """Before any step: a method that needs the live teacher, seqkd without its data, other lengths, an unfinished
    cache, a cache of other data."""
    from distill_utils import config
    from minillm_fast.distill.config import ConfigError
    from minillm_fast.distill.trainer import Trainer

    p, out, _ = built
    with pytest.raises(ConfigError, match="teacher_cache=.* works with method kd .* not method='minillm'"):
        config(tmp_path, method="minillm", teacher_cache=out).resolve()
    with pytest.raises(ConfigError, match="needs seqkd_objective=kd and seqkd_data"):
        config(tmp_path, method="seqkd", teacher=None, teacher_cache=out).resolve()
    with pytest.raises(ConfigError, match="made with max_length=80, this run has max_length=96"):
        config(tmp_path, method="kd", teacher=None, teacher_cache=out, max_length=96).resolve()
    with pytest.raises(ConfigError, match="teacher_cache_tail='all' is not supported"):
        config(tmp_path, method="kd", teacher=None, teacher_cache=out, teacher_cache_tail="all").resolve()
    with pytest.raises(ConfigError, match="no teacher cache at"):
        config(tmp_path, method="kd", teacher=None, teacher_cache=str(tmp_path)).resolve()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    manifest = json.load(open(unfinished / "manifest.json"))
    json.dump({**manifest, "complete": False}, open(unfinished / "manifest.json", "w"))
    with pytest.raises(ConfigError, match="is incomplete"):
        config(tmp_path, method="kd", teacher=None, teacher_cache=str(unfinished)).resolve()
    # made over the full training set, used with its first 10 examples
    with pytest.raises(ConfigError, match=r"holds \d+ examples but the run has 10"):
        Trainer(config(tmp_path, method="kd", teacher=None, teacher_cache=out, max_train_samples=10))
