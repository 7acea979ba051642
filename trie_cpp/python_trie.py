"""The reference trie over fixed-length integer IDs, in NumPy.

Every backend (C++, marisa) implements exactly this API and is tested against it.

Layout. IDs are rows of an int array [N, L]. Nodes at depth d (d = 0 is the root, d = L the
leaves) are numbered 0..n_d-1 in lexicographic order of their prefixes. ``child_start[d]``
(int64, length n_d + 1) and ``child_code[d]`` (int32, length n_{d+1}) are CSR arrays: the
children of node i at depth d carry the codes ``child_code[d][child_start[d][i]:child_start[d][i+1]]``
(sorted ascending), and the child whose code sits at position j of that array *is* node j at
depth d + 1. So no child-pointer array is stored, and a leaf's number is the rank of its ID among
the distinct IDs in sorted order: ``ids()[leaf]`` is that ID. The root always exists (n_0 = 1),
even in a trie with no IDs, where it simply has no children.

The argument checks at the end of this module are shared by the Python-side backends, so every
backend rejects the same bad input with the same ``ValueError``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

# 16 bytes, so that every array in the file starts 8-byte aligned (the C++ backend and numpy
# memory maps read the int64 offsets in place). v3 follows the magic with the payload's size
# (int64) and SHA-256 (32 bytes), checked on load; v2 files (no checksum) are still read.
MAGIC = b"GENIUS-TRIE-v3\0\0"
MAGIC_V2 = b"GENIUS-TRIE-v2\0\0"
HEADER_BYTES = len(MAGIC) + 8 + 32
REBUILD = ("delete it and re-run genius eval (or genius search), which rebuilds a pool's trie from its codes "
           "(checkpoint/<setting>/rq/codes/<pool>/)")
ABSENT = -1  # node id of a prefix that is not in the trie


def check_codes(codes: np.ndarray, max_code: int = int(np.iinfo(np.int32).max)) -> np.ndarray:
    """``codes`` as an integer array [N, L], or a ValueError saying what is wrong with it."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] == 0:
        raise ValueError(f"trie IDs must be a 2-D integer array [N, L] with L >= 1, got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"trie IDs must be integers, got dtype {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() > max_code):
        raise ValueError(f"trie codes must lie in [0, {max_code}], got [{codes.min()}, {codes.max()}]")
    return codes


def unique_sorted_ids(codes: np.ndarray) -> np.ndarray:
    """Distinct rows of ``codes`` in lexicographic order, as int32 [M, L]."""
    return np.unique(check_codes(codes).astype(np.int32, copy=False), axis=0)


def csr_from_sorted_ids(ids: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """CSR arrays (see module docstring) from distinct, sorted IDs [M, L]."""
    num_ids, num_levels = ids.shape
    child_start: list[np.ndarray] = []
    child_code: list[np.ndarray] = []
    # differs[r, d] is True when row r starts a new node at depth d + 1 (its prefix of length
    # d + 1 differs from the previous row's).
    differs = np.ones((num_ids, num_levels), dtype=bool)
    if num_ids > 1:
        differs[1:] = np.logical_or.accumulate(ids[1:] != ids[:-1], axis=1)
    parent_rows = np.array([0], dtype=np.int64)  # the root, present even when there are no IDs
    for depth in range(num_levels):
        rows = np.flatnonzero(differs[:, depth])  # first row of each node at depth + 1
        child_code.append(ids[rows, depth].astype(np.int32))
        # Parent of each new node = number of parent starts at or before its first row, minus 1.
        parent_of_child = np.searchsorted(parent_rows, rows, side="right") - 1
        counts = np.bincount(parent_of_child, minlength=len(parent_rows))
        start = np.zeros(len(parent_rows) + 1, dtype=np.int64)
        np.cumsum(counts, out=start[1:])
        child_start.append(start)
        parent_rows = rows
    return child_start, child_code


class PythonTrie:
    """Flat-array trie; the slow-but-obvious reference for the other backends."""

    backend = "python"

    def __init__(self, child_start: list[np.ndarray], child_code: list[np.ndarray]):
        self.child_start = child_start
        self.child_code = child_code

    # ---- construction and persistence -------------------------------------------------------
    @classmethod
    def build(cls, codes: np.ndarray) -> "PythonTrie":
        return cls(*csr_from_sorted_ids(unique_sorted_ids(codes)))

    def save(self, path: str | os.PathLike) -> None:
        save_csr(path, self.child_start, self.child_code)

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> "PythonTrie":
        return cls(*load_csr(path, mmap=mmap))

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.child_code)

    def __len__(self) -> int:
        """Number of distinct IDs (leaves)."""
        return len(self.child_code[-1]) if self.child_code else 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.child_start) + sum(a.nbytes for a in self.child_code)

    def ids(self) -> np.ndarray:
        """All distinct IDs [M, L] in leaf order."""
        num_ids = len(self)
        out = np.empty((num_ids, self.num_levels), dtype=np.int32)
        nodes = np.arange(num_ids)
        for depth in range(self.num_levels - 1, -1, -1):
            out[:, depth] = self.child_code[depth][nodes]
            # parent of child node j at depth+1: the node whose child range holds j
            nodes = np.searchsorted(self.child_start[depth], nodes, side="right") - 1
        return out

    # ---- queries ---------------------------------------------------------------------------
    def root(self) -> int:
        return 0

    def children(self, prefix: Sequence[int]) -> np.ndarray:
        """Sorted codes that may follow ``prefix``; empty if the prefix is absent or complete."""
        node = self.root()
        for depth, code in enumerate(prefix):
            if depth >= self.num_levels:
                return np.zeros(0, dtype=np.int32)
            node = int(self.advance(depth, np.array([node]), np.array([code]))[0])
            if node == ABSENT:
                return np.zeros(0, dtype=np.int32)
        depth = len(prefix)
        if depth >= self.num_levels:
            return np.zeros(0, dtype=np.int32)
        lo, hi = self.child_start[depth][node], self.child_start[depth][node + 1]
        return np.asarray(self.child_code[depth][lo:hi])

    def advance(self, depth: int, nodes: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Child node ids (at depth + 1) reached from ``nodes`` (at ``depth``) by ``codes``.

        Absent nodes, and codes that are not children, give ``ABSENT`` (-1).
        """
        check_depth(depth, self.num_levels)
        nodes, codes = check_batch(nodes, codes)
        check_nodes(nodes, len(self.child_start[depth]) - 1, depth)
        out = np.full(nodes.shape, ABSENT, dtype=np.int64)
        start, code_arr = self.child_start[depth], self.child_code[depth]
        for i, (node, code) in enumerate(zip(nodes.tolist(), codes.tolist())):
            if node == ABSENT:
                continue
            lo, hi = int(start[node]), int(start[node + 1])
            j = lo + int(np.searchsorted(code_arr[lo:hi], code))
            if j < hi and code_arr[j] == code:
                out[i] = j
        return out

    def fill_mask(self, depth: int, nodes: np.ndarray, mask: np.ndarray) -> None:
        """Set ``mask[b, c] = True`` exactly for the codes c allowed after node ``nodes[b]``.

        ``mask`` is a preallocated numpy bool array [B, width]; it is cleared first. Absent nodes
        get an all-False row. A child code >= width is a ValueError (the mask is then undefined).
        """
        check_depth(depth, self.num_levels)
        nodes = check_mask(nodes, mask)
        check_nodes(nodes, len(self.child_start[depth]) - 1, depth)
        mask[...] = False
        start, code_arr = self.child_start[depth], self.child_code[depth]
        for b, node in enumerate(nodes.tolist()):
            if node != ABSENT:
                allowed = code_arr[start[node] : start[node + 1]]
                check_width(allowed, mask.shape[1], depth)
                mask[b, allowed] = True


# ---- the binary file ---------------------------------------------------------------------------
def save_csr(path: str | os.PathLike, child_start: list[np.ndarray], child_code: list[np.ndarray]) -> None:
    """Binary trie file: magic, payload size and SHA-256, then the payload: level count, then per
    level the two arrays (8-byte aligned).

    Written to a temporary file and renamed, so a reader never sees a half-written trie.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    digest, size = hashlib.sha256(), 0
    with open(tmp, "wb") as f:
        f.write(MAGIC + bytes(HEADER_BYTES - len(MAGIC)))  # size and checksum, filled in below

        def put(data: bytes) -> None:
            nonlocal size
            f.write(data)
            digest.update(data)
            size += len(data)

        put(np.array([len(child_code)], dtype=np.int64).tobytes())
        for start, code in zip(child_start, child_code):
            put(np.array([len(start), len(code)], dtype=np.int64).tobytes())
            put(np.ascontiguousarray(start, dtype=np.int64).tobytes())
            code_bytes = np.ascontiguousarray(code, dtype=np.int32).tobytes()
            put(code_bytes)
            put(b"\0" * (-len(code_bytes) % 8))
        f.seek(len(MAGIC))
        f.write(np.array([size], dtype=np.int64).tobytes() + digest.digest())
    os.replace(tmp, path)


def load_csr(path: str | os.PathLike, mmap: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The CSR arrays of a file written by ``save_csr``, checked before use: the payload's size
    and SHA-256 against the header (v3), then the structure (``check_csr``). Every failure is a
    ValueError naming the file and what to do.

    With ``mmap`` the arrays are read-only views of the memory-mapped file.
    """
    file_size = os.path.getsize(path)
    if file_size < len(MAGIC):  # also keeps np.memmap away from empty files
        raise ValueError(f"{path}: truncated trie file ({file_size} bytes, too short to be one); {REBUILD}")
    raw = np.memmap(path, dtype=np.uint8, mode="r") if mmap else np.fromfile(path, dtype=np.uint8)
    magic = bytes(raw[: len(MAGIC)])
    if magic == MAGIC:
        if file_size < HEADER_BYTES:
            raise ValueError(f"{path}: truncated trie file ({file_size} bytes, its header alone takes "
                             f"{HEADER_BYTES}); {REBUILD}")
        size = int(raw[len(MAGIC): len(MAGIC) + 8].view(np.int64)[0])
        if file_size != HEADER_BYTES + size:
            what = "truncated" if file_size < HEADER_BYTES + size else "longer than written"
            raise ValueError(f"{path}: {what} trie file ({file_size} bytes, its header says "
                             f"{HEADER_BYTES + size}); {REBUILD}")
        if hashlib.sha256(memoryview(raw[HEADER_BYTES:])).digest() != bytes(raw[len(MAGIC) + 8: HEADER_BYTES]):
            raise ValueError(f"{path}: damaged trie file (its content does not match the SHA-256 in its header); "
                             f"{REBUILD}")
        pos = HEADER_BYTES
    elif magic == MAGIC_V2:
        pos = len(MAGIC)
    else:
        raise ValueError(f"{path}: not a trie file written by this project (bad magic bytes); {REBUILD}")

    def take(dtype, count):
        nonlocal pos
        size = count * np.dtype(dtype).itemsize
        if count < 0 or pos + size > len(raw):
            needed = pos + max(size, 0)
            raise ValueError(f"{path}: truncated or corrupt trie file ({len(raw)} bytes, needs at least {needed}); "
                             f"{REBUILD}")
        arr = raw[pos : pos + size].view(dtype)
        pos += size
        return arr

    (num_levels,) = take(np.int64, 1)
    if num_levels < 1:
        raise ValueError(f"{path}: corrupt trie file (level count {num_levels}); {REBUILD}")
    child_start, child_code = [], []
    for _ in range(int(num_levels)):
        n_start, n_code = (int(v) for v in take(np.int64, 2))
        child_start.append(take(np.int64, n_start))
        child_code.append(take(np.int32, n_code))
        take(np.uint8, -(n_code * 4) % 8)
    if pos != len(raw):
        raise ValueError(f"{path}: trie file has trailing bytes ({len(raw)} bytes, expected {pos}); {REBUILD}")
    try:
        check_csr(child_start, child_code, where=str(path))
    except ValueError as err:
        raise ValueError(f"{err}; {REBUILD}") from None
    return child_start, child_code


def check_csr(child_start: list[np.ndarray], child_code: list[np.ndarray], where: str = "trie") -> None:
    """ValueError unless the arrays form a trie as the module docstring lays out."""
    num_nodes = 1  # the root
    for depth, (start, code) in enumerate(zip(child_start, child_code)):
        problem = None
        steps = np.diff(start)
        if len(start) != num_nodes + 1:
            problem = f"{len(start)} child offsets for {num_nodes} nodes"
        elif start[0] != 0 or start[-1] != len(code) or (steps < 0).any():
            problem = "child offsets are not an increasing cover of the child codes"
        elif depth > 0 and (steps == 0).any():
            problem = "a node above the leaves has no children"
        elif len(code) and code.min() < 0:
            problem = "negative child code"
        else:
            # Codes must increase strictly inside each node; only steps that cross into the next
            # node (at offsets start[1:-1]) may go down.
            code_steps_ok = np.diff(code.astype(np.int64)) > 0
            code_steps_ok[start[1:-1][(start[1:-1] > 0) & (start[1:-1] < len(code))] - 1] = True
            if not code_steps_ok.all():
                problem = "child codes are not sorted and distinct within a node"
        if problem:
            raise ValueError(f"{where}: corrupt trie at depth {depth}: {problem}")
        num_nodes = len(code)


# ---- argument checks shared by the Python-side backends ----------------------------------------
def check_depth(depth: int, num_levels: int) -> None:
    if not 0 <= depth < num_levels:
        raise ValueError(f"depth must be in [0, {num_levels}) for a trie with {num_levels} levels, got {depth}")


def check_batch(nodes, codes) -> tuple[np.ndarray, np.ndarray]:
    nodes = np.asarray(nodes, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.int64)
    if nodes.ndim != 1 or nodes.shape != codes.shape:
        raise ValueError(f"nodes and codes must be 1-D arrays of one length, got {nodes.shape} and {codes.shape}")
    return nodes, codes


def check_nodes(nodes: np.ndarray, num_nodes: int, depth: int) -> None:
    bad = (nodes < ABSENT) | (nodes >= num_nodes)
    if bad.any():
        raise ValueError(f"node id {nodes[bad][0]} does not exist at depth {depth} ({num_nodes} nodes; -1 = absent)")


def check_mask(nodes, mask) -> np.ndarray:
    """``nodes`` as int64 [B]; ValueError unless ``mask`` is a writable numpy bool array [B, width]."""
    nodes = np.asarray(nodes, dtype=np.int64)
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 2:
        raise ValueError("mask must be a 2-D numpy bool array [B, width] (for a torch tensor pass tensor.numpy())")
    if nodes.ndim != 1 or len(nodes) != len(mask):
        raise ValueError(f"nodes must be 1-D with one entry per mask row, got shapes {nodes.shape} and {mask.shape}")
    if not mask.flags.writeable:
        raise ValueError("mask must be writable")
    return nodes


def check_width(allowed: np.ndarray, width: int, depth: int) -> None:
    if len(allowed) and allowed.max() >= width:
        raise ValueError(f"child code {allowed.max()} at depth {depth} does not fit a mask of width {width}")
