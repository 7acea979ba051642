"""The tiny IRGen setting end to end (configs_scripts/irgen_tiny/run_all.sh): synthetic class
images imported with the holdout protocol, a CLIP-SF trained from scratch, IRGen's tokenizer
(classification objective, no modality level), the decoder reading the query image's tokens,
beam 30 under the trie, and IRGen's metrics from ir_measures. It must learn: P@10 of the
generated IDs at least 5x chance, and the tokenizer's first code a class predictor far above
chance."""
from __future__ import annotations

import json
import os
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from genius.common.mbeir import hash_did

REPO = Path(__file__).resolve().parent.parent
SETTING = REPO / "configs_scripts" / "irgen_tiny"
POOL = "mbeir_classes_task4_cand_pool"


@pytest.fixture(scope="module")
def irgen_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("irgen_tiny_root")
    env = {**os.environ, "GENIUS_ROOT": str(root), "GENIUS_LOG_LEVEL": "INFO"}
    result = subprocess.run(["bash", str(SETTING / "run_all.sh")], env=env, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return root


def irgen_metric(root: Path, method: str, metric: str, k: int) -> float:
    rows = json.loads((root / "results" / "irgen_tiny" / "metrics.json").read_text())["irgen_metrics"]
    (value,) = [r["value"] for r in rows if (r["method"], r["metric"], r["k"]) == (method, metric, k)]
    return value


def chance_precision(root: Path) -> float:
    """The expected precision of a random ranking: the mean share of the pool relevant to a query."""
    world = root / "worlds" / "irgen_tiny"
    pool_size = sum(1 for _ in open(world / "cand_pool" / "local" / f"{POOL}.jsonl"))
    queries = [json.loads(line) for line in open(world / "query" / "test" / "mbeir_classes_task4_test.jsonl")]
    return float(np.mean([len(q["pos_cand_list"]) for q in queries])) / pool_size


def test_the_generated_ids_retrieve_the_querys_class(irgen_root):
    chance = chance_precision(irgen_root)
    p10 = irgen_metric(irgen_root, "genius", "P", 10)
    assert p10 >= 5 * chance, f"P@10 {p10:.3f} is below 5x chance ({chance:.3f})"
    # the hit rate and MAP@100 come out of the same run files and agree with it
    assert irgen_metric(irgen_root, "genius", "R", 10) >= p10
    assert 0 < irgen_metric(irgen_root, "genius", "MAP", 100) <= 1
    table = (irgen_root / "results" / "irgen_tiny" / "irgen_table.md").read_text()
    assert "P@10" in table and "MAP@100" in table and "GENIUS^R" in table


def test_the_tokenizers_first_code_predicts_the_class(irgen_root):
    """IRGen's tokenizer on the database: every level is a semantic level (no modality code),
    and the first code alone names the class far above chance."""
    codes_dir = irgen_root / "checkpoint" / "irgen_tiny" / "rq" / "codes" / POOL
    codes, ids = np.load(codes_dir / "codes.npy"), np.load(codes_dir / "ids.npy")
    assert json.loads((codes_dir / "stats.json").read_text())["codebook_sizes"] == [16, 16, 16]
    world = irgen_root / "worlds" / "irgen_tiny"
    class_of = {}
    for line in open(world / "cand_pool" / "local" / f"{POOL}.jsonl"):
        record = json.loads(line)
        class_of[hash_did(record["did"])] = Path(record["img_path"]).parent.name  # class-per-folder
    classes = [class_of[int(i)] for i in ids]
    members = defaultdict(list)
    for first, label in zip(codes[:, 0].tolist(), classes):
        members[first].append(label)
    purity = sum(Counter(labels).most_common(1)[0][1] for labels in members.values()) / len(classes)
    chance = max(Counter(classes).values()) / len(classes)  # always answering the largest class
    assert purity >= 0.6 and purity >= 5 * chance, f"first-code class purity {purity:.2f}, chance {chance:.2f}"


def test_the_digits_benchmarks_diagnosis_agrees_with_eval(irgen_root):
    """benchmarks/irgen_digits.py's diagnosis, run on this setting: its top-1 shares are eval's
    P@1 (read from the same run files), its shares are shares."""
    from genius.benchmarks.irgen_digits import Setting, diagnose

    setting = Setting("worlds/irgen_tiny", "classes", "results/irgen_tiny", "checkpoint/irgen_tiny/rq/codes")
    found = diagnose(setting, irgen_root)
    assert found["queries"] == 72
    assert found["generated_top1_in_class"] == pytest.approx(irgen_metric(irgen_root, "genius", "P", 1))
    assert found["dense_top1_in_class"] == pytest.approx(irgen_metric(irgen_root, "dense", "P", 1))
    assert 1 / 12 < found["first_code_purity"] <= 1 and 0 <= found["first_step_in_class"] <= 1


def test_the_python_api_searches_an_irgen_run_with_image_queries(irgen_root):
    """``Retriever.load`` on the finished IRGen run: an image query is read by the decoder's own
    vision tower and returns eval's GENIUS ranking for that query."""
    from genius.api import Retriever
    from genius.benchmarks.irgen_digits import read_run
    from genius.common.config import project_root_set_to

    world = irgen_root / "worlds" / "irgen_tiny"
    run = read_run(irgen_root / "results" / "irgen_tiny" / "runs" / POOL / "mbeir_classes_task4_test" / "genius.run")
    queries = [json.loads(line) for line in open(world / "query" / "test" / "mbeir_classes_task4_test.jsonl")][:8]
    with project_root_set_to(irgen_root):
        retriever = Retriever.load(irgen_root / "results" / "irgen_tiny")
        found = [[hit.id for hit in retriever.search(image=world / q["query_img_path"], k=10, method="genius")]
                 for q in queries]
    assert found == [run[q["qid"]][:10] for q in queries]


@pytest.mark.parametrize("setting, ks", [("irgen_cub", [1, 2, 4, 8]), ("irgen_cars", [1, 2, 4, 8]),
                                         ("irgen_inshop", [1, 10, 20, 30])])
def test_the_paper_settings_hold_irgens_values_and_pass_their_checks(setting, ks):
    """The GPU settings nobody can run here: every YAML loads strictly and passes its stage's
    range and cross-field checks, with IRGen's published setting (train_ar.py / test_ar.py)."""
    from genius.common.config import load_config
    from genius.feature_extraction import train_clip
    from genius.feature_extraction.extract import ExtractConfig
    from genius.models.generative_retriever import evaluate as eval_stage
    from genius.models.generative_retriever import train as train_gen
    from genius.models.residual_quantization import train as train_rq

    folder = REPO / "configs_scripts" / setting
    clip = load_config(train_clip.TrainClipConfig, folder / "train_clip.yaml")
    train_clip.check_config(clip)
    assert clip.model.name == "ViT-B-16-quickgelu" and clip.loss.mask_all_positives
    load_config(ExtractConfig, folder / "extract.yaml")
    rq = load_config(train_rq.RQTrainConfig, folder / "train_rq.yaml")
    train_rq.check_config(rq)
    assert (rq.model.modality_level, rq.model.num_levels, rq.model.codebook_size, rq.train.objective) == \
        (False, 4, 256, "classification")
    gen = load_config(train_gen.TrainGenConfig, folder / "train_gen.yaml")
    train_gen.check_config(gen)
    assert (gen.model.condition, gen.model.d_model, gen.model.num_heads, gen.model.num_decoder_layers) == \
        ("image_tokens", 768, 12, 12)
    assert (gen.optim.lr, gen.optim.betas, gen.optim.weight_decay) == (8e-5, [0.9, 0.96], 0.05)
    assert (gen.optim.label_smoothing, gen.optim.vision_lr_scale, gen.train.batch_size, gen.train.epochs) == \
        (0.1, 0.01, 64, 400)
    assert not gen.mixing.enabled
    ev = load_config(eval_stage.EvalConfig, folder / "eval.yaml")
    ev.check_numbers()
    ev.validate()
    assert (ev.decoding.num_beams, ev.report.metrics, ev.report.ks) == (30, "irgen", ks)
    assert gen.model.vision_checkpoint == clip.output.run_dir + "/clip_sf.pt"
    assert rq.data.encoder == gen.data.encoder == ev.paths.encoder
