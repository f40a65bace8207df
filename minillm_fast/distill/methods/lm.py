"""SFT and KD: ``(1 - r) CE + r KL(p || q)`` on the responses of the training set (``r = 0`` for sft, ``kd_ratio``
for kd), one global batch per optimiser step. Also the step of SeqKD (methods/seqkd.py), whose data differ.

The teacher ``p`` is the live teacher (full-vocabulary KL, :func:`minillm_fast.fused_divergence`) or, with
``teacher_cache``, its stored top k over these same examples (:func:`minillm_fast.sparse_divergence`; the teacher is
never loaded; distill/teacher_cache.py)."""
from __future__ import annotations

from typing import Optional

from .. import losses
from ..base import Method, register, to_float
from ..teacher_cache import CacheError, TeacherCache


@register("sft", "kd")
class LM(Method):
    cache: Optional[TeacherCache] = None

    def kd_ratio(self) -> float:
        return 0.0 if self.cfg.method == "sft" else self.cfg.kd_ratio

    def data_path(self) -> str:
        """The JSONL the training examples come from (what a teacher cache must have been made over)."""
        return self.cfg.train_data

    def read_examples(self) -> list:
        return super().load_train_set()

    def load_train_set(self) -> list:
        examples = self.read_examples()
        if self.cfg.teacher_cache is not None and self.kd_ratio() > 0:
            self.cache = open_cache(self.trainer, self.data_path(), examples)
        return examples

    def step(self) -> dict:
        tr, kd_ratio = self.trainer, self.kd_ratio()
        micro, n_tokens = tr.train_microbatches()
        scale = tr.world / max(n_tokens, 1)

        def loss_of(batch):
            b = tr.to_device(batch)
            hs = tr.student_hidden(b["input_ids"], b["attention_mask"])
            ht = top = None
            if kd_ratio > 0 and self.cache is not None:
                index = b["index"].tolist()
                top = self.cache.batch(index, [len(tr.train_set[i].prompt_ids) for i in index],
                                       b["labels"].shape[1] - 1, tr.device)
            elif kd_ratio > 0:
                ht = tr.teacher_hidden(b["input_ids"], b["attention_mask"])[:, :-1]
            terms = losses.lm_terms(hs[:, :-1], tr.student_head(), b["labels"][:, 1:], tr.opts, teacher_hidden=ht,
                                    t_head=tr.t_head, teacher_topk=top, tail=self.cfg.teacher_cache_tail)
            loss = losses.kd_objective(terms, kd_ratio) * scale
            return loss, {"ce": to_float(terms["ce"]), "kd": to_float(terms["kd"]) if terms["kd"] is not None else 0.0,
                          "seen": int(b["attention_mask"].sum())}

        tot = tr.accumulate(micro, loss_of, ("ce", "kd", "seen"))
        grad_norm, lr = tr.optimizer_step()
        n = max(n_tokens, 1)
        out = {"train/loss": ((1 - kd_ratio) * tot["ce"] + kd_ratio * tot["kd"]) / n, "train/ce": tot["ce"] / n,
               "train/grad_norm": grad_norm, "train/lr": lr, "train/tokens": n_tokens, "_seen": tot["seen"]}
        if kd_ratio > 0:
            out["train/kd"] = tot["kd"] / n
        return out


def open_cache(tr, data_path: str, examples: list) -> TeacherCache:
    """The run's teacher cache, checked against its tokenizer, data, lengths and examples (a
    :class:`~minillm_fast.distill.config.ConfigError` saying what differs otherwise)."""
    from ..config import ConfigError

    cfg = tr.cfg
    try:
        cache = TeacherCache.open(cfg.teacher_cache, tr.tokenizer, data_path, max_length=cfg.max_length,
                                  max_prompt_length=cfg.max_prompt_length, n_examples=len(examples))
    except CacheError as e:
        raise ConfigError(str(e)) from None
    rows = (cache.offsets[1:] - cache.offsets[:-1]).tolist()
    wrong = [i for i, (ex, r) in enumerate(zip(examples, rows)) if len(ex.response_ids) != r]
    if wrong:
        raise ConfigError(f"teacher_cache={cfg.teacher_cache!r}: example {wrong[0]} has "
                          f"{len(examples[wrong[0]].response_ids)} response tokens here but {rows[wrong[0]]} cached "
                          f"rows ({len(wrong)} such examples); rebuild the cache for this data")
    if cache.k > tr.vocab_size:
        raise ConfigError(f"teacher_cache={cfg.teacher_cache!r} holds k={cache.k} ids per token, more than the "
                          f"vocabulary ({tr.vocab_size})")
    tr.log(f"kd from teacher cache {cfg.teacher_cache} (k={cache.k}, tail={cfg.teacher_cache_tail}, "
           f"{int(cache.offsets[-1])} response tokens)")
    return cache
