"""Standard IR metrics beside UniIR's hit rate, computed by ir_measures from the run files and qrels.

UniIR's "Recall@k" is a hit rate (``metrics.py``); users comparing with other IR work need what
trec_eval, pyserini and ranx report. ir_measures computes it with trec_eval's own C code
(pytrec-eval-terrier), MRR with MS MARCO's implementation. Its conventions, which we keep:

- relevance >= 1 is relevant; nDCG@k gains are the relevance grades (trec_eval's ``ndcg_cut``:
  linear gain, log2 discount, ideal ranking from every judged grade of the query);
- Recall@k = relevant in the top k / relevant judged; P@k = relevant in the top k / k;
  MAP@k = trec_eval's ``map_cut``: the precision at each relevant rank <= k, summed, / relevant
  judged; MRR@k = 1 / rank of the first relevant within k, else 0;
- a query with a qrels line is averaged even when the run returned nothing for it (it scores 0,
  trec_eval's ``-c``), and so is one whose lines all have relevance 0; a query without any qrels
  line is not evaluated (trec_eval), where the hit rate counts it as a miss.

``genius export-qrels`` writes M-BEIR qrels as plain TREC qrels, so trec_eval and the like can be
run on ``results/<setting>/runs/`` directly.

IRGen's table (eval's ``report.metrics: irgen``; Zhang et al., ECCV 2024) comes from the same run
files through the same library, with these definitions:

- P@k = relevant in the top k / k: a list shorter than k counts its missing places as not relevant;
- R@k is the metric-learning papers' Recall@k, a hit rate (ir_measures ``Success@k``, trec_eval's
  ``success``): 1 when any relevant candidate is in the top k; *not* ir_measures' ``R@k`` recall;
- MAP@100 = trec_eval's ``map_cut_100`` (ir_measures ``AP@100``): the precision at each relevant
  rank <= 100, summed, divided by *all* the query's relevant candidates (not min(R, 100)).

IRGen's own script (yakt00/IRGen ``test_ar.py`` with ``utils/evaluate.py``) differs: its "rank@k" is
the same hit rate, but its mAP is the trapezoid-interpolated AP of the Oxford/Paris benchmarks over
the returned beam list, divided by min(relevant, 10), and its precision at k divides by the rank of
the last relevant candidate instead of k when every relevant one is returned above k. Numbers here
therefore match the paper's R@k and are comparable but not identical for P@k and MAP@100.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import ir_measures
import numpy as np
from ir_measures import AP, RR, P, R, Success, nDCG

from genius.common.io import atomic_path
from genius.common.mbeir import hash_did, qrels_lines, unhash_qid
from genius.common.stage import ArgumentParser, add_debug_flag, user_errors_exit
from genius.models.generative_retriever.metrics import read_run_file
from genius.models.generative_retriever.paper_numbers import DISPLAY_NAME, paper_rank
from genius.models.generative_retriever.positives import PoolPositives
from genius.models.generative_retriever.tables import (
    METHOD_COLUMNS, POOL_TITLES, TASK_LABEL, Names, RecallResult, method_names,
)

# our name -> ir_measures measure (taken @k)
MEASURES = {"Recall": R, "P": P, "MAP": AP, "nDCG": nDCG, "MRR": RR}
# IRGen's columns (module docstring): P and R (the hit rate) at the configured ks, MAP at one depth
IRGEN_MEASURES = {"P": P, "R": Success}
IRGEN_MAP = {"MAP": AP}
IRGEN_MAP_DEPTH = 100


@dataclass(frozen=True)
class GradedQrels:
    grades: dict[str, dict[str, int]]  # qid -> did -> relevance, every judged line (0 included)
    task_of: dict[str, int]  # qid -> task id

    @classmethod
    def read(cls, path: str | os.PathLike) -> "GradedQrels":
        """M-BEIR qrels (``qid 0 did relevance task_id``); a repeated (qid, did) keeps its highest
        grade, so a candidate is relevant here when the hit rate (any line > 0) counts it relevant
        (genius check-data reports such repeats)."""
        grades: dict[str, dict[str, int]] = defaultdict(dict)
        task_of = {}
        for _, qid, did, rel, task in qrels_lines(path):
            grades[qid][did], task_of[qid] = max(rel, grades[qid].get(did, rel)), task
        return cls(dict(grades), task_of)


@dataclass(frozen=True)
class IRResult:
    """One metric at one k of one method on one (query file, task) against one pool."""

    method: str  # key of METHOD_COLUMNS
    pool_kind: str
    pool: str
    query_file: str
    dataset: str
    task_id: int
    split: str
    metric: str  # key of the measures it was computed with (MEASURES, IRGEN_MEASURES or IRGEN_MAP)
    k: int
    value: float
    queries: int  # how many queries the value averages
    reported: bool  # the k the paper reports for this query file

    @property
    def label(self) -> str:
        return f"{self.metric}@{self.k}"


def library_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("ir-measures", "pytrec-eval-terrier")}


def ranked_run(path: str | os.PathLike) -> dict[str, list[str]]:
    """qid -> dids in the run file's rank order."""
    return {qid: [e.did for e in entries] for qid, entries in read_run_file(path).items()}


def per_query(run: dict[str, list[str]], qrels: dict[str, dict[str, int]], ks: list[int],
              measures: dict = MEASURES) -> dict[tuple[str, int], dict[str, float]]:
    """(metric, k) -> qid -> value for each of ``measures`` (name -> ir_measures measure) at each
    of ``ks``, for every query of ``qrels`` (``run``: qid -> ranked dids).

    The library gets scores that fall with the rank: trec_eval re-sorts by score and breaks ties
    by document id, but the candidates of one generated ID share GENIUS's score, and the ranking
    scored must be the one the hit rate scored.
    """
    scored = {q: {did: float(-rank) for rank, did in enumerate(run.get(q, []))} for q in qrels}
    wanted = {measure @ k: (name, k) for name, measure in measures.items() for k in ks}
    out: dict[tuple[str, int], dict[str, float]] = {key: {} for key in wanted.values()}
    for metric in ir_measures.iter_calc(list(wanted), qrels, scored):
        out[wanted[metric.measure]][metric.query_id] = float(metric.value)
    return out


def in_pool(qrels: dict[str, dict[str, int]], sorted_pool_ids: np.ndarray) -> dict[str, dict[str, int]]:
    """The qrels less the relevant candidates that are not in the pool (its hashed dids, sorted)."""
    def present(did: str) -> bool:
        i = int(np.searchsorted(sorted_pool_ids, hash_did(did)))
        return i < len(sorted_pool_ids) and int(sorted_pool_ids[i]) == hash_did(did)

    return {q: {d: g for d, g in docs.items() if g < 1 or present(d)} for q, docs in qrels.items()}


def score_pair(run_files: dict[str, Path], qrels: GradedQrels, query_ids: np.ndarray, positives: PoolPositives,
               like: RecallResult, ks: list[int], reported_k: int,
               sorted_pool_ids: np.ndarray | None = None, measures: dict = MEASURES) -> list[IRResult]:
    """Each method's run file (method -> path) of one (pool, query file), per task as the hit rate is.

    ``query_ids``: the query file's hashed qids, less those ``positives`` excluded, are the queries
    scored; ``sorted_pool_ids``: given when positives missing from the pool are excluded (the
    ``exclude`` setting), so they leave the recall denominators too; ``like``: a hit-rate result
    of this pair, for its names.
    """
    qids = {unhash_qid(q) for q in np.asarray(query_ids).tolist()} - positives.excluded_qids
    judged = {q: qrels.grades[q] for q in sorted(qids) if q in qrels.grades}
    if sorted_pool_ids is not None:
        judged = in_pool(judged, sorted_pool_ids)
    by_task: dict[int, list[str]] = defaultdict(list)
    for q in judged:
        by_task[qrels.task_of[q]].append(q)
    out = []
    for method, path in run_files.items():
        values = per_query(ranked_run(path), judged, ks, measures)
        for task, task_qids in sorted(by_task.items()):
            out += [IRResult(method, like.pool_kind, like.pool, like.query_file, like.dataset, task, like.split,
                             name, k, float(np.mean([by_qid[q] for q in task_qids])), len(task_qids),
                             reported=k == reported_k)
                    for (name, k), by_qid in values.items()]
    return out


def score_runs(runs_dir: Path, results: list[RecallResult], positives: list[PoolPositives],
               qrels_files: dict[str, Path], query_ids: dict[str, np.ndarray],
               pool_ids: dict[str, np.ndarray], measures: dict = MEASURES,
               ks: list[int] | None = None) -> list[IRResult]:
    """``measures`` (the standard ones by default) of every (pool, query file, method) an
    evaluation scored (``results``) from its run files ``runs_dir/<pool>/<query file>/<method>.run``,
    at ``ks`` (default: each pair's hit-rate ks).

    ``qrels_files`` and ``query_ids``: by query file stem; ``pool_ids``: sorted hashed dids by
    pool stem, needed only for the pairs whose missing positives were excluded.
    """
    pairs: dict[tuple[str, str], list[RecallResult]] = defaultdict(list)
    for r in results:
        pairs[r.pool, r.query_file].append(r)
    missing = {(p.pool, p.query_file): p for p in positives}
    qrels: dict[str, GradedQrels] = {}
    out = []
    for (pool, query_file), rows in pairs.items():
        if query_file not in qrels:
            qrels[query_file] = GradedQrels.read(qrels_files[query_file])
        methods = dict.fromkeys(r.method for r in rows)
        reported = next(r.k for r in rows if r.reported)
        pair_missing = missing[pool, query_file]
        out += score_pair({m: runs_dir / pool / query_file / f"{m}.run" for m in methods}, qrels[query_file],
                          query_ids[query_file], pair_missing, rows[0], ks or sorted({r.k for r in rows}), reported,
                          pool_ids[pool] if pair_missing.mode == "exclude" else None, measures)
    return out


def score_irgen(runs_dir: Path, results: list[RecallResult], positives: list[PoolPositives],
                qrels_files: dict[str, Path], query_ids: dict[str, np.ndarray], pool_ids: dict[str, np.ndarray],
                ks: list[int]) -> list[IRResult]:
    """IRGen's metrics (module docstring) of every (pool, query file, method), as ``score_runs``:
    P@k and R@k at ``ks``, and MAP@IRGEN_MAP_DEPTH."""
    args = (runs_dir, results, positives, qrels_files, query_ids, pool_ids)
    return (score_runs(*args, IRGEN_MEASURES, sorted(set(ks))) +
            score_runs(*args, IRGEN_MAP, [IRGEN_MAP_DEPTH]))


def table_cells(results: list[IRResult], kind: str, row_of, column_of) -> dict[tuple, dict[str, float]]:
    """The values of one pool kind by table row, in the paper's row order (dataset, query file,
    task, method), then ``row_of(result)``; within a row by ``column_of(result)``."""
    cells: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in results:
        if r.pool_kind == kind:
            order = (paper_rank(r.dataset, r.task_id), r.query_file, r.task_id, list(METHOD_COLUMNS).index(r.method))
            cells[order + row_of(r)][column_of(r)] = r.value
    return cells


def ir_table(results: list[IRResult], names: Names | None = None) -> str:
    """Markdown: per pool kind, one row per (task, dataset, method), the metrics at the reported k."""
    shown = [r for r in results if r.reported]
    if not shown:
        return ""
    names = names or method_names()
    out = ["### Standard IR metrics (ir_measures: trec_eval's definitions), %"]
    for kind in POOL_TITLES:
        cells = table_cells(shown, kind, lambda r: (r.dataset, r.method, r.k), lambda r: r.metric)
        if not cells:
            continue
        out += ["", f"#### {POOL_TITLES[kind]}", "",
                "| Task | Dataset | Method | k | " + " | ".join(f"{m}@k" for m in MEASURES) + " |",
                "|" + "---|" * (4 + len(MEASURES))]
        for (_, _, task, _, dataset, method, k), values in sorted(cells.items()):
            row = [TASK_LABEL.get(task, str(task)), DISPLAY_NAME.get(dataset, dataset), names[method], str(k)]
            out.append("| " + " | ".join(row + [f"{100 * values[m]:.1f}" for m in MEASURES]) + " |")
    return "\n".join(out) + "\n"


def irgen_columns(results: list[IRResult]) -> list[str]:
    """IRGen's column order: every P@k, every R@k (ascending k), then MAP@100."""
    present = {r.label for r in results}
    ks = sorted({r.k for r in results if r.metric in IRGEN_MEASURES})
    return [f"{name}@{k}" for name in IRGEN_MEASURES for k in ks if f"{name}@{k}" in present] + \
        [f"{name}@{IRGEN_MAP_DEPTH}" for name in IRGEN_MAP if f"{name}@{IRGEN_MAP_DEPTH}" in present]


def irgen_table(results: list[IRResult], names: Names | None = None) -> str:
    """Markdown in IRGen's layout: per pool kind, one row per (query file, task) and method (dense,
    GENIUS, GENIUS^R), columns P@k | R@k | MAP@100 in percent."""
    if not results:
        return ""
    names = names or method_names()
    columns = irgen_columns(results)
    out = ["### IRGen's metrics (R@k: hit rate; MAP@100: trec_eval map_cut_100), %"]
    for kind in POOL_TITLES:
        cells = table_cells(results, kind, lambda r: (r.dataset, r.method), lambda r: r.label)
        if not cells:
            continue
        out += ["", f"#### {POOL_TITLES[kind]}", "", "| Dataset | Task | Method | " + " | ".join(columns) + " |",
                "|" + "---|" * (3 + len(columns))]
        for (_, _, task, _, dataset, method), values in sorted(cells.items()):
            row = [DISPLAY_NAME.get(dataset, dataset), TASK_LABEL.get(task, str(task)), names[method]]
            out.append("| " + " | ".join(row + [f"{100 * values[c]:.1f}" for c in columns]) + " |")
    return "\n".join(out) + "\n"


# ---- TREC qrels -------------------------------------------------------------------------------
def write_trec_qrels(qrels_files: list[Path], out: str | os.PathLike) -> int:
    """M-BEIR qrels as TREC qrels (``qid 0 did relevance``, grades kept); returns the line count."""
    count = 0
    with atomic_path(out) as tmp, open(tmp, "w") as f:
        for path in qrels_files:
            for _, qid, did, rel, _ in qrels_lines(path):
                f.write(f"{qid} 0 {did} {rel}\n")
                count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="genius export-qrels",
        description="Write M-BEIR qrels (qid 0 did relevance task_id) as plain TREC qrels (qid 0 did relevance), "
                    "for trec_eval and other tools on the run files under results/<setting>/runs/.")
    parser.add_argument("--qrels", nargs="+", required=True, type=Path, help="M-BEIR qrels file(s)")
    parser.add_argument("--out", required=True, type=Path, help="the TREC qrels file to write")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    with user_errors_exit(parser):
        count = write_trec_qrels(args.qrels, args.out)
    print(f"wrote {args.out}: {count} qrels lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
