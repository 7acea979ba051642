#!/usr/bin/env bash
# Stage 1: discrete IDs and collision statistics for every candidate pool.
set -euo pipefail
source "$(dirname "$0")/../common.sh"
run_stage genius.models.residual_quantization.assign_codes --config "$(dirname "$0")/assign_codes.yaml" "$@"
