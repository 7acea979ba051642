"""Every CPU stage at M-BEIR size: wall time, peak RSS and disk per stage and pool size.

M-BEIR's union pool holds 5.6M candidates (885k images, 2.46M texts, 2.27M image+text), its
training set 1.1M pairs, its test set 190k queries. At each ``--sizes`` N this writes synthetic
CLIP-SF-shaped stores through the project's store writer (768-d fp16, streamed in chunks): a pool
of N candidates with M-BEIR's modality mix, ``--queries`` queries (each a noisy copy of one pool
item, its only relevant candidate) and a training-pairs slice. Vectors are clustered (``--centres``
random centres plus noise) so codes, decoding and recall are not degenerate.

Each stage then runs in its own subprocess, through the project's functions, so its peak RSS is
that process's own (``os.wait4``):

- ``assign-codes``: ``genius assign-codes`` (``assign_codes``) with a randomly initialised
  quantizer of the paper's shape (configs_scripts/large/train_rq.yaml: Combiner 768 -> 2560 / 5120,
  IDs [3] + [4096] * 8, codebooks seeded by a short k-means). It costs about 170 MFLOP per
  candidate (the Combiner dominates), over an hour for 5.6M on 2 cores, so above
  ``--assign-rows`` it runs on a store of the pool's first rows and the time is scaled by N / rows
  (said in the note); ``code-stats`` then runs its statistics and writes (``pool_stats``,
  ``atomic_save_npy``) on N codes, the part of the stage whose memory grows with N.
- Downstream stages read synthetic pool codes (``write-codes``: [3] + [4096] * 8, the top levels
  set by the item's cluster, the rest random; the same at every size), not the assigned ones: ``trie``
  (``trie_cpp`` build + save), ``candidate-map`` (``CandidateMap.build``), ``fused-cache``
  (``pool_assets.cached_fused_embeddings``), ``decode`` / ``decode-bf16``
  (``constrained_beam_search``, a random paper-shaped generator, 50 beams, fp32 / bf16 autocast),
  ``rank`` (``genius_ranking`` and GENIUS^R's ``rerank_ranking`` over the fused cache),
  ``dense-exact`` (``dense_vectors`` + ``ExactIPIndex``) and ``dense-faiss`` (``FaissFlatIPIndex``
  with the resident rows ``Pool.dense_search`` gives it: blocks when the pool's fp32 copy exceeds
  half the free memory), ``eval`` (qrels, ``write_run_file``, ``recall_at_k`` for the query sample).
- ``train-rq`` / ``train-gen``: ``--train-steps`` timed steps (after one warm-up step) of the
  project's step functions at the paper configs' per-GPU batch size, scaled to 1.1M pairs per
  epoch; run once, at the largest size. CPU numbers: the paper trains both on GPUs.

A random generator decodes random-looking IDs, so GENIUS recall here is near zero by
construction; the dense baseline's recall is a real number on this synthetic data.

Outputs: ``--out-dir``/scale.{csv,md} (stage, size, wall s, peak RSS MB (``wait4``: with the
touched pages of memory-mapped files), peak anonymous MB (sampled ``RssAnon``: what must fit in
RAM), disk MB, note), also printed. Working files (tens of GB at 5.6M) go to ``--work-dir`` and
are deleted unless ``--keep``. ``--stages`` picks stages (``write-codes`` alone feeds code-stats,
trie and candidate-map; the others need ``write-stores``).

    bash benchmarks/run_scale.sh [--sizes 1e5 1e6 5.6e6] [--queries 1000] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from genius.benchmarks.common import OUT_DIR, available_memory_gb, load_average, machine_description, markdown_table, \
    write_csv

MBEIR_MIX = (0.158, 0.439, 0.403)  # share of image, text, image+text candidates in the union pool (885k/2.46M/2.27M)
MBEIR_TRAIN_PAIRS = 1_100_000
DIM = 768
DATASET = 1  # the M-BEIR dataset number of the synthetic ids (any will do)
COLUMNS = ["stage", "size", "wall_s", "peak_rss_mb", "peak_anon_mb", "disk_mb", "note"]
DATA_STAGES = ("write-codes", "write-stores")
POOL_STAGES = ("assign-codes", "code-stats", "trie", "candidate-map", "fused-cache", "decode", "decode-bf16", "rank",
               "dense-exact", "dense-faiss", "eval")
TRAIN_STAGES = ("train-rq", "train-gen")
NEEDS_RQ = ("assign-codes", "decode", "decode-bf16", "rank", "dense-exact", "dense-faiss", "eval", *TRAIN_STAGES)
KS = (1, 5, 10)
WRITE_CHUNK = 65536
GiB = 1 << 30


# ---- shapes ---------------------------------------------------------------------------------------
def rq_arch(args) -> dict:
    """The paper's quantizer (configs_scripts/large/train_rq.yaml), or a tiny one for the smoke test."""
    from genius.common.config import load_config
    from genius.models.residual_quantization.train import RQTrainConfig, model_arch

    cfg = load_config(RQTrainConfig, Path(__file__).resolve().parents[1] / "configs_scripts/large/train_rq.yaml")
    if args.tiny:
        cfg.model.proj_dim, cfg.model.hidden_dim, cfg.model.codebook_size, cfg.model.num_levels = 32, 64, 16, 4
    return model_arch(cfg.model, DIM)


def generator_arch(args, codebook_sizes: list[int]) -> dict:
    """t5-small's decoder as configs_scripts/large/train_gen.yaml builds it (tiny: 1 small layer)."""
    from genius.models.generative_retriever.generator import make_arch

    shape = ({"d_model": 32, "num_heads": 2, "d_kv": 16, "d_ff": 64, "num_decoder_layers": 1} if args.tiny else {})
    return make_arch(DIM, codebook_sizes, 4 if args.tiny else 30, **shape)


def train_configs(args):
    from genius.common.config import load_config
    from genius.models.generative_retriever.train import TrainGenConfig
    from genius.models.residual_quantization.train import RQTrainConfig

    root = Path(__file__).resolve().parents[1] / "configs_scripts/large"
    rq, gen = load_config(RQTrainConfig, root / "train_rq.yaml"), load_config(TrainGenConfig, root / "train_gen.yaml")
    if args.tiny:
        rq.train.batch_size, gen.train.batch_size = 16, 8
    return rq, gen


# ---- synthetic data --------------------------------------------------------------------------------
def pool_modality(rows: np.ndarray, seed: int) -> np.ndarray:
    """Each row's modality, drawn from M-BEIR's mix (a function of the row, so any chunk agrees)."""
    u = (rows * 2654435761 + seed) % 1_000_003 / 1_000_003
    return np.searchsorted(np.cumsum(MBEIR_MIX), u, side="right").clip(max=2).astype(np.int8)


def pool_cluster(rows: np.ndarray, centres: int) -> np.ndarray:
    return (rows * 40503 + 7) % centres


def fill_rows(out, rows: np.ndarray, modality: np.ndarray, img: np.ndarray, txt: np.ndarray, ids: np.ndarray,
              at: slice, target: np.ndarray | None = None) -> None:
    """One chunk of a store: vectors zeroed where the modality is absent, as extraction leaves them."""
    has_img, has_txt = modality != 1, modality != 0
    out.img[at] = np.where(has_img[:, None], img, 0).astype(np.float16)
    out.txt[at] = np.where(has_txt[:, None], txt, 0).astype(np.float16)
    out.img_mask[at], out.txt_mask[at] = has_img, has_txt
    out.modality[at] = modality
    out.target_modality[at] = modality if target is None else target
    out.ids[at] = ids


def item_vectors(rows: np.ndarray, centres: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Image and text vectors of pool ``rows``: their cluster's centre plus noise (CLIP-like norm ~10)."""
    base = centres[pool_cluster(rows, len(centres))]
    noise = rng.standard_normal((2, len(rows), DIM), dtype=np.float32) * 0.5
    return base + noise[0], base + noise[1]


def write_stores(args, size: int, folder: Path) -> dict:
    """The pool, query and training-query stores and the queries' relevant rows."""
    from genius.common.mbeir import DID_BASE, QID_BASE
    from genius.common.store import store_writer

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.centres, DIM), dtype=np.float32) * (10 / np.sqrt(DIM))
    sources = {"queries": np.sort(rng.choice(size, args.queries, replace=False)),
               "train": np.sort(rng.choice(size, train_rows(args), replace=size < train_rows(args)))}
    captured = {name: np.zeros((len(rows), 2, DIM), np.float32) for name, rows in sources.items()}
    with store_writer(folder / "pool", size, DIM, encoder="synthetic", kind="candidate") as out:
        for start in range(0, size, WRITE_CHUNK):
            rows = np.arange(start, min(start + WRITE_CHUNK, size))
            img, txt = item_vectors(rows, centres, rng)
            fill_rows(out, rows, pool_modality(rows, args.seed), img, txt, DATASET * DID_BASE + rows,
                      slice(rows[0], rows[-1] + 1))
            for name, src in sources.items():
                inside = (src >= rows[0]) & (src <= rows[-1])
                captured[name][inside] = np.stack([img[src[inside] - rows[0]], txt[src[inside] - rows[0]]], 1)
    for name, src in sources.items():  # a query: a noisy copy of its source item, asking for its modality
        vectors = captured[name] + rng.standard_normal(captured[name].shape, dtype=np.float32) * args.query_noise
        modality = pool_modality(src, args.seed)
        with store_writer(folder / name, len(src), DIM, encoder="synthetic", kind="query") as out:
            fill_rows(out, src, modality, vectors[:, 0], vectors[:, 1],
                      DATASET * QID_BASE + np.arange(len(src)), slice(None), target=modality)
        np.save(folder / f"{name}_positive_rows.npy", src)
    return {"note": f"{args.centres} clusters; queries = pool item + noise {args.query_noise}"}


def train_rows(args) -> int:
    rq, gen = train_configs(args)
    return max(rq.train.batch_size, gen.train.batch_size) * (args.train_steps + 1)


def synthetic_codes(args, size: int) -> np.ndarray:
    """[N, L] codes of the paper's shape: level 0 the modality, the next levels the cluster's, the rest random."""
    sizes = rq_model(args).codebook_sizes
    rows = np.arange(size)
    cluster = pool_cluster(rows, args.centres)
    rng = np.random.default_rng(args.seed + 1)
    codes = np.empty((size, len(sizes)), dtype=np.int64)
    codes[:, 0] = pool_modality(rows, args.seed)
    for level, k in enumerate(sizes[1:], 1):
        codes[:, level] = (cluster * (level * 7919 + 1) + level) % k if level <= 2 else rng.integers(0, k, size)
    return codes


# ---- models --------------------------------------------------------------------------------------------
def rq_model(args):
    from genius.models.residual_quantization.model import RQModel

    torch.manual_seed(args.seed)
    return RQModel.from_arch(rq_arch(args)).eval()


def save_random_rq(args, folder: Path) -> Path:
    """A paper-shaped quantizer with random weights, codebooks seeded by 2 k-means iterations on pool vectors."""
    from genius.common.store import EmbeddingStore
    from genius.models.residual_quantization.model import save_rq

    path = folder / "rq.pt"
    if path.is_file():
        return path
    model = rq_model(args)
    pool = EmbeddingStore.open(folder / "pool").arrays
    sample = min(len(pool.ids), 2 * model.codebook_sizes[-1])
    rows = np.sort(np.random.default_rng(args.seed).choice(len(pool.ids), sample, replace=False))
    with torch.no_grad():
        z = model.embed(*(torch.from_numpy(np.asarray(getattr(pool, n)[rows], np.float32))
                          for n in ("img", "txt", "img_mask", "txt_mask")))
        model.quantizer.initialise(z, torch.from_numpy(np.asarray(pool.modality[rows], np.int64)), 2,
                                   torch.Generator().manual_seed(args.seed), "random_rows")
    save_rq(path, model, {"benchmark": "scale"})
    return path


def random_generator(args, codebook_sizes: list[int]):
    from genius.models.generative_retriever.generator import IDGenerator

    torch.manual_seed(args.seed)
    return IDGenerator(generator_arch(args, codebook_sizes)).eval()


def query_embeddings(folder: Path):
    """(Combiner outputs of the queries [Q, D], their fused CLIP-SF embeddings [Q, D])."""
    from genius.common.fusion import score_fusion
    from genius.common.store import EmbeddingStore
    from genius.models.residual_quantization.model import load_rq

    q = EmbeddingStore.open(folder / "queries").arrays
    inputs = [torch.from_numpy(np.asarray(getattr(q, n), np.float32)) for n in ("img", "txt", "img_mask", "txt_mask")]
    with torch.no_grad():
        return load_rq(folder / "rq.pt").embed(*inputs), score_fusion(*inputs).numpy()


# ---- stages (each in its own process) ----------------------------------------------------------------
def stage_assign_codes(args, size: int, folder: Path) -> dict:
    from genius.common.distributed import cleanup, init_distributed
    from genius.common.store import EmbeddingStore, store_writer
    from genius.models.residual_quantization.assign_codes import AssignCodesConfig, assign_codes

    rows = min(size, args.assign_rows)
    name = "pool"
    if rows < size:  # a store of the pool's first rows, the stage's input as a user would have it
        name = "pool_head"
        pool = EmbeddingStore.open(folder / "pool").arrays
        with store_writer(folder / "stores_head" / name, rows, DIM, encoder="synthetic", kind="candidate") as out:
            for field in ("ids", "img", "txt", "img_mask", "txt_mask", "modality", "target_modality"):
                getattr(out, field)[:] = getattr(pool, field)[:rows]
    embed_dir = folder if rows == size else folder / "stores_head"
    cfg = AssignCodesConfig(rq_path=str(folder / "rq.pt"), embed_dir=str(embed_dir), pools=[name],
                            out_dir=str(folder / "assigned"), device="cpu", cpu_threads=args.threads, force=True)
    started = time.perf_counter()
    info = init_distributed("cpu")
    try:
        assign_codes(cfg, info)
    finally:
        cleanup()
    seconds = time.perf_counter() - started
    stats = json.loads((folder / "assigned" / name / "stats.json").read_text())
    note = f"collision rate {stats['collision_rate']:.3f}"
    if rows == size:
        return {"note": note, "disk": [folder / "assigned"]}
    return {"wall_s": seconds * size / rows, "disk_scale": size / rows, "disk": [folder / "assigned"],
            "note": f"measured {seconds:.0f} s on the first {rows:,} rows, time and disk scaled "
                    f"x{size / rows:.1f}; {note}"}


def stage_code_stats(args, size: int, folder: Path) -> dict:
    from genius.common.io import atomic_save_npy, atomic_write_json
    from genius.models.residual_quantization.assign_codes import pool_stats
    from genius.models.residual_quantization.model import RQModel

    codes = np.load(folder / "pool_codes.npy")
    sizes = RQModel.from_arch(rq_arch(args)).codebook_sizes
    out = folder / "code_stats"
    stats = pool_stats(codes, sizes, np.zeros(len(sizes)), codes[:, 0].copy())
    atomic_save_npy(out / "codes.npy", codes)
    atomic_write_json(out / "stats.json", stats)
    return {"note": f"assign-codes' stats + writes on all {size:,} codes; {stats['distinct_ids']:,} distinct IDs",
            "disk": [out]}


def stage_trie(args, size: int, folder: Path) -> dict:
    import genius.trie_cpp as trie_lib
    from genius.common.io import atomic_path

    with atomic_path(folder / "trie.bin") as tmp:
        trie = trie_lib.build_trie(np.load(folder / "pool_codes.npy"), "cpp")
        trie.save(tmp)
    return {"note": f"cpp backend, {len(trie):,} IDs", "disk": [folder / "trie.bin"]}


def stage_candidate_map(args, size: int, folder: Path) -> dict:
    stats = open_cmap(folder).collision_stats()
    return {"note": f"{stats['distinct_ids']:,} IDs, largest group {stats['largest_group']}"}


def stage_fused_cache(args, size: int, folder: Path) -> dict:
    from genius.common.store import EmbeddingStore
    from genius.models.generative_retriever.pool_assets import cached_fused_embeddings

    cached_fused_embeddings(EmbeddingStore.open(folder / "pool"), folder / "fused")
    return {"note": "fp16 [N, 768]", "disk": [folder / "fused"]}


def decode(args, size: int, folder: Path, autocast: bool) -> dict:
    import genius.trie_cpp as trie_lib
    from genius.models.generative_retriever.beam_search import constrained_beam_search

    trie = trie_lib.load_trie(folder / "trie.bin")
    sizes = rq_model(args).codebook_sizes
    z, _ = query_embeddings(folder)
    generator = random_generator(args, sizes)
    started = time.perf_counter()
    beams = constrained_beam_search(generator, z, trie, sizes, num_beams=args.beams, autocast=autocast)
    seconds = time.perf_counter() - started
    name = "beams_bf16" if autocast else "beams"
    np.savez(folder / f"{name}.npz", codes=beams.codes.numpy(), scores=beams.scores.float().numpy(),
             valid=beams.valid.numpy())
    return {"note": f"{len(z) / seconds:.1f} q/s, {args.beams} beams, {'bf16 autocast' if autocast else 'fp32'}",
            "disk": [folder / f"{name}.npz"]}


def stage_decode(args, size, folder):
    return decode(args, size, folder, autocast=False)


def stage_decode_bf16(args, size, folder):
    return decode(args, size, folder, autocast=True)


def open_cmap(folder: Path):
    """The pool's CandidateMap over its saved trie (as pool_assets.open_pool builds it)."""
    import genius.trie_cpp as trie_lib
    from genius.models.generative_retriever.retrieval import CandidateMap

    return CandidateMap.build(trie_lib.load_trie(folder / "trie.bin"), np.load(folder / "pool_codes.npy"))


def stage_rank(args, size: int, folder: Path) -> dict:
    from genius.models.generative_retriever.retrieval import beam_leaves, genius_ranking, rerank_ranking

    cmap = open_cmap(folder)
    beams = np.load(folder / "beams.npz")
    leaves = beam_leaves(cmap, beams["codes"], beams["valid"])
    _, fused_queries = query_embeddings(folder)
    started = time.perf_counter()
    fused = np.load(folder / "fused/fused.npy", mmap_mode="r")
    rankings = {"genius": genius_ranking(cmap, leaves, beams["scores"], max(KS)),
                "genius_r": rerank_ranking(cmap, leaves, fused_queries, fused, max(KS))}
    seconds = time.perf_counter() - started
    for method, ranking in rankings.items():
        np.save(folder / f"rows_{method}.npy", ranking.rows)
        np.save(folder / f"scores_{method}.npy", ranking.scores)
    return {"note": f"includes CandidateMap.build; ranking alone {seconds:.1f} s"}


def stage_dense_exact(args, size: int, folder: Path) -> dict:
    from genius.models.generative_retriever.pool_assets import dense_vectors
    from genius.models.generative_retriever.retrieval import dense_index

    fused = np.load(folder / "fused/fused.npy", mmap_mode="r")
    vectors = dense_vectors(fused, torch.device("cpu"))
    _, fused_queries = query_embeddings(folder)
    scores, rows = dense_index(vectors, backend="torch").search(fused_queries, max(KS))
    np.save(folder / "rows_dense.npy", rows)
    np.save(folder / "scores_dense.npy", scores)
    how = "streamed from the fp16 memmap" if vectors is fused else "resident fp32 copy"
    return {"note": f"torch chunked matmul, {how}"}


def stage_dense_faiss(args, size: int, folder: Path) -> dict:
    from genius.models.generative_retriever.pool_assets import resident_budget
    from genius.models.generative_retriever.retrieval import dense_index

    fused = np.load(folder / "fused/fused.npy", mmap_mode="r")
    _, fused_queries = query_embeddings(folder)
    # the resident rows Pool.dense_search gives faiss: half the free host memory in fp32
    index = dense_index(fused, backend="faiss", resident_rows=max(resident_budget(torch.device("cpu")) // (4 * DIM), 1))
    scores, rows = index.search(fused_queries, max(KS))
    np.save(folder / "rows_faiss.npy", rows)
    how = ("one fp32 IndexFlatIP" if index.index is not None else
           f"IndexFlatIP over blocks of {index.block_rows:,} fp32 rows ({index.block_rows * DIM * 4 / GiB:.1f} GiB)")
    return {"note": f"FaissFlatIPIndex, {how}"}


def stage_eval(args, size: int, folder: Path) -> dict:
    from genius.common.mbeir import Qrels, unhash_did, unhash_qid
    from genius.common.store import EmbeddingStore
    from genius.models.generative_retriever.metrics import recall_at_k, relevant_sets, write_run_file
    from genius.models.generative_retriever.retrieval import Ranking

    queries, pool = EmbeddingStore.open(folder / "queries"), EmbeddingStore.open(folder / "pool")
    positives = np.load(folder / "queries_positive_rows.npy")
    qids, pool_ids = np.asarray(queries.ids), np.asarray(pool.ids)
    qrels = Qrels({unhash_qid(q): {unhash_did(pool_ids[p])} for q, p in zip(qids.tolist(), positives.tolist())},
                  {unhash_qid(q): 1 for q in qids.tolist()})
    relevant = relevant_sets(qids, qrels)
    recalls = []
    for method in ("dense", "genius", "genius_r"):
        ranking = Ranking(np.load(folder / f"rows_{method}.npy"), np.load(folder / f"scores_{method}.npy"))
        dids = ranking.ids(pool_ids)
        write_run_file(folder / "runs" / f"{method}.run", qids, dids, ranking.scores, method, np.ones(len(qids), int))
        recalls.append(f"{method} " + "/".join(f"{recall_at_k(dids, relevant, k):.3f}" for k in KS))
    return {"note": f"R@{'/'.join(map(str, KS))}: " + ", ".join(recalls), "disk": [folder / "runs"]}


def stage_train_rq(args, size: int, folder: Path) -> dict:
    from genius.models.residual_quantization.model import load_rq
    from genius.models.residual_quantization.train import EpochTally, Trainer, make_optimisation, optimise

    cfg, _ = train_configs(args)
    cpu = torch.device("cpu")
    model = load_rq(folder / "rq.pt").train()
    optimizer, scheduler, scaler = make_optimisation(model, cfg.train, 1000, False, cpu)
    trainer = Trainer(model, None, optimizer, scheduler, scaler, args.train_steps, False, 0)
    tally = EpochTally(model.codebook_sizes, cpu, model.has_modality_level)
    return time_steps(args, folder, cfg.train.batch_size,
                      lambda batch, i: optimise(model, trainer, batch, cfg.train, cpu, tally, 0, i))


def stage_train_gen(args, size: int, folder: Path) -> dict:
    from genius.common.training import grad_scaler
    from genius.models.generative_retriever.train import make_optimizer, new_generator, train_step
    from genius.models.residual_quantization.model import load_rq

    _, cfg = train_configs(args)
    cpu = torch.device("cpu")
    rq = load_rq(folder / "rq.pt")
    if args.tiny:
        cfg.model.num_prefix, cfg.model.d_model, cfg.model.num_heads, cfg.model.d_kv = 4, 32, 2, 16
        cfg.model.d_ff, cfg.model.num_decoder_layers = 64, 1
    generator = new_generator(cfg.model, rq).train()
    optimizer, scheduler = make_optimizer(generator, cfg.optim, 1000)
    scaler = grad_scaler(False, cpu)
    return time_steps(args, folder, cfg.train.batch_size,
                      lambda batch, i: train_step(generator, rq, batch, optimizer, scheduler, scaler, cfg, cpu))


def time_steps(args, folder: Path, batch_size: int, step) -> dict:
    """Time ``--train-steps`` steps after a warm-up one, on batches of the training slice; scale to an epoch."""
    from genius.common.pairs import TrainingPairs, iterate_batches
    from genius.common.store import EmbeddingStore

    queries, pool = EmbeddingStore.open(folder / "train"), EmbeddingStore.open(folder / "pool")
    positives = np.load(folder / "train_positive_rows.npy")
    pairs = TrainingPairs(np.arange(len(positives)), np.arange(len(positives) + 1), positives)
    batches = iterate_batches(pairs, queries, pool, batch_size=batch_size, epoch=0, seed=args.seed)
    step(next(batches), 0)
    started = time.perf_counter()
    for i in range(1, args.train_steps + 1):
        step(next(batches), i)
    per_step = (time.perf_counter() - started) / args.train_steps
    steps = -(-MBEIR_TRAIN_PAIRS // batch_size)
    return {"wall_s": per_step * steps,
            "note": f"one epoch of {MBEIR_TRAIN_PAIRS:,} pairs = {steps:,} steps of batch {batch_size} x "
                    f"{per_step:.2f} s (mean of {args.train_steps} timed steps) on this CPU, fp32; "
                    "the paper trains on GPUs"}


def stage_write_codes(args, size: int, folder: Path) -> dict:
    np.save(folder / "pool_codes.npy", synthetic_codes(args, size))
    return {"note": "synthetic codes read by the stages after code-stats", "disk": [folder / "pool_codes.npy"]}


STAGES = {"write-codes": stage_write_codes,
          "write-stores": lambda args, size, folder: {**write_stores(args, size, folder),
                                                      "disk": [folder / n for n in ("pool", "queries", "train")]},
          "assign-codes": stage_assign_codes, "code-stats": stage_code_stats, "trie": stage_trie,
          "candidate-map": stage_candidate_map, "fused-cache": stage_fused_cache, "decode": stage_decode,
          "decode-bf16": stage_decode_bf16, "rank": stage_rank, "dense-exact": stage_dense_exact,
          "dense-faiss": stage_dense_faiss, "eval": stage_eval, "train-rq": stage_train_rq,
          "train-gen": stage_train_gen}


def run_stage_here(args) -> None:
    """The child side: run one stage, write what it reports as JSON for the parent."""
    torch.set_num_threads(args.threads)
    folder = args.work_dir / size_name(args.stage_size)
    if args.setup_only:
        save_random_rq(args, folder)
        return
    with AnonymousPeak() as anon:
        report = STAGES[args.stage](args, args.stage_size, folder)
    report["disk"] = [str(p) for p in report.get("disk", [])]
    report["peak_anon_mb"] = round(anon.peak_kb / 1024)
    (folder / f"report-{args.stage}.json").write_text(json.dumps(report))


class AnonymousPeak:
    """The largest RssAnon of this process, sampled every 0.1 s.

    Peak RSS (wait4) counts the pages of memory-mapped files a stage has touched, which the kernel
    reclaims under pressure: a stage streaming a 17 GB store shows up to 17 GB there. Its anonymous
    memory (heap, tensors) is what must fit."""

    def __enter__(self) -> "AnonymousPeak":
        self.peak_kb, self._done = self._sample(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self._sample())

    def _watch(self) -> None:
        while not self._done.wait(0.1):
            self.peak_kb = max(self.peak_kb, self._sample())

    @staticmethod
    def _sample() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0


# ---- the parent ------------------------------------------------------------------------------------
def size_name(size: int) -> str:
    return f"n{size}"


def disk_bytes(paths: list[str]) -> int:
    total = 0
    for path in map(Path, paths):
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
        total += sum(f.stat().st_size for f in files)
    return total


def run_stage(args, stage: str, size: int, child_argv: list[str]) -> dict:
    """Run ``stage`` in a fresh interpreter; its wall time, peak RSS (wait4) and what it reported."""
    folder = args.work_dir / size_name(size)
    if stage in NEEDS_RQ and not (folder / "rq.pt").is_file():  # set up outside the measured processes
        subprocess.run([sys.executable, __file__, *child_argv, "--stage", stage, "--setup-only",
                        "--stage-size", str(size)], check=True)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *child_argv, "--stage", stage, "--stage-size", str(size)])
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        return {"stage": stage, "size": size, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "disk_mb": "",
                "note": f"FAILED (exit {os.waitstatus_to_exitcode(status)})"}
    report = json.loads((folder / f"report-{stage}.json").read_text())
    disk = disk_bytes(report.get("disk", [])) * report.get("disk_scale", 1.0)
    return {"stage": stage, "size": size, "wall_s": round(report.get("wall_s", wall), 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "peak_anon_mb": report["peak_anon_mb"],
            "disk_mb": round(disk / 2**20, 3) if disk else "",
            "note": report.get("note", "")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 5.6e6], help="pool sizes")
    p.add_argument("--queries", type=int, default=1000, help="test queries decoded and evaluated at each size")
    p.add_argument("--stages", nargs="+", default=[*DATA_STAGES, *POOL_STAGES, *TRAIN_STAGES],
                   choices=[*DATA_STAGES, *POOL_STAGES, *TRAIN_STAGES])
    p.add_argument("--beams", type=int, default=50)
    p.add_argument("--assign-rows", type=int, default=100_000,
                   help="above this pool size assign-codes runs on the first rows only and is scaled")
    p.add_argument("--train-steps", type=int, default=2, help="timed training steps (after one warm-up step)")
    p.add_argument("--centres", type=int, default=4096, help="clusters of the synthetic vectors")
    p.add_argument("--query-noise", type=float, default=0.5)
    p.add_argument("--tiny", action="store_true", help="tiny quantizer and generator (the smoke test)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=OUT_DIR / "scale")
    p.add_argument("--work-dir", type=Path, default=None, help="working files (default: --out-dir/work)")
    p.add_argument("--keep", action="store_true", help="keep the working files (tens of GB at 5.6M)")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--stage-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--setup-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.work_dir = (args.work_dir or args.out_dir / "work").resolve()
    return args


def child_argv(args) -> list[str]:
    flags = ["--queries", str(args.queries), "--beams", str(args.beams), "--assign-rows", str(args.assign_rows),
             "--train-steps", str(args.train_steps),
             "--centres", str(args.centres), "--query-noise", str(args.query_noise), "--threads", str(args.threads),
             "--seed", str(args.seed), "--out-dir", str(args.out_dir), "--work-dir", str(args.work_dir)]
    return flags + (["--tiny"] if args.tiny else [])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage:
        run_stage_here(args)
        return 0
    sizes = [int(s) for s in args.sizes]
    print(f"# scale benchmark: {machine_description()}, load {load_average():.2f}", flush=True)
    rows: list[dict] = []
    for size in sizes:
        (args.work_dir / size_name(size)).mkdir(parents=True, exist_ok=True)
        for stage in args.stages:
            if stage in TRAIN_STAGES and size != max(sizes):
                continue
            row = run_stage(args, stage, size, child_argv(args))
            if stage in TRAIN_STAGES:
                row["size"] = f"{MBEIR_TRAIN_PAIRS:,} pairs"
            rows.append(row)
            print(" | ".join(str(row.get(c, "")) for c in COLUMNS), flush=True)
            write_outputs(args, rows)
        if not args.keep:
            shutil.rmtree(args.work_dir / size_name(size), ignore_errors=True)
    print(markdown_table(COLUMNS, ([row.get(c, "") for c in COLUMNS] for row in rows)))
    return 0 if all("FAILED" not in str(row["note"]) for row in rows) else 1


def write_outputs(args, rows: list[dict]) -> None:
    write_csv(args.out_dir / "scale.csv", rows, COLUMNS)
    header = (f"Scale benchmark ({machine_description()}; load {load_average():.2f}; "
              f"{available_memory_gb():.0f} GB available)\n\n")
    table = markdown_table(COLUMNS, ([row.get(c, "") for c in COLUMNS] for row in rows))
    (args.out_dir / "scale.md").write_text(header + table)


if __name__ == "__main__":
    sys.exit(main())
