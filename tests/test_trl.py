"""minillm_fast.integrations.trl against TRL's own losses (TRL installed by the ``test`` extra).

* ``generalized_jsd_loss`` equals TRL's ``GKDTrainer.generalized_jsd_loss`` on the models' logits, loss and
  gradients, in float64, for beta in {0, 0.1, 0.5, 0.9, 1}, temperature 1 and 2, with prompt tokens masked, for plain,
  padded-head and softcapped models; and each of TRL's reductions.
* One optimiser step of ``GKDTrainer`` with gradient accumulation 2 gives the same parameters with the fused loss as
  with TRL's (SGD, so a wrong normalisation shows in the update), and the fused run never calls an lm_head nor
  allocates a vocabulary-wide tensor of more than a few rows.
* ``DistillationTrainer.compute_loss`` (TRL's outer method, our ``_compute_loss``) equals TRL's, gradients included.
* ``MiniLLMTrainer`` (TRL <= 1.14 only; skipped otherwise) likewise.

Tiny random Llama / Gemma 2 models from configs, a word-level tokenizer made in memory; no download.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

trl = pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from minillm_fast.distill.hf import final_hidden  # noqa: E402
from minillm_fast.integrations import trl as fused_trl  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

V = 101                      # the tokenizer's vocabulary (distinct from every hidden width)
V_PAD = 128                  # a padded head's rows


def _llama(hidden: int, seed: int, rows: int = V, dtype=torch.float64, spread: float = 1.0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=rows, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)
    return _spread(LlamaForCausalLM(cfg).to(dtype), spread)


def _gemma2(hidden: int, seed: int, softcap: float, dtype=torch.float64, spread: float = 1.0):
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=softcap,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    return _spread(Gemma2ForCausalLM(cfg).to(dtype), spread)


def _spread(model, factor: float):
    """Scale the head so logits spread over several nats (a random init's are ~0.1: every divergence ~0)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model.eval()


def _batch(seed: int = 0, b: int = 3, t: int = 9):
    """Right-padded rows with prompts of different lengths (labels -100 on prompt and padding, as GKD's collator)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, t), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for i, (prompt, length) in enumerate([(3, t), (2, t - 2), (4, t - 1)][:b]):
        mask[i, length:] = 0
        ids[i, length:] = 0
        labels[i, :prompt] = -100
        labels[i, length:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


CASES = {
    # name: (student, teacher, vocab_size for the fused loss, columns of TRL's logits)
    "plain": lambda: (_llama(16, 1, spread=40.0), _llama(24, 2, spread=40.0), None, V),
    "padded-head": lambda: (_llama(16, 3, rows=V_PAD, spread=40.0), _llama(24, 4, rows=V_PAD, spread=40.0), V, V),
    "softcap": lambda: (_gemma2(16, 5, softcap=3.0, spread=4.0), _llama(24, 6, spread=40.0), None, V),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    student, teacher, vocab, cols = CASES[request.param]()
    batch = _batch()
    with torch.no_grad():
        ht = final_hidden(teacher, batch["input_ids"], batch["attention_mask"], position_ids=None)[:, :-1]
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return request.param, student, teacher, vocab, cols, batch, ht, t_logits[..., :cols]


def _grads(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_loss_equals_trl(pair, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    name, student, teacher, vocab, cols, batch, ht, t_logits = pair
    labels = batch["labels"][:, 1:]
    params = [p for p in student.parameters()]
    hs = final_hidden(student, batch["input_ids"], batch["attention_mask"], position_ids=None)[:, :-1]
    ours = fused_trl.generalized_jsd_loss(hs, student, ht, teacher, labels=labels, beta=beta,
                                          temperature=temperature, vocab_size=vocab)
    g_ours = _grads(ours, params)
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    want = GKDTrainer.generalized_jsd_loss(s_logits[..., :cols], t_logits, labels=labels, beta=beta,
                                           temperature=temperature)
    g_want = _grads(want, params)
    assert ours.dtype == torch.float64
    assert want.item() > 1e-3, "inputs too flat to test anything"
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-9)
    for (n, _), a, b in zip(student.named_parameters(), g_ours, g_want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9 * max(1.0, b.abs().max().item()), msg=n)


def test_reductions_equal_trl():
    from trl.experimental.gkd import GKDTrainer

    student, teacher = _llama(16, 1, spread=40.0), _llama(24, 2, spread=40.0)
    batch = _batch()
    hs = final_hidden(student, batch["input_ids"], batch["attention_mask"], position_ids=None)[:, :-1]
    ht = final_hidden(teacher, batch["input_ids"], batch["attention_mask"], position_ids=None)[:, :-1]
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    for kw in (dict(reduction="sum"), dict(reduction="mean"), dict(reduction="batchmean", labels=None),
               dict(reduction="mean", labels=None), dict(num_items_in_batch=torch.tensor(37)),
               dict(reduction="batchmean", labels=torch.full_like(labels, -100))):
        kw = {"labels": labels, **kw}
        ours = fused_trl.generalized_jsd_loss(hs, student, ht, teacher, beta=0.3, **kw)
        want = GKDTrainer.generalized_jsd_loss(s, t, beta=0.3, **kw)
        torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-12, msg=str(kw))
    with pytest.raises(ValueError, match="none"):
        fused_trl.generalized_jsd_loss(hs, student, ht, teacher, labels=labels, reduction="none")


# ----------------------------------------------------------------------------------------------------------------------
# trainers
# ----------------------------------------------------------------------------------------------------------------------
def _tokenizer(n: int = V):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, n)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


class _Collate:
    """Pads GKD-style rows (``input_ids``, ``labels`` with the prompt masked) on the right."""

    def __call__(self, rows):
        n = max(len(r["input_ids"]) for r in rows)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for r in rows:
            pad = n - len(r["input_ids"])
            out["input_ids"].append(r["input_ids"] + [0] * pad)
            out["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
            out["labels"].append([-100] * r["prompt"] + r["input_ids"][r["prompt"]:] + [-100] * pad)
        return {k: torch.tensor(v) for k, v in out.items()}


def _gkd_dataset():
    from datasets import Dataset

    g = torch.Generator().manual_seed(7)
    rows = []
    for prompt, length in [(3, 12), (2, 5), (4, 9), (5, 7)]:          # uneven token counts per micro-batch
        rows.append({"input_ids": torch.randint(3, V, (length,), generator=g).tolist(), "prompt": prompt})
    return Dataset.from_list(rows)


class _NoVocabTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on any new tensor whose last dimension is the vocabulary and that has more than ``max_rows`` rows
    (views of the head weight are not allocations); the fused ops' insides are not seen, their calls are counted."""

    def __init__(self, max_rows: int):
        super().__init__()
        self.max_rows, self.fused_calls = max_rows, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "minillm_fast":
            self.fused_calls += 1
        out = func(*args, **(kwargs or {}))
        ins = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == V \
                    and t.untyped_storage().data_ptr() not in ins and t.numel() // V > self.max_rows:
                raise AssertionError(f"{func} allocated a {tuple(t.shape)} tensor")
        return out


def _forbid_heads(*models):
    def boom(*a, **k):
        raise AssertionError("an lm_head was called: the fused loss must run on hidden states")

    for m in models:
        m.get_output_embeddings().forward = boom


def _gkd_step(tmp_path, fused: bool, monkeypatch):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    student, teacher = _llama(16, 11, dtype=torch.float32, spread=20.0), _llama(24, 12, dtype=torch.float32,
                                                                                 spread=20.0)
    args = GKDConfig(output_dir=str(tmp_path / ("fused" if fused else "trl")), per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type=
                     "constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, lmbda=0.0, beta=0.4,
                     seq_kd=False, report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, seed=3,
                     data_seed=3, dataloader_num_workers=0, bf16=False, max_length=None)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_gkd_dataset(),
                         processing_class=_tokenizer(), data_collator=_Collate())
    before = copy.deepcopy(student.state_dict())
    if fused:
        assert fused_trl.use_fused_losses(trainer) is trainer
        _forbid_heads(student, teacher)
        monkeypatch.setenv("MINILLM_FAST_CHUNK_BYTES", str(4 * V * 4 * 2))   # chunks of at most 4 rows
        guard = _NoVocabTensors(max_rows=4)
        with guard:
            trainer.train()
        assert guard.fused_calls > 0
    else:
        trainer.train()
    return before, {k: v.detach().clone() for k, v in student.state_dict().items()}


def test_gkd_step_with_gradient_accumulation_equals_trl(tmp_path, monkeypatch):
    """Same data order, same SGD step: the update (lr x the accumulated gradient, normalised by the token count of
    the whole accumulation window) agrees to float32 round-off."""
    b0, trl_after = _gkd_step(tmp_path, False, monkeypatch)
    b1, fused_after = _gkd_step(tmp_path, True, monkeypatch)
    moved = 0
    for k in trl_after:
        torch.testing.assert_close(b0[k], b1[k])
        want, got = trl_after[k] - b0[k], fused_after[k] - b1[k]
        moved += bool(want.abs().max() > 0)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * max(1.0, want.abs().max().item()), msg=k)
    assert moved >= 5


def test_use_fused_losses_refuses_other_trainers_and_overrides(tmp_path):
    from trl.experimental.gkd import GKDTrainer

    class Custom(GKDTrainer):
        def compute_loss(self, *a, **k):
            return super().compute_loss(*a, **k)

    trainer = object.__new__(Custom)
    with pytest.raises(TypeError, match="overrides"):
        fused_trl.use_fused_losses(trainer)
    with pytest.raises(TypeError, match="not a TRL distillation trainer"):
        fused_trl.use_fused_losses(object())


def test_data_parallel_factor_follows_trainer_compute_loss():
    from types import SimpleNamespace as NS

    def trainer(world, average=True):
        return NS(args=NS(average_tokens_across_devices=average, n_gpu=1), accelerator=NS(num_processes=world),
                  get_tp_size=lambda: 1)

    assert fused_trl.data_parallel_factor(trainer(4), torch.tensor(100)) == 4
    assert fused_trl.data_parallel_factor(trainer(4), None) == 1
    assert fused_trl.data_parallel_factor(trainer(4, average=False), torch.tensor(100)) == 1
    assert fused_trl.data_parallel_factor(trainer(1), torch.tensor(100)) == 1


def test_distillation_trainer_compute_loss_equals_trl(tmp_path):
    """TRL's ``DistillationTrainer.compute_loss`` (its normalisation by the generated completions' token count over
    the ranks, its entropy metric) around our ``_compute_loss``: the loss, its gradients and the logged entropy agree
    with TRL's chunked loss (which runs its tiles in float32, hence the tolerance), on left-padded prompts and
    right-padded completions; the fused call makes no logits."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    student, teacher = _llama(16, 21, spread=40.0), _llama(24, 22, spread=40.0)
    tok = _tokenizer()
    tok.padding_side = "left"
    args = DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=2,
                              beta=0.3, temperature=2.0, max_completion_length=4, bf16=False)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                                  train_dataset=Dataset.from_list([{"prompt": "w3 w4 w5"}, {"prompt": "w6 w7"}]))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, V, (2, 4), generator=g)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, :2] = 0
    completion = torch.randint(3, V, (2, 5), generator=g)
    completion_mask = torch.ones_like(completion)
    completion_mask[0, 3:] = 0
    inputs = dict(prompt_ids=prompt.masked_fill(prompt_mask == 0, 0), prompt_mask=prompt_mask,
                  completion_ids=completion.masked_fill(completion_mask == 0, 0), completion_mask=completion_mask,
                  num_items_in_batch=torch.tensor(13))
    trainer.model.train()
    params = list(student.parameters())
    want = trainer.compute_loss(trainer.model, dict(inputs))
    g_want = _grads(want, params)
    ent_want = trainer._metrics["train"]["entropy"][-1]

    fused_trl.use_fused_losses(trainer)
    _forbid_heads(student, teacher)
    with _NoVocabTensors(max_rows=4) as guard:
        got = trainer.compute_loss(trainer.model, dict(inputs))
    g_got = _grads(got, params)
    assert guard.fused_calls > 0
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=0)     # TRL returns float32
    assert trainer._metrics["train"]["entropy"][-1] == pytest.approx(ent_want, rel=1e-6)
    for (n, _), a, b in zip(student.named_parameters(), g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()), msg=n)


def test_minillm_compute_loss_equals_trl(tmp_path):
    """TRL <= 1.14's ``MiniLLMTrainer.compute_loss`` (reverse-KL advantage with gamma and length normalisation, GRPO's
    loss, single-step reverse KL, kd_temperature 2) with and without the fused loss, on completions the student
    generated (one row's tail masked as padding): same loss and gradients in float64, and the teacher's head is never
    called. (MiniLLMTrainer was removed in TRL 1.15: skipped there.)"""
    pytest.importorskip("trl.experimental.minillm")
    from datasets import Dataset
    from trl.experimental.minillm import MiniLLMConfig, MiniLLMTrainer

    student, teacher = _llama(16, 31, spread=10.0), _llama(24, 32, spread=10.0)
    tok = _tokenizer()
    tok.padding_side = "left"
    args = MiniLLMConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=4,
                         num_generations=2, max_completion_length=5, bf16=False, gamma=0.9, kd_temperature=2.0,
                         seed=5)
    trainer = MiniLLMTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                             train_dataset=Dataset.from_list([{"prompt": "w3 w4 w5"}, {"prompt": "w6 w7"}] * 4))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1      # set by the training loop
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    inputs["completion_mask"][0, 3:] = 0
    inputs["completion_ids"][0, 3:] = tok.pad_token_id
    params = list(student.parameters())
    want = trainer.compute_loss(trainer.model, dict(inputs))
    g_want = _grads(want, params)

    fused_trl.use_fused_losses(trainer)
    _forbid_heads(teacher)
    got = trainer.compute_loss(trainer.model, dict(inputs))
    g_got = _grads(got, params)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for (n, _), a, b in zip(student.named_parameters(), g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10 * max(1.0, b.abs().max().item()), msg=n)


def test_gkd_bf16_mixed_precision(tmp_path):
    """With ``bf16=True`` accelerate wraps the prepared models' forwards in autocast: the probe still passes (it runs
    the class forward, and the wrapper is put back), the fused loss runs both models' bodies under the same autocast
    as TRL's ``model(...)`` calls, and the loss agrees with TRL's to bf16 rounding (TRL's heads also run in bf16)."""
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from minillm_fast.distill.models import decoder

    student, teacher = _llama(16, 41, dtype=torch.float32, spread=20.0), _llama(24, 42, dtype=torch.float32,
                                                                                 spread=20.0)
    args = GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, lmbda=0.0, report_to="none",
                     use_cpu=True, bf16=True, max_length=None)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_gkd_dataset(),
                         processing_class=_tokenizer(), data_collator=_Collate())
    assert trainer.accelerator.native_amp and "forward" in vars(trainer.teacher_model)   # autocast-wrapped
    batch = _batch()
    autocast = []
    for m in (student, teacher):
        decoder(m).register_forward_pre_hook(lambda *_: autocast.append(torch.is_autocast_enabled("cpu")))
    with torch.no_grad():
        want = trainer.compute_loss(student, dict(batch))
        fused_trl.use_fused_losses(trainer)
        assert "forward" in vars(trainer.teacher_model)                                  # put back after the probe
        autocast.clear()
        got = trainer.compute_loss(student, dict(batch))
    assert autocast == [True, True]
    torch.testing.assert_close(got, want.float(), rtol=1e-2, atol=0)
