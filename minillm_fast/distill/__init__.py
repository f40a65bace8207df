"""Training half of minillm-fast: SFT, KD, SeqKD and MiniLLM distillation of Hugging Face causal LMs, with the fused
ops wherever logits would otherwise be materialised.

One job per file: ``config`` (the dataclass config), ``data`` (instruction JSONL, corpus, collation, order),
``models`` (loading, hidden states, heads), ``losses`` (every loss term from hidden states), ``rollout`` (KV-cached
teacher-mixed sampling), ``ppo`` (rewards, advantages, whitening), ``trainer`` (the loop, checkpoints, metrics),
``evaluate`` (Rouge-L / exact match over seeds), ``hf`` (a loss and a Trainer mixin for Hugging Face users),
``dist`` (torchrun / DDP), ``checkpoint``, ``plots``, ``toy`` (a tiny local workspace), ``cli`` (entry points).
"""
from .cli import distill_main, evaluate_main
from .config import ConfigError, DistillConfig

main = distill_main

__all__ = ["ConfigError", "DistillConfig", "distill_main", "evaluate_main", "main"]
