"""What the three trainers (train-clip, train-rq, train-gen) share: the optimiser and schedule
builders, the optimiser step under loss scaling, RNG state across ranks, the global-batch checks,
and the resume point of a run folder.

Run state (skip / resume / set aside, ``force``, the folder lock) is :mod:`genius.common.runstate`;
this module adds what is particular to training on top of it.

**Global batch and world size, one policy for the three stages.** A run's key records the
*global* batch (``batch_size`` x processes) instead of the per-process ``batch_size``, so a run
is the same run on 1 x 64 as on 2 x 32 (the batches, the step count and the schedule are the
same). Every checkpoint holds every rank's RNG state (Python, NumPy, torch, CUDA) and the
process count. Then:

- *same process count*: every rank restores its own RNG state, and a resumed run ends
  bit-identical to an uninterrupted one (on the CPU; GPU kernels may not be deterministic);
- *another process count, same global batch*: the run resumes, and every rank is reseeded
  deterministically from (seed, position in the run, rank); one warning says that the rest of
  the run will not be bit-identical to an uninterrupted one (the random streams differ, and so
  does the order of float sums across ranks);
- *another process count that changes the global batch* (the same ``batch_size`` on another
  number of processes): refused with one line naming the key to set to keep the global batch,
  or ``force`` to start a new run. A stage whose result depends on the process count itself
  (train-rq with ``train.contrastive_gather=local_only``) records it in the key as well, and a
  change is refused the same way.
- a changed ``batch_size`` on the same number of processes is a changed config: the old run is
  set aside and a new one starts, as for any other setting.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch
import torch.distributed as dist

from genius.common.checkpoint import (OlderCheckpointError, UnsafeCheckpointError, latest_checkpoint,
                                      load_own_checkpoint, rng_state, set_rng_state)
from genius.common.distributed import DistInfo, seed_everything
from genius.common.io import atomic_write_text
from genius.common.runstate import RunKey, RunState

log = logging.getLogger("genius")


# ---- optimiser and schedules ---------------------------------------------------------------
def matrices_decay(name: str, param: torch.Tensor) -> bool:
    """The default weight-decay rule: matrices (ndim >= 2) decay; gains, biases, scalars do not."""
    return param.ndim >= 2


def adamw(model: torch.nn.Module, *, lr: float, weight_decay: float, eps: float,
          betas: Iterable[float] = (0.9, 0.999),
          decays: Callable[[str, torch.Tensor], bool] = matrices_decay) -> torch.optim.AdamW:
    """AdamW over the trainable parameters in two groups, in this order: those ``decays`` says
    are weight-decayed (``weight_decay``), then the others (0). Each tied tensor appears once."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


WarmupStart = Literal["first_step", "zero"]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  start: WarmupStart = "first_step") -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 0 at ``total_steps``; stepped per optimiser step.

    Warm-up factor at step t (from 0): ``first_step``: (t + 1) / warmup, so the first update
    already moves the weights and the last warm-up step reaches lr; ``zero``: t / warmup, the
    official GENIUS code's, whose first update has lr 0. A warm-up longer than the run is cut to
    ``total_steps - 1`` steps."""
    warmup = min(warmup_steps, max(total_steps - 1, 0))
    offset = 1 if start == "first_step" else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + offset) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cosine_to_floor(optimizer: torch.optim.Optimizer, total_steps: int,
                    floor: float) -> torch.optim.lr_scheduler.CosineAnnealingLR:
    """Cosine from lr to ``floor`` over ``total_steps`` without warm-up (torch's recursive
    CosineAnnealingLR, as the official GENIUS stage 1 steps it per iteration)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=floor)


def grad_scaler(amp: bool, device: torch.device) -> torch.amp.GradScaler:
    """fp16 loss scaling where fp16 autocast runs: on a GPU with ``amp`` on; disabled otherwise."""
    return torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")


def optimizer_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, clip: tuple[Iterable, float] | None = None) -> bool:
    """The optimiser step of a loss ``scaler.scale(loss).backward()`` has back-propagated, then
    the schedule's step unless the scaler skipped the optimiser's (inf/NaN gradients under fp16
    loss scaling): a skipped step is no step of the schedule. ``clip`` (parameters, max norm)
    clips the unscaled gradients' norm first. Returns whether the optimiser stepped.

    The skip is seen through the optimiser's post-step hook, so finding out costs no host sync;
    with the scaler disabled the calls are exactly ``optimizer.step(); scheduler.step()``."""
    if clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(clip[0], clip[1])
    stepped = []
    hook = optimizer.register_step_post_hook(lambda *_: stepped.append(True))
    try:
        scaler.step(optimizer)
    finally:
        hook.remove()
    scaler.update()
    if stepped:
        scheduler.step()
    return bool(stepped)


# ---- global batch ----------------------------------------------------------------------------
def batch_extra(batch_size: int, world_size: int) -> dict:
    """What a run key records about batching: the global batch, not the per-process size."""
    return {"global_batch": batch_size * world_size}


def steps_per_epoch(num_pairs: int, batch_size: int, world_size: int, batch_key: str) -> int:
    """Full global batches per epoch (an incomplete last one is dropped); none is an error."""
    steps = num_pairs // (batch_size * world_size)
    if steps == 0:
        raise ValueError(f"{batch_key}: {num_pairs} training pairs do not fill one global batch of {batch_size} x "
                         f"{world_size} process(es); lower {batch_key}")
    return steps


def check_world_size(recorded: dict | None, recorded_world: int | None, run: RunState, world_size: int,
                     where: Path, batch_key: str, force_key: str) -> None:
    """Refuse to go on with a run that differs from the recorded one only through the process
    count (see the module docstring); anything else is left to ``RunState``."""
    if not isinstance(recorded, dict) or recorded_world in (None, world_size):
        return
    key = run.key
    if recorded.get("config") != key.config or recorded.get("inputs") != key.inputs:
        return  # another run anyway: it is set aside
    old, new = recorded.get("extra", {}), key.extra
    if old == new:
        return
    old_batch, new_batch = old.get("global_batch"), new.get("global_batch")
    fix = [f"run with {recorded_world} process(es)"]
    if old_batch != new_batch and isinstance(old_batch, int) and old_batch % world_size == 0 and \
            {k for k in set(old) | set(new) if old.get(k) != new.get(k)} == {"global_batch"}:
        fix.insert(0, f"set {batch_key}={old_batch // world_size} to keep its global batch of {old_batch}")
    raise ValueError(f"{where}: the run there was made by {recorded_world} process(es) ({_describe(old)}); this one "
                     f"has {world_size} ({_describe(new)}); {' or '.join(fix)} to go on with it, or set "
                     f"{force_key}=true to start a new run (the old one moves to stale/)")


def _describe(extra: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(extra.items()))


# ---- RNG state across ranks ------------------------------------------------------------------
def gather_rng_states(info: DistInfo) -> list[dict]:
    """Every rank's RNG state (host generators and the CUDA one), gathered for rank 0 to save."""
    state = {"host": rng_state(), "cuda": torch.cuda.get_rng_state() if info.device.type == "cuda" else None}
    if not info.enabled:
        return [state]
    states = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(states: list[dict], info: DistInfo, seed: int, position: tuple[int, ...]) -> None:
    """This rank's RNG state from a checkpoint's ``states``; with another process count, a
    deterministic reseed from (seed, ``position``, rank) instead (see the module docstring)."""
    if len(states) == info.world_size:
        own = states[info.rank]
        set_rng_state(own["host"])
        if own.get("cuda") is not None and info.device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda"])
        return
    if info.is_main:
        log.warning("resuming a run saved by %d process(es) with %d: every rank is reseeded from the seed and its "
                    "position in the run, so the rest of the run is not bit-identical to an uninterrupted one",
                    len(states), info.world_size)
    digest = hashlib.sha256(json.dumps([seed, list(position), info.rank]).encode()).digest()
    seed_everything(int.from_bytes(digest[:4], "little"))


# ---- where a run starts ------------------------------------------------------------------------
def resume_point(run: RunState, info: DistInfo, *, batch_key: str, force_key: str) -> dict | None:
    """For a run that is not done: the newest training checkpoint in the folder when it belongs
    to this run (its ``run_key``), else None after whatever the folder holds was set aside. A
    corrupt checkpoint is an error naming it; a run of another process count is refused
    (:func:`check_world_size`). Call it on every rank, inside ``run.hold()``."""
    path = latest_checkpoint(run.out_dir)
    checkpoint = None
    if path is not None:
        try:
            checkpoint = load_own_checkpoint(path)
        except (UnsafeCheckpointError, OlderCheckpointError) as err:
            # Our own run folder, holding a checkpoint an older version of this code wrote (no
            # content digest, or numpy objects in its RNG state): it cannot be checked or read
            # safely, so its run is set aside below like a run of another key: never loaded, never
            # deleted.
            log.warning("%s: cannot resume from it (%s)", run.stage, str(err).split("; ")[0])
    if checkpoint is not None:
        recorded, recorded_world, where = checkpoint.get("run_key"), checkpoint.get("world_size"), path
    else:
        recorded, recorded_world, where = run.recorded(), _done_world_size(run), run.out_dir / "done.json"
    if not run.force:
        check_world_size(recorded, recorded_world, run, info.world_size, where, batch_key, force_key)
    if run.start(checkpoint.get("run_key") if checkpoint is not None else None):
        return checkpoint
    return None


def _done_world_size(run: RunState) -> int | None:
    try:
        return json.loads((run.out_dir / "done.json").read_text()).get("world_size")
    except (OSError, ValueError, AttributeError):
        return None


def skip_if_done(run: RunState, final: Path, force_key: str) -> bool:
    """True (and one log line) when the folder holds this run finished: done.json records its key
    and the final file is there, as the run wrote it. A final file cut short or changed since is
    made again: the run resumes from its last checkpoint (which re-writes it at once), or, with no
    checkpoint left, is set aside and trains afresh."""
    if run.is_done() and final.is_file():
        changed = run.finals_changed()
        if changed:
            log.warning("%s: %s; making it again", run.stage, changed)
            return False
        log.info("%s: %s is up to date with its config and inputs; nothing to do (set %s=true to retrain)",
                 run.stage, final, force_key)
        return True
    return False


def checkpoint_record(run: RunState, info: DistInfo) -> dict:
    """What every training checkpoint records besides the training state."""
    return {"run_key": run.key.as_dict(), "world_size": info.world_size}


def keep_metrics(path: Path, keep: Callable[[dict], bool]) -> None:
    """Drop the lines of ``metrics.jsonl`` that ``keep`` rejects (those an interrupted attempt
    logged past the checkpoint a run resumes from), so a resumed run's log has each step once."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
        atomic_write_text(path, "".join(line + "\n" for line in lines))


def run_outputs(final: str) -> tuple[str, ...]:
    """What a training run writes in its folder, logs included: all of it moves to stale/ together."""
    return (final, "checkpoints", "metrics.jsonl", "config.yaml", "training_curves.png")


def make_run(out_dir: str | os.PathLike, key: RunKey, final: str, *, stage: str, force: bool,
             info: DistInfo) -> RunState:
    return RunState(out_dir, key, run_outputs(final), stage=stage, force=force, is_main=info.is_main)
