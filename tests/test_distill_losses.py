"""MiniLLM's loss: advantages against their definition, and the whole fused step (PPO + single-step reverse KL +
pre-training term) against a slow reference on materialised logits from the CausalLM forward, values and gradients."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from distill_utils import config

from minillm_fast.distill import ppo
from minillm_fast.distill.methods import minillm as M


def test_rewards_scaled_clipped_masked():
    lp = torch.tensor([[-1.0, -300.0, -2.0]])
    lq = torch.tensor([[-3.0, -1.0, -2.5]])
    m = torch.tensor([[True, True, False]])
    r = ppo.rewards(lp, lq, m, reward_scaling=0.5, cliprange_reward=100.0)
    assert r.tolist() == [[4.0, -100.0, 0.0]]                       # (lp - lq) / 0.5, clipped, masked
    assert ppo.rewards(lp, lq, m, reward_scaling=None, cliprange_reward=None).tolist() == [[2.0, -299.0, 0.0]]


def _advantage_by_definition(r, m, gamma, variant, length_norm):
    b, n = r.shape
    out = torch.zeros_like(r)
    for i in range(b):
        valid = int(m[i].sum())
        for t in range(valid):
            if variant == "reference":          # sum_{t' >= t} gamma^(t'-t) r_t' / N_t
                g = sum(gamma ** (u - t) * r[i, u] for u in range(t, valid))
                out[i, t] = g / (valid - t) if length_norm else g
            else:                               # R_{t+1} / (tokens after t)
                g = sum(gamma ** (u - t - 1) * r[i, u] for u in range(t + 1, valid))
                out[i, t] = g / max(valid - t - 1, 1) if length_norm else g
    return out


@pytest.mark.parametrize("variant", ["reference", "paper"])
@pytest.mark.parametrize("length_norm", [True, False], ids=["norm", "no-norm"])
def test_advantages_match_definition(variant, length_norm):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 6, generator=g)
    m = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5]).bool()
    r = r * m
    want = _advantage_by_definition(r, m, 0.95, variant, length_norm)
    got = ppo.advantages(r, m, gamma=0.95, length_norm=length_norm, variant=variant, whiten=False)
    torch.testing.assert_close(got, want)
    w = ppo.advantages(r, m, gamma=0.95, length_norm=length_norm, variant=variant, whiten=True)
    assert abs(float(w[m].mean())) < 1e-5 and abs(float(w[m].var(unbiased=False)) - 1) < 1e-3
    assert (w[~m] == 0).all()


def _slow_reference(trainer, ro, adv, weight, pt, ppo_tokens, pt_tokens):
    """The step's loss from ``model(...).logits`` (the CausalLM forward, [B, T, V] in fp32) and plain formulas."""
    cfg, v = trainer.cfg, trainer.vocab_size
    ro = M._trim(ro)
    p, r = ro.prompt_ids.shape[1], ro.response_ids.shape[1]
    adv, weight = adv[:, :r], weight[:, :r]
    ids = torch.cat([ro.prompt_ids, ro.response_ids], 1)
    msk = torch.cat([ro.prompt_mask, ro.response_mask.long()], 1)
    b1 = ids.shape[0]
    ids, msk = M._cat_rows([ids, pt["input_ids"]], [msk, pt["attention_mask"]], trainer.pad_id)
    pos = (msk.cumsum(-1) - 1).clamp(min=0)
    logits = trainer.student(input_ids=ids, attention_mask=msk, position_ids=pos).logits.float()[..., :v]
    with torch.no_grad():
        t_logits = trainer.teacher(input_ids=ids, attention_mask=msk, position_ids=pos).logits.float()[..., :v]
    m = ro.response_mask.float()
    lq = F.log_softmax(logits[:b1, p - 1:p + r - 1] / cfg.temperature, -1)
    lp = F.log_softmax(t_logits[:b1, p - 1:p + r - 1] / cfg.temperature, -1)
    lq_y = lq.gather(-1, ro.response_ids.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp((lq_y - ro.student_logprobs) * m) * weight
    pg = (torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange)) * m).sum()
    rkl = (lq.exp() * (lq - lp)).sum(-1)
    if cfg.single_step_weighted:
        rkl = rkl * weight
    single = (rkl * m).sum()
    labels = pt["labels"][:, 1:]
    keep = (labels != -100).float()
    lq_pt = F.log_softmax(logits[b1:, :labels.shape[1]], -1)
    lp_pt = F.log_softmax(t_logits[b1:, :labels.shape[1]], -1)
    ce = -(lq_pt.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep).sum()
    fkl = ((lp_pt.exp() * (lp_pt - lq_pt)).sum(-1) * keep).sum()
    pt_loss = (1 - cfg.kd_ratio) * ce + cfg.kd_ratio * fkl
    return (pg + single) / ppo_tokens + cfg.lm_coef * pt_loss / pt_tokens


@pytest.mark.parametrize("arch, overrides", [
    ("gpt2", dict(cache_teacher_hidden=True)),
    ("llama", dict(cache_teacher_hidden=False, single_step_weighted=True, advantage="paper", temperature=1.5)),
], ids=["gpt2-reference", "llama-paper-variants"])
def test_minillm_step_fused_equals_materialised_logits(tmp_path, arch, overrides):
    from minillm_fast.distill.trainer import Trainer

    cfg = config(tmp_path, arch=arch, total_iters=1, batch_size=4, micro_batch_size=4, pt_batch_size=4,
                 max_new_tokens=6, **overrides)
    seen, grads, params = {}, {}, {}

    def after_backward(tr):
        for name, prm in tr.student.named_parameters():
            grads[name] = prm.grad.detach().clone()
        params.update(copy.deepcopy(tr.student.state_dict()))

    trainer = Trainer(cfg, hooks={"after_backward": after_backward})
    real_micro = trainer.method.micro_loss

    def recording_micro(*args):
        loss, parts = real_micro(*args)
        seen["args"], seen["loss"] = args, loss.detach()
        return loss, parts

    trainer.method.micro_loss = recording_micro
    trainer.train()

    trainer.student.load_state_dict(params)        # the weights the step's gradient was taken at
    trainer.student.zero_grad(set_to_none=True)
    ro, adv, weight, pt, ppo_tokens, pt_tokens = seen["args"]
    slow = _slow_reference(trainer, ro, adv, weight, trainer.to_device(pt), ppo_tokens, pt_tokens)
    slow.backward()
    torch.testing.assert_close(seen["loss"], slow.detach(), atol=1e-5, rtol=1e-5)
    worst = 0.0
    for name, prm in trainer.student.named_parameters():
        torch.testing.assert_close(grads[name], prm.grad, atol=1e-5, rtol=1e-4, msg=name)
        worst = max(worst, float((grads[name] - prm.grad).abs().max()))
    assert worst < 1e-5
