"""Decoded query IDs, cached per (models, pool, query file) under ``<results>/decoded/``.

    decoded/<pool stem>/<query stem>/{codes,scores,valid}.npy + meta.json

The key (meta.json "key") holds only content ids (the models' fingerprints, the codes' hash, the
query store's content id; for an image_tokens generator also the query images' paths, sizes and
mtimes) and the decoding settings that change the beams, so a GENIUS_ROOT copied elsewhere
reuses every decoding, and anything else recomputes it. An image_tokens generator decodes the
query images (``paths.data_root`` + each query's ``query_img_path``) instead of the Combiner
outputs. Under torchrun each rank decodes a contiguous shard of the queries and keeps it for
ranking; rank 0 gathers the shards in order and writes the cache.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genius.common.config import resolve_path
from genius.common.distributed import DistInfo, gather_to_main, shard_bounds
from genius.common.io import atomic_dir, atomic_write_json, read_json_object
from genius.common.progress import Progress
from genius.common.runstate import content_sha256, portable_path
from genius.common.store import EmbeddingStore, StoreArrays
from genius.models.generative_retriever.beam_search import NUMERICS_VERSION, decoder_dtype
from genius.models.generative_retriever.fused_decoder import precision_record
from genius.models.generative_retriever.pool_assets import Pool
from genius.models.generative_retriever.query_images import QueryImages, query_image_paths
from genius.models.generative_retriever.retrieval import beams_as_arrays
from genius.models.generative_retriever.run_models import Models
from genius.models.residual_quantization.assign_codes import combiner_dtype

ARRAY_NAMES = ("codes", "scores", "valid")
log = logging.getLogger("genius.eval")


@dataclass
class Decoded:
    """The beams of queries ``start .. start + len(codes)`` of the query store (a rank's shard)."""

    codes: np.ndarray  # [Q, B, L], -1 for absent beams
    scores: np.ndarray  # [Q, B]
    valid: np.ndarray  # bool [Q, B]
    seconds: float
    cached: bool
    start: int = 0

    @property
    def rows(self) -> np.ndarray:
        """The query store rows these beams belong to."""
        return np.arange(self.start, self.start + len(self.codes))


def decode_key(cfg: Any, models: Models, pool: Pool, queries: EmbeddingStore, device: torch.device,
               images: QueryImages | None = None, processes: int = 1) -> dict:
    dtype = decoder_dtype(device, cfg.decoding.autocast)
    key = {"models": models.fingerprints, "codes": pool.decoding.codes_hash, "trie": pool.decoding.path.name,
            "queries": queries.content_id, "num_beams": cfg.decoding.num_beams,
            "level_head": cfg.decoding.level_head, "device": device.type,
            # the precisions actually used: autocast means bf16 on a CPU and fp16 on a GPU
            "generator_dtype": "int8" if cfg.decoding.int8 else str(dtype).removeprefix("torch."),
            "combiner_dtype": combiner_dtype(device, cfg.decoding.combiner_autocast),
            "modality_threshold": cfg.decoding.modality_threshold, "numerics": NUMERICS_VERSION}
    if cfg.decoding.sibling_penalty:  # absent at 0, so decodings cached before the option stay valid
        key["sibling_penalty"] = cfg.decoding.sibling_penalty
    if cfg.decoding.int8:
        # int8 beams depend on how the queries are batched (fp32 decoding's do not, beyond 1e-5):
        # each product quantizes its input with one range over the batch's rows, and rounding
        # differences between batch shapes flip int8 roundings. So the batching is in the key.
        key["batching"] = {"batch_size": cfg.decoding.batch_size, "processes": processes}
    key.update(precision_record(device, dtype, cfg.decoding.int8))
    if images is not None:
        key["query_images"] = images.digest
    return key


def embed_queries(models: Models, arrays: StoreArrays, batch_size: int = 4096) -> torch.Tensor:
    parts = []
    for start in range(0, len(arrays.ids), batch_size):
        rows = slice(start, start + batch_size)
        parts.append(models.embed(*(torch.from_numpy(np.asarray(getattr(arrays, n)[rows], dtype=np.float32))
                                    for n in ("img", "txt", "img_mask", "txt_mask"))))
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def decode_rows(models: Models, pool: Pool, arrays: StoreArrays, start: int, stop: int, batch_size: int,
                label: str, images: QueryImages | None = None) -> tuple[np.ndarray, ...]:
    """Queries ``start .. stop`` decoded: (codes, scores, valid); empty arrays for no rows.

    The beam search's batches of ``batch_size`` queries are handed to it one at a time, so a long
    decoding reports its progress (``label``); each batch is decoded as it would be within one call.
    ``images`` (required for an image_tokens generator) reads the batches' query images."""
    if stop <= start:
        return (np.zeros((0, 0, pool.cmap.num_levels), np.int64), np.zeros((0, 0), np.float32), np.zeros((0, 0), bool))
    if models.preprocess is None:
        z = embed_queries(models, arrays.take(np.arange(start, stop)))
        batches = z.split(batch_size)
    else:
        batches = (images(np.arange(first, min(first + batch_size, stop))) for first in range(start, stop, batch_size))
    progress = Progress(-(-(stop - start) // batch_size), label, unit="batch", logger=log, end_line=False)
    parts = [beams_as_arrays(models.decode(batch, pool.decoding.trie)) for batch in progress.wrap(batches)]
    return tuple(np.concatenate(part) for part in zip(*parts))


def open_query_images(models: Models, queries: EmbeddingStore, query_file: Path,
                      data_root: str) -> QueryImages | None:
    """The query images of ``query_file`` for an image_tokens generator (None for the others)."""
    if models.preprocess is None:
        return None
    root = resolve_path(data_root)
    return QueryImages(root, query_image_paths(query_file, queries, root), models.preprocess)


def decode_cached(cfg: Any, models: Models, pool: Pool, queries: EmbeddingStore, out_dir: Path,
                  info: DistInfo, query_file: Path) -> Decoded:
    """Beam search output for this rank's contiguous shard of the queries (all of them in a world
    of one), reused when its key matches.

    Every rank decodes (or reads from the cache) its own shard and returns it; on a fresh decoding
    rank 0 gathers the shards in rank order (so the rows are exactly the store's) and writes the cache.
    ``query_file`` (the store's jsonl) names the query images an image_tokens generator reads.
    """
    images = open_query_images(models, queries, query_file, cfg.paths.data_root)
    key = decode_key(cfg, models, pool, queries, info.device, images, info.world_size)
    start, stop = shard_bounds(len(queries), info.rank, info.world_size)
    meta = _cache_meta(out_dir, key)
    if meta is not None:
        arrays = [np.array(np.load(out_dir / f"{n}.npy", mmap_mode="r")[start:stop]) for n in ARRAY_NAMES]
        return Decoded(*arrays, seconds=meta["seconds"], cached=True, start=start)
    began = time.perf_counter()
    shard = decode_rows(models, pool, queries.arrays, start, stop, cfg.decoding.batch_size,
                        f"eval: decoding {queries.path.name} on {pool.stem}", images)
    shards = gather_to_main(shard)
    seconds = time.perf_counter() - began
    if info.is_main:
        every = [np.concatenate(part) for part in zip(*(s for s in shards if len(s[0])))]
        with atomic_dir(out_dir) as tmp:
            for name, array in zip(ARRAY_NAMES, every):
                np.save(tmp / f"{name}.npy", array)
            files = {f"{name}.npy": content_sha256(tmp / f"{name}.npy") for name in ARRAY_NAMES}
            atomic_write_json(tmp / "meta.json", {"key": key, "seconds": seconds, "num_queries": len(queries),
                                                  "pool": portable_path(pool.path),
                                                  "queries_store": portable_path(queries.path),
                                                  "processes": info.world_size, "files": files})
    return Decoded(*shard, seconds=seconds, cached=False, start=start)


def _cache_meta(out_dir: Path, key: dict) -> dict | None:
    """The cache's meta.json when it holds this key's decoding and its arrays are the ones written
    (their SHA-256s); else None, and the queries are decoded again (a damaged or edited cache is
    replaced, never read: a warning says which). A cache written before the hashes were recorded
    is read as before: decoding M-BEIR again costs GPU hours."""
    if not (out_dir / "meta.json").is_file():
        return None
    try:
        meta = read_json_object(out_dir / "meta.json", "")
    except ValueError:  # an unreadable record: decoded again, like a record of another key
        return None
    if meta.get("key") != key:
        return None
    files = meta.get("files")
    for name in ARRAY_NAMES:
        path = out_dir / f"{name}.npy"
        if not path.is_file() or (files is not None and files.get(path.name) != content_sha256(path)):
            log.warning("%s: not the decoding its meta.json records (changed or damaged); decoding again", path)
            return None
    return meta
