"""genius extract: embed queries and candidate pools into embedding stores (stage 0).

For one data root it writes, under ``<output.root>/<encoder.name>/``:
  train/  the training queries and the training pool,
  test/   every test query file,
  cand/   every local pool, and the union pool assembled from the local stores (nothing is
          embedded twice: rows are copied in the union file's order; a union did that no local
          store holds is an error).

A source file is cut into chunks of ``output.chunk_rows`` rows; rank r of W embeds chunks
i with i % W == r and writes each as a part (``genius.common.store.write_part``). Finished parts
are kept when a run is interrupted (even by kill -9), so a re-run embeds only what is missing;
rank 0 merges the parts once every rank is done. Duplicate ids in a source file (UniIR's
up-sampled training queries repeat qids) keep their first occurrence. A chunk whose encoder inputs
equal a chunk embedded earlier in the run is copied from its part (``EmbeddedChunks``). A record
whose text is empty where its modality has one stops the run at its file:line, or with
``data.empty_text: skip`` is left out of the store and recorded in its meta.json (``EmptyTexts``).

Run state, per store (``genius.common.runstate``). Each store has a run key: the semantic config
(every key but ``NOT_IN_RUN_KEY``: which files to read, output paths, runtime settings, and the
encoder section, which its fingerprint stands for), and the fingerprints of its inputs: the
source jsonl by content, one digest of every image file it references (path relative to the data
root, size, mtime), the encoder (weights by content, architecture, precision), for queries the
instructions file and the target pools by content; the union store's inputs are its jsonl and
the content ids of the local stores it is assembled from. All paths are relative to
$GENIUS_ROOT, so a copied or moved root (times kept) is still done.

- skip: the store's meta.json records the same key and the store opens cleanly (sizes, shapes,
  and its content fingerprint when small: ``EmbeddingStore.open``); the log says "up to date";
- resume: parts on disk whose ``inputs.json`` records the same key are kept;
- otherwise the store is extracted again, one log line saying what changed (a replaced image, a
  new checkpoint...), and parts of another key are discarded. A store is derived data and may be
  17 GB, so the old one is replaced, not archived under ``stale/``;
- ``output.force: true`` re-extracts every store (and ignores parts on disk).

One writer: the main process holds the lock of ``<output.root>/<encoder.name>/`` for the whole
run. A second extraction into the same folder exits at once (status 2) naming the holder
(process id, host, start time) instead of waiting: waiting would silently redo or race on the
same stores. The lock of a killed run is taken over.

Runs as ``genius extract --config F`` or, for several processes, ``torchrun --nproc_per_node N
-m genius.feature_extraction.extract --config F`` (gloo on CPU, NCCL on GPU; same stores).

Test hook: the environment variable GENIUS_EXTRACT_STOP_AFTER_PARTS=N makes each process stop
with exit status 3 after writing N parts, as if killed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from genius.common.config import config_to_dict, resolve_path
from genius.common.config_checks import check_dir, check_file, check_output_dir
from genius.common.distributed import (
    barrier, cleanup, gather_to_main, init_distributed, recheck_threads, set_cpu_threads, transformer_op_macs,
)
from genius.common.io import atomic_write_json, sha256_json
from genius.common.mbeir import (
    DataFormatError,
    hash_did,
    hash_qid,
    iter_candidates,
    iter_queries,
    load_pool_index,
    older_revision_twin,
    target_modality,
    unhash_did,
)
from genius.common.progress import Progress
from genius.common.ranges import BATCH, THREADS, check_ranges, ranged
from genius.common.runstate import RunKey, acquire_lock, file_content, files_digest, release_lock
from genius.common.stage import (
    MetricsLog, one_line, parse_stage_config, record_run, setup_logging, stage_parser, user_errors_exit,
)
from genius.common.store import (
    FORMAT_VERSION,
    SKIPPED_META,
    EmbeddingStore,
    StoreArrays,
    StoreError,
    finished_parts,
    merge_parts,
    part_path,
    parts_dir,
    read_meta,
    store_path,
    store_writer,
    write_part,
)
from genius.feature_extraction.clip_model import ImageReader
from genius.feature_extraction.encoders import Encoder, EncoderConfig, build_encoder
from genius.feature_extraction.items import InstructionConfig, Item, QueryText, candidate_item, query_item

log = logging.getLogger("genius.extract")
STOP_AFTER_PARTS_ENV = "GENIUS_EXTRACT_STOP_AFTER_PARTS"
UNION_STEM = "mbeir_union_test_cand_pool"


# ---- config --------------------------------------------------------------------------------
@dataclass
class DataConfig:
    root: str = "M-BEIR"  # relative to the repository root, or absolute
    # The files below are relative to data.root; null skips that source.
    train_queries: str | None = "query/union_train/mbeir_union_up_train.jsonl"
    train_pool: str | None = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
    test_queries: list[str] | None = None  # null: every query/test/*.jsonl
    local_pools: list[str] | None = None  # null: every cand_pool/local/*.jsonl
    union_pool: str | None = "cand_pool/global/mbeir_union_test_cand_pool.jsonl"
    instructions: str = "instructions/query_instructions.tsv"
    # A query or candidate whose modality has text but whose text is empty (or only blanks):
    # "error" stops at its file:line; "skip" leaves it out of the store, counts it in the log and
    # the store's meta.json, and eval reports the count (README, "Empty texts").
    empty_text: Literal["error", "skip"] = "error"


@dataclass
class OutputConfig:
    root: str = "extracted_embed"
    chunk_rows: int = ranged(8192, ">= 1")  # rows per part: the unit of work, of resuming and of rank assignment
    force: bool = False  # extract every store again, even those whose meta.json records the same run key


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = ranged(256, BATCH)
    num_workers: int = ranged(4, "[0, 1024]")  # image decoding processes (0: decode in the main process)
    cpu_threads: int | None = ranged(None, THREADS)  # CPU torch threads (null: common.distributed.ThreadPolicy)


@dataclass
class ExtractConfig:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    instructions: InstructionConfig = field(default_factory=InstructionConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# Config keys a store's content does not depend on: which files to read (each store's key holds
# its own inputs by content instead), where outputs go, how fast it runs, and the encoder section
# (the encoder's fingerprint, an input, stands for it). Candidate stores ignore ``instructions``.
# ``data.empty_text`` is left out too: a file without empty texts gives the same store under both
# settings, and one with them has no store under "error".
NOT_IN_RUN_KEY = ("data", "encoder", "output.root", "output.force", "runtime")


def check_config(cfg: ExtractConfig) -> None:
    """Every number in its declared range and every input path the config names present (before
    any work; one-line errors naming the dotted key and the allowed range)."""
    check_ranges(cfg)
    check_dir("data.root", resolve_path(cfg.data.root), "M-BEIR-format data root")
    cfg.encoder.check_inputs()


# ---- jobs: one per store -------------------------------------------------------------------
@dataclass
class Job:
    split: str  # train | test | cand
    kind: Literal["query", "candidate"]
    source: Path
    store: Path
    target_pools: tuple[Path, ...] = ()  # queries without task_id take their target modality from these


def _listed_or_all(root: Path, listed: list[str] | None, folder: str, key: str) -> list[tuple[Path, str]]:
    """(file, config key naming it) for every listed file, or every *.jsonl in ``folder``."""
    if listed is not None:
        return [(root / name, f"{key}[{i}]") for i, name in enumerate(listed)]
    found = sorted((root / folder).glob("*.jsonl"))
    if not found:
        raise FileNotFoundError(f"{key}: null takes every *.jsonl in {root / folder}, but there is none; "
                                f"list the files in {key} instead")
    return [(path, key) for path in found]


def plan_jobs(cfg: ExtractConfig) -> tuple[list[Job], Job | None]:
    """The stores to write, in order, and the union job (built from the local stores) if any."""
    root = resolve_path(cfg.data.root)
    out = resolve_path(cfg.output.root)
    name = cfg.encoder.name
    d = cfg.data

    def job(split: str, kind: str, source: Path, key: str, target_pools=(), found: bool = False) -> Job:
        if not source.is_file():  # found: taken from a folder because the key is null
            what = ("is a folder, not a jsonl file" if source.is_dir() else
                    "is a link to nothing (or a loop of links)" if source.is_symlink() else
                    "is not a regular file" if source.exists() else "does not exist")
            fix = (f"move it out of {source.parent} or list the files in {key}" if found else
                   f"fix {key} or remove it from the list" if key.endswith("]") else
                   f"fix {key} or set it to null to skip it")
            raise FileNotFoundError(f"{key}: {source} {what} (data.root is {root}); {fix}")
        return Job(split, kind, source, store_path(out, name, split, source), tuple(target_pools))

    jobs: list[Job] = []
    train_pool = older_revision_twin(root / d.train_pool) if d.train_pool else None
    if train_pool is not None:
        jobs.append(job("train", "candidate", train_pool, "data.train_pool"))
    if d.train_queries:
        jobs.append(job("train", "query", root / d.train_queries, "data.train_queries",
                        [train_pool] if train_pool else []))
    local_pools = _listed_or_all(root, d.local_pools, "cand_pool/local", "data.local_pools")
    union = older_revision_twin(root / d.union_pool) if d.union_pool else None
    test_targets = [union] if union is not None and union.is_file() else [p for p, _ in local_pools]
    jobs += [job("test", "query", q, key, test_targets, found=d.test_queries is None)
             for q, key in _listed_or_all(root, d.test_queries, "query/test", "data.test_queries")]
    jobs += [job("cand", "candidate", p, key, found=d.local_pools is None) for p, key in local_pools]
    union_job = None
    if union is not None:
        if not local_pools:
            raise ValueError("data.union_pool: set, but there are no local pools to build it from; "
                             "list them in data.local_pools or set data.union_pool to null")
        union_job = job("cand", "candidate", union, "data.union_pool")
        union_job.store = union_job.store.with_name(UNION_STEM)
    return jobs, union_job


# ---- embedding -----------------------------------------------------------------------------
@dataclass
class Chunk:
    start: int  # source rows [start, stop)
    stop: int
    items: list[Item]

    def inputs_key(self) -> str:
        """What the encoder is given for this chunk, in order: each text (after instructions) and
        image path. Within one run the data root is one, so a path names one image file."""
        return sha256_json([[item.text, item.img_path] for item in self.items])


class _Images(Dataset):
    """(row in its chunk, uint8 crop) of every item with an image; decoded in DataLoader workers.
    An image that cannot be read comes back as its error message, raised in the main process:
    torch would wrap a worker's exception in its traceback text, which is no message for a user."""

    def __init__(self, entries: list[tuple[int, str]], reader: ImageReader):
        self.entries, self.reader = entries, reader

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        row, path = self.entries[i]
        try:
            return row, self.reader(path)
        except (OSError, ValueError) as err:
            return row, one_line(err)


def _collate(batch: list[tuple[int, torch.Tensor | str]]) -> tuple[list[int], torch.Tensor | str]:
    rows, pixels = zip(*batch)
    errors = [p for p in pixels if isinstance(p, str)]
    return list(rows), errors[0] if errors else torch.stack(pixels)


def embed_chunks(chunks: list[Chunk], encoder: Encoder, reader: ImageReader | None, batch_size: int,
                 num_workers: int, progress: Progress | None = None) -> Iterator[tuple[Chunk, StoreArrays]]:
    """Each chunk with its raw vectors and masks (a missing modality: zero vector, mask 0).
    ``progress`` advances by one per text or image embedded, batch by batch.

    One DataLoader decodes the images of all chunks (batches never straddle two chunks), so its
    workers start once per source file and keep decoding ahead across chunk boundaries.
    """
    entries = [(row, item.img_path) for chunk in chunks for row, item in enumerate(chunk.items) if item.img_path]
    if entries and reader is None:
        raise ValueError(f"encoder {encoder.name!r} has no image side but a record has an image "
                         f"({entries[0][1]}); use a clip_sf encoder")
    batches, per_chunk, first = [], [], 0  # entries are in chunk order: chunk k's are contiguous
    for chunk in chunks:
        last = first + sum(1 for item in chunk.items if item.img_path)
        per_chunk.append(-(-(last - first) // batch_size))
        batches += [list(range(b, min(b + batch_size, last))) for b in range(first, last, batch_size)]
        first = last
    # Pinned batches on a GPU, so the encoder's non_blocking upload is an asynchronous DMA copy
    # (from pageable memory it is staged through a pinned buffer and blocks the host).
    images = iter(DataLoader(_Images(entries, reader), batch_sampler=batches, num_workers=num_workers,
                             collate_fn=_collate, pin_memory=encoder.device.type == "cuda")) if batches else iter(())
    for k, chunk in enumerate(chunks):
        recheck_threads()
        items = chunk.items
        img = np.zeros((len(items), encoder.dim), np.float32)
        txt = np.zeros((len(items), encoder.dim), np.float32)
        text_rows = [i for i, item in enumerate(items) if item.text]
        if text_rows:
            txt[text_rows] = encoder.encode_texts([items[i].text for i in text_rows], batch_size,
                                                  progress.update if progress is not None else None)
        for _ in range(per_chunk[k]):
            rows, pixels = next(images)
            if isinstance(pixels, str):
                raise ValueError(pixels)
            img[rows] = encoder.embed_pixels(pixels).numpy()
            if progress is not None:
                progress.update(len(rows))
        yield chunk, chunk_arrays(items, img, txt)


def chunk_arrays(items: list[Item], img: np.ndarray, txt: np.ndarray) -> StoreArrays:
    """A chunk's store rows: its vectors, and ids, masks and modalities from its items."""
    return StoreArrays(
        ids=np.array([item.id for item in items], np.int64), img=img, txt=txt,
        img_mask=np.array([item.img_path is not None for item in items], np.uint8),
        txt_mask=np.array([bool(item.text) for item in items], np.uint8),
        modality=np.array([item.modality for item in items], np.int8),
        target_modality=np.array([item.target_modality for item in items], np.int8))


class EmbeddedChunks:
    """The chunks this process embedded in this run, by their inputs (``Chunk.inputs_key``).

    A chunk whose inputs equal one embedded before (the same pool under two names, a query file
    whose texts are a pool's in the same order, a chunk repeated within a file) is not embedded
    again: its part is written from that chunk's vectors and its own ids, masks and modalities.
    The unit is the chunk, not the row, because a row's vector depends slightly on its batch mates
    (padding, GEMM blocking: for all-MiniLM-L6-v2 on CPU, 2 of 300 captions got other fp16 vectors
    when batched with 300 others), and a store must be byte-identical to what embedding its file
    alone gives.
    """

    def __init__(self) -> None:
        self.parts: dict[str, Path] = {}  # inputs key -> a part file holding its vectors

    def split(self, chunks: list[Chunk]) -> tuple[list[Chunk], list[Chunk]]:
        """(chunks to embed, chunks to copy once those are written)."""
        fresh, copies, keys = [], [], set(self.parts)
        for chunk in chunks:
            key = chunk.inputs_key()
            (copies if key in keys else fresh).append(chunk)
            keys.add(key)
        return fresh, copies

    def add(self, store: Path, chunks: list[Chunk]) -> None:
        """Chunks whose parts of ``store`` are written (parts stay on disk until the merge, after
        every store's parts are)."""
        for chunk in chunks:
            self.parts.setdefault(chunk.inputs_key(), part_path(store, chunk.start, chunk.stop))

    def copy(self, store: Path, chunk: Chunk) -> None:
        with np.load(self.parts[chunk.inputs_key()]) as part:
            img, txt = part["img"], part["txt"]
        write_part(store, chunk.start, chunk.stop, chunk_arrays(chunk.items, img, txt))


class ExtractionInterrupted(RuntimeError):
    pass


@dataclass
class Context:
    cfg: ExtractConfig
    encoder: Encoder
    reader: ImageReader | None
    query_text: QueryText
    rank: int
    world_size: int
    metrics: MetricsLog
    parts_written: int = 0
    stop_after: int | None = None
    held: list[dict] = field(default_factory=list)  # a rank > 0's metrics records, for rank 0 to write
    embedded: EmbeddedChunks = field(default_factory=EmbeddedChunks)

    def empty_texts(self, job: Job) -> EmptyTexts:
        return EmptyTexts(job.source, job.kind, self.cfg.data.empty_text)

    def record(self, **fields) -> None:
        """One metrics record of this rank. Only rank 0 appends to the file (concurrent appends from
        several hosts to one file on network storage can interleave or be lost); the other ranks
        hold theirs until :func:`_extract` hands them to rank 0, so a killed run loses only those."""
        entry = {"time": round(time.time(), 3), "rank": self.rank, **fields}
        if self.rank == 0:
            self.metrics.write(**entry)
        else:
            self.held.append(entry)

    def _key(self, kind: str, inputs: dict, **extra) -> RunKey:
        ins = self.cfg.instructions
        not_in = NOT_IN_RUN_KEY
        if kind == "candidate":
            not_in += ("instructions",)  # a candidate's text never carries an instruction
        elif ins.mode != "random":
            not_in += ("instructions.seed",)  # draws only in "random" mode
        return RunKey.of(self.cfg, not_in, {**inputs, "encoder": self.encoder.fingerprint},
                         format_version=FORMAT_VERSION, kind=kind, **extra)

    def run_key(self, job: Job) -> RunKey:
        """What the store of ``job`` depends on (module docstring)."""
        data_root = resolve_path(self.cfg.data.root)
        records = _unique_records(job, self.empty_texts(job), data_root)
        images = sorted({record.img_path for record in records if record.img_path})
        inputs = {"source": file_content(job.source), "images": files_digest([data_root / p for p in images], data_root)}
        if job.kind == "query":
            inputs["target_pools"] = [file_content(p) for p in job.target_pools]
            if self.cfg.instructions.mode != "none":
                inputs["instructions"] = file_content(data_root / self.cfg.data.instructions)
        return self._key(job.kind, inputs)

    def union_key(self, job: Job, local_stores: list[EmbeddingStore]) -> RunKey:
        """The union store holds the local stores' rows in the union file's order."""
        return self._key("candidate", {"source": file_content(job.source),
                                       "locals": {s.path.name: s.content_id for s in local_stores}}, built="union")

    def is_done(self, store: Path, key: RunKey) -> bool:
        """Whether ``store`` is a sound store made with ``key`` (and force is off); logs why not."""
        try:
            meta = read_meta(store)
        except StoreError as err:
            log.warning("%s; extracting it again", err)
            return False
        if meta is None:
            return False
        if self.cfg.output.force:
            log.info("%s: output.force is set; extracting it again", store)
            return False
        recorded = meta.get("run_key")
        if sha256_json(recorded) != key.digest:
            log.info("%s: extracting it again (%s)", store, key.changes_from(recorded))
            return False
        try:
            EmbeddingStore.open(store)  # sizes and shapes; the content fingerprint when small
        except StoreError as err:
            log.warning("%s; extracting it again", err)
            return False
        log.info("%s is up to date, skipping", store)
        self.record(store=str(store), status="up_to_date")
        return True


@dataclass
class EmptyTexts:
    """The records of one source file whose modality has text but whose text is empty
    (``data.empty_text``): "error" raises naming file:line; "skip" remembers them, for the log and
    the store's meta.json (eval reports the counts; the union pool leaves out what its local pools did)."""

    source: Path
    kind: str  # query | candidate
    mode: str  # error | skip
    first_line: dict[int, int] = field(default_factory=dict)  # hashed id -> line of its first record

    def __call__(self, lineno: int, record_id: str, problem: str) -> None:
        if self.mode == "error":
            raise DataFormatError(f"{self.source}:{lineno}: {problem} ({self.kind} {record_id}); write its text, or set "
                                  "data.empty_text: skip in the extract config to leave such rows out (counted in the "
                                  "log and the results)")
        self.first_line.setdefault(hash_qid(record_id) if self.kind == "query" else hash_did(record_id), lineno)

    def __len__(self) -> int:
        return len(self.first_line)

    def meta(self) -> dict:
        return {"rows": len(self), "ids": sorted(self.first_line), "first_lines": sorted(self.first_line.values())[:10]}


def _unique_records(job: Job, empty: EmptyTexts, image_root: Path | None = None) -> Iterator:
    """The source's records, first occurrence of each id only, less those with an empty text
    (``empty`` decides); with ``image_root``, a record whose image file is missing is an error
    naming its file:line."""
    seen: set[int] = set()
    read = iter_queries if job.kind == "query" else iter_candidates
    records = read(job.source, image_root=image_root, on_empty_text=empty)
    repeats = 0
    for record in records:
        if record.hashed not in seen:
            seen.add(record.hashed)
            yield record
        else:
            repeats += 1
    if repeats:  # exact copies (a copy that differs is an error of the reader)
        log.info("%s: %d records repeat an earlier record of the same id exactly; each id is embedded once",
                 job.source, repeats)


class _Targets:
    """Target modality of queries: task_id, else the pool entry of a positive (loaded on first need)."""

    def __init__(self, pools: tuple[Path, ...]):
        self.pools, self._modality = pools, None

    def __call__(self, query) -> str:
        if query.task_id is None and self._modality is None:
            self._modality = {}
            for pool in self.pools:
                self._modality.update(load_pool_index(pool).modality_of())
        return target_modality(query, self._modality)


def owned_chunks(job: Job, ctx: Context) -> tuple[int, list[Chunk], int, EmptyTexts]:
    """(rows of the store, this rank's chunks still to embed, this rank's chunks already on disk,
    the records left out for an empty text).

    Chunk i (rows [i*C, (i+1)*C)) belongs to rank i % world_size. Every rank reads the whole
    file (it has to count the rows) but builds items only for its own unfinished chunks.
    """
    size = ctx.cfg.output.chunk_rows
    done = finished_parts(job.store)
    targets = _Targets(job.target_pools)
    todo, reused, buffer, n = [], 0, [], 0

    def close(start: int) -> None:
        nonlocal reused
        index = start // size
        if index % ctx.world_size != ctx.rank:
            return
        if (start, start + len(buffer)) in done:
            reused += 1
        elif job.kind == "candidate":
            todo.append(Chunk(start, start + len(buffer), [candidate_item(c) for c in buffer]))
        else:
            rng = random.Random(f"{ctx.cfg.instructions.seed}:{job.source.name}:{index}")  # "random" mode only
            items = [query_item(q, t, ctx.query_text(q, t, rng)) for q in buffer for t in (targets(q),)]
            todo.append(Chunk(start, start + len(buffer), items))

    empty = ctx.empty_texts(job)
    for n, record in enumerate(_unique_records(job, empty), 1):
        buffer.append(record)
        if len(buffer) == size:
            close(n - size)
            buffer = []
    if buffer:
        close(n - len(buffer))
    return n, todo, reused, empty


def _prepare_parts(job: Job, key: RunKey, ctx: Context) -> None:
    """Rank 0 drops parts left by a run with another key (or all of them under output.force); every
    rank then sees only parts it may resume."""
    if ctx.rank == 0:
        folder = parts_dir(job.store)
        key_file = folder / "inputs.json"
        if folder.is_dir():
            try:
                recorded = json.loads(key_file.read_text()).get("key") if key_file.is_file() else None
            except (ValueError, AttributeError):
                recorded = None
            if ctx.cfg.output.force or sha256_json(recorded) != key.digest:
                reason = "output.force is set" if ctx.cfg.output.force else key.changes_from(recorded)
                log.info("discarding the parts of %s on disk (%s)", job.store, reason)
                shutil.rmtree(folder)
            elif finished_parts(job.store):
                log.info("%s: resuming from %d parts on disk", job.store, len(finished_parts(job.store)))
        if not key_file.is_file():
            atomic_write_json(key_file, {"key": key.as_dict(), "digest": key.digest})
    barrier()


@dataclass
class Pending:
    """A store whose parts are all written (once every rank is done) and wait for rank 0's merge."""

    job: Job
    rows: int
    key: RunKey
    empty: EmptyTexts


def embed_job(job: Job, ctx: Context) -> Pending | None:
    """Write this rank's parts of ``job``; None when the store is already up to date."""
    key = ctx.run_key(job)
    if ctx.is_done(job.store, key):
        return None
    _prepare_parts(job, key, ctx)
    started = time.time()
    num_rows, todo, reused, empty = owned_chunks(job, ctx)
    if num_rows == 0:
        raise StoreError(f"{job.source}: every one of its {len(empty)} records has an empty text (data.empty_text: "
                         "skip); write their texts or remove the file from the config")
    if len(empty) and ctx.rank == 0:
        what = "queries" if job.kind == "query" else "candidates"
        log.warning("%s: %d %s with an empty text left out of its store (data.empty_text: skip; first on line %d)",
                    job.source, len(empty), what, min(empty.first_line.values()))
    todo, copies = ctx.embedded.split(todo)
    cfg = ctx.cfg.runtime
    # Counted in embeddings (a text and an image are one each): a part can take minutes.
    inputs = sum(bool(item.text) + bool(item.img_path) for chunk in todo for item in chunk.items)
    progress = Progress(inputs, f"extract: {job.split}/{job.store.name}", unit="embedding", logger=log)
    for chunk, arrays in embed_chunks(todo, ctx.encoder, ctx.reader, cfg.batch_size, cfg.num_workers, progress):
        write_part(job.store, chunk.start, chunk.stop, arrays)
        ctx.parts_written += 1
        if ctx.stop_after is not None and ctx.parts_written >= ctx.stop_after:
            raise ExtractionInterrupted(f"stopped after {ctx.parts_written} parts ({STOP_AFTER_PARTS_ENV})")
    progress.close()
    ctx.embedded.add(job.store, todo)
    for chunk in copies:
        ctx.embedded.copy(job.store, chunk)
    if copies:
        log.info("%s: %d of %d parts copied from identical chunks embedded earlier in this run", job.store,
                 len(copies), len(todo) + len(copies))
    ctx.record(store=str(job.store), status="extracted", rows=num_rows, skipped_empty_text=len(empty),
               parts_embedded=len(todo), parts_copied=len(copies), parts_reused=reused,
               seconds=round(time.time() - started, 3))
    return Pending(job, num_rows, key, empty)


def merge(pending: Pending, ctx: Context) -> None:
    job = pending.job
    merge_parts(job.store, pending.rows, encoder=ctx.encoder.name, kind=job.kind, source=job.source,
                config=config_to_dict(ctx.cfg),
                extra_meta={"run_key": pending.key.as_dict(), SKIPPED_META: pending.empty.meta()})
    log.info("wrote %s (%d rows)", job.store, pending.rows)


# ---- the union pool ------------------------------------------------------------------------
def build_union(job: Job, local_stores: list[Path], ctx: Context) -> None:
    """Concatenate local stores' rows in the union file's order (rank 0 only), less the candidates
    the local stores left out for an empty text."""
    stores = [EmbeddingStore.open(p, encoder=ctx.encoder.name, kind="candidate") for p in local_stores]
    key = ctx.union_key(job, stores)
    if ctx.is_done(job.store, key):
        return
    union = load_pool_index(job.source)
    skipped = np.array(sorted({i for s in stores for i in s.meta.get(SKIPPED_META, {}).get("ids", [])}), np.int64)
    left_out = np.isin(union.ids, skipped)
    ids, modality = union.ids[~left_out], union.modality[~left_out]
    if left_out.any():
        log.warning("%s: %d candidates left out, as in their local pools (empty text)", job.source, int(left_out.sum()))
    source_rows = union_sources(ids, stores, job.source)
    empty = {"rows": int(left_out.sum()), "ids": union.ids[left_out].tolist(), "first_lines": []}
    with store_writer(job.store, len(ids), stores[0].dim, encoder=ctx.encoder.name, kind="candidate",
                      source=job.source, config=config_to_dict(ctx.cfg),
                      extra_meta={"run_key": key.as_dict(), "built_from": [p.name for p in local_stores],
                                  SKIPPED_META: empty}) as out:
        out.ids[:] = ids
        for store, (dest, rows) in zip(stores, source_rows):  # one local store's rows at a time
            for name in ("img", "txt", "img_mask", "txt_mask", "modality", "target_modality"):
                getattr(out, name)[dest] = getattr(store.arrays, name)[rows]
        if not np.array_equal(out.modality, modality):
            bad = int(np.flatnonzero(out.modality != modality)[0])
            raise StoreError(f"{job.source}: did {int(ids[bad])} has modality {int(modality[bad])} but "
                             f"{int(out.modality[bad])} in its local pool; the union file and the local pools disagree")
    log.info("wrote %s (%d rows from %d local stores)", job.store, len(ids), len(stores))
    ctx.record(store=str(job.store), status="assembled", rows=len(ids), skipped_empty_text=int(left_out.sum()))


def union_sources(union_ids: np.ndarray, stores: list[EmbeddingStore], source: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each store, (union rows it supplies, its rows they come from): every union id is taken
    from the first store holding it; an id in none of them is an error."""
    ids = np.concatenate([np.asarray(s.ids) for s in stores])
    owner = np.concatenate([np.full(len(s), k, np.int64) for k, s in enumerate(stores)])
    row = np.concatenate([np.arange(len(s), dtype=np.int64) for s in stores])
    order = np.argsort(ids, kind="stable")  # stable: among duplicates the first store wins
    sorted_ids = ids[order]
    pos = np.searchsorted(sorted_ids, union_ids).clip(max=len(sorted_ids) - 1)
    missing = sorted_ids[pos] != union_ids
    if missing.any():
        examples = ", ".join(unhash_did(i) for i in union_ids[missing][:5])
        raise StoreError(f"{int(missing.sum())} dids of {source} are in none of the local stores "
                         f"({', '.join(str(s.path) for s in stores)}); first missing: {examples}. "
                         "Add their local pools to data.local_pools")
    src_owner, src_row = owner[order][pos], row[order][pos]
    sources = []
    for k in range(len(stores)):
        dest = np.flatnonzero(src_owner == k)
        sources.append((dest, src_row[dest]))
    return sources


# ---- entry point ---------------------------------------------------------------------------
@contextlib.contextmanager
def hold_output(out_dir: Path, is_main: bool):
    """The main process holds ``out_dir``'s lock for the block (a second run exits naming the
    holder; an output folder that cannot be written is an OSError naming it)."""
    fd = acquire_lock(out_dir, "genius extract") if is_main else None
    try:
        yield
    finally:
        release_lock(fd)


def extract(cfg: ExtractConfig) -> None:
    check_config(cfg)  # before any work
    dist = init_distributed(cfg.runtime.device, cfg.runtime.cpu_threads)
    try:
        jobs, union_job = plan_jobs(cfg)
        if cfg.instructions.mode != "none" and any(j.kind == "query" for j in jobs):
            check_file("data.instructions", resolve_path(cfg.data.root) / cfg.data.instructions,
                       "query instructions file (relative to data.root), or set instructions.mode: none")
        out_dir = check_output_dir("output.root", resolve_path(cfg.output.root)) / cfg.encoder.name
        with hold_output(out_dir, dist.is_main):
            _extract(cfg, dist, jobs, union_job, out_dir)
    finally:
        cleanup()


def _extract(cfg: ExtractConfig, dist, jobs: list[Job], union_job: Job | None, out_dir: Path) -> None:
    encoder = build_encoder(cfg.encoder, dist.device)
    if dist.device.type == "cpu":
        set_cpu_threads(cfg.runtime.cpu_threads, transformer_op_macs(encoder.model, cfg.runtime.batch_size))
    if dist.is_main:
        record_run(out_dir, cfg)
    reader = ImageReader(resolve_path(cfg.data.root), encoder.preprocess) if encoder.has_images else None
    needs_instructions = any(j.kind == "query" for j in jobs)
    query_text = QueryText(resolve_path(cfg.data.root) / cfg.data.instructions,
                           cfg.instructions.mode if needs_instructions else "none")
    stop_after = os.environ.get(STOP_AFTER_PARTS_ENV)
    ctx = Context(cfg, encoder, reader, query_text, dist.rank, dist.world_size,
                  MetricsLog(out_dir / "extract_metrics.jsonl"), stop_after=int(stop_after) if stop_after else None)
    pending = [p for p in (embed_job(job, ctx) for job in jobs) if p is not None]
    # Every part of every store is on disk once rank 0 has every rank's records. The other ranks
    # are done: rank 0 merges alone, so no rank idles in a collective (and its timeout) meanwhile.
    held = gather_to_main(ctx.held)
    if dist.is_main:
        for entry in (entry for records in held for entry in records):
            ctx.metrics.write(**entry)
        for p in pending:
            merge(p, ctx)
        if union_job is not None:
            build_union(union_job, [j.store for j in jobs if j.split == "cand"], ctx)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = stage_parser("genius extract", "Stage 0: embed queries and candidate pools into embedding stores.")
    cfg, _ = parse_stage_config(ExtractConfig, parser, argv)
    try:
        with user_errors_exit(parser):
            extract(cfg)
    except ExtractionInterrupted as err:
        log.warning("%s", err)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
