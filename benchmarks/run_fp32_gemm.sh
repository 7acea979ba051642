#!/usr/bin/env bash
# fp32 products in MKL vs oneDNN at the decoder step's shapes (issue 19); see benchmarks/fp32_gemm.py.
# Writes benchmarks/out/fp32_gemm.{csv,md}.
# Usage: bash benchmarks/run_fp32_gemm.sh [--rows 3200] [--threads 2] [--repeats 10]
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" fp32_gemm "$@"
