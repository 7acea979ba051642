#!/usr/bin/env bash
# Every CPU stage at M-BEIR size: wall time, peak RSS and disk per stage and pool size (see scale.py).
# Writes benchmarks/out/scale/scale.{csv,md}; working files (about 30 GB at 5.6M) go to
# benchmarks/out/scale/work and are deleted unless --keep. About 30 minutes for the default sizes.
# Usage: bash benchmarks/run_scale.sh [--sizes 1e5 1e6 5.6e6] [--queries 1000] [--keep] [--work-dir DIR] [--help]
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" scale "$@"
