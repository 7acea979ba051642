"""Standard IR metrics (ir_measures) beside UniIR's hit rate, and the TREC qrels export."""
from __future__ import annotations

import csv
import io
import json
import math
import subprocess
from pathlib import Path

import ir_measures
import numpy as np
import pytest
from ir_measures import AP, RR, P, R, Success, nDCG

from genius.cli import main as genius_main
from genius.common.mbeir import hash_did, hash_qid, load_qrels
from genius.models.generative_retriever.ir_metrics import (
    GradedQrels,
    IRResult,
    ir_table,
    per_query,
    ranked_run,
    score_pair,
    write_trec_qrels,
)
from genius.models.generative_retriever.metrics import recall_at_k, write_run_file
from genius.models.generative_retriever.positives import PoolPositives
from genius.models.generative_retriever.tables import RecallResult, results_tsv

# M-BEIR qrels: qid 0 did relevance task_id. Graded: 9:10 is worth 2, 9:11 worth 1; 9:12 is judged
# not relevant. 9:4 has only a relevance-0 line; 9:5 has no line at all.
QRELS = """9:1 0 9:10 2 0
9:1 0 9:11 1 0
9:1 0 9:12 0 0
9:2 0 9:20 3 0
9:3 0 9:30 1 0
9:4 0 9:40 0 0
9:6 0 9:60 1 3
"""
RUN = {"9:1": ["9:12", "9:10", "9:13", "9:11", "9:14"],  # relevant at ranks 2 (grade 2) and 4 (grade 1)
       "9:2": ["9:20", "9:21", "9:22"],  # its one relevant at rank 1, three candidates only
       "9:4": ["9:40"],
       "9:5": ["9:50"]}  # 9:3 retrieved nothing

L2 = math.log2
# 9:1's nDCG, linear gains over log2(rank + 1); the ideal ranking is grade 2 then grade 1:
IDCG_1 = 2 / L2(2) + 1 / L2(3)
NDCG_1 = {3: (2 / L2(3)) / IDCG_1, 5: (2 / L2(3) + 1 / L2(5)) / IDCG_1}
# Averaged over 9:1, 9:2, 9:3 and 9:4 (9:3 and 9:4 score 0; 9:5 has no qrels line, so it is not
# evaluated), each sum listing 9:1 then 9:2:
EXPECTED = {
    ("Recall", 3): (1 / 2 + 1) / 4,  # 9:1 has 1 of its 2 relevant in the top 3
    ("Recall", 5): (2 / 2 + 1) / 4,
    ("P", 3): (1 / 3 + 1 / 3) / 4,
    ("P", 5): (2 / 5 + 1 / 5) / 4,  # trec_eval divides by k even when fewer were retrieved
    ("MAP", 3): ((1 / 2) / 2 + 1) / 4,  # precision at rank 2 is 1/2, over 2 relevant judged
    ("MAP", 5): ((1 / 2 + 2 / 4) / 2 + 1) / 4,  # rank 4 adds precision 2/4
    ("nDCG", 3): (NDCG_1[3] + 1) / 4,  # = (0.4796 + 1) / 4; binary gains would give 0.3869 for 9:1
    ("nDCG", 5): (NDCG_1[5] + 1) / 4,
    ("MRR", 3): (1 / 2 + 1) / 4,
    ("MRR", 5): (1 / 2 + 1) / 4,
}


@pytest.fixture
def qrels_file(tmp_path):
    path = tmp_path / "mbeir_x_task0_test_qrels.txt"
    path.write_text(QRELS)
    return path


def like(k=3) -> RecallResult:
    return RecallResult("genius", "task-specific", "pool", "qfile", "x", 0, "test", k, 0.0, True, False)


def test_each_metric_on_a_hand_computed_graded_example(qrels_file):
    qrels = GradedQrels.read(qrels_file)
    assert qrels.grades["9:1"] == {"9:10": 2, "9:11": 1, "9:12": 0} and qrels.task_of["9:6"] == 3
    task0 = {q: g for q, g in qrels.grades.items() if qrels.task_of[q] == 0}
    values = per_query(RUN, task0, [3, 5])
    assert set(values) == set(EXPECTED)
    for key, expected in EXPECTED.items():
        assert set(values[key]) == {"9:1", "9:2", "9:3", "9:4"}, key
        assert np.mean(list(values[key].values())) == pytest.approx(expected, abs=1e-9), key
    assert values["nDCG", 3]["9:1"] == pytest.approx(0.4796249, abs=1e-6)


def test_a_repeated_qrels_pair_keeps_its_highest_grade_as_the_hit_rate_does(tmp_path):
    """A (qid, did) listed as relevant and again as not: relevant for every measure, whichever
    line comes last (the hit rate's load_qrels counts any line above 0)."""
    path = tmp_path / "qrels.txt"
    path.write_text("9:1 0 9:10 1 0\n9:1 0 9:10 0 0\n9:1 0 9:11 0 0\n9:1 0 9:11 2 0\n")
    assert GradedQrels.read(path).grades["9:1"] == {"9:10": 1, "9:11": 2}
    assert load_qrels(path).relevant["9:1"] == {"9:10", "9:11"}


def test_score_pair_groups_by_task_and_leaves_out_excluded_queries(tmp_path, qrels_file):
    qids = ["9:1", "9:2", "9:3", "9:4", "9:5", "9:6"]
    dids = [[hash_did(d) for d in RUN.get(q, [])] + [-1] * (5 - len(RUN.get(q, []))) for q in qids]
    dids[5] = [hash_did("9:61"), hash_did("9:60"), -1, -1, -1]  # 9:6 (task 3): relevant at rank 2
    scores = np.where(np.array(dids) >= 0, -np.arange(5.0), -np.inf)
    run = tmp_path / "genius.run"
    write_run_file(run, np.array([hash_qid(q) for q in qids]), np.array(dids), scores, "genius",
                   np.array([0, 0, 0, 0, 0, 3]))
    hashed = np.array([hash_qid(q) for q in qids])
    out = score_pair({"genius": run}, GradedQrels.read(qrels_file), hashed, PoolPositives("pool", "qfile", "keep"),
                     like(), [3, 5], reported_k=5)
    value = {(r.task_id, r.metric, r.k): r.value for r in out}
    assert value[0, "nDCG", 3] == pytest.approx(EXPECTED["nDCG", 3])
    assert value[3, "MRR", 5] == 0.5 and value[3, "Recall", 3] == 1.0
    assert {r.queries for r in out if r.task_id == 0} == {4} and all(r.reported == (r.k == 5) for r in out)
    # the exclude setting: 9:2 left out of the scores, and 9:11 (not in the pool) out of 9:1's recall
    pool = np.sort(np.array([hash_did(d) for d in ("9:10", "9:12", "9:13", "9:14", "9:20", "9:30", "9:40")]))
    excluded = score_pair({"genius": run}, GradedQrels.read(qrels_file), hashed,
                          PoolPositives("pool", "qfile", "exclude", excluded_qids={"9:2", "9:6"}), like(), [3], 3,
                          sorted_pool_ids=pool)
    value = {(r.task_id, r.metric): r.value for r in excluded}
    assert value[0, "Recall"] == pytest.approx((1 + 0 + 0) / 3) and 3 not in {r.task_id for r in excluded}


def test_rank_order_is_scored_even_where_scores_tie(tmp_path, qrels_file):
    # The candidates of one generated ID share GENIUS's score; whichever way trec_eval would break
    # the tie, each query's relevant candidate is at rank 1 of the run we wrote.
    # Sorting by document id puts "9:10" before "9:9" but "9:19" before "9:20", so either direction
    # moves one of them to rank 2.
    run = tmp_path / "genius.run"
    dids = np.array([[hash_did("9:10"), hash_did("9:9")], [hash_did("9:20"), hash_did("9:19")]])
    write_run_file(run, np.array([hash_qid("9:1"), hash_qid("9:2")]), dids, np.full((2, 2), 0.5), "genius",
                   np.array([0, 0]))
    grades = {q: g for q, g in GradedQrels.read(qrels_file).grades.items() if q in ("9:1", "9:2")}
    values = per_query(ranked_run(run), grades, [1])
    assert values["P", 1] == {"9:1": 1.0, "9:2": 1.0} and values["MRR", 1] == {"9:1": 1.0, "9:2": 1.0}


# The README's line that turns a run file into trec_eval's input: the rank becomes the score.
TREC_EVAL_LINE = "awk '{print $1, $2, $3, $4, -$4, $6}'"


def test_the_readmes_trec_eval_line_keeps_the_rank_order_where_scores_tie(tmp_path, qrels_file):
    """trec_eval re-sorts a run by score and breaks ties by document id: on the run files' own
    scores (tied within a generated ID) it would score another ranking than results.tsv's."""
    assert TREC_EVAL_LINE in (Path(__file__).resolve().parent.parent / "README.md").read_text()
    run = tmp_path / "genius.run"  # each query's relevant candidate first, tied with one other
    dids = np.array([[hash_did("9:10"), hash_did("9:9")], [hash_did("9:20"), hash_did("9:19")]])
    write_run_file(run, np.array([hash_qid("9:1"), hash_qid("9:2")]), dids, np.full((2, 2), 0.5), "genius",
                   np.array([0, 0]))
    trec_qrels = tmp_path / "qrels.trec"
    write_trec_qrels([qrels_file], trec_qrels)
    program = TREC_EVAL_LINE.split("'")[1]
    converted = subprocess.run(["awk", program, str(run)], capture_output=True, text=True, check=True).stdout
    six_columns = "".join(" ".join(line.split()[:6]) + "\n" for line in run.read_text().splitlines())
    qrels = [q for q in ir_measures.read_trec_qrels(str(trec_qrels)) if q.query_id in ("9:1", "9:2")]
    success = {name: ir_measures.calc_aggregate([Success @ 1], qrels,
                                                list(ir_measures.read_trec_run(text)))[Success @ 1]
               for name, text in (("converted", converted), ("as written", six_columns))}
    assert success == {"converted": 1.0, "as written": 0.5}  # the hit rate at 1 is 1.0 for both queries


def test_values_equal_the_librarys_own_on_a_run_file_and_exported_qrels(tmp_path, qrels_file):
    rng = np.random.default_rng(0)
    qids = [f"9:{q}" for q in range(1, 41)]
    qrels_text = "".join(f"{q} 0 9:{d} {g} 0\n" for q in qids for d, g in zip(rng.choice(30, 3, replace=False),
                                                                                 rng.integers(0, 4, 3)))
    qrels_path = tmp_path / "qrels.txt"
    qrels_path.write_text(qrels_text)
    dids = np.array([[hash_did(f"9:{d}") for d in rng.choice(30, 10, replace=False)] for _ in qids])
    scores = np.sort(rng.random(dids.shape), axis=1)[:, ::-1]  # distinct and falling: no tie to break
    run = tmp_path / "runs" / "dense.run"
    write_run_file(run, np.array([hash_qid(q) for q in qids]), dids, scores, "dense", np.zeros(len(qids), int))
    ks = [1, 5, 10]
    ours = score_pair({"dense": run}, GradedQrels.read(qrels_path), np.array([hash_qid(q) for q in qids]),
                      PoolPositives("pool", "qfile", "keep"), like(5), ks, 5)
    trec_qrels = tmp_path / "trec_qrels.txt"
    write_trec_qrels([qrels_path], trec_qrels)
    # UniIR's run files add a seventh column (the task id); TREC tools read the first six
    six_columns = "".join(" ".join(line.split()[:6]) + "\n" for line in run.read_text().splitlines())
    theirs = ir_measures.calc_aggregate([m @ k for m in (R, P, AP, nDCG, RR) for k in ks],
                                        list(ir_measures.read_trec_qrels(str(trec_qrels))),
                                        list(ir_measures.read_trec_run(six_columns)))
    name = {"Recall": R, "P": P, "MAP": AP, "nDCG": nDCG, "MRR": RR}
    assert len(ours) == 5 * len(ks)
    for r in ours:
        assert r.value == pytest.approx(theirs[name[r.metric] @ r.k], abs=1e-12), r.label
    assert {r.value for r in ours if r.metric == "nDCG"} != {0.0}


def test_trec_qrels_export_round_trip(tmp_path, qrels_file, capsys):
    out = tmp_path / "trec" / "qrels.trec"
    assert genius_main(["export-qrels", "--qrels", str(qrels_file), "--out", str(out)]) == 0
    assert "7 qrels lines" in capsys.readouterr().out
    assert out.read_text().splitlines()[:2] == ["9:1 0 9:10 2", "9:1 0 9:11 1"]
    back: dict[str, dict[str, int]] = {}
    for qrel in ir_measures.read_trec_qrels(str(out)):
        back.setdefault(qrel.query_id, {})[qrel.doc_id] = qrel.relevance
    assert back == GradedQrels.read(qrels_file).grades
    (tmp_path / "bad_qrels.txt").write_text("9:1 0 9:10 two 0\n")
    with pytest.raises(SystemExit) as exit_:
        genius_main(["export-qrels", "--qrels", str(tmp_path / "bad_qrels.txt"), "--out", str(out)])
    assert exit_.value.code == 2
    assert "bad_qrels.txt:1" in capsys.readouterr().err


def test_hit_rate_keeps_its_definition_and_gets_its_label():
    rows = [RecallResult("dense", "task-specific", "p", "q", "x", 0, "test", 5, 0.75, True, False)]
    line = results_tsv(rows).splitlines()[1].split("\t")
    assert line[5] == "HitRate@5 (UniIR's Recall@5)"
    ir = [IRResult("dense", "task-specific", "p", "q", "x", 0, "test", m, 5, 0.5, 4, True) for m in ("Recall", "nDCG")]
    assert [row.split("\t")[5] for row in results_tsv(ir, label=lambda r: r.label).splitlines()[1:]] == \
        ["Recall@5", "nDCG@5"]
    # two relevant, one retrieved: a hit for UniIR, half the relevant for trec_eval
    retrieved = np.array([[hash_did("9:10"), hash_did("9:13")]])
    assert recall_at_k(retrieved, [{hash_did("9:10"), hash_did("9:11")}], 2) == 1.0


def test_ir_table_shows_the_reported_k():
    rows = [IRResult("genius", "universal", "u", "q", "x", 0, "test", m, k, 0.25, 4, k == 5)
            for m in ("Recall", "P", "MAP", "nDCG", "MRR") for k in (1, 5)]
    table = ir_table(rows)
    assert "#### Universal pool" in table and "| Task | Dataset | Method | k | Recall@k | P@k |" in table
    assert "| T→I | x | GENIUS | 5 | 25.0 | 25.0 | 25.0 | 25.0 | 25.0 |" in table
    assert "| 1 |" not in table and ir_table([]) == ""


@pytest.mark.slow
def test_finished_eval_writes_the_standard_metrics(finished_tiny_root):
    results = finished_tiny_root / "results/tiny"
    metrics = json.loads((results / "metrics.json").read_text())
    assert set(metrics["ir_metrics"]["library"]) == {"ir-measures", "pytrec-eval-terrier"}
    ir = {(r["method"], r["pool"], r["query_file"], r["task_id"], r["metric"], r["k"]): r
          for r in metrics["ir_metrics"]["results"]}
    hit = {(r["method"], r["pool"], r["query_file"], r["task_id"], r["k"]): r["value"] for r in metrics["recall"]}
    assert {key[:4] + (key[5],) for key in ir} == set(hit)
    assert {key[4] for key in ir} == {"Recall", "P", "MAP", "nDCG", "MRR"}
    for (method, pool, qfile, task, metric, k), r in ir.items():
        # each metric is 0 for a query without a relevant candidate in the top k, at most 1 otherwise
        assert 0 <= r["value"] <= hit[method, pool, qfile, task, k] + 1e-12, (method, pool, qfile, metric, k)
    # T→I queries have one positive each in the tiny world: true recall is then the hit rate
    qrels = load_qrels(finished_tiny_root / "worlds/tiny/qrels/test/mbeir_shapesnews_task0_test_qrels.txt")
    assert {len(dids) for dids in qrels.relevant.values()} == {1}
    for (method, pool, qfile, task, metric, k), r in ir.items():
        if qfile == "mbeir_shapesnews_task0_test" and metric == "Recall":
            assert r["value"] == pytest.approx(hit[method, pool, qfile, task, k], abs=1e-12)
    rows = list(csv.DictReader(io.StringIO((results / "ir_metrics.tsv").read_text()), delimiter="\t"))
    assert {row["Metric"] for row in rows} >= {"Recall@5", "P@5", "MAP@5", "nDCG@5", "MRR@5"}
    assert all(row["Value"] and row["UnionValue"] for row in rows)
    assert "### Standard IR metrics" in (results / "results.md").read_text()
    assert "HitRate@5 (UniIR's Recall@5)" in (results / "results.tsv").read_text()
