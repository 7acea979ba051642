"""Opening a candidate pool for retrieval: its store, codes, trie and fused-embedding cache.

``genius eval`` and ``genius search`` open pools through :func:`open_pool` alone, so both refuse
the same stale inputs: codes assigned by another quantizer, in another modality mode, with other
codebook sizes than the generator's, for other candidates, or from another version of the
candidate store (re-extracted since: codes record the store's content id). Caches are keyed by
content, never by path:

    <codes dir>/<pool stem>/trie-<codes hash>.bin     trie over the pool's codes
    <results>/fused/<pool stem>/{fused.npy, meta.json}  fp16 fused CLIP-SF embeddings, per store content
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import genius.trie_cpp as trie_lib
from genius.common.config import resolve_path
from genius.common.distributed import barrier
from genius.common.fusion import fused_store_embeddings
from genius.common.io import atomic_dir, atomic_path, atomic_write_json, sha256_file, sha256_json
from genius.common.runstate import portable_path
from genius.common.store import ARRAYS, EmbeddingStore, StoreArrays, store_path
from genius.models.generative_retriever.retrieval import CandidateMap, Ranking, dense_index
from genius.models.generative_retriever.run_models import Models, StaleInputError

log = logging.getLogger("genius.eval")


def open_candidate_store(cfg: Any, path: Path) -> EmbeddingStore:
    """The stage-0 store of pool file ``path`` (memory-mapped; cheap)."""
    return EmbeddingStore.open(store_path(resolve_path(cfg.paths.stores_root), cfg.paths.encoder, "cand", path),
                               encoder=cfg.paths.encoder, kind="candidate", source=path)


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
    _fused: np.ndarray | None = None
    _dense: object | None = None

    @property
    def ids(self) -> np.ndarray:
        return np.asarray(self.store.ids)

    def fused(self) -> np.ndarray:
        """fp16 fused CLIP-SF embeddings [N, D] (memory-mapped), cached under results/fused/."""
        if self._fused is None:
            self._fused = cached_fused_embeddings(self.store, self.fused_dir)
        return self._fused

    def dense_search(self, queries: np.ndarray, k: int, backend: str, chunk: int, device: torch.device) -> Ranking:
        """Exact inner product with the pool's fused embeddings (the index is built once)."""
        if self._dense is None:
            self._dense = dense_index(self.fused(), backend=backend, chunk_size=chunk, device=device)
        scores, rows = self._dense.search(queries, k)
        return Ranking(rows, scores)

    def manifest(self, trie_backend: str) -> dict:
        """The pool's entry in run.json (paths relative to the GENIUS_ROOT when inside it)."""
        return {"kind": self.kind, "jsonl": portable_path(self.path), "store": portable_path(self.store.path),
                "codes": portable_path(self.codes_dir), "codes_hash": self.codes_hash,
                "trie": portable_path(self.trie_path), "trie_backend": trie_backend,
                "fused": portable_path(self.fused_dir), "collisions": self.cmap.collision_stats()}


def open_pool(cfg: Any, kind: str, path: Path, models: Models, build_trie: bool = True,
              store: EmbeddingStore | None = None) -> Pool:
    """Pool file ``path`` as an eval config (``cfg``) lays it out, checked against ``models``.

    ``build_trie``: build a missing trie (the main process); the others wait and load it.
    ``store``: the pool's candidate store, if the caller opened it already.
    """
    store = store or open_candidate_store(cfg, path)
    stem = path.name.removesuffix(".jsonl")
    codes_dir = cfg.codes_root() / stem
    codes, codes_hash = load_codes(codes_dir, store, models)
    trie, trie_path = trie_for(codes, codes_dir, codes_hash, cfg.trie_backend, build=build_trie)
    cmap = CandidateMap.build(trie, codes)
    log.info("pool %s: %s", stem, cmap.collision_stats())
    return Pool(kind, path, stem, store, codes_dir, codes_hash, trie_path, trie, cmap,
                resolve_path(cfg.paths.results) / "fused" / stem)


CODE_FILES = ("codes.npy", "ids.npy", "meta.json")


def codes_fingerprint(codes_dir: Path) -> str:
    """Content hash of a pool's code files (codes, ids and their meta.json)."""
    missing = [name for name in CODE_FILES if not (codes_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{codes_dir / missing[0]}: missing from the pool's codes; re-run genius assign-codes "
                                "for this pool")
    return sha256_json({name: sha256_file(codes_dir / name) for name in CODE_FILES})


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def load_codes(codes_dir: Path, store: EmbeddingStore, models: Models) -> tuple[np.ndarray, str]:
    """A pool's codes [N, L] in store order and their content hash, refusing codes made by another
    quantizer, in another modality mode, with other codebook sizes than the generator's, for other
    candidates or from another version of the candidate store."""
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
    codes_hash = codes_fingerprint(codes_dir)
    codes, ids = np.load(codes_dir / "codes.npy"), np.load(codes_dir / "ids.npy")
    if codes.ndim != 2 or len(codes) != len(ids) or not np.array_equal(ids, store.ids):
        raise StaleInputError(f"codes in {codes_dir} do not match the candidates of {store.path} (ids differ); "
                              "re-run genius assign-codes")
    return codes, codes_hash


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


def cached_fused_embeddings(store: EmbeddingStore, cache_dir: Path, chunk: int = 65536) -> np.ndarray:
    """The store's fused, normalised embeddings as fp16, written once per store content."""
    key = store.content_id
    meta = cache_dir / "meta.json"
    if meta.is_file() and _read_json(meta).get("store_content") == key:
        return np.load(cache_dir / "fused.npy", mmap_mode="r")
    with atomic_dir(cache_dir) as tmp:
        out = np.lib.format.open_memmap(tmp / "fused.npy", mode="w+", dtype=np.float16, shape=(len(store), store.dim))
        arrays = store.arrays
        for start in range(0, len(store), chunk):
            part = StoreArrays(**{name: np.array(getattr(arrays, name)[start : start + chunk]) for name in ARRAYS})
            out[start : start + chunk] = fused_store_embeddings(part)
        out.flush()
        del out
        atomic_write_json(tmp / "meta.json", {"store_content": key, "store_path": portable_path(store.path)})
    return np.load(cache_dir / "fused.npy", mmap_mode="r")
