"""End-to-end workloads: one MiniLLM training step and one rollout on the demo's models, with the fused ops or on
materialised logits. ``python -m bench e2e`` (bench/e2e_cli.py) plans and reports; this file builds and measures one
case (one step kind, one implementation, one vocabulary) and returns plain data. See bench/README.md.

Models: the demo's configs (minillm_fast/demo/configs.py: ``student_config`` 128 wide / 4 blocks, ``teacher_config``
256 / 6, GPT-2 or Llama family, tied heads) at the given vocabulary, randomly initialised (``build_model``), fp32.
Inputs are random token ids. Nothing is downloaded.

``train``: one MiniLLM micro-step as the trainer runs it (``MiniLLM.micro_loss``, distill/methods/minillm.py), forward
and backward: the student over ``batch`` rollouts (prompt + ragged response) and ``pt_rows`` corpus rows in one
forward; the PPO surrogate through the response tokens' log-probs, the single-step reverse KL against the teacher's
hidden states cached by the rollout, the pre-training term ``0.5 CE + 0.5 KL(p || q)`` against a no-grad teacher
forward over the corpus rows. ``fused``: :mod:`minillm_fast.distill.losses` (no ``[tokens, V]`` tensor beyond a
chunk); ``materialised``: the same losses from fp32 logits of both models, each computed once for the rows that need
them (the response positions and the corpus rows, as the fused path), ``log_softmax``, every term from those,
autograd. Tokens per step: the tokens that carry a loss (valid response tokens + corpus labels).

``rollout``: ``minillm_fast.distill.rollout.generate(student, teacher, ...)`` as the trainer calls it (alpha 0.2,
teacher hidden states kept, KV caches for both models), ``new_tokens`` decoding steps for ``rollout_batch`` left-padded
prompts; no row stops early (the EOS id is one no token has), so both implementations do the same work. ``fused``:
``generate`` as it is, drawing each token with :func:`minillm_fast.mixture_sample`; ``materialised``: the same
``generate`` with its sampler replaced by :func:`materialised_mixture_sample` (both models' full fp32 logits,
softmax, the mixture, ``torch.multinomial``). Tokens per call: generated tokens (``rollout_batch * new_tokens``).
"""
from __future__ import annotations

import gc
import time
from contextlib import ExitStack
from typing import Callable, Optional
from unittest import mock

import torch

from . import measure

STEPS = ("train", "rollout")
IMPLS = ("fused", "materialised")
FAMILIES = ("gpt2", "llama")
# The demo tokenizer's vocabulary bound (minillm_fast/demo/tokenizer.py, build_tokenizer(vocab_size=2048)); on the
# default data BPE stops at 1795 tokens. The fused ops pay off at real vocabularies: 32000 (Llama-2), 50257 (GPT-2).
DEMO_VOCAB = 2048
PAD, FIRST_ID = 0, 3  # random ids avoid the demo tokenizer's special tokens (0-3 there; harmless either way)


# ----------------------------------------------------------------------------------------------------------------------
# the materialised sampler
# ----------------------------------------------------------------------------------------------------------------------
def materialised_mixture_sample(student_hidden, student_weight, teacher_hidden, teacher_weight, *, alpha=0.2,
                                temperature=1.0, generator=None, vocab_size=None, student_bias=None,
                                teacher_bias=None, student_softcap=None, teacher_softcap=None,
                                student_logit_scale=None, teacher_logit_scale=None, backend=None, chunk_size=None):
    """:func:`minillm_fast.mixture_sample` the plain way (the arguments the rollout passes, and the same result;
    ``backend`` and ``chunk_size`` ignored): full ``[B, V]`` fp32 logits of both models
    (``minillm_fast.reference.logits``), their log-softmax, the mixture ``alpha p + (1 - alpha) q``,
    ``torch.multinomial``, then the three log-probs of the drawn tokens."""
    from minillm_fast import reference
    from minillm_fast.ops.sampling import MixtureSample

    kw = dict(vocab_size=vocab_size, temperature=temperature)
    lq = torch.log_softmax(reference.logits(student_hidden, student_weight, student_bias, softcap=student_softcap,
                                            logit_scale=student_logit_scale, **kw), -1)                # [B, V]
    lp = torch.log_softmax(reference.logits(teacher_hidden, teacher_weight, teacher_bias, softcap=teacher_softcap,
                                            logit_scale=teacher_logit_scale, **kw), -1)                # [B, V]
    probs = alpha * lp.exp() + (1 - alpha) * lq.exp()                                                # [B, V]
    y = torch.multinomial(probs, 1, generator=generator)                                             # [B, 1]
    return MixtureSample(y[:, 0], lq.gather(-1, y)[:, 0], lp.gather(-1, y)[:, 0], probs.gather(-1, y)[:, 0].log())


# ----------------------------------------------------------------------------------------------------------------------
# models and inputs
# ----------------------------------------------------------------------------------------------------------------------
def build_models(family: str, vocab: int, device: torch.device, quick: bool = False, seed: int = 0):
    """The demo's student and teacher (``quick``: the demo's quick shapes) at vocabulary ``vocab``, random init."""
    from minillm_fast.demo.configs import build_model, student_config, teacher_config

    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    student = build_model(student_config(vocab, family, quick=quick, **special), seed=seed).to(device)
    teacher = build_model(teacher_config(vocab, family, quick=quick, **special), seed=seed + 1).to(device)
    teacher.requires_grad_(False).eval()
    return student, teacher


def model_shape(model) -> str:
    """``hidden/blocks/heads`` of a demo model."""
    c = model.config
    return f"{c.hidden_size}/{c.num_hidden_layers}/{c.num_attention_heads}"


def _ragged(rows: int, length: int, device) -> torch.Tensor:
    """``[rows, length]`` bool: row i keeps its first ``length - (3 i mod length/2)`` positions (ragged responses)."""
    keep = torch.tensor([length - (3 * i) % max(length // 2, 1) for i in range(rows)], device=device)
    return torch.arange(length, device=device)[None, :] < keep[:, None]


def _random_ids(gen: torch.Generator, vocab: int, *shape) -> torch.Tensor:
    return torch.randint(FIRST_ID, vocab, shape, generator=gen)


# ----------------------------------------------------------------------------------------------------------------------
# workloads: each returns (run, tokens per call, clear); run() returns (value, what to free)
# ----------------------------------------------------------------------------------------------------------------------
def train_workload(spec: dict, student, teacher, device: torch.device):
    from minillm_fast import reference
    from minillm_fast.distill import heads, losses, models

    vocab, b, p, r = spec["vocab"], spec["batch"], spec["prompt_len"], spec["new_tokens"]
    n_pt, l_pt = spec["pt_rows"], spec["pt_len"]
    gen = torch.Generator().manual_seed(spec["seed"])
    prompt = _random_ids(gen, vocab, b, p).to(device)
    response = _random_ids(gen, vocab, b, r).to(device)
    resp_mask = _ragged(b, r, device)
    pt = _random_ids(gen, vocab, n_pt, l_pt).to(device)
    student.train()
    models.disable_dropout(student)
    s_head, t_head = heads.head_of(student), heads.head_of(teacher)
    opts = losses.LossOptions(backend=spec["backend"])
    # one student forward over the rollout rows and the corpus rows, the shorter ones right-padded  [b + n_pt, T]
    t = max(p + r, l_pt)
    ids = torch.full((b + n_pt, t), PAD, dtype=torch.long, device=device)
    msk = torch.zeros(b + n_pt, t, dtype=torch.long, device=device)
    ids[:b, :p], ids[:b, p:p + r], ids[b:, :l_pt] = prompt, torch.where(resp_mask, response, PAD), pt
    msk[:b, :p], msk[:b, p:p + r], msk[b:, :l_pt] = 1, resp_mask.long(), 1
    with torch.no_grad():  # what the rollout left: the teacher's states at the response and q_old
        ht = models.hidden_states(teacher, ids[:b], msk[:b])[:, p - 1:p + r - 1]                      # [b, r, Ht]
        hs0 = models.hidden_states(student, ids[:b], msk[:b])[:, p - 1:p + r - 1]
        old = reference.token_logprobs(hs0, s_head.weight, torch.where(resp_mask, response, -100))
    adv = torch.randn(b, r, generator=gen).to(device) * resp_mask
    weight = torch.ones(b, r, device=device)
    labels = pt[:, 1:]                                                                               # [n_pt, l_pt-1]
    n_ppo, n_loss_pt = int(resp_mask.sum()), labels.numel()

    def fused():
        hs = models.hidden_states(student, ids, msk)
        terms = losses.ppo_terms(hs[:b, p - 1:p + r - 1], s_head, response, resp_mask, old, adv, weight, opts,
                                 teacher_hidden=ht, t_head=t_head)
        with torch.no_grad():
            ht_pt = models.hidden_states(teacher, ids[b:], msk[b:])[:, :l_pt - 1]
        pt_terms = losses.lm_terms(hs[b:, :l_pt - 1], s_head, labels, opts, teacher_hidden=ht_pt, t_head=t_head)
        return (terms["pg"] + terms["single_step"]) / n_ppo + losses.kd_objective(pt_terms, 0.5) / n_loss_pt

    def materialised():
        hs = models.hidden_states(student, ids, msk)
        lq = torch.log_softmax(reference.logits(hs[:b, p - 1:p + r - 1], s_head.weight, s_head.bias), -1)  # [b,r,V]
        lq_pt = torch.log_softmax(reference.logits(hs[b:, :l_pt - 1], s_head.weight, s_head.bias), -1)
        with torch.no_grad():
            lp = torch.log_softmax(reference.logits(ht, t_head.weight, t_head.bias), -1)                  # [b,r,V]
            ht_pt = models.hidden_states(teacher, ids[b:], msk[b:])[:, :l_pt - 1]
            lp_pt = torch.log_softmax(reference.logits(ht_pt, t_head.weight, t_head.bias), -1)
        m = resp_mask.float()
        lq_y = lq.gather(-1, response.unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp((lq_y - old) * m) * weight
        pg = (torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)) * m).sum()
        single = ((lq.exp() * (lq - lp)).sum(-1) * m).sum()                       # reverse KL(q || p)
        ce = -lq_pt.gather(-1, labels.unsqueeze(-1)).sum()
        kd = (lp_pt.exp() * (lp_pt - lq_pt)).sum()                               # forward KL(p || q)
        return (pg + single) / n_ppo + (0.5 * ce + 0.5 * kd) / n_loss_pt

    step = fused if spec["impl"] == "fused" else materialised

    def run():
        loss = step()
        loss.backward()
        return float(loss.detach()), loss

    def clear():
        student.zero_grad(set_to_none=True)

    return run, n_ppo + n_loss_pt, clear


def rollout_workload(spec: dict, student, teacher, device: torch.device, stack: ExitStack):
    from minillm_fast.distill import rollout

    vocab, b, p = spec["vocab"], spec["rollout_batch"], spec["prompt_len"]
    gen = torch.Generator().manual_seed(spec["seed"])
    prompt_mask = _ragged(b, p, device).flip(-1).long()                  # left-padded prompts of ragged lengths
    prompt_ids = torch.where(prompt_mask.bool(), _random_ids(gen, vocab, b, p).to(device), PAD)
    sample_gen = torch.Generator(device=device).manual_seed(spec["seed"])
    calls = [0]
    if spec["impl"] == "materialised":
        def counted(*args, **kwargs):
            calls[0] += 1
            return materialised_mixture_sample(*args, **kwargs)
        stack.enter_context(mock.patch.object(rollout, "mixture_sample", counted))

    def run():
        ro = rollout.generate(student, teacher, prompt_ids, prompt_mask, max_new_tokens=spec["new_tokens"],
                              eos_token_id=-1, pad_token_id=PAD, alpha=spec["alpha"], generator=sample_gen,
                              backend=spec["backend"], keep_teacher_hidden=True)
        if spec["impl"] == "materialised" and calls[0] == 0:
            raise RuntimeError("rollout.generate no longer calls rollout.mixture_sample: the materialised sampler "
                               "was not used (update bench/e2e.py)")
        if int(ro.response_mask.sum()) != b * spec["new_tokens"]:
            raise RuntimeError("a rollout row stopped early: the two implementations would not do the same work")
        return float(ro.student_logprobs[ro.response_mask].mean()), ro

    return run, b * spec["new_tokens"], lambda: None


# ----------------------------------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times(run: Callable, clear: Callable, reps: int, device) -> list:
    times = []
    for _ in range(reps):
        clear()
        _sync(device)
        t0 = time.perf_counter()
        _, out = run()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        del out
    clear()
    return times


def run_case(spec: dict) -> dict:
    """Build the models and inputs of one case, run ``warmup`` untimed calls, one untimed call that measures the peak
    memory above what exists then (models, inputs, warmed-up libraries), then ``reps`` timed calls."""
    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(spec["threads"])
    try:
        from minillm_fast import dispatch

        backend = "reference" if spec["impl"] == "materialised" else dispatch.resolve(spec["backend"], device)
        student, teacher = build_models(spec["family"], spec["vocab"], device, spec.get("quick", False), spec["seed"])
        with ExitStack() as stack:
            if spec["step"] == "train":
                run, tokens, clear = train_workload(spec, student, teacher, device)
            else:
                run, tokens, clear = rollout_workload(spec, student, teacher, device, stack)
            value = None
            for _ in range(spec["warmup"]):
                clear()
                value, out = run()
                del out
            clear()
            peak = measure._peak(device)
            with peak:
                value, out = run()
                _sync(device)
            del out
            times = _times(run, clear, spec["reps"], device)
        stats = measure.summarize(times)
        return dict(status="ok", backend=backend, tokens=tokens, value=value, student=model_shape(student),
                    teacher=model_shape(teacher), peak_extra_bytes=peak.extra_bytes, mem_method=peak.method,
                    tokens_per_s=tokens / (stats["median_ms"] / 1e3), **stats)
    except Exception as e:  # noqa: BLE001  (reported as a row, the other cases go on)
        return measure._error(e)
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def spec_of(*, step: str, impl: str, family: str, vocab: int, threads: int, device: str, args,
            quick: Optional[bool] = None) -> dict:
    """The plain-data description of one case (what bench/worker.py receives)."""
    return dict(kind="e2e", step=step, impl=impl, family=family, vocab=vocab, threads=threads, device=device,
                quick=bool(args.quick if quick is None else quick), seed=args.seed, reps=args.reps,
                warmup=args.warmup, backend=args.backend, alpha=args.alpha, batch=args.batch,
                prompt_len=args.prompt_len, new_tokens=args.new_tokens, pt_rows=args.pt_rows, pt_len=args.pt_len,
                rollout_batch=args.rollout_batch)
