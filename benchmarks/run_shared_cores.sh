#!/usr/bin/env bash
# Stage times of the demo pipeline on shared cores: quiet and under 3 CPU-bound processes, with the
# thread policy and with 1 and 2 pinned threads (see shared_cores.py). Works in its own GENIUS_ROOT,
# benchmarks/out/shared_cores/work; writes benchmarks/out/shared_cores/shared_cores.{csv,md}.
# About 40 minutes on 2 cores for every stage (--stages train_rq,train_gen: about 10).
# Usage: bash benchmarks/run_shared_cores.sh [--stages train_rq,train_gen] [--modes auto,1,2] [--repeats 1] [--help]
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" shared_cores "$@"
