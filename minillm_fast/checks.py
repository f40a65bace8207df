"""Input checks shared by every public op.

Errors a user can cause are ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape or value) whose message
names the argument, what was given and what was expected. Checks only read shapes and dtypes: none of them
synchronises with the device.
"""
from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_hidden(name: str, hidden) -> torch.Tensor:
    """``hidden [..., H]`` floating point, at least one row; returns it flattened to ``[N, H]``."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [..., H], got {type(hidden).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got dtype {hidden.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., H] with H > 0, got {tuple(hidden.shape)}")
    if hidden.numel() == 0:
        raise ValueError(f"{name} has no rows (shape {tuple(hidden.shape)}); pass at least one token")
    return hidden.reshape(-1, hidden.shape[-1])


def check_weight(name: str, weight, hidden: torch.Tensor, hidden_name: str) -> torch.Tensor:
    """``weight [V, H]`` with H equal to the hidden width, same dtype and device as the hidden states."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [V, H], got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must have shape [V, H] (the lm_head weight), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{name} has width {weight.shape[1]} (shape {tuple(weight.shape)}) but {hidden_name} has width "
            f"{hidden.shape[-1]}; the head must be [V, H] with H = {hidden_name}.shape[-1]"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{name} has no vocabulary rows (shape {tuple(weight.shape)})")
    _same_dtype_device(name, weight, hidden_name, hidden)
    return weight


def check_bias(name: str, bias, weight: torch.Tensor, weight_name: str) -> Optional[torch.Tensor]:
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [V] or None, got {type(bias).__name__}")
    if bias.shape != weight.shape[:1]:
        raise ValueError(
            f"{name} must have shape [V] = ({weight.shape[0]},) to match {weight_name}, got {tuple(bias.shape)}"
        )
    _same_dtype_device(name, bias, weight_name, weight)
    return bias


def _same_dtype_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; cast one to match")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def check_rows(name: str, t, lead_shape: torch.Size, device: torch.device, *, kind: str) -> Optional[torch.Tensor]:
    """A per-token tensor with the hidden states' leading shape; returned flattened to ``[N]``.

    kind: "int" (labels, targets), "bool" (mask; any dtype is read as ``!= 0``) or "float" (weights).
    """
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {tuple(lead_shape)} or None, got {type(t).__name__}")
    if t.shape != lead_shape:
        raise ValueError(
            f"{name} must have the hidden states' leading shape {tuple(lead_shape)}, got {tuple(t.shape)}"
        )
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the hidden states are on {device}")
    if kind == "int" and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor (token ids), got dtype {t.dtype}")
    if kind == "float" and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t.reshape(-1)


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (float(value) > 0.0):
        raise ValueError(f"{name}={value!r} must be a number > 0")
    if value != value or value == float("inf"):
        raise ValueError(f"{name}={value!r} must be finite")
    return float(value)


def check_softcap(softcap, name: str = "softcap") -> float:
    """Returns 0.0 for "no softcap" (the kernels' convention)."""
    if softcap is None:
        return 0.0
    return check_positive(name, softcap)


def resolve_vocab(vocab_size, *weights: tuple[str, torch.Tensor]) -> int:
    """The real vocabulary: ``vocab_size`` (<= every head's rows) or the common row count of the heads."""
    rows = {name: w.shape[0] for name, w in weights}
    if vocab_size is None:
        if len(set(rows.values())) > 1:
            detail = ", ".join(f"{n} has {r} rows" for n, r in rows.items())
            raise ValueError(
                f"the vocabularies differ ({detail}); pass vocab_size=<real vocabulary> to use the first "
                f"vocab_size rows of each head (padded rows are then excluded from both softmaxes)"
            )
        return next(iter(rows.values()))
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size!r} must be a positive int")
    for name, r in rows.items():
        if vocab_size > r:
            raise ValueError(f"vocab_size={vocab_size} exceeds the {r} rows of {name}")
    return vocab_size


def check_model(hidden, weight, bias, vocab_size):
    """The inputs of a one-model op, checked and flattened: ``(h [N, H], w [V_pad, H], b | None)``, the real
    vocabulary (:func:`resolve_vocab`) and the hidden states' leading shape."""
    h = check_hidden("hidden", hidden)
    w = check_weight("weight", weight, h, "hidden")
    b = check_bias("bias", bias, w, "weight")
    return (h, w, b), resolve_vocab(vocab_size, ("weight", w)), hidden.shape[:-1]


def check_models(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
                 vocab_size):
    """The student / teacher inputs of a two-model op, checked and flattened.

    Returns ``(hs [N, Hs], ws [V_pad, Hs], bs | None, ht [N, Ht], wt [V_pad', Ht], bt | None)``, the real vocabulary
    (:func:`resolve_vocab`) and the hidden states' leading shape.
    """
    hs = check_hidden("student_hidden", student_hidden)
    ht = check_hidden("teacher_hidden", teacher_hidden)
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} must "
            f"have the same leading shape (one row per token); got {tuple(student_hidden.shape[:-1])} vs "
            f"{tuple(teacher_hidden.shape[:-1])}"
        )
    if hs.device != ht.device:
        raise ValueError(f"student_hidden is on {hs.device} but teacher_hidden is on {ht.device}")
    ws = check_weight("student_weight", student_weight, hs, "student_hidden")
    wt = check_weight("teacher_weight", teacher_weight, ht, "teacher_hidden")
    bs = check_bias("student_bias", student_bias, ws, "student_weight")
    bt = check_bias("teacher_bias", teacher_bias, wt, "teacher_weight")
    vocab = resolve_vocab(vocab_size, ("student_weight", ws), ("teacher_weight", wt))
    return (hs, ws, bs, ht, wt, bt), vocab, student_hidden.shape[:-1]


REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; expected one of {REDUCTIONS}")
    return reduction


def check_token_range(name: str, tokens: torch.Tensor, vocab_size: int, ignore_index: Optional[int] = None) -> None:
    """Raise ValueError when a token (other than ``ignore_index``) is outside ``[0, vocab_size)``.

    This reads the values, so it synchronises with the device once per call; it is skipped while ``torch.compile``
    traces (the kernels never index memory with a token, so a bad one gives a wrong value, never a bad access).
    """
    if torch.compiler.is_compiling():
        return
    bad = (tokens < 0) | (tokens >= vocab_size)
    if ignore_index is not None:
        bad &= tokens != ignore_index
    if bool(bad.any()):
        values = tokens[bad]
        skip = "" if ignore_index is None else f" (or equal ignore_index={ignore_index})"
        raise ValueError(
            f"{name} has {values.numel()} value(s) outside [0, vocab_size={vocab_size}), first {values[0].item()}; "
            f"every {name} entry must be a token id of the real vocabulary{skip}; rows >= vocab_size are padding"
        )

