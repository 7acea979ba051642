#!/usr/bin/env bash
# Stage 1: the pools' IDs (NPROC=N for N processes).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
run_stage genius.models.residual_quantization.assign_codes --config "$(dirname "$0")/assign_codes.yaml" "$@"
