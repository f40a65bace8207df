"""minillm-fast: fused, memory-light distillation losses and a MiniLLM training script.

The ops take final hidden states and lm_head weights, never logits, and never allocate a tokens x vocabulary
tensor. See README.md for the API and DESIGN notes; minillm_fast/reference.py holds the plain PyTorch versions.
"""
from .backends import BACKENDS
from .divergences import DIVERGENCES
from .ops.fused_divergence import FusedDivergenceLoss, fused_divergence, fused_reverse_kl
from .ops.sampling import (MixtureSample, RolloutStatistics, TokenSample, mixture_sample, rollout_statistics,
                           sample_tokens)
from .ops.token_logprobs import token_logprobs

__version__ = "0.1.0"
__all__ = ["BACKENDS", "DIVERGENCES", "FusedDivergenceLoss", "fused_divergence", "fused_reverse_kl",
           "MixtureSample", "RolloutStatistics", "TokenSample", "mixture_sample", "rollout_statistics", "sample_tokens",
           "token_logprobs"]
