"""UniIR Recall@k, TREC run files, the result TSV, the paper-layout Markdown tables and the chart."""
from __future__ import annotations

import numpy as np
import pytest

from genius.common.mbeir import Qrels, hash_did, hash_qid
from genius.models.generative_retriever import paper_numbers
from genius.models.generative_retriever.metrics import (
    hits_at_k,
    read_run_file,
    recall_at_k,
    recall_by_task,
    relevant_sets,
    write_run_file,
)
from genius.models.generative_retriever.tables import (
    DecodeStats,
    RecallResult,
    decode_table,
    markdown_report,
    plot_recall_by_task,
    recall_table,
    results_tsv,
)

D = 10_000_000  # hashed did = dataset * D + index


def test_recall_is_a_hit_rate_per_query():
    # q0: hit at rank 2; q1: two relevant, one at rank 4; q2: relevant never retrieved;
    # q3: no qrels at all (a miss, as in UniIR); q4: padding only.
    retrieved = np.array([[1, 2, 3, 4, 5], [7, 8, 9, 11, 12], [1, 2, 3, 4, 5], [1, 2, -1, -1, -1], [-1] * 5])
    relevant = [{2}, {11, 99}, {42}, set(), {1}]
    np.testing.assert_array_equal(hits_at_k(retrieved, relevant, 1), [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(hits_at_k(retrieved, relevant, 2), [1, 0, 0, 0, 0])
    assert recall_at_k(retrieved, relevant, 5) == pytest.approx(2 / 5)
    assert recall_at_k(retrieved, relevant, 3) == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="Q = 5"):
        hits_at_k(retrieved[:3], relevant, 1)


def test_recall_grouped_by_task_and_relevant_sets_from_qrels():
    qrels = Qrels({"20:1": {"20:5"}, "20:2": {"20:6", "20:7"}, "20:3": {"20:8"}},
                  {"20:1": 0, "20:2": 0, "20:3": 3})
    qids = np.array([hash_qid("20:1"), hash_qid("20:2"), hash_qid("20:3"), hash_qid("20:4")])
    relevant = relevant_sets(qids, qrels)
    assert relevant == [{hash_did("20:5")}, {hash_did("20:6"), hash_did("20:7")}, {hash_did("20:8")}, set()]
    retrieved = np.array([[hash_did("20:5"), 0], [0, hash_did("20:7")], [0, 0], [0, 0]])
    by_task = recall_by_task(retrieved, relevant, np.array([0, 0, 3, 0]), [1, 2])
    assert by_task == {0: {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}, 3: {1: 0.0, 2: 0.0}}


def test_run_file_format(tmp_path):
    path = tmp_path / "runs" / "genius.run"
    qids = np.array([hash_qid("9:1"), hash_qid("9:22")])
    dids = np.array([[hash_did("9:5"), hash_did("9:7"), -1], [hash_did("9:3"), -1, -1]])
    scores = np.array([[0.9, 0.5, -np.inf], [0.25, -np.inf, -np.inf]], dtype=np.float32)
    write_run_file(path, qids, dids, scores, "genius", np.array([0, 3]))
    assert path.read_text().splitlines() == [
        "9:1 Q0 9:5 1 0.900000 genius 0",
        "9:1 Q0 9:7 2 0.500000 genius 0",
        "9:22 Q0 9:3 1 0.250000 genius 3",
    ]
    runs = read_run_file(path)
    assert [e.did for e in runs["9:1"]] == ["9:5", "9:7"] and runs["9:22"][0].task_id == 3
    with pytest.raises(ValueError, match="run id"):
        write_run_file(path, qids, dids, scores, "two words", np.array([0, 3]))
    (tmp_path / "bad.run").write_text("9:1 9:5 1 0.9 x 0\n")
    with pytest.raises(ValueError, match="bad.run:1"):
        read_run_file(tmp_path / "bad.run")


def result(method, kind, qfile, dataset, task, value, k=5, reported=True, mbeir=True):
    pool = "mbeir_union_test_cand_pool" if kind == "universal" else f"{qfile}_cand_pool"
    return RecallResult(method, kind, pool, f"{qfile}_test", dataset, task, "test", k, value, reported, mbeir)


def test_results_tsv_puts_union_beside_local():
    rows = [result("genius", "task-specific", "mbeir_mscoco_task0", "mscoco", 0, 0.71234),
            result("genius", "universal", "mbeir_mscoco_task0", "mscoco", 0, 0.70001),
            result("genius", "task-specific", "mbeir_mscoco_task0", "mscoco", 0, 0.8, k=10, reported=False)]
    lines = [line.split("\t") for line in results_tsv(rows).splitlines()]
    assert lines[0] == ["Model", "TaskID", "Task", "Dataset", "Split", "Metric", "CandPool", "Value",
                        "UnionPool", "UnionValue"]
    assert lines[1] == ["GENIUS", "0", "T→I", "mscoco", "test", "HitRate@5 (UniIR's Recall@5)",
                        "mbeir_mscoco_task0_cand_pool", "0.7123",
                        "mbeir_union_test_cand_pool", "0.7000"]
    assert lines[2][5:] == ["HitRate@10 (UniIR's Recall@10)", "mbeir_mscoco_task0_cand_pool", "0.8000", "", ""]


def test_markdown_table_in_paper_layout_with_paper_numbers():
    rows = []
    for method, values in (("dense", (0.80, 0.90)), ("genius", (0.50, 0.70)), ("genius_r", (0.60, 0.85))):
        # listed in the opposite of the paper's order on purpose
        rows.append(result(method, "universal", "mbeir_mscoco_task3", "mscoco", 3, values[1]))
        rows.append(result(method, "universal", "mbeir_mscoco_task0", "mscoco", 0, values[0]))
    rows.append(result("genius", "universal", "mbeir_mscoco_task0", "mscoco", 0, 0.99, k=10, reported=False))
    table = recall_table(rows, "universal")
    lines = table.splitlines()
    assert lines[0] == "### Universal pool: hit rate (UniIR's Recall@k), %"
    assert lines[2] == ("| Task | Dataset | Metric | Dense CLIP-SF | GENIUS | GENIUS^R | paper CLIP-SF | paper GENIUS "
                        "| paper GENIUS^R |")
    assert lines[4] == "| T→I | MSCOCO | HitRate@5 | 80.0 | 50.0 | 60.0 | 77.9 | 55.1 | 68.0 |"
    assert lines[5] == "| I→T | MSCOCO | HitRate@5 | 90.0 | 70.0 | 85.0 | 92.3 | 82.7 | 90.6 |"
    assert lines[6] == "|  | **Average** |  | **85.0** | **60.0** | **72.5** | 85.1 | 68.9 | 79.3 |"
    assert recall_table(rows, "task-specific") == ""


def test_the_average_row_is_the_mean_of_the_rows_as_printed():
    """As the papers average their printed rows (UniIR's 50.57 -> 50.6): rows shown as 10.1, 10.1
    and 10.0 average 10.07, printed 10.1; the unrounded values (10.051, 10.051, 10.0) average
    10.034, which would print 10.0."""
    rows = [result("genius", "universal", f"mbeir_shapes{i}_task0", f"shapes{i}", 0, value, mbeir=False)
            for i, value in enumerate((0.10051, 0.10051, 0.1))]
    lines = recall_table(rows, "universal").splitlines()
    assert [line.split(" | ")[3] for line in lines[4:7]] == ["10.1 |", "10.1 |", "10.0 |"]
    assert lines[7] == "|  | **Average** |  | **10.1** |"


def test_markdown_without_paper_numbers_for_other_datasets_and_decode_table():
    rows = [result("genius", "task-specific", "mbeir_shapesnews_task0", "shapesnews", 0, 0.25, mbeir=False),
            result("genius", "task-specific", "mbeir_shapesedit_task7", "shapesedit", 7, 0.5, mbeir=False)]
    table = recall_table(rows, "task-specific")
    assert "paper" not in table
    assert "| T→I | shapesnews | HitRate@5 | 25.0 |" in table and "| (I,T)→I | shapesedit | HitRate@5 | 50.0 |" in table
    assert "| **37.5** |" in table
    stats = [DecodeStats("universal", "union", "mbeir_shapesnews_task0_test", 40, 2.0, False, 12.0, 30.5, 1.0)]
    assert stats[0].queries_per_second == 20.0
    assert "| union | mbeir_shapesnews_task0_test | 40 | 2.00 | 20.0 | 12.0 | 30.5 | 100.0% |" in decode_table(stats)
    report = markdown_report(rows, stats, "tiny")
    assert report.startswith("## tiny") and "### Task-specific pools" in report and "### Decoding" in report


def test_recall_chart(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [result(m, kind, "mbeir_mscoco_task0", "mscoco", 0, 0.5) for m in ("dense", "genius", "genius_r")
            for kind in ("universal", "task-specific")]
    assert plot_recall_by_task(rows, tmp_path / "recall.png")
    assert (tmp_path / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paper_numbers_are_complete_and_consistent():
    for kind in ("universal", "task-specific"):
        for method in paper_numbers.METHODS:
            values = [paper_numbers.paper_recall(kind, method, d, t) for d, t in paper_numbers.PAPER_ORDER]
            assert None not in values and len(values) == 16
    # UniIR's local averages recompute exactly from the 16 values (docs: 50.57 -> 50.6, 46.76 -> 46.8)
    for method, average in paper_numbers.PUBLISHED_AVERAGE["task-specific"].items():
        mean = np.mean([paper_numbers.paper_recall("task-specific", method, d, t) for d, t in paper_numbers.PAPER_ORDER])
        assert round(mean, 1) == average
    assert paper_numbers.paper_recall("universal", "GENIUS", "fashioniq", 7) == 18.9
    assert paper_numbers.paper_recall("universal", "GENIUS", "shapesnews", 0) is None
    assert paper_numbers.default_k("fashion200k") == paper_numbers.default_k("fashioniq") == 10
    assert paper_numbers.default_k("mscoco") == 5
