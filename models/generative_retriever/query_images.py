"""The query images an ``image_tokens`` generator reads, by query-store row (train-gen and eval).

A query store holds hashed qids in its rows; the query jsonl maps each qid to its
``query_img_path`` (relative to the data root, as M-BEIR's records are). :func:`query_image_paths`
makes that map once; :class:`QueryImages` then reads a batch of rows as uint8 images
[B, 3, S, S] with stage 0's ``ImageReader`` (the generator normalises them itself). The crops are
kept in RAM when all of them fit in ``CACHE_BYTES``, so a small set is decoded from disk once per
run; a larger one is read from disk at every batch, in the training process (no worker prefetch).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from genius.common.mbeir import iter_queries
from genius.common.runstate import files_digest
from genius.common.store import EmbeddingStore

if TYPE_CHECKING:
    from genius.feature_extraction.clip_model import ImagePreprocess

CACHE_BYTES = 2 << 30


def query_image_paths(query_file: str | os.PathLike, store: EmbeddingStore, root: str | os.PathLike,
                      rows: np.ndarray | None = None) -> dict[int, str]:
    """Query-store row -> ``query_img_path`` for the store's ``rows`` (default: all), from
    ``query_file``. A query without an image, or whose image is missing, is an error naming it."""
    root = Path(root)
    wanted = np.unique(np.arange(len(store)) if rows is None else np.asarray(rows, dtype=np.int64))
    by_qid = {}
    for query in iter_queries(query_file, on_empty_text=lambda *_: None):
        by_qid.setdefault(query.hashed, (query.qid, query.img_path))
    paths = {}
    for row, hashed in zip(wanted.tolist(), np.asarray(store.ids)[wanted].tolist()):
        qid, img_path = by_qid.get(hashed, (None, None))
        if qid is None:
            raise ValueError(f"{store.path}: row {row} is no query of {query_file}; re-extract the query store "
                             "from this file")
        if img_path is None:
            raise ValueError(f"{query_file}: query {qid} has no query_img_path; an image_tokens generator reads "
                             "every query's image (use image queries, or model.condition: prefix)")
        if not (root / img_path).is_file():
            raise FileNotFoundError(f"{query_file}: query {qid}: image {root / img_path} not found "
                                    f"(query_img_path is relative to the data root {root})")
        paths[row] = img_path
    return paths


def images_digest(root: str | os.PathLike, paths: dict[int, str]) -> str:
    """One digest of the images' paths, sizes and mtimes (``common.runstate.files_digest``)."""
    return files_digest(sorted({Path(root) / p for p in paths.values()}), root)


class QueryImages:
    """uint8 query images by query-store row: ``images(rows) -> [len(rows), 3, S, S]``."""

    def __init__(self, root: str | os.PathLike, paths: dict[int, str], preprocess: ImagePreprocess):
        from genius.feature_extraction.clip_model import ImageReader  # open_clip: only where images are read

        self.root, self.paths = Path(root), paths
        fits = len(set(paths.values())) * 3 * preprocess.size**2 <= CACHE_BYTES
        self.reader = ImageReader(root, preprocess, cache=fits)

    @property
    def digest(self) -> str:
        return images_digest(self.root, self.paths)

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        return torch.stack([self.reader(self.paths[row]) for row in np.asarray(rows).tolist()])

