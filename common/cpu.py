"""What this CPU is (its vendor and instruction-set flags, from /proc/cpuinfo), and which library
multiplies its fp32 matrices: torch's default (MKL on x86 builds), or oneDNN where MKL is slow.

torch multiplies fp32 matrices with MKL, which picks its code paths by the CPU's vendor: on an AMD
CPU with AVX-512 (Zen 5) it ran AVX2 kernels, 175-195 GFLOP/s at the decoder's shapes where
oneDNN's AVX-512 kernels reached 380-430 (BENCHMARKS.md, section 7, session 27). torch hands an fp32
product to oneDNN only while the fp32 precision of its oneDNN matmuls is "bf16", which permits
oneDNN to round the inputs to bf16; it does so on AMX tiles only, and without AMX it multiplies in
fp32, which :func:`onednn_fp32_on` checks before relying on it.
"""
from __future__ import annotations

import contextlib
import re
import threading
from functools import cache
from pathlib import Path

import torch

@cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The instruction-set flags Linux lists for this x86 CPU (its first ``flags`` line); None where
    they cannot be read (another OS, or a CPU whose features are listed under another name)."""
    line = _cpuinfo_field(cpuinfo, "flags")
    return None if line is None else frozenset(line.split())


@cache
def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The x86 CPU's vendor as Linux lists it (``GenuineIntel``, ``AuthenticAMD``), or None where it
    cannot be read."""
    return _cpuinfo_field(cpuinfo, "vendor_id")


def _cpuinfo_field(cpuinfo: Path, name: str) -> str | None:
    """The value of the first ``name`` line of ``cpuinfo`` (stripped), or None."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    line = re.search(rf"^{name}\s*:(.*)$", text, re.M)
    return None if line is None else line[1].strip()


_onednn_lock = threading.Lock()
_onednn_users = 0
_onednn_saved: str | None = None


@cache
def onednn_fp32_on() -> bool:
    """Whether :func:`fp32_products_in_onednn` sends fp32 products to oneDNN: on an AMD CPU with
    AVX-512 and without AMX, whose torch has oneDNN and the precision setting, and where oneDNN's
    products under that setting were found to multiply fp32 inputs unrounded
    (:func:`multiplies_in_fp32`, once per process)."""
    flags = cpu_flags()
    if (cpu_vendor() != "AuthenticAMD" or flags is None or "avx512f" not in flags or "amx_bf16" in flags
            or not torch.backends.mkldnn.is_available()
            or not hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision")):
        return False
    with onednn_switch():
        return multiplies_in_fp32(torch.mm)


def multiplies_in_fp32(product) -> bool:
    """Whether ``product`` (a, b -> a @ b) multiplies fp32 matrices without rounding their inputs:
    entries of ``a`` with 9 fraction bits (1 + j/512, which bf16's 7 cannot hold) against entries of
    ``b`` of +-1, at a few shapes, so that every sum is exact in fp32 in any order and a product
    that rounds its inputs to bf16 is caught by plain equality; then the roles swapped."""
    generator = torch.Generator().manual_seed(0)
    for m, k, n in ((8, 256, 64), (256, 256, 256), (1024, 512, 1024)):
        fine = 1 + torch.randint(1, 512, (m, k), generator=generator) / 512
        fine *= torch.randint(0, 2, (m, k), generator=generator) * 2 - 1
        signs = (torch.randint(0, 2, (k, n), generator=generator) * 2 - 1).float()
        for a, b in ((fine, signs), (signs.t().contiguous(), fine.t().contiguous())):
            if not torch.equal(product(a, b).double(), a.double() @ b.double()):
                return False
    return True


@contextlib.contextmanager
def fp32_products_in_onednn(device: torch.device):
    """Within it, fp32 products on ``device`` run in oneDNN where :func:`onednn_fp32_on` (an AMD CPU
    with AVX-512: 2.4x MKL's rate at the decoder step's products there, the same fp32 arithmetic
    in another summation order); elsewhere nothing changes. torch's setting is process-wide:
    searches in several threads share one switch (counted), and other fp32 products made
    meanwhile in this process also run in oneDNN, in fp32."""
    if device.type == "cpu" and onednn_fp32_on():
        with onednn_switch():
            yield
    else:
        yield


@contextlib.contextmanager
def onednn_switch():
    """torch's fp32 oneDNN matmul precision at "bf16" while any user is inside, then as it was, on any
    CPU (with AMX oneDNN then rounds fp32 inputs to bf16): :func:`fp32_products_in_onednn` uses it
    where it keeps fp32, ``benchmarks/fp32_gemm.py`` to compare the libraries anywhere."""
    global _onednn_users, _onednn_saved
    matmul = torch.backends.mkldnn.matmul
    with _onednn_lock:
        if _onednn_users == 0:
            _onednn_saved = matmul.fp32_precision
            matmul.fp32_precision = "bf16"
        _onednn_users += 1
    try:
        yield
    finally:
        with _onednn_lock:
            _onednn_users -= 1
            if _onednn_users == 0:
                matmul.fp32_precision = _onednn_saved
