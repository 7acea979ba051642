"""Queries per second against pool size: GENIUS decoding, the official decoding, dense search, faiss.

Methods (all on the same machine, in one run, same random pool size N per row):

- ``genius`` / ``genius_bf16`` (a): the project's ``constrained_beam_search`` (KV cache, level
  head, one ``fill_mask`` + ``advance`` call of the C++ trie per step for all beams), then
  ID -> candidates (``CandidateMap.leaves_of`` + ``genius_ranking``, top 10); ``_bf16`` runs the
  decoder under bf16 autocast on CPU, ``_int8`` with the decoder's and the output head's
  products in int8 (``decoding.int8``; ``torch._int_mm``, CPUs). ``genius_device`` is (a) fp32 with the trie as tensors
  (``DeviceTrie``: the GPU-ready loop, no host round trip per step) on the CPU. ``genius_full`` is (a) with the full-vocabulary
  normalisation the paper settings use (``level_head=False``: all V rows of the output head
  scored at every step) instead of the level head (the level's K rows only).
- ``generate`` / ``generate_bf16`` (b): the official decoding: ``transformers`` ``generate``
  (num_beams = num_return_sequences = B, max_new_tokens = L, early_stopping, KV cache) with
  ``prefix_allowed_tokens_fn`` over a GENRE-style nested-dict trie keyed by token ids (recursive
  ``get`` from the root for every beam at every step, as the official ``beam.py`` does). Full
  vocabulary head, no ``torch.compile``; fp32, or bf16 autocast for a like-for-like comparison
  with ``genius_bf16``.
- ``dense_fp32`` / ``dense_bf16`` (c): exact inner product over N random unit vectors of the
  fused-embedding width, chunked matmul + running top-10. fp32 is the project's ``ExactIPIndex``;
  bf16 stores the vectors in bf16 and multiplies in bf16 (fp16 matmul on this CPU runs at a few
  GFLOP/s, so bf16 is the low-precision variant). Pools whose vectors do not fit the memory
  budget are scanned as a smaller block repeated to N rows ("tiled" in the note): the same
  FLOPs and memory traffic as N distinct rows, but not a meaningful retrieval result.
- ``faiss_flat`` / ``faiss_ivf`` (d): faiss IndexFlatIP, and IndexIVFFlat (inner product,
  nlist = sqrt(N), nprobe 16, trained on up to 64 x nlist vectors; random vectors have no
  cluster structure, so its recall here is not representative, only its speed).

The generator is paper-shaped (t5-small decoder, P prefix vectors, L levels of K codes, 50
beams) with random weights: the work per query does not depend on the weights. Pool IDs are
random (level 0 in {0, 1, 2}, the others uniform in [0, K)).

Outputs in ``--out-dir``: decode_vs_pool.csv (one row per method and size), .md (the table,
ratios to GENIUS fp32 of the same run, decoding GFLOP/s against this machine's GEMM GFLOP/s,
target checks), .png (q/s against pool size, log-log), _summary.json.

    bash benchmarks/run_decode_vs_pool.sh [--sizes 1e3 1e4 1e5 1e6 1e7] [--methods ...]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from genius.benchmarks.common import (
    OUT_DIR,
    available_memory_gb,
    best_seconds,
    gemm_gflops,
    int8_gemm_gops,
    load_average,
    machine_description,
    markdown_table,
    plot_lines,
    random_ids,
    rate,
    read_csv,
    write_csv,
)
from genius.common.cpu import fp32_products_in_onednn, onednn_fp32_on
from genius.models.generative_retriever.beam_search import cpu_has_bf16
from genius.models.generative_retriever.fused_decoder import (
    bf16_gemm_fp32_out,
    bf16_head_on,
    cross_attention_absorbed,
    int8_decoding_problem,
)

METHODS = ("genius", "genius_bf16", "genius_int8", "genius_device", "genius_full", "generate", "generate_bf16",
           "dense_fp32", "dense_bf16", "faiss_flat", "faiss_ivf")
DECODING = ("genius", "genius_bf16", "genius_int8", "genius_device", "genius_full", "generate", "generate_bf16")
BF16 = ("genius_bf16", "generate_bf16", "dense_bf16")
LABELS = {
    "genius": "(a) GENIUS fp32", "genius_bf16": "(a) GENIUS bf16 autocast", "genius_int8": "(a) GENIUS int8 decoder",
    "genius_device": "(a) GENIUS fp32, device trie",
    "genius_full": "(a) GENIUS fp32, full-vocabulary normalisation", "generate": "(b) generate + dict trie fp32",
    "generate_bf16": "(b) generate + dict trie bf16 autocast",
    "dense_fp32": "(c) dense fp32", "dense_bf16": "(c) dense bf16", "faiss_flat": "(d) faiss Flat",
    "faiss_ivf": "(d) faiss IVF",
}
COLUMNS = ["method", "pool_size", "distinct_ids", "queries", "batch", "seconds", "qps", "ratio_to_genius",
           "build_s", "load1", "note"]
TOP_K = 10
DENSE_CHUNK = 65536


# ---- the generator and the pool ------------------------------------------------------------
def generator_arch(args) -> dict:
    from genius.models.generative_retriever.generator import make_arch

    return make_arch(args.dim, codebook_sizes(args), args.prefix, d_model=args.d_model, num_heads=args.heads,
                     d_kv=args.d_model // args.heads, d_ff=args.d_ff, num_decoder_layers=args.layers)


def build_generator(args):
    from genius.models.generative_retriever.generator import IDGenerator

    return IDGenerator(generator_arch(args)).eval()


def codebook_sizes(args) -> list[int]:
    return [3] + [args.codebook] * (args.levels - 1)


def decoder_flops_per_query(arch: dict, num_beams: int, level_head: bool = True,
                            absorbed: Callable[[int], bool] | None = None) -> float:
    """Multiply-adds x 2 of the project's constrained beam search for one query: the model's work,
    or with ``absorbed`` (rows per query -> whether a step with that many runs its cross-attention
    absorbed) what the fp32 decoder executes.

    Per query, once: prefix projection 2*dim*P*d and, per layer, cross-attention keys and values
    of the P prefix vectors 2 * 2*P*d*I (I = heads * d_kv). Then per decoding step l, for each of
    the r_l live beam rows (r_0 = 1, r_l = min(B, r_{l-1} * K_{l-1})), with t = l + 1 cached
    positions, per layer:
      self-attention q, k, v, o projections  4 * 2*d*I
      self-attention scores and mix          2 * 2*I*t
      cross-attention q, o projections       2 * 2*d*I
      cross-attention scores and mix         2 * 2*I*P
      feed-forward                           2 * 2*d*d_ff
    plus the output head 2*d*K_l (level head; 2*d*V with the full vocabulary).
    Norms, softmaxes, top-k and the trie are not counted. Absorbed (``FusedDecoder._absorb``), the
    cross-attention's q, o, scores and mix are 2 * 2*d*H*P per row and layer (H heads), after
    2 * 2*P*I*d per query and layer to absorb W_q and W_o into the keys and values (done once
    when the search's widest step, ``num_beams`` rows, runs absorbed).
    """
    d, layers, prefix, d_ff = arch["d_model"], arch["num_decoder_layers"], arch["num_prefix"], arch["d_ff"]
    inner = arch["num_heads"] * arch["d_kv"]
    sizes = arch["codebook_sizes"]
    vocab = 3 + sum(sizes)
    total = 2 * arch["dim"] * prefix * d + layers * 2 * 2 * prefix * d * inner
    absorbed = absorbed or (lambda rows: False)
    if absorbed(num_beams):
        total += layers * 2 * 2 * prefix * inner * d
    rows = 1
    for level, width in enumerate(sizes):
        t = level + 1
        if absorbed(rows):
            cross = 2 * 2 * d * arch["num_heads"] * prefix
        else:
            cross = 2 * 2 * d * inner + 2 * 2 * inner * prefix
        per_layer = 4 * 2 * d * inner + 2 * 2 * inner * t + cross + 2 * 2 * d * d_ff
        head = 2 * d * (width if level_head else vocab)
        total += rows * (layers * per_layer + head)
        rows = min(num_beams, rows * width)
    return float(total)


@dataclass
class Pool:
    size: int
    codes: np.ndarray
    trie: object
    cmap: object
    build_s: float
    device_trie: object = None  # the trie as tensors, built when a method asks for it


def build_pool(size: int, sizes: list[int], seed: int) -> Pool:
    from genius.models.generative_retriever.retrieval import CandidateMap
    from genius.trie_cpp import build_trie

    codes = random_ids(size, sizes, seed)
    start = time.perf_counter()
    trie = build_trie(codes, "cpp")
    build_s = time.perf_counter() - start
    return Pool(size, codes, trie, CandidateMap.build(trie, codes), build_s)


def query_vectors(count: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(count, dim, generator=generator), dim=-1)


# ---- (a) GENIUS --------------------------------------------------------------------------
def genius_retriever(generator, pool: Pool, args, autocast: bool, level_head: bool = True, on_device: bool = False,
                     int8: bool = False):
    """A function queries -> (beams, top-10 ranking): beam search, then ID -> candidates.

    ``level_head`` False scores and normalises over the whole vocabulary at every step (the
    official decoding's normalisation, what the paper settings use). ``on_device``: search with
    the pool's ``DeviceTrie`` instead of the C++ trie."""
    from genius.models.generative_retriever.beam_search import constrained_beam_search, prepare_decoder
    from genius.models.generative_retriever.device_trie import DeviceTrie
    from genius.models.generative_retriever.retrieval import genius_ranking

    if on_device and pool.device_trie is None:
        pool.device_trie = DeviceTrie.from_trie(pool.trie, generator.codebook_sizes)
    trie = pool.device_trie if on_device else pool.trie
    decoder = prepare_decoder(generator, torch.device("cpu"), autocast, int8)  # prepared once, as evaluation does

    def retrieve(queries: torch.Tensor):
        beams = constrained_beam_search(generator, queries, trie, generator.codebook_sizes, num_beams=args.beams,
                                        batch_size=args.genius_batch, autocast=autocast, level_head=level_head,
                                        int8=int8, decoder=decoder)
        leaves = pool.cmap.leaves_of(beams.codes.numpy())
        leaves[~beams.valid.numpy()] = -1
        return beams, genius_ranking(pool.cmap, leaves, beams.scores.numpy(), TOP_K)

    return retrieve


def measure_genius(generator, pools: dict[int, Pool], z: torch.Tensor, args, methods: list[str],
                   gemm: dict[str, list[float]]) -> dict:
    """{(method, size): result}, the repeats interleaved over sizes and methods.

    Each repeat times every (method, size) once, so slow spells of the shared machine fall on
    all pool sizes alike instead of on whichever size happened to run then; the fastest repeat
    of each pair is kept. Every other repeat runs the pairs in reverse order, so that no pair
    always runs last before the GEMM sample (one run had its largest pool, always run
    last, slow in all five repeats). The GEMM peak is sampled after every repeat (into
    ``gemm``), so the decoder's GFLOP/s is compared with a peak measured under the same
    conditions.
    """
    runs = {(m, n): genius_retriever(generator, pool, args, m == "genius_bf16", level_head=m != "genius_full",
                                     on_device=m == "genius_device", int8=m == "genius_int8")
            for n, pool in pools.items()
            for m in methods}
    for (method, size), retrieve in runs.items():  # warm-up, and a sanity check of the output
        beams, ranking = retrieve(z[: args.genius_batch])
        expected = min(args.beams, len(pools[size].trie))
        if not bool(beams.valid[:, :expected].all()) or not (ranking.rows[:, 0] >= 0).all():
            raise AssertionError(f"{method} at N={size} returned fewer than {expected} valid beams")
    best = {key: math.inf for key in runs}
    loads = {key: [] for key in runs}
    pairs = list(runs.items())
    for repeat in range(max(1, args.genius_repeats)):
        for key, retrieve in pairs[::-1] if repeat % 2 else pairs:
            start = time.perf_counter()
            retrieve(z)
            best[key] = min(best[key], time.perf_counter() - start)
            loads[key].append(load_average())
        sample_gemm(gemm, args)
        print(f"# GENIUS repeat {repeat + 1}/{args.genius_repeats}: "
              + ", ".join(f"{m}@{n:.0e} {len(z) / best[(m, n)]:.2f} q/s" for m, n in runs), flush=True)
    return {key: {"seconds": best[key], "queries": len(z), "batch": args.genius_batch,
                  "build_s": pools[key[1]].build_s, "load1": float(np.mean(loads[key]))} for key in runs}


# ---- (b) generate + nested-dict trie ---------------------------------------------------------
def nested_dict_trie(tokens: np.ndarray) -> dict:
    """GENRE-style trie: token id -> dict of the next tokens (no BOS, no EOS), as the official builds it."""
    root: dict = {}
    for sequence in tokens.tolist():
        node = root
        for token in sequence:
            node = node.setdefault(token, {})
    return root


def dict_trie_get(prefix: list[int], node: dict) -> list[int]:
    """The official (GENRE) lookup: walk the prefix from the root, recursively; [] if it is absent."""
    if not prefix:
        return list(node.keys())
    child = node.get(prefix[0])
    return [] if child is None else dict_trie_get(prefix[1:], child)


def measure_generate(generator, tokens_trie: dict, z: torch.Tensor, args, autocast: bool) -> dict:
    from transformers.modeling_outputs import BaseModelOutput

    def allowed(batch_id: int, sentence: torch.Tensor) -> list[int]:
        return dict_trie_get(sentence.tolist()[1:], tokens_trie)  # drop the decoder start token

    @torch.inference_mode()
    @torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    def run(queries: torch.Tensor):
        for batch in queries.split(args.generate_batch):
            generator.t5.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=generator.encode(batch)), num_beams=args.beams,
                num_return_sequences=args.beams, max_new_tokens=generator.num_levels, do_sample=False,
                early_stopping=True, prefix_allowed_tokens_fn=allowed)

    # fp32 products in the search's library (oneDNN on AMD CPUs with AVX-512), or torch's default (MKL)
    search_library = args.generate_products == "search"
    with fp32_products_in_onednn(torch.device("cpu")) if search_library else contextlib.nullcontext():
        run(z[:1])  # warm-up
        seconds = best_seconds(lambda: run(z), args.generate_repeats, warmup=0)
    return {"seconds": seconds, "queries": len(z), "batch": args.generate_batch, "load1": load_average()}


# ---- (c) dense exact search ----------------------------------------------------------------
class TiledRows:
    """``num_rows`` rows served by repeating ``block`` (for pools whose vectors do not fit in RAM).

    Offers what ``ExactIPIndex`` reads: ``shape``, ``len`` and row slices.
    """

    def __init__(self, block, num_rows: int):
        self.block, self.num_rows = block, num_rows
        self.shape = (num_rows, block.shape[1])

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, key: slice):
        start, stop, _ = key.indices(self.num_rows)
        pieces, size = [], len(self.block)
        while start < stop:
            offset = start % size
            take = min(stop - start, size - offset)
            pieces.append(self.block[offset : offset + take])
            start += take
        if not pieces:
            return self.block[:0]
        if len(pieces) == 1:
            return pieces[0]
        return torch.cat(pieces) if isinstance(self.block, torch.Tensor) else np.concatenate(pieces)


def random_unit_block(rows: int, dim: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[rows, dim] random unit vectors in ``dtype``, made in chunks so no full-size fp32 copy exists."""
    out = torch.empty(rows, dim, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, rows, DENSE_CHUNK):
        stop = min(start + DENSE_CHUNK, rows)
        out[start:stop] = F.normalize(torch.randn(stop - start, dim, generator=generator), dim=-1)
    return out


def dense_rows_in_memory(num_rows: int, bytes_per_value: int, args) -> int:
    """How many distinct rows to hold: all of them, or a chunk-aligned block within the budget."""
    fit = int(args.dense_memory_gb * 1024**3 // (args.dim * bytes_per_value))
    return num_rows if num_rows <= fit else min(num_rows, max(DENSE_CHUNK, fit // DENSE_CHUNK * DENSE_CHUNK))


def measure_search(search, queries: np.ndarray, batch: int, repeats: int) -> float:
    def run():
        for start in range(0, len(queries), batch):
            search(queries[start : start + batch])

    search(queries[:batch])  # warm-up
    return best_seconds(run, repeats, warmup=0)


def bf16_search(vectors, queries: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner product with bf16 storage and bf16 matmul (fp32 running top-k)."""
    q = torch.from_numpy(queries).to(torch.bfloat16)
    best_scores = torch.full((len(q), k), -torch.inf)
    best_rows = torch.full((len(q), k), -1, dtype=torch.long)
    for start in range(0, len(vectors), DENSE_CHUNK):
        scores = (q @ vectors[start : start + DENSE_CHUNK].T).float()
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        merged = torch.cat([best_scores, top.values], dim=1).topk(k, dim=1)
        best_rows = torch.cat([best_rows, top.indices + start], dim=1).gather(1, merged.indices)
        best_scores = merged.values
    return best_scores, best_rows


def dense_search(block, size: int):
    """A function queries -> top-10 over ``size`` rows of ``block`` (tiled when smaller): the
    project's ``ExactIPIndex`` for fp32 numpy blocks, ``bf16_search`` for bf16 tensors."""
    from genius.models.generative_retriever.retrieval import ExactIPIndex

    vectors = block if len(block) == size else TiledRows(block, size)
    if isinstance(block, np.ndarray):
        index = ExactIPIndex(vectors, chunk_size=DENSE_CHUNK)
        return lambda queries: index.search(queries, TOP_K)
    return lambda queries: bf16_search(vectors, queries, TOP_K)


def measure_dense(size: int, queries: np.ndarray, args, methods: list[str]) -> dict[str, dict]:
    out = {}
    for method, dtype in (("dense_fp32", torch.float32), ("dense_bf16", torch.bfloat16)):
        if method not in methods:
            continue
        itemsize = torch.finfo(dtype).bits // 8
        rows = dense_rows_in_memory(size, itemsize, args)
        block = random_unit_block(rows, args.dim, args.seed + 1, dtype)
        if dtype == torch.float32:  # numpy: the project's dense baseline, as evaluation runs it
            block = block.numpy()
        seconds = measure_search(dense_search(block, size), queries, args.dense_batch, args.repeats)
        note = "" if rows == size else (f"tiled: a {rows:,}-row block scanned as {size:,} rows "
                                        f"({size * args.dim * itemsize / 1024**3:.1f} GB > {args.dense_memory_gb:.1f} GB budget)")
        out[method] = {"seconds": seconds, "queries": len(queries), "batch": args.dense_batch, "note": note,
                       "load1": load_average()}
        del block
        gc.collect()
    return out


# ---- (d) faiss -----------------------------------------------------------------------------
def measure_faiss(size: int, queries: np.ndarray, args, methods: list[str]) -> dict[str, dict]:
    try:
        import faiss
    except ImportError:
        return {m: {"note": "skipped: faiss is not installed"} for m in methods}
    faiss.omp_set_num_threads(args.threads)
    needed_gb = size * args.dim * 4 / 1024**3
    if needed_gb > args.dense_memory_gb:
        return {m: {"note": f"skipped: needs {needed_gb:.0f} GB of fp32 vectors > {args.dense_memory_gb:.0f} GB budget"}
                for m in methods}
    vectors = random_unit_block(size, args.dim, args.seed + 1).numpy()
    out = {}
    for method in methods:
        start = time.perf_counter()
        index, note = faiss_index(method, vectors, args)
        build_s = time.perf_counter() - start
        seconds = measure_search(partial(index.search, k=TOP_K), queries, args.dense_batch, args.repeats)
        out[method] = {"seconds": seconds, "queries": len(queries), "batch": args.dense_batch, "build_s": build_s,
                       "note": note, "load1": load_average()}
        del index
        gc.collect()
    return out


def faiss_index(method: str, vectors: np.ndarray, args):
    """(index, note) for ``faiss_flat`` or ``faiss_ivf`` over ``vectors``."""
    import faiss

    dim = vectors.shape[1]
    if method == "faiss_flat":
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, ""
    nlist = max(1, round(math.sqrt(len(vectors))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(args.seed).choice(len(vectors), min(len(vectors), 64 * nlist), replace=False)
    index.train(vectors[np.sort(sample)])
    for start in range(0, len(vectors), DENSE_CHUNK):
        index.add(vectors[start : start + DENSE_CHUNK])
    index.nprobe = min(args.ivf_nprobe, nlist)
    return index, f"nlist {nlist}, nprobe {index.nprobe}"


# ---- the run ---------------------------------------------------------------------------------
def sample_gemm(gemm: dict[str, list[float]], args) -> None:
    """One sample into ``gemm`` of each square GEMM peak (``--gemm-n``) and of the fp32 and bf16
    step products' rates (``step_products_gflops``), the ceilings of those decoders at these shapes."""
    n = args.gemm_n
    gemm.setdefault("fp32", []).append(gemm_gflops(torch.float32, n))
    gemm.setdefault("fp32_step", []).append(step_products_gflops(args))
    if cpu_has_bf16():  # emulated bf16 GEMMs are slower than fp32 (on AVX2 ~1 GFLOP/s: minutes a sample)
        gemm.setdefault("bf16", []).append(gemm_gflops(torch.bfloat16, n))
        gemm.setdefault("bf16_step", []).append(step_products_gflops(args, torch.bfloat16))
    if int8_decoding_problem(torch.device("cpu")) is None:
        gemm.setdefault("int8", []).append(int8_gemm_gops(n))


def step_products_gflops(args, dtype: torch.dtype = torch.float32, repeats: int = 3) -> float:
    """GFLOP/s of one decoder step's products run alone, back to back, at the search's widest step
    (``--genius-batch`` x ``--beams`` rows): per layer q, k, v and o [rows, d_model] x [d_model,
    d_model] and the feed-forward's two, each layer with its own weights, in ``dtype``, then the
    level head [rows, d_model] x [d_model, K] with fp32 logits, as the decoder scores the level: fp32,
    or in bf16 with fp32 sums where a bf16 decoder does (:func:`bf16_head_on`); ``torch.mm`` into
    kept buffers, as the fused decoder runs them. A decoder's share of this rate is how close it
    comes to what its own GEMMs reach at these shapes on this machine; its share of the square
    GEMM's rate also counts the lower efficiency of these shapes (and of the head)."""
    rows, d, d_ff = args.genius_batch * args.beams, args.d_model, args.d_ff
    shapes = ([(d, d)] * 4 + [(d, d_ff), (d_ff, d)]) * args.layers + [(d, args.codebook)]  # (in, out)
    head_in_bf16 = dtype == torch.bfloat16 and bf16_head_on(torch.device("cpu"))
    dtypes = [dtype] * (len(shapes) - 1) + [torch.bfloat16 if head_in_bf16 else torch.float32]
    generator = torch.Generator().manual_seed(args.seed)
    inputs = {(width, t): torch.randn(rows, width, generator=generator).to(t)
              for width, t in sorted({(width, t) for (width, _), t in zip(shapes, dtypes)}, key=str)}
    weights = [torch.randn(out, width, generator=generator).to(t) for (width, out), t in zip(shapes, dtypes)]
    outputs = {(out, t): torch.empty(rows, out, dtype=t) for (_, out), t in zip(shapes[:-1], dtypes)}
    head_out = torch.empty(rows, args.codebook)

    def step():
        for (width, out), weight in zip(shapes[:-1], weights):
            torch.mm(inputs[width, weight.dtype], weight.t(), out=outputs[out, weight.dtype])
        head = inputs[shapes[-1][0], dtypes[-1]]
        if head_in_bf16:
            bf16_gemm_fp32_out(head, weights[-1], head_out)
        else:
            torch.mm(head, weights[-1].t(), out=head_out)

    flops = sum(2 * rows * width * out for width, out in shapes)
    with fp32_products_in_onednn(torch.device("cpu")):  # the fp32 products in the library the search uses
        return flops / best_seconds(step, repeats) / 1e9


def run(args, gemm: dict[str, list[float]]) -> list[dict]:
    methods, sizes = list(args.methods), sorted(int(s) for s in args.sizes)
    if not cpu_has_bf16():
        skipped = [m for m in methods if m in BF16]
        methods = [m for m in methods if m not in BF16]
        if skipped:
            print(f"# skipped {', '.join(skipped)}: this CPU has no bf16 instructions (AVX512_BF16 or AMX); bf16 "
                  "would run emulated, slower than fp32", flush=True)
    problem = int8_decoding_problem(torch.device("cpu"))
    if problem and "genius_int8" in methods:
        methods.remove("genius_int8")
        print(f"# skipped genius_int8: {problem}", flush=True)
    results: dict[tuple[str, int], dict] = {}
    distinct: dict[int, int] = {}
    if any(m in methods for m in DECODING):
        generator = build_generator(args)
        pools = {size: build_pool(size, generator.codebook_sizes, args.seed) for size in sizes}
        distinct = {size: len(pool.trie) for size, pool in pools.items()}
        z = query_vectors(max(args.genius_queries, args.generate_queries), args.dim, args.seed)
        genius = [m for m in ("genius", "genius_bf16", "genius_int8", "genius_device", "genius_full") if m in methods]
        if genius:
            results.update(measure_genius(generator, pools, z[: args.genius_queries], args, genius, gemm))
        for size, pool in pools.items():
            for method in ("generate", "generate_bf16"):
                if method in methods:
                    results[(method, size)] = generate_result(generator, pool, z[: args.generate_queries], args,
                                                              method == "generate_bf16")
                    print(f"# {method} N={size:,}: {results[(method, size)]}", flush=True)
        del pools, generator
        gc.collect()
    dense_queries = query_vectors(args.dense_queries, args.dim, args.seed + 7).numpy()
    for size in sizes:
        dense = [m for m in ("dense_fp32", "dense_bf16") if m in methods]
        faiss_methods = [m for m in ("faiss_flat", "faiss_ivf") if m in methods]
        found = {**(measure_dense(size, dense_queries, args, dense) if dense else {}),
                 **(measure_faiss(size, dense_queries, args, faiss_methods) if faiss_methods else {})}
        results.update({(m, size): r for m, r in found.items()})
        print(f"# dense/faiss N={size:,}: {found}", flush=True)
        gc.collect()
    return [row for size in sizes for row in size_rows(size, distinct.get(size, ""), results, methods)]


def generate_result(generator, pool: Pool, z: torch.Tensor, args, autocast: bool) -> dict:
    if pool.size > args.generate_max_ids:
        return {"note": f"skipped: a nested-dict trie of {pool.size:,} IDs exceeds --generate-max-ids "
                        f"{args.generate_max_ids:,.0f} (memory)"}
    from genius.models.generative_retriever.vocab import code_offsets

    start = time.perf_counter()
    trie = nested_dict_trie(pool.codes + np.asarray(code_offsets(generator.codebook_sizes)))
    build_s = time.perf_counter() - start
    result = {**measure_generate(generator, trie, z, args, autocast), "build_s": build_s}
    del trie
    gc.collect()
    return result


def size_rows(size: int, distinct, results: dict[tuple[str, int], dict], methods: list[str]) -> list[dict]:
    reference = results.get(("genius", size), {})
    ref_qps = reference["queries"] / reference["seconds"] if "seconds" in reference else None
    rows = []
    for method in methods:
        r = results.get((method, size))
        if r is None:
            continue
        row = {"method": method, "pool_size": size, "distinct_ids": distinct, "load1": round(r.get("load1", load_average()), 2),
               "note": r.get("note", ""), "build_s": r.get("build_s", ""), "queries": r.get("queries", ""),
               "batch": r.get("batch", "")}
        if "seconds" in r:
            qps = r["queries"] / r["seconds"]
            row.update(seconds=round(r["seconds"], 4), qps=qps, ratio_to_genius=qps / ref_qps if ref_qps else "")
        rows.append(row)
    return rows


# ---- summary: GFLOP/s, targets -------------------------------------------------------------
# Each decoding's GFLOP/s is compared with the peak of the GEMMs it runs (int8: operations/s).
PEAKS = (("genius", "fp32"), ("genius_bf16", "bf16"), ("genius_int8", "int8"), ("genius_device", "fp32"),
         ("genius_full", "fp32"), ("generate", "fp32"), ("generate_bf16", "bf16"))
def qps_by_size(rows: list[dict], method: str) -> dict[int, float]:
    return {int(r["pool_size"]): float(r["qps"]) for r in rows if r["method"] == method and r.get("qps") not in ("", None)}


def crossover(dense: dict[int, float], genius: dict[int, float]) -> tuple[int | None, str]:
    """First measured pool size where dense search is slower than GENIUS, and where in between it crosses.

    Past a few thousand vectors exact search is a linear scan, so its q/s falls as 1/N; the
    crossing is estimated from the last size where dense was still faster.
    """
    common = sorted(set(dense) & set(genius))
    if not common:
        return None, "not measured"
    faster = [n for n in common if dense[n] >= genius[n]]
    slower = [n for n in common if dense[n] < genius[n]]
    if slower and slower[0] == common[0]:
        return slower[0], f"dense is already slower at the smallest size, N = {slower[0]:,}"
    last = faster[-1] if not slower else max(n for n in faster if n < slower[0])
    estimate = last * dense[last] / genius[last]
    if slower:
        return slower[0], (f"dense is slower from N = {slower[0]:,} on; crossing at N ~ {estimate:.2g} "
                           f"(1/N from N = {last:,})")
    return None, f"not reached up to N = {last:,}; extrapolated (dense q/s ~ 1/N) at N ~ {estimate:.2g}"


def generate_flops_per_query(arch: dict, num_beams: int) -> float:
    """The same count for ``generate``: all B beams run from the first step (B - 1 start as copies),
    the encoder output is expanded per beam (cross-attention keys/values computed B times), and
    the head scores the full vocabulary V at every step."""
    d, layers, prefix, d_ff = arch["d_model"], arch["num_decoder_layers"], arch["num_prefix"], arch["d_ff"]
    inner = arch["num_heads"] * arch["d_kv"]
    vocab = 3 + sum(arch["codebook_sizes"])
    total = 2 * arch["dim"] * prefix * d + num_beams * layers * 2 * 2 * prefix * d * inner
    for level in range(len(arch["codebook_sizes"])):
        t = level + 1
        per_layer = 4 * 2 * d * inner + 2 * 2 * inner * t + 2 * 2 * d * inner + 2 * 2 * inner * prefix + 2 * 2 * d * d_ff
        total += num_beams * (layers * per_layer + 2 * d * vocab)
    return float(total)


def summarise(rows: list[dict], args, gemm: dict) -> dict:
    arch = generator_arch(args)
    flops = {"genius": decoder_flops_per_query(arch, args.beams), "generate": generate_flops_per_query(arch, args.beams),
             "genius_full": decoder_flops_per_query(arch, args.beams, level_head=False)}
    flops["genius_device"] = flops["genius_int8"] = flops["genius"]
    # what the fp32 decoders execute: fewer operations where the cross-attention is absorbed
    absorbed = partial(cross_attention_absorbed, args.prefix, args.d_model // args.heads, torch.float32, False)
    executed = {"genius": decoder_flops_per_query(arch, args.beams, absorbed=absorbed),
                "genius_full": decoder_flops_per_query(arch, args.beams, level_head=False, absorbed=absorbed)}
    executed["genius_device"] = executed["genius"]
    summary = {"gemm_gflops": gemm, "decoder_gflop_per_query": flops["genius"] / 1e9,
               "decoder_executed_gflop_per_query": executed["genius"] / 1e9,
               "generate_gflop_per_query": flops["generate"] / 1e9, "targets": {}}
    for method, peak in PEAKS:
        qps = qps_by_size(rows, method)
        if peak not in gemm:
            continue
        if not qps:
            continue
        best = max(qps.values()) * flops[method.removesuffix("_bf16")] / 1e9
        summary[f"{method}_gflops"] = best
        summary[f"{method}_share_of_gemm"] = best / gemm[peak]
        if method in executed:
            summary[f"{method}_executed_share_of_gemm"] = max(qps.values()) * executed[method] / 1e9 / gemm[peak]
        step = "bf16_step" if method == "genius_bf16" else "fp32_step"
        if method in ("genius", "genius_device", "genius_bf16") and step in gemm:  # the level head's shapes
            summary[f"{method}_share_of_step_products"] = best / gemm[step]
        flat = {n: q for n, q in qps.items() if n <= 10**6}
        if method.startswith("genius") and len(flat) > 1:
            variation = max(flat.values()) / min(flat.values()) - 1
            summary["targets"][f"{method}_flat_1e3_1e6"] = {
                "variation": variation, "met": variation <= 0.15,
                "rule": "max/min - 1 of q/s over pool sizes 1e3..1e6 <= 15%"}
    for fast, slow in (("genius", "generate"), ("genius_bf16", "generate_bf16"), ("genius_bf16", "generate"),
                       ("genius_int8", "generate")):
        fast_qps, slow_qps = qps_by_size(rows, fast), qps_by_size(rows, slow)
        both = sorted(set(fast_qps) & set(slow_qps))
        if both:
            speedups = {n: fast_qps[n] / slow_qps[n] for n in both}
            summary["targets"][f"speedup_{fast}_vs_{slow}"] = {
                "min": min(speedups.values()), "per_size": speedups, "met": min(speedups.values()) >= 10,
                "rule": f"{LABELS[fast]} q/s / {LABELS[slow]} q/s >= 10 at {args.beams} beams, every pool size"}
    for dense_method, genius_method in (("dense_fp32", "genius"), ("dense_bf16", "genius_bf16"),
                                        ("dense_fp32", "genius_bf16"), ("faiss_flat", "genius"),
                                        ("faiss_flat", "genius_bf16")):
        size, text = crossover(qps_by_size(rows, dense_method), qps_by_size(rows, genius_method))
        summary["targets"][f"crossover_{dense_method}_vs_{genius_method}"] = {
            "size": size, "text": text, "met": size is not None and size <= 10**6,
            "rule": "dense q/s < GENIUS q/s at some pool size <= 1e6"}
    return summary


# ---- report ----------------------------------------------------------------------------------
# where generate's fp32 products run (--generate-products)
GENERATE_PRODUCTS = {"search": "in the library GENIUS's search uses (oneDNN on AMD CPUs with AVX-512)",
                     "default": "torch's default (MKL on x86)"}
# how the bf16 decoder's level head multiplies, by whether this torch has MKL's bf16 GEMM
BF16_HEAD = {True: "bf16 with fp32 sums, MKL", False: "fp32"}


def markdown(rows: list[dict], summary: dict, args, command: str, machine: str, loads: tuple[float, float]) -> str:
    methods = [m for m in args.methods if any(r["method"] == m for r in rows)]
    sizes = sorted({int(r["pool_size"]) for r in rows})
    by_key = {(r["method"], int(r["pool_size"])): r for r in rows}

    def cell(method: str, size: int) -> str:
        r = by_key.get((method, size))
        if r is None:
            return ""
        if r.get("qps") in ("", None):
            return "skipped"
        ratio = r.get("ratio_to_genius")
        text = rate(float(r["qps"]))
        if method != "genius" and ratio not in ("", None):
            text += f" ({float(ratio):.3g}x)"
        text += " †" if str(r.get("note", "")).startswith("tiled") else ""
        return text + f" @{float(r['load1']):.1f}"

    table_rows = [[f"{size:,}"] + [cell(m, size) for m in methods] for size in sizes]
    gemm = summary["gemm_gflops"]
    lines = [
        (f"Machine: {machine}. Load average (1 min) {loads[0]:.1f} at start, {loads[1]:.1f} at end; the cores are "
         "shared with other engineers, so each number is the fastest of the repeats."),
        f"Command: `{command}`",
        "",
        (f"Generator: t5 decoder d_model {args.d_model}, {args.layers} layers, {args.heads} heads, d_ff {args.d_ff}, "
         f"P = {args.prefix} prefix vectors, L = {args.levels} levels (3, then {args.codebook} codes), vocabulary "
         f"{3 + 3 + (args.levels - 1) * args.codebook:,}, {args.beams} beams, random weights. Queries: GENIUS "
         f"{args.genius_queries} (batches of {args.genius_batch}), generate {args.generate_queries} (batches of "
         f"{args.generate_batch}; fewer because it is slow; best of {args.generate_repeats} timed runs after a "
         f"1-query warm-up; its fp32 products {GENERATE_PRODUCTS[args.generate_products]}), dense/faiss "
         f"{args.dense_queries} (batches of {args.dense_batch}), {args.dim}-d, "
         f"top {TOP_K}. Dense/faiss: best of {args.repeats} repeats; GENIUS: best of {args.genius_repeats} repeats "
         "interleaved over all pool sizes."),
        "",
        ("Queries per second (ratio to (a) GENIUS fp32 of the same pool size in brackets; @ = load average during "
         "the measurement; † = tiled, see notes):"),
        "",
        markdown_table(["pool size"] + [LABELS[m] for m in methods], table_rows),
        (f"GEMM peak measured in this run (torch.matmul {args.gemm_n}^2, best of the samples taken at the start, after each "
         f"GENIUS repeat and at the end): fp32 {gemm['fp32']:.0f} GFLOP/s"
         + (" (the faster of MKL and oneDNN)" if onednn_fp32_on() else "") + ", "
         + (f"bf16 {gemm['bf16']:.0f} GFLOP/s" if "bf16" in gemm else "bf16 not measured (no bf16 instructions)")
         + (f", int8 {gemm['int8']:.0f} GOP/s (torch._int_mm)"
            if "int8" in gemm else "")
         + (f"; the fp32 decoder step's own products alone at {args.genius_batch * args.beams} rows "
            f"(`step_products_gflops`, best of the same samples) {gemm['fp32_step']:.0f} GFLOP/s"
            if "fp32_step" in gemm else "")
         + (f", the bf16 decoder's (its level head {BF16_HEAD[bf16_head_on(torch.device('cpu'))]}) "
            f"{gemm['bf16_step']:.0f} GFLOP/s" if "bf16_step" in gemm else "")
         + ". Decoder work per query (formula in `decoder_flops_per_query`): "
         f"{summary['decoder_gflop_per_query']:.3g} GFLOP; `generate` does {summary['generate_gflop_per_query']:.3g} "
         "GFLOP for the same query (`generate_flops_per_query`: every beam from the first step, cross-attention "
         "keys/values per beam, full-vocabulary head)."),
    ]
    for method, peak in PEAKS:
        if f"{method}_gflops" in summary:
            line = (f"- {LABELS[method]} at its best size: {summary[f'{method}_gflops']:.3g} GFLOP/s = "
                    f"{100 * summary[f'{method}_share_of_gemm']:.0f}% of the {peak} GEMM peak")
            executed = summary.get(f"{method}_executed_share_of_gemm")
            absorbs = summary["decoder_executed_gflop_per_query"] != summary["decoder_gflop_per_query"]
            if executed is not None and absorbs:
                line += (f" in the model's operations; {100 * executed:.0f}% in those it executes "
                         f"({summary['decoder_executed_gflop_per_query']:.3g} GFLOP per query, the cross-attention "
                         "absorbed)")
            if f"{method}_share_of_step_products" in summary:
                line += (f"; {100 * summary[f'{method}_share_of_step_products']:.0f}% of the rate its step's products "
                         "reach alone (the model's operations)")
            lines.append(line + ".")
    lines += ["", "Targets:", ""]
    for name, target in summary["targets"].items():
        status = "met" if target["met"] else "NOT met"
        detail = f"{target['text']} (rule: {target['rule']})" if "text" in target else target.get("rule", "")
        if "variation" in target:
            detail = f"variation {100 * target['variation']:.1f}% ({target['rule']})"
        if "min" in target:
            per_size = ", ".join(f"{n:.0e}: {v:.1f}x" for n, v in target["per_size"].items())
            detail = f"min speedup {target['min']:.1f}x ({per_size}; rule: {target['rule']})"
        lines.append(f"- {name}: {status}: {detail}")
    notes = [f"- {LABELS[r['method']]}, N = {int(r['pool_size']):,}: {r['note']}"
             + (f" (build {float(r['build_s']):.1f} s)" if r.get("build_s") not in ("", None) else "")
             for r in rows if r.get("note")]
    if notes:
        lines += ["", "Notes:", ""] + notes
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], methods: list[str], path: Path, title: str) -> None:
    series = {}
    for method in methods:
        qps = qps_by_size(rows, method)
        series[LABELS[method]] = (sorted(qps), [qps[n] for n in sorted(qps)])
    plot_lines(path, series, title, "pool size (IDs / vectors)", "queries per second")


SHAPE_FLAGS = ("levels", "codebook", "dim", "d_model", "layers", "heads", "d_ff", "prefix", "beams")


def add_generator_shape(parser: argparse.ArgumentParser) -> None:
    """The searched generator's shape and beams as flags (``SHAPE_FLAGS``; the paper's by default),
    read by :func:`build_generator` and :func:`codebook_sizes`."""
    shape = parser.add_argument_group("generator shape (paper size by default)")
    shape.add_argument("--levels", type=int, default=9)
    shape.add_argument("--codebook", type=int, default=4096)
    shape.add_argument("--dim", type=int, default=768, help="query / dense embedding width")
    shape.add_argument("--d-model", type=int, default=512)
    shape.add_argument("--layers", type=int, default=6)
    shape.add_argument("--heads", type=int, default=8)
    shape.add_argument("--d-ff", type=int, default=2048)
    shape.add_argument("--prefix", type=int, default=30)
    shape.add_argument("--beams", type=int, default=50)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=float, default=[1e3, 1e4, 1e5, 1e6, 1e7])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    add_generator_shape(p)
    p.add_argument("--genius-queries", type=int, default=32)
    p.add_argument("--genius-batch", type=int, default=16)
    p.add_argument("--generate-queries", type=int, default=8)
    p.add_argument("--generate-batch", type=int, default=8)
    p.add_argument("--generate-products", choices=("search", "default"), default="search",
                   help="generate's fp32 products: in the library GENIUS's search uses (oneDNN on AMD CPUs with "
                        "AVX-512, where MKL runs AVX2 code), or torch's default (MKL), as the official code runs them")
    p.add_argument("--generate-repeats", type=int, default=3,
                   help="timed runs of generate per size, the best kept (as GENIUS's repeats are)")
    p.add_argument("--generate-max-ids", type=float, default=1e6, help="largest pool for the nested-dict trie")
    p.add_argument("--dense-queries", type=int, default=64)
    p.add_argument("--dense-batch", type=int, default=16)
    p.add_argument("--dense-memory-gb", type=float, default=None,
                   help="largest vector block held in RAM (default: 4 GB or 40%% of the available memory if less)")
    p.add_argument("--ivf-nprobe", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of dense and faiss searches")
    p.add_argument("--genius-repeats", type=int, default=5, help="timed repeats of GENIUS decoding (interleaved)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gemm-n", type=int, default=2048, help="size of the square GEMM that measures the peak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the .md/.png/summary of the last run in --out-dir from its CSV (no measuring)")
    args = p.parse_args(argv)
    if args.dense_memory_gb is None:
        args.dense_memory_gb = min(4.0, 0.4 * available_memory_gb())
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    if args.generate_repeats < 1:
        p.error(f"--generate-repeats {args.generate_repeats} is out of range: pass >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    csv_path, summary_path = args.out_dir / "decode_vs_pool.csv", args.out_dir / "decode_vs_pool_summary.json"
    if args.report_only:  # re-render the report of the last run (same flags) from its CSV and summary
        rows, recorded = read_rows(csv_path), json.loads(summary_path.read_text())
        samples, command, machine = recorded["gemm_samples"], recorded["command"], recorded["machine"]
        loads = (recorded["load_start"], recorded["load_end"])
    else:
        command = "bash benchmarks/run_decode_vs_pool.sh " + shlex.join(argv if argv is not None else sys.argv[1:])
        machine, load_start = machine_description(), load_average()
        samples: dict[str, list[float]] = {}
        sample_gemm(samples, args)
        rows = run(args, samples)
        sample_gemm(samples, args)
        loads = (load_start, load_average())
    summary = summarise(rows, args, {k: max(v) for k, v in samples.items()})
    summary.update(gemm_samples=samples, load_start=loads[0], load_end=loads[1], machine=machine,
                   command=command.strip())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        write_csv(csv_path, rows, COLUMNS)
    text = markdown(rows, summary, args, command.strip(), machine, loads)
    (args.out_dir / "decode_vs_pool.md").write_text(text)
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot(rows, [m for m in args.methods], args.out_dir / "decode_vs_pool.png",
         f"q/s vs pool size ({args.beams} beams, L={args.levels}, K={args.codebook}; {cpu_name(machine)})")
    print(text)
    return 0


def cpu_name(machine: str) -> str:
    """The CPU part of ``machine_description()``."""
    return machine.split(" logical cores")[0].rsplit(",", 1)[0]


def read_rows(path: Path) -> list[dict]:
    """The CSV of a run, with numbers back as numbers (empty cells stay '')."""
    def value(text: str):
        try:
            return float(text) if text not in ("",) else ""
        except ValueError:
            return text

    return [{k: (v if k in ("method", "note") else value(v)) for k, v in row.items()} for row in read_csv(path)]


if __name__ == "__main__":
    sys.exit(main())
