"""The built-in default: everything needed to try minillm-fast with no model hub and no download.

On a fresh machine (a 2-core CPU is enough) the demo generates its own instruction data set, trains its own
tokenizer on it, and builds a tiny teacher and tiny students from scratch; the distillation code then trains and
distils them exactly as it would real checkpoints loaded from local paths (``AutoTokenizer`` /
``AutoModelForCausalLM``), in minutes. One module per piece:

* ``tasks``: the data set, nine task families in dolly's layout (``instruction``, ``context``, ``response``, plus
  ``references`` and ``task``), seeded; ``write_splits`` writes train/valid/test JSON lines (4000/200/200 by
  default, no prompt shared), ``write_pretrain_corpus`` the plain text of the pre-training term.
* ``tokenizer``: ``build_tokenizer``, a byte-level BPE trained on that data (``demo_tokenizer_texts``), saved with
  ``save_pretrained``.
* ``configs``: ``teacher_config`` / ``student_config`` (GPT-2 and LLaMA families, ~5M-parameter teacher,
  ~1M and ~0.5M students, ``quick`` variants for a smoke run) and ``build_model``.
* ``pipeline``: ``minillm-fast demo`` (``run_demo``): the pieces above, then a teacher trained by SFT and students
  distilled with SFT, KD, SeqKD, MiniLLM and MiniLLM's three ablations through ``minillm-fast distill``, all evaluated
  over 5 seeds on the test split (``minillm-fast evaluate``); ``report`` writes the table, plots and timings.

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
    "tasks": ["DEFAULT_SIZES", "PROMPT_NO_INPUT", "PROMPT_WITH_INPUT", "TASK_FAMILIES", "format_prompt",
              "generate_example", "generate_splits", "pretrain_corpus", "read_jsonl", "write_pretrain_corpus",
              "write_splits"],
    "tokenizer": ["SPECIAL_TOKENS", "build_tokenizer", "demo_tokenizer_texts", "load_tokenizer"],
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
