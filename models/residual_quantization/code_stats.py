"""Statistics of discrete IDs: code usage per level and collisions between full IDs."""
from __future__ import annotations

import numpy as np


def perplexity(counts: np.ndarray) -> float:
    """exp(entropy) of a code-usage histogram: the number of equally used codes it is worth."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def level_usage(codes: np.ndarray, codebook_sizes: list[int]) -> tuple[list[int], list[float]]:
    """Per level: number of distinct codes used, and usage perplexity."""
    used, perplexities = [], []
    for level, size in enumerate(codebook_sizes):
        counts = np.bincount(codes[:, level], minlength=size)
        used.append(int((counts > 0).sum()))
        perplexities.append(perplexity(counts))
    return used, perplexities


def id_buckets(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bucket index of each row, size of each bucket): rows with equal full IDs share a bucket."""
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def collision_stats(codes: np.ndarray) -> dict:
    """collision_rate: share of rows whose full ID is shared with another row; distinct_ids; largest_bucket."""
    inverse, counts = id_buckets(codes)
    shared = counts[inverse] > 1 if len(codes) else np.zeros(0, dtype=bool)
    return {
        "collision_rate": float(shared.mean()) if len(codes) else 0.0,
        "distinct_ids": int(len(counts)),
        "largest_bucket": int(counts.max()) if len(counts) else 0,
    }


def rank_in_bucket(codes: np.ndarray) -> np.ndarray:
    """For each row, how many earlier rows share its full ID (0 for the first): a disambiguating digit."""
    inverse, counts = id_buckets(codes)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - starts[inverse[order]]
    return rank
