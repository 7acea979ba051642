#!/usr/bin/env bash
# Stage 0: fine-tune OpenAI's CLIP ViT-B/16 on class-neighbour pairs (the dense baseline) (NPROC=N for N processes).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
run_stage genius.feature_extraction.train_clip --config "$(dirname "$0")/train_clip.yaml" "$@"
