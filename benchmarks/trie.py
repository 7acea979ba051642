"""Trie backends compared: build time, bytes per ID, and the decoding step's throughput.

IDs are random, shaped like GENIUS codes: 9 levels, a modality code in {0, 1, 2}, then 8 codes in
[0, 4096). One decoding step is ``fill_mask`` + ``advance`` over B = 12,800 rows (256 queries x
50 beams) with a [B, 4096] bool mask; step rows/s = B x 9 / (time of one 9-step walk from the
root along stored IDs), the median of three walks after one warm-up walk (which fills marisa's
node cache near the root, as the first batch of a real evaluation would).

Each (backend, size) runs in its own process, so one run's memory does not weigh on the next and
a run can be killed. A run is skipped, and the table says so, when its expected time or peak
memory exceeds the budget: time is extrapolated from the same backend's last two sizes (a power
law; linear from a single size), memory linearly. Results go to stdout and to
benchmarks/out/trie.{csv,md}.

    bash benchmarks/run_trie.sh [--sizes 1e4 1e5 1e6 1e7] [--backends cpp python marisa] [--time-budget 120]
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NUM_LEVELS, MODALITIES, CODEBOOK = 9, 3, 4096
BATCH = 256 * 50
TIME_BUDGET_S = 120.0  # default of --time-budget
MEMORY_SHARE = 0.8  # of the memory available when the benchmark starts
OUT_DIR = Path(__file__).resolve().parent / "out"
COLUMNS = ["backend", "num_ids", "distinct_ids", "build_s", "bytes_per_id", "step_rows_per_s",
           "peak_rss_mb", "total_s", "build_vs_cpp", "step_vs_cpp", "note"]


def random_codes(num_ids: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = np.empty((num_ids, NUM_LEVELS), dtype=np.int64)  # int64, like the stage-1 code files
    codes[:, 0] = rng.integers(0, MODALITIES, num_ids)
    codes[:, 1:] = rng.integers(0, CODEBOOK, (num_ids, NUM_LEVELS - 1))
    return codes


def walk_seconds(trie, targets: np.ndarray, mask: np.ndarray) -> float:
    """Time of one constrained walk from the root to the leaves of ``targets`` (stored IDs)."""
    start = time.perf_counter()
    nodes = np.zeros(len(targets), dtype=np.int64)
    for depth in range(NUM_LEVELS):
        trie.fill_mask(depth, nodes, mask)
        nodes = trie.advance(depth, nodes, targets[:, depth])
    elapsed = time.perf_counter() - start
    assert (nodes >= 0).all(), "a walk along stored IDs fell off the trie"
    return elapsed


def measure(backend: str, num_ids: int) -> dict:
    """One (backend, size) run, in this process."""
    from genius.trie_cpp import build_trie

    started = time.perf_counter()
    codes = random_codes(num_ids)
    t0 = time.perf_counter()
    trie = build_trie(codes, backend)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    mask = np.zeros((BATCH, CODEBOOK), dtype=bool)
    walks = [walk_seconds(trie, codes[rng.integers(0, num_ids, BATCH)], mask) for _ in range(4)]
    return {
        "backend": backend,
        "num_ids": num_ids,
        "distinct_ids": len(trie),
        "build_s": build_s,
        "bytes_per_id": trie.nbytes / num_ids,
        "step_rows_per_s": BATCH * NUM_LEVELS / statistics.median(walks[1:]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "total_s": time.perf_counter() - started,
    }


def run_isolated(backend: str, num_ids: int, kill_after_s: float) -> dict:
    cmd = [sys.executable, __file__, "--one", backend, str(num_ids)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=kill_after_s, check=True)
    except subprocess.TimeoutExpired:
        return {"backend": backend, "num_ids": num_ids, "note": f"killed after {kill_after_s:.0f} s"}
    except subprocess.CalledProcessError as err:
        return {"backend": backend, "num_ids": num_ids, "note": f"failed: {err.stderr.strip().splitlines()[-1]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def skip_reason(history: list[dict], num_ids: int, memory_mb: float, time_budget_s: float) -> str | None:
    """Why this run would blow the budget, judged from the same backend's runs at smaller sizes."""
    if not history:
        return None
    last = history[-1]
    if "total_s" not in last:
        return "skipped: the smaller size was not measured"
    # Walks cost about the same at any size, so total time grows slower than the number of IDs.
    exponent = 1.0
    if len(history) > 1 and "total_s" in history[-2]:
        growth = np.log(last["total_s"] / history[-2]["total_s"]) / np.log(last["num_ids"] / history[-2]["num_ids"])
        exponent = max(growth, 0.0)  # timing noise can make a tiny run look slower than a larger one
    scale = num_ids / last["num_ids"]
    expected_s = last["total_s"] * scale ** exponent
    if expected_s > time_budget_s:
        return f"skipped: ~{expected_s:.0f} s expected > {time_budget_s:.0f} s budget (--time-budget)"
    if last["peak_rss_mb"] * scale > memory_mb:
        return f"skipped: ~{last['peak_rss_mb'] * scale / 1024:.1f} GB expected > {memory_mb / 1024:.1f} GB budget"
    return None


def add_ratios(rows: list[dict]) -> None:
    cpp = {r["num_ids"]: r for r in rows if r["backend"] == "cpp" and "build_s" in r}
    for row in rows:
        ref = cpp.get(row["num_ids"])
        if ref and "build_s" in row:
            row["build_vs_cpp"] = row["build_s"] / ref["build_s"]
            row["step_vs_cpp"] = row["step_rows_per_s"] / ref["step_rows_per_s"]


def available_memory_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    formats = {"build_s": "{:.2f}", "bytes_per_id": "{:.1f}", "step_rows_per_s": "{:,.0f}", "peak_rss_mb": "{:,.0f}",
               "total_s": "{:.1f}", "build_vs_cpp": "{:.2f}x", "step_vs_cpp": "{:.3g}x", "num_ids": "{:,}",
               "distinct_ids": "{:,}"}
    return formats.get(key, "{}").format(value)


def markdown(rows: list[dict], command: str) -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    lines = [
        f"Trie backends, {NUM_LEVELS}-level random IDs (level 0 in [0, {MODALITIES}), others in [0, {CODEBOOK})); "
        f"step = fill_mask + advance over {BATCH:,} rows x {CODEBOOK} codes. Ratios are to cpp in this run "
        f"(build_vs_cpp: time, lower is faster; step_vs_cpp: throughput, higher is faster).",
        f"Machine: {cpu}, numpy {np.__version__}. Command: `{command}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cell(row, key) for key in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict], command: str) -> str:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(OUT_DIR / "trie.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: row.get(key, "") for key in COLUMNS} for row in rows)
    text = markdown(rows, command)
    (OUT_DIR / "trie.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--backends", nargs="+", default=["cpp", "python", "marisa"])
    parser.add_argument("--time-budget", type=float, default=TIME_BUDGET_S,
                        help="seconds a run may be expected to take (else skipped); killed at 2.5x")
    parser.add_argument("--one", nargs=2, metavar=("BACKEND", "NUM_IDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return
    memory_mb = available_memory_mb() * MEMORY_SHARE
    rows = []
    for num_ids in sorted(int(n) for n in args.sizes):
        for backend in args.backends:
            reason = skip_reason([r for r in rows if r["backend"] == backend], num_ids, memory_mb, args.time_budget)
            row = ({"backend": backend, "num_ids": num_ids, "note": reason} if reason
                   else run_isolated(backend, num_ids, 2.5 * args.time_budget))
            print(json.dumps(row), flush=True)
            rows.append(row)
    add_ratios(rows)
    command = "bash benchmarks/run_trie.sh " + " ".join(sys.argv[1:])
    print(write_outputs(rows, command.strip()))


if __name__ == "__main__":
    main()
