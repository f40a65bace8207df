"""Shared test utilities: the backends available here, input factories and the error-budget assertion.

Error budget (as flash-attention's tests do it). For inputs ``x`` in the tested dtype:

* ground truth  = the reference (minillm_fast/reference.py) on float64 copies of ``x``;
* naive error   = |reference(x) - truth|, the error plain PyTorch makes in the tested dtype (the largest of four
  evaluations that differ only in summation order: as given, vocabulary reversed, hidden dimension reversed, both;
  so that one lucky rounding does not shrink the budget);
* the fast path passes when ``|impl(x) - truth| <= 2 * naive error + small``, with ``small`` the rounding of
  fp32 arithmetic plus one rounding to the tested dtype, relative to the truth's magnitude: ``(8 eps(fp32) +
  eps(dtype) / 2) * max|truth|``, ~1e-6 x max|truth| in fp32 and 0.4% in bf16 (``rounding_slack``); for a
  gradient, at least one fp32 rounding of the terms that cancel in it, ``eps(fp32) * max(scale)``
  (``cancellation_scales``: ``|a| + q |sum a|`` of the softmax's backward ``a - q sum a``, carried through the heads
  with absolute values). Mostly that is the slack above; in a one-hot row the true gradient is ~1e-16 while the
  terms that cancel are ~1, and their rounding, not the truth, is the yardstick.
* TVD's ``sign(q - p)`` is a coin flip where ``q ~= p`` within rounding: TVD gradients are checked on inputs without
  such entries (``untie_tvd``), never with a slack of ``q``.

Errors are max-abs over the tensor; every quantity (loss, each gradient) gets its own budget, and none may be NaN.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

if not torch.cuda.is_available():  # conftest sets it first; kept here for a standalone `import helpers`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import minillm_fast  # noqa: E402
from minillm_fast import dispatch, reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
REDUCTIONS = ("mean", "sum", "none")
# Hidden/head tensors of fused_divergence, in positional-then-keyword order.
TENSOR_NAMES = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "student_bias",
                "teacher_bias")
STUDENT = ("student_hidden", "student_weight")
# fused_divergence arguments the reference does not take (besides backend and strategy)
IMPL_ONLY = ("chunk_size",)
# fp32 ulps of rounding slack in the budget (rounding_slack): 8.5 ulps in all is 1.0e-6 x max|truth| in fp32.
SMALL_ULPS = 8
# fp32 ulps of the magnitude of the terms that cancel in a gradient (cancellation_scales), the slack's floor: one
# rounding of them.
CANCEL_ULPS = 1


def available_impls(device: torch.device = DEVICE) -> list[tuple[str, str]]:
    """(backend, strategy) pairs that run on ``device``: torch always; triton chunked and tiled; native when it
    resolves (it is picked up automatically once built)."""
    impls = [("torch", "chunked")]
    for backend, strategies in (("triton", ("chunked", "tiled")), ("native", ("chunked",))):
        try:
            dispatch.resolve(backend, device)
        except Exception:  # noqa: BLE001 - not installed / not built / no CUDA: not parametrised
            continue
        impls += [(backend, s) for s in strategies]
    return impls


IMPLS = available_impls()
IMPL_IDS = [f"{b}-{s}" for b, s in IMPLS]


# ----------------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------------
def randn(gen: torch.Generator, *shape, scale: float = 1.0, dtype=torch.float32, device=DEVICE) -> torch.Tensor:
    """Standard normal from ``gen`` (always drawn on the CPU in fp32, so a seed gives the same numbers anywhere)."""
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def make_inputs(gen: torch.Generator, n: int = 37, hs: int = 24, ht: int = 40, v: int = 131, *,
                lead: Optional[Sequence[int]] = None, v_student: Optional[int] = None,
                v_teacher: Optional[int] = None, bias: bool = False, logit_std: float = 3.0,
                dtype=torch.float32, device=DEVICE) -> dict:
    """The six hidden/head tensors of ``fused_divergence`` (biases None unless ``bias``), detached.

    Rows are ``lead`` (default ``[n]``); the logits have a standard deviation of about ``logit_std`` so that the
    distributions are neither uniform nor one-hot. ``v_student`` / ``v_teacher`` give padded heads (default ``v``).
    """
    lead = tuple(lead) if lead is not None else (n,)
    vs, vt = v_student or v, v_teacher or v
    out = {
        "student_hidden": randn(gen, *lead, hs, dtype=dtype, device=device),
        "student_weight": randn(gen, vs, hs, scale=logit_std / hs ** 0.5, dtype=dtype, device=device),
        "teacher_hidden": randn(gen, *lead, ht, dtype=dtype, device=device),
        "teacher_weight": randn(gen, vt, ht, scale=logit_std / ht ** 0.5, dtype=dtype, device=device),
        "student_bias": randn(gen, vs, dtype=dtype, device=device) if bias else None,
        "teacher_bias": randn(gen, vt, dtype=dtype, device=device) if bias else None,
    }
    return out


def labels_with_ignored(gen: torch.Generator, lead: Sequence[int], vocab: int, frac: float = 0.3,
                        ignore_index: int = -100, device=DEVICE) -> torch.Tensor:
    """Random token ids with about ``frac`` of the rows set to ``ignore_index`` (at least one kept row)."""
    labels = torch.randint(0, vocab, tuple(lead), generator=gen)
    drop = torch.rand(tuple(lead), generator=gen) < frac
    drop.view(-1)[0] = False
    return labels.masked_fill(drop, ignore_index).to(device)


def tvd_ties(tensors: dict, *, temperature: float = 1.0, softcap: Optional[float] = None,
             vocab_size: Optional[int] = None) -> torch.Tensor:
    """Rows (a bool tensor over the leading dims) where some entry has ``q ~= p`` within rounding: ``|log q - log
    p|`` at most twice what rounding the logits in the inputs' dtype and the log-softmax in fp32 may move it by.

    TVD's gradient holds ``sign(q - p)``: at such an entry, the sign any implementation computes (the naive one
    included) is a coin flip, and the gradient jumps by ``q`` with it. The subgradient there is genuinely ambiguous,
    so the tests keep such entries out of their inputs (:func:`untie_tvd`) rather than allowing a jump of ``q``.
    A logit ``z = h W^T + b`` is off by up to ``eps(dtype) |z| + eps(fp32) (|h| |W|^T + |b|)`` (its rounding to the
    dtype, and the fp32 sum); ``log q = s - lse(s)`` by that entry's error plus the q-weighted mean error of lse.
    """
    dtype = tensors["student_hidden"].dtype
    diffs, tols = [], []
    for side in ("student", "teacher"):
        h, w, b = (tensors[f"{side}_{k}"] for k in ("hidden", "weight", "bias"))
        h, w = h.detach().double(), w.detach().double()
        b = None if b is None else b.detach().double()
        v = w.shape[0] if vocab_size is None else vocab_size
        z = h @ w[:v].T + (0.0 if b is None else b[:v])
        mag = h.abs() @ w[:v].abs().T + (0.0 if b is None else b[:v].abs())
        dz = (torch.finfo(dtype).eps * z.abs() + torch.finfo(torch.float32).eps * mag) / temperature
        lq = torch.log_softmax(reference.logits(h, w, b, vocab_size=vocab_size, softcap=softcap,
                                                temperature=temperature), -1)
        diffs.append(lq)
        tols.append(dz + (lq.exp() * dz).sum(-1, keepdim=True))
    return ((diffs[0] - diffs[1]).abs() <= 2 * (tols[0] + tols[1])).any(-1)


def untie_tvd(gen: torch.Generator, tensors: dict, **kwargs) -> dict:
    """``tensors`` with the teacher hidden state of every row that has a near-tie (:func:`tvd_ties`, same keyword
    arguments) drawn again from ``gen``, until none has."""
    out = dict(tensors)
    for _ in range(100):
        ties = tvd_ties(out, **kwargs)
        if not ties.any():
            return out
        h = out["teacher_hidden"].clone()
        h[ties] = randn(gen, int(ties.sum()), h.shape[-1], dtype=h.dtype, device=h.device)
        out["teacher_hidden"] = h
    raise AssertionError("could not untie the TVD inputs")


# ----------------------------------------------------------------------------------------------------------------------
# running the op and the reference the same way
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    out: torch.Tensor
    grads: dict = field(default_factory=dict)

    def items(self):
        yield "loss", self.out
        yield from ((f"grad {k}", g) for k, g in self.grads.items())


def run(fn: Callable, tensors: dict, grad_names: Sequence[str] = STUDENT, *, cast=None, upstream=None,
        **kwargs) -> Result:
    """Call ``fn`` (fused_divergence or its reference) on fresh leaves made from ``tensors`` (optionally ``cast``
    to a dtype), with gradients for ``grad_names``, and backpropagate ``upstream`` (ones by default)."""
    leaves = {}
    for k, t in tensors.items():
        if t is None:
            continue
        t = t.detach().clone() if cast is None else t.detach().to(cast)
        leaves[k] = t.requires_grad_(k in grad_names)
    out = fn(leaves["student_hidden"], leaves["student_weight"], leaves["teacher_hidden"], leaves["teacher_weight"],
             student_bias=leaves.get("student_bias"), teacher_bias=leaves.get("teacher_bias"), **kwargs)
    grads = {}
    if grad_names:
        up = torch.ones_like(out) if upstream is None else upstream.to(device=out.device, dtype=out.dtype)
        gs = torch.autograd.grad(out, [leaves[k] for k in grad_names], grad_outputs=up)
        grads = dict(zip(grad_names, gs))
    return Result(out.detach(), grads)


def fused(tensors: dict, grad_names: Sequence[str] = STUDENT, *, backend: str, strategy: str = "auto",
          upstream=None, **kwargs) -> Result:
    return run(minillm_fast.fused_divergence, tensors, grad_names, upstream=upstream, backend=backend,
               strategy=strategy, **kwargs)


# The four summation orders of a naive evaluation (vocabulary reversed, hidden dimension reversed): see reordered.
ORDERS = ((False, False), (True, False), (False, True), (True, True))


def reordered(tensors: dict, vocab_size: Optional[int], flip_vocab: bool, flip_hidden: bool):
    """The same inputs with the first ``vocab_size`` rows of every head in reverse order (padded rows stay put)
    and/or the hidden dimension reversed (hidden states and heads alike); a function that maps a result back and one
    that maps token ids (targets, drawn tokens) to the reordered vocabulary. The math is unchanged; the order of
    every sum (the logits' dot products, softmax, gradient reductions) is not, and so is the rounding of the logits.

    ``tensors``: ``{side}_hidden``, ``{side}_weight`` and optionally ``{side}_bias`` for each side present
    (``student``, ``teacher``)."""
    def perm(rows):
        v = rows if vocab_size is None else vocab_size
        return torch.cat([torch.arange(v - 1, -1, -1), torch.arange(v, rows)]).to(DEVICE)

    def retoken(ids: torch.Tensor) -> torch.Tensor:
        if not flip_vocab:
            return ids
        v = vocab_size if vocab_size is not None else tensors[f"{sides[0]}_weight"].shape[0]
        return torch.where((ids >= 0) & (ids < v), v - 1 - ids, ids)

    sides = [side for side in ("student", "teacher") if f"{side}_weight" in tensors]
    perms, out = {}, dict(tensors)
    for side in sides:
        w, b = tensors[f"{side}_weight"], tensors.get(f"{side}_bias")
        p = perms[side] = perm(w.shape[0]) if flip_vocab else torch.arange(w.shape[0], device=DEVICE)
        out[f"{side}_weight"] = w[p].flip(-1) if flip_hidden else w[p]
        if b is not None:
            out[f"{side}_bias"] = b[p]
        if flip_hidden:
            out[f"{side}_hidden"] = tensors[f"{side}_hidden"].flip(-1)

    def restore(r: Result) -> Result:
        grads = {}
        for k, g in r.grads.items():
            side = k.split("_")[0]
            if flip_hidden and not k.endswith("_bias"):
                g = g.flip(-1)
            grads[k] = g[torch.argsort(perms[side])] if k.endswith(("_weight", "_bias")) else g
        return Result(r.out, grads)

    return out, restore, retoken


def ground_truth_and_naive(tensors: dict, grad_names: Sequence[str] = STUDENT, *, upstream=None,
                           **kwargs) -> tuple[Result, list]:
    """The reference on float64 copies of the inputs (truth), and on the inputs as they are (naive).

    Four naive evaluations: as given, with the vocabulary reversed, with the hidden dimension reversed, and both:
    the same math summed in other orders. The naive error is the largest of the four: a single evaluation is
    sometimes luckily exact on the few elements that decide a maximum, and the budget must not hang on that luck.
    """
    up64 = None if upstream is None else upstream.double()
    truth = run(reference.fused_divergence, tensors, grad_names, cast=torch.float64, upstream=up64, **kwargs)
    naive = []
    for flip_vocab, flip_hidden in ORDERS:
        inputs, restore, _ = reordered(tensors, kwargs.get("vocab_size"), flip_vocab, flip_hidden)
        naive.append(restore(run(reference.fused_divergence, inputs, grad_names, upstream=upstream, **kwargs)))
    return truth, naive


def _graph_nodes(root, kind: str) -> list:
    """The autograd nodes named ``kind`` (e.g. ``LogSoftmaxBackward0``) reachable from ``root``."""
    seen, stack, found = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == kind:
            found.append(node)
        stack.extend(f for f, _ in node.next_functions)
    return found


def _cancelling_grads(out: torch.Tensor, inputs: Sequence[torch.Tensor], upstream=None) -> tuple:
    """``autograd.grad(out, inputs, upstream)`` with ``dL/ds = a - q sum a`` at both log-softmaxes of the graph
    replaced by the magnitude of its two terms, ``|a| + q |sum a|`` (``a = dL/dlog q``)."""
    nodes = _graph_nodes(out.grad_fn, "LogSoftmaxBackward0")
    assert len(nodes) == 2, f"expected two log-softmaxes (student and teacher), found {len(nodes)}"

    def magnitude(node):
        def hook(grad_inputs, grad_outputs):
            a, q = grad_outputs[0], node._saved_result.exp()
            return (a.abs() + q * a.sum(-1, keepdim=True).abs(),)
        return hook

    handles = [node.register_hook(magnitude(node)) for node in nodes]
    try:
        up = torch.ones_like(out) if upstream is None else upstream.to(device=out.device, dtype=out.dtype)
        return torch.autograd.grad(out, list(inputs), grad_outputs=up)
    finally:
        for h in handles:
            h.remove()


def rows_cancellation_scales(zs: torch.Tensor, zt: torch.Tensor, row_grad: torch.Tensor, cfg) -> dict:
    """:func:`cancellation_scales` for a rows function (minillm_fast/chunked.py) on raw chunk logits ``[C, V]``:
    ``{"g_s": ..., "g_t": ...}``, per entry of ``dL/dzs`` and ``dL/dzt``, the float64 magnitude ``|a| + q |sum a|``
    of the two terms that cancel in it, times ``|row_grad|`` and each model's ``ds/dz`` (``cfg.student`` /
    ``cfg.teacher``: minillm_fast.scaling.Scaling)."""
    from minillm_fast import divergences

    zs64, zt64 = (z.detach().double().requires_grad_() for z in (zs, zt))
    lq = torch.log_softmax(cfg.student.apply(zs64)[0], -1)
    lp = torch.log_softmax(cfg.teacher.apply(zt64)[0], -1)
    out = divergences.phi(lq, lp, cfg.div).sum(-1)
    g_s, g_t = _cancelling_grads(out, [zs64, zt64], row_grad.detach().double())
    return {"g_s": g_s.abs(), "g_t": g_t.abs()}


def cancellation_scales(tensors: dict, grad_names: Sequence[str] = STUDENT, *, upstream=None, **kwargs) -> dict:
    """The float64 magnitude of the terms that cancel in each gradient of ``grad_names`` (by ``grad <name>``),
    elementwise, for the budget's rounding slack.

    The gradient with respect to one model's scaled logits is ``dL/ds = a - q sum_v a_v`` (``a = dL/dlog q``, the
    softmax's backward): two terms that cancel, fully so in a one-hot row (``q_top = 1``), where the true gradient is
    ~0 but any fp32 evaluation of it is left with the rounding of ``|a| ~ 1``. Its magnitude is ``M = |a| +
    q |sum_v a_v|``; carried to the raw logits (the softcap's and temperature's factors) and through the head's
    matmuls with absolute values, it gives, per element, ``sum_v M_v |W_v|`` (hidden states), ``sum_rows M |h|``
    (head) and ``sum_rows M`` (bias): the size of what an fp32 computation rounds on the way to that element. It is
    never below ``|truth|``, and equal to it where nothing cancels.

    Computed with the reference itself, so that every option it takes is honoured: autograd hooks replace
    ``dL/ds`` by ``M`` at both log-softmaxes, and each head gets N zero columns against N one-hot hidden columns,
    which leave the logits unchanged and whose gradient is ``dL/dz`` per row and vocabulary entry.
    """
    names = [k for k in grad_names if tensors.get(k) is not None]
    if not names:
        return {}
    x = {k: (None if t is None else t.detach().to(torch.float64)) for k, t in tensors.items()}
    lead = x["student_hidden"].shape[:-1]
    n = x["student_hidden"][..., 0].numel()
    eye = torch.eye(n, dtype=torch.float64, device=DEVICE).reshape(*lead, n)
    args, probes = dict(x), {}
    for side in ("student", "teacher"):
        w = x[f"{side}_weight"]
        probes[side] = torch.zeros(w.shape[0], n, dtype=torch.float64, device=DEVICE, requires_grad=True)
        args[f"{side}_hidden"] = torch.cat([x[f"{side}_hidden"], eye], -1)
        args[f"{side}_weight"] = torch.cat([w, probes[side]], -1)
    out = reference.fused_divergence(args["student_hidden"], args["student_weight"], args["teacher_hidden"],
                                     args["teacher_weight"], student_bias=args.get("student_bias"),
                                     teacher_bias=args.get("teacher_bias"), **kwargs)
    d_probe = _cancelling_grads(out, [probes["student"], probes["teacher"]], upstream)
    scales = {}
    for side, dp in zip(("student", "teacher"), d_probe):
        mz = dp.abs().T  # [n, V_pad]: M carried to the raw logits (zero on padded vocabulary rows)
        w, h = x[f"{side}_weight"], x[f"{side}_hidden"].reshape(n, -1)
        scales[f"grad {side}_hidden"] = (mz @ w.abs()).reshape(*lead, w.shape[1])
        scales[f"grad {side}_weight"] = mz.T @ h.abs()
        scales[f"grad {side}_bias"] = mz.sum(0)
    return {f"grad {k}": scales[f"grad {k}"] for k in names}


# ----------------------------------------------------------------------------------------------------------------------
# the error budget
# ----------------------------------------------------------------------------------------------------------------------
def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.detach().double() - truth.detach().double()).abs().max().item() if truth.numel() else 0.0


def small_term(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """``SMALL_ULPS * eps(dtype) * max|truth|``: a rounding slack relative to the magnitude of the truth."""
    mag = truth.detach().double().abs().max().item() if truth.numel() else 0.0
    return SMALL_ULPS * torch.finfo(dtype).eps * mag


def rounding_slack(truth: torch.Tensor, dtype: torch.dtype, scale: Optional[torch.Tensor] = None) -> float:
    """The ``small`` of the budget for inputs of ``dtype``: fp32 arithmetic (every path computes in fp32) plus one
    rounding to the tested dtype, ``(SMALL_ULPS * eps(fp32) + eps(dtype) / 2) * max|truth|``: ~1e-6 x max|truth|
    for fp32, half a bf16 ulp (0.4%) for bf16. Never a fixed atol: an all-zero truth leaves no slack at all.

    With ``scale`` (a gradient's :func:`cancellation_scales`), at least ``CANCEL_ULPS * eps(fp32) * max(scale)``:
    one fp32 rounding of the terms that cancel. Where nothing cancels much (``scale`` within ~8x of ``|truth|``)
    this is the slack above unchanged; where the truth is far smaller than what cancels (a one-hot row's gradient,
    ~1e-16, from terms ~1), the rounding of those terms, which no fp32 evaluation avoids, is what is allowed."""
    mag = truth.detach().double().abs().max().item() if truth.numel() else 0.0
    small = (SMALL_ULPS * torch.finfo(torch.float32).eps + torch.finfo(dtype).eps / 2) * mag
    if scale is not None and scale.numel():
        small = max(small, CANCEL_ULPS * torch.finfo(torch.float32).eps * scale.max().item())
    return small


def assert_no_nan(result: Result, what: str = "") -> None:
    for name, x in result.items():
        assert not torch.isnan(x).any(), f"{what}{name} has NaN: {x}"
        assert torch.isfinite(x).all(), f"{what}{name} is not finite: {x}"


def assert_within_budget(impl: Result, truth: Result, naive: Sequence[Result], dtype: torch.dtype,
                         what: str = "", scales: Optional[dict] = None) -> None:
    """``err(impl) <= 2 err(naive) + small`` for the loss and every gradient, and no NaN/inf in ``impl``;
    ``naive`` is one or more naive evaluations (the largest error counts), ``dtype`` the inputs' dtype, ``scales``
    the gradients' :func:`cancellation_scales` (by name; the slack of a quantity without one is relative to its
    truth)."""
    assert_no_nan(impl, what)
    assert impl.grads.keys() == truth.grads.keys(), f"{what}gradients {impl.grads.keys()} vs {truth.grads.keys()}"
    naive = [naive] if isinstance(naive, Result) else list(naive)
    for (name, x), (_, t), *nvs in zip(impl.items(), truth.items(), *(nv.items() for nv in naive)):
        assert x.shape == t.shape, f"{what}{name}: shape {tuple(x.shape)}, expected {tuple(t.shape)}"
        e_naive = max(max_err(nv, t) for _, nv in nvs)
        scale = (scales or {}).get(name)
        e_impl, small = max_err(x, t), rounding_slack(t, dtype, scale)
        assert e_impl <= 2 * e_naive + small, (
            f"{what}{name}: error {e_impl:.3e} > 2 x naive {e_naive:.3e} + {small:.3e} "
            f"(max|truth| {t.double().abs().max().item():.3e}"
            + ("" if scale is None else f", max cancelling {scale.max().item():.3e}") + ")"
        )


def assert_rows_within_budget(got: Sequence, naive: Sequence, truth: Sequence, what: str = "",
                              slack: Callable[[torch.Tensor, torch.dtype], float] = small_term,
                              scales: Optional[dict] = None) -> None:
    """The budget for a rows function's outputs ``(loss, stats, g_s, g_t)`` (None where not asked): each is finite,
    of naive's dtype and the truth's shape, and ``|got - truth| <= 2 |naive - truth| + slack(truth, dtype)``.
    ``slack``: :func:`small_term` (kernels computing in the tested dtype) or :func:`rounding_slack` (computing in fp32
    and rounding to it); for ``g_s`` / ``g_t``, at least one fp32 rounding of the terms that cancel in them,
    ``CANCEL_ULPS * eps(fp32) * max(scales[name])`` (:func:`rows_cancellation_scales`), as in the op's budget."""
    for name, x, nv, t in zip(("loss", "stats", "g_s", "g_t"), got, naive, truth):
        if t is None:
            assert x is None, f"{what}{name} should be None"
            continue
        assert x.dtype == nv.dtype and x.shape == t.shape, f"{what}{name}: {x.dtype} {tuple(x.shape)}"
        assert torch.isfinite(x).all(), f"{what}{name} is not finite"
        e, e_naive, small = max_err(x, t), max_err(nv, t), slack(t, x.dtype)
        scale = (scales or {}).get(name)
        if scale is not None and scale.numel():
            small = max(small, CANCEL_ULPS * torch.finfo(torch.float32).eps * scale.max().item())
        assert e <= 2 * e_naive + small, f"{what}{name}: error {e:.3e} > 2 x torch's {e_naive:.3e} + {small:.3e}"


def check_op(tensors: dict, grad_names: Sequence[str] = STUDENT, *, backend: str, strategy: str = "auto",
             upstream=None, what: str = "", **kwargs) -> tuple[Result, Result]:
    """Run the fused op and the reference on ``tensors`` and apply the error budget; returns (impl, truth)."""
    dtype = tensors["student_hidden"].dtype
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in IMPL_ONLY}
    truth, naive = ground_truth_and_naive(tensors, grad_names, upstream=upstream, **ref_kwargs)
    if ref_kwargs.get("divergence") == "tvd" and grad_names:
        ties = tvd_ties(tensors, **{k: ref_kwargs[k] for k in ("temperature", "softcap", "vocab_size")
                                    if ref_kwargs.get(k) is not None})
        assert not ties.any(), "TVD inputs with q ~= p within rounding (its sign is ambiguous): use untie_tvd"
    scales = cancellation_scales(tensors, grad_names, upstream=upstream, **ref_kwargs)
    out = fused(tensors, grad_names, backend=backend, strategy=strategy, upstream=upstream, **kwargs)
    assert out.out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), out.out.dtype
    for k, g in out.grads.items():
        assert g.dtype == tensors[k].dtype, f"grad {k} has dtype {g.dtype}, expected {tensors[k].dtype}"
    assert_within_budget(out, truth, naive, dtype, what or f"[{backend}-{strategy}] ", scales)
    return out, truth
