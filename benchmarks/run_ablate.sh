#!/usr/bin/env bash
# Ablation grid on COCO captions (see ablate.py): each cell of benchmarks/ablation_grid.yaml runs coco_t2t.py on
# the validation split; --choose names the best cell, --final runs it once on the test split. Writes
# benchmarks/out/coco_t2t/ablate_<grid>/ablation.{md,csv,json}; several hours for the shipped grid (finished
# cells are skipped on a re-run, so a killed grid resumes).
# Usage: bash benchmarks/run_ablate.sh [--grid FILE] [--out-dir DIR] [--choose [METRIC ...]] [--final [--force]] [--help]
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" ablate "$@"
