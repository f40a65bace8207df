"""Inputs a user can get wrong: each raises ValueError / TypeError whose message names the argument and the fix."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import DEVICE, IMPLS, make_inputs
from minillm_fast import FusedDivergenceLoss, fused_divergence, fused_reverse_kl
from minillm_fast.dispatch import ENV_VAR

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def x(gen):
    """Valid inputs: N=5 rows, Hs=8, Ht=12, V=19."""
    return make_inputs(gen, n=5, hs=8, ht=12, v=19)


def call(x, **overrides):
    """fused_divergence on ``x`` with some tensors or options replaced (torch backend unless given)."""
    t = {k: overrides.pop(k) if k in overrides else v for k, v in x.items()}
    overrides.setdefault("backend", "torch")
    return fused_divergence(t["student_hidden"], t["student_weight"], t["teacher_hidden"], t["teacher_weight"],
                            student_bias=t["student_bias"], teacher_bias=t["teacher_bias"], **overrides)


def test_valid_inputs_run(x):
    assert torch.isfinite(call(x))  # the fixture itself is fine: every error below comes from one change


# ----------------------------------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------------------------------
def test_student_hidden_width_vs_weight(x):
    with pytest.raises(ValueError, match=r"student_weight has width 8 .* student_hidden has width 7"):
        call(x, student_hidden=x["student_hidden"][:, :7])


def test_teacher_hidden_width_vs_weight(x):
    with pytest.raises(ValueError, match=r"teacher_weight has width 10 .* teacher_hidden has width 12"):
        call(x, teacher_weight=x["teacher_weight"][:, :10])


def test_different_token_counts(x):
    with pytest.raises(ValueError, match=r"must have the same leading shape .*\(5,\) vs \(4,\)"):
        call(x, teacher_hidden=x["teacher_hidden"][:4])


def test_leading_shapes_differ_with_same_count(x):
    with pytest.raises(ValueError, match=r"same leading shape"):
        call(x, student_hidden=x["student_hidden"].reshape(5, 1, 8),
             teacher_hidden=x["teacher_hidden"].reshape(1, 5, 12))


def test_vocab_mismatch_without_vocab_size(x):
    with pytest.raises(ValueError, match=r"vocabularies differ .*student_weight has 18 rows.*pass vocab_size="):
        call(x, student_weight=x["student_weight"][:18])


def test_vocab_size_larger_than_a_head(x):
    with pytest.raises(ValueError, match=r"vocab_size=20 exceeds the 19 rows of student_weight"):
        call(x, vocab_size=20)


@pytest.mark.parametrize("vocab_size", [0, -3, 2.5, True])
def test_vocab_size_not_a_positive_int(x, vocab_size):
    with pytest.raises(ValueError, match=r"vocab_size=.* must be a positive int"):
        call(x, vocab_size=vocab_size)


def test_weight_not_2d(x):
    with pytest.raises(ValueError, match=r"student_weight must have shape \[V, H\]"):
        call(x, student_weight=x["student_weight"][None])


def test_bias_wrong_shape(x):
    with pytest.raises(ValueError, match=r"teacher_bias must have shape \[V\] = \(19,\)"):
        call(x, teacher_bias=torch.zeros(18, device=DEVICE))


def test_labels_wrong_shape(x):
    with pytest.raises(ValueError, match=r"labels must have the hidden states' leading shape \(5,\), got \(4,\)"):
        call(x, labels=torch.zeros(4, dtype=torch.long, device=DEVICE))


def test_mask_wrong_shape(x):
    with pytest.raises(ValueError, match=r"mask must have the hidden states' leading shape \(5,\), got \(5, 1\)"):
        call(x, mask=torch.ones(5, 1, dtype=torch.bool, device=DEVICE))


def test_token_weights_wrong_shape(x):
    with pytest.raises(ValueError, match=r"token_weights must have the hidden states' leading shape"):
        call(x, token_weights=torch.ones(6, device=DEVICE))


def test_empty_batch(x):
    with pytest.raises(ValueError, match=r"student_hidden has no rows"):
        call(x, student_hidden=x["student_hidden"][:0], teacher_hidden=x["teacher_hidden"][:0])


def test_zero_width_hidden(x):
    with pytest.raises(ValueError, match=r"student_hidden must have shape \[\.\.\., H\] with H > 0"):
        call(x, student_hidden=torch.zeros(5, 0, device=DEVICE), student_weight=torch.zeros(19, 0, device=DEVICE))


def test_different_devices(x):
    # meta tensors: a second device on any machine; the check happens before any computation
    with pytest.raises(ValueError, match=r"student_hidden is on cpu but teacher_hidden is on meta"):
        call({k: (v.cpu() if v is not None else None) for k, v in x.items()},
             teacher_hidden=torch.empty(5, 12, device="meta"))


# ----------------------------------------------------------------------------------------------------------------------
# dtypes and kinds
# ----------------------------------------------------------------------------------------------------------------------
def test_float_labels(x):
    with pytest.raises(TypeError, match=r"labels must be an integer tensor \(token ids\), got dtype torch.float32"):
        call(x, labels=torch.zeros(5, device=DEVICE))


def test_bool_labels(x):
    with pytest.raises(TypeError, match=r"labels must be an integer tensor"):
        call(x, labels=torch.zeros(5, dtype=torch.bool, device=DEVICE))


def test_integer_token_weights(x):
    with pytest.raises(TypeError, match=r"token_weights must be a floating-point tensor"):
        call(x, token_weights=torch.ones(5, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("which", ["student_hidden", "teacher_hidden"])
def test_integer_hidden_states(x, which):
    with pytest.raises(TypeError,
                       match=rf"{which} must be float32, bfloat16, float16 or float64, got dtype torch.int64"):
        call(x, **{which: x[which].long()})


def test_hidden_weight_dtype_mismatch(x):
    with pytest.raises(TypeError, match=r"student_weight has dtype torch.bfloat16 but student_hidden has dtype "
                                        r"torch.float32; cast one to match"):
        call(x, student_weight=x["student_weight"].bfloat16())


def test_teacher_dtype_mismatch(x):
    with pytest.raises(TypeError, match=r"teacher_weight has dtype torch.float64 but teacher_hidden has dtype"):
        call(x, teacher_weight=x["teacher_weight"].double())


def test_bias_dtype_mismatch(x):
    with pytest.raises(TypeError, match=r"student_bias has dtype torch.float16 but student_weight has dtype"):
        call(x, student_bias=torch.zeros(19, dtype=torch.float16, device=DEVICE))


@pytest.mark.parametrize("which, value", [("student_hidden", [[1.0] * 8] * 5), ("student_weight", None),
                                          ("teacher_weight", 3.0)], ids=["hidden_list", "weight_none", "weight_float"])
def test_non_tensor_argument(x, which, value):
    with pytest.raises(TypeError, match=rf"{which} must be a torch.Tensor"):
        call(x, **{which: value})


def test_non_tensor_labels(x):
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor"):
        call(x, labels=[0, 1, 2, 3, 4])


# ----------------------------------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------------------------------
def test_unknown_divergence(x):
    with pytest.raises(ValueError, match=r"divergence='kl' is not supported; expected one of \[.*'reverse_kl'"):
        call(x, divergence="kl")


def test_unknown_reduction(x):
    with pytest.raises(ValueError,
                       match=r"reduction='avg' is not supported; expected one of \('mean', 'sum', 'none'\)"):
        call(x, reduction="avg")


def test_unknown_backend(x):
    with pytest.raises(ValueError, match=r"backend='cuda' is not supported; expected one of"):
        call(x, backend="cuda")


def test_unknown_backend_from_environment(x, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=rf"{ENV_VAR}='fastest' is not a backend"):
        call(x, backend="auto")


def test_unknown_strategy(x):
    with pytest.raises(ValueError, match=r"strategy='fast' is not supported; expected one of \('auto', 'chunked', "
                                         r"'tiled'\)"):
        call(x, strategy="fast")


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, -math.inf], ids=["zero", "negative", "nan", "-inf"])
def test_temperature_not_positive(x, temperature):
    with pytest.raises(ValueError, match=r"temperature=.* must be a number > 0"):
        call(x, temperature=temperature)


def test_temperature_infinite(x):
    with pytest.raises(ValueError, match=r"temperature=inf must be finite"):
        call(x, temperature=math.inf)


def test_temperature_not_a_number(x):
    with pytest.raises(ValueError, match=r"temperature='1' must be a number > 0"):
        call(x, temperature="1")


@pytest.mark.parametrize("beta", [-0.1, 1.5, math.nan])
def test_beta_outside_unit_interval(x, beta):
    with pytest.raises(ValueError, match=r"beta=.* must be a number in \[0, 1\]"):
        call(x, divergence="jsd", beta=beta)


@pytest.mark.parametrize("divergence", ["skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("skew", [-0.5, 1.01])
def test_skew_outside_unit_interval(x, divergence, skew):
    with pytest.raises(ValueError, match=r"skew=.* must be a number in \[0, 1\]"):
        call(x, divergence=divergence, skew=skew)


@pytest.mark.parametrize("softcap", [0.0, -30.0])
def test_softcap_not_positive(x, softcap):
    with pytest.raises(ValueError, match=r"softcap=.* must be a number > 0"):
        call(x, softcap=softcap)


@pytest.mark.parametrize("chunk_size", [0, -1, 2.0])
def test_chunk_size_not_positive_int(x, chunk_size):
    with pytest.raises(ValueError, match=r"chunk_size=.* must be a positive int"):
        call(x, chunk_size=chunk_size)


def test_tiled_strategy_on_torch_backend(x):
    with pytest.raises(ValueError, match=r"strategy='tiled' runs on the triton backend only; backend 'torch'"):
        call(x, backend="torch", strategy="tiled")


@pytest.mark.parametrize("strategy", ["chunked", "tiled"])
def test_triton_backend_with_float64(x, strategy):
    if ("triton", strategy) not in IMPLS:
        pytest.skip("triton backend not available on this machine")
    x64 = {k: None if v is None else v.double() for k, v in x.items()}
    with pytest.raises(TypeError, match=r"the triton backend takes float32, bfloat16 or float16 inputs, got "
                                        r"float64; use backend='torch'"):
        call(x64, backend="triton", strategy=strategy)


# ----------------------------------------------------------------------------------------------------------------------
# wrappers
# ----------------------------------------------------------------------------------------------------------------------
def test_fused_reverse_kl_refuses_divergence(x):
    with pytest.raises(TypeError, match=r"fused_reverse_kl\(\) fixes divergence='reverse_kl'"):
        fused_reverse_kl(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                         divergence="jsd")


def test_loss_module_unknown_divergence_fails_at_construction():
    with pytest.raises(ValueError, match=r"divergence='rkl' is not supported"):
        FusedDivergenceLoss("rkl")
    with pytest.raises(ValueError, match=r"beta=2 must be a number in \[0, 1\]"):
        FusedDivergenceLoss("jsd", beta=2)


def test_loss_module_needs_linear_heads(x):
    loss_fn = FusedDivergenceLoss(backend="torch")
    teacher = torch.nn.Linear(12, 19).to(DEVICE)
    with pytest.raises(TypeError, match=r"student_lm_head must be an nn.Linear \(the model's lm_head\), got Tensor"):
        loss_fn(x["student_hidden"], x["student_weight"], x["teacher_hidden"], teacher)


# ----------------------------------------------------------------------------------------------------------------------
# each model's logit scale and softcap
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, value", [("logit_scale", -1.0), ("student_logit_scale", 0.0),
                                         ("teacher_logit_scale", float("nan")), ("logit_scale", True),
                                         ("teacher_softcap", -2.0), ("student_softcap", "3")])
def test_bad_logit_scale_or_softcap_names_it(x, name, value):
    with pytest.raises(ValueError, match=rf"{name}=.* must be a (finite )?number > 0"):
        call(x, **{name: value})


@pytest.mark.parametrize("shared, own", [("softcap", "student_softcap"), ("logit_scale", "teacher_logit_scale")])
def test_shared_and_per_model_option_together(x, shared, own):
    with pytest.raises(ValueError, match=rf"pass {shared}= \(both models\) or student_{shared}= / "
                                         rf"teacher_{shared}= \(each model\), not both"):
        call(x, **{shared: 2.0, own: 3.0})
