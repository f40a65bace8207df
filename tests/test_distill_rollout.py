"""Rollouts (KV-cached teacher-mixed sampling) and the no-logits guarantee of the whole training path."""
from __future__ import annotations

import pytest
import torch
from distill_utils import ARCHS, config, workspace
from torch.utils._python_dispatch import TorchDispatchMode

from minillm_fast import reference
from minillm_fast.distill import data as D
from minillm_fast.distill import models, rollout
from minillm_fast.ops.sampling import MixtureSample, rollout_statistics


def _setup(arch, n=4):
    p = workspace(arch)
    tok = models.load_tokenizer(p["tokenizer"])
    student, teacher = models.load_model(p["student"]), models.load_model(p["teacher"], what="teacher")
    ex, _ = D.load_instructions(p["train_data"], tok, max_length=80, max_prompt_length=64)
    prompts = D.collate_prompts(ex[:n], tok.pad_token_id)
    assert prompts["attention_mask"].min() == 0, "want left padding in the batch"
    return tok, student, teacher, prompts


def _forced_eos(monkeypatch, eos: int, eos_at: dict):
    """Make row r emit EOS at step eos_at[r] (log-probs recomputed for the forced tokens)."""
    real, step = rollout.mixture_sample, {"n": 0}

    def forced(hs, ws, ht, wt, **kw):
        out = real(hs, ws, ht, wt, **kw)
        tokens = out.tokens.clone()
        for row, at in eos_at.items():
            if step["n"] == at:
                tokens[row] = eos
            elif tokens[row] == eos:                  # keep EOS only where forced
                tokens[row] = eos + 1
        step["n"] += 1
        st = rollout_statistics(hs, ws, ht, wt, tokens, alpha=kw["alpha"], vocab_size=kw["vocab_size"])
        return MixtureSample(tokens, st.student_logprobs, st.teacher_logprobs, st.mixture_logprobs)

    monkeypatch.setattr(rollout, "mixture_sample", forced)


@pytest.mark.parametrize("arch", ARCHS)
def test_rollout_stops_at_eos_and_matches_full_forward(arch, monkeypatch):
    tok, student, teacher, prompts = _setup(arch)
    eos, pad, vocab = tok.eos_token_id, tok.pad_token_id, len(tok)
    _forced_eos(monkeypatch, eos, {0: 1, 1: 3, 2: 0, 3: 2})
    ro = rollout.generate(student, teacher, prompts["input_ids"], prompts["attention_mask"], max_new_tokens=8,
                          eos_token_id=eos, pad_token_id=pad, alpha=0.2, generator=torch.Generator().manual_seed(0),
                          vocab_size=vocab, keep_teacher_hidden=True, with_reverse_kl=True)
    # every row has stopped after step 3, so the loop ends there (no wasted steps)
    assert ro.response_ids.shape == (4, 4)
    assert ro.lengths.tolist() == [2, 4, 1, 3]
    for i, n in enumerate(ro.lengths.tolist()):
        assert ro.response_ids[i, n - 1] == eos and (ro.response_ids[i, n:] == pad).all()
        assert (ro.response_ids[i, :n - 1] != eos).all()
        assert ro.response_mask[i].tolist() == [True] * n + [False] * (4 - n)
        assert (ro.student_logprobs[i, n:] == 0).all()

    # per-token statistics straight from the sampler = a full no-cache forward over the final sequences
    full = torch.cat([ro.prompt_ids, ro.response_ids], 1)
    mask = torch.cat([ro.prompt_mask, ro.response_mask.long()], 1)
    p, r = ro.prompt_ids.shape[1], ro.response_ids.shape[1]
    hs = models.hidden_states(student, full, mask)[:, p - 1:p + r - 1]
    ht = models.hidden_states(teacher, full, mask)[:, p - 1:p + r - 1]
    ref = reference.rollout_statistics(hs, student.lm_head.weight, ht, teacher.lm_head.weight, ro.response_ids,
                                       alpha=0.2, vocab_size=vocab)
    m = ro.response_mask
    for got, want in ((ro.student_logprobs, ref.student_logprobs), (ro.teacher_logprobs, ref.teacher_logprobs),
                      (ro.mixture_logprobs, ref.mixture_logprobs), (ro.reverse_kl, ref.reverse_kl),
                      (ro.importance_weight, ref.importance_weight)):
        torch.testing.assert_close(got[m], want[m], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ro.teacher_hidden[m], ht[m], atol=2e-5, rtol=1e-5)

    # a left-padded row sees the same states as the prompt alone
    i = int(prompts["attention_mask"].sum(-1).argmin())
    alone = ro.prompt_ids[i][ro.prompt_mask[i].bool()].unsqueeze(0)
    h_alone = models.hidden_states(student, alone)
    h_pad = models.hidden_states(student, ro.prompt_ids[i:i + 1], ro.prompt_mask[i:i + 1])
    torch.testing.assert_close(h_pad[0, -alone.shape[1]:], h_alone[0], atol=1e-5, rtol=1e-5)

    # unbatch / collate round trip (the rollout buffer's storage)
    back = rollout.collate_rows(ro.unbatch(), pad)
    assert torch.equal(back.response_ids, ro.response_ids) and torch.equal(back.prompt_ids, ro.prompt_ids)
    torch.testing.assert_close(back.teacher_hidden, ro.teacher_hidden * m[..., None])


def test_rollout_lengths_and_single_model_modes():
    tok, student, teacher, prompts = _setup("gpt2")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    kw = dict(max_new_tokens=5, eos_token_id=eos, pad_token_id=pad, vocab_size=len(tok))
    a = rollout.generate(student, teacher, prompts["input_ids"], prompts["attention_mask"],
                         generator=torch.Generator().manual_seed(1), **kw)
    b = rollout.generate(student, teacher, prompts["input_ids"], prompts["attention_mask"],
                         generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a.response_ids, b.response_ids)               # seeded: reproducible
    assert a.response_ids.shape[1] <= 5 and (a.lengths <= 5).all() and (a.lengths >= 1).all()
    t = rollout.generate(None, teacher, prompts["input_ids"], prompts["attention_mask"],
                         generator=torch.Generator().manual_seed(1), **kw)
    assert t.student_logprobs is None and t.teacher_logprobs is not None and t.mixture_logprobs is None
    s = rollout.generate(student, None, prompts["input_ids"], prompts["attention_mask"],
                         generator=torch.Generator().manual_seed(1), **kw)
    assert s.teacher_logprobs is None and (s.student_logprobs <= 0).all()
    assert student.training is False or student.training is True   # mode restored (checked below)
    student.train()
    rollout.generate(student, None, prompts["input_ids"], prompts["attention_mask"], **kw)
    assert student.training


class _NoVocabTensors(TorchDispatchMode):
    """Fails on any newly allocated tensor whose last dimension is a vocabulary size and that has more than
    ``max_rows`` rows (views of the lm_head weight, which share its storage, are not allocations). Counts the calls
    of the package's fused ops (``minillm_fast::*``), whose insides this mode does not see."""

    def __init__(self, vocab_sizes, max_rows):
        super().__init__()
        self.vocab_sizes, self.max_rows, self.fused_calls = set(vocab_sizes), max_rows, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "minillm_fast":
            self.fused_calls += 1
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs if a.device.type != "meta"}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] in self.vocab_sizes:
                if t.untyped_storage().data_ptr() in storages:
                    continue
                rows = t.numel() // t.shape[-1]
                if rows > self.max_rows:
                    raise AssertionError(f"{func} allocated a {tuple(t.shape)} tensor (> {self.max_rows} rows of "
                                         f"vocabulary)")
        return out


def _record_chunks(monkeypatch) -> list:
    """Rows of every vocabulary-wide block the fused ops make inside (torch backend: the scaled logits of a chunk;
    native backend: the chunk size it is handed)."""
    from minillm_fast import chunked
    from minillm_fast.backends import torch as torch_backend

    rows = []

    def wrap_logits(real):
        def scaled_logits(h, *a, **k):
            rows.append(h.shape[0])
            return real(h, *a, **k)
        return scaled_logits

    monkeypatch.setattr(torch_backend, "scaled_logits", wrap_logits(torch_backend.scaled_logits))
    real_rows = chunked.default_chunk_rows

    def default_chunk_rows(*a, **k):
        rows.append(real_rows(*a, **k))
        return rows[-1]

    monkeypatch.setattr(chunked, "default_chunk_rows", default_chunk_rows)
    return rows


def _forbid_logits(monkeypatch, *model_dirs):
    """Any call of a causal LM's forward or of an lm_head raises."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    def boom(*a, **k):
        raise AssertionError("logits were requested: the training path must run on hidden states")

    for cls in (GPT2LMHeadModel, LlamaForCausalLM):
        monkeypatch.setattr(cls, "forward", boom)
    real_linear = torch.nn.Linear.forward

    def linear(self, x):
        if self.out_features >= 440:      # the toy vocabulary (440 tokens, heads padded to 512)
            boom()
        return real_linear(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", linear)


@pytest.mark.parametrize("method", ["minillm", "kd"])
def test_training_never_materialises_logits(tmp_path, monkeypatch, method):
    """A MiniLLM step (rollouts, PPO, single-step reverse KL, PT term, evaluation with sampling) and a KD step with
    the models' lm_head and CausalLM forward disabled, no tensor of more than 16 vocabulary-wide rows allocated outside
    the fused ops, and inside them chunks of at most 16 rows (capped here through MINILLM_FAST_CHUNK_BYTES), while the
    batches hold 8 rows x ~70 positions."""
    from minillm_fast.distill.trainer import Trainer

    chunks = _record_chunks(monkeypatch)
    cfg = config(tmp_path, method=method, total_iters=2, eval_interval=2, eval_generate=True, pt_batch_size=4,
                 cache_teacher_hidden=False)
    trainer = Trainer(cfg)  # loading probes each model once through model(...).logits (8 positions, distill/heads.py)
    chunks.clear()
    _forbid_logits(monkeypatch)
    # 16 rows of the real vocabulary for the native backend (2 fp32 row temporaries), 2 for the torch backend (12)
    monkeypatch.setenv("MINILLM_FAST_CHUNK_BYTES", str(16 * len(trainer.tokenizer) * 4 * 2))
    guard = _NoVocabTensors({512, len(trainer.tokenizer)}, max_rows=16)
    with guard:
        last = trainer.train()
    assert last["train/loss"] == last["train/loss"] and "eval/loss" in last      # ran, finite
    assert guard.fused_calls > 0 and chunks and max(chunks) <= 16
