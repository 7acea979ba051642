#!/usr/bin/env bash
# Stage 1: IRGen's tokenizer (classification objective, no modality level) (NPROC=N for N processes).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
run_stage genius.models.residual_quantization.train --config "$(dirname "$0")/train_rq.yaml" "$@"
