"""A tiny, fully local distillation workspace: a generated instruction set, a byte-level BPE tokenizer trained on it,
and randomly initialised GPT-2 or Llama students and teachers built from configs, all saved with save_pretrained.

The package's one workspace builder at this size: the tests' workspace (tests/distill_utils.py) and the quick start of
docs/distill.md. Its pieces are the package's: the tokenizer is the demo's BPE trainer
(``minillm_fast.demo.tokenizer.build_tokenizer``) trained on the examples as the trainer renders them
(``rendered_texts``, the template of ``minillm_fast.distill.data``), the files are written by ``distill.data``. What is
its own is what makes it small and quick: four short task kinds over 16 words (:func:`make_examples`, prompts well
under 64 tokens), three special tokens, vocabulary-padded heads (``vocab_size`` rows for a ~440-token tokenizer) and
a peaked untied teacher (:func:`build_model`). The built-in demo (``minillm-fast demo``) builds its bigger workspace
from the same pieces with its own data (``minillm_fast.demo.tasks``) and model shapes (``minillm_fast.demo.configs``).

A quickstart that needs no download::

    python -m minillm_fast.distill.toy /tmp/toy            # writes /tmp/toy/{tokenizer,student,teacher,*.jsonl,...}
    minillm-fast distill --config /tmp/toy/minillm.yaml     # the config it writes next to them
"""
from __future__ import annotations

import argparse
import os
import random
from typing import Optional

from .data import write_jsonl

WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "stone", "river", "cloud",
         "apple", "bread", "house")


def make_examples(n: int, seed: int = 0) -> list[dict]:
    """Short deterministic tasks (reverse, repeat, first word, count), a third of them with an input field."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 4))
        kind = rng.randrange(4)
        if kind == 0:
            rec = {"instruction": "Reverse the words.", "context": " ".join(words),
                   "response": " ".join(reversed(words))}
        elif kind == 1:
            rec = {"instruction": f"Repeat the word {words[0]} twice.", "response": f"{words[0]} {words[0]}"}
        elif kind == 2:
            rec = {"instruction": f"Name the first word of: {' '.join(words)}", "response": words[0]}
        else:
            rec = {"instruction": f"How many words are in: {' '.join(words)}", "response": str(len(words))}
        out.append(rec)
    return out


SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}   # ids 0, 1, 2 (build_model's)


def build_tokenizer(texts: list[str], path: str, vocab_size: int = 512):
    """The demo's byte-level BPE trainer with the toy's settings: ``SPECIAL_TOKENS``, every pair merged (no minimum
    frequency), digits left to BPE, no length limit; saved to ``path``."""
    from ..demo.tokenizer import build_tokenizer as train_bpe

    return train_bpe(texts, path, vocab_size, min_frequency=0, special_tokens=SPECIAL_TOKENS, split_digits=False,
                     model_max_length=None)


def build_model(arch: str, vocab_size: int, hidden: int, layers: int, path: Optional[str] = None, seed: int = 0,
                max_positions: int = 256, tie: bool = True, logit_scale: float = 1.0):
    """A random GPT-2 or Llama causal LM from a config (saved to ``path`` when given). ``logit_scale`` multiplies an
    untied lm_head's weight: a random model with peaked next-token distributions (a toy "teacher")."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=max(1, hidden // 16),
                         n_positions=max_positions, tie_word_embeddings=tie, **special)
        model = GPT2LMHeadModel(cfg)
    elif arch == "llama":
        heads = max(1, hidden // 16)
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                          max_position_embeddings=max_positions, tie_word_embeddings=tie, **special)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"arch={arch!r}: expected 'gpt2' or 'llama'")
    if logit_scale != 1.0:
        if tie:
            raise ValueError("logit_scale needs an untied lm_head (tie=False)")
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(logit_scale)
    if path is not None:
        model.save_pretrained(path)
    return model


def make_workspace(root: str, *, arch: str = "gpt2", n_train: int = 64, n_valid: int = 8, vocab_size: int = 512,
                   student_hidden: int = 32, teacher_hidden: int = 64, layers: int = 2, seed: int = 0,
                   teacher_logit_scale: float = 20.0) -> dict:
    """Write the toy workspace under ``root`` and return its paths: ``train_data``, ``valid_data`` (JSONL),
    ``pt_data`` (the corpus), ``tokenizer``, ``student`` and ``teacher`` (``save_pretrained`` directories, each with
    the tokenizer)."""
    from ..demo.tokenizer import rendered_texts

    os.makedirs(root, exist_ok=True)
    train, valid = make_examples(n_train, seed), make_examples(n_valid, seed + 1)
    paths = {k: os.path.join(root, v) for k, v in (("train_data", "train.jsonl"), ("valid_data", "valid.jsonl"),
                                                   ("pt_data", "corpus.txt"), ("tokenizer", "tokenizer"),
                                                   ("student", "student"), ("teacher", "teacher"))}
    write_jsonl(paths["train_data"], train)
    write_jsonl(paths["valid_data"], valid)
    rng = random.Random(seed + 2)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) + "." for _ in range(64)]
    with open(paths["pt_data"], "w") as f:
        f.write("\n\n".join(docs) + "\n")
    build_tokenizer(rendered_texts(train + valid, docs), paths["tokenizer"], vocab_size)
    for what, hidden, s, scale in (("student", student_hidden, seed, 1.0),
                                   ("teacher", teacher_hidden, seed + 1, teacher_logit_scale)):
        build_model(arch, vocab_size, hidden, layers, paths[what], seed=s, tie=scale == 1.0, logit_scale=scale)
        # the tokenizer travels with each model, as it would for a real checkpoint
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(paths["tokenizer"]).save_pretrained(paths[what])
    return paths


def write_config(root: str, paths: dict, method: str = "minillm", **overrides) -> str:
    """A small CPU config for the workspace (a few steps of ``method``)."""
    import yaml

    cfg = dict(method=method, student=paths["student"], teacher=paths["teacher"], train_data=paths["train_data"],
               valid_data=paths["valid_data"], pt_data=paths["pt_data"], output_dir=os.path.join(root, f"run-{method}"),
               max_length=96, max_prompt_length=64, max_new_tokens=16, batch_size=8, num_rollouts=16,
               rollout_batch_size=8, ppo_epochs=2, total_iters=20, lr=1e-3, warmup_steps=2, eval_interval=10,
               save_interval=10, eval_batch_size=8, final_eval=False)
    cfg.update(overrides)
    path = os.path.join(root, f"{method}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm_fast.distill.toy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"))
    args = parser.parse_args(argv)
    paths = make_workspace(args.root, arch=args.arch)
    for method in ("sft", "kd", "seqkd", "minillm"):
        print(write_config(args.root, paths, method))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
