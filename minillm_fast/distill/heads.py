"""Every Hugging Face causal LM's output layer as the fused ops see it, read from its config and checked by a probe.

The fused ops take final hidden states and a head instead of ``model(...).logits``, so the package must rebuild what
the model does after its last hidden state. Transformers' families differ there:

| family (``config.model_type``) | what the model does to ``z = lm_head(h)`` | our description |
| --- | --- | --- |
| cohere, cohere2, cohere2_moe, cohere_compass(_text) | ``z * config.logit_scale`` | ``logit_scale`` |
| granite, granitemoe, granitemoeshared, granitemoehybrid, granite_swa, granitemoe_swa | ``z / config.logits_scaling`` | ``logit_scale = 1 / logits_scaling`` |
| hyperclovax | ``z * config.logits_scaling`` | ``logit_scale = logits_scaling`` |
| falcon_h1 | ``z * config.lm_head_multiplier`` | ``logit_scale`` |
| minicpm3 | ``lm_head(h / config.logits_scaling)`` (hidden states scaled; no bias) | ``logit_scale = 1 / logits_scaling`` |
| inkling_text | ``lm_head(h / config.logits_mup_width_multiplier)`` (no bias) | ``logit_scale`` likewise |
| any with ``config.final_logit_softcapping`` (gemma2, gemma3_text, gemma4_text, vaultgemma, ...) | ``c tanh(x / c)`` after any scale | ``softcap`` |
| the rest (gpt2, llama, qwen2/3, mistral, gemma, phi, opt, gpt_neox, gptj, ...) | nothing | ``lm_head`` weight and bias |

A scale of the hidden states before a bias-free head is the same as a scale of its logits, and the gradient still
reaches every parameter through the head's weight and the hidden states.

Known or not, no family is trusted on its name: :func:`probe` runs one short sequence through ``model(...).logits``
and through the fused path with the description, with the decoder's output replaced by synthetic hidden states
large enough that logits spread over several nats (a randomly initialised model's are ~0.1, where a missing scale or
softcap would not show). A mismatch raises :class:`HeadMismatchError`, naming the class, the size of the difference
and what to do, before any training work is done.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from .models import ModelLoadError, decoder, unwrap

# model_type -> (config attribute, True when the model divides by it)
_LOGIT_SCALES = {
    **{t: ("logit_scale", False) for t in ("cohere", "cohere2", "cohere2_moe", "cohere_compass",
                                           "cohere_compass_text")},
    **{t: ("logits_scaling", True) for t in ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid",
                                             "granite_swa", "granitemoe_swa")},
    "hyperclovax": ("logits_scaling", False),
    "falcon_h1": ("lm_head_multiplier", False),
    # these two scale the hidden states before a bias-free head: the same as scaling its logits
    "minicpm3": ("logits_scaling", True),
    "inkling_text": ("logits_mup_width_multiplier", True),
}
# The families the package reads; the README lists them.
KNOWN_FAMILIES = tuple(sorted(_LOGIT_SCALES))


class HeadMismatchError(ModelLoadError):
    """The fused path does not reproduce the model's own logits (the message says by how much and what to do)."""


@dataclass(frozen=True)
class Head:
    """What the fused ops need from one model's output layer: ``softcap(logit_scale * (h W^T + b))``."""

    weight: torch.Tensor                 # [V_pad, H]
    bias: Optional[torch.Tensor] = None  # [V_pad] or None
    logit_scale: Optional[float] = None  # a multiplier on the logits (None: 1)
    softcap: Optional[float] = None      # Gemma-style final logit softcapping (None: none)

    def options(self, side: str = "") -> dict:
        """The keyword arguments of the fused ops for this head: ``bias``, ``softcap``, ``logit_scale``, prefixed
        with ``student_`` / ``teacher_`` for ``side``."""
        p = f"{side}_" if side else ""
        return {f"{p}bias": self.bias, f"{p}softcap": self.softcap, f"{p}logit_scale": self.logit_scale}

    def detached(self) -> "Head":
        return replace(self, weight=self.weight.detach(), bias=None if self.bias is None else self.bias.detach())


def lm_head(model) -> nn.Module:
    head = unwrap(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ModelLoadError(f"{type(unwrap(model)).__name__} has no linear output embedding (lm_head)")
    return head


def _positive(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelLoadError(f"{where} = {value!r}: expected a finite number > 0")
    return float(value)


def logit_transform(config) -> tuple[Optional[float], Optional[float]]:
    """``(logit_scale, softcap)`` of a model from its config (None where the model has none)."""
    scale = None
    rule = _LOGIT_SCALES.get(getattr(config, "model_type", None))
    if rule is not None:
        attr, divides = rule
        value = getattr(config, attr, None)
        if value is not None:
            value = _positive(value, f"config.{attr} of {config.model_type}")
            scale = None if value == 1.0 else (1.0 / value if divides else value)
    cap = getattr(config, "final_logit_softcapping", None)
    cap = _positive(cap, "config.final_logit_softcapping") if cap else None
    return scale, cap


def head_of(model, dtype: Optional[torch.dtype] = None) -> Head:
    """The model's output layer for the fused ops, its weight (and bias) cast to ``dtype`` when given (a
    differentiable cast: gradients reach the fp32 master weights)."""
    m = unwrap(model)
    head = lm_head(m)
    scale, cap = logit_transform(m.config)
    weight, bias = head.weight, getattr(head, "bias", None)
    if dtype is not None and weight.dtype != dtype:
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return Head(weight, bias, scale, cap)


def vocab_rows(model) -> int:
    return lm_head(model).weight.shape[0]


def real_vocab_size(tokenizer, student, teacher=None) -> int:
    """The real vocabulary, one rule for the CLI and the Hugging Face glue: ``len(tokenizer)`` when the tokenizer is
    known, checked against both heads (a head may be padded beyond it, never shorter); without one, the smaller
    head's row count. Head rows at or beyond it are excluded from every softmax."""
    models = [(what, m) for what, m in (("student", student), ("teacher", teacher)) if m is not None]
    if tokenizer is None:
        return min(vocab_rows(m) for _, m in models)
    n = len(tokenizer)
    for what, model in models:
        rows = vocab_rows(model)
        if rows < n:
            raise ModelLoadError(
                f"tokenizer/model vocabulary mismatch: the tokenizer has {n} tokens but the {what}'s lm_head has "
                f"{rows} rows; use the tokenizer the {what} was trained with (or resize its embeddings)")
    return n


# ----------------------------------------------------------------------------------------------------------------------
# the probe
# ----------------------------------------------------------------------------------------------------------------------
PROBE_TOKENS = 8
PROBE_LOGIT_STD = 8.0  # spread of the probe's logits (after the logit scale): a softcap of 30 bends them visibly


def _unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
            torch.bfloat16: 2.0 ** -8}.get(dtype, 2.0 ** -8)


@torch.no_grad()
def probe(model, vocab_size: int, *, what: str = "model", backend: str = "auto") -> float:
    """Check that the fused path reproduces ``model(...).logits``; returns the difference (nats) or raises
    :class:`HeadMismatchError`.

    The decoder's output is replaced (forward hook) by ``[1, PROBE_TOKENS, H]`` synthetic hidden states scaled so
    that the described logits spread ~PROBE_LOGIT_STD; the model's own forward then applies whatever it applies
    after its decoder. Compared per position, over the first ``vocab_size`` rows: the entropy and the log-probs of
    the model's most and least likely tokens, from :func:`minillm_fast.token_logprobs`. The tolerance is the
    rounding of the model's dtype at the logits' size.
    """
    from ..ops.token_logprobs import token_logprobs

    m = unwrap(model)
    head = head_of(m)
    w = head.weight
    dtype, device = w.dtype, w.device
    gen = torch.Generator().manual_seed(20261203)
    h = torch.randn(1, PROBE_TOKENS, w.shape[1], generator=gen, dtype=torch.float64)
    z = h[0] @ w[:vocab_size].double().T * (head.logit_scale or 1.0)
    h = (h * (PROBE_LOGIT_STD / z.std().clamp(min=1e-30))).to(device=device, dtype=dtype)
    ids = torch.randint(0, vocab_size, (1, PROBE_TOKENS), generator=gen).to(device)

    def swap(module, args, output):
        if isinstance(output, tuple):
            return (h, *output[1:])
        output.last_hidden_state = h
        return output

    was_training = m.training
    m.eval()
    handle = decoder(m).register_forward_hook(swap)
    try:
        logits = m(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    except Exception as e:  # noqa: BLE001 - any failure of the model's own forward is reported as a load problem
        raise ModelLoadError(f"the {what} ({type(m).__name__}) fails on a probe forward: {type(e).__name__}: {e}") \
            from e
    finally:
        handle.remove()
        m.train(was_training)
    ref = torch.log_softmax(logits[0, :, :vocab_size].double(), -1)              # [T, V]
    targets = torch.stack([ref.argmax(-1), ref.argmin(-1)])                       # [2, T]
    hid = h[0].expand(2, -1, -1)
    lp, ent = token_logprobs(hid, w, targets, vocab_size=vocab_size, return_entropy=True, backend=backend,
                             **head.options())
    ref_lp = ref.gather(-1, targets.T).T
    ref_ent = -(ref.exp() * ref).sum(-1)
    err = max((lp.double() - ref_lp).abs().max().item(), (ent[0].double() - ref_ent).abs().max().item())
    size = max(logits[0, :, :vocab_size].abs().max().item(), PROBE_LOGIT_STD)
    tol = 16 * _unit_roundoff(dtype) * size + 1e-6
    if not err <= tol:
        described = ", ".join(f"{k}={v}" for k, v in (("logit_scale", head.logit_scale), ("softcap", head.softcap))
                              if v is not None) or "none"
        raise HeadMismatchError(
            f"the {what} ({type(m).__name__}, model_type {getattr(m.config, 'model_type', '?')!r}) post-processes "
            f"its logits in a way minillm-fast does not reproduce: on a probe its log-probs from model(...).logits "
            f"and from the fused path differ by {err:.3g} nats (tolerance {tol:.2g}; the logit transforms read from "
            f"its config: {described}). Distilling it would train on wrong numbers, so it is refused. The families "
            f"minillm-fast knows are listed in README.md (Supported models); for another, report the model class "
            f"and what its forward does after the lm_head.")
    return err
