#!/usr/bin/env bash
# Stage 3: beam 30 under the trie; P@K, R@K (hit rate), MAP@100 (NPROC=N for N processes).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
run_stage genius.models.generative_retriever.evaluate --config "$(dirname "$0")/eval.yaml" "$@"
