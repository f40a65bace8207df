"""Model configurations of the built-in demo: a tiny teacher and students a few times smaller, built from scratch.

Two families, as in the paper's experiments (GPT-2 and LLaMA students): ``"gpt2"`` (``transformers.GPT2Config``:
learned positions, LayerNorm, GELU MLP 4x wide) and ``"llama"`` (``transformers.LlamaConfig``: rotary positions,
RMSNorm, SwiGLU MLP ~8/3x wide). Every config has the tokenizer's vocabulary, 256 positions (the demo's longest
example is ~150 tokens), dropout 0 (as the reference code trains), and input and output embeddings tied (so
``model.lm_head.weight`` is the embedding matrix; the fused losses take it as the head weight).

Shapes (residual width / blocks / heads) and parameter counts at the demo tokenizer's vocabulary (1795 tokens with the
default data and ``vocab_size=2048``; the tied embedding, ``vocab x width``, is part of each count):

=====================  ===========  =====  =====  ====================================================
``SHAPES`` key         shape        gpt2   llama  use
=====================  ===========  =====  =====  ====================================================
``teacher``            256 / 6 / 4  5.26M  5.21M  trained by SFT on the generated set: the teacher
``student``            128 / 4 / 4  1.06M  1.03M  the student of the demo (5x smaller)
``student_small``      96 / 3 / 4   0.53M  0.50M  a second, smaller student (size sweeps)
``quick_teacher``      128 / 3 / 4  0.86M  0.83M  ``quick=True``: a two-minute smoke run
``quick_student``      64 / 2 / 2   0.23M  0.22M
``quick_anchor``       96 / 3 / 3   0.53M  0.50M  CBD (demo/cbd.py): the anchor between those two
``quick_cbd_student``  64 / 3 / 2   0.28M  0.27M  CBD: a student between that anchor and quick_student
``anchor``             192 / 5 / 6  2.62M  2.56M  CBD at the default shapes (the demo uses quick ones)
``cbd_student``        160 / 4 / 5  1.57M  1.53M
``long_teacher``       192 / 5 / 6  2.62M  2.56M  ``demo --profile long``: its teacher
``long_student``       96 / 3 / 3   0.53M  0.50M  its students (and its smallest CBD anchor)
``long_anchor``        128 / 4 / 4  1.06M  1.03M  its CBD chain's middle anchor
``long_cbd_student``   96 / 4 / 3   0.64M  0.62M  its CBD student
=====================  ===========  =====  =====  ====================================================

``MODEL_SETS`` names the shapes of each profile's roles (``quick``: the demo's default and ``--quick`` runs,
``default``: the shapes above the quick ones, ``long``: ``--profile long``).

``num_parameters(config)`` gives the exact count (unique tensors, tied embeddings counted once) without allocating.
``build_model(config, seed)`` is ``AutoModelForCausalLM.from_config(config)`` under a fixed seed, so the same config
and seed give the same initial weights, and the caller's global RNG state is left as it was.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

__all__ = ["MAX_POSITIONS", "FAMILIES", "Shape", "SHAPES", "ModelSet", "MODEL_SETS", "teacher_config",
           "student_config", "shape_config", "build_model", "num_parameters", "special_token_ids"]

MAX_POSITIONS = 256
FAMILIES = ("gpt2", "llama")


@dataclass(frozen=True)
class Shape:
    """The size of a demo model: residual width, number of blocks, attention heads."""

    hidden: int
    layers: int
    heads: int


SHAPES: Dict[str, Shape] = {
    "teacher": Shape(hidden=256, layers=6, heads=4),
    "student": Shape(hidden=128, layers=4, heads=4),
    "student_small": Shape(hidden=96, layers=3, heads=4),
    "quick_teacher": Shape(hidden=128, layers=3, heads=4),
    "quick_student": Shape(hidden=64, layers=2, heads=2),
    # chain-based distillation (demo/cbd.py): head width 32 throughout, so that heads map one to one
    "quick_anchor": Shape(hidden=96, layers=3, heads=3),
    "quick_cbd_student": Shape(hidden=64, layers=3, heads=2),
    "anchor": Shape(hidden=192, layers=5, heads=6),
    "cbd_student": Shape(hidden=160, layers=4, heads=5),
    # the long profile (demo --profile long): a teacher 3x the quick one, a student 2.3x the quick student; head width
    # 32 throughout, as the CBD rows need
    "long_teacher": Shape(hidden=192, layers=5, heads=6),
    "long_student": Shape(hidden=96, layers=3, heads=3),
    "long_anchor": Shape(hidden=128, layers=4, heads=4),
    "long_cbd_student": Shape(hidden=96, layers=4, heads=3),
}


@dataclass(frozen=True)
class ModelSet:
    """The ``SHAPES`` keys of one demo profile's models, by role: the teacher, the students (also the smallest CBD
    anchor), the CBD chain's middle anchor and the CBD student (between the two anchors)."""

    teacher: str
    student: str
    anchor_mid: str
    cbd_student: str


MODEL_SETS: Dict[str, ModelSet] = {
    "quick": ModelSet("quick_teacher", "quick_student", "quick_anchor", "quick_cbd_student"),
    "default": ModelSet("teacher", "student", "anchor", "cbd_student"),
    "long": ModelSet("long_teacher", "long_student", "long_anchor", "long_cbd_student"),
}


def special_token_ids(tokenizer) -> Dict[str, Optional[int]]:
    """``{"bos_token_id", "eos_token_id", "pad_token_id"}`` of a tokenizer, to pass to the config functions."""
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def _llama_ffn(hidden: int) -> int:
    """The SwiGLU width: 8/3 of the residual width (same MLP parameters as a 4x GELU MLP), rounded up to 16."""
    return 16 * math.ceil(8 * hidden / 3 / 16)


def _config(shape: Shape, vocab_size: int, family: str, **overrides):
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int (use len(tokenizer)), got {vocab_size!r}")
    if family == "gpt2":
        from transformers import GPT2Config  # noqa: PLC0415

        kwargs = dict(vocab_size=vocab_size, n_positions=MAX_POSITIONS, n_embd=shape.hidden, n_layer=shape.layers,
                      n_head=shape.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                      tie_word_embeddings=True)
        kwargs.update(overrides)
        return GPT2Config(**kwargs)
    if family == "llama":
        from transformers import LlamaConfig  # noqa: PLC0415

        kwargs = dict(vocab_size=vocab_size, max_position_embeddings=MAX_POSITIONS, hidden_size=shape.hidden,
                      intermediate_size=_llama_ffn(shape.hidden), num_hidden_layers=shape.layers,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.heads, attention_dropout=0.0,
                      tie_word_embeddings=True)
        kwargs.update(overrides)
        return LlamaConfig(**kwargs)
    raise ValueError(f"family={family!r} is not one of {FAMILIES}")


def teacher_config(vocab_size: int, family: str = "gpt2", quick: bool = False, **overrides):
    """The demo teacher (``SHAPES["teacher"]``, ~5M parameters; ``quick=True``: ``SHAPES["quick_teacher"]``, ~0.8M).

    ``vocab_size`` is ``len(tokenizer)``; ``overrides`` go to the config class, e.g. ``**special_token_ids(tok)``.
    """
    return _config(SHAPES["quick_teacher" if quick else "teacher"], vocab_size, family, **overrides)


def student_config(vocab_size: int, family: str = "gpt2", quick: bool = False, size: str = "student",
                   **overrides):
    """A demo student: ``size="student"`` (~1M parameters, the default) or ``"student_small"`` (~0.5M);
    ``quick=True`` gives ``SHAPES["quick_student"]`` (~0.2M) whatever ``size``. Other arguments as
    ``teacher_config``; the student may be of the other family than the teacher when both share the tokenizer."""
    if size not in ("student", "student_small"):
        raise ValueError(f"size={size!r} is not one of ('student', 'student_small')")
    return _config(SHAPES["quick_student" if quick else size], vocab_size, family, **overrides)


def shape_config(shape: str, vocab_size: int, family: str = "gpt2", **overrides):
    """The config of ``SHAPES[shape]`` (any key), arguments as ``teacher_config``."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not one of {tuple(SHAPES)}")
    return _config(SHAPES[shape], vocab_size, family, **overrides)


def build_model(config, seed: int = 0):
    """``AutoModelForCausalLM.from_config(config)`` initialised under ``torch.manual_seed(seed)``, float32, in train
    mode; the global RNG state is restored afterwards."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model


def num_parameters(config) -> int:
    """Parameters of the model ``config`` builds (tied tensors once), counted on the meta device (no memory)."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
