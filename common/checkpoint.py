"""Checkpoint IO: training state for resume, strict state-dict loading, official-file unpickling."""
from __future__ import annotations

import os
import pickle
import re
import types
from pathlib import Path
from typing import Any, Mapping

import torch

from genius.common.io import atomic_torch_save

# epoch_0003.pt: epoch 3 finished; epoch_0003_step_0000500.pt: 500 steps of epoch 3 done.
_CHECKPOINT_RE = re.compile(r"^epoch_(\d+)(?:_step_(\d+))?\.pt$")


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the model: lists missing, unexpected and mis-shaped tensors."""


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any], what: str) -> None:
    """Raise naming every missing, unexpected and wrongly shaped tensor (nothing silently skipped)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"{what} does not fit the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
        if shapes:
            lines.append(f"  wrong shapes ({len(shapes)}): {'; '.join(shapes[:20])}")
        raise CheckpointMismatchError("\n".join(lines))


def load_state_dict_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    check_state_dict(module.state_dict(), state, what)
    module.load_state_dict(state, strict=True)


# ---- training checkpoints -----------------------------------------------------------------
def checkpoint_file(run_dir: str | os.PathLike, epoch: int, step: int | None = None) -> Path:
    """The file of the state after ``epoch`` (``step`` None) or after ``step`` steps of it."""
    name = f"epoch_{epoch:04d}.pt" if step is None else f"epoch_{epoch:04d}_step_{step:07d}.pt"
    return Path(run_dir) / "checkpoints" / name


def save_training_checkpoint(run_dir: str | os.PathLike, epoch: int, state: dict, step: int | None = None) -> Path:
    """Atomically write the state after ``epoch``, or after ``step`` steps of it (model, optimizer,
    scheduler, scaler, rng...); the file records both (``step`` None: the epoch is complete)."""
    path = checkpoint_file(run_dir, epoch, step)
    atomic_torch_save({**state, "epoch": epoch, "step": step}, path)
    return path


def training_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoints, oldest first (a finished epoch sorts after any step of it)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m[1]), float("inf") if m[2] is None else int(m[2]), p)
             for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
    return [p for *_, p in sorted(found)]


def remove_step_checkpoints(run_dir: str | os.PathLike, keep: Path) -> None:
    """Delete the run's mid-epoch checkpoints except ``keep``: only the newest is ever resumed from."""
    for path in training_checkpoints(run_dir):
        if path != keep and _CHECKPOINT_RE.match(path.name)[2] is not None:
            path.unlink(missing_ok=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = training_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    import random

    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def load_own_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint this project wrote (it contains only tensors and plain Python data)."""
    return torch.load(path, map_location="cpu", weights_only=False)


# ---- official checkpoints -----------------------------------------------------------------
class _Opaque:
    """Stands in for classes of libraries we do not need (OmegaConf configs) while unpickling."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):
        return _Opaque(*args)


class _OfficialUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith("omegaconf") or (module == "typing" and name == "Any"):
            return _Opaque
        return super().find_class(module, name)


_official_pickle = types.ModuleType("genius_official_pickle")
_official_pickle.Unpickler = _OfficialUnpickler
_official_pickle.load = pickle.load
_official_pickle.__name__ = "pickle"


def load_official_checkpoint(path: str | os.PathLike) -> dict:
    """Read a UniIR/GENIUS ``.pth`` file: a dict whose ``model`` holds the state dict.

    Those files also pickle training objects (an OmegaConf config), which torch >= 2.6's default
    ``weights_only=True`` refuses and which would need omegaconf installed. We try the safe loader
    first and otherwise unpickle with the OmegaConf classes replaced by an inert stand-in, so
    nothing from the config is ever executed or needed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_official_pickle)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], Mapping):
        return obj
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}
    raise CheckpointMismatchError(f"{path}: expected a dict with a 'model' state dict, got {type(obj).__name__}")
