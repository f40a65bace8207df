"""The teacher cache: a teacher's top-k log-probs over the training responses, computed once, for offline KD.

``minillm-fast teacher-cache --teacher PATH --data train.jsonl --top-k 64 --out cache/`` runs the teacher over every
training example (prompt + response, as the trainer tokenises them: distill/data.py) and keeps, for each response
position, the k most likely next tokens and their log-probs (:func:`minillm_fast.token_topk`: fused, no ``[N, V]``).
Training with ``teacher_cache: cache/`` (methods kd and seqkd's kd objective) then never loads the teacher and
distils with :func:`minillm_fast.sparse_divergence`.

Layout of ``cache/``:

* ``manifest.json``: what the cache was made from (the teacher's path, class and config hash, the tokenizer's hash,
  the data file's hash, the prompt template's hash, ``max_length``, ``max_prompt_length``, k, the temperature, the
  log-prob dtype) and its shards, written atomically after each shard;
* ``shard-00000.safetensors``, ...: ``ids`` ``[rows, k]`` int32, ``logprobs`` ``[rows, k]`` fp16 or fp32, ``offsets``
  ``[examples + 1]`` int64 (each example's rows), ``examples`` ``[examples]`` int64 (their indices in the data).

Bytes per response token: ``k x (4 + 2)`` with fp16 log-probs (384 B at k=64), against ``4 V`` for a full fp32
distribution (200 KB at V=50257, 500 KB at V=128256).

Resumable: a run that stops keeps its finished shards; the next run with the same settings continues after them.
A cache made with another tokenizer, data file, template or length limits is refused when training opens it, with a
message saying which differs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import data, heads, models

MANIFEST = "manifest.json"
VERSION = 1
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


class CacheError(ValueError):
    """A teacher cache that is missing, incomplete or made from other inputs (the message says which)."""


# ----------------------------------------------------------------------------------------------------------------------
# what a cache is made from
# ----------------------------------------------------------------------------------------------------------------------
def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """The vocabulary and the special tokens (what decides the token ids)."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    return _sha256(json.dumps([vocab, special], ensure_ascii=False).encode())


def template_hash() -> str:
    return _sha256((data.PROMPT_NO_INPUT + "\x00" + data.PROMPT_WITH_INPUT).encode())


def identity(tokenizer, data_path: str, *, max_length: int, max_prompt_length: int) -> dict:
    """The manifest fields a training run must agree with."""
    return {"tokenizer_sha256": tokenizer_hash(tokenizer), "data_sha256": file_hash(data_path),
            "template_sha256": template_hash(), "max_length": max_length, "max_prompt_length": max_prompt_length}


# ----------------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class TeacherCache:
    """An opened cache: :meth:`rows` gives one example's ``(ids [R, k] int64, logprobs [R, k] float32)``."""

    path: str
    manifest: dict
    ids: torch.Tensor        # [rows, k] int32, every shard concatenated
    logprobs: torch.Tensor   # [rows, k]
    offsets: torch.Tensor    # [examples + 1] int64

    @property
    def k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @classmethod
    def open(cls, path: str, tokenizer, data_path: str, *, max_length: int, max_prompt_length: int,
             n_examples: int) -> "TeacherCache":
        """Open ``path`` for a run on ``data_path`` with ``tokenizer``; refuses a cache made from other inputs."""
        manifest = read_manifest(path)
        if not manifest.get("complete"):
            raise CacheError(f"teacher cache {path!r} is incomplete ({_done(manifest)} of {manifest['n_examples']} "
                             f"examples): run minillm-fast teacher-cache again with the same arguments to finish it")
        want = identity(tokenizer, data_path, max_length=max_length, max_prompt_length=max_prompt_length)
        what = {"tokenizer_sha256": "the tokenizer", "data_sha256": f"the data file ({data_path})",
                "template_sha256": "the prompt template", "max_length": "max_length",
                "max_prompt_length": "max_prompt_length"}
        differ = [what[k] + (f" ({manifest.get(k)} vs {v})" if "sha" not in k else "")
                  for k, v in want.items() if manifest.get(k) != v]
        if differ:
            raise CacheError(f"teacher cache {path!r} was made from other inputs than this run: {', '.join(differ)} "
                             f"differ; rebuild it with minillm-fast teacher-cache for this data and tokenizer")
        if manifest["n_examples"] != n_examples:
            raise CacheError(f"teacher cache {path!r} holds {manifest['n_examples']} examples but the run has "
                             f"{n_examples} (max_train_samples?); rebuild it or use the same data")
        from safetensors.torch import load_file

        ids, lps, offsets = [], [], [torch.zeros(1, dtype=torch.int64)]
        for shard in manifest["shards"]:
            t = load_file(os.path.join(path, shard["file"]))
            ids.append(t["ids"])
            lps.append(t["logprobs"])
            offsets.append(t["offsets"][1:] + offsets[-1][-1])
        return cls(path, manifest, torch.cat(ids), torch.cat(lps), torch.cat(offsets))

    def rows(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.ids[a:b].long(), self.logprobs[a:b].float()

    def batch(self, indices: Sequence[int], prompt_lengths: Sequence[int], length: int, device):
        """``[B, length, k]`` ids and log-probs for a batch of examples, aligned with ``labels[:, 1:]`` (and the
        hidden states ``[:, :-1]``) of :func:`minillm_fast.distill.data.collate_full`: example b's rows sit at
        positions ``prompt_lengths[b] - 1`` onwards; everything else is an empty slot (id -1)."""
        ids = torch.full((len(indices), length, self.k), -1, dtype=torch.int64)
        lps = torch.zeros(len(indices), length, self.k)
        for b, (index, p) in enumerate(zip(indices, prompt_lengths)):
            r_ids, r_lps = self.rows(index)
            ids[b, p - 1:p - 1 + len(r_ids)] = r_ids
            lps[b, p - 1:p - 1 + len(r_ids)] = r_lps
        return ids.to(device), lps.to(device)


def read_manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise CacheError(f"no teacher cache at {path!r} ({MANIFEST} not found): make one with minillm-fast "
                         f"teacher-cache --teacher ... --data ... --out {path}")
    with open(file) as f:
        manifest = json.load(f)
    if manifest.get("version") != VERSION:
        raise CacheError(f"teacher cache {path!r} has format version {manifest.get('version')}, expected {VERSION}")
    return manifest


def _done(manifest: dict) -> int:
    return sum(s["count"] for s in manifest["shards"])


# ----------------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------------
def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def teacher_rows(teacher, head: heads.Head, examples: Sequence, *, pad_token_id: int, k: int, vocab_size: int,
                 temperature: float, backend: str, dtype: torch.dtype) -> list:
    """Per example ``(ids [R, k] int32, logprobs [R, k] dtype)``: the teacher's top k at each response position."""
    from ..ops.sparse_divergence import token_topk

    batch = data.collate_full(examples, pad_token_id)
    device = head.weight.device
    hidden = models.hidden_states(teacher, batch["input_ids"].to(device), batch["attention_mask"].to(device))
    out = []
    for b, ex in enumerate(examples):
        p, r = len(ex.prompt_ids), len(ex.response_ids)
        h = hidden[b, p - 1:p + r - 1]           # the positions that predict the response tokens
        top = token_topk(h.to(head.weight.dtype), head.weight, k, bias=head.bias, vocab_size=vocab_size,
                         temperature=temperature, softcap=head.softcap, logit_scale=head.logit_scale,
                         backend=backend)
        out.append((top.ids.to(torch.int32).cpu(), top.logprobs.to(dtype).cpu()))
    return out


def build(teacher_path: str, data_path: str, out: str, *, tokenizer_path: Optional[str] = None, top_k: int = 64,
          temperature: float = 1.0, max_length: int = 512, max_prompt_length: int = 256, dtype: str = "fp16",
          batch_size: int = 8, shard_examples: int = 1024, device: str = "auto", backend: str = "auto",
          teacher_dtype: str = "fp32", max_samples: Optional[int] = None, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Write (or finish) the cache of ``teacher_path`` over ``data_path`` in ``out``; returns the manifest."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)} (the stored log-probs)")
    for name, v in (("top_k", top_k), ("batch_size", batch_size), ("shard_examples", shard_examples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive int")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    dev = models.pick_device(device)
    tokenizer = models.load_tokenizer(tokenizer_path or teacher_path)
    examples, dropped = data.load_instructions(data_path, tokenizer, max_length=max_length,
                                               max_prompt_length=max_prompt_length, max_samples=max_samples)
    teacher = models.load_model(teacher_path, dtype=teacher_dtype, device=dev, what="teacher").eval()
    vocab = heads.real_vocab_size(tokenizer, teacher)
    heads.probe(teacher, vocab, what="teacher", backend=backend)
    head = heads.head_of(teacher)
    if top_k > vocab:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary ({vocab} tokens)")
    config_json = json.dumps(teacher.config.to_dict(), sort_keys=True, default=str).encode()
    manifest = {"version": VERSION, "teacher": os.path.abspath(teacher_path), "teacher_class": type(teacher).__name__,
                "teacher_config_sha256": _sha256(config_json), "top_k": top_k, "temperature": float(temperature),
                "logprob_dtype": dtype, "n_examples": len(examples), "dropped_prompts": len(dropped),
                **identity(tokenizer, data_path, max_length=max_length, max_prompt_length=max_prompt_length),
                "shards": [], "complete": False}
    os.makedirs(out, exist_ok=True)
    if os.path.isfile(os.path.join(out, MANIFEST)):
        old = read_manifest(out)
        same = {k: v for k, v in old.items() if k not in ("shards", "complete")} == \
            {k: v for k, v in manifest.items() if k not in ("shards", "complete")}
        if same:
            manifest["shards"] = old["shards"]
        elif not overwrite:
            raise CacheError(f"{out!r} holds a teacher cache made with other settings; pass --overwrite to replace "
                             f"it, or another --out")
    start = _done(manifest)
    total_rows = sum(len(e.response_ids) for e in examples[start:])
    bar = _progress(total_rows, progress, start, len(examples))
    t0, rows_done = time.perf_counter(), 0
    from safetensors.torch import save_file

    for first in range(start, len(examples), shard_examples):
        chunk = examples[first:first + shard_examples]
        ids, lps = [], []
        for i in range(0, len(chunk), batch_size):
            for r_ids, r_lps in teacher_rows(teacher, head, chunk[i:i + batch_size],
                                             pad_token_id=tokenizer.pad_token_id, k=top_k, vocab_size=vocab,
                                             temperature=temperature, backend=backend, dtype=DTYPES[dtype]):
                ids.append(r_ids)
                lps.append(r_lps)
                rows_done += len(r_ids)
                bar.update(len(r_ids))
        counts = torch.tensor([0] + [len(x) for x in ids], dtype=torch.int64)
        name = f"shard-{len(manifest['shards']):05d}.safetensors"
        tmp = os.path.join(out, f".{name}.tmp")
        save_file({"ids": torch.cat(ids), "logprobs": torch.cat(lps), "offsets": counts.cumsum(0),
                   "examples": torch.arange(first, first + len(chunk), dtype=torch.int64)}, tmp)
        os.replace(tmp, os.path.join(out, name))
        manifest["shards"].append({"file": name, "first": first, "count": len(chunk), "rows": int(counts.sum())})
        _write_json_atomic(os.path.join(out, MANIFEST), manifest)
    bar.close()
    manifest["complete"] = True
    _write_json_atomic(os.path.join(out, MANIFEST), manifest)
    seconds = time.perf_counter() - t0
    if progress:
        print(f"teacher cache: {len(examples)} examples, {sum(s['rows'] for s in manifest['shards'])} response "
              f"tokens, k={top_k}, in {out} ({rows_done / max(seconds, 1e-9):.0f} tokens/s this run)",
              file=sys.stderr)
    return manifest


def _progress(total: int, enabled: bool, done: int, n: int):
    class _Quiet:
        def update(self, _):
            pass

        def close(self):
            pass

    if not enabled:
        return _Quiet()
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc=f"teacher top-k (from example {done} of {n})", dynamic_ncols=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minillm-fast teacher-cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="local save_pretrained directory of the teacher")
    p.add_argument("--data", required=True, help="the training JSONL (instruction / context / response)")
    p.add_argument("--out", required=True, help="the cache folder (created; an unfinished one is continued)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --teacher's)")
    p.add_argument("--top-k", type=int, default=64, help="ids kept per token (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="divides the teacher's logits (default 1)")
    p.add_argument("--max-length", type=int, default=512, help="as the training config's max_length")
    p.add_argument("--max-prompt-length", type=int, default=256, help="as the training config's max_prompt_length")
    p.add_argument("--max-samples", type=int, help="only the first N examples (as max_train_samples)")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES), help="stored log-probs (default fp16)")
    p.add_argument("--teacher-dtype", default="fp32", choices=sorted(models.DTYPES), help="the teacher's weights")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-examples", type=int, default=1024, help="examples per shard (the unit of resuming)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", default="auto", help="backend of the fused ops (auto, triton, native, torch)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache made with other settings")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    build(a.teacher, a.data, a.out, tokenizer_path=a.tokenizer, top_k=a.top_k, temperature=a.temperature,
          max_length=a.max_length, max_prompt_length=a.max_prompt_length, dtype=a.dtype, batch_size=a.batch_size,
          shard_examples=a.shard_examples, device=a.device, backend=a.backend, teacher_dtype=a.teacher_dtype,
          max_samples=a.max_samples, overwrite=a.overwrite, progress=not a.no_progress)
    return 0
