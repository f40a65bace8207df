"""Parameter interpolation between two anchors mapped to the student's shape (docs/cbd.md, "Interpolation").

``w = (1 - a) w_big + a w_small`` for every tensor, after both anchors went through :func:`mapping.map_state_dict`
to the student's config, so the two tensors of a key always have the student's shape (anything else is refused).
The default ``a`` is the normalised size difference in parameter counts,

    a = (P_big - P_student) / (P_big - P_small)

(``P``: the model's distinct parameters, a tied head counted once, embeddings included), the same ``a`` for every
layer and tensor. What we have of the paper gives only "α derived from normalized size difference ... applied
uniformly across layers", in the reply to the reviewers of its machine review (../shared/papers/cbd-review.md, a
reply labelled simulated there, not a quotation of the authors); parameter counts are our reading of "size".
``a = 0`` gives the mapped big anchor, ``a = 1`` the mapped small one, both exactly.
"""
from __future__ import annotations

import torch

from .families import MappingError


def param_count(config) -> int:
    """Distinct parameters of a model of ``config`` (built on the meta device: nothing is allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def default_alpha(p_big: int, p_small: int, p_student: int) -> float:
    """``(P_big - P_student) / (P_big - P_small)``; 0 when both anchors have the same size."""
    if p_big == p_small:
        return 0.0
    return (p_big - p_student) / (p_big - p_small)


def check_alpha(a: float) -> float:
    a = float(a)
    if not 0.0 <= a <= 1.0:
        raise MappingError(f"alpha={a}: the interpolation weight of the small anchor must lie in [0, 1] (0 = the "
                           f"big anchor, 1 = the small one); weights are never extrapolated")
    return a


def interpolate(big: dict, small: dict, a: float) -> dict:
    """``(1 - a) big[k] + a small[k]`` for every key (equal key sets, equal shapes), in fp32 or wider, returned in
    the big anchor's dtypes. Exact at ``a = 0``, at ``a = 1``, and for two equal tensors."""
    a = check_alpha(a)
    if set(big) != set(small):
        raise MappingError(f"the mapped anchors hold different tensors: {sorted(set(big) ^ set(small))[:6]}")
    out = {}
    for k, wb in big.items():
        ws = small[k]
        if wb.shape != ws.shape:
            raise MappingError(f"{k}: shapes {tuple(wb.shape)} and {tuple(ws.shape)} after mapping; interpolation "
                               f"needs equal shapes (a bug in the maps: please report it)")
        if a == 0.0:
            out[k] = wb.clone()
        elif a == 1.0:
            out[k] = ws.to(wb.dtype).clone()
        else:
            acc = torch.promote_types(wb.dtype, torch.float32)
            wb_, ws_ = wb.to(acc), ws.to(acc)
            out[k] = (wb_ + a * (ws_ - wb_)).to(wb.dtype)     # = (1 - a) wb + a ws; exactly wb when ws == wb
    return out
