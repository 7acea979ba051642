"""``genius check-data --root DIR``: validate an M-BEIR-format data root.

Checks every line of every query and candidate file: that it is UTF-8 and JSON, its schema,
modality strings and id formats, that the modality a record declares matches what it holds (text,
image path) and what its task asks for, and that no id repeats in a file; that no file is empty;
that positives, in the query files and in the qrels, and the candidates a query excludes
(``exclude_cand_list``, never one of its positives) exist in the pool the query is evaluated
against and have the task's modality; that qrels agree with the query files; that instructions
exist for every query kind used, when the root has an instructions file (without one it is a note:
queries are then embedded with ``instructions.mode: none``, as ``genius new-setting`` sets it for
such a root and for text encoders); and that every referenced image exists and decodes whole (a
truncated or corrupt file is named with the file:line that references it; ``--no-decode`` only
checks existence). Each problem is printed as ``file:line: what is wrong``; informational lines
(counts of what M-BEIR does on purpose) are printed too, and the exit status is 0 only when
nothing is wrong (1 when problems are found; 2, with one ``genius check-data: error:`` line, when
the command itself is wrong, e.g. ``--root`` is not a folder).

M-BEIR as published (TIGER-Lab/M-BEIR on Hugging Face, built by TIGER-AI-Lab/UniIR) passes:

- Up-sampled training file. ``query/union_train/mbeir_union_up_train.jsonl`` joins the ten train
  files and up-samples WebQA, EDIS, NIGHTS, FashionIQ and CIRR with replacement (UniIR
  ``src/data/mbeir_data_generator.py``, ``--unify_and_upsample_train_data``), so a qid can occur
  many times there, each time as an exact copy. In a ``query/union_train/`` file such repeats are
  counted, and only a repeat whose record differs from the qid's first line is a problem; in every
  other file a repeated qid is a problem.
- OVEN/InfoSeek cross-dataset positives. Both datasets describe the same Wikipedia entities. UniIR's
  preprocessors append to each OVEN query the InfoSeek candidates of its entity, and to each
  InfoSeek query the OVEN candidates with the same text, image and modality
  (``src/data/preprocessing/oven_data_preprocessor.py --assign_did_from_infoseek_cand_pool``,
  ``infoseek_data_preprocessor.py --assign_did_from_oven_cand_pool``). Local pools hold one
  dataset each, so these positives are not in the query's local pool; they are in the other
  dataset's local pool and therefore in the union pools. UniIR keeps them:
  - the qrels are written from every entry of ``pos_cand_list`` (``mbeir_data_generator.py
    --generate_qrels``);
  - Recall@k counts a hit when any qrels positive is retrieved (``src/common/mbeir_retriever.py``,
    ``compute_recall_at_k``), so they can only score in the union pool;
  - only the eval-time instruction lookup ignores them: ``MBEIRMainDataset.__getitem__`` in
    ``src/data/mbeir_dataset.py`` keeps the positives of the query's own dataset in eval mode.
  check-data therefore looks such a positive up in the split's union pool when the query's own
  pool lacks it (without a union pool: in the split's other local pools) and counts it. It is a
  problem only when it is missing there too or has the wrong modality.
- The older revision's ``cand_pool/union_pool/`` is read like ``cand_pool/global/``.
- Qrels. Every query file is compared with ``qrels/<split>/<file stem>_qrels.txt``. M-BEIR ships
  train qrels per dataset and val/test qrels per (dataset, task), none for the union files. A
  missing test qrels file is a problem; a missing train/val one that M-BEIR ships is only noted,
  since only evaluation on that file needs it.

One bad row gives one problem. The id of a pool or query row that failed validation (or is not
JSON) is remembered when it can still be read. Positives pointing at that candidate, and qrels
lines of that query, are then not reported again; likewise a bad qrels line's query is not
compared with its query file.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from genius.common.mbeir import (
    DID_BASE, MBEIR_DATASET_IDS, MBEIR_EVAL_TASKS, MODALITIES, QID_BASE, TASKS, UNION_POOL_DIRS,
    DataFormatError, Instructions, candidate_problems, hash_did, missing_image, parse_id, parse_qrels_line,
    parse_query_file_name, query_problems, text_lines, unhash_did, union_pool_path,
)
from genius.common.stage import ArgumentParser, add_debug_flag, user_errors_exit

SPLITS = ("train", "val", "test")
# (query dataset, positive dataset) pairs M-BEIR links on purpose (see the module docstring).
_OVEN, _INFOSEEK = MBEIR_DATASET_IDS["oven"], MBEIR_DATASET_IDS["infoseek"]
CROSS_DATASET_PAIRS = {(_OVEN, _INFOSEEK), (_INFOSEEK, _OVEN)}
_MBEIR_TRAIN_FILE = re.compile(r"^mbeir_(?P<dataset>[a-z0-9]+)_train\.jsonl$")
_NOT_JSON = object()  # stands for a line that is not valid JSON (already reported)


@dataclass
class Report:
    root: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files_checked: int = 0
    images: ImageChecker | None = None
    modalities: set[str] = field(default_factory=set)  # of the valid candidates, for the closing line

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def add(self, path: Path, line: int | None, message: str) -> None:
        self.problems.append(f"{self.rel(path)}:{line}: {message}" if line else f"{self.rel(path)}: {message}")

    def note(self, path: Path, message: str) -> None:
        self.notes.append(f"{self.rel(path)}: {message}")


@dataclass
class PoolInfo:
    label: str  # how messages name the pool
    modality: dict[int, str] = field(default_factory=dict)  # hashed did -> modality, valid rows
    invalid: set[int] = field(default_factory=set)  # hashed dids of rows already reported as bad


@dataclass
class QueryRow:
    line: int  # of the qid's first occurrence
    positives: set[str]  # of all its rows, as qrels written from the file would list them
    task: int | None
    digest: int | None  # of the whole record; kept only where up-sampled repeats are allowed


@dataclass
class QueryFile:
    rows: dict[str, QueryRow] = field(default_factory=dict)
    invalid: set[str] = field(default_factory=set)  # qids of rows already reported as bad


def _records(path: Path, report: Report):
    """(line, object or _NOT_JSON, raw line) for every non-blank line; bad JSON becomes a problem."""
    for lineno, line in text_lines(path, lambda lineno, message: report.add(path, lineno, message)):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            report.add(path, lineno, f"not valid JSON ({err.msg} at column {err.colno})")
            obj = _NOT_JSON
        yield lineno, obj, line


def _row_id(obj: object, line: str, key: str, base: int) -> str | None:
    """The id of a row that failed validation, if it can still be read (from the raw line when the
    JSON is broken), so that what points at the row is not reported a second time."""
    if isinstance(obj, dict):
        value = obj.get(key)
    else:
        match = re.search(rf'"{key}"\s*:\s*"([^"]*)"', line)
        value = match.group(1) if match else None
    try:
        parse_id(value, base, key)
    except ValueError:
        return None
    return value


class ImageChecker:
    """Checks every referenced image: that it exists and (with ``decode``) that it decodes whole,
    so truncated and corrupt files are caught. Each image is read once however many records
    reference it; a bad one is reported at every line that references it. References are
    buffered and decoded by a few threads (PIL releases the GIL while it decodes)."""

    BATCH = 512

    def __init__(self, report: Report, decode: bool = True, workers: int | None = None) -> None:
        self.report, self.decode = report, decode
        self.results: dict[str, str | None] = {}  # relative path -> problem (None: fine)
        self.pending: list[tuple[Path, int, str]] = []
        self.workers = workers or min(8, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    def add(self, path: Path, lineno: int, rel: object) -> None:
        if isinstance(rel, str) and rel:
            self.pending.append((path, lineno, rel))
            if len(self.pending) >= self.BATCH:
                self.flush()

    def flush(self) -> None:
        todo = sorted({rel for _, _, rel in self.pending if rel not in self.results})
        if len(todo) > 1 and self.workers > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="check-image")
            self.results.update(zip(todo, self._pool.map(self.probe, todo)))
        else:
            self.results.update((rel, self.probe(rel)) for rel in todo)
        for path, lineno, rel in self.pending:
            problem = self.results[rel]
            if problem:
                self.report.add(path, lineno, problem)
        self.pending.clear()

    def close(self) -> None:
        self.flush()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def probe(self, rel: str) -> str | None:
        root = self.report.root
        full = root / rel
        problem = missing_image(rel, root)
        if problem:
            return problem
        if not self.decode:
            return None
        from PIL import Image

        from genius.common.image_collections import CollectionError, eight_bit

        try:
            with Image.open(full) as image:
                image.load()  # decodes every byte: a truncated file fails here, not at open
                eight_bit(image, f"image {rel}")  # a float image is refused, as extraction refuses it
        except CollectionError as err:
            return str(err)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            return f"image {rel} cannot be decoded ({one_line_error(err)}); replace it with a complete image file"
        return None


def one_line_error(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())


def _check_image(rel: object, path: Path, lineno: int, report: Report) -> None:
    if report.images is None:
        report.images = ImageChecker(report)
    report.images.add(path, lineno, rel)


def _finish_file(path: Path, report: Report, records: int) -> None:
    """What every checked file ends with: its image references checked, an empty file reported."""
    if report.images is not None:
        report.images.flush()
    if records == 0:
        report.add(path, None, "empty file (no records); check that it was downloaded or written completely")
    report.files_checked += 1


def undeclared_parts(obj: dict, modality_key: str, text_key: str, image_key: str) -> list[str]:
    """A record that holds text or an image its modality does not declare (the shared record checks
    catch the opposite: a declared part that is missing). Extraction embeds what a record holds,
    so such a record's vectors and its modality token would disagree. M-BEIR leaves the absent
    part null."""
    modality, problems = obj[modality_key], []
    text, image = obj.get(text_key), obj.get(image_key)
    if "text" not in modality and isinstance(text, str) and text.strip():
        problems.append(f"{modality_key} is {modality!r} but the record holds text ({text_key}); set {modality_key} "
                        f"to {'image,text'!r} or make {text_key} null")
    if "image" not in modality and isinstance(image, str) and image:
        problems.append(f"{modality_key} is {modality!r} but the record holds an image ({image_key}); set "
                        f"{modality_key} to {'image,text'!r} or make {image_key} null")
    return problems


def check_pool(path: Path, report: Report) -> PoolInfo:
    info = PoolInfo(report.rel(path))
    records, repeated = 0, []  # (line, did) of repeated dids: their first lines are looked up afterwards
    for lineno, obj, line in _records(path, report):
        records += 1
        problems = [] if obj is _NOT_JSON else candidate_problems(obj)
        if obj is not _NOT_JSON and not problems:
            problems = undeclared_parts(obj, "modality", "txt", "img_path")
        for problem in problems:
            report.add(path, lineno, problem)
        if obj is _NOT_JSON or problems:
            did = _row_id(obj, line, "did", DID_BASE)
            if did is not None:
                info.invalid.add(hash_did(did))
            continue
        did = hash_did(obj["did"])
        if did in info.modality:
            repeated.append((lineno, obj["did"], len(report.problems)))
            continue
        info.modality[did] = obj["modality"]
        report.modalities.add(obj["modality"])
        _check_image(obj.get("img_path"), path, lineno, report)
    if repeated:  # rare: one more pass names the first occurrence without keeping every line number
        wanted = {did for _, did, _ in repeated}
        first: dict[str, int] = {}
        for lineno, obj, _ in _records(path, Report(report.root)):
            if isinstance(obj, dict) and obj.get("did") in wanted and obj["did"] not in first:
                first[obj["did"]] = lineno
        for offset, (lineno, did, at) in enumerate(repeated):
            message = f"{report.rel(path)}:{lineno}: did {did} appears more than once in this pool (first on line {first.get(did)})"
            report.problems.insert(at + offset, message)
    _finish_file(path, report, records)
    return info


def query_split(query_file: Path) -> str | None:
    """train, val or test: from the file name, else its folder (``union_train`` -> train)."""
    parsed = parse_query_file_name(query_file)
    if parsed:
        return parsed[2]
    folder = query_file.parent.name.removeprefix("union_")
    if folder in SPLITS:
        return folder
    suffix = query_file.stem.rsplit("_", 1)[-1]
    return suffix if suffix in SPLITS else None


def pool_for_query_file(root: Path, query_file: Path) -> Path | None:
    """The pool a query file is answered from.

    test: its local pool (MSCOCO's is named ..._test_cand_pool); val: a ..._val_cand_pool, else the
    union val pool, else the local pool; train (and union files): the split's union pool.
    """
    split = query_split(query_file)
    if split is None:
        return None
    parsed = parse_query_file_name(query_file)
    union, local = union_pool_path(root, split), root / "cand_pool" / "local"
    candidates = [union]
    if parsed and split != "train":
        stem = f"mbeir_{parsed[0]}_task{parsed[1]}"
        split_local, plain_local = local / f"{stem}_{split}_cand_pool.jsonl", local / f"{stem}_cand_pool.jsonl"
        candidates = [split_local, plain_local, union] if split == "test" else [split_local, union, plain_local]
    return next((path for path in candidates if path.is_file()), None)


def check_queries(path: Path, pool: PoolInfo | None, instructions: Instructions | None, report: Report,
                  cross_pool: PoolInfo | None = None) -> QueryFile:
    """Validate a query file against its pool; ``cross_pool`` is where OVEN/InfoSeek positives
    missing from ``pool`` are looked up. Returns what the qrels check needs."""
    upsampled = path.parent.name == "union_train"
    result, cross = QueryFile(), Counter()
    repeats = conflicting = 0
    records = 0
    for lineno, obj, line in _records(path, report):
        records += 1
        problems = [] if obj is _NOT_JSON else query_problems(obj)
        if obj is not _NOT_JSON and not problems:
            problems = undeclared_parts(obj, "query_modality", "query_txt", "query_img_path")
        for problem in problems:
            report.add(path, lineno, problem)
        if obj is _NOT_JSON or problems:
            qid = _row_id(obj, line, "qid", QID_BASE)
            if qid is not None:
                result.invalid.add(qid)
            continue
        qid, task = obj["qid"], obj.get("task_id")
        # Up-sampled copies are the same record written again, so they compare equal once parsed.
        digest = hash(json.dumps(obj, sort_keys=True)) if upsampled else None
        first = result.rows.get(qid)
        if first is not None:
            if upsampled and digest == first.digest:
                repeats += 1
                continue
            if upsampled:
                conflicting += 1
                report.add(path, lineno, f"qid {qid} repeats line {first.line} with a different record "
                                         "(up-sampling repeats a query unchanged)")
            else:
                report.add(path, lineno, f"qid {qid} appears more than once in this file (first on line {first.line})")
            first.positives.update(obj["pos_cand_list"])
            continue
        result.rows[qid] = QueryRow(lineno, set(obj["pos_cand_list"]), task, digest)
        if not obj["pos_cand_list"]:
            report.add(path, lineno, f"query {qid} has no positive candidate")
        _check_image(obj.get("query_img_path"), path, lineno, report)
        if pool is not None:
            _check_positives(obj, pool, cross_pool, path, lineno, report, cross)
        if instructions is not None and task is not None:
            key = (int(qid.split(":")[0]), obj["query_modality"], TASKS[task][1])
            if key not in instructions.prompts:
                report.add(path, lineno, f"no instruction for dataset {key[0]}, {key[1]} -> {key[2]} in instructions/query_instructions.tsv")
    if repeats or conflicting:
        report.note(path, f"{repeats:,} repeated qids (up-sampling), {conflicting:,} conflicting")
    for label, count in sorted(cross.items()):
        where = f"in {label}" if pool is None or label == pool.label else f"not in {pool.label} but in {label}"
        report.note(path, f"{count:,} cross-dataset positives (OVEN/InfoSeek, kept in the qrels as UniIR does), {where}")
    _finish_file(path, report, records)
    return result


def _positive_problem(did: str, query_dataset: int, task: int | None, pool: PoolInfo,
                      cross_pool: PoolInfo | None, what: str = "positive") -> tuple[str | None, str | None]:
    """(what is wrong with one positive (or, as ``what`` says, an excluded candidate) or None, the
    label of the other pool it was found in when it is an OVEN/InfoSeek cross-dataset positive
    that is fine)."""
    hashed = hash_did(did)
    crossing = (query_dataset, int(did.split(":")[0])) in CROSS_DATASET_PAIRS
    where = pool
    if crossing and cross_pool is not None and hashed not in pool.modality and hashed not in pool.invalid:
        where = cross_pool
    if hashed in where.invalid:
        return None, None  # its pool row was reported already
    modality = where.modality.get(hashed)
    if modality is None:
        also = f" nor in {where.label}" if where is not pool else ""
        return f"{what} {did} is not in the candidate pool {pool.label}{also}", None
    if task is not None and task in TASKS and modality != TASKS[task][1]:
        return f"{what} {did} has modality {modality!r} but task {task} asks for {TASKS[task][1]!r}", None
    return None, where.label if crossing else None


def _check_positives(obj: dict, pool: PoolInfo, cross_pool: PoolInfo | None, path: Path, lineno: int,
                     report: Report, cross: Counter) -> None:
    task, query_dataset = obj.get("task_id"), int(obj["qid"].split(":")[0])
    for did in obj["pos_cand_list"]:
        problem, crossed = _positive_problem(did, query_dataset, task, pool, cross_pool)
        if problem:
            report.add(path, lineno, problem)
        elif crossed:
            cross[crossed] += 1
    # An excluded candidate is the query's own image in the pool it is searched against: one the
    # pool lacks, or of another modality, means the pool or the exclusion list is not the right one.
    for did in obj.get("exclude_cand_list", []):
        problem, _ = _positive_problem(did, query_dataset, task, pool, cross_pool, what="excluded candidate")
        if problem:
            report.add(path, lineno, problem)


def check_qrels(path: Path, queries: QueryFile, query_file: Path, report: Report, pool: PoolInfo | None = None,
                cross_pool: PoolInfo | None = None) -> None:
    """Compare a qrels file with its query file and, for a positive only the qrels list, with the
    pool the query file is evaluated against (a qrels positive missing from the pool would
    silently lower recall)."""
    bad: set[str] = set()  # qids of lines reported as malformed: their queries are not compared
    relevant: dict[str, set[str]] = {}
    task_of: dict[str, int] = {}
    line_of: dict[str, int] = {}  # qid -> its first qrels line
    reported: dict[str, set[str]] = {}  # qid -> qrels-only positives already reported at their qrels line
    graded: dict[tuple[str, str], tuple[int, int]] = {}  # (qid, did) -> (relevance, line) of its first line
    records = 0
    for lineno, line in text_lines(path, lambda lineno, message: report.add(path, lineno, message)):
        parts = line.split()
        if not parts:
            continue
        records += 1
        try:
            qid, did, rel, task = parse_qrels_line(parts)
        except ValueError as err:
            report.add(path, lineno, str(err))
            bad.add(parts[0])
            continue
        task_of[qid] = task
        line_of.setdefault(qid, lineno)
        first_rel, first_line = graded.setdefault((qid, did), (rel, lineno))
        if first_rel != rel:  # the hit rate would count it relevant, graded measures would read the last line
            report.add(path, lineno, f"qid {qid}, did {did}: relevance {rel} here but {first_rel} on line "
                                     f"{first_line}; keep one line per (qid, did)")
        if rel <= 0:
            continue
        relevant.setdefault(qid, set()).add(did)
        row = queries.rows.get(qid)
        # Positives the query file lists were checked against the pool on its line already.
        if pool is not None and row is not None and did not in row.positives:
            problem, _ = _positive_problem(did, int(qid.split(":")[0]), task, pool, cross_pool)
            if problem:
                report.add(path, lineno, f"{problem} (qid {qid}); remove the line or add the candidate to the pool")
                reported.setdefault(qid, set()).add(did)
    _finish_file(path, report, records)
    if records == 0:
        return  # reported once as empty; its queries are not listed again one by one
    for qid, row in queries.rows.items():
        if qid in bad:
            continue
        listed = relevant.get(qid, set())
        if listed != row.positives:
            missing = sorted(row.positives - listed)
            extra = sorted(listed - row.positives - reported.get(qid, set()))
            detail = "; ".join(filter(None, [missing and f"missing from qrels: {', '.join(missing)}",
                                             extra and f"only in qrels: {', '.join(extra)}"]))
            if detail:
                report.add(query_file, row.line, f"positives of {qid} disagree with {path.name} ({detail})")
        if row.task is not None and qid in task_of and task_of[qid] != row.task:
            report.add(path, line_of[qid], f"qid {qid} has task {task_of[qid]} in qrels but {row.task} in "
                                           f"{query_file.name}; make the two agree")
    for qid in sorted(set(task_of) - set(queries.rows) - queries.invalid - bad, key=line_of.get):
        report.add(path, line_of[qid], f"qid {qid} is not in {query_file.name}; delete the line or add the query")


def _mbeir_ships_qrels(query_file: Path, split: str) -> bool:
    """Whether M-BEIR has a qrels file for this (non-union) train or val query file."""
    if query_file.parent.name != split:
        return False
    if split == "train":
        match = _MBEIR_TRAIN_FILE.match(query_file.name)
        return bool(match) and match["dataset"] in MBEIR_EVAL_TASKS
    parsed = parse_query_file_name(query_file)
    return bool(parsed) and parsed[1] in MBEIR_EVAL_TASKS.get(parsed[0], ())


class _SplitPools:
    """Where a split's OVEN/InfoSeek positives are looked up: its union pool, or without one the
    split's local pools together (the union test pool is exactly their concatenation)."""

    def __init__(self, root: Path, pools: dict[Path, PoolInfo]) -> None:
        self.root, self.pools, self.merged = root, pools, {}

    def get(self, split: str | None) -> PoolInfo | None:
        if split is None:
            return None
        union = union_pool_path(self.root, split)
        if union in self.pools:
            return self.pools[union]
        if split not in self.merged:
            others = tuple(f"_{other}_cand_pool.jsonl" for other in SPLITS if other != split)
            merged = PoolInfo("the local pools")
            for path, info in self.pools.items():
                if path.parent.name == "local" and not path.name.endswith(others):
                    merged.modality.update(info.modality)
                    merged.invalid |= info.invalid
            self.merged[split] = merged
        return self.merged[split]


def check_root(root: str | Path, decode_images: bool = True) -> Report:
    """Check a data root; ``decode_images=False`` only checks that referenced images exist."""
    root = Path(root).resolve()
    report = Report(root)
    if not root.is_dir():
        report.problems.append(f"{root}: not a directory")
        return report
    report.images = ImageChecker(report, decode=decode_images)
    try:
        _check_root(root, report)
    finally:
        report.images.close()
    return report


def _check_root(root: Path, report: Report) -> None:
    for sub in ("query", "cand_pool"):
        if not (root / sub).is_dir():
            report.add(root / sub, None, "missing folder (an M-BEIR root has query/, cand_pool/, qrels/ and, to "
                                         "instruct queries, instructions/)")
    instructions = None
    tsv = root / "instructions" / "query_instructions.tsv"
    if tsv.exists() and not tsv.is_file():
        report.add(tsv, None, "is a folder (or not a regular file), not the instructions file; replace it with the "
                              "tab-separated instructions file or remove it")
    elif not tsv.is_file():
        report.note(tsv, "not found: queries can only be embedded without instructions (instructions.mode: none, "
                         "what genius new-setting writes for this root)")
    else:
        try:
            instructions = Instructions.load(tsv)
            report.files_checked += 1
        except DataFormatError as err:
            report.problems.append(str(err).replace(f"{root}/", ""))
    pools = {path: check_pool(path, report) for path in sorted((root / "cand_pool").glob("*/*.jsonl"))}
    _check_union_from_locals(root, pools, report)
    split_pools = _SplitPools(root, pools)
    for query_file in sorted((root / "query").glob("*/*.jsonl")):
        split = query_split(query_file)
        pool_path = pool_for_query_file(root, query_file)
        if split is None:
            report.add(query_file, None, "cannot tell its split: name the file ..._{train,val,test}.jsonl "
                                         "or put it in query/{train,val,test}/")
        elif pool_path is None:
            union = union_pool_path(root, split).name
            # a name outside M-BEIR's pattern cannot name its local pool (MyDocs, my_docs, my-docs)
            naming = "" if split == "train" or parse_query_file_name(query_file) else (
                f"; a {split} file is named mbeir_<dataset>_task<k>_{split}.jsonl, <dataset> in lowercase letters "
                f"and digits only, and its local pool mbeir_<dataset>_task<k>_cand_pool.jsonl: rename both")
            union_dirs = " or ".join(f"{d}/" for d in UNION_POOL_DIRS)
            report.add(query_file, None, f"no candidate pool found for this query file: expected its local pool in "
                                         f"cand_pool/local/ or {union} in {union_dirs}{naming}")
        cross_pool = split_pools.get(split)
        queries = check_queries(query_file, pools.get(pool_path), instructions, report, cross_pool)
        if split is None:
            continue
        qrels = root / "qrels" / split / f"{query_file.stem}_qrels.txt"
        if qrels.is_file():
            check_qrels(qrels, queries, query_file, report, pools.get(pool_path), cross_pool)
        elif split == "test" and query_file.parent.name == "test":
            report.add(qrels, None, f"missing qrels for {query_file.name}")
        elif split != "test" and _mbeir_ships_qrels(query_file, split):
            report.note(qrels, f"not found (M-BEIR ships it; only evaluating on {query_file.name} needs it)")


def _check_union_from_locals(root: Path, pools: dict[Path, PoolInfo], report: Report) -> None:
    """genius extract assembles the union test pool from the local pools' stores (nothing is embedded
    twice), so each of its candidates must be in a local pool, with the same modality."""
    union = union_pool_path(root, "test")
    if union not in pools:
        return
    locals_ = [info for path, info in pools.items() if path.parent.name == "local"]
    if not locals_:
        report.note(union, "no local pools in cand_pool/local/: genius extract builds this pool from them, so set "
                           "data.union_pool: null in the extract config or add the local pools")
        return
    local_modality = {did: modality for info in locals_ for did, modality in info.modality.items()}
    unreadable = set().union(*(info.invalid for info in locals_))
    missing = [did for did in pools[union].modality if did not in local_modality and did not in unreadable]
    differ = [did for did, modality in pools[union].modality.items() if local_modality.get(did, modality) != modality]
    for dids, what in ((missing, "is in no local pool of cand_pool/local/ (genius extract builds this pool from "
                                 "them): add its local pool or remove the record"),
                       (differ, "has another modality in its local pool: make the two records agree")):
        if not dids:
            continue
        first = dids[0]
        line = next((lineno for lineno, obj, _ in _records(union, Report(report.root))
                     if isinstance(obj, dict) and isinstance(obj.get("did"), str) and hash_did(obj["did"]) == first),
                    None)
        report.add(union, line, f"did {unhash_did(first)} {what} ({len(dids)} of its candidates are so)")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="genius check-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the M-BEIR-format data root")
    parser.add_argument("--max-problems", type=int, default=200, help="print at most this many problems")
    parser.add_argument("--no-decode", dest="decode", action="store_false",
                        help="only check that referenced images exist (decoding every image of the full M-BEIR "
                             "takes a while)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    with user_errors_exit(parser):
        if args.max_problems < 0:
            raise ValueError(f"--max-problems: {args.max_problems} is negative; give 0 or more")
        if not Path(args.root).is_dir():
            raise ValueError(f"{args.root}: not a directory; --root takes the M-BEIR-format data root "
                             "(the folder holding query/, cand_pool/, qrels/ and instructions/)")
        report = check_root(args.root, decode_images=args.decode)
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems[: args.max_problems]:
        print(problem)
    if len(report.problems) > args.max_problems:
        print(f"... and {len(report.problems) - args.max_problems} more problems")
    if report.problems:
        print(f"{len(report.problems)} problem(s) in {report.root} ({report.files_checked} files checked)", file=sys.stderr)
        return 1
    found = [m for m in MODALITIES if m in report.modalities]
    print(f"OK: {report.root} ({report.files_checked} files checked, candidates of modality {' / '.join(found)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
