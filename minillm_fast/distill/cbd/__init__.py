"""Chain-based distillation (CBD; Shi et al. 2026, arXiv 2605.07783; docs/cbd.md).

A short chain of anchors is distilled step by step (teacher -> anchor 1 -> anchor 2 -> ..., each link an ordinary
run of the trainer), and a student of any size between two anchors is initialised by mapping both to its shape and
interpolating, ``w = (1 - a) w_big + a w_small``. One job per file:

* ``families``: what a GPT-2 / Llama state dict holds, axis by axis, and which configs can be mapped;
* ``mapping``: depth (evenly spaced / repeated layers) and width (kept or duplicated channels) maps;
* ``interpolate``: parameter counts, the default ``a`` and the interpolation;
* ``bridge``: a model moved to another tokenizer by token strings;
* ``chain``: the chain config, its links and chain.json;
* ``init``: a student from a chain's two neighbouring anchors;
* ``cli``: ``minillm-fast cbd chain`` and ``minillm-fast cbd init``.
"""
from .families import MappingError
from .interpolate import default_alpha, param_count
from .mapping import build_model, depth_map, map_model, map_state_dict

# (the function interpolate stays in its module: a package attribute of that name would hide the module)
__all__ = ["MappingError", "build_model", "default_alpha", "depth_map", "map_model", "map_state_dict", "param_count"]
