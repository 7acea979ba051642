"""Positives that are not in the evaluated pool: never a silent drop.

A qrels positive (or a query's ``pos_cand_list`` entry) missing from the pool cannot be retrieved,
so it silently lowers recall. ``missing_positives`` in the eval config decides what happens:

- ``error`` (default): stop before any work, naming the first such line (file:line) and how many;
- ``keep``: M-BEIR's own protocol. UniIR scores against the qrels as they are: OVEN and InfoSeek
  list positives of the other dataset, which their task-specific pools do not hold, so such a
  positive counts as not retrieved and a query whose positives all lie outside the pool is a miss.
  The paper's numbers were computed so; the counts are printed with the results;
- ``exclude``: drop those positives and leave the queries left without one out of the scores;
  the counts are printed with the results.

The same pass over a query file collects each query's ``exclude_cand_list`` (candidates never to
return for it, e.g. its own image in a gallery that holds it), which ranking honours for every method.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from genius.common.mbeir import (
    DataFormatError, hash_did, hash_qid, iter_jsonl, lacks_text, qrels_lines, query_problems,
)

MissingPositives = Literal["error", "keep", "exclude"]
log = logging.getLogger("genius.eval")


@dataclass
class FilePositives:
    """The positives of one query file: its qrels lines and its queries' ``pos_cand_list``, less
    those of queries with an empty text (extraction left them out: they are not scored)."""

    qrels: Path
    queries: Path
    qrels_lines: list[tuple[int, str, str]]  # (line number, qid, did) of each relevant line
    query_lines: list[tuple[int, str, str]]  # (line number, qid, did) of each pos_cand_list entry
    exclusions: dict[int, list[int]] = field(default_factory=dict)  # hashed qid -> hashed dids never returned

    @classmethod
    def read(cls, qrels: Path, queries: Path) -> "FilePositives":
        """Both files, which must agree on their queries: M-BEIR writes a query's qrels lines from
        its ``pos_cand_list``, so a scored query without a relevant qrels line (it could never be a
        hit) is a mistake in the data. Qrels lines of qids the query file lacks are not scored; a
        warning counts them (a query file cut to a sample keeps its whole qrels file)."""
        query_lines, empty, exclusions, first_line = [], set(), {}, {}
        for lineno, obj in iter_jsonl(queries):
            problems = query_problems(obj, text_required=False)
            if problems:
                raise DataFormatError(f"{queries}:{lineno}: {problems[0]}")
            first_line.setdefault(obj["qid"], lineno)
            if lacks_text(obj, "query_modality", "query_txt"):
                empty.add(obj["qid"])
                continue
            query_lines += [(lineno, obj["qid"], did) for did in obj["pos_cand_list"]]
            if obj.get("exclude_cand_list"):
                exclusions[hash_qid(obj["qid"])] = [hash_did(did) for did in obj["exclude_cand_list"]]
        relevant, judged, unknown = [], set(), []
        for lineno, qid, did, rel, _ in qrels_lines(qrels):
            if qid not in first_line:
                unknown.append((lineno, qid))
                continue
            if rel > 0 and qid not in empty:
                relevant.append((lineno, qid, did))
                judged.add(qid)
        if unknown:
            log.warning("%s: %d lines name qids that are not queries of %s (first: line %d, qid %s); they are not "
                        "scored (genius check-data lists them)", qrels, len(unknown), queries, *unknown[0])
        unjudged = [qid for qid in first_line if qid not in empty and qid not in judged]
        if unjudged:
            raise DataFormatError(f"{queries}:{first_line[unjudged[0]]}: query {unjudged[0]} has no relevant line in "
                                  f"{qrels} ({len(unjudged)} queries have none), so it could never be a hit; add its "
                                  "qrels lines (one per pos_cand_list entry) or remove the query")
        return cls(qrels, queries, relevant, query_lines, exclusions)


@dataclass
class PoolPositives:
    """What is missing from one pool for one query file, and what the scores leave out."""

    pool: str  # pool file stem
    query_file: str  # query file stem
    mode: str
    qrels_missing: int = 0  # relevant qrels lines whose did is not in the pool
    qrels_total: int = 0
    queries_missing: int = 0  # pos_cand_list entries not in the pool
    queries_total: int = 0
    queries_without_positive: int = 0  # queries with qrels positives, none of them in the pool
    excluded_qids: set[str] = field(default_factory=set, repr=False)  # left out of the scores (exclude)
    # hashed qid -> hashed dids ranking must never return for it (exclude_cand_list; any pool)
    exclusions: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @property
    def any_missing(self) -> bool:
        return bool(self.qrels_missing or self.queries_missing)

    def summary(self) -> dict:
        return {"pool": self.pool, "query_file": self.query_file, "mode": self.mode,
                "qrels_positives_not_in_pool": self.qrels_missing, "qrels_positives": self.qrels_total,
                "pos_cand_list_entries_not_in_pool": self.queries_missing, "pos_cand_list_entries": self.queries_total,
                "queries_without_positive_in_pool": self.queries_without_positive,
                "queries_excluded": len(self.excluded_qids)}

    def describe(self) -> str:
        """One Markdown line for results.md."""
        what = {"keep": "kept in the qrels (counted as not retrieved, M-BEIR's protocol)",
                "exclude": f"excluded, with {len(self.excluded_qids)} queries left without a positive"}[self.mode]
        return (f"- {self.query_file} on {self.pool}: {self.qrels_missing} of {self.qrels_total} qrels positives and "
                f"{self.queries_missing} of {self.queries_total} pos_cand_list entries are not in the pool; {what}")


def _absent(dids: list[str], sorted_pool_ids: np.ndarray) -> np.ndarray:
    """bool per did: not among the sorted hashed pool ids."""
    if not dids or not len(sorted_pool_ids):
        return np.ones(len(dids), dtype=bool)
    hashed = np.fromiter((hash_did(d) for d in dids), dtype=np.int64, count=len(dids))
    found = np.searchsorted(sorted_pool_ids, hashed).clip(max=len(sorted_pool_ids) - 1)
    return sorted_pool_ids[found] != hashed


def check_positives(positives: FilePositives, sorted_pool_ids: np.ndarray, pool_file: Path, query_stem: str,
                    mode: MissingPositives) -> PoolPositives:
    """Count the positives of one query file missing from a pool (its hashed dids, sorted); with
    ``mode`` 'error' the first one raises, naming its file and line."""
    stem = pool_file.name.removesuffix(".jsonl")
    out = PoolPositives(stem, query_stem, mode, qrels_total=len(positives.qrels_lines),
                        queries_total=len(positives.query_lines), exclusions=positives.exclusions)
    qrels_absent = _absent([did for _, _, did in positives.qrels_lines], sorted_pool_ids)
    query_absent = _absent([did for _, _, did in positives.query_lines], sorted_pool_ids)
    out.qrels_missing, out.queries_missing = int(qrels_absent.sum()), int(query_absent.sum())
    with_positive = {qid for _, qid, _ in positives.qrels_lines}
    present = {qid for (_, qid, _), absent in zip(positives.qrels_lines, qrels_absent) if not absent}
    without = with_positive - present
    out.queries_without_positive = len(without)
    if mode == "error" and out.any_missing:
        raise ValueError(_error_message(positives, out, pool_file, qrels_absent, query_absent))
    if mode == "exclude":
        out.excluded_qids = without
    return out


def _error_message(positives: FilePositives, out: PoolPositives, pool_file: Path, qrels_absent: np.ndarray,
                   query_absent: np.ndarray) -> str:
    if out.qrels_missing:
        lineno, qid, did = positives.qrels_lines[int(np.flatnonzero(qrels_absent)[0])]
        where, what = f"{positives.qrels}:{lineno}", f"qrels positive {did} of query {qid}"
        count = f"{out.qrels_missing} of the file's {out.qrels_total} positives are not"
    else:
        lineno, qid, did = positives.query_lines[int(np.flatnonzero(query_absent)[0])]
        where, what = f"{positives.queries}:{lineno}", f"pos_cand_list entry {did} of query {qid}"
        count = f"{out.queries_missing} of the file's {out.queries_total} entries are not"
    return (f"{where}: {what} is not in the evaluated pool {pool_file} ({count}, and "
            f"{out.queries_without_positive} queries have no positive in it); fix the qrels, the queries or the "
            "pool, or set missing_positives: keep (M-BEIR's protocol: counted as not retrieved) or exclude "
            "(left out of the scores); either is counted in results.md and metrics.json")
