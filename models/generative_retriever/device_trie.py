"""The ID trie as tensors on the decoding device, so constrained decoding needs no host round trip.

The host tries (``genius.trie_cpp``) take numpy node ids, so a search on a GPU copies its beams to
the host at every level. ``DeviceTrie`` answers the same two questions (which codes may follow
these nodes; which node does a code lead to) with torch ops on the tensors' device that never wait
for it: every shape depends only on the number of rows R and on per-level constants fixed at
build time (kept as Python ints), so there is no ``.item()``, ``nonzero`` or boolean-mask indexing.

Node ids are those of the shared trie file format (``trie_cpp.python_trie``): the nodes at depth d
are numbered in lexicographic order of their prefixes, so a ``DeviceTrie`` and the host trie it was
built from agree on every node id, and a leaf's id is its ID's rank among the distinct IDs.
-1 is an absent node (a prefix not in the trie), as on the host.

Each level is stored one of three ways, chosen at build time:
- dense: a [nodes + 1, K] table of child ids (-1: no such child) and its bool twin (``allowed``
  then gathers R x K bytes, not R x K int32), for the levels from the root down while their
  nodes x K entries, added up, fit ``dense_budget`` and while at least ``dense_min_fill`` of a
  level's entries hold a child: near the root few parents have many children, while the deep
  levels of a small pool have about one child per node (1,000 IDs of [3] + [4096] * 8 took 77 MB
  of tables on six dense levels without the fill rule, 0.1 MB on two with it).
- csr: per-node child offsets and the sorted child codes (child id = edge index), as in the file.
  ``allowed`` gathers each row's children as [R, max_fanout] codes and scatters them into the
  mask, in row chunks of at most ``GATHER_BUDGET`` gathered entries: the work is R x max_fanout
  <= R x K, the size of the mask itself, and the temporary memory stays bounded. ``advance`` is a
  binary search inside each node's child range with a fixed number of steps (bit length of the
  level's max fan-out); a single ``searchsorted`` over (parent x K + code) edge keys would need
  8 more bytes per edge (~300 MB at M-BEIR scale) for no gain at these fan-outs.
- chain: a csr level where every node has exactly one child (the deep levels of a large pool:
  past about three levels random IDs no longer share prefixes), so child id = node id and only
  the codes are kept.
Every node array has one extra sentinel node at the end with no children; absent nodes (-1) are
mapped to it, so they need no separate masking.

Dtypes: offsets and child ids are int32 while the trie has fewer than 2**31 - 1 distinct IDs
(about 380 times M-BEIR's 5.6M candidates), int64 beyond; codes are int16 when the level's
codebook has at most 32,767 codes (the paper's 4096), int32 otherwise. Results are int64 / bool.
At M-BEIR scale (5.6M random IDs of shape [3] + [4096] * 8) the trie takes 116 MB: levels 0-1
dense (0.1 MB), 2-4 csr (73 MB; max fan-out 503, 5, 2), 5-8 chain (43 MB); the C++ trie takes
276 MB (``benchmarks/device_trie.py`` prints both for the sizes it runs).

Built from ``trie.ids()`` (every backend has it) through the file format's own CSR construction,
so one code path serves every backend: at M-BEIR scale about 8 s and 2 GB of host memory at
peak (the IDs and the construction's temporaries), once per pool.
Node ids passed in must be -1 or exist at that level: checking it would need a host sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from genius.trie_cpp.python_trie import ABSENT, csr_from_sorted_ids

DENSE_BUDGET = 2**24  # table entries all dense levels may take: 80 MB (int32 child id + bool)
DENSE_MIN_FILL = 1 / 64  # the least share of a dense level's entries that hold a child
GATHER_BUDGET = 2**22  # [rows, max_fanout] entries ``allowed`` gathers at once on a csr level


@dataclass
class _Level:
    """One level's transitions; see the module docstring for the three kinds."""

    kind: str  # "dense", "csr" or "chain"
    num_nodes: int  # parents at this depth (the sentinel not counted)
    width: int  # K: the level's codebook size
    max_fanout: int
    table: torch.Tensor | None = None  # dense: [num_nodes + 1, width] child ids, -1 = none
    # dense: table >= 0, kept so that ``allowed`` gathers R x K bytes, not R x K int32 entries
    has_child: torch.Tensor | None = None
    child_start: torch.Tensor | None = None  # csr: [num_nodes + 2] offsets (sentinel: empty range)
    child_code: torch.Tensor | None = None  # csr, chain: [edges + 1] codes (last: padding, never matched)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.table, self.has_child, self.child_start, self.child_code) if t is not None]


def _index_dtype(largest: int) -> np.dtype:
    return np.dtype(np.int32) if largest < np.iinfo(np.int32).max else np.dtype(np.int64)


def _build_level(start: np.ndarray, code: np.ndarray, width: int, dense: bool, index: np.dtype,
                 device: torch.device) -> _Level:
    num_nodes, num_edges = len(start) - 1, len(code)
    fanout = np.diff(start)
    max_fanout = int(fanout.max()) if num_nodes else 0
    if dense:
        table = np.full((num_nodes + 1, width), ABSENT, dtype=index)
        table[np.repeat(np.arange(num_nodes), fanout), code] = np.arange(num_edges)
        table = torch.from_numpy(table).to(device)
        return _Level("dense", num_nodes, width, max_fanout, table=table, has_child=table >= 0)
    code_dtype = np.int16 if width <= np.iinfo(np.int16).max else np.int32
    padded_code = torch.from_numpy(np.append(code, 0).astype(code_dtype)).to(device)
    if num_nodes == num_edges and (fanout == 1).all():
        return _Level("chain", num_nodes, width, 1, child_code=padded_code)
    padded_start = torch.from_numpy(np.append(start, num_edges).astype(index)).to(device)
    return _Level("csr", num_nodes, width, max_fanout, child_start=padded_start, child_code=padded_code)


def _dense_levels(child_start: list[np.ndarray], widths: list[int], budget: int, min_fill: float) -> list[bool]:
    """Which levels get a dense table: those from the root down while their tables' entries,
    added up, fit ``budget`` and at least ``min_fill`` of each one's entries hold a child (the
    parents multiply with depth, and a level past the first sparse one is not made dense)."""
    dense, used = [], 0
    for start, width in zip(child_start, widths):
        entries, edges = (len(start) - 1) * width, int(start[-1])
        used += entries
        dense.append(used <= budget and edges >= min_fill * entries and all(dense))
    return dense


class DeviceTrie:
    """Trie over fixed-length IDs as device tensors; the API mirrors the host trie's node API
    (``root``/``fill_mask``/``advance``) with tensors in and out."""

    def __init__(self, levels: list[_Level], num_ids: int, device: torch.device):
        self._levels = levels
        self._num_ids = num_ids
        self.device = device

    @classmethod
    def from_trie(cls, trie, codebook_sizes: Sequence[int], device: str | torch.device = "cpu",
                  dense_budget: int = DENSE_BUDGET, dense_min_fill: float = DENSE_MIN_FILL) -> "DeviceTrie":
        """From any backend's trie; ``codebook_sizes[l]`` is the width of level l's masks.

        ``dense_budget``: table entries all dense levels together may take (0: no dense level);
        ``dense_min_fill``: the least share of a dense level's entries that hold a child, in [0, 1]
        (0: the budget alone decides)."""
        codebook_sizes = [int(k) for k in codebook_sizes]
        if len(codebook_sizes) != trie.num_levels:
            raise ValueError(f"codebook_sizes has {len(codebook_sizes)} levels but the trie has {trie.num_levels}")
        if min(codebook_sizes) < 1 or dense_budget < 0 or not 0 <= dense_min_fill <= 1:
            raise ValueError(f"codebook sizes must be >= 1, dense_budget >= 0 and dense_min_fill in [0, 1], got "
                             f"{codebook_sizes}, {dense_budget} and {dense_min_fill}")
        ids = trie.ids()
        too_wide = np.flatnonzero(ids.max(axis=0, initial=-1) >= np.array(codebook_sizes))
        if len(too_wide):
            level = int(too_wide[0])
            raise ValueError(f"trie code {int(ids[:, level].max())} at level {level} does not fit codebook size "
                             f"{codebook_sizes[level]}")
        device = torch.device(device)
        index = _index_dtype(len(ids) + 1)
        child_start, child_code = csr_from_sorted_ids(ids)
        dense = _dense_levels(child_start, codebook_sizes, dense_budget, dense_min_fill)
        levels = [_build_level(*level, index, device)
                  for level in zip(child_start, child_code, codebook_sizes, dense)]
        return cls(levels, len(ids), device)

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self._levels)

    def __len__(self) -> int:
        """Number of distinct IDs (leaves)."""
        return self._num_ids

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for level in self._levels for t in level.tensors())

    def level_kinds(self) -> list[str]:
        """How each level is stored: "dense", "csr" or "chain"."""
        return [level.kind for level in self._levels]

    # ---- queries ---------------------------------------------------------------------------
    def root_nodes(self, count: int) -> torch.Tensor:
        """The root's node id (0), ``count`` times: the state of a search before its first step."""
        return torch.zeros(count, dtype=torch.long, device=self.device)

    def allowed(self, level: int, nodes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Bool [R, K_level]: True exactly at the codes that may follow ``nodes`` (int64 [R], node
        ids at depth ``level``); an absent node (-1) gets an all-False row.

        ``out``: a contiguous bool [R, K_level] tensor to fill and return, reused across steps:
        on a CPU a fresh mask of 12,800 x 4096 costs more in page faults than filling it."""
        spec = self._levels[level]
        rows = self._sentinel_absent(spec, nodes)
        if out is None:
            out = torch.empty(len(nodes), spec.width, dtype=torch.bool, device=nodes.device)
        elif out.shape != (len(nodes), spec.width) or out.dtype != torch.bool or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous bool tensor of shape {(len(nodes), spec.width)}, "
                             f"got {out.dtype} {tuple(out.shape)}")
        if spec.kind == "dense":
            return torch.index_select(spec.has_child, 0, rows, out=out)
        out.zero_()
        chunk = max(1, GATHER_BUDGET // max(spec.max_fanout, 1))
        offsets = torch.arange(spec.max_fanout, device=nodes.device)
        for begin in range(0, len(nodes), chunk):
            lo, hi = self._child_range(spec, rows[begin:begin + chunk])
            # Positions past a node's last child repeat that child, so every scattered index is
            # either a real child (True) or, for a node without children, any code (False).
            positions = torch.minimum(lo[:, None] + offsets, (hi - 1)[:, None]).clamp_(min=0)
            has_children = (hi > lo)[:, None].expand(-1, spec.max_fanout)
            out[begin:begin + chunk].scatter_(1, spec.child_code[positions].long(), has_children)
        return out

    def advance(self, level: int, nodes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Int64 [R]: the child (at depth ``level`` + 1) of each of ``nodes`` reached by ``codes``;
        -1 where the node is absent or the code is not one of its children."""
        spec = self._levels[level]
        if nodes.shape != codes.shape or nodes.dim() != 1:
            raise ValueError(f"nodes and codes must be 1-D tensors of one length, got {tuple(nodes.shape)} "
                             f"and {tuple(codes.shape)}")
        rows = self._sentinel_absent(spec, nodes)
        if spec.kind == "dense":
            in_range = (codes >= 0) & (codes < spec.width)
            child = spec.table[rows, codes.clamp(0, spec.width - 1)].long()
            return torch.where(in_range, child, ABSENT)
        lo, hi = self._child_range(spec, rows)
        end = hi
        for _ in range(spec.max_fanout.bit_length()):  # lower bound of the code in [lo, hi)
            mid = (lo + hi) // 2
            right = (spec.child_code[mid] < codes) & (lo < hi)
            lo, hi = torch.where(right, mid + 1, lo), torch.where(right, hi, mid)
        found = (lo < end) & (spec.child_code[lo] == codes)
        return torch.where(found, lo, ABSENT)

    # ---- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _sentinel_absent(spec: _Level, nodes: torch.Tensor) -> torch.Tensor:
        """``nodes`` with -1 replaced by the level's childless sentinel node."""
        if nodes.dim() != 1:
            raise ValueError(f"nodes must be a 1-D tensor, got shape {tuple(nodes.shape)}")
        return torch.where(nodes >= 0, nodes, spec.num_nodes)

    @staticmethod
    def _child_range(spec: _Level, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Int64 [R] edge ranges [lo, hi) of ``rows``' children on a csr or chain level."""
        if spec.kind == "chain":
            return rows, rows + (rows < spec.num_nodes).long()
        return spec.child_start[rows].long(), spec.child_start[rows + 1].long()
