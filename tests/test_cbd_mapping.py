"""Chain-based distillation, the maps and the interpolation (minillm_fast/distill/cbd/, docs/cbd.md): no training.

* Identity: an anchor mapped to its own config is itself; interpolating an anchor with itself returns it; ``a = 0``
  and ``a = 1`` return the mapped big and small anchors exactly.
* Depth and width maps on GPT-2 and Llama configs (shrink, grow, both, GQA) give models that load strictly, with
  every tensor of the student's state dict given by the map (a missing one is an error, not a random tensor).
* Growth (HyperCloning) computes the same logits as the anchor, to ~1e-5 in fp32, tied and untied heads.
* Shrinking keeps the channels of highest importance; grouped-query attention keeps every query head with (a copy
  of) its own key/value head.
* Configs the maps cannot join are refused with a ValueError naming the key.
"""
from __future__ import annotations

import pytest
import torch

from minillm_fast.distill.cbd import families, interpolate as interp, mapping
from minillm_fast.distill.cbd.families import MappingError

pytestmark = pytest.mark.usefixtures("single_thread")

V = 61


def gpt2(hidden=32, layers=2, heads=2, inner=None, tie=True, positions=64, **kw):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=V, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=inner, n_positions=positions,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)


def llama(hidden=32, layers=2, heads=4, kv=2, inter=48, tie=False, head_dim=8, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tie,
                       max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)


@torch.no_grad()
def model_of(config, seed=0):
    """A random model with every weight, bias and norm weight random (so that each of them matters)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(config).eval()
    for name, p in m.named_parameters():
        if p.dim() == 1:
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if "weight" in name else 0.1 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.3 if ("wte" in name or "embed" in name or "wpe" in name) else 0.15)
    return m


def ids(n=2, t=12, seed=0):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def mapped(src_model, dst_config, importance="norm"):
    res = mapping.map_model(src_model, dst_config, importance)
    return res, mapping.build_model(dst_config, res.state_dict, res.sources).eval()


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------------------------------
# identity and interpolation end points
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [gpt2(), gpt2(tie=False), llama(), llama(tie=True)], ids=["gpt2", "gpt2-untied",
                                                                                             "llama", "llama-tied"])
def test_identity_map_and_self_interpolation(cfg):
    m = model_of(cfg)
    res = mapping.map_model(m, cfg)
    assert res.exact and res.layers == list(range(cfg.num_hidden_layers))
    assert_same_state(res.state_dict, m.state_dict())
    for a in (0.0, 0.3, 1.0):
        assert_same_state(interp.interpolate(res.state_dict, res.state_dict, a), m.state_dict())


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_alpha_end_points_return_the_mapped_anchors(fam):
    big_cfg, small_cfg, student = ((gpt2(64, 3, 4), gpt2(32, 2, 2), gpt2(48, 2, 3)) if fam == "gpt2" else
                                   (llama(64, 3, 8, 4, 96), llama(32, 2, 4, 2, 48), llama(48, 2, 6, 3, 64)))
    big = mapping.map_model(model_of(big_cfg, 1), student).state_dict
    small = mapping.map_model(model_of(small_cfg, 2), student).state_dict
    assert_same_state(interp.interpolate(big, small, 0.0), big)
    assert_same_state(interp.interpolate(big, small, 1.0), small)
    mid = interp.interpolate(big, small, 0.25)
    for k in mid:
        torch.testing.assert_close(mid[k], 0.75 * big[k] + 0.25 * small[k])
    with pytest.raises(ValueError, match="alpha=1.5"):
        interp.interpolate(big, small, 1.5)


def test_default_alpha_is_the_normalised_parameter_count_difference():
    assert interp.default_alpha(200, 100, 150) == 0.5
    assert interp.default_alpha(200, 100, 200) == 0.0 and interp.default_alpha(200, 100, 100) == 1.0
    assert interp.default_alpha(100, 100, 100) == 0.0
    from transformers import AutoModelForCausalLM

    for cfg in (gpt2(), gpt2(tie=False), llama(tie=True)):
        assert interp.param_count(cfg) == sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())


# ----------------------------------------------------------------------------------------------------------------------
# depth and width maps: loadable, fully populated, the documented layers and channels
# ----------------------------------------------------------------------------------------------------------------------
def test_depth_map_is_evenly_spaced_and_repeats_in_place():
    assert mapping.depth_map(4, 2) == [0, 3]
    assert mapping.depth_map(6, 3) == [0, 3, 5]
    assert mapping.depth_map(5, 5) == [0, 1, 2, 3, 4]
    assert mapping.depth_map(2, 4) == [0, 0, 1, 1]
    assert mapping.depth_map(3, 1) == [0]
    for old in range(1, 8):
        for new in range(2, 10):
            m = mapping.depth_map(old, new)
            assert m[0] == 0 and m[-1] == old - 1 and m == sorted(m)
            if new <= old:
                assert len(set(m)) == new


PAIRS = {
    "gpt2-shrink-depth-width": (gpt2(64, 4, 4), gpt2(32, 2, 2)),
    "gpt2-grow-depth-shrink-width": (gpt2(64, 2, 4, tie=False), gpt2(48, 3, 3, inner=100, tie=False)),
    "gpt2-untied-to-tied": (gpt2(32, 2, 2, tie=False), gpt2(48, 2, 3)),
    "llama-shrink": (llama(64, 4, 8, 4, 96), llama(32, 2, 4, 2, 48)),
    "llama-grow-depth": (llama(32, 2, 4, 2, 48), llama(48, 5, 6, 3, 80)),
    "llama-gqa-groups-change": (llama(64, 2, 8, 2, 64), llama(48, 2, 6, 3, 64)),
    "llama-biases": (llama(64, 2, 8, 4, 64, attention_bias=True, mlp_bias=True),
                     llama(32, 3, 4, 2, 40, attention_bias=True, mlp_bias=True)),
}


@pytest.mark.parametrize("pair", list(PAIRS), ids=list(PAIRS))
def test_maps_give_loadable_fully_populated_models(pair):
    src_cfg, dst_cfg = PAIRS[pair]
    src = model_of(src_cfg)
    res, dst = mapped(src, dst_cfg)
    own = dst.state_dict()
    assert set(res.sources) == set(own) == set(res.state_dict)
    for k, v in own.items():
        assert torch.equal(v, res.state_dict[k]), k        # every tensor is the map's, none a random init
        assert torch.isfinite(v).all(), k
    # the model runs
    assert torch.isfinite(dst(ids()).logits).all()
    # each student layer is the documented anchor layer
    b = families.shape_of(dst_cfg)
    assert res.layers == mapping.depth_map(families.shape_of(src_cfg).layers, b.layers)
    if dst_cfg.tie_word_embeddings:
        assert torch.equal(own["lm_head.weight"], next(v for k, v in own.items() if "wte" in k or "embed" in k))


def test_a_missing_tensor_is_an_error_not_a_random_init():
    res = mapping.map_model(model_of(gpt2(64, 2, 4)), gpt2(32, 2, 2))
    sd = dict(res.state_dict)
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(MappingError, match="c_fc.bias"):
        mapping.build_model(gpt2(32, 2, 2), sd)
    sources = dict(res.sources)
    del sources["transformer.ln_f.weight"]
    with pytest.raises(MappingError, match="unaccounted"):
        mapping.build_model(gpt2(32, 2, 2), res.state_dict, sources)


def test_pure_depth_map_copies_the_chosen_layers():
    src = model_of(llama(32, 4, 4, 2, 48))
    res = mapping.map_model(src, llama(32, 2, 4, 2, 48))
    sd = src.state_dict()
    assert res.layers == [0, 3]
    for k, v in res.state_dict.items():
        s = k.replace("layers.1.", "layers.3.")
        assert torch.equal(v, sd[s]), k


def test_leading_importance_keeps_the_first_channels():
    src = model_of(gpt2(64, 2, 4, tie=False))
    res = mapping.map_model(src, gpt2(32, 2, 2, tie=False), importance="leading")
    sd = src.state_dict()
    assert torch.equal(res.state_dict["transformer.wte.weight"], sd["transformer.wte.weight"][:, :32])
    assert torch.equal(res.state_dict["transformer.ln_f.bias"], sd["transformer.ln_f.bias"][:32])
    # c_attn [H, 3H]: hidden rows 0..31, the first two heads (columns 0..31) of each of q, k, v
    cols = torch.cat([torch.arange(32) + 64 * i for i in range(3)])
    assert torch.equal(res.state_dict["transformer.h.0.attn.c_attn.weight"],
                       sd["transformer.h.0.attn.c_attn.weight"][:32][:, cols])
    assert torch.equal(res.state_dict["transformer.h.1.mlp.c_proj.weight"],
                       sd["transformer.h.1.mlp.c_proj.weight"][:128, :32])


@torch.no_grad()
def test_norm_importance_keeps_the_same_strongest_channels_everywhere():
    src = model_of(llama(64, 2, 8, 4, 96))
    weak_hidden = torch.tensor([3, 10, 17, 40, 41, 50, 60, 62])       # 8 of 64: scaled down in every tensor
    weak_inter = torch.arange(0, 96, 3)                              # 32 of 96 in layer 1
    for name, p in src.named_parameters():
        if "embed" in name or "lm_head" in name or "norm" in name or "o_proj" in name or "down_proj" in name:
            p.index_fill_(p.dim() - 1 if ("embed" in name or "lm_head" in name) else 0, weak_hidden, 1e-3) \
                if p.dim() == 2 else p.index_fill_(0, weak_hidden, 1e-3)
        elif p.dim() == 2:      # q/k/v, gate/up: [out, hidden]
            p.index_fill_(1, weak_hidden, 1e-3)
        if "layers.1.mlp" in name:
            p.index_fill_(0 if "down" not in name else 1, weak_inter, 1e-3)
    res = mapping.map_model(src, llama(56, 2, 8, 4, 64))
    keep = torch.tensor([c for c in range(64) if c not in weak_hidden.tolist()])
    sd = src.state_dict()
    assert torch.equal(res.state_dict["model.norm.weight"], sd["model.norm.weight"][keep])
    assert torch.equal(res.state_dict["model.embed_tokens.weight"], sd["model.embed_tokens.weight"][:, keep])
    keep_i = torch.tensor([c for c in range(96) if c % 3])
    assert torch.equal(res.state_dict["model.layers.1.mlp.down_proj.weight"],
                       sd["model.layers.1.mlp.down_proj.weight"][keep][:, keep_i])


@pytest.mark.parametrize("combo", [(8, 4, 4, 2), (8, 2, 4, 1), (8, 2, 6, 3), (4, 2, 8, 8), (4, 2, 12, 6),
                                   (8, 4, 8, 2), (8, 8, 4, 4), (4, 1, 8, 4)],
                         ids=lambda c: f"{c[0]}q{c[1]}kv-to-{c[2]}q{c[3]}kv")
def test_gqa_query_heads_stay_with_their_kv_heads(combo):
    h, kv, h2, kv2 = combo
    a = families.Shape("llama", 1, h * 8, 16, h, kv, 8, V, None, False, False, False)
    b = families.Shape("llama", 1, h2 * 8, 16, h2, kv2, 8, V, None, False, False, False)
    q, k = mapping.head_maps(a, b, torch.rand(h, generator=torch.Generator().manual_seed(h2)), torch.rand(kv), "norm")
    assert q.new == h2 and k.new == kv2
    g, g2 = h // kv, h2 // kv2
    for j, src_head in enumerate(q.src.tolist()):
        assert src_head // g == k.src[j // g2].item()      # the query head's own kv group
    if h2 >= h and kv2 >= kv:
        assert q.covers and k.covers                      # growth loses no head


# ----------------------------------------------------------------------------------------------------------------------
# HyperCloning: growth computes the same function
# ----------------------------------------------------------------------------------------------------------------------
GROW = {
    "gpt2-x2-tied": (gpt2(32, 2, 2), gpt2(64, 2, 4)),
    "gpt2-x2-untied-odd-mlp": (gpt2(32, 2, 2, tie=False), gpt2(64, 2, 4, inner=200, tie=False)),
    "gpt2-x3": (gpt2(32, 2, 2), gpt2(96, 2, 6)),
    "llama-x2": (llama(32, 2, 4, 2, 48), llama(64, 2, 8, 4, 96)),
    "llama-x2-tied-more-heads": (llama(32, 2, 4, 2, 48, tie=True), llama(64, 2, 16, 4, 80, tie=True)),
    "llama-x3-kv-groups-split": (llama(32, 2, 4, 2, 48), llama(96, 2, 8, 8, 48)),
}


@pytest.mark.parametrize("pair", list(GROW), ids=list(GROW))
def test_hypercloning_growth_preserves_the_logits(pair):
    src_cfg, dst_cfg = GROW[pair]
    src = model_of(src_cfg, 3)
    res, dst = mapped(src, dst_cfg)
    assert res.exact
    x = ids(3, 16)
    with torch.no_grad():
        want, got = src(x).logits, dst(x).logits
    assert want.abs().max() > 1.0       # logits that are not all near zero
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_growth_by_a_fraction_is_reported_as_not_function_preserving():
    res = mapping.map_model(model_of(gpt2(32, 2, 2)), gpt2(48, 2, 3))
    assert not res.exact and any("not a whole multiple" in n for n in res.notes)
    res = mapping.map_model(model_of(gpt2(32, 2, 2)), gpt2(64, 3, 4))
    assert not res.exact and any("layers 2->3" in n for n in res.notes)


# ----------------------------------------------------------------------------------------------------------------------
# configs the maps refuse
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("src,dst,match", [
    (gpt2(), llama(), "gpt2 model and the student a llama model"),
    (gpt2(32, 2, 2), gpt2(32, 2, 4), "head size 16"),
    (llama(head_dim=8), llama(64, 2, 4, 2, 48, head_dim=16), "head size 8"),
    (gpt2(), gpt2(positions=128), "n_positions=128"),
    (gpt2(), gpt2(activation_function="relu"), "activation_function differs"),
    (llama(), llama(rope_theta=500000.0), "RoPE"),
    (llama(), llama(attention_bias=True), "attention_bias differs"),
], ids=["family", "gpt2-head-size", "llama-head-size", "positions", "activation", "rope", "bias"])
def test_unmappable_pairs_are_refused(src, dst, match):
    with pytest.raises(ValueError, match=match):
        mapping.map_model(model_of(src), dst)


def test_other_vocabulary_and_family_are_refused():
    with pytest.raises(ValueError, match="bridge"):
        mapping.map_model(model_of(gpt2()), gpt2(32).__class__(**{**gpt2().to_dict(), "vocab_size": 80}))
    from transformers import AutoConfig

    with pytest.raises(ValueError, match="maps gpt2 and llama models only"):
        families.shape_of(AutoConfig.for_model("opt", hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                               num_attention_heads=2), "anchor")
    with pytest.raises(ValueError, match="importance"):
        mapping.map_model(model_of(gpt2()), gpt2(), importance="random")
