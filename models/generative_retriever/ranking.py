"""Ranking a pool's candidates for decoded queries: GENIUS, GENIUS^R and the dense baseline.

:func:`rank` is the one ranking both commands use: ``genius eval`` on cached decodings of a query
file, ``genius search`` (through :class:`GeniusIndex`) on one fresh query. Methods:

- ``genius``: every candidate of each beam's ID, beams in score order (scored by the beam);
- ``genius_r``: the union of all beams' candidates re-ranked by fused CLIP-SF cosine;
- ``dense``: exact inner product of the fused query with every fused candidate.

A query's excluded candidates (``exclude_cand_list``) are never returned by any method: each
ranks as many places deeper as the query may lose, drops them, then truncates to k, so it still
returns k candidates when the pool (or the beams) hold them.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from genius.common.fusion import score_fusion
from genius.models.generative_retriever.pool_assets import Pool
from genius.models.generative_retriever.retrieval import (
    Ranking,
    beam_leaves,
    beams_as_arrays,
    check_queries,
    genius_ranking,
    rerank_ranking,
    without_excluded,
)
from genius.models.generative_retriever.run_models import Models

METHODS = ("genius", "genius_r", "dense")


def rank(pool: Pool, leaves: np.ndarray, beam_scores: np.ndarray, fused_queries: np.ndarray | None, k: int,
         methods: Iterable[str], dense_backend: str = "torch", dense_chunk: int = 65536,
         device: str | torch.device = "cpu", excluded: np.ndarray | None = None) -> dict[str, Ranking]:
    """Top-``k`` pool rows per query for each of ``methods`` (in that order).

    ``leaves`` [Q, B]: each beam's trie leaf (``retrieval.beam_leaves``); ``beam_scores`` [Q, B];
    ``fused_queries`` [Q, D]: fused CLIP-SF query embeddings (needed by genius_r and dense);
    ``excluded`` [Q, E]: pool rows never to return per query, -1 padded (``retrieval.excluded_rows``).
    """
    if excluded is None or not excluded.shape[1]:
        return _rank(pool, leaves, beam_scores, fused_queries, k, methods, dense_backend, dense_chunk, device)
    deeper = _rank(pool, leaves, beam_scores, fused_queries, k + excluded.shape[1], methods, dense_backend,
                   dense_chunk, device)
    return {method: without_excluded(ranking, excluded, k) for method, ranking in deeper.items()}


def _rank(pool: Pool, leaves: np.ndarray, beam_scores: np.ndarray, fused_queries: np.ndarray | None, k: int,
          methods: Iterable[str], dense_backend: str, dense_chunk: int, device: str | torch.device
          ) -> dict[str, Ranking]:
    rankings: dict[str, Ranking] = {}
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown ranking method {method!r}; valid choices: {', '.join(METHODS)}")
        if method != "genius" and fused_queries is None:
            raise ValueError(f"ranking method {method!r} needs the queries' fused CLIP-SF embeddings")
        if method == "genius":
            rankings[method] = genius_ranking(pool.cmap, leaves, beam_scores, k)
        elif method == "genius_r":
            rankings[method] = rerank_ranking(pool.cmap, leaves, fused_queries, pool.fused(), k)
        else:
            rankings[method] = pool.dense_search(fused_queries, k, dense_backend, dense_chunk, torch.device(device))
    return rankings


# ---- the generative pipeline as an index ----------------------------------------------------
def pack_query_features(img: np.ndarray, txt: np.ndarray, img_mask: np.ndarray, txt_mask: np.ndarray) -> np.ndarray:
    """Raw stage-0 query features as one float32 matrix [Q, 2D + 2]: img | txt | img_mask | txt_mask.

    GENIUS needs both the raw vectors (for the Combiner) and their fusion (for re-ranking), so
    its index takes these packed features where a dense index takes one embedding.
    """
    img, txt = np.asarray(img, dtype=np.float32), np.asarray(txt, dtype=np.float32)
    masks = np.stack([np.asarray(img_mask), np.asarray(txt_mask)], axis=1).astype(np.float32)
    return np.concatenate([img, txt, masks], axis=1)


def unpack_query_features(packed: np.ndarray, dim: int) -> tuple[torch.Tensor, ...]:
    packed = torch.from_numpy(np.ascontiguousarray(packed, dtype=np.float32))
    return packed[:, :dim], packed[:, dim : 2 * dim], packed[:, 2 * dim], packed[:, 2 * dim + 1]


class GeniusIndex:
    """The whole GENIUS pipeline over one opened pool behind faiss's ``search`` (queries = packed
    raw features, :func:`pack_query_features`): Combiner embedding, trie-constrained beam search,
    then :func:`rank` with GENIUS^R (``rerank``) or GENIUS."""

    def __init__(self, models: Models, pool: Pool, rerank: bool = False):
        self.models, self.pool, self.rerank = models, pool, rerank

    @property
    def feature_dim(self) -> int:
        return self.pool.store.dim

    @property
    def ntotal(self) -> int:
        return self.pool.cmap.num_candidates

    @property
    def d(self) -> int:
        return 2 * self.feature_dim + 2

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        img, txt, img_mask, txt_mask = unpack_query_features(check_queries(queries, self.d, k), self.feature_dim)
        with torch.no_grad():
            beams = self.models.decode(self.models.embed(img, txt, img_mask, txt_mask), self.pool.decoding.trie)
        codes, scores, valid = beams_as_arrays(beams)
        method = "genius_r" if self.rerank else "genius"
        fused = score_fusion(img, txt, img_mask, txt_mask).numpy() if self.rerank else None
        ranking = rank(self.pool, beam_leaves(self.pool.cmap, codes, valid), scores, fused, k, [method])[method]
        return ranking.scores, ranking.ids(self.pool.ids)
