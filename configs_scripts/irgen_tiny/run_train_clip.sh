#!/usr/bin/env bash
# Stage 0: train the tiny image CLIP-SF from scratch on class-neighbour pairs (NPROC=N for N processes).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
run_stage genius.feature_extraction.train_clip --config "$(dirname "$0")/train_clip.yaml" "$@"
