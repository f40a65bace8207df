"""Bridge: move an anchor to another tokenizer by token strings (docs/cbd.md, "Bridge").

The chain distils a *bridge anchor* first: the new anchor's architecture with its predecessor's tokenizer, so that
the link is ordinary distillation over one vocabulary. :func:`transfer_vocabulary` then gives it the new tokenizer.
For each token id of the new tokenizer, its embedding row and its head row come from, in this order:

1. ``kept``: the same token string in the old vocabulary (its two rows, as they are);
2. ``special``: a special token with the same role (``bos``, ``eos``, ``pad``, ``unk``) under another string;
3. ``pieces``: the mean of the rows of the tokens the old tokenizer splits the token's text into
   (``old.encode(new.convert_tokens_to_string([token]), add_special_tokens=False)``);
4. ``mean``: the mean of every old real row, for a token the old tokenizer encodes to nothing.

Head rows past ``len(new tokenizer)`` (a padded head) are zero: the trainer's softmaxes never include them. Nothing
else of the model changes. The paper names bridge distillation without saying how the vocabulary moves; this rule,
its order and the padded rows are our choices.
"""
from __future__ import annotations

import copy
import hashlib
import json

import torch

from .families import MappingError
from .mapping import build_model

SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


def vocab_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's token -> id table (equal tables, equal fingerprints)."""
    table = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha1(table.encode()).hexdigest()[:16]


def same_vocabulary(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def _embedding_keys(model) -> tuple[str, str]:
    """(embedding key, head key) of a model's state dict."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    sd = model.state_dict()
    ek = next(k for k, v in sd.items() if v.data_ptr() == emb.data_ptr() and k.endswith("weight")
              and "lm_head" not in k)
    hk = next(k for k, v in sd.items() if v.data_ptr() == head.data_ptr() and k.startswith("lm_head"))
    return ek, hk


def row_sources(old_tokenizer, new_tokenizer) -> list[tuple[str, list[int]]]:
    """For each new token id: (how, the old ids whose rows it averages) by the rule of the module docstring."""
    old_vocab = old_tokenizer.get_vocab()
    role_of = {}
    for role in SPECIAL_ROLES:
        tok_new, tok_old = getattr(new_tokenizer, role, None), getattr(old_tokenizer, role, None)
        if tok_new is not None and tok_old is not None and tok_old in old_vocab:
            role_of.setdefault(tok_new, old_vocab[tok_old])
    out = []
    for t in range(len(new_tokenizer)):
        s = new_tokenizer.convert_ids_to_tokens(t)
        if s in old_vocab:
            out.append(("kept", [old_vocab[s]]))
        elif s in role_of:
            out.append(("special", [role_of[s]]))
        else:
            pieces = old_tokenizer.encode(new_tokenizer.convert_tokens_to_string([s]), add_special_tokens=False)
            out.append(("pieces", list(pieces)) if pieces else ("mean", []))
    return out


@torch.no_grad()
def transfer_vocabulary(model, old_tokenizer, new_tokenizer, vocab_size=None):
    """``model`` (over ``old_tokenizer``) with its embedding and head moved to ``new_tokenizer``.

    Returns ``(new_model, stats)``: a model of the same config but ``vocab_size`` rows (default
    ``len(new_tokenizer)``) and the new tokenizer's special token ids, every tensor accounted for, and the count of
    rows made each way (``kept``, ``special``, ``pieces``, ``mean``, ``padding``).
    """
    n_new, n_old = len(new_tokenizer), len(old_tokenizer)
    vocab_size = int(vocab_size or n_new)
    if vocab_size < n_new:
        raise MappingError(f"vocab_size={vocab_size} is smaller than the new tokenizer ({n_new} tokens): give the "
                           f"anchor's config vocab_size >= {n_new}")
    rows_old = model.get_input_embeddings().weight.shape[0]
    if rows_old < n_old:
        raise MappingError(f"the bridge anchor has {rows_old} embedding rows for a tokenizer of {n_old} tokens")
    cfg = copy.deepcopy(model.config)
    cfg.vocab_size = vocab_size
    for role in ("bos", "eos", "pad"):
        setattr(cfg, f"{role}_token_id", getattr(new_tokenizer, f"{role}_token_id", None))
    ek, hk = _embedding_keys(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    tied = bool(getattr(cfg, "tie_word_embeddings", True))
    stats = {"kept": 0, "special": 0, "pieces": 0, "mean": 0, "padding": vocab_size - n_new,
             "old_tokens": n_old, "new_tokens": n_new}
    new_rows = {}
    for key in ((ek,) if tied else (ek, hk)):
        old = sd[key]
        real = old[:n_old].double()
        rows = torch.zeros(vocab_size, old.shape[1], dtype=torch.float64)
        for t, (how, ids) in enumerate(row_sources(old_tokenizer, new_tokenizer)):
            rows[t] = real[ids].mean(0) if ids else real.mean(0)
            if key == ek:
                stats[how] += 1
        new_rows[key] = rows.to(old.dtype)
    sd[ek] = new_rows[ek]
    sd[hk] = new_rows[ek] if tied else new_rows[hk]
    sources = {k: "bridge anchor (unchanged)" for k in sd}
    sources[ek] = sources[hk] = "vocabulary moved by token strings (bridge.transfer_vocabulary)"
    return build_model(cfg, sd, sources), stats
