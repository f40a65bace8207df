"""Online knowledge distillation (OKD; Rao et al., ``../shared/papers/okd-paper.md``, section V, Eq. 15-17 and
Algorithm 1): the frozen teacher gets a small online module, a LoRA on its attention query and value projections, that
is trained on the same batches as the student, so that the teacher's distribution adapts to the student's. No
sampling: the batches are the training set's (prompt, response) pairs, as for KD.

With ``q`` the student's next-token distribution and ``p`` the adapted teacher's (``p = p(theta^ta)``), per response
token, the two losses of a step are

    L_t = a KL(q || p) + (1 - a) CE(p, y)         (Eq. 16; gradients to the LoRA parameters only, q detached)
    L_s = KL(p || q)                               (Eq. 17; gradients to the student only, p detached)

Which way each KL goes. The paper writes ``L_KL(x, y)`` and defines it in Eq. 2 as ``L_KL(p(theta^s), p(theta^t)) =
sum p_t log(p_t / p_s)``: the *second* argument is the distribution that weights the log-ratio (the target), the first
is the one being fitted, and "reverse KD" is ``L_KL(p(theta^t), p(theta^s))``. So Eq. 17, ``L_KL(p(theta^s),
p(theta^ta))``, is the forward KL ``KL(p || q)`` for the student ("a single forward KL divergence is sufficient",
section V-A), and Eq. 16, ``L_KL(p(theta^ta), p(theta^s))``, is ``KL(q || p)`` with gradients to the teacher: the
teacher's own forward KL towards the student (mode-covering of q), as in deep mutual learning. In the fused ops'
naming (``q`` always the student, ``p`` the teacher) that is ``okd_divergence="forward_kl"`` and
``okd_teacher_divergence="reverse_kl"``, the defaults. ``okd_teacher_divergence="forward_kl"`` gives
``KL(p || q)`` for the teacher instead (the issue's wording); when both divergences are the same, one fused call
gives both gradients (the student's of ``D`` and the teacher's of ``a D``).

Per token, the gradients with respect to the logits are (``z_s``, ``z_t``; ``e_y`` the one-hot label)

    dL_s/dz_s = q - p                  dL_t/dz_t = a (p - q) + (1 - a) (p - e_y) = p - (a q + (1 - a) e_y)

so the teacher's module fits the mixture target ``a q + (1 - a) e_y``. Every term is computed from hidden states and
lm_head weights by the fused ops (:func:`minillm_fast.fused_divergence`, with gradients to the teacher side for
``L_t``; :func:`minillm_fast.token_logprobs` for the CE): no ``[B, T, V]`` logits. The teacher's lm_head stays
frozen (LoRA is never put on it: the fused ops read the head weight directly).

The online module is a ``peft`` LoRA (``pip install 'minillm-fast[okd]'``): rank ``okd_lora_rank`` (32, the
paper's), ``lora_alpha = okd_lora_alpha`` (scaling ``s = alpha / r``, Eq. 15; default ``2 r``), on the modules
named by ``okd_target_modules`` or, by default, the architecture's attention query and value projections: ``q_proj``
and ``v_proj`` (Llama, Mistral, Qwen, Gemma, OPT, ...), or the fused ``c_attn`` (GPT-2, a ``Conv1D``:
``fan_in_fan_out``), ``query_key_value`` (GPT-NeoX, Falcon, Bloom), ``qkv_proj`` (Phi-3). A fused projection also
adapts the keys (peft cannot restrict a LoRA to some of a fused layer's outputs). The teacher stays in eval mode
(its own dropout off); only the LoRA dropout (``okd_lora_dropout``, default 0) is active during the OKD forward.

One step (Algorithm 1, lines 2-5) = one global batch: each micro-batch runs the student and the teacher (with grad,
through LoRA) once, ``L_s + L_t`` (token sums divided by the global token count, so accumulation and DDP give the
big-batch gradient) is backpropagated once, then the student's AdamW and the module's AdamW (lr ``okd_lr``, default
``lr``; the same schedule, betas, weight decay and gradient clipping, each model's norm clipped on its own) step.
Under DDP the module's gradients are all-reduced here (the teacher is not DDP-wrapped). Checkpoints hold the LoRA
parameters, their optimiser and schedule; the adapted module is saved as ``output_dir/teacher_adapter``
(``PeftModel.save_pretrained``; load it with ``PeftModel.from_pretrained(teacher, path)``). Validation runs with the
adapter disabled: ``eval/kd`` and ``eval/rev_kl`` compare the student with the original teacher, as in every method.

The ``okd_*`` keys (defaults, choices, ``parallel=ddp``, a ``peft`` install) are resolved and checked with the rest of
the config (distill/config.py), so ``--dry-run`` catches their mistakes.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import Tensor

from .. import checkpoint as ckpt
from .. import data as D
from .. import heads, models, ranks
from ..base import Method, mix_seed, register
from ..config import ConfigError, require_peft
from ..heads import Head
from ..losses import LossOptions, divergence_sum, logprobs

# the attention query and value projections, by module name, most specific first (fused q/k/v layers last)
QV_PROJECTIONS = (("q_proj", "v_proj"), ("c_attn",), ("query_key_value",), ("qkv_proj",))


# ----------------------------------------------------------------------------------------------------------------------
# the online module
# ----------------------------------------------------------------------------------------------------------------------
def default_target_modules(model: torch.nn.Module) -> list[str]:
    """The attention query and value projections of ``model``, found by module name (see :data:`QV_PROJECTIONS`)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for group in QV_PROJECTIONS:
        if all(n in names for n in group):
            return list(group)
    raise ConfigError(f"okd: cannot find the attention query/value projections of {type(model).__name__} (looked for "
                      f"{', '.join('/'.join(g) for g in QV_PROJECTIONS)}); name the modules to adapt with "
                      f"okd_target_modules=[...]")


def add_lora(teacher: torch.nn.Module, *, rank: int = 32, alpha: Optional[float] = None, dropout: float = 0.0,
             target_modules: Optional[list] = None, seed: int = 0):
    """Inject a LoRA module into ``teacher`` (in place; its own weights stay frozen) and return the peft model that
    wraps it. The LoRA initialisation (peft's: Kaiming-uniform A, zero B, so the teacher starts unchanged) draws from a
    generator seeded with ``seed`` (the same on every rank), leaving the global RNG streams as they were."""
    peft = require_peft()
    targets = list(target_modules) if target_modules else default_target_modules(teacher)
    from transformers.pytorch_utils import Conv1D

    conv1d = any(isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in targets for name, m in teacher.named_modules())
    lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=dropout,
                           target_modules=targets, fan_in_fan_out=conv1d, bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            wrapped = peft.get_peft_model(teacher, lora)
        except ValueError as e:
            raise ConfigError(f"okd_target_modules={targets}: {e}") from None
    from peft.tuners.lora import LoraLayer

    if isinstance(heads.lm_head(teacher), LoraLayer):
        raise ConfigError(f"okd_target_modules={targets} puts LoRA on the teacher's lm_head; the fused losses read the "
                          f"head weight directly, so adapt attention (or MLP) modules only")
    return wrapped


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable (LoRA) parameters of the adapted teacher, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------------------------
# the losses
# ----------------------------------------------------------------------------------------------------------------------
class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times ``factor`` (the teacher's share ``a`` of a divergence shared with the
    student)."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def okd_terms(student_hidden: Tensor, s_head: Head, teacher_hidden: Tensor, t_head: Head, labels: Tensor,
              opts: LossOptions, *, alpha: float = 0.5, divergence: str = "forward_kl",
              teacher_divergence: str = "reverse_kl", beta: float = 0.5) -> dict:
    """Both OKD losses as sums over the positions whose label is not IGNORE_INDEX (hidden states aligned with their
    labels: ``hidden[:, :-1]`` with ``labels[:, 1:]``; ``[B, T, Hs]``, ``[B, T, Ht]``, ``[B, T]``).

    Returns ``{"objective": L_s + L_t (backpropagate this once), "student": sum D(p, q) (Eq. 17, teacher
    detached), "teacher": sum L_t (Eq. 16), "teacher_kl": sum D_t(p, q) or None when alpha = 0, "teacher_ce": sum
    -log p(y) or None when alpha = 1, "tokens": count}``. ``divergence`` / ``teacher_divergence`` are fused-op names
    (``q`` student, ``p`` teacher): ``forward_kl`` = KL(p || q), ``reverse_kl`` = KL(q || p), ``jsd`` (``beta``
    weights the teacher in the mixture). Gradients: the student's parameters get those of L_s only, the teacher's
    trainable parameters (through ``teacher_hidden``) those of L_t only.
    """
    kw = dict(labels=labels, beta=beta)
    if alpha > 0 and divergence == teacher_divergence:
        # one fused call: D's gradient to the student, a x D's to the teacher (the teacher's head is frozen)
        d = divergence_sum(student_hidden, s_head, _ScaleGrad.apply(teacher_hidden, alpha), t_head, opts,
                           divergence=divergence, **kw)
        student, teacher_kl, objective = d, d, d
    else:
        student = divergence_sum(student_hidden, s_head, teacher_hidden.detach(), t_head.detached(), opts,
                                 divergence=divergence, **kw)
        teacher_kl = None
        objective = student
        if alpha > 0:
            teacher_kl = divergence_sum(student_hidden.detach(), s_head.detached(), teacher_hidden, t_head, opts,
                                        divergence=teacher_divergence, **kw)
            objective = objective + alpha * teacher_kl
    teacher_ce = None
    if alpha < 1:
        teacher_ce = -logprobs(teacher_hidden, t_head, labels, opts).sum()
        objective = objective + (1 - alpha) * teacher_ce
    teacher = sum(w * t for w, t in ((alpha, teacher_kl), (1 - alpha, teacher_ce)) if t is not None)
    return {"objective": objective, "student": student, "teacher": teacher, "teacher_kl": teacher_kl,
            "teacher_ce": teacher_ce, "tokens": (labels != D.IGNORE_INDEX).sum()}


# ----------------------------------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------------------------------
@register("okd")
class OKD(Method):
    """The teacher's online module, its optimiser and schedule, and the OKD step. Set up after the student's
    optimiser (the module's follows the same schedule); checkpoints add its state under ``okd``; the adapted module
    is saved as ``teacher_adapter/`` at the end; validation runs with the adapter disabled."""

    def setup(self) -> None:
        tr, cfg = self.trainer, self.cfg
        self.peft_model = add_lora(tr.teacher, rank=cfg.okd_lora_rank, alpha=cfg.okd_lora_alpha,
                                   dropout=cfg.okd_lora_dropout, target_modules=cfg.okd_target_modules,
                                   seed=mix_seed(cfg.seed, 9))
        self.params = lora_parameters(tr.teacher)
        self._dropouts = [m for n, m in tr.teacher.named_modules() if n.rsplit(".", 1)[-1] == "lora_dropout"]
        self.optimizer, self.scheduler = tr.make_optimizer(
            [{"params": list(self.params.values()), "weight_decay": cfg.weight_decay}], cfg.okd_lr)
        n = sum(p.numel() for p in self.params.values())
        targets = sorted(self.peft_model.peft_config["default"].target_modules)
        tr.log(f"okd: LoRA r={cfg.okd_lora_rank} alpha={cfg.okd_lora_alpha:g} on the teacher's {', '.join(targets)}: "
               f"{n} trainable parameters; student loss {cfg.okd_divergence}, teacher loss {cfg.okd_alpha:g} x "
               f"{cfg.okd_teacher_divergence} + {1 - cfg.okd_alpha:g} x CE")

    def evaluation(self):
        """Validation compares the student with the teacher the user gave (adapter off), as for every other method,
        so that eval/kd and eval/rev_kl mean the same thing in every run."""
        return self.peft_model.disable_adapter()

    @contextlib.contextmanager
    def _lora_dropout(self):
        """LoRA dropout active for the training forward only (the teacher itself stays in eval mode)."""
        for m in self._dropouts:
            m.train()
        try:
            yield
        finally:
            for m in self._dropouts:
                m.eval()

    def teacher_hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The adapted teacher's final hidden states, with gradients to the LoRA parameters."""
        tr = self.trainer
        with self._lora_dropout(), tr.autocast():
            return models.hidden_states(tr.teacher, input_ids, attention_mask).to(tr.compute_dtype)

    def step(self) -> dict:
        """One optimiser step of both models on one global batch of the training set."""
        tr, cfg = self.trainer, self.cfg
        micro, n_tokens = tr.train_microbatches()
        scale = tr.world / max(n_tokens, 1)
        keys = ("student", "teacher", "teacher_kl", "teacher_ce", "seen")

        def loss_of(batch):
            b = tr.to_device(batch)
            hs = tr.student_hidden(b["input_ids"], b["attention_mask"])[:, :-1]
            ht = self.teacher_hidden(b["input_ids"], b["attention_mask"])[:, :-1]
            terms = okd_terms(hs, tr.student_head(), ht, tr.t_head, b["labels"][:, 1:], tr.opts,
                              alpha=cfg.okd_alpha, divergence=cfg.okd_divergence,
                              teacher_divergence=cfg.okd_teacher_divergence, beta=cfg.okd_jsd_beta)
            numbers = {k: 0.0 if terms[k] is None else float(terms[k].detach()) for k in keys[:-1]}
            numbers["seen"] = int(b["attention_mask"].sum())
            return terms["objective"] * scale, numbers

        tot = tr.accumulate(micro, loss_of, keys)
        self._all_reduce_grads()
        grad_norm, lr = tr.optimizer_step()            # the student (runs the after_backward hook first)
        teacher_lr = self.scheduler.get_last_lr()[0]
        teacher_norm = tr.step_optimizer(list(self.params.values()), self.optimizer, self.scheduler)
        n = max(n_tokens, 1)
        out = {"train/loss": tot["student"] / n, "train/teacher_loss": tot["teacher"] / n,
               "train/grad_norm": grad_norm, "train/teacher_grad_norm": teacher_norm, "train/lr": lr,
               "train/teacher_lr": teacher_lr, "train/tokens": n_tokens, "_seen": tot["seen"]}
        if cfg.okd_alpha > 0:
            out["train/teacher_kl"] = tot["teacher_kl"] / n
        if cfg.okd_alpha < 1:
            out["train/teacher_ce"] = tot["teacher_ce"] / n
        return out

    def _all_reduce_grads(self) -> None:
        """DDP averages the student's gradients; average the module's the same way (it is not DDP-wrapped)."""
        world = self.trainer.world
        if world == 1:
            return
        params = [p for p in self.params.values() if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        ranks.all_reduce_sum(flat)
        flat /= world
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"okd": {"lora": {n: p.detach().cpu().clone() for n, p in self.params.items()},
                        "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}}

    def load_state_dict(self, checkpoint: dict) -> None:
        state = checkpoint.get("okd")
        if not state:
            raise ConfigError("the checkpoint holds no OKD state (it was not written by a method=okd run); resume it "
                              "with its own method")
        if set(state["lora"]) != set(self.params):
            missing = sorted(set(self.params) ^ set(state["lora"]))[:4]
            raise ConfigError(f"the checkpoint's teacher LoRA parameters do not match this run's (e.g. {missing}); "
                              f"resume with the same okd_lora_rank / okd_target_modules")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["lora"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_final(self, run_dir: str) -> None:
        """``save_pretrained`` of the adapted module (adapter config and weights) into ``run_dir/teacher_adapter``,
        atomically, beside the student."""
        ckpt.atomic_save_pretrained(self.peft_model, None, os.path.join(run_dir, "teacher_adapter"))
