"""The embedding store: what stage 0 writes and stages 1-3 read.

One directory per (encoder, split, source file)::

    ids.npy              int64 [N]     hashed qids or dids, in source-file order
    img.npy, txt.npy     fp16  [N, D]  raw (unnormalised) image and text projection vectors
    img_mask.npy, txt_mask.npy  uint8 [N]  1 where the modality is present (text mask 1 for an
                                          instructed image-only query)
    modality.npy         int8  [N]     the item's own modality code (0 image, 1 text, 2 both)
    target_modality.npy  int8  [N]     queries: the modality the task asks for; candidates: = modality
    meta.json            encoder, dim, dtype, count, kind, source file fingerprint, config

Arrays are memory-mapped on read. The store is written into a temporary directory and renamed,
so a reader never accepts a half-written store. Extraction writes *parts* (row ranges, one file
each, any rank) into ``<store>.parts/`` and ``merge_parts`` assembles them, keeping every source
row exactly once, so padded or repeated rows from distributed samplers cannot leak in.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genius.common.io import atomic_dir, atomic_path, file_fingerprint

FORMAT_VERSION = 1
ARRAYS = ("ids", "img", "txt", "img_mask", "txt_mask", "modality", "target_modality")
_FIXED_DTYPES = {"ids": np.int64, "img_mask": np.uint8, "txt_mask": np.uint8, "modality": np.int8,
                 "target_modality": np.int8}


def array_dtype(name: str, vector_dtype: str) -> np.dtype:
    """The stored dtype of array ``name``: fixed for ids, masks and modalities; the store's dtype
    (fp16 by default) for the img and txt vectors."""
    return np.dtype(_FIXED_DTYPES.get(name, vector_dtype))


_PART_RE = re.compile(r"^part-(\d{10})-(\d{10})\.npz$")


class StoreError(ValueError):
    """A store that is missing, incomplete, stale, or not what the caller expects."""


@dataclass
class StoreArrays:
    ids: np.ndarray
    img: np.ndarray
    txt: np.ndarray
    img_mask: np.ndarray
    txt_mask: np.ndarray
    modality: np.ndarray
    target_modality: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.img.ndim != 2 or self.txt.shape != self.img.shape or self.img.shape[0] != n:
            raise StoreError(f"image {self.img.shape} and text {self.txt.shape} vectors must both be [{n}, D]")
        for name in ("img_mask", "txt_mask", "modality", "target_modality"):
            if getattr(self, name).shape != (n,):
                raise StoreError(f"{name} has shape {getattr(self, name).shape}, expected ({n},)")

    @property
    def dim(self) -> int:
        return self.img.shape[1]

    def cast(self, dtype: str) -> "StoreArrays":
        """The arrays in their stored dtypes, with ``dtype`` for the vectors."""
        return StoreArrays(**{name: np.asarray(getattr(self, name), dtype=array_dtype(name, dtype)) for name in ARRAYS})

    def take(self, rows: np.ndarray) -> "StoreArrays":
        return StoreArrays(**{name: np.asarray(getattr(self, name)[rows]) for name in ARRAYS})


def write_store(path: str | os.PathLike, arrays: StoreArrays, *, encoder: str, kind: str,
                source: str | os.PathLike | None = None, config: dict | None = None, dtype: str = "float16",
                extra_meta: dict | None = None) -> Path:
    """Write a complete store atomically (replacing any previous one at ``path``)."""
    with store_writer(path, len(arrays.ids), arrays.dim, encoder=encoder, kind=kind, source=source, config=config,
                      dtype=dtype, extra_meta=extra_meta) as out:
        for name in ARRAYS:
            getattr(out, name)[:] = getattr(arrays, name)
    return Path(path)


@contextlib.contextmanager
def store_writer(path: str | os.PathLike, count: int, dim: int, *, encoder: str, kind: str,
                 source: str | os.PathLike | None = None, config: dict | None = None, dtype: str = "float16",
                 extra_meta: dict | None = None) -> Iterator[StoreArrays]:
    """Write a store of ``count`` rows piece by piece, never holding it in memory.

    Yields writable memory-mapped arrays in a temporary directory beside ``path``; the caller fills
    every row. On a clean exit the ids are checked, meta.json is written last and the directory
    replaces ``path``; on an error nothing is left behind. (The union pool of M-BEIR is 5.6M rows,
    17 GB of fp16 vectors: assembling it in RAM is not an option.)
    """
    if kind not in ("query", "candidate"):
        raise ValueError(f"store kind must be 'query' or 'candidate', got {kind!r}")
    with atomic_dir(path) as tmp:
        def array(name: str, shape: tuple[int, ...]) -> np.ndarray:
            return np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=array_dtype(name, dtype),
                                             shape=shape)

        out = StoreArrays(**{name: array(name, (count, dim) if name in ("img", "txt") else (count,))
                             for name in ARRAYS})
        yield out
        for name in ARRAYS:
            getattr(out, name).flush()
        if len(np.unique(out.ids)) != count:
            raise StoreError(f"store {path}: ids are not unique")
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "encoder": encoder,
            "dim": int(dim),
            "dtype": dtype,
            "count": int(count),
            "source": file_fingerprint(source) if source is not None else None,
            "config": config or {},
            **(extra_meta or {}),
        }
        del out  # release the memory maps before the directory is renamed
        # meta.json last: a directory without it is never accepted.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


class EmbeddingStore:
    """A memory-mapped store with the checks a consuming stage needs."""

    def __init__(self, path: Path, meta: dict, arrays: StoreArrays):
        self.path, self.meta, self.arrays = path, meta, arrays
        self._sorted_ids: np.ndarray | None = None
        self._sorted_rows: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, *, dim: int | None = None, encoder: str | None = None,
             kind: str | None = None, source: str | os.PathLike | None = None) -> "EmbeddingStore":
        """Open a store, refusing one that does not match what the caller expects.

        ``source``: the file the store must have been made from; a different path, size or
        mtime means the store is stale and must be re-extracted.
        """
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise StoreError(f"no embedding store at {path} (missing meta.json; run feature extraction first)")
        meta = json.loads(meta_path.read_text())
        expected = {"dim": dim, "encoder": encoder, "kind": kind}
        for key, want in expected.items():
            if want is not None and meta.get(key) != want:
                raise StoreError(f"store {path}: {key} is {meta.get(key)!r}, expected {want!r}")
        if source is not None:
            current = file_fingerprint(source)
            recorded = meta.get("source") or {}
            changed = [k for k in ("path", "size", "mtime_ns") if recorded.get(k) != current[k]]
            if changed:
                raise StoreError(f"store {path} is stale: it was made from {recorded.get('path')} "
                                 f"but {source} differs in {', '.join(changed)}; re-run extraction")
        try:
            arrays = StoreArrays(**{name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ARRAYS})
        except FileNotFoundError as err:
            raise StoreError(f"store {path} is incomplete: {err.filename} is missing") from None
        if len(arrays.ids) != meta["count"] or arrays.dim != meta["dim"]:
            raise StoreError(f"store {path}: arrays hold {len(arrays.ids)} x {arrays.dim}, "
                             f"meta.json says {meta['count']} x {meta['dim']}")
        return cls(path, meta, arrays)

    def __len__(self) -> int:
        return len(self.arrays.ids)

    @property
    def dim(self) -> int:
        return self.arrays.dim

    @property
    def ids(self) -> np.ndarray:
        return self.arrays.ids

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row index of each hashed id; raises if any id is not in the store."""
        if self._sorted_ids is None:
            self._sorted_rows = np.argsort(self.arrays.ids, kind="stable")
            self._sorted_ids = np.asarray(self.arrays.ids)[self._sorted_rows]
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, ids).clip(max=len(self._sorted_ids) - 1)
        missing = self._sorted_ids[pos] != ids if len(self._sorted_ids) else np.ones(len(ids), bool)
        if missing.any():
            raise StoreError(f"store {self.path}: {int(missing.sum())} ids not found (first: {int(ids[missing][0])})")
        return self._sorted_rows[pos]


# ---- parts: resumable, multi-process writing -------------------------------------------------
def parts_dir(store_path: str | os.PathLike) -> Path:
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".parts")


def part_path(store_path: str | os.PathLike, start: int, stop: int) -> Path:
    return parts_dir(store_path) / f"part-{start:010d}-{stop:010d}.npz"


def write_part(store_path: str | os.PathLike, start: int, stop: int, arrays: StoreArrays, dtype: str = "float16") -> None:
    """Write source rows [start, stop) as one part file, atomically."""
    if len(arrays.ids) != stop - start:
        raise StoreError(f"part [{start}, {stop}) holds {len(arrays.ids)} rows")
    arrays = arrays.cast(dtype)
    target = part_path(store_path, start, stop)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{name: getattr(arrays, name) for name in ARRAYS})


def finished_parts(store_path: str | os.PathLike) -> set[tuple[int, int]]:
    folder = parts_dir(store_path)
    if not folder.is_dir():
        return set()
    return {(int(m[1]), int(m[2])) for m in (_PART_RE.match(p.name) for p in folder.iterdir()) if m}


def merge_parts(store_path: str | os.PathLike, num_rows: int, **write_kwargs: Any) -> Path:
    """Assemble the parts covering rows [0, num_rows) into the final store; each row exactly once.

    Overlapping parts (a row written twice, e.g. by a padded sampler) keep one copy; a gap is an
    error naming the missing rows.
    """
    spans = sorted(finished_parts(store_path))
    covered = np.zeros(num_rows, dtype=bool)
    chosen: list[tuple[int, int, np.ndarray]] = []
    for start, stop in spans:
        if stop > num_rows:
            raise StoreError(f"part [{start}, {stop}) lies beyond the {num_rows} source rows; stale parts in {parts_dir(store_path)}")
        fresh = ~covered[start:stop]
        if fresh.any():
            chosen.append((start, stop, fresh))
            covered[start:stop] = True
    if not covered.all():
        first = int(np.flatnonzero(~covered)[0])
        raise StoreError(f"cannot merge {store_path}: {int((~covered).sum())} rows have no part (first missing row {first})")
    if not chosen:
        raise StoreError(f"cannot merge {store_path}: no rows to merge")
    with np.load(part_path(store_path, *chosen[0][:2])) as first:
        dim = first["img"].shape[1]
    with store_writer(store_path, num_rows, dim, **write_kwargs) as out:
        for start, stop, fresh in chosen:  # one part in memory at a time
            rows = np.flatnonzero(fresh)
            with np.load(part_path(store_path, start, stop)) as data:
                for name in ARRAYS:
                    getattr(out, name)[start + rows] = data[name][rows]
    shutil.rmtree(parts_dir(store_path), ignore_errors=True)
    return Path(store_path)


def store_path(root: str | os.PathLike, encoder: str, split: str, source: str | os.PathLike) -> Path:
    """extracted_embed/<encoder>/<split>/<source file stem>/"""
    return Path(root) / encoder / split / Path(source).name.removesuffix(".jsonl")


def read_meta(path: str | os.PathLike) -> dict | None:
    meta_path = Path(path) / "meta.json"
    return json.loads(meta_path.read_text()) if meta_path.is_file() else None

