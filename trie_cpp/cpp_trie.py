"""The C++ backend: a thin wrapper that gives the pybind11 core (``_trie``) the shared API.

The core is imported on first use, so ``genius.trie_cpp`` imports (and the other backends work)
even where the extension has not been compiled.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .python_trie import check_mask, load_csr, save_csr


def _core():
    try:
        from . import _trie
    except ImportError as err:
        raise ImportError(
            "the C++ trie extension genius.trie_cpp._trie is not built; reinstall the package with "
            "`pip install -e .` from the repository root (or pick the 'python' trie backend)"
        ) from err
    return _trie


class CppTrie:
    backend = "cpp"

    def __init__(self, core):
        self._core = core

    # ---- construction and persistence -------------------------------------------------------
    @classmethod
    def build(cls, codes: np.ndarray) -> "CppTrie":
        codes = np.asarray(codes)
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"trie IDs must be integers, got dtype {codes.dtype}")
        if codes.dtype not in (np.int32, np.int64):
            codes = codes.astype(np.int64)  # the core reads only these two, in place
        return cls(_core().Trie.build(codes))

    def save(self, path: str | os.PathLike) -> None:
        levels = range(self.num_levels)
        save_csr(path, [self._core.child_start(d) for d in levels], [self._core.child_code(d) for d in levels])

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> "CppTrie":
        """Reads the shared file format; the core copies it into its compact uint32 offsets."""
        return cls(_core().Trie.from_csr(*load_csr(path, mmap=mmap)))

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return self._core.num_levels

    def __len__(self) -> int:
        return len(self._core)

    @property
    def nbytes(self) -> int:
        return self._core.nbytes

    def ids(self) -> np.ndarray:
        return self._core.ids()

    # ---- queries ---------------------------------------------------------------------------
    def root(self) -> int:
        return 0

    def children(self, prefix: Sequence[int]) -> np.ndarray:
        return self._core.children([int(code) for code in prefix])

    def advance(self, depth: int, nodes: np.ndarray, codes: np.ndarray) -> np.ndarray:
        nodes = np.ascontiguousarray(nodes, dtype=np.int64)
        codes = np.ascontiguousarray(codes, dtype=np.int64)
        return self._core.advance(depth, nodes, codes)

    def fill_mask(self, depth: int, nodes: np.ndarray, mask: np.ndarray) -> None:
        nodes = np.ascontiguousarray(check_mask(nodes, mask))
        self._core.fill_mask(depth, nodes, mask)
