#!/usr/bin/env bash
# IRGen's setting vs the GENIUS-style setting vs dense on scikit-learn's real handwritten digits, every
# stage on CPU (see irgen_digits.py). Writes benchmarks/out/irgen_digits.{md,csv,json}; about 15-25
# minutes on 2 shared cores (finished stages are skipped on a re-run).
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" irgen_digits "$@"
