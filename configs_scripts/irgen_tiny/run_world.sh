#!/usr/bin/env bash
# The tiny IRGen world: synthetic class-labelled images (one folder per class), imported as an
# M-BEIR-layout image->image root with the holdout protocol (a fifth of each class queries the rest).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
root="${GENIUS_ROOT:-$GENIUS_REPO}"  # where the stages' relative paths resolve
if [ ! -f "$root/worlds/irgen_tiny/import.json" ]; then
    run_stage genius.synthetic.class_images --out "$root/worlds/irgen_tiny_images" --classes 12 --per-class 30 --size 32 --seed "${SEED:-0}"
    run_stage genius.cli import-images --images "$root/worlds/irgen_tiny_images" --out "$root/worlds/irgen_tiny" --name classes \
        --protocol holdout --query-fraction 0.2 --seed "${SEED:-0}" "$@"
fi
