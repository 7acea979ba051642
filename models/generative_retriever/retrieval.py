"""Stage 3 retrieval: from generated IDs, or from dense scores, to ranked candidates.

The dense indexes have faiss's interface, ``search(queries float32 [Q, D], k) -> (scores float32
[Q, k], ids int64 [Q, k])``, where missing results are padded with id -1 and score -inf:
``ExactIPIndex`` is exact inner product in chunks (torch matmul + running top-k), the dense
CLIP-SF baseline; ``FaissFlatIPIndex`` is the same search through faiss's IndexFlatIP.

The generative side works on decoded beams: ``CandidateMap`` (ID -> candidates sharing it, in trie
leaf order), ``beam_leaves`` (each beam's leaf), ``genius_ranking`` (candidates of each beam in beam
order) and ``rerank_ranking`` (GENIUS^R). ``ranking.rank`` combines them for evaluation and search,
and ``ranking.GeniusIndex`` puts the whole pipeline behind faiss's ``search``. Candidates are
referred to by *row* (position in the pool's code file); an index's ``ids`` array turns rows into
hashed dids.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from genius.common.cpu import fp32_products_in_onednn
from genius.common.progress import Progress

log = logging.getLogger("genius.retrieval")

ABSENT = -1
PAD_SCORE = -np.inf


class TrieLike(Protocol):
    def ids(self) -> np.ndarray: ...


class BeamResultLike(Protocol):
    codes: torch.Tensor  # [Q, B, L], -1 for absent beams
    scores: torch.Tensor  # [Q, B]
    valid: torch.Tensor  # bool [Q, B]


def beams_as_arrays(beams: BeamResultLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A beam search result as numpy: codes int64 [Q, B, L], scores float32 [Q, B], valid bool [Q, B]."""
    return (beams.codes.cpu().numpy().astype(np.int64), beams.scores.float().cpu().numpy(),
            beams.valid.cpu().numpy().astype(bool))


# ---- ID -> candidates ------------------------------------------------------------------------
def _row_keys(codes: np.ndarray) -> np.ndarray:
    """One opaque key per ID row whose byte order is the lexicographic order of the IDs.

    Big-endian int32 bytes of non-negative codes compare like the integers, so sorting and
    ``searchsorted`` on these keys follow the trie's leaf order without a Python tuple per ID.
    """
    codes = np.asarray(codes)
    big_endian = np.ascontiguousarray(codes.astype(">i4"))
    return big_endian.view(np.dtype((np.void, 4 * codes.shape[-1]))).reshape(codes.shape[:-1])


@dataclass
class CandidateMap:
    """Candidates grouped by ID, in trie leaf order (CSR).

    The candidates of leaf j (the ID ``trie.ids()[j]``) are the pool rows
    ``rows[leaf_start[j]:leaf_start[j + 1]]``, in pool order (or by ``order``, see :meth:`build`);
    several rows per leaf are collisions.
    """

    leaf_keys: np.ndarray  # void [M], sorted; key of each leaf's ID
    leaf_start: np.ndarray  # int64 [M + 1]
    rows: np.ndarray  # int64 [N]
    num_levels: int

    @classmethod
    def build(cls, trie: TrieLike, codes: np.ndarray, order: np.ndarray | None = None) -> "CandidateMap":
        """Group the pool's ``codes`` [N, L] by the trie leaf of each row.

        ``order`` [N]: a key per row; the rows of one leaf are sorted by it (ascending, ties in
        pool order). None keeps pool order, as the paper does.

        The trie must hold exactly the distinct IDs of ``codes``; anything else means it was
        built from other codes (stale), which is an error rather than silently missing items.
        """
        codes = np.asarray(codes)
        leaf_ids = np.asarray(trie.ids())
        if codes.ndim != 2 or leaf_ids.ndim != 2 or codes.shape[1] != leaf_ids.shape[1]:
            raise ValueError(f"pool codes {codes.shape} and trie IDs {leaf_ids.shape} must both be [*, L] with the same L")
        leaf_keys = _row_keys(leaf_ids)
        leaf_of_row = np.searchsorted(leaf_keys, _row_keys(codes))
        found = leaf_of_row < len(leaf_keys)
        found[found] = leaf_keys[leaf_of_row[found]] == _row_keys(codes[found])
        if not found.all():
            raise ValueError(f"{int((~found).sum())} of {len(codes)} candidate IDs are not in the trie "
                             f"(first: pool row {int(np.flatnonzero(~found)[0])}); the trie is stale, rebuild it")
        counts = np.bincount(leaf_of_row, minlength=len(leaf_keys))
        if (counts == 0).any():
            raise ValueError(f"the trie holds {int((counts == 0).sum())} IDs that no candidate has; "
                             "the trie is stale, rebuild it")
        leaf_start = np.zeros(len(leaf_keys) + 1, dtype=np.int64)
        np.cumsum(counts, out=leaf_start[1:])
        if order is None:
            rows = np.argsort(leaf_of_row, kind="stable")  # stable: pool order inside a leaf
        else:
            order = np.asarray(order)
            if order.shape != (len(codes),) or not np.isfinite(order).all():
                raise ValueError(f"order must hold one finite key per pool row ({len(codes)}), got shape {order.shape}")
            rows = np.lexsort((order, leaf_of_row))  # by leaf, then key; lexsort is stable
        rows = rows.astype(np.int64)
        return cls(leaf_keys, leaf_start, rows, codes.shape[1])

    @property
    def num_ids(self) -> int:
        return len(self.leaf_keys)

    @property
    def num_candidates(self) -> int:
        return len(self.rows)

    def leaves_of(self, codes: np.ndarray) -> np.ndarray:
        """Leaf index of each ID in ``codes`` [..., L]; -1 where the ID (or any code) is absent."""
        codes = np.asarray(codes)
        if codes.shape[-1] != self.num_levels:
            raise ValueError(f"IDs have {codes.shape[-1]} levels, the pool's have {self.num_levels}")
        complete = (codes >= 0).all(axis=-1)
        keys = _row_keys(np.where(complete[..., None], codes, 0))
        leaves = np.searchsorted(self.leaf_keys, keys).clip(max=max(self.num_ids - 1, 0))
        hit = complete & (self.leaf_keys[leaves] == keys) if self.num_ids else np.zeros(complete.shape, bool)
        return np.where(hit, leaves, ABSENT).astype(np.int64)

    def candidates(self, leaf: int) -> np.ndarray:
        return self.rows[self.leaf_start[leaf] : self.leaf_start[leaf + 1]]

    def collision_stats(self) -> dict:
        """How many candidates share their ID with another: GENIUS returns all of them, in pool order."""
        sizes = np.diff(self.leaf_start)
        return {
            "candidates": int(self.num_candidates),
            "distinct_ids": int(self.num_ids),
            "candidates_sharing_an_id": int(sizes[sizes > 1].sum()),
            "largest_group": int(sizes.max()) if len(sizes) else 0,
        }


def beam_leaves(cmap: CandidateMap, codes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """int64 [Q, B]: the trie leaf of each decoded beam's ID, -1 for invalid beams and unknown IDs."""
    leaves = cmap.leaves_of(codes)
    leaves[~np.asarray(valid, dtype=bool)] = ABSENT
    return leaves


# ---- rankings --------------------------------------------------------------------------------
@dataclass
class Ranking:
    """Top-k per query: pool rows [Q, k] (-1 padding) and their scores [Q, k] (-inf padding)."""

    rows: np.ndarray
    scores: np.ndarray

    def ids(self, pool_ids: np.ndarray) -> np.ndarray:
        """Rows -> hashed dids, keeping -1 padding."""
        return np.where(self.rows >= 0, np.asarray(pool_ids)[self.rows.clip(min=0)], ABSENT)


def excluded_rows(pool_ids: np.ndarray, excluded_dids: list[list[int]]) -> np.ndarray:
    """int64 [Q, E]: the pool rows of each query's excluded hashed dids, -1 padded; E is the most
    any query has in this pool (0 when none has any), and dids not in the pool are dropped."""
    pool_ids = np.asarray(pool_ids)
    order = np.argsort(pool_ids, kind="stable")
    per_query = []
    for dids in excluded_dids:
        dids = np.asarray(dids, dtype=np.int64)
        at = np.searchsorted(pool_ids, dids, sorter=order).clip(max=max(len(order) - 1, 0))
        found = pool_ids[order[at]] == dids if len(order) else np.zeros(len(dids), bool)
        per_query.append(order[at[found]])
    out = np.full((len(per_query), max((len(r) for r in per_query), default=0)), ABSENT, dtype=np.int64)
    for q, rows in enumerate(per_query):
        out[q, : len(rows)] = rows
    return out


def without_excluded(ranking: Ranking, excluded: np.ndarray, k: int) -> Ranking:
    """``ranking`` less each query's ``excluded`` rows [Q, E] (-1 padding), the rest moved up in
    order and truncated to ``k``: a ranking made ``E`` deeper still holds k results when it can."""
    rows = ranking.rows
    keep = (rows >= 0) & ~(rows[:, :, None] == excluded[:, None, :]).any(axis=2)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # stable: kept rows in their ranked order
    kept = np.take_along_axis(keep, order, axis=1)
    return Ranking(np.where(kept, np.take_along_axis(rows, order, axis=1), ABSENT),
                   np.where(kept, np.take_along_axis(ranking.scores, order, axis=1), PAD_SCORE).astype(np.float32))


def _drop_repeated_leaves(leaves: np.ndarray) -> np.ndarray:
    """Set every repeat of a leaf within a query's beams to -1, keeping its first (best) beam."""
    order = np.argsort(leaves, axis=1, kind="stable")
    ordered = np.take_along_axis(leaves, order, axis=1)
    repeat_sorted = np.zeros(leaves.shape, dtype=bool)
    repeat_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    repeat = np.empty_like(repeat_sorted)
    np.put_along_axis(repeat, order, repeat_sorted, axis=1)
    return np.where(repeat, ABSENT, leaves)


def beam_candidates(cmap: CandidateMap, leaves: np.ndarray, limit: int | None = None):
    """Flatten the candidates of each query's beams, in (query, beam order, pool order) order.

    ``leaves`` [Q, B] (-1 for absent beams). Repeated leaves count once. With ``limit``, only
    each query's first ``limit`` candidates are produced. Returns (query, beam, row) int64 arrays.
    """
    leaves = _drop_repeated_leaves(np.asarray(leaves, dtype=np.int64))
    num_queries, num_beams = leaves.shape
    present = leaves >= 0
    safe = np.where(present, leaves, 0)
    starts = np.where(present, cmap.leaf_start[safe], 0)
    counts = np.where(present, cmap.leaf_start[safe + 1] - cmap.leaf_start[safe], 0)
    if limit is not None:
        before = np.cumsum(counts, axis=1) - counts
        counts = np.clip(np.minimum(counts, limit - before), 0, None)
    counts, starts = counts.ravel(), starts.ravel()
    pair = np.repeat(np.arange(num_queries * num_beams), counts)
    within = np.arange(len(pair)) - np.repeat(np.cumsum(counts) - counts, counts)
    return pair // num_beams, pair % num_beams, cmap.rows[starts[pair] + within]


def union_sizes(cmap: CandidateMap, leaves: np.ndarray) -> np.ndarray:
    """int64 [Q]: how many candidates the beams' IDs hold together (GENIUS^R's re-rank set)."""
    leaves = _drop_repeated_leaves(np.asarray(leaves, dtype=np.int64))
    sizes = np.diff(cmap.leaf_start)[leaves.clip(min=0)]
    return np.where(leaves >= 0, sizes, 0).sum(axis=1)


def _pack_topk(query: np.ndarray, rows: np.ndarray, scores: np.ndarray, num_queries: int, k: int) -> Ranking:
    """(query, row, score) triples sorted by query (best first within a query) -> [Q, k] arrays."""
    first = np.searchsorted(query, np.arange(num_queries))
    position = np.arange(len(query)) - first[query]
    keep = position < k
    out_rows = np.full((num_queries, k), ABSENT, dtype=np.int64)
    out_scores = np.full((num_queries, k), PAD_SCORE, dtype=np.float32)
    out_rows[query[keep], position[keep]] = rows[keep]
    out_scores[query[keep], position[keep]] = scores[keep]
    return Ranking(out_rows, out_scores)


def genius_ranking(cmap: CandidateMap, leaves: np.ndarray, beam_scores: np.ndarray, k: int) -> Ranking:
    """GENIUS: every candidate of each beam's ID, beams in score order, truncated to k.

    A candidate's score is its beam's score (candidates sharing an ID tie, in pool order).
    """
    query, beam, rows = beam_candidates(cmap, leaves, limit=k)
    scores = np.asarray(beam_scores, dtype=np.float32)[query, beam]
    return _pack_topk(query, rows, scores, len(leaves), k)


def rerank_ranking(cmap: CandidateMap, leaves: np.ndarray, query_emb: np.ndarray, cand_emb: np.ndarray, k: int,
                   chunk: int = 256) -> Ranking:
    """GENIUS^R: the union of all beams' candidates re-ranked by cosine of fused CLIP-SF embeddings.

    ``query_emb`` [Q, D] and ``cand_emb`` [N, D] (pool rows; fp16 or fp32, memmap is fine) are
    re-normalised in fp32. Ties keep beam order. Beam scores are not used.
    """
    num_queries = len(leaves)
    parts = []
    for start in range(0, num_queries, chunk):
        stop = min(start + chunk, num_queries)
        query, _, rows = beam_candidates(cmap, leaves[start:stop])
        q = _unit(np.asarray(query_emb[start:stop]))
        distinct = np.unique(rows)  # sorted, so a memmap is read in order
        c = _unit(np.asarray(cand_emb[distinct]))
        scores = np.einsum("nd,nd->n", q[query], c[np.searchsorted(distinct, rows)]).astype(np.float32)
        order = np.lexsort((-scores, query))  # by query, then best score; stable for ties
        parts.append(_pack_topk(query[order], rows[order], scores[order], stop - start, k))
    return Ranking(np.concatenate([p.rows for p in parts]) if parts else np.zeros((0, k), np.int64),
                   np.concatenate([p.scores for p in parts]) if parts else np.zeros((0, k), np.float32))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def target_modality_share(ranking: Ranking, cand_modality: np.ndarray, target: np.ndarray) -> float:
    """Share of returned candidates whose modality is the query's target modality."""
    returned = ranking.rows >= 0
    if not returned.any():
        return float("nan")
    matches = np.asarray(cand_modality)[ranking.rows.clip(min=0)] == np.asarray(target)[:, None]
    return float(matches[returned].mean())


# ---- dense baseline --------------------------------------------------------------------------
def check_queries(queries: np.ndarray, dim: int, k: int) -> np.ndarray:
    queries = np.asarray(queries)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must be a float array [Q, {dim}], got shape {queries.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return queries


class ExactIPIndex:
    """Exact inner-product search, faiss-style, in candidate chunks.

    ``vectors`` [N, D] may be a memmap (fp16 or fp32), each chunk of which is moved to ``device``
    once per search, so memory stays at chunk x D + Q x k whatever N is; or a tensor already on
    ``device`` (``pool_assets.dense_vectors``), sliced in place. Each chunk is scored in fp32
    against all queries (in oneDNN on AMD CPUs with AVX-512: ``fp32_products_in_onednn``), keeping a
    running top-k. Returned ids are rows, or ``ids[row]`` when given.
    """

    def __init__(self, vectors: np.ndarray | torch.Tensor, ids: np.ndarray | None = None, *, chunk_size: int = 65536,
                 query_batch: int = 4096, device: str | torch.device = "cpu"):
        if len(getattr(vectors, "shape", ())) != 2:  # any row container with a shape (memmap, tensor, tiled view)
            raise ValueError(f"vectors must be [N, D], got shape {getattr(vectors, 'shape', None)}")
        if ids is not None and len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        self.vectors, self.labels = vectors, None if ids is None else np.asarray(ids, dtype=np.int64)
        self.chunk_size, self.query_batch, self.device = chunk_size, query_batch, torch.device(device)

    @property
    def ntotal(self) -> int:
        return len(self.vectors)

    @property
    def d(self) -> int:
        return self.vectors.shape[1]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = torch.from_numpy(np.ascontiguousarray(check_queries(queries, self.d, k), dtype=np.float32))
        queries = queries.to(self.device)
        num_queries = len(queries)
        best_scores = torch.full((num_queries, k), -torch.inf, device=self.device)
        best_rows = torch.full((num_queries, k), ABSENT, dtype=torch.int64, device=self.device)
        # Silent in a log unless it runs for longer than the progress interval (a large pool on a CPU).
        progress = Progress(-(-self.ntotal // self.chunk_size), f"dense search ({num_queries} queries)", unit="chunk",
                            logger=log, end_line=False)
        for start in progress.wrap(range(0, self.ntotal, self.chunk_size)):
            chunk = self._chunk(start)
            for q0 in range(0, num_queries, self.query_batch):
                q = queries[q0 : q0 + self.query_batch]
                with fp32_products_in_onednn(self.device):  # oneDNN's fp32 products where MKL's are slow (AMD)
                    scores = q @ chunk.T
                top = scores.topk(min(k, scores.shape[1]), dim=1)
                merged_scores = torch.cat([best_scores[q0 : q0 + len(q)], top.values], dim=1)
                merged_rows = torch.cat([best_rows[q0 : q0 + len(q)], top.indices + start], dim=1)
                keep = merged_scores.topk(k, dim=1)
                best_scores[q0 : q0 + len(q)] = keep.values
                best_rows[q0 : q0 + len(q)] = merged_rows.gather(1, keep.indices)
        return self._labelled(best_scores.cpu().numpy().astype(np.float32), best_rows.cpu().numpy())

    def _chunk(self, start: int) -> torch.Tensor:
        """Rows ``start .. start + chunk_size`` in fp32 on the device."""
        part = self.vectors[start : start + self.chunk_size]
        if isinstance(part, torch.Tensor):
            return part.to(self.device, torch.float32)
        return torch.from_numpy(np.asarray(part, dtype=np.float32)).to(self.device)

    def _labelled(self, scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.where(np.isfinite(scores), rows, ABSENT)
        scores = np.where(rows >= 0, scores, PAD_SCORE).astype(np.float32)
        if self.labels is None:
            return scores, rows
        return scores, np.where(rows >= 0, self.labels[rows.clip(min=0)], ABSENT)


class FaissFlatIPIndex(ExactIPIndex):
    """The same exact search through faiss's IndexFlatIP (vectors copied in as fp32).

    ``resident_rows``: the most rows held as fp32 at once (None: all). A larger pool (M-BEIR's
    union pool is 17 GB in fp32) stays where it is, e.g. a memmap, and every search builds an
    IndexFlatIP over one block of rows at a time, merging the blocks' top-k. Blocks are whole
    multiples of faiss's 1024-row database block, so each score is the one-index search's bit for bit.
    """

    def __init__(self, vectors: np.ndarray, ids: np.ndarray | None = None, *, chunk_size: int = 65536,
                 resident_rows: int | None = None, **_):
        super().__init__(vectors, ids, chunk_size=chunk_size)
        if resident_rows is not None and resident_rows < len(vectors):
            self.block_rows, self.index = max(resident_rows // 1024, 1) * 1024, None
        else:
            self.block_rows, self.index = len(vectors), self._flat_index(0, len(vectors))

    def _flat_index(self, start: int, stop: int):
        import faiss

        index = faiss.IndexFlatIP(self.d)
        for begin in range(start, stop, self.chunk_size):
            index.add(np.ascontiguousarray(self.vectors[begin : min(begin + self.chunk_size, stop)], dtype=np.float32))
        return index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(check_queries(queries, self.d, k), dtype=np.float32)
        if self.index is not None:
            scores, rows = self.index.search(queries, k)
            return self._labelled(np.where(rows >= 0, scores, PAD_SCORE), rows.astype(np.int64))
        best_scores = np.full((len(queries), 0), PAD_SCORE, dtype=np.float32)
        best_rows = np.full((len(queries), 0), ABSENT, dtype=np.int64)
        for start in range(0, self.ntotal, self.block_rows):
            scores, rows = self._flat_index(start, min(start + self.block_rows, self.ntotal)).search(queries, k)
            found = rows >= 0
            merged_scores = np.concatenate([best_scores, np.where(found, scores, PAD_SCORE)], axis=1)
            merged_rows = np.concatenate([best_rows, np.where(found, rows + start, ABSENT)], axis=1)
            keep = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]  # stable: earlier rows first on ties
            best_scores = np.take_along_axis(merged_scores, keep, axis=1)
            best_rows = np.take_along_axis(merged_rows, keep, axis=1)
        return self._labelled(best_scores, best_rows)


def dense_index(vectors: np.ndarray, ids: np.ndarray | None = None, backend: str = "torch", **kwargs) -> ExactIPIndex:
    """The dense baseline index: ``backend`` 'torch' (chunked matmul) or 'faiss' (IndexFlatIP)."""
    if backend == "torch":
        return ExactIPIndex(vectors, ids, **kwargs)
    if backend == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise ValueError("dense backend 'faiss' needs faiss-cpu or faiss-gpu installed "
                             "(pip install faiss-cpu)") from None
        return FaissFlatIPIndex(vectors, ids, **kwargs)
    raise ValueError(f"unknown dense backend {backend!r}; valid choices: 'torch', 'faiss'")
