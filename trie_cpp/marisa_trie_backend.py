"""The marisa-trie backend: each ID stored as one string key of a static ``marisa_trie.Trie``.

Compact, but marisa has no "children of a node" query: the children of a prefix are found by
enumerating every stored key under it (O(#IDs under the node), so slow near the root). Each
node's children are therefore computed once and kept in an LRU cache. Unlike the official
GENIUS version this assumes nothing about the first code, so the union pool's three modality
codes work.

Keys. Code c becomes the character ``chr(c + 1)``, moved up past the UTF-16 surrogate range
U+D800..U+DFFF, which a str cannot carry into marisa. The +1 keeps U+0000 out of keys because
keys go in and out through numpy fixed-width strings (no Python loop per ID), and those drop
trailing NULs.

Node ids. A node at depth d is named by the leaf number (rank among the sorted distinct IDs) of
the first ID below it. So the root is 0, leaf ids equal the CSR backends' leaf ids, and a node's
prefix can be recovered from its id alone (restore that leaf's key, keep d characters). Above the
leaves, ids are not the CSR backends' 0..n_d-1 numbering; children, masks and ids() are identical.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np

from .python_trie import (
    ABSENT,
    PythonTrie,
    check_batch,
    check_codes,
    check_depth,
    check_mask,
    check_nodes,
    check_width,
    csr_from_sorted_ids,
    save_csr,
)

_SURROGATE_FIRST, _SURROGATE_COUNT = 0xD800, 0x800
MAX_CODE = 0x10FFFF - _SURROGATE_COUNT - 1  # the last code point, less the skipped range and the +1
_CACHED_NODES = 1 << 16  # several times the 12,800 nodes one 256 x 50 beam step can touch


def encode_keys(codes: np.ndarray) -> list[str]:
    """One key string per row of ``codes`` [N, L] (see the module docstring)."""
    points = codes.astype(np.uint32) + 1
    points[points >= _SURROGATE_FIRST] += _SURROGATE_COUNT
    return np.ascontiguousarray(points).view(f"U{codes.shape[1]}").ravel().tolist()


def decode_keys(keys: Sequence[str], num_levels: int) -> np.ndarray:
    """The codes [len(keys), num_levels] (int32) of key strings made by ``encode_keys``."""
    points = np.array(keys, dtype=f"U{num_levels}").view(np.uint32).reshape(-1, num_levels).copy()
    points[points >= _SURROGATE_FIRST + _SURROGATE_COUNT] -= _SURROGATE_COUNT
    return (points - 1).astype(np.int32)


class MarisaTrie:
    backend = "marisa"

    def __init__(self, trie, num_levels: int):
        self._trie = trie
        self._num_levels = num_levels
        keys, key_ids = self._items("")
        # Code points grow with codes, so sorting the key strings sorts the IDs.
        self._key_id_of_leaf = key_ids[np.argsort(np.array(keys, dtype=f"U{num_levels}"), kind="stable")]
        self._leaf_of_key_id = np.empty_like(self._key_id_of_leaf)
        self._leaf_of_key_id[self._key_id_of_leaf] = np.arange(len(key_ids), dtype=self._key_id_of_leaf.dtype)
        self._marisa_nbytes = len(trie.tobytes())
        self._expand = functools.lru_cache(maxsize=_CACHED_NODES)(self._expand_node)

    # ---- construction and persistence -------------------------------------------------------
    @classmethod
    def build(cls, codes: np.ndarray) -> "MarisaTrie":
        import marisa_trie

        codes = check_codes(codes, max_code=MAX_CODE)
        return cls(marisa_trie.Trie(encode_keys(codes)), codes.shape[1])  # marisa merges duplicates

    def save(self, path: str | os.PathLike) -> None:
        save_csr(path, *csr_from_sorted_ids(self.ids()))

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> "MarisaTrie":
        return cls.build(PythonTrie.load(path, mmap=mmap).ids())

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return self._num_levels

    def __len__(self) -> int:
        return len(self._trie)

    @property
    def nbytes(self) -> int:
        return self._marisa_nbytes + self._key_id_of_leaf.nbytes + self._leaf_of_key_id.nbytes

    def ids(self) -> np.ndarray:
        keys, key_ids = self._items("")
        out = np.empty((len(key_ids), self._num_levels), dtype=np.int32)
        out[self._leaf_of_key_id[key_ids]] = decode_keys(keys, self._num_levels)
        return out

    # ---- queries ---------------------------------------------------------------------------
    def root(self) -> int:
        return 0

    def children(self, prefix: Sequence[int]) -> np.ndarray:
        if len(prefix) >= self._num_levels:
            return np.zeros(0, dtype=np.int32)
        node = self.root()
        for depth, code in enumerate(prefix):
            node = int(self.advance(depth, [node], [code])[0])
            if node == ABSENT:
                return np.zeros(0, dtype=np.int32)
        return self._expand(len(prefix), node)[0]

    def advance(self, depth: int, nodes: np.ndarray, codes: np.ndarray) -> np.ndarray:
        check_depth(depth, self._num_levels)
        nodes, codes = check_batch(nodes, codes)
        self._check_nodes(depth, nodes)
        out = np.full(nodes.shape, ABSENT, dtype=np.int64)
        for i, (node, code) in enumerate(zip(nodes.tolist(), codes.tolist())):
            if node == ABSENT:
                continue
            child_codes, child_nodes = self._expand(depth, node)
            j = int(np.searchsorted(child_codes, code))
            if j < len(child_codes) and child_codes[j] == code:
                out[i] = child_nodes[j]
        return out

    def fill_mask(self, depth: int, nodes: np.ndarray, mask: np.ndarray) -> None:
        check_depth(depth, self._num_levels)
        nodes = check_mask(nodes, mask)
        self._check_nodes(depth, nodes)
        mask[...] = False
        for b, node in enumerate(nodes.tolist()):
            if node != ABSENT:
                allowed = self._expand(depth, node)[0]
                check_width(allowed, mask.shape[1], depth)
                mask[b, allowed] = True

    # ---- internals -------------------------------------------------------------------------
    def _items(self, prefix: str) -> tuple[list[str], np.ndarray]:
        """Keys under ``prefix`` and their marisa key ids, in marisa's order."""
        items = self._trie.items(prefix)
        if not items:
            return [], np.zeros(0, dtype=np.uint32)
        keys, key_ids = zip(*items)
        return list(keys), np.array(key_ids, dtype=np.uint32)  # marisa ids are < 2^32

    def _check_nodes(self, depth: int, nodes: np.ndarray) -> None:
        check_nodes(nodes, 1 if depth == 0 else len(self), depth)

    def _expand_node(self, depth: int, node: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted child codes of a node and the node id of each child (read-only arrays)."""
        prefix = "" if depth == 0 else self._trie.restore_key(int(self._key_id_of_leaf[node]))[:depth]
        keys, key_ids = self._items(prefix)
        codes = decode_keys(keys, self._num_levels)[:, depth]
        leaves = self._leaf_of_key_id[key_ids]
        order = np.lexsort((leaves, codes))  # by code, then first leaf first
        codes, leaves = codes[order], leaves[order]
        first_of_code = np.ones(len(codes), dtype=bool)
        first_of_code[1:] = codes[1:] != codes[:-1]
        child_codes, child_nodes = codes[first_of_code], leaves[first_of_code]
        child_codes.setflags(write=False)
        child_nodes.setflags(write=False)
        return child_codes, child_nodes
