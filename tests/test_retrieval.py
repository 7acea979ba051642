"""Stage 3 retrieval: ID -> candidates, GENIUS and GENIUS^R rankings, dense search, the one ranking
function and the GENIUS index built on it.

Every fast path is compared with a plain Python (or full-matmul) reference on random inputs.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from genius.common.fusion import score_fusion
from genius.models.generative_retriever.ranking import GeniusIndex, pack_query_features, rank
from genius.models.generative_retriever.retrieval import (
    ABSENT,
    CandidateMap,
    ExactIPIndex,
    Ranking,
    beam_leaves,
    dense_index,
    genius_ranking,
    rerank_ranking,
    target_modality_share,
    union_sizes,
)
from genius.trie_cpp.python_trie import PythonTrie


def random_codes(rng, n=200, sizes=(3, 4, 3)):
    """Small codebooks so that many candidates collide on the same ID."""
    return np.stack([rng.integers(0, s, n) for s in sizes], axis=1).astype(np.int64)


def random_beams(rng, cmap_codes, num_queries=30, num_beams=6):
    """Beams drawn from the pool's IDs, plus unseen IDs, absent beams and repeats."""
    distinct = np.unique(cmap_codes, axis=0)
    beams = distinct[rng.integers(0, len(distinct), (num_queries, num_beams))]
    beams[:, 1] = beams[:, 0]  # a repeated ID
    beams[::3, -1] = -1  # absent beams
    beams[1::4, 2] = [2, 3, 9]  # an ID no candidate has (code 9 is out of range)
    scores = -np.sort(rng.random((num_queries, num_beams)), axis=1)
    return beams, scores.astype(np.float32)


def reference_union(codes, beams):
    """Candidates of each beam's ID in beam order then pool order; repeats and absent IDs skipped."""
    out = []
    for q_beams in beams:
        seen, rows = set(), []
        for beam in map(tuple, q_beams):
            if beam in seen or min(beam) < 0:
                continue
            seen.add(beam)
            rows += [r for r in range(len(codes)) if tuple(codes[r]) == beam]
        out.append(rows)
    return out


@pytest.fixture
def pool():
    rng = np.random.default_rng(0)
    codes = random_codes(rng)
    return codes, CandidateMap.build(PythonTrie.build(codes), codes)


def test_candidate_map_groups_collisions_in_trie_leaf_order(pool):
    codes, cmap = pool
    trie_ids = PythonTrie.build(codes).ids()
    assert cmap.num_ids == len(trie_ids) == len(np.unique(codes, axis=0))
    for leaf, id_ in enumerate(trie_ids):
        expected = np.flatnonzero((codes == id_).all(axis=1))  # pool order
        np.testing.assert_array_equal(cmap.candidates(leaf), expected)
    sizes = np.diff(cmap.leaf_start)
    stats = cmap.collision_stats()
    assert stats["candidates"] == 200 and stats["distinct_ids"] == len(trie_ids)
    assert stats["candidates_sharing_an_id"] == sizes[sizes > 1].sum() > 0
    assert stats["largest_group"] == sizes.max()


def test_candidate_map_orders_an_ids_rows_by_a_key(pool):
    codes, _ = pool
    key = np.random.default_rng(5).integers(0, 4, len(codes)).astype(np.float64)  # ties: pool order decides
    cmap = CandidateMap.build(PythonTrie.build(codes), codes, order=key)
    for leaf, id_ in enumerate(PythonTrie.build(codes).ids()):
        members = np.flatnonzero((codes == id_).all(axis=1))
        expected = sorted(members.tolist(), key=lambda r: (key[r], r))
        np.testing.assert_array_equal(cmap.candidates(leaf), expected)
    assert any(not np.array_equal(cmap.candidates(j), np.sort(cmap.candidates(j))) for j in range(cmap.num_ids))
    with pytest.raises(ValueError, match="one finite key per pool row"):
        CandidateMap.build(PythonTrie.build(codes), codes, order=key[:-1])
    with pytest.raises(ValueError, match="one finite key per pool row"):
        CandidateMap.build(PythonTrie.build(codes), codes, order=np.where(key > 2, np.nan, key))


def test_leaves_of_maps_ids_and_marks_unknown_ones(pool):
    codes, cmap = pool
    trie_ids = PythonTrie.build(codes).ids()
    query = np.stack([trie_ids[5], trie_ids[0], [2, 3, 9], [-1, -1, -1], trie_ids[-1]])
    np.testing.assert_array_equal(cmap.leaves_of(query), [5, 0, ABSENT, ABSENT, len(trie_ids) - 1])
    assert cmap.leaves_of(query[None]).shape == (1, 5)
    with pytest.raises(ValueError, match="levels"):
        cmap.leaves_of(np.zeros((2, 4), dtype=np.int64))


def test_candidate_map_refuses_a_stale_trie():
    codes = np.array([[0, 1, 2], [1, 0, 0], [0, 1, 2], [2, 2, 1]])
    with pytest.raises(ValueError, match="not in the trie.*stale"):
        CandidateMap.build(PythonTrie.build(codes[:2]), codes)  # the trie lacks [2, 2, 1]
    with pytest.raises(ValueError, match="no candidate has.*stale"):
        CandidateMap.build(PythonTrie.build(np.concatenate([codes, [[2, 3, 2]]])), codes)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_genius_ranking_matches_reference(pool, k):
    codes, cmap = pool
    beams, scores = random_beams(np.random.default_rng(2), codes)
    ranking = genius_ranking(cmap, cmap.leaves_of(beams), scores, k)
    assert ranking.rows.shape == ranking.scores.shape == (len(beams), k)
    for q, rows in enumerate(reference_union(codes, beams)):
        expected = rows[:k]
        np.testing.assert_array_equal(ranking.rows[q, : len(expected)], expected)
        assert (ranking.rows[q, len(expected):] == ABSENT).all()
        assert np.isneginf(ranking.scores[q, len(expected):]).all()
        # each candidate carries its beam's score, so scores never increase down the list
        assert (np.diff(ranking.scores[q, : len(expected)]) <= 0).all()
        beam_of = {tuple(b): s for b, s in zip(reversed(beams[q].tolist()), reversed(scores[q].tolist()))}
        np.testing.assert_allclose(ranking.scores[q, : len(expected)], [beam_of[tuple(codes[r])] for r in expected])


@pytest.mark.parametrize("k", [3, 50])
def test_rerank_matches_brute_force_cosine(pool, k):
    codes, cmap = pool
    rng = np.random.default_rng(3)
    beams, _ = random_beams(rng, codes)
    cand = rng.normal(size=(len(codes), 16)).astype(np.float16)  # stored fp16, re-normalised in fp32
    query = rng.normal(size=(len(beams), 16)).astype(np.float32)
    ranking = rerank_ranking(cmap, cmap.leaves_of(beams), query, cand, k, chunk=7)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    c, qn = unit(cand.astype(np.float32)), unit(query)
    for q, rows in enumerate(reference_union(codes, beams)):
        cos = c[rows] @ qn[q]
        expected = [rows[i] for i in np.argsort(-cos, kind="stable")[:k]]
        np.testing.assert_array_equal(ranking.rows[q, : len(expected)], expected)
        np.testing.assert_allclose(ranking.scores[q, : len(expected)], np.sort(cos)[::-1][:k], rtol=1e-5, atol=1e-6)
        assert (ranking.rows[q, len(expected):] == ABSENT).all()
    sizes = union_sizes(cmap, cmap.leaves_of(beams))
    np.testing.assert_array_equal(sizes, [len(r) for r in reference_union(codes, beams)])


def test_ranking_ids_and_target_modality_share(pool):
    codes, cmap = pool
    beams, scores = random_beams(np.random.default_rng(4), codes, num_queries=4)
    ranking = genius_ranking(cmap, cmap.leaves_of(beams), scores, 8)
    pool_ids = 10_000_000 * 20 + np.arange(len(codes))
    ids = ranking.ids(pool_ids)
    np.testing.assert_array_equal(ids[ranking.rows >= 0], pool_ids[ranking.rows[ranking.rows >= 0]])
    assert (ids[ranking.rows < 0] == ABSENT).all()
    modality = codes[:, 0].astype(np.int8)  # level 0 is the modality code
    target = modality[ranking.rows[:, 0]]
    share = target_modality_share(ranking, modality, target)
    returned = ranking.rows >= 0
    assert share == pytest.approx((modality[ranking.rows[returned]] == np.repeat(target, returned.sum(1))).mean())


@pytest.mark.parametrize("chunk,query_batch,k", [(7, 5, 4), (64, 64, 10), (5, 3, 70)])
def test_chunked_dense_search_equals_full_matmul(chunk, query_batch, k):
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(60, 12)).astype(np.float32)
    queries = rng.normal(size=(13, 12)).astype(np.float32)
    labels = 10_000_000 * 21 + rng.permutation(60)
    scores, ids = ExactIPIndex(vectors, labels, chunk_size=chunk, query_batch=query_batch).search(queries, k)
    full = queries @ vectors.T
    top = np.argsort(-full, axis=1)[:, :k]
    found = min(k, 60)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (13, k)
    np.testing.assert_array_equal(ids[:, :found], labels[top])
    np.testing.assert_allclose(scores[:, :found], np.take_along_axis(full, top, 1), rtol=1e-5, atol=1e-5)
    assert (ids[:, found:] == ABSENT).all() and np.isneginf(scores[:, found:]).all()
    rows = ExactIPIndex(vectors, chunk_size=chunk).search(queries, k)[1]
    np.testing.assert_array_equal(rows[:, :found], top)


def test_faiss_backend_equals_torch_backend():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(6)
    vectors = rng.normal(size=(80, 8)).astype(np.float16)
    queries = rng.normal(size=(9, 8)).astype(np.float32)
    torch_scores, torch_ids = dense_index(vectors, backend="torch", chunk_size=16).search(queries, 90)
    faiss_scores, faiss_ids = dense_index(vectors, backend="faiss", chunk_size=16).search(queries, 90)
    np.testing.assert_array_equal(torch_ids, faiss_ids)
    np.testing.assert_allclose(torch_scores[:, :80], faiss_scores[:, :80], rtol=1e-5, atol=1e-5)
    assert np.isneginf(faiss_scores[:, 80:]).all()


def test_faiss_backend_streams_blocks_with_the_one_index_scores():
    """A pool larger than resident_rows is searched block by block, with the same rows and scores."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(5000, 16)).astype(np.float16)
    queries = rng.normal(size=(30, 16)).astype(np.float32)  # >= 20 queries: faiss's BLAS path
    whole = dense_index(vectors, backend="faiss", chunk_size=512)
    streamed = dense_index(vectors, backend="faiss", chunk_size=512, resident_rows=2100)
    assert whole.index is not None and streamed.index is None and streamed.block_rows == 2048
    np.testing.assert_array_equal(streamed.search(queries, 10)[1], whole.search(queries, 10)[1])
    whole_scores, whole_rows = whole.search(queries, 6000)  # every row: deep down, some scores tie exactly
    streamed_scores, streamed_rows = streamed.search(queries, 6000)
    np.testing.assert_array_equal(streamed_scores, whole_scores)
    score_of_row = np.take_along_axis(whole_scores, np.argsort(whole_rows[:, :5000], axis=1), axis=1)
    # the same score for every row (tied rows may swap places, as faiss leaves their order open)
    np.testing.assert_array_equal(np.take_along_axis(score_of_row, streamed_rows[:, :5000], axis=1),
                                  streamed_scores[:, :5000])
    assert (streamed_rows[:, 5000:] == ABSENT).all()


def test_pool_faiss_search_holds_only_the_host_budget_in_fp32(monkeypatch):
    """Pool.dense_search gives faiss as many fp32 rows as resident_budget allows, streaming the rest."""
    pytest.importorskip("faiss")
    from genius.models.generative_retriever import pool_assets

    rng = np.random.default_rng(8)
    fused = rng.normal(size=(3000, 8)).astype(np.float16)
    queries = rng.normal(size=(25, 8)).astype(np.float32)
    pool = SimpleNamespace(_dense=None, fused=lambda: fused)
    monkeypatch.setattr(pool_assets, "resident_budget", lambda device: 1024 * 8 * 4)  # 1024 fp32 rows
    streamed = pool_assets.Pool.dense_search(pool, queries, 10, "faiss", 512, torch.device("cpu"))
    assert pool._dense.index is None and pool._dense.block_rows == 1024
    exact = pool_assets.Pool.dense_search(SimpleNamespace(_dense=None, fused=lambda: fused), queries, 10, "torch", 512,
                                          torch.device("cpu"))
    np.testing.assert_array_equal(streamed.rows, exact.rows)
    np.testing.assert_allclose(streamed.scores, exact.scores, rtol=1e-5, atol=1e-5)


def test_dense_index_checks_its_inputs():
    index = ExactIPIndex(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[Q, 3\]"):
        index.search(np.zeros((2, 4), np.float32), 1)
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.zeros((2, 3), np.float32), 0)
    with pytest.raises(ValueError, match="valid choices"):
        dense_index(np.zeros((4, 3), np.float32), backend="annoy")


def _opened_pool(cmap, labels, cand, dim):
    """A stand-in for an opened ``pool_assets.Pool``: what ``rank`` and ``GeniusIndex`` read."""
    dense = ExactIPIndex(cand)
    return SimpleNamespace(cmap=cmap, ids=labels, decoding=SimpleNamespace(trie="the pool's trie"),
                           store=SimpleNamespace(dim=dim),
                           fused=lambda: cand,
                           dense_search=lambda q, k, *_: Ranking(*dense.search(q, k)[::-1]))


def test_rank_is_the_three_methods(pool):
    """One ranking function for eval and search: GENIUS, GENIUS^R and dense, in the order asked."""
    codes, cmap = pool
    rng = np.random.default_rng(3)
    beams, scores = random_beams(rng, codes, num_queries=6)
    valid = (beams >= 0).all(-1)
    leaves = beam_leaves(cmap, beams, valid)
    np.testing.assert_array_equal(leaves, np.where(valid, cmap.leaves_of(beams), ABSENT))
    cand = rng.normal(size=(len(codes), 5)).astype(np.float32)
    queries = rng.normal(size=(6, 5)).astype(np.float32)
    opened = _opened_pool(cmap, np.arange(len(codes)), cand, 5)
    got = rank(opened, leaves, scores, queries, 4, ["dense", "genius", "genius_r"])
    assert list(got) == ["dense", "genius", "genius_r"]
    np.testing.assert_array_equal(got["genius"].rows, genius_ranking(cmap, leaves, scores, 4).rows)
    np.testing.assert_array_equal(got["genius_r"].rows, rerank_ranking(cmap, leaves, queries, cand, 4).rows)
    np.testing.assert_array_equal(got["dense"].rows, ExactIPIndex(cand).search(queries, 4)[1])
    with pytest.raises(ValueError, match="valid choices"):
        rank(opened, leaves, scores, queries, 4, ["bm25"])
    with pytest.raises(ValueError, match="fused CLIP-SF"):
        rank(opened, leaves, scores, None, 4, ["genius_r"])


def test_genius_index_search_is_the_pipeline(pool):
    """The index = embed -> decode -> ID lookup -> rank, behind faiss's search()."""
    codes, cmap = pool
    rng = np.random.default_rng(7)
    beams, scores = random_beams(rng, codes, num_queries=5)
    dim = 6
    img, txt = rng.normal(size=(5, dim)), rng.normal(size=(5, dim))
    img_mask, txt_mask = np.array([1, 1, 0, 1, 1]), np.array([1, 0, 1, 1, 1])
    seen = {}

    def embed(i, t, im, tm):
        seen["masks"] = (im.numpy().copy(), tm.numpy().copy())
        return score_fusion(i, t, im, tm)

    def decode(z, trie):
        assert z.shape == (5, dim) and trie == "the pool's trie"
        valid = torch.from_numpy((beams >= 0).all(-1))
        return SimpleNamespace(codes=torch.from_numpy(beams), scores=torch.from_numpy(scores), valid=valid)

    labels = 10_000_000 * 22 + np.arange(len(codes))
    cand = rng.normal(size=(len(codes), dim)).astype(np.float32)
    opened = _opened_pool(cmap, labels, cand, dim)
    models = SimpleNamespace(embed=embed, decode=decode)
    packed = pack_query_features(img, txt, img_mask, txt_mask)
    assert packed.shape == (5, 2 * dim + 2) and packed.dtype == np.float32
    index = GeniusIndex(models, opened)
    assert (index.d, index.ntotal) == (2 * dim + 2, len(codes))
    out_scores, out_ids = index.search(packed, 7)
    np.testing.assert_array_equal(seen["masks"][0], img_mask)
    expected = genius_ranking(cmap, cmap.leaves_of(beams), scores, 7)
    np.testing.assert_array_equal(out_ids, expected.ids(labels))
    np.testing.assert_array_equal(out_scores, expected.scores)

    r_scores, r_ids = GeniusIndex(models, opened, rerank=True).search(packed, 7)
    fused = score_fusion(*(torch.from_numpy(np.asarray(a, np.float32)) for a in (img, txt, img_mask, txt_mask))).numpy()
    expected = rerank_ranking(cmap, cmap.leaves_of(beams), fused, cand, 7)
    np.testing.assert_array_equal(r_ids, expected.ids(labels))


def _candidate_store(path, dids, extra_meta=None):
    from genius.common.mbeir import hash_did
    from genius.common.store import StoreArrays, write_store

    n = len(dids)
    vectors = np.ones((n, 4), np.float16)
    arrays = StoreArrays(np.array([hash_did(d) for d in dids], np.int64), vectors, np.zeros_like(vectors),
                         np.ones(n, np.uint8), np.zeros(n, np.uint8), np.zeros(n, np.int8), np.zeros(n, np.int8))
    return write_store(path, arrays, encoder="e", kind="candidate", extra_meta=extra_meta)


def test_a_union_stores_candidates_sharing_an_id_come_in_the_local_pools_concatenation(tmp_path, caplog):
    """The official code indexes the universal pool as the local pools concatenated in the table's
    order (MSCOCO before Fashion200K); M-BEIR's union file is sorted by did (Fashion200K first).
    Candidates sharing an ID must come in the official order, so the MSCOCO positive is first;
    pools M-BEIR does not have keep extract's order (test_a_union_of_other_pools_...)."""
    from genius.common.store import EmbeddingStore
    from genius.models.generative_retriever.pool_assets import concatenation_order

    mscoco, fashion = ["9:1", "9:2"], ["1:1", "1:2", "1:3", "1:4", "1:5", "1:6"]
    _candidate_store(tmp_path / "mbeir_mscoco_task0_test_cand_pool", mscoco)
    _candidate_store(tmp_path / "mbeir_fashion200k_task0_cand_pool", fashion)
    union_dids = sorted(mscoco + fashion, key=lambda d: tuple(map(int, d.split(":"))))  # the union file's order
    built_from = ["mbeir_fashion200k_task0_cand_pool", "mbeir_mscoco_task0_test_cand_pool"]  # as data.local_pools
    union = EmbeddingStore.open(_candidate_store(tmp_path / "mbeir_union_test_cand_pool", union_dids,
                                                 {"built_from": built_from}))
    order = concatenation_order(union)  # MSCOCO first all the same: the official order
    np.testing.assert_array_equal(order, [(mscoco + fashion).index(d) for d in union_dids])

    shared = [0, 7, 7]  # six images share one ID: five Fashion200K ones and the MSCOCO positive 9:1
    codes = np.array([shared if d in ("9:1", "1:1", "1:2", "1:3", "1:4", "1:5") else [0, 1, int(d[-1])]
                      for d in union_dids], np.int64)
    cmap = CandidateMap.build(PythonTrie.build(codes), codes, order)
    beams = np.array([[shared, [0, 1, 2]]])
    ranking = genius_ranking(cmap, beam_leaves(cmap, beams, np.ones((1, 2), bool)), np.array([[-0.1, -2.0]]), 5)
    ranked = [union_dids[r] for r in ranking.rows[0]]
    assert ranked == ["9:1", "1:1", "1:2", "1:3", "1:4"]  # the union file's order put 9:1 sixth: a miss at 5

    assert concatenation_order(EmbeddingStore.open(tmp_path / "mbeir_mscoco_task0_test_cand_pool")) is None
    (tmp_path / "mbeir_fashion200k_task0_cand_pool" / "meta.json").unlink()  # a local store gone since
    assert concatenation_order(union) is None
    assert "keep the union file's order" in caplog.text and "mbeir_fashion200k_task0_cand_pool" in caplog.text


def test_a_union_of_other_pools_keeps_extracts_order(tmp_path):
    from genius.common.store import EmbeddingStore
    from genius.models.generative_retriever.pool_assets import concatenation_order

    first, second = ["21:5", "21:6"], ["20:1", "20:2"]
    _candidate_store(tmp_path / "mbeir_mine_task0_cand_pool", first)
    _candidate_store(tmp_path / "mbeir_alsomine_task3_cand_pool", second)
    union = EmbeddingStore.open(_candidate_store(tmp_path / "union", sorted(first + second), {
        "built_from": ["mbeir_mine_task0_cand_pool", "mbeir_alsomine_task3_cand_pool"]}))
    np.testing.assert_array_equal(concatenation_order(union), [2, 3, 0, 1])  # 20:1, 20:2 come from the second
