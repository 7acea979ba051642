"""How long a living index's full trie rebuild takes: the C++ trie built over N random IDs of the
paper's shape (a modality level of 3 codes, then 8 levels of 4096), saved, at 10^6 and 10^7 IDs.

``genius index add`` and ``remove`` rebuild the trie over all codes of the new version; this
measures that cost (the build from the codes array, and the save), one process, one thread.

    python -m genius.benchmarks.index_trie_build [--sizes 1000000 10000000]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import genius.trie_cpp as trie_lib

SHAPE = [3] + [4096] * 8


def random_codes(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, k, n, dtype=np.int64) for k in SHAPE], axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="index_trie_build", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    args = parser.parse_args(argv)
    print(f"{'IDs':>12} {'build s':>9} {'save s':>8} {'MiB':>8}")
    for n in args.sizes:
        codes = random_codes(n)
        start = time.perf_counter()
        trie = trie_lib.build_trie(codes, "cpp")
        built = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            trie.save(Path(tmp) / "trie.bin")
            saved = time.perf_counter()
        print(f"{n:>12,} {built - start:>9.2f} {saved - built:>8.2f} {trie.nbytes / 2**20:>8.1f}", flush=True)
        del trie, codes
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
