"""Every supported model family, end to end, against the model's own ``.logits``.

Tiny random float64 models of gpt2, llama, qwen2, qwen3, mistral, gemma, gemma2, gemma3 (text), cohere, cohere2,
granite, granitemoe, falcon_h1, minicpm3, phi, opt, gpt_neox, gptj and hyperclovax (tests/model_families.py builds
them: heads padded from 97 real tokens to 104 rows with loud padded rows, logits rescaled to a spread of ~3.5 nats,
each family's logit transform set to a value that matters: Cohere logit_scale, Granite / HyperCLOVAX logits_scaling,
Falcon-H1 lm_head_multiplier, MiniCPM3 dim_model_base, Gemma 2/3 final_logit_softcapping). Per family:

* the fused log-probs and entropy (``torch`` and ``native`` backends) equal ``log_softmax(model(...).logits)``, and
  ``heads.probe`` passes;
* the fused forward and reverse KL equal the ones from the two models' logits, against a second model of the family
  (untied head, other transform values) and against a model of another family (other per-model scalings);
* ``distillation_loss`` and its gradient equal the materialised ``(1 - r) CE + r D`` (token mean);
* the KV-cached rollout's per-token log-probs and reverse KL equal a full forward's (left-padded prompts; see
  UNPADDED_ROLLOUT for Gemma 2);
* a 2-step ``minillm-fast distill`` (kd and minillm, fp32, backend auto) runs on the family's student and teacher
  saved with save_pretrained (their heads padded beyond the toy tokenizer's vocabulary): exit code 0, finite losses.

A made-up family that post-processes its logits in a way the package does not know, or a config that claims a
transform its model does not apply, is refused by the probe.

Tolerances: the float64 checks expect ~1e-13 and allow 1e-6 (the issue's bound). The rollout stores its log-probs in
float32, so those allow float32 rounding.
"""
from __future__ import annotations

import math
import os

import distill_utils  # one thread, before anything runs; the toy workspace of the CLI runs
import model_families as MF
import pytest
import torch

import minillm_fast
from minillm_fast.distill import heads, models, rollout
from minillm_fast.distill.data import IGNORE_INDEX, positions_from_mask
from minillm_fast.distill.hf import distillation_loss

pytestmark = pytest.mark.usefixtures("single_thread")

V = MF.VOCAB
BACKENDS = ("torch", "native")
TOL = 1e-6


def _family_params(families):
    return [pytest.param(f, id=f, marks=pytest.mark.skipif(
        not MF.available(f), reason=f"the installed transformers has no {f} ({MF.FAMILIES[f][1]})"))
        for f in families]


FAMILIES = _family_params(MF.FAMILIES)
_models: dict = {}


def model(family: str, variant: int = 0):
    """One float64 model per (family, variant) for the session (the tests read them and leave them as they were)."""
    key = (family, variant)
    if key not in _models:
        _models[key] = MF.build(family, variant)
    return _models[key]


def partner(family: str) -> str:
    """A model of another family with a transform of another kind (softcap vs scale)."""
    return "cohere" if family == "gemma2" else "gemma2"


def _ids(b, t, seed):
    return torch.randint(3, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _maxdiff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------------
# (a) log-probs and entropy, (e) the probe
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_token_logprobs_equal_model_logits(family):
    for variant in (0, 1):
        m = model(family, variant)
        ids = _ids(2, 12, variant)
        with torch.no_grad():
            z = MF.logits(m, ids)
            h = models.hidden_states(m, ids, torch.ones_like(ids))
        assert z[..., :V].std() > 2.5, "the logits must spread over several nats for the check to mean something"
        ref = torch.log_softmax(z[..., :V], -1)
        ref_ent = -(ref.exp() * ref).sum(-1)
        targets = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(7 + variant))
        ref_lp = ref.gather(-1, targets[..., None])[..., 0]
        head = heads.head_of(m)
        assert head.weight.shape[0] == MF.ROWS
        if family in MF.WITH_TRANSFORM:
            assert head.logit_scale is not None or head.softcap is not None, f"{family}: its transform is not read"
        for backend in BACKENDS:
            lp, ent = minillm_fast.token_logprobs(h, head.weight, targets, vocab_size=V, return_entropy=True,
                                                  backend=backend, **head.options())
            assert lp.dtype == torch.float64
            err = max(_maxdiff(lp, ref_lp), _maxdiff(ent, ref_ent))
            assert err <= TOL, f"{family} v{variant} {backend}: log-prob/entropy error {err:.3g}"
        # the checks have teeth: dropping the transform or the padding mask is far off
        if head.logit_scale is not None or head.softcap is not None:
            plain = minillm_fast.token_logprobs(h, head.weight, targets, vocab_size=V, bias=head.bias,
                                                backend="torch")
            assert _maxdiff(plain, ref_lp) > 0.1
        unpadded = minillm_fast.token_logprobs(h, head.weight, targets, backend="torch", **head.options())
        assert _maxdiff(unpadded, ref_lp) > 0.1
        assert heads.probe(m, V) <= TOL


# ----------------------------------------------------------------------------------------------------------------------
# (b) KL between two models
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_divergences_equal_model_logits(family):
    student = model(family, 0)
    ids = _ids(2, 10, 3)
    one = torch.ones_like(ids)
    s_head = heads.head_of(student)
    with torch.no_grad():
        lq = torch.log_softmax(MF.logits(student, ids)[..., :V], -1)
        hs = models.hidden_states(student, ids, one)
    others = [partner(family)] if MF.available(partner(family)) else []
    for teacher in [model(family, 1)] + [model(f, 1) for f in others]:
        t_head = heads.head_of(teacher)
        with torch.no_grad():
            lp = torch.log_softmax(MF.logits(teacher, ids)[..., :V], -1)
            ht = models.hidden_states(teacher, ids, one)
        want = {"forward_kl": (lp.exp() * (lp - lq)).sum(-1), "reverse_kl": (lq.exp() * (lq - lp)).sum(-1)}
        assert min(w.mean() for w in want.values()) > 0.5, "the two models must disagree"
        for divergence, ref in want.items():
            for backend in BACKENDS:
                got = minillm_fast.fused_divergence(hs, s_head.weight, ht, t_head.weight, divergence=divergence,
                                                    reduction="none", vocab_size=V, backend=backend,
                                                    **s_head.options("student"), **t_head.options("teacher"))
                err = _maxdiff(got, ref)
                assert err <= TOL, (f"{family} vs {type(teacher).__name__} {divergence} {backend}: "
                                    f"error {err:.3g}")


# ----------------------------------------------------------------------------------------------------------------------
# (c) distillation_loss and its gradient
# ----------------------------------------------------------------------------------------------------------------------
def _reference_loss(student, teacher, ids, mask, divergence, kd_ratio):
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)[:, 1:]
    valid = labels != IGNORE_INDEX
    lq = torch.log_softmax(MF.logits(student, ids, mask)[:, :-1, :V], -1)
    with torch.no_grad():
        lp = torch.log_softmax(MF.logits(teacher, ids, mask)[:, :-1, :V], -1)
    ce = -lq.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    div = (lp.exp() * (lp - lq)).sum(-1) if divergence == "forward_kl" else (lq.exp() * (lq - lp)).sum(-1)
    return (((1 - kd_ratio) * ce + kd_ratio * div) * valid).sum() / valid.sum()


def _grad_params(m):
    """The head's weight and one weight deep in the decoder (the last 2-D one that is not the head)."""
    w = heads.lm_head(m).weight
    deep = [p for p in models.decoder(m).parameters() if p.dim() == 2 and p is not w][-1]
    return [w, deep]


@pytest.mark.parametrize("family", FAMILIES)
def test_distillation_loss_and_gradient_equal_materialised(family):
    student, teacher = model(family, 0), model(family, 1)
    ids = _ids(2, 11, 5)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0                                   # right padding in row 1: its last positions are no targets
    batch = {"input_ids": ids, "attention_mask": mask}
    params = _grad_params(student)
    for divergence, kd_ratio in (("forward_kl", 0.5), ("reverse_kl", 0.8)):
        ref = _reference_loss(student, teacher, ids, mask, divergence, kd_ratio)
        ref_grads = torch.autograd.grad(ref, params)
        for backend in BACKENDS:
            loss = distillation_loss(student, teacher, batch, divergence=divergence, kd_ratio=kd_ratio,
                                     vocab_size=V, backend=backend)
            grads = torch.autograd.grad(loss, params)
            err = _maxdiff(loss, ref)
            assert err <= TOL, f"{family} {divergence} {backend}: loss {loss.item():.6f} vs {ref.item():.6f}"
            for name, g, r in zip(("head", "deep"), grads, ref_grads):
                assert r.abs().max() > 1e-4, f"{family}: the {name} gradient must not vanish"
                gerr = _maxdiff(g, r) / r.abs().max().item()
                assert gerr <= TOL, f"{family} {divergence} {backend}: {name} gradient relative error {gerr:.3g}"


# ----------------------------------------------------------------------------------------------------------------------
# (d) the rollout
# ----------------------------------------------------------------------------------------------------------------------
# Gemma 2 has eager attention only, whose softmax runs in float32: a float64 mask's minimum becomes -inf there, and a
# left-padded row's fully masked pad positions turn every later position into NaN (in the model's own forward as in
# any other). Its float64 rollout is checked on prompts of one length (no padding).
UNPADDED_ROLLOUT = {"gemma2"}


@pytest.mark.parametrize("family", FAMILIES)
def test_rollout_logprobs_equal_full_forward(family):
    student, teacher = model(family, 0), model(family, 1)
    lengths = (5, 5, 5) if family in UNPADDED_ROLLOUT else (5, 3, 6)
    p = max(lengths)
    prompt = torch.zeros(len(lengths), p, dtype=torch.long)        # left-padded with pad id 0
    pmask = torch.zeros_like(prompt)
    for i, n in enumerate(lengths):
        prompt[i, p - n:] = _ids(1, n, 11 + i)[0]
        pmask[i, p - n:] = 1
    alpha = 0.3
    for seed, backend in enumerate(BACKENDS):
        ro = rollout.generate(student, teacher, prompt, pmask, max_new_tokens=6, eos_token_id=2, pad_token_id=0,
                              alpha=alpha, generator=torch.Generator().manual_seed(seed), vocab_size=V,
                              backend=backend, with_reverse_kl=True)
        r = ro.response_ids.shape[1]
        full = torch.cat([ro.prompt_ids, ro.response_ids], 1)
        mask = torch.cat([ro.prompt_mask, ro.response_mask.long()], 1)
        pos = positions_from_mask(mask)
        with torch.no_grad():
            lq = torch.log_softmax(MF.logits(student, full, mask, pos)[:, p - 1:p + r - 1, :V], -1)
            lp = torch.log_softmax(MF.logits(teacher, full, mask, pos)[:, p - 1:p + r - 1, :V], -1)
        y = ro.response_ids.clamp(max=V - 1)[..., None]
        lq_y, lp_y = lq.gather(-1, y)[..., 0], lp.gather(-1, y)[..., 0]
        want = {"student_logprobs": lq_y, "teacher_logprobs": lp_y,
                "mixture_logprobs": torch.logaddexp(lp_y + torch.log(torch.tensor(alpha, dtype=torch.float64)),
                                                    lq_y + torch.log(torch.tensor(1 - alpha, dtype=torch.float64))),
                "reverse_kl": (lq.exp() * (lq - lp)).sum(-1)}
        m = ro.response_mask
        assert m.sum() >= 6 and (ro.response_ids[m] < V).all()
        for name, ref in want.items():
            got = getattr(ro, name)[m].double()
            ref = ref[m]
            # stored as float32: its rounding at the values' size, plus a little
            tol = 4 * 2.0 ** -24 * ref.abs().max().item() + 1e-7
            err = _maxdiff(got, ref)
            assert err <= tol, f"{family} {backend}: rollout {name} error {err:.3g} (tolerance {tol:.2g})"


# ----------------------------------------------------------------------------------------------------------------------
# families the package does not know, and claims a model does not honour
# ----------------------------------------------------------------------------------------------------------------------
def _odd_llama(post):
    from transformers import LlamaForCausalLM

    class OddLlamaForCausalLM(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = post(out.logits)
            return out

    torch.manual_seed(0)
    return OddLlamaForCausalLM(MF.config("llama")).double().eval()


POSTS = {
    "mixes_logits": lambda z: 1.7 * z + 0.3 * z.roll(1, -1),
    "per_token_temperature": lambda z: z * (1 + 0.2 * torch.arange(z.shape[-2], dtype=z.dtype))[:, None],
    "undeclared_softcap_30": lambda z: 30.0 * torch.tanh(z / 30.0),
}


@pytest.mark.parametrize("post", list(POSTS), ids=list(POSTS))
def test_unknown_logit_postprocessing_is_refused(post):
    m = _odd_llama(POSTS[post])
    with pytest.raises(heads.HeadMismatchError, match="OddLlamaForCausalLM"):
        heads.probe(m, V, what="student")


def test_a_harmless_postprocessing_passes():
    """A per-token shift of every logit changes no probability: the probe does not refuse it."""
    m = _odd_llama(lambda z: z + torch.arange(z.shape[-2], dtype=z.dtype)[:, None])
    assert heads.probe(m, V) <= TOL


def test_a_transform_the_model_does_not_apply_is_refused(monkeypatch):
    # the config says logit_scale=0.25, the model multiplies by 1
    m = MF.build("cohere")
    assert heads.probe(m, V) <= TOL
    m.logit_scale = 1.0
    with pytest.raises(heads.HeadMismatchError, match="CohereForCausalLM"):
        heads.probe(m, V)
    # the package believes llama divides by config.logits_scaling; the model does not
    llama = MF.build("llama")
    llama.config.logits_scaling = 4.0
    monkeypatch.setitem(heads._LOGIT_SCALES, "llama", ("logits_scaling", True))
    with pytest.raises(heads.HeadMismatchError, match="LlamaForCausalLM"):
        heads.probe(llama, V)
    monkeypatch.delitem(heads._LOGIT_SCALES, "llama")
    assert heads.probe(llama, V) <= TOL
    # a softcap the model does not apply
    monkeypatch.setattr(heads, "logit_transform", lambda config: (None, 5.0))
    with pytest.raises(heads.HeadMismatchError, match="softcap=5.0"):
        heads.probe(llama, V)


# ----------------------------------------------------------------------------------------------------------------------
# 2-step `minillm-fast distill`
# ----------------------------------------------------------------------------------------------------------------------
_saved: dict = {}


def _saved_pair(family: str, root) -> dict:
    """fp32 student (variant 0) and teacher (variant 1) of ``family`` saved with save_pretrained, their heads padded
    beyond the toy tokenizer's vocabulary."""
    if family not in _saved:
        from transformers import AutoTokenizer

        ws = distill_utils.workspace("gpt2")
        tok = AutoTokenizer.from_pretrained(ws["tokenizer"])
        n = len(tok)
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
        paths = {}
        for what, variant in (("student", 0), ("teacher", 1)):
            path = os.path.join(str(root), f"{family}-{what}")
            MF.build(family, variant, dtype=torch.float32, vocab=n, rows=n + 7).save_pretrained(path)
            paths[what] = path
        _saved[family] = dict(ws, **paths)
    return _saved[family]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("method", ["kd", "minillm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_distill_cli_two_steps(family, method, model_dir, tmp_path):
    import yaml

    from minillm_fast.cli import main

    p = _saved_pair(family, model_dir)
    out = str(tmp_path / "run")
    cfg = dict(method=method, student=p["student"], teacher=p["teacher"], tokenizer=p["tokenizer"],
               train_data=p["train_data"], pt_data=p["pt_data"], output_dir=out, max_length=64,
               max_prompt_length=48, max_new_tokens=4, batch_size=4, max_train_samples=8, num_rollouts=4,
               rollout_batch_size=4, ppo_epochs=1, pt_batch_size=4, total_iters=2, lr=1e-3, warmup_steps=0,
               eval_interval=100, save_interval=0, final_eval=False, progress_bar=False, plots=False,
               select_metric="none", backend="auto", dtype="fp32", seed=1)
    path = str(tmp_path / f"{method}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    assert main(["distill", "--config", path]) == 0
    train = [r for r in distill_utils.read_metrics(out) if "train/loss" in r]
    assert len(train) == 2
    keys = {"kd": ["train/loss", "train/ce", "train/kd"],
            "minillm": ["train/loss", "train/pg_loss", "train/single_step", "train/pt_loss"]}[method]
    for r in train:
        for key in keys:
            assert key in r and math.isfinite(r[key]), (family, method, key, r.get(key))
    assert os.path.isfile(os.path.join(out, "final", "model.safetensors"))
