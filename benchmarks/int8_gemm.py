"""Would int8 matrix products bring GENIUS decoding to 10x the official one on a CPU? (issue 19)

BENCHMARKS' arithmetic caps the fp32 search at 5.5x ``generate`` (both run their GEMMs near the
fp32 peak, and ``generate`` does 2.6x the FLOPs), and this CPU has no bf16 kernels, so the lever
left is int8. This measures it on the decoder step's own GEMMs (paper size: d_model 512, d_ff
2048, 8 heads of 64; 16 queries x 50 beams = 800 rows; the level head over K = 4096 codes), each
with the best of ``--repeats`` timed calls:

- ``fp32``: ``F.linear``, what the fused step runs now;
- ``int8 fbgemm``: ``torch.ops.quantized.linear_dynamic`` with per-tensor int8 weights (activations
  quantized inside the op, to 7 bits on CPUs without AVX-512 VNNI), the int8 decoder's product
  until session 26; torch marks these quantized-tensor APIs deprecated;
- ``int8 product``: ``torch._int_mm`` on operands already in int8, the bound for any int8 scheme;
- ``int8 decoder``: the int8 decoder's product as a whole: its input quantized per row by the C++
  kernel, ``torch._int_mm`` into a kept buffer, the sums scaled back into fp32 by the C++ kernel
  (the decoder does each of these inside a pass it makes anyway: an upper bound of its cost).

The step's total is the sum over one layer's six GEMMs times the layers, plus the level head.
Relative error: max |int8 - fp32| / max |fp32| of each product on random data. What int8 does to
the beams is measured on the decoder built from these products, ``decoding.int8``
(BENCHMARKS.md, section 7). Writes benchmarks/out/int8_gemm.{csv,md}.

    bash benchmarks/run_int8_gemm.sh [--rows 800] [--threads 1] [--repeats 20]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from genius.benchmarks.common import OUT_DIR, best_seconds, write_results
from genius.common.stage import exit_user_error
from genius.models.generative_retriever.fused_decoder import (
    Int8Weight,
    decoder_kernels,
    int8_decoding_problem,
    int8_levels,
)

COLUMNS = ["gemm", "m", "k", "n", "count", "fp32_ms", "fbgemm_ms", "product_ms", "decoder_ms",
           "fbgemm_speedup", "product_speedup", "decoder_speedup", "fbgemm_rel_err", "decoder_rel_err"]
KINDS = ("fbgemm", "product", "decoder")


def step_gemms(d_model: int, d_ff: int, inner: int, layers: int, codebook: int) -> list[tuple]:
    """(name, k, n, count per step) of the fused decoder step's products, each [beams, k] x [k, n]."""
    per_layer = [("self q,k,v", d_model, 3 * inner), ("self out", inner, d_model), ("cross q", d_model, inner),
                 ("cross out", inner, d_model), ("ff in", d_model, d_ff), ("ff out", d_ff, d_model)]
    return [(name, k, n, layers) for name, k, n in per_layer] + [("level head", d_model, codebook, 1)]


def measure(m: int, k: int, n: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(m * 7 + k * 3 + n)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) / k**0.5
    exact = F.linear(x, w)
    levels, kernels, threads = int8_levels(), decoder_kernels(), torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the deprecation notice of quantize_per_tensor
        qw = torch.quantize_per_tensor(w, scale=float(w.abs().max()) / 127, zero_point=0, dtype=torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qw, None)
    weight = Int8Weight.of(w, levels)
    x8 = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
    values, scales = torch.empty(m, k, dtype=torch.int8), torch.empty(m)
    sums, out = torch.empty(m, n, dtype=torch.int32), torch.empty(m, n)

    def fbgemm():
        return torch.ops.quantized.linear_dynamic(x, packed, levels < 127)

    def decoder():
        kernels.quantize(x.numpy(), values.numpy(), scales.numpy(), levels, threads)
        torch._int_mm(values, weight.values, out=sums)
        kernels.scale_sums(sums.numpy(), scales.numpy(), weight.scales.numpy(), False, out.numpy(), None, levels,
                           threads)
        return out

    times = {"fp32": best_seconds(lambda: F.linear(x, w), repeats), "fbgemm": best_seconds(fbgemm, repeats),
             "product": best_seconds(lambda: torch._int_mm(x8, weight.values, out=sums), repeats),
             "decoder": best_seconds(decoder, repeats)}
    scale = float(exact.abs().max())
    return {**{f"{key}_ms": t * 1e3 for key, t in times.items()},
            **{f"{key}_speedup": times["fp32"] / times[key] for key in KINDS},
            "fbgemm_rel_err": float((fbgemm() - exact).abs().max()) / scale,
            "decoder_rel_err": float((decoder() - exact).abs().max()) / scale}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=800, help="beams in one step: queries per search x beams")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--inner", type=int, default=512, help="heads x d_kv")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--codebook", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=OUT_DIR / "int8_gemm")
    args = p.parse_args(argv)
    for name in ("rows", "d_model", "d_ff", "inner", "layers", "codebook", "threads", "repeats"):
        if getattr(args, name) < 1:
            exit_user_error(p, f"--{name.replace('_', '-')} {getattr(args, name)} is out of range: pass >= 1")
    problem = int8_decoding_problem(torch.device("cpu"))  # the int8 decoder's rule
    if problem:
        exit_user_error(p, f"{problem}; nothing to measure here")
    torch.set_num_threads(args.threads)
    rows = []
    for name, k, n, count in step_gemms(args.d_model, args.d_ff, args.inner, args.layers, args.codebook):
        rows.append({"gemm": name, "m": args.rows, "k": k, "n": n, "count": count,
                     **measure(args.rows, k, n, args.repeats)})
    total = {key: sum(r[f"{key}_ms"] * r["count"] for r in rows) for key in ("fp32", *KINDS)}
    rows.append({"gemm": "step total", "m": args.rows, "k": "", "n": "", "count": "",
                 **{f"{key}_ms": t for key, t in total.items()},
                 **{f"{key}_speedup": total["fp32"] / total[key] for key in KINDS},
                 "fbgemm_rel_err": max(r["fbgemm_rel_err"] for r in rows),
                 "decoder_rel_err": max(r["decoder_rel_err"] for r in rows)})
    write_results(args.out, f"int8 vs fp32 on the decoder step's GEMMs ({args.threads} thread(s), best of "
                            f"{args.repeats})", rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
