"""The paper's other measurements (distill/fidelity.py) and their place in ``minillm-fast evaluate``: distinct-n and ECE
on hand-made inputs, ExAccErr from per-step sums by hand, the forward passes against a float64 brute force through
``model(...).logits`` one unpadded sequence at a time, and the evaluate command's new options and their errors."""
from __future__ import annotations

import json

import pytest
import torch
from distill_utils import ARCHS, workspace

from minillm_fast.distill import evaluate as E
from minillm_fast.distill import fidelity as F
from minillm_fast.distill.data import load_instructions
from minillm_fast.distill.models import load_model, load_tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# pure arithmetic
# ----------------------------------------------------------------------------------------------------------------------
def test_distinct_n_on_known_strings():
    # abcd bcda cdab dabc abcd: 4 distinct of 5
    assert F.distinct_n(["a b c d a b c d"], 4) == pytest.approx(80.0)
    # n-grams never cross responses: "a b c" has none, "d e f g" one
    assert F.distinct_n(["a b c", "d e f g"], 4) == pytest.approx(100.0)
    # the same response twice: each 4-gram twice
    assert F.distinct_n(["x y z w v", "x y z w v"], 4) == pytest.approx(50.0)
    assert F.distinct_n(["too short", ""], 4) is None                   # undefined, not 0


def test_ece_of_a_calibrated_predictor_is_near_zero_and_of_an_overconfident_one_is_the_gap():
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(200_000, generator=gen)
    correct = torch.rand(200_000, generator=gen) < conf          # right with exactly the stated probability
    assert F.expected_calibration_error(conf, correct)["ece"] < 0.005
    # always 90% sure, right 60% of the time: one bin, |0.6 - 0.9|
    over = F.expected_calibration_error(torch.full((10,), 0.9), torch.arange(10) < 6)
    assert over["ece"] == pytest.approx(0.3) and over["accuracy"] == pytest.approx(0.6)
    assert over["bins"][8]["count"] == 10 and over["bins"][8]["accuracy"] == pytest.approx(0.6)


def test_ece_by_hand_with_bin_edges():
    # bin b holds (b/10, (b+1)/10]; 0 goes to bin 0 and 0.5 (exact in binary) to bin 4, not 5.
    # bin 9: conf 0.95, 1.0, right 1 of 2 -> |0.5 - 0.975| x 2/5; bin 0: conf 0, wrong -> 0; bin 4: conf 0.5, wrong
    # -> 0.5 x 1/5; bin 2: conf 0.25, right -> 0.75 x 1/5
    conf = torch.tensor([0.95, 1.0, 0.0, 0.5, 0.25])
    correct = torch.tensor([True, False, False, False, True])
    got = F.expected_calibration_error(conf, correct)
    assert got["ece"] == pytest.approx(0.475 * 0.4 + 0.5 * 0.2 + 0.75 * 0.2)
    assert [b["count"] for b in got["bins"]] == [1, 0, 1, 0, 1, 0, 0, 0, 0, 2]
    with pytest.raises(ValueError, match="same"):
        F.expected_calibration_error(conf, correct[:3])


def test_exposure_bias_by_hand():
    ones = torch.ones(3, dtype=torch.long) * 10
    # student prefixes: KL means 1, 2, 3; teacher prefixes 1, 1, 1: R(l) = 1, 3, 6 against l eps(l) = 1, 2, 3
    got = F.exposure_bias(torch.tensor([10.0, 20.0, 30.0]), ones, torch.tensor([10.0, 10.0, 10.0]), ones)
    assert got["lengths"] == [1, 2, 3]
    assert got["exaccerr"] == pytest.approx([0.0, 50.0, 100.0])
    # equal per-step means: no excess error at any length, whatever the sample counts
    same = F.exposure_bias(torch.tensor([4.0, 2.0]), torch.tensor([4, 2]), torch.tensor([8.0, 1.0]),
                           torch.tensor([8, 1]))
    assert same["exaccerr"] == pytest.approx([0.0, 0.0])
    assert F.at_lengths(got, (1, 3, 8)) == {"1": 0.0, "3": pytest.approx(100.0)}


def test_exposure_bias_stops_where_too_few_samples_are_still_generating():
    s_counts, t_counts = torch.tensor([10, 5, 1, 0]), torch.tensor([10, 10, 10, 10])
    got = F.exposure_bias(torch.tensor([1.0, 1.0, 1.0, 0.0]), s_counts, torch.ones(4), t_counts, min_fraction=0.2)
    assert got["lengths"] == [1, 2]                              # step 3 has 1 of 10 (< 20%) student samples
    assert got["student_count"] == [10, 5]
    with pytest.raises(ValueError, match="at least one generated token"):
        F.exposure_bias(torch.zeros(2), torch.zeros(2, dtype=torch.long), torch.ones(2), torch.ones(2))


def test_sum_by_step_counts_only_generating_rows():
    values = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    sums, counts = F.sum_by_step(values, mask, 5)
    assert sums.tolist() == [4.0, 2.0, 0.0, 0.0, 0.0] and counts.tolist() == [2, 1, 0, 0, 0]


def test_response_tokens_end_with_eos_unless_cut_at_the_cap():
    tok = load_tokenizer(workspace("gpt2")["tokenizer"])
    short, long = "red cat", "red blue green cat dog sun moon tree fish bird"
    got = F.response_token_ids(tok, [short, long], max_new_tokens=4)
    assert got[0] == tok(short, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert got[1] == tok(long, add_special_tokens=False)["input_ids"][:4]          # hit the cap: no EOS
    assert F.response_token_ids(tok, [""], 4) == [[tok.eos_token_id]]


# ----------------------------------------------------------------------------------------------------------------------
# forward passes against a float64 brute force
# ----------------------------------------------------------------------------------------------------------------------
def _models(arch):
    p = workspace(arch)
    tok = load_tokenizer(p["tokenizer"])
    student = load_model(p["student"]).double().eval()
    teacher = load_model(p["teacher"], what="teacher").double().eval()
    examples, _ = load_instructions(p["valid_data"], tok, max_length=80, max_prompt_length=64)
    return tok, student, teacher, examples


def _log_probs(model, ids, vocab):
    """``[len(ids), vocab]`` float64 next-token log-probs of one unpadded sequence, through the model's own logits."""
    with torch.no_grad():
        z = model(input_ids=torch.tensor([ids])).logits[0, :, :vocab].double()
    return z.log_softmax(-1)


@pytest.mark.parametrize("arch", ARCHS)
def test_kl_by_step_equals_a_brute_force(arch):
    tok, student, teacher, examples = _models(arch)
    vocab = len(tok)
    gen = torch.Generator().manual_seed(3)
    # two response sets of uneven lengths (1 to 6 tokens), random tokens: the prefixes need not be likely
    sets = [[torch.randint(3, vocab, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen).tolist()
             for _ in examples] for _ in range(2)]
    got = F.kl_by_step(teacher, student, examples, sets, steps=8, pad_id=tok.pad_token_id, vocab_size=vocab,
                       batch_size=3, backend="torch")
    want_s, want_c = torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.long)
    want_r, want_n = torch.zeros(len(examples), dtype=torch.float64), torch.zeros(len(examples), dtype=torch.long)
    for responses in sets:
        for i, (ex, resp) in enumerate(zip(examples, responses)):
            seq, p0 = ex.prompt_ids + resp, len(ex.prompt_ids)
            lp, lq = _log_probs(teacher, seq, vocab), _log_probs(student, seq, vocab)
            for t in range(len(resp)):                              # step t: predicted after prompt + resp[:t]
                row = p0 - 1 + t
                want_s[t] += (lp[row].exp() * (lp[row] - lq[row])).sum()
                want_c[t] += 1
                want_r[i] += (lq[row].exp() * (lq[row] - lp[row])).sum()
                want_n[i] += 1
    assert got.counts.tolist() == want_c.tolist() and got.tokens.tolist() == want_n.tolist()
    torch.testing.assert_close(got.sums, want_s, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.reverse_sums, want_r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_equals_a_brute_force(arch):
    tok, student, _, examples = _models(arch)
    vocab = len(tok)
    got = F.next_token_calibration(student, examples, pad_id=tok.pad_token_id, vocab_size=vocab, batch_size=3)
    conf, correct = [], []
    for ex in examples:
        lq = _log_probs(student, ex.prompt_ids + ex.response_ids, vocab)
        rows = lq[len(ex.prompt_ids) - 1:len(ex.prompt_ids) - 1 + len(ex.response_ids)]
        top, arg = rows.max(-1)
        conf.append(top.exp())
        correct.append(arg == torch.tensor(ex.response_ids))
    want = F.expected_calibration_error(torch.cat(conf), torch.cat(correct))
    assert got["n"] == sum(len(e.response_ids) for e in examples)
    assert got["ece"] == pytest.approx(want["ece"], abs=1e-9)
    assert got["accuracy"] == want["accuracy"]


def test_exaccerr_is_zero_when_the_student_sees_the_teachers_prefixes():
    """Student-prefix and oracle samples the same: R(l) = l eps(l) at every l, whatever the two models are."""
    tok, student, teacher, examples = _models("llama")
    preds = {10: ["red cat dog", "blue", "sun moon tree fish"] + ["green"] * (len(examples) - 3)}
    got = F.measure(student, tok, examples, preds, max_new_tokens=6, teacher=teacher, teacher_predictions=preds,
                    backend="torch", min_fraction=0.0)
    assert got["exposure_bias"]["lengths"][-1] >= 4
    assert got["exposure_bias"]["exaccerr"] == pytest.approx([0.0] * len(got["exposure_bias"]["lengths"]), abs=1e-9)
    assert min(got["exposure_bias"]["teacher_prefix_kl"]) > 0         # the models differ: not 0 / 0
    # against other prefixes the curve moves
    other = F.measure(student, tok, examples, {10: ["fish fish fish fish fish"] * len(examples)}, max_new_tokens=6,
                      teacher=teacher, teacher_predictions=preds, backend="torch", min_fraction=0.0)
    assert max(abs(x) for x in other["exposure_bias"]["exaccerr"][1:]) > 1.0
    assert got["per_seed"][10]["length"] == pytest.approx(
        sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in preds[10]) / len(examples))


# ----------------------------------------------------------------------------------------------------------------------
# the evaluate command
# ----------------------------------------------------------------------------------------------------------------------
def _evaluate(tmp_path, out: str, *extra: str) -> int:
    p = workspace("llama")
    return E.main(["--model", p["student"], "--data", p["valid_data"], "--output", str(tmp_path / out), "--seeds",
                   "10", "20", "--max-new-tokens", "6", "--max-length", "80", "--max-prompt-length", "64", *extra])


def test_evaluate_adds_the_measurements_and_exaccerr_with_a_teacher(tmp_path):
    p = workspace("llama")
    assert _evaluate(tmp_path, "teacher_eval") == 0          # (the student stands in for a teacher's own evaluation)
    teacher_res = tmp_path / "teacher_eval" / "results.json"
    plain = json.loads(teacher_res.read_text())
    assert {"ece", "calibration", "length_mean", "per_example"} <= set(plain)
    # the toy's responses are under 4 words: distinct-4 is undefined, left out rather than averaged as 0
    assert all(m["distinct4"] is None or m["distinct4"] > 0 for m in plain["per_seed"].values())
    assert "exaccerr" not in plain
    assert len(plain["per_example"]["10"]["rougeL"]) == plain["n_examples"]
    assert plain["per_seed"]["10"]["rougeL"] == pytest.approx(sum(plain["per_example"]["10"]["rougeL"])
                                                              / plain["n_examples"])
    assert _evaluate(tmp_path, "student_eval", "--teacher", p["teacher"], "--teacher-predictions",
                     str(teacher_res)) == 0
    res = json.loads((tmp_path / "student_eval" / "results.json").read_text())
    assert res["exposure_bias"]["lengths"][0] == 1 and res["exposure_bias"]["exaccerr"][0] == pytest.approx(0.0)
    assert "ExAccErr(" in (tmp_path / "student_eval" / "results.md").read_text() or not res["exaccerr"]
    assert 0.0 <= res["ece"] <= 1.0
    # the reverse KL on the student's own samples: per example, and the token mean over all of them
    per = res["rev_kl_per_example"]
    assert len(per) == res["n_examples"] and all(x >= 0 for x in per) and res["rev_kl"] > 0
    assert min(per) <= res["rev_kl"] <= max(per)


def test_evaluate_refuses_bad_teacher_inputs_naming_the_argument(tmp_path, capsys):
    p = workspace("llama")
    assert _evaluate(tmp_path, "a", "--teacher", p["teacher"]) == 2
    assert "--teacher-predictions" in capsys.readouterr().err
    assert _evaluate(tmp_path, "b", "--teacher", p["teacher"], "--teacher-predictions",
                     str(tmp_path / "missing.json")) == 2
    err = capsys.readouterr().err
    assert "--teacher-predictions" in err and "missing.json" in err and "does not exist" in err
    # results on other prompts: the fingerprint differs
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"prompts_sha256": "0" * 64, "predictions": {"10": ["x"]}}))
    assert _evaluate(tmp_path, "c", "--teacher", p["teacher"], "--teacher-predictions", str(other)) == 2
    assert "--teacher-predictions" in capsys.readouterr().err
    # no fingerprint recorded, but a different number of predictions
    other.write_text(json.dumps({"predictions": {"10": ["x", "y"]}}))
    assert _evaluate(tmp_path, "d", "--teacher", p["teacher"], "--teacher-predictions", str(other)) == 2
    err = capsys.readouterr().err
    assert "--teacher-predictions" in err and "2 predictions" in err
