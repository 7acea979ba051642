#!/usr/bin/env bash
# Real text-to-text retrieval on COCO captions: dense MiniLM vs GENIUS vs GENIUS^R, trained end to end on CPU
# (see coco_t2t.py). Writes benchmarks/out/coco_t2t/coco_t2t_<split>.{md,csv,json,png}; about 20-30 minutes on
# 2 shared cores (the caption embeddings are cached, finished stages are skipped on a re-run).
# --pool full: the pool is every caption of the 5,000 images but the queries (~25,000) instead of the held-out ones.
# Usage: bash benchmarks/run_coco_t2t.sh [--split test|val] [--pool heldout|full] [--levels 4 --codebook 256] [--beams 100] [--captions FILE] [--help]
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" coco_t2t "$@"
