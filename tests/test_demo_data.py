"""The built-in demo's data pieces (minillm_fast/demo): the generated instruction set, its tokenizer, the tiny configs.

Data tests run on small splits (450/45/45) so the suite stays fast; the properties do not depend on the sizes (the
test on default sizes only counts words). No network is touched anywhere.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm_fast.demo import configs, tasks
from minillm_fast.demo.tokenizer import SPECIAL_TOKENS, build_tokenizer, demo_tokenizer_texts
from minillm_fast.distill.data import PROMPT_NO_INPUT, format_prompt, load_instructions, read_documents, read_jsonl

SIZES = {"train": 450, "valid": 45, "test": 45}
PT_LINES = 300
SPLIT_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl")
NO_CONTEXT = {"arithmetic", "units", "story"}  # families whose prompt has no ### Input: block


def _write_all(out_dir: Path, seed: int) -> Path:
    tasks.write_splits(out_dir, seed=seed, sizes=SIZES)
    tasks.write_pretrain_corpus(out_dir / "pretrain.txt", seed=seed, n_lines=PT_LINES)
    return out_dir


def _files(out_dir: Path) -> dict:
    return {name: (out_dir / name).read_bytes() for name in SPLIT_FILES + ("pretrain.txt",)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return _write_all(tmp_path_factory.mktemp("demo_data"), seed=0)


@pytest.fixture(scope="module")
def splits(data_dir) -> dict:
    return {name: read_jsonl(data_dir / f"{name}.jsonl") for name in SIZES}


@pytest.fixture(scope="module")
def tok_dir(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_tok")
    build_tokenizer(demo_tokenizer_texts(data_dir), out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


# ----------------------------------------------------------------------------------------------------------------------
# data: determinism
# ----------------------------------------------------------------------------------------------------------------------
def test_same_seed_gives_byte_identical_files(data_dir, tmp_path):
    assert _files(_write_all(tmp_path, seed=0)) == _files(data_dir)


def test_different_seed_gives_different_files(data_dir, tmp_path):
    other = _files(_write_all(tmp_path, seed=1))
    for name, content in _files(data_dir).items():
        assert other[name] != content, name


def test_files_do_not_depend_on_hash_seed(data_dir, tmp_path):
    """tasks.py needs only the standard library, so it runs as a script (fast) under other hash seeds."""
    script = Path(tasks.__file__)
    for hash_seed in ("1", "987"):
        out = tmp_path / hash_seed
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        subprocess.run([sys.executable, str(script), str(out), "--seed", "0", "--pretrain-lines", str(PT_LINES),
                        *[f"--{k}={v}" for k, v in SIZES.items()]], check=True, env=env, capture_output=True)
        assert _files(out) == _files(data_dir), f"PYTHONHASHSEED={hash_seed}"


def test_test_split_does_not_depend_on_train_size(splits):
    small = tasks.generate_splits(0, {"train": 90, "valid": 45, "test": 45})
    assert small["test"] == splits["test"]
    assert small["valid"] == splits["valid"]


# ----------------------------------------------------------------------------------------------------------------------
# data: content
# ----------------------------------------------------------------------------------------------------------------------
def test_split_sizes_and_every_family_in_every_split(splits):
    for name, examples in splits.items():
        assert len(examples) == SIZES[name]
        counts = {f: sum(ex["task"] == f for ex in examples) for f in tasks.TASK_FAMILIES}
        assert min(counts.values()) == SIZES[name] // len(tasks.TASK_FAMILIES), (name, counts)
        assert max(counts.values()) - min(counts.values()) <= 1, (name, counts)


def test_no_prompt_repeated_within_or_across_splits(splits):
    prompts = [(ex["instruction"], ex["context"]) for examples in splits.values() for ex in examples]
    assert len(prompts) == len(set(prompts))


def test_example_fields_and_references(splits):
    for examples in splits.values():
        for ex in examples:
            assert list(ex) == ["instruction", "context", "response", "references", "task"]
            assert all(isinstance(ex[k], str) for k in ("instruction", "context", "response", "task"))
            assert ex["instruction"].strip() and ex["response"].strip()
            assert ex["response"] in ex["references"]
            assert len(ex["references"]) == len(set(ex["references"])) >= 1
            assert all(r.strip() for r in ex["references"])
            assert (ex["context"] == "") == (ex["task"] in NO_CONTEXT), ex


def test_several_modes_and_a_spread_of_lengths(splits):
    examples = [ex for exs in splits.values() for ex in exs]
    words = [len(ex["response"].split()) for ex in examples]
    assert min(words) == 1 and 30 <= max(words) <= 45
    assert len(set(words)) >= 25
    for family in tasks.TASK_FAMILIES:
        fam = [ex for ex in examples if ex["task"] == family]
        assert sum(len(ex["references"]) > 1 for ex in fam) >= 0.9 * len(fam), family
        if family != "story":  # the stored phrasing is not always the same one (a story is always references[0])
            assert len({ex["references"].index(ex["response"]) for ex in fam}) > 1, family


def _numbers(text: str) -> list:
    return [int(n) for n in re.findall(r"\d+", text)]


def test_answers_are_right(splits):
    ops = {"+": lambda a, b: a + b, "plus": lambda a, b: a + b, "-": lambda a, b: a - b,
           "minus": lambda a, b: a - b, "x": lambda a, b: a * b, "times": lambda a, b: a * b}
    checked = 0
    for ex in (ex for exs in splits.values() for ex in exs):
        if ex["task"] == "arithmetic":
            m = re.search(r"(\d+) (\+|-|x|plus|minus|times) (\d+)", ex["instruction"])
            if m:
                expected = ops[m.group(2)](int(m.group(1)), int(m.group(3)))
            elif ex["instruction"].startswith("Add"):
                expected = sum(_numbers(ex["instruction"]))
            elif ex["instruction"].startswith("Subtract"):
                b, a = _numbers(ex["instruction"])
                expected = a - b
            else:
                a, b = _numbers(ex["instruction"])
                expected = a * b
            for ref in ex["references"]:
                assert _numbers(ref)[-1] == expected, (ex["instruction"], ref)
            checked += 1
        elif ex["task"] == "word_order":
            words, instruction = ex["context"].split(", "), ex["instruction"]
            if "reverse alphabetical" in instruction or "Z to A" in instruction:
                want = sorted(words, reverse=True)
            elif "alphabetical" in instruction or "A to Z" in instruction:
                want = sorted(words)
            else:
                want = words[::-1]
            for ref in ex["references"]:
                assert ref.split(": ")[-1].rstrip(".") == ", ".join(want), (ex, ref)
            checked += 1
        elif ex["task"] == "fact_qa":
            answer = ex["references"][0].rstrip(".")
            assert answer.lower().removeprefix("the ") in ex["context"].lower(), ex
            checked += 1
    assert checked >= 3 * len(SIZES) * 5


def test_pretrain_corpus(data_dir):
    """One document a line, a blank line between documents, a newline at the end."""
    text = (data_dir / "pretrain.txt").read_text(encoding="utf-8")
    docs = tasks.pretrain_corpus(0, PT_LINES)
    assert text == "\n\n".join(docs) + "\n"
    assert len(docs) == PT_LINES and all(d.strip() and "\n" not in d for d in docs)
    assert len(set(docs)) > 0.9 * len(docs)


def test_files_load_in_the_distillation_data_code(data_dir, tok):
    """The trainer's readers (minillm_fast.distill.data) see every example, every document, and the prompts the
    demo tokenizer was trained on (it renders them with the trainer's template)."""
    trained_on = set(demo_tokenizer_texts(data_dir))
    examples, dropped = load_instructions(str(data_dir / "valid.jsonl"), tok, max_length=configs.MAX_POSITIONS,
                                          max_prompt_length=configs.MAX_POSITIONS)
    for ex, record in zip(examples, read_jsonl(data_dir / "valid.jsonl")):
        assert ex.prompt + record["response"] in trained_on
        assert ex.prompt == format_prompt(record["instruction"], record["context"])
    assert not dropped and len(examples) == SIZES["valid"]
    assert all(e.response_ids[-1] == tok.eos_token_id for e in examples)
    assert len(read_documents(str(data_dir / "pretrain.txt"))) == PT_LINES


def test_vocabulary_is_small():
    """At the default sizes, the data and the pre-training corpus use a few hundred distinct words."""
    texts = [f"{ex['instruction']} {ex['context']} {' '.join(ex['references'])}"
             for exs in tasks.generate_splits(0).values() for ex in exs] + tasks.pretrain_corpus(0)
    vocab = {w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)}
    assert 200 <= len(vocab) <= 600, len(vocab)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="families"):
        tasks.generate_splits(0, {"train": 10}, families=["nope"])
    with pytest.raises(ValueError, match="sizes"):
        tasks.generate_splits(0, {"train": -1})
    with pytest.raises(ValueError, match="units"):  # 1,800 distinct unit prompts exist
        tasks.generate_splits(0, {"train": 2000}, families=["units"], max_tries=50)


# ----------------------------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------------------------
def _full_texts(examples):
    return [format_prompt(ex["instruction"], ex["context"]) + ex["response"] for ex in examples]


def test_tokenizer_round_trips(tok, splits):
    odd = ["", " ", "Zorbia's capital  is\tPlim!\n\n", "12,345 + 0.5 = ?", "caf\u00e9 \u00fcber \u2014 \U0001F600",
           "UNSEEN words like Xylophone", "<|eos|> is text here"]
    for text in _full_texts(splits["test"]) + odd:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert tok.decode(ids) == text, text
    assert tok("")["input_ids"] == []  # encode adds neither BOS nor EOS


def test_tokenizer_special_tokens(tok, tok_dir):
    for attr, token in SPECIAL_TOKENS.items():
        assert getattr(tok, attr) == token
        assert getattr(tok, attr + "_id") is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    assert tok.decode([tok.eos_token_id]) == "<|eos|>"
    assert tok.model_max_length == configs.MAX_POSITIONS
    saved = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4 as well


def test_tokenizer_is_deterministic(data_dir, tok_dir, tmp_path):
    build_tokenizer(demo_tokenizer_texts(data_dir), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes(), name


def test_template_tokenises_compactly(tok):
    head = PROMPT_NO_INPUT.split("\n\n")[0]  # "Below is an instruction ... completes the request."
    assert len(tok(head)["input_ids"]) <= len(head.split()) + 2
    assert len(tok("### Response:\n")["input_ids"]) <= 4
    assert len(tok("\n\n### Instruction:\n")["input_ids"]) <= 6
    assert tok.convert_ids_to_tokens(tok("385")["input_ids"]) == ["3", "8", "5"]  # digits one by one


def test_examples_fit_the_context(tok, splits):
    lengths = [len(tok(t)["input_ids"]) + 1 for t in _full_texts(splits["test"] + splits["valid"])]  # + EOS
    assert max(lengths) <= configs.MAX_POSITIONS * 3 // 4, max(lengths)


def test_bad_tokenizer_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["a b c"], tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        build_tokenizer([], tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# model configs
# ----------------------------------------------------------------------------------------------------------------------
VARIANTS = {  # id -> (config function, kwargs, parameter range at a ~1-2k vocabulary)
    "teacher": (configs.teacher_config, {}, (4.0e6, 6.0e6)),
    "student": (configs.student_config, {}, (0.8e6, 1.5e6)),
    "student_small": (configs.student_config, {"size": "student_small"}, (0.4e6, 0.8e6)),
    "quick_teacher": (configs.teacher_config, {"quick": True}, (0.5e6, 1.2e6)),
    "quick_student": (configs.student_config, {"quick": True}, (0.1e6, 0.4e6)),
}


@pytest.mark.parametrize("family", configs.FAMILIES)
def test_parameter_counts(tok, family):
    n = {k: configs.num_parameters(fn(len(tok), family, **kw)) for k, (fn, kw, _) in VARIANTS.items()}
    for k, (_, _, (lo, hi)) in VARIANTS.items():
        assert lo <= n[k] <= hi, (family, k, n[k])
    assert n["teacher"] >= 4 * n["student"] and n["quick_teacher"] >= 3 * n["quick_student"], n


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", configs.FAMILIES)
def test_model_forward_on_tokenised_batch(tok, splits, family, variant):
    fn, kw, _ = VARIANTS[variant]
    config = fn(len(tok), family, **kw, **configs.special_token_ids(tok))
    assert config.vocab_size == len(tok) and config.eos_token_id == tok.eos_token_id
    rng_state = torch.random.get_rng_state()
    model = configs.build_model(config, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the caller's RNG is left alone
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.config.n_positions if family == "gpt2" else model.config.max_position_embeddings
    texts = [t + tok.eos_token for t in _full_texts(splits["test"][:3])]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**batch, labels=labels)
    assert out.logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(out.logits).all()
    assert abs(out.loss.item() - math.log(len(tok))) < 1.0  # near uniform at initialisation


def test_build_model_is_seeded(tok):
    config = configs.student_config(len(tok), "llama", quick=True)
    a, b, c = (configs.build_model(config, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_bad_config_arguments():
    with pytest.raises(ValueError, match="family"):
        configs.teacher_config(1000, family="bert")
    with pytest.raises(ValueError, match="vocab_size"):
        configs.student_config(0)
    with pytest.raises(ValueError, match="size"):
        configs.student_config(1000, size="huge")
