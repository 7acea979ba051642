#!/usr/bin/env bash
# Stage 0: embed the training, query and pool images (NPROC=N for N processes).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
run_stage genius.feature_extraction.extract --config "$(dirname "$0")/extract.yaml" "$@"
