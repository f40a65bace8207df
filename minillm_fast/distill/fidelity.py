"""The paper's measurements beyond Rouge-L (section 3.3, appendix B.4 and B.5): exposure bias (ExAccErr), calibration
(ECE), response length and distinct-n diversity, from forward passes only (no sampling beyond the evaluation's).

Notation: ``p`` is the teacher's and ``q`` the student's next-token distribution (full vocabulary).

* **ExAccErr** (appendix B.5, eq. 30-32; Arora et al. 2022). Per generation step ``t``, ``KL_t = KL(p_t || q_t)``,
  which is exactly the inner expectation over ``y_t ~ p`` of ``log p(y_t) / q(y_t)`` in eq. 31-32. Averaged over
  student prefixes (the student's own evaluation samples) it is ``s_t``; over teacher prefixes (the teacher's
  evaluation samples, the oracle context) ``o_t``. Then ``R(l) = sum_{t<=l} s_t``, ``l eps(l) = sum_{t<=l} o_t`` and
  ``ExAccErr(l) = (R(l) - l eps(l)) / (l eps(l)) x 100%``: the relative error due to the student's prefixes alone.
  **Sequences that ended before step t do not count at t**: ``s_t`` and ``o_t`` are means over the samples still
  generating at ``t`` (the step that produced EOS counts; the paper's fixed-length generations have no such
  choice). Steps where fewer than ``min_fraction`` of either set's samples are still generating are not reported:
  a mean over a handful of long samples is noise.
* **ECE** (Nixon et al. 2019): teacher-forced on each example's first reference response (EOS included),
  confidence = the model's largest next-token probability, correct = its argmax equals the reference token;
  10 equal-width bins of confidence, ``ECE = sum_b |B_b| / N x |acc(B_b) - conf(B_b)|``.
* **Length**: tokens of a sampled response (EOS not counted), mean over the examples of a seed.
* **Distinct-n** (appendix B.4, Table 5): distinct word n-grams / all word n-grams over one seed's responses (n-grams
  never cross a response boundary; words are whitespace-separated), x 100.

The evaluation stores responses as text (``evaluate.generate_responses``), so their tokens are re-encoded:
``tokenizer(text) + [EOS]``, cut at ``max_new_tokens`` (a generation stops at EOS or at that cap, so a shorter one
ended with EOS). Responses were sampled with ``no_repeat_ngram_size``; ``p`` and ``q`` here are the models' own
distributions, without that constraint.

Prompts are run once per batch and their KV cache reused for every seed's responses (the prompts are most of the
tokens: up to 140 against at most 56 in the demo), so the cost is about ``prompt + seeds x response`` tokens per
example and model, not ``seeds x (prompt + response)``.
"""
from __future__ import annotations

import copy
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..ops.fused_divergence import fused_divergence
from ..reference import logits
from .data import collate_prompts, pad_right
from .heads import head_of
from .models import hidden_states

REPORT_LENGTHS = (8, 16, 32)        # the generation lengths l at which results.json states ExAccErr(l)
CHUNK = 4096                        # tokens whose [CHUNK, V] logits calibration holds at once


# ----------------------------------------------------------------------------------------------------------------------
# pure arithmetic
# ----------------------------------------------------------------------------------------------------------------------
def distinct_n(texts: Sequence[str], n: int = 4) -> Optional[float]:
    """Distinct word n-grams / all word n-grams over ``texts`` (each text's n-grams alone), x 100; None (undefined)
    when no text has ``n`` words."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return 100.0 * len(set(grams)) / len(grams) if grams else None


def expected_calibration_error(confidence: Tensor, correct: Tensor, n_bins: int = 10) -> dict:
    """ECE with ``n_bins`` equal-width bins of confidence (bin ``b`` holds ``(b / n, (b + 1) / n]``, 0 in the first).

    Args:
        confidence: ``[N]`` float in [0, 1], the predicted class's probability.
        correct: ``[N]`` bool, whether the predicted class was right.
    Returns ``{"ece", "accuracy", "confidence", "n", "bins": [{"count", "accuracy", "confidence"}]}`` (floats).
    """
    if confidence.shape != correct.shape or confidence.dim() != 1:
        raise ValueError(f"confidence {tuple(confidence.shape)} and correct {tuple(correct.shape)} must be the same "
                         f"[N] shape")
    if confidence.numel() == 0:
        raise ValueError("no predictions to measure calibration on")
    conf, hit = confidence.double(), correct.double()
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, hit)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    ece = float((acc_sum - conf_sum).abs().sum() / conf.numel())     # |B|/N x |acc - conf| = |sum hit - sum conf|/N
    bins = [{"count": int(c), "accuracy": float(a / c) if c else None, "confidence": float(f / c) if c else None}
            for c, a, f in zip(count.tolist(), acc_sum.tolist(), conf_sum.tolist())]
    return {"ece": ece, "accuracy": float(hit.mean()), "confidence": float(conf.mean()), "n": conf.numel(),
            "bins": bins}


def sum_by_step(values: Tensor, mask: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Per generation step, the sum of ``values`` over the rows still generating and their count.

    Args:
        values: ``[B, R]`` per-token values, step ``t`` (0-based) of row ``b`` at ``[b, t]``.
        mask: ``[B, R]`` bool, True where row ``b`` generated a token at step ``t`` (a prefix of each row).
        steps: length of the outputs (``>= R``).
    Returns ``(sums [steps] float64, counts [steps] int64)``.
    """
    r = values.shape[1]
    sums = torch.zeros(steps, dtype=torch.float64)
    counts = torch.zeros(steps, dtype=torch.long)
    sums[:r] = torch.where(mask, values.double(), 0.0).sum(0).cpu()
    counts[:r] = mask.long().sum(0).cpu()
    return sums, counts


def exposure_bias(student_sums: Tensor, student_counts: Tensor, teacher_sums: Tensor, teacher_counts: Tensor, *,
                  min_fraction: float = 0.1) -> dict:
    """ExAccErr(l) (in %) for every generation length ``l`` from per-step sums of ``KL(p_t || q_t)``.

    Args:
        student_sums, student_counts: ``[T]`` per step, the KL summed over the student-prefix samples still
            generating and their number (``sum_by_step``); step ``t`` (0-based) is the paper's ``t + 1``.
        teacher_sums, teacher_counts: ``[T]`` the same over the teacher-prefix (oracle) samples.
        min_fraction: steps are kept while at least this fraction of both sets' samples (the counts at step 0) are
            still generating; the curve stops at the first step that is not.
    Returns ``{"lengths": [l], "exaccerr": [%], "student_prefix_kl": [s_t], "teacher_prefix_kl": [o_t],
    "student_count": [..], "teacher_count": [..]}`` over the kept lengths ``l = 1..L``.
    """
    n = min(len(student_sums), len(teacher_sums))
    sc, tc = student_counts[:n].double(), teacher_counts[:n].double()
    if n == 0 or sc[0] == 0 or tc[0] == 0:
        raise ValueError("exposure bias needs at least one generated token from each of the student and the teacher")
    keep = (sc >= min_fraction * sc[0]) & (tc >= min_fraction * tc[0]) & (sc > 0) & (tc > 0)
    length = int(keep.long().cumprod(0).sum())
    s_mean = student_sums[:length].double() / sc[:length]
    o_mean = teacher_sums[:length].double() / tc[:length]
    regret, oracle = s_mean.cumsum(0), o_mean.cumsum(0)           # R(l) and l eps(l)
    exacc = 100.0 * (regret - oracle) / oracle
    return {"lengths": list(range(1, length + 1)), "exaccerr": exacc.tolist(), "student_prefix_kl": s_mean.tolist(),
            "teacher_prefix_kl": o_mean.tolist(), "student_count": student_counts[:length].tolist(),
            "teacher_count": teacher_counts[:length].tolist()}


def at_lengths(curve: dict, lengths: Sequence[int] = REPORT_LENGTHS) -> dict:
    """``{str(l): ExAccErr(l)}`` for the ``lengths`` the curve reaches."""
    return {str(l): curve["exaccerr"][l - 1] for l in lengths if l <= len(curve["lengths"])}


# ----------------------------------------------------------------------------------------------------------------------
# tokens
# ----------------------------------------------------------------------------------------------------------------------
def response_token_ids(tokenizer, texts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """The sampled responses' tokens re-encoded from their text: ``tokens + [EOS]`` cut at ``max_new_tokens`` (a
    generation shorter than the cap ended with EOS)."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append((ids + [tokenizer.eos_token_id])[:max_new_tokens])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# forward passes
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def response_hidden(model, prompt_ids: Tensor, prompt_mask: Tensor, responses: Sequence[Tensor],
                    response_masks: Sequence[Tensor]) -> list[Tensor]:
    """The final hidden states that predict each response token, the prompt run once for all response sets.

    Args:
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts (``collate_prompts``).
        responses: each ``[B, R_k]`` right-padded response token ids, one tensor per response set (seed).
        response_masks: each ``[B, R_k]`` bool, True on real response tokens.
    Returns one ``[B, R_k, H]`` per set: row ``t`` is the hidden state after ``prompt + response[:t]``, the one
    whose head gives the distribution of response token ``t``.
    """
    mask = prompt_mask.long()
    h_prompt, past = hidden_states(model, prompt_ids, mask, use_cache=True)
    last = h_prompt[:, -1:]                                      # [B, 1, H] (left padding: the prompt's last token)
    start = mask.sum(-1, keepdim=True)                           # [B, 1] position of the first response token
    out = []
    for ids, rmask in zip(responses, response_masks):
        if ids.shape[1] <= 1:                                    # one token: predicted by the prompt alone
            out.append(last[:, :ids.shape[1]])
            continue
        ids, rmask = ids[:, :-1], rmask[:, :-1].long()           # the last token predicts nothing we score
        pos = start + torch.arange(ids.shape[1], device=ids.device)
        h = hidden_states(model, ids, torch.cat([mask, rmask], 1), position_ids=pos,
                          past_key_values=copy.deepcopy(past), use_cache=True)[0]
        out.append(torch.cat([last, h], 1))
    return out


def _batches(examples, responses: Sequence[Sequence[Sequence[int]]], batch_size: int, pad_id: int, device):
    """Batches of ``(indices, prompt_ids, prompt_mask, [response_ids per set], [response_mask per set])`` on
    ``device``; ``responses[k][i]``: the token ids of set ``k``'s response to example ``i``; ``indices``: the examples
    of the batch. Examples go in order of prompt length: padding prompts to the longest of a batch then costs
    little."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        prompts = collate_prompts([examples[i] for i in idx], pad_id)
        ids = [pad_right([r[i] for i in idx], pad_id).to(device) for r in responses]
        masks = [pad_right([[1] * len(r[i]) for i in idx], 0, dtype=torch.bool).to(device) for r in responses]
        yield idx, prompts["input_ids"].to(device), prompts["attention_mask"].to(device), ids, masks


class StepKL(NamedTuple):
    """What :func:`kl_by_step` sums over a set of responses."""

    sums: Tensor            # [steps] float64: KL(p_t || q_t) summed over the responses still generating at step t
    counts: Tensor          # [steps] int64: those responses
    reverse_sums: Tensor    # [n_examples] float64: KL(q_t || p_t) summed over an example's responses and steps
    tokens: Tensor          # [n_examples] int64: the tokens of those responses


@torch.no_grad()
def kl_by_step(teacher, student, examples, responses: Sequence[Sequence[Sequence[int]]], *, steps: int,
               pad_id: int, vocab_size: Optional[int] = None, batch_size: int = 32,
               backend: str = "auto") -> StepKL:
    """``KL(p_t || q_t)`` per generation step summed over the given responses, and their count per step
    (``sum_by_step``), with the prefixes ``prompt_i + responses[k][i][:t]``; and, from the same forward passes, the
    reverse ``KL(q_t || p_t)`` summed per example (MiniLLM's objective on these responses: on the student's own
    samples, ``reverse_sums / tokens`` is an example's token-mean reverse KL).

    ``responses[k][i]`` is set ``k``'s (a seed's) token ids for ``examples[i]``, at most ``steps`` long. Computed by
    :func:`minillm_fast.fused_divergence` (``reduction="none"``) from both models' hidden states and heads, without
    the ``[tokens, V]`` logits."""
    device = next(student.parameters()).device
    s_head, t_head = head_of(student), head_of(teacher)
    out = StepKL(torch.zeros(steps, dtype=torch.float64), torch.zeros(steps, dtype=torch.long),
                 torch.zeros(len(examples), dtype=torch.float64), torch.zeros(len(examples), dtype=torch.long))
    heads = dict(vocab_size=vocab_size, backend=backend, **s_head.options("student"), **t_head.options("teacher"))
    for idx, prompt_ids, prompt_mask, ids, masks in _batches(examples, responses, batch_size, pad_id, device):
        hs = response_hidden(student, prompt_ids, prompt_mask, ids, masks)
        ht = response_hidden(teacher, prompt_ids, prompt_mask, ids, masks)
        rows = torch.tensor(idx)
        for h_s, h_t, m in zip(hs, ht, masks):
            w_s, w_t, h_t = s_head.weight, t_head.weight.to(h_s.dtype), h_t.to(h_s.dtype)
            forward = fused_divergence(h_s, w_s, h_t, w_t, divergence="forward_kl", reduction="none", mask=m, **heads)
            reverse = fused_divergence(h_s, w_s, h_t, w_t, divergence="reverse_kl", reduction="none", mask=m, **heads)
            s, c = sum_by_step(forward, m, steps)
            out.sums.add_(s)
            out.counts.add_(c)
            out.reverse_sums.index_add_(0, rows, (reverse.double().cpu() * m.cpu()).sum(-1))
            out.tokens.index_add_(0, rows, m.cpu().sum(-1))
    return out


@torch.no_grad()
def next_token_calibration(model, examples, *, pad_id: int, vocab_size: Optional[int] = None, batch_size: int = 32,
                           n_bins: int = 10) -> dict:
    """``expected_calibration_error`` of ``model``'s next-token predictions teacher-forced on each example's
    ``response_ids`` (its first reference and EOS): the largest probability and its token, from the logits of
    ``CHUNK`` tokens at a time (``minillm_fast.token_topk`` gives the same by a sort, 10x slower at k = 1)."""
    device = next(model.parameters()).device
    head = head_of(model)
    confidence, correct = [], []
    refs = [[e.response_ids for e in examples]]
    for _, prompt_ids, prompt_mask, ids, masks in _batches(examples, refs, batch_size, pad_id, device):
        h = response_hidden(model, prompt_ids, prompt_mask, ids, masks)[0][masks[0]]      # [n, H]
        target = ids[0][masks[0]]                                                          # [n]
        for start in range(0, h.shape[0], CHUNK):
            z = logits(h[start:start + CHUNK], head.weight, head.bias, vocab_size=vocab_size, softcap=head.softcap,
                       logit_scale=head.logit_scale)                                       # [chunk, V]
            top, arg = z.max(-1)
            confidence.append((top - z.logsumexp(-1)).exp().float().cpu())
            correct.append((arg == target[start:start + CHUNK]).cpu())
    return expected_calibration_error(torch.cat(confidence), torch.cat(correct), n_bins)


# ----------------------------------------------------------------------------------------------------------------------
# everything for one evaluated model
# ----------------------------------------------------------------------------------------------------------------------
def measure(model, tokenizer, examples, predictions: dict, *, max_new_tokens: int, teacher=None,
            teacher_predictions: Optional[dict] = None, batch_size: int = 32, backend: str = "auto",
            min_fraction: float = 0.1) -> dict:
    """The measurements of one evaluated model, for its ``results.json``.

    Args:
        examples: the evaluation's ``TokenizedExample`` s (prompts; ``response_ids`` for calibration).
        predictions: ``{seed: [response text per example]}``, the model's evaluation samples.
        teacher, teacher_predictions: the teacher and its evaluation samples on the same examples (same layout):
            with both, the exposure bias of ``model`` as a student of ``teacher``.
    Returns ``{"per_seed": {seed: {"length", "distinct4"}}, "calibration": {...}}`` and, with a teacher,
    ``"exposure_bias"`` (the ExAccErr curve), ``"exaccerr"`` (``at_lengths``), ``"rev_kl"`` (the token-mean
    ``KL(q || p)`` over every seed's samples, MiniLLM's objective measured on the test set) and
    ``"rev_kl_per_example"`` (each example's token mean over its seeds' samples, for paired tests).
    """
    from .heads import real_vocab_size

    pad_id = tokenizer.pad_token_id
    vocab = real_vocab_size(tokenizer, model, teacher)
    tokens = {seed: response_token_ids(tokenizer, texts, max_new_tokens) for seed, texts in predictions.items()}
    per_seed = {seed: {"length": sum(len(t) - (t[-1] == tokenizer.eos_token_id) for t in ids) / len(ids),
                       "distinct4": distinct_n(predictions[seed], 4)} for seed, ids in tokens.items()}
    was_training = model.training
    model.eval()
    try:
        out = {"per_seed": per_seed,
               "calibration": next_token_calibration(model, examples, pad_id=pad_id, vocab_size=vocab,
                                                     batch_size=batch_size)}
        if teacher is not None:
            teacher.eval()
            oracle = [response_token_ids(tokenizer, texts, max_new_tokens) for texts in teacher_predictions.values()]
            kw = dict(steps=max_new_tokens, pad_id=pad_id, vocab_size=vocab, batch_size=batch_size, backend=backend)
            s = kl_by_step(teacher, model, examples, list(tokens.values()), **kw)
            o = kl_by_step(teacher, model, examples, oracle, **kw)
            curve = exposure_bias(s.sums, s.counts, o.sums, o.counts, min_fraction=min_fraction)
            per_example = (s.reverse_sums / s.tokens.clamp(min=1)).tolist()
            out.update(exposure_bias=curve, exaccerr=at_lengths(curve),
                       rev_kl=float(s.reverse_sums.sum() / s.tokens.sum().clamp(min=1)),
                       rev_kl_per_example=per_example)
    finally:
        model.train(was_training)
    return out
