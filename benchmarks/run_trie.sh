#!/usr/bin/env bash
# Trie backend benchmark (build time, bytes per ID, decoding-step throughput); see benchmarks/trie.py.
# Writes benchmarks/out/trie.{csv,md}. Usage: bash benchmarks/run_trie.sh [--sizes 1e4 1e5 1e6 1e7] [--backends cpp python marisa] [--time-budget 120]
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" trie "$@"
