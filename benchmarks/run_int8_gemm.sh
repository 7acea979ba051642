#!/usr/bin/env bash
# int8 vs fp32 on the decoder step's GEMMs (issue 19's remaining lever); see benchmarks/int8_gemm.py.
# Writes benchmarks/out/int8_gemm.{csv,md}. Usage: bash benchmarks/run_int8_gemm.sh [--rows 800] [--threads 1] [--repeats 20]
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" int8_gemm "$@"
