#!/usr/bin/env bash
# Real data: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes), written as
# one folder per digit (32-px PNGs, nearest-neighbour upscaling) and imported like any collection
# with the holdout protocol: a seeded fifth of each digit's images are the test queries, the rest
# is the database the stages train on and the queries search. Fixed before any test number was seen.
set -euo pipefail
source "$(dirname "$0")/../common.sh"
root="${GENIUS_ROOT:-$GENIUS_REPO}"  # where the stages' relative paths resolve
if [ ! -f "$root/worlds/irgen_digits/import.json" ]; then
    "$GENIUS_PYTHON" -c "from genius.common.image_collections import write_sklearn_digits; write_sklearn_digits('$root/worlds/digits_images', size=32)"
    run_stage genius.cli import-images --images "$root/worlds/digits_images" --out "$root/worlds/irgen_digits" --name digits \
        --protocol holdout --query-fraction 0.2 --seed 0 "$@"
fi
