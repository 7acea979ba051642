from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genius.common.check_data import check_root
from genius.common.mbeir import TASKS
from genius.synthetic.world import write_world

# pytest runs with --import-mode=importlib, which leaves tests/ off sys.path; the layout builder is
# a plain module next to this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mbeir_layout import MBEIRRoot, build_mbeir_root  # noqa: E402


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


def run_cli(root: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genius.cli", "check-data", "--root", str(root), *options],
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
    result = run_cli(root, "--no-decode")  # the images were decoded in the test above
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
    (coco_copy / "a_folder.jpg").mkdir()  # mbeir_images is the shared data's folder: not written to
    rewrite_line(queries, 5, lambda line: json.dumps({**json.loads(line), "query_img_path": "a_folder.jpg"}))
    qrels = coco_copy / "qrels/test/mbeir_mscoco_task3_test_qrels.txt"
    rewrite_line(qrels, 1, lambda line: line.rsplit(" ", 1)[0])
    problems = check_root(coco_copy).problems
    assert "cand_pool/local/mbeir_mscoco_task3_test_cand_pool.jsonl:2: modality 'txt' is not one of " \
           "'image', 'text', 'image,text'" in problems
    assert "query/test/mbeir_mscoco_task3_test.jsonl:4: image mbeir_images/nope.jpg does not exist under " \
           f"{coco_copy.resolve()}" in problems
    assert "query/test/mbeir_mscoco_task3_test.jsonl:5: image a_folder.jpg is a folder under " \
           f"{coco_copy.resolve()}, not an image file" in problems
    assert any(p.startswith("qrels/test/mbeir_mscoco_task3_test_qrels.txt:1: expected 5 fields") for p in problems)


# ---- an M-BEIR-shaped root (tests/mbeir_layout.py) ------------------------------------------
def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.fixture
def mbeir(tmp_path) -> MBEIRRoot:
    return build_mbeir_root(tmp_path)


@pytest.mark.parametrize("union_dir", ["global", "union_pool"])
def test_mbeir_shaped_root_is_clean(tmp_path, union_dir):
    layout = build_mbeir_root(tmp_path, union_dir=union_dir)
    result = run_cli(layout.root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert layout.repeated_rows > 0
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    assert f"note: query/union_train/mbeir_union_up_train.jsonl: {layout.repeated_rows:,} repeated qids " \
           "(up-sampling), 0 conflicting" in notes
    # OVEN/InfoSeek positives from the other dataset: absent from the local pool, found in the union pool
    n = layout.cross_positives["query/test/mbeir_oven_task6_test.jsonl"]
    assert n > 0
    assert f"note: query/test/mbeir_oven_task6_test.jsonl: {n} cross-dataset positives (OVEN/InfoSeek, kept in " \
           "the qrels as UniIR does), not in cand_pool/local/mbeir_oven_task6_cand_pool.jsonl but in " \
           f"cand_pool/{union_dir}/mbeir_union_test_cand_pool.jsonl" in notes
    assert result.stdout.splitlines()[-1].startswith("OK")


@pytest.mark.parametrize("rel", ["query/test/mbeir_nights_task4_test.jsonl", "query/train/mbeir_webqa_train.jsonl"])
def test_repeated_qid_outside_union_train_is_a_problem(mbeir, rel):
    path = mbeir.root / rel
    rows = lines(path)
    path.write_text("\n".join(rows + rows[:1]) + "\n")
    qid = json.loads(rows[0])["qid"]
    assert check_root(mbeir.root).problems == [
        f"{rel}:{len(rows) + 1}: qid {qid} appears more than once in this file (first on line 1)"]


def test_a_line_that_is_not_utf8_is_one_problem(mbeir):
    rel = "query/test/mbeir_nights_task4_test.jsonl"
    path = mbeir.root / rel
    rows = lines(path)
    path.write_bytes(("\n".join(rows) + "\n").encode() + b'{"qid": "4:\xff"}\n')
    assert check_root(mbeir.root).problems == [f"{rel}:{len(rows) + 1}: not valid UTF-8 (byte 12 of the line); "
                                               "save the file as UTF-8"]


def test_conflicting_repeat_in_union_train_is_a_problem(mbeir):
    path = mbeir.root / "query/union_train/mbeir_union_up_train.jsonl"
    rows = [json.loads(line) for line in lines(path)]
    first_line: dict[str, int] = {}
    for lineno, row in enumerate(rows, 1):
        if row["qid"] in first_line:
            break
        first_line[row["qid"]] = lineno
    rows[lineno - 1]["query_src_content"] = json.dumps({"edited": True})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = check_root(mbeir.root)
    assert report.problems == [
        f"query/union_train/mbeir_union_up_train.jsonl:{lineno}: qid {row['qid']} repeats line "
        f"{first_line[row['qid']]} with a different record (up-sampling repeats a query unchanged)"]
    assert f"query/union_train/mbeir_union_up_train.jsonl: {mbeir.repeated_rows - 1:,} repeated qids " \
           "(up-sampling), 1 conflicting" in report.notes


def test_train_qrels_are_checked(mbeir):
    qrels = mbeir.root / "qrels/train/mbeir_oven_train_qrels.txt"
    rewrite_line(qrels, 2, lambda line: line.rsplit(" ", 1)[0])
    assert check_root(mbeir.root).problems == [
        "qrels/train/mbeir_oven_train_qrels.txt:2: expected 5 fields 'qid 0 did relevance task_id', got 4"]
    # a well-formed line that names another candidate is a disagreement with the query file
    rewrite_line(qrels, 2, lambda line: " ".join(f"{line} 6".split()[:2] + ["5:999", "1", "6"]))
    qid, _, did, _, _ = lines(qrels)[1].split()
    queries = lines(mbeir.root / "query/train/mbeir_oven_train.jsonl")
    lineno = next(i for i, row in enumerate(queries, 1) if json.loads(row)["qid"] == qid)
    old = json.loads(queries[lineno - 1])["pos_cand_list"][1]
    # 5:999 is in no pool: named at its qrels line, and not again as "only in qrels"
    assert check_root(mbeir.root).problems == [
        f"qrels/train/mbeir_oven_train_qrels.txt:2: positive 5:999 is not in the candidate pool "
        f"cand_pool/global/mbeir_union_train_cand_pool.jsonl (qid {qid}); remove the line or add the candidate to the pool",
        f"query/train/mbeir_oven_train.jsonl:{lineno}: positives of {qid} disagree with mbeir_oven_train_qrels.txt "
        f"(missing from qrels: {old})"]


def test_missing_qrels(mbeir):
    (mbeir.root / "qrels/test/mbeir_cirr_task7_test_qrels.txt").unlink()
    (mbeir.root / "qrels/val/mbeir_cirr_task7_val_qrels.txt").unlink()
    report = check_root(mbeir.root)
    assert report.problems == ["qrels/test/mbeir_cirr_task7_test_qrels.txt: missing qrels for mbeir_cirr_task7_test.jsonl"]
    assert "qrels/val/mbeir_cirr_task7_val_qrels.txt: not found (M-BEIR ships it; only evaluating on " \
           "mbeir_cirr_task7_val.jsonl needs it)" in report.notes


@pytest.mark.parametrize("edit, message", [
    (lambda line: json.dumps({**json.loads(line), "modality": "picture"}),
     "modality 'picture' is not one of 'image', 'text', 'image,text'"),
    (lambda line: line[:-3], "not valid JSON"),
])
def test_one_invalid_pool_row_gives_one_problem(mbeir, edit, message):
    pool = mbeir.root / "cand_pool/local/mbeir_nights_task4_cand_pool.jsonl"
    did = json.loads(lines(pool)[0])["did"]
    assert any(did in json.loads(q)["pos_cand_list"] for q in lines(mbeir.root / "query/test/mbeir_nights_task4_test.jsonl"))
    rewrite_line(pool, 1, edit)
    problems = check_root(mbeir.root).problems
    assert len(problems) == 1 and problems[0].startswith(f"cand_pool/local/mbeir_nights_task4_cand_pool.jsonl:1: {message}")


@pytest.mark.parametrize("edit, message", [
    (lambda line: json.dumps({**json.loads(line), "query_modality": "picture"}),
     "query_modality 'picture' is not one of 'image', 'text', 'image,text'"),
    (lambda line: line[:-3], "not valid JSON"),
])
def test_one_invalid_query_row_gives_one_problem(mbeir, edit, message):
    rewrite_line(mbeir.root / "query/test/mbeir_nights_task4_test.jsonl", 2, edit)
    problems = check_root(mbeir.root).problems
    assert len(problems) == 1 and problems[0].startswith(f"query/test/mbeir_nights_task4_test.jsonl:2: {message}")


def test_cross_dataset_positive_missing_everywhere_is_a_problem(mbeir):
    path = mbeir.root / "query/test/mbeir_infoseek_task8_test.jsonl"
    rewrite_line(path, 2, lambda line: json.dumps({**json.loads(line), "pos_cand_list": [*json.loads(line)["pos_cand_list"], "5:999"]}))
    assert "query/test/mbeir_infoseek_task8_test.jsonl:2: positive 5:999 is not in the candidate pool " \
           "cand_pool/local/mbeir_infoseek_task8_cand_pool.jsonl nor in cand_pool/global/mbeir_union_test_cand_pool.jsonl" \
           in check_root(mbeir.root).problems


def test_missing_union_pool_names_both_folders(mbeir):
    (mbeir.root / "cand_pool/global/mbeir_union_train_cand_pool.jsonl").unlink()
    assert "query/train/mbeir_cirr_train.jsonl: no candidate pool found for this query file: expected its local " \
           "pool in cand_pool/local/ or mbeir_union_train_cand_pool.jsonl in cand_pool/global/ or cand_pool/union_pool/" \
           in check_root(mbeir.root).problems


def test_without_union_test_pool_cross_dataset_positives_are_found_in_the_local_pools(mbeir):
    (mbeir.root / "cand_pool/global/mbeir_union_test_cand_pool.jsonl").unlink()
    report = check_root(mbeir.root)
    assert report.problems == []
    n = mbeir.cross_positives["query/test/mbeir_infoseek_task6_test.jsonl"]
    assert f"query/test/mbeir_infoseek_task6_test.jsonl: {n} cross-dataset positives (OVEN/InfoSeek, kept in the " \
           "qrels as UniIR does), not in cand_pool/local/mbeir_infoseek_task6_cand_pool.jsonl but in the local pools" \
           in report.notes


def test_qrels_of_the_union_train_file_are_checked_when_present(mbeir):
    rows = [json.loads(line) for line in lines(mbeir.root / "query/union_train/mbeir_union_up_train.jsonl")]
    unique = {row["qid"]: row for row in rows}.values()
    qrels = mbeir.root / "qrels/train/mbeir_union_up_train_qrels.txt"
    qrels.write_text("".join(f"{q['qid']} 0 {did} 1 {q['task_id']}\n" for q in unique for did in q["pos_cand_list"]))
    assert check_root(mbeir.root).problems == []
    rewrite_line(qrels, 1, lambda line: line.replace(" 1 ", " x "))
    problems = check_root(mbeir.root).problems
    assert len(problems) == 1 and problems[0].startswith("qrels/train/mbeir_union_up_train_qrels.txt:1: relevance 'x' "
                                                         "and task_id")


def test_layout_positives_are_in_their_local_and_union_pools(mbeir):
    def pool(rel: str) -> dict[str, str]:
        return {c["did"]: c["modality"] for c in map(json.loads, lines(mbeir.root / rel))}

    for split in ("val", "test"):
        union = pool(f"cand_pool/global/mbeir_union_{split}_cand_pool.jsonl")
        files = sorted((mbeir.root / "query" / split).glob("*.jsonl"))
        assert len(files) == 16
        for path in files:
            stem = path.name.removesuffix(f"_{split}.jsonl")
            local_name = f"{stem}_{split}_cand_pool.jsonl" if stem.startswith("mbeir_mscoco") else f"{stem}_cand_pool.jsonl"
            local = pool(f"cand_pool/local/{local_name}")
            for q in map(json.loads, lines(path)):
                target = TASKS[q["task_id"]][1]
                own = [did for did in q["pos_cand_list"] if did.split(":")[0] == q["qid"].split(":")[0]]
                assert own and all(local[did] == target for did in own)
                assert all(union[did] == target for did in q["pos_cand_list"])


def test_images_are_decoded_so_truncated_and_corrupt_files_are_named(mbeir):
    rel = "query/test/mbeir_nights_task4_test.jsonl"
    rows = [json.loads(line) for line in lines(mbeir.root / rel)]
    truncated, corrupt = rows[0]["query_img_path"], rows[1]["query_img_path"]
    data = (mbeir.root / truncated).read_bytes()
    (mbeir.root / truncated).write_bytes(data[: len(data) // 2])
    (mbeir.root / corrupt).write_bytes(b"not an image at all")
    problems = check_root(mbeir.root).problems
    assert len(problems) == 2, problems
    # PIL's own words for the two differ by version; the file:line, the image and what to do do not.
    for problem, lineno, image in zip(problems, (1, 2), (truncated, corrupt)):
        assert problem.startswith(f"{rel}:{lineno}: image {image} cannot be decoded (")
        assert problem.endswith("); replace it with a complete image file")
    assert check_root(mbeir.root, decode_images=False).problems == []  # --no-decode: existence only


def test_a_test_file_named_outside_the_mbeir_pattern_is_told_the_pattern(mbeir):
    """'Nights' is not a dataset name M-BEIR's file names allow, so the file's local pool cannot be
    found by name; the problem says how both are named."""
    for rel in ("query/test/mbeir_nights_task4_test.jsonl", "cand_pool/local/mbeir_nights_task4_cand_pool.jsonl"):
        (mbeir.root / rel).rename(mbeir.root / rel.replace("nights", "Nights"))
    for union in mbeir.root.glob("cand_pool/*/mbeir_union_test_cand_pool.jsonl"):
        union.unlink()  # else the renamed file is answered from the universal pool
    problems = [p for p in check_root(mbeir.root).problems if "mbeir_Nights_task4_test.jsonl: no candidate pool" in p]
    assert len(problems) == 1 and problems[0].endswith(
        "; a test file is named mbeir_<dataset>_task<k>_test.jsonl, <dataset> in lowercase letters and digits only, "
        "and its local pool mbeir_<dataset>_task<k>_cand_pool.jsonl: rename both")


def test_a_float_image_is_named_as_extraction_would_refuse_it(mbeir):
    from PIL import Image

    rel = "query/test/mbeir_nights_task4_test.jsonl"
    image = json.loads(lines(mbeir.root / rel)[0])["query_img_path"]
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(mbeir.root / image, format="TIFF")  # decodes: mode F
    assert check_root(mbeir.root).problems == [
        f"{rel}:1: image {image}: a float image (Pillow mode F), whose pixel range is unknown; convert it to an "
        "8-bit image (e.g. PNG or JPEG)"]


def test_empty_files_and_repeated_dids_are_named(mbeir):
    (mbeir.root / "query/test/mbeir_cirr_task7_test.jsonl").write_text("")
    (mbeir.root / "qrels/test/mbeir_cirr_task7_test_qrels.txt").write_text("\n")
    pool = mbeir.root / "cand_pool/local/mbeir_nights_task4_cand_pool.jsonl"
    rows = lines(pool)
    pool.write_text("\n".join(rows + [json.dumps({**json.loads(rows[1]), "src_content": None})]) + "\n")
    did = json.loads(rows[1])["did"]
    assert check_root(mbeir.root).problems == [
        f"cand_pool/local/mbeir_nights_task4_cand_pool.jsonl:{len(rows) + 1}: did {did} appears more than once in "
        "this pool (first on line 2)",
        "query/test/mbeir_cirr_task7_test.jsonl: empty file (no records); check that it was downloaded or written completely",
        "qrels/test/mbeir_cirr_task7_test_qrels.txt: empty file (no records); check that it was downloaded or written "
        "completely"]


def test_cli_mistakes_are_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    from genius.common.check_data import main

    monkeypatch.setenv("GENIUS_DEBUG", "0")  # --debug sets it; restored after the test
    with pytest.raises(SystemExit) as exited:
        main(["--root", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"genius check-data: error: {tmp_path / 'nowhere'}: not a directory; --root takes")
    with pytest.raises(SystemExit) as exited:
        main(["--root", str(tmp_path), "--max-problems", "-3"])
    assert exited.value.code == 2 and "--max-problems: -3 is negative" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a directory"):  # --debug shows the traceback instead
        main(["--root", str(tmp_path / "nowhere"), "--debug"])


def test_a_record_holding_what_its_modality_does_not_declare_is_a_problem(mbeir):
    pool = mbeir.root / "cand_pool/local/mbeir_nights_task4_cand_pool.jsonl"  # images
    rewrite_line(pool, 3, lambda line: json.dumps({**json.loads(line), "txt": "a caption nobody declared"}))
    queries = mbeir.root / "query/test/mbeir_webqa_task1_test.jsonl"  # text -> text
    rewrite_line(queries, 1, lambda line: json.dumps({**json.loads(line), "query_img_path": "mbeir_images/x.jpg"}))
    assert check_root(mbeir.root).problems == [
        "cand_pool/local/mbeir_nights_task4_cand_pool.jsonl:3: modality is 'image' but the record holds text (txt); "
        "set modality to 'image,text' or make txt null",
        "query/test/mbeir_webqa_task1_test.jsonl:1: query_modality is 'text' but the record holds an image "
        "(query_img_path); set query_modality to 'image,text' or make query_img_path null"]


def test_a_union_candidate_in_no_local_pool_is_named_with_its_line(mbeir):
    """genius extract assembles the union test pool from the local pools' stores; check-data said
    OK to a root that extract then refused."""
    union = mbeir.root / "cand_pool/global/mbeir_union_test_cand_pool.jsonl"
    rows = lines(union)
    extra = json.loads(rows[0])
    extra["did"] = "1:987654"
    union.write_text("\n".join(rows + [json.dumps(extra)]) + "\n")
    assert check_root(mbeir.root).problems == [
        f"cand_pool/global/mbeir_union_test_cand_pool.jsonl:{len(rows) + 1}: did 1:987654 is in no local pool of "
        "cand_pool/local/ (genius extract builds this pool from them): add its local pool or remove the record "
        "(1 of its candidates are so)"]


def test_an_instructions_path_that_is_a_folder_is_a_problem(mbeir):
    tsv = mbeir.root / "instructions/query_instructions.tsv"
    tsv.unlink()
    tsv.mkdir()
    assert check_root(mbeir.root).problems == [
        "instructions/query_instructions.tsv: is a folder (or not a regular file), not the instructions file; "
        "replace it with the tab-separated instructions file or remove it"]


def test_qrels_lines_that_disagree_with_their_query_file_are_named_with_their_line(mbeir):
    rel = "qrels/test/mbeir_nights_task4_test_qrels.txt"
    qrels = mbeir.root / rel
    rows = lines(qrels)
    qid, _, did, _, _ = rows[0].split()
    qrels.write_text("\n".join(rows + [f"4:98765 0 {did} 1 4"]) + "\n")
    assert f"{rel}:{len(rows) + 1}: qid 4:98765 is not in mbeir_nights_task4_test.jsonl; delete the line or add " \
           "the query" in check_root(mbeir.root).problems


def test_a_qrels_pair_repeated_with_another_relevance_is_named_at_its_line(mbeir):
    """Read with another grade, a repeated (qid, did) would count as relevant for the hit rate and
    for graded measures differently; repeated alike it is harmless and not reported."""
    rel = "qrels/test/mbeir_nights_task4_test_qrels.txt"
    qrels = mbeir.root / rel
    rows = lines(qrels)
    qid, _, did, grade, task = rows[0].split()
    qrels.write_text("\n".join(rows + [rows[0], f"{qid} 0 {did} 0 {task}"]) + "\n")
    problems = [p for p in check_root(mbeir.root).problems if p.startswith(f"{rel}:")]
    assert problems == [f"{rel}:{len(rows) + 2}: qid {qid}, did {did}: relevance 0 here but {grade} on line 1; "
                        "keep one line per (qid, did)"]
