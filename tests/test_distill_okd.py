"""OKD (method=okd, minillm_fast/distill/methods/okd.py): both losses fall, only the teacher's LoRA parameters
move, the gradients equal those of Eq. 16-17 written on materialised float64 logits, a resumed run reproduces an
uninterrupted one, and a missing peft says how to install it."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from distill_utils import config, read_metrics, torchrun, without_timing, workspace

from minillm_fast import cli as package_cli
from minillm_fast.distill import heads, models, toy
from minillm_fast.distill.config import ConfigError
from minillm_fast.distill.data import IGNORE_INDEX
from minillm_fast.distill.losses import LossOptions
from minillm_fast.distill.methods import okd
from minillm_fast.distill.trainer import Trainer

import peft  # noqa: E402  - the okd extra is part of the test extra: a missing peft fails here, loudly (no skip)


def okd_config(tmp_path, arch="gpt2", **overrides):
    values = dict(method="okd", arch=arch, okd_lora_rank=4)
    values.update(overrides)
    return config(tmp_path, **values)


def _base_name(name: str) -> str:
    """A LoRA-wrapped layer's frozen weight is ``<layer>.base_layer.weight`` inside the peft model."""
    return name.replace(".base_layer.", ".")


# ----------------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, targets", [("gpt2", {"c_attn"}), ("llama", {"q_proj", "v_proj"})])
def test_losses_fall_and_only_the_lora_parameters_move(tmp_path, arch, targets):
    """A repeated batch of 4: the student's loss KL(p || q) and the teacher's module loss both fall; the teacher's
    own weights are bit-identical to the checkpoint on disk after training, every LoRA tensor moved; the student is
    saved in final/ and the module in teacher_adapter/, which peft loads back to the trained weights."""
    cfg = okd_config(tmp_path, arch=arch, max_train_samples=4, total_iters=8, lr=1e-2, plots=True)
    tr = Trainer(cfg)
    on_disk = models.load_model(workspace(arch)["teacher"]).state_dict()
    before = {n: p.detach().clone() for n, p in tr.teacher.named_parameters()}
    lora = {n for n, p in tr.teacher.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert {n.split(".")[-4] for n in lora} == targets                # <layer>.lora_A.default.weight
    assert not tr.t_head.weight.requires_grad
    tr.train()

    train = [r for r in read_metrics(cfg.output_dir) if "train/loss" in r]
    assert len(train) == 8
    for key in ("train/loss", "train/teacher_loss", "train/teacher_kl", "train/teacher_ce"):
        assert train[-1][key] < train[0][key] - 0.1, (key, [round(r[key], 3) for r in train])
    assert all(r["train/teacher_grad_norm"] > 0 for r in train)

    after = dict(tr.teacher.named_parameters())
    for n, p in after.items():
        if n in lora:
            assert not torch.equal(p, before[n]), f"LoRA tensor {n} did not move"
        else:
            assert torch.equal(p, before[n]), f"frozen teacher weight {n} changed"
            assert torch.equal(p.detach(), on_disk[_base_name(n)]), f"{n} differs from the teacher on disk"

    assert os.path.isfile(os.path.join(cfg.output_dir, "final", "model.safetensors"))
    assert os.path.isfile(os.path.join(cfg.output_dir, "plots", "train.png"))
    adapter = os.path.join(cfg.output_dir, "teacher_adapter")
    assert os.path.isfile(os.path.join(adapter, "adapter_config.json"))
    reloaded = peft.PeftModel.from_pretrained(models.load_model(workspace(arch)["teacher"]), adapter)
    got = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    want = {n: p for n, p in tr.method.peft_model.named_parameters() if "lora_" in n}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want)

    # validation compares the student with the original teacher (adapter off), as every method's does
    ev = tr.evaluate()
    adapted = tr.validation_metrics()                            # outside the method's context: adapter on
    assert abs(adapted["eval/kd"] - ev["eval/kd"]) > 1e-3
    with torch.no_grad():
        for n, p in tr.teacher.named_parameters():
            if "lora_B" in n:
                p.zero_()                                        # the adapter is now the identity
    assert tr.validation_metrics()["eval/kd"] == pytest.approx(ev["eval/kd"], rel=1e-5)


class Interrupt(Exception):
    pass


def test_resume_reproduces_uninterrupted_metrics(tmp_path):
    """Interrupted after step 3 (last checkpoint: step 2), then resumed: the metrics file (student and teacher
    losses, gradient norms, evaluations) equals the uninterrupted run's, and so do the final student and the saved
    teacher module. LoRA dropout and student dropout are on, so the RNG states must be restored too."""
    common = dict(total_iters=6, save_interval=2, eval_interval=3, eval_generate=True, disable_dropout=False,
                  lr=5e-3, okd_lora_dropout=0.1, okd_lr=2e-2)
    full = okd_config(tmp_path / "a", **common)
    Trainer(full).train()

    part = okd_config(tmp_path / "b", **common)

    def crash(trainer, metrics):
        if trainer.step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(part, hooks={"after_step": crash}).train()
    part.resume = True
    resumed = Trainer(part)
    resumed.train()
    assert resumed.resumed_from.endswith("step_00000002.pt")
    a, b = without_timing(read_metrics(full.output_dir)), without_timing(read_metrics(part.output_dir))
    assert len(a) == len(b) == 6 + 2
    assert a == b
    from safetensors.torch import load_file

    for sub, name in (("final", "model.safetensors"), ("teacher_adapter", "adapter_model.safetensors")):
        wa = load_file(os.path.join(full.output_dir, sub, name))
        wb = load_file(os.path.join(part.output_dir, sub, name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), sub


def test_two_processes_match_one_process(tmp_path):
    """torchrun, 2 gloo processes on CPU (DDP) vs one process accumulating the same two micro-batches, two steps: the
    student in final/ and the teacher module in teacher_adapter/ agree (the module is not DDP-wrapped: its gradients
    are all-reduced by methods/okd.py; without that each rank would step on its own half batch)."""
    from safetensors.torch import load_file

    cfg = okd_config(tmp_path, total_iters=2, batch_size=8, micro_batch_size=4, lr=5e-3, okd_lr=2e-2,
                     disable_dropout=True)           # dropout masks would differ between ranks
    overrides = [f"{k}={v}" for k, v in cfg.to_dict().items()
                 if k not in ("output_dir", "eval_seeds", "resume") and v is not None]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distill_ddp_worker.py")
    one = subprocess.run([sys.executable, worker, str(tmp_path / "one.pt"), *overrides,
                          f"output_dir={tmp_path / 'one'}"], env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, worker, str(tmp_path / "two.pt"), *overrides, f"output_dir={tmp_path / 'two'}", env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world size 2" in two.stdout
    for sub, name in (("final", "model.safetensors"), ("teacher_adapter", "adapter_model.safetensors")):
        w1, w2 = load_file(str(tmp_path / "one" / sub / name)), load_file(str(tmp_path / "two" / sub / name))
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4, msg=f"{sub}: {k}")
    lora_b = [v for k, v in load_file(str(tmp_path / "one" / "teacher_adapter" / "adapter_model.safetensors")).items()
              if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 1e-3 for v in lora_b)      # the module moved from its zero init


# ----------------------------------------------------------------------------------------------------------------------
# gradients against Eq. 16-17 on materialised logits
# ----------------------------------------------------------------------------------------------------------------------
def _divergence(name: str, lp: torch.Tensor, lq: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token divergence from log-probs (p teacher, q student), written out as in the paper."""
    p, q = lp.exp(), lq.exp()
    if name == "forward_kl":
        return (p * (lp - lq)).sum(-1)
    if name == "reverse_kl":
        return (q * (lq - lp)).sum(-1)
    lm = torch.logsumexp(torch.stack([lp + torch.log(torch.tensor(beta, dtype=lp.dtype)),
                                      lq + torch.log(torch.tensor(1 - beta, dtype=lp.dtype))]), 0)
    return beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)


def _tiny_pair(arch: str, vocab: int):
    student = toy.build_model(arch, vocab, hidden=16, layers=1, seed=3)
    teacher = toy.build_model(arch, vocab, hidden=32, layers=2, seed=4, tie=False, logit_scale=4.0)
    student.eval()                                       # no dropout: both sides see the same network
    teacher.requires_grad_(False).eval()
    okd.add_lora(teacher, rank=4, alpha=8.0, seed=5)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():                                # LoRA B starts at 0: give both factors real values
        for n, p in teacher.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return student, teacher


@pytest.mark.parametrize("divergence, teacher_divergence, alpha", [
    ("forward_kl", "reverse_kl", 0.5),      # the paper's (two fused calls)
    ("forward_kl", "forward_kl", 0.3),      # one fused call shared by both losses
    ("jsd", "reverse_kl", 1.0),             # no teacher CE
    ("reverse_kl", "jsd", 0.0),             # teacher CE only
], ids=["paper", "shared-call", "jsd-no-ce", "ce-only"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradients_match_materialised_float64_reference(backends, arch, divergence, teacher_divergence, alpha):
    """Student gradients (of L_s = D(p || q), p detached) and LoRA gradients (of L_t = a D_t + (1 - a) CE, q
    detached) from the fused path in fp32 equal those of the same objective on float64 logits from the models' own
    forward (lm_head included), for every available backend."""
    vocab, beta = 67, 0.3
    student, teacher = _tiny_pair(arch, vocab)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX                          # the prompt
    labels[1, 6:] = IGNORE_INDEX

    # reference: float64 copies, logits from the models' forward, Eq. 16-17 written out
    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    lq = torch.log_softmax(s64(ids, attention_mask=mask).logits[:, :-1], -1)
    lp = torch.log_softmax(t64(ids, attention_mask=mask).logits[:, :-1], -1)
    y = labels[:, 1:]
    keep = y != IGNORE_INDEX
    l_s = _divergence(divergence, lp.detach(), lq, beta)[keep].sum()
    ce = -lp.gather(-1, y.clamp(min=0)[..., None])[..., 0][keep].sum()
    l_t = alpha * _divergence(teacher_divergence, lp, lq.detach(), beta)[keep].sum() + (1 - alpha) * ce
    (l_s + l_t).backward()
    want = {f"student.{n}": p.grad for n, p in s64.named_parameters()}
    want.update({f"lora.{n}": p.grad for n, p in t64.named_parameters() if p.requires_grad})
    assert all(g is not None for g in want.values())
    scale = {k: max(float(g.abs().max()) for n, g in want.items() if n.startswith(k)) for k in ("student", "lora")}
    assert min(scale.values()) > 1e-3, scale              # real gradients on both sides, not a vacuous match
    assert not any(p.grad is not None for p in t64.parameters() if not p.requires_grad)

    names = sorted({b for b, _ in backends})
    for backend in names:
        s, t = copy.deepcopy(student), copy.deepcopy(teacher)
        hs = models.hidden_states(s, ids, mask)[:, :-1]
        ht = models.hidden_states(t, ids, mask)[:, :-1]
        terms = okd.okd_terms(hs, heads.head_of(s), ht, heads.head_of(t), y, LossOptions(vocab, backend),
                              alpha=alpha, divergence=divergence, teacher_divergence=teacher_divergence, beta=beta)
        terms["objective"].backward()
        torch.testing.assert_close(terms["student"].double(), l_s, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(terms["teacher"].double(), l_t, rtol=1e-5, atol=1e-5)
        got = {f"student.{n}": p.grad for n, p in s.named_parameters()}
        got.update({f"lora.{n}": p.grad for n, p in t.named_parameters() if p.requires_grad})
        assert got.keys() == want.keys()
        assert not any(p.grad is not None for p in t.parameters() if not p.requires_grad)
        for n, g in want.items():            # fp32 vs float64: 1e-5 of the largest gradient of the same model
            torch.testing.assert_close(got[n].double(), g, rtol=1e-4, atol=1e-5 * scale[n.split(".")[0]],
                                       msg=f"{backend}: {n}")


# ----------------------------------------------------------------------------------------------------------------------
# config and errors
# ----------------------------------------------------------------------------------------------------------------------
def test_defaults_and_bad_values(tmp_path):
    p = workspace("gpt2")
    from minillm_fast.distill.config import DistillConfig

    cfg = DistillConfig(method="okd", student=p["student"], teacher=p["teacher"], train_data=p["train_data"],
                        output_dir="/tmp/unused").resolve()
    assert (cfg.okd_divergence, cfg.okd_teacher_divergence, cfg.okd_alpha) == ("forward_kl", "reverse_kl", 0.5)
    assert (cfg.okd_lora_rank, cfg.okd_lora_alpha, cfg.okd_lora_dropout, cfg.okd_target_modules) == \
        (32, 64.0, 0.0, None)
    assert (cfg.lr, cfg.okd_lr, cfg.batch_size, cfg.lr_schedule) == (5e-4, 5e-4, 32, "cosine")   # baseline defaults
    assert okd_config(tmp_path, okd_target_modules="c_attn", okd_lr=1e-3).resolve().okd_target_modules == ["c_attn"]
    for overrides, message in [(dict(okd_divergence="tvd"), "okd_divergence='tvd' is not supported"),
                               (dict(okd_teacher_divergence="reverse"), "did you mean 'reverse_kl'"),
                               (dict(okd_alpha=1.5), "okd_alpha=1.5 must be <= 1"),
                               (dict(okd_lora_rank=0), "okd_lora_rank=0 must be an int >= 1"),
                               (dict(okd_target_modules=[]), "okd_target_modules=\\[\\] must be null"),
                               (dict(teacher=None), "teacher is required for method='okd'")]:
        with pytest.raises(ConfigError, match=message):
            okd_config(tmp_path, **overrides).resolve()
    with pytest.raises(ConfigError, match="okd_target_modules=\\['q_projection'\\]"):
        Trainer(okd_config(tmp_path, okd_target_modules=["q_projection"]))
    with pytest.raises(ConfigError, match="lm_head"):
        Trainer(okd_config(tmp_path, okd_target_modules=["c_attn", "lm_head"]))


def test_missing_peft_gives_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)        # `import peft` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'minillm-fast\[okd\]'"):
        okd_config(tmp_path).resolve()
    with pytest.raises(ConfigError, match="method='okd' needs the peft library"):
        Trainer(okd_config(tmp_path))
    cfg = okd_config(tmp_path)
    args = [f"{k}={v}" for k, v in (("method", "okd"), ("student", cfg.student), ("teacher", cfg.teacher),
                                    ("train_data", cfg.train_data), ("output_dir", cfg.output_dir))]
    assert package_cli.main(["distill", *args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "error: method='okd' needs the peft library" in err and "pip install 'minillm-fast[okd]'" in err
