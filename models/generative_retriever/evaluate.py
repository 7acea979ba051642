"""``genius eval``: GENIUS, GENIUS^R and the dense CLIP-SF baseline on M-BEIR-format test files.

    genius eval --config configs_scripts/tiny/eval.yaml [--set decoding.num_beams=10]

The models come either from a native run (``paths.rq_run``/rq.pt and ``paths.gen_run``/generator.pt)
or from an official-layout ``GENIUS_t5small.pth`` (``paths.official_checkpoint``: its embedded
quantizer in learned modality mode and its T5); the pools' codes must have been assigned by
``genius assign-codes`` with that same quantizer (checked by fingerprint, modality mode and
codebook sizes; a mismatch names both files and what to run).

For every query file, against its task-specific pool and (optionally) the universal pool:
decode the queries' IDs with trie-constrained beam search, map IDs to candidates, rank them
(GENIUS), re-rank their union by fused CLIP-SF cosine (GENIUS^R), search the same fused
embeddings exhaustively (dense), and score UniIR's Recall@k per (dataset, task). One process by
default; under torchrun (NPROC=N) every rank decodes a contiguous shard of each query file and
rank 0 gathers them in order, then ranks, scores and writes everything.

Nothing stale is reused and nothing is overwritten by another pass. Every cached artefact
lives under a path keyed by (pool, query file) and records the hashes of everything it was
made from; a mismatch recomputes it:

    <codes dir = paths.codes (default rq_run/codes)>/<pool stem>/trie-<codes hash>.bin   trie over the pool's codes
    results/<setting>/
      config.yaml, run.json (manifest for genius search), metrics.json
      results.tsv, results.md, recall_by_task.png
      fused/<pool stem>/{fused.npy, meta.json}           fp16 fused CLIP-SF embeddings of a pool
      decoded/<pool stem>/<query stem>/{codes,scores,valid}.npy + meta.json   beam search output
      runs/<pool stem>/<query stem>/{dense,genius,genius_r}.run              TREC-style run files
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

import genius.trie_cpp as trie_lib
from genius.common.config import config_to_dict, project_root, resolve_path
from genius.common.distributed import DistInfo, autocast_dtype, barrier, cleanup, init_distributed
from genius.common.fusion import fused_store_embeddings
from genius.common.io import atomic_dir, atomic_path, atomic_write_json, atomic_write_text, sha256_file, sha256_json
from genius.common.mbeir import (
    MBEIR_DATASET_IDS, QID_BASE, load_qrels, older_revision_twin, parse_query_file_name, unhash_qid,
)
from genius.common.stage import (
    is_up_to_date, mark_done, parse_stage_config, record_run, setup_logging, stage_fingerprint, stage_parser,
    user_errors_exit,
)
from genius.common.store import ARRAYS, EmbeddingStore, StoreArrays, store_path
from genius.models.generative_retriever import metrics
from genius.models.generative_retriever.paper_numbers import default_k
from genius.models.generative_retriever.retrieval import (
    ABSENT,
    CandidateMap,
    Ranking,
    dense_index,
    genius_ranking,
    rerank_ranking,
    target_modality_share,
    union_sizes,
)
from genius.models.generative_retriever.tables import (
    DecodeStats,
    RecallResult,
    markdown_report,
    plot_recall_by_task,
    results_tsv,
)
from genius.models.residual_quantization.assign_codes import combiner_autocast, combiner_dtype

log = logging.getLogger("genius.eval")

MANIFEST_VERSION = 1


# ---- config ----------------------------------------------------------------------------------
@dataclass
class EvalFile:
    queries: str  # query jsonl, relative to the data root
    pool: str  # its task-specific candidate pool
    qrels: str
    k: int | None = None  # the Recall@k to report; null = 5, or 10 for Fashion200K and FashionIQ


@dataclass
class PathsConfig:
    data_root: str = "worlds/tiny"
    stores_root: str = "extracted_embed"  # stage-0 stores: <stores_root>/<encoder>/{test,cand}/<file stem>/
    encoder: str = "CLIP_SF"  # stage-0 encoder name (the stores' directory)
    # The models: a native run (rq_run and gen_run) OR an official-layout checkpoint, not both.
    rq_run: str | None = None  # rq.pt (and, by default, the codes in codes/<pool stem>/)
    gen_run: str | None = None  # generator.pt
    official_checkpoint: str | None = None  # GENIUS_t5small.pth: its embedded quantizer and generator
    codes: str | None = None  # <pool stem>/ code folders of genius assign-codes; null: <rq_run>/codes
    results: str = "results/tiny"
    union_pool: str = "cand_pool/global/mbeir_union_test_cand_pool.jsonl"  # relative to the data root
    instructions: str = "instructions/query_instructions.tsv"  # for genius search; relative to the data root


@dataclass
class DecodingConfig:
    num_beams: int = 50
    batch_size: int = 64
    # True: each step normalises over the level's codes only (fewer FLOPs, other beams); False:
    # full-vocabulary normalisation, the official decoding's exact scores and beams.
    level_head: bool = True
    autocast: bool = False  # the generator under bf16 autocast on CPU, fp16 on GPU
    # The query Combiner under fp16 autocast, on CUDA only (on CPU it stays fp32), as the official
    # evaluation ran it; the candidates' side is assign-codes' ``autocast``.
    combiner_autocast: bool = False
    # > 0: keep a modality (level-0 code) only if its probability is at least this fraction of the
    # best one's (beam_search module docstring); 0 is the official decoding.
    modality_threshold: float = 0.0

    def validate(self) -> None:
        if not 0.0 <= self.modality_threshold <= 1.0:
            raise ValueError(f"decoding.modality_threshold must be in [0, 1], got {self.modality_threshold}")


@dataclass
class EvalConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    files: list[EvalFile] = field(default_factory=list)  # empty: every query/test/*.jsonl of the data root
    task_specific: bool = True  # each file against its own pool
    union: bool = True  # each file against the universal pool
    extra_ks: list[int] = field(default_factory=list)  # more Recall@k rows in the TSV (e.g. [1, 10])
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    trie_backend: Literal["cpp", "python", "marisa"] = "cpp"
    rerank: bool = True  # GENIUS^R
    dense: bool = True  # the dense CLIP-SF baseline over the same fused embeddings
    dense_backend: Literal["torch", "faiss"] = "torch"
    dense_chunk: int = 65536  # candidates scored per matmul
    device: Literal["auto", "cpu", "cuda"] = "auto"
    run_files: bool = True

    def validate(self) -> None:
        if not (self.task_specific or self.union):
            raise ValueError("task_specific and union are both false: nothing to evaluate")
        if any(k < 1 for k in self.extra_ks) or any(f.k is not None and f.k < 1 for f in self.files):
            raise ValueError("every Recall@k must have k >= 1")
        if self.decoding.num_beams < 1 or self.decoding.batch_size < 1 or self.dense_chunk < 1:
            raise ValueError("decoding.num_beams, decoding.batch_size and dense_chunk must be >= 1")
        paths = self.paths
        if paths.official_checkpoint is not None:
            if paths.rq_run is not None or paths.gen_run is not None:
                raise ValueError("paths: give either rq_run and gen_run (a native run) or official_checkpoint "
                                 "(an official-layout GENIUS_t5small.pth), not both")
            if paths.codes is None:
                raise ValueError("paths.codes is required with paths.official_checkpoint: the folder genius "
                                 "assign-codes wrote with that checkpoint as rq_path")
        elif paths.rq_run is None or paths.gen_run is None:
            raise ValueError("paths: set rq_run and gen_run (a native run's folders) or official_checkpoint "
                             "(an official-layout GENIUS_t5small.pth)")

    def codes_root(self) -> Path:
        """Where the pools' code folders are."""
        return resolve_path(self.paths.codes if self.paths.codes is not None else Path(self.paths.rq_run) / "codes")

    def checkpoint_files(self) -> list[Path]:
        """The model files the evaluation reads."""
        if self.paths.official_checkpoint is not None:
            return [resolve_path(self.paths.official_checkpoint)]
        return [resolve_path(self.paths.rq_run) / "rq.pt", resolve_path(self.paths.gen_run) / "generator.pt"]


class StaleInputError(ValueError):
    """An input made from something other than what the rest of the evaluation uses."""


# ---- models ----------------------------------------------------------------------------------
@dataclass
class Models:
    """What decoding needs; ``load_models`` builds it from a native run or an official checkpoint.

    ``embed(img, txt, img_mask, txt_mask) -> z [B, dim]`` (float32, CPU tensors in and out) and
    ``decode(z, trie) -> BeamResult``; ``fingerprints`` key every cached decoding. Codes are only
    accepted if made by the quantizer ``fingerprints["rq"]`` in ``modality_mode`` with
    ``codebook_sizes`` (the generator's vocabulary).
    """

    embed: Callable[..., torch.Tensor]
    decode: Callable
    fingerprints: dict
    codebook_sizes: list[int]
    modality_mode: str
    files: dict = field(default_factory=dict)  # "rq" / "generator" -> checkpoint path, for messages and the manifest


def load_models(cfg: EvalConfig, device: torch.device) -> Models:
    # Imported here: the driver and its tests run with stand-in models without loading transformers.
    from genius.models.generative_retriever.beam_search import constrained_beam_search

    missing = [path for path in cfg.checkpoint_files() if not path.is_file()]
    if missing:
        hint = ("download GENIUS_t5small.pth (Hugging Face Sungyeon/GENIUS) or run genius export-official"
                if cfg.paths.official_checkpoint is not None else "run genius train-rq and genius train-gen first")
        raise FileNotFoundError(f"{missing[0]} does not exist; {hint} (or fix paths in the eval config)")
    if cfg.paths.official_checkpoint is not None:
        from genius.models.generative_retriever.official import load_official_generator
        from genius.models.residual_quantization.official import quantizer_fingerprint

        (path,) = cfg.checkpoint_files()
        generator, rq = load_official_generator(path)
        rq_fp, files = quantizer_fingerprint(rq), {"rq": str(path), "generator": str(path)}
    else:
        from genius.models.generative_retriever.generator import load_generator
        from genius.models.residual_quantization.model import load_rq, rq_fingerprint

        rq_path, gen_path = cfg.checkpoint_files()
        rq, rq_fp = load_rq(rq_path), rq_fingerprint(rq_path)
        generator, meta = load_generator(gen_path)
        if meta.get("rq") != rq_fp:
            raise StaleInputError(f"{gen_path} was trained on a different rq.pt than {rq_path}; retrain the "
                                  "generator (or point paths.rq_run at the quantizer it was trained with)")
        files = {"rq": str(rq_path), "generator": str(gen_path)}
    rq.to(device).eval()
    generator.to(device)
    dec = cfg.decoding

    @torch.no_grad()
    def embed(img, txt, img_mask, txt_mask):
        with combiner_autocast(device, dec.combiner_autocast):
            z = rq.embed(img.to(device), txt.to(device), img_mask.to(device), txt_mask.to(device))
        return z.float().cpu()

    def decode(z, trie):
        return constrained_beam_search(generator, z.to(device), trie, rq.codebook_sizes, num_beams=dec.num_beams,
                                       batch_size=dec.batch_size, level_head=dec.level_head, autocast=dec.autocast,
                                       modality_threshold=dec.modality_threshold)

    return Models(embed, decode, {"rq": rq_fp, "generator": sha256_file(Path(files["generator"]))},
                  list(generator.codebook_sizes), rq.arch["modality_mode"], files)


# ---- inputs ----------------------------------------------------------------------------------
@dataclass
class QueryFile:
    path: Path
    pool: Path
    qrels: Path
    stem: str
    dataset: str
    task: int
    split: str
    k: int  # the reported Recall@k
    ks: list[int]  # every k scored (reported first)
    mbeir: bool  # an M-BEIR file, so the paper's numbers apply


def discover_files(data_root: Path) -> list[EvalFile]:
    """Every ``query/test/mbeir_<ds>_task<k>_test.jsonl`` with its local pool and qrels."""
    files = []
    for query in sorted((data_root / "query" / "test").glob("mbeir_*_test.jsonl")):
        parsed = parse_query_file_name(query)
        if parsed is None:
            continue
        stem = f"mbeir_{parsed[0]}_task{parsed[1]}"
        # MSCOCO's test pools are named mbeir_mscoco_task<k>_test_cand_pool.jsonl
        pools = [data_root / "cand_pool" / "local" / f"{stem}{suffix}"
                 for suffix in ("_cand_pool.jsonl", "_test_cand_pool.jsonl")]
        pool = next((p for p in pools if p.is_file()), None)
        if pool is None:
            raise FileNotFoundError(f"no local pool for {query.name}: expected {pools[0]} (or {pools[1].name})")
        files.append(EvalFile(str(query.relative_to(data_root)), str(pool.relative_to(data_root)),
                              f"qrels/test/{stem}_test_qrels.txt"))
    if not files:
        raise FileNotFoundError(f"no query files matching {data_root}/query/test/mbeir_*_test.jsonl; "
                                "list them under 'files'")
    return files


def union_pool_file(cfg: EvalConfig) -> Path:
    return older_revision_twin(resolve_path(cfg.paths.union_pool, resolve_path(cfg.paths.data_root)))


def resolve_files(cfg: EvalConfig) -> list[QueryFile]:
    root = resolve_path(cfg.paths.data_root)
    out = []
    for spec in cfg.files or discover_files(root):
        path, pool, qrels = (resolve_path(p, root) for p in (spec.queries, spec.pool, spec.qrels))
        for p in (path, pool, qrels):
            if not p.is_file():
                raise FileNotFoundError(f"{p} does not exist (from the eval config's files / data root {root})")
        dataset, task, split = parse_query_file_name(path) or (path.stem, -1, "test")
        k = spec.k or default_k(dataset)
        ks = [k] + sorted(set(cfg.extra_ks) - {k})
        out.append(QueryFile(path, pool, qrels, path.stem, dataset, task, split, k, ks,
                             mbeir=dataset in MBEIR_DATASET_IDS and split == "test"))
    return out


def open_query_store(cfg: EvalConfig, qf: QueryFile) -> EmbeddingStore:
    store = EmbeddingStore.open(store_path(resolve_path(cfg.paths.stores_root), cfg.paths.encoder, "test", qf.path),
                                encoder=cfg.paths.encoder, kind="query", source=qf.path)
    if not len(store):
        raise ValueError(f"query store {store.path} is empty ({qf.path} has no queries)")
    if qf.mbeir and int(store.ids[0]) // QID_BASE != MBEIR_DATASET_IDS[qf.dataset]:
        qf.mbeir = False  # named like M-BEIR's file but holds another dataset's queries
    return store


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

    def dense_search(self, queries: np.ndarray, k: int, cfg: EvalConfig, device: torch.device) -> Ranking:
        """The dense baseline: exact inner product with the pool's fused embeddings (index built once)."""
        if self._dense is None:
            self._dense = dense_index(self.fused(), backend=cfg.dense_backend, chunk_size=cfg.dense_chunk,
                                      device=device)
        scores, rows = self._dense.search(queries, k)
        return Ranking(rows, scores)


def codes_fingerprint(codes_dir: Path) -> str:
    """Content hash of a pool's code files (codes, ids and their meta.json)."""
    return sha256_json({name: sha256_file(codes_dir / name) for name in ("codes.npy", "ids.npy", "meta.json")})


def load_codes(codes_dir: Path, store: EmbeddingStore, models: Models) -> np.ndarray:
    """A pool's codes [N, L] in store order, refusing codes made by another quantizer, in another
    modality mode, with other codebook sizes than the generator's, or for another store."""
    if not (codes_dir / "meta.json").is_file():
        raise FileNotFoundError(f"no codes at {codes_dir}; run genius assign-codes for this pool first "
                                f"(rq_path: {models.files.get('rq', 'the evaluated quantizer')})")
    meta = _read_json(codes_dir / "meta.json")
    rerun = (f"re-run genius assign-codes with rq_path: {models.files.get('rq', 'the evaluated quantizer')} "
             f"and out_dir: {codes_dir.parent} (or point the eval config at the codes of that quantizer)")
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
    codes, ids = np.load(codes_dir / "codes.npy"), np.load(codes_dir / "ids.npy")
    if codes.ndim != 2 or len(codes) != len(ids) or not np.array_equal(ids, store.ids):
        raise StaleInputError(f"codes in {codes_dir} do not match the candidates of {store.path} (ids differ); "
                              "re-run genius assign-codes")
    return codes


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
    """The store's fused, normalised embeddings as fp16, written once per store version."""
    key = sha256_json(store.meta)
    meta = cache_dir / "meta.json"
    if meta.is_file() and sha256_json(_read_json(meta).get("store")) == key:
        return np.load(cache_dir / "fused.npy", mmap_mode="r")
    with atomic_dir(cache_dir) as tmp:
        out = np.lib.format.open_memmap(tmp / "fused.npy", mode="w+", dtype=np.float16, shape=(len(store), store.dim))
        arrays = store.arrays
        for start in range(0, len(store), chunk):
            part = StoreArrays(**{name: np.array(getattr(arrays, name)[start : start + chunk]) for name in ARRAYS})
            out[start : start + chunk] = fused_store_embeddings(part)
        out.flush()
        del out
        atomic_write_json(tmp / "meta.json", {"store": store.meta, "store_path": str(store.path)})
    return np.load(cache_dir / "fused.npy", mmap_mode="r")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def open_pool(cfg: EvalConfig, kind: str, path: Path, models: Models, is_main: bool = True) -> Pool:
    store = EmbeddingStore.open(store_path(resolve_path(cfg.paths.stores_root), cfg.paths.encoder, "cand", path),
                                encoder=cfg.paths.encoder, kind="candidate", source=path)
    stem = path.name.removesuffix(".jsonl")
    codes_dir = cfg.codes_root() / stem
    codes = load_codes(codes_dir, store, models)
    codes_hash = codes_fingerprint(codes_dir)
    trie, trie_path = trie_for(codes, codes_dir, codes_hash, cfg.trie_backend, build=is_main)
    cmap = CandidateMap.build(trie, codes)
    log.info("pool %s: %s", stem, cmap.collision_stats())
    return Pool(kind, path, stem, store, codes_dir, codes_hash, trie_path, trie, cmap,
                resolve_path(cfg.paths.results) / "fused" / stem)


# ---- decoding, cached per (model, pool, query file) ------------------------------------------
@dataclass
class Decoded:
    codes: np.ndarray  # [Q, B, L], -1 for absent beams
    scores: np.ndarray  # [Q, B]
    valid: np.ndarray  # bool [Q, B]
    seconds: float
    cached: bool


def decode_key(cfg: EvalConfig, models: Models, pool: Pool, queries: EmbeddingStore, device: torch.device) -> dict:
    return {"models": models.fingerprints, "codes": pool.codes_hash, "trie": pool.trie_path.name,
            "queries": sha256_json(queries.meta), "num_beams": cfg.decoding.num_beams,
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
    beams = models.decode(embed_queries(models, arrays.take(rows)), pool.trie)
    return (beams.codes.cpu().numpy().astype(np.int64), beams.scores.float().cpu().numpy(),
            beams.valid.cpu().numpy().astype(bool))


def decode_cached(cfg: EvalConfig, models: Models, pool: Pool, queries: EmbeddingStore, out_dir: Path,
                  info: DistInfo) -> Decoded | None:
    """Beam search output for every query, reused when its key (all inputs' hashes) matches.

    Under torchrun each rank decodes a contiguous shard; rank 0 gathers them in rank order (so
    the rows are exactly the store's) and returns the result; the other ranks return None.
    """
    key = decode_key(cfg, models, pool, queries, info.device)
    if (out_dir / "meta.json").is_file():
        meta = _read_json(out_dir / "meta.json")
        if meta.get("key") == key:
            if not info.is_main:
                return None
            arrays = [np.load(out_dir / f"{n}.npy") for n in ("codes", "scores", "valid")]
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
        for name in ("codes", "scores", "valid"):
            np.save(tmp / f"{name}.npy", getattr(decoded, name))
        atomic_write_json(tmp / "meta.json", {"key": key, "seconds": seconds, "num_queries": len(queries),
                                              "pool": str(pool.path), "queries_store": str(queries.path),
                                              "processes": info.world_size})
    return decoded


# ---- one (pool, query file) --------------------------------------------------------------------
@dataclass
class PairOutcome:
    results: list[RecallResult]
    stats: DecodeStats


def evaluate_pair(cfg: EvalConfig, models: Models, pool: Pool, qf: QueryFile, queries: EmbeddingStore,
                  info: DistInfo) -> PairOutcome | None:
    """Decode (all ranks), then rank, score and write (rank 0 only; the others return None)."""
    out = resolve_path(cfg.paths.results)
    decoded = decode_cached(cfg, models, pool, queries, out / "decoded" / pool.stem / qf.stem, info)
    if decoded is None:
        return None
    leaves = pool.cmap.leaves_of(decoded.codes)
    leaves[~decoded.valid] = ABSENT
    depth = max(qf.ks)
    rankings: dict[str, Ranking] = {"genius": genius_ranking(pool.cmap, leaves, decoded.scores, depth)}
    fused_q = fused_store_embeddings(queries.arrays.take(np.arange(len(queries)))) if (cfg.rerank or cfg.dense) else None
    if cfg.rerank:
        rankings["genius_r"] = rerank_ranking(pool.cmap, leaves, fused_q, pool.fused(), depth)
    if cfg.dense:
        rankings["dense"] = pool.dense_search(fused_q, depth, cfg, info.device)

    qids = np.asarray(queries.ids)
    qrels = load_qrels(qf.qrels)
    relevant = metrics.relevant_sets(qids, qrels)
    task_ids = np.array([qrels.task_of.get(unhash_qid(q), qf.task) for q in qids.tolist()], dtype=np.int64)
    results = []
    for method, ranking in rankings.items():
        retrieved = ranking.ids(pool.ids)
        for task, by_k in metrics.recall_by_task(retrieved, relevant, task_ids, qf.ks).items():
            results += [RecallResult(method, pool.kind, pool.stem, qf.stem, qf.dataset, task, qf.split, k, value,
                                     reported=k == qf.k, mbeir=qf.mbeir) for k, value in by_k.items()]
        if cfg.run_files:
            metrics.write_run_file(out / "runs" / pool.stem / qf.stem / f"{method}.run", qids, retrieved,
                                   ranking.scores, method, task_ids)
    genius = rankings["genius"]
    stats = DecodeStats(
        pool.kind, pool.stem, qf.stem, len(qids), decoded.seconds, decoded.cached,
        genius_candidates_per_query=float((genius.rows >= 0).sum(1).mean()) if len(qids) else 0.0,
        rerank_candidates_per_query=float(union_sizes(pool.cmap, leaves).mean()) if len(qids) else 0.0,
        target_modality_share=target_modality_share(genius, np.asarray(pool.store.arrays.modality),
                                                    np.asarray(queries.arrays.target_modality)))
    log.info("%s on %s: %s; %.1f queries/s%s", qf.stem, pool.stem,
             ", ".join(f"{r.method} R@{r.k}={100 * r.value:.1f}" for r in results if r.reported),
             stats.queries_per_second, " (cached decoding)" if decoded.cached else "")
    return PairOutcome(results, stats)


# ---- the whole evaluation --------------------------------------------------------------------
@dataclass
class EvalReport:
    results: list[RecallResult]
    stats: list[DecodeStats]
    markdown: str
    out_dir: Path


def evaluate(cfg: EvalConfig, models: Models | None = None) -> EvalReport | None:
    """The whole evaluation; under torchrun decoding is sharded and rank 0 (alone) returns the report."""
    info = init_distributed(cfg.device)
    try:
        return _evaluate(cfg, models, info)
    finally:
        cleanup()


def _evaluate(cfg: EvalConfig, models: Models | None, info: DistInfo) -> EvalReport | None:
    out = resolve_path(cfg.paths.results)
    files = resolve_files(cfg)
    # The device type counts (autocast precision and kernels differ): a CPU run is not a GPU run's result.
    fingerprint = sha256_json([stage_fingerprint(cfg, evaluation_inputs(cfg, files)), info.device.type])
    if models is None and is_up_to_date(out, fingerprint):
        log.info("%s is up to date with the config, models, codes and stores; nothing to evaluate", out)
        if info.is_main:
            print((out / "results.md").read_text())
        return None
    models = models or load_models(cfg, info.device)
    stores = {qf.stem: open_query_store(cfg, qf) for qf in files}
    if info.is_main:  # inputs found: this is a run
        out.mkdir(parents=True, exist_ok=True)
        record_run(out, cfg)

    passes: list[tuple[str, Path, list[QueryFile]]] = []
    if cfg.task_specific:
        for pool_path in dict.fromkeys(qf.pool for qf in files):
            passes.append(("task-specific", pool_path, [qf for qf in files if qf.pool == pool_path]))
    if cfg.union:
        passes.append(("universal", union_pool_file(cfg), files))

    outcomes: list[PairOutcome | None] = []
    pools_manifest = {}
    for kind, pool_path, pass_files in passes:
        pool = open_pool(cfg, kind, pool_path, models, info.is_main)
        outcomes += [evaluate_pair(cfg, models, pool, qf, stores[qf.stem], info) for qf in pass_files]
        pools_manifest[pool.stem] = pool_manifest(pool, cfg)
        del pool  # one pool's codes, trie and embeddings in memory at a time
    if not info.is_main:
        return None

    results = [r for o in outcomes for r in o.results]
    stats = [o.stats for o in outcomes]
    dec = cfg.decoding
    note = (f"{dec.num_beams} beams, {'level-head' if dec.level_head else 'full-vocabulary'} normalisation"
            f"{', autocast' if dec.autocast else ''}"
            f"{', fp16 query Combiner' if combiner_dtype(info.device, dec.combiner_autocast) == 'float16' else ''}"
            f"{f', modality threshold {dec.modality_threshold:g}' if dec.modality_threshold else ''}; trie backend {cfg.trie_backend}; "
            f"Recall@k is UniIR's hit rate, in %.")
    report = EvalReport(results, stats, markdown_report(results, stats, f"GENIUS evaluation: {out.name}", note), out)
    write_outputs(cfg, models, report, files, stores, pools_manifest)
    mark_done(out, fingerprint)
    return report


def evaluation_inputs(cfg: EvalConfig, files: list[QueryFile]) -> list[Path]:
    """Every file whose change must redo the evaluation: models, codes, stores, queries, qrels."""
    stores_root = resolve_path(cfg.paths.stores_root)
    pools = list(dict.fromkeys(qf.pool for qf in files)) if cfg.task_specific else []
    if cfg.union:
        pools.append(union_pool_file(cfg))
    paths = cfg.checkpoint_files()
    for qf in files:
        paths += [qf.path, qf.qrels, store_path(stores_root, cfg.paths.encoder, "test", qf.path) / "meta.json"]
    for pool in pools:
        stem = pool.name.removesuffix(".jsonl")
        paths += [pool, store_path(stores_root, cfg.paths.encoder, "cand", pool) / "meta.json",
                  cfg.codes_root() / stem / "meta.json"]
    return [p for p in paths if p.exists()]  # a missing one fails later with its own message


def pool_manifest(pool: Pool, cfg: EvalConfig) -> dict:
    return {"kind": pool.kind, "jsonl": str(pool.path), "store": str(pool.store.path), "codes": str(pool.codes_dir),
            "codes_hash": pool.codes_hash, "trie": str(pool.trie_path), "trie_backend": cfg.trie_backend,
            "fused": str(pool.fused_dir),
            "collisions": pool.cmap.collision_stats()}


def write_outputs(cfg: EvalConfig, models: Models, report: EvalReport, files: list[QueryFile],
                  stores: dict[str, EmbeddingStore], pools: dict) -> None:
    out = report.out_dir
    atomic_write_text(out / "results.tsv", results_tsv(report.results))
    atomic_write_text(out / "results.md", report.markdown)
    atomic_write_json(out / "metrics.json", {
        "fingerprints": models.fingerprints,
        "recall": [vars(r) for r in report.results],
        "decoding": [{**vars(s), "queries_per_second": s.queries_per_second} for s in report.stats],
        "collisions": {stem: p.get("collisions") for stem, p in pools.items()},
    })
    if plot_recall_by_task(report.results, out / "recall_by_task.png"):
        log.info("wrote %s", out / "recall_by_task.png")
    first_store = next(iter(stores.values()), None)
    default_pool = next((stem for stem, p in pools.items() if p["kind"] == "universal"), next(iter(pools), None))
    atomic_write_json(out / "run.json", {
        "manifest_version": MANIFEST_VERSION,
        "config": str(out / "config.yaml"),
        "project_root": str(project_root()),
        "eval_config": config_to_dict(cfg),
        "data_root": str(resolve_path(cfg.paths.data_root)),
        "instructions": str(resolve_path(cfg.paths.instructions, resolve_path(cfg.paths.data_root))),
        "encoder": {"name": cfg.paths.encoder,
                    "query_store": str(first_store.path) if first_store is not None else None,
                    "dtype": first_store.meta.get("dtype") if first_store is not None else None,
                    "extraction": first_store.meta.get("config", {}) if first_store is not None else {}},
        "checkpoints": models.files,
        "fingerprints": models.fingerprints,
        "decoding": config_to_dict(cfg.decoding),
        "rerank": cfg.rerank,
        "pools": pools,
        "default_pool": default_pool,
        "query_files": [str(qf.path) for qf in files],
    })


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = stage_parser("genius eval", "Stage 3: constrained decoding and M-BEIR evaluation (GENIUS, GENIUS^R, dense).")
    cfg, _ = parse_stage_config(EvalConfig, parser, argv)
    with user_errors_exit(parser):
        report = evaluate(cfg)
    if report is not None:  # rank 0
        print(report.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
