#!/usr/bin/env bash
# The whole pipeline for this setting, stage by stage (each skips itself when up to date).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../common.sh"
run_pipeline "$here" run_world run_train_clip run_extract run_train_rq run_assign_codes run_train_gen run_eval
