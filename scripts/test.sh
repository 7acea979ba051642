#!/usr/bin/env bash
# Quickstart command 2: set everything up, then run the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO"
python -m pytest "$@"
