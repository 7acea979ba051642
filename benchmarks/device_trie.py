"""One constrained-decoding step on the CPU: the C++ trie (numpy) against ``DeviceTrie`` (torch).

Per pool size N (random IDs of shape [3] + [4096] * 8, level 0 in {0, 1, 2}) and per level, the
time of one step over ``--rows`` beams (default 12,800 = 256 queries x 50 beams): the C++ trie's
``fill_mask`` into a preallocated numpy bool buffer + ``advance``, against ``DeviceTrie.allowed``
into a preallocated bool tensor (``out=``) + ``advance`` on CPU tensors. The beams' nodes are
those of walks from the root along stored IDs, so every row is live. Median of ``--repeats`` timings, the two tries interleaved so that load
from other jobs on the shared cores hits both alike; torch runs one thread (``--threads``), as
the C++ trie does. Also the build time (C++: from the codes; device: from the C++ trie) and the
bytes of both.

Writes ``device_trie.csv`` (one row per size and level, plus "walk", the sum over levels),
``device_trie_build.csv`` and ``device_trie.md`` to ``--out-dir``.

    .venv/bin/python benchmarks/device_trie.py [--sizes 1e4 1e5 1e6] [--rows 12800] [--repeats 5]
"""
from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from genius.benchmarks.common import OUT_DIR, load_average, machine_description, markdown_table, random_ids
from genius.common.io import atomic_write_text
from genius.models.generative_retriever.device_trie import DeviceTrie
from genius.trie_cpp import build_trie

SHAPE = [3] + [4096] * 8
STEP_COLUMNS = ["num_ids", "level", "kind", "width", "cpp_ms", "device_ms", "device_vs_cpp"]
BUILD_COLUMNS = ["num_ids", "distinct_ids", "cpp_build_s", "device_build_s", "cpp_mb", "device_mb", "device_kinds"]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(num_ids: int, rows: int, repeats: int) -> tuple[list[dict], dict]:
    codes = random_ids(num_ids, SHAPE)
    started = time.perf_counter()
    host = build_trie(codes, "cpp")
    cpp_build = time.perf_counter() - started
    started = time.perf_counter()
    device = DeviceTrie.from_trie(host, SHAPE)
    device_build = time.perf_counter() - started
    build = {"num_ids": num_ids, "distinct_ids": len(host), "cpp_build_s": cpp_build, "device_build_s": device_build,
             "cpp_mb": host.nbytes / 2**20, "device_mb": device.nbytes / 2**20,
             "device_kinds": " ".join(device.level_kinds())}

    targets = codes[np.random.default_rng(1).integers(0, num_ids, rows)]
    nodes = [np.zeros(rows, dtype=np.int64)]
    for level in range(len(SHAPE) - 1):
        nodes.append(host.advance(level, nodes[-1], targets[:, level]))
    buffer = np.zeros(rows * max(SHAPE), dtype=bool)
    device_buffer = torch.zeros(rows * max(SHAPE), dtype=torch.bool)
    steps = []
    for level, width in enumerate(SHAPE):
        mask, level_nodes, level_codes = buffer[: rows * width].reshape(rows, width), nodes[level], targets[:, level]
        device_nodes, device_codes = torch.from_numpy(level_nodes), torch.from_numpy(level_codes)
        device_mask = device_buffer[: rows * width].view(rows, width)

        def cpp_step():
            host.fill_mask(level, level_nodes, mask)
            host.advance(level, level_nodes, level_codes)

        def device_step():
            device.allowed(level, device_nodes, out=device_mask)
            device.advance(level, device_nodes, device_codes)

        cpp_step(), device_step()  # warm-up
        cpp_s, device_s = [], []
        for _ in range(repeats):
            cpp_s.append(timed(cpp_step))
            device_s.append(timed(device_step))
        steps.append({"num_ids": num_ids, "level": level, "kind": device.level_kinds()[level], "width": width,
                      "cpp_ms": 1e3 * statistics.median(cpp_s), "device_ms": 1e3 * statistics.median(device_s)})
    steps.append({"num_ids": num_ids, "level": "walk", "kind": "", "width": "",
                  "cpp_ms": sum(s["cpp_ms"] for s in steps), "device_ms": sum(s["device_ms"] for s in steps)})
    for step in steps:
        step["device_vs_cpp"] = step["device_ms"] / step["cpp_ms"]
    return steps, build


def csv_text(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: row.get(key, "") for key in columns} for row in rows)
    return out.getvalue()


def markdown(steps: list[dict], builds: list[dict], rows: int, repeats: int, command: str, load: float) -> str:
    step_table = markdown_table(
        ["IDs", "level", "device kind", "K", "C++ ms", "DeviceTrie ms", "DeviceTrie / C++ time"],
        [[f"{s['num_ids']:,}", s["level"], s["kind"], s["width"], f"{s['cpp_ms']:.2f}", f"{s['device_ms']:.2f}",
          f"{s['device_vs_cpp']:.2f}x"] for s in steps])
    build_table = markdown_table(
        ["IDs", "distinct", "C++ build s", "DeviceTrie build s", "C++ MB", "DeviceTrie MB", "DeviceTrie levels"],
        [[f"{b['num_ids']:,}", f"{b['distinct_ids']:,}", f"{b['cpp_build_s']:.2f}", f"{b['device_build_s']:.2f}",
          f"{b['cpp_mb']:.1f}", f"{b['device_mb']:.1f}", b["device_kinds"]] for b in builds])
    return (f"One decoding step (mask + advance) over {rows:,} rows, random IDs of shape [3] + [4096] * 8, on the "
            f"CPU; median of {repeats} interleaved repeats (ratio < 1: DeviceTrie faster). 1-minute load average "
            f"at the end: {load:.2f}.\nMachine: {machine_description()}.\nCommand: `{command}`\n\n"
            f"{step_table}\n{build_table}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6])
    parser.add_argument("--rows", type=int, default=256 * 50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeats < 1 or args.threads < 1 or min(args.sizes) < 1:
        parser.error("--sizes, --rows, --repeats and --threads must all be >= 1")
    torch.set_num_threads(args.threads)
    steps, builds = [], []
    for num_ids in sorted(int(n) for n in args.sizes):
        size_steps, build = measure(num_ids, args.rows, args.repeats)
        steps += size_steps
        builds.append(build)
        print(build, flush=True)
    command = "python benchmarks/device_trie.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(steps, builds, args.rows, args.repeats, command.strip(), load_average())
    atomic_write_text(args.out_dir / "device_trie.csv", csv_text(steps, STEP_COLUMNS))
    atomic_write_text(args.out_dir / "device_trie_build.csv", csv_text(builds, BUILD_COLUMNS))
    atomic_write_text(args.out_dir / "device_trie.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
