"""M-BEIR data: ids, tasks, modalities, instructions, and readers for queries, pools and qrels.

Readers stream line by line and raise :class:`DataFormatError` (a ValueError, so a stage ends
with a one-line ``file:line: what is wrong`` and exit status 2) for a line that is not UTF-8 or
not JSON, a record that breaks the schema, a repeated id, an empty file and, when given the data
root, a referenced image that does not exist. The record checks (``query_problems``,
``candidate_problems``) are shared with ``genius check-data``, which collects every problem
instead of stopping at the first and also decodes the images.
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np

# ---- ids ------------------------------------------------------------------------------------
# UniIR's integer hashing; keep the constants so run files stay interchangeable with UniIR's.
QID_BASE = 500_000
DID_BASE = 10_000_000
# ASCII digits without leading zeros: the one spelling of an id, so that hashing and unhashing
# give it back (str.isdigit and \d accept other scripts' digits, int() reads "07" as 7).
_ID_RE = re.compile(r"^(0|[1-9][0-9]*):(0|[1-9][0-9]*)$")
_INT64_MAX = 2**63 - 1

MBEIR_DATASET_IDS = {
    "visualnews": 0, "fashion200k": 1, "webqa": 2, "edis": 3, "nights": 4, "oven": 5,
    "infoseek": 6, "fashioniq": 7, "cirr": 8, "mscoco": 9, "flickr30k": 10,
}
# The 16 (dataset, task) pairs M-BEIR evaluates, as task ids per dataset; they name the val/test
# query files (mbeir_<dataset>_task<k>_<split>.jsonl), their qrels and the local pools.
MBEIR_EVAL_TASKS = {
    "visualnews": (0, 3), "fashion200k": (0, 3), "webqa": (1, 2), "edis": (2,), "nights": (4,),
    "oven": (6, 8), "infoseek": (6, 8), "fashioniq": (7,), "cirr": (7,), "mscoco": (0, 3),
}

# ---- modalities and tasks -------------------------------------------------------------------
# The modality code is GENIUS's level-0 ID token: 0 image, 1 text, 2 image+text.
MODALITIES = ("image", "text", "image,text")
MODALITY_CODE = {name: code for code, name in enumerate(MODALITIES)}

# M-BEIR task id -> (query modality, candidate modality). Task 5 is not a valid M-BEIR task.
TASKS = {
    0: ("text", "image"), 1: ("text", "text"), 2: ("text", "image,text"),
    3: ("image", "text"), 4: ("image", "image"),
    6: ("image,text", "text"), 7: ("image,text", "image"), 8: ("image,text", "image,text"),
}
TASK_ID = {pair: task for task, pair in TASKS.items()}
TASK_SHORT = {0: "qt→ci", 1: "qt→ct", 2: "qt→(ci,ct)", 3: "qi→ct", 4: "qi→ci",
              6: "(qi,qt)→ct", 7: "(qi,qt)→ci", 8: "(qi,qt)→(ci,ct)"}


class DataFormatError(ValueError):
    """A record or file that does not follow the M-BEIR format; the message names file and line."""


def parse_id(text: object, base: int, what: str) -> tuple[int, int]:
    """``"dataset:n"`` -> (dataset, n), checked against UniIR's hashing range."""
    match = _ID_RE.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"{what} {text!r} is not of the form 'dataset_id:index' (two whole numbers in ASCII "
                         "digits, without leading zeros, as M-BEIR writes them)")
    dataset, index = int(match.group(1)), int(match.group(2))
    if index >= base:
        raise ValueError(f"{what} {text!r}: index {index} does not fit UniIR's hashing (must be < {base})")
    if dataset > (_INT64_MAX - index) // base:
        raise ValueError(f"{what} {text!r}: dataset id {dataset} does not fit UniIR's hashing in 64 bits (must be "
                         f"<= {(_INT64_MAX - base + 1) // base})")
    return dataset, index


def hash_qid(qid: str) -> int:
    dataset, index = parse_id(qid, QID_BASE, "qid")
    return dataset * QID_BASE + index


def hash_did(did: str) -> int:
    dataset, index = parse_id(did, DID_BASE, "did")
    return dataset * DID_BASE + index


def unhash_qid(hashed: int) -> str:
    return f"{int(hashed) // QID_BASE}:{int(hashed) % QID_BASE}"


def unhash_did(hashed: int) -> str:
    return f"{int(hashed) // DID_BASE}:{int(hashed) % DID_BASE}"


def format_string(text: str | None) -> str:
    """UniIR's text normalisation: strip, drop quotes, capitalise, end with punctuation."""
    text = (text or "").replace("\r", "").strip().strip('"').strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    if text[-1] not in ".?!":
        text += "."
    return text


# ---- records --------------------------------------------------------------------------------
@dataclass
class Query:
    qid: str
    text: str  # raw query text ("" when absent), without instruction
    img_path: str | None
    modality: str
    pos: list[str]
    neg: list[str] = field(default_factory=list)
    task_id: int | None = None
    # exclude_cand_list: candidates never to return for this query (its own image in a gallery that
    # holds it, the metric-learning protocol); absent in M-BEIR's files
    exclude: list[str] = field(default_factory=list)

    @property
    def hashed(self) -> int:
        return hash_qid(self.qid)

    @property
    def dataset_id(self) -> int:
        return int(self.qid.split(":")[0])


@dataclass
class Candidate:
    did: str
    text: str
    img_path: str | None
    modality: str

    @property
    def hashed(self) -> int:
        return hash_did(self.did)


def lacks_text(obj: object, modality_key: str, text_key: str) -> bool:
    """A record whose modality includes text but whose text is empty once normalised
    (``format_string``: what the text encoder would see). Extraction's ``data.empty_text``
    decides whether such a row is an error or left out; later stages read the files as it did."""
    if not isinstance(obj, dict) or obj.get(modality_key) not in MODALITY_CODE or "text" not in obj[modality_key]:
        return False
    text = obj.get(text_key)
    return not (isinstance(text, str) and format_string(text))


def empty_text_problem(key: str, value: str) -> str:
    return f"{key} is {value!r} but the text is empty"


def _check_modality(value: object, key: str, text: object, img: object, text_required: bool = True) -> list[str]:
    if value not in MODALITY_CODE:
        return [f"{key} {value!r} is not one of {', '.join(map(repr, MODALITIES))}"]
    problems = []
    if "text" in value and text_required and not (isinstance(text, str) and format_string(text)):
        problems.append(empty_text_problem(key, value))
    if "image" in value and not (isinstance(img, str) and img):
        problems.append(f"{key} is {value!r} but there is no image path")
    return problems


def query_problems(obj: object, text_required: bool = True) -> list[str]:
    """Everything wrong with one query record (empty list when it is valid); ``text_required=False``
    accepts an empty text where the modality has one (``lacks_text``)."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    problems = [f"missing field '{k}'" for k in ("qid", "query_modality", "pos_cand_list") if k not in obj]
    if problems:
        return problems
    try:
        parse_id(obj["qid"], QID_BASE, "qid")
    except ValueError as err:
        problems.append(str(err))
    for key in ("query_txt", "query_img_path"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            problems.append(f"{key} must be a string or null, got {type(obj[key]).__name__}")
    problems += _check_modality(obj["query_modality"], "query_modality", obj.get("query_txt"), obj.get("query_img_path"),
                                text_required)
    for key in ("pos_cand_list", "neg_cand_list", "exclude_cand_list"):
        value = obj.get(key, [])
        if not isinstance(value, list):
            problems.append(f"{key} must be a list of did strings")
            continue
        for did in value:
            try:
                parse_id(did, DID_BASE, f"{key} entry")
            except ValueError as err:
                problems.append(str(err))
    excluded = obj.get("exclude_cand_list", [])
    if isinstance(excluded, list) and isinstance(obj["pos_cand_list"], list):
        both = [did for did in excluded if did in obj["pos_cand_list"]]
        if both:
            problems.append(f"exclude_cand_list entry {both[0]} is also in pos_cand_list: a candidate that is never "
                            "returned cannot be relevant; remove it from one of the two lists")
    task = obj.get("task_id")
    if task is not None and task not in TASKS:
        problems.append(f"task_id {task!r} is not an M-BEIR task id ({', '.join(map(str, TASKS))})")
    elif task is not None and obj["query_modality"] in MODALITY_CODE and TASKS[task][0] != obj["query_modality"]:
        problems.append(f"task_id {task} is {TASKS[task][0]} -> {TASKS[task][1]} but query_modality is {obj['query_modality']!r}")
    return problems


def candidate_problems(obj: object, text_required: bool = True) -> list[str]:
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    problems = [f"missing field '{k}'" for k in ("did", "modality") if k not in obj]
    if problems:
        return problems
    try:
        parse_id(obj["did"], DID_BASE, "did")
    except ValueError as err:
        problems.append(str(err))
    for key in ("txt", "img_path"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            problems.append(f"{key} must be a string or null, got {type(obj[key]).__name__}")
    problems += _check_modality(obj["modality"], "modality", obj.get("txt"), obj.get("img_path"), text_required)
    return problems


def text_lines(path: str | os.PathLike,
               on_error: Callable[[int, str], None] | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of a UTF-8 file. A line that is not UTF-8 raises naming
    file and line (Python's own error names neither), or goes to ``on_error(lineno, message)``
    and is skipped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                message = f"not valid UTF-8 (byte {err.start + 1} of the line); save the file as UTF-8"
                if on_error is None:
                    raise DataFormatError(f"{path}:{lineno}: {message}") from None
                on_error(lineno, message)


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for each non-blank line; bad JSON raises naming file and line."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None


def _record_or_raise(path, lineno, obj, check) -> None:
    problems = check(obj)
    if problems:
        raise DataFormatError(f"{path}:{lineno}: {problems[0]}")


def empty_file_error(path: str | os.PathLike, what: str = "one JSON record per line") -> DataFormatError:
    return DataFormatError(f"{path}: empty file (no records); it should hold {what}: check that it was "
                           "downloaded or written completely")


def missing_image(rel: str, root: Path) -> str | None:
    """What is wrong with the image path ``rel`` under ``root`` (None: it is a file)."""
    full = root / rel
    if full.is_file():
        return None
    if full.is_dir():
        return f"image {rel} is a folder under {root}, not an image file"
    return f"image {rel} does not exist under {root}"


def _check_image(path, lineno: int, rel: str | None, image_root: Path | None) -> None:
    problem = None if rel is None or image_root is None else missing_image(rel, image_root)
    if problem:
        raise DataFormatError(f"{path}:{lineno}: {problem}; restore the image or check that data.root is the "
                              "folder the image paths are relative to")


def first_line_with(path, key: str, value: str) -> int | None:
    """The line of the first record whose ``key`` is ``value`` (only read again to name a duplicate)."""
    for lineno, obj in iter_jsonl(path):
        if isinstance(obj, dict) and obj.get(key) == value:
            return lineno
    return None


def _canonical(line: str) -> int:
    return hash(json.dumps(json.loads(line), sort_keys=True))


def iter_queries(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 on_empty_text: Callable[[int, str, str], None] | None = None) -> Iterator[Query]:
    """The query records of a jsonl file, validated; every problem raises naming file and line.

    A qid may repeat only as an exact copy of its first record (UniIR's up-sampled training file
    repeats queries that way, and the copies are yielded, since they weight training); a repeat
    with a different record is an error. An empty file is an error. With ``image_root`` every
    query image must exist under it. A record whose modality has text but whose text is empty
    (``lacks_text``) is an error, or, with ``on_empty_text(lineno, qid, problem)``, handed to it
    and not yielded (the callback may raise)."""
    image_root = Path(image_root) if image_root is not None else None
    seen: dict[int, int] = {}  # hashed qid -> hash of its first line (canonical JSON when copies differ in layout)
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        empty = on_empty_text is not None and lacks_text(obj, "query_modality", "query_txt")
        _record_or_raise(path, lineno, obj, lambda o: query_problems(o, text_required=not empty))
        hashed, digest = hash_qid(obj["qid"]), hash(line.strip())
        first = seen.get(hashed)
        if first is None:
            seen[hashed] = digest
        elif first != digest:
            first_line = first_line_with(path, "qid", obj["qid"])
            if first_line is None or _canonical(_line_of(path, first_line)) != _canonical(line):
                raise DataFormatError(
                    f"{path}:{lineno}: qid {obj['qid']} appears again with a different record (first on line "
                    f"{first_line}); give each query its own qid (only an exact copy may repeat, as up-sampling does)")
        if empty:
            on_empty_text(lineno, obj["qid"], empty_text_problem("query_modality", obj["query_modality"]))
            continue
        img = obj.get("query_img_path") or None
        _check_image(path, lineno, img, image_root)
        yield Query(
            qid=obj["qid"], text=obj.get("query_txt") or "", img_path=img,
            modality=obj["query_modality"], pos=list(obj["pos_cand_list"]), neg=list(obj.get("neg_cand_list") or []),
            task_id=obj.get("task_id"), exclude=list(obj.get("exclude_cand_list") or []),
        )
    if not seen:
        raise empty_file_error(path, "one query record per line")


def _line_of(path, lineno: int) -> str:
    for n, line in text_lines(path):
        if n == lineno:
            return line
    raise DataFormatError(f"{path}: line {lineno} is gone (the file changed while it was read)")


def load_queries(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[Query]:
    return list(iter_queries(path, image_root))


def iter_candidates(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                    on_empty_text: Callable[[int, str, str], None] | None = None) -> Iterator[Candidate]:
    """The candidate records of a pool jsonl file, validated; every problem raises naming file and
    line: a did that repeats, an empty file, and (with ``image_root``) an image that does not exist.
    An empty text where the modality has one is an error too, or, with ``on_empty_text(lineno,
    did, problem)``, handed to it and not yielded (as ``iter_queries``)."""
    image_root = Path(image_root) if image_root is not None else None
    seen: set[int] = set()
    for lineno, obj in iter_jsonl(path):
        empty = on_empty_text is not None and lacks_text(obj, "modality", "txt")
        _record_or_raise(path, lineno, obj, lambda o: candidate_problems(o, text_required=not empty))
        hashed = hash_did(obj["did"])
        if hashed in seen:
            raise _duplicate_did(path, lineno, obj["did"], first_line_with(path, "did", obj["did"]))
        seen.add(hashed)
        if empty:
            on_empty_text(lineno, obj["did"], empty_text_problem("modality", obj["modality"]))
            continue
        img = obj.get("img_path") or None
        _check_image(path, lineno, img, image_root)
        yield Candidate(did=obj["did"], text=obj.get("txt") or "", img_path=img, modality=obj["modality"])
    if not seen:
        raise empty_file_error(path, "one candidate record per line")


def _duplicate_did(path, lineno: int, did: str, first_line: int | None) -> DataFormatError:
    return DataFormatError(f"{path}:{lineno}: did {did} appears more than once in this pool (first on line "
                           f"{first_line}); every candidate needs its own did")


@dataclass
class PoolIndex:
    """The part of a candidate pool that fits in RAM at M-BEIR scale: hashed ids and modalities.

    The 5.6M-candidate union pool takes about 50 MB here (int64 id + int8 modality per item).
    """

    path: Path
    ids: np.ndarray  # int64 [N], hashed dids in file order
    modality: np.ndarray  # int8 [N], MODALITY_CODE

    def __len__(self) -> int:
        return len(self.ids)

    def modality_of(self) -> dict[int, int]:
        return dict(zip(self.ids.tolist(), self.modality.tolist()))


_DID_FIELD = re.compile(r'"did"\s*:\s*"([^"]*)"')
_MOD_FIELD = re.compile(r'"modality"\s*:\s*"([^"]*)"')


def load_pool_index(path: str | os.PathLike) -> PoolIndex:
    """Stream a candidate pool keeping only ids and modalities.

    A full JSON parse of each line is the slow part on the 2.4 GB union pool, so the two fields
    are pulled out with a regex; a line where that fails falls back to the validating parser,
    which then names what is wrong.
    """
    ids, mods, lines = array("q"), array("b"), array("q")
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        did_m, mod_m = _DID_FIELD.search(line), _MOD_FIELD.search(line)
        try:
            ids.append(hash_did(did_m.group(1)))
            mods.append(MODALITY_CODE[mod_m.group(1)])
            lines.append(lineno)
        except (AttributeError, KeyError, ValueError):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
            _record_or_raise(path, lineno, obj, candidate_problems)
            raise DataFormatError(f"{path}:{lineno}: could not read did and modality") from None
    if not ids:
        raise empty_file_error(path, "one candidate record per line")
    index = PoolIndex(Path(path), np.frombuffer(ids, dtype=np.int64).copy(), np.frombuffer(mods, dtype=np.int8).copy())
    order = np.argsort(index.ids, kind="stable")
    repeated = np.flatnonzero(index.ids[order][1:] == index.ids[order][:-1])
    if len(repeated):
        # Among the repeats, the one that comes first in the file is the one to name.
        first_dup, first_orig = min((order[k + 1], order[k]) for k in repeated)
        raise _duplicate_did(path, lines[first_dup], unhash_did(index.ids[first_dup]), lines[first_orig])
    return index


# ---- qrels ----------------------------------------------------------------------------------
@dataclass
class Qrels:
    relevant: dict[str, set[str]]  # qid -> relevant dids
    task_of: dict[str, int]  # qid -> task id


def parse_qrels_line(parts: list[str]) -> tuple[str, str, int, int]:
    """The whitespace-split fields of one qrels line -> (qid, did, relevance, task id).

    Raises ValueError saying what is wrong (without file and line, which the caller knows).
    """
    if len(parts) != 5:
        raise ValueError(f"expected 5 fields 'qid 0 did relevance task_id', got {len(parts)}")
    qid, _, did, rel, task = parts
    parse_id(qid, QID_BASE, "qid")
    parse_id(did, DID_BASE, "did")
    try:
        rel_value, task_value = int(rel), int(task)
    except ValueError:
        raise ValueError(f"relevance {rel!r} and task_id {task!r} must be integers (the line reads "
                         "'qid 0 did relevance task_id', e.g. '9:1 0 9:5 1 0')") from None
    if task_value not in TASKS:
        raise ValueError(f"task_id {task_value} is not an M-BEIR task id")
    return qid, did, rel_value, task_value


def qrels_lines(path: str | os.PathLike, on_error: Callable[[int, list[str], str], None] | None = None
                ) -> Iterator[tuple[int, str, str, int, int]]:
    """(line number, qid, did, relevance, task_id) of every qrels line; a malformed line raises
    naming file and line, or is handed to ``on_error(lineno, fields, message)`` and skipped."""
    not_text = None if on_error is None else (lambda lineno, message: on_error(lineno, [], message))
    for lineno, line in text_lines(path, not_text):
        parts = line.split()
        if not parts:
            continue
        try:
            yield (lineno, *parse_qrels_line(parts))
        except ValueError as err:
            if on_error is None:
                raise DataFormatError(f"{path}:{lineno}: {err}") from None
            on_error(lineno, parts, str(err))


def load_qrels(path: str | os.PathLike, on_error: Callable[[int, list[str], str], None] | None = None) -> Qrels:
    """M-BEIR qrels: ``qid 0 did relevance task_id``; relevance > 0 counts as relevant.

    A malformed line raises naming file and line, or, with ``on_error(lineno, fields, message)``,
    is handed to it and skipped (check-data collects every problem instead of stopping). A file
    without a single line raises too (without ``on_error``; check-data reports it itself)."""
    relevant: dict[str, set[str]] = {}
    task_of: dict[str, int] = {}
    for _, qid, did, rel, task in qrels_lines(path, on_error):
        task_of[qid] = task
        if rel > 0:
            relevant.setdefault(qid, set()).add(did)
    if not task_of and on_error is None:
        raise empty_file_error(path, "one line 'qid 0 did relevance task_id' per relevant candidate")
    return Qrels(relevant, task_of)


# ---- instructions ---------------------------------------------------------------------------
InstructionMode = Literal["deterministic", "random", "first", "none"]


@dataclass
class Instructions:
    """``query_instructions.tsv``: prompts per (dataset id, query modality, candidate modality)."""

    prompts: dict[tuple[int, str, str], list[str]]
    dataset_names: dict[int, str]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Instructions":
        prompts: dict[tuple[int, str, str], list[str]] = {}
        names: dict[int, str] = {}
        rows = list(csv.reader((line for _, line in text_lines(path)), delimiter="\t"))
        if not rows:
            raise DataFormatError(f"{path}:1: empty instructions file (expected a header row)")
        for lineno, row in enumerate(rows[1:], 2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < 5:
                raise DataFormatError(f"{path}:{lineno}: expected at least 5 tab-separated columns "
                                      "(query_modality, cand_modality, dataset_name, dataset_id, prompt_1...), "
                                      f"got {len(row)}")
            qmod, cmod, name, dataset = row[0].strip(), row[1].strip(), row[2].strip(), row[3].strip()
            for key, mod in (("query_modality", qmod), ("cand_modality", cmod)):
                if mod not in MODALITY_CODE:
                    raise DataFormatError(f"{path}:{lineno}: {key} {mod!r} is not one of {', '.join(MODALITIES)}")
            if not dataset.isdigit():
                raise DataFormatError(f"{path}:{lineno}: dataset_id {dataset!r} is not an integer")
            variants = [cell.strip() for cell in row[4:] if cell.strip()]
            if not variants:
                raise DataFormatError(f"{path}:{lineno}: no instruction text in columns 5 and later")
            prompts[(int(dataset), qmod, cmod)] = variants
            names[int(dataset)] = name
        return cls(prompts, names)

    def variants(self, dataset_id: int, query_modality: str, cand_modality: str) -> list[str]:
        key = (dataset_id, query_modality, cand_modality)
        if key not in self.prompts:
            raise KeyError(f"no instruction for dataset {dataset_id}, {query_modality} -> {cand_modality}; "
                           f"the instructions file has {sorted(self.prompts)}")
        return self.prompts[key]

    def choose(self, qid: str, query_modality: str, cand_modality: str, mode: InstructionMode = "deterministic",
               rng: random.Random | None = None) -> str:
        """The instruction for one query.

        ``deterministic`` (default) picks a variant from a stable hash of the qid, so every process
        count and batch size gives the same text; ``random`` is UniIR's draw from ``rng``;
        ``first`` always takes prompt_1 (pyserini's choice); ``none`` disables instructions.
        """
        if mode == "none":
            return ""
        variants = self.variants(int(qid.split(":")[0]), query_modality, cand_modality)
        if mode == "first":
            return variants[0]
        if mode == "random":
            return (rng or random).choice(variants)
        return variants[zlib.crc32(qid.encode()) % len(variants)]


def query_text_with_instruction(instruction: str, query_text: str) -> str:
    """UniIR's query text: format_string("<instruction> <query text>")."""
    return format_string(f"{instruction} {query_text}".strip())


def target_modality(query: Query, pool_modality: dict[int, int] | None = None) -> str:
    """The candidate modality a query asks for: from its task id, else from its first positive."""
    if query.task_id is not None:
        return TASKS[query.task_id][1]
    if pool_modality is None:
        raise ValueError(f"query {query.qid} has no task_id; pass the pool's modalities to find its target modality")
    for did in query.pos:
        code = pool_modality.get(hash_did(did))
        if code is not None:
            return MODALITIES[code]
    raise ValueError(f"query {query.qid}: none of its positives is in the candidate pool")


# ---- file naming ----------------------------------------------------------------------------
# Where the union ("global") pools mbeir_union_{train,val,test}_cand_pool.jsonl live: the current
# M-BEIR revision has cand_pool/global/, an older one called the same folder cand_pool/union_pool/.
UNION_POOL_DIRS = ("cand_pool/global", "cand_pool/union_pool")


def union_pool_path(root: str | os.PathLike, split: str) -> Path:
    """The union pool of a split under an M-BEIR root, in whichever of UNION_POOL_DIRS holds it.

    When neither does, the current name (under cand_pool/global/) is returned, so a message about
    the missing file names the folder today's M-BEIR uses.
    """
    name = f"mbeir_union_{split}_cand_pool.jsonl"
    paths = [Path(root) / folder / name for folder in UNION_POOL_DIRS]
    return next((path for path in paths if path.is_file()), paths[0])


def older_revision_twin(path: str | os.PathLike) -> Path:
    """``path`` as configured, or its twin under ``cand_pool/union_pool/`` when only that exists.

    Every stage's defaults name today's ``cand_pool/global/``; a root of the older M-BEIR
    revision then works unchanged, and a path found in neither folder keeps its configured name
    for the error message."""
    path = Path(path)
    parts = path.parts
    for i in range(1, len(parts)):
        if parts[i - 1] == "cand_pool" and parts[i] == "global" and not path.exists():
            twin = Path(*parts[:i], "union_pool", *parts[i + 1:])
            return twin if twin.exists() else path
    return path


_QUERY_FILE = re.compile(r"^mbeir_(?P<dataset>[a-z0-9]+)_task(?P<task>\d+)_(?P<split>train|val|test)\.jsonl$")


def parse_query_file_name(path: str | os.PathLike) -> tuple[str, int, str] | None:
    """``mbeir_mscoco_task0_test.jsonl`` -> ("mscoco", 0, "test"); None for other names."""
    match = _QUERY_FILE.match(Path(path).name)
    return (match["dataset"], int(match["task"]), match["split"]) if match else None
