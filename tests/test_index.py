"""``genius index``: the living index folder on the synthetic two-task world of test_evaluate.

Stand-ins for the run's models, quantizer and encoder (test_evaluate's generator; a quantizer
that gives a vector the ID of its nearest indexed candidate; an encoder mapping known texts to
stored vectors). Build -> add -> search finds the added item; remove -> no method returns it;
a failing or killed add leaves the previous version current and intact; readers during adds
only see complete versions; every refused operation exits 2 with one line and changes nothing.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from genius.common.config import load_config
from genius.common.fusion import score_fusion
from genius.common.io import sha256_file
from genius.common.mbeir import hash_did
from genius.common.runstate import acquire_lock, release_lock
from genius.common.store import store_path
from genius.models.generative_retriever import index as idx
from genius.models.generative_retriever.api import Retriever, load_manifest
from genius.models.generative_retriever.evaluate import EvalConfig, evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_evaluate import DIM, ENCODER, fake_models, make_world  # noqa: E402

UNION = "mbeir_union_test_cand_pool"
TEXT_POOL = "mbeir_shapes_task3_cand_pool"
NEW_TEXT = "a brand new caption"
COPIED = 1004  # the new candidate's vector is a noisy copy of candidate 20:1004's (a caption)


class Encoder:
    """Known texts encode as given vectors, any other text as a fixed random vector of its own."""

    dim = DIM

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors

    def encode_texts(self, texts):
        rng = lambda t: np.random.default_rng(zlib.crc32(t.encode()))  # noqa: E731
        return np.stack([self.vectors.get(t, rng(t).normal(size=DIM)) for t in texts]).astype(np.float32)


def stand_in_run(results: Path, checkpoints=None) -> idx.RunContext:
    """The world's finished run with stand-in models, quantizer and encoder."""
    cfg = load_config(EvalConfig, results / "config.yaml")
    union = Path(cfg.paths.data_root) / "cand_pool/global" / f"{UNION}.jsonl"
    store = store_path(cfg.paths.stores_root, ENCODER, "cand", union)
    arrays = {n: torch.from_numpy(np.load(store / f"{n}.npy").astype(np.float32))
              for n in ("img", "txt", "img_mask", "txt_mask")}
    fused = score_fusion(arrays["img"], arrays["txt"], arrays["img_mask"], arrays["txt_mask"])
    codes = torch.from_numpy(np.load(Path(cfg.paths.rq_run) / "codes" / UNION / "codes.npy"))
    ids = np.load(store / "ids.npy")
    copied = arrays["txt"][int(np.flatnonzero(ids == hash_did(f"20:{COPIED}"))[0])].numpy()
    noisy = copied + 0.05 * np.random.default_rng(1).normal(size=DIM)

    def quantize(img, txt, img_mask, txt_mask, modality):
        z = score_fusion(img, txt, img_mask, txt_mask)
        nearest = (z @ fused.T).argmax(1)
        out = codes[nearest].clone()
        out[:, 0] = modality
        return out.numpy(), (z - fused[nearest]).pow(2).sum(1).numpy()

    return idx.RunContext(load_manifest(results), cfg, checkpoints or {"rq": "fake-rq", "generator": "fake-gen"},
                          models=fake_models(cfg), quantize=quantize, encoder=Encoder({"A brand new caption.": noisy}),
                          modality_level=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    cfg = make_world(tmp_path_factory.mktemp("index_world"))
    evaluate(cfg, fake_models(cfg))
    return Path(cfg.paths.results)


def write_pool(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def new_caption(did: str = "20:5000", text: str = NEW_TEXT) -> dict:
    return {"did": did, "modality": "text", "txt": text, "img_path": None}


def retriever(run: idx.RunContext, version: idx.IndexVersion) -> Retriever:
    """The API over an index version: its pool stands in for the run's."""
    return Retriever(run.manifest, run.cfg, run.models, run.encoder, version.pool(), torch.device("cpu"))


def found(ret: Retriever, text: str, method: str, k: int = 10) -> list[str]:
    return [h.id for h in ret.search(text=text, instruction="", target_modality="text", method=method, k=k)]


def snapshot(index: Path) -> tuple:
    return (index / "CURRENT").read_text(), sorted(p.name for p in index.iterdir() if p.name != ".lock")


# ---- the life of an index -----------------------------------------------------------------------
def test_build_add_search_remove_and_drift(results, tmp_path):
    run = stand_in_run(results)
    index = tmp_path / "index"
    assert idx.build(run, index) == "v000001"
    v1 = idx.open_version(index)
    run_codes = np.load(Path(run.cfg.paths.rq_run) / "codes" / UNION / "codes.npy")
    assert len(v1) == 60 and v1.manifest["counts"] == {"candidates": 60, "trained": 60, "added": 0,
                                                      "distinct_ids": len(np.unique(run_codes, axis=0))}
    assert np.array_equal(v1.arrays["codes"], run_codes) and v1.arrays["trained"].all()
    assert np.array_equal(np.asarray(v1.trie.ids()), np.unique(run_codes, axis=0))
    assert v1.manifest["fingerprints"] == {"rq": "fake-rq", "generator": "fake-gen"}
    assert [op["op"] for op in v1.manifest["operations"]] == ["build"]

    # add: the new caption's record, code and vector are in v2, and every method can return it
    assert idx.add(run, index, write_pool(tmp_path / "new.jsonl", [new_caption()])) == "v000002"
    v2 = idx.open_version(index)
    row = int(np.flatnonzero(np.asarray(v2.arrays["ids"]) == hash_did("20:5000"))[0])
    assert json.loads((v2.path / "records.jsonl").read_text().splitlines()[row])["txt"] == NEW_TEXT
    copied_row = int(np.flatnonzero(np.asarray(v2.arrays["ids"]) == hash_did(f"20:{COPIED}"))[0])
    assert v2.arrays["codes"][row].tolist() == v2.arrays["codes"][copied_row].tolist()  # its nearest neighbour's ID
    assert float(np.asarray(v2.arrays["fused"][row], np.float32) @ np.asarray(v2.arrays["fused"][copied_row],
                                                                                np.float32)) > 0.99
    assert not v2.arrays["trained"][row] and v2.manifest["parent"] == "v000001"
    assert (v1.path / "manifest.json").is_file() and len(idx.open_version(index, "v000001")) == 60  # untouched
    ret = retriever(run, v2)
    assert found(ret, NEW_TEXT, "genius_r")[0] == "20:5000"
    assert found(ret, NEW_TEXT, "dense")[0] == "20:5000"
    assert "20:5000" in found(ret, NEW_TEXT, "genius")

    report = idx.drift_report(v2)
    assert report["added"]["count"] == 1 and report["trained"]["count"] == 60
    assert report["added"]["unseen_id_share"] == 0.0 and report["added"]["collision_rate"] == 1.0
    assert report["added"]["codes_in_use"] == [1, 1, 1] and report["added"]["mean_quantization_error"] < 0.01

    # remove: gone from ids, codes, trie, vectors and records, and no method returns it
    ids_file = tmp_path / "gone.txt"
    ids_file.write_text(f"20:5000\n\n20:{COPIED}\n")
    assert idx.remove(index, ids_file) == "v000003"
    v3 = idx.open_version(index)
    kept = np.asarray(v3.arrays["ids"])
    assert len(v3) == 59 and hash_did("20:5000") not in kept and hash_did(f"20:{COPIED}") not in kept
    assert np.array_equal(np.asarray(v3.trie.ids()), np.unique(np.asarray(v3.arrays["codes"]), axis=0))
    assert not any('"20:5000"' in line for line in (v3.path / "records.jsonl").read_text().splitlines())
    ret = retriever(run, v3)
    for method in ("genius_r", "genius", "dense"):
        hits = found(ret, NEW_TEXT, method, k=59)
        assert hits and "20:5000" not in hits and f"20:{COPIED}" not in hits, method
    assert [op["op"] for op in v3.manifest["operations"]] == ["build", "add", "remove"]

    # only the last three versions stay
    assert idx.add(run, index, write_pool(tmp_path / "again.jsonl", [new_caption("20:5001")])) == "v000004"
    assert sorted(p.name for p in index.glob("v*")) == ["v000002", "v000003", "v000004"]


def test_an_image_under_a_relative_data_root_is_recorded_where_it_is(results, tmp_path, monkeypatch):
    """--data-root given relative to the working folder: the record kept 'mine/img/a.png', which a
    search then read against the run's data root (a file that is not there)."""
    from PIL import Image

    run = stand_in_run(results)
    run.encoder.encode_images = lambda images, batch_size=64: np.ones((len(images), DIM), np.float32)
    run.encoder.preprocess = None
    index = tmp_path / "index"
    idx.build(run, index)
    (tmp_path / "mine" / "img").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "mine" / "img" / "a.png")
    pool = write_pool(tmp_path / "mine" / "new.jsonl", [{"did": "20:6000", "modality": "image", "txt": None,
                                                         "img_path": "img/a.png"}])
    monkeypatch.chdir(tmp_path)
    idx.add(run, "index", "mine/new.jsonl", "mine")
    version = idx.open_version(index)
    row = int(np.flatnonzero(np.asarray(version.arrays["ids"]) == hash_did("20:6000"))[0])
    recorded = Path(json.loads((version.path / "records.jsonl").read_text().splitlines()[row])["img_path"])
    assert recorded.is_absolute() and recorded == tmp_path / "mine" / "img" / "a.png" and pool.is_file()


def _relabel_first_id(path: Path) -> None:
    ids = np.load(path)
    ids[0] += 1
    np.save(path, ids)


def _blank_first_vector(path: Path) -> None:
    fused = np.load(path)
    fused[0] = np.nan
    np.save(path, fused)


@pytest.mark.parametrize("name, change", [
    ("records.jsonl", lambda p: p.write_text(p.read_text().replace('"txt": "a caption"', '"txt": "EDITED"', 1))),
    ("ids.npy", _relabel_first_id),  # another did for a row's vectors
    ("fused.npy", _blank_first_vector),
    ("qerror.npy", lambda p: np.save(p, np.load(p) + 1)),
])
def test_any_file_of_a_version_changed_after_it_was_written_is_refused(results, tmp_path, name, change):
    """Only codes.npy was checked: an edited record, a relabelled id or a vector row was served silently."""
    index = tmp_path / "index"
    idx.build(stand_in_run(results), index)
    version = idx.open_version(index).path
    os.utime(version / "trie.bin", ns=(1, 1))  # a copy without its times: hashed, and the same file
    assert len(idx.open_version(index)) == 60
    change(version / name)
    with pytest.raises(idx.IndexUserError, match=rf"{re.escape(str(version / name))}: not the file the manifest "
                                                 "records"):
        idx.open_version(index)


def test_messages_name_what_is_wrong(results, tmp_path):
    from genius.models.generative_retriever.run_models import Models

    models = Models(None, None, {"rq": "a", "generator": "b"}, [3], "assigned", {"rq": "rq.pt", "generator": "gen.pt"})
    assert models.changed_files({"rq": "a", "generator": "old"}) == "gen.pt"  # both files were named before
    index = tmp_path / "index"
    run = stand_in_run(results)
    idx.build(run, index)
    (index / idx.CURRENT).write_bytes(b"\xffv000001\n")  # a traceback without the file's name before
    with pytest.raises(idx.IndexUserError, match=rf"{re.escape(str(index / idx.CURRENT))}: names .* not a version"):
        idx.current_name(index)
    (index / idx.CURRENT).write_text("v000001\n")
    run.encoder.encode_images = lambda images, batch_size=64: np.ones((len(images), DIM), np.float32)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    pool = write_pool(tmp_path / "new.jsonl", [{"did": "20:6000", "modality": "image", "txt": None,
                                                 "img_path": str(tmp_path / "bad.png")}])
    with pytest.raises(OSError, match=rf"^candidate image {re.escape(str(tmp_path / 'bad.png'))} could not be read"):
        idx.add(run, index, pool, tmp_path)


def test_an_index_refuses_items_embedded_with_other_encoder_weights(results, tmp_path):
    """The run's encoder was trained again and its stores extracted again (the run now records the
    new weights): items added to an index built before would be embedded into another space than
    its vectors; add refuses, and search checks the weights file against the index's record."""
    from genius.models.generative_retriever.api import index_encoder

    run = stand_in_run(results)
    run.manifest["encoder"]["embedded_with"] = {"name": "CLIP_SF", "checkpoint": {"path": "c.pt", "sha256": "old"}}
    index = tmp_path / "index"
    idx.build(run, index)
    built = idx.open_version(index).manifest
    assert built["encoder"]["embedded_with"]["checkpoint"]["sha256"] == "old"
    run.manifest["encoder"]["embedded_with"] = {"name": "CLIP_SF", "checkpoint": {"path": "c.pt", "sha256": "new"}}
    with pytest.raises(idx.IndexUserError, match="its vectors were embedded with other encoder weights"):
        idx.add(run, index, write_pool(tmp_path / "new.jsonl", [new_caption()]))
    assert idx.current_name(index) == "v000001"
    assert index_encoder(run.manifest["encoder"], built)["embedded_with"]["checkpoint"]["sha256"] == "old"
    older = {**built, "encoder": {k: v for k, v in built["encoder"].items() if k != "embedded_with"}}
    assert index_encoder(run.manifest["encoder"], older) == run.manifest["encoder"]  # built before the record
    run.manifest["encoder"]["embedded_with"]["checkpoint"]["path"] = "moved/c.pt"  # the same weights elsewhere
    run.manifest["encoder"]["embedded_with"]["checkpoint"]["sha256"] = "old"
    assert idx.add(run, index, write_pool(tmp_path / "new.jsonl", [new_caption()])) == "v000002"


def test_an_index_is_not_built_into_a_folder_of_other_files(results, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(idx.IndexUserError, match=r"a folder with other files in it \(notes.txt\)"):
        idx.build(stand_in_run(results), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    (tmp_path / "notes.txt").unlink()
    (tmp_path / ".v000001.123.tmp").mkdir()  # what a killed build leaves: built again over it
    assert idx.build(stand_in_run(results), tmp_path) == "v000001"


def test_stats_command_prints_the_drift_report(results, tmp_path, capsys):
    run = stand_in_run(results)
    index = tmp_path / "index"
    idx.build(run, index, TEXT_POOL)
    far = [new_caption(f"20:{6000 + i}", f"an unrelated caption {i}") for i in range(5)]
    idx.add(run, index, write_pool(tmp_path / "far.jsonl", far))
    assert idx.main(["stats", "--index", str(index), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == "v000002" and report["added"]["count"] == 5 and report["trained"]["count"] == 30
    # random vectors lie far from their nearest candidate: a larger error than the trained items'
    assert report["added"]["mean_quantization_error"] > report["trained"]["mean_quantization_error"]
    assert idx.main(["stats", "--index", str(index)]) == 0
    table = capsys.readouterr().out
    assert "collision rate" in table and "ID unseen in training" in table and "added" in table


# ---- atomicity ----------------------------------------------------------------------------------
def test_a_failing_add_leaves_the_previous_version_current_and_intact(results, tmp_path, monkeypatch):
    run = stand_in_run(results)
    index = tmp_path / "index"
    idx.build(run, index)
    before = snapshot(index)
    ids_before = np.array(idx.open_version(index).arrays["ids"])

    def broken(codes, path, backend):  # after the arrays and records of the new version are written
        assert (path.parent / "codes.npy").is_file() and (path.parent / "records.jsonl").is_file()
        raise RuntimeError("disk gone")

    monkeypatch.setattr(idx, "save_trie", broken)
    with pytest.raises(RuntimeError, match="disk gone"):
        idx.add(run, index, write_pool(tmp_path / "new.jsonl", [new_caption()]))
    assert snapshot(index) == before  # CURRENT, and no new or temporary folder
    assert np.array_equal(idx.open_version(index).arrays["ids"], ids_before)

    def full(codes, path, backend):
        raise OSError(28, "No space left on device")  # as a full disk raises it: no file named

    monkeypatch.setattr(idx, "save_trie", full)
    with pytest.raises(idx.IndexUserError, match=r"/\.v000002\.\d+\.tmp: No space left on device while writing "
                                                 r"version v000002; CURRENT still names the previous version"):
        idx.add(run, index, write_pool(tmp_path / "new.jsonl", [new_caption()]))
    assert snapshot(index) == before


KILLED_ADD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_index
from genius.models.generative_retriever import index as idx
def stall(codes, path, backend):
    Path({marker!r}).write_text("arrays written")
    time.sleep(120)
idx.save_trie = stall
idx.add(test_index.stand_in_run(Path({results!r})), Path({index!r}), Path({pool!r}))
"""


def test_a_killed_add_leaves_the_previous_version_current_and_intact(results, tmp_path):
    run = stand_in_run(results)
    index = tmp_path / "index"
    idx.build(run, index)
    before = snapshot(index)
    marker = tmp_path / "marker"
    script = KILLED_ADD.format(tests=str(Path(__file__).parent), marker=str(marker), results=str(results),
                               index=str(index), pool=str(write_pool(tmp_path / "new.jsonl", [new_caption()])))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the add never reached its trie step"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert (index / "CURRENT").read_text() == before[0]
    assert [p.name for p in index.glob("v*")] == ["v000001"] and list(index.glob(".v000002.*.tmp"))
    assert len(idx.open_version(index)) == 60
    # the next writer takes over the dead one's lock and clears its temporary folder
    assert idx.add(run, index, tmp_path / "new.jsonl") == "v000002"
    assert not list(index.glob(".v*.tmp")) and len(idx.open_version(index)) == 61


def test_readers_during_adds_see_only_complete_versions(results, tmp_path):
    run = stand_in_run(results)
    index = tmp_path / "index"
    idx.build(run, index)
    seen, problems, done = set(), [], threading.Event()

    def read():
        while not done.is_set():
            try:
                version = idx.open_version(index)
                count = version.manifest["counts"]["candidates"]
                lines = (version.path / "records.jsonl").read_text().splitlines()
                assert all(len(a) == count for a in version.arrays.values()) and len(lines) == count
                assert len(np.asarray(version.trie.ids())) == version.manifest["counts"]["distinct_ids"]
                seen.add(version.name)
            except Exception as err:  # noqa: BLE001 - any failure of a reader is the finding
                problems.append(repr(err))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(3):
            idx.add(run, index, write_pool(tmp_path / f"new{i}.jsonl", [new_caption(f"20:{7000 + i}", f"text {i}")]))
            time.sleep(0.05)
    finally:
        done.set()
        reader.join()
    assert not problems, problems[:3]
    assert len(seen) >= 2 and seen <= {"v000001", "v000002", "v000003", "v000004"}


# ---- refused operations -------------------------------------------------------------------------
@pytest.fixture
def cli_index(results, tmp_path, monkeypatch):
    """An index of the union pool and one of the text-only pool, the commands using the stand-ins."""
    run = stand_in_run(results)
    monkeypatch.setattr(idx, "run_of", lambda index, device: run)
    monkeypatch.setattr(idx, "load_run", lambda path, device: run)
    union, text = tmp_path / "union", tmp_path / "text"
    idx.build(run, union)
    idx.build(run, text, TEXT_POOL)
    return run, union, text


def refused(capsys, index: Path, argv: list[str], *expected: str) -> None:
    before = snapshot(index)
    with pytest.raises(SystemExit) as exit_:
        idx.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    assert snapshot(index) == before


def test_refused_operations_exit_2_with_one_line_and_change_nothing(cli_index, tmp_path, capsys):
    run, union, text = cli_index
    pool = lambda name, rows: str(write_pool(tmp_path / name, rows))  # noqa: E731
    add = lambda index, path: ["add", "--index", str(index), "--pool", path]  # noqa: E731

    refused(capsys, union, add(union, pool("dup.jsonl", [new_caption("20:8000"), new_caption("20:1001")])),
            "dup.jsonl:2", "20:1001", "already in the index")
    refused(capsys, union, add(union, pool("twice.jsonl", [new_caption("20:8000"), new_caption("20:8000", "b")])),
            "twice.jsonl:2", "20:8000", "more than once")
    refused(capsys, union, add(union, pool("bad.jsonl", [new_caption("20:8000"), {"did": "20:8001", "modality": "text"}])),
            "bad.jsonl:2")
    image = {"did": "20:8002", "modality": "image", "txt": None, "img_path": "img/0.png"}
    refused(capsys, text, add(text, pool("image.jsonl", [image])), "image.jsonl:1", "is image", "holds only text")
    gone = tmp_path / "gone.txt"
    gone.write_text("20:1001\n20:9999\n")
    refused(capsys, union, ["remove", "--index", str(union), "--ids", str(gone)], "gone.txt:2", "20:9999", "not in the index")
    gone.write_text("20:1001\n20:1002\n20:1001\n")
    refused(capsys, union, ["remove", "--index", str(union), "--ids", str(gone)], "gone.txt:3", "repeats line 1")
    gone.write_text("".join(f"20:{1001 + i}\n" for i in range(30)))
    refused(capsys, text, ["remove", "--index", str(text), "--ids", str(gone)], "gone.txt", "every candidate")
    refused(capsys, union, ["build", "--run", str(run.manifest["path"]), "--out", str(union)], "already an index")

    fd = acquire_lock(union, "another writer")
    try:
        refused(capsys, union, add(union, pool("ok.jsonl", [new_caption("20:8003")])), "another run is writing here")
    finally:
        release_lock(fd)
    run.checkpoint_fingerprints = {"rq": "retrained", "generator": "fake-gen"}
    refused(capsys, union, add(union, pool("ok.jsonl", [new_caption("20:8003")])), "manifest.json", "retrained",
            "genius index build")
    run.checkpoint_fingerprints = {"rq": "fake-rq", "generator": "fake-gen"}
    run.manifest["encoder"]["extraction"] = {"encoder": {"name": "another"}}
    refused(capsys, union, add(union, pool("ok.jsonl", [new_caption("20:8003")])), "built with encoder")


def test_a_version_changed_after_it_was_written_is_refused_naming_the_file(cli_index, tmp_path):
    _, union, _ = cli_index
    version = union / idx.current_name(union)
    codes = version / "codes.npy"
    np.save(codes, np.load(codes)[::-1].copy())  # the IDs the trie and the results use, reordered
    with pytest.raises(idx.IndexUserError, match=rf"{re.escape(str(codes))}: its SHA-256 is not the one the "
                                                 "manifest records"):
        idx.open_version(union)
    fused = version / "fused.npy"
    fused.write_bytes(fused.read_bytes()[:-100])  # truncated
    manifest = version / "manifest.json"
    record = json.loads(manifest.read_text())
    record["codes_hash"] = sha256_file(codes)
    manifest.write_text(json.dumps(record))
    with pytest.raises(idx.IndexUserError, match=rf"{re.escape(str(fused))}: cannot be read"):
        idx.open_version(union)
    for text in ("{not json", "[1, 2]"):
        manifest.write_text(text)
        with pytest.raises(idx.IndexUserError, match=rf"{re.escape(str(manifest))}: (not valid JSON|holds a list)"):
            idx.open_version(union)
