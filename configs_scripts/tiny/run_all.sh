#!/usr/bin/env bash
# The whole pipeline for this setting, stage by stage. Each stage skips itself when its inputs
# and config did not change since its last complete run, so re-running is cheap.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
start=$(date +%s)
stage() {
    local name="$1"; shift
    local t0=$(date +%s)
    echo "==> $name"
    bash "$here/$name.sh" "$@"
    echo "    $name took $(( $(date +%s) - t0 )) s"
}
stage run_world
stage run_train_clip
stage run_extract
stage run_train_rq
stage run_assign_codes
stage run_train_gen
stage run_eval
echo "==> pipeline finished in $(( $(date +%s) - start )) s"
