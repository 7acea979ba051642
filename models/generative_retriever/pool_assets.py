"""Opening a candidate pool for retrieval: its store, codes, trie and fused-embedding cache.

``genius eval`` and ``genius search`` open pools through :func:`open_pool` alone, so both refuse
the same stale inputs: codes assigned by another quantizer, in another modality mode, with other
codebook sizes than the generator's, for other candidates, or from another version of the
candidate store (re-extracted since: codes record the store's content id). Caches are keyed by
content, never by path:

    <codes dir>/<pool stem>/trie-<codes hash>.bin     trie over the pool's codes
    <results>/fused/<pool stem>/{fused.npy, meta.json}  fp16 fused CLIP-SF embeddings, per store content

The fused cache's meta.json records its file's size, time and SHA-256: a file of the recorded size
and time is reused unread, any other is hashed, so a copied cache is reused and a replaced one is
written again (with a warning). A cache from before the record is read as before.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import genius.trie_cpp as trie_lib
from genius.common.config import resolve_path
from genius.common.distributed import barrier, broadcast_from_main, group_rank, shard_bounds
from genius.common.fusion import fused_store_embeddings
from genius.common.io import (atomic_dir, atomic_path, atomic_write_json, file_record, is_recorded_file,
                              read_json_object, sha256_json)
from genius.common.mbeir import older_revision_twin
from genius.common.runstate import content_sha256, portable_path
from genius.common.store import ARRAYS, EmbeddingStore, StoreArrays, StoreError, store_path
from genius.models.generative_retriever.paper_numbers import PAPER_ORDER, paper_rank
from genius.models.generative_retriever.retrieval import CandidateMap, Ranking, dense_index
from genius.models.generative_retriever.run_models import Models, StaleInputError
from genius.models.residual_quantization.assign_codes import codes_intact

log = logging.getLogger("genius.eval")


def open_candidate_store(cfg: Any, path: Path) -> EmbeddingStore:
    """The stage-0 store of pool file ``path`` (memory-mapped; cheap)."""
    return EmbeddingStore.open(store_path(resolve_path(cfg.paths.stores_root), cfg.paths.encoder, "cand", path),
                               encoder=cfg.paths.encoder, kind="candidate", source=path)


@dataclass(frozen=True)
class DecodingTrie:
    """The trie a pool's queries are decoded under: the pool's own, or with
    ``decoding.task_specific_trie: union`` the universal pool's, as the official evaluation decoded
    the queries behind its task-specific numbers (paper Table 1). Decodings are cached under
    ``stem``, the pool whose codes built it, so the universal pass reuses them."""

    stem: str
    trie: object
    path: Path
    codes_hash: str


@dataclass
class Pool:
    """One candidate pool with everything retrieval needs, rows in store (= code file) order."""

    kind: str  # "task-specific" | "universal"
    path: Path
    stem: str
    store: EmbeddingStore
    codes_dir: Path
    codes_hash: str
    trie_path: Path
    trie: object
    cmap: CandidateMap
    fused_dir: Path
    order: np.ndarray | None = None  # the rows' order among candidates sharing an ID (concatenation_order)
    decoding: DecodingTrie | None = None  # None: the pool's own trie
    _fused: np.ndarray | None = None
    _dense: object | None = None

    def __post_init__(self) -> None:
        if self.decoding is None:
            self.decoding = DecodingTrie(self.stem, self.trie, self.trie_path, self.codes_hash)

    @property
    def ids(self) -> np.ndarray:
        return np.asarray(self.store.ids)

    def fused(self) -> np.ndarray:
        """fp16 fused CLIP-SF embeddings [N, D] (memory-mapped), cached under results/fused/."""
        if self._fused is None:
            self._fused = cached_fused_embeddings(self.store, self.fused_dir)
        return self._fused

    def dense_search(self, queries: np.ndarray, k: int, backend: str, chunk: int, device: torch.device) -> Ranking:
        """Exact inner product with the pool's fused embeddings. The index, and with it the vectors
        it keeps resident (:func:`dense_vectors`), is built once per pool and serves every query file."""
        if self._dense is None:
            if backend == "faiss":  # faiss holds fp32 host copies: as many rows as the host budget allows
                fused = self.fused()
                rows = max(resident_budget(torch.device("cpu")) // (4 * fused.shape[1]), 1)
                self._dense = dense_index(fused, backend=backend, chunk_size=chunk, resident_rows=rows)
            else:
                self._dense = dense_index(dense_vectors(self.fused(), device), backend=backend, chunk_size=chunk,
                                          device=device)
        scores, rows = self._dense.search(queries, k)
        return Ranking(rows, scores)

    def manifest(self, trie_backend: str) -> dict:
        """The pool's entry in run.json (paths relative to the GENIUS_ROOT when inside it)."""
        return {"kind": self.kind, "jsonl": portable_path(self.path), "store": portable_path(self.store.path),
                "codes": portable_path(self.codes_dir), "codes_hash": self.codes_hash,
                "trie": portable_path(self.trie_path), "trie_backend": trie_backend,
                "fused": portable_path(self.fused_dir), "collisions": self.cmap.collision_stats()} | (
            {"decoded_under": self.decoding.stem} if self.decoding.stem != self.stem else {})


def open_pool(cfg: Any, kind: str, path: Path, models: Models, build_trie: bool = True,
              store: EmbeddingStore | None = None, union_trie: DecodingTrie | None = None) -> Pool:
    """Pool file ``path`` as an eval config (``cfg``) lays it out, checked against ``models``.

    ``build_trie``: build a missing trie (the main process); the others wait and load it.
    ``store``: the pool's candidate store, if the caller opened it already.
    ``union_trie``: the universal pool's trie, if the caller opened it already (a task-specific
    pool decodes under it with ``decoding.task_specific_trie: union``).
    """
    store = store or open_candidate_store(cfg, path)
    codes, own = _codes_and_trie(cfg, path, store, models, build_trie)
    order = concatenation_order(store)
    cmap = CandidateMap.build(own.trie, codes, order)
    log.info("pool %s: %s", own.stem, cmap.collision_stats())
    decoding = None
    if kind == "task-specific" and cfg.decoding.task_specific_trie == "union":
        decoding = union_trie or open_union_trie(cfg, models, build_trie)
    return Pool(kind, path, own.stem, store, cfg.codes_root() / own.stem, own.codes_hash, own.path, own.trie, cmap,
                resolve_path(cfg.paths.results) / "fused" / own.stem, order, decoding)


def _codes_and_trie(cfg: Any, path: Path, store: EmbeddingStore, models: Models,
                    build_trie: bool) -> tuple[np.ndarray, DecodingTrie]:
    """Pool file ``path``'s codes [N, L] (checked against ``models`` and ``store``) and its trie."""
    stem = path.name.removesuffix(".jsonl")
    codes_dir = cfg.codes_root() / stem
    codes, codes_hash = load_codes(codes_dir, store, models)
    trie, trie_path = trie_for(codes, codes_dir, codes_hash, cfg.trie_backend, build=build_trie)
    return codes, DecodingTrie(stem, trie, trie_path, codes_hash)


def union_pool_file(cfg: Any) -> Path:
    """The eval config's universal pool file (the older revision's folder when only it is there)."""
    return older_revision_twin(resolve_path(cfg.paths.union_pool, resolve_path(cfg.paths.data_root)))


def open_union_trie(cfg: Any, models: Models, build_trie: bool = True) -> DecodingTrie:
    """The universal pool's trie, its codes checked like any pool's (:func:`open_pool`)."""
    path = union_pool_file(cfg)
    return _codes_and_trie(cfg, path, open_candidate_store(cfg, path), models, build_trie)[1]


_LOCAL_POOL = re.compile(r"^mbeir_([a-z0-9]+)_task(\d+)(?:_test)?_cand_pool$")


def _official_rank(store_name: str) -> int:
    """An M-BEIR local pool's place in the official concatenation (the paper's table order); other
    pools after them all, alike."""
    match = _LOCAL_POOL.match(store_name)
    rank = paper_rank(match[1], int(match[2])) if match else len(PAPER_ORDER)
    return rank if rank < len(PAPER_ORDER) else len(PAPER_ORDER)


def concatenation_order(store: EmbeddingStore) -> np.ndarray | None:
    """For a union store genius extract assembled from local stores: each row's position in the
    concatenation of those stores (its meta.json's ``built_from``); None for any other store, whose
    row order stands. M-BEIR's local pools come in the official order, the paper's table's, whatever
    order extract's ``data.local_pools`` gave; other pools in that order, after them.

    The official code indexes its universal pool as that concatenation, so candidates that share an
    ID come in that order; M-BEIR's union file, whose order the store keeps, is sorted by did
    instead. The order decides which of them GENIUS (without re-ranking) puts first."""
    names = store.meta.get("built_from")
    if not names:
        return None
    names = sorted(names, key=lambda name: (_official_rank(name), names.index(name)))
    try:
        locals_ = [np.asarray(EmbeddingStore.open(store.path.parent / name, kind="candidate", verify=False).ids)
                   for name in names]
    except StoreError as err:
        log.warning("%s; candidates of %s that share an ID keep the union file's order, not the local pools' "
                    "concatenation the official code uses (re-run genius extract for them)", err, store.path)
        return None
    concatenated = np.concatenate(locals_)
    sorter = np.argsort(concatenated, kind="stable")  # stable: a did in two local pools counts where it comes first
    ids = np.asarray(store.ids)
    at = np.searchsorted(concatenated, ids, sorter=sorter).clip(max=max(len(concatenated) - 1, 0))
    position = sorter[at]
    if len(concatenated) == 0 or not np.array_equal(concatenated[position], ids):
        log.warning("%s: not every candidate is in the local stores it was built from (%s, changed since); "
                    "candidates that share an ID keep the union file's order (re-run genius extract)",
                    store.path, ", ".join(names))
        return None
    return position


GiB = 1 << 30


def resident_budget(device: torch.device) -> int:
    """Bytes the dense search may keep resident on ``device``.

    On a GPU: its free memory (with what this process's allocator holds unused, e.g. the previous
    pool's vectors) less a margin for the search's own working set (a 4096 x chunk fp32 score block,
    1 GiB at the default chunk) and the decoder of the next query file. On the CPU: half the free
    host memory, shared by the processes of this node, each holding its own copy.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free - max(4 * GiB, total // 10)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not reported on this platform: stream
        return 0
    return free // 2 // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def dense_vectors(fused: np.ndarray, device: torch.device, chunk: int = 65536) -> np.ndarray | torch.Tensor:
    """A pool's fused vectors as the dense search should hold them across query files: on a GPU an
    fp16 copy in device memory (widened to fp32 chunk by chunk there), on the CPU an fp32 copy in
    host memory, when it fits in :func:`resident_budget`; otherwise the memmap itself, read and
    converted chunk by chunk on every search. The scores are the same either way (fp16 -> fp32 is exact)."""
    on_gpu = device.type == "cuda"
    need = fused.size * (2 if on_gpu else 4)
    budget = resident_budget(device)
    if need > budget:
        log.info("dense search: the pool's %.1f GiB of vectors exceed the %.1f GiB budget on %s; streaming them",
                 need / GiB, max(budget, 0) / GiB, device)
        return fused
    if not on_gpu:
        return np.asarray(fused, dtype=np.float32)
    resident = torch.empty(fused.shape, dtype=torch.float16, device=device)
    for start in range(0, len(fused), chunk):
        # np.array copies the memmap chunk: torch cannot wrap read-only memory without a warning
        resident[start : start + chunk] = torch.from_numpy(np.array(fused[start : start + chunk])).to(device)
    return resident


CODE_FILES = ("codes.npy", "ids.npy", "meta.json")


def codes_fingerprint(codes_dir: Path) -> str:
    """Content hash of a pool's code files (codes, ids and their meta.json), which must be the
    files assign-codes wrote: eval keys its run on it, so a replaced file is refused before the
    previous results are set aside."""
    missing = [name for name in CODE_FILES if not (codes_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{codes_dir / missing[0]}: missing from the pool's codes; re-run genius assign-codes "
                                "for this pool")
    changed = codes_intact(codes_dir)  # meta.json records each file's size and SHA-256
    if changed is not None:
        raise StaleInputError(f"{changed}: the pool's codes changed after genius assign-codes wrote them (or an "
                              f"older version wrote them); re-run genius assign-codes for {codes_dir}")
    return sha256_json({name: content_sha256(codes_dir / name) for name in CODE_FILES})


def _read_json(path: Path) -> dict:
    return read_json_object(path, "delete it and re-run the stage that writes it")


def load_codes(codes_dir: Path, store: EmbeddingStore, models: Models) -> tuple[np.ndarray, str]:
    """A pool's codes [N, L] in store order and their content hash (:func:`check_codes`), refusing
    codes of other candidates."""
    check_codes(codes_dir, store, models)
    codes_hash = codes_fingerprint(codes_dir)
    codes, ids = np.load(codes_dir / "codes.npy"), np.load(codes_dir / "ids.npy")
    if codes.ndim != 2 or len(codes) != len(ids) or not np.array_equal(ids, store.ids):
        raise StaleInputError(f"codes in {codes_dir} do not match the candidates of {store.path} (ids differ); "
                              "re-run genius assign-codes")
    return codes, codes_hash


def check_pool_codes(cfg: Any, path: Path, store: EmbeddingStore, models: Models) -> None:
    """:func:`check_codes` for pool file ``path``'s codes, without reading them: eval runs it for
    every pool before it sets the previous results aside."""
    check_codes(cfg.codes_root() / path.name.removesuffix(".jsonl"), store, models)


def check_codes(codes_dir: Path, store: EmbeddingStore, models: Models) -> None:
    """Refuse a pool's codes (from their meta.json) made by another quantizer, in another modality
    mode, with other codebook sizes than the generator's or from another version of the candidate
    store."""
    rq_file = models.files.get("rq", "the evaluated quantizer")
    if not (codes_dir / "meta.json").is_file():
        raise FileNotFoundError(f"{codes_dir}: no codes here; run genius assign-codes for this pool first "
                                f"(rq_path: {rq_file})")
    meta = _read_json(codes_dir / "meta.json")
    rerun = (f"re-run genius assign-codes with rq_path: {rq_file} and out_dir: {codes_dir.parent} "
             f"(or point the eval config at the codes of that quantizer)")
    made_by = meta.get("rq_path", "an unrecorded file")
    if meta.get("rq") != models.fingerprints["rq"]:
        raise StaleInputError(f"codes in {codes_dir} were assigned with the quantizer of {made_by}, not the one of "
                              f"{models.files.get('rq', 'the evaluated models')} (fingerprints differ); {rerun}")
    if meta.get("modality_mode") != models.modality_mode:
        raise StaleInputError(f"codes in {codes_dir} were assigned in modality mode {meta.get('modality_mode')!r}, "
                              f"the quantizer of {models.files.get('rq', 'the evaluated models')} is "
                              f"{models.modality_mode!r}; {rerun}")
    if meta.get("codebook_sizes") != models.codebook_sizes:
        raise StaleInputError(f"codes in {codes_dir} (made by {made_by}) have codebook sizes "
                              f"{meta.get('codebook_sizes')}, the generator of "
                              f"{models.files.get('generator', 'the evaluated models')} decodes "
                              f"{models.codebook_sizes} (unique_level codes cannot be generated); {rerun}")
    if meta.get("store_content") != store.content_id:
        raise StaleInputError(f"{codes_dir}: these codes were computed from another version of the candidate "
                              f"store {store.path} (re-extracted since, e.g. with another encoder checkpoint); "
                              f"{rerun}")


def trie_for(codes: np.ndarray, codes_dir: Path, codes_hash: str, backend: str, build: bool = True) -> tuple[object, Path]:
    """Load the pool's trie keyed by its codes' hash, building (and saving) it when absent or stale.

    Under torchrun only rank 0 builds (``build``); the others wait at a barrier, then load it.
    """
    path = codes_dir / f"trie-{codes_hash[:16]}.bin"
    if build and not path.is_file():
        log.info("building the %s trie for %s (%d candidates)", backend, codes_dir.name, len(codes))
        with atomic_path(path) as tmp:
            trie_lib.build_trie(codes, backend).save(tmp)
        for old in codes_dir.glob("trie-*.bin"):
            if old != path:  # tries of earlier codes can never be used again
                old.unlink()
    barrier()
    return trie_lib.load_trie(path, backend), path


def _cached_fused(cache_dir: Path, store: EmbeddingStore) -> np.ndarray | None:
    """The cached fused embeddings of ``store`` (memory-mapped) when ``cache_dir`` holds the ones
    written for its content; None (a miss: the cache is written again) otherwise. A cache that is
    there but damaged or changed is named in a warning."""
    meta_path, path = cache_dir / "meta.json", cache_dir / "fused.npy"
    if not meta_path.is_file():
        return None
    try:
        meta = _read_json(meta_path)
    except ValueError as err:
        log.warning("%s; writing the cache again", err)
        return None
    if meta.get("store_content") != store.content_id:
        return None  # made for another version of the store: replaced without a word
    shape = (len(store), store.dim)
    fused = _readable_fused(path, shape)
    # a cache from before the record is read as before: genius search reads runs it may not write to
    if fused is not None and is_recorded_file(path, meta.get("fused")):
        return fused
    if fused is not None:
        log.warning("%s: not the fp16 [%d, %d] embeddings %s records (changed since it was written); writing it "
                    "again", path, *shape, meta_path)
    return None


def _readable_fused(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached fused embeddings, memory-mapped, if the file reads as fp16 rows of ``shape``;
    else None (a warning names it)."""
    try:
        fused = np.load(path, mmap_mode="r")
        if fused.dtype == np.float16 and fused.shape == shape:
            return fused
    except (ValueError, OSError, EOFError):
        pass
    log.warning("%s: not the fp16 [%d, %d] embeddings this cache holds (damaged or changed); writing it again",
                path, *shape)
    return None


def cached_fused_embeddings(store: EmbeddingStore, cache_dir: Path, chunk: int = 65536) -> np.ndarray:
    """The store's fused, normalised embeddings as fp16, written once per store content.

    Under torchrun every rank calls this at the same point and a missing cache is built by all of
    them, each a contiguous slice of rows into one preallocated file, so the collectives in between
    wait for one rank's share (1/N of a 5.6M-candidate pool's minutes), never for the whole.
    """
    # Every rank decides before the first collective below, and rank 0 publishes only after the
    # second, so all ranks see the same answer.
    cached = _cached_fused(cache_dir, store)
    if cached is not None:
        return cached
    rank, world_size = group_rank()
    with atomic_dir(cache_dir) if rank == 0 else contextlib.nullcontext() as tmp:
        if rank == 0:
            np.lib.format.open_memmap(tmp / "fused.npy", mode="w+", dtype=np.float16, shape=(len(store), store.dim))
        tmp = broadcast_from_main(tmp)  # the staging folder, once it holds the file
        out = np.load(tmp / "fused.npy", mmap_mode="r+")
        arrays = store.arrays
        start, stop = shard_bounds(len(store), rank, world_size)
        for begin in range(start, stop, chunk):
            rows = slice(begin, min(begin + chunk, stop))
            part = StoreArrays(**{name: np.array(getattr(arrays, name)[rows]) for name in ARRAYS})
            out[rows] = fused_store_embeddings(part)
        out.flush()
        del out
        barrier()  # every slice written
        if rank == 0:
            # the rename that publishes the folder keeps the file's size and time as recorded
            atomic_write_json(tmp / "meta.json", {"store_content": store.content_id,
                                                  "store_path": portable_path(store.path),
                                                  "fused": file_record(tmp / "fused.npy")})
    barrier()  # published
    return np.load(cache_dir / "fused.npy", mmap_mode="r")
