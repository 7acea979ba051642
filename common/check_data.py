"""``genius check-data --root DIR``: validate an M-BEIR-format data root.

Checks every line of every query and candidate file (schema, modality strings, id formats),
that positives exist in the pool the query is evaluated against and have the task's modality,
that qrels agree with the query files, that instructions exist for every query kind used, and
that every referenced image exists. Each problem is printed as ``file:line: what is wrong``;
the exit status is 0 only when nothing is wrong.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from genius.common.mbeir import (
    MODALITIES, TASKS, DataFormatError, Instructions, candidate_problems, hash_did, load_qrels,
    parse_query_file_name, query_problems,
)


@dataclass
class Report:
    root: Path
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0

    def add(self, path: Path, line: int | None, message: str) -> None:
        where = str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)
        self.problems.append(f"{where}:{line}: {message}" if line else f"{where}: {message}")


@dataclass
class PoolInfo:
    modality: dict[int, str]  # hashed did -> modality


def _records(path: Path, report: Report):
    """(line, object) for every line that is valid JSON; bad lines become problems."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                report.add(path, lineno, f"not valid JSON ({err.msg} at column {err.colno})")


def _check_image(root: Path, rel: object, path: Path, lineno: int, report: Report) -> None:
    if isinstance(rel, str) and rel and not (root / rel).is_file():
        report.add(path, lineno, f"image {rel} does not exist under {root}")


def check_pool(path: Path, report: Report) -> PoolInfo:
    modality: dict[int, str] = {}
    for lineno, obj in _records(path, report):
        problems = candidate_problems(obj)
        for problem in problems:
            report.add(path, lineno, problem)
        if problems:
            continue
        did = hash_did(obj["did"])
        if did in modality:
            report.add(path, lineno, f"did {obj['did']} appears more than once in this pool")
        modality[did] = obj["modality"]
        _check_image(report.root, obj.get("img_path"), path, lineno, report)
    report.files_checked += 1
    return PoolInfo(modality)


def pool_for_query_file(root: Path, query_file: Path) -> Path | None:
    """The pool a query file is answered from.

    test: its local pool (MSCOCO's is named ..._test_cand_pool); val: a ..._val_cand_pool, else the
    union val pool, else the local pool; train (and union files): the split's union pool.
    """
    parsed = parse_query_file_name(query_file)
    split = parsed[2] if parsed else query_file.parent.name.removeprefix("union_")
    local, union = root / "cand_pool" / "local", root / "cand_pool" / "global" / f"mbeir_union_{split}_cand_pool.jsonl"
    candidates = [union]
    if parsed and split != "train":
        stem = f"mbeir_{parsed[0]}_task{parsed[1]}"
        split_local, plain_local = local / f"{stem}_{split}_cand_pool.jsonl", local / f"{stem}_cand_pool.jsonl"
        candidates = [split_local, plain_local, union] if split == "test" else [split_local, union, plain_local]
    return next((path for path in candidates if path.is_file()), None)


def check_queries(path: Path, pool: PoolInfo | None, pool_path: Path | None, instructions: Instructions | None,
                  report: Report) -> dict[str, tuple[int, set[str], int | None]]:
    """Validate a query file; returns qid -> (line, positives, task id) for the qrels check."""
    seen: dict[str, tuple[int, set[str], int | None]] = {}
    for lineno, obj in _records(path, report):
        problems = query_problems(obj)
        for problem in problems:
            report.add(path, lineno, problem)
        if problems:
            continue
        qid, task = obj["qid"], obj.get("task_id")
        if qid in seen:
            report.add(path, lineno, f"qid {qid} appears more than once in this file (first on line {seen[qid][0]})")
        seen[qid] = (lineno, set(obj["pos_cand_list"]), task)
        if not obj["pos_cand_list"]:
            report.add(path, lineno, f"query {qid} has no positive candidate")
        _check_image(report.root, obj.get("query_img_path"), path, lineno, report)
        if pool is not None:
            _check_positives(obj, pool, pool_path, path, lineno, report)
        if instructions is not None and task is not None:
            key = (int(qid.split(":")[0]), obj["query_modality"], TASKS[task][1])
            if key not in instructions.prompts:
                report.add(path, lineno, f"no instruction for dataset {key[0]}, {key[1]} -> {key[2]} in instructions/query_instructions.tsv")
    report.files_checked += 1
    return seen


def _check_positives(obj: dict, pool: PoolInfo, pool_path: Path, path: Path, lineno: int, report: Report) -> None:
    task = obj.get("task_id")
    for did in obj["pos_cand_list"]:
        modality = pool.modality.get(hash_did(did))
        if modality is None:
            report.add(path, lineno, f"positive {did} is not in the candidate pool {pool_path.relative_to(report.root)}")
        elif task is not None and modality != TASKS[task][1]:
            report.add(path, lineno, f"positive {did} has modality {modality!r} but task {task} asks for {TASKS[task][1]!r}")


def check_qrels(path: Path, queries: dict[str, tuple[int, set[str], int | None]], query_file: Path, report: Report) -> None:
    try:
        qrels = load_qrels(path)
    except DataFormatError as err:
        report.problems.append(str(err).replace(f"{report.root}/", ""))
        return
    report.files_checked += 1
    for qid, (lineno, positives, task) in queries.items():
        relevant = qrels.relevant.get(qid, set())
        if relevant != positives:
            missing, extra = sorted(positives - relevant), sorted(relevant - positives)
            detail = "; ".join(filter(None, [missing and f"missing from qrels: {', '.join(missing)}",
                                             extra and f"only in qrels: {', '.join(extra)}"]))
            report.add(query_file, lineno, f"positives of {qid} disagree with {path.name} ({detail})")
        if task is not None and qid in qrels.task_of and qrels.task_of[qid] != task:
            report.add(path, None, f"qid {qid} has task {qrels.task_of[qid]} in qrels but {task} in {query_file.name}")
    for qid in sorted(set(qrels.task_of) - set(queries)):
        report.add(path, None, f"qid {qid} is not in {query_file.name}")


def check_root(root: str | Path) -> Report:
    root = Path(root).resolve()
    report = Report(root)
    if not root.is_dir():
        report.problems.append(f"{root}: not a directory")
        return report
    for sub in ("query", "cand_pool", "instructions"):
        if not (root / sub).is_dir():
            report.add(root / sub, None, "missing folder (an M-BEIR root has query/, cand_pool/, instructions/, qrels/)")
    instructions = None
    tsv = root / "instructions" / "query_instructions.tsv"
    if tsv.is_file():
        try:
            instructions = Instructions.load(tsv)
            report.files_checked += 1
        except DataFormatError as err:
            report.problems.append(str(err).replace(f"{root}/", ""))
    pools: dict[Path, PoolInfo] = {}
    for pool_file in sorted((root / "cand_pool").glob("*/*.jsonl")):
        pools[pool_file] = check_pool(pool_file, report)
    for query_file in sorted((root / "query").glob("*/*.jsonl")):
        pool_path = pool_for_query_file(root, query_file)
        if pool_path is None:
            report.add(query_file, None, "no candidate pool found for this query file (local pool or union pool of its split)")
        queries = check_queries(query_file, pools.get(pool_path), pool_path, instructions, report)
        parsed = parse_query_file_name(query_file)
        if parsed:
            dataset, task, split = parsed
            qrels = root / "qrels" / split / f"mbeir_{dataset}_task{task}_{split}_qrels.txt"
            if qrels.is_file():
                check_qrels(qrels, queries, query_file, report)
            elif split == "test":
                report.add(qrels, None, f"missing qrels for {query_file.name}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genius check-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the M-BEIR-format data root")
    parser.add_argument("--max-problems", type=int, default=200, help="print at most this many problems")
    args = parser.parse_args(argv)
    report = check_root(args.root)
    for problem in report.problems[: args.max_problems]:
        print(problem)
    if len(report.problems) > args.max_problems:
        print(f"... and {len(report.problems) - args.max_problems} more problems")
    if report.problems:
        print(f"{len(report.problems)} problem(s) in {report.root} ({report.files_checked} files checked)", file=sys.stderr)
        return 1
    print(f"OK: {report.root} ({report.files_checked} files checked, modalities {', '.join(MODALITIES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
