"""Bad data, one class at a time, through ``genius check-data`` and through the stage that reads it.

Each test plants one defect in a copy of the tiny world and asserts:

- check-data exits 1 and prints a problem naming the file (and line where there is one);
- the stage that reads the file, ``genius extract`` for query files, pools and images, exits 2
  with a single stderr line ``genius extract: error: <file[:line]>: ...`` naming it (positives
  outside the pool are evaluation's concern: tests/test_reliability_eval.py runs ``genius eval``
  on them);
- nothing prints a traceback.

Both commands run in-process (``main([...])``). Extraction runs the tiny preset with a randomly
initialised CLIP-SF, restricted with ``--set`` to the damaged file, so a test reads (and at most
embeds) that one file, and needs no finished pipeline.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from genius.common import check_data
from genius.common.checkpoint import save_own_checkpoint
from genius.synthetic.world import write_world
from genius.feature_extraction import extract
from genius.feature_extraction.clip_model import build_clip, model_config, own_checkpoint

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs_scripts" / "tiny"
WORLD = Path("worlds/tiny")  # where the tiny presets find the world under GENIUS_ROOT
CLIP = Path("checkpoint/tiny/clip_sf/clip_sf.pt")

# Files of the tiny world the defects go into (the world's dataset 20 is ShapesNews, 21 ShapesWiki).
T2I_QUERIES = "query/test/mbeir_shapesnews_task0_test.jsonl"
I2T_QUERIES = "query/test/mbeir_shapesnews_task3_test.jsonl"
T2I_QRELS = "qrels/test/mbeir_shapesnews_task0_test_qrels.txt"
IMAGE_POOL = "cand_pool/local/mbeir_shapesnews_task0_cand_pool.jsonl"
TEXT_POOL = "cand_pool/local/mbeir_shapeswiki_task1_cand_pool.jsonl"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A GENIUS_ROOT holding the tiny world and a randomly initialised tiny CLIP-SF (extraction
    needs weights; what they are does not matter here)."""
    base = tmp_path_factory.mktemp("reliability_data")
    write_world(base / WORLD, "test")
    torch.manual_seed(0)
    cfg = model_config("clip-sf-tiny")
    (base / CLIP).parent.mkdir(parents=True)
    save_own_checkpoint(own_checkpoint(build_clip(cfg), "clip-sf-tiny", cfg), base / CLIP)
    return base


@pytest.fixture
def root(pristine, tmp_path, monkeypatch) -> Path:
    """A private copy of the world as GENIUS_ROOT: text files copied, images hard-linked (a test
    replaces an image by unlinking it first), the checkpoint shared read-only."""
    copy = tmp_path / "genius_root"
    shutil.copytree(pristine / WORLD, copy / WORLD, ignore=shutil.ignore_patterns("mbeir_images"))
    shutil.copytree(pristine / WORLD / "mbeir_images", copy / WORLD / "mbeir_images", copy_function=os.link)
    (copy / CLIP).parent.mkdir(parents=True)
    (copy / CLIP).symlink_to(pristine / CLIP)
    monkeypatch.setenv("GENIUS_ROOT", str(copy))
    monkeypatch.setenv("GENIUS_DEBUG", "0")
    return copy


def world_file(root: Path, rel: str) -> Path:
    return root / WORLD / rel


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def edit_record(path: Path, lineno: int, **changes) -> dict:
    lines = read_lines(path)
    record = {**json.loads(lines[lineno - 1]), **changes}
    lines[lineno - 1] = json.dumps(record)
    write_lines(path, lines)
    return record


# ---- running the commands ------------------------------------------------------------------
def run_check_data(root: Path, capsys, decode: bool = False) -> tuple[int, list[str]]:
    """check-data on the world; images are decoded only where the test is about images."""
    code = check_data.main(["--root", str(root / WORLD)] + ([] if decode else ["--no-decode"]))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out.splitlines()


def run_stage(main, argv: list[str], capsys) -> str:
    """Run a stage in-process; it must exit 2 with one stderr line and no traceback. Returns that line."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert exited.value.code == 2, err
    assert "Traceback" not in out + err
    assert len(lines) == 1, err
    return lines[0]


def run_extract(rel: str, capsys, workers: int = 0) -> str:
    """The tiny extraction preset, with the damaged file as its only source."""
    query = rel.startswith("query/")
    sets = [f"runtime.num_workers={workers}", "data.train_pool=null", "data.train_queries=null", "data.union_pool=null",
            f"data.test_queries=[{rel}]" if query else "data.test_queries=[]",
            "data.local_pools=[]" if query else f"data.local_pools=[{rel}]", "runtime.device=cpu"]
    argv = ["--config", str(TINY / "extract.yaml")] + [arg for s in sets for arg in ("--set", s)]
    line = run_stage(extract.main, argv, capsys)
    assert line.startswith("genius extract: error: "), line
    return line


def assert_problem(lines: list[str], expected: str) -> None:
    assert any(line.startswith(expected) for line in lines), f"{expected!r} not in:\n" + "\n".join(lines)


# ---- one test per class of bad data ---------------------------------------------------------
def test_malformed_json(root, capsys):
    path = world_file(root, T2I_QUERIES)
    lines = read_lines(path)
    lines[2] = lines[2][:-7]  # line 3 loses its end
    write_lines(path, lines)
    code, problems = run_check_data(root, capsys)
    assert code == 1
    assert_problem(problems, f"{T2I_QUERIES}:3: not valid JSON")
    assert f"{path}:3: not valid JSON" in run_extract(T2I_QUERIES, capsys)


def test_bytes_that_are_not_utf8(root, capsys):
    path = world_file(root, TEXT_POOL)
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"txt": "', b'"txt": "caf\xe9 ', 1)  # Latin-1, not UTF-8
    path.write_bytes(b"\n".join(lines))
    code, problems = run_check_data(root, capsys)
    assert code == 1
    assert_problem(problems, f"{TEXT_POOL}:2: not valid UTF-8")
    assert f"{path}:2: not valid UTF-8" in run_extract(TEXT_POOL, capsys)


def query_image(root: Path, rel: str, lineno: int) -> tuple[str, Path, bytes]:
    """The image of a query line, unlinked from the shared original: (path in the jsonl, file, its bytes)."""
    image = json.loads(read_lines(world_file(root, rel))[lineno - 1])["query_img_path"]
    assert image
    path = root / WORLD / image
    data = path.read_bytes()
    path.unlink()
    return image, path, data


def test_missing_image(root, capsys):
    image, _, _ = query_image(root, I2T_QUERIES, 2)
    code, problems = run_check_data(root, capsys, decode=True)
    assert code == 1
    assert_problem(problems, f"{I2T_QUERIES}:2: image {image} does not exist")
    line = run_extract(I2T_QUERIES, capsys)
    assert image in line and f"{I2T_QUERIES}:2" in line  # named by its jsonl line, before any embedding


def test_truncated_image(root, capsys):
    image, image_path, data = query_image(root, I2T_QUERIES, 2)
    image_path.write_bytes(data[: len(data) // 2])
    code, problems = run_check_data(root, capsys, decode=True)
    assert code == 1
    assert_problem(problems, f"{I2T_QUERIES}:2: image {image} cannot be decoded")
    assert image in run_extract(I2T_QUERIES, capsys)
    # Decoded in a DataLoader worker, the error still reaches the user as one line.
    assert image in run_extract(I2T_QUERIES, capsys, workers=1)


def test_corrupt_image(root, capsys):
    image, image_path, _ = query_image(root, I2T_QUERIES, 3)
    image_path.write_bytes(b"this is not a picture" * 20)
    code, problems = run_check_data(root, capsys, decode=True)
    assert code == 1
    assert_problem(problems, f"{I2T_QUERIES}:3: image {image} cannot be decoded")
    assert image in run_extract(I2T_QUERIES, capsys)


def test_duplicate_did_in_a_pool(root, capsys):
    path = world_file(root, TEXT_POOL)
    lines = read_lines(path)
    copy = {**json.loads(lines[1]), "txt": "another candidate that took the same did"}
    write_lines(path, lines + [json.dumps(copy)])
    n = len(lines) + 1
    code, problems = run_check_data(root, capsys)
    assert code == 1
    assert_problem(problems, f"{TEXT_POOL}:{n}: did {copy['did']} appears more than once in this pool (first on line 2)")
    assert f"{path}:{n}: did {copy['did']} appears more than once in this pool (first on line 2)" in run_extract(TEXT_POOL, capsys)


def test_duplicate_qid_in_a_query_file(root, capsys):
    path = world_file(root, T2I_QUERIES)
    lines = read_lines(path)
    copy = {**json.loads(lines[0]), "query_txt": "another query that took the same qid"}
    write_lines(path, lines + [json.dumps(copy)])
    n = len(lines) + 1
    code, problems = run_check_data(root, capsys)
    assert code == 1
    assert_problem(problems, f"{T2I_QUERIES}:{n}: qid {copy['qid']} appears more than once in this file (first on line 1)")
    assert f"{path}:{n}: qid {copy['qid']} appears again with a different record (first on line 1)" in run_extract(T2I_QUERIES, capsys)


def test_empty_file(root, capsys):
    path = world_file(root, T2I_QUERIES)
    path.write_text("")
    code, problems = run_check_data(root, capsys)
    assert code == 1
    assert_problem(problems, f"{T2I_QUERIES}: empty file")
    assert f"{path}: empty file" in run_extract(T2I_QUERIES, capsys)


def test_candidate_whose_modality_does_not_match_what_it_holds(root, capsys):
    path = world_file(root, IMAGE_POOL)
    record = edit_record(path, 4, modality="text")  # an image, with no text, calling itself text
    assert record["txt"] is None and record["img_path"]
    code, problems = run_check_data(root, capsys)
    assert code == 1
    assert_problem(problems, f"{IMAGE_POOL}:4: modality is 'text' but the text is empty")
    assert f"{path}:4: modality is 'text' but the text is empty" in run_extract(IMAGE_POOL, capsys)


def test_query_whose_modality_does_not_match_its_task(root, capsys):
    path = world_file(root, I2T_QUERIES)
    edit_record(path, 2, query_modality="image,text", query_txt="which caption fits?")  # task 3 is image -> text
    code, problems = run_check_data(root, capsys)
    assert code == 1
    assert_problem(problems, f"{I2T_QUERIES}:2: task_id 3 is image -> text but query_modality is 'image,text'")
    assert f"{path}:2: task_id 3 is image -> text but query_modality is 'image,text'" in run_extract(I2T_QUERIES, capsys)


# Positives are compared with the pool by check-data and by evaluation, which is where a positive
# outside the pool would silently lower recall; tests/test_reliability_eval.py runs `genius eval`
# on both cases below. Extraction embeds queries and pools without joining them, and training
# counts and prints the queries and positives that are not in its pool (common/pairs.py).
MISSING_DID = "20:99999"


def test_query_positive_missing_from_the_pool(root, capsys):
    path = world_file(root, T2I_QUERIES)
    record = edit_record(path, 2, pos_cand_list=[MISSING_DID])
    qrels = world_file(root, T2I_QRELS)
    write_lines(qrels, [line for line in read_lines(qrels) if line.split()[0] != record["qid"]]
                + [f"{record['qid']} 0 {MISSING_DID} 1 0"])  # the qrels agree with the query file
    code, problems = run_check_data(root, capsys)
    assert code == 1
    # one problem, at the query line (the qrels line is the same positive)
    assert problems == [f"{T2I_QUERIES}:2: positive {MISSING_DID} is not in the candidate pool {IMAGE_POOL}"]


def test_qrels_positive_missing_from_the_pool(root, capsys):
    qrels = world_file(root, T2I_QRELS)
    lines = read_lines(qrels)
    qid, _, _, _, task = lines[0].split()
    write_lines(qrels, lines + [f"{qid} 0 {MISSING_DID} 1 {task}"])
    code, problems = run_check_data(root, capsys)
    assert code == 1
    assert problems == [f"{T2I_QRELS}:{len(lines) + 1}: positive {MISSING_DID} is not in the candidate pool "
                        f"{IMAGE_POOL} (qid {qid}); remove the line or add the candidate to the pool"]
