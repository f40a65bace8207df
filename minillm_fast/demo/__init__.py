"""The built-in default: everything needed to try minillm-fast with no model hub and no download.

On a fresh machine (a 2-core CPU is enough) the demo generates its own instruction data set, trains its own
tokenizer on it, and builds a tiny teacher and tiny students from scratch; the distillation code then trains and
distils them exactly as it would real checkpoints loaded from local paths (``AutoTokenizer`` /
``AutoModelForCausalLM``), in minutes. One module per piece:

* ``tasks``: the data set, nine task families in dolly's layout (``TaskRecord``: ``instruction``, ``context``,
  ``response``, plus ``references`` and ``task``), seeded; ``write_splits`` writes train/valid/test JSON lines
  (4000/200/200 by default, no prompt shared), ``write_pretrain_corpus`` the plain text of the pre-training term.
  The files are read back, and rendered with the prompt template, by the trainer's own ``minillm_fast.distill.data``
  (``read_jsonl``, ``format_prompt``).
* ``tokenizer``: ``build_tokenizer``, a byte-level BPE trained on that data as the models read it
  (``demo_tokenizer_texts``, ``rendered_texts``), saved with ``save_pretrained``; ``distill.toy`` trains its tiny
  workspace's tokenizer with it too.
* ``configs``: ``teacher_config`` / ``student_config`` (GPT-2 and LLaMA families) and ``build_model``. Two sets of
  shapes: the default ones (~5M-parameter teacher, ~1M student, ~0.5M ``student_small``) and the ``quick=True``
  ones (~0.8M teacher, ~0.2M student). Both demo schedules, the full one and ``--quick``, train the quick shapes
  (the default teacher does not become good on a CPU in the demo's budget; the report's notes give the numbers);
  they differ in data size and steps. The default shapes are there to build by hand (the example below) and for
  the benchmarks (bench/e2e.py); ``student_small`` is used by no schedule.
* ``pipeline``: ``minillm-fast demo`` (``run_demo``, one ``DemoRun`` method per stage): the pieces above, then a
  teacher trained by SFT and students distilled with SFT, KD, SeqKD, MiniLLM, MiniLLM's three ablations and OKD
  through ``minillm-fast distill``, all evaluated over 5 seeds on the test split (``minillm-fast evaluate``);
  ``report`` writes the table, plots and timings.

Example (no network; about ten seconds)::

    from minillm_fast.demo import (write_splits, write_pretrain_corpus, demo_tokenizer_texts, build_tokenizer,
                                   teacher_config, student_config, special_token_ids, build_model)
    paths = write_splits("demo/data", seed=0)
    write_pretrain_corpus("demo/data/pretrain.txt", seed=0)
    tok = build_tokenizer(demo_tokenizer_texts("demo/data"), "demo/tokenizer")
    teacher = build_model(teacher_config(len(tok), "gpt2", **special_token_ids(tok)), seed=0)
    student = build_model(student_config(len(tok), "gpt2", **special_token_ids(tok)), seed=1)
    teacher.save_pretrained("demo/teacher-init"); tok.save_pretrained("demo/teacher-init")

The whole demo, from the shell: ``minillm-fast demo [--quick] [--out runs/demo] [--fresh]``. The data alone:
``python -m minillm_fast.demo.tasks OUT_DIR [--seed 0] [--train 4000 ...]``.

``tasks`` needs only the standard library; ``tokenizer`` and ``configs`` import ``tokenizers``, ``transformers``
and ``torch`` when called (the ``train`` extra). The names below are imported from their module on first use.
"""
import importlib

_EXPORTS = {
    "pipeline": ["run_demo"],
    "configs": ["FAMILIES", "MAX_POSITIONS", "SHAPES", "build_model", "num_parameters", "special_token_ids",
                "student_config", "teacher_config"],
    "tasks": ["DEFAULT_SIZES", "TASK_FAMILIES", "TaskRecord", "generate_example", "generate_splits", "pretrain_corpus",
              "write_pretrain_corpus", "write_splits"],
    "tokenizer": ["SPECIAL_TOKENS", "build_tokenizer", "demo_tokenizer_texts", "load_tokenizer", "rendered_texts"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name):
    # Imported on first use, so that ``python -m minillm_fast.demo.tasks`` does not find its module already imported
    # by the package (runpy warns about that) and ``import minillm_fast.demo`` stays cheap.
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
