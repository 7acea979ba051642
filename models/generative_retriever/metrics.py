"""UniIR's evaluation metric and TREC-style run files.

Recall@k here is UniIR's hit rate (trec_eval's ``success.k``): 1 when any relevant candidate is
in the top k, else 0, averaged over the queries of one (dataset, task) query file. A query with
no relevant candidate in the qrels counts as a miss, as in UniIR.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from genius.common.io import atomic_path
from genius.common.mbeir import Qrels, hash_did, hash_qid, unhash_did, unhash_qid


def relevant_sets(qids: np.ndarray, qrels: Qrels) -> list[set[int]]:
    """Hashed relevant dids for each hashed qid (empty set when the qrels do not list it)."""
    hashed = {hash_qid(q): {hash_did(d) for d in dids} for q, dids in qrels.relevant.items()}
    return [hashed.get(int(q), set()) for q in np.asarray(qids).tolist()]


def hits_at_k(retrieved: np.ndarray, relevant: list[set[int]], k: int) -> np.ndarray:
    """bool [Q]: whether any of the first k retrieved ids (hashed dids, -1 padding) is relevant."""
    retrieved = np.asarray(retrieved)
    if retrieved.ndim != 2 or len(retrieved) != len(relevant):
        raise ValueError(f"retrieved ids must be [Q, K] with Q = {len(relevant)} queries, got {retrieved.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top = retrieved[:, :k].tolist()
    return np.array([not rel.isdisjoint(row) for row, rel in zip(top, relevant)], dtype=bool)


def recall_at_k(retrieved: np.ndarray, relevant: list[set[int]], k: int) -> float:
    """UniIR Recall@k: the hit rate over queries."""
    hits = hits_at_k(retrieved, relevant, k)
    return float(hits.mean()) if len(hits) else float("nan")


def recall_by_task(retrieved: np.ndarray, relevant: list[set[int]], task_ids: np.ndarray,
                   ks: list[int]) -> dict[int, dict[int, float]]:
    """{task id: {k: Recall@k}}: UniIR groups a query file's scores by task id."""
    task_ids = np.asarray(task_ids)
    out: dict[int, dict[int, float]] = {}
    for task in sorted(set(task_ids.tolist())):
        rows = np.flatnonzero(task_ids == task)
        rel = [relevant[r] for r in rows]
        out[int(task)] = {k: recall_at_k(np.asarray(retrieved)[rows], rel, k) for k in ks}
    return out


# ---- run files ------------------------------------------------------------------------------
def write_run_file(path: str | os.PathLike, qids: np.ndarray, dids: np.ndarray, scores: np.ndarray, run_id: str,
                   task_ids: np.ndarray) -> None:
    """UniIR's TREC-style run file: ``qid Q0 did rank score run_id task_id`` (ranks from 1, padding skipped)."""
    if " " in run_id or not run_id:
        raise ValueError(f"run id {run_id!r} must be a non-empty word without spaces")
    dids, scores = np.asarray(dids), np.asarray(scores)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for qid, row_dids, row_scores, task in zip(np.asarray(qids).tolist(), dids.tolist(), scores.tolist(),
                                                   np.asarray(task_ids).tolist()):
            q = unhash_qid(qid)
            for rank, (did, score) in enumerate(((d, s) for d, s in zip(row_dids, row_scores) if d >= 0), 1):
                f.write(f"{q} Q0 {unhash_did(did)} {rank} {score:.6f} {run_id} {task}\n")


@dataclass(frozen=True)
class RunEntry:
    did: str
    rank: int
    score: float
    run_id: str
    task_id: int


def read_run_file(path: str | os.PathLike) -> dict[str, list[RunEntry]]:
    """qid -> its entries in rank order; a malformed line raises naming file and line."""
    runs: dict[str, list[RunEntry]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) != 7 or parts[1] != "Q0":
                raise ValueError(f"{path}:{lineno}: expected 'qid Q0 did rank score run_id task_id', got {line.strip()!r}")
            runs[parts[0]].append(RunEntry(parts[2], int(parts[3]), float(parts[4]), parts[5], int(parts[6])))
    for entries in runs.values():
        entries.sort(key=lambda e: e.rank)
    return dict(runs)
