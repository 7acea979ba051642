"""Issue 14 for stage 0 and assign-codes: bad numbers and paths, changed inputs, a second writer, a
killed run, read-only folders, deleted codes, truncated tries. Each case ends either in a correct
result or in exit status 2 with one line on stderr naming the file or key, never a traceback.

Every case runs the stage in-process (``main([...])``) on the session's finished tiny GENIUS_ROOT
(cases that write nothing) or on a private copy of the part of it these stages read and write;
only the second-writer / kill -9 case starts one extraction subprocess.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from genius.common.checkpoint import CONTENT_KEY, load_own_checkpoint, save_own_checkpoint
from genius.common.ranges import ranged_fields, unranged_numbers
from genius.common.store import ARRAYS, EmbeddingStore
from genius.feature_extraction import extract
from genius.models.residual_quantization import assign_codes
from genius.trie_cpp import load_trie

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs_scripts" / "tiny"
EMBED = Path("extracted_embed/clip_sf_tiny")
CODES = Path("checkpoint/tiny/rq/codes")
POOL = "mbeir_shapesnews_task0_cand_pool"  # 600 image candidates: 3 parts of 256 rows
ONLY_POOL = ("data.train_queries=null", "data.train_pool=null", "data.test_queries=[]", "data.union_pool=null",
             f"data.local_pools=[cand_pool/local/{POOL}.jsonl]")


@pytest.fixture
def root_copy(finished_tiny_root: Path, tmp_path: Path) -> Path:
    """What extract and assign-codes read and write in the finished tiny root, copied with its file
    times (as ``cp -a`` does) to a new path: the data, the stores, the CLIP and RQ weights, the codes.
    (The training checkpoints, most of the root's bytes, are left out.)"""
    copy = tmp_path / "genius_root"
    for folder in ("worlds", "extracted_embed", "checkpoint/tiny/rq/codes"):
        shutil.copytree(finished_tiny_root / folder, copy / folder, symlinks=True)
    for file in ("checkpoint/tiny/clip_sf/clip_sf.pt", "checkpoint/tiny/rq/rq.pt"):
        (copy / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(finished_tiny_root / file, copy / file)
    return copy


def args(config: str, *sets: str) -> list[str]:
    return ["--config", str(TINY / config)] + [a for s in sets for a in ("--set", s)]


def run_extract(root: Path, monkeypatch, *sets: str) -> int:
    monkeypatch.setenv("GENIUS_ROOT", str(root))
    return extract.main(args("extract.yaml", *sets))


def run_assign(root: Path, monkeypatch, *sets: str) -> int:
    monkeypatch.setenv("GENIUS_ROOT", str(root))
    return assign_codes.main(args("assign_codes.yaml", *sets))


def user_error(capsys, call, *args) -> str:
    """Run ``call(*args)``, which must exit with status 2 and one stderr line; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        call(*args)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def arrays_of(store: Path) -> dict[str, np.ndarray]:
    opened = EmbeddingStore.open(store)
    return {name: np.array(getattr(opened.arrays, name)) for name in ARRAYS}


def stamps(root: Path) -> dict[str, int]:
    return {str(p.parent.relative_to(root)): p.stat().st_mtime_ns for p in (root / EMBED).glob("*/*/meta.json")}


# ---- numbers and paths, checked before any work -------------------------------------------------
ANY_INTEGER = {"instructions.seed"}  # a seed may be any integer


def test_every_number_declares_its_range():
    assert set(unranged_numbers(extract.ExtractConfig)) == ANY_INTEGER
    assert unranged_numbers(assign_codes.AssignCodesConfig) == []


def _cases(cls, stage):
    for key, allowed in ranged_fields(cls).items():
        below_or_above = {int(allowed.outside()), *([int(allowed.high) + 1] if allowed.high is not None else [])}
        for value in sorted(below_or_above):
            yield pytest.param(key, value, id=f"{stage}:{key}={value}")


@pytest.mark.parametrize("key, value", list(_cases(extract.ExtractConfig, "extract")))
def test_extract_rejects_out_of_range_numbers(tmp_path, monkeypatch, capsys, key, value):
    line = user_error(capsys, run_extract, tmp_path, monkeypatch, f"{key}={value}")  # before any input is read
    # the --set that gave it, then the dotted key and the allowed range
    assert re.match(rf"genius extract: error: --set {re.escape(f'{key}={value}')}: {re.escape(key)}: {value!r} is "
                    r"out of range; it must be an integer", line), line


@pytest.mark.parametrize("key, value", list(_cases(assign_codes.AssignCodesConfig, "assign-codes")))
def test_assign_codes_rejects_out_of_range_numbers(tmp_path, monkeypatch, capsys, key, value):
    line = user_error(capsys, run_assign, tmp_path, monkeypatch, f"{key}={value}")  # before any input is read
    # the --set that gave it, then the dotted key and the allowed range
    assert re.match(rf"genius assign-codes: error: --set {re.escape(f'{key}={value}')}: {re.escape(key)}: "
                    rf"{value!r} is out of range; it must be an integer", line), line


@pytest.mark.parametrize("setting, key", [
    ("data.root=worlds/nowhere", "data.root"),
    ("encoder.checkpoint=checkpoint/tiny/clip_sf/missing.pt", "encoder.checkpoint"),
    ("data.local_pools=[cand_pool/local/missing.jsonl]", "data.local_pools[0]"),
    ("data.instructions=instructions/missing.tsv", "data.instructions"),
])
def test_extract_names_a_missing_input(finished_tiny_root, monkeypatch, capsys, setting, key):
    before = stamps(finished_tiny_root)
    line = user_error(capsys, run_extract, finished_tiny_root, monkeypatch, setting)
    assert f"error: {key}: " in line
    assert stamps(finished_tiny_root) == before


@pytest.mark.parametrize("setting, key", [
    ("rq_path=checkpoint/tiny/rq/missing.pt", "rq_path"),
    ("embed_dir=extracted_embed/nowhere", "embed_dir"),
    ("pools=[no_such_pool]", "pools[0]"),
])
def test_assign_codes_names_a_missing_input(finished_tiny_root, monkeypatch, capsys, setting, key):
    line = user_error(capsys, run_assign, finished_tiny_root, monkeypatch, setting)
    assert f"error: {key}: " in line


# ---- changed inputs ------------------------------------------------------------------------------
def test_copied_root_skips_and_a_replaced_image_is_embedded_again(root_copy, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    root = root_copy
    before = stamps(root)
    # A copied root (times kept) is up to date: nothing is embedded or rewritten.
    assert run_extract(root, monkeypatch) == 0
    assert stamps(root) == before

    pool_file = root / "worlds/tiny/cand_pool/local" / f"{POOL}.jsonl"
    records = [json.loads(line) for line in pool_file.read_text().splitlines()]
    image = root / "worlds/tiny" / records[0]["img_path"]
    users = {p.stem for p in (root / "worlds/tiny").rglob("*.jsonl") if f'"{records[0]["img_path"]}"' in p.read_text()}
    assert users == {POOL, "mbeir_union_test_cand_pool"}
    local, union = root / EMBED / "cand" / POOL, root / EMBED / "cand/mbeir_union_test_cand_pool"
    old_local, old_union = arrays_of(local), arrays_of(union)

    # Same name, other bytes (another picture of the world).
    shutil.copyfile(root / "worlds/tiny" / records[1]["img_path"], image)
    caplog.clear()
    assert run_extract(root, monkeypatch) == 0
    assert "input images changed" in caplog.text
    changed = {name for name, stamp in stamps(root).items() if stamp != before[name]}
    assert changed == {str(EMBED / "cand" / POOL), str(EMBED / "cand/mbeir_union_test_cand_pool")}
    new_local, new_union = arrays_of(local), arrays_of(union)
    row = 0
    union_row = int(np.flatnonzero(new_union["ids"] == new_local["ids"][row])[0])
    for new, old, r in ((new_local, old_local, row), (new_union, old_union, union_row)):
        assert not np.array_equal(new["img"][r], old["img"][r])  # that item's vector changed...
        keep = np.arange(len(old["ids"])) != r
        for name in ARRAYS:  # ... and nothing else did, bit for bit
            assert np.array_equal(new[name][keep], old[name][keep]), name
        np.testing.assert_array_equal(new["img"][r], new_local["img"][row])


def test_another_encoder_checkpoint_gives_new_stores_and_new_codes(root_copy, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    root = root_copy
    store = root / EMBED / "cand" / POOL
    old_id = EmbeddingStore.open(store).content_id
    old_meta = json.loads((root / CODES / POOL / "meta.json").read_text())
    assert old_meta["store_content"] == old_id

    checkpoint = load_own_checkpoint(root / "checkpoint/tiny/clip_sf/clip_sf.pt")
    checkpoint.pop(CONTENT_KEY, None)
    generator = torch.Generator().manual_seed(0)
    checkpoint["model"] = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                           for k, v in checkpoint["model"].items()}
    save_own_checkpoint(checkpoint, root / "checkpoint/tiny/clip_sf/other.pt")

    caplog.clear()
    assert run_extract(root, monkeypatch, "encoder.checkpoint=checkpoint/tiny/clip_sf/other.pt", *ONLY_POOL) == 0
    assert "input encoder changed" in caplog.text
    new_id = EmbeddingStore.open(store).content_id
    assert new_id != old_id

    caplog.clear()
    assert run_assign(root, monkeypatch, f"pools=[{POOL}]") == 0
    assert "input store changed" in caplog.text
    meta = json.loads((root / CODES / POOL / "meta.json").read_text())
    assert meta["store_content"] == new_id and meta["rq"] == old_meta["rq"]
    (archived,) = (root / CODES / POOL / "stale").iterdir()  # the old codes are kept aside, not lost
    assert json.loads((archived / "meta.json").read_text())["store_content"] == old_id
    codes, ids, _ = assign_codes.read_codes(root / CODES / POOL, EmbeddingStore.open(store))
    np.testing.assert_array_equal(ids, EmbeddingStore.open(store).ids)
    assert not np.array_equal(codes, np.load(archived / "codes.npy"))
    # Codes of the old store are refused by their checked reader.
    with pytest.raises(ValueError, match="another version of the store"):
        assign_codes.read_codes(archived, EmbeddingStore.open(store))


# ---- one writer; kill -9 and resume ----------------------------------------------------------------
PAUSE_AFTER_FIRST_PART = """
import os, sys, time
from pathlib import Path
from genius.feature_extraction import extract
marker, real = Path(sys.argv[1]), extract.write_part

def write_then_pause(*args, **kwargs):
    real(*args, **kwargs)
    marker.write_text(str(os.getpid()))
    while True:
        time.sleep(1)

extract.write_part = write_then_pause
sys.exit(extract.main(sys.argv[2:]))
"""


def test_second_writer_is_refused_and_a_killed_run_resumes_bit_identical(
        finished_tiny_root, root_copy, monkeypatch, capsys, caplog, tmp_path):
    caplog.set_level(logging.INFO)
    root = root_copy
    store = root / EMBED / "cand" / POOL
    shutil.rmtree(store)
    marker = tmp_path / "first_part_written"
    env = {**os.environ, "GENIUS_ROOT": str(root), "GENIUS_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_FIRST_PART, str(marker), *args("extract.yaml", *ONLY_POOL)],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not marker.exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() < deadline, "the first extraction wrote no part"
            time.sleep(0.2)
        # A second extraction into the same folder while the first is alive: refused, naming it.
        line = user_error(capsys, run_extract, root, monkeypatch, *ONLY_POOL)
        assert "another run is writing here" in line and f"process {first.pid}" in line
        assert str(root / EMBED) in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    parts = sorted(p.name for p in (store.parent / f"{POOL}.parts").glob("part-*.npz"))
    assert parts == ["part-0000000000-0000000256.npz"] and not store.exists()

    # The killed run's lock is taken over; its part is kept; the result is the uninterrupted one's.
    caplog.clear()
    assert run_extract(root, monkeypatch, *ONLY_POOL) == 0
    assert "taking over the lock" in caplog.text
    runs = [json.loads(line) for line in (root / EMBED / "extract_metrics.jsonl").read_text().splitlines()]
    last = [m for m in runs if m["store"] == str(store) and m["status"] == "extracted"][-1]
    assert (last["parts_reused"], last["parts_embedded"]) == (1, 2)
    reference = finished_tiny_root / EMBED / "cand" / POOL
    assert EmbeddingStore.open(store).content_id == EmbeddingStore.open(reference).content_id
    got, want = arrays_of(store), arrays_of(reference)
    for name in ARRAYS:
        assert np.array_equal(got[name], want[name]), name


# ---- permissions -----------------------------------------------------------------------------------
def _refuse_lock(monkeypatch, folder: Path) -> None:
    """The OS refuses to create files in ``folder`` (as a read-only folder does for a non-root user)."""
    real_open = os.open

    def refusing_open(path, flags, *rest, **kwargs):
        if Path(path).parent == folder and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *rest, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)


def test_unwritable_output_folders_are_one_line_errors(finished_tiny_root, monkeypatch, capsys):
    before = stamps(finished_tiny_root)
    out = finished_tiny_root / EMBED
    _refuse_lock(monkeypatch, out)
    line = user_error(capsys, run_extract, finished_tiny_root, monkeypatch)
    assert line.startswith(f"genius extract: error: {out}") and "Permission denied" in line
    codes = finished_tiny_root / CODES
    _refuse_lock(monkeypatch, codes)
    line = user_error(capsys, run_assign, finished_tiny_root, monkeypatch)
    assert line.startswith(f"genius assign-codes: error: {codes}") and "Permission denied" in line
    assert stamps(finished_tiny_root) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder(root_copy, monkeypatch, capsys):
    out = root_copy / EMBED
    shutil.rmtree(out / "cand" / POOL)
    out.chmod(0o555)
    try:
        line = user_error(capsys, run_extract, root_copy, monkeypatch, *ONLY_POOL)
    finally:
        out.chmod(0o755)
    assert str(out) in line and "Permission denied" in line


# ---- code and trie files -----------------------------------------------------------------------------
def test_deleted_codes_are_named_and_recomputed(finished_tiny_root, root_copy, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    root = root_copy
    codes = root / CODES / POOL / "codes.npy"
    codes.unlink()
    with pytest.raises(ValueError, match=f"{codes} is missing; re-run genius assign-codes"):
        assign_codes.read_codes(codes.parent)
    others = {p: p.stat().st_mtime_ns for p in (root / CODES).glob("*/codes.npy")}
    caplog.clear()
    assert run_assign(root, monkeypatch) == 0
    assert f"{codes} is missing, computing them again" in caplog.text
    assert caplog.text.count("codes are up to date, skipped") == len(others)  # a copied root skips the rest
    assert {p: p.stat().st_mtime_ns for p in others} == others
    np.testing.assert_array_equal(np.load(codes), np.load(finished_tiny_root / CODES / POOL / "codes.npy"))
    assign_codes.read_codes(codes.parent, EmbeddingStore.open(root / EMBED / "cand" / POOL))


def test_truncated_trie_is_named(finished_tiny_root, tmp_path):
    tries = sorted((finished_tiny_root / CODES).glob("*/trie-*.bin"))
    assert tries, "eval wrote no trie in the finished root"
    whole = tries[0].read_bytes()
    assert len(load_trie(tries[0], "python")) > 0
    cut = tmp_path / tries[0].name
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    for backend in ("python", "cpp"):
        with pytest.raises(ValueError, match=f"{cut}: truncated trie file.*re-run genius eval"):
            load_trie(cut, backend)


def test_a_folder_where_a_found_jsonl_should_be_is_named_for_what_it_is(tmp_path):
    from genius.common.config import load_config
    from genius.feature_extraction.extract import ExtractConfig, plan_jobs

    (tmp_path / "query/test/mbeir_a_task0_test.jsonl").mkdir(parents=True)
    (tmp_path / "cand_pool/local").mkdir(parents=True)
    (tmp_path / "cand_pool/local/mbeir_a_task0_cand_pool.jsonl").write_text("{}\n")
    cfg = load_config(ExtractConfig, None, [f"data.root={tmp_path}", "data.train_queries=null",
                                            "data.train_pool=null", "data.union_pool=null"])
    with pytest.raises(FileNotFoundError, match=r"data.test_queries: \S+mbeir_a_task0_test.jsonl is a folder, not a "
                                                r"jsonl file \(data.root is \S+\); move it out of \S+query/test or "
                                                "list the files in data.test_queries"):
        plan_jobs(cfg)
