"""Training curves as PNG next to each run (matplotlib is an optional extra; without it, no plot)."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from genius.common.io import atomic_path
from genius.common.stage import MetricsLog

log = logging.getLogger("genius.plots")
_AXES_KEYS = {"time", "epoch", "step", "epoch_summary", "seconds"}


def plot_training_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike, title: str) -> Path | None:
    """One panel per logged quantity: scalars (losses, lr, accuracies) per logged step, and
    per-level lists (perplexity, codes in use, level accuracy) as one line per level."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; no training curves for %s", metrics_path)
        return None
    records = MetricsLog(metrics_path, enabled=False).read()
    # Per-step records are plotted against the step; a quantity only logged once per epoch
    # (an epoch summary) against the epoch, so the two x scales never share a line.
    per_step = [r for r in records if "step" in r and not r.get("epoch_summary")]
    per_epoch = [r for r in records if r not in per_step]
    series: dict[str, list[tuple[int, float | list[float]]]] = {}
    x_label: dict[str, str] = {}
    for group, axis in ((per_step, "step"), (per_epoch, "epoch")):
        for index, record in enumerate(group):
            x = record.get(axis, index)
            for key, value in record.items():
                numeric = isinstance(value, (int, float)) or (
                    isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value))
                if key in _AXES_KEYS or not numeric:
                    continue
                name = key if axis == "step" or not any(key in r for r in per_step) else f"{key} (epoch mean)"
                series.setdefault(name, []).append((x, value))
                x_label[name] = axis
    if not series:
        return None
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (key, points) in zip(axes.flat, series.items()):
        xs = [p[0] for p in points]
        if isinstance(points[0][1], list):
            for level in range(len(points[0][1])):
                ax.plot(xs, [p[1][level] if level < len(p[1]) else math.nan for p in points], label=f"level {level}")
            ax.legend(fontsize=7)
        else:
            ax.plot(xs, [p[1] for p in points])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(x_label[key], fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return out_png
