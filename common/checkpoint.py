"""Checkpoint IO: training state for resume, strict state-dict loading, and reading any checkpoint a
user points at without letting it run code."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any, Iterable, Mapping

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
    save_own_checkpoint({**state, "epoch": epoch, "step": step}, path)
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


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict) -> None:
    """Restore a GradScaler from a checkpoint, across devices and precision settings: a scaler
    saved disabled (a CPU run, or amp off) has an empty state, so the live one starts fresh; a
    disabled live scaler has nothing to restore."""
    if state and scaler.is_enabled():
        scaler.load_state_dict(state)


def rng_state() -> dict:
    """Python's, numpy's and torch's global RNG states as plain data (what ``weights_only`` reads)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)}}


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    numpy = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((numpy["kind"], np.array(numpy["keys"], dtype=np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])


# ---- reading files a user points at ---------------------------------------------------------
class UnsafeCheckpointError(ValueError):
    """A checkpoint that needs more than the allowed contents to unpickle, i.e. could run code."""


PLAIN_CONTENTS = "tensors, plain containers"


def safe_load(source: str | os.PathLike | IO[bytes], stand_ins: Iterable[tuple[Any, str]] = (),
              contents: str = PLAIN_CONTENTS, name: str | os.PathLike | None = None, hint: str = "",
              mmap: bool = False) -> Any:
    """``torch.load`` through torch's ``weights_only`` unpickler, which builds only tensors and plain
    data and calls nothing else. ``stand_ins`` pairs (object, "module.Name") let the named globals
    resolve to our own inert objects instead of importing the real ones. Anything else is refused
    with one line naming the file (``name``, default ``source``), what it needed and ``hint``.
    ``mmap``: map the tensors' storage instead of reading it (a file path only)."""
    name = source if name is None else name
    with torch.serialization.safe_globals(list(stand_ins)), warnings.catch_warnings():
        # torch's note on a pickle of another protocol, printed before the one line this ends in
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        try:
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            if _malformed(err):
                raise CorruptCheckpointError(_unreadable(name, err, hint)) from None
            raise UnsafeCheckpointError(_refusal(source, name, contents, hint)) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, AttributeError, IndexError, TypeError,
                ValueError, OverflowError) as err:
            # torch's zip reader on a truncated or overwritten file, or a pickle cut short or damaged
            # (the weights-only unpickler then fails on its stack, its memo or a stand-in's arguments)
            raise CorruptCheckpointError(_unreadable(name, err, hint)) from None
        except OSError as err:
            if err.errno != errno.EINVAL:  # missing or not readable: the caller's message names the file
                raise
            # mapping (``mmap``) a file cut short: its zip directory points past the end
            raise CorruptCheckpointError(_unreadable(name, err, hint)) from None


def _malformed(err: pickle.UnpicklingError) -> bool:
    """An unpickling error from damaged bytes, not from a refused global."""
    text = str(err)
    return "Unsupported global" not in text and "not an allowed global" not in text and "GLOBAL" not in text


def _unreadable(name: str | os.PathLike, err: BaseException, hint: str) -> str:
    # torch's weights-only failures open with a paragraph advising to turn that check off (which would
    # run the file's code); the cause itself follows "WeightsUnpickler error:"
    text = str(err).split("WeightsUnpickler error:", 1)[-1].split("Check the documentation of torch.load")[0]
    detail = " ".join(text.split())[:160]
    return (f"{name}: cannot be read: the file is truncated, corrupt or not a PyTorch checkpoint ({detail})"
            f"{'; ' + hint if hint else ''}")


def _refusal(source: str | os.PathLike | IO[bytes], name: str | os.PathLike, contents: str, hint: str) -> str:
    if hasattr(source, "seek"):
        source.seek(0)
    try:  # a static read of the pickle's opcodes: nothing is built or called
        needed = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(source))
    except (ValueError, pickle.UnpicklingError, RuntimeError, EOFError):  # not a zip checkpoint, or malformed
        needed = []
    if needed:
        what = "the Python object" + ("s " if len(needed) > 1 else " ") + ", ".join(f"'{n}'" for n in needed)
        verb = "are not among" if len(needed) > 1 else "is not one of"
        reason = f"it needs {what}, which {verb} the allowed checkpoint contents ({contents})"
    else:
        reason = f"it holds more than the allowed checkpoint contents ({contents})"
    return f"{name}: refused to load: {reason}; this file could run code when loaded{'; ' + hint if hint else ''}"


# ---- the project's own checkpoints: a content digest written in, checked on every read -------
CONTENT_KEY = "content_sha256"


class CorruptCheckpointError(ValueError):
    """A checkpoint whose bytes no longer match the digest written into it."""


class OlderCheckpointError(CorruptCheckpointError):
    """A checkpoint without the content digest: written by an older version of this code (or not
    by it at all), so its content cannot be checked."""


def content_digest(obj: Any) -> str:
    """SHA-256 over a checkpoint's whole content: every tensor's name, dtype, shape and bytes and
    every plain value, in a fixed order (dict keys sorted), so it does not depend on pickling."""
    digest = hashlib.sha256()

    def feed(node: Any, where: str) -> None:
        if isinstance(node, torch.Tensor):
            tensor = node.detach().cpu().contiguous()
            digest.update(f"T|{where}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            if tensor.numel():
                digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        elif isinstance(node, Mapping):
            digest.update(f"D|{where}|{len(node)}|".encode())
            for key in sorted(node, key=repr):
                feed(node[key], f"{where}.{key!r}")
        elif isinstance(node, (list, tuple)):
            digest.update(f"L|{where}|{len(node)}|".encode())
            for i, item in enumerate(node):
                feed(item, f"{where}[{i}]")
        else:
            digest.update(f"V|{where}|{json.dumps(node, default=repr)}|".encode())

    feed(obj, "")
    return digest.hexdigest()


def save_own_checkpoint(obj: dict, path: str | os.PathLike) -> str:
    """Write ``obj`` atomically with its content digest inside; returns the digest."""
    digest = content_digest(obj)
    atomic_torch_save({**obj, CONTENT_KEY: digest}, path)
    return digest


# The final checkpoints of the stages, told apart by what only each records (a generator's and an
# rq.pt's top-level keys are alike; their archs are not).
OWN_KINDS = {
    "rq": ("an rq.pt (genius train-rq)", lambda obj: "num_levels" in (obj.get("arch") or {})),
    "generator": ("a generator.pt (genius train-gen)", lambda obj: "d_model" in (obj.get("arch") or {})),
    "clip": ("a CLIP-SF checkpoint (genius train-clip)", lambda obj: "model_config" in obj),
}


def load_own_checkpoint(path: str | os.PathLike, verify: bool = True, mmap: bool = False,
                        kind: str | None = None) -> dict:
    """Load a checkpoint this project wrote (tensors and plain Python data only) and check its
    content against the digest written into it: a flipped byte or a truncated file is refused,
    naming the file, instead of changing results silently. ``verify=False`` with ``mmap=True``
    reads only the recorded metadata cheaply (the digest is checked where the weights are used).
    ``kind`` (an ``OWN_KINDS`` key): the stage's checkpoint expected; another one is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint does not exist")
    obj = check_own_content(safe_load(path, hint=_OWN_HINT, mmap=mmap), path, verify)
    if kind is not None and not OWN_KINDS[kind][1](obj):
        found = next((what for what, test in OWN_KINDS.values() if test(obj)), "another checkpoint")
        raise CheckpointMismatchError(f"{path}: this is {found}, not {OWN_KINDS[kind][0]} as expected here; point "
                                      "the setting at the right file")
    return obj


_OWN_HINT = "delete it and re-run the stage that writes it"


def check_own_content(obj: Any, path: str | os.PathLike, verify: bool = True) -> dict:
    """``obj`` (read from ``path``) if it is one of our checkpoints whose content matches its digest."""
    if not isinstance(obj, dict) or CONTENT_KEY not in obj:
        raise OlderCheckpointError(f"{path}: not a checkpoint written by this version of genius (no content "
                                     f"digest); {_OWN_HINT}")
    if verify and content_digest({k: v for k, v in obj.items() if k != CONTENT_KEY}) != obj[CONTENT_KEY]:
        raise CorruptCheckpointError(f"{path}: the content does not match the digest written into it (the file "
                                     f"is corrupt); {_OWN_HINT}")
    return obj


# ---- official checkpoints -----------------------------------------------------------------
class _ConfigPart:
    """Takes the place of every class an OmegaConf config pickle names, so a UniIR/GENIUS file's
    ``config`` entry is read without omegaconf and without running any of its code: it only keeps
    what the pickle hands it (the config is never used; GENIUS itself reads only ``model``)."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _resolver_cache(*_: Any) -> dict:
    """OmegaConf's resolver cache is a ``defaultdict(dict)``; a plain dict holds the same entries."""
    return {}


# Everything a pickled OmegaConf DictConfig refers to (checked against omegaconf 2.4 pickles of
# YAML-loaded configs with nested sections, lists, ints, floats, strings, bools and nulls): the
# container and value-node classes, their metadata dataclasses, the types that metadata records,
# and the resolver cache. torch's own allow-list covers the rest of these files (tensors, the
# optimizer, scheduler and GradScaler state dicts).
OFFICIAL_STAND_INS: tuple[tuple[Any, str], ...] = (
    *((_ConfigPart, name) for name in (
        "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.nodes.AnyNode",
        "omegaconf.base.Metadata", "omegaconf.base.ContainerMetadata",
        "typing.Any", "builtins.dict", "builtins.list", "builtins.int")),
    (_resolver_cache, "collections.defaultdict"),
)
OFFICIAL_CONTENTS = "tensors, plain containers, OmegaConf configs"


def read_official_file(path: str | os.PathLike) -> Any:
    """Whatever a UniIR/GENIUS/open_clip ``.pth`` file holds, unpickled under ``OFFICIAL_STAND_INS``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return safe_load(path, OFFICIAL_STAND_INS, OFFICIAL_CONTENTS)


def official_checkpoint(obj: Any, path: str | os.PathLike) -> dict:
    """``obj`` as a dict whose ``model`` is the state dict (a bare state dict gets wrapped)."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), Mapping):
        return obj
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}
    raise CheckpointMismatchError(f"{path}: expected a dict with a 'model' state dict, got {type(obj).__name__}")


def load_official_checkpoint(path: str | os.PathLike) -> dict:
    """Read a UniIR/GENIUS ``.pth`` file: a dict whose ``model`` holds the state dict, beside the
    optimizer, scheduler and GradScaler states and a pickled OmegaConf ``config`` (an inert
    ``_ConfigPart`` here). Nothing outside tensors, plain data and those stand-ins is unpickled."""
    return official_checkpoint(read_official_file(path), path)
