"""Run state, the one mechanism every stage uses to decide whether to redo its work.

A stage describes *what* its output depends on as a :class:`RunKey`: the semantic part of its
config (every key but those it names as logging, cadence, device or output paths) and the
fingerprints of its input files. :class:`RunState` then decides, the same way for every stage:

- **skip** when ``done.json`` in the output folder records the same key (and ``force`` is off);
- **resume** when the newest training checkpoint carries the same key;
- otherwise **archive** whatever a previous run left (outputs *and* logs) under
  ``stale/<time>/``, saying in one log line what changed, and start afresh. ``force`` archives
  a finished run too, so it always retrains.

Fingerprints hold paths relative to the GENIUS_ROOT (or repository) they live in, so a finished
root copied or moved elsewhere (with its files' times kept: ``cp -a``, ``rsync -a``) is still
done. Files named as inputs are fingerprinted by content (size and SHA-256); the many images an
extraction reads by size and modification time (:func:`files_digest`); artefacts this project
writes carry a content fingerprint of their own, which is what a later stage's key records.

The folder is held by one writer at a time (:meth:`RunState.hold`): a second run exits naming the
live holder, and the lock of a killed run is taken over (the OS drops a dead process's lock).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from genius.common.io import atomic_write_json, sha256_json

log = logging.getLogger("genius")

DONE_FILE = "done.json"
LOCK_FILE = ".lock"
STALE_DIR = "stale"


class RunLockedError(ValueError):
    """Another live process holds the output folder."""


# ---- fingerprints -----------------------------------------------------------------------------
def portable_path(path: str | os.PathLike) -> str:
    """``path`` as a run key records it: relative to the project root (``$GENIUS_ROOT`` or the
    repository) when it lies inside it, else absolute."""
    from genius.common.config import project_root

    path = Path(os.path.abspath(path))
    root = Path(os.path.abspath(project_root()))
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


_SHA_CACHE: dict[tuple, str] = {}


def content_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, remembered per (file, size, mtime) within the process."""
    from genius.common.io import sha256_file

    st = os.stat(path)
    cache_key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if cache_key not in _SHA_CACHE:
        _SHA_CACHE[cache_key] = sha256_file(path)
    return _SHA_CACHE[cache_key]


def file_content(path: str | os.PathLike) -> dict:
    """An input file's fingerprint for a run key: portable path, size and content hash."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: input file does not exist")
    return {"path": portable_path(path), "size": os.path.getsize(path), "sha256": content_sha256(path)}


def files_digest(paths: Iterable[str | os.PathLike], relative_to: str | os.PathLike) -> str:
    """One digest of many files' (path relative to ``relative_to``, size, mtime): cheap enough for
    every image an extraction reads, and it changes when any of them is replaced."""
    base = Path(os.path.abspath(relative_to))
    entries = []
    for p in paths:
        st = os.stat(p)
        rel = os.path.relpath(os.path.abspath(p), base)
        entries.append((Path(rel).as_posix(), st.st_size, st.st_mtime_ns))
    return sha256_json(sorted(entries))


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{"section.key": value}``."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, name + ".") if isinstance(value, dict) and value else {name: value})
    return flat


def semantic_config(cfg: Any, not_in_key: Iterable[str], added_later: dict | None = None) -> dict:
    """The flattened config without the dotted keys ``not_in_key`` (a key also drops its subtree).

    ``added_later`` maps keys that a later version added to the value every run before them
    computed with; at that value such a key stays out, so adding an option does not make every
    finished run look stale (and retrain) while nothing it computes has changed."""
    from genius.common.config import config_to_dict

    tree = config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else json.loads(json.dumps(cfg, default=str))
    drop, added_later = tuple(not_in_key), added_later or {}
    return {k: v for k, v in flatten(tree).items()
            if not any(k == d or k.startswith(d + ".") for d in drop)
            and not (k in added_later and v == added_later[k])}


@dataclasses.dataclass
class RunKey:
    """What a stage's output depends on: semantic config, input fingerprints, and extras
    (world size, device type...) the stage names."""

    config: dict
    inputs: dict
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, cfg: Any, not_in_key: Iterable[str], inputs: dict, *, added_later: dict | None = None,
           **extra: Any) -> "RunKey":
        """``added_later``: see ``semantic_config``."""
        return cls(semantic_config(cfg, not_in_key, added_later), json.loads(json.dumps(inputs, default=str)),
                   json.loads(json.dumps(extra, default=str)))

    def as_dict(self) -> dict:
        return {"config": self.config, "inputs": self.inputs, "extra": self.extra}

    @property
    def digest(self) -> str:
        return sha256_json(self.as_dict())

    def changes_from(self, old: dict | None) -> str:
        """One line naming what differs between a recorded key and this one."""
        if not isinstance(old, dict) or "config" not in old:
            return "it was made by an older version or its key is unreadable"
        parts = []
        old_cfg, old_in, old_extra = old.get("config", {}), old.get("inputs", {}), old.get("extra", {})
        keys = sorted(set(old_cfg) | set(self.config))
        changed = [k for k in keys if old_cfg.get(k, "<unset>") != self.config.get(k, "<unset>")]
        parts += [f"{k}: {old_cfg.get(k, '<unset>')!r} -> {self.config.get(k, '<unset>')!r}" for k in changed[:5]]
        if len(changed) > 5:
            parts.append(f"{len(changed) - 5} more config keys")
        parts += [f"input {name} changed" for name in sorted(set(old_in) | set(self.inputs))
                  if old_in.get(name) != self.inputs.get(name)]
        parts += [f"{name}: {old_extra.get(name)!r} -> {self.extra.get(name)!r}"
                  for name in sorted(set(old_extra) | set(self.extra)) if old_extra.get(name) != self.extra.get(name)]
        return "; ".join(parts) or "no difference in the key (an interrupted or forced run)"


# ---- the run folder -----------------------------------------------------------------------------
class RunState:
    """One stage's output folder: skip, resume or archive, and one writer at a time.

    ``outputs``: the names (files or folders) a run of this stage writes in ``out_dir``, logs
    included; they move together to ``stale/<time>/`` when the run is set aside. Only the main
    process (``is_main``) writes, archives and holds the lock; the others follow its decisions
    through ``barrier`` (a no-op without ``torch.distributed``).
    """

    def __init__(self, out_dir: str | os.PathLike, key: RunKey, outputs: Iterable[str], *, stage: str,
                 force: bool = False, is_main: bool = True):
        self.out_dir, self.key, self.stage = Path(out_dir), key, stage
        self.outputs = tuple(dict.fromkeys([*outputs, DONE_FILE]))
        self.force, self.is_main = force, is_main
        self._lock_fd: int | None = None

    # -- the decisions --------------------------------------------------------------------------
    def recorded(self) -> dict | None:
        """The key recorded by the finished run in the folder (None: no finished run)."""
        done = self.out_dir / DONE_FILE
        if not done.is_file():
            return None
        try:
            return json.loads(done.read_text()).get("key")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return {}

    def is_done(self) -> bool:
        """A finished run of this same key is in the folder (and ``force`` does not ask to redo it)."""
        recorded = self.recorded()
        return not self.force and recorded is not None and sha256_json(recorded) == self.key.digest

    def matches(self, recorded_key: dict | None) -> bool:
        """Whether a checkpoint's recorded key (``checkpoint["run_key"]``) is this run's key."""
        return not self.force and isinstance(recorded_key, dict) and sha256_json(recorded_key) == self.key.digest

    def start(self, checkpoint_key: dict | None = None) -> bool:
        """Before training or writing: returns True when the checkpoint whose key is
        ``checkpoint_key`` may be resumed; otherwise sets aside whatever a previous run left in
        the folder and returns False. Call it on every rank (the main one moves the files)."""
        from genius.common.distributed import barrier

        if checkpoint_key is not None and self.matches(checkpoint_key):
            log.info("%s: resuming the run in %s", self.stage, self.out_dir)
            return True
        old = checkpoint_key if checkpoint_key is not None else self.recorded()
        barrier()  # every rank has read the old run before the main one moves it
        if self.is_main and self.leftovers():
            reason = "train.force / force asks to redo it" if self.force else self.key.changes_from(old)
            self.archive(reason)
        barrier()
        return False

    def leftovers(self) -> list[str]:
        return [name for name in self.outputs if (self.out_dir / name).exists()]

    def output_files(self) -> list[Path]:
        """Every file the run's outputs hold now (folders walked), in a stable order."""
        paths = [self.out_dir / name for name in self.leftovers()]
        return sorted(f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())

    def archive(self, reason: str) -> Path:
        """Move the previous run's outputs and logs into ``stale/<time>/`` (never deleted: it may
        be the run someone wanted), with one log line saying why."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target, n = self.out_dir / STALE_DIR / stamp, 1
        while target.exists():  # two runs set aside within one second
            target, n = self.out_dir / STALE_DIR / f"{stamp}-{n}", n + 1
        target.mkdir(parents=True)
        for name in self.leftovers():
            shutil.move(str(self.out_dir / name), str(target / name))
        log.warning("%s: the previous run in %s differs (%s); it moved to %s and this run starts afresh",
                    self.stage, self.out_dir, reason, target)
        return target

    def finish(self, finals: Iterable[str | os.PathLike] = (), **summary: Any) -> None:
        """Record the finished run (atomically, last): the folder is now done for this key.
        ``finals``: the files the run's results are read from, whose sizes and content hashes are
        recorded with it, so that one cut short, changed or deleted afterwards is not taken as the
        run's (:meth:`finals_changed`)."""
        if self.is_main:
            record = {"key": self.key.as_dict(), "digest": self.key.digest, "stage": self.stage,
                      "finished": time.time(), **summary}
            record["finals"] = {Path(path).relative_to(self.out_dir).as_posix(): {
                "size": os.path.getsize(path), "sha256": content_sha256(path)} for path in finals}
            atomic_write_json(self.out_dir / DONE_FILE, record)

    def finals_changed(self) -> str | None:
        """The first file the finished run recorded that is no longer as it wrote it, and how
        (None: all as written, or a run finished before runs recorded their files). Sizes first: a
        file cut short or deleted is told without reading anything."""
        try:
            recorded = json.loads((self.out_dir / DONE_FILE).read_text()).get("finals")
        except (OSError, ValueError, AttributeError):
            return None
        if not isinstance(recorded, dict):
            return None
        entries = {name: entry if isinstance(entry, dict) else {} for name, entry in recorded.items()}
        for name, entry in entries.items():
            path = self.out_dir / name
            if not path.is_file():
                return f"{path} is missing"
            size = os.path.getsize(path)
            if size != entry.get("size"):
                return f"{path} is not the file its finished run wrote (it has {size:,} bytes, not {entry.get('size')})"
        for name, entry in entries.items():
            if content_sha256(self.out_dir / name) != entry.get("sha256"):
                return f"{self.out_dir / name} is not the file its finished run wrote (its content differs)"
        return None

    # -- one writer ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def hold(self) -> Iterator["RunState"]:
        """Hold the folder's lock for the block (main process only). A folder held by a live run
        is refused with a message naming it; a lock file left by a killed run is taken over."""
        if not self.is_main:
            yield self
            return
        self._lock_fd = acquire_lock(self.out_dir, self.stage)
        try:
            yield self
        finally:
            release_lock(self._lock_fd)
            self._lock_fd = None


def acquire_lock(folder: str | os.PathLike, holder: str) -> int:
    """Take ``folder/.lock`` (an advisory ``flock``, which the OS releases when its process dies,
    however it dies). Returns the descriptor to pass to :func:`release_lock`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise RunLockedError(f"{folder}: another run is writing here ({describe_holder(path)}); wait for it to "
                             f"finish, or stop it, or choose another output folder") from None
    previous = describe_holder(path)
    if previous != "holder unknown":
        log.warning("%s: taking over the lock left by a run that is no longer running (%s)", folder, previous)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "stage": holder,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def release_lock(fd: int | None) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # an empty lock file: nobody holds it
    os.close(fd)


def describe_holder(lock_path: Path) -> str:
    try:
        record = json.loads(lock_path.read_text() or "null")
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        return "holder unknown"
    return (f"{record.get('stage', 'a genius stage')}, process {record.get('pid')} on {record.get('host')}, "
            f"started {record.get('started')}")
