"""Process-group set-up and the collectives the training stages need.

Runs the same code single-process (no torchrun) and under torchrun: NCCL on GPUs, gloo on CPU,
so multi-process behaviour is testable on a CPU-only machine. Also the CPU thread policy: how
many torch threads a stage runs, from the size of its work and the load of the machine.
"""
from __future__ import annotations

import datetime
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


# Minutes any collective may wait for the slowest rank before the job fails. NCCL's default is 10
# minutes (gloo's 30): too short for the minutes of one-rank work a 5.6M-candidate pool can take
# on network storage (building its trie, a rank's share of its fused-embedding cache), long
# enough that a genuinely hung rank still ends the job within the hour.
TIMEOUT_ENV = "GENIUS_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 30.0


def collective_timeout() -> datetime.timedelta:
    """The process group's collective timeout: ``$GENIUS_DIST_TIMEOUT_MIN`` minutes (default 30)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return datetime.timedelta(minutes=DEFAULT_TIMEOUT_MIN)
    try:
        minutes = float(raw)
    except ValueError:
        minutes = float("nan")
    if not minutes > 0 or minutes == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: not a positive number of minutes; set it to e.g. 60, or unset it "
                         f"for the default {DEFAULT_TIMEOUT_MIN:g}")
    return datetime.timedelta(minutes=minutes)


def init_distributed(device: str = "auto", cpu_threads: int | None = None, op_macs: float | None = None) -> DistInfo:
    """Join the torchrun process group if launched by torchrun; otherwise a world of one.

    ``cpu_threads``: torch threads per process on the CPU. An int pins them, and so does
    $OMP_NUM_THREADS; otherwise ``op_macs`` (multiply-adds of the stage's typical op, e.g. batch
    rows x width x width) hands them to :class:`ThreadPolicy`, which the stage's loop re-checks
    with :func:`recheck_threads`; without it torch's setting stays. Collectives time out after
    :func:`collective_timeout`."""
    if device not in ("auto", "cpu", "cuda"):  # configs check it; the Python API hands it on as given
        raise ValueError(f"device {device!r}: expected 'auto', 'cpu' or 'cuda' (under torchrun each process takes "
                         "the GPU of its LOCAL_RANK; otherwise choose one with CUDA_VISIBLE_DEVICES)")
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no GPU is available; use device: cpu or auto")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        # Before the process group: NCCL binds each rank's communicator to the current device.
        torch.cuda.set_device(dev)
    else:
        set_cpu_threads(cpu_threads, op_macs)
    if world_size > 1 and not dist.is_initialized():
        # device_id binds the group to this rank's GPU now rather than guessing it at the first collective
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", timeout=collective_timeout(),
                                device_id=dev if want_cuda else None)
    return DistInfo(rank, world_size, local_rank, dev)


# ---- CPU thread policy ---------------------------------------------------------------------------
# With torch's default of one thread per core, every op of a chain of small ops (a small model's
# training step, a decoding step) waits at its join for the slowest thread; when another process
# holds one of the cores, that thread first waits for the scheduler. Measured on this project's
# 2-core machine with other jobs running: a 4M-multiply-add GEMM took 15 ms with 2 threads and
# 0.14 ms with 1, a 540M one 1.4x longer with 2; with light load a second thread gained nothing up
# to about 70M (0.93x at 29M, 1.02x at 68M); the demo's train-rq took 79 s with 2 threads and 42 s
# with 1 at load ~6, 603 s and 125 s with three more busy processes (benchmarks/shared_cores.py).
# So a second thread is used only for ops above PARALLEL_MIN_MACS, and only on idle cores.
PARALLEL_MIN_MACS = 1e8
RECHECK_SECONDS = 5.0


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which a container or taskset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _own_running_threads() -> int:
    running = 0
    for stat in Path("/proc/self/task").glob("*/stat"):
        try:
            # the state follows the command name, which is in parentheses and may hold spaces
            running += stat.read_text().rpartition(")")[2].split()[0] == "R"
        except (OSError, IndexError):  # a thread that ended while being read
            pass
    return running


def others_running(samples: int = 5, gap_seconds: float = 0.002) -> int:
    """Runnable threads of other processes right now: /proc/loadavg's running count minus this
    process's own running threads, the median of a few samples (one sample often catches a
    short-lived process). The 1-minute load average would lag a minute behind a job that starts."""
    counts = []
    for i in range(samples):
        if i:
            time.sleep(gap_seconds)
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):  # no /proc (not Linux): assume idle cores
            return 0
        counts.append(max(0, running - _own_running_threads()))
    return sorted(counts)[len(counts) // 2]


@dataclass
class ThreadPolicy:
    """Torch threads for work whose typical op is ``op_macs`` multiply-adds: one below
    :data:`PARALLEL_MIN_MACS`, else one per core of ``cores`` that no other process is running on
    (so one on a busy machine), at most ``share`` (this process's part of the cores; all of them
    by default). ``read_load`` counts other processes' runnable threads (tests inject one);
    :meth:`recheck` applies the rule again at most every ``interval`` seconds of ``clock``."""

    op_macs: float
    cores: int = field(default_factory=usable_cores)
    share: int | None = None
    read_load: Callable[[], int] = others_running
    interval: float = RECHECK_SECONDS
    clock: Callable[[], float] = time.monotonic
    _last: float = field(default=-float("inf"), init=False)

    def threads(self) -> int:
        share = self.cores if self.share is None else self.share
        if self.op_macs < PARALLEL_MIN_MACS or share <= 1:
            return 1
        return max(1, min(share, self.cores - self.read_load()))

    def apply(self) -> int:
        self._last = self.clock()
        threads = self.threads()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads

    def recheck(self) -> None:
        if self.clock() - self._last >= self.interval:
            self.apply()


_policy: ThreadPolicy | None = None


def start_thread_policy(policy: ThreadPolicy | None) -> None:
    """Make ``policy`` the process's thread policy and apply it now (None: stop re-checking)."""
    global _policy
    _policy = policy
    if policy is not None:
        policy.apply()


def set_cpu_threads(cpu_threads: int | None, op_macs: float | None) -> None:
    """Pin ``cpu_threads`` torch threads; or, when neither it nor $OMP_NUM_THREADS pins them, start
    the :class:`ThreadPolicy` for ops of ``op_macs`` multiply-adds (None: leave torch's setting)."""
    if op_macs is not None and not cpu_threads and not os.environ.get("OMP_NUM_THREADS"):
        # torchrun's ranks on this machine share its cores; each counts the others as load
        cores, local_ranks = usable_cores(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        start_thread_policy(ThreadPolicy(op_macs, cores, share=max(1, cores // local_ranks)))
        return
    start_thread_policy(None)
    if cpu_threads:
        torch.set_num_threads(cpu_threads)


def transformer_op_macs(model: torch.nn.Module, rows: int) -> int:
    """The typical op of a transformer over ``rows`` sequences: their tokens (``context_length``, as
    open_clip's CLIP has it; else one per row) through the model's widest ``nn.Linear``."""
    widest = max((m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)), default=0)
    return rows * int(getattr(model, "context_length", 1)) * widest


def recheck_threads() -> None:
    """Re-apply the thread policy if its interval has passed (cheap: call it every step of a
    loop); a no-op when threads are pinned or on a GPU."""
    if _policy is not None:
        _policy.recheck()


def autocast_dtype(device: torch.device) -> torch.dtype:
    """The low precision autocast uses for inference here: fp16 on a GPU; bf16 on a CPU, whose
    fp16 matmuls have no fast kernels."""
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def group_rank() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    return (dist.get_rank(), _group_size()) if _group_size() > 1 else (0, 1)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of rank ``rank``'s contiguous share of ``n`` rows (balanced, in rank order)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def gather_to_main(obj) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0, None on the others (``[obj]`` without a group).
    Only rank 0 needs the parts, so this is a gather, not an all-gather."""
    rank, world_size = group_rank()
    if world_size == 1:
        return [obj]
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank: its decisions, which the others follow."""
    if _group_size() == 1:
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


GatherGradient = Literal["all_ranks", "local_only"]


class _Gather(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the sum, over every rank's loss, of
    the gradient on this rank's slice (what torch.distributed.nn's deprecated all_gather does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = len(x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


class _GatherLocalGradient(_Gather):
    """All-gather whose backward hands each rank only its own slice of *its own* incoming
    gradient, dropping what the other ranks' losses put on this rank's vectors (the official
    code's GatherLayer)."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(x: torch.Tensor, gradient: GatherGradient = "all_ranks") -> torch.Tensor:
    """Concatenate ``x`` (the same shape on every rank) from every rank along dim 0.

    ``gradient``: ``all_ranks`` sums, in backward, the gradients every rank's loss puts on this
    rank's slice, which is what an in-batch contrastive loss
    over the global batch needs: every rank computes the same global loss, so with DDP's average
    the update is that loss's gradient. ``local_only`` keeps only this rank's own loss's gradient
    (the official GatherLayer): after DDP's average the gathered loss's gradient is 1/world_size
    of the true one, while per-rank losses (MSE, commitment) keep theirs.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return (_GatherLocalGradient if gradient == "local_only" else _Gather).apply(x)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def wrap_ddp(module: torch.nn.Module, info: "DistInfo", sync_buffers: bool = True) -> torch.nn.Module:
    """``module`` under DistributedDataParallel when the run is distributed, else itself.

    ``sync_buffers=False`` keeps rank-local buffers (the quantizer's, which it synchronises
    itself). torch 2.14 deprecates ``broadcast_buffers`` but tells users who rely on buffers *not*
    being synchronised at init to keep it until its replacement exists, so its warning is
    silenced here, at the one place that passes it."""
    if not info.enabled:
        return module
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    if sync_buffers:
        return DistributedDataParallel(module, device_ids=device_ids)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
