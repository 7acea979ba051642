#!/usr/bin/env bash
# Quickstart command 2: set everything up, then run the whole test suite.
# The tests run single-threaded, so pytest-xdist runs one worker per core, at most 4: tests/conftest.py
# keeps a file's tests, and those sharing the finished tiny root, on one worker, and that group (about
# 6 minutes) bounds the run, so more workers add memory, not speed. GENIUS_TEST_WORKERS=1 runs the
# tests in this process; extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO"
cores="$(nproc)"
workers="${GENIUS_TEST_WORKERS:-$((cores < 4 ? cores : 4))}"
if ! [[ "$workers" =~ ^[1-9][0-9]*$ ]]; then
    echo "[test] GENIUS_TEST_WORKERS must be a positive whole number, got '$workers'" >&2
    exit 2
fi
if [ "$workers" -gt 1 ]; then
    set -- -n "$workers" "$@"
fi
python -m pytest "$@"
