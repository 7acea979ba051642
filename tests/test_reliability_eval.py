"""``genius eval`` with bad input of every kind, on a copy of the finished tiny GENIUS_ROOT.

Each test asserts either a correct result or exit status 2 with one stderr line
``genius eval: error: <file[:line] or key>: ...`` naming the file or key, and never a traceback.
The command runs in-process (``main([...])``); a copied root's decodings, tries and fused
embeddings are reused (they are keyed by content), so an evaluation that runs costs seconds. Each
test copies from ``finished_tiny_root`` only what evaluation reads (not the images, the CLIP-SF
run or the training checkpoints, 600 MB that ``tiny_root_copy`` would copy).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genius.common.checkpoint import load_own_checkpoint, save_own_checkpoint
from genius.common.ranges import ranged_fields, unranged_numbers
from genius.common.runstate import LOCK_FILE
from genius.common.store import EmbeddingStore, write_store
from genius.models.generative_retriever import evaluate
from genius.models.generative_retriever.evaluate import EvalConfig, EvalFile

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs_scripts" / "tiny" / "eval.yaml"
WORLD = Path("worlds/tiny")
RESULTS = Path("results/tiny")
GENERATOR = Path("checkpoint/tiny/gen/generator.pt")
T2I = "mbeir_shapesnews_task0"
QUERIES = WORLD / f"query/test/{T2I}_test.jsonl"
QRELS = WORLD / f"qrels/test/{T2I}_test_qrels.txt"
MISSING_DID = "20:999999"


NOT_READ_BY_EVAL = shutil.ignore_patterns("mbeir_images", "clip_sf", "checkpoints", "stale", "*.log")


@pytest.fixture
def root(finished_tiny_root, tmp_path, monkeypatch) -> Path:
    """A copy of the finished tiny root with what evaluation reads (file times kept, as ``cp -a``)."""
    copy = tmp_path / "genius_root"
    shutil.copytree(finished_tiny_root, copy, symlinks=True, ignore=NOT_READ_BY_EVAL)
    monkeypatch.setenv("GENIUS_ROOT", str(copy))
    monkeypatch.delenv("GENIUS_DEBUG", raising=False)
    return copy


def run_eval(capsys, *sets: str) -> tuple[int, str, str]:
    """``genius eval`` on the tiny config with ``--set`` overrides: (exit status, stdout, stderr)."""
    argv = ["--config", str(CONFIG)] + [arg for s in sets for arg in ("--set", s)]
    try:
        code = evaluate.main(argv)
    except SystemExit as exited:
        code = exited.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def error_line(code: int, err: str, *expected: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("genius eval: error: "), lines[0]
    for text in expected:
        assert str(text) in lines[0], (text, lines[0])
    return lines[0]


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- every number is range-checked before any work -----------------------------------------
def test_every_number_of_the_eval_config_declares_its_range():
    assert unranged_numbers(EvalConfig) == [] and unranged_numbers(EvalFile) == []


def _out_of_range():
    for key, allowed in ranged_fields(EvalConfig).items():
        bad = allowed.outside()
        value = int(bad) if float(bad).is_integer() else bad
        listed = key in ("extra_ks", "report.ks")
        yield pytest.param(f"{key}=[{value}]" if listed else f"{key}={value}", f"{key}[0]" if listed else key, id=key)
    yield pytest.param("files=[{queries: q.jsonl, pool: p.jsonl, qrels: r.txt, k: 0}]", "files[0].k", id="files.k")
    yield pytest.param("decoding.modality_threshold=.nan", "decoding.modality_threshold", id="nan")


@pytest.mark.parametrize("override, key", list(_out_of_range()))
def test_an_out_of_range_number_is_one_line_naming_the_key(override, key, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GENIUS_ROOT", str(tmp_path))  # an empty root: nothing may be read or written first
    code, _, err = run_eval(capsys, override)
    error_line(code, err, f"--set {override}: {key}: ", "is out of range; it must be")  # the --set, then the key
    assert not any(tmp_path.iterdir())


# ---- skip, force, one writer -------------------------------------------------------------------
def test_a_copied_root_is_already_evaluated(root, capsys, caplog):
    caplog.set_level(logging.INFO, logger="genius")
    before = mtimes(root / RESULTS)
    code, out, _ = run_eval(capsys)
    assert code == 0 and "up to date" in caplog.text
    assert out.strip() == (root / RESULTS / "results.md").read_text().strip()
    assert mtimes(root / RESULTS) == before and not (root / RESULTS / "stale").exists()


def test_a_device_trie_writes_the_host_tries_run_files(root, capsys):
    # decoding.device_trie keeps the trie on the decoding device (the GPU-ready loop); on the tiny
    # run it must decode every pool to the very rankings the C++ trie gave.
    code, _, _ = run_eval(capsys, "decoding.device_trie=true", "paths.results=results/on_device")
    assert code == 0

    def run_files(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*.run"))}

    got, want = run_files(root / "results/on_device/runs"), run_files(root / RESULTS / "runs")
    assert len(want) >= 10 and got == want


def test_int8_decoding_keeps_the_tiny_runs_recall(root, capsys):
    """decoding.int8 decodes afresh (never the fp32 decodings' cache) and, averaged over the eight
    query files of each pool kind, stays within 1.5 points of fp32's Recall@5 for GENIUS and
    GENIUS^R (measured: 0.3 points, one query in 320; a broken int8 product loses tens of points).
    Together with autocast it is one line naming both keys."""
    code, _, _ = run_eval(capsys, "decoding.int8=true", "paths.results=results/int8")
    assert code == 0

    def averages(folder: Path) -> dict:
        by_kind: dict = {}
        for r in json.loads((folder / "metrics.json").read_text())["recall"]:
            if r["reported"] and r["method"] != "dense":
                by_kind.setdefault((r["method"], r["pool_kind"]), []).append(100 * r["value"])
        return {key: float(np.mean(values)) for key, values in by_kind.items()}

    metrics = json.loads((root / "results/int8/metrics.json").read_text())
    assert not any(d["cached"] for d in metrics["decoding"])
    assert "int8 decoder" in (root / "results/int8/results.md").read_text()
    fp32, int8 = averages(root / RESULTS), averages(root / "results/int8")
    assert len(fp32) == 4 and fp32.keys() == int8.keys()
    assert all(abs(int8[key] - fp32[key]) <= 1.5 for key in fp32), (fp32, int8)
    error_line(*run_eval(capsys, "decoding.int8=true", "decoding.autocast=true")[::2],
               "decoding.int8 and decoding.autocast are both true")


def test_force_re_evaluates_and_sets_the_old_results_aside(root, capsys):
    out_dir = root / RESULTS
    table, done = (out_dir / "results.tsv").read_text(), json.loads((out_dir / "done.json").read_text())
    code, out, _ = run_eval(capsys, "force=true")
    assert code == 0 and "GENIUS evaluation" in out
    (stale,) = (out_dir / "stale").iterdir()
    assert (stale / "results.tsv").read_text() == table and (stale / "done.json").is_file()
    assert (out_dir / "results.tsv").read_text() == table  # same inputs, same numbers
    assert json.loads((out_dir / "done.json").read_text())["digest"] == done["digest"]
    decoding = json.loads((out_dir / "metrics.json").read_text())["decoding"]
    assert decoding and all(d["cached"] for d in decoding)  # the decodings were reused, by content


@pytest.mark.parametrize("damage", ["truncated", "edited", "deleted"])
def test_results_changed_after_the_run_finished_are_evaluated_again(root, capsys, caplog, damage):
    """done.json records every file the evaluation wrote: a table cut short, a run file edited or
    the results deleted afterwards is not printed as the run's; the run is set aside and made again."""
    out_dir = root / RESULTS
    table = (out_dir / "results.tsv").read_text()
    run_file = next((out_dir / "runs").rglob("*.run"))
    changed = {"truncated": out_dir / "results.tsv", "edited": run_file, "deleted": out_dir / "results.md"}[damage]
    before = changed.read_bytes()
    if damage == "truncated":
        changed.write_bytes(before[: len(before) // 2])
    elif damage == "edited":
        changed.write_bytes(before.replace(b" ", b"\t", 1))  # same size, other content
    else:
        changed.unlink()
    code, out, err = run_eval(capsys)
    assert code == 0 and "GENIUS evaluation" in out, err
    assert f"{changed} is {'missing' if damage == 'deleted' else 'not the file its finished run wrote'}" \
        in caplog.text and "evaluating again" in caplog.text
    (stale,) = (out_dir / "stale").iterdir()  # the changed results are set aside, not deleted
    assert (stale / changed.relative_to(out_dir)).exists() == (damage != "deleted")
    assert (out_dir / "results.tsv").read_text() == table  # same inputs, same numbers
    assert changed.read_bytes() == before or damage == "deleted"  # results.md also holds timings
    caplog.clear()
    caplog.set_level(logging.INFO, logger="genius")
    assert run_eval(capsys)[0] == 0 and "up to date" in caplog.text


def test_a_second_eval_into_a_held_results_folder_names_the_holder(root, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom genius.common.runstate import acquire_lock\n"
         "acquire_lock(sys.argv[1], 'genius eval')\nprint('held', flush=True)\ntime.sleep(120)\n",
         str(root / RESULTS)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_eval(capsys, "force=true")
    finally:
        holder.kill()
        holder.wait()
    error_line(code, err, str(root / RESULTS), f"process {holder.pid}", "another run is writing here")
    assert not (root / RESULTS / "stale").exists()  # the held folder was left alone
    code, _, err = run_eval(capsys, "force=true")  # the killed holder's lock is taken over
    assert code == 0, err
    assert (root / RESULTS / LOCK_FILE).read_text() == ""


# ---- positives that are not in the pool --------------------------------------------------------
def test_a_qrels_positive_missing_from_the_pool(root, capsys):
    qrels = root / QRELS
    lines = qrels.read_text().splitlines()
    qid, _, _, _, task = lines[0].split()
    qrels.write_text("\n".join([f"{qid} 0 {MISSING_DID} 1 {task}"] + lines[1:]) + "\n")  # its only positive
    code, _, err = run_eval(capsys)
    error_line(code, err, f"{qrels}:1: qrels positive {MISSING_DID} of query {qid} is not in the evaluated pool",
               "1 queries have no positive in it", "missing_positives")

    code, _, err = run_eval(capsys, "missing_positives=exclude")
    assert code == 0, err
    metrics = json.loads((root / RESULTS / "metrics.json").read_text())
    counted = {(m["pool"], m["qrels_positives_not_in_pool"], m["queries_excluded"])
               for m in metrics["positives_not_in_pool"]}
    assert counted == {(f"{T2I}_cand_pool", 1, 1), ("mbeir_union_test_cand_pool", 1, 1)}
    assert f"{T2I}_test on {T2I}_cand_pool: 1 of {len(lines)} qrels positives" in \
        (root / RESULTS / "results.md").read_text()


def test_a_query_files_positive_missing_from_the_pool(root, capsys):
    path = root / QUERIES
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    record["pos_cand_list"] = record["pos_cand_list"] + [MISSING_DID]
    lines[1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    code, _, err = run_eval(capsys)
    error_line(code, err, f"{path}:2: pos_cand_list entry {MISSING_DID} of query {record['qid']}",
               "not in the evaluated pool")


# ---- inputs made from something else ---------------------------------------------------------
def test_codes_of_a_re_extracted_store_are_refused(root, capsys):
    """The pools re-extracted (here: other vectors, same candidates) after the codes were assigned."""
    store_dir = next((root / "extracted_embed").glob(f"*/cand/{T2I}_cand_pool"))
    store = EmbeddingStore.open(store_dir)
    arrays = store.arrays.take(np.arange(len(store)))
    arrays.img[:] = np.flip(arrays.img, axis=1)
    write_store(store_dir, arrays, encoder=store.meta["encoder"], kind="candidate",
                source=root / WORLD / f"cand_pool/local/{T2I}_cand_pool.jsonl", config=store.meta.get("config"),
                dtype=store.meta["dtype"])
    assert EmbeddingStore.open(store_dir).content_id != store.content_id
    code, _, err = run_eval(capsys)
    error_line(code, err, f"checkpoint/tiny/rq/codes/{T2I}_cand_pool: these codes were computed from another "
                          "version of the candidate store", "genius assign-codes")


def test_a_generator_trained_with_another_quantizer_is_refused(root, capsys):
    path = root / GENERATOR
    ckpt = load_own_checkpoint(path)
    ckpt.pop("content_sha256")
    save_own_checkpoint({**ckpt, "rq": "another quantizer's fingerprint"}, path)
    code, _, err = run_eval(capsys)
    error_line(code, err, f"{path}: trained on a different rq.pt", "retrain the generator")


def test_a_flipped_byte_in_the_generator_is_refused(root, capsys):
    path = root / GENERATOR
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside the weights
    path.write_bytes(bytes(data))
    code, _, err = run_eval(capsys, "force=true")  # the recorded digest is unchanged: force reads the weights
    error_line(code, err, str(path), "does not match the digest")


# ---- the query file and its qrels disagree -----------------------------------------------------
def test_qrels_lines_of_unknown_queries_are_counted_not_scored(root, capsys, caplog):
    code, _, err = run_eval(capsys)
    assert code == 0, err
    table = (root / RESULTS / "results.tsv").read_text()
    qrels = root / QRELS
    lines = qrels.read_text().splitlines()
    task = lines[0].split()[4]
    qrels.write_text("\n".join(lines + [f"99:99999 0 {lines[0].split()[2]} 1 {task}"]) + "\n")
    code, _, err = run_eval(capsys, "force=true")  # ignored without a word before
    assert code == 0, err
    assert f"{qrels}: 1 lines name qids that are not queries of {root / QUERIES} (first: line {len(lines) + 1}, " \
           "qid 99:99999); they are not scored" in caplog.text
    assert (root / RESULTS / "results.tsv").read_text() == table


def test_a_query_without_a_qrels_line_is_named(root, capsys):
    qrels = root / QRELS
    lines = qrels.read_text().splitlines()
    qid = lines[0].split()[0]
    qrels.write_text("\n".join(line for line in lines if line.split()[0] != qid) + "\n")
    code, _, err = run_eval(capsys)  # scored as a miss before, with no word
    queries = [json.loads(line)["qid"] for line in (root / QUERIES).read_text().splitlines()]
    error_line(code, err, f"{root / QUERIES}:{queries.index(qid) + 1}: query {qid} has no relevant line in {qrels}",
               "could never be a hit")


# ---- artefacts changed after they were written -----------------------------------------------
def test_codes_replaced_after_assign_codes_are_refused(root, capsys):
    codes = root / "checkpoint/tiny/rq/codes/mbeir_union_test_cand_pool/codes.npy"
    array = np.load(codes)
    np.save(codes, array[::-1].copy())  # same shape and dtype, other rows: silently used before
    code, _, err = run_eval(capsys, "force=true")
    error_line(code, err, f"{codes} does not match the size and SHA-256 in meta.json",
               "changed after genius assign-codes wrote them")


def test_a_damaged_decode_cache_is_decoded_again(root, capsys, caplog):
    code, _, err = run_eval(capsys)
    assert code == 0, err
    table = (root / RESULTS / "results.tsv").read_text()
    (cached,) = [p for p in (root / RESULTS / "decoded").rglob("codes.npy")][:1]
    np.save(cached, np.load(cached)[::-1].copy())  # rows swapped between queries
    code, _, err = run_eval(capsys, "force=true")
    assert code == 0, err
    assert "not the decoding its meta.json records" in caplog.text
    assert (root / RESULTS / "results.tsv").read_text() == table  # decoded again, not read


@pytest.mark.parametrize("meta", ["garbage", "[1, 2]"])
def test_a_damaged_fused_cache_record_is_written_again(root, capsys, caplog, meta):
    code, _, err = run_eval(capsys)
    assert code == 0, err
    table = (root / RESULTS / "results.tsv").read_text()
    (record,) = [p for p in (root / RESULTS / "fused").rglob("meta.json")][:1]
    record.write_text(meta)  # a traceback or an unnamed JSON error before
    code, _, err = run_eval(capsys, "force=true")
    assert code == 0, err
    assert f"{record}: " in caplog.text and "writing the cache again" in caplog.text
    assert (root / RESULTS / "results.tsv").read_text() == table
    assert json.loads(record.read_text())["store_content"]  # rewritten


def test_fused_cache_rows_changed_since_written_are_written_again(root, capsys, caplog):
    code, _, err = run_eval(capsys)
    assert code == 0, err
    table = (root / RESULTS / "results.tsv").read_text()
    caches = sorted((root / RESULTS / "fused").rglob("fused.npy"))
    cache = caches[-1]
    np.save(cache, np.load(cache)[::-1].copy())  # same shape and dtype, rows swapped: used silently before
    code, _, err = run_eval(capsys, "force=true")
    assert code == 0, err
    assert f"{cache}: not the fp16" in caplog.text and "writing it again" in caplog.text
    assert (root / RESULTS / "results.tsv").read_text() == table  # re-ranked with the store's own rows


def test_a_copied_or_older_fused_cache_is_reused(root, capsys, caplog):
    code, _, err = run_eval(capsys)
    assert code == 0, err
    caches = sorted((root / RESULTS / "fused").rglob("fused.npy"))
    for cache in caches:  # as a copy without kept times leaves them
        os.utime(cache, ns=(cache.stat().st_atime_ns, cache.stat().st_mtime_ns + 10**9))
    inodes = [cache.stat().st_ino for cache in caches]
    code, _, err = run_eval(capsys, "force=true")
    assert code == 0, err
    assert "writing it again" not in caplog.text
    assert [cache.stat().st_ino for cache in caches] == inodes  # not written again
    for cache in caches:  # a cache written before meta.json recorded the file: read as before
        record = cache.parent / "meta.json"
        record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "fused"}))
    code, _, err = run_eval(capsys, "force=true")
    assert code == 0, err
    assert "writing it again" not in caplog.text
    assert [cache.stat().st_ino for cache in caches] == inodes
