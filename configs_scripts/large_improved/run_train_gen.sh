#!/usr/bin/env bash
# Stage 2: train the T5 ID generator on the frozen stage-1 codes (NPROC=N for N processes).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
run_stage genius.models.generative_retriever.train --config "$(dirname "$0")/train_gen.yaml" "$@"
