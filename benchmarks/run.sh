#!/usr/bin/env bash
# Runs benchmarks/<name>.py from the repository root with the project's .venv Python ($PYTHON, else
# .venv/bin/python, else python3); the run_<name>.sh scripts beside it call this.
# Usage: bash benchmarks/run.sh <name> [its flags]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
name="$1"
shift
exec "$python" "benchmarks/$name.py" "$@"
