"""Throughput and peak memory of one MiniLLM training micro-step: fused ops vs the same step on materialised logits.

The step is the trainer's: student forward over 8 rollouts (prompt 64 + response 64 tokens) concatenated with 8
corpus rows of 128 tokens, the PPO surrogate through token log-probs, the single-step reverse KL against cached teacher
hidden states, the pre-training term (0.5 CE + 0.5 KD against a no-grad teacher forward), backward. ``fused`` uses
:mod:`minillm_fast` ops (no [tokens, V] tensor beyond a chunk); ``materialised`` computes the same losses as the
reference implementation does: both models' lm_heads applied once, fp32 log-softmax, every term from those logits,
autograd. Each variant runs
in its own process so that its peak RSS (``ru_maxrss``) can be read; memory is reported as the peak RSS during the
steps minus the RSS before the first step.

    python -m minillm_fast.distill.throughput --vocab 32000 50257 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(variant: str, vocab: int, steps: int, threads: int, s_hidden: int, t_hidden: int, backend: str) -> dict:
    import torch

    from . import losses, models, toy

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    student = toy.build_model("gpt2", vocab, s_hidden, 2, max_positions=256, seed=0)
    teacher = toy.build_model("gpt2", vocab, t_hidden, 2, max_positions=256, seed=1, tie=False, logit_scale=20.0)
    teacher.requires_grad_(False).eval()
    student.train()
    models.disable_dropout(student)
    b, p, r, length = 8, 64, 64, 128
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (b, p), generator=g)
    response = torch.randint(3, vocab, (b, r), generator=g)
    resp_mask = torch.ones(b, r, dtype=torch.bool)
    for i in range(b):                              # ragged responses
        resp_mask[i, r - 4 * i:] = False
    pt = torch.randint(3, vocab, (b, length), generator=g)
    s_head, t_head = models.head_of(student), models.head_of(teacher)
    opts = losses.LossOptions(backend=backend)
    ids = torch.cat([torch.cat([prompt, response], 1), pt])
    msk = torch.cat([torch.cat([torch.ones(b, p, dtype=torch.long), resp_mask.long()], 1),
                     torch.ones(b, length, dtype=torch.long)])
    with torch.no_grad():
        ht = models.hidden_states(teacher, ids[:b], msk[:b])[:, p - 1:p + r - 1]
        hs0 = models.hidden_states(student, ids[:b], msk[:b])[:, p - 1:p + r - 1]
        old = losses.logprobs(hs0, s_head, torch.where(resp_mask, response, -100), losses.LossOptions(backend=backend))
    adv = torch.randn(b, r, generator=g) * resp_mask
    weight = torch.ones(b, r)
    labels = pt[:, 1:]
    n_ppo, n_pt = int(resp_mask.sum()), labels.numel()

    def fused_step():
        hs = models.hidden_states(student, ids, msk)
        terms = losses.ppo_terms(hs[:b, p - 1:p + r - 1], s_head, response, resp_mask, old, adv, weight, opts,
                                 teacher_hidden=ht, t_head=t_head)
        with torch.no_grad():
            ht_pt = models.hidden_states(teacher, ids[b:], msk[b:])[:, :-1]
        pt_terms = losses.lm_terms(hs[b:, :-1], s_head, labels, opts, teacher_hidden=ht_pt, t_head=t_head)
        return (terms["pg"] + terms["single_step"]) / n_ppo + losses.kd_objective(pt_terms, 0.5) / n_pt

    def materialised_step():
        # as the reference implementation does it: logits of both models once, fp32, then every term from them
        hs = models.hidden_states(student, ids, msk)
        logits = student.lm_head(hs).float()                                       # [2b, T, V]
        with torch.no_grad():
            t_ppo = teacher.lm_head(ht).float()                                    # [b, r, V]
            t_pt = teacher.lm_head(models.hidden_states(teacher, ids[b:], msk[b:])[:, :-1]).float()
        m = resp_mask.float()
        lq = torch.log_softmax(logits[:b, p - 1:p + r - 1], -1)
        lp = torch.log_softmax(t_ppo, -1)
        lq_y = lq.gather(-1, response.unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp((lq_y - old) * m) * weight
        pg = (torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)) * m).sum()
        single = ((lq.exp() * (lq - lp)).sum(-1) * m).sum()
        lq_pt = torch.log_softmax(logits[b:, :-1], -1)
        lp_pt = torch.log_softmax(t_pt, -1)
        ce = -lq_pt.gather(-1, labels.unsqueeze(-1)).sum()
        kd = (lp_pt.exp() * (lp_pt - lq_pt)).sum()
        return (pg + single) / n_ppo + (0.5 * ce + 0.5 * kd) / n_pt

    def step():
        loss = materialised_step() if variant == "materialised" else fused_step()
        loss.backward()
        student.zero_grad(set_to_none=True)
        return float(loss)

    step()                                           # warm-up (and lazy initialisation)
    base = _rss_mb()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, value = [], 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    med = statistics.median(times)
    return {"variant": variant, "vocab": vocab, "tokens": n_ppo + n_pt, "step_s": med,
            "tokens_per_s": (n_ppo + n_pt) / med, "peak_extra_mb": max(peak, peak0) - base, "loss": value}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm_fast.distill.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 50257])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--student-hidden", type=int, default=128)
    parser.add_argument("--teacher-hidden", type=int, default=256)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.steps, args.threads, args.student_hidden,
                                 args.teacher_hidden, args.backend)))
        return 0
    rows = []
    for vocab in args.vocab:
        for variant in ("fused", "materialised"):
            cmd = [sys.executable, "-m", "minillm_fast.distill.throughput", "--one", variant, str(vocab),
                   "--steps", str(args.steps), "--threads", str(args.threads), "--student-hidden",
                   str(args.student_hidden), "--teacher-hidden", str(args.teacher_hidden), "--backend", args.backend]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"vocab {vocab:6d} {variant:12s}: {rows[-1]['tokens_per_s']:8.0f} tokens/s "
                  f"({rows[-1]['step_s'] * 1000:.0f} ms/step), peak extra memory {rows[-1]['peak_extra_mb']:.0f} MB, "
                  f"loss {rows[-1]['loss']:.5f}", flush=True)
    print("\n| vocab | variant | tokens/step | ms/step | tokens/s | peak extra RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['vocab']} | {r['variant']} | {r['tokens']} | {r['step_s'] * 1000:.0f} | {r['tokens_per_s']:.0f} "
              f"| {r['peak_extra_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
