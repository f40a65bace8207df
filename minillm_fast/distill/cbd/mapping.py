"""Map a model's weights to another shape of its family (docs/cbd.md, "Mapping").

* Depth: student layer ``j`` of ``L'`` takes anchor layer ``round(j (L - 1) / (L' - 1))`` of ``L`` (half rounds up):
  fewer layers are evenly spaced with the first and the last kept; more layers repeat each layer in place
  (``[0, 0, 1, 1]`` from two). One layer takes the first.
* Width, shrinking: the same channels are kept in every tensor that shares a dimension (families.py lists them), the
  ``new`` channels (heads, for attention) of highest importance, in their original order. Importance (``norm``):
  each tensor on the dimension adds, per channel, its share of the tensor's squared Frobenius norm (so a tensor's
  scale does not matter); ``leading`` keeps the first ones. ``hidden`` is scored over the kept layers and chosen
  once for the model, ``heads``/``kv``/``inter`` per layer.
* Width, growing (HyperCloning, Samragh et al. 2024; Net2Net for the inner dimensions): new channel ``j`` copies old
  channel ``j mod old``; axes that sum over the dimension (role ``read``) divide each copy by its channel's number of
  copies. With the hidden size a whole multiple and nothing cut, the grown model computes the same logits
  (:attr:`MapResult.exact`; norms see the same mean and variance over duplicated channels).
* Grouped-query attention: key/value heads are mapped as groups (a key/value head with its query heads, scored
  together); each new group's query heads come from its source group, best first, cycling, and continuing across the
  copies of one group, so a query head always attends with (a copy of) its own key/value head.

:func:`map_state_dict` returns the new state dict and, for every key, where its values came from;
:func:`build_model` loads it into a model of the new config and refuses a state dict that misses any of its tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .families import MappingError, Shape, check_mappable, shape_of, tensor_specs

IMPORTANCE = ("norm", "leading")


def depth_map(old: int, new: int) -> list[int]:
    """Source layer of each of ``new`` layers taken from ``old``: evenly spaced, first and last kept (``new >= 2``)."""
    if new == 1:
        return [0]
    return [(2 * j * (old - 1) + (new - 1)) // (2 * (new - 1)) for j in range(new)]


@dataclass
class DimMap:
    """``new`` units taken from ``old`` (``src[k]``: the old unit of new unit ``k``), each ``unit`` channels wide."""

    src: torch.Tensor     # [new] int64
    old: int
    unit: int = 1

    @property
    def new(self) -> int:
        return int(self.src.numel())

    @property
    def counts(self) -> torch.Tensor:
        """Copies of each old unit in the new ones ``[old]`` (0: cut)."""
        return torch.bincount(self.src, minlength=self.old)

    def channels(self) -> torch.Tensor:
        return (self.src[:, None] * self.unit + torch.arange(self.unit)).reshape(-1)

    def read_scale(self) -> torch.Tensor:
        """Per new channel, 1 / (copies of its source): what a summing axis is multiplied by."""
        return (1.0 / self.counts.double()[self.src]).repeat_interleave(self.unit)

    @property
    def duplicates(self) -> bool:
        return bool((self.counts > 1).any())

    @property
    def covers(self) -> bool:
        return bool((self.counts > 0).all())

    @property
    def is_identity(self) -> bool:
        return self.new == self.old and bool((self.src == torch.arange(self.old)).all())

    def describe(self) -> str:
        if self.is_identity:
            return f"{self.old}"
        if not self.duplicates:
            return f"{self.old}->{self.new} kept"
        c = self.counts
        how = f"x{int(c[0])}" if bool((c == c[0]).all()) else f"x{int(c.min())}-{int(c.max())}"
        return f"{self.old}->{self.new} duplicated {how}"


def _ranked(score: torch.Tensor, importance: str) -> list[int]:
    """Indices best first (ties and ``leading``: the lower index first)."""
    n = score.numel()
    if importance == "leading":
        return list(range(n))
    s = score.tolist()
    return sorted(range(n), key=lambda i: (-s[i], i))


def unit_map(old: int, new: int, score: torch.Tensor, importance: str, unit: int = 1) -> DimMap:
    """Keep the ``new`` best units in their order (shrinking), or copy unit ``j mod old`` (growing)."""
    if new <= old:
        src = sorted(_ranked(score, importance)[:new])
    else:
        src = [j % old for j in range(new)]
    return DimMap(torch.tensor(src, dtype=torch.long), old, unit)


def head_maps(a: Shape, b: Shape, head_score: torch.Tensor, kv_score: torch.Tensor,
              importance: str) -> tuple[DimMap, DimMap]:
    """(query heads, key/value heads) of one layer, keeping every query head with a copy of its own kv head."""
    g, g2 = a.heads // a.kv_heads, b.heads // b.kv_heads
    group = kv_score + head_score.view(a.kv_heads, g).sum(1)
    kv = unit_map(a.kv_heads, b.kv_heads, group, importance, a.head_dim)
    seen: dict[int, int] = {}
    q = []
    for s in kv.src.tolist():
        order = _ranked(head_score[s * g:(s + 1) * g], importance)
        r = seen.get(s, 0)
        seen[s] = r + 1
        q.extend(s * g + h for h in sorted(order[(r * g2 + t) % g] for t in range(g2)))
    return DimMap(torch.tensor(q, dtype=torch.long), a.heads, a.head_dim), kv


def _channel_mass(t: torch.Tensor, axis: int) -> torch.Tensor:
    """Each channel's share of the tensor's squared norm along ``axis``."""
    sq = t.detach().double().pow(2)
    total = sq.sum()
    per = sq.sum(dim=[d for d in range(t.dim()) if d != axis]) if t.dim() > 1 else sq
    return per / total if total > 0 else torch.zeros_like(per)


def importance_scores(state_dict: dict, a: Shape, layers: list[int]) -> dict:
    """Channel scores of the source: ``hidden`` over ``layers`` (and the tensors outside the blocks), and per layer
    ``heads`` (query heads), ``kv`` (kv heads) and ``inter``, one number per unit."""
    hidden = torch.zeros(a.hidden, dtype=torch.float64)
    per = {j: {"heads": torch.zeros(a.heads * a.head_dim, dtype=torch.float64),
               "kv": torch.zeros(a.kv_heads * a.head_dim, dtype=torch.float64),
               "inter": torch.zeros(a.inter, dtype=torch.float64)} for j in range(a.layers)}
    kept = set(layers)
    done = set()
    for spec in tensor_specs(a).values():
        if spec.source in done:     # a tied head is its embedding
            continue
        done.add(spec.source)
        t = state_dict[spec.source]
        for ax in spec.axes:
            if ax.dim == "hidden":
                if spec.layer is None or spec.layer in kept:
                    hidden += _channel_mass(t, ax.axis)
            elif ax.dim == "qkv":
                m = _channel_mass(t, ax.axis)
                nq, nk = a.heads * a.head_dim, a.kv_heads * a.head_dim
                per[spec.layer]["heads"] += m[:nq]
                per[spec.layer]["kv"] += m[nq:nq + nk] + m[nq + nk:]
            elif ax.dim in ("heads", "kv", "inter"):
                per[spec.layer][ax.dim] += _channel_mass(t, ax.axis)
    for j in per:
        for d in ("heads", "kv"):
            per[j][d] = per[j][d].view(-1, a.head_dim).sum(1)
    return {"hidden": hidden, "layers": per}


@dataclass
class MapResult:
    state_dict: dict                     # key -> tensor of the target shape
    sources: dict                        # key -> where its values came from (one line)
    src_shape: Shape
    dst_shape: Shape
    layers: list                         # source layer of each target layer
    exact: bool                          # growth that computes the same function as the source
    notes: list = field(default_factory=list)


def _take(t: torch.Tensor, axis: int, m: DimMap, role: str) -> torch.Tensor:
    if m.is_identity:
        return t
    t = t.index_select(axis, m.channels())
    if role == "read" and m.duplicates:
        shape = [1] * t.dim()
        shape[axis] = -1
        t = (t.double() * m.read_scale().view(shape)).to(t.dtype)
    return t


def map_state_dict(state_dict: dict, src_config, dst_config, importance: str = "norm",
                   what: str = "anchor") -> MapResult:
    """``state_dict`` (a model of ``src_config``, every key including a tied head's) mapped to ``dst_config``.

    Raises :class:`MappingError` (a ``ValueError``) for a pair that cannot be mapped, naming the key and the fix.
    """
    if importance not in IMPORTANCE:
        raise MappingError(f"importance={importance!r}: expected one of {', '.join(IMPORTANCE)}")
    a, b = check_mappable(src_config, dst_config, what, "student")
    missing = [k for k, s in tensor_specs(a).items() if s.source not in state_dict]
    if missing:
        raise MappingError(f"the {what}'s weights lack {', '.join(missing[:4])}: not a complete {a.family} state dict")
    layers = depth_map(a.layers, b.layers)
    scores = importance_scores(state_dict, a, layers)
    hidden = unit_map(a.hidden, b.hidden, scores["hidden"], importance)
    vocab = DimMap(torch.arange(b.vocab), a.vocab)
    pos = DimMap(torch.arange(b.positions), a.positions) if a.positions is not None else None
    per_layer = {}
    for s in sorted(set(layers)):
        sc = scores["layers"][s]
        heads, kv = head_maps(a, b, sc["heads"], sc["kv"], importance)
        per_layer[s] = {"heads": heads, "kv": kv, "inter": unit_map(a.inter, b.inter, sc["inter"], importance)}
    exact = (layers == list(range(a.layers)) and hidden.new % hidden.old == 0 and hidden.new >= hidden.old
             and all(m.new >= m.old and m.covers for d in per_layer.values() for m in d.values())
             and (a.tied or not b.tied))
    notes = []
    if b.tied and not a.tied:
        notes.append("the student ties its head to its embedding: the anchor's own head is not used")
    if a.layers != b.layers:
        notes.append(f"layers {a.layers}->{b.layers}: student layers take anchor layers {layers}")
    if b.hidden > a.hidden and b.hidden % a.hidden:
        notes.append(f"hidden {a.hidden}->{b.hidden} is not a whole multiple: some channels are copied once more "
                     f"than others, so the norms' statistics change (not function-preserving)")
    out, sources = {}, {}
    for key, spec in tensor_specs(b, layers).items():
        dims = {"hidden": hidden, "vocab": vocab, "pos": pos}
        if spec.layer is not None:
            dims.update(per_layer[layers[spec.layer]])
        t = state_dict[spec.source]
        changes = []
        for ax in spec.axes:
            if ax.dim == "qkv":
                maps = (dims["heads"], dims["kv"], dims["kv"])
                parts = t.split([m.old * m.unit for m in maps], dim=ax.axis)
                t = torch.cat([_take(p, ax.axis, m, ax.role) for p, m in zip(parts, maps)], dim=ax.axis)
                changes += [f"{n} {m.describe()}" for n, m in zip(("q heads", "kv heads"), maps[:2])
                            if not m.is_identity]
            else:
                m = dims[ax.dim]
                t = _take(t, ax.axis, m, ax.role)
                if not m.is_identity:
                    changes.append(f"{ax.dim} {m.describe()}" + (" (copies divided)" if ax.role == "read"
                                                                    and m.duplicates else ""))
        out[key] = t.contiguous()
        sources[key] = f"{what}:{spec.source}" + (f" [{'; '.join(changes)}]" if changes else "")
    return MapResult(out, sources, a, b, layers, exact, notes)


def map_model(model, dst_config, importance: str = "norm", what: str = "anchor") -> MapResult:
    """:func:`map_state_dict` of a loaded model."""
    return map_state_dict(model.state_dict(), model.config, dst_config, importance, what)


def check_complete(model, state_dict: dict, sources: Optional[dict] = None) -> None:
    """Refuse a state dict that does not give every tensor of ``model`` (none may stay at its random initialisation
    unreported), or gives tensors it does not have, or of another shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    if missing or extra:
        raise MappingError(f"the mapped weights do not cover the student's state dict: no source for "
                           f"{missing[:6]}, unknown {extra[:6]} (a config feature the maps do not know; "
                           f"docs/cbd.md lists what they map)")
    if sources is not None and set(sources) != set(own):
        raise MappingError(f"unaccounted tensors: {sorted(set(own) ^ set(sources))[:6]}")
    bad = [k for k in own if tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if bad:
        raise MappingError(f"shape mismatch after mapping: {bad[0]} {tuple(state_dict[bad[0]].shape)} vs "
                           f"{tuple(own[bad[0]].shape)}")


def build_model(dst_config, state_dict: dict, sources: Optional[dict] = None):
    """A model of ``dst_config`` holding ``state_dict`` (every tensor of it, checked by :func:`check_complete`), in
    the state dict's dtype."""
    from transformers import AutoModelForCausalLM

    dtype = next(iter(state_dict.values())).dtype if state_dict else None
    model = AutoModelForCausalLM.from_config(dst_config, dtype=dtype)
    check_complete(model, state_dict, sources)
    model.load_state_dict(state_dict, strict=True)
    return model


__all__ = ["DimMap", "IMPORTANCE", "MapResult", "MappingError", "build_model", "check_complete", "depth_map",
           "head_maps", "importance_scores", "map_model", "map_state_dict", "shape_of", "unit_map"]
