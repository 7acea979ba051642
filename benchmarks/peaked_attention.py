"""Does GENIUS decoding slow down when the decoder's attention is as peaked as a trained one's? (issue 19)

The decoding benchmark's generator is randomly initialised, and its attention is nearly flat. A
trained decoder's is not: the demo's (trained for 20 epochs) has cross-attention scores spread up to
254 within a row, so 2 % of its softmax probabilities are subnormal (under 1.2e-38), and a CPU
multiplies subnormal operands through a microcode assist. This measures, side by side in one run:

- **the product**: the absorbed cross-attention's update (``baddbmm_`` of the probabilities
  [Q, B, heads * T] with the absorbed values [Q, heads * T, d_model], the paper's shape), once with
  softmax probabilities of scores drawn with standard deviation ``--score-std`` (some subnormal),
  once with the same probabilities flushed (``flush_subnormal_``, what the decoder does), and the
  flush's own pass (timed with the copy that restores its input);
- **the search**: the paper-shaped decoder with every attention's q weights scaled by each
  ``--sharpness`` (1: the random init), a 64-query search at 50 beams over a pool of ``--pool``
  random IDs, best of ``--repeats`` (the sharpnesses' order alternating between repeats), with the
  share of the cross-attention's probabilities that came out of the softmax subnormal. Its time
  relative to sharpness 1 is what peaked attention costs.

``subnormal_share`` is that of the probabilities each row's product reads (the flush pass: of its
input; the search: of the cross-attention's softmax outputs, before their flush). Writes
benchmarks/out/peaked_attention.{csv,md}.

    bash benchmarks/run_peaked_attention.sh [--sharpness 1 10 30] [--pool 1e5] [--repeats 3]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from genius.benchmarks import decode_vs_pool
from genius.benchmarks.common import OUT_DIR, best_seconds, write_results

TINY = torch.finfo(torch.float32).tiny
COLUMNS = ["what", "setting", "subnormal_share", "ms", "relative"]


def subnormal_share(probs: torch.Tensor) -> float:
    return float(((probs > 0) & (probs < TINY)).float().mean())


def measure_product(args) -> list[dict]:
    """The absorbed update's product on probabilities with and without their subnormals."""
    from genius.models.generative_retriever.fused_decoder import flush_subnormal_

    gen = torch.Generator().manual_seed(args.seed)
    queries, beams, width = args.queries, args.beams, args.heads * args.prefix
    scores = torch.randn(queries * beams, args.heads, args.prefix, generator=gen) * args.score_std
    probs = torch.softmax(scores, -1).view(queries, beams, width)
    flushed = flush_subnormal_(probs.clone())
    values = torch.randn(queries, width, args.d_model, generator=gen)
    stream = torch.zeros(queries, beams, args.d_model)
    copied = torch.empty_like(probs)
    times = {"subnormal kept": [], "flushed": [], "copy + flush pass": []}
    for _ in range(args.repeats):  # alternated, so a slow spell of the shared cores falls on both
        times["subnormal kept"].append(best_seconds(lambda: stream.baddbmm_(probs, values), 3))
        times["flushed"].append(best_seconds(lambda: stream.baddbmm_(flushed, values), 3))
        times["copy + flush pass"].append(best_seconds(lambda: flush_subnormal_(copied.copy_(probs)), 3))
    best = {key: min(value) for key, value in times.items()}
    setting = f"[{queries}, {beams}, {width}] x [{width}, {args.d_model}], scores std {args.score_std:g}"
    return [{"what": f"update product, {key}", "setting": setting,
             "subnormal_share": subnormal_share(flushed if key == "flushed" else probs), "ms": 1e3 * seconds,
             "relative": seconds / best["flushed"]} for key, seconds in best.items()]


def sharpened(generator, factor: float):
    """A copy of ``generator`` with every attention's q weights (self and cross) times ``factor``:
    the scores scale with it, as a trained decoder's peaked attention does."""
    copy_ = copy.deepcopy(generator)
    with torch.no_grad():
        for block in copy_.t5.decoder.block:
            block.layer[0].SelfAttention.q.weight.mul_(factor)
            block.layer[1].EncDecAttention.q.weight.mul_(factor)
    return copy_


def measure_search(args) -> list[dict]:
    from genius.models.generative_retriever.beam_search import constrained_beam_search, prepare_decoder

    torch.manual_seed(args.seed)
    base = decode_vs_pool.build_generator(args)
    pool = decode_vs_pool.build_pool(int(args.pool), base.codebook_sizes, args.seed)
    z = decode_vs_pool.query_vectors(args.queries, args.dim, args.seed)
    searches, shares = {}, {}
    for factor in args.sharpness:
        generator = sharpened(base, factor)
        decoder = prepare_decoder(generator, torch.device("cpu"), False, False)
        searches[factor] = (lambda g=generator, d=decoder: constrained_beam_search(
            g, z, pool.trie, g.codebook_sizes, num_beams=args.beams, batch_size=args.queries, decoder=d))
        shares[factor] = probed_share(searches[factor])
    best = {factor: float("inf") for factor in args.sharpness}
    for repeat in range(args.repeats):
        order = args.sharpness if repeat % 2 == 0 else args.sharpness[::-1]
        for factor in order:
            start = time.perf_counter()
            searches[factor]()
            best[factor] = min(best[factor], time.perf_counter() - start)
    first = best[args.sharpness[0]]
    return [{"what": "search", "setting": f"q x {factor:g}, {args.queries} queries, {args.beams} beams, "
                                          f"{int(args.pool)} IDs",
             "subnormal_share": shares[factor], "ms": 1e3 * best[factor], "relative": best[factor] / first}
            for factor in args.sharpness]


def probed_share(search) -> float:
    """One untimed search (also its warm-up), counting the softmax outputs that are subnormal: the
    decoder's cross-attention probabilities before their flush (its one ``torch.softmax``)."""
    counts, softmax = [0, 0], torch.softmax

    def counting(x, dim, *rest, **kwargs):
        out = softmax(x, dim, *rest, **kwargs)
        counts[0] += int(((out > 0) & (out < TINY)).sum())
        counts[1] += out.numel()
        return out

    torch.softmax = counting
    try:
        search()
    finally:
        torch.softmax = softmax
    return counts[0] / max(1, counts[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sharpness", nargs="+", type=float, default=[1.0, 10.0, 30.0],
                   help="factors on the q weights; the first is the reference")
    p.add_argument("--score-std", type=float, default=30.0, help="the product's synthetic scores' standard deviation")
    p.add_argument("--pool", type=float, default=1e5)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    decode_vs_pool.add_generator_shape(p)
    p.add_argument("--out", type=Path, default=OUT_DIR / "peaked_attention")
    args = p.parse_args(argv)
    for name in ("pool", "queries", "repeats", "threads", "score_std", *decode_vs_pool.SHAPE_FLAGS):
        if getattr(args, name) <= 0:
            p.exit(2, f"{p.prog}: error: --{name.replace('_', '-')} {getattr(args, name)} is out of range: pass > 0\n")
    if min(args.sharpness) <= 0:
        p.exit(2, f"{p.prog}: error: --sharpness {args.sharpness} is out of range: pass factors > 0\n")
    if args.d_model % args.heads:
        p.exit(2, f"{p.prog}: error: --d-model {args.d_model} is not a multiple of --heads {args.heads}\n")
    torch.set_num_threads(args.threads)
    rows = measure_product(args) + measure_search(args)
    write_results(args.out, "Peaked attention: the update product with and without subnormal probabilities, and the "
                            f"search with its q weights scaled ({args.threads} thread(s), best of {args.repeats})",
                  rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
