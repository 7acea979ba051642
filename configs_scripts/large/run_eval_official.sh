#!/usr/bin/env bash
# The released GENIUS checkpoint (checkpoint/GENIUS_t5small.pth) on M-BEIR: the codes of every pool
# with its embedded quantizer (assign_codes_official.yaml), then stage 3 at paper settings
# (eval_official.yaml; arguments go to the evaluation, e.g. --set decoding.batch_size=128).
# Needs run_extract.sh's features first. NPROC=N runs both steps in N processes.
set -euo pipefail
source "$(dirname "$0")/../common.sh"
run_stage genius.models.residual_quantization.assign_codes --config "$(dirname "$0")/assign_codes_official.yaml"
run_stage genius.models.generative_retriever.evaluate --config "$(dirname "$0")/eval_official.yaml" "$@"
