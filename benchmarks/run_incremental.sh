#!/usr/bin/env bash
# A living index on real COCO captions (text to text, MiniLM): train on images A, index B, add C that no stage
# has seen, remove 100; Recall@1/5/10 on B's and C's queries against a full retrain (see incremental.py).
# Writes benchmarks/out/incremental.{md,json}; about 15 minutes on 2 shared cores (finished stages are skipped
# on a re-run).
# Usage: bash benchmarks/run_incremental.sh [--train-images 1500 --initial-images 500 --added-images 500] [--help]
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" incremental "$@"
