#!/usr/bin/env bash
# Quickstart command 1: set everything up, then run the embedded demo end to end.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO"
bash configs_scripts/demo/run_all.sh "$@"
