"""Evaluation: sample responses and score them with Rouge-L and exact match, over several seeds.

As in the MiniLLM reference (appendix B.2): responses are sampled with ``model.generate`` at temperature 1, top-k 0,
top-p 1 and ``no_repeat_ngram_size=6``, once per seed in 10, 20, 30, 40, 50; each prediction is scored against every
reference of its example and the best score is kept; Rouge-L is the F-measure of the ``rouge-score`` package with
stemming; exact match compares SQuAD-normalised strings (lower case, no punctuation, no articles, single spaces).
Both are reported x 100, as the mean and the standard deviation (population, ddof=0) over the seeds; each example's
scores are kept too (``per_example``: the demo report's paired tests read them).

With ``--model``, the paper's other measurements (distill/fidelity.py) are added: response length and distinct-4 per
seed, and the calibration (ECE) of the model's next-token probabilities on the references; with ``--teacher`` and
``--teacher-predictions`` (the teacher's own evaluation ``results.json`` on the same data) also the exposure bias,
ExAccErr by generation length, from forward passes of both models on both models' samples.

    minillm-fast evaluate --model runs/minillm/best --data valid.jsonl --output runs/minillm/eval
    minillm-fast evaluate --model runs/kd/best --data test.jsonl --output eval/kd \
        --teacher runs/teacher/best --teacher-predictions eval/teacher/results.json      # with ExAccErr
    minillm-fast evaluate --data valid.jsonl --predictions preds.jsonl --output out/     # score given predictions
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import string
import sys
import time
from typing import Optional, Sequence

import torch

SEEDS = (10, 20, 30, 40, 50)

_scorer = None


def _rouge():
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _scorer


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD's normalisation)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure (stemmed) in [0, 1]."""
    return _rouge().score(target=reference, prediction=prediction)["rougeL"].fmeasure


def score_examples(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """``{"rougeL": [...], "exact_match": [...]}`` x 100 per example, each the max over that example's references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    rl, em = [], []
    for pred, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError("an example has no reference response")
        rl.append(100.0 * max(rouge_l(pred, r) for r in refs))
        em.append(100.0 * max(exact_match(pred, r) for r in refs))
    return {"rougeL": rl, "exact_match": em}


def compute_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """``{"rougeL", "exact_match"}`` x 100, each the mean over examples of the max over that example's references."""
    return {k: statistics.fmean(v) for k, v in score_examples(predictions, references).items()}


def summarize(per_seed: dict) -> dict:
    """Mean and std (ddof=0) over seeds of every metric in ``per_seed = {seed: {metric: value}}`` (a None value, an
    undefined metric such as distinct-4 of responses under 4 words, is left out; a metric with none is too)."""
    keys = sorted({k for m in per_seed.values() for k in m})
    out = {}
    for k in keys:
        vals = [m[k] for m in per_seed.values() if m.get(k) is not None]
        if not vals:
            continue
        out[f"{k}_mean"] = statistics.fmean(vals)
        out[f"{k}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return out


# ----------------------------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------------------------
def generate_responses(model, tokenizer, examples, *, seed: int, max_new_tokens: int, batch_size: int = 32,
                       no_repeat_ngram_size: int = 6, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0) -> list[str]:
    """Sampled responses (decoded, special tokens skipped) to the examples' prompts, with ``model.generate``."""
    from transformers import GenerationConfig

    from .data import collate_prompts

    device = next(model.parameters()).device
    gen_cfg = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                               no_repeat_ngram_size=no_repeat_ngram_size or None, max_new_tokens=max_new_tokens,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    out = []
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate_prompts(examples[start:start + batch_size], tokenizer.pad_token_id)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            with torch.no_grad():
                seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
            out.extend(tokenizer.batch_decode(seqs[:, ids.shape[1]:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return [o.strip() for o in out]


def evaluate_model(model, tokenizer, examples, *, seeds: Sequence[int] = SEEDS, max_new_tokens: int = 256,
                   batch_size: int = 32, no_repeat_ngram_size: int = 6) -> dict:
    """Rouge-L and exact match per seed and their mean / std; predictions kept per seed."""
    refs = [e.references for e in examples]
    per_seed, per_example, predictions = {}, {}, {}
    for seed in seeds:
        preds = generate_responses(model, tokenizer, examples, seed=seed, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, no_repeat_ngram_size=no_repeat_ngram_size)
        per_example[seed] = score_examples(preds, refs)
        per_seed[seed] = {k: statistics.fmean(v) for k, v in per_example[seed].items()}
        predictions[seed] = preds
    return {"n_examples": len(examples), "seeds": list(seeds), "per_seed": per_seed, **summarize(per_seed),
            "max_new_tokens": max_new_tokens, "prompts_sha256": prompts_digest(examples),
            "per_example": per_example, "predictions": predictions}


def prompts_digest(examples) -> str:
    """A fingerprint of the examples' prompts, so results on other prompts are refused (``--teacher-predictions``)."""
    return hashlib.sha256("\0".join(e.prompt for e in examples).encode("utf-8")).hexdigest()


def add_fidelity(results: dict, model, tokenizer, examples, *, teacher=None, teacher_results: Optional[dict] = None,
                 batch_size: int = 32) -> dict:
    """``results`` (of ``evaluate_model``) with the measurements of distill/fidelity.py: ``length`` and
    ``distinct4`` in every seed's numbers (so ``length_mean`` ...), ``calibration`` / ``ece`` and, with a teacher,
    ``exposure_bias`` / ``exaccerr``."""
    from . import fidelity

    # at most 32 examples a batch: each seed's responses are padded to the longest in the batch (the demo's full
    # schedule: 4.2 s of forward passes at batch 100, 3.2 s at 20)
    got = fidelity.measure(model, tokenizer, examples, results["predictions"],
                           max_new_tokens=results["max_new_tokens"], teacher=teacher,
                           teacher_predictions=None if teacher_results is None else teacher_results["predictions"],
                           batch_size=min(batch_size, 32))
    for seed, extra in got.pop("per_seed").items():
        results["per_seed"][seed].update(extra)
    results.update(summarize(results["per_seed"]), ece=got["calibration"]["ece"], **got)
    return results


def load_teacher_results(path: str, examples, max_new_tokens: int) -> dict:
    """The teacher's evaluation ``results.json`` (``--teacher-predictions``), checked against ``examples``: the same
    prompts (by ``prompts_digest`` when recorded, else by count), one prediction per example in every seed, the same
    ``max_new_tokens``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--teacher-predictions {path!r} does not exist (the teacher's results.json from "
                                f"'minillm-fast evaluate --model TEACHER' on the same --data)")
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
    except ValueError as e:
        raise ValueError(f"--teacher-predictions {path!r} is not JSON: {e}") from None
    preds = res.get("predictions") if isinstance(res, dict) else None
    if not isinstance(preds, dict) or not preds:
        raise ValueError(f"--teacher-predictions {path!r} has no 'predictions' ({{seed: [text per example]}}); pass "
                         f"the results.json that 'minillm-fast evaluate --model TEACHER' wrote")
    digest = res.get("prompts_sha256")
    if digest is not None and digest != prompts_digest(examples):
        raise ValueError(f"--teacher-predictions {path!r} was evaluated on other prompts than --data (prompt "
                         f"fingerprints differ); evaluate the teacher on the same file and prompt lengths")
    for seed, texts in preds.items():
        if not isinstance(texts, list) or len(texts) != len(examples):
            n = len(texts) if isinstance(texts, list) else type(texts).__name__
            raise ValueError(f"--teacher-predictions {path!r}: seed {seed} has {n} predictions but --data has "
                             f"{len(examples)} examples; evaluate the teacher on the same data")
    if res.get("max_new_tokens", max_new_tokens) != max_new_tokens:
        raise ValueError(f"--teacher-predictions {path!r} was sampled with max_new_tokens={res['max_new_tokens']}, "
                         f"this evaluation with {max_new_tokens}: ExAccErr compares equal generation budgets")
    return res


def score_predictions(records: Sequence[dict], examples) -> dict:
    """Score given predictions: ``records`` are ``{"prediction": str, "index": int (default: order), "seed": int
    (default 0)}``; ``examples`` supply the references by index."""
    by_seed: dict = {}
    for i, rec in enumerate(records):
        if "prediction" not in rec:
            raise ValueError(f"prediction record {i} has no 'prediction' field")
        seed = int(rec.get("seed", 0))
        by_seed.setdefault(seed, []).append((int(rec.get("index", len(by_seed.get(seed, [])))), rec["prediction"]))
    per_seed, per_example, predictions = {}, {}, {}
    for seed, items in by_seed.items():
        for idx, _ in items:
            if not 0 <= idx < len(examples):
                raise ValueError(f"prediction index {idx} is outside the {len(examples)} examples of --data")
        preds = [p for _, p in items]
        per_example[seed] = score_examples(preds, [examples[idx].references for idx, _ in items])
        per_seed[seed] = {k: statistics.fmean(v) for k, v in per_example[seed].items()}
        predictions[seed] = preds
    return {"n_examples": len(examples), "seeds": sorted(per_seed), "per_seed": per_seed, **summarize(per_seed),
            "per_example": per_example, "predictions": predictions}


def write_results(results: dict, out_dir: str, name: str = "results") -> tuple[str, str]:
    """``<name>.json`` (numbers and predictions) and ``<name>.md`` (a table) in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    lines = ["| seed | Rouge-L | exact match |", "| --- | --- | --- |"]
    for seed, m in results["per_seed"].items():
        lines.append(f"| {seed} | {m['rougeL']:.2f} | {m['exact_match']:.2f} |")
    lines.append(f"| **mean +- std** | **{results['rougeL_mean']:.2f} +- {results['rougeL_std']:.2f}** | "
                 f"**{results['exact_match_mean']:.2f} +- {results['exact_match_std']:.2f}** |")
    extra = [k for k in results if k.endswith("_mean") and k not in ("rougeL_mean", "exact_match_mean")]
    for k in extra:
        lines.append(f"\n{k[:-5]}: {results[k]:.4f} +- {results[k[:-5] + '_std']:.4f}")
    if "ece" in results:
        lines.append(f"\nECE (10 bins, next-token on the references): {results['ece']:.4f}")
    for length, value in results.get("exaccerr", {}).items():
        lines.append(f"\nExAccErr({length}): {value:.1f}%")
    with open(md_path, "w") as f:
        f.write(f"Evaluation over {results['n_examples']} examples, seeds {results['seeds']}\n\n")
        f.write("\n".join(lines) + "\n")
    return json_path, md_path


# ----------------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="minillm-fast evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="JSONL with instruction / [context|input] / response(s)")
    parser.add_argument("--output", required=True, help="directory for results.json and results.md")
    parser.add_argument("--model", help="local save_pretrained directory of the model to evaluate")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    parser.add_argument("--predictions", help="JSONL of given predictions to score instead of generating")
    parser.add_argument("--teacher", help="the teacher's save_pretrained directory: adds the exposure bias "
                        "(ExAccErr) of --model as its student; needs --teacher-predictions")
    parser.add_argument("--teacher-predictions", help="the teacher's results.json from 'minillm-fast evaluate' on "
                        "the same --data (its samples are the oracle prefixes of ExAccErr)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default max_length - max_prompt_length")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=6)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)

    from .data import describe_lines, load_instructions, read_jsonl
    from .models import ModelLoadError, load_model, load_tokenizer, pick_device

    try:
        if args.predictions is None and args.model is None:
            raise ValueError("pass --model (to sample and score) or --predictions (to score given predictions)")
        if (args.teacher is None) != (args.teacher_predictions is None):
            raise ValueError("--teacher and --teacher-predictions go together (the teacher and its own evaluation "
                             "results.json): pass both for the exposure bias, or neither")
        if args.teacher is not None and args.model is None:
            raise ValueError("--teacher needs --model: the exposure bias runs the evaluated model, which given "
                             "--predictions do not have")
        tok_path = args.tokenizer or args.model
        if args.predictions is not None and tok_path is None:
            examples = _examples_without_tokenizer(args.data)
            results = score_predictions(read_jsonl(args.predictions), examples)
        else:
            tokenizer = load_tokenizer(tok_path)
            examples, dropped = load_instructions(args.data, tokenizer, max_length=args.max_length,
                                                  max_prompt_length=args.max_prompt_length)
            if dropped:
                print(f"evaluate: dropped {len(dropped)} prompt(s) longer than {args.max_prompt_length} tokens: "
                      f"{describe_lines(args.data, dropped)}",
                      file=sys.stderr)
            if args.predictions is not None:
                results = score_predictions(read_jsonl(args.predictions), examples)
            else:
                device = pick_device(args.device)
                model = load_model(args.model, dtype=args.dtype, device=device, what="model")
                max_new = args.max_new_tokens or args.max_length - args.max_prompt_length
                teacher = teacher_results = None
                if args.teacher is not None:
                    teacher_results = load_teacher_results(args.teacher_predictions, examples, max_new)
                    teacher = load_model(args.teacher, dtype=args.dtype, device=device, what="teacher")
                results = evaluate_model(model, tokenizer, examples, seeds=args.seeds, max_new_tokens=max_new,
                                         batch_size=args.batch_size, no_repeat_ngram_size=args.no_repeat_ngram_size)
                t0 = time.perf_counter()
                add_fidelity(results, model, tokenizer, examples, teacher=teacher, teacher_results=teacher_results,
                             batch_size=args.batch_size)
                results["fidelity_seconds"] = time.perf_counter() - t0
    except (ValueError, FileNotFoundError, ModelLoadError) as e:
        print(f"minillm-fast evaluate: error: {e}", file=sys.stderr)
        return 2
    json_path, md_path = write_results(results, args.output)
    print(f"Rouge-L {results['rougeL_mean']:.2f} +- {results['rougeL_std']:.2f}, exact match "
          f"{results['exact_match_mean']:.2f} +- {results['exact_match_std']:.2f} over seeds {results['seeds']} "
          f"({results['n_examples']} examples); wrote {json_path} and {md_path}")
    return 0


def _examples_without_tokenizer(path: str):
    """References of a JSONL file, for scoring given predictions (no tokenizer needed, nothing dropped)."""
    from .data import Example, read_jsonl, record_prompt_and_references

    out = []
    for i, rec in enumerate(read_jsonl(path)):
        prompt, refs = record_prompt_and_references(rec, f"{path}: record {i}")
        if not refs:
            raise ValueError(f"{path}: record {i} has no 'response' (reference)")
        out.append(Example(prompt, [], [], refs))
    return out


if __name__ == "__main__":
    sys.exit(main())
