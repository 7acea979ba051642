"""Helpers the benchmarks share: machine description, timing, GEMM peak, CSV / Markdown / plot output.

Benchmarks import this as ``genius.benchmarks.common`` (``benchmarks/`` is a namespace folder of
the ``genius`` package in a source checkout), so they run as plain scripts with the project venv.
"""
from __future__ import annotations

import csv
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

OUT_DIR = Path(__file__).resolve().parent / "out"


# ---- the machine ------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> float:
    """1-minute load average (other engineers share the cores: read numbers next to it)."""
    return os.getloadavg()[0]


def available_memory_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return float("inf")


def machine_description() -> str:
    import transformers

    return (f"{cpu_model()}, {os.cpu_count()} logical cores (torch threads {torch.get_num_threads()}), "
            f"{available_memory_gb():.0f} GB RAM available at start, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, numpy {np.__version__}, Python {platform.python_version()}")


# ---- timing -----------------------------------------------------------------------------------
def best_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Fastest of ``repeats`` timed calls after ``warmup`` untimed ones.

    The minimum, not the mean: on cores shared with other jobs the noise only ever adds time,
    so the fastest run is the best estimate of what the code itself costs.
    """
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """This machine's square-GEMM throughput (torch.matmul, n x n x n) right now, in GFLOP/s."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, repeats) / 1e9


# ---- outputs ----------------------------------------------------------------------------------
def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({key: row.get(key, "") for key in columns} for row in rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def rate(value: float | None) -> str:
    """A throughput with about three significant digits ('' when not measured)."""
    if value is None or not math.isfinite(value):
        return ""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def plot_lines(path: Path, series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str,
               ylabel: str) -> None:
    """One line per series (x, y), log-log axes, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, (xs, ys) in series.items():
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
