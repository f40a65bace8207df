"""Evaluation metrics on hand-made predictions, the evaluate command, and the Hugging Face loss / Trainer mixin."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from distill_utils import workspace

from minillm_fast.distill import evaluate as E
from minillm_fast.distill.data import load_instructions
from minillm_fast.distill.hf import DistillationTrainerMixin, distillation_loss
from minillm_fast.distill.models import load_model, load_tokenizer

# prediction, references, Rouge-L F (stemmed) and exact match, worked out by hand
CASES = [
    ("The cat sat.", ["the cat sat"], 1.0, 1.0),                   # case, punctuation, article-free compare
    ("dogs running", ["dog runs"], 1.0, 0.0),                      # stemming: dog run / dog run
    ("red blue green fish", ["cat dog", "blue green"], 2 / 3, 0.0),  # max over refs: LCS 2, P 1/2, R 1
    ("", ["something"], 0.0, 0.0),
    ("A sun", ["sun", "the moon"], 2 / 3, 1.0),                     # EM drops the article a, Rouge-L does not
]


def test_metrics_on_hand_made_predictions():
    for pred, refs, rl, em in CASES:
        assert max(E.rouge_l(pred, r) for r in refs) == pytest.approx(rl, abs=1e-9), pred
        assert max(E.exact_match(pred, r) for r in refs) == em, pred
    got = E.compute_metrics([c[0] for c in CASES], [c[1] for c in CASES])
    assert got["rougeL"] == pytest.approx(100 * sum(c[2] for c in CASES) / len(CASES))
    assert got["exact_match"] == pytest.approx(100 * 2 / 5)
    s = E.summarize({10: {"rougeL": 40.0}, 20: {"rougeL": 60.0}})
    assert s == {"rougeL_mean": 50.0, "rougeL_std": 10.0}


def test_evaluate_command_scores_given_predictions(tmp_path):
    data = tmp_path / "valid.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "response": c[1]}) + "\n"
                            for i, c in enumerate(CASES)))
    preds = tmp_path / "preds.jsonl"
    lines = [{"seed": 10, "index": i, "prediction": c[0]} for i, c in enumerate(CASES)]
    lines += [{"seed": 20, "index": i, "prediction": c[1][0]} for i, c in enumerate(CASES)]    # perfect answers
    preds.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert E.main(["--data", str(data), "--predictions", str(preds), "--output", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    first = 100 * sum(c[2] for c in CASES) / len(CASES)
    assert res["per_seed"]["10"]["rougeL"] == pytest.approx(first)
    assert res["per_seed"]["20"] == {"rougeL": 100.0, "exact_match": 100.0}
    assert res["rougeL_mean"] == pytest.approx((first + 100) / 2)
    assert res["rougeL_std"] == pytest.approx((100 - first) / 2)
    assert res["exact_match_mean"] == pytest.approx(70.0)
    assert "| 10 |" in (out / "results.md").read_text()
    assert E.main(["--data", str(data), "--output", str(out)]) == 2                   # neither model nor predictions


def test_evaluate_model_samples_with_generate(tmp_path):
    p = workspace("gpt2")
    tok = load_tokenizer(p["tokenizer"])
    model = load_model(p["student"])
    ex, _ = load_instructions(p["valid_data"], tok, max_length=80, max_prompt_length=64)
    res = E.evaluate_model(model, tok, ex[:2], seeds=[10, 20], max_new_tokens=4, batch_size=2)
    again = E.evaluate_model(model, tok, ex[:2], seeds=[10], max_new_tokens=4, batch_size=2)
    assert res["predictions"][10] == again["predictions"][10]                    # seeded
    assert set(res) >= {"rougeL_mean", "rougeL_std", "exact_match_mean", "per_seed"} and len(res["per_seed"]) == 2
    assert E.main(["--model", p["student"], "--data", p["valid_data"], "--output", str(tmp_path), "--seeds", "10",
                   "--max-new-tokens", "3", "--max-length", "80", "--max-prompt-length", "64"]) == 0
    assert (tmp_path / "results.md").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face entry point
# ----------------------------------------------------------------------------------------------------------------------
def _batch(tok, n=3):
    ex, _ = load_instructions(workspace("llama")["train_data"], tok, max_length=80, max_prompt_length=64)
    from minillm_fast.distill.data import collate_full

    return collate_full(ex[:n], tok.pad_token_id)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_distillation_loss_equals_logits_formula(divergence):
    p = workspace("llama")
    tok = load_tokenizer(p["tokenizer"])
    student, teacher = load_model(p["student"]), load_model(p["teacher"])
    batch = _batch(tok)
    loss = distillation_loss(student, teacher, batch, divergence=divergence, kd_ratio=0.3, temperature=2.0)
    loss.backward()
    fused = {n: q.grad.clone() for n, q in student.named_parameters()}
    student.zero_grad()

    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos)
    s = student(**kw).logits.float()[:, :-1]
    with torch.no_grad():
        t = teacher(**kw).logits.float()[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    ce = F.cross_entropy(s[keep], labels[keep])
    lq, lp = F.log_softmax(s[keep] / 2.0, -1), F.log_softmax(t[keep] / 2.0, -1)
    div = (lp.exp() * (lp - lq)).sum(-1) if divergence == "forward_kl" else (lq.exp() * (lq - lp)).sum(-1)
    slow = 0.7 * ce + 0.3 * div.mean()
    slow.backward()
    torch.testing.assert_close(loss.detach(), slow.detach(), atol=1e-5, rtol=1e-5)
    for n, q in student.named_parameters():
        torch.testing.assert_close(fused[n], q.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_trainer_mixin_compute_loss():
    p = workspace("llama")
    tok = load_tokenizer(p["tokenizer"])
    student, teacher = load_model(p["student"]), load_model(p["teacher"])
    batch = _batch(tok)

    class FakeTrainer:                  # stands in for transformers.Trainer (needs accelerate to build)
        def __init__(self, model):
            self.model = model

    class DistillTrainer(DistillationTrainerMixin, FakeTrainer):
        pass

    trainer = DistillTrainer(student, teacher_model=teacher, distill_kwargs=dict(divergence="reverse_kl"))
    loss = trainer.compute_loss(student, batch)
    want = distillation_loss(student, teacher, batch, divergence="reverse_kl")
    torch.testing.assert_close(loss, want)
    loss2, terms = trainer.compute_loss(student, batch, return_outputs=True, num_items_in_batch=1000)
    torch.testing.assert_close(loss2 * 1000, want * terms["tokens"])
    with pytest.raises(TypeError, match="teacher_model"):
        DistillTrainer(student)


def test_distillation_loss_through_a_wrapper_forward():
    """A wrapped student (as DDP / FSDP / accelerate hand it to compute_loss) is run through the wrapper's forward,
    with only the last position's logits: same loss and gradients as the bare model."""
    p = workspace("gpt2")
    tok = load_tokenizer(p["tokenizer"])
    student, teacher = load_model(p["student"]), load_model(p["teacher"])
    batch = _batch(tok)

    class Wrapper(torch.nn.Module):         # the shape of DistributedDataParallel: .module and a forwarding call
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, []

        def forward(self, **kw):
            self.calls.append(kw)
            out = self.module(**kw)
            assert out.logits.shape[1] == 1       # logits_to_keep=1: no [B, T, V]
            return out

    wrapped = Wrapper(student)
    a = distillation_loss(wrapped, teacher, batch, divergence="reverse_kl")
    a.backward()
    ga = {n: q.grad.clone() for n, q in student.named_parameters()}
    student.zero_grad()
    b = distillation_loss(student, teacher, batch, divergence="reverse_kl")
    b.backward()
    assert len(wrapped.calls) == 1 and wrapped.calls[0]["output_hidden_states"]
    torch.testing.assert_close(a, b)
    for n, q in student.named_parameters():
        torch.testing.assert_close(ga[n], q.grad, atol=1e-6, rtol=1e-5)
