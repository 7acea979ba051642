"""Real text-to-text retrieval on COCO captions: dense MiniLM vs GENIUS vs GENIUS^R, trained end to end on CPU.

Data: COCO 2017 val captions (5,000 images, ~5 captions each). Images are shuffled (seeded) and
split: ``--test-images`` held-out test images (never seen in training), the rest training
images. With ``--split val`` a validation split of ``--val-images`` is carved from the
*training* images (and removed from training) and evaluated instead of the test split: that is
the only split hyperparameters were chosen on.

- Training (stages 1 and 2): every caption of a training image is a query whose positives are
  the other captions of the same image; the pool is all training captions.
- Evaluation: for each held-out image one caption (seeded choice) is the query; the pool is the
  remaining captions of all held-out images (shuffled); the positives are the other captions of
  the query's image. Recall@k = share of queries with a positive in the top k (UniIR's hit rate).
  ``--pool full``: the pool is every caption of every chosen image (training, validation and test
  images alike) except the query captions, so the re-ranked beams see a far smaller share of it;
  queries, positives and training are unchanged.

All items are text-only: image vectors are zero with image mask 0, and level 0 of every ID is
the text modality code 1. Texts are ``format_string``-ed and encoded once with the MiniLM
encoder of stage 0 (``HFTextEncoder``, 384-d, mean pooling), cached in the output directory.
Stores are written with ``genius.common.store`` in the M-BEIR layout the stages read, then the
project's own stage functions run: ``train-rq`` (Combiner + residual quantizer), ``train-gen``
(T5 ID generator), ``assign-codes`` (pool IDs + collision stats), and stage 3's retrieval pieces
(C++ trie, ``constrained_beam_search``, ``CandidateMap``, ``genius_ranking``, ``rerank_ranking``,
``ExactIPIndex``). Dense = exact cosine over the MiniLM embeddings (score fusion of the text
vector); GENIUS^R re-ranks the union of the beams' candidates by that same cosine.
GENIUS ranks the beams' IDs by score and the captions sharing an ID in pool order (the paper);
``--within-id-order centre`` puts the caption closest to its ID's reconstruction first instead (a
query-independent order, one axis of benchmarks/ablate.py); ``--sibling-penalty`` decodes diverse
beams (``constrained_beam_search``'s sibling-rank penalty). ``--mixing``, ``--mix-alpha`` and
``--label-smoothing`` set train-gen's query-target mixing and code loss, ``--rq-objective``
train-rq's loss (GENIUS's contrastive one, or IRGen's classification over the training images).
``--index-pool on`` (the default since the ablation chose it; ``off`` trains on the training pairs
alone, as the paper does) also trains the generator on (caption -> itself) for each pool caption
outside the training set (indexing the pool, as DSI does, through train-gen's
``data.index_pools``; only the pool's own texts are used, never a query). ``--levels`` and
``--gen-epochs`` default to what the validation grids chose for the pool (``POOL_DEFAULTS``).

Outputs in ``--out-dir``: ``<run>/`` (data/ and embed/: the jsonl files and stores; train_rq.yaml,
train_gen.yaml, assign_codes.yaml: the stage configs; rq/, gen/, codes/: the stages' outputs) and
``coco_t2t_<split>[_full_pool].{md,csv,json,png}``; with ``--run-name`` the report goes into the run
directory instead (``<run>/coco_t2t.*``), so named runs sharing an output directory (and its caption
cache) keep their own results. ``--stages-dir`` moves data/, embed/, the stage configs and outputs
elsewhere, so that runs differing only in ``EVAL_ONLY`` flags can share them (the ablation harness
does). The JSON, written last, records the result, timings and every flag. Finished stages are
skipped on a re-run with the same settings (the stages' own up-to-date checks).

    bash benchmarks/run_coco_t2t.sh [--split test|val] [--pool heldout|full] [--levels 4 --codebook 256] [--images ...]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from genius.benchmarks.common import (
    OUT_DIR,
    load_average,
    machine_description,
    markdown_table,
    write_csv,
)
from genius.common.stage import exit_user_error

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CAPTIONS = Path(os.environ.get("GENIUS_SHARED_DATA", REPO.parent / "shared" / "data")) / \
    "coco_captions_val2017" / "captions_val2017.json"
ENCODER = "minilm"
DATASET_ID = 9  # MSCOCO's M-BEIR dataset id (ids are "9:<caption row>")
TEXT_TASK = 1  # M-BEIR task 1: text -> text
KS = (1, 5, 10)
METHODS = ("dense", "genius", "genius_r", "genius_full", "genius_r_full", "dense_combiner")
# with --int8 on / --bf16 on: the same model decoded in that precision, beside fp32
LOW_PRECISIONS = ("int8", "bf16")
LOW_PRECISION_METHODS = tuple(f"{m}_{p}" for p in LOW_PRECISIONS for m in ("genius", "genius_r"))
LABELS = {"dense": "dense MiniLM (exact cosine)", "genius": "GENIUS", "genius_r": "GENIUS^R (re-ranked)",
          "genius_full": "GENIUS, full-vocabulary decoding (the official normalisation)",
          "genius_r_full": "GENIUS^R, full-vocabulary decoding",
          "dense_combiner": "dense over the Combiner output z (diagnostic)",
          "genius_int8": "GENIUS, int8 decoder", "genius_r_int8": "GENIUS^R, int8 decoder",
          "genius_bf16": "GENIUS, bf16 decoder", "genius_r_bf16": "GENIUS^R, bf16 decoder"}
# The decodings of one run, all from the same model: "level" scores only the level's K rows of the
# output head at each step (the speed option), "full" the whole vocabulary; with --int8 on, "int8"
# is "level" with the decoder's and the head's products in int8 (eval's decoding.int8), with --bf16
# on, "bf16" is "level" with the decoder's weights in bf16 (eval's decoding.autocast on a CPU).
# name -> (level_head, precision)
DECODINGS = {"level": (True, "fp32"), "full": (False, "fp32"), "int8": (True, "int8"), "bf16": (True, "bf16")}
log = logging.getLogger("genius.bench.coco")


# ---- data: captions, split, embeddings -----------------------------------------------------
@dataclass
class Split:
    train: list[list[int]]  # per training image: caption rows
    eval: list[list[int]]  # per evaluated (test or validation) image: caption rows
    encoded: list[int]  # caption rows of every chosen image (train, validation and test), sorted


def load_captions(path: Path) -> tuple[list[str], np.ndarray]:
    """Formatted captions and their image ids, in annotation-id order."""
    from genius.common.mbeir import format_string

    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} not found (pass --captions or set GENIUS_SHARED_DATA)")
    annotations = sorted(json.loads(path.read_text())["annotations"], key=lambda a: a["id"])
    return [format_string(a["caption"]) for a in annotations], np.array([a["image_id"] for a in annotations])


def split_images(image_ids: np.ndarray, args) -> Split:
    """Seeded image split; images with fewer than two captions cannot give a query and a positive."""
    by_image: dict[int, list[int]] = {}
    for row, image in enumerate(image_ids.tolist()):
        by_image.setdefault(image, []).append(row)
    images = sorted(i for i, rows in by_image.items() if len(rows) >= 2)
    order = np.random.default_rng(args.seed).permutation(len(images))[: args.images]
    chosen = [by_image[images[i]] for i in order]
    if args.test_images + (args.val_images if args.split == "val" else 0) >= len(chosen):
        raise ValueError(f"{len(chosen)} images cannot hold {args.test_images} test (+ {args.val_images} validation) "
                         "images and still leave training images")
    test, train = chosen[: args.test_images], chosen[args.test_images :]
    # Encoding every chosen image, whichever split is evaluated, lets val and test runs share one cache.
    encoded = sorted(r for rows in chosen for r in rows)
    if args.split == "val":
        return Split(train=train[args.val_images :], eval=train[: args.val_images], encoded=encoded)
    return Split(train=train, eval=test, encoded=encoded)


def encoded_captions(texts: list[str], rows: list[int], cache_dir: Path, batch_size: int) -> np.ndarray:
    """MiniLM vectors [len(texts), 384] of the captions ``rows`` (other rows zero), cached by texts + encoder."""
    from genius.common.io import atomic_save_npy
    from genius.feature_extraction.encoders import EncoderConfig, build_encoder

    encoder = build_encoder(EncoderConfig(name=ENCODER, kind="hf_text"), "cpu")
    wanted = [texts[r] for r in rows]
    key = hashlib.sha256(json.dumps({"texts": wanted, "encoder": encoder.fingerprint}, sort_keys=True).encode())
    cache = cache_dir / f"{ENCODER}_{len(rows)}_{key.hexdigest()[:16]}.npy"
    if cache.is_file():
        encoded = np.load(cache)
    else:
        log.info("encoding %d captions with %s (cached to %s)", len(rows), ENCODER, cache)
        encoded = encoder.encode_texts(wanted, batch_size).astype(np.float32)
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(cache, encoded)
    vectors = np.zeros((len(texts), encoded.shape[1]), dtype=np.float32)
    vectors[rows] = encoded
    return vectors


# ---- the M-BEIR-style world the stages read ------------------------------------------------
def did(row: int) -> str:
    return f"{DATASET_ID}:{row}"


def write_if_changed(path: Path, text: str) -> None:
    """Keep the file (and its mtime, which stores and stages check) when the content is the same."""
    from genius.common.io import atomic_write_text

    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)


def queries_jsonl(images: list[list[int]], texts: list[str], query_rows: list[int] | None = None) -> str:
    """Queries with their positives: every caption of each image (or only ``query_rows``); the
    positives are the image's other captions."""
    wanted = None if query_rows is None else set(query_rows)
    lines = []
    for rows in images:
        for row in rows:
            if wanted is None or row in wanted:
                positives = [r for r in rows if r != row]
                lines.append(json.dumps({"qid": did(row), "query_txt": texts[row], "query_img_path": None,
                                         "query_modality": "text", "pos_cand_list": [did(r) for r in positives],
                                         "neg_cand_list": [], "task_id": TEXT_TASK}))
    return "\n".join(lines) + "\n"


def pool_jsonl(rows: list[int], texts: list[str]) -> str:
    return "\n".join(json.dumps({"did": did(r), "txt": texts[r], "img_path": None, "modality": "text"})
                     for r in rows) + "\n"


def text_store(path: Path, rows: list[int], vectors: np.ndarray, kind: str, source: Path) -> None:
    """A text-only store (image vectors zero, image mask 0, modality 1), rewritten only when stale."""
    from genius.common.mbeir import hash_did, hash_qid
    from genius.common.store import EmbeddingStore, StoreArrays, StoreError, write_store

    try:
        EmbeddingStore.open(path, dim=vectors.shape[1], encoder=ENCODER, kind=kind, source=source)
        return
    except StoreError:
        pass
    hashed = [hash_qid(did(r)) if kind == "query" else hash_did(did(r)) for r in rows]
    count, text_code = len(rows), 1
    arrays = StoreArrays(ids=np.array(hashed, dtype=np.int64), img=np.zeros((count, vectors.shape[1]), np.float32),
                         txt=vectors[rows], img_mask=np.zeros(count, np.uint8), txt_mask=np.ones(count, np.uint8),
                         modality=np.full(count, text_code, np.int8), target_modality=np.full(count, text_code, np.int8))
    write_store(path, arrays, encoder=ENCODER, kind=kind, source=source)


@dataclass
class World:
    root: Path  # M-BEIR-style data root of this run
    embed_root: Path
    train_queries: Path
    train_pool: Path
    eval_queries: Path
    eval_pool: Path
    eval_query_rows: list[int]  # caption rows, in query order
    eval_pool_rows: list[int]  # caption rows, in pool order
    positives: list[set[int]]  # per query: caption rows of its positives in the pool
    # with --index-pool on, the pool captions train-gen's data.index_pools adds as (caption -> itself):
    # those the training pool lacks; empty with it off
    indexed_rows: list[int]

    def store(self, split: str, source: Path) -> Path:
        from genius.common.store import store_path

        return store_path(self.embed_root, ENCODER, split, source)


def build_world(stages_dir: Path, split: Split, texts: list[str], vectors: np.ndarray, seed: int,
                pool: str = "heldout", index_pool: bool = False) -> World:
    rng = np.random.default_rng(seed + 1)
    query_rows, pool_rows, positives = [], [], []
    for rows in split.eval:
        query = rows[int(rng.integers(len(rows)))]
        query_rows.append(query)
        others = [r for r in rows if r != query]
        pool_rows += others
        positives.append(set(others))
    if pool == "full":
        queries = set(query_rows)
        pool_rows = [r for r in split.encoded if r not in queries]
    pool_rows = [pool_rows[i] for i in rng.permutation(len(pool_rows))]  # no image-grouped pool order
    root = stages_dir / "data"
    train_rows = [r for rows in split.train for r in rows]
    trained = set(train_rows)
    indexed = [r for r in pool_rows if r not in trained] if index_pool else []
    train_queries = root / "query" / "train" / "coco_t2t_train.jsonl"
    train_pool = root / "cand_pool" / "train" / "coco_t2t_train_cand_pool.jsonl"
    world = World(root, stages_dir / "embed", train_queries, train_pool,
                  root / "query" / "eval" / "coco_t2t_eval.jsonl", root / "cand_pool" / "eval" / "coco_t2t_eval_cand_pool.jsonl",
                  query_rows, pool_rows, positives, indexed_rows=indexed)
    write_if_changed(world.train_queries, queries_jsonl(split.train, texts))
    write_if_changed(world.train_pool, pool_jsonl(train_rows, texts))
    text_store(world.store("train", world.train_queries), train_rows, vectors, "query", world.train_queries)
    text_store(world.store("train", world.train_pool), train_rows, vectors, "candidate", world.train_pool)
    write_if_changed(world.eval_queries, queries_jsonl(split.eval, texts, query_rows))
    write_if_changed(world.eval_pool, pool_jsonl(pool_rows, texts))
    text_store(world.store("test", world.eval_queries), query_rows, vectors, "query", world.eval_queries)
    text_store(world.store("cand", world.eval_pool), pool_rows, vectors, "candidate", world.eval_pool)
    return world


# ---- stages 1 and 2, through the project's training functions ---------------------------------
def stage_config(cls, path: Path, sections: dict):
    """Write a stage's settings as its YAML file and load it as the stages do (strict keys, types, checks)."""
    import yaml
    from genius.common.config import load_config

    write_if_changed(path, yaml.safe_dump(sections, sort_keys=False))
    return load_config(cls, path)


def train_quantizer(world: World, stages_dir: Path, args) -> Path:
    from genius.models.residual_quantization import train as rq_train

    cfg = stage_config(rq_train.RQTrainConfig, stages_dir / "train_rq.yaml", {
        "data": {"query_file": str(world.train_queries), "pool_file": str(world.train_pool),
                 "query_store": str(world.store("train", world.train_queries)),
                 "pool_store": str(world.store("train", world.train_pool)), "encoder": ENCODER},
        "model": {"proj_dim": args.proj_dim, "hidden_dim": args.hidden_dim, "num_levels": args.levels,
                  "codebook_size": args.codebook},
        "train": {"batch_size": args.rq_batch, "epochs": args.rq_epochs, "lr": args.rq_lr, "min_lr": args.rq_lr / 10,
                  "kmeans_iters": args.kmeans_iters, "objective": args.rq_objective, "seed": args.seed,
                  "save_every": max(1, args.rq_epochs),
                  "log_every": 10**6, "device": "cpu", "cpu_threads": args.threads},
        "out_dir": str(stages_dir / "rq")})
    path = rq_train.train(cfg)
    if path is None:
        raise RuntimeError("train-rq stopped before its last epoch")
    return path


def train_generator(world: World, stages_dir: Path, rq_path: Path, args) -> Path:
    from genius.models.generative_retriever import train as gen_train

    steps = args.gen_epochs * ((count_lines(world.train_queries) + len(world.indexed_rows)) // args.gen_batch)
    cfg = stage_config(gen_train.TrainGenConfig, stages_dir / "train_gen.yaml", {
        "data": {"root": str(world.root), "embed_root": str(world.embed_root), "encoder": ENCODER,
                 "train_queries": str(world.train_queries.relative_to(world.root)),
                 "train_pool": str(world.train_pool.relative_to(world.root)), "rq": str(rq_path),
                 # DSI's indexing: (caption -> itself) for the pool captions the training pool lacks
                 "index_pools": [str(world.eval_pool.relative_to(world.root))] if world.indexed_rows else []},
        "model": {"num_prefix": args.prefix, "d_model": args.d_model, "num_heads": args.heads,
                  "d_kv": args.d_model // args.heads, "d_ff": args.d_ff, "num_decoder_layers": args.layers},
        "mixing": {"enabled": args.mixing == "on", "alpha": args.mix_alpha},
        "optim": {"lr": args.gen_lr, "warmup_steps": max(1, steps // 20), "label_smoothing": args.label_smoothing},
        "train": {"epochs": args.gen_epochs, "batch_size": args.gen_batch, "seed": args.seed, "device": "cpu",
                  "amp": False, "log_every": 10**6, "checkpoint_every": max(1, args.gen_epochs),
                  # pinned, not the load-following thread policy: a benchmark's numbers must not move with the load
                  "cpu_threads": args.threads},
        "out_dir": str(stages_dir / "gen")})
    return gen_train.train(cfg)


def count_lines(path: Path) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def pool_codes(world: World, stages_dir: Path, rq_path: Path, threads: int) -> tuple[np.ndarray, dict]:
    """The evaluated pool's IDs and collision statistics, written by assign-codes."""
    from genius.common.distributed import init_distributed
    from genius.models.residual_quantization.assign_codes import (
        AssignCodesConfig,
        assign_codes,
    )

    store = world.store("cand", world.eval_pool)
    cfg = stage_config(AssignCodesConfig, stages_dir / "assign_codes.yaml", {
        "rq_path": str(rq_path), "embed_dir": str(store.parent), "pools": [store.name], "encoder": ENCODER,
        "out_dir": str(stages_dir / "codes"), "device": "cpu", "cpu_threads": threads})
    assign_codes(cfg, init_distributed("cpu"))
    out = stages_dir / "codes" / store.name
    return np.load(out / "codes.npy"), json.loads((out / "stats.json").read_text())


# ---- stage 3: retrieval and Recall@k ---------------------------------------------------------
@torch.no_grad()
def evaluate(world: World, stages_dir: Path, rq_path: Path, gen_path: Path, args) -> dict:
    from genius.common.fusion import fused_store_embeddings
    from genius.common.mbeir import hash_did
    from genius.common.store import EmbeddingStore
    from genius.models.generative_retriever.beam_search import constrained_beam_search, prepare_decoder
    from genius.models.generative_retriever.generator import load_generator
    from genius.models.generative_retriever.metrics import hits_at_k
    from genius.models.generative_retriever.retrieval import (
        CandidateMap,
        ExactIPIndex,
        genius_ranking,
        rerank_ranking,
        union_sizes,
    )
    from genius.models.residual_quantization.model import load_rq
    from genius.trie_cpp import build_trie

    rq = load_rq(rq_path)
    generator, _ = load_generator(gen_path)
    queries = EmbeddingStore.open(world.store("test", world.eval_queries), encoder=ENCODER, kind="query")
    pool = EmbeddingStore.open(world.store("cand", world.eval_pool), encoder=ENCODER, kind="candidate")
    codes, stats = pool_codes(world, stages_dir, rq_path, args.threads)
    trie = build_trie(codes, "cpp")
    z_q, z_c = combiner_embeddings(rq, queries), combiner_embeddings(rq, pool)
    cmap = CandidateMap.build(trie, codes, order=None if args.within_id_order == "pool" else
                              quantization_errors(rq, z_c, codes))
    q_fused, c_fused = fused_store_embeddings(queries.arrays), fused_store_embeddings(pool.arrays)

    decodings = {name: spec for name, spec in DECODINGS.items()
                 if spec[1] == "fp32" or getattr(args, spec[1]) == "on"}
    decoders = {precision: prepare_decoder(generator, torch.device("cpu"), autocast=precision == "bf16",
                                           int8=precision == "int8") for _, precision in decodings.values()}

    def decode(queries: np.ndarray, level_head: bool, precision: str):
        return constrained_beam_search(generator, torch.from_numpy(queries), trie, rq.codebook_sizes,
                                       num_beams=args.beams, batch_size=64, level_head=level_head,
                                       sibling_penalty=args.sibling_penalty, autocast=precision == "bf16",
                                       int8=precision == "int8", decoder=decoders[precision])

    decoded, decode_s = {}, {}
    for name, (level_head, precision) in decodings.items():
        decode(z_q[:64], level_head, precision)  # warm-up, so no setting pays the first call's costs
        start = time.perf_counter()
        decoded[name] = decode(z_q, level_head, precision)
        decode_s[name] = time.perf_counter() - start
    k = max(KS)
    pool_ids = np.asarray(pool.ids)
    retrieved = {"dense": ExactIPIndex(c_fused, pool_ids).search(q_fused, k)[1],
                 "dense_combiner": ExactIPIndex(z_c, pool_ids).search(z_q, k)[1]}
    leaves_of = {}
    for name, beams in decoded.items():
        leaves = cmap.leaves_of(beams.codes.numpy())
        leaves[~beams.valid.numpy()] = -1
        leaves_of[name] = leaves
        suffix = "" if name == "level" else f"_{name}"
        retrieved["genius" + suffix] = genius_ranking(cmap, leaves, beams.scores.numpy(), k).ids(pool_ids)
        retrieved["genius_r" + suffix] = rerank_ranking(cmap, leaves, q_fused, c_fused, k).ids(pool_ids)
    beams, leaves = decoded["level"], leaves_of["level"]
    relevant = [{hash_did(did(r)) for r in rows} for rows in world.positives]
    recalls = {m: {kk: float(hits_at_k(ids, relevant, kk).mean()) for kk in KS} for m, ids in retrieved.items()}
    own_ids = rq.encode(torch.from_numpy(z_q), torch.ones(len(z_q), dtype=torch.long)).numpy()
    low_precision = {}  # each low precision's speed and agreement with fp32 (the level head)
    for p in LOW_PRECISIONS:
        if p in decoded:
            low_precision.update({
                f"beam_search_qps_{p}": len(z_q) / decode_s[p],
                f"same_top_beam_{p}": float((decoded[p].codes[:, 0] == beams.codes[:, 0]).all(-1).float().mean()),
                f"same_beam_set_{p}": same_beam_set(decoded[p], beams)})
    return {
        "recall": recalls,
        "pool_stats": stats,
        "queries": len(z_q), "pool": len(pool_ids),
        "beam_search_qps": len(z_q) / decode_s["level"],
        "beam_search_qps_full_vocabulary": len(z_q) / decode_s["full"],
        # Same top beam under both normalisations, and the same set of beams (order aside).
        "same_top_beam": float((decoded["level"].codes[:, 0] == decoded["full"].codes[:, 0]).all(-1).float().mean()),
        "same_beam_set": same_beam_set(decoded["level"], decoded["full"]),
        "rerank_set_mean": float(union_sizes(cmap, leaves).mean()),
        "valid_beams_mean": float(beams.valid.float().sum(1).mean()),
        # How far the quantizer alone gets: the query's own ID holds a positive (no generator).
        "own_id_holds_positive": own_id_hit_rate(cmap, own_ids, pool_ids, relevant),
        "top_beam_is_own_id": float((beams.codes[:, 0].numpy() == own_ids).all(1).mean()),
        **low_precision,
    }


def methods_of(result: dict) -> list[str]:
    """The methods a result holds, in report order (the int8 and bf16 rows only from a run with
    --int8 on or --bf16 on)."""
    return [m for m in METHODS + LOW_PRECISION_METHODS if m in result["recall"]]


def same_beam_set(a, b) -> float:
    """Share of queries whose beams hold the same IDs under both decodings (in any order)."""
    same = []
    for codes_a, valid_a, codes_b, valid_b in zip(a.codes.numpy(), a.valid.numpy(), b.codes.numpy(), b.valid.numpy()):
        same.append({tuple(c) for c in codes_a[valid_a]} == {tuple(c) for c in codes_b[valid_b]})
    return float(np.mean(same))


def combiner_embeddings(rq, store) -> np.ndarray:
    a = store.arrays
    tensors = [torch.from_numpy(np.asarray(x, dtype=np.float32)) for x in (a.img, a.txt, a.img_mask, a.txt_mask)]
    return rq.embed(*tensors).numpy()


def quantization_errors(rq, z: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """||z - decode(codes)||^2 per candidate: how far each caption lies from its ID's reconstruction."""
    return ((z - rq.decode(torch.from_numpy(codes)).numpy()) ** 2).sum(1)


def own_id_hit_rate(cmap, own_ids: np.ndarray, pool_ids: np.ndarray, relevant: list[set[int]]) -> float:
    leaves = cmap.leaves_of(own_ids)
    hits = [leaf >= 0 and not rel.isdisjoint(pool_ids[cmap.candidates(leaf)].tolist())
            for leaf, rel in zip(leaves.tolist(), relevant)]
    return float(np.mean(hits))


# ---- report ----------------------------------------------------------------------------------
def report(result: dict, args, command: str, machine: str, timings: dict) -> str:
    recall, dense = result["recall"], result["recall"]["dense"]
    rows = []
    for method in methods_of(result):
        r = recall[method]
        rows.append([LABELS[method]] + [f"{r[k]:.3f}" for k in KS] + [f"{r[k] / dense[k]:.2f}x" if dense[k] else ""
                                                                         for k in KS])
    stats = result["pool_stats"]
    split_name = "test (held-out images)" if args.split == "test" else "validation (carved from training images)"
    pool_name = ("the other captions of those images" if args.pool == "heldout" else
                 "every caption of every chosen image, training images included, except the queries")
    lines = [
        (f"Split evaluated: **{split_name}**; {result['queries']:,} queries (one caption per image), pool of "
         f"{result['pool']:,} captions ({pool_name}), positives = the other captions of "
         f"the query's image. Training: {timings['train_images']:,} images, {timings['train_captions']:,} captions "
         f"as (caption -> another caption of the same image) pairs."),
        (f"Machine: {machine}. Load average (1 min) {timings['load_start']:.1f} at start, {timings['load_end']:.1f} "
         "at end (shared cores)."),
        f"Command: `{command}`",
        "",
        markdown_table(["method"] + [f"R@{k}" for k in KS] + [f"R@{k} / dense" for k in KS], rows),
        (f"IDs: L = {args.levels} levels (level 0 = text code 1 for every item, then {args.levels - 1} levels of "
         f"K = {args.codebook}); pool: {stats['distinct_ids']:,} distinct IDs for {stats['num_candidates']:,} "
         f"captions, collision rate {stats['collision_rate']:.3f}, largest bucket {stats['largest_bucket']}, codes used "
         f"per level {stats['codes_used_per_level']}. Beam search: {args.beams} beams, fp32; mean re-rank "
         f"set {result['rerank_set_mean']:.0f} captions (level head)"
         + (f"; diverse beams, sibling penalty {args.sibling_penalty:g}" if args.sibling_penalty else "") + "."),
        (f"Level head vs full-vocabulary normalisation (same model, decoded side by side): "
         f"{result['beam_search_qps']:.0f} vs {result['beam_search_qps_full_vocabulary']:.0f} queries/s "
         f"({result['beam_search_qps'] / result['beam_search_qps_full_vocabulary']:.2f}x); the top beam agrees for "
         f"{result['same_top_beam']:.3f} of the queries, the whole beam set for {result['same_beam_set']:.3f}."),
        *[(f"{p} decoder vs fp32 (level head, same model, decoded side by side): "
           f"{result[f'beam_search_qps_{p}']:.0f} vs {result['beam_search_qps']:.0f} queries/s "
           f"({result[f'beam_search_qps_{p}'] / result['beam_search_qps']:.2f}x); the top beam agrees for "
           f"{result[f'same_top_beam_{p}']:.3f} of the queries, the whole beam set for "
           f"{result[f'same_beam_set_{p}']:.3f}; R@5 GENIUS {result['recall'][f'genius_{p}'][5]:.3f} vs "
           f"{result['recall']['genius'][5]:.3f}, GENIUS^R {result['recall'][f'genius_r_{p}'][5]:.3f} vs "
           f"{result['recall']['genius_r'][5]:.3f}.") for p in LOW_PRECISIONS if f"beam_search_qps_{p}" in result],
        (f"Stage 1: Combiner proj {args.proj_dim} / hidden {args.hidden_dim}, {args.rq_objective} objective, "
         f"{args.rq_epochs} epochs, batch {args.rq_batch}, lr {args.rq_lr:g}. Stage 2: T5 decoder d_model "
         f"{args.d_model}, {args.layers} layers, {args.heads} heads, d_ff {args.d_ff}, P = {args.prefix}, "
         f"{args.gen_epochs} epochs, batch {args.gen_batch}, "
         f"lr {args.gen_lr:g}, query-target mixing {args.mixing}"
         + (f" (alpha {args.mix_alpha:g})" if args.mixing == "on" else "")
         + f", label smoothing {args.label_smoothing:g}"
         + (f", plus (caption -> itself) for the {timings['indexed_captions']:,} pool captions outside training "
            "(--index-pool on)" if args.index_pool == "on" else "")
         + ". Captions sharing an ID ranked in "
         f"{args.within_id_order} order. Other settings: the stages' defaults."),
        (f"Diagnostics: the query's own quantized ID holds a positive for {result['own_id_holds_positive']:.3f} of "
         f"the queries (quantizer alone, no generator); the top beam equals the query's own ID for "
         f"{result['top_beam_is_own_id']:.3f}."),
        (f"Wall time: encode {timings['encode_s']:.0f} s, stage 1 {timings['rq_s']:.0f} s, stage 2 {timings['gen_s']:.0f} s, "
         f"evaluation {timings['eval_s']:.0f} s, total {timings['total_s'] / 60:.1f} min (stages already up to date "
         "are skipped and take ~0 s)."),
        "",
        targets_line(recall, args.pool),
    ]
    return "\n".join(lines) + "\n"


# Issue 20's targets, as ratios to dense: (method, k, lowest ratio) per pool setting.
TARGETS = {"heldout": (("genius", 5, 0.8), ("genius", 1, 0.6), ("genius_r", 5, 0.99)),
           "full": (("genius", 5, 0.7), ("genius_r", 5, 0.95))}


def targets_line(recall: dict, pool: str) -> str:
    parts = []
    for method, k, target in TARGETS[pool]:
        ratio = recall[method][k] / recall["dense"][k] if recall["dense"][k] else 0.0
        parts.append(f"{LABELS[method].split(' (')[0]} R@{k} {ratio:.2f}x (target >= {target}x: "
                     f"{'met' if ratio >= target else 'NOT met'})")
    return ("Targets (ratio to dense; issue 20, on the test split): " + "; ".join(parts) +
            ". Paper, WebQA text-to-text R@5: GENIUS^R 0.51x, GENIUS 0.37x.")


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    from genius.common.io import atomic_path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    methods = methods_of(result)
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [result["recall"][method][k] for k in KS]
        ax.bar(np.arange(len(KS)) + i * width, values, width, label=LABELS[method])
    ax.set_xticks(np.arange(len(KS)) + width * (len(methods) - 1) / 2, [f"R@{k}" for k in KS])
    ax.set_ylim(0, 1)
    ax.set_ylabel("Recall (hit rate)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--pool", choices=("heldout", "full"), default="heldout",
                   help="heldout: the other captions of the evaluated images; full: every caption of every chosen "
                        "image except the queries")
    p.add_argument("--images", type=int, default=5000, help="images used (train + test)")
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--val-images", type=int, default=1000, help="with --split val: carved from the training images")
    ids = p.add_argument_group("IDs (stage 1)")
    # K = 256 and 100 beams: the best cell of the validation ablation (BENCHMARKS section 10); the
    # levels and generator epochs it chose depend on the pool (POOL_DEFAULTS)
    ids.add_argument("--levels", type=int, default=None,
                     help="ID length including the modality level (default: 4, or 5 with --pool full)")
    ids.add_argument("--codebook", type=int, default=256, help="K of every level after the first")
    ids.add_argument("--proj-dim", type=int, default=512)
    ids.add_argument("--hidden-dim", type=int, default=1024)
    ids.add_argument("--rq-epochs", type=int, default=10)
    ids.add_argument("--rq-batch", type=int, default=512)
    ids.add_argument("--rq-lr", type=float, default=5e-4)
    ids.add_argument("--kmeans-iters", type=int, default=300)
    ids.add_argument("--rq-objective", choices=("contrastive", "classification"), default="contrastive",
                     help="train-rq's train.objective: GENIUS's contrastive + MSE + commitment loss, or IRGen's "
                          "tokenizer loss over classes (here: the training images, whose captions are each "
                          "other's positives)")
    gen = p.add_argument_group("generator (stage 2)")
    gen.add_argument("--d-model", type=int, default=256)
    gen.add_argument("--layers", type=int, default=3)
    gen.add_argument("--heads", type=int, default=4)
    gen.add_argument("--d-ff", type=int, default=1024)
    gen.add_argument("--prefix", type=int, default=10)
    gen.add_argument("--gen-epochs", type=int, default=None, help="(default: 40, or 20 with --pool full)")
    gen.add_argument("--gen-batch", type=int, default=256)
    gen.add_argument("--gen-lr", type=float, default=5e-4)
    gen.add_argument("--mixing", choices=("on", "off"), default="on",
                     help="query-target mixing (train-gen mixing.enabled)")
    gen.add_argument("--mix-alpha", type=float, default=2.0, help="the mixing weights' Beta(alpha, alpha)")
    gen.add_argument("--label-smoothing", type=float, default=0.0, help="of the code-token cross-entropy")
    # on: the winner of both validation grids (BENCHMARKS section 10); the grids pin "off" for their earlier cells
    gen.add_argument("--index-pool", choices=("on", "off"), default="on",
                     help="also train the generator on (caption -> itself) for every pool caption outside the "
                          "training set, so it learns the IDs it must retrieve (DSI's indexing; no query is used)")
    p.add_argument("--within-id-order", choices=("pool", "centre"), default="pool",
                   help="order of the captions that share an ID in GENIUS's ranking: pool order (the paper), or "
                        "closest to the ID's reconstruction first (query-independent typicality)")
    p.add_argument("--beams", type=int, default=100)
    p.add_argument("--sibling-penalty", type=float, default=0.0,
                   help="diverse beams: the r-th best child of a beam competes with its score lowered by this x r "
                        "(eval's decoding.sibling_penalty); 0 is plain beam search")
    p.add_argument("--int8", choices=("on", "off"), default="off",
                   help="also decode with the int8 decoder (eval's decoding.int8; x86 CPUs), side by side with fp32 "
                        "from the same model: its recall rows, agreement and speed ratio")
    p.add_argument("--bf16", choices=("on", "off"), default="off",
                   help="also decode with bf16 weights (eval's decoding.autocast on a CPU with AVX512_BF16 or AMX), "
                        "side by side with fp32 from the same model: its recall rows, agreement and speed ratio")
    p.add_argument("--encode-batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=OUT_DIR / "coco_t2t")
    p.add_argument("--run-name", default=None,
                   help="subdirectory of the run (default: <split>_L<levels>_K<codebook>[_full_pool])")
    p.add_argument("--stages-dir", type=Path, default=None,
                   help="where the run's data, stores, quantizer, generator and codes go (default: the run "
                        "directory); runs whose flags differ only in EVAL_ONLY ones may share one")
    return p


# Flags that change stage 3 alone: runs that differ only in these can share trained stages.
EVAL_ONLY = ("beams", "sibling_penalty", "within_id_order", "int8", "bf16")


# Flags added after results were recorded, at the value those results were made with (what the
# ablation harness assumes for a result that lacks them); a later change of a default keeps these.
ADDED_LATER = {"index_pool": "off", "sibling_penalty": 0.0, "rq_objective": "contrastive", "int8": "off",
               "bf16": "off"}

# Level 0 is the modality code, so an ID needs at least one semantic level after it.
RANGES = {"images": ">= 2", "test_images": ">= 1", "val_images": ">= 1", "levels": ">= 2", "codebook": ">= 2",
          "proj_dim": ">= 1", "hidden_dim": ">= 1", "rq_epochs": ">= 1", "rq_batch": ">= 1", "rq_lr": "> 0",
          "kmeans_iters": ">= 1", "d_model": ">= 1", "layers": ">= 1", "heads": ">= 1", "d_ff": ">= 1",
          "prefix": ">= 1", "gen_epochs": ">= 1", "gen_batch": ">= 1", "gen_lr": "> 0", "mix_alpha": "> 0",
          "label_smoothing": "[0, 1)", "beams": ">= 1", "sibling_penalty": ">= 0",
          "encode_batch": ">= 1", "seed": ">= 0", "threads": ">= 1"}


# The defaults the validation grids chose per pool (BENCHMARKS section 10): the full pool, six times
# larger, wants one more level (collisions 0.16 -> 0.04); both want a longer-trained generator than
# the 10 epochs of the first rounds (the full pool's grid went to 20, the 4,002-caption one to 40).
POOL_DEFAULTS = {"heldout": {"levels": 4, "gen_epochs": 40}, "full": {"levels": 5, "gen_epochs": 20}}


def fill_pool_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the flags left unset given their value for ``--pool`` (POOL_DEFAULTS)."""
    for name, value in POOL_DEFAULTS[args.pool].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` (one line naming the flag and its range) for the first value out of range."""
    from genius.common.config_checks import check_number
    from genius.common.ranges import parse_range

    for name, spec in RANGES.items():
        value, bound = getattr(args, name), parse_range(spec)
        try:
            check_number(name, value, lo=bound.low, hi=bound.high, lo_open=bound.low_open, hi_open=bound.high_open)
        except ValueError:  # the config-key wording would not fit a flag: say it as the flag
            raise ValueError(f"--{name.replace('_', '-')} {value} is out of range: pass a value {spec}") from None
    if args.d_model % args.heads:
        raise ValueError(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    if args.int8 == "on":
        from genius.models.generative_retriever.fused_decoder import int8_decoding_problem

        problem = int8_decoding_problem(torch.device("cpu"))
        if problem:
            raise ValueError(f"--int8 on: {problem}")
    if args.bf16 == "on":
        from genius.models.generative_retriever.beam_search import cpu_has_bf16

        if not cpu_has_bf16():
            raise ValueError("--bf16 on: this CPU has no bf16 instructions (AVX512_BF16 or AMX), so bf16 decoding "
                             "would run emulated, slower than fp32: measure it on a CPU that has them")


def parse_args(argv: list[str] | None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    parser = parser or build_parser()
    args = fill_pool_defaults(parser.parse_args(argv))
    try:
        check_args(args)
    except ValueError as err:
        exit_user_error(parser, str(err))
    return args


def run_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """The run directory and the stem of the report files; both name the pool, so runs never share stages."""
    suffix = "" if args.pool == "heldout" else "_full_pool"
    run_dir = args.out_dir / (args.run_name or f"{args.split}_L{args.levels}_K{args.codebook}{suffix}")
    return run_dir, run_dir / "coco_t2t" if args.run_name else args.out_dir / f"coco_t2t_{args.split}{suffix}"


def main(argv: list[str] | None = None) -> int:
    from genius.common.stage import setup_logging, user_errors_exit

    setup_logging()
    parser = build_parser()
    args = parse_args(argv, parser)
    with user_errors_exit(parser):
        return run(args, argv)


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    from genius.common.io import atomic_path, atomic_write_json, atomic_write_text

    torch.set_num_threads(args.threads)
    command = ("bash benchmarks/run_coco_t2t.sh " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()
    machine, started = machine_description(), time.perf_counter()
    timings = {"load_start": load_average()}
    texts, image_ids = load_captions(args.captions)
    split = split_images(image_ids, args)
    t0 = time.perf_counter()
    vectors = encoded_captions(texts, split.encoded, args.out_dir / "cache", args.encode_batch)
    timings["encode_s"] = time.perf_counter() - t0
    run_dir, stem = run_paths(args)
    stages_dir = args.stages_dir or run_dir
    world = build_world(stages_dir, split, texts, vectors, args.seed, args.pool, args.index_pool == "on")
    timings.update(train_images=len(split.train), train_captions=sum(len(r) for r in split.train),
                   indexed_captions=len(world.indexed_rows))
    t0 = time.perf_counter()
    rq_path = train_quantizer(world, stages_dir, args)
    timings["rq_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen_path = train_generator(world, stages_dir, rq_path, args)
    timings["gen_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = evaluate(world, stages_dir, rq_path, gen_path, args)
    timings.update(eval_s=time.perf_counter() - t0, total_s=time.perf_counter() - started, load_end=load_average())
    text = report(result, args, command, machine, timings)
    atomic_write_text(stem.with_suffix(".md"), text)
    with atomic_path(stem.with_suffix(".csv")) as tmp:
        write_csv(tmp, [{"method": m, **{f"R@{k}": result["recall"][m][k] for k in KS},
                         **{f"R@{k}_vs_dense": result["recall"][m][k] / result["recall"]["dense"][k] for k in KS}}
                        for m in methods_of(result)],
                  ["method"] + [f"R@{k}" for k in KS] + [f"R@{k}_vs_dense" for k in KS])
    plot(result, stem.with_suffix(".png"), f"COCO captions text-to-text ({args.split}, {args.pool} pool), "
                                           f"L={args.levels}, K={args.codebook}")
    # Last, so that a JSON on disk means a finished run (the ablation harness relies on it).
    atomic_write_json(stem.with_suffix(".json"), {**result, "timings": timings, "args": vars(args)})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
