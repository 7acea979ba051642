from __future__ import annotations

import json
import random

import numpy as np
import pytest

from genius.common.mbeir import (
    MBEIR_DATASET_IDS, MBEIR_EVAL_TASKS, DataFormatError, Instructions, MODALITY_CODE, TASKS, format_string,
    hash_did, hash_qid, iter_candidates, iter_queries, load_pool_index, load_qrels, parse_qrels_line,
    parse_query_file_name, query_text_with_instruction, target_modality, union_pool_path, unhash_did, unhash_qid,
)
from genius.models.generative_retriever.paper_numbers import PAPER_ORDER


def test_hash_round_trip():
    rng = random.Random(0)
    for _ in range(1000):
        dataset, n = rng.randrange(0, 30), rng.randrange(0, 500_000)
        assert unhash_qid(hash_qid(f"{dataset}:{n}")) == f"{dataset}:{n}"
        m = rng.randrange(0, 10_000_000)
        assert unhash_did(hash_did(f"{dataset}:{m}")) == f"{dataset}:{m}"
    assert hash_qid("9:1") == 9 * 500_000 + 1 and hash_did("9:1") == 90_000_001


@pytest.mark.parametrize("bad", ["9-1", "x:1", "9:", 91, None])
def test_bad_ids_rejected(bad):
    with pytest.raises(ValueError, match="dataset_id:index"):
        hash_qid(bad)


def test_index_out_of_hash_range():
    with pytest.raises(ValueError, match="must be < 500000"):
        hash_qid("1:500000")


@pytest.mark.parametrize("spelling", ["77:07", "077:7", "\uff17\uff17:7", "77:\u0667", " 77:7", "77:7 ", "+77:7"])
def test_an_id_has_one_spelling(spelling):
    """Leading zeros and other scripts' digits were read (int("07") is 7) and then written back as
    77:7, so a search of the indexed record failed and check-data counted it twice."""
    assert unhash_did(hash_did("77:7")) == "77:7"
    with pytest.raises(ValueError, match="without leading zeros"):
        hash_did(spelling)


def test_a_dataset_id_beyond_64_bits_is_refused():
    with pytest.raises(ValueError, match="does not fit UniIR's hashing in 64 bits"):
        hash_did("99999999999999:1")  # an OverflowError traceback in numpy before
    assert hash_did("922337203684:9999999") == 922337203684 * 10_000_000 + 9_999_999 < 2**63


@pytest.mark.parametrize("raw, expected", [
    ('  "a dog on a bench"\r ', "A dog on a bench."),
    ("Is it red?", "Is it red?"),
    ("wow!", "Wow!"),
    ("", ""),
    (None, ""),
])
def test_format_string(raw, expected):
    assert format_string(raw) == expected


def test_instruction_text_for_image_only_query():
    assert query_text_with_instruction("find the caption", "") == "Find the caption."
    assert query_text_with_instruction("Find the image", "a red ball") == "Find the image a red ball."


def test_task_table_matches_mbeir():
    assert TASKS[0] == ("text", "image") and TASKS[3] == ("image", "text") and TASKS[8] == ("image,text", "image,text")
    assert 5 not in TASKS and MODALITY_CODE == {"image": 0, "text": 1, "image,text": 2}


def test_readers_on_real_coco_slice(coco_mini):
    t2i = list(iter_queries(coco_mini / "query/test/mbeir_mscoco_task0_test.jsonl"))
    i2t = list(iter_queries(coco_mini / "query/test/mbeir_mscoco_task3_test.jsonl"))
    assert len(t2i) == 1195 and len(i2t) == 239
    assert all(q.modality == "text" and q.img_path is None and len(q.pos) == 1 for q in t2i)
    assert all(q.modality == "image" and q.text == "" and len(q.pos) == 5 for q in i2t)
    pool = load_pool_index(coco_mini / "cand_pool/global/mbeir_union_test_cand_pool.jsonl")
    assert len(pool) == 1434 and len(np.unique(pool.ids)) == 1434
    assert (pool.modality == 0).sum() == 239 and (pool.modality == 1).sum() == 1195
    images = list(iter_candidates(coco_mini / "cand_pool/local/mbeir_mscoco_task0_test_cand_pool.jsonl"))
    assert all((coco_mini / c.img_path).is_file() for c in images)
    qrels = load_qrels(coco_mini / "qrels/test/mbeir_mscoco_task3_test_qrels.txt")
    assert all(qrels.relevant[q.qid] == set(q.pos) for q in i2t)
    assert set(qrels.task_of.values()) == {3}
    modality = pool.modality_of()
    assert target_modality(t2i[0]) == "image" and target_modality(i2t[0], modality) == "text"
    instructions = Instructions.load(coco_mini / "instructions/query_instructions.tsv")
    assert len(instructions.variants(9, "text", "image")) == 4


def test_instruction_choice_is_deterministic_and_spread(coco_mini):
    instructions = Instructions.load(coco_mini / "instructions/query_instructions.tsv")
    qids = [f"9:{n}" for n in range(1, 400)]
    first = [instructions.choose(q, "text", "image") for q in qids]
    assert first == [instructions.choose(q, "text", "image") for q in reversed(qids)][::-1]
    assert len(set(first)) == 4  # all variants are used, not just prompt_1
    assert instructions.choose("9:1", "text", "image", mode="first") == instructions.variants(9, "text", "image")[0]
    assert instructions.choose("9:1", "text", "image", mode="none") == ""
    rng_a, rng_b = random.Random(5), random.Random(5)
    assert [instructions.choose(q, "text", "image", "random", rng_a) for q in qids] == \
           [instructions.choose(q, "text", "image", "random", rng_b) for q in qids]
    with pytest.raises(KeyError, match="no instruction for dataset 9, image -> image"):
        instructions.choose("9:1", "image", "image")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    good = {"qid": "1:1", "query_txt": "a", "query_img_path": None, "query_modality": "text", "pos_cand_list": ["1:2"]}
    path.write_text(json.dumps(good) + "\n" + '{"qid": "1:2", oops}\n')
    with pytest.raises(DataFormatError, match=r"q\.jsonl:2: not valid JSON"):
        list(iter_queries(path))
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "query_modality": "video"}) + "\n")
    with pytest.raises(DataFormatError, match=r"q\.jsonl:2: query_modality 'video' is not one of"):
        list(iter_queries(path))
    pool = tmp_path / "p.jsonl"
    pool.write_text(json.dumps({"did": "1:1", "txt": "x", "img_path": None, "modality": "text"}) + "\n"
                    + json.dumps({"did": "1:2", "txt": "", "img_path": None, "modality": "text"}) + "\n")
    with pytest.raises(DataFormatError, match=r"p\.jsonl:2: modality is 'text' but the text is empty"):
        list(iter_candidates(pool))
    pool.write_text(json.dumps({"did": "1:x", "txt": "x", "img_path": None, "modality": "text"}) + "\n")
    with pytest.raises(DataFormatError, match=r"p\.jsonl:1: did '1:x'"):
        load_pool_index(pool)


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path):
    good = {"did": "1:1", "txt": "x", "img_path": None, "modality": "text"}
    pool = tmp_path / "p.jsonl"
    pool.write_bytes(json.dumps(good).encode() + b"\n" + b'{"did": "1:2", "txt": "caf\xe9", "modality": "text"}\n')
    for read in (lambda: list(iter_candidates(pool)), lambda: load_pool_index(pool)):
        with pytest.raises(DataFormatError, match=r"p\.jsonl:2: not valid UTF-8 \(byte 27 of the line\)"):
            read()
    qrels = tmp_path / "q.txt"
    qrels.write_bytes(b"1:1 0 1:1 1 1\n1:2 0 1:\xff 1 1\n")
    with pytest.raises(DataFormatError, match=r"q\.txt:2: not valid UTF-8"):
        load_qrels(qrels)
    tsv = tmp_path / "i.tsv"
    tsv.write_bytes(b"header\ntext\timage\tX\t1\tfind \xe9\n")
    with pytest.raises(DataFormatError, match=r"i\.tsv:2: not valid UTF-8"):
        Instructions.load(tsv)


def test_qrels_need_five_columns(tmp_path):
    path = tmp_path / "qrels.txt"
    path.write_text("9:1 0 9:1 1 0\n9:2 0 9:1 1\n")
    with pytest.raises(DataFormatError, match=r"qrels\.txt:2: expected 5 fields"):
        load_qrels(path)


def test_qrels_line_fields():
    assert parse_qrels_line("5:3 0 6:12 1 6".split()) == ("5:3", "6:12", 1, 6)
    with pytest.raises(ValueError, match="task_id 5 is not an M-BEIR task id"):
        parse_qrels_line("5:3 0 6:12 1 5".split())
    with pytest.raises(ValueError, match="did '6-12'"):
        parse_qrels_line("5:3 0 6-12 1 6".split())


def test_eval_tasks_are_the_16_paper_pairs():
    pairs = [(dataset, task) for dataset, tasks in MBEIR_EVAL_TASKS.items() for task in tasks]
    assert len(pairs) == 16 and set(pairs) == set(PAPER_ORDER)
    assert set(MBEIR_EVAL_TASKS) <= set(MBEIR_DATASET_IDS)


def test_union_pool_path_accepts_the_older_folder(tmp_path):
    name = "mbeir_union_test_cand_pool.jsonl"
    assert union_pool_path(tmp_path, "test") == tmp_path / "cand_pool/global" / name  # neither: today's name
    (tmp_path / "cand_pool/union_pool").mkdir(parents=True)
    (tmp_path / "cand_pool/union_pool" / name).touch()
    assert union_pool_path(tmp_path, "test") == tmp_path / "cand_pool/union_pool" / name
    (tmp_path / "cand_pool/global").mkdir()
    (tmp_path / "cand_pool/global" / name).touch()
    assert union_pool_path(tmp_path, "test") == tmp_path / "cand_pool/global" / name


def test_query_file_names():
    assert parse_query_file_name("query/test/mbeir_mscoco_task0_test.jsonl") == ("mscoco", 0, "test")
    assert parse_query_file_name("mbeir_union_up_train.jsonl") is None


def test_union_pool_index_memory_is_small(tmp_path):
    # 200k candidates stand in for the 5.6M union pool: the index keeps 9 bytes per candidate.
    path = tmp_path / "pool.jsonl"
    with open(path, "w") as f:
        for n in range(1, 200_001):
            f.write(json.dumps({"did": f"3:{n}", "txt": "some long passage " * 5, "img_path": None,
                                "modality": "text", "src_content": None}) + "\n")
    pool = load_pool_index(path)
    assert len(pool) == 200_000 and pool.ids.nbytes + pool.modality.nbytes == 200_000 * 9
    assert pool.ids[0] == 30_000_001 and (pool.modality == 1).all()


def test_repeated_ids_empty_files_and_missing_images_name_file_and_line(tmp_path):
    query = {"qid": "1:1", "query_txt": "a", "query_img_path": None, "query_modality": "text", "pos_cand_list": ["1:2"]}
    path = tmp_path / "q.jsonl"
    # An exact copy repeats (UniIR's up-sampling) and is yielded again; a different record is an error.
    compact = json.dumps(query, separators=(",", ":"))  # the same record, written without spaces
    path.write_text(json.dumps(query) + "\n" + json.dumps({**query, "qid": "1:2"}) + "\n" + compact + "\n")
    assert [q.qid for q in iter_queries(path)] == ["1:1", "1:2", "1:1"]
    path.write_text(json.dumps(query) + "\n\n" + json.dumps({**query, "query_txt": "b"}) + "\n")
    with pytest.raises(DataFormatError, match=r"q\.jsonl:3: qid 1:1 appears again with a different record \(first on line 1\)"):
        list(iter_queries(path))

    cand = {"did": "1:1", "txt": "x", "img_path": None, "modality": "text"}
    pool = tmp_path / "p.jsonl"
    pool.write_text("".join(json.dumps(c) + "\n" for c in [cand, {**cand, "did": "1:2"}, cand]))
    for read in (lambda: list(iter_candidates(pool)), lambda: load_pool_index(pool)):
        with pytest.raises(DataFormatError, match=r"p\.jsonl:3: did 1:1 appears more than once in this pool \(first on line 1\)"):
            read()

    readers = [(path, lambda p: list(iter_queries(p))), (pool, lambda p: list(iter_candidates(p))),
               (pool, load_pool_index), (tmp_path / "r.txt", load_qrels)]
    for empty, read in readers:
        empty.write_text("\n")
        with pytest.raises(DataFormatError, match=rf"{empty.name}: empty file \(no records\)"):
            read(empty)

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"")
    pool.write_text(json.dumps({**cand, "img_path": "img/a.png", "modality": "image,text"}) + "\n"
                    + json.dumps({**cand, "did": "1:2", "img_path": "img/b.png", "modality": "image,text"}) + "\n")
    assert len(list(iter_candidates(pool))) == 2  # without the data root, images are not looked at
    with pytest.raises(DataFormatError, match=rf"p\.jsonl:2: image img/b\.png does not exist under {tmp_path}"):
        list(iter_candidates(pool, image_root=tmp_path))
    path.write_text(json.dumps({**query, "query_img_path": "img/c.png", "query_modality": "image,text"}) + "\n")
    with pytest.raises(DataFormatError, match=r"q\.jsonl:1: image img/c\.png does not exist"):
        list(iter_queries(path, image_root=tmp_path))
    (tmp_path / "img" / "d.png").mkdir()  # a folder where an image should be is named as a folder
    path.write_text(json.dumps({**query, "query_img_path": "img/d.png", "query_modality": "image,text"}) + "\n")
    with pytest.raises(DataFormatError, match=r"q\.jsonl:1: image img/d\.png is a folder under .*, not an image "
                                              r"file; restore the image"):
        list(iter_queries(path, image_root=tmp_path))
