"""Training pairs (query, positive candidate) over embedding stores, batched for stages 1 and 2.

A query may have several positives. By default one is drawn per query *per epoch*; ``fixed``
draws one per query once for the whole run, as the official code did (it drew at dataset
construction and kept the draw for every epoch). Batches are cut from one global,
seeded permutation and each rank takes its own contiguous slice of every global batch, so a
run on W processes with batch B sees exactly the samples of a 1-process run with batch W x B.

Classes (for objectives that classify, as IRGen's tokenizer does) are not a field of the data:
:func:`class_labels` derives them from the relevance of the training query file.

Indexing (:func:`add_self_pairs`, DSI's indexing step) appends a pair (candidate -> itself) for
the candidates of further stores, read from those stores on both sides: batches then mix rows of
several stores, which :class:`StoreStack` presents as one.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Iterator, Literal

import numpy as np
import torch

from genius.common.mbeir import hash_did, iter_queries
from genius.common.store import EmbeddingStore

log = logging.getLogger("genius.pairs")


@dataclass
class TrainingPairs:
    query_rows: np.ndarray  # int64 [Q] rows of the query store
    pos_offsets: np.ndarray  # int64 [Q + 1] CSR offsets into pos_rows
    pos_rows: np.ndarray  # int64 rows of the candidate store
    dropped_queries: int = 0  # queries with no positive in the candidate store
    missing_positives: int = 0  # positives (of kept and dropped queries) that are not in the candidate store
    empty_queries: int = 0  # queries with an empty text, which extraction left out (data.empty_text: skip)

    def __len__(self) -> int:
        return len(self.query_rows)

    def sample_positives(self, rng: np.random.Generator) -> np.ndarray:
        """One positive candidate row per query, uniformly among its positives."""
        counts = np.diff(self.pos_offsets)
        pick = (rng.random(len(counts)) * counts).astype(np.int64)
        return self.pos_rows[self.pos_offsets[:-1] + pick]


def load_training_pairs(query_file: str | os.PathLike, queries: EmbeddingStore, pool: EmbeddingStore) -> TrainingPairs:
    """Join a query jsonl's positives with the rows of the query and candidate stores.

    The query file is read with :func:`iter_queries`, so a malformed line, a qid repeated with a
    different record or an empty file raises naming file and line. Positives that are not in the
    candidate store are counted (``missing_positives``), and queries left without any are
    counted and skipped (``dropped_queries``): the trainers print both. Queries with an empty text
    are not in the query store (extraction left them out, or there is no store: it stops at them),
    so they are counted, logged and skipped too (``empty_queries``); candidates it left out are
    missing positives."""
    pool_rows = dict(zip(np.asarray(pool.ids).tolist(), range(len(pool))))
    query_ids, offsets, positives, dropped, missing = [], [0], [], 0, 0
    empty: set[str] = set()
    for query in iter_queries(query_file, on_empty_text=lambda _, qid, __: empty.add(qid)):
        rows = [pool_rows[h] for h in map(hash_did, query.pos) if h in pool_rows]
        missing += len(query.pos) - len(rows)
        if not rows:
            dropped += 1
            continue
        query_ids.append(query.hashed)
        positives.extend(rows)
        offsets.append(len(positives))
    if empty:
        log.warning("%s: %d queries with an empty text have no embedding (extraction left them out, "
                    "data.empty_text: skip); not trained on", query_file, len(empty))
    if not query_ids:
        raise ValueError(f"{query_file}: no query has a positive in the candidate store {pool.path}; check that "
                         "the store was extracted from the pool these queries' positives are in")
    return TrainingPairs(
        query_rows=queries.rows_of(np.array(query_ids, dtype=np.int64)),
        pos_offsets=np.array(offsets, dtype=np.int64),
        pos_rows=np.array(positives, dtype=np.int64),
        dropped_queries=dropped,
        missing_positives=missing,
        empty_queries=len(empty),
    )


@dataclass
class ClassLabels:
    pool: np.ndarray  # int64 [N] class of every candidate-store row; -1: in no training query's class
    pairs: np.ndarray  # int64 [Q] class of every training pair (its query's positives' class)
    num_classes: int


def _root(parent: np.ndarray, row: int) -> int:
    while parent[row] != row:
        parent[row] = parent[parent[row]]  # path halving keeps the trees flat
        row = int(parent[row])
    return row


def class_labels(query_file: str | os.PathLike, pool: EmbeddingStore, pairs: TrainingPairs) -> ClassLabels:
    """The classes of the training data: the connected groups of candidates that some query
    relates (a query's positives and the dids of its ``exclude_cand_list``, its own image in a
    gallery that holds it, are one class), by union-find over the candidate-store rows. A class
    holds at least one positive; candidates related by no query are labelled -1."""
    pool_rows = dict(zip(np.asarray(pool.ids).tolist(), range(len(pool))))
    parent = np.arange(len(pool), dtype=np.int64)
    for query in iter_queries(query_file, on_empty_text=lambda *_: None):
        rows = [pool_rows[h] for h in map(hash_did, [*query.pos, *query.exclude]) if h in pool_rows]
        for row in rows[1:]:
            parent[_root(parent, row)] = _root(parent, rows[0])
    roots = np.array([_root(parent, row) for row in range(len(pool))], dtype=np.int64)
    classes, pair_labels = np.unique(roots[pairs.pos_rows[pairs.pos_offsets[:-1]]], return_inverse=True)
    position = np.searchsorted(classes, roots).clip(max=len(classes) - 1)
    pool_labels = np.where(classes[position] == roots, position, -1)
    return ClassLabels(pool=pool_labels.astype(np.int64), pairs=pair_labels.astype(np.int64).reshape(-1),
                       num_classes=len(classes))


def _side(store: EmbeddingStore, rows: np.ndarray, prefix: str) -> dict[str, torch.Tensor]:
    a = store.arrays
    # memmap fancy indexing wants sorted rows for locality; restore the batch order afterwards.
    order = np.argsort(rows, kind="stable")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    sorted_rows = rows[order]

    def take(arr, dtype):
        return torch.from_numpy(np.asarray(arr[sorted_rows], dtype=dtype)[inverse])

    return {
        f"{prefix}_img": take(a.img, np.float32),
        f"{prefix}_txt": take(a.txt, np.float32),
        f"{prefix}_img_mask": take(a.img_mask, np.float32),
        f"{prefix}_txt_mask": take(a.txt_mask, np.float32),
        f"{prefix}_modality": take(a.modality, np.int64),
        f"{prefix}_target_modality": take(a.target_modality, np.int64),
    }


class StoreStack:
    """Several stores read as one: row ``r`` of the stack is row ``r - start`` of the store whose
    rows ``[start, start + len)`` hold it, stores in the order given."""

    def __init__(self, stores: list[EmbeddingStore]):
        self.stores = list(stores)
        self.starts = np.cumsum([0] + [len(s) for s in self.stores]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])


# What batches read rows from: one store, or a stack of them (add_self_pairs).
RowSource = EmbeddingStore | StoreStack


def read_side(source: RowSource, rows: np.ndarray, prefix: str) -> dict[str, torch.Tensor]:
    """The batch fields of ``rows`` of a store or of a stack of stores, in the order of ``rows``."""
    if isinstance(source, EmbeddingStore):
        return _side(source, rows, prefix)
    which = np.searchsorted(source.starts, rows, side="right") - 1
    parts = []  # (positions in the batch, their fields) per store the batch reads
    for i, store in enumerate(source.stores):
        at = np.flatnonzero(which == i)
        if len(at):
            parts.append((torch.from_numpy(at), _side(store, rows[at] - source.starts[i], prefix)))
    if len(parts) == 1:
        return parts[0][1]
    merged = {name: field.new_empty((len(rows), *field.shape[1:])) for name, field in parts[0][1].items()}
    for at, fields in parts:
        for name, field in fields.items():
            merged[name][at] = field
    return merged


def add_self_pairs(pairs: TrainingPairs, queries: EmbeddingStore, pool: EmbeddingStore,
                   index_stores: list[EmbeddingStore]) -> tuple[TrainingPairs, StoreStack, StoreStack, list[int]]:
    """The training pairs followed by one pair (candidate -> itself) for every candidate of
    ``index_stores`` that is neither in the training pool nor in an earlier index store (by did):
    DSI's indexing, so a generator also learns the IDs of candidates no training query targets.
    Both sides of such a pair are the candidate's row of its own store, so the query and candidate
    sides become stacks: ``[queries, *index_stores]`` and ``[pool, *index_stores]``. Also returns
    how many candidates each index store adds."""
    query_rows, pos_rows, added = [pairs.query_rows], [pairs.pos_rows], []
    query_start, pool_start = len(queries), len(pool)
    for store, rows in zip(index_stores, self_pair_rows(pool.ids, [store.ids for store in index_stores])):
        query_rows.append(query_start + rows)
        pos_rows.append(pool_start + rows)
        added.append(len(rows))
        query_start, pool_start = query_start + len(store), pool_start + len(store)
    offsets = np.concatenate([pairs.pos_offsets, pairs.pos_offsets[-1] + np.arange(1, sum(added) + 1)])
    indexed = replace(pairs, query_rows=np.concatenate(query_rows), pos_offsets=offsets.astype(np.int64),
                      pos_rows=np.concatenate(pos_rows))
    return indexed, StoreStack([queries, *index_stores]), StoreStack([pool, *index_stores]), added


def self_pair_rows(pool_ids: np.ndarray, index_ids: list[np.ndarray]) -> list[np.ndarray]:
    """For each index store (its hashed dids), the rows :func:`add_self_pairs` makes pairs of: those
    whose did neither the training pool (``pool_ids``) nor an earlier index store holds."""
    seen, found = np.asarray(pool_ids, dtype=np.int64), []
    for ids in index_ids:
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.flatnonzero(~np.isin(ids, seen))
        seen = np.concatenate([seen, ids[rows]])
        found.append(rows)
    return found


PositiveDraw = Literal["per_epoch", "fixed"]


def iterate_batches(pairs: TrainingPairs, queries: RowSource, pool: RowSource, *, batch_size: int,
                    epoch: int, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                    positives: PositiveDraw = "per_epoch",
                    labels: np.ndarray | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's slice of each global batch of ``batch_size * world_size`` pairs for ``epoch``.

    ``positives``: ``per_epoch`` draws each query's positive anew every epoch; ``fixed`` makes the
    same draw in every epoch (from ``seed`` alone). Keys: ``q_img, q_txt, q_img_mask, q_txt_mask,
    q_modality, q_target_modality`` and the same with ``c_`` for the positive candidate (fp32
    vectors and masks, int64 modality codes), ``q_row`` and ``c_row`` (the store rows, int64, for
    what a stage reads by row besides the stores: train-gen's query images; rows of the stacks
    when ``queries`` and ``pool`` are :class:`StoreStack`); with ``labels``
    (``ClassLabels.pool``) also ``label``, the pair's class (int64).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(pairs))
    # The fixed draw comes from a stream of its own, so the batch order stays that of per_epoch.
    positive_rows = pairs.sample_positives(rng if positives == "per_epoch" else np.random.default_rng([seed]))
    global_batch = batch_size * world_size
    stop = len(order) - len(order) % global_batch if drop_last else len(order)
    for start in range(0, stop, global_batch):
        chunk = order[start : start + global_batch]
        mine = chunk[rank * batch_size : (rank + 1) * batch_size]
        if len(mine) == 0:
            continue
        batch = {**read_side(queries, pairs.query_rows[mine], "q"), **read_side(pool, positive_rows[mine], "c"),
                 "q_row": torch.from_numpy(pairs.query_rows[mine]), "c_row": torch.from_numpy(positive_rows[mine])}
        if labels is not None:
            batch["label"] = torch.from_numpy(labels[positive_rows[mine]])
        yield batch


def batches_per_epoch(num_pairs: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    global_batch = batch_size * world_size
    return num_pairs // global_batch if drop_last else -(-num_pairs // global_batch)
