from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from genius.common.fusion import fused_store_embeddings, score_fusion
import json
import shutil

from genius.common.store import (
    VERIFY_ENV, EmbeddingStore, StoreArrays, StoreError, finished_parts, merge_parts, part_path, parts_dir, store_writer,
    write_part, write_store,
)


def make_arrays(n: int, dim: int = 8, seed: int = 0, first_id: int = 100) -> StoreArrays:
    rng = np.random.default_rng(seed)
    modality = rng.integers(0, 3, n).astype(np.int8)
    return StoreArrays(
        ids=np.arange(first_id, first_id + n, dtype=np.int64),
        img=rng.normal(size=(n, dim)).astype(np.float32),
        txt=rng.normal(size=(n, dim)).astype(np.float32),
        img_mask=(modality != 1).astype(np.uint8),
        txt_mask=(modality != 0).astype(np.uint8),
        modality=modality,
        target_modality=modality,
    )


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text('{"did": "1:1"}\n')
    return path


def test_round_trip_fp16_and_memmap(tmp_path, source):
    arrays = make_arrays(50)
    write_store(tmp_path / "s", arrays, encoder="enc", kind="candidate", source=source, config={"a": 1})
    store = EmbeddingStore.open(tmp_path / "s", dim=8, encoder="enc", kind="candidate", source=source)
    assert len(store) == 50 and store.meta["dtype"] == "float16" and store.meta["config"] == {"a": 1}
    assert isinstance(store.arrays.img, np.memmap) and store.arrays.img.dtype == np.float16
    np.testing.assert_array_equal(store.ids, arrays.ids)
    np.testing.assert_allclose(store.arrays.txt, arrays.txt, atol=2e-3, rtol=1e-3)
    np.testing.assert_array_equal(store.arrays.modality, arrays.modality)
    np.testing.assert_array_equal(store.rows_of(np.array([149, 100, 120])), [49, 0, 20])
    with pytest.raises(StoreError, match="1 ids not found"):
        store.rows_of(np.array([100, 7]))


def test_refuses_mismatched_store(tmp_path, source):
    write_store(tmp_path / "s", make_arrays(5), encoder="enc", kind="candidate", source=source)
    with pytest.raises(StoreError, match="dim is 8, expected 768"):
        EmbeddingStore.open(tmp_path / "s", dim=768)
    with pytest.raises(StoreError, match="encoder is 'enc', expected 'CLIP_SF'"):
        EmbeddingStore.open(tmp_path / "s", encoder="CLIP_SF")
    with pytest.raises(StoreError, match="kind is 'candidate', expected 'query'"):
        EmbeddingStore.open(tmp_path / "s", kind="query")
    time.sleep(0.01)
    source.write_text('{"did": "1:1"}\n{"did": "1:2"}\n')
    with pytest.raises(StoreError, match="stale.*other content.*re-run genius extract"):
        EmbeddingStore.open(tmp_path / "s", source=source)
    with pytest.raises(StoreError, match="no embedding store"):
        EmbeddingStore.open(tmp_path / "missing")


def test_duplicate_ids_rejected(tmp_path):
    arrays = make_arrays(4)
    arrays.ids[:] = [1, 2, 2, 3]
    with pytest.raises(StoreError, match="not unique"):
        write_store(tmp_path / "s", arrays, encoder="e", kind="query")


def test_parts_merge_keeps_each_row_once(tmp_path, source):
    full = make_arrays(23)
    target = tmp_path / "s"
    # Overlapping parts, as a padded distributed sampler would write them, in scrambled order.
    for start, stop in [(10, 20), (0, 10), (15, 23), (20, 23)]:
        write_part(target, start, stop, full.take(np.arange(start, stop)))
    assert finished_parts(target) == {(0, 10), (10, 20), (15, 23), (20, 23)}
    merge_parts(target, 23, encoder="e", kind="candidate", source=source)
    store = EmbeddingStore.open(target)
    np.testing.assert_array_equal(store.ids, full.ids)
    np.testing.assert_allclose(store.arrays.img, full.img, atol=2e-3, rtol=1e-3)
    assert not parts_dir(target).exists()


def test_merge_with_a_gap_fails(tmp_path):
    full = make_arrays(10)
    write_part(tmp_path / "s", 0, 4, full.take(np.arange(0, 4)))
    write_part(tmp_path / "s", 6, 10, full.take(np.arange(6, 10)))
    with pytest.raises(StoreError, match="2 rows have no part \\(first missing row 4\\)"):
        merge_parts(tmp_path / "s", 10, encoder="e", kind="candidate")
    assert not (tmp_path / "s").exists()


def test_failed_write_leaves_nothing_readable(tmp_path, source, monkeypatch):
    write_store(tmp_path / "s", make_arrays(5), encoder="old", kind="candidate", source=source)
    real_open = np.lib.format.open_memmap
    calls = {"n": 0}

    def failing_open(file, *args, **kwargs):  # the third array file cannot be created
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "open_memmap", failing_open)
    with pytest.raises(OSError, match="disk full"):
        write_store(tmp_path / "s", make_arrays(9), encoder="new", kind="candidate", source=source)
    monkeypatch.undo()
    store = EmbeddingStore.open(tmp_path / "s")  # the previous complete store is untouched
    assert store.meta["encoder"] == "old" and len(store) == 5
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".s.")]  # no temporary directory left


def test_store_writer_fills_rows_in_pieces_and_refuses_duplicate_ids(tmp_path):
    full = make_arrays(12)
    with store_writer(tmp_path / "s", 12, full.dim, encoder="e", kind="candidate") as out:
        assert not (tmp_path / "s").exists()  # nothing visible until the writer finishes
        for rows in (np.arange(6, 12), np.arange(0, 6)):
            for name in ("ids", "img", "txt", "img_mask", "txt_mask", "modality", "target_modality"):
                getattr(out, name)[rows] = getattr(full, name)[rows]
    store = EmbeddingStore.open(tmp_path / "s", dim=full.dim, kind="candidate")
    assert np.array_equal(store.ids, full.ids) and np.array_equal(store.arrays.img, full.img.astype(np.float16))
    with pytest.raises(StoreError, match="ids are not unique"):
        with store_writer(tmp_path / "t", 3, full.dim, encoder="e", kind="candidate") as out:
            out.ids[:] = [1, 2, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".s.")] == []


def test_killed_writer_never_leaves_an_accepted_store(tmp_path):
    # A process killed in the middle of writing (os._exit, no cleanup) must not leave a store.
    script = f"""
import numpy as np, os
import genius.common.store as st
from tests_helper import make
real = np.lib.format.open_memmap
count = [0]
def dying_open(f, *x, **k):
    count[0] += 1
    if count[0] == 4:
        os._exit(9)
    return real(f, *x, **k)
np.lib.format.open_memmap = dying_open
st.write_store({str(tmp_path / 's')!r}, make(), encoder='e', kind='query')
"""
    helper = tmp_path / "tests_helper.py"
    helper.write_text("import numpy as np\nfrom genius.common.store import StoreArrays\n"
                      "def make():\n    n=6\n    return StoreArrays(np.arange(n), np.ones((n,4)), np.ones((n,4)), "
                      "np.ones(n), np.ones(n), np.zeros(n), np.zeros(n))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 9
    with pytest.raises(StoreError, match="no embedding store"):
        EmbeddingStore.open(tmp_path / "s")


def test_content_id_follows_the_arrays_and_is_checked_on_open(tmp_path, source, monkeypatch):
    arrays = make_arrays(30)
    write_store(tmp_path / "a", arrays, encoder="e", kind="candidate", source=source)
    write_store(tmp_path / "b", arrays, encoder="e", kind="candidate", source=source, config={"other": 1})
    a, b = EmbeddingStore.open(tmp_path / "a"), EmbeddingStore.open(tmp_path / "b")
    assert len(a.content_id) == 64 and a.content_id == b.content_id  # same arrays, same id
    changed = make_arrays(30)
    changed.img[3, 0] += 1.0
    write_store(tmp_path / "c", changed, encoder="e", kind="candidate", source=source)
    assert EmbeddingStore.open(tmp_path / "c").content_id != a.content_id

    # A moved store (and a moved source with the same bytes) is the same store.
    shutil.copytree(tmp_path / "a", tmp_path / "moved" / "a")
    shutil.copy2(source, tmp_path / "moved" / "pool.jsonl")
    moved = EmbeddingStore.open(tmp_path / "moved" / "a", source=tmp_path / "moved" / "pool.jsonl")
    assert moved.content_id == a.content_id and moved.meta["source"]["sha256"] == a.meta["source"]["sha256"]

    # Flipped bytes in a vector: small stores are verified on every open, unless told not to.
    img = tmp_path / "moved" / "a" / "img.npy"
    data = bytearray(img.read_bytes())
    data[-3] ^= 0xFF
    img.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="do not match the content fingerprint.*re-run genius extract"):
        EmbeddingStore.open(tmp_path / "moved" / "a")
    EmbeddingStore.open(tmp_path / "moved" / "a", verify=False)
    monkeypatch.setenv(VERIFY_ENV, "0")
    EmbeddingStore.open(tmp_path / "moved" / "a")
    monkeypatch.setenv(VERIFY_ENV, "1")
    with pytest.raises(StoreError, match="content fingerprint"):
        EmbeddingStore.open(tmp_path / "moved" / "a")


def test_damaged_or_old_stores_are_named(tmp_path, source):
    write_store(tmp_path / "s", make_arrays(40), encoder="e", kind="candidate", source=source)
    txt = tmp_path / "s" / "txt.npy"
    good = txt.read_bytes()
    txt.write_bytes(good[: len(good) // 2])  # truncated: refused without reading the data
    with pytest.raises(StoreError, match=f"{txt}: not a readable array.*re-run genius extract"):
        EmbeddingStore.open(tmp_path / "s", verify=False)
    np.save(txt, np.zeros((41, 8), np.float16))  # a readable array of the wrong shape
    with pytest.raises(StoreError, match=r"txt.npy: holds float16 \[41, 8\], meta.json says float16 \[40, 8\]"):
        EmbeddingStore.open(tmp_path / "s", verify=False)
    txt.unlink()
    with pytest.raises(StoreError, match="incomplete.*txt.npy is missing"):
        EmbeddingStore.open(tmp_path / "s")
    meta = tmp_path / "s" / "meta.json"
    old = json.loads(meta.read_text())
    old["format_version"] = 1
    del old["content_sha256"]
    meta.write_text(json.dumps(old))
    with pytest.raises(StoreError, match="store format 1.*re-run genius extract"):
        EmbeddingStore.open(tmp_path / "s")
    meta.write_text("{not json")
    with pytest.raises(StoreError, match="meta.json: not valid JSON"):
        EmbeddingStore.open(tmp_path / "s")


def test_damaged_part_is_named(tmp_path, source):
    full = make_arrays(10)
    write_part(tmp_path / "s", 0, 5, full.take(np.arange(0, 5)))
    write_part(tmp_path / "s", 5, 10, full.take(np.arange(5, 10)))
    part = part_path(tmp_path / "s", 5, 10)
    part.write_bytes(part.read_bytes()[:-40])
    with pytest.raises(StoreError, match=f"{part}: damaged part file.*delete it"):
        merge_parts(tmp_path / "s", 10, encoder="e", kind="candidate", source=source)


def test_score_fusion_matches_uniir_rule():
    img = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    txt = torch.tensor([[0.0, 4.0], [5.0, 5.0], [1.0, 0.0]])
    fused = score_fusion(img, txt, torch.tensor([1, 0, 1]), torch.tensor([1, 1, 0]))
    expected = torch.tensor([[0.6, 0.8], [2 ** -0.5, 2 ** -0.5], [0.0, 1.0]])
    torch.testing.assert_close(fused, expected)
    arrays = make_arrays(7)
    out = fused_store_embeddings(arrays, chunk=3)
    ref = score_fusion(*(torch.from_numpy(np.asarray(getattr(arrays, k))) for k in ("img", "txt", "img_mask", "txt_mask")))
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-6, atol=1e-6)
