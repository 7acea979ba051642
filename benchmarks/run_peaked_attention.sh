#!/usr/bin/env bash
# Decoding with peaked (trained-like) attention: subnormal probabilities and their flush; see
# benchmarks/peaked_attention.py. Writes benchmarks/out/peaked_attention.{csv,md}.
# Usage: bash benchmarks/run_peaked_attention.sh [--sharpness 1 10 30] [--head-sharpness 20] [--pool 1e5]
#        [--repeats 3]
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" peaked_attention "$@"
