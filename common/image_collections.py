"""``genius import-images``: a class-labelled image collection as an M-BEIR-layout root for image->image retrieval.

    genius import-images --images DIR --out ROOT --name NAME
                         --protocol {holdout,classes-half,image-split,inshop}
                         [--query-fraction 0.2] [--seed 0] [--list-file FILE] [--dataset-id 30] [--force]

``DIR`` holds one folder per class (``DIR/<class>/<image files>``; dotfiles are ignored), or for
``inshop`` the In-shop Clothes root that ``--list-file`` (its ``list_eval_partition.txt``) names
images under. Relevance is class-level, as in IRGen's benchmarks: a query's positives are every
image of its class in the pool it searches, except its own image, which is listed in the query's
``exclude_cand_list`` when the pool holds it (the metric-learning protocol) so that evaluation
never returns it.

- ``holdout`` (ImageNet, Places): per class a seeded ``--query-fraction`` of the images (at least
  one; two are kept when the class has three or more) are test queries; the rest is the database,
  which is both the test pool and the training data. A class needs two images.
- ``classes-half`` (the metric-learning CUB-200 / Cars196 protocol): the first half of the classes
  by name train, every image of the second half is a test query against all of the second half's
  images.
- ``image-split`` (IRGen's CUB-200 / Cars196 protocol): the datasets' official image split, given
  by ``--list-file``; the train images are the database, which is both the test pool and the
  training data, and the test images are the test queries.
- ``inshop``: train images are the training data, query images search the gallery images; the
  class is the item id.

Training queries are the training images with the other training images of their class as
positives (the pairs a class-level generator trains on). A training image that is the only one of
its class has no positive: it stays in the training pool but is no training query, and one warning
gives their count. A root without any training query, and a test query whose class has no other
image in its pool, are errors. Images are read as 8-bit RGB: 16-bit images are scaled to 8 bits,
float images are refused (they have no one range to scale from). The root
is for task 4 (qi->ci) and holds, with ``<d>`` the dataset id and ``NAME`` the file-name part:

    mbeir_images/NAME/...                                  the images, copied after they decode
    query/train/mbeir_NAME_task4_train.jsonl               training queries (qids after the test ones)
    cand_pool/global/mbeir_union_train_cand_pool.jsonl     training images
    query/test/mbeir_NAME_task4_test.jsonl                 test queries
    cand_pool/local/mbeir_NAME_task4_cand_pool.jsonl       the pool they search
    qrels/test/mbeir_NAME_task4_test_qrels.txt             their positives
    import.json                                            protocol, seed, classes and counts

which ``genius check-data`` accepts and ``genius new-setting`` finds. The root is built beside
``ROOT`` and renamed into place whole; the same inputs and seed give byte-identical files.
``write_sklearn_digits`` writes scikit-learn's bundled handwritten digits as such a collection.

The image-split list file:
One line per image under ``--images``: ``<path relative to --images> <train|test>``
(whitespace-separated; blank lines are ignored, but there are no comment lines: a line starting
with ``#`` is an image path, as a class folder may be named ``#1``). The class is the image's
folder, as for the other protocols, and every image must be listed.

CUB-200-2011 (5,994 train, 5,794 test; ``--images CUB_200_2011/images``) joins ``images.txt``
and ``train_test_split.txt`` by image id, where 1 means train:

    awk 'NR==FNR {name[$1]=$2; next} {print name[$1], ($2==1 ? "train" : "test")}' \\
        CUB_200_2011/images.txt CUB_200_2011/train_test_split.txt > cub_split.txt

Cars196 (8,144 train, 8,041 test) comes as two flat folders, ``cars_train/`` and ``cars_test/``,
whose files share names (00001.jpg...). Copy them class-per-folder under new names, taking the class
and split from the devkit's ``cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat``:

    import shutil, scipy.io
    from pathlib import Path
    lines = []
    for split in ("train", "test"):
        mat = f"devkit/cars_{split}_annos{'_withlabels' if split == 'test' else ''}.mat"
        for a in scipy.io.loadmat(mat, squeeze_me=True)["annotations"]:
            rel = f"{int(a['class']):03d}/{split}_{a['fname']}"
            Path("cars196", rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f"cars_{split}/{a['fname']}", Path("cars196", rel))
            lines.append(f"{rel} {split}\\n")
    Path("cars_split.txt").write_text("".join(lines))

then ``--images cars196 --list-file cars_split.txt``. IRGen's released Cars list generator
prefixes the test images with ``cars_train/``, so it reads training-folder files under the test
images' names; this import reads each image from its own folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from genius.common.io import atomic_dir, atomic_write_json
from genius.common.mbeir import DID_BASE, QID_BASE, missing_image, parse_id, text_lines
from genius.common.stage import ArgumentParser, add_debug_flag, setup_logging, user_errors_exit

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

PROTOCOLS = ("holdout", "classes-half", "image-split", "inshop")
LIST_PROTOCOLS = {"inshop": "In-shop's list_eval_partition.txt",
                  "image-split": "a list of '<image path> <train|test>' lines (see --help)"}
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
TASK = 4  # qi -> ci
DEFAULT_DATASET_ID = 30  # clear of M-BEIR's 0-10 and the synthetic world's 20-22
MARKER = "import.json"
INSHOP_STATUSES = ("train", "query", "gallery")
SPLIT_STATUSES = ("train", "test")
HOLDOUT_MIN_IMAGES = 2  # one test query, and one database image for it to find
# What gives a protocol training queries, for the error when it has none.
NO_TRAINING_QUERY_FIX = {
    "holdout": "give classes three or more images (holdout keeps two of them in the database)",
    "classes-half": "give the classes of the first half (by name) two or more images",
    "image-split": "mark two or more images of a class as train in --list-file",
    "inshop": "give items two or more train images in --list-file (In-shop's own partition does)",
}
DIGITS_MARKER = ".sklearn_digits.json"  # hidden, so import-images does not take it for a class


class CollectionError(ValueError):
    """The image collection or its list file cannot be imported; the message names the file."""


@dataclass(frozen=True)
class Item:
    source: Path  # the image file read
    rel: str  # its path under --images, with '/': also its path under mbeir_images/NAME/
    label: str  # class folder name or In-shop item id


@dataclass
class Split:
    train: list[Item]  # the training pool
    pool: list[Item]  # what test queries search
    queries: list[Item]  # test queries (for classes-half, the pool itself)

    def training_queries(self) -> list[Item]:
        """The training images that have another image of their class to be retrieved."""
        sizes: dict[str, int] = defaultdict(int)
        for item in self.train:
            sizes[item.label] += 1
        return [item for item in self.train if sizes[item.label] > 1]


# ---- reading the collection --------------------------------------------------------------------
def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _check_utf8_name(path: Path) -> None:
    """Names go into the root's UTF-8 jsonl files and seed holdout's draw; a name that is not UTF-8
    (Python holds its bytes as surrogates) can be neither."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        kind = "folder" if path.is_dir() else "file"
        raise CollectionError(f"{shown}: the {kind} name is not valid UTF-8; rename the {kind} (the root's jsonl "
                              "files name every image in UTF-8)") from None


def _check_extension(path: Path) -> None:
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise CollectionError(f"{path}: not an image file (accepted: {', '.join(IMAGE_EXTENSIONS)}, any case); "
                              "remove it or move it out of the collection")


def read_class_folders(images: Path) -> dict[str, list[Item]]:
    """class name -> its images, sorted by name; every structural problem raises naming the path."""
    classes: dict[str, list[Item]] = {}
    for folder in _visible(images):
        if not folder.is_dir():
            raise CollectionError(f"{folder}: a file where class folders are expected (--images holds one folder per "
                                  "class, DIR/<class>/<image files>); move it out of the folder")
        _check_utf8_name(folder)
        items = []
        for path in _visible(folder):
            _check_utf8_name(path)
            if path.is_dir():
                raise CollectionError(f"{path}: a folder inside class folder {folder.name!r}; a class folder holds "
                                      "image files only (move the images up or make the subfolder its own class)")
            _check_extension(path)
            items.append(Item(path, f"{folder.name}/{path.name}", folder.name))
        if not items:
            raise CollectionError(f"{folder}: empty class folder (no image files); add images or remove the folder")
        classes[folder.name] = items
    if len(classes) < 2:
        raise CollectionError(f"{images}: {len(classes)} class folder(s); retrieval by class needs at least 2 "
                              "(--images holds one folder per class, DIR/<class>/<image files>)")
    return classes


def _list_lines(list_file: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a list file, without the UTF-8 byte-order mark some Windows editors
    put at its start (an invisible first character of the first path or count)."""
    for lineno, line in text_lines(list_file):
        yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line


def _check_listed_path(rel: str, list_file: Path, lineno: int) -> None:
    """A listed image path names a file under --images and becomes its path under
    mbeir_images/NAME/, so an absolute path or a '.' or '..' part would reach outside both."""
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise CollectionError(f"{list_file}:{lineno}: image path {rel!r} must be relative and lie under --images, "
                              "without '.', '..' or empty parts (<folder>/<file>); write it relative to --images")


def read_inshop_list(list_file: Path, images: Path) -> list[tuple[Item, str]]:
    """(image, status) for every line of In-shop's list_eval_partition.txt: a count, a header, then
    ``image_name item_id evaluation_status`` lines."""
    entries: list[tuple[Item, str]] = []
    seen: dict[str, int] = {}
    declared = None
    for lineno, line in _list_lines(list_file):
        fields = line.split()
        if lineno == 1:
            if len(fields) != 1 or not fields[0].isdigit():
                raise CollectionError(f"{list_file}:1: expected the number of images, got {line.strip()!r}; "
                                      "--list-file takes In-shop's list_eval_partition.txt")
            declared = int(fields[0])
            continue
        if lineno == 2 or not fields:
            continue  # the header line 'image_name item_id evaluation_status'
        if len(fields) != 3 or fields[2] not in INSHOP_STATUSES:
            raise CollectionError(f"{list_file}:{lineno}: expected 'image_name item_id evaluation_status' with a "
                                  f"status of {', '.join(INSHOP_STATUSES)}, got {line.strip()!r}")
        rel, item_id, status = fields
        _check_listed_path(rel, list_file, lineno)
        if rel in seen:
            raise CollectionError(f"{list_file}:{lineno}: image {rel} is listed again (first on line {seen[rel]})")
        seen[rel] = lineno
        source = images / rel
        problem = missing_image(rel, images)
        if problem:
            raise CollectionError(f"{list_file}:{lineno}: {problem}; --images takes the folder the list's image "
                                  "names are relative to")
        _check_extension(source)
        entries.append((Item(source, rel, item_id), status))
    if declared is None:
        raise CollectionError(f"{list_file}: empty file; --list-file takes In-shop's list_eval_partition.txt")
    if declared != len(entries):
        raise CollectionError(f"{list_file}:1: declares {declared} images but lists {len(entries)}; the file is "
                              "incomplete or edited, restore it")
    return entries


def read_split_list(list_file: Path, classes: dict[str, list[Item]]) -> list[tuple[Item, str]]:
    """(image, status) for every ``<image path> <train|test>`` line; every image of the collection
    must be listed once."""
    collection = {item.rel: item for items in classes.values() for item in items}
    entries: list[tuple[Item, str]] = []
    seen: dict[str, int] = {}
    for lineno, line in _list_lines(list_file):
        if not line.strip():
            continue
        fields = line.strip().rsplit(None, 1)  # the path may hold spaces, the status cannot
        if len(fields) != 2 or fields[1] not in SPLIT_STATUSES:
            raise CollectionError(f"{list_file}:{lineno}: expected '<image path> <train|test>', got "
                                  f"{line.strip()!r}")
        rel, status = fields
        _check_listed_path(rel, list_file, lineno)
        if rel in seen:
            raise CollectionError(f"{list_file}:{lineno}: image {rel} is listed again (first on line {seen[rel]})")
        seen[rel] = lineno
        if rel not in collection:
            raise CollectionError(f"{list_file}:{lineno}: image {rel} is not an image of the collection under "
                                  "--images (paths are <class folder>/<file>, relative to --images)")
        entries.append((collection[rel], status))
    unlisted = [rel for rel in collection if rel not in seen]
    if unlisted:
        raise CollectionError(f"{list_file}: {len(unlisted)} image(s) under --images are not listed, the first "
                              f"{unlisted[0]}; a split names every image, so add them as train or test, or move "
                              "them out of --images")
    return entries


# ---- protocols -----------------------------------------------------------------------------------
def split_holdout(classes: dict[str, list[Item]], fraction: float, seed: int) -> Split:
    train, queries = [], []
    for label, items in classes.items():
        if len(items) < HOLDOUT_MIN_IMAGES:
            raise CollectionError(f"{items[0].source.parent}: class {label!r} has {len(items)} image(s); the holdout "
                                  f"protocol needs at least {HOLDOUT_MIN_IMAGES} (a test query, and a database image "
                                  "for it to find); add images or remove the class")
        # Two stay in the database when the class can spare them, so that its training queries have a positive.
        count = min(max(1, round(fraction * len(items))), max(1, len(items) - 2))
        # Seeded per class: adding or removing a class leaves the other classes' split unchanged.
        held = set(random.Random(f"{seed}/{label}").sample(range(len(items)), count))
        queries += [item for i, item in enumerate(items) if i in held]
        train += [item for i, item in enumerate(items) if i not in held]
    return Split(train, train, queries)


def split_classes_half(classes: dict[str, list[Item]]) -> Split:
    names = sorted(classes)
    first = (len(names) + 1) // 2
    train = [item for name in names[:first] for item in classes[name]]
    test = [item for name in names[first:] for item in classes[name]]
    return Split(train, test, test)


def by_status(entries: list[tuple[Item, str]], statuses: tuple[str, ...], list_file: Path,
              need: str) -> dict[str, list[Item]]:
    """The listed images per status; a status without images is an error (``need`` says why)."""
    grouped = {status: [item for item, s in entries if s == status] for status in statuses}
    for status, items in grouped.items():
        if not items:
            raise CollectionError(f"{list_file}: no image has status '{status}'; {need}")
    return grouped


def split_inshop(entries: list[tuple[Item, str]], list_file: Path) -> Split:
    split = by_status(entries, INSHOP_STATUSES, list_file, "In-shop's partition needs train, query and gallery images")
    return Split(split["train"], split["gallery"], split["query"])


def split_images(entries: list[tuple[Item, str]], list_file: Path) -> Split:
    split = by_status(entries, SPLIT_STATUSES, list_file,
                      "the split needs train images (the database) and test images (the queries)")
    return Split(split["train"], split["train"], split["test"])


# ---- records -------------------------------------------------------------------------------------
def query_records(queries: list[Item], pool: list[Item], did_of: dict[str, str], qid_of, name: str, what: str
                  ) -> list[dict]:
    """Query records with class-level positives in ``pool``; a query's own image is excluded."""
    pool_dids: dict[str, list[str]] = defaultdict(list)
    for item in pool:
        pool_dids[item.label].append(did_of[item.rel])
    in_pool = {item.rel for item in pool}
    records = []
    for n, item in enumerate(queries):
        own = [did_of[item.rel]] if item.rel in in_pool else []
        positives = [did for did in pool_dids.get(item.label, []) if did not in own]
        if not positives:
            raise CollectionError(f"{item.source}: no other image of class {item.label!r} in the {what}, so this "
                                  "query would have no positive; add images of the class or remove it")
        records.append({"qid": qid_of(n), "query_txt": None, "query_img_path": f"mbeir_images/{name}/{item.rel}",
                        "query_modality": "image", "query_src_content": None, "pos_cand_list": positives,
                        "neg_cand_list": [], "task_id": TASK, "exclude_cand_list": own})
    return records


def candidate_records(pool: list[Item], did_of: dict[str, str], name: str) -> list[dict]:
    return [{"did": did_of[item.rel], "txt": None, "img_path": f"mbeir_images/{name}/{item.rel}",
             "modality": "image", "src_content": None} for item in pool]


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def qrels_text(records: list[dict]) -> str:
    return "".join(f"{r['qid']} 0 {did} 1 {TASK}\n" for r in records for did in r["pos_cand_list"])


def root_files(split: Split, name: str, dataset_id: int) -> dict[str, str]:
    """Every text file of the root, by path relative to it."""
    unique = list({item.rel: item for item in split.train + split.pool + split.queries}.values())
    did_of = {item.rel: f"{dataset_id}:{n}" for n, item in enumerate(unique)}
    training_queries = split.training_queries()
    if len(unique) > DID_BASE or len(split.queries) + len(training_queries) > QID_BASE:
        raise CollectionError(f"{len(unique):,} images and {len(split.queries) + len(training_queries):,} queries "
                              f"do not fit UniIR's id hashing (at most {DID_BASE:,} candidates and {QID_BASE:,} "
                              "queries per dataset id); import a subset")
    test = query_records(split.queries, split.pool, did_of, lambda n: f"{dataset_id}:{n}", name, "test pool")
    first_train = len(split.queries)  # training qids follow the test ones: qids are unique across the root
    train = query_records(training_queries, split.train, did_of, lambda n: f"{dataset_id}:{first_train + n}", name,
                          "training images")
    stem = f"mbeir_{name}_task{TASK}"
    return {
        f"query/train/{stem}_train.jsonl": jsonl(train),
        "cand_pool/global/mbeir_union_train_cand_pool.jsonl": jsonl(candidate_records(split.train, did_of, name)),
        f"query/test/{stem}_test.jsonl": jsonl(test),
        f"cand_pool/local/{stem}_cand_pool.jsonl": jsonl(candidate_records(split.pool, did_of, name)),
        f"qrels/test/{stem}_test_qrels.txt": qrels_text(test),
    }


def to_rgb(image: Image.Image, source: str | os.PathLike) -> Image.Image:
    """``image`` (read from ``source``) as 8-bit RGB (:func:`eight_bit`, then ``convert``): how import
    checks an image and extraction reads it."""
    return eight_bit(image, source).convert("RGB")


def eight_bit(image: Image.Image, source: str | os.PathLike) -> Image.Image:
    """``image`` (read from ``source``) in a mode Pillow converts to RGB as it is meant: itself for
    8-bit modes. Pillow's own ``convert("RGB")`` clips 16-bit grey levels at 255, so that most come
    out white, and truncates float pixels (mode F, often in [0, 1]) to black; 16-bit images are
    scaled to 8 bits, and float images, whose range no file records, are refused."""
    if image.mode == "F":
        raise CollectionError(f"{source}: a float image (Pillow mode F), whose pixel range is unknown; convert it to "
                              "an 8-bit image (e.g. PNG or JPEG)")
    if image.mode.startswith("I"):  # I;16, I;16B...: 16-bit; I: 32-bit, in which some readers hold 16-bit values
        import numpy as np
        from PIL import Image

        pixels = np.asarray(image)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise CollectionError(f"{source}: 32-bit integer pixels outside the 16-bit range 0..65535 (Pillow mode "
                                  f"{image.mode}); convert it to an 8-bit image (e.g. PNG or JPEG)")
        image = Image.fromarray(np.round(pixels / 257).astype(np.uint8))  # 65535 / 257 = 255
    return image


def copy_image(item: Item, target: Path) -> None:
    """Copy one image byte for byte after checking that it decodes whole and converts to RGB, as
    extraction will read it."""
    from PIL import Image

    try:
        with Image.open(item.source) as image:
            image.load()
            to_rgb(image, item.source)
    except CollectionError:
        raise  # decodes, but in a mode that cannot be read as RGB: to_rgb says what to do
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        detail = " ".join((str(err).strip() or type(err).__name__).split())
        raise CollectionError(f"{item.source}: cannot be decoded as an image ({detail}); replace it with a complete "
                              "image file or remove it") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(item.source, target)


# ---- the command ---------------------------------------------------------------------------------
def _check_options(images: Path, out: Path, name: str, protocol: str, query_fraction: float, seed: int,
                   list_file: Path | None, dataset_id: int, force: bool) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if not re.fullmatch(r"[a-z0-9]+", name):
        raise ValueError(f"--name: {name!r} must be lower-case letters and digits (it goes into the file names "
                         f"mbeir_<name>_task{TASK}_<split>.jsonl)")
    if not 0 < query_fraction < 1:
        raise ValueError(f"--query-fraction: {query_fraction} is out of range; it must be in (0, 1)")
    for option, value in (("--seed", seed), ("--dataset-id", dataset_id)):
        if value < 0:
            raise ValueError(f"{option}: {value} is out of range; it must be an integer >= 0")
    for base, what in ((QID_BASE, "qid"), (DID_BASE, "did")):
        try:  # the largest id the import may write; check-data refuses one past UniIR's 64-bit hashing
            parse_id(f"{dataset_id}:{base - 1}", base, what)
        except ValueError as err:
            raise ValueError(f"--dataset-id: {dataset_id} is out of range ({err}); choose a smaller id") from None
    if not images.is_dir():
        raise ValueError(f"--images {images}: not a folder; give the folder of class folders (DIR/<class>/<images>)")
    if (protocol in LIST_PROTOCOLS) != (list_file is not None):
        raise ValueError("--list-file: required with --protocol inshop (In-shop's list_eval_partition.txt) and "
                         "image-split ('<image path> <train|test>' lines), used by no other protocol")
    if list_file is not None and not list_file.is_file():
        raise ValueError(f"--list-file {list_file}: no such file; give {LIST_PROTOCOLS[protocol]}")
    if out == images or out.is_relative_to(images):
        raise ValueError(f"--out {out}: inside --images {images}; write the root somewhere else")
    if out.exists():
        if not force:
            raise FileExistsError(f"--out {out}: exists; choose another folder, or pass --force to replace it")
        if not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file()):
            raise ValueError(f"--out {out}: exists and was not written by genius import-images (no {MARKER}); "
                             "--force only replaces an imported root, so remove it yourself or choose another folder")


def import_images(images: str | os.PathLike, out: str | os.PathLike, name: str, protocol: str,
                  query_fraction: float = 0.2, seed: int = 0, list_file: str | os.PathLike | None = None,
                  dataset_id: int = DEFAULT_DATASET_ID, force: bool = False) -> dict:
    """Write the root; returns what ``import.json`` records."""
    images, out = Path(images).expanduser().resolve(), Path(out).expanduser().resolve()
    list_file = Path(list_file).expanduser().resolve() if list_file is not None else None
    _check_options(images, out, name, protocol, query_fraction, seed, list_file, dataset_id, force)
    if protocol == "inshop":
        split = split_inshop(read_inshop_list(list_file, images), list_file)
    elif protocol == "image-split":
        split = split_images(read_split_list(list_file, read_class_folders(images)), list_file)
    elif protocol == "classes-half":
        split = split_classes_half(read_class_folders(images))
    else:
        split = split_holdout(read_class_folders(images), query_fraction, seed)
    if not split.training_queries():
        raise CollectionError(f"{list_file or images}: no training query: none of the {len(split.train)} training "
                              "images has another image of its class among them to retrieve, so the setting has "
                              f"nothing to train on; {NO_TRAINING_QUERY_FIX[protocol]}")
    files = root_files(split, name, dataset_id)
    queried = {item.rel for item in split.training_queries()}
    lonely = [item for item in split.train if item.rel not in queried]
    if lonely:
        log.warning("%d training image(s) are the only image of their class among the training images (the first: "
                    "%s, class %r); they stay in the training pool but are no training queries, having no positive",
                    len(lonely), lonely[0].source, lonely[0].label)
    summary = {
        "generator": "genius import-images", "format_version": 1, "name": name, "dataset_id": dataset_id,
        "task_id": TASK, "protocol": protocol, "seed": seed,
        "query_fraction": query_fraction if protocol == "holdout" else None,
        "images": str(images), "list_file": str(list_file) if list_file else None,
        "counts": {"train_images": len(split.train), "training_queries": len(split.train) - len(lonely),
                   "test_pool": len(split.pool), "test_queries": len(split.queries),
                   "images_copied": len({item.rel for item in split.train + split.pool + split.queries})},
        "classes": {"train": sorted({item.label for item in split.train}),
                    "test": sorted({item.label for item in split.queries})},
        "files": sorted(files),
    }
    with atomic_dir(out) as tmp:
        for item in {item.rel: item for item in split.train + split.pool + split.queries}.values():
            copy_image(item, tmp / "mbeir_images" / name / item.rel)
        for rel, text in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text, encoding="utf-8")
        atomic_write_json(tmp / MARKER, summary)
    return summary


# ---- real data: scikit-learn's digits ------------------------------------------------------------
def write_sklearn_digits(out_dir: str | os.PathLike, size: int = 32) -> Path:
    """scikit-learn's bundled handwritten digits (1,797 images, 8x8, 16 grey levels) as a
    class-per-folder collection ``<digit>/<index:04d>.png``, upscaled (nearest) to ``size`` px, RGB.
    ``out_dir`` is replaced whole; it is refused when it holds anything but such a collection."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size: {size!r} is out of range; it must be an integer >= 8 (the digits are 8x8)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / DIGITS_MARKER).is_file())):
        raise ValueError(f"{out_dir}: exists and is not a digits folder; choose another folder or remove it")
    digits = load_digits()
    grey = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    with atomic_dir(out_dir) as tmp:
        for index, (pixels, label) in enumerate(zip(grey, digits.target)):
            folder = tmp / str(int(label))
            folder.mkdir(exist_ok=True)
            image = Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)
            image.convert("RGB").save(folder / f"{index:04d}.png")
        atomic_write_json(tmp / DIGITS_MARKER, {"source": "sklearn.datasets.load_digits", "images": len(grey),
                                                "size": size})
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="genius import-images", description=__doc__.split("\n\n")[0],
                            epilog=__doc__[__doc__.index("The image-split list file"):],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, type=Path,
                        help="the collection: one folder per class (inshop: the folder the list's names are under)")
    parser.add_argument("--out", required=True, type=Path, help="the M-BEIR-layout root to write")
    parser.add_argument("--name", required=True, help="lower-case letters and digits; names the files")
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS,
                        help="holdout: per-class held-out queries against the rest; classes-half: first half of "
                             "the classes train, second half test against itself; image-split: the --list-file's "
                             "test images against its train images; inshop: In-shop's partition")
    parser.add_argument("--query-fraction", type=float, default=0.2,
                        help="holdout: share of each class's images that become test queries (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="holdout's draw of test queries (default 0)")
    parser.add_argument("--list-file", type=Path, default=None,
                        help="inshop: list_eval_partition.txt; image-split: '<image path> <train|test>' lines")
    parser.add_argument("--dataset-id", type=int, default=DEFAULT_DATASET_ID,
                        help=f"the dataset part of every qid and did (default {DEFAULT_DATASET_ID})")
    parser.add_argument("--force", action="store_true", help="replace an existing root written by this command")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    setup_logging()
    with user_errors_exit(parser):
        summary = import_images(args.images, args.out, args.name, args.protocol, args.query_fraction, args.seed,
                                args.list_file, args.dataset_id, args.force)
    counts = summary["counts"]
    print(f"wrote {args.out} ({args.protocol}): {counts['train_images']} training images "
          f"({counts['training_queries']} training queries), {counts['test_queries']} test queries against {counts['test_pool']} candidates, {len(summary['classes']['train'])} training "
          f"classes, {len(summary['classes']['test'])} test classes")
    print(f"next: genius check-data --root {args.out}   then: genius new-setting --root {args.out} --out "
          f"configs_scripts/{args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
