"""What is benchmarked: one ``Case`` per op, each with its inputs, its matmul floor, its ground truth and the
implementations that compete on it.

A case is everything op-specific; the engine (bench/measure.py) knows nothing about any op. To add an op, write
its ``make_inputs`` / ``floor`` / ``truth`` and a list of ``Impl`` and call :func:`register`, as the ops at the
bottom of this file do (token_logprobs, rollout_statistics, mixture_sample: each a few dozen lines).

Conventions every case follows:

* ``make_inputs(shape, device, seed, opts)`` returns a dict of tensors (those listed in ``grad_names`` require
  grad) plus any plain values the implementations need. It is called once per job; its tensors are "the inputs"
  that memory is measured above.
* ``Impl.make(inputs, opts)`` returns a zero-argument function computing the **scalar** objective (a non-scalar op
  reduces its output, e.g. with ``.sum()``, so that ``backward()`` can be timed). Anything the function needs
  besides the inputs (labels, a loss module) is built in ``make`` so it is not counted as work or memory.
* ``Impl.check(device, opts)`` returns ``None`` when the implementation can run, else a reason that starts with
  ``missing:`` (a package is not installed) or ``unsupported:`` (this device / option is not available there).
* ``floor(inputs, shape)`` returns ``(matmuls, flops)``: zero-argument callables per phase (``fwd``, ``bwd``),
  each one matmul of docs/design.md section 4 written into a preallocated output, and the flop count per phase.
* ``truth(inputs, opts)`` returns ``(loss, {name: grad})`` computed with minillm_fast/reference.py in fp32 (row
  chunks where the op allows it, so the truth fits where the naive baseline might not); None for a sampler.
* ``modes``: ``("fwd",)`` for an op without gradients (``grad_names`` empty).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import minillm_fast
from minillm_fast import dispatch, reference
from minillm_fast.divergences import DIVERGENCES

from .shapes import Shape


@dataclass
class Impl:
    name: str
    make: Callable[[dict, dict], Callable[[], torch.Tensor]]
    check: Callable[[torch.device, dict], Optional[str]] = lambda device, opts: None
    note: Callable[[dict], str] = lambda opts: ""


@dataclass
class Case:
    op: str
    about: str
    make_inputs: Callable[[Shape, torch.device, int, dict], dict]
    grad_names: tuple
    floor: Callable[[dict, Shape], tuple]
    truth: Optional[Callable[[dict, dict], tuple]]  # None: outputs are random (a sampler), nothing to compare
    impls: list = field(default_factory=list)
    variant: Callable[[dict], str] = lambda opts: ""  # label of the op's options in tables and files
    modes: tuple = ("fwd", "bwd", "fwd_bwd")  # a forward-only op (a sampler) lists ("fwd",)

    def impl(self, name: str) -> Impl:
        for i in self.impls:
            if i.name == name:
                return i
        raise ValueError(f"--impl {name!r} is not known for op {self.op!r}; expected one of "
                         f"{[i.name for i in self.impls]}")


CASES: dict[str, Case] = {}


def register(case: Case) -> Case:
    CASES[case.op] = case
    return case


def get(op: str) -> Case:
    if op not in CASES:
        raise ValueError(f"--op {op!r} is not benchmarked; expected one of {sorted(CASES)}")
    return CASES[op]


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _randn(gen: torch.Generator, *size, device, dtype, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
    x = torch.randn(*size, generator=gen, device=device, dtype=torch.float32)
    if scale != 1.0:
        x.mul_(scale)
    return x.to(dtype).requires_grad_(grad)


def _ours_check(backend: str):
    def check(device: torch.device, opts: dict) -> Optional[str]:
        if backend == "triton" and device.type != "cuda":
            return "unsupported: the triton backend needs CUDA (the CPU interpreter is far too slow to time)"
        try:
            dispatch.resolve(backend, device)
        except (RuntimeError, ValueError) as e:
            return f"unsupported: {e}"
        return None
    return check


# ----------------------------------------------------------------------------------------------------------------------
# fused_divergence: student [N, Hs] x [V, Hs], teacher [N, Ht] x [V, Ht] -> scalar mean divergence
# ----------------------------------------------------------------------------------------------------------------------
def _div_inputs(shape: Shape, device: torch.device, seed: int, opts: dict) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    n, dt, vp = shape.tokens, shape.torch_dtype, shape.vocab_pad
    # Logits of standard deviation ~2 (peaked but not one-hot distributions), as trained heads give.
    return dict(
        hs=_randn(gen, n, shape.hs, device=device, dtype=dt, grad=True),
        ws=_randn(gen, vp, shape.hs, device=device, dtype=dt, scale=2.0 / shape.hs ** 0.5, grad=True),
        ht=_randn(gen, n, shape.ht, device=device, dtype=dt),
        wt=_randn(gen, vp, shape.ht, device=device, dtype=dt, scale=2.0 / shape.ht ** 0.5),
        vocab=shape.vocab,
    )


def _div_kwargs(opts: dict) -> dict:
    return dict(divergence=opts["divergence"], temperature=opts["temperature"], beta=opts["beta"],
                skew=opts["skew"])


def _div_floor(x: dict, shape: Shape):
    """The four matmuls of docs/design.md section 4 over the real vocabulary, outputs preallocated, in both
    orientations: token-major (``h W^T`` -> ``[N, V]``, G ``[N, V]``) and vocabulary-major (``W h^T`` -> ``[V, N]``,
    G ``[V, N]``).
    The same flops; BLAS runs them at different speeds (on CPU, MKL's token-major logits lose ~5% at a few hundred
    rows), so the engine times both per phase and keeps the faster: a floor that one layout beats is no floor."""
    v = shape.vocab
    hs, ht = x["hs"].detach(), x["ht"].detach()
    ws, wt = x["ws"].detach()[:v], x["wt"].detach()[:v]
    gen = torch.Generator(device=hs.device).manual_seed(1)
    g = _randn(gen, shape.tokens, v, device=hs.device, dtype=hs.dtype, scale=1e-4)  # dL/dz_s, any values
    g_vm = g.T.contiguous()
    zs, zt = hs.new_empty(shape.tokens, v), hs.new_empty(shape.tokens, v)
    zs_vm, zt_vm = hs.new_empty(v, shape.tokens), hs.new_empty(v, shape.tokens)
    gh, gw = torch.empty_like(hs), torch.empty_like(ws)
    matmuls = {
        "fwd": {"token-major": [lambda: torch.mm(hs, ws.T, out=zs), lambda: torch.mm(ht, wt.T, out=zt)],
                "vocab-major": [lambda: torch.mm(ws, hs.T, out=zs_vm), lambda: torch.mm(wt, ht.T, out=zt_vm)]},
        "bwd": {"token-major": [lambda: torch.mm(g, ws, out=gh), lambda: torch.mm(g.T, hs, out=gw)],
                "vocab-major": [lambda: torch.mm(g_vm.T, ws, out=gh), lambda: torch.mm(g_vm, hs, out=gw)]},
    }
    n = shape.tokens
    flops = {"fwd": 2 * n * v * (shape.hs + shape.ht), "bwd": 4 * n * v * shape.hs}
    return matmuls, flops


def _div_truth(x: dict, opts: dict, budget_bytes: int = 64 << 20):
    """fp32 reference loss and student gradients, in row chunks (sum over chunks of the reference's sum / N)."""
    hs, ws, ht, wt = (x[k].detach() for k in ("hs", "ws", "ht", "wt"))
    n = hs.shape[0]
    ws32 = ws.float().requires_grad_(True)
    wt32 = wt.float()
    rows = max(1, min(n, budget_bytes // (4 * ws.shape[0])))
    g_hs = torch.empty(hs.shape, dtype=torch.float32, device=hs.device)
    total = torch.zeros((), dtype=torch.float64, device=hs.device)
    for i in range(0, n, rows):
        h = hs[i:i + rows].float().requires_grad_(True)
        part = reference.fused_divergence(h, ws32, ht[i:i + rows].float(), wt32, reduction="sum",
                                          vocab_size=x["vocab"], **_div_kwargs(opts)) / n
        part.backward()
        g_hs[i:i + rows] = h.grad
        total += part.detach().double()
    return total, {"hs": g_hs, "ws": ws32.grad}


def _ours(backend: str, strategy: str = "auto") -> Impl:
    def make(x, opts):
        kw = dict(_div_kwargs(opts), vocab_size=x["vocab"], backend=backend, strategy=strategy,
                  chunk_size=opts.get("chunk_size"))
        return lambda: minillm_fast.fused_divergence(x["hs"], x["ws"], x["ht"], x["wt"], **kw)

    name = f"ours:{backend}" + ("" if strategy == "auto" else f"-{strategy}")
    return Impl(name, make, _ours_check(backend),
                note=lambda opts: f"chunk_size={opts.get('chunk_size') or 'auto'}")


def _naive_make(x, opts):
    kw = dict(_div_kwargs(opts), vocab_size=x["vocab"])
    return lambda: reference.fused_divergence(x["hs"], x["ws"], x["ht"], x["wt"], **kw)


# Liger's generalized JSD: m = beta p + (1 - beta) q, loss beta KL(p||m) + (1 - beta) KL(q||m), special-cased to
# KL(p||q) at beta=0 and KL(q||p) at beta=1 (q student, p teacher), summed over the vocabulary, divided by the
# number of non-ignored rows: our forward_kl / reverse_kl / jsd(beta) exactly, with the hard CE term weighted 0.
def _liger_beta(opts: dict) -> Optional[float]:
    return {"reverse_kl": 1.0, "forward_kl": 0.0, "jsd": opts["beta"]}.get(opts["divergence"])


def _liger_heads(x):
    """Liger needs heads of the real vocabulary (it zero-pads a smaller student head instead of excluding rows)."""
    v = x["vocab"]
    ws, wt = x["ws"], x["wt"]
    return (ws, wt) if ws.shape[0] == v else (ws[:v], wt[:v])


def _liger_check(module: str, cuda_only: bool):
    def check(device, opts):
        if not _has("liger_kernel"):
            return "missing: liger-kernel is not installed (pip install liger-kernel)"
        if not _has(module):
            return f"missing: this liger-kernel has no {module}"
        if cuda_only and device.type != "cuda":
            return "unsupported: Liger's Triton kernels need a GPU"
        if _liger_beta(opts) is None:
            return f"unsupported: Liger's JSD loss has no {opts['divergence']}"
        return None
    return check


def _liger_chunked_make(x, opts):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=_liger_beta(opts),
                                      temperature=opts["temperature"], compiled=opts["liger_compile"],
                                      chunk_size=opts["liger_chunk_size"])
    ws, wt = _liger_heads(x)
    labels = torch.zeros(x["hs"].shape[0], dtype=torch.long, device=x["hs"].device)  # all rows kept
    return lambda: loss_fn(x["hs"], ws, x["ht"], wt, labels)


def _liger_triton_make(x, opts):
    from liger_kernel.transformers import LigerFusedLinearJSD

    # fp32 accumulation of the weight gradient across chunks, as ours does (Liger's default accumulates in the
    # weight's dtype, which loses bits in bf16).
    loss_fn = LigerFusedLinearJSD(jsd_beta=_liger_beta(opts), temperature=opts["temperature"],
                                  accum_dtype=torch.float32)
    ws, wt = _liger_heads(x)
    return lambda: loss_fn(x["hs"], ws, x["ht"], wt, None)


# torchtune's KD losses take lists of logits chunks that the model has already produced (all chunks alive at once):
# we produce them with one matmul per chunk. They average over non-ignored tokens; no temperature, so we divide.
# Its ForwardKLLoss is the soft cross-entropy -sum p log q, the forward KL minus the teacher's entropy: the same
# gradient but another value, so only its reverse KL is compared.
_TORCHTUNE = {"reverse_kl": "ReverseKLWithChunkedOutputLoss"}
_TORCHTUNE_CHUNKS = 8


def _torchtune_check(device, opts):
    if not _has("torchtune"):
        return "missing: torchtune is not installed (optional peer)"
    if opts["divergence"] not in _TORCHTUNE:
        return (f"unsupported: torchtune has no chunked {opts['divergence']} loss (its forward KL loss omits the "
                "teacher entropy)" if opts["divergence"] == "forward_kl" else
                f"unsupported: torchtune has no chunked {opts['divergence']} loss")
    import torchtune.modules.loss as tl

    if not hasattr(tl, _TORCHTUNE[opts["divergence"]]):
        return f"missing: this torchtune has no {_TORCHTUNE[opts['divergence']]}"
    return None


def _torchtune_make(x, opts):
    import torchtune.modules.loss as tl

    loss_fn = getattr(tl, _TORCHTUNE[opts["divergence"]])(num_output_chunks=_TORCHTUNE_CHUNKS)
    ws, wt = _liger_heads(x)
    inv_t = 1.0 / opts["temperature"]
    hs, ht = x["hs"].unsqueeze(0), x["ht"].unsqueeze(0)  # [1, N, H]: torchtune chunks along the sequence
    labels = torch.zeros(hs.shape[:2], dtype=torch.long, device=hs.device)

    def step():
        s = [(c @ ws.T) * inv_t for c in hs.tensor_split(_TORCHTUNE_CHUNKS, dim=1)]
        with torch.no_grad():
            t = [(c @ wt.T) * inv_t for c in ht.tensor_split(_TORCHTUNE_CHUNKS, dim=1)]
        return loss_fn(s, t, labels)
    return step


def _variant(opts: dict) -> str:
    d = opts["divergence"]
    extra = {"jsd": f"-b{opts['beta']}", "skew_forward_kl": f"-a{opts['skew']}",
             "skew_reverse_kl": f"-a{opts['skew']}"}.get(d, "")
    t = "" if opts["temperature"] == 1.0 else f"-T{opts['temperature']}"
    return d + extra + t


register(Case(
    op="fused_divergence",
    about="minillm_fast.fused_divergence: mean over tokens of a divergence between student and teacher softmaxes",
    make_inputs=_div_inputs,
    grad_names=("hs", "ws"),
    floor=_div_floor,
    truth=_div_truth,
    variant=_variant,
    impls=[
        Impl("naive", _naive_make, note=lambda opts: "minillm_fast.reference.fused_divergence (materialised logits)"),
        _ours("torch"),
        _ours("native"),
        _ours("triton"),
        _ours("triton", "tiled"),
        Impl("liger:chunked", _liger_chunked_make, _liger_check("liger_kernel.chunked_loss", cuda_only=False),
             note=lambda opts: (f"LigerFusedLinearJSDLoss beta={_liger_beta(opts)} weight_hard_loss=0 "
                                f"compiled={opts['liger_compile']} chunk_size={opts['liger_chunk_size']}")),
        Impl("liger:triton", _liger_triton_make, _liger_check("liger_kernel.transformers", cuda_only=True),
             note=lambda opts: f"LigerFusedLinearJSD jsd_beta={_liger_beta(opts)} accum_dtype=float32"),
        Impl("torchtune:chunked", _torchtune_make, _torchtune_check,
             note=lambda opts: f"{_TORCHTUNE.get(opts['divergence'])} num_output_chunks={_TORCHTUNE_CHUNKS}"),
    ],
))

DIVERGENCE_NAMES = tuple(DIVERGENCES)


# ----------------------------------------------------------------------------------------------------------------------
# The other ops. Each is one ``register(Case(...))``; a new op needs its make_inputs, floor, truth and impls, and
# nothing else in bench/ changes. They are registered only when minillm_fast has them.
# ----------------------------------------------------------------------------------------------------------------------
def _op_backend_check(backend: str):
    """Check that ``backend`` runs on the device (every backend implements every op: minillm_fast/dispatch.py)."""
    def check(device, opts):
        if backend == "triton" and device.type != "cuda":
            return "unsupported: the triton backend needs CUDA (the CPU interpreter is far too slow to time)"
        try:
            dispatch.resolve(backend, device)
        except Exception as e:  # noqa: BLE001  (any refusal means: not this backend)
            return f"unsupported: {e}"
        return None
    return check


def _targets(gen, n: int, vocab: int, device) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=gen, device=device)


def _student_floor(x: dict, shape: Shape, backward: bool = True):
    """One model's matmuls: z = h W^T forward; G W and G^T h backward (the token log-prob floor), in both layouts
    as in _div_floor (the engine keeps the faster per phase)."""
    v = shape.vocab
    h, w = x["hs"].detach(), x["ws"].detach()[:v]
    gen = torch.Generator(device=h.device).manual_seed(1)
    g = _randn(gen, shape.tokens, v, device=h.device, dtype=h.dtype, scale=1e-4)
    g_vm = g.T.contiguous()
    z, z_vm = h.new_empty(shape.tokens, v), h.new_empty(v, shape.tokens)
    gh, gw = torch.empty_like(h), torch.empty_like(w)
    matmuls = {"fwd": {"token-major": [lambda: torch.mm(h, w.T, out=z)],
                       "vocab-major": [lambda: torch.mm(w, h.T, out=z_vm)]},
               "bwd": {"token-major": [lambda: torch.mm(g, w, out=gh), lambda: torch.mm(g.T, h, out=gw)],
                       "vocab-major": [lambda: torch.mm(g_vm.T, w, out=gh), lambda: torch.mm(g_vm, h, out=gw)]}
               if backward else []}
    return matmuls, {"fwd": 2 * shape.tokens * v * shape.hs, "bwd": 4 * shape.tokens * v * shape.hs}


# token_logprobs: student [N, Hs] x [V, Hs], targets [N] -> log q(y) [N]; objective -mean log q(y) (the NLL).
def _tlp_inputs(shape, device, seed, opts):
    x = _div_inputs(shape, device, seed, opts)
    x["targets"] = _targets(torch.Generator(device=device).manual_seed(seed + 1), shape.tokens, shape.vocab, device)
    return x


def _tlp_truth(x, opts, budget_bytes: int = 64 << 20):
    h, w, y = x["hs"].detach(), x["ws"].detach(), x["targets"]
    n = h.shape[0]
    w32 = w.float().requires_grad_(True)
    rows = max(1, min(n, budget_bytes // (4 * w.shape[0])))
    g_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for i in range(0, n, rows):
        hc = h[i:i + rows].float().requires_grad_(True)
        part = -reference.token_logprobs(hc, w32, y[i:i + rows], temperature=opts["temperature"],
                                         vocab_size=x["vocab"]).sum() / n
        part.backward()
        g_h[i:i + rows] = hc.grad
        total += part.detach().double()
    return total, {"hs": g_h, "ws": w32.grad}


def _tlp_ours(backend: str) -> Impl:
    def make(x, opts):
        kw = dict(temperature=opts["temperature"], vocab_size=x["vocab"], backend=backend,
                  chunk_size=opts.get("chunk_size"))
        return lambda: -minillm_fast.token_logprobs(x["hs"], x["ws"], x["targets"], **kw).mean()
    return Impl(f"ours:{backend}", make, _op_backend_check(backend))


def _tlp_naive(x, opts):
    return lambda: -reference.token_logprobs(x["hs"], x["ws"], x["targets"], temperature=opts["temperature"],
                                             vocab_size=x["vocab"]).mean()


def _liger_flce_check(device, opts):
    if not _has("liger_kernel"):
        return "missing: liger-kernel is not installed (pip install liger-kernel)"
    if device.type != "cuda":
        return "unsupported: Liger's fused linear cross-entropy is a Triton kernel (GPU)"
    if opts["temperature"] != 1.0:
        return "unsupported: Liger's fused linear cross-entropy has no temperature"
    return None


def _liger_flce_make(x, opts):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32)  # mean CE = -mean log q(y)
    w = x["ws"] if x["ws"].shape[0] == x["vocab"] else x["ws"][:x["vocab"]]
    return lambda: loss_fn(w, x["hs"], x["targets"])


# rollout_statistics / mixture_sample: no gradients, forward only. The scalar each impl returns is only there to
# be checked: a weighted sum of the means of the outputs (different weights, so that errors cannot cancel).
def _rollout_inputs(shape, device, seed, opts):
    x = _div_inputs(shape, device, seed, opts)
    for k in ("hs", "ws"):
        x[k] = x[k].detach()
    x["tokens"] = _targets(torch.Generator(device=device).manual_seed(seed + 1), shape.tokens, shape.vocab, device)
    return x


def _two_model_floor(x, shape):
    matmuls, flops = _div_floor(x, shape)
    return {"fwd": matmuls["fwd"], "bwd": []}, {"fwd": flops["fwd"], "bwd": 0}  # fwd: both layouts, the faster


def _rollout_scalar(stats) -> torch.Tensor:
    return sum((i + 1) * t.double().mean() for i, t in enumerate(stats))


def _rollout_truth(x, opts, budget_bytes: int = 64 << 20):
    hs, ws, ht, wt, y = x["hs"], x["ws"].float(), x["ht"], x["wt"].float(), x["tokens"]
    n = hs.shape[0]
    rows = max(1, min(n, budget_bytes // (4 * ws.shape[0])))
    parts = [reference.rollout_statistics(hs[i:i + rows].float(), ws, ht[i:i + rows].float(), wt, y[i:i + rows],
                                          alpha=opts["alpha"], temperature=opts["temperature"], vocab_size=x["vocab"])
             for i in range(0, n, rows)]
    return _rollout_scalar([torch.cat(c) for c in zip(*parts)]), {}


def _rollout_ours(backend: str) -> Impl:
    def make(x, opts):
        kw = dict(alpha=opts["alpha"], temperature=opts["temperature"], vocab_size=x["vocab"], backend=backend,
                  chunk_size=opts.get("chunk_size"))
        return lambda: _rollout_scalar(minillm_fast.rollout_statistics(x["hs"], x["ws"], x["ht"], x["wt"],
                                                                       x["tokens"], **kw))
    return Impl(f"ours:{backend}", make, _op_backend_check(backend))


def _rollout_naive(x, opts):
    kw = dict(alpha=opts["alpha"], temperature=opts["temperature"], vocab_size=x["vocab"])

    def step():
        with torch.no_grad():
            return _rollout_scalar(reference.rollout_statistics(x["hs"], x["ws"], x["ht"], x["wt"], x["tokens"], **kw))
    return step


def _sample_ours(backend: str) -> Impl:
    def make(x, opts):
        kw = dict(alpha=opts["alpha"], temperature=opts["temperature"], vocab_size=x["vocab"], backend=backend,
                  chunk_size=opts.get("chunk_size"))
        gen = torch.Generator(device=x["hs"].device).manual_seed(0)
        return lambda: minillm_fast.mixture_sample(x["hs"], x["ws"], x["ht"], x["wt"], generator=gen, **kw).tokens
    return Impl(f"ours:{backend}", make, _op_backend_check(backend))


def _sample_student_only(backend: str) -> Impl:
    """``sample_tokens`` from the student alone: the baseline the mixture sampler's extra cost is measured against."""
    def make(x, opts):
        kw = dict(temperature=opts["temperature"], vocab_size=x["vocab"], backend=backend,
                  chunk_size=opts.get("chunk_size"))
        gen = torch.Generator(device=x["hs"].device).manual_seed(0)
        return lambda: minillm_fast.sample_tokens(x["hs"], x["ws"], generator=gen, **kw).tokens
    return Impl(f"sample_tokens:{backend}", make, _op_backend_check(backend),
                note=lambda opts: "student alone (no teacher matmul)")


def _sample_naive(x, opts):
    """The plain way: the mixture's [N, V] probabilities (minillm_fast.reference.mixture_probs), then multinomial.
    It returns the tokens only (the log-probs would take more work), which flatters it slightly."""
    kw = dict(alpha=opts["alpha"], temperature=opts["temperature"], vocab_size=x["vocab"])
    gen = torch.Generator(device=x["hs"].device).manual_seed(0)

    def step():
        with torch.no_grad():
            probs = reference.mixture_probs(x["hs"], x["ws"], x["ht"], x["wt"], **kw)
            return torch.multinomial(probs, 1, generator=gen)[:, 0]
    return step


def _alpha_variant(opts):
    return f"alpha{opts['alpha']}" + ("" if opts["temperature"] == 1.0 else f"-T{opts['temperature']}")


if hasattr(minillm_fast, "token_logprobs") and hasattr(reference, "token_logprobs"):
    register(Case(
        op="token_logprobs",
        about="minillm_fast.token_logprobs: log q(y) of given tokens; timed objective -mean log q(y)",
        make_inputs=_tlp_inputs,
        grad_names=("hs", "ws"),
        floor=_student_floor,
        truth=_tlp_truth,
        variant=lambda opts: "nll" + ("" if opts["temperature"] == 1.0 else f"-T{opts['temperature']}"),
        impls=[Impl("naive", _tlp_naive, note=lambda opts: "minillm_fast.reference.token_logprobs"),
               _tlp_ours("torch"), _tlp_ours("native"), _tlp_ours("triton"),
               Impl("liger:flce", _liger_flce_make, _liger_flce_check,
                    note=lambda opts: "LigerFusedLinearCrossEntropyLoss (mean CE) accum_dtype=float32")],
    ))

if hasattr(minillm_fast, "rollout_statistics") and hasattr(reference, "rollout_statistics"):
    register(Case(
        op="rollout_statistics",
        about="minillm_fast.rollout_statistics: log q(y), log p(y), log m(y), q/m and KL(q||p) per token (no grad)",
        make_inputs=_rollout_inputs,
        grad_names=(),
        floor=_two_model_floor,
        truth=_rollout_truth,
        variant=_alpha_variant,
        modes=("fwd",),
        impls=[Impl("naive", _rollout_naive, note=lambda opts: "minillm_fast.reference.rollout_statistics"),
               _rollout_ours("torch"), _rollout_ours("native"), _rollout_ours("triton")],
    ))

if hasattr(minillm_fast, "mixture_sample") and hasattr(reference, "mixture_probs"):
    register(Case(
        op="mixture_sample",
        about="minillm_fast.mixture_sample: one token per row from alpha p + (1-alpha) q (no grad; not checked "
              "here: a sampler is tested statistically in tests/)",
        make_inputs=_rollout_inputs,
        grad_names=(),
        floor=_two_model_floor,
        truth=None,
        variant=_alpha_variant,
        modes=("fwd",),
        impls=[Impl("naive", _sample_naive, note=lambda opts: "reference.mixture_probs + torch.multinomial"),
               _sample_ours("torch"), _sample_ours("native"), _sample_ours("triton"),
               _sample_student_only("torch"), _sample_student_only("native"), _sample_student_only("triton")],
    ))


# sparse_divergence: the student against a stored teacher top k (K=64 by default, `--topk`); the teacher's top k is
# made once from the teacher's logits (untimed), the timed objective is the mean forward KL over K+1 outcomes.
SPARSE_K = 64


def _sparse_inputs(shape, device, seed, opts):
    x = _div_inputs(shape, device, seed, opts)
    with torch.no_grad():
        top = reference.token_topk(x["ht"].float(), x["wt"].float(), SPARSE_K, vocab_size=shape.vocab)
    x["ids"], x["lp"] = top.ids, top.logprobs.to(torch.float16).float()
    return x


def _sparse_truth(x, opts, budget_bytes: int = 64 << 20):
    h, w = x["hs"].detach(), x["ws"].detach()
    n = h.shape[0]
    w32 = w.float().requires_grad_(True)
    rows = max(1, min(n, budget_bytes // (4 * w.shape[0])))
    g_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for i in range(0, n, rows):
        hc = h[i:i + rows].float().requires_grad_(True)
        part = reference.sparse_divergence(hc, w32, x["ids"][i:i + rows], x["lp"][i:i + rows],
                                           temperature=opts["temperature"], vocab_size=x["vocab"],
                                           reduction="sum") / n
        part.backward()
        g_h[i:i + rows] = hc.grad
        total += part.detach().double()
    return total, {"hs": g_h, "ws": w32.grad}


def _sparse_ours(backend: str) -> Impl:
    def make(x, opts):
        kw = dict(temperature=opts["temperature"], vocab_size=x["vocab"], backend=backend,
                  chunk_size=opts.get("chunk_size"))
        return lambda: minillm_fast.sparse_divergence(x["hs"], x["ws"], x["ids"], x["lp"], **kw)
    return Impl(f"ours:{backend}", make, _op_backend_check(backend))


def _sparse_naive(x, opts):
    return lambda: reference.sparse_divergence(x["hs"], x["ws"], x["ids"], x["lp"], temperature=opts["temperature"],
                                               vocab_size=x["vocab"])


if hasattr(minillm_fast, "sparse_divergence") and hasattr(reference, "sparse_divergence"):
    register(Case(
        op="sparse_divergence",
        about=f"minillm_fast.sparse_divergence: forward KL against a stored teacher top {SPARSE_K} (bucket tail); "
              "floor: the student's 3 matmuls",
        make_inputs=_sparse_inputs,
        grad_names=("hs", "ws"),
        floor=_student_floor,
        truth=_sparse_truth,
        variant=lambda opts: f"top{SPARSE_K}" + ("" if opts["temperature"] == 1.0 else f"-T{opts['temperature']}"),
        impls=[Impl("naive", _sparse_naive, note=lambda opts: "minillm_fast.reference.sparse_divergence "
                                                               "(materialised log-softmax + gather)"),
               _sparse_ours("torch"), _sparse_ours("native"), _sparse_ours("triton")],
    ))


PUBLIC_OPS = ("token_logprobs", "rollout_statistics", "mixture_sample", "sparse_divergence")
# sample_tokens: inside mixture_sample; token_topk: the teacher cache's (bench e2e)


def pending_ops() -> list:
    """Public ops of minillm_fast that have no benchmark case yet (printed by ``--list``)."""
    return [op for op in PUBLIC_OPS if hasattr(minillm_fast, op) and op not in CASES]
