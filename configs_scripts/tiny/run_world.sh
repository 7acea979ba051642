#!/usr/bin/env bash
# Write the synthetic M-BEIR-mini world this setting trains and evaluates on.
set -euo pipefail
source "$(dirname "$0")/../common.sh"
run_stage genius.synthetic.world --out worlds/tiny --size test --seed "${SEED:-0}" "$@"
