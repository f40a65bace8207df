"""Training half of minillm-fast: SFT, KD, SeqKD, MiniLLM and OKD distillation of Hugging Face causal LMs, with the
fused ops wherever logits would otherwise be materialised.

One job per file: ``config`` (the dataclass config), ``data`` (instruction JSONL, corpus, collation, order),
``models`` (loading, hidden states), ``heads`` (each family's output layer, checked by a probe), ``losses`` (every
loss term from hidden states), ``rollout`` (KV-cached teacher-mixed sampling), ``ppo`` (rewards, advantages,
whitening), ``base`` (the trainer every method shares: set-up, loop, optimiser, evaluation, checkpoints, metrics, and
the method registry), ``methods/`` (one module per method: ``lm`` for sft and kd, ``seqkd``, ``minillm``, ``okd``),
``trainer`` (the entry point: ``Trainer`` with every method registered), ``teacher_cache`` (a teacher's stored top-k
log-probs for offline KD), ``evaluate`` (Rouge-L / exact match over seeds), ``hf`` (a loss and a Trainer mixin for
Hugging Face users), ``ranks`` (torchrun / DDP), ``fsdp``, ``checkpoint``, ``plots``, ``toy`` (a tiny local
workspace), ``cli`` (entry points); ``cbd/`` (chain-based distillation, docs/cbd.md).
"""
from .cli import distill_main, evaluate_main
from .config import ConfigError, DistillConfig

main = distill_main

__all__ = ["ConfigError", "DistillConfig", "distill_main", "evaluate_main", "main"]
