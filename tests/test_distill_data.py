"""Data: the reference's prompt template, dropped prompts, EOS, labels, padding, corpus blocks, deterministic order."""
from __future__ import annotations

import json

import torch
from distill_utils import workspace

from minillm_fast.distill import data as D
from minillm_fast.distill.models import load_tokenizer


def test_template_is_the_reference_one():
    assert D.format_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert D.format_prompt("Sum.", "1 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write "
        "a response that appropriately completes the request.\n\n### Instruction:\nSum.\n\n### Input:\n1 2\n\n"
        "### Response:\n")
    assert D.format_prompt("Say hi.", "  ") == D.format_prompt("Say hi.")


def test_load_drop_eos_and_collate(tmp_path):
    tok = load_tokenizer(workspace("gpt2")["tokenizer"])
    path = tmp_path / "d.jsonl"
    recs = [{"instruction": "Reverse the words.", "context": "red blue", "response": "blue red"},
            {"instruction": "Name the first word of: cat dog", "input": "", "output": "cat"},
            {"instruction": "x " * 200, "response": "too long"},
            {"prompt": "### Response:\n", "response": ["a", "b"]}]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    ex, dropped = D.load_instructions(str(path), tok, max_length=72, max_prompt_length=64)
    assert dropped == [3] and len(ex) == 3                     # the 200-word prompt (line 3) is dropped, not cut
    assert ex[0].prompt == D.format_prompt("Reverse the words.", "red blue")
    assert ex[0].prompt_ids == tok(ex[0].prompt)["input_ids"]
    assert ex[0].response_ids == tok("blue red", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex[2].references == ["a", "b"] and ex[1].references == ["cat"]

    full = D.collate_full(ex, tok.pad_token_id)
    for i, e in enumerate(ex):
        n, p = len(e.prompt_ids) + len(e.response_ids), len(e.prompt_ids)
        assert full["input_ids"][i, :n].tolist() == e.prompt_ids + e.response_ids
        assert full["attention_mask"][i].sum() == n
        assert (full["labels"][i, :p] == D.IGNORE_INDEX).all() and (full["labels"][i, n:] == D.IGNORE_INDEX).all()
        assert full["labels"][i, p:n].tolist() == e.response_ids
    prompts = D.collate_prompts(ex, tok.pad_token_id)
    width = prompts["input_ids"].shape[1]
    for i, e in enumerate(ex):                                  # left-padded
        assert prompts["input_ids"][i, width - len(e.prompt_ids):].tolist() == e.prompt_ids
        assert prompts["attention_mask"][i].tolist() == [0] * (width - len(e.prompt_ids)) + [1] * len(e.prompt_ids)
    pos = D.positions_from_mask(prompts["attention_mask"])
    assert pos[0, -1] == len(ex[0].prompt_ids) - 1 and pos.min() == 0


def test_corpus_blocks_and_order(tmp_path):
    tok = load_tokenizer(workspace("gpt2")["tokenizer"])
    path = tmp_path / "c.txt"
    path.write_text("red blue green.\n\ncat dog.\n\n\nsun moon tree fish.\n")
    assert D.read_documents(str(path)) == ["red blue green.", "cat dog.", "sun moon tree fish."]
    blocks = D.load_pretrain_blocks(str(path), tok, 4)
    stream = sum((tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                  for d in D.read_documents(str(path))), [])
    assert sum(blocks, []) == stream[:len(blocks) * 4] and all(len(b) == 4 for b in blocks)
    b = D.collate_blocks(blocks[:2], tok.pad_token_id)
    assert torch.equal(b["labels"], b["input_ids"])

    a, c = D.IndexStream(5, seed=3), D.IndexStream(5, seed=3)
    first = a.take(7)                                            # crosses into epoch 1
    assert sorted(first[:5]) == list(range(5)) and a.state_dict() == {"epoch": 1, "pos": 2}
    c.take(4)
    state = c.state_dict()
    d = D.IndexStream(5, seed=3)
    d.load_state_dict(state)
    assert d.take(3) == first[4:7]                              # resumable from two ints
    assert D.rank_slice(list(range(8)), 1, 2) == [4, 5, 6, 7]
