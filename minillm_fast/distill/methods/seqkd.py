"""SeqKD: the step of methods/lm.py (``seqkd_objective``: kd, or sft with ``r = 0``) on the teacher's sampled
responses to the training prompts instead of the training responses. They are generated once (rank r the chunks
``c = r mod world_size``, each with a generator seeded by the run seed and ``c``), saved in the run directory as
``seqkd_train.jsonl`` and reused on resume; or read from ``seqkd_data`` when given."""
from __future__ import annotations

import os

import torch

from .. import data as D
from .. import ranks, rollout
from ..base import mix_seed, register
from .lm import LM


@register("seqkd")
class SeqKD(LM):
    def kd_ratio(self) -> float:
        return 0.0 if self.cfg.seqkd_objective == "sft" else self.cfg.kd_ratio

    def data_path(self) -> str:
        return self.cfg.seqkd_data or os.path.join(self.trainer.run_dir, "seqkd_train.jsonl")

    def read_examples(self) -> list:
        tr, cfg = self.trainer, self.cfg
        path = self.data_path()
        if not os.path.exists(path):
            prompts = tr.load_examples(cfg.train_data, max_samples=cfg.max_train_samples, require_response=False)
            chunks = D.split(list(range(len(prompts))), cfg.rollout_batch_size)
            mine = []
            for c, idx in enumerate(chunks):
                if c % tr.world != tr.rank:
                    continue
                batch = D.collate_prompts([prompts[i] for i in idx], tr.pad_id)
                gen = torch.Generator(tr.device).manual_seed(mix_seed(cfg.seed, 3, c))
                ro = rollout.generate(None, tr.teacher, batch["input_ids"].to(tr.device),
                                      batch["attention_mask"].to(tr.device), max_new_tokens=cfg.max_new_tokens,
                                      eos_token_id=tr.eos_id, pad_token_id=tr.pad_id, temperature=cfg.temperature,
                                      generator=gen, vocab_size=tr.vocab_size, backend=cfg.backend,
                                      compute_dtype=tr.rollout_dtype)
                for i, row in zip(idx, ro.unbatch()):
                    ids = row["response_ids"].tolist()
                    if ids and ids[-1] == tr.eos_id:
                        ids = ids[:-1]
                    mine.append((i, tr.tokenizer.decode(ids, skip_special_tokens=True)))
            gathered = sorted(x for part in ranks.all_gather_object(mine) for x in part)
            if tr.main:
                D.write_jsonl(path, [{"prompt": prompts[i].prompt, "response": text} for i, text in gathered])
                tr.log(f"seqkd: wrote {len(gathered)} teacher responses to {path}")
            ranks.barrier()
        return tr.load_examples(path, max_samples=cfg.max_train_samples)
