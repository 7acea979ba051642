"""Every trie backend against brute force over small code sets, and against each other on disk.

Brute force works on Python tuples: the children of a prefix are the next codes of the IDs that
start with it. Node ids are checked against their documented numbering: the CSR backends number
the nodes of a depth by the sorted rank of their prefix, marisa by the rank of their first ID.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import genius.trie_cpp
from genius.trie_cpp import ABSENT, TRIE_BACKENDS, build_trie, load_trie
from genius.trie_cpp.python_trie import HEADER_BYTES, MAGIC_V2, PythonTrie


def _code_sets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    modalities = np.concatenate([rng.integers(0, 3, (300, 1)), rng.integers(0, 6, (300, 4))], axis=1)
    duplicates = np.repeat(rng.integers(0, 3, (8, 4)), 3, axis=0)
    # Codes around the UTF-16 surrogate range and far above it, which marisa keys must survive.
    edges = np.array([0, 0xD7FE, 0xD7FF, 0xD800, 0xDFFF, 0xE000, 70000, 1_000_000])
    return {
        "single": np.array([[3, 1, 4]]),
        "one_level": rng.integers(0, 7, (20, 1)),
        "duplicates": duplicates[rng.permutation(len(duplicates))],
        "fewer_ids_than_width": rng.integers(0, 5000, (5, 3)),
        "three_modalities": modalities,
        "dense": np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), axis=-1).reshape(-1, 3),
        "surrogate_edges": rng.choice(edges, (40, 3)),
        "empty": np.zeros((0, 3), dtype=np.int64),
    }


CODE_SETS = _code_sets()


@pytest.fixture(params=TRIE_BACKENDS)
def backend(request) -> str:
    if request.param == "marisa":
        pytest.importorskip("marisa_trie")
    return request.param


# ---- brute force --------------------------------------------------------------------------------
def distinct_ids(codes: np.ndarray) -> list[tuple[int, ...]]:
    return sorted({tuple(int(c) for c in row) for row in codes})


def brute_children(ids: list[tuple[int, ...]], prefix: tuple[int, ...], num_levels: int) -> list[int]:
    if len(prefix) >= num_levels:
        return []
    return sorted({i[len(prefix)] for i in ids if i[: len(prefix)] == prefix})


def brute_node(backend: str, ids: list[tuple[int, ...]], prefix: tuple[int, ...]) -> int:
    """The node id a backend gives ``prefix``, or -1 when no ID starts with it."""
    depth = len(prefix)
    if not any(i[:depth] == prefix for i in ids):
        return ABSENT
    if backend == "marisa":
        return next(rank for rank, i in enumerate(ids) if i[:depth] == prefix)
    return sorted({i[:depth] for i in ids}).index(prefix)


def probe_prefixes(ids: list[tuple[int, ...]], num_levels: int) -> list[tuple[int, ...]]:
    """Every prefix of every ID, plus absent ones (a code no ID uses), plus an over-long one."""
    present = {i[:d] for i in ids for d in range(num_levels + 1)} | {()}
    absent = {p[:-1] + (p[-1] + 10**6,) for p in present if p} | {(10**6,), (-1,)}
    over_long = {ids[0] + (0,)} if ids else set()
    return sorted(present | absent | over_long)


# ---- agreement with brute force -----------------------------------------------------------------
@pytest.mark.parametrize("name", CODE_SETS)
def test_children_ids_len_match_brute_force(backend, name):
    codes = CODE_SETS[name]
    trie = build_trie(codes, backend)
    ids, num_levels = distinct_ids(codes), codes.shape[1]
    assert trie.backend == backend and trie.num_levels == num_levels and len(trie) == len(ids)
    assert trie.root() == 0
    listed = trie.ids()
    assert listed.dtype == np.int32 and listed.shape == (len(ids), num_levels)
    assert [tuple(row) for row in listed.tolist()] == ids
    for prefix in probe_prefixes(ids, num_levels):
        assert trie.children(prefix).tolist() == brute_children(ids, prefix, num_levels), prefix


@pytest.mark.parametrize("name", CODE_SETS)
def test_advance_walks_match_brute_force(backend, name):
    codes = CODE_SETS[name]
    trie = build_trie(codes, backend)
    ids, num_levels = distinct_ids(codes), codes.shape[1]
    rng = np.random.default_rng(7)
    # Beams that follow a stored ID, mixed with beams that step onto absent codes on the way.
    batch = 64
    walk = codes[rng.integers(0, len(codes), batch)] if len(codes) else np.zeros((batch, num_levels), np.int64)
    off_path = rng.random((batch, num_levels)) < 0.15
    strays = rng.choice(np.array([0, 3, 10**6, -5, 2**40]), (batch, num_levels))  # some absent, some not
    walk = np.where(off_path, strays, walk)
    nodes = np.zeros(batch, dtype=np.int64)
    for depth in range(num_levels):
        nodes = trie.advance(depth, nodes, walk[:, depth])
        expected = [brute_node(backend, ids, tuple(int(c) for c in row[: depth + 1])) for row in walk]
        assert nodes.tolist() == expected, depth
    # Leaves are numbered by rank in every backend.
    leaf_ids = trie.ids().tolist()
    assert all(n == ABSENT or leaf_ids[n] == row for n, row in zip(nodes.tolist(), walk.tolist()))


@pytest.mark.parametrize("name", CODE_SETS)
def test_fill_mask_matches_brute_force(backend, name):
    codes = CODE_SETS[name]
    trie = build_trie(codes, backend)
    ids, num_levels = distinct_ids(codes), codes.shape[1]
    rng = np.random.default_rng(11)
    prefixes = probe_prefixes(ids, num_levels)
    width = int(codes.max()) + 1 if codes.size else 1
    for depth in range(num_levels):
        at_depth = [p for p in prefixes if len(p) == depth]
        if not at_depth:  # an empty trie has no prefixes below depth 1, present or absent
            continue
        chosen = [at_depth[i] for i in rng.integers(0, len(at_depth), 50)]
        nodes = np.array([brute_node(backend, ids, p) for p in chosen], dtype=np.int64)
        for extra in (0, 37):  # exact width (dense rows) and a wider mask
            mask = np.ones((len(nodes), width + extra), dtype=bool)  # garbage: fill_mask must clear it
            trie.fill_mask(depth, nodes, mask)
            for row, prefix in zip(mask, chosen):
                assert np.flatnonzero(row).tolist() == brute_children(ids, prefix, num_levels)


def test_empty_batches(backend):
    trie = build_trie(CODE_SETS["dense"], backend)
    assert trie.advance(0, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)).shape == (0,)
    trie.fill_mask(0, np.zeros(0, dtype=np.int64), np.zeros((0, 3), dtype=bool))


def test_fill_mask_on_strided_rows_and_repeated_dense_nodes(backend):
    codes = CODE_SETS["dense"]
    trie = build_trie(codes, backend)
    storage = np.ones((6, 10), dtype=bool)
    mask = storage[:, :4]  # rows are not back to back
    first, last = trie.advance(0, np.zeros(2, dtype=np.int64), np.array([0, 2]))  # nodes of (0,) and (2,)
    trie.fill_mask(1, np.array([first, last, first, ABSENT, last, first]), mask)
    assert mask.tolist() == [[True] * 3 + [False]] * 3 + [[False] * 4] + [[True] * 3 + [False]] * 2
    assert storage[:, 4:].all()  # nothing written past the view


@pytest.mark.parametrize("backend_name", TRIE_BACKENDS)
@given(
    st.integers(1, 4).flatmap(
        lambda num_levels: st.lists(
            st.lists(st.integers(0, 5), min_size=num_levels, max_size=num_levels), min_size=1, max_size=25
        )
    )
)
@settings(max_examples=150, deadline=None)
def test_property_agrees_with_brute_force(backend_name, rows):
    if backend_name == "marisa":
        pytest.importorskip("marisa_trie")
    codes = np.array(rows, dtype=np.int64)
    ids, num_levels = distinct_ids(codes), codes.shape[1]
    trie = build_trie(codes, backend_name)
    assert [tuple(r) for r in trie.ids().tolist()] == ids
    for prefix in probe_prefixes(ids, num_levels):
        assert trie.children(prefix).tolist() == brute_children(ids, prefix, num_levels)


# ---- sizes --------------------------------------------------------------------------------------
def test_nbytes(backend):
    codes = CODE_SETS["three_modalities"]
    trie, reference = build_trie(codes, backend), PythonTrie.build(codes)
    arrays = reference.child_start + reference.child_code
    expected = {
        "python": sum(a.nbytes for a in arrays),
        "cpp": 4 * sum(len(a) for a in arrays),  # uint32 offsets and int32 codes
    }
    if backend in expected:
        assert trie.nbytes == expected[backend]
    else:
        assert trie.nbytes >= 8 * len(trie)  # at least its two leaf-number maps


def test_cpp_reads_any_integer_layout():
    codes = CODE_SETS["three_modalities"]
    expected = PythonTrie.build(codes).ids()
    for variant in (codes.astype(np.int32), codes.astype(np.int16), np.asfortranarray(codes), codes[::-1]):
        np.testing.assert_array_equal(build_trie(variant, "cpp").ids(), expected)


# ---- persistence --------------------------------------------------------------------------------
@pytest.mark.parametrize("saver", TRIE_BACKENDS)
@pytest.mark.parametrize("loader", TRIE_BACKENDS)
@pytest.mark.parametrize("name", ["three_modalities", "single", "empty", "surrogate_edges"])
def test_save_load_identity_across_backends(tmp_path, saver, loader, name):
    if "marisa" in (saver, loader):
        pytest.importorskip("marisa_trie")
    codes = CODE_SETS[name]
    path = tmp_path / "t.trie"
    build_trie(codes, saver).save(path)
    for mmap in (True, False):
        loaded = load_trie(path, loader, mmap=mmap)
        assert loaded.backend == loader
        np.testing.assert_array_equal(loaded.ids(), np.unique(codes, axis=0).astype(np.int32))
        loaded.save(tmp_path / "again.trie")
        assert (tmp_path / "again.trie").read_bytes() == path.read_bytes()


def test_backends_write_identical_files(tmp_path, backend):
    rng = np.random.default_rng(3)
    codes = np.concatenate([rng.integers(0, 3, (20_000, 1)), rng.integers(0, 64, (20_000, 3))], axis=1)
    PythonTrie.build(codes).save(tmp_path / "python.trie")
    build_trie(codes, backend).save(tmp_path / "other.trie")
    assert (tmp_path / "other.trie").read_bytes() == (tmp_path / "python.trie").read_bytes()


def _saved(tmp_path, codes=None) -> bytes:
    path = tmp_path / "good.trie"
    PythonTrie.build(CODE_SETS["three_modalities"] if codes is None else codes).save(path)
    return path.read_bytes()


def _as_v2(good: bytes) -> bytes:
    """The same trie in the previous file format (no size and checksum header), still readable."""
    return MAGIC_V2 + good[HEADER_BYTES:]


def test_truncated_and_padded_files_raise(tmp_path, backend):
    good = _saved(tmp_path, CODE_SETS["single"])
    bad = tmp_path / "bad.trie"
    for cut in range(len(good)):
        bad.write_bytes(good[:cut])
        with pytest.raises(ValueError, match=r"magic|truncated|corrupt") as err:
            load_trie(bad, backend)
        assert str(bad) in str(err.value) and "re-run genius eval" in str(err.value)
    bad.write_bytes(good + b"\0" * 8)
    with pytest.raises(ValueError, match="longer than written"):
        load_trie(bad, backend)
    legacy = _as_v2(good)
    bad.write_bytes(legacy)
    np.testing.assert_array_equal(load_trie(bad, backend).ids(), CODE_SETS["single"].astype(np.int32))
    for cut in range(len(legacy)):
        bad.write_bytes(legacy[:cut])
        with pytest.raises(ValueError, match="magic|truncated|corrupt"):
            load_trie(bad, backend)
    bad.write_bytes(legacy + b"\0" * 8)
    with pytest.raises(ValueError, match="trailing"):
        load_trie(bad, backend)


def test_flipped_bytes_fail_the_checksum(tmp_path):
    # The checksum is checked by the shared file reader, before any backend sees the arrays.
    good = _saved(tmp_path)
    bad = tmp_path / "bad.trie"
    for i, position in enumerate(range(HEADER_BYTES, len(good), 29)):
        corrupt = bytearray(good)
        corrupt[position] ^= 0x10
        bad.write_bytes(bytes(corrupt))
        with pytest.raises(ValueError, match=f"{bad}: damaged trie file.*re-run genius eval"):
            load_trie(bad, TRIE_BACKENDS[i % 2])  # python and cpp


def test_corrupt_arrays_raise(tmp_path, backend):
    # Structure checks, through a file without a checksum (the previous format) so they are reached.
    good = bytearray(_as_v2(_saved(tmp_path)))
    first_offsets = len(MAGIC_V2) + 8 + 16  # after the level count and level 0's two lengths
    bad = tmp_path / "bad.trie"
    for position, value in [(0, 0x47), (first_offsets + 8, 10**9), (first_offsets, 1)]:
        corrupt = bytearray(good)
        if position == 0:
            corrupt[:4] = b"NOPE"
        else:
            corrupt[position : position + 8] = np.int64(value).tobytes()
        bad.write_bytes(bytes(corrupt))
        with pytest.raises(ValueError, match="magic|corrupt"):
            load_trie(bad, backend)


def test_unsorted_child_codes_raise(tmp_path, backend):
    reference = PythonTrie.build(CODE_SETS["dense"])
    reference.child_code[1][:2] = reference.child_code[1][1::-1].copy()  # swap two siblings
    reference.save(tmp_path / "bad.trie")
    with pytest.raises(ValueError, match="corrupt.*sorted"):
        load_trie(tmp_path / "bad.trie", backend)


def test_cpp_core_checks_arrays_itself():
    from genius.trie_cpp import _trie

    with pytest.raises(ValueError, match="corrupt"):
        _trie.Trie.from_csr([np.array([0, 5])], [np.array([1, 2], dtype=np.int32)])
    with pytest.raises(ValueError, match="corrupt"):
        starts = [np.array([0, 2]), np.array([0, 3, 1])]  # offsets run past the codes, then back
        _trie.Trie.from_csr(starts, [np.array([1, 2], np.int32), np.array([0], np.int32)])


# ---- user errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("call", [build_trie, load_trie])
def test_unknown_backend_names_the_choices(call):
    with pytest.raises(ValueError, match="'triecpp'.*cpp, python, marisa"):
        call(CODE_SETS["single"], backend="triecpp")


def test_missing_extension_says_how_to_build_it(monkeypatch):
    monkeypatch.delattr(genius.trie_cpp, "_trie", raising=False)
    monkeypatch.setitem(sys.modules, "genius.trie_cpp._trie", None)
    with pytest.raises(ImportError, match="pip install -e ."):
        build_trie(CODE_SETS["single"], "cpp")


@pytest.mark.parametrize(
    "codes",
    [np.array([[1, -2]]), np.array([[0.5, 1.0]]), np.array([1, 2, 3]), np.zeros((3, 0), int), np.array([[2**31, 0]])],
    ids=["negative", "float", "1-D", "no-levels", "too-large"],
)
def test_bad_codes_raise(backend, codes):
    with pytest.raises(ValueError):
        build_trie(codes, backend)


def test_bad_queries_raise(backend):
    trie = build_trie(CODE_SETS["dense"], backend)
    nodes, codes = np.zeros(2, dtype=np.int64), np.zeros(2, dtype=np.int64)
    mask = np.zeros((2, 3), dtype=bool)
    for bad_call in [
        lambda: trie.advance(3, nodes, codes),  # depth past the last level
        lambda: trie.advance(-1, nodes, codes),
        lambda: trie.advance(1, np.array([0, len(trie)]), codes),  # no such node
        lambda: trie.advance(1, np.array([-2, 0]), codes),
        lambda: trie.advance(0, nodes, codes[:1]),
        lambda: trie.fill_mask(0, nodes, np.zeros((2, 2), dtype=bool)),  # a child code >= width
        lambda: trie.fill_mask(0, nodes, mask.astype(np.uint8)),
        lambda: trie.fill_mask(0, nodes[:1], mask),
        lambda: trie.fill_mask(0, nodes, np.broadcast_to(mask, (2, 3))),  # read-only
        lambda: trie.fill_mask(3, nodes, mask),
    ]:
        with pytest.raises(ValueError):
            bad_call()


def test_marisa_rejects_codes_it_cannot_encode():
    pytest.importorskip("marisa_trie")
    from genius.trie_cpp.marisa_trie_backend import MAX_CODE

    assert build_trie(np.array([[MAX_CODE]]), "marisa").ids().tolist() == [[MAX_CODE]]
    with pytest.raises(ValueError, match="must lie in"):
        build_trie(np.array([[MAX_CODE + 1]]), "marisa")
