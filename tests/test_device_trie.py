"""The device trie against the C++ trie: same allowed codes and same node ids at every step of
random beam walks, whichever way (dense table, CSR, chain) each level is stored."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genius.models.generative_retriever import device_trie
from genius.models.generative_retriever.device_trie import DeviceTrie
from genius.trie_cpp import build_trie, load_trie
from genius.trie_cpp.python_trie import PythonTrie

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_syncs import count_host_syncs  # noqa: E402

ALL_DENSE, ALL_SPARSE = 2**40, 0


def random_codes(rng, num_ids: int, sizes: list[int]) -> np.ndarray:
    return np.stack([rng.integers(0, k, num_ids) for k in sizes], axis=1)


def walk(trie, sizes: list[int], codes: np.ndarray, rng, rows: int = 160):
    """Beams walked level by level: mostly along stored IDs, some by codes that are not children
    (in range or not) and some forced absent. Yields (level, nodes, next codes) at every level."""
    targets = codes[rng.integers(0, len(codes), rows)]
    nodes = np.zeros(rows, dtype=np.int64)
    for level, width in enumerate(sizes):
        step = targets[:, level].copy()
        stray = rng.random(rows) < 0.06
        step[stray] = rng.integers(-2, width + 2, int(stray.sum()))
        yield level, nodes, step
        nodes = trie.advance(level, nodes, step)
        nodes[rng.random(rows) < 0.02] = -1


def assert_matches_cpp(codes: np.ndarray, sizes: list[int], dense_budget: int, seed: int = 1,
                       dense_min_fill: float = 0.0) -> DeviceTrie:
    """The device trie of ``codes`` walks as the C++ trie does; by default only the budget decides
    the dense levels (no fill rule), so ``ALL_DENSE`` makes every level dense."""
    host = build_trie(codes, "cpp")
    device = DeviceTrie.from_trie(host, sizes, dense_budget=dense_budget, dense_min_fill=dense_min_fill)
    assert_same_walks(host, device, codes, sizes, seed)
    return device


def assert_same_walks(host, device: DeviceTrie, codes: np.ndarray, sizes: list[int], seed: int) -> None:
    assert (device.num_levels, len(device)) == (host.num_levels, len(host))
    live = []
    for level, nodes, step in walk(host, sizes, codes, np.random.default_rng(seed)):
        expected = np.zeros((len(nodes), sizes[level]), dtype=bool)
        host.fill_mask(level, nodes, expected)
        got = device.allowed(level, torch.from_numpy(nodes))
        assert got.dtype == torch.bool and np.array_equal(got.numpy(), expected), f"level {level}"
        dirty = torch.ones(len(nodes), sizes[level], dtype=torch.bool)  # a reused buffer: stale Trues
        assert device.allowed(level, torch.from_numpy(nodes), out=dirty) is dirty
        assert np.array_equal(dirty.numpy(), expected), f"level {level}, into a buffer"
        advanced = device.advance(level, torch.from_numpy(nodes), torch.from_numpy(step))
        assert advanced.dtype == torch.long
        np.testing.assert_array_equal(advanced.numpy(), host.advance(level, nodes, step), err_msg=f"level {level}")
        live.append((nodes >= 0).mean())
    assert min(live) > 0.25, f"the walk lost its beams ({live}): the comparison would be vacuous"


SHAPES = {
    "paper-like": ([3] + [4096] * 8, 300),
    "deep fan-out 1": ([2, 3] + [50] * 6, 400),
    "full fan-out": ([4, 8, 16], None),  # every ID exists: each node has all K children
    "one level": ([7], 5),
}


def shape_ids(shape: str, rng) -> np.ndarray:
    sizes, num_ids = SHAPES[shape]
    if num_ids is None:
        return np.stack(np.meshgrid(*[np.arange(k) for k in sizes], indexing="ij"), -1).reshape(-1, len(sizes))
    return random_codes(rng, num_ids, sizes)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dense_budget", [ALL_SPARSE, 2**14, ALL_DENSE])
def test_matches_the_cpp_trie(shape, dense_budget):
    sizes = SHAPES[shape][0]
    rng = np.random.default_rng(0)
    codes = shape_ids(shape, rng)
    codes = np.concatenate([codes, codes[: len(codes) // 3]])[rng.permutation(len(codes) * 4 // 3)]  # duplicates
    device = assert_matches_cpp(codes, sizes, dense_budget)
    kinds = device.level_kinds()
    if dense_budget == ALL_DENSE:
        assert set(kinds) == {"dense"}
    elif dense_budget == ALL_SPARSE:
        assert "dense" not in kinds
        if shape == "deep fan-out 1":
            assert kinds[-1] == "chain"
    elif shape == "paper-like":
        assert kinds[:2] == ["dense", "dense"] and "dense" not in kinds[2:]


@pytest.mark.parametrize("shape", ["paper-like", "full fan-out"])
def test_csr_masks_built_in_row_chunks(shape, monkeypatch):
    """A wide csr level fills its mask a few rows at a time (``GATHER_BUDGET``), with equal results."""
    monkeypatch.setattr(device_trie, "GATHER_BUDGET", 3 * max(SHAPES[shape][0]) + 1)
    assert_matches_cpp(shape_ids(shape, np.random.default_rng(2)), SHAPES[shape][0], ALL_SPARSE)


def test_dense_and_sparse_levels_give_identical_results():
    sizes = [3, 64, 64, 64]
    rng = np.random.default_rng(3)
    codes = random_codes(rng, 3000, sizes)
    host = build_trie(codes, "cpp")
    dense = DeviceTrie.from_trie(host, sizes, dense_budget=ALL_DENSE, dense_min_fill=0.0)
    sparse = DeviceTrie.from_trie(host, sizes, dense_budget=ALL_SPARSE)
    assert set(dense.level_kinds()) == {"dense"} and "dense" not in sparse.level_kinds()
    assert sparse.nbytes < dense.nbytes
    nodes, targets = dense.root_nodes(500), codes[rng.integers(0, 3000, 500)]
    for level, width in enumerate(sizes):
        assert torch.equal(dense.allowed(level, nodes), sparse.allowed(level, nodes))
        step = torch.from_numpy(np.where(rng.random(500) < 0.9, targets[:, level], rng.integers(-1, width + 1, 500)))
        nodes, other = dense.advance(level, nodes, step), sparse.advance(level, nodes, step)
        assert torch.equal(nodes, other)
    assert (nodes >= 0).any() and (nodes < 0).any()


def test_a_small_pool_keeps_its_deep_levels_sparse():
    """The default fill rule: 1,000 paper-shaped IDs have about one child per node below level 1,
    so only the root's and the modalities' levels are tables (the budget alone made six dense
    levels of 4096-wide rows); the walks are the C++ trie's either way."""
    sizes = [3] + [4096] * 5
    codes = random_codes(np.random.default_rng(8), 1000, sizes)
    by_fill = assert_matches_cpp(codes, sizes, device_trie.DENSE_BUDGET, dense_min_fill=device_trie.DENSE_MIN_FILL)
    by_budget = assert_matches_cpp(codes, sizes, device_trie.DENSE_BUDGET)
    assert by_fill.level_kinds()[:2] == ["dense", "dense"] and "dense" not in by_fill.level_kinds()[2:]
    assert by_budget.level_kinds().count("dense") >= 4
    assert by_fill.nbytes * 100 < by_budget.nbytes
    assert DeviceTrie.from_trie(build_trie(codes, "cpp"), sizes).level_kinds() == by_fill.level_kinds()  # the default


@pytest.mark.parametrize("fill", [-0.1, 1.5, float("nan")])
def test_a_dense_fill_out_of_range_is_refused(fill):
    with pytest.raises(ValueError, match="dense_min_fill in"):
        DeviceTrie.from_trie(build_trie(np.zeros((1, 2), np.int64), "cpp"), [3, 5], dense_min_fill=fill)


def test_trie_saved_by_the_python_backend(tmp_path):
    sizes = [3, 32, 32, 32]
    codes = random_codes(np.random.default_rng(5), 800, sizes)
    PythonTrie.build(codes).save(tmp_path / "trie.bin")
    for backend in ("python", "cpp"):
        device = DeviceTrie.from_trie(load_trie(tmp_path / "trie.bin", backend), sizes, dense_budget=2**10)
        assert "dense" in device.level_kinds() and "csr" in device.level_kinds()
        assert_same_walks(build_trie(codes, "cpp"), device, codes, sizes, seed=6)


def test_empty_trie_allows_nothing():
    sizes = [3, 5]
    device = DeviceTrie.from_trie(build_trie(np.zeros((0, 2), np.int64), "cpp"), sizes, dense_budget=ALL_SPARSE)
    root = device.root_nodes(4)
    assert len(device) == 0 and not device.allowed(0, root).any()
    assert (device.advance(0, root, torch.tensor([0, 1, 2, 3])) == -1).all()
    assert not device.allowed(1, torch.full((2,), -1)).any()


def test_no_host_syncs():
    sizes = [3, 16, 64, 4096, 64]
    codes = random_codes(np.random.default_rng(7), 500, sizes)
    device = DeviceTrie.from_trie(build_trie(codes, "cpp"), sizes, dense_budget=64)
    assert device.level_kinds() == ["dense", "dense", "csr", "csr", "chain"]
    targets = torch.from_numpy(codes[:100])
    with count_host_syncs() as calls:
        nodes = device.root_nodes(100)
        for level in range(len(sizes)):
            device.allowed(level, nodes)
            nodes = device.advance(level, nodes, targets[:, level])
    assert sum(calls.values()) == 0, calls
    assert (nodes >= 0).all()


def test_bad_arguments_are_value_errors():
    codes = np.array([[0, 9], [1, 2]])
    trie = build_trie(codes, "cpp")
    with pytest.raises(ValueError, match="trie has 2"):
        DeviceTrie.from_trie(trie, [2])
    with pytest.raises(ValueError, match="code 9 at level 1 does not fit codebook size 8"):
        DeviceTrie.from_trie(trie, [2, 8])
    device = DeviceTrie.from_trie(trie, [2, 10])
    with pytest.raises(ValueError, match="1-D"):
        device.advance(0, torch.zeros(2, dtype=torch.long), torch.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        device.allowed(0, torch.zeros(2, dtype=torch.long), out=torch.zeros(2, 3, dtype=torch.bool))
