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
  relative to sharpness 1 is what peaked attention costs;
- **the search with a confident head**: the same decoder with its final norm's weights scaled by
  each ``--head-sharpness`` (the logits scale with it, as a confidently trained head's spread), so
  that some of the level's probabilities are subnormal. The decoder runs that log-softmax with the
  CPU's flush mode on (``IDGenerator.level_log_probs``); against an older checkout (run with its
  package on ``PYTHONPATH``) this measures what the subnormals cost there.

``subnormal_share`` is that of the probabilities each row's product reads (the flush pass: of its
input; the search: of the cross-attention's softmax outputs, before their flush; the search with a
confident head: of the level's probabilities, the exponentials of its log-softmax). Writes
benchmarks/out/peaked_attention.{csv,md}.

    bash benchmarks/run_peaked_attention.sh [--sharpness 1 10 30] [--head-sharpness 20] [--pool 1e5]
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

from genius.benchmarks import decode_vs_pool
from genius.benchmarks.common import OUT_DIR, best_seconds, write_results
from genius.common.stage import exit_user_error

TINY = torch.finfo(torch.float32).tiny
# the logarithms whose exponentials are subnormal: between those of the smallest subnormal and of TINY
LOG_SMALLEST, LOG_TINY = math.log(2.0 ** -149), math.log(TINY)
COLUMNS = ["what", "setting", "subnormal_share", "ms", "relative"]


def subnormal(probs: torch.Tensor) -> torch.Tensor:
    """Which of ``probs`` are subnormal: above zero, under the smallest normal fp32."""
    return (probs > 0) & (probs < TINY)


def subnormal_share(probs: torch.Tensor) -> float:
    return float(subnormal(probs).float().mean())


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


def sharpened(generator, factor: float, head: float = 1.0):
    """A copy of ``generator`` with every attention's q weights (self and cross) times ``factor``
    and its final norm's weights times ``head``: the attention scores and the logits scale with
    them, as a trained decoder's peaked attention and confident head do."""
    copy_ = copy.deepcopy(generator)
    with torch.no_grad():
        for block in copy_.t5.decoder.block:
            block.layer[0].SelfAttention.q.weight.mul_(factor)
            block.layer[1].EncDecAttention.q.weight.mul_(factor)
        copy_.t5.decoder.final_layer_norm.weight.mul_(head)
    return copy_


def measure_search(args) -> list[dict]:
    from genius.models.generative_retriever.beam_search import constrained_beam_search, prepare_decoder

    torch.manual_seed(args.seed)
    base = decode_vs_pool.build_generator(args)
    pool = decode_vs_pool.build_pool(int(args.pool), base.codebook_sizes, args.seed)
    z = decode_vs_pool.query_vectors(args.queries, args.dim, args.seed)
    # (q factor, head factor): the q sharpnesses, then each head sharpness with q unscaled
    settings = list(dict.fromkeys([(factor, 1.0) for factor in args.sharpness]
                                  + [(1.0, head) for head in args.head_sharpness]))
    searches, shares = {}, {}
    for setting in settings:
        generator = sharpened(base, *setting)
        decoder = prepare_decoder(generator, torch.device("cpu"), False, False)
        searches[setting] = (lambda g=generator, d=decoder: constrained_beam_search(
            g, z, pool.trie, g.codebook_sizes, num_beams=args.beams, batch_size=args.queries, decoder=d))
        shares[setting] = probed_shares(searches[setting])
    best = {setting: float("inf") for setting in settings}
    for repeat in range(args.repeats):
        for setting in settings if repeat % 2 == 0 else settings[::-1]:
            start = time.perf_counter()
            searches[setting]()
            best[setting] = min(best[setting], time.perf_counter() - start)
    first = best[settings[0]]
    shape = f"{args.queries} queries, {args.beams} beams, {int(args.pool)} IDs"
    rows = [{"what": "search", "setting": f"q x {factor:g}, {shape}", "subnormal_share": shares[factor, 1.0]["cross"],
             "ms": 1e3 * best[factor, 1.0], "relative": best[factor, 1.0] / first} for factor in args.sharpness]
    return rows + [{"what": "search, head scaled", "setting": f"head x {head:g}, {shape}",
                    "subnormal_share": shares[1.0, head]["head"], "ms": 1e3 * best[1.0, head],
                    "relative": best[1.0, head] / first} for head in args.head_sharpness]


def probed_shares(search) -> dict[str, float]:
    """One untimed search (also its warm-up), counting subnormal values: ``cross``, the decoder's
    cross-attention probabilities before their flush (its one ``torch.softmax``); ``head``, the
    exponentials of the level log-softmax's outputs (``torch.log_softmax``, as
    ``IDGenerator.level_log_probs`` calls it in a search)."""
    counts = {"cross": [0, 0], "head": [0, 0]}
    softmax, log_softmax = torch.softmax, torch.log_softmax

    def tally(name: str, hits: torch.Tensor) -> None:
        counts[name][0] += int(hits.sum())
        counts[name][1] += hits.numel()

    def counting_softmax(x, dim, *rest, **kwargs):
        out = softmax(x, dim, *rest, **kwargs)
        tally("cross", subnormal(out))
        return out

    def counting_log_softmax(x, dim, *rest, **kwargs):
        out = log_softmax(x, dim, *rest, **kwargs)
        # from the logarithms: the search may run this with subnormals flushed, exp() included
        tally("head", (out > LOG_SMALLEST) & (out < LOG_TINY))
        return out

    torch.softmax, torch.log_softmax = counting_softmax, counting_log_softmax
    try:
        search()
    finally:
        torch.softmax, torch.log_softmax = softmax, log_softmax
    return {name: hits / max(1, total) for name, (hits, total) in counts.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sharpness", nargs="+", type=float, default=[1.0, 10.0, 30.0],
                   help="factors on the q weights; the first is the reference")
    p.add_argument("--head-sharpness", nargs="*", type=float, default=[20.0],
                   help="factors on the final norm's weights (the logits), each searched with q unscaled")
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
            exit_user_error(p, f"--{name.replace('_', '-')} {getattr(args, name)} is out of range: pass > 0")
    for name in ("sharpness", "head_sharpness"):
        if min(getattr(args, name), default=1.0) <= 0:
            exit_user_error(p, f"--{name.replace('_', '-')} {getattr(args, name)} is out of range: pass factors > 0")
    if args.d_model % args.heads:
        exit_user_error(p, f"--d-model {args.d_model} is not a multiple of --heads {args.heads}")
    torch.set_num_threads(args.threads)
    rows = measure_product(args) + measure_search(args)
    write_results(args.out, "Peaked attention: the update product with and without subnormal probabilities, and the "
                            "search with its q weights or its logits scaled "
                            f"({args.threads} thread(s), best of {args.repeats})",
                  rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
