"""A student of any size from a chain: map its two neighbouring anchors to its shape and interpolate them
(docs/cbd.md, "Initialising a student").

Neighbours are chosen by parameter count among the chain's members (teacher, anchors, bridge anchors; chain.json):
the smallest member at least as large as the student (``big``) and the largest at most as large (``small``). A
student outside the chain's range is refused unless ``allow_extrapolate``; then it starts from the nearest member
alone (``a = 0``), with a warning. Both neighbours must be of the student's family and vocabulary.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

from .bridge import vocab_fingerprint
from .chain import MANIFEST, ChainError, load_config, load_tokenizer
from .families import MappingError, shape_of
from .interpolate import check_alpha, default_alpha, interpolate, param_count
from .mapping import build_model, map_model

INIT_RECORD = "cbd_init.json"


def read_manifest(chain_dir: str) -> list[dict]:
    p = os.path.join(chain_dir, MANIFEST)
    if not os.path.isfile(p):
        raise ChainError(f"--chain {chain_dir!r}: no {MANIFEST} there; build a chain first with "
                         f"`minillm-fast cbd chain --config chain.yaml` (its output_dir is the chain folder)")
    with open(p) as f:
        members = json.load(f).get("members", [])
    out = []
    for m in members:
        path = m["path"] if os.path.isabs(m["path"]) else os.path.join(chain_dir, m["path"])
        if os.path.isdir(path):
            out.append({**m, "abs_path": path})
    if not out:
        raise ChainError(f"{p} lists no model that exists on disk")
    return out


def neighbours(members: list[dict], p_student: int, allow_extrapolate: bool, warn: Callable[[str], None]):
    """(big, small, extrapolated) members around ``p_student`` parameters."""
    above = [m for m in members if m["params"] >= p_student]
    below = [m for m in members if m["params"] <= p_student]
    if above and below:
        big = min(above, key=lambda m: m["params"])
        small = max(below, key=lambda m: m["params"])
        return big, small, False
    lo, hi = min(m["params"] for m in members), max(m["params"] for m in members)
    # no member below: the student is smaller than all, the nearest is the smallest; else the largest
    nearest = min(members, key=lambda m: m["params"]) if not below else max(members, key=lambda m: m["params"])
    sizes = ", ".join(f"{m['name']}: {m['params']}" for m in members)
    if not allow_extrapolate:
        raise ChainError(f"the student has {p_student} parameters, outside the chain's range [{lo}, {hi}] "
                         f"({sizes}): pass --allow-extrapolate to "
                         f"start from the nearest member ({nearest['name']}) alone, or give a student config "
                         f"within the range")
    warn(f"the student ({p_student} parameters) lies outside the chain's range [{lo}, {hi}]: initialising from "
         f"the nearest member, {nearest['name']} ({nearest['params']}), alone (a = 0)")
    return nearest, nearest, True


def init_student(chain_dir: str, student_config, out: str, alpha: Optional[float] = None,
                 allow_extrapolate: bool = False, importance: str = "norm", tokenizer: Optional[str] = None,
                 log: Callable[[str], None] = print) -> dict:
    """Write a student of ``student_config`` (a config, or a config.json / directory path) initialised from the
    chain at ``chain_dir`` into ``out`` (``save_pretrained`` with the anchors' tokenizer, and ``cbd_init.json``).
    Returns that record: the anchors, ``a`` and where every tensor came from."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(student_config, "--student-config") if isinstance(student_config, str) else student_config
    shape = shape_of(cfg, "student")
    members = read_manifest(chain_dir)
    p_student = param_count(cfg)
    alpha = None if alpha is None else check_alpha(alpha)

    big, small, extrapolated = neighbours(members, p_student, allow_extrapolate, lambda m: log(f"warning: {m}"))
    for m in (big, small):
        if m["model_type"] != shape.family:
            other = small if m is big else big
            raise ChainError(f"the student's neighbouring members are {big['name']} ({big['model_type']}, "
                             f"{big['params']} parameters) and {small['name']} ({small['model_type']}, "
                             f"{small['params']}), and {m['name']} is not a {shape.family} model: anchors of "
                             f"different architecture families cannot be interpolated into one student; give a "
                             f"{m['model_type']} student config, or a size between members of the "
                             f"{shape.family} family" + (f" (such as {other['name']})" if other is not m else ""))
    if big["vocab_fingerprint"] != small["vocab_fingerprint"]:
        raise ChainError(f"the neighbouring members {big['name']} and {small['name']} have different vocabularies "
                         f"(a bridge lies between them): give a student size on one side of the bridge (the "
                         f"members before it share the teacher's tokenizer, those after it the new one)")
    tok = load_tokenizer(big["abs_path"], big["name"])
    if tokenizer is not None:
        want = load_tokenizer(tokenizer, "--tokenizer")
        if vocab_fingerprint(want) != big["vocab_fingerprint"]:
            raise ChainError(f"--tokenizer {tokenizer} is another vocabulary than the chain's anchors "
                             f"({big['name']}): a student over another tokenizer needs a bridge anchor in the chain "
                             f"(an anchor with tokenizer: and bridge: true, docs/cbd.md 'Bridge'), then a size "
                             f"among the anchors after it")
    if big is small:
        a, why = 0.0, "one member" + (" (outside the range)" if extrapolated else " of exactly this size")
        if alpha is not None and not extrapolated:
            a, why = alpha, "--alpha (both neighbours are the same member)"
    elif alpha is not None:
        a, why = alpha, "--alpha"
    else:
        a, why = default_alpha(big["params"], small["params"], p_student), \
            "normalised parameter-count difference (P_big - P_student) / (P_big - P_small)"
    maps = {}
    for role, m in (("big", big), ("small", small)):
        if role == "small" and small is big:
            maps["small"] = maps["big"]
            break
        model = AutoModelForCausalLM.from_pretrained(m["abs_path"], local_files_only=True)
        try:
            maps[role] = map_model(model, cfg, importance, what=m["name"])
        except MappingError as e:
            raise ChainError(f"the student config cannot be mapped from {m['name']}: {e}") from None
        del model
    sd = interpolate(maps["big"].state_dict, maps["small"].state_dict, a)
    sources = {k: (f"{1 - a:.4g} x {maps['big'].sources[k]} + {a:.4g} x {maps['small'].sources[k]}"
                   if small is not big else maps["big"].sources[k]) for k in sd}
    student = build_model(cfg, sd, sources)
    from ..checkpoint import atomic_save_pretrained

    atomic_save_pretrained(student, tok, out)
    record = {"chain": os.path.abspath(chain_dir), "student_params": p_student, "student_shape": shape.to_dict(),
              "big": {k: big[k] for k in ("name", "path", "params")},
              "small": {k: small[k] for k in ("name", "path", "params")},
              "alpha": a, "alpha_from": why, "extrapolated": extrapolated, "importance": importance,
              "notes": {"big": maps["big"].notes, "small": maps["small"].notes},
              "function_preserving": {"big": maps["big"].exact, "small": maps["small"].exact},
              "sources": sources}
    with open(os.path.join(out, INIT_RECORD), "w") as f:
        json.dump(record, f, indent=1)
    pair = big["name"] if small is big else f"{big['name']} ({big['params']}) and {small['name']} ({small['params']})"
    log(f"student ({p_student} parameters): w = (1 - a) w_big + a w_small from {pair}, a = {a:.4f} ({why}); "
        f"written to {out}")
    return record
