#!/usr/bin/env bash
# In-shop Clothes Retrieval (DeepFashion): its own partition list. The 25,882 train images are the
# training data, the 14,218 query images search the 12,612 gallery images, and the gallery images
# of the query's item are relevant. INSHOP_DIR is the folder that Eval/list_eval_partition.txt's
# image names (img/...) are under. IRGen trained its In-shop decoder on train and gallery images
# together ("trainval" in its code); this protocol trains on the train images only.
set -euo pipefail
source "$(dirname "$0")/../common.sh"
root="${GENIUS_ROOT:-$GENIUS_REPO}"  # where the stages' relative paths resolve
INSHOP_DIR="${INSHOP_DIR:-$root/data/inshop}"
if [ ! -f "$root/worlds/irgen_inshop/import.json" ]; then
    run_stage genius.cli import-images --images "$INSHOP_DIR" --out "$root/worlds/irgen_inshop" --name inshop \
        --protocol inshop --list-file "$INSHOP_DIR/Eval/list_eval_partition.txt" "$@"
fi
