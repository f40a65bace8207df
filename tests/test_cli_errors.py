"""The command line never shows a traceback for a mistake a user can make: one paragraph, exit code 2; ``--debug``
shows the traceback. Each case runs the real entry point in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from distill_utils import workspace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str], timeout: float = 300, prelude: str = "") -> subprocess.CompletedProcess:
    """``python -m minillm_fast ARGS`` (after ``prelude``, Python run first in the same process)."""
    code = textwrap.dedent(prelude) + "\nimport sys\nfrom minillm_fast.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _assert_one_paragraph(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "error:" in res.stderr and "--debug" in res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr[-3000:]


def _distill_args(tmp_path, **overrides) -> list[str]:
    p = workspace("gpt2")
    values = dict(method="kd", student=p["student"], teacher=p["teacher"], train_data=p["train_data"],
                  output_dir=str(tmp_path / "run"), total_iters=1, batch_size=2, max_length=64, max_prompt_length=48,
                  progress_bar=False, plots=False, final_eval=False, eval_generate=False, select_metric="none")
    values.update(overrides)
    return ["distill", *(f"{k}={v}" for k, v in values.items())]


def test_missing_model_path(tmp_path):
    res = _run(_distill_args(tmp_path, student=str(tmp_path / "nowhere")))
    _assert_one_paragraph(res, "does not exist")


def test_debug_shows_the_traceback(tmp_path):
    res = _run(["--debug", *_distill_args(tmp_path, student=str(tmp_path / "nowhere"))])
    assert res.returncode != 0 and "Traceback" in res.stderr and "does not exist" in res.stderr


def test_incompatible_pair_is_one_paragraph(tmp_path):
    """A teacher whose head is smaller than the tokenizer (another model's checkpoint): refused at load."""
    from minillm_fast.distill import toy

    small = str(tmp_path / "small")
    toy.build_model("gpt2", 100, 16, 1, small)
    res = _run(_distill_args(tmp_path, teacher=small))
    _assert_one_paragraph(res, "vocabulary mismatch")


def test_unknown_logit_post_processing_is_refused_before_training(tmp_path):
    """A student whose forward changes its logits in a way the package does not know: the load-time probe refuses
    it in one paragraph, before any step (no metrics written)."""
    prelude = """
        import torch, transformers
        forward = transformers.GPT2LMHeadModel.forward
        def shifted(self, *a, **k):
            out = forward(self, *a, **k)
            out.logits = out.logits * 1.5 + torch.linspace(0, 1, out.logits.shape[-1], dtype=out.logits.dtype)
            return out
        transformers.GPT2LMHeadModel.forward = shifted
    """
    res = _run(_distill_args(tmp_path), prelude=prelude)
    _assert_one_paragraph(res, "GPT2LMHeadModel", "post-processes its logits", "nats")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("module", ["transformers", "yaml"])
def test_missing_train_extra_names_it(tmp_path, module):
    """``minillm-fast demo`` / ``distill`` on an install without the train extra say which extra to install."""
    prelude = f"import sys\nsys.modules[{module!r}] = None  # as if not installed\n"
    args = ["demo", "--quick", "--out", str(tmp_path / "demo")] if module == "transformers" else \
        _distill_args(tmp_path)
    res = _run(args, prelude=prelude)
    _assert_one_paragraph(res, "pip install 'minillm-fast[train]'", repr(module))


def test_unwritable_output_dir_is_one_paragraph_before_loading_models(tmp_path):
    """An output_dir that cannot be created (here under a file; as root, permissions would not stop it)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = _run(_distill_args(tmp_path, output_dir=str(blocker / "run")))
    _assert_one_paragraph(res, "a-file")
