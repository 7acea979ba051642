#!/usr/bin/env bash
# Stage 3: constrained decoding and M-BEIR evaluation (GENIUS, GENIUS^R, dense CLIP-SF baseline).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
run_stage genius.models.generative_retriever.evaluate --config "$(dirname "$0")/eval.yaml" "$@"
