#!/usr/bin/env bash
# CUB-200-2011 under IRGen's protocol (checked in its code): the official image split, the 5,994
# train images as the database the stages train on and the queries search, the 5,794 test images
# as queries, every database image of the query's class relevant. Download CUB_200_2011.tgz from
# https://www.vision.caltech.edu/datasets/cub_200_2011/ and unpack it; CUB_DIR points at it.
set -euo pipefail
source "$(dirname "$0")/../common.sh"
root="${GENIUS_ROOT:-$GENIUS_REPO}"  # where the stages' relative paths resolve
CUB_DIR="${CUB_DIR:-$root/data/CUB_200_2011}"
if [ ! -f "$root/worlds/irgen_cub/import.json" ]; then
    mkdir -p "$root/worlds"
    awk 'NR==FNR {name[$1]=$2; next} {print name[$1], ($2==1 ? "train" : "test")}' \
        "$CUB_DIR/images.txt" "$CUB_DIR/train_test_split.txt" > "$root/worlds/cub_split.txt"
    run_stage genius.cli import-images --images "$CUB_DIR/images" --out "$root/worlds/irgen_cub" --name cub \
        --protocol image-split --list-file "$root/worlds/cub_split.txt" "$@"
fi
