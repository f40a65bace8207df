"""PNG plots of a run's metrics JSONL: one figure per key prefix (``train``, ``eval``, ``rollout``, ``time``), one
panel per metric, x = optimiser step."""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict


def read_metrics(path) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` ([] when there is none); a line that is not JSON (the torn last line
    of a run killed mid-write) is skipped, as a resumed run drops it (distill/faults.py)."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def plot_metrics(metrics_path: str, out_dir: str) -> list[str]:
    """Write ``<out_dir>/<prefix>.png`` for each prefix; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(lambda: defaultdict(list))
    for rec in read_metrics(metrics_path):
        step = rec.get("step")
        for key, value in rec.items():
            if key == "step" or "/" not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            prefix = key.split("/", 1)[0]
            series[prefix][key].append((step, value))
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for prefix, keys in sorted(series.items()):
        n = len(keys)
        cols = min(3, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
        for ax, (key, points) in zip(axes.flat, sorted(keys.items())):
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
