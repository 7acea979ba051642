"""``genius eval``: GENIUS, GENIUS^R and the dense CLIP-SF baseline on M-BEIR-format test files.

    genius eval --config configs_scripts/tiny/eval.yaml [--set decoding.num_beams=10]

The models come either from a native run (``paths.rq_run``/rq.pt and ``paths.gen_run``/generator.pt)
or from an official-layout ``GENIUS_t5small.pth`` (``paths.official_checkpoint``: its embedded
quantizer in learned modality mode and its T5); the pools' codes must have been assigned by
``genius assign-codes`` with that same quantizer from the current candidate stores (checked by
fingerprint, modality mode, codebook sizes and store content; a mismatch names the files and
what to run).

For every query file, against its task-specific pool and (optionally) the universal pool, or,
with ``paths.index``, against a living index's current version (``index``; its records, codes,
trie and fused vectors, so added candidates can be returned and removed ones never are):
decode the queries' IDs with trie-constrained beam search, map IDs to candidates, rank them
(GENIUS), re-rank their union by fused CLIP-SF cosine (GENIUS^R), search the same fused
embeddings exhaustively (dense), and score UniIR's Recall@k per (dataset, task); with
``report.metrics: irgen`` also IRGen's P@k, R@k and MAP@100 (``ir_metrics``). No method ever returns
a candidate in the query's ``exclude_cand_list`` (``ranking``). One process by
default; under torchrun (NPROC=N) every rank decodes and ranks a contiguous shard of each query
file (ranking is per query), the ranks build each pool's fused-embedding cache together, and rank 0
gathers the rankings in order, then scores and writes. No rank works alone for long while the
others wait on a collective (whose timeout is ``common.distributed.collective_timeout``).

The pieces live by concern: ``run_models`` (loading the models), ``pool_assets`` (a pool's store,
codes, trie and fused-embedding cache), ``decode_cache``, ``ranking``, ``positives`` (positives
not in the pool), ``outputs`` (results files and run manifest). This module holds the stage's
config, its loop and ``main``.

The run is keyed (``common.runstate``) by the config without ``NOT_IN_RUN_KEY`` and the content
ids of every input: the models' fingerprints, each pool's codes and candidate store (or the
index version's ``content_id``, not its path), each query file, its qrels and query store, and the
device type. A finished run with the same key is skipped; ``force=true`` redoes it; otherwise the
previous run's outputs move to ``stale/<time>/``.
Decodings, tries and fused embeddings are cached by content (``decode_cache``, ``pool_assets``),
so a GENIUS_ROOT copied elsewhere reuses everything.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from genius.common.config import resolve_path
from genius.common.config_checks import check_output_dir
from genius.common.distributed import DistInfo, broadcast_from_main, cleanup, gather_to_main, init_distributed
from genius.common.fusion import fused_store_embeddings
from genius.common.mbeir import (
    MBEIR_DATASET_IDS, QID_BASE, load_qrels, parse_query_file_name, unhash_qid,
)
from genius.common.ranges import BATCH, check_ranges, ranged
from genius.common.runstate import RunKey, RunState, file_content, portable_path
from genius.common.stage import parse_stage_config, record_run, setup_logging, stage_parser, user_errors_exit
from genius.common.store import EmbeddingStore, store_path
from genius.models.generative_retriever import ir_metrics, metrics
from genius.models.generative_retriever.beam_search import NUMERICS_VERSION, decoder_dtype
from genius.models.generative_retriever.decode_cache import Decoded, decode_cached
from genius.models.generative_retriever.fused_decoder import precision_record
from genius.models.generative_retriever.index import IndexVersion, current_name, open_version, run_results
from genius.models.generative_retriever.outputs import (
    OUTPUTS_VERSION, RUN_OUTPUTS, EvalReport, empty_texts, report_markdown, write_outputs,
)
from genius.models.generative_retriever.paper_numbers import default_k
from genius.models.generative_retriever.pool_assets import (
    Pool,
    check_pool_codes,
    codes_fingerprint,
    open_candidate_store,
    open_pool,
    open_union_trie,
    union_pool_file,
)
from genius.models.generative_retriever.positives import (
    FilePositives,
    MissingPositives,
    PoolPositives,
    check_positives,
)
from genius.models.generative_retriever.query_images import images_digest, query_image_paths
from genius.models.generative_retriever.ranking import rank
from genius.models.generative_retriever.retrieval import (
    Ranking, beam_leaves, excluded_rows, target_modality_share, union_sizes,
)
from genius.models.generative_retriever.run_models import (
    Models, check_int8_device, load_models, model_fingerprints, reads_query_images,
)
from genius.models.generative_retriever.tables import DecodeStats, RecallResult, method_names
from genius.models.residual_quantization.assign_codes import combiner_dtype

log = logging.getLogger("genius.eval")

# Config keys that do not change the results: where inputs and outputs lie (their content is in
# the run key), the device (its type is in the key), batch sizes of exact computations, force.
NOT_IN_RUN_KEY = ("paths.data_root", "paths.stores_root", "paths.rq_run", "paths.gen_run",
                  "paths.official_checkpoint", "paths.codes", "paths.results", "paths.union_pool", "paths.index",
                  "decoding.batch_size", "decoding.device_trie", "dense_chunk", "device", "force")
# Options added after runs were recorded, at the value those runs computed with.
ADDED_LATER = {"report.metrics": "mbeir", "report.ks": [1, 10, 20, 30], "decoding.sibling_penalty": 0.0,
               "decoding.task_specific_trie": "own"}


# ---- config ----------------------------------------------------------------------------------
@dataclass
class EvalFile:
    queries: str  # query jsonl, relative to the data root
    pool: str  # its task-specific candidate pool
    qrels: str
    k: int | None = ranged(None, ">= 1")  # the Recall@k to report; null = 5, or 10 for Fashion200K and FashionIQ


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
    # A living index folder (genius index) to evaluate every query file against (its current
    # version) instead of its local pool; needs union: false. Positives not in the index (removed
    # ones) follow missing_positives.
    index: str | None = None


@dataclass
class DecodingConfig:
    num_beams: int = ranged(50, "[1, 4096]")
    batch_size: int = ranged(64, BATCH)
    # True: each step normalises over the level's codes only (fewer FLOPs, other beams); False:
    # full-vocabulary normalisation, the official decoding's exact scores and beams.
    level_head: bool = True
    autocast: bool = False  # the generator under bf16 autocast on CPU, fp16 on GPU
    # The decoder step's and the output head's products in int8 (torch._int_mm; CPUs only, not with
    # autocast): faster decoding at slightly different beams (fused_decoder.py; BENCHMARKS.md
    # measures both).
    int8: bool = False
    # The query Combiner under fp16 autocast, on CUDA only (on CPU it stays fp32), as the official
    # evaluation ran it; the candidates' side is assign-codes' ``autocast``.
    combiner_autocast: bool = False
    # > 0: keep a modality (level-0 code) only if its probability is at least this fraction of the
    # best one's (beam_search module docstring); 0 is the official decoding.
    modality_threshold: float = ranged(0.0, "[0, 1]")
    # > 0: diverse beams, the r-th best child of a beam competes with its score lowered by this x r
    # (beam_search module docstring); 0 is plain beam search, the official decoding.
    sibling_penalty: float = ranged(0.0, ">= 0")
    # True: the trie as tensors on the decoding device (dense top levels + CSR, device_trie.py), so
    # a GPU search makes no host round trip per level; the same beams. On a CPU a search runs as
    # fast as with the C++ trie (BENCHMARKS.md section 7).
    device_trie: bool = False
    # The trie a task-specific pool's queries are decoded under. 'own': the pool's own IDs, what a
    # task-specific pool means. 'union': the universal pool's, then looked up among the pool's
    # candidates, as the official evaluation produced its task-specific numbers (paper Table 1;
    # its code files, named by dataset alone, were overwritten by the universal pass). Needs the
    # universal pool's codes; its decodings are shared with the universal pass.
    task_specific_trie: Literal["own", "union"] = "own"


@dataclass
class ReportConfig:
    # 'mbeir': UniIR's hit rate and the standard IR metrics; 'irgen' adds IRGen's table
    # (irgen_table.md, irgen_metrics.tsv): P@k and R@k (IRGen's R@k, the hit rate) at ``ks``, and
    # MAP@100, by ir_measures from the run files (``ir_metrics.IRGEN_MEASURES``)
    metrics: Literal["mbeir", "irgen"] = "mbeir"
    ks: list[int] = ranged(spec=">= 1", factory=lambda: [1, 10, 20, 30])


@dataclass
class EvalConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    files: list[EvalFile] = field(default_factory=list)  # empty: every query/test/*.jsonl of the data root
    task_specific: bool = True  # each file against its own pool
    union: bool = True  # each file against the universal pool
    extra_ks: list[int] = ranged(spec=">= 1", factory=list)  # more Recall@k rows in the TSV (e.g. [1, 10])
    report: ReportConfig = field(default_factory=ReportConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    trie_backend: Literal["cpp", "python", "marisa"] = "cpp"
    rerank: bool = True  # GENIUS^R
    dense: bool = True  # the dense CLIP-SF baseline over the same fused embeddings
    dense_backend: Literal["torch", "faiss"] = "torch"
    dense_chunk: int = ranged(65536, ">= 1")  # candidates scored per matmul
    device: Literal["auto", "cpu", "cuda"] = "auto"
    run_files: bool = True
    # A qrels positive or pos_cand_list entry that is not in the evaluated pool: 'error', 'keep'
    # (M-BEIR's protocol: it counts as not retrieved) or 'exclude' (left out of the scores); the
    # last two are counted in results.md and metrics.json (module ``positives``).
    missing_positives: MissingPositives = "error"
    force: bool = False  # re-evaluate even when the results folder holds this run finished

    def validate(self) -> None:
        if self.decoding.int8 and self.decoding.autocast:
            raise ValueError("decoding.int8 and decoding.autocast are both true: int8 decoding keeps fp32 "
                             "activations, so set one of them to false")
        if not (self.task_specific or self.union):
            raise ValueError("task_specific and union are both false: nothing to evaluate")
        if self.paths.index is not None and (self.union or not self.task_specific):
            raise ValueError("paths.index is set: every query file is evaluated against the index alone; set "
                             "union: false and task_specific: true (or paths.index: null)")
        if self.paths.index is not None and self.decoding.task_specific_trie == "union":
            raise ValueError("decoding.task_specific_trie: union decodes under the universal pool's trie, but "
                             "paths.index evaluates against the index alone; set decoding.task_specific_trie: own")
        if self.report.metrics == "irgen" and not self.run_files:
            raise ValueError("report.metrics: irgen computes its metrics from the run files, but run_files is "
                             "false; set run_files: true")
        if self.report.metrics == "irgen" and not self.report.ks:
            raise ValueError("report.ks: empty; give the k of IRGen's P@k and R@k, e.g. [1, 10, 20, 30]")
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

    def check_numbers(self) -> None:
        """Every number in its declared range (before any work; one line naming the dotted key)."""
        check_ranges(self)  # the files[i] entries too

    def ranking_depth(self, qf: "QueryFile") -> int:
        """How many candidates each method ranks (and the run files hold) for a query file: its
        largest hit-rate k, and with IRGen's metrics their largest k and MAP's depth."""
        extra = [*self.report.ks, ir_metrics.IRGEN_MAP_DEPTH] if self.report.metrics == "irgen" else []
        return max(qf.ks + extra)

    def codes_root(self) -> Path:
        """Where the pools' code folders are."""
        return resolve_path(self.paths.codes if self.paths.codes is not None else Path(self.paths.rq_run) / "codes")


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


# ---- one (pool, query file) --------------------------------------------------------------------
@dataclass
class PairOutcome:
    results: list[RecallResult]
    stats: DecodeStats


@dataclass
class RankedShard:
    """A rank's queries ranked by every method, and the size of each query's GENIUS^R re-rank set."""

    rankings: dict[str, Ranking]
    rerank_set_sizes: np.ndarray  # int64 [Q]


def rank_shard(cfg: EvalConfig, pool: Pool, queries: EmbeddingStore, decoded: Decoded, k: int,
               device: torch.device, exclusions: dict[int, list[int]]) -> RankedShard:
    """Rank the decoded queries (a shard of the file): ranking is per query, so ranks split it like
    decoding. ``exclusions``: hashed qid -> hashed dids never to return (``exclude_cand_list``)."""
    leaves = beam_leaves(pool.cmap, decoded.codes, decoded.valid)
    methods = ["genius"] + ["genius_r"] * cfg.rerank + ["dense"] * cfg.dense
    fused_q = fused_store_embeddings(queries.arrays.take(decoded.rows)) if (cfg.rerank or cfg.dense) else None
    excluded = None
    if exclusions:
        shard_qids = np.asarray(queries.ids)[decoded.rows].tolist()
        excluded = excluded_rows(pool.ids, [exclusions.get(q, []) for q in shard_qids])
    rankings = rank(pool, leaves, decoded.scores, fused_q, k, methods, cfg.dense_backend, cfg.dense_chunk, device,
                    excluded)
    return RankedShard(rankings, union_sizes(pool.cmap, leaves))


def evaluate_pair(cfg: EvalConfig, models: Models, pool: Pool, qf: QueryFile, queries: EmbeddingStore,
                  positives: PoolPositives, info: DistInfo) -> PairOutcome | None:
    """Decode and rank (each rank its shard of the queries), then score and write (rank 0, from the
    gathered rankings; the others return None)."""
    out = resolve_path(cfg.paths.results)
    decoded = decode_cached(cfg, models, pool, queries, out / "decoded" / pool.decoding.stem / qf.stem, info, qf.path)
    shards = gather_to_main(rank_shard(cfg, pool, queries, decoded, cfg.ranking_depth(qf), info.device,
                                       positives.exclusions))
    if shards is None:
        return None
    rankings = {method: Ranking(np.concatenate([s.rankings[method].rows for s in shards]),
                                np.concatenate([s.rankings[method].scores for s in shards]))
                for method in shards[0].rankings}
    rerank_set_sizes = np.concatenate([s.rerank_set_sizes for s in shards])

    qids = np.asarray(queries.ids)
    qrels = load_qrels(qf.qrels)
    relevant = metrics.relevant_sets(qids, qrels)
    task_ids = np.array([qrels.task_of.get(unhash_qid(q), qf.task) for q in qids.tolist()], dtype=np.int64)
    scored = np.array([unhash_qid(q) not in positives.excluded_qids for q in qids.tolist()], dtype=bool)
    results = []
    for method, ranking in rankings.items():
        retrieved = ranking.ids(pool.ids)
        by_task = metrics.recall_by_task(retrieved[scored], [r for r, s in zip(relevant, scored) if s],
                                         task_ids[scored], qf.ks)
        for task, by_k in by_task.items():
            results += [RecallResult(method, pool.kind, pool.stem, qf.stem, qf.dataset, task, qf.split, k, value,
                                     reported=k == qf.k, mbeir=qf.mbeir) for k, value in by_k.items()]
        if cfg.run_files:
            metrics.write_run_file(out / "runs" / pool.stem / qf.stem / f"{method}.run", qids, retrieved,
                                   ranking.scores, method, task_ids)
    genius = rankings["genius"]
    stats = DecodeStats(
        pool.kind, pool.stem, qf.stem, len(qids), decoded.seconds, decoded.cached,
        genius_candidates_per_query=float((genius.rows >= 0).sum(1).mean()) if len(qids) else 0.0,
        rerank_candidates_per_query=float(rerank_set_sizes.mean()) if len(qids) else 0.0,
        target_modality_share=target_modality_share(genius, np.asarray(pool.store.arrays.modality),
                                                    np.asarray(queries.arrays.target_modality)))
    log.info("%s on %s: %s; %.1f queries/s%s", qf.stem, pool.stem,
             ", ".join(f"{r.method} R@{r.k}={100 * r.value:.1f}" for r in results if r.reported),
             stats.queries_per_second, " (cached decoding)" if decoded.cached else "")
    return PairOutcome(results, stats)


# ---- the whole evaluation --------------------------------------------------------------------
@dataclass
class Pass:
    """One pool and the query files evaluated against it."""

    kind: str  # "task-specific" | "universal"
    pool: Path
    files: list[QueryFile]
    opened: Pool | None = None  # an index version's pool (its records file is ``pool``)

    @property
    def stem(self) -> str:
        return self.opened.stem if self.opened is not None else self.pool.name.removesuffix(".jsonl")


def open_index(cfg: EvalConfig, info: DistInfo) -> IndexVersion | None:
    """The ``paths.index`` version to evaluate against: the one current when rank 0 looked, on every
    rank (an add may publish another meanwhile)."""
    if cfg.paths.index is None:
        return None
    folder = resolve_path(cfg.paths.index)
    name = broadcast_from_main(current_name(folder) if info.is_main else None)
    return open_version(folder, name, backend=cfg.trie_backend)


def plan_passes(cfg: EvalConfig, files: list[QueryFile], index: IndexVersion | None = None) -> list[Pass]:
    if index is not None:  # the index stands in for each file's own pool (config.validate: no union)
        opened = replace(index.pool(), kind="task-specific")
        return [Pass("task-specific", opened.path, files, opened)]
    passes = []
    if cfg.task_specific:
        for pool_path in dict.fromkeys(qf.pool for qf in files):
            passes.append(Pass("task-specific", pool_path, [qf for qf in files if qf.pool == pool_path]))
    if cfg.union:
        passes.append(Pass("universal", union_pool_file(cfg), files))
    return passes


def run_key(cfg: EvalConfig, files: list[QueryFile], stores: dict[str, EmbeddingStore],
            candidate_stores: dict[str, EmbeddingStore], models: Models | None, info: DistInfo,
            index: IndexVersion | None = None) -> RunKey:
    """The evaluation's identity: semantic config, content ids of every input, device type."""
    inputs: dict = {"models": models.fingerprints if models is not None else model_fingerprints(cfg.paths)}
    reads_images = reads_query_images(cfg.paths, models)  # an image_tokens generator: the images count too
    for qf in files:
        inputs[f"queries/{qf.stem}"] = file_content(qf.path)
        inputs[f"qrels/{qf.stem}"] = file_content(qf.qrels)
        inputs[f"query store/{qf.stem}"] = stores[qf.stem].content_id
        if reads_images:
            root = resolve_path(cfg.paths.data_root)
            inputs[f"query images/{qf.stem}"] = images_digest(root, query_image_paths(qf.path, stores[qf.stem], root))
    if index is not None:
        inputs["index"] = index.content_id()
    for stem, store in candidate_stores.items() if index is None else ():
        inputs[f"candidate store/{stem}"] = store.content_id
        codes_dir = cfg.codes_root() / stem
        # missing codes: open_pool says what to run
        inputs[f"codes/{stem}"] = codes_fingerprint(codes_dir) if (codes_dir / "meta.json").is_file() else None
    # The device type counts (autocast precision and kernels differ): a CPU run is not a GPU run's result.
    precision = precision_record(info.device, decoder_dtype(info.device, cfg.decoding.autocast), cfg.decoding.int8)
    return RunKey.of(cfg, NOT_IN_RUN_KEY, inputs, added_later=ADDED_LATER, device=info.device.type,
                     numerics=NUMERICS_VERSION, outputs=OUTPUTS_VERSION, **precision)


def check_all_positives(cfg: EvalConfig, passes: list[Pass],
                        candidate_stores: dict[str, EmbeddingStore]) -> dict[tuple[str, str], PoolPositives]:
    """Every (pool, query file)'s positives against the pool, before any work (``positives``)."""
    read: dict[Path, FilePositives] = {}
    checked = {}
    for p in passes:
        pool_ids = np.sort(np.asarray(candidate_stores[p.stem].ids))
        for qf in p.files:
            if qf.path not in read:
                read[qf.path] = FilePositives.read(qf.qrels, qf.path)
            found = check_positives(read[qf.path], pool_ids, p.pool, qf.stem, cfg.missing_positives)
            checked[p.stem, qf.stem] = replace(found, pool=p.stem)  # an index's records file is not named after it
    return checked


def check_codes_of(cfg: EvalConfig, passes: list[Pass], candidate_stores: dict[str, EmbeddingStore],
                   models: Models, union_trie: bool) -> None:
    """Every pool's codes (the universal pool's too where its trie decodes the task-specific files:
    ``union_trie``) made by these models' quantizer for this store (:func:`check_pool_codes`)."""
    for p in passes:
        if p.opened is None:  # an index version's codes are checked with the index
            check_pool_codes(cfg, p.pool, candidate_stores[p.stem], models)
    if union_trie:
        union = union_pool_file(cfg)
        check_pool_codes(cfg, union, open_candidate_store(cfg, union), models)


def evaluate(cfg: EvalConfig, models: Models | None = None) -> EvalReport | None:
    """The whole evaluation; under torchrun decoding and ranking are sharded and rank 0 (alone)
    returns the report.

    ``models`` (stand-ins, for tests) replace the run's and always evaluate (never skipped).
    """
    cfg.check_numbers()
    cfg.validate()
    info = init_distributed(cfg.device)
    try:
        if cfg.decoding.int8:
            check_int8_device(info.device)
        return _evaluate(cfg, models, info)
    finally:
        cleanup()


def _evaluate(cfg: EvalConfig, models: Models | None, info: DistInfo) -> EvalReport | None:
    out = check_output_dir("paths.results", resolve_path(cfg.paths.results))
    files = resolve_files(cfg)
    index = open_index(cfg, info)
    if index is not None and out.resolve() == run_results(index.manifest).resolve():
        raise ValueError(f"paths.results: {out} holds the run the index {cfg.paths.index} serves; its evaluation "
                         "would set that run aside, so give it a results folder of its own")
    passes = plan_passes(cfg, files, index)
    candidate_stores = {p.stem: p.opened.store if p.opened else open_candidate_store(cfg, p.pool) for p in passes}
    positives = check_all_positives(cfg, passes, candidate_stores)  # the data's own mistakes first
    stores = {qf.stem: open_query_store(cfg, qf) for qf in files}
    state = RunState(out, run_key(cfg, files, stores, candidate_stores, models, info, index), RUN_OUTPUTS,
                     stage="genius eval", force=cfg.force, is_main=info.is_main)
    if models is None and state.is_done():
        changed = state.finals_changed()
        if changed is None and not (out / "results.md").is_file():  # a done.json from before runs recorded their files
            changed = f"{out / 'results.md'} is missing"
        if changed is None:
            log.info("%s is up to date with the config, models, codes and stores; nothing to evaluate "
                     "(force=true re-evaluates)", out)
            if info.is_main:
                print((out / "results.md").read_text())
            return None
        log.warning("%s: %s; evaluating again", state.stage, changed)
    with state.hold():
        models = models or load_models(cfg, info.device)
        if index is not None:
            index.check_models(models)
        decodes_under_union = cfg.task_specific and cfg.decoding.task_specific_trie == "union" and index is None
        check_codes_of(cfg, passes, candidate_stores, models, decodes_under_union)  # before results are set aside
        state.start()
        if info.is_main:
            record_run(out, cfg)
        outcomes: list[PairOutcome | None] = []
        pools_manifest = {}
        union_trie = None  # opened once for every task-specific pool (decoding.task_specific_trie: union)
        if decodes_under_union:
            union_trie = open_union_trie(cfg, models, build_trie=info.is_main)
        for p in passes:
            pool = p.opened or open_pool(cfg, p.kind, p.pool, models, build_trie=info.is_main,
                                         store=candidate_stores.get(p.stem), union_trie=union_trie)
            if cfg.rerank or cfg.dense:
                pool.fused()  # every rank at once: each builds its share of a missing cache
            outcomes += [evaluate_pair(cfg, models, pool, qf, stores[qf.stem], positives[p.stem, qf.stem], info)
                         for qf in p.files]
            pools_manifest[pool.stem] = pool.manifest(cfg.trie_backend) | (
                {"index": portable_path(index.path.parent)} if p.opened else {})
            del pool  # one pool's codes, trie and embeddings in memory at a time
        if not info.is_main:
            return None
        # an index version holds no rows its extraction skipped (``add`` embeds every record it gets)
        skipped = empty_texts(stores, {} if index is not None else candidate_stores)
        report = build_report(cfg, outcomes, list(positives.values()), out, info,
                              method_names(next(iter(stores.values())).meta), skipped)
        write_outputs(cfg, models, report, [qf.path for qf in files], stores, pools_manifest,
                      {qf.stem: qf.qrels for qf in files})
        state.finish(state.output_files())
    return report


def build_report(cfg: EvalConfig, outcomes: list[PairOutcome], positives: list[PoolPositives], out: Path,
                 info: DistInfo, names: dict[str, str], skipped: dict) -> EvalReport:
    results = [r for o in outcomes for r in o.results]
    stats = [o.stats for o in outcomes]
    dec = cfg.decoding
    union_trie_note = (", task-specific pools decoded under the universal pool's trie (the official evaluation's "
                       "task-specific numbers)")
    note = (f"{dec.num_beams} beams, {'level-head' if dec.level_head else 'full-vocabulary'} normalisation"
            f"{', autocast' if dec.autocast else ''}{', int8 decoder' if dec.int8 else ''}"
            f"{', fp16 query Combiner' if combiner_dtype(info.device, dec.combiner_autocast) == 'float16' else ''}"
            f"{f', modality threshold {dec.modality_threshold:g}' if dec.modality_threshold else ''}"
            f"{f', sibling penalty {dec.sibling_penalty:g}' if dec.sibling_penalty else ''}"
            f"{union_trie_note if cfg.task_specific and dec.task_specific_trie == 'union' else ''}; "
            f"trie backend {cfg.trie_backend}; Recall@k is UniIR's hit rate, in %.")
    markdown = report_markdown(results, stats, positives, f"GENIUS evaluation: {out.name}", note, names, skipped)
    return EvalReport(results, stats, markdown, out, positives, names, skipped)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = stage_parser("genius eval", "Stage 3: constrained decoding and M-BEIR evaluation (GENIUS, GENIUS^R, dense).")
    cfg, _ = parse_stage_config(EvalConfig, parser, argv)
    with user_errors_exit(parser):
        report = evaluate(cfg)
    if report is not None:  # rank 0
        print(report.markdown)
        if report.irgen_table:
            print(report.irgen_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
