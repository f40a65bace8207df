"""Fused losses where people already train: drop-in replacements for other libraries' distillation losses.

* :mod:`minillm_fast.integrations.trl`: TRL's ``GKDTrainer``, ``DistillationTrainer`` and ``MiniLLMTrainer``
  (``use_fused_losses(trainer)``; ``pip install 'minillm-fast[trl]'``).

Nothing here is imported by ``minillm_fast`` itself, and TRL is imported only when a TRL function is called.
"""
