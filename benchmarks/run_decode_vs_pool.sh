#!/usr/bin/env bash
# Queries/s against pool size: GENIUS decoding vs generate + Python trie vs dense vs faiss (see decode_vs_pool.py).
# Writes benchmarks/out/decode_vs_pool.{csv,md,png} and _summary.json. Defaults: paper-size generator,
# pool sizes 1e3..1e7; about 20 minutes on 2 shared cores.
# Usage: bash benchmarks/run_decode_vs_pool.sh [--sizes 1e3 1e4 1e5 1e6 1e7] [--methods genius generate ...] [--help]
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" decode_vs_pool "$@"
