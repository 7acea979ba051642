"""genius extract: embed queries and candidate pools into embedding stores (stage 0).

For one data root it writes, under ``<output.root>/<encoder.name>/``:
  train/  the training queries and the training pool,
  test/   every test query file,
  cand/   every local pool, and the union pool assembled from the local stores (nothing is
          embedded twice: rows are copied in the union file's order; a union did that no local
          store holds is an error).

A source file is cut into chunks of ``output.chunk_rows`` rows; rank r of W embeds chunks
i with i % W == r and writes each as a part (``genius.common.store.write_part``). Finished parts
are kept when a run is interrupted, so a re-run embeds only what is missing; rank 0 merges the
parts once every rank is done. A store whose meta records the same source fingerprint, encoder
and instruction settings is skipped, so re-running a finished extraction does nothing; a changed
source file (size or mtime) or encoder is re-extracted. Duplicate ids in a source file (UniIR's
up-sampled training queries repeat qids) keep their first occurrence.

Runs as ``genius extract --config F`` or, for several processes, ``torchrun --nproc_per_node N
-m genius.feature_extraction.extract --config F`` (gloo on CPU, NCCL on GPU; same stores).

Test hook: the environment variable GENIUS_EXTRACT_STOP_AFTER_PARTS=N makes each process stop
with exit status 3 after writing N parts, as if killed.
"""
from __future__ import annotations

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
from tqdm import tqdm

from genius.common.config import config_to_dict, resolve_path
from genius.common.distributed import barrier, cleanup, init_distributed
from genius.common.io import atomic_write_json, file_fingerprint, sha256_json
from genius.common.mbeir import (
    iter_candidates,
    iter_queries,
    load_pool_index,
    older_revision_twin,
    target_modality,
    unhash_did,
)
from genius.common.stage import (
    MetricsLog, parse_stage_config, progress_disabled, record_run, setup_logging, stage_parser, user_errors_exit,
)
from genius.common.store import (
    FORMAT_VERSION,
    EmbeddingStore,
    StoreArrays,
    StoreError,
    finished_parts,
    merge_parts,
    parts_dir,
    read_meta,
    store_path,
    write_part,
    store_writer,
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


@dataclass
class OutputConfig:
    root: str = "extracted_embed"
    chunk_rows: int = 8192  # rows per part: the unit of work, of resuming and of rank assignment

    def validate(self) -> None:
        if self.chunk_rows < 1:
            raise ValueError("chunk_rows must be positive")


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = 256
    num_workers: int = 4  # image decoding processes (0: decode in the main process)
    cpu_threads: int | None = None  # torch threads on CPU (null: torch's default, one per core)

    def validate(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size must be positive and num_workers non-negative")


@dataclass
class ExtractConfig:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    instructions: InstructionConfig = field(default_factory=InstructionConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# ---- jobs: one per store -------------------------------------------------------------------
@dataclass
class Job:
    split: str  # train | test | cand
    kind: Literal["query", "candidate"]
    source: Path
    store: Path
    target_pools: tuple[Path, ...] = ()  # queries without task_id take their target modality from these


def _listed_or_all(root: Path, listed: list[str] | None, folder: str) -> list[Path]:
    if listed is not None:
        return [root / name for name in listed]
    found = sorted((root / folder).glob("*.jsonl"))
    if not found:
        raise FileNotFoundError(f"no *.jsonl files in {root / folder} (list the files in the config instead)")
    return found


def plan_jobs(cfg: ExtractConfig) -> tuple[list[Job], Job | None]:
    """The stores to write, in order, and the union job (built from the local stores) if any."""
    root = resolve_path(cfg.data.root)
    out = resolve_path(cfg.output.root)
    name = cfg.encoder.name
    d = cfg.data

    def job(split: str, kind: str, source: Path, target_pools=()) -> Job:
        if not source.is_file():
            raise FileNotFoundError(f"{source} does not exist (data.root is {root})")
        return Job(split, kind, source, store_path(out, name, split, source), tuple(target_pools))

    jobs: list[Job] = []
    train_pool = older_revision_twin(root / d.train_pool) if d.train_pool else None
    if train_pool is not None:
        jobs.append(job("train", "candidate", train_pool))
    if d.train_queries:
        jobs.append(job("train", "query", root / d.train_queries, [train_pool] if train_pool else []))
    local_pools = _listed_or_all(root, d.local_pools, "cand_pool/local")
    union = older_revision_twin(root / d.union_pool) if d.union_pool else None
    test_targets = [union] if union is not None and union.is_file() else local_pools
    jobs += [job("test", "query", q, test_targets) for q in _listed_or_all(root, d.test_queries, "query/test")]
    jobs += [job("cand", "candidate", p) for p in local_pools]
    union_job = None
    if union is not None:
        if not local_pools:
            raise ValueError("data.union_pool is set but there are no local pools to build it from")
        union_job = job("cand", "candidate", union)
        union_job.store = union_job.store.with_name(UNION_STEM)
    return jobs, union_job


# ---- embedding -----------------------------------------------------------------------------
@dataclass
class Chunk:
    start: int  # source rows [start, stop)
    stop: int
    items: list[Item]


class _Images(Dataset):
    """(row in its chunk, uint8 crop) of every item with an image; decoded in DataLoader workers."""

    def __init__(self, entries: list[tuple[int, str]], reader: ImageReader):
        self.entries, self.reader = entries, reader

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        row, path = self.entries[i]
        return row, self.reader(path)


def _collate(batch: list[tuple[int, torch.Tensor]]) -> tuple[list[int], torch.Tensor]:
    rows, pixels = zip(*batch)
    return list(rows), torch.stack(pixels)


def embed_chunks(chunks: list[Chunk], encoder: Encoder, reader: ImageReader | None, batch_size: int,
                 num_workers: int) -> Iterator[tuple[Chunk, StoreArrays]]:
    """Each chunk with its raw vectors and masks (a missing modality: zero vector, mask 0).

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
    images = iter(DataLoader(_Images(entries, reader), batch_sampler=batches, num_workers=num_workers,
                             collate_fn=_collate)) if batches else iter(())
    for k, chunk in enumerate(chunks):
        items = chunk.items
        img = np.zeros((len(items), encoder.dim), np.float32)
        txt = np.zeros((len(items), encoder.dim), np.float32)
        text_rows = [i for i, item in enumerate(items) if item.text]
        if text_rows:
            txt[text_rows] = encoder.encode_texts([items[i].text for i in text_rows], batch_size)
        for _ in range(per_chunk[k]):
            rows, pixels = next(images)
            img[rows] = encoder.embed_pixels(pixels).numpy()
        yield chunk, StoreArrays(
            ids=np.array([item.id for item in items], np.int64), img=img, txt=txt,
            img_mask=np.array([item.img_path is not None for item in items], np.uint8),
            txt_mask=np.array([bool(item.text) for item in items], np.uint8),
            modality=np.array([item.modality for item in items], np.int8),
            target_modality=np.array([item.target_modality for item in items], np.int8))


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

    def job_key(self, job: Job) -> dict:
        """Everything a store's content depends on, as it reads back from meta.json."""
        key = {"format_version": FORMAT_VERSION, "source": file_fingerprint(job.source), "kind": job.kind,
               "encoder": self.encoder.name, "encoder_fingerprint": self.encoder.fingerprint,
               "chunk_rows": self.cfg.output.chunk_rows}
        if job.kind == "query":
            ins, data = self.cfg.instructions, self.cfg.data
            key["instructions"] = {
                "mode": ins.mode, "seed": ins.seed if ins.mode == "random" else None,
                "file": file_fingerprint(resolve_path(data.root) / data.instructions) if ins.mode != "none" else None}
        return json.loads(json.dumps(key))

    def is_current(self, store: Path, key: dict) -> bool:
        meta = read_meta(store)
        if meta is not None and meta.get("extraction") == key:
            log.info("%s is up to date, skipping", store)
            self.metrics.write(store=str(store), rank=self.rank, status="up_to_date")
            return True
        return False


def _unique_records(job: Job) -> Iterator:
    """The source's records, first occurrence of each id only."""
    seen: set[int] = set()
    records = iter_queries(job.source) if job.kind == "query" else iter_candidates(job.source)
    for record in records:
        if record.hashed not in seen:
            seen.add(record.hashed)
            yield record


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


def owned_chunks(job: Job, ctx: Context) -> tuple[int, list[Chunk], int]:
    """(rows in the source, this rank's chunks still to embed, this rank's chunks already on disk).

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

    for n, record in enumerate(_unique_records(job), 1):
        buffer.append(record)
        if len(buffer) == size:
            close(n - size)
            buffer = []
    if buffer:
        close(n - len(buffer))
    return n, todo, reused


def _prepare_parts(job: Job, key: dict, ctx: Context) -> None:
    """Rank 0 drops parts left by a run with different inputs; every rank then sees clean parts."""
    if ctx.rank == 0:
        folder = parts_dir(job.store)
        key_file = folder / "inputs.json"
        if folder.is_dir() and (not key_file.is_file() or json.loads(key_file.read_text()) != key):
            log.info("discarding parts of %s made from different inputs", job.store)
            shutil.rmtree(folder)
        if not key_file.is_file():
            atomic_write_json(key_file, key)
    barrier()


@dataclass
class Pending:
    """A store whose parts are all written (once every rank is done) and wait for rank 0's merge."""

    job: Job
    rows: int
    key: dict


def embed_job(job: Job, ctx: Context) -> Pending | None:
    """Write this rank's parts of ``job``; None when the store is already up to date."""
    key = ctx.job_key(job)
    if ctx.is_current(job.store, key):
        return None
    _prepare_parts(job, key, ctx)
    started = time.time()
    num_rows, todo, reused = owned_chunks(job, ctx)
    if num_rows == 0:
        raise StoreError(f"{job.source} has no records")
    cfg = ctx.cfg.runtime
    progress = tqdm(total=len(todo), desc=f"{job.split}/{job.store.name} [rank {ctx.rank}]", unit="part",
                    disable=progress_disabled())
    for chunk, arrays in embed_chunks(todo, ctx.encoder, ctx.reader, cfg.batch_size, cfg.num_workers):
        write_part(job.store, chunk.start, chunk.stop, arrays)
        progress.update()
        ctx.parts_written += 1
        if ctx.stop_after is not None and ctx.parts_written >= ctx.stop_after:
            raise ExtractionInterrupted(f"stopped after {ctx.parts_written} parts ({STOP_AFTER_PARTS_ENV})")
    progress.close()
    ctx.metrics.write(store=str(job.store), rank=ctx.rank, status="extracted", rows=num_rows,
                      parts_embedded=len(todo), parts_reused=reused, seconds=round(time.time() - started, 3))
    return Pending(job, num_rows, key)


def merge(pending: Pending, ctx: Context) -> None:
    job = pending.job
    merge_parts(job.store, pending.rows, encoder=ctx.encoder.name, kind=job.kind, source=job.source,
                config=config_to_dict(ctx.cfg), extra_meta={"extraction": pending.key})
    log.info("wrote %s (%d rows)", job.store, pending.rows)


# ---- the union pool ------------------------------------------------------------------------
def build_union(job: Job, local_stores: list[Path], ctx: Context) -> None:
    """Concatenate local stores' rows in the union file's order (rank 0 only)."""
    key = {**ctx.job_key(job), "locals": [sha256_json((read_meta(p) or {}).get("extraction")) for p in local_stores]}
    if ctx.is_current(job.store, key):
        return
    union = load_pool_index(job.source)
    stores = [EmbeddingStore.open(p, encoder=ctx.encoder.name, kind="candidate") for p in local_stores]
    source_rows = union_sources(union.ids, stores, job.source)
    with store_writer(job.store, len(union.ids), stores[0].dim, encoder=ctx.encoder.name, kind="candidate",
                      source=job.source, config=config_to_dict(ctx.cfg),
                      extra_meta={"extraction": key, "built_from": [str(p) for p in local_stores]}) as out:
        out.ids[:] = union.ids
        for store, (dest, rows) in zip(stores, source_rows):  # one local store's rows at a time
            for name in ("img", "txt", "img_mask", "txt_mask", "modality", "target_modality"):
                getattr(out, name)[dest] = getattr(store.arrays, name)[rows]
        if not np.array_equal(out.modality, union.modality):
            bad = int(np.flatnonzero(out.modality != union.modality)[0])
            raise StoreError(f"{job.source}: did {int(union.ids[bad])} has modality {int(union.modality[bad])} but "
                             f"{int(out.modality[bad])} in its local pool; the union file and the local pools disagree")
    log.info("wrote %s (%d rows from %d local stores)", job.store, len(union), len(stores))
    ctx.metrics.write(store=str(job.store), rank=ctx.rank, status="assembled", rows=len(union))


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
def extract(cfg: ExtractConfig) -> None:
    dist = init_distributed(cfg.runtime.device, cfg.runtime.cpu_threads)
    try:
        jobs, union_job = plan_jobs(cfg)
        encoder = build_encoder(cfg.encoder, dist.device)
        out_dir = resolve_path(cfg.output.root) / cfg.encoder.name
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
        # Every part of every store is on disk once all ranks pass here. The other ranks are done:
        # rank 0 merges alone, so no rank idles in a collective (and its timeout) meanwhile.
        barrier()
        if dist.is_main:
            for p in pending:
                merge(p, ctx)
            if union_job is not None:
                build_union(union_job, [j.store for j in jobs if j.split == "cand"], ctx)
    finally:
        cleanup()


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
