"""Fused distillation for Hugging Face users: a loss function on (student, teacher, batch) and a ``Trainer`` mixin.

    from transformers import Trainer
    from minillm_fast.distill.hf import DistillationTrainerMixin

    class DistillationTrainer(DistillationTrainerMixin, Trainer):
        pass

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                                  distill_kwargs=dict(divergence="reverse_kl", kd_ratio=0.5))
    trainer.train()

Neither the student's nor the teacher's ``[B, T, V]`` logits are made: both models run up to their final hidden states
and the loss is computed by :func:`minillm_fast.token_logprobs` and :func:`minillm_fast.fused_divergence` from the
hidden states and the lm_head weights.

:func:`final_hidden`, :func:`model_heads`, :func:`check_models`, :func:`forward_context` and
:func:`token_denominator` are the one code path from a model and a batch to the fused ops' inputs; the TRL glue
(:mod:`minillm_fast.integrations.trl`) uses them too.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .data import IGNORE_INDEX, positions_from_mask
from .heads import Head, head_of, probe, real_vocab_size
from .losses import LossOptions, divergence_sum, logprobs
from .models import decoder, unwrap


# ----------------------------------------------------------------------------------------------------------------------
# the one code path from (model, batch) to what the fused ops take: shared with minillm_fast.integrations.trl
# ----------------------------------------------------------------------------------------------------------------------
POSITIONS_FROM_MASK = "mask"


def final_hidden(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                 position_ids=POSITIONS_FROM_MASK) -> Tensor:
    """Final (normed) hidden states ``[B, T, H]`` of a causal LM, never its ``[B, T, V]`` logits.

    A bare causal LM runs its base model (no head). A wrapped one (DDP, FSDP, accelerate: anything with ``.module``)
    is called through its wrapper, so gradient synchronisation and sharding hooks run, with
    ``output_hidden_states=True`` and ``logits_to_keep=1`` (logits of the last position only: ``[B, 1, V]``).

    ``position_ids``: ``"mask"`` (default) gives ``cumsum(attention_mask) - 1``, so left-padded rows get the positions
    of unpadded ones; ``None`` lets the model choose (what ``model(input_ids, attention_mask)`` does: TRL's trainers
    call their models that way, and the TRL glue mirrors them); or a tensor.
    """
    if isinstance(position_ids, str):
        if position_ids != POSITIONS_FROM_MASK:
            raise ValueError(f"position_ids={position_ids!r}: expected 'mask', None or a tensor")
        position_ids = positions_from_mask(attention_mask) if attention_mask is not None else None
    if unwrap(model) is model:
        return decoder(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, return_dict=True).last_hidden_state
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, logits_to_keep=1, use_cache=False, return_dict=True)
    return out.hidden_states[-1]


def model_heads(student, teacher, *, vocab_size: Optional[int] = None, tokenizer=None,
                student_dtype: Optional[torch.dtype] = None,
                teacher_dtype: Optional[torch.dtype] = None) -> tuple[Head, Head, int]:
    """Both models' complete head descriptions (weight, bias, logit scale, softcap: :func:`heads.head_of`), each cast
    to the dtype of its hidden states when given (a differentiable cast), and the real vocabulary: ``vocab_size``,
    else :func:`heads.real_vocab_size` (``len(tokenizer)``, else the smaller head's row count). Head rows at or
    beyond it are excluded from every softmax."""
    if vocab_size is None:
        vocab_size = real_vocab_size(tokenizer, student, teacher)
    return head_of(student, student_dtype), head_of(teacher, teacher_dtype), vocab_size


@contextlib.contextmanager
def class_forward(model):
    """Run ``model``'s class ``forward`` for the duration: an instance-level wrapper (accelerate's mixed-precision
    wrapper, which runs the forward under autocast and converts the outputs to fp32) is set aside and put back.
    The probe checks what a model does to its logits; autocast's rounding is not that."""
    m = unwrap(model)
    saved = m.__dict__.pop("forward", None)
    try:
        yield m
    finally:
        if saved is not None:
            m.forward = saved


def check_models(student, teacher, vocab_size: int, *, backend: str = "auto") -> None:
    """The load-time probe of both models (:func:`heads.probe`, on their class forward: :func:`class_forward`): a
    model whose logits the fused path would not reproduce raises
    :class:`~minillm_fast.distill.heads.HeadMismatchError` before any training."""
    for model, what in ((student, "student"), (teacher, "teacher")):
        with class_forward(model) as m:
            probe(m, vocab_size, what=what, backend=backend)


def forward_context(trainer):
    """The mixed-precision context in which a trainer's prepared models run their forward: accelerate wraps a
    prepared model's ``forward`` in autocast when mixed precision is on (``bf16=True``), and :func:`final_hidden`
    calls the base model directly, outside that wrapper, so the callers enter it themselves. A null context without
    mixed precision or without an accelerator."""
    acc = getattr(trainer, "accelerator", None)
    if acc is None or not getattr(acc, "native_amp", False):
        return contextlib.nullcontext()
    return acc.autocast()


def token_denominator(tokens: Tensor, num_items_in_batch=None):
    """What a token sum is divided by: ``num_items_in_batch`` when the trainer passes it (its count of loss tokens
    over the gradient-accumulation window, and over the ranks with ``average_tokens_across_devices``), else this
    batch's own count (at least 1, so an empty batch gives 0, not nan)."""
    if num_items_in_batch is None:
        return tokens.clamp(min=1)
    if isinstance(num_items_in_batch, Tensor):
        return num_items_in_batch.to(tokens.device)
    return num_items_in_batch


def distillation_loss(student, teacher, batch: dict, *, divergence: str = "forward_kl", kd_ratio: float = 0.5,
                      temperature: float = 1.0, num_items_in_batch: Optional[int] = None, backend: str = "auto",
                      vocab_size: Optional[int] = None, tokenizer=None, return_terms: bool = False,
                      **divergence_kwargs):
    """``(1 - kd_ratio) CE(labels) + kd_ratio D(teacher, student)``, token mean, from two causal LMs and a batch.

    Args:
        student, teacher: Hugging Face causal LMs (the teacher runs under ``torch.no_grad``).
        batch: ``input_ids [B, T]``, optional ``attention_mask [B, T]`` and ``labels [B, T]`` aligned with the inputs
            as in Hugging Face (shifted here; ``-100`` positions are skipped). Without labels every attended
            position is a target.
        divergence: any of :data:`minillm_fast.DIVERGENCES` (``forward_kl``: the classic KD, whose gradient equals
            that of the soft cross-entropy; ``reverse_kl``: MiniLLM's divergence at the word level; ``jsd``, ...).
        kd_ratio: weight of the divergence; 1.0 drops the cross-entropy.
        temperature: divides both models' logits in the divergence (not in the cross-entropy).
        num_items_in_batch: divide the sums by this (the Trainer's count over gradient-accumulation steps) instead
            of the batch's own token count.
        vocab_size: the real vocabulary; head rows at or beyond it are excluded from every softmax. Default: the
            rule of :func:`minillm_fast.distill.heads.real_vocab_size`: ``len(tokenizer)`` when ``tokenizer`` is
            given (the same rule as ``minillm-fast distill``), else the smaller head's row count.
        tokenizer: the tokenizer of both models (for the real vocabulary).
        divergence_kwargs: ``beta``, ``skew`` of :func:`minillm_fast.fused_divergence`.

    Returns:
        the scalar loss, or ``(loss, {"ce": ..., "divergence": ..., "tokens": ...})`` with ``return_terms``.
    """
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels = labels[:, 1:]
    hs = final_hidden(student, input_ids, attention_mask)[:, :-1]
    with torch.no_grad():
        ht = final_hidden(teacher, input_ids, attention_mask)[:, :-1]
    s_head, t_head, vocab_size = model_heads(student, teacher, vocab_size=vocab_size, tokenizer=tokenizer)
    opts = LossOptions(vocab_size=vocab_size, backend=backend)
    ce = -logprobs(hs, s_head, labels, opts).sum()
    div = divergence_sum(hs, s_head, ht, t_head, opts, divergence=divergence, labels=labels,
                         temperature=temperature, **divergence_kwargs) if kd_ratio > 0 else torch.zeros_like(ce)
    tokens = (labels != IGNORE_INDEX).sum()
    denom = token_denominator(tokens, num_items_in_batch)
    loss = ((1 - kd_ratio) * ce + kd_ratio * div) / denom
    if return_terms:
        return loss, {"ce": ce.detach() / denom, "divergence": div.detach() / denom, "tokens": tokens}
    return loss


class DistillationTrainerMixin:
    """Put before ``transformers.Trainer`` (or a subclass) in the bases: ``compute_loss`` becomes
    :func:`distillation_loss` against ``teacher_model`` (moved to the student's device on first use).

    Extra constructor arguments: ``teacher_model`` (required) and ``distill_kwargs`` (passed to
    :func:`distillation_loss`, e.g. ``dict(divergence="reverse_kl", kd_ratio=1.0, temperature=2.0)``). The real
    vocabulary is ``len(processing_class)`` when the Trainer has a tokenizer (the CLI's rule). Both models are probed
    at construction (:func:`minillm_fast.distill.heads.probe`): a model whose logits the fused path would not
    reproduce is refused with :class:`~minillm_fast.distill.heads.HeadMismatchError` before any training.
    """

    def __init__(self, *args, teacher_model=None, distill_kwargs: Optional[dict] = None, **kwargs):
        if teacher_model is None:
            raise TypeError(f"{type(self).__name__} needs teacher_model=<a causal LM>")
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model.eval().requires_grad_(False)
        self.distill_kwargs = dict(distill_kwargs or {})
        tokenizer = getattr(self, "processing_class", None)
        if tokenizer is not None and "vocab_size" not in self.distill_kwargs and hasattr(tokenizer, "__len__"):
            self.distill_kwargs["tokenizer"] = tokenizer
        vocab = self.distill_kwargs.get("vocab_size") or real_vocab_size(
            self.distill_kwargs.get("tokenizer"), self.model, self.teacher_model)
        check_models(self.model, self.teacher_model, vocab, backend=self.distill_kwargs.get("backend", "auto"))

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None, **kwargs):
        device = next(unwrap(model).parameters()).device
        if next(self.teacher_model.parameters()).device != device:
            self.teacher_model.to(device)
        with forward_context(self):
            loss, terms = distillation_loss(model, self.teacher_model, inputs, num_items_in_batch=num_items_in_batch,
                                            return_terms=True, **self.distill_kwargs)
        return (loss, terms) if return_outputs else loss
