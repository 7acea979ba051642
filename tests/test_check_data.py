from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from genius.common.check_data import check_root
from genius.common.world import write_world


@pytest.fixture
def coco_copy(coco_mini, tmp_path) -> Path:
    """A writable copy of the real COCO slice (images linked, text files copied)."""
    root = tmp_path / "coco"
    shutil.copytree(coco_mini, root, ignore=shutil.ignore_patterns("mbeir_images"))
    (root / "mbeir_images").symlink_to(coco_mini / "mbeir_images")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "w"
    write_world(root, "test", seed=0)
    return root


def rewrite_line(path: Path, lineno: int, edit) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = edit(lines[lineno - 1])
    path.write_text("\n".join(lines) + "\n")


def run_cli(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genius.cli", "check-data", "--root", str(root)],
                          capture_output=True, text=True)


def test_real_slice_is_clean(coco_copy):
    report = check_root(coco_copy)
    assert report.problems == [] and report.files_checked == 8


def test_world_is_clean_and_cli_exits_zero(world):
    assert check_root(world).problems == []
    result = run_cli(world)
    assert result.returncode == 0 and result.stdout.startswith("OK")


def test_bad_json_line_is_named(world, tmp_path):
    root = tmp_path / "w"
    shutil.copytree(world, root)
    query_file = sorted((root / "query" / "test").glob("*.jsonl"))[0]
    rewrite_line(query_file, 3, lambda line: line[:-5])
    result = run_cli(root)
    assert result.returncode == 1
    assert f"query/test/{query_file.name}:3: not valid JSON" in result.stdout


def test_positive_missing_from_pool_is_named(coco_copy):
    path = coco_copy / "query/test/mbeir_mscoco_task0_test.jsonl"
    rewrite_line(path, 7, lambda line: json.dumps({**json.loads(line), "pos_cand_list": ["9:9999"]}))
    problems = check_root(coco_copy).problems
    assert "query/test/mbeir_mscoco_task0_test.jsonl:7: positive 9:9999 is not in the candidate pool " \
           "cand_pool/local/mbeir_mscoco_task0_test_cand_pool.jsonl" in problems
    # the qrels still list the old positive, so the disagreement is reported too
    assert any(p.startswith("query/test/mbeir_mscoco_task0_test.jsonl:7: positives of 9:7 disagree") for p in problems)
    assert run_cli(coco_copy).returncode == 1


def test_wrong_modality_missing_image_and_bad_qrels(coco_copy):
    pool = coco_copy / "cand_pool/local/mbeir_mscoco_task3_test_cand_pool.jsonl"
    rewrite_line(pool, 2, lambda line: json.dumps({**json.loads(line), "modality": "txt"}))
    queries = coco_copy / "query/test/mbeir_mscoco_task3_test.jsonl"
    rewrite_line(queries, 4, lambda line: json.dumps({**json.loads(line), "query_img_path": "mbeir_images/nope.jpg"}))
    qrels = coco_copy / "qrels/test/mbeir_mscoco_task3_test_qrels.txt"
    rewrite_line(qrels, 1, lambda line: line.rsplit(" ", 1)[0])
    problems = check_root(coco_copy).problems
    assert "cand_pool/local/mbeir_mscoco_task3_test_cand_pool.jsonl:2: modality 'txt' is not one of " \
           "'image', 'text', 'image,text'" in problems
    assert "query/test/mbeir_mscoco_task3_test.jsonl:4: image mbeir_images/nope.jpg does not exist under " \
           f"{coco_copy.resolve()}" in problems
    assert any(p.startswith("qrels/test/mbeir_mscoco_task3_test_qrels.txt:1: expected 5 fields") for p in problems)
