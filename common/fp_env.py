"""CPU training with subnormal floats flushed to zero.

A CPU multiplies and adds subnormal floats (under fp32's 1.2e-38) through a microcode assist, many
times slower than normal ones. Training drives values into that range: a trained decoder's
attention probabilities (the demo's generator: 2 % of its cross-attention's), and the gradients
and Adam moments of weights a batch barely touches. The demo's train-gen steps slowed from 24 to
47 ms over its 20 epochs; with subnormals flushed the stage ran 1.3-1.9x faster, to bit-identical
weights (BENCHMARKS.md, section 7). :func:`subnormals_flushed` turns the CPU's flush-to-zero and
denormals-are-zero mode on for a training loop (train-rq's and train-gen's; train-clip gained
nothing from it) and for decoding's level log-softmax, on every torch thread, and restores the
mode after. Values under 1.2e-38 then read and write as 0; at that size they are far below the
rounding of any sum they enter. A GPU computes subnormals at full speed and is left alone.
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

from genius.common.distributed import usable_cores


@cache
def _extension():
    """The C++ mode switch (built with the package), or None with a warning once if it is not."""
    try:
        from genius.common import _fp_env
    except ImportError:
        warnings.warn("genius.common._fp_env is not built, so CPU training and decoding's log-softmax compute "
                      "subnormal floats at the CPU's slow speed; reinstall the package (`pip install -e .` from the "
                      "repository root)",
                      RuntimeWarning, stacklevel=3)
        return None
    return _fp_env if _fp_env.supported else None


def flushing_threads(threads: int | None = None) -> int:
    """How many of ``threads`` torch threads (default: all of them) flush subnormals (0 where the
    mode cannot be set)."""
    extension = _extension()
    return extension.flushing_threads(threads or torch.get_num_threads()) if extension else 0


# How many subnormals_flushed blocks each Python thread is inside: a thread's torch ops run on its
# own OpenMP team, so the mode is per Python thread, and only its outermost block clears it.
_blocks = threading.local()


@contextmanager
def subnormals_flushed(device: torch.device, threads: int | None = None) -> Iterator[None]:
    """On a CPU, every torch thread flushes subnormals to zero inside the block. After it the
    threads compute subnormals again, and the calling thread gets its earlier mode back
    (``torch.set_flush_denormal`` sets the calling thread's alone). The mode is set on ``threads``
    threads, by default as many as torch uses or the process has cores, whichever is more: through
    a loop the thread policy (:func:`~genius.common.distributed.recheck_threads`) moves between
    those counts, and a thread the pool starts later inherits the mode from the calling thread,
    which starts it. A block around one op passes ``torch.get_num_threads()``, so that a busy
    machine never wakes a thread the op does not use. A block inside another (a search's
    log-softmax inside a training loop) leaves the mode on after it. Elsewhere (a GPU, or no C++
    switch) nothing changes."""
    extension = _extension() if torch.device(device).type == "cpu" else None
    if extension is None:
        yield
        return
    outermost = getattr(_blocks, "depth", 0) == 0
    before = outermost and extension.flushing_threads(1) == 1  # the calling thread's mode
    threads = threads or max(torch.get_num_threads(), usable_cores())
    extension.set_flush_subnormal(True, threads)  # again when nested: threads added since flush too
    _blocks.depth = getattr(_blocks, "depth", 0) + 1
    try:
        yield
    finally:
        _blocks.depth -= 1
        if outermost:
            extension.set_flush_subnormal(False, max(threads, torch.get_num_threads()))
            if before:
                extension.set_flush_subnormal(True, 1)
