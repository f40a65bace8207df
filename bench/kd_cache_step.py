"""One ``kd`` optimiser step from a stored teacher top-k (``teacher_cache:``) against the same step with the live
teacher (``teacher:``): tokens/s, step time, the teacher's share of it, peak memory, and the cache's size (issue 17).

    python -m bench.kd_cache_step                                  # V = 50257, batch 8, max_length 256, k = 64
    python -m bench.kd_cache_step --batch 4 --max-length 128 --vocab 32000 --top-k 32 --reps 5
    python -m bench.kd_cache_step --impl live,cache                # without the sft reference row

What one step is: ``Trainer(cfg).method.step()`` of ``method: kd`` (distill/methods/lm.py), as ``Trainer.train``
calls it: the next global batch collated, the student forward with gradients, ``(1 - kd_ratio) CE + kd_ratio
KL(p || q)`` (``kd_ratio`` 0.5, the default), the backward, gradient clipping and the AdamW step. The cases:

* ``live``: ``teacher: <dir>``: the teacher's forward (no grad) and the full-vocabulary KL
  (``losses.divergence_sum`` -> ``minillm_fast.fused_divergence``);
* ``cache``: ``teacher_cache: <dir>``, ``teacher: null``: the teacher is never loaded; the stored top k of the batch's
  rows (``TeacherCache.batch``) and the sparse KL (``losses.cached_kd_sum`` -> ``minillm_fast.sparse_divergence``,
  tail ``bucket``, the default);
* ``sft`` (reference row): ``method: sft``, no teacher at all: the CE step the KD term is added to.

The cache is made first, once, by ``minillm_fast.distill.teacher_cache.build`` (what ``minillm-fast teacher-cache``
runs) from the same teacher over the same training file: k = ``--top-k`` (64), fp16 log-probs (the default).

Workspace (made in a temporary folder, nothing downloaded; ``--workdir`` keeps it). The vocabulary has to be real for
the comparison to mean anything: a toy BPE tokenizer (distill/toy.py, ~440 tokens) with heads padded to 50257 rows
would not do, because the trainer excludes padded rows from every softmax (real vocabulary = ``len(tokenizer)``), so
the live KL would sweep 440 columns. So the tokenizer is a word-level one (``tokenizers.models.WordLevel``,
whitespace/punctuation pre-tokenizer) with exactly ``--vocab`` tokens: ``<pad> <s> </s>`` (ids 0-2), the words of the
prompt template (distill/data.py) and of the instruction, and fillers ``w3 ... w<V-1>``. The data
(``--examples`` records, default one batch, so that every step trains on the same batch in every case) are
instructions "Continue the text: <8 words>" with responses of filler words drawn from a Zipf(1.1) law over the
vocabulary; each response is as long as fits ``--max-length`` with the prompt, minus a random 0-1/8 of it (ragged
rows; the longest row fills ``max_length``). Response tokens are ~85% of the batch. Models: the demo's GPT-2 configs
(``minillm_fast/demo/configs.py``) at V: student 128 wide / 4 blocks (tied head, 7.2M parameters at V=50257),
teacher 256 / 6 (2x wider, 1.5x deeper; its lm_head untied and multiplied by ``--teacher-logit-scale``, 10, so that
the random teacher's next-token distributions are peaked as a trained model's are: the table reports how much of its
mass the top k hold; 30.3M parameters). Random init, fp32, ``n_positions`` = max(256, ``max_length``).

Each case runs in a fresh subprocess. Per case: the trainer is built (cache opened, or teacher loaded), ``--warmup``
steps (the first makes AdamW's state), then one step whose peak memory is measured (``bench.measure.CpuPeak``: peak
RSS above the RSS after the warm-up, so models, optimiser state and an opened cache are the baseline; the baseline is
reported as ``resident``), then ``--reps`` timed steps; median and spread. tokens/s = the step's training tokens
(response tokens carrying the loss, ``train/tokens``) / the median step time; the attended input tokens are in the
CSV (``input_tokens``).

The teacher's share: ``live``: the teacher's forward (``Trainer.teacher_hidden``, timed inside each step) plus the
full-vocabulary KL, forward and backward; ``cache``: the cache read (``TeacherCache.batch``: the ``[B, T, k]`` ids and
log-probs, timed inside each step) plus the sparse KL, forward and backward. The KL ops make part of their gradient in
the backward, which runs inside the step's ``loss.backward()`` mixed with the student's, so the KL's own time is
measured by replaying the op after the timed steps, on the inputs it received in the last step (hidden states
detached), ``--reps`` times, forward and ``backward()``: the median is the KL column, and
``share = (read or teacher forward + KL) / step``.

Writes ``bench/results/kd_cache_step.csv`` (appends) and prints a markdown table, the machine and the cache's size.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import sys
import tempfile
import time

from bench import step_runs

IMPLS = ("live", "cache", "sft")
MIB = float(1 << 20)
CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kd_cache_step.csv")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTION = "Continue the text:"


# ----------------------------------------------------------------------------------------------------------------------
# the workspace: a word-level tokenizer of exactly V tokens, the data, the two models, the cache
# ----------------------------------------------------------------------------------------------------------------------
def _template_words() -> list[str]:
    from tokenizers.pre_tokenizers import Whitespace

    from minillm_fast.distill.data import PROMPT_NO_INPUT, PROMPT_WITH_INPUT

    pre = Whitespace()
    seen = {}
    for text in (PROMPT_NO_INPUT, PROMPT_WITH_INPUT, INSTRUCTION):
        for piece, _ in pre.pre_tokenize_str(text.replace("{instruction}", "").replace("{context}", "")):
            seen.setdefault(piece, None)
    return list(seen)


def make_tokenizer(vocab: int, path: str):
    """A word-level tokenizer with exactly ``vocab`` tokens: pad, bos, eos, the template's words, fillers ``w<i>``."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", *_template_words()]
    filler = [f"w{i}" for i in range(len(words), vocab)]
    table = {w: i for i, w in enumerate(words + filler)}
    if len(table) != vocab:
        raise ValueError(f"vocab={vocab} is too small for the template's {len(words)} words")
    tok = Tokenizer(WordLevel(table, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")     # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=1 << 30)
    fast.save_pretrained(path)
    return fast, len(words)


def make_records(n: int, vocab: int, first_filler: int, prompt_tokens: int, max_length: int, seed: int) -> list:
    """``n`` instruction records whose responses (Zipf filler words) fill ``max_length`` minus 0-1/8 of it."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab - first_filler + 1, dtype=np.float64)
    p = ranks ** -1.1
    p /= p.sum()
    perm = rng.permutation(vocab - first_filler) + first_filler       # which filler id gets which frequency rank
    out = []
    for _ in range(n):
        words = [f"w{i}" for i in perm[rng.choice(len(p), size=8, p=p)]]
        room = max_length - prompt_tokens - 1                          # - 1: the EOS the trainer appends
        length = max(1, room - int(rng.integers(0, max(1, room // 8) + 1)))
        resp = [f"w{i}" for i in perm[rng.choice(len(p), size=length, p=p)]]
        out.append({"instruction": f"{INSTRUCTION} {' '.join(words)}", "response": " ".join(resp)})
    return out


def make_workspace(root: str, a) -> dict:
    """Tokenizer, data, student, teacher under ``root``; then the teacher cache. Returns paths and cache facts."""
    import torch
    from transformers.utils import logging as hf_logging

    from minillm_fast.demo.configs import build_model, student_config, teacher_config
    from minillm_fast.distill import data as D
    from minillm_fast.distill import teacher_cache

    torch.set_num_threads(a.threads)
    hf_logging.disable_progress_bar()
    paths = {k: os.path.join(root, k) for k in ("tokenizer", "student", "teacher", "cache")}
    paths["train_data"] = os.path.join(root, "train.jsonl")
    tok, first_filler = make_tokenizer(a.vocab, paths["tokenizer"])
    prompt_tokens = len(tok(D.format_prompt(f"{INSTRUCTION} " + " ".join(["w9"] * 8)))["input_ids"])
    records = make_records(a.examples or a.batch, a.vocab, first_filler, prompt_tokens, a.max_length, a.seed)
    D.write_jsonl(paths["train_data"], records)
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    positions = max(256, a.max_length)
    student = build_model(student_config(a.vocab, "gpt2", n_positions=positions, **special), seed=a.seed)
    teacher = build_model(teacher_config(a.vocab, "gpt2", n_positions=positions, tie_word_embeddings=False,
                                         **special), seed=a.seed + 1)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(a.teacher_logit_scale)
    for what, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(paths[what])
        tok.save_pretrained(paths[what])
    n_params = {what: sum(p.numel() for p in m.parameters()) for what, m in (("student", student),
                                                                             ("teacher", teacher))}
    del student, teacher
    t0 = time.perf_counter()
    manifest = teacher_cache.build(paths["teacher"], paths["train_data"], paths["cache"], top_k=a.top_k,
                                   max_length=a.max_length, max_prompt_length=a.max_prompt_length, dtype=a.cache_dtype,
                                   batch_size=a.batch, device="cpu", backend=a.backend, progress=False)
    build_s = time.perf_counter() - t0
    rows = sum(s["rows"] for s in manifest["shards"])
    shard_bytes = sum(os.path.getsize(os.path.join(paths["cache"], s["file"])) for s in manifest["shards"])
    disk = sum(os.path.getsize(os.path.join(paths["cache"], f)) for f in os.listdir(paths["cache"]))
    from safetensors.torch import load_file

    lps = torch.cat([load_file(os.path.join(paths["cache"], s["file"]))["logprobs"].float()
                     for s in manifest["shards"]])
    topk_mass = float(lps.exp().sum(-1).mean())
    return dict(paths=paths, prompt_tokens=prompt_tokens, student_params=n_params["student"],
                teacher_params=n_params["teacher"], cache_rows=rows, cache_disk_bytes=disk, cache_shard_bytes=shard_bytes,
                cache_bytes_per_token=shard_bytes / max(rows, 1), cache_build_s=build_s,
                cache_build_tokens_per_s=rows / max(build_s, 1e-9), teacher_topk_mass=topk_mass)


# ----------------------------------------------------------------------------------------------------------------------
# one case, in its own process
# ----------------------------------------------------------------------------------------------------------------------
def run_case(spec: dict) -> dict:
    """Build the trainer, warm up, measure the peak memory of one step, time ``reps`` steps, replay the KL op."""
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers.utils import logging as hf_logging

    from bench import measure
    from minillm_fast.distill import losses
    from minillm_fast.distill.config import DistillConfig
    from minillm_fast.distill.trainer import Trainer

    p, impl = spec["paths"], spec["impl"]
    values = dict(method="sft" if impl == "sft" else "kd", student=p["student"], tokenizer=p["tokenizer"],
                  teacher=p["teacher"] if impl == "live" else None,
                  teacher_cache=p["cache"] if impl == "cache" else None, train_data=p["train_data"],
                  valid_data=None, output_dir=os.path.join(spec["workdir"], f"run-{impl}"), device="cpu",
                  backend=spec["backend"], max_length=spec["max_length"], max_prompt_length=spec["max_prompt_length"],
                  batch_size=spec["batch"], kd_ratio=spec["kd_ratio"], lr=1e-4, warmup_steps=0, total_iters=1000,
                  eval_interval=10 ** 6, save_interval=0, final_eval=False, progress_bar=False, plots=False,
                  eval_generate=False, select_metric="none", seed=spec["seed"], overwrite=True)
    hf_logging.disable_progress_bar()
    trainer = Trainer(DistillConfig.from_dict(values))
    method = trainer.method

    # instruments: the teacher's forward / the cache read, timed inside the step; the KL op's inputs, kept for replay
    clock = {"teacher_s": 0.0}
    kept = {}

    def timed(fn):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            clock["teacher_s"] += time.perf_counter() - t0
            return out
        return wrapper

    def keep(name, fn):
        def wrapper(*args, **kw):
            if kept.get("on"):
                kept[name] = (fn, args, kw)
            return fn(*args, **kw)
        return wrapper

    if impl == "live":
        trainer.teacher_hidden = timed(trainer.teacher_hidden)
    elif impl == "cache":
        method.cache.batch = timed(method.cache.batch)
    losses.divergence_sum = keep("kl", losses.divergence_sum)
    losses.cached_kd_sum = keep("kl", losses.cached_kd_sum)

    def step():
        clock["teacher_s"] = 0.0
        return method.step()

    for _ in range(spec["warmup"]):
        step()
    gc.collect()
    resident = measure._statm_rss_bytes() or float("nan")
    peak = measure.CpuPeak()
    with peak:
        out = step()
    times, teacher_ms, tokens = [], [], []
    for _ in range(spec["reps"]):
        gc.collect()
        t0 = time.perf_counter()
        out = step()
        times.append((time.perf_counter() - t0) * 1e3)
        teacher_ms.append(clock["teacher_s"] * 1e3)
        tokens.append((int(out["train/tokens"]), int(out["_seen"])))
    stats = measure.summarize(times)
    res = dict(status="ok", loss=out["train/loss"], ce=out["train/ce"], kd=out.get("train/kd", float("nan")),
               tokens=tokens[-1][0], input_tokens=tokens[-1][1], same_tokens_every_step=len(set(tokens)) == 1,
               peak_extra_mib=peak.extra_bytes / MIB, mem_method=peak.method, resident_mib=resident / MIB,
               tokens_per_s=tokens[-1][0] / (stats["median_ms"] / 1e3), **stats)
    if impl == "sft":
        return res

    # the KL op alone, forward and backward, on the inputs of one more step
    kept["on"] = True
    step()
    fn, args, kw = kept["kl"]
    h = args[0].detach()
    kl_times = []
    for _ in range(spec["reps"]):
        x = h.clone().requires_grad_(True)
        gc.collect()
        t0 = time.perf_counter()
        fn(x, *args[1:], **kw).backward()
        kl_times.append((time.perf_counter() - t0) * 1e3)
        trainer.student.zero_grad(set_to_none=True)
    kl = measure.summarize(kl_times)["median_ms"]
    read = measure.summarize(teacher_ms)["median_ms"]
    res.update(teacher_read_ms=read, kl_ms=kl, teacher_share=(read + kl) / stats["median_ms"])
    return res


def _run_in_subprocess(spec: dict, timeout: float) -> dict:
    return step_runs.run_in_subprocess("bench.kd_cache_step", spec, timeout,
                                       dict(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"])))


# ----------------------------------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kd_cache_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", default=",".join(IMPLS), help="live, cache, sft (comma-separated; default: %(default)s)")
    ap.add_argument("--vocab", type=int, default=50257, help="tokenizer and models' vocabulary (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (batch_size; default: %(default)s)")
    ap.add_argument("--max-length", type=int, default=256, help="prompt + response tokens (default: %(default)s)")
    ap.add_argument("--max-prompt-length", type=int, default=64)
    ap.add_argument("--examples", type=int, default=0, help="training records (default: one batch, so every step "
                                                            "trains on the same batch)")
    ap.add_argument("--top-k", type=int, default=64, help="ids the cache keeps per token (default: %(default)s)")
    ap.add_argument("--cache-dtype", default="fp16", choices=("fp16", "fp32"), help="stored log-probs")
    ap.add_argument("--teacher-logit-scale", type=float, default=10.0, help="multiplies the random teacher's untied "
                                                                             "head (peaked distributions)")
    ap.add_argument("--kd-ratio", type=float, default=0.5)
    ap.add_argument("--backend", default="auto", help="backend of the fused ops (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per case")
    ap.add_argument("--workdir", help="keep the workspace (models, data, cache) here instead of a temporary folder")
    ap.add_argument("--csv", default=CSV, help="CSV to append to ('' for none; default: %(default)s)")
    ap.add_argument("--case", help=argparse.SUPPRESS)        # internal: run one case, print its JSON
    a = ap.parse_args(argv)
    if a.case:
        print(json.dumps(run_case(json.loads(a.case))))
        return 0
    impls = [x for x in a.impl.split(",") if x]
    bad = [x for x in impls if x not in IMPLS]
    if bad:
        ap.error(f"--impl {','.join(bad)}: expected some of {','.join(IMPLS)}")
    if a.max_prompt_length >= a.max_length:
        ap.error("--max-prompt-length must be below --max-length")

    import torch

    workdir = a.workdir or tempfile.mkdtemp(prefix="kd-cache-step-")
    os.makedirs(workdir, exist_ok=True)
    try:
        t0 = time.perf_counter()
        ws = make_workspace(workdir, a)
        print(f"workspace in {time.perf_counter() - t0:.0f} s: V={a.vocab}, {a.examples or a.batch} records, "
              f"prompt {ws['prompt_tokens']} tokens, student {ws['student_params'] / 1e6:.1f}M / teacher "
              f"{ws['teacher_params'] / 1e6:.1f}M parameters; cache k={a.top_k} {a.cache_dtype}: {ws['cache_rows']} "
              f"response tokens, built in {ws['cache_build_s']:.1f} s", file=sys.stderr, flush=True)
        common = dict(vocab=a.vocab, batch=a.batch, max_length=a.max_length, max_prompt_length=a.max_prompt_length,
                      examples=a.examples or a.batch, top_k=a.top_k, cache_dtype=a.cache_dtype,
                      teacher_logit_scale=a.teacher_logit_scale, kd_ratio=a.kd_ratio, backend=a.backend,
                      threads=a.threads, reps=a.reps, warmup=a.warmup, seed=a.seed)
        facts = {k: v for k, v in ws.items() if k != "paths"}
        machine, commit = step_runs.machine(), step_runs.commit()
        rows, got = [], {}
        print(f"\nkd step, V={a.vocab}, batch {a.batch} x max_length {a.max_length}, student 128/4, teacher 256/6, "
              f"{a.threads} threads, median of {a.reps}; {machine}\n")
        print("| teacher | tokens/s (step time) | teacher share: read or forward + KL | peak extra memory | "
              "resident after warm-up | x live tokens/s | x live memory |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for impl in impls:
            spec = dict(impl=impl, paths=ws["paths"], workdir=workdir, **common)
            res = _run_in_subprocess(spec, a.timeout)
            got[impl] = res
            rows.append({"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
                         "machine": machine, "torch": torch.__version__, "impl": impl, **common, **facts, **res})
            name = {"live": "live teacher", "cache": f"cache k={a.top_k} {a.cache_dtype}",
                    "sft": "none (sft, reference)"}[impl]
            if res.get("status") != "ok":
                print(f"| {name} | {res.get('status')}: {res.get('error', '')} | | | | | |", flush=True)
                continue
            share = ""
            if "teacher_share" in res:
                what = "forward" if impl == "live" else "read"
                share = (f"{res['teacher_share'] * 100:.0f}% ({what} {_sec(res['teacher_read_ms'])} + KL "
                         f"{_sec(res['kl_ms'])})")
            speed, mem = step_runs.ratios(res, got.get("live", {})) if impl != "live" else ("", "")
            print(f"| {name} | {res['tokens_per_s']:.0f} ({res['median_ms'] / 1e3:.2f} s) | {share} | "
                  f"{res['peak_extra_mib']:.0f} MiB | {res['resident_mib']:.0f} MiB | {speed} | {mem} |", flush=True)
        print(f"\ncache: {ws['cache_disk_bytes'] / 1e6:.2f} MB on disk for {ws['cache_rows']} response tokens, "
              f"{ws['cache_bytes_per_token']:.0f} B/token (k x {6 if a.cache_dtype == 'fp16' else 8} B = "
              f"{a.top_k * (6 if a.cache_dtype == 'fp16' else 8)}, plus offsets; a full fp32 distribution: "
              f"{4 * a.vocab / 1e3:.0f} kB/token); the top {a.top_k} hold {ws['teacher_topk_mass'] * 100:.1f}% of the "
              f"teacher's mass on average; built at {ws['cache_build_tokens_per_s']:.0f} tokens/s (one cold pass)")
        ok = [r for r in rows if r.get("status") == "ok"]
        if ok and not all(r.get("same_tokens_every_step") for r in ok):
            print("note: the steps' token counts differed (--examples > --batch): tokens/s uses the last step's",
                  file=sys.stderr)
    finally:
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if a.csv:
        step_runs.append_csv(a.csv, rows)
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


def _sec(ms: float) -> str:
    return f"{ms / 1e3:.2f} s" if ms >= 100 else f"{ms:.1f} ms"


if __name__ == "__main__":
    sys.exit(main())
