"""The public entry point of training: ``Trainer(config).train()`` with every method registered.

The trainer itself (set-up, loop, optimisation, evaluation, checkpoints) is :mod:`minillm_fast.distill.base`; each
method is a module of :mod:`minillm_fast.distill.methods` that imports the base and registers itself there. This
module imports both, so that whoever imports ``Trainer`` from here can run every ``method``.
"""
from __future__ import annotations

from . import methods  # noqa: F401  (registers sft, kd, seqkd, minillm and okd in base.METHODS)
from .base import METHODS, Method, Trainer, lr_factor, mix_seed, register

__all__ = ["METHODS", "Method", "Trainer", "lr_factor", "mix_seed", "register"]
