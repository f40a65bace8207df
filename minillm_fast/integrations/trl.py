"""Fused losses for TRL's distillation trainers: the same losses as TRL's own, without their logits.

    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from minillm_fast.integrations.trl import use_fused_losses

    trainer = GKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(...), train_dataset=ds,
                         processing_class=tokenizer)
    use_fused_losses(trainer)         # one call, after construction; returns the trainer
    trainer.train()

:func:`use_fused_losses` replaces, on that trainer instance only, the method of TRL's that computes the divergence on
``[batch, length, vocab]`` logits (or, in ``DistillationTrainer``, on TRL's own chunked logits) with one that runs
both models up to their final hidden states and computes the same numbers with :func:`minillm_fast.fused_divergence`
and :func:`minillm_fast.token_logprobs`. Everything else stays TRL's: on-policy generation (``lmbda``), ``seq_kd``,
GRPO's rollouts and rewards, logging, checkpoints. What each trainer gets:

| TRL trainer | replaced | computed by |
| --- | --- | --- |
| ``trl.experimental.gkd.GKDTrainer`` | ``compute_loss`` (``generalized_jsd_loss`` on both models' logits) | ``fused_divergence(divergence="jsd", beta=beta)`` |
| ``trl.DistillationTrainer`` | ``_compute_loss`` (TRL's chunked generalized JSD and entropy) | ``fused_divergence`` + ``token_logprobs(return_entropy=True)`` for the logged entropy |
| ``trl.experimental.minillm.MiniLLMTrainer`` (TRL <= 1.14) | ``compute_loss``'s teacher and student logits: the teacher log-probs and the reverse-KL advantage (``rkl_advantage``), the single-step reverse KL (``single_step_decomposition``) | ``token_logprobs``, ``fused_divergence(divergence="reverse_kl")``; GRPO's own loss (``_compute_loss``) stays TRL's |

**Conventions kept** (checked against TRL's functions in float64 by tests/test_trl.py): TRL's ``beta`` is the weight
of the teacher in the mixture ``m = beta p + (1 - beta) q`` and the loss ``beta KL(p || m) + (1 - beta) KL(q || m)``,
with ``beta = 0`` the forward ``KL(p || q)`` and ``beta = 1`` the reverse ``KL(q || p)``: exactly
``fused_divergence``'s ``jsd``, so ``beta`` passes through unchanged. ``GKDTrainer.compute_loss`` applies no
temperature to the divergence (its ``temperature`` is the sampling temperature); ``DistillationTrainer`` divides both
models' logits by its ``temperature``; MiniLLM by ``kd_temperature``. Loss tokens are those whose shifted label is not
-100 (GKD: prompt and padding masked by the collator), the completion mask (``DistillationTrainer``, times
``tool_mask``), or every completion position (MiniLLM: TRL masks ``labels`` but reads ``input_ids``, so completion
padding counts; kept as TRL does it). The models run as TRL runs them: ``model(input_ids, attention_mask)``, no
position ids of ours, under the trainer's mixed precision where TRL's call runs under it (``bf16=True``: GKD and
MiniLLM call the models' prepared forwards, which accelerate wraps in autocast; ``DistillationTrainer`` calls the
base model directly, outside it).

**Normalisation**: with ``num_items_in_batch`` (the trainer's count of loss tokens over the gradient-accumulation
window, and over the ranks under ``average_tokens_across_devices``) a loss is ``sum / num_items_in_batch``, as TRL
does since its PR 6006 (issues 4719, 6006); without it, TRL's ``batchmean`` (the token mean of the micro-batch). Under
data parallelism the GKD loss is also multiplied by the number of processes, as ``transformers.Trainer.compute_loss``
and TRL's ``SFTTrainer`` / ``DistillationTrainer`` do (DDP averages gradients over ranks, and the denominator already
counts every rank's tokens); TRL's ``GKDTrainer`` (<= 1.16) leaves that factor out, so under DDP its gradient is
``1 / world_size`` of the global token mean's. On one process the two are equal. ``DistillationTrainer``'s own
``compute_loss`` (which scales ``num_items_in_batch``) and MiniLLM's GRPO loss are TRL's and unchanged.

**Heads** come from :func:`minillm_fast.distill.heads.head_of` through the shared code path of
:mod:`minillm_fast.distill.hf` (weight, bias, logit scale, softcap of each model, checked at ``use_fused_losses`` by a
probe against ``model(...).logits``); the real vocabulary is ``len(processing_class)`` (its tokenizer's), and head
rows beyond it (padding to a multiple of 64 or 128) are excluded from every softmax. TRL's own losses include those
rows: on a padded head, TRL's loss on ``logits[..., :len(tokenizer)]`` is what the fused loss equals (pass
``vocab_size=`` the head's row count to include them instead).

Supported TRL: 1.14.2 to 1.16.0 (the version pip resolves at the time of writing); the tests ran against both.
``MiniLLMTrainer`` was removed from TRL in 1.15.0. Not covered: ``GOLDTrainer`` (cross-tokenizer),
``ServerDistillationTrainer`` (teacher log-probs from a server), the self-distillation trainers, and multimodal
inputs (``DistillationTrainer`` batches with pixel values fall back to TRL's own loss, with a warning).
"""
from __future__ import annotations

import re
import types
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..distill.data import IGNORE_INDEX
from ..distill.heads import Head, head_of
from ..distill.hf import check_models, final_hidden, forward_context, model_heads, token_denominator
from ..ops.fused_divergence import fused_divergence
from ..ops.token_logprobs import token_logprobs

MIN_TRL = "1.14.2"
TESTED_TRL = ("1.14.2", "1.16.0")
REDUCTIONS = ("batchmean", "sum", "mean")
_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
               "token_type_ids", "mm_token_type_ids", "image_position_ids")


# ----------------------------------------------------------------------------------------------------------------------
# the loss functions
# ----------------------------------------------------------------------------------------------------------------------
def as_head(head) -> Head:
    """A :class:`~minillm_fast.distill.heads.Head` from a Head, a causal LM (its complete description: bias, logit
    scale, softcap), an ``nn.Linear`` or a bare ``[V, H]`` weight."""
    if isinstance(head, Head):
        return head
    if isinstance(head, Tensor):
        return Head(head)
    if hasattr(head, "get_output_embeddings"):
        return head_of(head)
    if isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), Tensor):
        return Head(head.weight, getattr(head, "bias", None))
    raise TypeError(f"expected a Head, a causal LM, an nn.Linear or a weight tensor, got {type(head).__name__}")


def generalized_jsd_loss(student_hidden: Tensor, student_head, teacher_hidden: Tensor, teacher_head,
                         labels: Optional[Tensor] = None, beta: float = 0.5, temperature: float = 1.0,
                         reduction: str = "batchmean", num_items_in_batch=None, *, vocab_size: Optional[int] = None,
                         backend: str = "auto") -> Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss`` from hidden states and heads instead of logits.

    ``generalized_jsd_loss(h_s, student, h_t, teacher, labels, beta, temperature, reduction, num_items_in_batch)``
    equals TRL's ``GKDTrainer.generalized_jsd_loss(h_s @ W_s.T ..., h_t @ W_t.T ..., labels, ...)`` (the models'
    logits: bias, logit scale and softcap included; columns ``[:vocab_size]``), its gradients too.

    Args:
        student_hidden, teacher_hidden: ``[..., Hs]``, ``[..., Ht]`` hidden states aligned with ``labels`` (already
            shifted: position ``i`` predicts label ``i``).
        student_head, teacher_head: a :class:`~minillm_fast.distill.heads.Head`, a causal LM, an ``nn.Linear`` or a
            weight (see :func:`as_head`).
        labels: ``[...]``; positions equal to -100 are left out (TRL's mask of prompt and padding tokens).
        beta: TRL's: weight of the teacher in the mixture; 0 = forward KL(p || q), 1 = reverse KL(q || p).
        temperature: divides both models' logits (after softcap).
        reduction: TRL's: ``batchmean`` (sum over kept tokens / their count, at least 1; without labels, / the size
            of the first dimension), ``sum``, ``mean`` (torch's mean over TRL's ``[tokens, vocab]`` entries: the sum
            / (tokens x vocab)). TRL's ``none`` returns those per-vocabulary entries, which this loss never makes:
            it raises.
        num_items_in_batch: when given, the loss is ``sum / num_items_in_batch`` whatever ``reduction`` says.
        vocab_size: the real vocabulary (head rows at or beyond it excluded); default: the heads' row count.
        backend: of :func:`minillm_fast.fused_divergence`.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: the fused loss supports {REDUCTIONS} (TRL's 'none' returns a "
                         f"[tokens, vocab] tensor, which it never makes)")
    s, t = as_head(student_head), as_head(teacher_head)
    total = fused_divergence(student_hidden, s.weight, teacher_hidden, t.weight, divergence="jsd", beta=float(beta),
                             temperature=temperature, labels=labels, ignore_index=IGNORE_INDEX, reduction="sum",
                             vocab_size=vocab_size, backend=backend, **s.options("student"), **t.options("teacher"))
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    lead = student_hidden.shape[:-1]
    if reduction == "batchmean":
        if labels is not None:
            return total / (labels != IGNORE_INDEX).sum().clamp(min=1)
        return total / max(lead[0] if len(lead) else 1, 1)
    kept = (labels != IGNORE_INDEX).sum() if labels is not None else lead.numel()
    return total / (kept * (vocab_size or s.weight.shape[0]))          # 0 / 0 = nan on no token, as torch's mean


def _heads_for(model, teacher, hs: Tensor, ht: Tensor, opts: "FusedOptions") -> tuple[Head, Head, int]:
    return model_heads(model, teacher, vocab_size=opts.vocab_size, student_dtype=hs.dtype, teacher_dtype=ht.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# the trainers' methods
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedOptions:
    vocab_size: int          # the real vocabulary (head rows at or beyond it excluded from every softmax)
    backend: str = "auto"    # of the fused ops
    log_entropy: bool = True  # DistillationTrainer: compute the student entropy it logs (one more student pass)


def data_parallel_factor(trainer, num_items_in_batch) -> int:
    """What ``transformers.Trainer.compute_loss`` multiplies a ``num_items_in_batch``-normalised loss by: the number
    of processes (over the tensor-parallel size) when the count spans the ranks (``average_tokens_across_devices``),
    so that DDP's averaging of the gradients gives the gradient of the global token mean; else 1."""
    args = trainer.args
    if num_items_in_batch is None or not getattr(args, "average_tokens_across_devices", False):
        return 1
    if getattr(args, "n_gpu", 1) > 1:
        return args.n_gpu
    tp = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
    return max(trainer.accelerator.num_processes // max(tp, 1), 1)


def _gkd_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """``GKDTrainer.compute_loss`` without logits: TRL's generalized JSD (its ``beta``, no temperature, tokens whose
    shifted label is not -100, ``sum / num_items_in_batch`` or the micro-batch's token mean) on both models' final
    hidden states."""
    opts = self._minillm_fast
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    self.teacher_model.eval()
    with forward_context(self):      # TRL calls model(...), whose prepared forward runs under the mixed precision
        hs = final_hidden(model, ids, mask, position_ids=None)[:, :-1]
        with torch.no_grad():
            ht = final_hidden(self.teacher_model, ids, mask, position_ids=None)[:, :-1]
    s_head, t_head, vocab = _heads_for(model, self.teacher_model, hs, ht, opts)
    loss = generalized_jsd_loss(hs, s_head, ht, t_head, labels=inputs["labels"][:, 1:], beta=self.beta,
                                num_items_in_batch=num_items_in_batch, vocab_size=vocab, backend=opts.backend)
    loss = loss * data_parallel_factor(self, num_items_in_batch)
    return (loss, {"loss": loss}) if return_outputs else loss


def _distillation_compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
    """``DistillationTrainer._compute_loss`` with the fused ops: ``(loss, entropy_sum, n_valid)`` as TRL's, from the
    student's and teacher's final hidden states at the completion positions."""
    opts = self._minillm_fast
    if any(k in inputs for k in _MULTIMODAL):
        if not getattr(self, "_minillm_fast_warned", False):
            warnings.warn("minillm-fast: multimodal inputs: this batch uses TRL's own DistillationTrainer loss",
                          stacklevel=2)
            self._minillm_fast_warned = True
        return type(self)._compute_loss(self, unwrapped_student, inputs, num_items_in_batch)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    loss_mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        loss_mask = loss_mask * inputs["tool_mask"]
    loss_mask = loss_mask != 0
    k = inputs["completion_ids"].size(1)

    hs = final_hidden(unwrapped_student, input_ids, attention_mask, position_ids=None)[:, -k - 1:-1]
    self.teacher_model.eval()
    unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
    with torch.no_grad():
        # through the teacher's wrapper, as TRL does, so FSDP / DeepSpeed gather its parameters first
        ht = self._forward_redirection(self.teacher_model, unwrapped_teacher, final_hidden, unwrapped_teacher,
                                       input_ids, attention_mask, position_ids=None)[:, -k - 1:-1]
    s_head, t_head, vocab = _heads_for(unwrapped_student, unwrapped_teacher, hs, ht, opts)
    ht = ht.to(hs.device)
    loss_mask = loss_mask.to(hs.device)
    n_valid = loss_mask.sum()
    total = fused_divergence(hs, s_head.weight, ht, t_head.weight, divergence="jsd", beta=float(self.beta),
                             temperature=self.temperature, mask=loss_mask, reduction="sum", vocab_size=vocab,
                             backend=opts.backend, **s_head.options("student"), **t_head.options("teacher"))
    loss = total / token_denominator(n_valid, num_items_in_batch)
    entropy_sum = torch.zeros((), device=hs.device)
    if opts.log_entropy:
        with torch.no_grad():
            targets = inputs["completion_ids"].to(hs.device).masked_fill(~loss_mask, IGNORE_INDEX)
            _, ent = token_logprobs(hs.detach(), s_head.weight.detach(), targets, temperature=self.temperature,
                                    vocab_size=vocab, return_entropy=True, backend=opts.backend,
                                    **s_head.detached().options())
            entropy_sum = (ent * loss_mask).sum()
    return loss, entropy_sum, n_valid


def _minillm_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """``MiniLLMTrainer.compute_loss`` (TRL <= 1.14) without its two ``[B, C, V]`` logits: the teacher's and
    student's log-probs of the completion tokens (``token_logprobs``, temperature ``kd_temperature``) for the
    reverse-KL advantage, GRPO's loss (TRL's ``_compute_loss``), and the single-step reverse KL
    (``fused_divergence``), each as TRL computes them."""
    opts = self._minillm_fast
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    p = inputs["prompt_ids"].shape[1]
    self.teacher_model.eval()
    with forward_context(self):      # as TRL's model(...) calls
        hs = final_hidden(model, input_ids, attention_mask, position_ids=None)[:, p - 1:-1]
        with torch.no_grad():
            ht = final_hidden(self.teacher_model, input_ids, attention_mask, position_ids=None)[:, p - 1:-1]
    s_head, t_head, vocab = _heads_for(model, self.teacher_model, hs, ht, opts)
    labels = input_ids[:, p:]
    mask = labels != IGNORE_INDEX        # as TRL: every completion position (padding included)
    kw = dict(temperature=self.kd_temperature, vocab_size=vocab, backend=opts.backend)

    if self.rkl_advantage:
        s_lp = token_logprobs(hs, s_head.weight, labels, **kw, **s_head.options())
        with torch.no_grad():
            t_lp = token_logprobs(ht, t_head.weight, labels, **kw, **t_head.options())
        advantage = self._compute_advantage(student_log_probs_on_labels=s_lp.to(hs.dtype),
                                            teacher_log_probs_on_labels=t_lp.to(hs.dtype), mask=mask)
        inputs["advantages"] = inputs["advantages"].unsqueeze(1) + advantage

    loss = self._compute_loss(model, inputs)
    if self.single_step_decomposition:
        reg = fused_divergence(hs, s_head.weight, ht, t_head.weight, divergence="reverse_kl", mask=mask,
                               reduction="sum", **kw, **s_head.options("student"), **t_head.options("teacher"))
        loss = loss + reg / mask.sum()
    return (loss, {"loss": loss}) if return_outputs else loss


# ----------------------------------------------------------------------------------------------------------------------
# the one call
# ----------------------------------------------------------------------------------------------------------------------
# TRL class name -> (the method replaced, the fused one)
_TRAINERS = {
    "GKDTrainer": ("compute_loss", _gkd_compute_loss),
    "DistillationTrainer": ("_compute_loss", _distillation_compute_loss),
    "MiniLLMTrainer": ("compute_loss", _minillm_compute_loss),
}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _trl_class(trainer):
    """The TRL trainer class ``trainer`` is an instance of (looked up in its MRO, so a subclass works), or raise."""
    for cls in type(trainer).__mro__:
        if cls.__name__ in _TRAINERS and cls.__module__.split(".")[0] == "trl":
            return cls
    raise TypeError(f"use_fused_losses: {type(trainer).__name__} is not a TRL distillation trainer (expected an "
                    f"instance of {', '.join(_TRAINERS)} or a subclass)")


def _tokenizer(trainer):
    pc = getattr(trainer, "processing_class", None)
    pc = getattr(pc, "tokenizer", pc)
    return pc if pc is not None and hasattr(pc, "__len__") else None


def use_fused_losses(trainer, *, vocab_size: Optional[int] = None, backend: str = "auto", probe: bool = True,
                     log_entropy: bool = True):
    """Make a TRL distillation trainer compute its losses with minillm-fast's fused ops; returns the trainer.

    Call it once, after constructing the trainer and before ``train()``. It replaces one method on that instance
    (the module docstring has the table) and changes nothing else.

    Args:
        trainer: a ``GKDTrainer``, ``DistillationTrainer`` or ``MiniLLMTrainer`` (or a subclass that does not
            override the replaced method: one that does is refused, since its override would be bypassed).
        vocab_size: the real vocabulary; default ``len(trainer.processing_class)`` (its tokenizer's), else the
            smaller head's row count. Head rows at or beyond it are excluded from every softmax.
        backend: of the fused ops (``auto``: triton on CUDA, native on CPU).
        probe: check both models' logits against the fused path first
            (:func:`minillm_fast.distill.heads.probe`; raises ``HeadMismatchError``).
        log_entropy: ``DistillationTrainer`` logs the student's mean entropy; computing it costs one more pass over
            the student's head (forward only). False logs 0 instead.
    """
    import trl

    if _version_tuple(trl.__version__) < _version_tuple(MIN_TRL):
        raise RuntimeError(f"minillm-fast's TRL integration needs trl>={MIN_TRL} (found {trl.__version__}); "
                           f"pip install 'minillm-fast[trl]'")
    base = _trl_class(trainer)
    name, fused = _TRAINERS[base.__name__]
    if getattr(type(trainer), name) is not getattr(base, name):
        raise TypeError(f"use_fused_losses: {type(trainer).__name__} overrides {base.__name__}.{name}, which the "
                        f"fused loss replaces; call minillm_fast.integrations.trl's loss functions from your override "
                        f"instead")
    student, teacher = trainer.model, trainer.teacher_model
    _, _, vocab = model_heads(student, teacher, vocab_size=vocab_size, tokenizer=_tokenizer(trainer))
    if probe:
        check_models(student, teacher, vocab, backend=backend)
    trainer._minillm_fast = FusedOptions(vocab_size=vocab, backend=backend, log_entropy=log_entropy)
    setattr(trainer, name, types.MethodType(fused, trainer))
    return trainer


__all__ = ["FusedOptions", "MIN_TRL", "TESTED_TRL", "as_head", "data_parallel_factor", "generalized_jsd_loss",
           "use_fused_losses"]
