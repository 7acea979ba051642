"""Process-group set-up and the collectives the training stages need.

Runs the same code single-process (no torchrun) and under torchrun: NCCL on GPUs, gloo on CPU,
so multi-process behaviour is testable on a CPU-only machine.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

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


def init_distributed(device: str = "auto", cpu_threads: int | None = None) -> DistInfo:
    """Join the torchrun process group if launched by torchrun; otherwise a world of one.

    ``cpu_threads``: torch threads per process when running on the CPU (None: torch's default,
    one per core). On shared cores fewer threads can be much faster: an op with a descheduled
    thread waits for it."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no GPU is available; use device: cpu or auto")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
    return DistInfo(rank, world_size, local_rank, dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping gradients for every slice.

    torch.distributed.nn's all_gather sums incoming gradients across ranks in backward, so each
    rank's local embeddings receive the gradient of the loss terms computed on *all* ranks, which
    is what an in-batch contrastive loss over the global batch needs. (The official code's
    GatherLayer returned only the local slice's gradient.)
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


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
