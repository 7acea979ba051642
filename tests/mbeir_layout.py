"""An M-BEIR-shaped data root for tests: M-BEIR's folders and file names, a few items per file.

``build_mbeir_root(tmp_path)`` writes ``tmp_path/M-BEIR`` with everything the published dataset
has that the code reads:

- the ten datasets with their M-BEIR dataset ids (``MBEIR_DATASET_IDS``);
- the 16 evaluated (dataset, task) pairs (``MBEIR_EVAL_TASKS``):
  ``query/{val,test}/mbeir_<ds>_task<k>_{val,test}.jsonl`` with ``qrels/{val,test}/..._qrels.txt``;
- local pools ``cand_pool/local/mbeir_<ds>_task<k>_cand_pool.jsonl``, except MSCOCO, which has a
  ``..._test_cand_pool.jsonl`` and a ``..._val_cand_pool.jsonl`` per task;
- ``query/train/mbeir_<ds>_train.jsonl`` (one per dataset, its tasks mixed) with
  ``qrels/train/mbeir_<ds>_train_qrels.txt``;
- ``query/union_train/mbeir_union_up_train.jsonl``: the ten train files with WebQA, EDIS, NIGHTS,
  FashionIQ and CIRR up-sampled with replacement and shuffled, so qids repeat as in M-BEIR;
- ``cand_pool/global/mbeir_union_{train,val,test}_cand_pool.jsonl`` (``union_dir="union_pool"``
  writes the older revision's ``cand_pool/union_pool/`` instead): the train pools; the local pools
  (MSCOCO: its _val pools) trimmed to what the val queries reference; the local pools (MSCOCO: its
  _test pools);
- ``instructions/query_instructions.tsv``: header and one row per (query modality, candidate
  modality, dataset), two prompts each;
- small JPEGs under ``mbeir_images/<ds>_images/`` (InfoSeek's sit in ``oven_images/``, as in M-BEIR).

Content is learnable: every item is about one of a few colours. Images are squares of that colour
and texts name it, so a small encoder trained on the train split can pick the right candidate in
the test pools (each pool holds every colour once; MSCOCO's caption pools twice, giving its
image->text queries two positives as M-BEIR's have several).

As in M-BEIR, OVEN and InfoSeek queries also list the other dataset's candidate for the same colour
(same modality) among their positives. That candidate is not in the query's local pool but is in
the union pools. Queries with an even index get one.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from genius.common.mbeir import MBEIR_DATASET_IDS, MBEIR_EVAL_TASKS, TASKS

DATASETS = tuple(MBEIR_EVAL_TASKS)  # the ten M-BEIR datasets
# Dataset names as the instructions file's dataset_name column spells them.
DISPLAY_NAMES = {
    "visualnews": "VisualNews", "fashion200k": "Fashion200K", "webqa": "WebQA", "edis": "EDIS",
    "nights": "NIGHTS", "oven": "OVEN", "infoseek": "INFOSEEK", "fashioniq": "FashionIQ", "cirr": "CIRR",
    "mscoco": "MSCOCO",
}
UPSAMPLED = ("webqa", "edis", "nights", "fashioniq", "cirr")  # the five M-BEIR up-samples
CROSS_DATASET = {"oven": "infoseek", "infoseek": "oven"}
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 215, 30), "green": (40, 170, 60),
    "cyan": (40, 200, 210), "blue": (40, 80, 220), "purple": (140, 60, 190), "pink": (245, 120, 190),
}
BACKGROUND = (235, 235, 235)
IMAGE_SIZE = 32
UNION_DIRS = ("global", "union_pool")

# Candidate and query texts; {c} is the colour. Each dataset has its own wording, as each M-BEIR
# dataset has its own kind of text.
CANDIDATE_TEXT = {
    "visualnews": "News photo: supporters wave {c} flags at the rally",
    "fashion200k": "{c} cotton shirt with short sleeves",
    "webqa": "The {c} flag: a plain banner dyed {c}",
    "edis": "City unveils a {c} sculpture in the main square",
    "oven": "{C}. Article about the colour {c}",
    "infoseek": "{C}. Encyclopedia passage on the colour {c}",
    "mscoco": "a {c} square on a plain background",
}
MSCOCO_SECOND_CAPTION = "a picture of something {c}"
CAPTION_QUERY = {
    "visualnews": "Supporters waving {c} flags", "fashion200k": "{c} shirt", "mscoco": "a {c} square",
}
DOMAIN = {
    "visualnews": "news", "fashion200k": "fashion", "webqa": "wiki", "edis": "news", "nights": "everyday",
    "oven": "wiki", "infoseek": "wiki", "fashioniq": "fashion", "cirr": "everyday", "mscoco": "everyday",
}
PROMPTS = {  # two variants per task; {d} is the dataset's domain
    0: ("Find the {d} image this text describes.", "Retrieve a {d} picture matching the description."),
    1: ("Find a {d} passage that answers the question.", "Retrieve {d} text relevant to this query."),
    2: ("Find a {d} image with text that fits the query.", "Retrieve a captioned {d} picture for this text."),
    3: ("Find a caption for this {d} image.", "Retrieve text describing the {d} picture."),
    4: ("Find a {d} image that looks like this one.", "Retrieve a visually similar {d} picture."),
    6: ("Find a {d} passage answering the question about this image.", "Retrieve {d} text about what the picture shows."),
    7: ("Find the {d} image the reference becomes after the change.", "Retrieve the edited {d} picture described."),
    8: ("Find an illustrated {d} entry about what this image shows.", "Retrieve a {d} article with picture for this question."),
}


@dataclass
class MBEIRRoot:
    root: Path
    repeated_rows: int  # rows up-sampling added to the union train file (each repeats a qid)
    # val/test query file (relative to root) -> its positives from the other dataset (OVEN/InfoSeek)
    cross_positives: dict[str, int] = field(default_factory=dict)


def image_dir(dataset: str) -> str:
    return f"mbeir_images/{'oven' if dataset == 'infoseek' else dataset}_images"


class _Builder:
    def __init__(self, root: Path, colours: list[str], seed: int) -> None:
        self.root, self.colours, self.rng = root, colours, random.Random(seed)
        self.qids = {ds: itertools.count(1) for ds in DATASETS}  # queries and candidates are
        self.dids = {ds: itertools.count(1) for ds in DATASETS}  # numbered apart, as in M-BEIR
        self.images = 0

    def image(self, dataset: str, colour: str, name: str) -> str:
        """A square of the colour whose size and place vary with the image number."""
        self.images += 1
        side = 12 + 4 * (self.images % 3)
        x, y = (self.images * 5) % (IMAGE_SIZE - side), (self.images * 7) % (IMAGE_SIZE - side)
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
        ImageDraw.Draw(img).rectangle([x, y, x + side - 1, y + side - 1], fill=COLOURS[colour])
        rel = f"{image_dir(dataset)}/{dataset}_{name}.jpg"
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(self.root / rel, "JPEG", quality=95)
        return rel

    def candidate(self, dataset: str, modality: str, colour: str, text: str | None = None) -> dict:
        did = f"{MBEIR_DATASET_IDS[dataset]}:{next(self.dids[dataset])}"
        template = (text or CANDIDATE_TEXT[dataset]) if "text" in modality else None
        return {
            "did": did,
            "txt": template.format(c=colour, C=colour.capitalize()) if template else None,
            "img_path": self.image(dataset, colour, f"cand_{did.split(':')[1]}") if "image" in modality else None,
            "modality": modality,
            "src_content": json.dumps({"colour": colour}),
        }

    def pool(self, dataset: str, task: int) -> dict[str, list[dict]]:
        """One candidate per colour (two captions per colour for MSCOCO image->text)."""
        modality = TASKS[task][1]
        pool = {c: [self.candidate(dataset, modality, c)] for c in self.colours}
        if dataset == "mscoco" and task == 3:
            for colour, cands in pool.items():
                cands.append(self.candidate(dataset, modality, colour, MSCOCO_SECOND_CAPTION))
        return pool

    def query(self, dataset: str, task: int, index: int, pool: dict[str, list[dict]],
              cross_pool: dict[str, list[dict]] | None) -> dict:
        qmod = TASKS[task][0]
        colour = self.colours[index % len(self.colours)]
        qid = f"{MBEIR_DATASET_IDS[dataset]}:{next(self.qids[dataset])}"
        # Task 7 shows a reference of another colour; its text names the target colour.
        shown = self.colours[(index + 1) % len(self.colours)] if task == 7 else colour
        positives = [c["did"] for c in pool[colour]]
        if cross_pool is not None and index % 2 == 0:
            positives += [c["did"] for c in cross_pool[colour]]
        return {
            "qid": qid,
            "query_txt": _query_text(dataset, task, colour),
            "query_img_path": self.image(dataset, shown, f"query_{qid.split(':')[1]}") if "image" in qmod else None,
            "query_modality": qmod,
            "query_src_content": json.dumps({"colour": colour}),
            "pos_cand_list": positives,
            "neg_cand_list": [],
            "task_id": task,
        }


def _query_text(dataset: str, task: int, colour: str) -> str | None:
    if task == 0:
        return CAPTION_QUERY[dataset].format(c=colour)
    return {
        1: f"Which passage is about the colour {colour}?",
        2: f"Show the {colour} item and its description.",
        6: "Which article describes what this picture shows?",
        7: f"Make it {colour}.",
        8: "Which entity is shown here?",
    }.get(task)  # tasks 3 and 4 ask with an image alone


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _qrels(path: Path, queries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{q['qid']} 0 {did} 1 {q['task_id']}\n" for q in queries for did in q["pos_cand_list"]))


def _sorted(cands: list[dict]) -> list[dict]:
    return sorted(cands, key=lambda c: tuple(map(int, c["did"].split(":"))))


def _instructions() -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(["query_modality", "cand_modality", "dataset_name", "dataset_id",
                     "prompt_1", "prompt_2", "prompt_3", "prompt_4"])
    for dataset, tasks in MBEIR_EVAL_TASKS.items():
        for task in tasks:
            prompts = [p.format(d=DOMAIN[dataset]) for p in PROMPTS[task]]
            writer.writerow([*TASKS[task], DISPLAY_NAMES[dataset], MBEIR_DATASET_IDS[dataset], *prompts, "", ""])
    return buffer.getvalue()


def build_mbeir_root(parent: str | Path, name: str = "M-BEIR", union_dir: str = "global", seed: int = 0,
                     n_colours: int = 6, queries: dict[str, int] | None = None, upsample: int = 2) -> MBEIRRoot:
    """Write an M-BEIR-shaped root at ``parent/name`` and describe it.

    ``union_dir``: ``global`` (current M-BEIR) or ``union_pool`` (older revision). ``queries``:
    queries per (dataset, task) and split, default train 6, val 2, test 4 (with 6 colours every
    colour is trained on). ``upsample``: factor for the five datasets M-BEIR up-samples.
    """
    if union_dir not in UNION_DIRS:
        raise ValueError(f"union_dir must be one of {UNION_DIRS}, got {union_dir!r}")
    counts = {"train": 6, "val": 2, "test": 4, **(queries or {})}
    root = Path(parent) / name
    b = _Builder(root, list(COLOURS)[:n_colours], seed)
    # Pools first: OVEN and InfoSeek queries point into each other's pools.
    local = {(ds, task): b.pool(ds, task) for ds in DATASETS for task in MBEIR_EVAL_TASKS[ds] if ds != "mscoco"}
    eval_pools = {"val": dict(local), "test": dict(local)}
    for task in MBEIR_EVAL_TASKS["mscoco"]:
        for split in ("test", "val"):
            eval_pools[split][("mscoco", task)] = b.pool("mscoco", task)
    train_pools = {(ds, task): b.pool(ds, task) for ds in DATASETS for task in MBEIR_EVAL_TASKS[ds]}

    def cross(pools: dict, ds: str, task: int) -> dict | None:
        return pools[(CROSS_DATASET[ds], task)] if ds in CROSS_DATASET else None

    result = MBEIRRoot(root, 0)
    train_files: dict[str, list[dict]] = {}
    val_dids: set[str] = set()  # the union val pool keeps only what val queries reference
    for ds in DATASETS:
        train_files[ds] = []
        for task in MBEIR_EVAL_TASKS[ds]:
            train_files[ds] += [b.query(ds, task, i, train_pools[(ds, task)], cross(train_pools, ds, task))
                                for i in range(counts["train"])]
            stem = f"mbeir_{ds}_task{task}"
            for split in ("val", "test"):
                pools = eval_pools[split]
                # Val and test ask about different colours where the pool allows it.
                offset = counts["test"] if split == "val" else 0
                rows = [b.query(ds, task, offset + i, pools[(ds, task)], cross(pools, ds, task))
                        for i in range(counts[split])]
                _jsonl(root / f"query/{split}/{stem}_{split}.jsonl", rows)
                if split == "val":
                    val_dids.update(did for q in rows for did in q["pos_cand_list"] + q["neg_cand_list"])
                _qrels(root / f"qrels/{split}/{stem}_{split}_qrels.txt", rows)
                result.cross_positives[f"query/{split}/{stem}_{split}.jsonl"] = sum(
                    did.split(":")[0] != q["qid"].split(":")[0] for q in rows for did in q["pos_cand_list"])
        _jsonl(root / f"query/train/mbeir_{ds}_train.jsonl", train_files[ds])
        _qrels(root / f"qrels/train/mbeir_{ds}_train_qrels.txt", train_files[ds])

    for (ds, task), pool in local.items():
        _jsonl(root / f"cand_pool/local/mbeir_{ds}_task{task}_cand_pool.jsonl", [c for cs in pool.values() for c in cs])
    for task in MBEIR_EVAL_TASKS["mscoco"]:
        for split in ("test", "val"):
            _jsonl(root / f"cand_pool/local/mbeir_mscoco_task{task}_{split}_cand_pool.jsonl",
                   [c for cs in eval_pools[split][("mscoco", task)].values() for c in cs])

    def flat(pools: dict) -> list[dict]:
        return _sorted([c for pool in pools.values() for cs in pool.values() for c in cs])

    union = root / "cand_pool" / union_dir
    _jsonl(union / "mbeir_union_train_cand_pool.jsonl", flat(train_pools))
    _jsonl(union / "mbeir_union_val_cand_pool.jsonl", [c for c in flat(eval_pools["val"]) if c["did"] in val_dids])
    _jsonl(union / "mbeir_union_test_cand_pool.jsonl", flat(eval_pools["test"]))

    up_train = []
    for ds in DATASETS:
        rows = list(train_files[ds])
        if ds in UPSAMPLED:
            extra = b.rng.choices(rows, k=(upsample - 1) * len(rows))
            result.repeated_rows += len(extra)
            rows += extra
        up_train += rows
    b.rng.shuffle(up_train)
    _jsonl(root / "query/union_train/mbeir_union_up_train.jsonl", up_train)

    (root / "instructions").mkdir(parents=True, exist_ok=True)
    (root / "instructions/query_instructions.tsv").write_text(_instructions())
    return result
