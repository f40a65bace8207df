"""What the shape maps know about a model family: its mapped sizes (:class:`Shape`), the config keys that must agree,
and, for every tensor of its state dict, which axis carries which dimension (:func:`tensor_specs`).

Two families: GPT-2 (``gpt2``: ``Conv1D`` weights stored ``[in, out]``, one fused ``c_attn [H, 3H]`` with the query,
key and value columns in that order, learned positions ``wpe``, LayerNorm with bias) and Llama (``llama``:
``nn.Linear`` weights ``[out, in]``, separate ``q/k/v/o_proj``, grouped-query attention, gated MLP, RMSNorm, RoPE).
Any other ``model_type`` is refused by :func:`family_of` with the list of these two.

The dimensions (docs/cbd.md, "Mapping"):

=========  ==============================================================  ====================
name       what                                                            unit (channels)
=========  ==============================================================  ====================
hidden     the residual stream: embeddings, norms, every projection's      1
           hidden side, lm_head columns (one choice for the whole model)
heads      query heads of one layer (q rows, o columns; GPT-2: c_attn's    head_dim
           q, k and v columns and c_proj rows, as it has no GQA)
kv         key/value heads of one layer (Llama k/v rows)                   head_dim
inter      MLP channels of one layer                                       1
vocab      embedding and lm_head rows (never mapped here: the bridge)      1
pos        GPT-2's learned positions (wpe rows; only kept or cut)          1
=========  ==============================================================  ====================

Each axis has a role: ``copy`` (the tensor writes the dimension, or is an element-wise weight on it: rows are taken
or duplicated as they are) or ``read`` (the tensor sums over the dimension: on growth each copy of a channel is
divided by that channel's number of copies, so the sum is unchanged). The final norm is ``read`` on ``hidden``: its
weight (and bias) divided by the copy counts gives the same logits through a head whose columns were duplicated,
tied or not.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

FAMILIES = ("gpt2", "llama")

# config keys that must be equal between a model and the shape it is mapped to (a different value changes what the
# weights mean); the sizes themselves are mapped. Epsilons may differ.
MUST_MATCH = {
    "gpt2": ("activation_function", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention"),
    "llama": ("hidden_act", "attention_bias", "mlp_bias", "pretraining_tp"),
}


class MappingError(ValueError):
    """A pair of models or configs the maps refuse (the message says which key and what to change)."""


@dataclass(frozen=True)
class Shape:
    """The mapped sizes of one config."""

    family: str
    layers: int
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    positions: Optional[int]   # GPT-2's learned position rows; None under RoPE
    tied: bool
    biases: bool               # Llama attention_bias (q/k/v/o biases)
    mlp_biases: bool           # Llama mlp_bias

    def describe(self) -> str:
        kv = f"/{self.kv_heads} kv" if self.family == "llama" else ""
        return (f"{self.family}: {self.layers} layers, hidden {self.hidden}, intermediate {self.inter}, "
                f"{self.heads}{kv} heads of {self.head_dim}, vocab {self.vocab}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def family_of(config, what: str = "model") -> str:
    mt = getattr(config, "model_type", None)
    if mt not in FAMILIES:
        raise MappingError(f"the {what} is a {mt!r} model; chain-based initialisation maps {' and '.join(FAMILIES)} "
                           f"models only (docs/cbd.md, 'Families')")
    return mt


def shape_of(config, what: str = "model") -> Shape:
    """The :class:`Shape` of a Hugging Face config of a supported family."""
    fam = family_of(config, what)
    tied = bool(getattr(config, "tie_word_embeddings", True))
    if fam == "gpt2":
        hidden, heads = config.n_embd, config.n_head
        if hidden % heads:
            raise MappingError(f"the {what}'s n_embd={hidden} is not a multiple of n_head={heads}")
        return Shape(fam, config.n_layer, hidden, config.n_inner or 4 * hidden, heads, heads, hidden // heads,
                     config.vocab_size, config.n_positions, tied, True, True)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv:
        raise MappingError(f"the {what}'s num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(fam, config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads, kv, head_dim,
                 config.vocab_size, None, tied, bool(getattr(config, "attention_bias", False)),
                 bool(getattr(config, "mlp_bias", False)))


def _rope(config):
    rp = getattr(config, "rope_parameters", None)
    if rp is None:
        rp = {"rope_theta": getattr(config, "rope_theta", None), "rope_scaling": getattr(config, "rope_scaling", None)}
    return rp


def check_mappable(src_config, dst_config, src: str = "anchor", dst: str = "student") -> tuple[Shape, Shape]:
    """Refuse a pair the maps cannot join, before any weight is read: another family, another head size, another
    activation / RoPE / bias layout, another vocabulary, more learned positions. Returns both shapes."""
    a, b = shape_of(src_config, src), shape_of(dst_config, dst)
    if a.family != b.family:
        raise MappingError(f"the {src} is a {a.family} model and the {dst} a {b.family} model: weights map only "
                           f"within one architecture family; give a {dst} config of model_type {a.family!r}, or "
                           f"anchors of the {b.family} family (a chain may change family at a link, docs/cbd.md)")
    for key in MUST_MATCH[a.family]:
        va, vb = getattr(src_config, key, None), getattr(dst_config, key, None)
        if va != vb:
            raise MappingError(f"{key} differs: {va!r} in the {src}, {vb!r} in the {dst}; the weights of one do not "
                               f"mean the same in the other: set {key}: {va!r} in the {dst} config")
    if a.family == "gpt2" and getattr(src_config, "scale_attn_by_inverse_layer_idx", False) and a.layers != b.layers:
        raise MappingError("scale_attn_by_inverse_layer_idx=true ties each layer's attention scale to its index, so "
                           "layers cannot move: keep n_layer equal or use a config without it")
    if a.family == "llama" and _rope(src_config) != _rope(dst_config):
        raise MappingError(f"the RoPE parameters differ ({_rope(src_config)} in the {src}, {_rope(dst_config)} in the "
                           f"{dst}): copy rope_parameters from the {src} config into the {dst} config")
    if a.head_dim != b.head_dim:
        raise MappingError(f"head size {a.head_dim} in the {src} but {b.head_dim} in the {dst}: the maps keep the "
                           f"head size and change the number of heads (a head's channels are rotated together and "
                           f"scaled by 1/sqrt(head size)); give the {dst} "
                           + ("n_embd = n_head * " if a.family == "gpt2" else "head_dim = ") + f"{a.head_dim}")
    if a.vocab != b.vocab:
        raise MappingError(f"vocab_size {a.vocab} in the {src} but {b.vocab} in the {dst}: the maps never move the "
                           f"vocabulary; use the {src}'s vocab_size and tokenizer, or a bridge anchor in the chain "
                           f"(bridge: true, docs/cbd.md 'Bridge') for another tokenizer")
    if a.positions is not None and b.positions > a.positions:
        raise MappingError(f"n_positions={b.positions} in the {dst} exceeds the {src}'s {a.positions}: positions "
                           f"beyond the learned ones have no weights to map from; use n_positions <= {a.positions}")
    return a, b


@dataclass(frozen=True)
class Axis:
    axis: int
    dim: str        # hidden | heads | kv | qkv | inter | vocab | pos
    role: str       # copy | read


@dataclass(frozen=True)
class TensorSpec:
    source: str                 # the key to read in the source state dict (its layer index: the source layer)
    layer: Optional[int]        # this tensor's layer in its own model (None: outside the blocks)
    axes: tuple                 # of Axis


def _c(axis, dim):
    return Axis(axis, dim, "copy")


def _r(axis, dim):
    return Axis(axis, dim, "read")


def tensor_specs(shape: Shape, layer_source: Optional[list] = None) -> dict[str, TensorSpec]:
    """Every state-dict key of a model of ``shape`` -> where its values come from and which axis is which dimension.

    ``layer_source[j]`` is the source layer of layer ``j`` (default: itself). Keys of a tied head read the
    embedding, so a tied model's two keys get the same values.
    """
    src = layer_source if layer_source is not None else list(range(shape.layers))
    out: dict[str, TensorSpec] = {}

    def put(key, source, layer, *axes):
        out[key] = TensorSpec(source, layer, tuple(axes))

    if shape.family == "gpt2":
        emb = "transformer.wte.weight"
        put(emb, emb, None, _c(0, "vocab"), _c(1, "hidden"))
        put("transformer.wpe.weight", "transformer.wpe.weight", None, _c(0, "pos"), _c(1, "hidden"))
        for j in range(shape.layers):
            p, q = f"transformer.h.{j}.", f"transformer.h.{src[j]}."
            for ln in ("ln_1", "ln_2"):
                for t in ("weight", "bias"):
                    put(f"{p}{ln}.{t}", f"{q}{ln}.{t}", j, _c(0, "hidden"))
            put(f"{p}attn.c_attn.weight", f"{q}attn.c_attn.weight", j, _r(0, "hidden"), _c(1, "qkv"))
            put(f"{p}attn.c_attn.bias", f"{q}attn.c_attn.bias", j, _c(0, "qkv"))
            put(f"{p}attn.c_proj.weight", f"{q}attn.c_proj.weight", j, _r(0, "heads"), _c(1, "hidden"))
            put(f"{p}attn.c_proj.bias", f"{q}attn.c_proj.bias", j, _c(0, "hidden"))
            put(f"{p}mlp.c_fc.weight", f"{q}mlp.c_fc.weight", j, _r(0, "hidden"), _c(1, "inter"))
            put(f"{p}mlp.c_fc.bias", f"{q}mlp.c_fc.bias", j, _c(0, "inter"))
            put(f"{p}mlp.c_proj.weight", f"{q}mlp.c_proj.weight", j, _r(0, "inter"), _c(1, "hidden"))
            put(f"{p}mlp.c_proj.bias", f"{q}mlp.c_proj.bias", j, _c(0, "hidden"))
        for t in ("weight", "bias"):
            put(f"transformer.ln_f.{t}", f"transformer.ln_f.{t}", None, _r(0, "hidden"))
    else:
        emb = "model.embed_tokens.weight"
        put(emb, emb, None, _c(0, "vocab"), _c(1, "hidden"))
        for j in range(shape.layers):
            p, q = f"model.layers.{j}.", f"model.layers.{src[j]}."
            for name, dim in (("q_proj", "heads"), ("k_proj", "kv"), ("v_proj", "kv")):
                put(f"{p}self_attn.{name}.weight", f"{q}self_attn.{name}.weight", j, _c(0, dim), _r(1, "hidden"))
                if shape.biases:
                    put(f"{p}self_attn.{name}.bias", f"{q}self_attn.{name}.bias", j, _c(0, dim))
            put(f"{p}self_attn.o_proj.weight", f"{q}self_attn.o_proj.weight", j, _c(0, "hidden"), _r(1, "heads"))
            if shape.biases:
                put(f"{p}self_attn.o_proj.bias", f"{q}self_attn.o_proj.bias", j, _c(0, "hidden"))
            for name in ("gate_proj", "up_proj"):
                put(f"{p}mlp.{name}.weight", f"{q}mlp.{name}.weight", j, _c(0, "inter"), _r(1, "hidden"))
                if shape.mlp_biases:
                    put(f"{p}mlp.{name}.bias", f"{q}mlp.{name}.bias", j, _c(0, "inter"))
            put(f"{p}mlp.down_proj.weight", f"{q}mlp.down_proj.weight", j, _c(0, "hidden"), _r(1, "inter"))
            if shape.mlp_biases:
                put(f"{p}mlp.down_proj.bias", f"{q}mlp.down_proj.bias", j, _c(0, "hidden"))
            for ln in ("input_layernorm", "post_attention_layernorm"):
                put(f"{p}{ln}.weight", f"{q}{ln}.weight", j, _c(0, "hidden"))
        put("model.norm.weight", "model.norm.weight", None, _r(0, "hidden"))
    # the head reads its own weights, or the embedding's when this model ties them (then both keys agree)
    put("lm_head.weight", emb if shape.tied else "lm_head.weight", None, _c(0, "vocab"), _c(1, "hidden"))
    return out

