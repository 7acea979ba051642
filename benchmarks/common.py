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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from genius.common.cpu import fp32_products_in_onednn, onednn_fp32_on

OUT_DIR = Path(__file__).resolve().parent / "out"


# ---- the machine ------------------------------------------------------------------------------
def cpu_model() -> str:
    """The model name of /proc/cpuinfo, with the CPU family and model numbers (a VM may hide the name)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    name = fields.get("model name", platform.processor() or "unknown CPU")
    return f"{name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


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
    """This machine's square-GEMM throughput (torch.matmul, n x n x n) right now, in GFLOP/s. fp32:
    the faster of torch's default product (MKL) and oneDNN's where the project uses it (AMD CPUs
    with AVX-512, ``fp32_products_in_onednn``, about twice MKL's rate there), so that a share of
    this peak is a share of what the machine can do, not of one library's rate."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    seconds = best_seconds(lambda: a @ b, repeats)
    if dtype == torch.float32 and onednn_fp32_on():
        with fp32_products_in_onednn(torch.device("cpu")):
            seconds = min(seconds, best_seconds(lambda: a @ b, repeats))
    return 2 * n**3 / seconds / 1e9


def int8_gemm_gops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's square int8 GEMM throughput right now, in GOP/s: ``torch._int_mm`` on int8
    operands, the int8 decoder's product."""
    a8, b8 = torch.randint(-127, 128, (n, n), dtype=torch.int8), torch.randint(-127, 128, (n, n), dtype=torch.int8)
    return 2 * n**3 / best_seconds(lambda: torch._int_mm(a8, b8), repeats) / 1e9


# ---- data --------------------------------------------------------------------------------------
def random_ids(num_ids: int, codebook_sizes: Sequence[int], seed: int = 0) -> np.ndarray:
    """Random GENIUS-shaped IDs [N, L] int64: level l uniform in [0, codebook_sizes[l])
    (paper shape: [3] + [4096] * 8, a modality code then 8 semantic codes)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, k, num_ids) for k in codebook_sizes], axis=1).astype(np.int64)


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


def write_results(out: Path, title: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """``rows`` as ``out``.csv and, under ``title`` and the machine's description, as a Markdown
    table in ``out``.md (floats to three significant digits), both written atomically; the table
    is printed too."""
    from genius.common.io import atomic_path, atomic_write_text

    def cell(value):
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    table = markdown_table(columns, [[cell(row[column]) for column in columns] for row in rows])
    text = f"{title}; {machine_description()}\n\n{table}"
    with atomic_path(out.with_suffix(".csv")) as tmp:
        write_csv(tmp, rows, columns)
    atomic_write_text(out.with_suffix(".md"), text + "\n")
    print(text)


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

    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    for label, (xs, ys) in series.items():
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
