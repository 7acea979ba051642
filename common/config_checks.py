"""Checks a stage runs on its config before any work: numbers in range, input paths present.

Each failure is a ``ValueError`` (``FileNotFoundError`` for a missing path) whose one line names
the dotted config key, what is wrong and the allowed range, so ``user_errors_exit`` prints e.g.::

    genius extract: error: runtime.batch_size: -1 is out of range; it must be an integer >= 1 (fix the config or --set runtime.batch_size=...)
"""
from __future__ import annotations

import math
import os
from pathlib import Path


def _describe(lo: float | None, hi: float | None, integer: bool, lo_open: bool, hi_open: bool) -> str:
    kind = "an integer" if integer else "a number"

    def show(bound: float) -> str:  # an integer's bounds in full (4294967295, not 4.29497e+09)
        return str(int(bound)) if integer and float(bound).is_integer() else f"{bound:g}"

    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{show(lo)}, {show(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {show(lo)}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {show(hi)}"
    return kind


def check_number(key: str, value, *, lo: float | None = None, hi: float | None = None, integer: bool = False,
                 lo_open: bool = False, hi_open: bool = False, optional: bool = False) -> None:
    """``value`` (of config key ``key``) must be a finite number within the bounds (None: unbounded);
    ``optional``: None is allowed too."""
    if value is None and optional:
        return
    allowed = _describe(lo, hi, integer, lo_open, hi_open) + (" or null" if optional else "")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if ok:
        ok = math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise ValueError(f"{key}: {value!r} is out of range; it must be {allowed} "
                         f"(fix the config or --set {key}=...)")


def check_file(key: str, path: str | os.PathLike, what: str = "file") -> Path:
    """The input file named by config key ``key`` must exist."""
    path = Path(path)
    if not path.is_file():
        where = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{key}: {path} {where}; point {key} at the {what} "
                                "(relative paths resolve against $GENIUS_ROOT or the repository)")
    return path


def check_output_dir(key: str, path: str | os.PathLike) -> Path:
    """The output folder named by config key ``key`` must be a folder or not exist yet (it is
    created), and no part of its path a file: checked before any work."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise NotADirectoryError(f"{key}: {part} is a file, not a folder; point {key} at a folder "
                                         "(it is created if missing)")
            break
    return path


def check_dir(key: str, path: str | os.PathLike, what: str = "folder") -> Path:
    """The input folder named by config key ``key`` must exist."""
    path = Path(path)
    if not path.is_dir():
        where = "is a file, not a folder" if path.is_file() else "does not exist"
        raise FileNotFoundError(f"{key}: {path} {where}; point {key} at the {what} "
                                "(relative paths resolve against $GENIUS_ROOT or the repository)")
    return path
