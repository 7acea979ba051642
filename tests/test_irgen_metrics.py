"""IRGen in stage 3: a query's ``exclude_cand_list`` is never returned (GENIUS, GENIUS^R, dense),
IRGen's P@k / R@k (hit rate) / MAP@100 through ir_measures, its table, and the field in check-data.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from genius.common.check_data import check_root
from genius.common.config import ConfigError, load_config
from genius.common.mbeir import DataFormatError, load_queries
from genius.common.store import ARRAYS, EmbeddingStore, StoreArrays, store_path, write_store
from genius.models.generative_retriever.evaluate import EvalConfig, evaluate
from genius.models.generative_retriever.ir_metrics import IRGEN_MAP, IRGEN_MEASURES, per_query, ranked_run
from genius.models.generative_retriever.metrics import read_run_file

# pytest runs with --import-mode=importlib, which leaves tests/ off sys.path; the synthetic world
# and stand-in generator are test_evaluate's, the M-BEIR-shaped root mbeir_layout's.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mbeir_layout import build_mbeir_root  # noqa: E402
from test_evaluate import DATASET, ENCODER, SCENES, fake_models, make_world  # noqa: E402

QUERIES = "mbeir_shapes_task0_test"
POOL = "mbeir_shapes_task0_cand_pool"
METHODS = ("genius", "genius_r", "dense")


def _runs(cfg: EvalConfig) -> dict[str, dict[str, list[str]]]:
    return {m: ranked_run(Path(cfg.paths.results) / "runs" / POOL / QUERIES / f"{m}.run") for m in METHODS}


def _metric_learning_queries(cfg: EvalConfig) -> None:
    """Turn the caption -> image file into the metric-learning protocol: each query's own scene is
    in the gallery and excluded; its positive is the next scene. The query store is rewritten from
    the same vectors, since it records the query file it was made from."""
    data = Path(cfg.paths.data_root)
    queries = data / "query" / "test" / f"{QUERIES}.jsonl"
    rows = [json.loads(line) for line in queries.read_text().splitlines()]
    own = [r["pos_cand_list"][0] for r in rows]
    for i, row in enumerate(rows):
        row["pos_cand_list"], row["exclude_cand_list"] = [own[(i + 1) % len(own)]], [own[i]]
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "qrels" / "test" / f"{QUERIES}_qrels.txt").write_text(
        "".join(f"{r['qid']} 0 {r['pos_cand_list'][0]} 1 0\n" for r in rows))
    store = store_path(cfg.paths.stores_root, ENCODER, "test", queries)
    arrays = EmbeddingStore.open(store).arrays
    copied = StoreArrays(**{name: np.array(getattr(arrays, name)) for name in ARRAYS})
    write_store(store, copied, encoder=ENCODER, kind="query", source=queries)


# ---- exclusions ---------------------------------------------------------------------------------
def test_excluded_candidates_are_never_returned_and_the_next_ones_move_up(tmp_path):
    cfg = make_world(tmp_path)
    cfg.union = False
    cfg.extra_ks = [10]  # the plain ranking one place deeper than k = 5 plus the exclusion
    evaluate(cfg, fake_models(cfg))
    plain = _runs(cfg)
    own = {f"{DATASET}:{i + 1}": f"{DATASET}:{i + 1}" for i in range(SCENES)}  # qid -> its own scene's image
    # the excluded image would otherwise be returned, first by the dense and re-ranked searches
    for method in METHODS:
        assert np.mean([own[q] in plain[method][q][:5] for q in own]) > 0.6, method
    for method in ("genius_r", "dense"):
        assert np.mean([plain[method][q][0] == own[q] for q in own]) > 0.8, method

    _metric_learning_queries(cfg)
    cfg.extra_ks, cfg.paths.results = [], str(tmp_path / "excluded")
    evaluate(cfg, fake_models(cfg))
    excluded = _runs(cfg)
    for method in METHODS:
        for q in own:
            assert own[q] not in excluded[method][q], (method, q)
            assert excluded[method][q] == [d for d in plain[method][q] if d != own[q]][:5], (method, q)
    assert all(len(dids) == 5 for dids in excluded["dense"].values())  # k still returned: the pool holds 30
    assert all(len(dids) == 5 for dids in excluded["genius_r"].values())  # 4 beams' IDs hold >= 6 candidates
    # the other file has no exclusions: ranked as before
    for method in METHODS:
        rel = Path("runs") / "mbeir_shapes_task3_cand_pool" / "mbeir_shapes_task3_test" / f"{method}.run"
        before, after = ranked_run(tmp_path / "results" / rel), ranked_run(tmp_path / "excluded" / rel)
        assert after == {q: dids[:5] for q, dids in before.items()}, method


# ---- IRGen's metrics ---------------------------------------------------------------------------
QRELS = {"q1": {"a": 1, "b": 1, "c": 0}, "q2": {"x": 1}, "q3": {"y": 1, "z": 1, "u": 1}}
RUN = {"q1": ["c", "a", "d", "b"], "q2": ["w", "v"], "q3": ["z"]}  # q3's list is shorter than k = 2


def test_irgen_metrics_on_a_hand_computed_example():
    at = per_query(RUN, QRELS, [1, 2], IRGEN_MEASURES)
    mean = {key: np.mean([by_qid[q] for q in QRELS]) for key, by_qid in at.items()}
    # P@1: 0, 0, 1. P@2: 1/2, 0, and 1/2 for q3: its missing second place counts as not relevant
    assert at["P", 2] == {"q1": 0.5, "q2": 0.0, "q3": 0.5}
    assert mean["P", 1] == pytest.approx(1 / 3) and mean["P", 2] == pytest.approx(1 / 3)
    # R@k is the hit rate: any relevant in the top k
    assert at["R", 2] == {"q1": 1.0, "q2": 0.0, "q3": 1.0} and mean["R", 1] == pytest.approx(1 / 3)
    ap = per_query(RUN, QRELS, [100], IRGEN_MAP)["MAP", 100]
    # q1: relevant at ranks 2 and 4, (1/2 + 2/4) / 2; q3: 1/1 at rank 1 over its 3 relevant
    assert ap == pytest.approx({"q1": 0.5, "q2": 0.0, "q3": 1 / 3})
    assert np.mean(list(ap.values())) == pytest.approx((0.5 + 0 + 1 / 3) / 3)


def test_eval_writes_irgens_table_from_runs_deep_enough_for_map_at_100(tmp_path):
    cfg = make_world(tmp_path)
    cfg.union = False
    cfg.extra_ks = [1]
    cfg.report.metrics = "irgen"
    report = evaluate(cfg, fake_models(cfg))
    out = Path(cfg.paths.results)
    runs = read_run_file(out / "runs" / POOL / QUERIES / "dense.run")
    assert {len(entries) for entries in runs.values()} == {SCENES}  # ranked to depth 100: the whole pool

    table = (out / "irgen_table.md").read_text()
    assert table == report.irgen_table and table in (out / "results.md").read_text()
    lines = table.splitlines()
    header = "| Dataset | Task | Method | P@1 | P@10 | P@20 | P@30 | R@1 | R@10 | R@20 | R@30 | MAP@100 |"
    assert header in lines
    rows = [line.strip("| ").split(" | ") for line in lines if line.startswith("| shapes")]
    assert [r[2] for r in rows[:3]] == [report.names["dense"], "GENIUS", "GENIUS^R"] and len(rows) == 2 * 3
    assert all(len(r) == 12 and all(len(c.split(".")[1]) == 1 for c in r[3:]) for r in rows)  # %, one decimal

    # R@1 is the hit rate eval scores itself (every query has a qrels line), P@1 equals it here
    irgen = json.loads((out / "metrics.json").read_text())["irgen_metrics"]
    value = {(r["method"], r["query_file"], r["metric"], r["k"]): r["value"] for r in irgen}
    for r in report.results:
        if r.k == 1:
            assert value[r.method, r.query_file, "R", 1] == pytest.approx(r.value)
            assert value[r.method, r.query_file, "P", 1] == pytest.approx(r.value)
    tsv = (out / "irgen_metrics.tsv").read_text().splitlines()
    assert len(tsv) == 1 + 3 * 2 * 9 and any("\tMAP@100\t" in line for line in tsv)


def test_irgen_report_config_is_checked(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("paths: {rq_run: a, gen_run: b}\nrun_files: false\nreport: {metrics: irgen}\n")
    with pytest.raises(ConfigError, match="set run_files: true"):
        load_config(EvalConfig, path)
    path.write_text("paths: {rq_run: a, gen_run: b}\nreport: {metrics: trec}\n")
    with pytest.raises(ConfigError, match="'mbeir', 'irgen'"):
        load_config(EvalConfig, path)
    path.write_text("paths: {rq_run: a, gen_run: b}\nreport: {metrics: irgen, ks: []}\n")
    with pytest.raises(ConfigError, match=r"report.ks: empty; give the k of IRGen's P@k and R@k"):
        load_config(EvalConfig, path)
    cfg = make_world(tmp_path)
    cfg.report.ks = [1, 0]
    with pytest.raises(ValueError, match=r"report.ks\[1\]: 0 is out of range"):
        evaluate(cfg, fake_models(cfg))


# ---- the field in the data ---------------------------------------------------------------------
def test_check_data_accepts_exclusions_and_rejects_an_excluded_positive(tmp_path):
    root = build_mbeir_root(tmp_path).root
    rel = "query/test/mbeir_nights_task4_test.jsonl"
    path = root / rel
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    pool = [json.loads(line)["did"] for line in (root / "cand_pool/local/mbeir_nights_task4_cand_pool.jsonl")
            .read_text().splitlines()]
    other = next(did for did in pool if did not in rows[1]["pos_cand_list"])

    def write(exclude: list[str]) -> None:
        rows[1]["exclude_cand_list"] = exclude
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    write([other])
    assert check_root(root, decode_images=False).problems == []
    assert load_queries(path)[1].exclude == [other] and load_queries(path)[0].exclude == []

    write(["4:999999"])
    problems = check_root(root, decode_images=False).problems
    assert len(problems) == 1 and problems[0].startswith(f"{rel}:2: excluded candidate 4:999999 is not in the "
                                                         "candidate pool")
    positive = rows[1]["pos_cand_list"][0]
    write([positive])
    problems = check_root(root, decode_images=False).problems
    assert len(problems) == 1 and problems[0].startswith(f"{rel}:2: exclude_cand_list entry {positive} is also "
                                                         "in pos_cand_list")
    with pytest.raises(DataFormatError, match=rf"{path}:2: exclude_cand_list entry {positive} is also in"):
        load_queries(path)
