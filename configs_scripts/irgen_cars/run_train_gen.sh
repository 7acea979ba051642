#!/usr/bin/env bash
# Stage 2: the decoder that reads the query image's tokens (NPROC=N for N processes).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
run_stage genius.models.generative_retriever.train --config "$(dirname "$0")/train_gen.yaml" "$@"
