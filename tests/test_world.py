"""The synthetic M-BEIR-mini world: layout, readability, exact ground truth and determinism.

Ground truth is checked from the records' ``src_content`` with logic written here, not the
generator's, so a generator bug cannot hide behind its own definitions.
"""
from __future__ import annotations

import copy
import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from genius.synthetic import world
from genius.common.mbeir import (
    MBEIR_DATASET_IDS, TASKS, Instructions, iter_candidates, iter_queries, load_qrels, parse_query_file_name,
)

SPLITS = ("train", "val", "test")
# Words a reader accepts for each attribute value (the generator's synonyms, stated independently).
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
TEXTURE_WORDS = {"solid": ("solid", "plain"), "striped": ("striped", "stripes"),
                 "dotted": ("dotted", "spotted", "dots")}
POSITION_WORDS = {"left": ("left",), "right": ("right",), "top": ("top",), "bottom": ("bottom",),
                  "centre": ("centre", "middle")}
MODALITY_WORDS = {"image": ("image", "picture", "photo"), "text": ("text", "passage", "caption")}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "mini"
    world.write_world(out, "test", seed=0)
    return out


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def query_files(root: Path, split: str) -> list[tuple[Path, str, int]]:
    """(path, dataset name, task) of every per-task query file of a split."""
    files = []
    for path in sorted((root / "query" / split).iterdir()):
        name, task, file_split = parse_query_file_name(path)
        assert file_split == split
        files.append((path, name, task))
    return files


def union_pool(root: Path, split: str) -> dict[str, dict]:
    return {c["did"]: c for c in records(root / f"cand_pool/global/mbeir_union_{split}_cand_pool.jsonl")}


def local_pool(root: Path, name: str, task: int) -> dict[str, dict]:
    return {c["did"]: c for c in records(root / f"cand_pool/local/mbeir_{name}_task{task}_cand_pool.jsonl")}


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def apply_edit(scene: dict, modification: dict) -> dict:
    edited = copy.deepcopy(scene)
    if modification["object"] is None:
        edited["background"] = modification["value"]
    else:
        edited["objects"][modification["object"]][modification["attribute"]] = modification["value"]
    return edited


def target_description(task: int, src: dict) -> dict:
    """What a positive's src_content must contain, read off the query's src_content."""
    if task == 6:
        return {"scene": src["scene"], "object": src["object"], "attribute": src["attribute"]}
    if task == 7:
        return {"scene": apply_edit(src["reference"], src["modification"])}
    if task == 8:
        obj = dict(src["scene"]["objects"][src["object"]])
        del obj["position"]  # an object card shows the object alone
        return {"object": obj}
    return {"scene": src["scene"]}


def mentions(text: str, words: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{word}\b", text) for word in words)


def describes(text: str, obj: dict) -> bool:
    return (mentions(text, (obj["colour"], obj["shape"])) and mentions(text, SIZE_WORDS[obj["size"]])
            and mentions(text, TEXTURE_WORDS[obj["texture"]]) and mentions(text, POSITION_WORDS[obj["position"]]))


def assert_full_description(text: str, scene: dict) -> None:
    """Every shape is named with all five attributes in one clause, and the background is named."""
    clauses = text.replace("?", "").split(" and ")
    assert len(clauses) == len(scene["objects"]), text
    for obj in scene["objects"]:
        assert any(describes(clause, obj) for clause in clauses), (text, obj)
    assert scene["background"] in text, text


# ---- determinism and files ------------------------------------------------------------------
def test_same_seed_gives_identical_bytes_and_another_seed_differs(root, tmp_path, capsys):
    other = tmp_path / "other"
    world.main(["--out", str(other), "--size", "test", "--seed", "1"])
    assert "wrote the test world (seed 1)" in capsys.readouterr().out
    reference, with_seed_1 = tree(root), tree(other)
    for name in ("cand_pool/global/mbeir_union_test_cand_pool.jsonl", "mbeir_images/shapesnews_images/000001.png"):
        assert reference[name] != with_seed_1[name]
    world.write_world(other, "test", seed=0)  # an existing world is replaced whole
    again = tree(other)
    assert [name for name in reference if again.get(name) != reference[name]] == []
    assert again.keys() == reference.keys()


def test_a_world_of_other_numbers_for_its_size_is_not_current(root, tmp_path, monkeypatch):
    """`genius world` skips a current world; one made when the size had other numbers is rewritten."""
    assert world._is_current(root, "test", 0) and not world._is_current(root, "test", 1)
    grown = world.WorldSize({**world.WORLD_SIZES["test"].queries, "test": 50}, 400, 600)
    monkeypatch.setitem(world.WORLD_SIZES, "test", grown)
    assert not world._is_current(root, "test", 0)
    monkeypatch.undo()
    # world.json of a world written before it recorded the numbers: its query counts decide.
    old = tmp_path / "old"
    old.mkdir()
    summary = json.loads((root / "world.json").read_text())
    del summary["size_spec"]
    (old / "world.json").write_text(json.dumps(summary))
    assert world._is_current(old, "test", 0)
    summary["tasks"][0]["queries"]["train"] = 40
    (old / "world.json").write_text(json.dumps(summary))
    assert not world._is_current(old, "test", 0)


def test_summary_matches_the_files(root):
    summary = json.loads((root / "world.json").read_text())
    assert (summary["seed"], summary["size"], summary["generator"]) == (0, "test", "genius.synthetic.world")
    for split in SPLITS:
        assert summary["queries"][split] == sum(len(records(p)) for p, _, _ in query_files(root, split))
        assert summary["candidates"][split] == len(union_pool(root, split))
    assert summary["images"] == len(list(root.glob("mbeir_images/*/*.png")))


def test_eight_tasks_over_three_synthetic_datasets(root):
    stems = {split: {(name, task) for _, name, task in query_files(root, split)} for split in SPLITS}
    assert stems["train"] == stems["val"] == stems["test"]
    assert {task for _, task in stems["test"]} == set(TASKS)
    dataset_ids = {int(q["qid"].split(":")[0]) for p, _, _ in query_files(root, "test") for q in records(p)}
    assert len(dataset_ids) >= 3 and not dataset_ids & set(MBEIR_DATASET_IDS.values())
    local = {p.name for p in (root / "cand_pool/local").iterdir()}
    assert local == {f"mbeir_{name}_task{task}_cand_pool.jsonl" for name, task in stems["test"]}


def test_every_file_reads_with_the_mbeir_readers(root):
    for path in root.glob("query/*/*.jsonl"):
        assert list(iter_queries(path)), path
    for path in root.glob("cand_pool/*/*.jsonl"):
        assert list(iter_candidates(path)), path
    for path in root.glob("qrels/*/*.txt"):
        assert load_qrels(path).relevant, path
    assert Instructions.load(root / "instructions/query_instructions.tsv").prompts


def test_union_files_are_built_from_the_parts(root):
    """As in M-BEIR: the union test pool is the local pools, the union val pool those trimmed to
    the val positives, and the union train pool holds the training candidates."""
    local = [c for p in sorted((root / "cand_pool/local").iterdir()) for c in records(p)]
    test_pool = union_pool(root, "test")
    assert list(test_pool.values()) == sorted(local, key=lambda c: tuple(map(int, c["did"].split(":"))))
    val_positives = {did for p, _, _ in query_files(root, "val") for q in records(p) for did in q["pos_cand_list"]}
    assert list(union_pool(root, "val")) == [did for did in test_pool if did in val_positives]
    all_dids = list(union_pool(root, "train")) + list(test_pool)
    assert len(all_dids) == len(set(all_dids)), "a did is shared by the train and test pools"
    for split, union_name in (("train", "union_train/mbeir_union_up_train"), ("val", "union_val/mbeir_union_val")):
        parts = [json.dumps(q) for p, _, _ in query_files(root, split) for q in records(p)]
        union = [json.dumps(q) for q in records(root / f"query/{union_name}.jsonl")]
        assert Counter(union) == Counter(parts)
        if split == "train":
            assert union != parts, "the union training file is shuffled"
    qids = [q["qid"] for p in root.glob("query/*/mbeir_*_task*.jsonl") for q in records(p)]
    assert len(qids) == len(set(qids))


# ---- ground truth ---------------------------------------------------------------------------
def test_positives_are_in_the_pools_with_the_target_modality(root):
    for split in SPLITS:
        union = union_pool(root, split)
        for path, name, task in query_files(root, split):
            local = union if split == "train" else local_pool(root, name, task)  # val shares the local pool
            for q in records(path):
                assert q["query_modality"] == TASKS[task][0] and q["task_id"] == task
                assert q["pos_cand_list"] and q["neg_cand_list"] == []
                for did in q["pos_cand_list"]:
                    assert union[did]["modality"] == local[did]["modality"] == TASKS[task][1], (q["qid"], did)


def test_local_pools_hold_distractors_of_the_target_modality(root):
    for path, name, task in query_files(root, "test"):
        pool = local_pool(root, name, task)
        val_path = root / f"query/val/mbeir_{name}_task{task}_val.jsonl"
        positives = {did for p in (path, val_path) for q in records(p) for did in q["pos_cand_list"]}
        assert {c["modality"] for c in pool.values()} == {TASKS[task][1]}
        assert len(pool) >= 60 and len(pool) - len(positives) >= 20, (name, task)


def test_qrels_agree_exactly_with_the_positive_lists(root):
    for split in SPLITS:
        for path, name, task in query_files(root, split):
            qrels_path = root / f"qrels/{split}/mbeir_{name}_task{task}_{split}_qrels.txt"
            qrels = load_qrels(qrels_path)
            queries = records(path)
            assert qrels.relevant == {q["qid"]: set(q["pos_cand_list"]) for q in queries}
            assert set(qrels.task_of.values()) == {task}
            assert len(qrels_path.read_text().splitlines()) == sum(len(q["pos_cand_list"]) for q in queries)


def test_positives_are_exactly_the_candidates_that_match(root):
    """No candidate of the target modality outside the positives fits the query, in any pool."""
    for split in SPLITS:
        union = union_pool(root, "train" if split == "train" else "test")  # the val pool is trimmed
        pool = [(did, c["modality"], json.loads(c["src_content"])) for did, c in union.items()]
        for path, _, task in query_files(root, split):
            for q in records(path):
                wanted = target_description(task, json.loads(q["query_src_content"]))
                matching = {did for did, modality, src in pool if modality == TASKS[task][1]
                            and all(src.get(key) == value for key, value in wanted.items())}
                assert matching == set(q["pos_cand_list"]), (q["qid"], wanted)


def test_edits_change_exactly_one_attribute(root):
    for path, _, task in query_files(root, "test"):
        if task != 7:
            continue
        for q in records(path):
            src = json.loads(q["query_src_content"])
            reference, target = src["reference"], src["target"]
            assert apply_edit(reference, src["modification"]) == target
            pairs = list(zip(reference["objects"], target["objects"]))
            differences = [(i, k) for i, (a, b) in enumerate(pairs) for k in a if a[k] != b[k]]
            differences += ["background"] * (reference["background"] != target["background"])
            assert len(differences) == 1, src


def test_texts_say_what_the_positive_shows(root):
    pool = union_pool(root, "test")
    for path, _, task in query_files(root, "test"):
        for q in records(path):
            positives = [pool[did] for did in q["pos_cand_list"]]
            src = json.loads(q["query_src_content"])
            text = q["query_txt"]
            if task in (0, 1, 2):  # the query describes its positive's scene in full
                assert_full_description(text, json.loads(positives[0]["src_content"])["scene"])
            elif task == 3:  # each positive caption describes the query image's scene in full
                assert len(positives) == 2 and positives[0]["txt"] != positives[1]["txt"]
                for cand in positives:
                    assert_full_description(cand["txt"], src["scene"])
            elif task == 6:
                obj = src["scene"]["objects"][src["object"]]
                answer = positives[0]["txt"].split(".")[0]
                assert obj["shape"] in text and obj["shape"] in answer
                assert mentions(answer, POSITION_WORDS[obj["position"]] if src["attribute"] == "position"
                                else (obj[src["attribute"]],)), (text, answer)
            elif task == 7:
                edit = src["modification"]
                if edit["attribute"] in ("colour", "shape", "background"):
                    assert edit["value"] in text, (text, edit)
            elif task == 8:
                obj = src["scene"]["objects"][src["object"]]
                card = positives[0]["txt"]
                assert obj["colour"] in card and obj["shape"] in card and mentions(card, SIZE_WORDS[obj["size"]])


def test_texts_point_at_one_shape_unambiguously(root):
    """A shape named in a question or edit is named by its place whenever its name alone is ambiguous."""
    for split in SPLITS:
        for path, _, task in query_files(root, split):
            if task not in (6, 7, 8):
                continue
            for q in records(path):
                src, text = json.loads(q["query_src_content"]), q["query_txt"]
                if task == 7:
                    scene, index = src["reference"], src["modification"]["object"]
                else:
                    scene, index = src["scene"], src["object"]
                if index is None:  # a background edit
                    continue
                obj = scene["objects"][index]
                others = [o for i, o in enumerate(scene["objects"]) if i != index]
                if any(o["shape"] == obj["shape"] for o in others) or not mentions(text, (obj["shape"],)):
                    assert mentions(text, POSITION_WORDS[obj["position"]]), (text, obj)
                    assert not any(mentions(text, POSITION_WORDS[o["position"]]) for o in others), (text, obj)


# ---- images ---------------------------------------------------------------------------------
def test_every_referenced_image_exists_and_every_image_is_referenced(root):
    paths = {q["query_img_path"] for p in root.glob("query/*/*.jsonl") for q in records(p)}
    paths |= {c["img_path"] for p in root.glob("cand_pool/global/*.jsonl") for c in records(p)}
    paths.discard(None)
    for path in paths:
        with Image.open(root / path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (world.IMAGE_SIZE, world.IMAGE_SIZE))
    assert paths == {str(p.relative_to(root)) for p in root.glob("mbeir_images/*/*.png")}


def test_clean_renders_show_the_colours_of_their_description(root):
    checked = 0
    for path, name, task in query_files(root, "test"):
        if task != 0:  # t->i candidates are clean renders (no jitter, no noise)
            continue
        for cand in local_pool(root, name, task).values():
            scene = json.loads(cand["src_content"])["scene"]
            with Image.open(root / cand["img_path"]) as image:
                assert image.getpixel((0, 0)) == world.BACKGROUNDS[scene["background"]]
                for obj in scene["objects"]:
                    if obj["texture"] == "solid":
                        assert image.getpixel(world.POSITIONS[obj["position"]]) == world.COLOURS[obj["colour"]]
                        checked += 1
    assert checked > 10


def test_image_queries_are_a_different_shot_of_the_positive(root):
    pool = union_pool(root, "test")
    for path, _, task in query_files(root, "test"):
        if task != 4:
            continue
        for q in records(path):
            positive = pool[q["pos_cand_list"][0]]
            assert q["query_img_path"] != positive["img_path"]
            assert (root / q["query_img_path"]).read_bytes() != (root / positive["img_path"]).read_bytes()


# ---- instructions and splits ----------------------------------------------------------------
def test_instructions_cover_every_pair_and_name_the_target(root):
    instructions = Instructions.load(root / "instructions/query_instructions.tsv")
    used = {(int(q["qid"].split(":")[0]), *TASKS[task]) for split in SPLITS
            for path, _, task in query_files(root, split) for q in records(path)}
    assert set(instructions.prompts) == used
    for (_, _, cand_modality), prompts in instructions.prompts.items():
        assert len(set(prompts)) == 4
        for prompt in prompts:
            for modality in cand_modality.split(","):
                assert any(word in prompt.lower() for word in MODALITY_WORDS[modality]), (prompt, cand_modality)


def test_test_queries_are_new(root):
    """No two splits share a query scene, query image or text-only query, and no test positive
    shows a scene that training has seen."""
    def scene_key(scene: dict) -> str:
        return json.dumps(scene, sort_keys=True)

    def query_scenes(split: str) -> set[str]:
        return {scene_key(src.get("scene") or src["reference"]) for p, _, _ in query_files(root, split)
                for src in (json.loads(q["query_src_content"]) for q in records(p))}

    def texts(split: str) -> set[str]:
        return {q["query_txt"] for p, _, _ in query_files(root, split) for q in records(p)
                if q["query_img_path"] is None}

    def images(split: str) -> set[str]:
        return {q["query_img_path"] for p, _, _ in query_files(root, split) for q in records(p)} - {None}

    for first, second in itertools.combinations(SPLITS, 2):
        assert not query_scenes(first) & query_scenes(second)
        assert not texts(first) & texts(second)
        assert not images(first) & images(second)
    train_scenes = query_scenes("train") | {scene_key(json.loads(c["src_content"])["scene"])
                                            for c in union_pool(root, "train").values()
                                            if "scene" in json.loads(c["src_content"])}
    test_pool = union_pool(root, "test")
    for path, _, _ in query_files(root, "test"):
        for q in records(path):
            for did in q["pos_cand_list"]:
                src = json.loads(test_pool[did]["src_content"])
                assert "scene" not in src or scene_key(src["scene"]) not in train_scenes


# ---- safety ---------------------------------------------------------------------------------
def test_refuses_foreign_folders_and_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not a world")
    with pytest.raises(ValueError, match="not a generated world"):
        world.write_world(foreign, "test")
    assert (foreign / "keep.txt").read_text() == "not a world"
    with pytest.raises(ValueError, match="valid sizes"):
        world.write_world(tmp_path / "new", "huge")

    calls = 0

    def render_then_fail(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls > 100:
            raise RuntimeError("interrupted")
        return original(*args, **kwargs)

    original = world.render_scene
    monkeypatch.setattr(world, "render_scene", render_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        world.write_world(tmp_path / "new", "test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
