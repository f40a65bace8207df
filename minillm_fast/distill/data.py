"""Data: the instruction set (dolly-style JSONL), the pre-training corpus, batch collation and deterministic order.

Instruction records (one JSON object a line)::

    {"instruction": "...", "context": "...", "response": "..."}      # dolly field names
    {"instruction": "...", "input": "...", "output": "..."}          # alpaca field names
    {"prompt": "<already formatted prompt>", "response": "..."}      # used verbatim
    "response" may be a list of strings: the references of an evaluation example (the first one is trained on).

Prompts use the Alpaca/dolly template of the MiniLLM reference (docs/design.md section 3), :func:`format_prompt`: the
one template of the package (the built-in demo trains its tokenizer on it too); prompts longer than
``max_prompt_length`` tokens are dropped; the response is followed by EOS; ``prompt + response`` is cut to
``max_length`` tokens.

Order is a pure function of ``(seed, epoch)`` (:class:`IndexStream`), so a resumed run and a run on more ranks see the
same global batches.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
IGNORE_INDEX = -100


def format_prompt(instruction: str, context: Optional[str] = None) -> str:
    """The reference's prompt for an instruction and its input (dolly's ``context``, alpaca's ``input``): the "paired
    with an input" variant when ``context`` is a non-blank string."""
    if context is not None and str(context).strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, context=context)
    return PROMPT_NO_INPUT.format(instruction=instruction)


@dataclass
class TokenizedExample:
    """One instruction example as the trainer sees it: the rendered prompt, its token ids and the response's."""

    prompt: str
    prompt_ids: list            # [P] token ids (tokenizer special tokens included, e.g. BOS for Llama)
    response_ids: list          # [R] token ids, EOS last (unless cut by max_length)
    references: list            # reference response strings (evaluation: max over them)


Example = TokenizedExample      # the former name (distill/evaluate.py imports it)


def read_jsonl(path, *, with_lines: bool = False) -> list:
    """The JSON objects of a JSON-lines file, one a line (blank lines skipped); errors name the file and line.
    ``with_lines``: ``(line number, object)`` pairs instead, for errors about a record's contents."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append((lineno, rec) if with_lines else rec)
    return records


def record_prompt_and_references(rec: dict, where: str = "record") -> tuple[str, list]:
    if "prompt" in rec:
        prompt = rec["prompt"]
    elif "instruction" in rec:
        prompt = format_prompt(rec["instruction"], rec.get("context", rec.get("input")))
    else:
        raise ValueError(f"{where}: needs an 'instruction' (dolly/alpaca) or a 'prompt' field, got keys "
                         f"{sorted(rec)}")
    resp = rec.get("response", rec.get("output"))
    if resp is None:
        refs = []
    elif isinstance(resp, list):
        refs = [str(r) for r in resp]
    else:
        refs = [str(resp)]
    return prompt, refs


def load_instructions(path: str, tokenizer, *, max_length: int, max_prompt_length: int,
                      max_samples: Optional[int] = None, require_response: bool = True) -> tuple[list, list]:
    """Tokenised examples of a JSONL file and the line numbers of the prompts dropped for being longer than
    ``max_prompt_length`` tokens. A record without a prompt, or (``require_response``) without a response, is an
    error naming its file and line (an empty response is allowed: a teacher's SeqKD answer may be EOS alone)."""
    records = read_jsonl(path, with_lines=True)
    if not records:
        raise ValueError(f"{path}: no records (the file is empty or blank): one JSON object a line, with "
                         f"'instruction' (or 'prompt') and 'response'")
    if max_samples is not None:
        records = records[:max_samples]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one (responses end with EOS)")
    examples, dropped = [], []
    for lineno, rec in records:
        prompt, refs = record_prompt_and_references(rec, f"{path}:{lineno}")
        if require_response and not refs:
            raise ValueError(f"{path}:{lineno}: no 'response' (or 'output') field; every training and validation "
                             f"record needs one")
        prompt_ids = tokenizer(prompt)["input_ids"]
        if len(prompt_ids) > max_prompt_length:
            dropped.append(lineno)
            continue
        response_ids = []
        if refs:
            response_ids = tokenizer(refs[0], add_special_tokens=False)["input_ids"] + [eos]
            response_ids = response_ids[: max_length - len(prompt_ids)]
        examples.append(TokenizedExample(prompt=prompt, prompt_ids=list(prompt_ids), response_ids=list(response_ids),
                                         references=refs))
    if not examples:
        raise ValueError(f"{path}: no usable example ({len(dropped)} prompt(s) longer than max_prompt_length="
                         f"{max_prompt_length} tokens were dropped, {describe_lines(path, dropped)})")
    return examples, dropped


def describe_lines(path: str, lines: Sequence[int], most: int = 5) -> str:
    """``"file:3, file:17, ... (+4 more)"``: where the records are, for a message."""
    shown = ", ".join(f"{path}:{n}" for n in lines[:most])
    return shown + (f" (+{len(lines) - most} more)" if len(lines) > most else "")


def write_jsonl(path: str, records: Sequence[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------
# pre-training corpus
# ----------------------------------------------------------------------------------------------------------------------
def read_documents(path: str) -> list[str]:
    """Documents of a plain-text corpus: blank-line separated paragraphs of a text file, or the ``text`` field of
    each JSONL record."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pre-training corpus {path!r} does not exist")
    if path.endswith(".jsonl"):
        return [str(r["text"]) for r in read_jsonl(path) if r.get("text")]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def load_pretrain_blocks(path: str, tokenizer, block_size: int) -> list[list[int]]:
    """The corpus tokenised, documents joined by EOS, cut into blocks of ``block_size`` tokens (a shorter last block
    is kept only when it is the only one)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in read_documents(path):
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        stream.append(eos)
    if not stream:
        raise ValueError(f"pre-training corpus {path!r} is empty")
    blocks = [stream[i:i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    return blocks or [stream]


# ----------------------------------------------------------------------------------------------------------------------
# order
# ----------------------------------------------------------------------------------------------------------------------
class IndexStream:
    """An endless stream of dataset indices: epoch ``e`` is a permutation seeded by ``(seed, e)``; ``take(k)`` hands
    out the next ``k`` (crossing into the next epoch when needed). Its state is two ints."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        if n <= 0:
            raise ValueError("IndexStream needs at least one item")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._perm: Optional[list] = None

    def _permutation(self) -> list:
        if self._perm is None:
            perm = list(range(self.n))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + self.epoch).shuffle(perm)
            self._perm = perm
        return self._perm

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            perm = self._permutation()
            step = min(k - len(out), self.n - self.pos)
            out.extend(perm[self.pos:self.pos + step])
            self.pos += step
            if self.pos == self.n:
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._perm = int(state["epoch"]), int(state["pos"]), None


def rank_slice(items: Sequence, rank: int, world_size: int) -> list:
    """The contiguous share of a global batch that ``rank`` processes."""
    per = len(items) // world_size
    return list(items[rank * per:(rank + 1) * per])


def split(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------------------------------------------------
# collation
# ----------------------------------------------------------------------------------------------------------------------
def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: ``cumsum(mask) - 1`` (0 on padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _pad(seqs: Sequence[Sequence[int]], value, length: Optional[int], dtype, left: bool) -> torch.Tensor:
    length = max((len(s) for s in seqs), default=0) if length is None else length
    out = torch.full((len(seqs), length), value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s):
            start = length - len(s) if left else 0
            out[i, start:start + len(s)] = torch.as_tensor(s, dtype=dtype)
    return out


def pad_right(seqs: Sequence[Sequence[int]], value, length: Optional[int] = None, dtype=torch.long) -> torch.Tensor:
    """``[len(seqs), length]`` (default: the longest), each sequence first, ``value`` after it."""
    return _pad(seqs, value, length, dtype, left=False)


def pad_left(seqs: Sequence[Sequence[int]], value, length: Optional[int] = None, dtype=torch.long) -> torch.Tensor:
    """``[len(seqs), length]`` (default: the longest), ``value`` first, each sequence at the end."""
    return _pad(seqs, value, length, dtype, left=True)


def collate_full(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict:
    """Right-padded ``prompt + response`` rows: ``input_ids``, ``attention_mask`` and ``labels`` aligned with the
    inputs (``IGNORE_INDEX`` on the prompt and on padding; the loss shifts them by one)."""
    seqs = [e.prompt_ids + e.response_ids for e in examples]
    labels = [[IGNORE_INDEX] * len(e.prompt_ids) + e.response_ids for e in examples]
    input_ids = pad_right(seqs, pad_token_id)
    attention_mask = pad_right([[1] * len(s) for s in seqs], 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": pad_right(labels, IGNORE_INDEX)}


def collate_prompts(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict:
    """Left-padded prompts for generation: ``input_ids``, ``attention_mask``."""
    prompts = [e.prompt_ids for e in examples]
    return {"input_ids": pad_left(prompts, pad_token_id),
            "attention_mask": pad_left([[1] * len(p) for p in prompts], 0)}


def collate_blocks(blocks: Sequence[Sequence[int]], pad_token_id: int) -> dict:
    """Pre-training blocks: every real token is a label."""
    input_ids = pad_right(blocks, pad_token_id)
    attention_mask = pad_right([[1] * len(b) for b in blocks], 0)
    labels = pad_right(blocks, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
