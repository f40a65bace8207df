"""Output of a benchmark run: the environment record, the printed table, the long-format CSV and the plots."""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import math
import os
import platform
import subprocess
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

CSV_COLUMNS = [
    # where and when
    "date", "commit", "device", "device_type", "threads", "torch", "triton", "liger_kernel", "torchtune", "python",
    # what
    "preset", "op", "variant", "tokens", "hs", "ht", "vocab", "vocab_pad", "dtype", "shape", "impl", "mode",
    # results
    "status", "median_ms", "p20_ms", "p80_ms", "min_ms", "max_ms", "reps", "floor_ms", "floor_ratio", "floor_flops",
    "peak_extra_mib", "mem_ratio_naive", "mem_method", "verify_loss_err", "verify_grad_err", "notes",
]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device, threads: int) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_model()} ({os.cpu_count()} logical cores)"
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=commit(), device=name,
                device_type=device.type, threads=threads if device.type == "cpu" else "",
                torch=torch.__version__, triton=_version("triton"), liger_kernel=_version("liger-kernel"),
                torchtune=_version("torchtune"), python=platform.python_version())


# ----------------------------------------------------------------------------------------------------------------------
# derived columns
# ----------------------------------------------------------------------------------------------------------------------
def add_ratios(rows: list) -> None:
    """``floor_ratio`` = median / floor median of the same shape and mode; ``mem_ratio_naive`` = peak extra memory /
    naive's peak extra memory of the same shape, op variant and mode."""
    key = lambda r: (r["preset"], r["op"], r["variant"], r["tokens"], r["dtype"], r["mode"])  # noqa: E731
    floor = {key(r): r for r in rows if r["impl"] == "floor" and r["status"] == "ok"}
    naive = {key(r): r for r in rows if r["impl"] == "naive" and r["status"] == "ok"}
    for r in rows:
        f = floor.get(key(r))
        if f is not None:
            r["floor_ms"] = f["median_ms"]
            r["floor_flops"] = f.get("floor_flops", "")
            if r["status"] == "ok" and _num(r.get("median_ms")):
                r["floor_ratio"] = r["median_ms"] / f["median_ms"]
        n = naive.get(key(r))
        if n is not None and r["status"] == "ok" and _num(r.get("peak_extra_mib")) and _num(n.get("peak_extra_mib")) \
                and n["peak_extra_mib"] > 0:
            r["mem_ratio_naive"] = r["peak_extra_mib"] / n["peak_extra_mib"]


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


# ----------------------------------------------------------------------------------------------------------------------
# table
# ----------------------------------------------------------------------------------------------------------------------
def _fmt(v, spec: str, empty: str = "-") -> str:
    return format(v, spec) if _num(v) else empty


def table(rows: list) -> str:
    """Plain-text table, one block per (preset, op variant, shape)."""
    out = []
    header = (f"{'impl':<18} {'mode':<8} {'median ms':>10} {'spread (p20-p80)':>20} {'x floor':>8} "
              f"{'peak extra MiB':>15} {'x naive mem':>11}  status / verify")
    blocks = defaultdict(list)
    for r in rows:
        blocks[(r["preset"], r["op"], r["variant"], r["shape"])].append(r)
    for (preset, op, variant, shape), rs in blocks.items():
        out.append("")
        out.append(f"== {preset}: {op} [{variant}]  {shape}")
        out.append(header)
        out.append("-" * len(header))
        not_run = {}
        for r in rs:
            if r["status"] in ("missing", "unsupported"):
                not_run.setdefault(r["impl"], f"{r['status']}: {r.get('notes', '')}")
        for r in rs:
            if r["impl"] in not_run:
                continue
            spread = (f"{_fmt(r.get('p20_ms'), '.2f')}-{_fmt(r.get('p80_ms'), '.2f')}"
                      if _num(r.get("p20_ms")) else "-")
            if r["status"] == "ok":
                st = "ok"
                if _num(r.get("verify_loss_err")):
                    st += f" (err {max(r['verify_loss_err'], r['verify_grad_err']):.1e})"
            else:
                st = f"{r['status']}: {r.get('notes', '')}"
            out.append(f"{r['impl']:<18} {r['mode']:<8} {_fmt(r.get('median_ms'), '10.2f'):>10} {spread:>20} "
                       f"{_fmt(r.get('floor_ratio'), '8.2f'):>8} {_fmt(r.get('peak_extra_mib'), '15.1f'):>15} "
                       f"{_fmt(r.get('mem_ratio_naive'), '11.3f'):>11}  {st}")
        for impl, why in not_run.items():
            out.append(f"{impl:<18} not run ({why})")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------------------------------
def _save(fig, path: Path) -> Path:
    """Lay out, write (110 dpi) and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def publish(rows: list, out_dir: Path, table, plot=None, name: str = "bench.csv", columns: list = CSV_COLUMNS) -> None:
    """Print ``table(rows)``, append the rows to ``out_dir/name`` and draw ``plot(rows, out_dir, stamp)`` (None: no
    plots), saying where each went."""
    print(table(rows))
    csv_path = write_csv(rows, out_dir, name=name, columns=columns)
    print(f"\nCSV: {csv_path} ({len(rows)} rows appended)")
    if plot is not None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        for path in plot(rows, out_dir, stamp):
            print(f"plot: {path}")


def write_csv(rows: list, out_dir: Path, name: str = "bench.csv", columns: list = CSV_COLUMNS) -> Path:
    """Append ``rows`` to ``out_dir/name`` (long format, header written once). A file with another header is left
    alone and the rows go to a new, dated file beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    if path.exists():
        with open(path, newline="") as f:
            first = next(csv.reader(f), None)
        if first != columns:
            stem = name.rsplit(".", 1)[0]
            path = out_dir / f"{stem}-{datetime.datetime.now():%Y%m%d-%H%M%S}.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k, "")) for k in columns})
    return path


def read_csv(path: Path) -> list:
    """The rows of a results CSV (either kind), numbers parsed back: ints where the text is an int, floats where it
    is a float, the rest (and empty cells) left as text."""
    def parse(v: str):
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as f:
        return [{k: parse(v) if k not in _TEXT_COLUMNS else v for k, v in r.items()} for r in csv.DictReader(f)]


_TEXT_COLUMNS = {"date", "commit", "device", "device_type", "torch", "triton", "liger_kernel", "torchtune",
                 "transformers", "python", "preset", "op", "variant", "shape", "impl", "mode", "status", "mem_method",
                 "notes", "step", "family", "backend", "student", "teacher", "dtype"}


def stamp_of(date: str) -> str:
    """``2026-11-22T21:53:10`` -> ``20261122-215310``: the file-name stamp of a run, from its rows' ``date``."""
    return date.replace("-", "").replace(":", "").replace("T", "-")[:15]


def _csv_value(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


# ----------------------------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------------------------
_FLOOR_STYLE = dict(color="black", linestyle="--", linewidth=1.3)


def _colors(impls: list) -> dict:
    """One colour per implementation, the same in both panels (the floor is black)."""
    import matplotlib

    cycle = [c["color"] for c in matplotlib.rcParams["axes.prop_cycle"]]
    others = [i for i in impls if i != "floor"]
    return {impl: cycle[k % len(cycle)] for k, impl in enumerate(others)}


def _log_if_wide(ax) -> None:
    """Log y axis where the plotted values span more than 20x (naive's GB next to a chunked op's MB); else headroom
    above the tallest bar for its label."""
    ys = [y for line in ax.lines for y in line.get_ydata() if y > 0]
    ys += [bar.get_height() for c in ax.containers if hasattr(c, "patches") for bar in c.patches
           if bar.get_height() > 0]
    if ys and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    else:
        ax.margins(y=0.12)


def _plot_sweep(ax_t, ax_m, rs: list, impls: list, colors: dict) -> None:
    """Several token counts: a line per implementation against N, the floor dashed black with its p20-p80 band."""
    for impl in impls:
        pts = sorted((r["tokens"], r) for r in rs if r["impl"] == impl and r["status"] == "ok")
        if not pts:
            continue
        xs = [p[0] for p in pts]
        lo = [p[1]["p20_ms"] for p in pts]
        hi = [p[1]["p80_ms"] for p in pts]
        if impl == "floor":  # markers too, so that a floor measured at one N only still shows
            ax_t.plot(xs, [p[1]["median_ms"] for p in pts], marker="x", label="floor (matmuls alone)",
                      **_FLOOR_STYLE)
            if all(_num(v) for v in lo + hi):
                ax_t.fill_between(xs, lo, hi, color="black", alpha=0.08)
            continue
        ax_t.plot(xs, [p[1]["median_ms"] for p in pts], marker="o", label=impl, color=colors[impl])
        if all(_num(v) for v in lo + hi):
            ax_t.fill_between(xs, lo, hi, alpha=0.15, color=colors[impl])
        mem = [(p[0], p[1].get("peak_extra_mib")) for p in pts if _num(p[1].get("peak_extra_mib"))]
        if mem:
            ax_m.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=impl, color=colors[impl])
    for ax in (ax_t, ax_m):
        ax.set_xlabel("tokens N")
        ax.set_xscale("log", base=2)


def _plot_single(ax_t, ax_m, rs: list, impls: list, colors: dict) -> None:
    """One token count: a bar per implementation (p20-p80 as error bars, ``x floor`` written on the time bars), the
    floor as a dashed black line across the time panel with its p20-p80 band."""
    ok = {r["impl"]: r for r in rs if r["status"] == "ok"}
    names = [i for i in impls if i != "floor" and i in ok]
    xs = list(range(len(names)))
    med = [ok[i]["median_ms"] for i in names]
    err = [[max(m - ok[i]["p20_ms"], 0) if _num(ok[i].get("p20_ms")) else 0 for i, m in zip(names, med)],
           [max(ok[i]["p80_ms"] - m, 0) if _num(ok[i].get("p80_ms")) else 0 for i, m in zip(names, med)]]
    bars = ax_t.bar(xs, med, yerr=err, capsize=3, color=[colors[i] for i in names], alpha=0.85)
    for bar, i, hi in zip(bars, names, err[1]):
        ratio = ok[i].get("floor_ratio")
        if _num(ratio):  # above the error bar
            ax_t.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height() + hi),
                          xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8)
    floor = ok.get("floor")
    if floor is not None:
        ax_t.axhline(floor["median_ms"], label=f"floor (matmuls alone): {floor['median_ms']:.4g} ms", **_FLOOR_STYLE)
        if _num(floor.get("p20_ms")) and _num(floor.get("p80_ms")):
            ax_t.axhspan(floor["p20_ms"], floor["p80_ms"], color="black", alpha=0.08)
    mem = [(x, i, ok[i]["peak_extra_mib"]) for x, i in zip(xs, names) if _num(ok[i].get("peak_extra_mib"))]
    mbars = ax_m.bar([m[0] for m in mem], [m[2] for m in mem], color=[colors[m[1]] for m in mem], alpha=0.85)
    for bar, (_, _, v) in zip(mbars, mem):
        ax_m.annotate(f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 3),
                      textcoords="offset points", ha="center", va="bottom", fontsize=8)
    for ax in (ax_t, ax_m):
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_xlabel(f"implementation (N={rs[0]['tokens']} tokens)")
        ax.set_xlim(-0.6, max(len(names), 1) - 0.4)


def plot(rows: list, out_dir: Path, stamp: str) -> list:
    """One PNG per (preset, op variant, dtype, mode): median time and peak extra memory. Several token counts: against
    tokens, one line per implementation; one token count: one bar per implementation. The matmul floor is drawn in
    every time panel (dashed black, with its p20-p80 band). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in rows:
        groups[(r["preset"], r["op"], r["variant"], r["dtype"], r["mode"], r["device_type"])].append(r)
    paths = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for (preset, op, variant, dtype, mode, dev), rs in groups.items():
        if not any(r["status"] == "ok" for r in rs):
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
        impls = list(dict.fromkeys(r["impl"] for r in rs))
        colors = _colors(impls)
        if len({r["tokens"] for r in rs}) > 1:
            _plot_sweep(ax_t, ax_m, rs, impls, colors)
        else:
            _plot_single(ax_t, ax_m, rs, impls, colors)
        for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak memory above inputs (MiB)")):
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if ax.lines or ax.patches:
                handles, labels = ax.get_legend_handles_labels()
                if handles:
                    ax.legend(fontsize=8)
            _log_if_wide(ax)
        shape = rs[0]
        fig.suptitle(f"{op} [{variant}] {mode} - {preset} Hs={shape['hs']} Ht={shape['ht']} V={shape['vocab']} "
                     f"{dtype} - {shape['device']}" + (f", threads={shape['threads']}" if dev == "cpu" else ""),
                     fontsize=9)
        paths.append(_save(fig, out_dir / f"{stamp}_{preset}_{op}-{variant}_{dtype}_{mode}_{dev}.png"))
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# end to end (bench/e2e.py): rows, table, plot
# ----------------------------------------------------------------------------------------------------------------------
E2E_COLUMNS = [
    # where and when
    "date", "commit", "device", "device_type", "threads", "torch", "triton", "transformers", "python",
    # what
    "step", "family", "student", "teacher", "vocab", "dtype", "batch", "prompt_len", "new_tokens", "pt_rows",
    "pt_len", "alpha", "impl", "backend",
    # results
    "status", "tokens", "median_ms", "p20_ms", "p80_ms", "min_ms", "max_ms", "reps", "tokens_per_s", "speedup",
    "peak_extra_mib", "mem_ratio", "mem_method", "value", "value_rel_diff", "notes",
]

_E2E_NOTES = {
    ("train", "fused"): "minillm_fast.distill.losses: ppo_terms + lm_terms (fused ops)",
    ("train", "materialised"): "fp32 logits of both models, log_softmax, every term from them, autograd",
    ("rollout", "fused"): "rollout.generate, KV caches, minillm_fast.mixture_sample",
    ("rollout", "materialised"): "rollout.generate, KV caches, full logits + softmax mixture + torch.multinomial",
}


def e2e_row(env: dict, spec: dict, res: dict) -> dict:
    """One CSV row of an end-to-end case from its spec (bench/e2e.py ``spec_of``) and its result (``run_case``)."""
    train = spec["step"] == "train"
    r = dict(env, step=spec["step"], family=spec["family"], vocab=spec["vocab"], dtype="float32", impl=spec["impl"],
             batch=spec["batch"] if train else spec["rollout_batch"], prompt_len=spec["prompt_len"],
             new_tokens=spec["new_tokens"], pt_rows=spec["pt_rows"] if train else "",
             pt_len=spec["pt_len"] if train else "", alpha="" if train else spec["alpha"],
             notes=_E2E_NOTES[(spec["step"], spec["impl"])] + (" (quick shapes)" if spec.get("quick") else ""))
    if res.get("status") != "ok":
        r.update(status=res.get("status", "error"), notes=res.get("error", "no result"))
        return r
    peak = res.get("peak_extra_bytes")
    r.update({k: res[k] for k in ("backend", "tokens", "student", "teacher", "median_ms", "p20_ms", "p80_ms",
                                  "min_ms", "max_ms", "reps", "tokens_per_s", "mem_method", "value")},
             status="ok", peak_extra_mib=peak / float(1 << 20) if _num(peak) else "")
    return r


def e2e_add_ratios(rows: list) -> None:
    """``speedup`` = tokens/s over the materialised implementation's, ``mem_ratio`` = peak extra memory over its,
    ``value_rel_diff`` (train) = |loss - its loss| / |its loss|; same step, model family, vocabulary and threads."""
    key = lambda r: (r["step"], r["family"], r["vocab"], r["threads"], r["device_type"], r["dtype"])  # noqa: E731
    base = {key(r): r for r in rows if r["impl"] == "materialised" and r["status"] == "ok"}
    for r in rows:
        b = base.get(key(r))
        if b is None or r["status"] != "ok":
            continue
        r["speedup"] = r["tokens_per_s"] / b["tokens_per_s"]
        if _num(r.get("peak_extra_mib")) and _num(b.get("peak_extra_mib")) and b["peak_extra_mib"] > 0:
            r["mem_ratio"] = r["peak_extra_mib"] / b["peak_extra_mib"]
        if r["step"] == "train" and _num(r.get("value")) and _num(b.get("value")) and b["value"] != 0:
            r["value_rel_diff"] = abs(r["value"] - b["value"]) / abs(b["value"])


def e2e_table(rows: list) -> str:
    """A Markdown table, one line per case."""
    out = ["| step | model | V | threads | impl | tokens/call | median ms (p20-p80) | tokens/s | x materialised "
           "| peak extra MiB | x materialised mem | check |", "| --- " * 12 + "|"]
    for r in rows:
        model = f"{r['family']} {r.get('student') or '?'} / {r.get('teacher') or '?'}"
        if r["status"] != "ok":
            out.append(f"| {r['step']} | {model} | {r['vocab']} | {r['threads']} | {r['impl']} | | | | | | | "
                       f"{r['status']}: {str(r.get('notes', ''))[:120]} |")
            continue
        if r["step"] == "train":
            check = f"loss {r['value']:.6g}"
            if r["impl"] != "materialised" and _num(r.get("value_rel_diff")):
                check += f" (rel. diff {r['value_rel_diff']:.1e})"
        else:
            check = f"mean log q(y) {r['value']:.3f}"
        backend = f" ({r['backend']})" if r["impl"] == "fused" else ""
        out.append(f"| {r['step']} | {model} | {r['vocab']} | {r['threads']} | {r['impl']}{backend} | {r['tokens']} "
                   f"| {r['median_ms']:.0f} ({r['p20_ms']:.0f}-{r['p80_ms']:.0f}) | {r['tokens_per_s']:.0f} "
                   f"| {_fmt(r.get('speedup'), '.2f')} | {_fmt(r.get('peak_extra_mib'), '.0f')} "
                   f"| {_fmt(r.get('mem_ratio'), '.2f')} | {check} |")
    return "\n".join(out)


def e2e_plot(rows: list, out_dir: Path, stamp: str) -> list:
    """One PNG per model family and device: tokens/s and peak extra memory against the vocabulary, one row of panels
    per step, one line per implementation (solid) and thread count (line style). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            groups[(r["family"], r["dtype"], r["device_type"])].append(r)
    paths = []
    out_dir.mkdir(parents=True, exist_ok=True)
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D"]
    for (family, dtype, dev), rs in groups.items():
        steps = [s for s in ("train", "rollout") if any(r["step"] == s for r in rs)]
        fig, axes = plt.subplots(len(steps), 2, figsize=(11, 3.8 * len(steps)), squeeze=False)
        impls = list(dict.fromkeys(r["impl"] for r in rs))
        threads = sorted({r["threads"] for r in rs}, key=lambda t: -t if isinstance(t, int) else 0)  # most first
        vocabs = sorted({r["vocab"] for r in rs})
        colors = _colors(impls)
        for row, step in zip(axes, steps):
            for impl in impls:
                for k, t in enumerate(threads):
                    pts = sorted((r["vocab"], r) for r in rs if r["step"] == step and r["impl"] == impl
                                 and r["threads"] == t)
                    if not pts:
                        continue
                    label = impl + (f", {t} thread{'s' if t != 1 else ''}" if len(threads) > 1 else "")
                    style = dict(color=colors[impl], linestyle=styles[k % len(styles)], marker=markers[k % 4],
                                 label=label)
                    row[0].plot([p[0] for p in pts], [p[1]["tokens_per_s"] for p in pts], **style)
                    mem = [(p[0], p[1]["peak_extra_mib"]) for p in pts if _num(p[1].get("peak_extra_mib"))]
                    row[1].plot([m[0] for m in mem], [m[1] for m in mem], **style)
            first = next(r for r in rs if r["step"] == step)
            title = (f"train step: {first['batch']} rollouts + {first['pt_rows']} corpus rows" if step == "train" else
                     f"rollout: {first['batch']} prompts x {first['new_tokens']} new tokens")
            for ax, ylabel in ((row[0], "tokens/s"), (row[1], "peak memory above models and inputs (MiB)")):
                ax.set_title(title, fontsize=9)
                ax.set_xlabel("vocabulary V")
                ax.set_ylabel(ylabel)
                ax.set_xscale("log")
                ax.set_xticks(vocabs)
                ax.set_xticklabels([str(v) for v in vocabs])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
                _log_if_wide(ax)
        first = rs[0]
        fig.suptitle(f"end to end - demo models ({family} student {first['student']}, teacher {first['teacher']}), "
                     f"{dtype} - {first['device']}", fontsize=9)
        paths.append(_save(fig, out_dir / f"{stamp}_e2e_{family}_{dtype}_{dev}.png"))
    return paths
