"""One GKD training step of TRL's ``GKDTrainer``: TRL's own loss against the fused one
(``minillm_fast.integrations.trl.use_fused_losses``). Peak memory and tokens/s.

    python -m bench.trl_step                                   # V = 50257 (GPT-2) and 128256 (Llama 3), both impls
    python -m bench.trl_step --vocab 50257 --batch 4 --seq 256 --threads 2 --reps 3

What one step is: ``trainer.training_step(model, inputs, num_items_in_batch)`` as ``Trainer`` calls it (``lmbda=0``:
no generation), i.e. the student forward with gradients, the teacher forward without, TRL's
``GKDTrainer.compute_loss`` (``trl``: ``generalized_jsd_loss`` on both models' ``[B, T-1, V]`` fp32 logits) or the
fused one (``fused``: both models up to their final hidden states, ``fused_divergence(jsd)``), and the backward. The
optimiser step is the same for both and left out. ``beta`` 0.5 (TRL's default: the mixture path, the most
expensive of TRL's three), no gradient checkpointing.

Models: the demo's configs (``minillm_fast/demo/configs.py``: student 128 wide / 4 blocks, teacher 256 / 6, untied
heads as built there), GPT-2 family at V=50257, Llama at V=128256, random init, fp32. Inputs: ``batch`` rows of
``seq`` random ids, right-padded to ragged lengths (each row loses up to a quarter), the first ``prompt`` tokens of
each row masked (-100) as GKD's collator masks the prompt. tokens/s counts the input tokens (attended positions) per
second of the median step; the loss tokens are reported too.

Each case runs in a fresh subprocess (one implementation's allocator state cannot leak into the other's); memory is
the peak resident memory above what exists after one warm-up step (models, inputs, optimizer-free trainer, the
warmed libraries; ``bench.measure.CpuPeak``), on CPU. Times: the median and the best of ``reps`` steps, the process
CPU seconds of the median step, and the 1-minute load average before and after the timed steps (on a machine shared
with other work the wall times mean little: compare the best steps, and check the load). The two losses of the same
inputs are printed side by side: they agree to fp32 round-off.

Writes ``bench/results/trl_step.csv`` (appends) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time

from bench import step_runs

IMPLS = ("trl", "fused")
FAMILY = {50257: "gpt2", 128256: "llama"}
MIB = float(1 << 20)
CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "trl_step.csv")


def _tokenizer(n: int):
    """A word-level tokenizer with exactly ``n`` tokens (pad, bos, eos first); GKDTrainer wants one."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, n)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")), pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def _inputs(spec: dict):
    import torch

    g = torch.Generator().manual_seed(spec["seed"])
    b, t, p = spec["batch"], spec["seq"], spec["prompt"]
    ids = torch.randint(3, spec["vocab"], (b, t), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :p] = -100
    for i in range(b):
        n = t - int(torch.randint(0, t // 4 + 1, (1,), generator=g))
        ids[i, n:], mask[i, n:], labels[i, n:] = 0, 0, -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run_case(spec: dict) -> dict:
    """Build the trainer, warm up one step, measure the peak memory of one step, then time ``reps`` steps."""
    import torch

    torch.set_num_threads(spec["threads"])
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from bench import measure
    from minillm_fast.demo.configs import build_model, student_config, teacher_config
    from minillm_fast.integrations.trl import use_fused_losses

    v, family = spec["vocab"], spec["family"]
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    student = build_model(student_config(v, family, **special), seed=spec["seed"])
    teacher = build_model(teacher_config(v, family, **special), seed=spec["seed"] + 1)
    with tempfile.TemporaryDirectory() as out:
        args = GKDConfig(output_dir=out, per_device_train_batch_size=spec["batch"], lmbda=0.0, beta=spec["beta"],
                         seq_kd=False, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                         gradient_checkpointing=False, max_length=None)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=_tokenizer(v),
                             train_dataset=Dataset.from_list([{"input_ids": [3]}]), data_collator=lambda rows: rows)
        if spec["impl"] == "fused":
            use_fused_losses(trainer)
        inputs = _inputs(spec)
        tokens = int(inputs["attention_mask"].sum())
        loss_tokens = int((inputs["labels"][:, 1:] != -100).sum())
        count = torch.tensor(loss_tokens)
        student.train()

        def step():
            student.zero_grad(set_to_none=True)
            return float(trainer.training_step(student, dict(inputs), num_items_in_batch=count))

        def clear():
            student.zero_grad(set_to_none=True)
            gc.collect()

        for _ in range(spec["warmup"]):
            step()
        clear()
        peak = measure.CpuPeak()
        with peak:
            loss = step()
        clear()
        times, cpu = [], []
        load = [os.getloadavg()[0]]
        for _ in range(spec["reps"]):
            clear()
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append(time.process_time() - c0)
        load.append(os.getloadavg()[0])
        clear()
    stats = measure.summarize(times)
    return dict(status="ok", loss=loss, tokens=tokens, loss_tokens=loss_tokens, peak_extra_mib=peak.extra_bytes / MIB,
                mem_method=peak.method, tokens_per_s=tokens / (stats["median_ms"] / 1e3),
                tokens_per_s_best=tokens / (stats["min_ms"] / 1e3), cpu_s_median=sorted(cpu)[len(cpu) // 2],
                load_before=load[0], load_after=load[1], **stats)


def _run_in_subprocess(spec: dict, timeout: float) -> dict:
    return step_runs.run_in_subprocess("bench.trl_step", spec, timeout,
                                       dict(OMP_NUM_THREADS=str(spec["threads"]), TRL_EXPERIMENTAL_SILENCE="1"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.trl_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", default="50257,128256", help="comma-separated vocabularies (default: %(default)s)")
    ap.add_argument("--impl", default=",".join(IMPLS), help="trl, fused or both (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64, help="masked prompt tokens per row")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    ap.add_argument("--csv", default=CSV, help="CSV to append to ('' for none; default: %(default)s)")
    ap.add_argument("--case", help=argparse.SUPPRESS)        # internal: run one case, print its JSON
    a = ap.parse_args(argv)
    if not 0 <= a.prompt < (3 * a.seq) // 4:
        # rows lose up to a quarter of seq to padding: a prompt this long would leave a row without loss tokens
        ap.error(f"--prompt={a.prompt} must be in [0, 3/4 of --seq = {(3 * a.seq) // 4}) so every row has loss tokens")
    if a.case:
        print(json.dumps(run_case(json.loads(a.case))))
        return 0

    import torch

    rows = []
    print("| V | impl | tokens/s: median step (best) | CPU s / step | peak extra memory | loss | speed-up | "
          "memory ratio | load avg |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for v in [int(x) for x in a.vocab.split(",")]:
        got = {}
        for impl in a.impl.split(","):
            spec = dict(impl=impl, vocab=v, family=FAMILY.get(v, "gpt2"), batch=a.batch, seq=a.seq, prompt=a.prompt,
                        beta=a.beta, threads=a.threads, reps=a.reps, warmup=a.warmup, seed=a.seed)
            res = _run_in_subprocess(spec, a.timeout)
            got[impl] = res
            row = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": step_runs.machine(),
                   "torch": torch.__version__, "trl": _trl_version(), **spec, **res}
            rows.append(row)
            if res.get("status") != "ok":
                print(f"| {v} | {impl} | {res.get('status')}: {res.get('error', '')} | | | | | | |")
                continue
            speed, mem = step_runs.ratios(res, got.get("trl", {})) if impl != "trl" else ("", "")
            print(f"| {v} | {impl} | {res['tokens_per_s']:.0f} ({res['tokens_per_s_best']:.0f}) | "
                  f"{res['cpu_s_median']:.2f} | {res['peak_extra_mib']:.0f} MiB | {res['loss']:.6f} | {speed} | {mem} | "
                  f"{res['load_before']:.1f}-{res['load_after']:.1f} |", flush=True)
    if a.csv:
        step_runs.append_csv(a.csv, rows)
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


def _trl_version() -> str:
    try:
        import trl

        return trl.__version__
    except ImportError:
        return "missing"


if __name__ == "__main__":
    sys.exit(main())
