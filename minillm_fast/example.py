"""A small end-to-end use of the fused loss, runnable anywhere in seconds.

A frozen "teacher" (a random two-layer feature map and an lm_head over a 4096-token vocabulary) and a smaller
"student" see the same token contexts; the student is trained with the fused reverse KL only, from hidden states and
head weights. It prints the loss as it falls and, at the end, checks the fused value against the materialised
reference (minillm_fast/reference.py) on the same batch.
"""
from __future__ import annotations

import time

import torch

from . import reference
from .ops.fused_divergence import fused_reverse_kl


def run_example(steps: int = 200, seed: int = 0, vocab: int = 4096, tokens: int = 512) -> dict:
    torch.manual_seed(seed)
    d_in, h_teacher, h_student = 64, 256, 64
    teacher = torch.nn.Sequential(torch.nn.Linear(d_in, h_teacher), torch.nn.GELU()).requires_grad_(False)
    teacher_head = torch.nn.Linear(h_teacher, vocab, bias=False).requires_grad_(False)
    torch.nn.init.normal_(teacher_head.weight, std=3.0 / h_teacher ** 0.5)
    student = torch.nn.Sequential(torch.nn.Linear(d_in, h_student), torch.nn.GELU())
    student_head = torch.nn.Linear(h_student, vocab, bias=False)
    opt = torch.optim.AdamW([*student.parameters(), *student_head.parameters()], lr=3e-3)

    print(f"minillm-fast example: teacher {h_teacher}-wide, student {h_student}-wide, vocabulary {vocab}, "
          f"{tokens} tokens a step, fused reverse KL (backend auto)")
    start, history = time.perf_counter(), []
    for step in range(steps):
        x = torch.randn(tokens, d_in)
        loss = fused_reverse_kl(student(x), student_head.weight, teacher(x), teacher_head.weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"  step {step:4d}  reverse KL {history[-1]:.4f}")
    x = torch.randn(tokens, d_in, dtype=torch.float64)
    with torch.no_grad():
        hs, ht = student.double()(x), teacher.double()(x)
        fused = fused_reverse_kl(hs, student_head.weight.double(), ht, teacher_head.weight.double())
        ref = reference.fused_divergence(hs, student_head.weight.double(), ht, teacher_head.weight.double())
    print(f"reverse KL fell from {history[0]:.4f} to {history[-1]:.4f} in {time.perf_counter() - start:.1f}s; "
          f"fused vs materialised reference on a float64 batch: {fused.item():.10f} vs {ref.item():.10f}")
    return {"first": history[0], "last": history[-1], "fused": fused.item(), "reference": ref.item()}
