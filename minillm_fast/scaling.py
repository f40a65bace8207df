"""How one model's raw logits become the logits its softmax sees: logit scale, softcap, temperature.

A model's head gives raw logits ``z = h W^T + b``. What transformers then does differs by family: Cohere multiplies
them by ``logit_scale``, Granite divides them by ``logits_scaling``, Gemma 2 / 3 soft-cap them, and distillation
divides by a temperature. Every op of the package takes, per model, ``logit_scale`` (a multiplier on the logits,
applied first), ``softcap`` (Gemma-style ``c tanh(x / c)``, applied next) and the temperature (applied last)::

    s = softcap(logit_scale * z) / T

For ``logit_scale = a > 0`` this is the same function as ``s = c' tanh(z / c') * (a / T)`` with ``c' = c / a`` (and
``s = z * a / T`` without a softcap), so the kernels only ever see one multiplier and one cap per model:
:class:`Scaling` holds them (``inv_temp = a / T``, ``softcap = c / a``; 0 means no softcap). The two models of a
two-model op each have their own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Scaling:
    """One model's logits ``s = softcap * tanh(z / softcap) * inv_temp`` (``z * inv_temp`` when softcap is 0), with
    z the raw head output. Build it with :meth:`of`."""

    inv_temp: float = 1.0
    softcap: float = 0.0

    @staticmethod
    def of(temperature: float = 1.0, softcap: Optional[float] = None,
           logit_scale: Optional[float] = None) -> "Scaling":
        """The scaling of ``softcap(logit_scale * z) / temperature`` (arguments already checked)."""
        a = 1.0 if logit_scale is None else float(logit_scale)
        return Scaling(a / float(temperature), float(softcap) / a if softcap else 0.0)

    @property
    def temperature(self) -> float:
        """The temperature that, applied to the raw logits alone, gives the same multiplier (``T / logit_scale``)."""
        return 1.0 / self.inv_temp

    def apply(self, z: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``s`` from raw logits ``z``, and the softcap's ``tanh(z / softcap)`` (None without a softcap) for the
        gradient ``ds/dz = inv_temp (1 - tanh^2)``."""
        if not self.softcap:
            return z * self.inv_temp, None
        c = torch.tanh(z / self.softcap)
        return c * (self.softcap * self.inv_temp), c


def check_logit_scale(name: str, value) -> Optional[float]:
    """None (no scale) or a finite number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0 (a multiplier on the logits) or None")
    return float(value)


def per_model(name: str, shared, student, teacher) -> tuple:
    """The (student, teacher) values of an option that can be given for both models (``name``) or for each
    (``student_<name>``, ``teacher_<name>``), not both ways."""
    if shared is not None and (student is not None or teacher is not None):
        raise ValueError(f"pass {name}= (both models) or student_{name}= / teacher_{name}= (each model), not both; "
                         f"got {name}={shared!r}, student_{name}={student!r}, teacher_{name}={teacher!r}")
    if shared is not None:
        return shared, shared
    return student, teacher


def checked(temperature, softcap, logit_scale, *, prefix: str = "") -> Scaling:
    """:meth:`Scaling.of` after checking the user's arguments (``prefix``: ``student_`` / ``teacher_`` in messages)."""
    from .checks import check_positive, check_softcap

    temperature = check_positive("temperature", temperature)
    cap = check_softcap(softcap, f"{prefix}softcap")
    return Scaling.of(temperature, cap or None, check_logit_scale(f"{prefix}logit_scale", logit_scale))


def two_model_scalings(temperature: float, softcap, logit_scale, student_softcap, teacher_softcap,
                       student_logit_scale, teacher_logit_scale) -> tuple[Scaling, Scaling]:
    """The (student, teacher) :class:`Scaling` of a two-model op from its options, each given for both models
    (``softcap``, ``logit_scale``) or per model (``student_softcap``, ...), checked (temperature already is)."""
    from .checks import check_softcap

    caps = per_model("softcap", softcap, student_softcap, teacher_softcap)
    scales = per_model("logit_scale", logit_scale, student_logit_scale, teacher_logit_scale)
    out = []
    for i, side in enumerate(("student", "teacher")):
        cap = check_softcap(caps[i], "softcap" if softcap is not None else f"{side}_softcap")
        scale = check_logit_scale("logit_scale" if logit_scale is not None else f"{side}_logit_scale", scales[i])
        out.append(Scaling.of(temperature, cap or None, scale))
    return out[0], out[1]
