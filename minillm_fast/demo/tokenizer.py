"""A tokenizer for the built-in demo, trained on the generated data: no download, same files on every machine.

``build_tokenizer(texts, out_dir)`` trains a byte-level BPE with the ``tokenizers`` library and saves it with
``save_pretrained``, so ``AutoTokenizer.from_pretrained(out_dir)`` loads it like any Hugging Face tokenizer:

* **byte-level**, as GPT-2: every string encodes (no unknown token is ever produced) and ``decode(encode(x)) == x``
  exactly (no normaliser, no added prefix space, no BOS/EOS added by ``encode``, no clean-up of spaces on decode);
* **digits split one by one** before BPE, so ``" 47"`` is ``Ġ 4 7`` and numbers share their digit embeddings (what a
  tiny model needs to learn the worked sums of the ``arithmetic`` family);
* four special tokens, ids 0-3: ``<|pad|>``, ``<|bos|>``, ``<|eos|>`` (the end of every response), ``<|unk|>``
  (declared for code that expects one; byte-level BPE never emits it); the pad token is not the EOS token, so
  masking padding never masks the end of a response;
* trained on whole rendered examples (the trainer's template, instruction, input, response) plus the pre-training corpus
  (``demo_tokenizer_texts``), so the template is one token a word: its 16-word opening sentence is 18 tokens,
  ``### Response:`` and its newline are 4 (``###``, ``ĠResponse``, ``:``, ``Ċ``); the whole template adds 30 tokens
  to an instruction (45 with the ``### Input:`` block);
* deterministic: the same texts in the same order give byte-identical ``tokenizer.json``.

``vocab_size=2048`` is an upper bound: on the default data (~470 distinct words) BPE runs out of pairs seen twice at
1795 tokens, whole words with and without a leading space, digits and the template's pieces. Prompt + response +
EOS of the default data: 42 to 150 tokens, median 77 (prompt 37-140, response 2-56).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Union

from ..distill.data import format_prompt, read_jsonl
from .tasks import generate_splits, pretrain_corpus

__all__ = ["SPECIAL_TOKENS", "MODEL_MAX_LENGTH", "build_tokenizer", "demo_tokenizer_texts", "rendered_texts",
           "load_tokenizer"]

SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>", "unk_token": "<|unk|>"}
MODEL_MAX_LENGTH = 256  # the demo models' context (configs.MAX_POSITIONS); prompt + response fit well inside it


def demo_tokenizer_texts(data_dir: Optional[Union[str, Path]] = None, seed: int = 0, pretrain_lines: int = 3000,
                         splits: Iterable[str] = ("train", "valid", "test")) -> List[str]:
    """The texts the demo tokenizer is trained on: every example rendered as the model will see it (prompt template,
    response, and the other references) and the pre-training corpus.

    With ``data_dir`` the examples are read from ``{data_dir}/{split}.jsonl`` (and ``{data_dir}/pretrain.txt`` when it
    exists); without it they are generated with ``seed`` (``tasks.generate_splits`` with its default sizes). Reading
    every split (valid and test included) only shares the vocabulary, which is closed anyway.
    """
    if data_dir is None:
        examples = [ex for exs in generate_splits(seed).values() for ex in exs]
        pretrain = pretrain_corpus(seed, pretrain_lines)
    else:
        data_dir = Path(data_dir)
        examples = [ex for split in splits for ex in read_jsonl(data_dir / f"{split}.jsonl")]
        pt_path = data_dir / "pretrain.txt"
        pretrain = ([line for line in pt_path.read_text(encoding="utf-8").splitlines() if line.strip()]
                    if pt_path.exists() else pretrain_corpus(seed, pretrain_lines))
    return rendered_texts(examples, pretrain)


def rendered_texts(examples: Iterable[Mapping], documents: Iterable[str] = ()) -> List[str]:
    """What a tokenizer for instruction tuning is trained on: each example as the model reads it (the trainer's
    prompt, ``minillm_fast.distill.data.format_prompt``, then the response), its other reference phrasings, and the
    pre-training ``documents``."""
    texts = []
    for ex in examples:
        texts.append(format_prompt(ex["instruction"], ex.get("context")) + ex["response"])
        texts.extend(r for r in ex.get("references", []) if r != ex["response"])
    return texts + list(documents)


def build_tokenizer(texts: Iterable[str], out_dir: Union[str, Path], vocab_size: int = 2048,
                    min_frequency: int = 2, *, special_tokens: Mapping[str, str] = SPECIAL_TOKENS,
                    split_digits: bool = True, model_max_length: Optional[int] = MODEL_MAX_LENGTH):
    """Train a byte-level BPE on ``texts``, save it to ``out_dir`` (``save_pretrained``) and return it as a
    ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos/unk set (see the module docstring).

    ``vocab_size`` is an upper bound including the special tokens and the 256 byte symbols; BPE stops earlier when
    no pair occurs ``min_frequency`` times, so use ``len(tokenizer)`` as the model's vocabulary size.
    ``special_tokens`` (ids 0, 1, ... in their order), ``split_digits`` (digits one by one before BPE) and
    ``model_max_length`` (``None``: transformers' "no limit") are the demo's by default; ``distill.toy`` trains its
    tiny tokenizer with other values.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    n_special = len(special_tokens)
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < n_special + len(byte_alphabet):
        raise ValueError(f"vocab_size={vocab_size} is below {n_special + len(byte_alphabet)} (the special tokens and "
                         f"the 256 byte symbols); use at least that, 2048 for the demo")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: pass the corpus to train on, e.g. demo_tokenizer_texts()")

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(special_tokens.values()), initial_alphabet=byte_alphabet)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))

    limit = {} if model_max_length is None else {"model_max_length": model_max_length}
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, padding_side="right",
                                      **limit, **special_tokens)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out_dir))
    # transformers 5 records its own class name ("TokenizersBackend"), which transformers 4 cannot load; the class
    # both versions know by this name reads the same tokenizer.json.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return wrapped


def load_tokenizer(path: Union[str, Path]):
    """``AutoTokenizer.from_pretrained(path)`` for a directory written by ``build_tokenizer``."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(str(path))
