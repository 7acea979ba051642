"""genius import-images: class-per-folder collections as M-BEIR-layout roots that check-data accepts
and new-setting finds, class-level positives with the query's own image excluded, IRGen's official
image split, training images alone in their class kept in the pool with one warning, one-line errors
for bad collections and list files; the synthetic class images are learnable but not trivial; the
real digits."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genius import cli
from genius.common.check_data import check_root
from genius.common.image_collections import import_images, write_sklearn_digits
from genius.scaffold import inspect_root
from genius.synthetic.class_images import write_class_images

STEM = "mbeir_shapes_task4"


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    return write_class_images(tmp_path_factory.mktemp("images") / "shapes", num_classes=4, per_class=6, size=16)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def label(record: dict, key: str = "query_img_path") -> str:
    return record[key].split("/")[-2]


def read_root(root: Path) -> dict:
    pools = {"train": records(root / "cand_pool/global/mbeir_union_train_cand_pool.jsonl"),
             "test": records(root / f"cand_pool/local/{STEM}_cand_pool.jsonl")}
    qrels: dict[str, set[str]] = {}
    for line in (root / f"qrels/test/{STEM}_test_qrels.txt").read_text().splitlines():
        qid, zero, did, rel, task = line.split()
        assert (zero, rel, task) == ("0", "1", "4")
        qrels.setdefault(qid, set()).add(did)
    return {"train": records(root / f"query/train/{STEM}_train.jsonl"),
            "test": records(root / f"query/test/{STEM}_test.jsonl"),
            "pools": pools, "qrels": qrels, "summary": json.loads((root / "import.json").read_text())}


def assert_class_level(queries: list[dict], pool: list[dict]) -> None:
    """Positives = every pool image of the query's class but its own, which is excluded when pooled."""
    did_of_image = {c["img_path"]: c["did"] for c in pool}
    for q in queries:
        own = did_of_image.get(q["query_img_path"])
        assert q["exclude_cand_list"] == ([own] if own else [])
        expected = {c["did"] for c in pool if label(c, "img_path") == label(q)} - {own}
        assert set(q["pos_cand_list"]) == expected and len(q["pos_cand_list"]) == len(expected)
        assert q["task_id"] == 4 and q["query_modality"] == "image" and q["query_txt"] is None


def assert_valid_root(root: Path) -> None:
    report = check_root(root)
    assert report.problems == [] and report.files_checked >= 5
    plan = inspect_root(root)
    assert [p.name for p in plan.train_queries] == [f"{STEM}_train.jsonl"]
    assert [(t.queries.name, t.pool.name, t.qrels.name) for t in plan.tests] == [
        (f"{STEM}_test.jsonl", f"{STEM}_cand_pool.jsonl", f"{STEM}_test_qrels.txt")]


def test_holdout_queries_search_the_database_that_is_also_the_training_data(collection, tmp_path):
    root = tmp_path / "root"
    import_images(collection, root, "shapes", "holdout", query_fraction=0.34, seed=3)
    got = read_root(root)
    assert Counter(label(q) for q in got["test"]) == {name: 2 for name in ("00_circle", "01_triangle", "02_square", "03_star")}
    assert got["pools"]["train"] == got["pools"]["test"] and len(got["pools"]["test"]) == 16
    test_images = {q["query_img_path"] for q in got["test"]}
    assert not test_images & {c["img_path"] for c in got["pools"]["test"]}  # held out of the database
    assert {q["query_img_path"] for q in got["train"]} == {c["img_path"] for c in got["pools"]["train"]}
    assert_class_level(got["test"], got["pools"]["test"])
    assert_class_level(got["train"], got["pools"]["train"])
    assert all(len(q["exclude_cand_list"]) == 1 and len(q["pos_cand_list"]) == 3 for q in got["train"])
    assert got["qrels"] == {q["qid"]: set(q["pos_cand_list"]) for q in got["test"]}
    qids = [q["qid"] for q in got["test"] + got["train"]]
    assert len(set(qids)) == len(qids) and all(qid.startswith("30:") for qid in qids)
    assert got["summary"]["counts"] == {"train_images": 16, "training_queries": 16, "test_pool": 16,
                                        "test_queries": 8, "images_copied": 24}
    assert len(list((root / "mbeir_images/shapes").glob("*/*.png"))) == 24
    assert_valid_root(root)


def test_holdout_is_deterministic_for_a_seed_and_changes_with_it(collection, tmp_path):
    def texts(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        import_images(collection, tmp_path / name, "shapes", "holdout", seed=seed)
    assert texts(tmp_path / "a") == texts(tmp_path / "b")
    test = f"query/test/{STEM}_test.jsonl"
    assert (tmp_path / "a" / test).read_text() != (tmp_path / "c" / test).read_text()


def test_classes_half_tests_the_unseen_classes_against_themselves(collection, tmp_path):
    root = tmp_path / "root"
    import_images(collection, root, "shapes", "classes-half")
    got = read_root(root)
    assert {label(c, "img_path") for c in got["pools"]["train"]} == {"00_circle", "01_triangle"}
    assert {label(q) for q in got["test"]} == {"02_square", "03_star"}
    assert [q["query_img_path"] for q in got["test"]] == [c["img_path"] for c in got["pools"]["test"]]
    assert_class_level(got["test"], got["pools"]["test"])
    assert_class_level(got["train"], got["pools"]["train"])
    assert all(len(q["exclude_cand_list"]) == 1 and len(q["pos_cand_list"]) == 5 for q in got["test"])
    assert got["summary"]["classes"] == {"train": ["00_circle", "01_triangle"], "test": ["02_square", "03_star"]}
    assert_valid_root(root)


def write_split_list(path: Path, collection: Path) -> dict[str, str]:
    """IRGen's image-level split in miniature: per class the first four images train, the last two
    test; returns image path -> status."""
    split = {f"{p.parent.name}/{p.name}": "train" if n < 4 else "test"
             for folder in sorted(collection.iterdir()) for n, p in enumerate(sorted(folder.glob("*.png")))}
    lines = [""]
    lines += [f"{rel}\t{status}" if n % 2 else f"{rel} {status}" for n, (rel, status) in enumerate(split.items())]
    path.write_text("\n".join(lines) + "\n")
    return split


def test_image_split_queries_the_official_test_images_against_the_train_images(collection, tmp_path):
    split = write_split_list(tmp_path / "split.txt", collection)
    root = tmp_path / "root"
    import_images(collection, root, "shapes", "image-split", list_file=tmp_path / "split.txt")
    got = read_root(root)
    image = {status: sorted(f"mbeir_images/shapes/{rel}" for rel, s in split.items() if s == status)
             for status in ("train", "test")}
    assert sorted(c["img_path"] for c in got["pools"]["test"]) == image["train"]
    assert got["pools"]["train"] == got["pools"]["test"]
    assert sorted(q["query_img_path"] for q in got["test"]) == image["test"]
    assert sorted(q["query_img_path"] for q in got["train"]) == image["train"]
    did_of_image = {c["img_path"]: c["did"] for c in got["pools"]["test"]}
    for q in got["test"]:  # every database image of the class, nothing to exclude
        assert q["exclude_cand_list"] == []
        assert set(q["pos_cand_list"]) == {did_of_image[p] for p in image["train"] if p.split("/")[-2] == label(q)}
        assert len(q["pos_cand_list"]) == 4 and got["qrels"][q["qid"]] == set(q["pos_cand_list"])
    for q in got["train"]:  # the other database images of the class, itself excluded
        own = did_of_image[q["query_img_path"]]
        assert q["exclude_cand_list"] == [own]
        assert set(q["pos_cand_list"]) == {did_of_image[p] for p in image["train"]
                                           if p.split("/")[-2] == label(q)} - {own}
        assert len(q["pos_cand_list"]) == 3
    assert got["qrels"].keys() == {q["qid"] for q in got["test"]}
    assert got["summary"]["counts"] == {"train_images": 16, "training_queries": 16, "test_pool": 16,
                                        "test_queries": 8, "images_copied": 24}
    assert_valid_root(root)


@pytest.mark.parametrize("protocol", ["holdout", "classes-half", "image-split"])
def test_a_training_image_alone_in_its_class_stays_in_the_pool_with_one_warning(collection, tmp_path, caplog,
                                                                                  protocol):
    images = tmp_path / "images"
    shutil.copytree(collection, images)
    # holdout keeps one of two images in the database; classes-half trains on the first classes by name
    lonely_class = "00_circle"
    keep = 2 if protocol == "holdout" else 1
    for path in sorted((images / lonely_class).iterdir())[keep:]:
        path.unlink()
    list_file = None
    if protocol == "image-split":
        list_file = tmp_path / "split.txt"
        split = write_split_list(list_file, images)
        assert split[f"{lonely_class}/000.png"] == "train"
    with caplog.at_level(logging.WARNING, logger="genius.common.image_collections"):
        summary = import_images(images, tmp_path / "root", "shapes", protocol, list_file=list_file)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("1 training image(s) are the only image of their class")
    assert f"class '{lonely_class}'" in warnings[0]
    got = read_root(tmp_path / "root")
    lonely = [c["img_path"] for c in got["pools"]["train"] if label(c, "img_path") == lonely_class]
    assert len(lonely) == 1 and lonely[0] not in {q["query_img_path"] for q in got["train"]}
    assert summary["counts"]["training_queries"] == summary["counts"]["train_images"] - 1 == len(got["train"])
    assert_class_level(got["train"], got["pools"]["train"])
    assert_class_level(got["test"], got["pools"]["test"])
    qids = [q["qid"] for q in got["test"] + got["train"]]
    assert qids == [f"30:{n}" for n in range(len(qids))]
    assert_valid_root(tmp_path / "root")


def write_inshop(base: Path, collection: Path) -> Path:
    """A miniature In-shop: 3 items with train images, 3 with query and gallery images."""
    sources = sorted(collection.glob("*/*.png"))
    lines = []
    for n, (item, status) in enumerate([(i, s) for i in range(3) for s in ("train",) * 3]
                                       + [(i, s) for i in range(3, 6) for s in ("query", "gallery", "gallery")]):
        rel = f"img/MEN/Tees/id_{item:08d}/{n:02d}_front.png"
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources[n], base / rel)
        lines.append(f"{rel}    id_{item:08d} {status}")
    (base / "list_eval_partition.txt").write_text(f"{len(lines)}\nimage_name item_id evaluation_status\n"
                                                   + "\n".join(lines) + "\n")
    return base / "list_eval_partition.txt"


def test_inshop_queries_search_the_gallery_by_item(collection, tmp_path):
    list_file = write_inshop(tmp_path / "inshop", collection)
    root = tmp_path / "root"
    import_images(tmp_path / "inshop", root, "shapes", "inshop", list_file=list_file)
    got = read_root(root)
    assert len(got["test"]) == 3 and len(got["pools"]["test"]) == 6 and len(got["train"]) == 9
    assert_class_level(got["test"], got["pools"]["test"])
    assert_class_level(got["train"], got["pools"]["train"])
    assert all(q["exclude_cand_list"] == [] and len(q["pos_cand_list"]) == 2 for q in got["test"])
    assert all(len(q["pos_cand_list"]) == 2 for q in got["train"])
    assert got["summary"]["classes"]["test"] == ["id_00000003", "id_00000004", "id_00000005"]
    assert_valid_root(root)


def test_dotfiles_are_ignored_and_force_replaces_only_an_imported_root(collection, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(collection, images)
    (images / "00_circle" / ".DS_Store").write_bytes(b"\0junk")
    (images / ".cache").mkdir()
    root = tmp_path / "root"
    import_images(images, root, "shapes", "holdout")
    with pytest.raises(FileExistsError, match="--force"):
        import_images(images, root, "shapes", "holdout")
    import_images(images, root, "shapes", "classes-half", force=True)
    assert read_root(root)["summary"]["protocol"] == "classes-half"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not written by genius import-images"):
        import_images(images, tmp_path / "mine", "shapes", "holdout", force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---- bad input: one line naming the file, exit status 2, nothing written -------------------------
def _corrupt(images: Path) -> str:
    path = images / "01_triangle" / "002.png"
    path.write_bytes(path.read_bytes()[:60])  # a truncated PNG: the header opens, the pixels do not
    return "01_triangle/002.png: cannot be decoded"


def _not_an_image(images: Path) -> str:
    (images / "02_square" / "notes.txt").write_text("hello")
    return "02_square/notes.txt: not an image file (accepted: .bmp"


def _empty_class(images: Path) -> str:
    (images / "04_empty").mkdir()
    return "04_empty: empty class folder"


def _one_class(images: Path) -> str:
    for folder in ("01_triangle", "02_square", "03_star"):
        shutil.rmtree(images / folder)
    return "1 class folder(s)"


def _too_few_for_holdout(images: Path) -> str:
    for path in sorted((images / "03_star").iterdir())[1:]:
        path.unlink()
    return "03_star: class '03_star' has 1 image(s)"


def _single_image_class(images: Path) -> str:
    for path in sorted((images / "03_star").iterdir())[1:]:
        path.unlink()
    return "03_star/000.png: no other image of class '03_star'"


def _stray_file(images: Path) -> str:
    (images / "README.txt").write_text("about")
    return "README.txt: a file where class folders are expected"


BAD_FOLDERS = [(_corrupt, "holdout"), (_not_an_image, "holdout"), (_empty_class, "holdout"), (_one_class, "holdout"),
               (_too_few_for_holdout, "holdout"), (_single_image_class, "classes-half"), (_stray_file, "holdout")]


def run_import(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["import-images", *args])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("genius import-images: error: "), stderr
    return lines[0]


@pytest.mark.parametrize("spoil, protocol", BAD_FOLDERS, ids=[f.__name__.strip("_") for f, _ in BAD_FOLDERS])
def test_a_bad_collection_is_one_line_naming_the_file(collection, tmp_path, capsys, monkeypatch, spoil, protocol):
    monkeypatch.delenv("GENIUS_DEBUG", raising=False)
    images = tmp_path / "images"
    shutil.copytree(collection, images)
    expected = spoil(images)
    line = run_import(capsys, "--images", str(images), "--out", str(tmp_path / "root"), "--name", "shapes",
                      "--protocol", protocol)
    assert expected in line
    assert not (tmp_path / "root").exists() and [p.name for p in tmp_path.iterdir()] == ["images"]


@pytest.mark.parametrize("edit, expected", [
    (lambda lines: lines[:4] + lines[5:], "list_eval_partition.txt:1: declares 18 images but lists 17"),
    (lambda lines: lines[:3] + ["img/MEN/Tees/missing.png id_00000000 train"] + lines[4:],
     "list_eval_partition.txt:4: image img/MEN/Tees/missing.png does not exist"),
    (lambda lines: lines[:5] + [lines[5].replace(" train", " validation")] + lines[6:],
     "list_eval_partition.txt:6: expected 'image_name item_id evaluation_status'"),
    (lambda lines: lines[:3] + [lines[3].rsplit(" ", 1)[0]] + lines[4:],
     "list_eval_partition.txt:4: expected 'image_name item_id evaluation_status'"),
], ids=["count", "missing-image", "bad-status", "two-fields"])
def test_a_bad_inshop_list_is_one_line_naming_file_and_line(collection, tmp_path, capsys, monkeypatch, edit, expected):
    monkeypatch.delenv("GENIUS_DEBUG", raising=False)
    list_file = write_inshop(tmp_path / "inshop", collection)
    list_file.write_text("\n".join(edit(list_file.read_text().splitlines())) + "\n")
    line = run_import(capsys, "--images", str(tmp_path / "inshop"), "--out", str(tmp_path / "root"), "--name",
                      "shapes", "--protocol", "inshop", "--list-file", str(list_file))
    assert expected in line


@pytest.mark.parametrize("edit, expected", [
    (lambda lines: lines[:4] + lines[5:],
     "split.txt: 1 image(s) under --images are not listed, the first 00_circle/003.png"),
    (lambda lines: lines[:2] + [lines[2].replace("train", "validation")] + lines[3:],
     "split.txt:3: expected '<image path> <train|test>', got '00_circle/001.png\\tvalidation'"),
    (lambda lines: lines[:2] + ["00_circle/001.png"] + lines[3:], "split.txt:3: expected '<image path> <train|test>'"),
    (lambda lines: lines + [lines[1]], "split.txt:26: image 00_circle/000.png is listed again (first on line 2)"),
    (lambda lines: lines + ["00_circle/missing.png train"],
     "split.txt:26: image 00_circle/missing.png is not an image"),
    (lambda lines: [line.replace("test", "train") for line in lines], "split.txt: no image has status 'test'"),
    (lambda lines: [line.replace("train", "test") if line.startswith("03_star") else line for line in lines],
     "03_star/000.png: no other image of class '03_star' in the test pool"),
], ids=["unlisted", "bad-status", "one-field", "duplicate", "missing-image", "no-test", "test-class-not-in-database"])
def test_a_bad_split_list_is_one_line_naming_file_and_line(collection, tmp_path, capsys, monkeypatch, edit, expected):
    monkeypatch.delenv("GENIUS_DEBUG", raising=False)
    list_file = tmp_path / "split.txt"
    write_split_list(list_file, collection)
    list_file.write_text("\n".join(edit(list_file.read_text().splitlines())) + "\n")
    line = run_import(capsys, "--images", str(collection), "--out", str(tmp_path / "root"), "--name", "shapes",
                      "--protocol", "image-split", "--list-file", str(list_file))
    assert expected in line
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("where", ["up", "dot", "absolute"])
@pytest.mark.parametrize("protocol", ["inshop", "image-split"])
def test_a_list_line_cannot_name_an_image_outside_images(collection, tmp_path, capsys, monkeypatch, protocol, where):
    monkeypatch.delenv("GENIUS_DEBUG", raising=False)
    outside = tmp_path / "outside" / "x.png"
    outside.parent.mkdir()
    shutil.copyfile(collection / "00_circle" / "000.png", outside)
    if protocol == "inshop":
        images, list_file, lineno, rest = tmp_path / "inshop", write_inshop(tmp_path / "inshop", collection), 3, \
            "id_00000000 train"
    else:
        images, list_file, lineno, rest = tmp_path / "images", tmp_path / "split.txt", 2, "train"
        shutil.copytree(collection, images)
        write_split_list(list_file, images)
    lines = list_file.read_text().splitlines()
    rel = {"up": "../outside/x.png", "dot": f"./{lines[lineno - 1].split()[0]}", "absolute": str(outside)}[where]
    lines[lineno - 1] = f"{rel} {rest}"
    list_file.write_text("\n".join(lines) + "\n")
    before = sorted(tmp_path.rglob("*"))
    line = run_import(capsys, "--images", str(images), "--out", str(tmp_path / "root"), "--name", "shapes",
                      "--protocol", protocol, "--list-file", str(list_file))
    assert f"{list_file.name}:{lineno}: image path {rel!r} must be relative and lie under --images" in line
    assert sorted(tmp_path.rglob("*")) == before  # nothing copied, inside --out or out of it


def _no_training_query(protocol: str, images: Path, tmp_path: Path) -> Path | None:
    """Spoil a collection so that no training image has another of its class; returns the list file."""
    if protocol == "inshop":
        list_file = write_inshop(tmp_path / "inshop", images)
        lines = list_file.read_text().splitlines()
        lines = [f"{line.split()[0]} id_train{n} train" if line.endswith(" train") else line
                 for n, line in enumerate(lines)]  # every train image its own item
        list_file.write_text("\n".join(lines) + "\n")
        return list_file
    for n, folder in enumerate(sorted(p for p in images.iterdir() if p.is_dir())):
        # holdout: two images make one test query and one database image; classes-half trains on the first half
        keep = {"holdout": 2, "classes-half": 1 if n < 2 else 6}.get(protocol, 6)
        for path in sorted(folder.iterdir())[keep:]:
            path.unlink()
    if protocol != "image-split":
        return None
    list_file = tmp_path / "split.txt"
    list_file.write_text("".join(f"{p.parent.name}/{p.name} {'train' if p.name == '000.png' else 'test'}\n"
                                 for p in sorted(images.glob("*/*.png"))))
    return list_file


@pytest.mark.parametrize("protocol, fix", [
    ("holdout", "give classes three or more images"),
    ("classes-half", "give the classes of the first half (by name) two or more images"),
    ("image-split", "mark two or more images of a class as train in --list-file"),
    ("inshop", "give items two or more train images in --list-file"),
])
def test_a_root_without_training_queries_is_refused(collection, tmp_path, capsys, monkeypatch, protocol, fix):
    monkeypatch.delenv("GENIUS_DEBUG", raising=False)
    images = tmp_path / "images"
    shutil.copytree(collection, images)
    list_file = _no_training_query(protocol, images, tmp_path)
    args = ["--list-file", str(list_file)] if list_file else []
    line = run_import(capsys, "--images", str(tmp_path / "inshop" if protocol == "inshop" else images), "--out",
                      str(tmp_path / "root"), "--name", "shapes", "--protocol", protocol, *args)
    assert f"{list_file or images}: no training query: none of the " in line and fix in line
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("kind", ["folder", "file"])
@pytest.mark.parametrize("protocol", ["holdout", "classes-half", "image-split"])
def test_a_name_that_is_not_utf8_is_refused_before_writing(collection, tmp_path, capsys, monkeypatch, protocol,
                                                             kind):
    monkeypatch.delenv("GENIUS_DEBUG", raising=False)
    images = tmp_path / "images"
    shutil.copytree(collection, images)
    if kind == "folder":  # the last class by name: classes-half tests on it
        bad = os.fsencode(images) + b"/bad\xff"
        os.mkdir(bad)
        for n in range(3):
            shutil.copyfile(collection / "00_circle" / f"00{n}.png", bad + f"/{n}.png".encode())
        expected = "images/bad\\xff: the folder name is not valid UTF-8; rename the folder"
    else:
        shutil.copyfile(collection / "00_circle" / "000.png", os.fsencode(images) + b"/03_star/\xfe.png")
        expected = "images/03_star/\\xfe.png: the file name is not valid UTF-8; rename the file"
    args = []
    if protocol == "image-split":
        write_split_list(tmp_path / "split.txt", collection)
        args = ["--list-file", str(tmp_path / "split.txt")]
    line = run_import(capsys, "--images", str(images), "--out", str(tmp_path / "root"), "--name", "shapes",
                      "--protocol", protocol, *args)
    assert expected in line
    assert not (tmp_path / "root").exists()


def test_the_dataset_id_is_range_checked_as_check_data_does(collection, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GENIUS_DEBUG", raising=False)
    largest = 922_337_203_684  # (2**63 - 1 - 10**7 + 1) // 10**7: every did '<id>:<index>' hashes into 64 bits
    import_images(collection, tmp_path / "root", "shapes", "classes-half", dataset_id=largest)
    assert_valid_root(tmp_path / "root")
    line = run_import(capsys, "--images", str(collection), "--out", str(tmp_path / "too_large"), "--name", "shapes",
                      "--protocol", "classes-half", "--dataset-id", str(largest + 1))
    assert f"--dataset-id: {largest + 1} is out of range" in line and f"must be <= {largest}" in line
    assert not (tmp_path / "too_large").exists()


@pytest.mark.parametrize("protocol", ["inshop", "image-split"])
def test_a_byte_order_mark_at_the_start_of_a_list_file_is_ignored(collection, tmp_path, protocol):
    if protocol == "inshop":
        images, list_file = tmp_path / "inshop", write_inshop(tmp_path / "inshop", collection)
    else:
        images, list_file = collection, tmp_path / "split.txt"
        write_split_list(list_file, collection)
    # as Windows Notepad saves it: the mark, then the count (inshop) or the first image path
    list_file.write_text(list_file.read_text().lstrip("\n"), encoding="utf-8-sig")
    assert list_file.read_bytes().startswith(b"\xef\xbb\xbf")
    summary = import_images(images, tmp_path / "root", "shapes", protocol, list_file=list_file)
    assert summary["counts"]["images_copied"] == 18 if protocol == "inshop" else 24
    assert_valid_root(tmp_path / "root")


def test_image_split_lists_a_class_folder_named_with_a_hash(collection, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GENIUS_DEBUG", raising=False)
    images = tmp_path / "images"
    shutil.copytree(collection, images)
    (images / "03_star").rename(images / "#3")
    list_file = tmp_path / "split.txt"
    write_split_list(list_file, images)
    summary = import_images(images, tmp_path / "root", "shapes", "image-split", list_file=list_file)
    assert "#3" in summary["classes"]["test"] and summary["counts"]["test_queries"] == 8
    # so there are no comment lines: a note is a malformed line, not silently skipped
    list_file.write_text("# made from images.txt\n" + list_file.read_text())
    line = run_import(capsys, "--images", str(images), "--out", str(tmp_path / "root2"), "--name", "shapes",
                      "--protocol", "image-split", "--list-file", str(list_file))
    assert "split.txt:1: expected '<image path> <train|test>', got '# made from images.txt'" in line


def test_16_bit_images_are_scaled_to_8_bits(tmp_path):
    from genius.common.image_collections import CollectionError, to_rgb

    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode == "I;16"
        rgb = np.asarray(to_rgb(image, tmp_path / "deep.png"))  # Pillow's convert("RGB") gives 255 from 1 on
    assert rgb.shape == (16, 16, 3) and all(np.array_equal(rgb[..., c], grey) for c in range(3))
    # Pillow's 32-bit integer mode, as some formats hold 16-bit values, and 32-bit values it cannot scale
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(grey.astype(np.int32) * 257), "i.tif"))[..., 0], grey)
    with pytest.raises(CollectionError, match=r"^i\.tif: 32-bit integer pixels outside the 16-bit range"):
        to_rgb(Image.fromarray(np.full((2, 2), 70000, np.int32)), "i.tif")


def test_a_float_image_is_refused_naming_file_and_mode(collection, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GENIUS_DEBUG", raising=False)
    images = tmp_path / "images"
    shutil.copytree(collection, images)
    Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)).save(images / "02_square" / "9.tif")
    for path in sorted((images / "03_star").iterdir()):  # 16-bit images import
        with Image.open(path) as image:
            Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257).save(path)
    line = run_import(capsys, "--images", str(images), "--out", str(tmp_path / "root"), "--name", "shapes",
                      "--protocol", "holdout")
    assert "images/02_square/9.tif: a float image (Pillow mode F)" in line and "convert it to an 8-bit image" in line
    (images / "02_square" / "9.tif").unlink()
    assert import_images(images, tmp_path / "root", "shapes", "holdout")["counts"]["images_copied"] == 24


def test_the_command_line_exits_2_with_one_line(collection, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(collection, images)
    _corrupt(images)
    env = {k: v for k, v in os.environ.items() if k != "GENIUS_DEBUG"}
    result = subprocess.run([sys.executable, "-m", "genius.cli", "import-images", "--images", str(images), "--out",
                             str(tmp_path / "root"), "--name", "shapes", "--protocol", "holdout"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "01_triangle/002.png: cannot be decoded" in result.stderr


# ---- the collections -----------------------------------------------------------------------------
def test_synthetic_classes_are_learnable_but_not_trivial_for_raw_pixels(tmp_path):
    out = write_class_images(tmp_path / "a", num_classes=8, per_class=20, size=32, seed=0)
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 8 and all(len(list(f.glob("*.png"))) == 20 for f in folders)
    pixels = np.stack([np.asarray(Image.open(p), dtype=np.float32).ravel() for f in folders
                       for p in sorted(f.glob("*.png"))])
    labels = np.repeat(np.arange(8), 20)
    distance = ((pixels[:, None] - pixels[None]) ** 2).sum(-1)
    np.fill_diagonal(distance, np.inf)
    accuracy = (labels[distance.argmin(1)] == labels).mean()
    assert 2.5 / 8 < accuracy < 0.75, accuracy  # chance is 1/8
    again = write_class_images(tmp_path / "b", num_classes=8, per_class=20, size=32, seed=0)
    assert all((again / p.relative_to(out)).read_bytes() == p.read_bytes() for p in out.rglob("*.png"))


def test_the_sklearn_digits_become_a_class_per_folder_collection(tmp_path):
    digits = write_sklearn_digits(tmp_path / "digits")
    files = sorted(digits.glob("*/*.png"))
    assert len(files) == 1797 and sorted({p.parent.name for p in files}) == [str(d) for d in range(10)]
    with Image.open(digits / "0" / "0000.png") as image:
        assert image.mode == "RGB" and image.size == (32, 32)
        grey = np.asarray(image)[..., 0]
    from sklearn.datasets import load_digits

    assert np.array_equal(grey[::4, ::4], np.round(load_digits().images[0] * 255 / 16).astype(np.uint8))
    summary = import_images(digits, tmp_path / "root", "digits", "holdout")
    assert summary["counts"]["test_queries"] + summary["counts"]["train_images"] == 1797
    assert summary["classes"]["test"] == [str(d) for d in range(10)]
