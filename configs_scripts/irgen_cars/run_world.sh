#!/usr/bin/env bash
# Cars196 under IRGen's protocol (checked in its code): the official image split, the 8,144
# train images as the database the stages train on and the queries search, the 8,041 test images
# as queries, every database image of the query's class relevant. Cars196 comes as two flat
# folders whose file names collide: arrange it class-per-folder with a split list first, with the
# recipe in `genius import-images --help` (README "IRGen"); CARS_DIR and CARS_SPLIT point at them.
set -euo pipefail
source "$(dirname "$0")/../common.sh"
root="${GENIUS_ROOT:-$GENIUS_REPO}"  # where the stages' relative paths resolve
CARS_DIR="${CARS_DIR:-$root/data/cars196}"
CARS_SPLIT="${CARS_SPLIT:-$root/data/cars_split.txt}"
if [ ! -f "$root/worlds/irgen_cars/import.json" ]; then
    run_stage genius.cli import-images --images "$CARS_DIR" --out "$root/worlds/irgen_cars" --name cars \
        --protocol image-split --list-file "$CARS_SPLIT" "$@"
fi
