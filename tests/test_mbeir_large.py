"""The paper settings (``configs_scripts/large/``) end to end on an M-BEIR-shaped root.

The root has M-BEIR's real folders and file names (``tests/mbeir_layout.py``: ten datasets, the 16
evaluation stems, MSCOCO's _test and _val pools, the up-sampled union train file with repeated
qids, train/val/test qrels). ``genius check-data`` must accept it as it is, and every stage of
``configs_scripts/large/`` must run on it through its own run script with size overrides only
(``--set``: a tiny CLIP-SF, a small quantizer and generator, few beams): paths, file lists,
pools and every training-compatibility setting come from the YAMLs unchanged. The native run is
then exported to the official checkpoint layout and evaluated again through
``run_eval_official.sh``, which must reproduce the native table.
"""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mbeir_layout import build_mbeir_root  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LARGE = REPO / "configs_scripts" / "large"

# Size overrides only: what makes each stage small enough for a CPU test.
SIZES = {
    "run_train_clip": ["model.name=clip-sf-tiny", "model.init_checkpoint=null", "optim.epochs=2", "optim.batch_size=16",
                       "optim.lr=0.002", "runtime.num_workers=0", "runtime.cpu_threads=1", "output.save_every_steps=0"],
    "run_extract": ["encoder.checkpoint=checkpoint/large/clip_sf/clip_sf.pt", "encoder.model=null",
                    "runtime.batch_size=32", "runtime.num_workers=0", "runtime.cpu_threads=1", "output.chunk_rows=64"],
    "run_train_rq": ["model.proj_dim=16", "model.hidden_dim=32", "model.num_levels=3", "model.codebook_size=8",
                     "train.batch_size=16", "train.epochs=2", "train.kmeans_iters=5", "train.kmeans_init_vectors=32",
                     "train.save_every=1", "train.cpu_threads=1"],
    "run_assign_codes": [],
    "run_train_gen": ["model.num_prefix=4", "model.d_model=32", "model.num_heads=2", "model.d_kv=16", "model.d_ff=64",
                      "model.num_decoder_layers=1", "model.code_embedding_scale=30", "optim.warmup_steps=2",
                      "train.epochs=2", "train.batch_size=16", "train.cpu_threads=1"],
    "run_eval": ["decoding.num_beams=5", "decoding.batch_size=16"],
}


def run(args: list[str], root: Path) -> str:
    env = {**os.environ, "GENIUS_ROOT": str(root), "GENIUS_LOG_LEVEL": "INFO"}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


def run_stage(name: str, root: Path, extra: list[str] = ()) -> str:
    overrides = [arg for value in [*SIZES.get(name, []), *extra] for arg in ("--set", value)]
    return run(["bash", str(LARGE / f"{name}.sh"), *overrides], root)


@pytest.fixture(scope="module")
def large_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("genius_root")
    layout = build_mbeir_root(root)
    logs = {"check-data": run([sys.executable, "-m", "genius.cli", "check-data", "--root", str(layout.root)], root)}
    for stage in SIZES:
        logs[stage] = run_stage(stage, root)
    # The native run in the released layout, where eval_official.yaml expects GENIUS_t5small.pth.
    logs["export"] = run([sys.executable, "-m", "genius.cli", "export-official",
                          "--rq", str(root / "checkpoint/large/rq/rq.pt"),
                          "--generator", str(root / "checkpoint/large/gen/generator.pt"),
                          "--out", str(root / "checkpoint")], root)
    logs["official"] = run_stage("run_eval_official", root, SIZES["run_eval"])
    return root, logs


@pytest.mark.slow
def test_check_data_accepts_the_mbeir_shaped_root(large_run):
    _, logs = large_run
    assert "OK:" in logs["check-data"]
    assert "repeated qids (up-sampling)" in logs["check-data"]


@pytest.mark.slow
def test_large_yamls_run_every_stage_on_mbeir(large_run):
    root, _ = large_run
    stores = root / "extracted_embed" / "CLIP_SF"
    pools = [line.split("- ", 1)[1].strip() for line in (LARGE / "assign_codes.yaml").read_text().splitlines()
             if line.strip().startswith("- mbeir_")]
    assert len(pools) == 17  # the 16 local pools and the union pool
    for pool in pools:
        assert (stores / "cand" / pool / "meta.json").is_file(), pool
        assert (root / "checkpoint/large/rq/codes" / pool / "codes.npy").is_file(), pool
    assert (stores / "train" / "mbeir_union_up_train" / "meta.json").is_file()
    assert (root / "checkpoint/large/rq/rq.pt").is_file() and (root / "checkpoint/large/gen/generator.pt").is_file()
    table = (root / "results/large/results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "%" not in line]
    # all 16 M-BEIR tasks, with the paper's numbers beside ours, for both pools
    for dataset in ("VisualNews", "MSCOCO", "Fashion200K", "WebQA", "EDIS", "NIGHTS", "OVEN", "InfoSeek",
                    "FashionIQ", "CIRR"):
        assert sum(dataset in row for row in rows) >= 2, dataset
    rows = list(csv.DictReader(io.StringIO((root / "results/large/results.tsv").read_text()), delimiter="\t"))
    evaluated = {(row["Dataset"], row["TaskID"]) for row in rows if row["Value"] and row["UnionValue"]}
    assert len(evaluated) == 16  # every file against its task-specific pool and the union pool


@pytest.mark.slow
def test_exported_run_evaluated_through_the_official_path_equals_the_native_run(large_run):
    root, _ = large_run
    native = (root / "results/large/results.tsv").read_text()
    official = (root / "results/large_official/results.tsv").read_text()
    assert native.count("\n") > 16 and official == native
