"""Chain-based distillation end to end (minillm_fast/distill/cbd/, docs/cbd.md) on the toy workspace.

* A 2-link GPT-2 chain (teacher -> a1 -> a2, 2 optimiser steps per link) is interrupted after its first link and run
  again: the finished link is skipped, the second runs, chain.json records both anchors (sizes, parameter counts,
  validation metrics).
* ``cbd init`` builds a student between the anchors (the default ``a``, or ``--alpha``), or refuses one outside the
  chain's range without ``--allow-extrapolate``.
* A bridge link moves the vocabulary to another tokenizer by token strings.
* Bad inputs are refused before any training: another tokenizer without the bridge, an anchor that cannot be mapped,
  anchors not in decreasing size, a bad distill key, neighbouring anchors of two families.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from distill_utils import workspace
from minillm_fast.cli import main as cli_main
from minillm_fast.distill.cbd import bridge, interpolate as interp
from minillm_fast.distill.cbd.chain import ChainError, run_chain
from minillm_fast.distill.cbd.init import init_student

pytestmark = pytest.mark.usefixtures("single_thread")

LINK = dict(total_iters=2, batch_size=4, max_length=80, max_prompt_length=64, eval_batch_size=4, eval_interval=2,
            save_interval=1, final_eval=False, progress_bar=False, plots=False, eval_generate=False,
            select_metric="loss", seed=1)
ANCHORS = [{"name": "a1", "config": {"n_embd": 48, "n_head": 3}}, {"name": "a2", "config": {"n_embd": 32, "n_head": 2}}]


def write_chain(root, out="chain", anchors=ANCHORS, **extra) -> str:
    p = workspace("gpt2")
    cfg = {"output_dir": str(root / out), "teacher": p["teacher"],
           "distill": dict(LINK, train_data=p["train_data"], valid_data=p["valid_data"]), "anchors": anchors, **extra}
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


class Recorder:
    """The distill entry point, counting calls; ``stop_at``: raise KeyboardInterrupt at that call instead."""

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = [], stop_at

    def __call__(self, argv):
        from minillm_fast.distill.cli import distill_main

        self.calls.append(argv)
        if self.stop_at is not None and len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        return distill_main(argv)


def student_config(path, **kw):
    from transformers import GPT2Config

    d = dict(vocab_size=512, n_embd=48, n_layer=1, n_head=3, n_positions=256, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    d.update(kw)
    GPT2Config(**d).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The chain, built in two runs: the first interrupted at its second link."""
    root = tmp_path_factory.mktemp("cbd")
    cfg = write_chain(root)
    first = Recorder(stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_chain(cfg, log=lambda m: None, distill_fn=first)
    with open(root / "chain" / "chain.json") as f:
        after_first = json.load(f)
    a1_files = {n: os.path.getmtime(os.path.join(root, "chain", "anchors", "a1", n))
                for n in os.listdir(root / "chain" / "anchors" / "a1")}
    second = Recorder()
    log = []
    manifest = run_chain(cfg, log=log.append, distill_fn=second)
    return dict(root=root, cfg=cfg, first=first, second=second, after_first=after_first, manifest=manifest,
                log=log, a1_files=a1_files, dir=root / "chain")


def test_an_interrupted_chain_continues_from_the_last_finished_anchor(built):
    assert [m["name"] for m in built["after_first"]["members"]] == ["teacher", "a1"]
    assert len(built["second"].calls) == 1 and "a2" in built["second"].calls[0][1]
    assert any("anchor a1: finished earlier" in line for line in built["log"])
    a1 = built["dir"] / "anchors" / "a1"
    assert {n: os.path.getmtime(a1 / n) for n in os.listdir(a1)} == built["a1_files"]   # untouched
    # a third run has nothing to do
    third = Recorder()
    run_chain(built["cfg"], log=lambda m: None, distill_fn=third)
    assert third.calls == []


def test_manifest_records_sizes_parameters_and_metrics(built):
    from transformers import AutoModelForCausalLM

    with open(built["dir"] / "chain.json") as f:
        man = json.load(f)
    members = man["members"]
    assert [m["name"] for m in members] == ["teacher", "a1", "a2"]
    params = [m["params"] for m in members]
    assert params == sorted(params, reverse=True)
    for m in members[1:]:
        model = AutoModelForCausalLM.from_pretrained(built["dir"] / m["path"])
        assert m["params"] == sum(p.numel() for p in model.parameters())
        assert m["shape"]["hidden"] == model.config.n_embd
        link = m["link"]
        assert link["method"] == "kd" and link["steps"] == 2 and link["model"] == "best"
        assert {"eval/loss", "eval/kd"} <= set(link["metrics"])
    assert members[2]["link"]["from"] == "anchors/a1"
    with open(built["dir"] / "links" / "a2" / "link.yaml") as f:
        link_cfg = yaml.safe_load(f)
    assert link_cfg["teacher"].endswith("anchors/a1") and link_cfg["method"] == "kd" and link_cfg["resume"] is True


def test_init_between_anchors(built, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    cfg = student_config(tmp_path / "student-config")
    out = tmp_path / "student"
    assert cli_main(["cbd", "init", "--chain", str(built["dir"]), "--student-config", cfg, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    with open(out / "cbd_init.json") as f:
        rec = json.load(f)
    assert rec["big"]["name"] == "a1" and rec["small"]["name"] == "a2"
    p = rec["student_params"]
    assert rec["alpha"] == pytest.approx((rec["big"]["params"] - p) / (rec["big"]["params"] - rec["small"]["params"]))
    assert 0 < rec["alpha"] < 1 and "a1" in printed and "a2" in printed and f"a = {rec['alpha']:.4f}" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert set(rec["sources"]) == set(model.state_dict())
    assert os.path.exists(out / "tokenizer.json")
    # --alpha 0 gives the big anchor mapped to the student's shape
    init_student(str(built["dir"]), cfg, str(tmp_path / "s0"), alpha=0.0, log=lambda m: None)
    from minillm_fast.distill.cbd.mapping import map_model
    from transformers import AutoConfig

    mapped = map_model(AutoModelForCausalLM.from_pretrained(built["dir"] / "anchors" / "a1"),
                       AutoConfig.from_pretrained(cfg)).state_dict
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "s0").state_dict()
    for k in mapped:
        assert torch.equal(got[k], mapped[k]), k


def test_init_outside_the_range(built, tmp_path, capsys):
    cfg = student_config(tmp_path / "tiny", n_embd=16, n_head=1)
    args = ["cbd", "init", "--chain", str(built["dir"]), "--student-config", cfg, "--out", str(tmp_path / "s")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "outside the chain's range" in err and "--allow-extrapolate" in err and "Traceback" not in err
    assert cli_main(["init", *args[2:]]) == 2                               # `minillm-fast init`: cbd init's alias
    assert "outside the chain's range" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s")
    assert cli_main(args + ["--allow-extrapolate"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "a2" in err
    with open(tmp_path / "s" / "cbd_init.json") as f:
        rec = json.load(f)
    assert rec["extrapolated"] and rec["big"]["name"] == rec["small"]["name"] == "a2" and rec["alpha"] == 0.0


def test_init_refuses_another_tokenizer_and_unmappable_students(built, tmp_path):
    other = second_tokenizer(tmp_path / "tok2")
    cfg = student_config(tmp_path / "c")
    with pytest.raises(ValueError, match="bridge"):
        init_student(str(built["dir"]), cfg, str(tmp_path / "s"), tokenizer=other, log=lambda m: None)
    bad = student_config(tmp_path / "bad", n_embd=48, n_head=4)        # head size 12, the anchors' is 16
    with pytest.raises(ValueError, match="head size"):
        init_student(str(built["dir"]), bad, str(tmp_path / "s"), log=lambda m: None)
    with pytest.raises(ValueError, match="no chain.json"):
        init_student(str(tmp_path), cfg, str(tmp_path / "s"), log=lambda m: None)


def test_init_refuses_neighbours_of_two_families(tmp_path):
    """A chain.json whose members around the student are a GPT-2 and a Llama model (a chain may change family at a
    link; a student cannot be interpolated across it)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    p = workspace("gpt2")
    big = AutoModelForCausalLM.from_pretrained(p["teacher"])                      # gpt2, hidden 64
    small_cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256)
    small = AutoModelForCausalLM.from_config(small_cfg)
    members = []
    for name, m in (("teacher", big), ("a1", small)):
        m.save_pretrained(tmp_path / "chain" / name)
        members.append({"name": name, "role": "anchor", "path": name, "model_type": m.config.model_type,
                        "params": sum(q.numel() for q in m.parameters()), "vocab_fingerprint": "same"})
    (tmp_path / "chain" / "chain.json").write_text(json.dumps({"version": 1, "members": members}))
    student = LlamaConfig(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=3, num_key_value_heads=1, head_dim=16, max_position_embeddings=256)
    assert members[1]["params"] < interp.param_count(student) < members[0]["params"]
    with pytest.raises(ValueError, match="different architecture families"):
        init_student(str(tmp_path / "chain"), student, str(tmp_path / "s"), log=lambda m: None)


# ----------------------------------------------------------------------------------------------------------------------
# bridge
# ----------------------------------------------------------------------------------------------------------------------
def second_tokenizer(path) -> str:
    """Another byte-level BPE over the workspace's texts plus three new words, with another EOS string."""
    from minillm_fast.demo.tokenizer import build_tokenizer, rendered_texts
    from minillm_fast.distill.data import read_jsonl

    if not os.path.exists(path):
        p = workspace("gpt2")
        texts = rendered_texts(read_jsonl(p["train_data"]) + read_jsonl(p["valid_data"]))
        texts += ["elephant zebra giraffe"] * 30
        build_tokenizer(texts, str(path), 400, min_frequency=0, split_digits=False, model_max_length=None,
                        special_tokens={"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "<|end|>"})
    return str(path)


def test_transfer_vocabulary_rows(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = workspace("gpt2")
    old_tok, new_tok = AutoTokenizer.from_pretrained(p["tokenizer"]), AutoTokenizer.from_pretrained(
        second_tokenizer(tmp_path / "tok2"))
    model = AutoModelForCausalLM.from_pretrained(p["teacher"])          # untied head
    moved, stats = bridge.transfer_vocabulary(model, old_tok, new_tok)
    assert moved.config.vocab_size == len(new_tok) and moved.config.eos_token_id == new_tok.eos_token_id
    assert stats["kept"] > 0 and stats["pieces"] > 0 and stats["special"] == 1
    assert sum(stats[k] for k in ("kept", "special", "pieces", "mean")) == len(new_tok)
    old_e, old_h = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    new_e, new_h = moved.get_input_embeddings().weight, moved.get_output_embeddings().weight
    old_vocab = old_tok.get_vocab()
    word = new_tok.convert_tokens_to_ids("Ġzebra")
    assert "Ġzebra" not in old_vocab and word is not None
    pieces = old_tok.encode(" zebra", add_special_tokens=False)
    assert len(pieces) > 1
    torch.testing.assert_close(new_e[word], old_e[pieces].mean(0))
    torch.testing.assert_close(new_h[word], old_h[pieces].mean(0))
    for s, t in new_tok.get_vocab().items():
        if s in old_vocab:
            assert torch.equal(new_e[t], old_e[old_vocab[s]]) and torch.equal(new_h[t], old_h[old_vocab[s]])
    assert torch.equal(new_e[new_tok.eos_token_id], old_e[old_tok.eos_token_id])      # by role: </s> -> <|end|>


def test_bridge_link(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok2 = second_tokenizer(tmp_path / "tok2")
    anchors = [{"name": "b1", "config": {"n_embd": 32, "n_head": 2}, "tokenizer": tok2, "bridge": True}]
    cfg = write_chain(tmp_path, "bchain", anchors=anchors)
    man = run_chain(cfg, log=lambda m: None)
    names = {m["name"]: m for m in man["members"]}
    assert names["b1-bridge"]["role"] == "bridge" and names["b1-bridge"]["vocab_size"] == 512
    b1 = names["b1"]
    assert b1["vocab_size"] == b1["tokenizer_size"] == len(AutoTokenizer.from_pretrained(tok2))
    assert b1["vocab_fingerprint"] == bridge.vocab_fingerprint(AutoTokenizer.from_pretrained(tok2))
    assert b1["link"]["bridge"]["rows"]["pieces"] > 0 and b1["link"]["metrics"]
    d = tmp_path / "bchain" / "anchors"
    assert AutoTokenizer.from_pretrained(d / "b1").get_vocab() == AutoTokenizer.from_pretrained(tok2).get_vocab()
    m = AutoModelForCausalLM.from_pretrained(d / "b1")
    b = AutoModelForCausalLM.from_pretrained(d / "b1-bridge")
    for k, v in m.state_dict().items():                                 # only the vocabulary rows moved
        if "wte" not in k and "lm_head" not in k:
            assert torch.equal(v, b.state_dict()[k]), k


# ----------------------------------------------------------------------------------------------------------------------
# bad chain configs: refused before any training
# ----------------------------------------------------------------------------------------------------------------------
def _refused(tmp_path, match, anchors=ANCHORS, **extra):
    rec = Recorder()
    cfg = write_chain(tmp_path, anchors=anchors, **extra)
    with pytest.raises(ValueError, match=match):
        run_chain(cfg, log=lambda m: None, distill_fn=rec)
    assert rec.calls == [] and not os.path.exists(tmp_path / "chain" / "chain.json")


def test_another_tokenizer_without_the_bridge(tmp_path):
    tok2 = second_tokenizer(tmp_path / "tok2")
    _refused(tmp_path, "set bridge: true", anchors=[{"config": {"n_embd": 32, "n_head": 2}, "tokenizer": tok2}])


@pytest.mark.parametrize("anchors,match", [
    ([{"config": {"n_embd": 48, "n_head": 4}}], "head size 16"),
    ([{"config": {"n_embd": 48, "n_head": 3}}, {"config": {"n_embd": 64, "n_head": 4}}], "not fewer than"),
    ([{"config": {"n_embd": 48, "n_head": 3}, "init": "pruned"}], "init='pruned'"),
    ([{"config": {"n_embd": 48, "n_head": 3, "hidden_sizes": 3}}], "not a key"),
    ([{"config": {"n_embd": 48, "n_head": 3}, "distill": {"teacher": "x"}}], "set by the chain"),
    ([{"config": {"n_embd": 48, "n_head": 3}, "distill": {"lr_schedule": "sometimes"}}], "lr_schedule"),
    ([{"config": {"n_embd": 48, "n_head": 3}, "method": "telepathy"}], "telepathy"),
], ids=["unmappable", "not-decreasing", "bad-init", "bad-config-key", "reserved-key", "bad-distill-value",
        "bad-method"])
def test_bad_chain_configs_are_refused_before_training(tmp_path, anchors, match):
    _refused(tmp_path, match, anchors=anchors)


def test_chain_cli_reports_errors_in_one_paragraph(tmp_path, capsys):
    cfg = write_chain(tmp_path, anchors=[{"config": {"n_embd": 48, "n_head": 4}}])
    assert cli_main(["cbd", "chain", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minillm-fast cbd: error:") and "head size" in err and "Traceback" not in err
    assert cli_main(["cbd", "chain", "--config", cfg.replace(".yaml", "-dry.yaml")]) == 2
    # --dry-run checks and prints the plan, trains nothing
    cfg = write_chain(tmp_path, out="dry")
    assert cli_main(["cbd", "chain", "--config", cfg, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "a1: gpt2: 2 layers, hidden 48" in out and not os.path.exists(tmp_path / "dry")
    assert cli_main(["chain", "--config", cfg, "--dry-run"]) == 0          # the spelling: an alias of cbd chain
    assert "a1: gpt2: 2 layers, hidden 48" in capsys.readouterr().out


def test_changed_config_for_a_finished_chain_is_refused(built, tmp_path):
    with open(built["cfg"]) as f:
        raw = yaml.safe_load(f)
    raw["distill"]["lr"] = 1e-2
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ChainError, match="another config"):
        run_chain(str(path), log=lambda m: None, distill_fn=Recorder())
