"""Models: load student, teacher and tokenizer from local paths, and run them up to the final hidden states.

Nothing here calls a model's lm_head: :func:`hidden_states` runs the base model (``model.get_decoder()``) and
returns the final (normed) hidden states; distill/heads.py describes the head for the fused ops.
:class:`HiddenStates` wraps a causal LM as an ``nn.Module`` whose forward returns hidden states, so DDP can wrap it
(its gradient hooks then see the head weight used by the fused loss after the forward).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import importlib.util
import os
from typing import Optional

import torch
from torch import nn

from .data import positions_from_mask

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ModelLoadError(ValueError):
    """A model, tokenizer or vocabulary problem the user can fix (the message says which path and how)."""


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device='cuda' but CUDA is not available; use device=cpu or device=auto")
    return torch.device(name)


def pick_attn_implementation(requested: str, device: torch.device) -> Optional[str]:
    """The ``attn_implementation`` to load with: None for ``auto`` (transformers picks what the model supports on
    this machine: sdpa where the family has it, eager otherwise, as for Gemma 2), else the one asked for."""
    if requested == "auto":
        return None
    if requested == "flash_attention_2" and (device.type != "cuda" or importlib.util.find_spec("flash_attn") is None):
        raise ModelLoadError("attn_implementation='flash_attention_2' needs CUDA and the flash_attn package "
                             "(pip install flash-attn); use auto or sdpa")
    return requested


def _check_dir(path: Optional[str], what: str) -> str:
    if not path:
        raise ModelLoadError(f"no path given for the {what}")
    if not os.path.exists(path):
        raise ModelLoadError(f"{what} path {path!r} does not exist (models load from local save_pretrained "
                             f"directories; nothing is downloaded)")
    return path


def load_tokenizer(path: str):
    """A tokenizer from a local directory; its pad token defaults to EOS (as in the reference for GPT-2)."""
    from transformers import AutoTokenizer

    _check_dir(path, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {e}") from None
    if tok.eos_token_id is None:
        raise ModelLoadError(f"the tokenizer at {path!r} has no eos_token; responses end with EOS, so set one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, *, dtype: str = "fp32", device: torch.device = torch.device("cpu"),
               attn_implementation: str = "auto", what: str = "student"):
    """A causal LM from a local directory, in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    _check_dir(path, what)
    attn = pick_attn_implementation(attn_implementation, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation=attn,
                                                     local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the {what} from {path!r}: {e}") from None
    return model.to(device)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off for good (the reference trains MiniLLM without dropout), whatever train()/eval() says."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "attn_dropout_p", "dropout_p"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# hidden states and heads
# ----------------------------------------------------------------------------------------------------------------------
def unwrap(model):
    """The model inside DDP / HiddenStates wrappers."""
    while True:
        if isinstance(model, HiddenStates):
            model = model.model
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def autocast(dtype: torch.dtype, device: torch.device):
    """bf16 autocast around a forward of fp32 (master) weights; nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def decoder(model) -> nn.Module:
    """The base model (transformer without the head) of a causal LM."""
    m = unwrap(model)
    dec = m.get_decoder() if hasattr(m, "get_decoder") else None
    if dec is None or dec is m:
        dec = getattr(m, getattr(m, "base_model_prefix", ""), None) or getattr(m, "model", None) \
            or getattr(m, "transformer", None)
    if dec is None:
        raise ModelLoadError(f"cannot find the base model of {type(m).__name__} (no get_decoder(), .model or "
                             f".transformer)")
    return dec


def hidden_states(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                  position_ids: Optional[torch.Tensor] = None, past_key_values=None, use_cache: bool = False):
    """Final hidden states ``[B, T, H]`` of a causal LM (and its cache when ``use_cache``), without its lm_head.

    Position ids default to ``cumsum(attention_mask) - 1`` so left-padded rows get the positions of unpadded ones.
    """
    if position_ids is None and attention_mask is not None:
        position_ids = positions_from_mask(attention_mask)
    dec = decoder(model)
    kw = {}
    if past_key_values is not None:
        kw[_cache_argument(type(dec))] = past_key_values
    out = dec(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
              return_dict=True, **kw)
    if use_cache:
        return out.last_hidden_state, out.past_key_values
    return out.last_hidden_state


@functools.lru_cache(maxsize=None)
def _cache_argument(cls) -> str:
    """The name a decoder's forward takes the KV cache by: ``cache`` (transformers >= 5.24, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (earlier)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


class HiddenStates(nn.Module):
    """A causal LM whose forward returns final hidden states (for DDP: the lm_head is used by the fused loss)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return hidden_states(self.model, input_ids, attention_mask, position_ids=position_ids)
