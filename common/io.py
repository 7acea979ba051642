"""Atomic file output and content hashes.

Every output goes to a temporary name in the same directory and is renamed into place, so an
interrupted run never leaves a file (or a store) that a reader would accept. Fingerprints record
what an artefact was made from, so a later stage can refuse stale input.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700 directories
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json_object(path: str | os.PathLike, fix: str, error: type[ValueError] = ValueError) -> dict:
    """A JSON object a stage wrote (a meta.json, a manifest). Anything else, bytes that are not
    JSON or UTF-8 or a value that is not an object, raises ``error`` naming the file and ``fix``."""
    try:
        record = json.loads(Path(path).read_text())
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError alike
        raise error(f"{path}: not valid JSON ({' '.join(str(err).split())[:100]}); {fix}") from None
    if not isinstance(record, dict):
        raise error(f"{path}: holds a {type(record).__name__}, not a JSON object; {fix}")
    return record


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> dict:
    """What a record of a written file holds to tell it later from any other: size, modification
    time, SHA-256 (:func:`is_recorded_file`)."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def is_recorded_file(path: str | os.PathLike, record: Any) -> bool:
    """Whether ``path`` holds the bytes ``record`` (:func:`file_record`) describes. Size and time as
    recorded pass without reading the file (cheap to reuse); otherwise (a copy, or a file replaced)
    the file is hashed. No record (None: written before records were kept) passes, as before."""
    if record is None:
        return True
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return False
    st = os.stat(path)
    if st.st_size != record.get("size"):
        return False
    return st.st_mtime_ns == record.get("mtime_ns") or sha256_file(path) == record["sha256"]


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
