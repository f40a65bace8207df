"""Benchmark shapes: one ``Shape`` per measured point, and named presets that expand to a sweep of token counts.

A preset fixes the student and teacher hidden sizes, the vocabulary (and the heads' padded row count where a model
pads its lm_head), the dtype and the default token counts, separately for CPU and CUDA: the CPU sweeps are small
enough to finish in minutes on a few cores, the CUDA ones are training-size. ``--tokens`` and ``--dtype`` override.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def dtype_name(dtype: str) -> str:
    """Canonical name (``float32`` / ``bfloat16`` / ``float16``) of a ``--dtype`` value."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
    return str(DTYPES[dtype]).replace("torch.", "")


@dataclass(frozen=True)
class Shape:
    """One measured point: N tokens, student / teacher hidden sizes, the real vocabulary and the heads' rows."""

    tokens: int
    hs: int
    ht: int
    vocab: int
    vocab_pad: int  # rows of both lm_head weights (== vocab unless the model pads its head)
    dtype: str  # canonical torch dtype name

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def label(self) -> str:
        pad = f"(pad {self.vocab_pad})" if self.vocab_pad != self.vocab else ""
        return f"N={self.tokens} Hs={self.hs} Ht={self.ht} V={self.vocab}{pad} {self.dtype}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    name: str
    hs: int
    ht: int
    vocab: int
    tokens: dict  # device type -> default token counts
    dtype: dict  # device type -> default dtype
    vocab_pad: Optional[int] = None
    about: str = ""

    def shapes(self, device_type: str, tokens=None, dtype=None) -> list[Shape]:
        kind = "cuda" if device_type == "cuda" else "cpu"
        counts = list(tokens) if tokens else list(self.tokens[kind])
        dt = dtype_name(dtype) if dtype else self.dtype[kind]
        return [Shape(int(n), self.hs, self.ht, self.vocab, self.vocab_pad or self.vocab, dt) for n in counts]


_CPU32 = {"cpu": "float32", "cuda": "bfloat16"}
_MODEL_TOKENS = {"cpu": (256, 512), "cuda": (2048, 4096, 8192)}

PRESETS: dict[str, Preset] = {p.name: p for p in [
    # Model pairs: (student, teacher) hidden sizes of real checkpoints sharing a tokenizer.
    Preset("gpt2", 768, 1024, 50257, _MODEL_TOKENS, _CPU32,
           about="GPT-2 small student (768) / GPT-2 medium teacher (1024), V=50257 (odd, unpadded)"),
    Preset("llama2", 2048, 4096, 32000, _MODEL_TOKENS, _CPU32,
           about="TinyLlama-1.1B student (2048) / Llama-2-7B teacher (4096), V=32000"),
    Preset("llama3", 2048, 4096, 128256, _MODEL_TOKENS, _CPU32,
           about="Llama-3.2-1B student (2048) / Llama-3.1-8B teacher (4096), V=128256"),
    Preset("qwen2.5", 896, 3584, 151936, _MODEL_TOKENS, _CPU32, vocab_pad=152064,
           about="Qwen2.5-0.5B student (896) / Qwen2.5-7B teacher (3584), vocab 151936, heads padded to 152064"),
    # The shapes. The default sweep ends at the N (the last point is the number).
    Preset("issue3", 768, 1024, 50304, {"cpu": (512, 1024, 2048), "cuda": (512, 1024, 2048)},
           {"cpu": "float32", "cuda": "float32"}, about="the issue's CPU shape: N=2048, Hs=768, Ht=1024, V=50304 fp32"),
    Preset("liger-cpu", 1024, 2048, 128256, {"cpu": (128, 256, 512), "cuda": (128, 256, 512)},
           {"cpu": "float32", "cuda": "float32"},
           about="the issue's second CPU shape: N=512, Hs=1024, Ht=2048, V=128256 fp32"),
    Preset("decode", 768, 768, 50304, {"cpu": (64,), "cuda": (64, 256)}, {"cpu": "float32", "cuda": "bfloat16"},
           about="one decoding step of a batch of 64 (the sampler issue's shape: N=64, H=768, V=50304)"),
    Preset("gpu", 2048, 4096, 128256, {"cpu": (256, 512), "cuda": (2048, 4096, 8192)},
           {"cpu": "float32", "cuda": "bfloat16"},
           about="the issue's GPU shape: N=8192, Hs=2048, Ht=4096, V=128256 bf16"),
    # --quick: tiny, with an odd vocabulary, only to check the harness end to end.
    Preset("tiny", 64, 96, 1031, {"cpu": (64, 128), "cuda": (64, 128)}, {"cpu": "float32", "cuda": "float32"},
           about="smoke-test size (--quick)"),
]}

DEFAULT_PRESETS = {"cpu": ("issue3", "liger-cpu"), "cuda": ("gpu", "llama3", "qwen2.5")}


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} is not known; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def describe() -> str:
    """One line per preset, for ``--list``."""
    lines = []
    for p in PRESETS.values():
        pad = f" (pad {p.vocab_pad})" if p.vocab_pad else ""
        lines.append(f"{p.name:10s} Hs={p.hs:<5d} Ht={p.ht:<5d} V={p.vocab}{pad}  cpu N={list(p.tokens['cpu'])} "
                     f"{p.dtype['cpu']}, cuda N={list(p.tokens['cuda'])} {p.dtype['cuda']}  -- {p.about}")
    return "\n".join(lines)
