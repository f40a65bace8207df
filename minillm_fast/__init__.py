"""minillm-fast: fused, memory-light distillation losses and a MiniLLM training script.

The ops take final hidden states and lm_head weights, never logits, and never allocate a tokens x vocabulary
tensor. See README.md for the API and docs/design.md for the design; minillm_fast/reference.py holds the plain
PyTorch versions.
"""
import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _checkout_kernels() -> None:
    """Make the repository's top-level ``kernels/`` importable as ``minillm_fast.kernels`` from a source checkout
    that is not installed (an install maps it there: setup.py's package_dir), so a checkout works as an install does.
    Nothing happens where the name already resolves (installed, editable) or where there is no ``kernels/``."""
    root = _Path(__file__).resolve().parent.parent / "kernels"
    if _importlib_util.find_spec(f"{__name__}.kernels") is not None or not (root / "__init__.py").is_file():
        return
    spec = _importlib_util.spec_from_file_location(f"{__name__}.kernels", root / "__init__.py",
                                                   submodule_search_locations=[str(root)])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_checkout_kernels()

from .dispatch import BACKENDS  # noqa: E402  (after the kernels' name is set up)
from .divergences import DIVERGENCES  # noqa: E402
from .ops.fused_divergence import FusedDivergenceLoss, fused_divergence, fused_reverse_kl  # noqa: E402
from .ops.sampling import (MixtureSample, RolloutStatistics, TokenSample, mixture_sample,  # noqa: E402
                           rollout_statistics, sample_tokens)
from .ops.sparse_divergence import TopK, sparse_divergence, token_topk  # noqa: E402
from .ops.token_logprobs import token_logprobs  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BACKENDS", "DIVERGENCES", "FusedDivergenceLoss", "fused_divergence", "fused_reverse_kl",
           "MixtureSample", "RolloutStatistics", "TokenSample", "mixture_sample", "rollout_statistics", "sample_tokens",
           "token_logprobs", "sparse_divergence", "token_topk", "TopK"]
