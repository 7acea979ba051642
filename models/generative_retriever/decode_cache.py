"""Decoded query IDs, cached per (models, pool, query file) under ``<results>/decoded/``.

    decoded/<pool stem>/<query stem>/{codes,scores,valid}.npy + meta.json

The key (meta.json "key") holds only content ids (the models' fingerprints, the codes' hash, the
query store's content id) and the decoding settings that change the beams, so a GENIUS_ROOT
copied elsewhere reuses every decoding, and anything else recomputes it. Under torchrun each
rank decodes a contiguous shard and rank 0 gathers them in order.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genius.common.distributed import DistInfo, autocast_dtype
from genius.common.io import atomic_dir, atomic_write_json
from genius.common.runstate import portable_path
from genius.common.store import EmbeddingStore, StoreArrays
from genius.models.generative_retriever.pool_assets import Pool
from genius.models.generative_retriever.retrieval import beams_as_arrays
from genius.models.generative_retriever.run_models import Models
from genius.models.residual_quantization.assign_codes import combiner_dtype

ARRAY_NAMES = ("codes", "scores", "valid")


@dataclass
class Decoded:
    codes: np.ndarray  # [Q, B, L], -1 for absent beams
    scores: np.ndarray  # [Q, B]
    valid: np.ndarray  # bool [Q, B]
    seconds: float
    cached: bool


def decode_key(cfg: Any, models: Models, pool: Pool, queries: EmbeddingStore, device: torch.device) -> dict:
    return {"models": models.fingerprints, "codes": pool.codes_hash, "trie": pool.trie_path.name,
            "queries": queries.content_id, "num_beams": cfg.decoding.num_beams,
            "level_head": cfg.decoding.level_head, "device": device.type,
            # the precisions actually used: autocast means bf16 on a CPU and fp16 on a GPU
            "generator_dtype": str(autocast_dtype(device) if cfg.decoding.autocast
                                   else torch.float32).removeprefix("torch."),
            "combiner_dtype": combiner_dtype(device, cfg.decoding.combiner_autocast),
            "modality_threshold": cfg.decoding.modality_threshold}


def embed_queries(models: Models, arrays: StoreArrays, batch_size: int = 4096) -> torch.Tensor:
    parts = []
    for start in range(0, len(arrays.ids), batch_size):
        rows = slice(start, start + batch_size)
        parts.append(models.embed(*(torch.from_numpy(np.asarray(getattr(arrays, n)[rows], dtype=np.float32))
                                    for n in ("img", "txt", "img_mask", "txt_mask"))))
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def decode_shard(models: Models, pool: Pool, arrays: StoreArrays, rank: int, world_size: int) -> tuple[np.ndarray, ...]:
    """This rank's contiguous slice of the queries, decoded: (codes, scores, valid)."""
    n = len(arrays.ids)
    rows = np.arange(n * rank // world_size, n * (rank + 1) // world_size)
    if not len(rows):
        return ()
    return beams_as_arrays(models.decode(embed_queries(models, arrays.take(rows)), pool.trie))


def decode_cached(cfg: Any, models: Models, pool: Pool, queries: EmbeddingStore, out_dir: Path,
                  info: DistInfo) -> Decoded | None:
    """Beam search output for every query, reused when its key matches.

    Under torchrun each rank decodes a contiguous shard; rank 0 gathers them in rank order (so
    the rows are exactly the store's) and returns the result; the other ranks return None.
    """
    key = decode_key(cfg, models, pool, queries, info.device)
    if (out_dir / "meta.json").is_file():
        meta = json.loads((out_dir / "meta.json").read_text())
        if meta.get("key") == key:
            if not info.is_main:
                return None
            arrays = [np.load(out_dir / f"{n}.npy") for n in ARRAY_NAMES]
            return Decoded(*arrays, seconds=meta["seconds"], cached=True)
    start = time.perf_counter()
    shards = [decode_shard(models, pool, queries.arrays, info.rank, info.world_size)]
    if info.enabled:
        gathered: list = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, shards[0])
        shards = gathered
    if not info.is_main:
        return None
    codes, scores, valid = (np.concatenate(part) for part in zip(*(s for s in shards if s)))
    seconds = time.perf_counter() - start
    decoded = Decoded(codes, scores, valid, seconds, cached=False)
    with atomic_dir(out_dir) as tmp:
        for name in ARRAY_NAMES:
            np.save(tmp / f"{name}.npy", getattr(decoded, name))
        atomic_write_json(tmp / "meta.json", {"key": key, "seconds": seconds, "num_queries": len(queries),
                                              "pool": portable_path(pool.path),
                                              "queries_store": portable_path(queries.path),
                                              "processes": info.world_size})
    return decoded
