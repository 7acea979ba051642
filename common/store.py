"""The embedding store: what stage 0 writes and stages 1-3 read.

One directory per (encoder, split, source file)::

    ids.npy              int64 [N]     hashed qids or dids, in source-file order
    img.npy, txt.npy     fp16  [N, D]  raw (unnormalised) image and text projection vectors
    img_mask.npy, txt_mask.npy  uint8 [N]  1 where the modality is present (text mask 1 for an
                                          instructed image-only query)
    modality.npy         int8  [N]     the item's own modality code (0 image, 1 text, 2 both)
    target_modality.npy  int8  [N]     queries: the modality the task asks for; candidates: = modality
    meta.json            encoder, dim, dtype, count, kind, source file fingerprint, config,
                         content_sha256 (and, from genius extract, the run key it was made with
                         and ``skipped_empty_text``: the source rows left out for an empty text,
                         as {rows, ids, first_lines})

Arrays are memory-mapped on read. The store is written into a temporary directory and renamed,
so a reader never accepts a half-written store. Extraction writes *parts* (row ranges, one file
each, any rank) into ``<store>.parts/`` and ``merge_parts`` assembles them, keeping every source
row exactly once, so padded or repeated rows from distributed samplers cannot leak in.

Integrity. The writer records ``content_sha256``, one digest over the SHA-256 of every array file
(headers included), in meta.json; :attr:`EmbeddingStore.content_id` exposes it, and it is what a
later artefact records to say which store it was made from (codes, trained quantizers and
generators, evaluation keys). ``source`` is the source file's portable fingerprint (path relative
to $GENIUS_ROOT, size, SHA-256), so a moved or copied root is not stale; opening with ``source=``
compares content, not path or time.

Opening always checks what is cheap: meta.json readable, every array present, readable as .npy
(a truncated file is refused, naming it), with the shape and dtype meta.json implies. Whether it
also re-hashes the arrays against ``content_sha256`` (a read of every byte) is ``verify``: by
default (``verify=None``) a store of at most ``VERIFY_MAX_BYTES`` (512 MiB: every tiny, COCO or
single-task store, hashed in well under a second) is verified on every open, a larger one (the
M-BEIR union pool is 17 GB) is not, since a full read would dominate a stage that touches a few
rows. ``verify=True`` or GENIUS_VERIFY_STORES=1 verifies any size; ``verify=False`` or
GENIUS_VERIFY_STORES=0 never does. Hashes are remembered per file (size, mtime) within a process.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genius.common.io import atomic_dir, atomic_path, read_json_object, sha256_json
from genius.common.runstate import content_sha256, file_content

FORMAT_VERSION = 2  # 2: content_sha256 and a portable source fingerprint in meta.json
VERIFY_MAX_BYTES = 512 << 20
VERIFY_ENV = "GENIUS_VERIFY_STORES"
REEXTRACT = "re-run genius extract (run_extract.sh) to write it again"
ARRAYS = ("ids", "img", "txt", "img_mask", "txt_mask", "modality", "target_modality")
_FIXED_DTYPES = {"ids": np.int64, "img_mask": np.uint8, "txt_mask": np.uint8, "modality": np.int8,
                 "target_modality": np.int8}


def array_dtype(name: str, vector_dtype: str) -> np.dtype:
    """The stored dtype of array ``name``: fixed for ids, masks and modalities; the store's dtype
    (fp16 by default) for the img and txt vectors."""
    return np.dtype(_FIXED_DTYPES.get(name, vector_dtype))


SKIPPED_META = "skipped_empty_text"

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
        del out  # release the memory maps before hashing and renaming
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "encoder": encoder,
            "dim": int(dim),
            "dtype": dtype,
            "count": int(count),
            "source": source_fingerprint(source) if source is not None else None,
            "config": config or {},
            "content_sha256": arrays_digest(tmp),
            **(extra_meta or {}),
        }
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
             kind: str | None = None, source: str | os.PathLike | None = None,
             verify: bool | None = None) -> "EmbeddingStore":
        """Open a store, refusing one that does not match what the caller expects.

        ``source``: the file the store must have been made from; different content (size or
        SHA-256) means the store is stale and must be re-extracted. ``verify``: re-hash the arrays
        against meta.json's ``content_sha256`` (None: when the store is small; module docstring).
        """
        path = Path(path)
        meta = read_meta(path)
        if meta is None:
            raise StoreError(f"no embedding store at {path} (missing meta.json); run genius extract first")
        if meta.get("format_version") != FORMAT_VERSION or "content_sha256" not in meta:
            raise StoreError(f"{path / 'meta.json'}: store format {meta.get('format_version')!r}, this genius reads format "
                             f"{FORMAT_VERSION} (with a content fingerprint); {REEXTRACT}")
        expected = {"dim": dim, "encoder": encoder, "kind": kind}
        for key, want in expected.items():
            if want is not None and meta.get(key) != want:
                raise StoreError(f"store {path}: {key} is {meta.get(key)!r}, expected {want!r}")
        if source is not None:
            check_source(path, meta, source)
        arrays = StoreArrays(**{name: _load_array(path, name, meta) for name in ARRAYS})
        if verify is None:
            env = os.environ.get(VERIFY_ENV, "")
            verify = env not in ("", "0") if env else _arrays_bytes(path) <= VERIFY_MAX_BYTES
        if verify and arrays_digest(path) != meta["content_sha256"]:
            raise StoreError(f"store {path}: its arrays do not match the content fingerprint in meta.json "
                             f"(a file was changed or damaged after it was written); {REEXTRACT}")
        return cls(path, meta, arrays)

    @property
    def skipped_empty_text(self) -> int:
        """Source rows genius extract left out of this store for an empty text (data.empty_text: skip)."""
        return int(self.meta.get(SKIPPED_META, {}).get("rows", 0))

    @property
    def content_id(self) -> str:
        """The SHA-256 of the store's arrays as written (meta.json ``content_sha256``): what an
        artefact made from this store records, so a re-extracted store is told apart."""
        return self.meta["content_sha256"]

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
    dim = _read_part(store_path, *chosen[0][:2])["img"].shape[1]
    with store_writer(store_path, num_rows, dim, **write_kwargs) as out:
        for start, stop, fresh in chosen:  # one part in memory at a time
            rows = np.flatnonzero(fresh)
            data = _read_part(store_path, start, stop)
            for name in ARRAYS:
                getattr(out, name)[start + rows] = data[name][rows]
    shutil.rmtree(parts_dir(store_path), ignore_errors=True)
    return Path(store_path)


def _read_part(store_path: str | os.PathLike, start: int, stop: int) -> dict[str, np.ndarray]:
    """A part's arrays; a damaged part (zip CRC, truncation) is a StoreError naming it."""
    path = part_path(store_path, start, stop)
    try:
        with np.load(path) as data:
            arrays = {name: data[name] for name in ARRAYS}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise StoreError(f"{path}: damaged part file ({err}); delete it and re-run genius extract, "
                         "which embeds that part again") from None
    if any(len(arrays[name]) != stop - start for name in ARRAYS):
        raise StoreError(f"{path}: holds other than {stop - start} rows; delete it and re-run genius extract")
    return arrays


def store_path(root: str | os.PathLike, encoder: str, split: str, source: str | os.PathLike) -> Path:
    """extracted_embed/<encoder>/<split>/<source file stem>/"""
    return Path(root) / encoder / split / Path(source).name.removesuffix(".jsonl")


def read_meta(path: str | os.PathLike) -> dict | None:
    """A store's meta.json (None when there is none); an unreadable one is a StoreError naming it."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        return None
    return read_json_object(meta_path, REEXTRACT, StoreError)


# ---- fingerprints ------------------------------------------------------------------------------
def source_fingerprint(source: str | os.PathLike) -> dict:
    """What meta.json records of the source file: portable path, size and SHA-256."""
    return file_content(source)


def check_source(path: Path, meta: dict, source: str | os.PathLike) -> None:
    """StoreError unless the store at ``path`` was made from a file with ``source``'s content."""
    recorded = meta.get("source") or {}
    current = source_fingerprint(source)
    if (recorded.get("size"), recorded.get("sha256")) != (current["size"], current["sha256"]):
        raise StoreError(f"store {path} is stale: it was made from {recorded.get('path')} "
                         f"({recorded.get('size')} bytes) but {source} ({current['size']} bytes) has other content; "
                         f"{REEXTRACT}")


def arrays_digest(folder: str | os.PathLike) -> str:
    """One SHA-256 over the store's array files (each hashed whole, .npy header included)."""
    folder = Path(folder)
    return sha256_json({name: content_sha256(folder / f"{name}.npy") for name in ARRAYS})


def _arrays_bytes(folder: Path) -> int:
    return sum(os.path.getsize(folder / f"{name}.npy") for name in ARRAYS)


def _load_array(path: Path, name: str, meta: dict) -> np.ndarray:
    """One array, memory-mapped, with the shape and dtype meta.json implies (cheap: no data read)."""
    file = path / f"{name}.npy"
    try:
        arr = np.load(file, mmap_mode="r")
    except FileNotFoundError:
        raise StoreError(f"store {path} is incomplete: {file} is missing; {REEXTRACT}") from None
    except (ValueError, OSError, EOFError) as err:  # a truncated or damaged .npy
        raise StoreError(f"{file}: not a readable array ({err}); the store is damaged, {REEXTRACT}") from None
    try:
        count, dim = int(meta["count"]), int(meta["dim"])
        want_dtype = array_dtype(name, meta.get("dtype", "float16"))
    except (KeyError, TypeError, ValueError):
        raise StoreError(f"{path / 'meta.json'}: count, dim or dtype missing or malformed; {REEXTRACT}") from None
    want_shape = (count, dim) if name in ("img", "txt") else (count,)
    if arr.shape != want_shape or arr.dtype != want_dtype:
        raise StoreError(f"{file}: holds {arr.dtype} {list(arr.shape)}, meta.json says {want_dtype} "
                         f"{list(want_shape)}; the store is damaged, {REEXTRACT}")
    return arr

