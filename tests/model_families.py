"""Tiny random causal LMs of many Hugging Face families, for tests/test_model_families.py.

:func:`build` makes one from ``AutoConfig.for_model(model_type, ...)`` (2 layers, hidden 32, 4 heads; the head padded
to ``rows`` rows above the real vocabulary ``vocab``) with the family's logit transform set to a value that matters
(``variant`` 1 gives a second model of the family with other values, another seed and an untied head). Then:

* the head is rescaled so that the model's own logits spread over several nats on the real vocabulary (a random
  model's are ~0.1, where a missing scale or softcap would not show);
* the padded rows (and bias entries) are made large, so a path that let them into a softmax would be far off.

Every number in the tests is compared with ``model(...).logits``: the model's own forward is the truth.
"""
from __future__ import annotations

import importlib

import torch

VOCAB = 97        # the real vocabulary
ROWS = 104        # rows of the (padded) head: config.vocab_size
HIDDEN = 32
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
LOGIT_STD = 3.5   # spread (std over the real vocabulary) of the rescaled models' logits

# family -> (transformers.models module, model_type, tiny config kwargs, {variant: transform kwargs})
_ATTN = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "gpt2": ("gpt2", "gpt2", dict(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128), {}),
    "llama": ("llama", "llama", dict(_ATTN, tie_word_embeddings=False), {}),
    "qwen2": ("qwen2", "qwen2", dict(_ATTN), {}),
    "qwen3": ("qwen3", "qwen3", dict(_ATTN, head_dim=8), {}),
    "mistral": ("mistral", "mistral", dict(_ATTN, head_dim=8, sliding_window=8), {}),
    "gemma": ("gemma", "gemma", dict(_ATTN, head_dim=8), {}),
    "gemma2": ("gemma2", "gemma2", dict(_ATTN, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                                        attn_logit_softcapping=20.0),
               {0: dict(final_logit_softcapping=5.0), 1: dict(final_logit_softcapping=8.0)}),
    "gemma3": ("gemma3", "gemma3_text", dict(_ATTN, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                                             layer_types=["sliding_attention", "full_attention"]),
               {0: dict(final_logit_softcapping=5.0), 1: dict(final_logit_softcapping=12.0)}),
    "cohere": ("cohere", "cohere", dict(_ATTN),
               {0: dict(logit_scale=0.25), 1: dict(logit_scale=2.0)}),
    "cohere2": ("cohere2", "cohere2", dict(_ATTN, sliding_window=8),
                {0: dict(logit_scale=0.25), 1: dict(logit_scale=3.0)}),
    "granite": ("granite", "granite", dict(_ATTN, embedding_multiplier=2.0, residual_multiplier=0.5,
                                           attention_multiplier=0.2),
                {0: dict(logits_scaling=4.0), 1: dict(logits_scaling=0.5)}),
    "granitemoe": ("granitemoe", "granitemoe", dict(_ATTN, num_local_experts=4, num_experts_per_tok=2,
                                                    embedding_multiplier=2.0, residual_multiplier=0.5),
                   {0: dict(logits_scaling=4.0), 1: dict(logits_scaling=0.25)}),
    "falcon_h1": ("falcon_h1", "falcon_h1", dict(_ATTN, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                                                 mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                                                 mamba_chunk_size=4, embedding_multiplier=1.5),
                  {0: dict(lm_head_multiplier=0.5), 1: dict(lm_head_multiplier=3.0)}),
    "minicpm3": ("minicpm3", "minicpm3", dict(_ATTN, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8,
                                              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, scale_emb=2.0,
                                              scale_depth=1.4),
                 # hidden states are divided by logits_scaling = hidden_size / dim_model_base before the head
                 {0: dict(dim_model_base=8), 1: dict(dim_model_base=64)}),
    "phi": ("phi", "phi", dict(_ATTN, num_key_value_heads=4, partial_rotary_factor=0.5), {}),
    "opt": ("opt", "opt", dict(hidden_size=HIDDEN, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                               word_embed_proj_dim=16, max_position_embeddings=128, dropout=0.0), {}),
    "gpt_neox": ("gpt_neox", "gpt_neox", dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, max_position_embeddings=128,
                                              rotary_pct=0.5), {}),
    "gptj": ("gptj", "gptj", dict(n_embd=HIDDEN, n_layer=2, n_head=4, rotary_dim=4, n_positions=128), {}),
    "hyperclovax": ("hyperclovax", "hyperclovax", dict(_ATTN, embedding_multiplier=2.0, residual_multiplier=0.5),
                    {0: dict(logits_scaling=2.0), 1: dict(logits_scaling=0.3)}),
}
# the families whose logit transform the package reads from the config
WITH_TRANSFORM = tuple(f for f, spec in FAMILIES.items() if spec[3])


def available(family: str) -> bool:
    try:
        importlib.import_module(f"transformers.models.{FAMILIES[family][0]}")
    except ImportError:
        return False
    from transformers import CONFIG_MAPPING

    return FAMILIES[family][1] in CONFIG_MAPPING


def config(family: str, variant: int = 0, rows: int = ROWS):
    from transformers import AutoConfig

    _, model_type, kwargs, transforms = FAMILIES[family]
    kw = dict(kwargs, **transforms.get(variant, {}), **SPECIAL, vocab_size=rows)
    if variant == 1:
        # untied: a tied head's logits peak at the input token in every random model alike, so two random tied
        # models barely disagree; an untied head makes the second model's distributions its own
        kw["tie_word_embeddings"] = False
    return AutoConfig.for_model(model_type, **kw)


@torch.no_grad()
def build(family: str, variant: int = 0, *, dtype=torch.float64, vocab: int = VOCAB, rows: int = ROWS,
          seed: int = 0, logit_std: float = LOGIT_STD):
    """A tiny random ``family`` causal LM in ``dtype``, eval mode, its head rescaled and its padded rows loud."""
    from transformers import AutoModelForCausalLM

    cfg = config(family, variant, rows)
    torch.manual_seed(1000 * variant + seed + 17)
    kw = dict(experts_implementation="eager") if hasattr(cfg, "num_local_experts") else {}  # grouped_mm: no float64
    model = AutoModelForCausalLM.from_config(cfg, **kw).to(dtype).eval()
    head = model.get_output_embeddings()
    w, b = head.weight, getattr(head, "bias", None)
    if b is not None:                      # a random bias, so that it matters
        b.normal_(0.0, 0.5)
    gen = torch.Generator().manual_seed(variant + seed)
    ids = torch.randint(3, vocab, (2, 12), generator=gen)
    for _ in range(4):                     # logits' spread -> logit_std (a few steps: softcaps and tied heads bend it)
        z = model(input_ids=ids).logits[..., :vocab]
        factor = logit_std / z.std().item()
        w[:vocab].mul_(factor)
        if b is not None:
            b[:vocab].mul_(factor)
    # padded rows: large, so a path that let them into a softmax would be far off
    w[vocab:] = torch.randn(rows - vocab, w.shape[1], generator=gen, dtype=torch.float64).to(w) \
        * (20 * w[:vocab].norm(dim=1).mean())
    if b is not None:
        b[vocab:] = 50.0
    return model


def logits(model, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """The model's own logits ``[B, T, V_pad]`` (the truth of every comparison)."""
    kw = {} if position_ids is None else dict(position_ids=position_ids)
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).logits
