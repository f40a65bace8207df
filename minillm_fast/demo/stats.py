"""The demo report's statistics: a confidence interval over the sampling seeds and a paired test over the test prompts.

* ``mean_ci``: a model's mean test Rouge-L and its 95% t-interval over the seeds (``scipy.stats.t``): how far the
  mean of one trained model's samples may be from its expectation. It says nothing about training noise.
* ``paired_comparison``: two models on the same test prompts, each prompt's Rouge-L averaged over the seeds first. The
  test is the two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``; per-prompt Rouge-L is bounded and far
  from normal, many prompts tie); the interval is a paired bootstrap (prompts resampled with replacement) of the
  mean difference. A difference is called significant only when ``p < ALPHA``. There is no correction for the
  number of comparisons the report makes: about 1 in 20 of them will be "significant" by chance.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

ALPHA = 0.05
TEST_NAME = "two-sided Wilcoxon signed-rank test over the test prompts (per-prompt Rouge-L averaged over the seeds)"


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, Optional[float], Optional[float]]:
    """``(mean, low, high)``: the t-interval ``mean ± t_{(1+c)/2, n-1} s / sqrt(n)`` (``s`` with ddof=1); the bounds
    are None for fewer than 2 values."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(x.mean())
    if x.size < 2:
        return mean, None, None
    half = float(stats.t.ppf((1 + confidence) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def paired_comparison(a: Sequence[float], b: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                      confidence: float = 0.95) -> dict:
    """``a`` against ``b``, paired by position (the same prompts).

    Args:
        a, b: ``[N]`` per-prompt scores of the two models.
    Returns ``{"n", "mean_diff" (a - b), "ci_low", "ci_high" (bootstrap percentile interval of the mean
    difference), "p" (Wilcoxon; 1.0 when every difference is 0), "significant" (p < ALPHA)}``.
    """
    from scipy import stats

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired scores must be two [N] lists of the same prompts, got {x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError(f"a paired test needs at least 2 prompts, got {x.size}")
    d = x - y
    p = 1.0 if not np.any(d) else float(stats.wilcoxon(d).pvalue)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(1)
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"n": int(d.size), "mean_diff": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "p": p,
            "significant": p < ALPHA}


def verdict(p: float) -> str:
    """The words the report uses for a p-value: "significant" only below ``ALPHA``."""
    if p < ALPHA:
        return f"significant (p = {p:.2g} < {ALPHA})"
    return f"not distinguishable from noise by the test (p = {p:.2g} ≥ {ALPHA})"
