"""The ID trie behind constrained decoding, with three interchangeable backends.

- ``"cpp"``: the pybind11 core (``_trie``, compiled by ``pip install -e .``); the one to decode with.
- ``"python"``: the NumPy reference every other backend is tested against.
- ``"marisa"``: IDs as ``marisa_trie`` keys; compact but slow near the root (needs ``marisa-trie``).

All share one API (``build``, ``save``/``load``, ``num_levels``, ``len``, ``nbytes``, ``ids``,
``root``, ``children``, ``advance``, ``fill_mask``, ``backend``; see ``python_trie``) and one file
format, so a trie saved by one backend loads in any other.
"""
from __future__ import annotations

import os

import numpy as np

from .python_trie import ABSENT, PythonTrie

TRIE_BACKENDS = ("cpp", "python", "marisa")

__all__ = ["ABSENT", "TRIE_BACKENDS", "PythonTrie", "build_trie", "load_trie", "trie_class"]


def trie_class(backend: str) -> type:
    """The class implementing ``backend``; a ValueError naming the choices for an unknown name.

    Backend modules are imported here, on demand, so a missing extension or a missing
    ``marisa_trie`` only matters to whoever asks for that backend.
    """
    if backend == "cpp":
        from .cpp_trie import CppTrie

        return CppTrie
    if backend == "python":
        return PythonTrie
    if backend == "marisa":
        from .marisa_trie_backend import MarisaTrie

        return MarisaTrie
    raise ValueError(f"unknown trie backend {backend!r}; valid choices: {', '.join(TRIE_BACKENDS)}")


def build_trie(codes: np.ndarray, backend: str = "cpp"):
    """Trie over the distinct rows of ``codes`` (int [N, L]); duplicates are merged."""
    return trie_class(backend).build(codes)


def load_trie(path: str | os.PathLike, backend: str = "cpp", mmap: bool = True):
    """A trie from a file written by any backend's ``save``."""
    return trie_class(backend).load(path, mmap=mmap)
