"""Which library multiplies the decoder's fp32 matrices faster on this CPU: MKL or oneDNN? (issue 19)

torch's fp32 products run in MKL, which picks its code paths by the CPU's vendor; on an AMD CPU
with AVX-512 it ran AVX2 code at half oneDNN's rate, so there the project makes its fp32 products
in oneDNN (``genius.common.cpu.fp32_products_in_onednn``). This measures both on the fused decoder
step's products (paper size, ``--rows`` beams: int8_gemm.py's shapes) and on the square GEMM the
decoding benchmark takes as the fp32 peak, each the best of ``--repeats`` calls into a kept buffer,
MKL and oneDNN alternating per shape:

- ``mkl``: ``torch.mm`` with torch's defaults;
- ``onednn``: the same call under ``genius.common.cpu.onednn_switch`` (torch's oneDNN fp32 precision
  at "bf16", the only way torch hands an fp32 product to oneDNN), measured on any CPU, whether or
  not the project uses it here.

Relative error: max |product - exact| / max |exact| against float64 on random data; fp32 gives about
1e-7-1e-6, inputs rounded to bf16 (oneDNN does so under the switch on AMX tiles) about 1e-3. Writes
benchmarks/out/fp32_gemm.{csv,md}.

    bash benchmarks/run_fp32_gemm.sh [--rows 3200] [--threads 2] [--repeats 10]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from genius.benchmarks.common import OUT_DIR, best_seconds, write_results
from genius.benchmarks.int8_gemm import step_gemms
from genius.common.cpu import cpu_vendor, multiplies_in_fp32, onednn_fp32_on, onednn_switch
from genius.common.stage import exit_user_error

COLUMNS = ["gemm", "m", "k", "n", "count", "mkl_ms", "onednn_ms", "onednn_speedup", "mkl_gflops", "onednn_gflops",
           "mkl_rel_err", "onednn_rel_err"]


def measure(m: int, k: int, n: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(m * 7 + k * 3 + n)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) / k**0.5
    exact = x.double() @ w.double().t()
    out = torch.empty(m, n)

    def product():
        return torch.mm(x, w.t(), out=out)

    times, errors = {}, {}
    for _ in range(2):  # alternating, so a slow phase of the machine is not one library's alone
        for library in ("mkl", "onednn"):
            if library == "onednn":
                with onednn_switch():
                    seconds = best_seconds(product, repeats)
                    errors[library] = float((product().double() - exact).abs().max() / exact.abs().max())
            else:
                seconds = best_seconds(product, repeats)
                errors[library] = float((product().double() - exact).abs().max() / exact.abs().max())
            times[library] = min(times.get(library, seconds), seconds)
    flops = 2 * m * k * n
    return {"mkl_ms": times["mkl"] * 1e3, "onednn_ms": times["onednn"] * 1e3,
            "onednn_speedup": times["mkl"] / times["onednn"], "mkl_gflops": flops / times["mkl"] / 1e9,
            "onednn_gflops": flops / times["onednn"] / 1e9, "mkl_rel_err": errors["mkl"],
            "onednn_rel_err": errors["onednn"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=3200, help="beams in one step: queries per search x beams")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--inner", type=int, default=512, help="heads x d_kv")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--codebook", type=int, default=4096)
    p.add_argument("--square", type=int, default=2048, help="the square GEMM that measures the peak")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=OUT_DIR / "fp32_gemm")
    args = p.parse_args(argv)
    for name in ("rows", "d_model", "d_ff", "inner", "layers", "codebook", "square", "threads", "repeats"):
        if getattr(args, name) < 1:
            exit_user_error(p, f"--{name.replace('_', '-')} {getattr(args, name)} is out of range: pass >= 1")
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.backends.mkldnn, "matmul")):
        exit_user_error(p, "this torch has no oneDNN fp32 matmul switch (torch.backends.mkldnn.matmul); "
                           "nothing to compare")
    torch.set_num_threads(args.threads)
    rows = []
    for name, k, n, count in step_gemms(args.d_model, args.d_ff, args.inner, args.layers, args.codebook):
        rows.append({"gemm": name, "m": args.rows, "k": k, "n": n, "count": count,
                     **measure(args.rows, k, n, args.repeats)})
    total = {key: sum(r[f"{key}_ms"] * r["count"] for r in rows) for key in ("mkl", "onednn")}
    flops = sum(2 * r["m"] * r["k"] * r["n"] * r["count"] for r in rows)
    rows.append({"gemm": "step total", "m": args.rows, "k": "", "n": "", "count": "",
                 **{f"{key}_ms": t for key, t in total.items()}, "onednn_speedup": total["mkl"] / total["onednn"],
                 **{f"{key}_gflops": flops / t / 1e6 for key, t in total.items()},
                 **{f"{key}_rel_err": max(r[f"{key}_rel_err"] for r in rows) for key in ("mkl", "onednn")}})
    rows.append({"gemm": "square", "m": args.square, "k": args.square, "n": args.square, "count": 1,
                 **measure(args.square, args.square, args.square, args.repeats)})
    with onednn_switch():
        exact_here = multiplies_in_fp32(torch.mm)
    used = "uses oneDNN" if onednn_fp32_on() else "keeps torch's default (MKL)"
    write_results(args.out, f"fp32 products, MKL vs oneDNN ({args.threads} thread(s), best of {args.repeats}, "
                            f"alternating; CPU vendor {cpu_vendor()}; oneDNN under the switch multiplies "
                            f"{'unrounded fp32' if exact_here else 'rounded inputs'}; the project {used} here)",
                  rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
