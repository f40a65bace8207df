"""SFT and KD: ``(1 - r) CE + r KL(p || q)`` on the responses of the training set (``r = 0`` for sft, ``kd_ratio``
for kd), one global batch per optimiser step. Also the step of SeqKD (methods/seqkd.py), whose data differ."""
from __future__ import annotations

from .. import losses
from ..base import Method, register, to_float


@register("sft", "kd")
class LM(Method):
    def kd_ratio(self) -> float:
        return 0.0 if self.cfg.method == "sft" else self.cfg.kd_ratio

    def step(self) -> dict:
        tr, kd_ratio = self.trainer, self.kd_ratio()
        micro, n_tokens = tr.train_microbatches()
        scale = tr.world / max(n_tokens, 1)

        def loss_of(batch):
            b = tr.to_device(batch)
            hs = tr.student_hidden(b["input_ids"], b["attention_mask"])
            ht = tr.teacher_hidden(b["input_ids"], b["attention_mask"])[:, :-1] if kd_ratio > 0 else None
            terms = losses.lm_terms(hs[:, :-1], tr.student_head(), b["labels"][:, 1:], tr.opts, teacher_hidden=ht,
                                    t_head=tr.t_head)
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
