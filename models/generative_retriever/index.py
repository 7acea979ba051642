"""``genius index``: a living index folder that a finished run serves, kept current without retraining.

    genius index build --run results/demo [--pool STEM] --out my_index
    genius index add --index my_index --pool new_items.jsonl [--data-root DIR]
    genius index remove --index my_index --ids gone.txt
    genius index stats --index my_index [--json]

New candidates need no new model: the run's stage-0 encoder embeds them, its frozen quantizer
gives them semantic IDs (level 0 from the candidate's modality when the quantizer has a modality
level, as assign-codes does) and the generator can decode any ID the trie allows.

Folder format::

    <index>/CURRENT                    one line: the current version's folder name
    <index>/v000001/, v000002/, ...    complete versions, never modified once in place
    <index>/.lock                      held by the one writer (common.runstate's folder lock)

Each version holds ``manifest.json`` (format and version numbers, parent, creation time, the run
it serves with its model and encoder fingerprints, codebook sizes, modality mode, counts, the
operations that made it), ``ids.npy`` (int64 hashed dids, the row order of every other array),
``records.jsonl`` (the candidates' pool records, row order), ``codes.npy`` [N, L], ``trie.bin``
(the project's binary trie), ``fused.npy`` (fp16 fused CLIP-SF embeddings: GENIUS^R and dense),
``modality.npy`` (int8 modality codes), ``trained.npy`` (bool: present at the initial build, i.e.
seen by the models; the drift report compares the rest against them) and ``qerror.npy``
(float32 ||z - decode(codes)||^2 per row). :meth:`IndexVersion.pool` opens a version as the
``pool_assets.Pool`` that ``ranking`` and ``api.Retriever`` search.

``build`` copies the run's pool (records, codes, trie, fused cache) and runs the quantizer once over
the pool's stored vectors for ``qerror.npy`` (the Combiner's cost of assign-codes). ``add`` refuses
the whole file, changing nothing, when a did is already indexed or repeats, a record is malformed,
a candidate's modality is not one the index holds, or the run's checkpoints or encoder changed
since the build (their fingerprints); ``remove`` when a did is unknown or repeats. The drift
report (``stats``) compares the added rows with the rows the models saw: collision rate and
largest bucket, the share whose full ID no trained row has, codes in use per level, and the mean
squared quantization error.

A writer holds the lock, builds the new version in a hidden temporary folder, renames it into
place, and only then replaces CURRENT (written to a temporary file, fsynced, renamed); so a reader
that reads CURRENT and opens that folder never sees a half-written version, and an error or a
killed writer leaves CURRENT on the previous version (a killed writer's temporary folder is
removed by the next writer). The last ``KEEP_VERSIONS`` versions are kept, so a reader that opened
a version just before a switch can still finish.

The trie is rebuilt over all codes on every add and remove rather than kept as a base trie plus
a delta merged in the background: the C++ build over random IDs of the paper's shape
([3] + [4096] * 8) takes 0.4 s (save 0.14 s) at 10^6 IDs and 4.4 s (save 2.2 s) at 10^7, one core
(``benchmarks/index_trie_build.py``), while a delta would put a second lookup into every step of
the decoding loop. What does grow with the index is the copy: every version holds all rows, so an
add or remove rewrites N x D fp16 vectors (15 GB at 10^7 x 768); sharing unchanged rows between
versions (segment files) is the step to take when that matters.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable

import numpy as np
import torch

import genius.trie_cpp as trie_lib
from genius.common.config import load_config, project_root_set_to, resolve_path
from genius.common.fusion import score_fusion
from genius.common.io import atomic_path, file_record, is_recorded_file, read_json_object, sha256_file, sha256_json
from genius.common.mbeir import (
    MODALITIES, MODALITY_CODE, first_line_with, format_string, hash_did, iter_candidates, iter_jsonl, text_lines,
)
from genius.common.runstate import acquire_lock, content_sha256, portable_path, release_lock
from genius.common.stage import ArgumentParser, add_debug_flag, setup_logging, user_errors_exit
from genius.models.generative_retriever.pool_assets import Pool, open_pool
from genius.models.generative_retriever.retrieval import CandidateMap
from genius.models.generative_retriever.run_models import Models, StaleInputError, checkpoint_files, model_fingerprints

log = logging.getLogger("genius.index")

FORMAT_VERSION = 1
KEEP_VERSIONS = 3
CURRENT = "CURRENT"
VERSION_NAME = re.compile(r"^v(\d{6})$")
ARRAY_FILES = ("ids.npy", "codes.npy", "fused.npy", "modality.npy", "trained.npy", "qerror.npy")
FILES = ("manifest.json", "records.jsonl", "trie.bin", *ARRAY_FILES)


class IndexUserError(ValueError):
    """A refused index operation; the message names the file (and line or did) and what to do."""


# ---- the run an index serves --------------------------------------------------------------------
Quantize = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                    tuple[np.ndarray, np.ndarray]]


@dataclass
class RunContext:
    """A finished run (``api.load_manifest``'s manifest and its eval config), with what the index
    needs from it loaded on first use: the models (to open its pool), the frozen quantizer
    (``quantize(img, txt, img_mask, txt_mask, modality) -> (codes int64 [n, L], ||z - decode||^2
    float32 [n])``) and the stage-0 encoder. Tests pass stand-ins for all three."""

    manifest: dict
    cfg: object  # evaluate.EvalConfig
    checkpoint_fingerprints: dict  # run_models.model_fingerprints of the checkpoints on disk now
    device: torch.device = torch.device("cpu")
    models: Models | None = None
    quantize: Quantize | None = None
    encoder: object | None = None
    modality_level: bool | None = None

    def load(self) -> "RunContext":
        """Load whichever of models, quantizer and encoder were not given."""
        from genius.models.generative_retriever.api import build_encoder
        from genius.models.generative_retriever.run_models import load_models
        from genius.models.residual_quantization.assign_codes import load_quantizer

        with project_root_set_to(self.manifest["root"]):
            if self.models is None:
                self.models = load_models(self.cfg, self.device)
            if self.encoder is None:
                self.encoder = build_encoder(self.manifest["encoder"], self.device)
            if self.quantize is None:
                rq, _ = load_quantizer(checkpoint_files(self.cfg.paths)[0])
                self.quantize, self.modality_level = rq_quantize(rq.to(self.device).eval()), rq.has_modality_level
        return self

    def data_root(self) -> Path:
        with project_root_set_to(self.manifest["root"]):
            return resolve_path(self.manifest["data_root"])

    def encoder_identity(self) -> dict:
        """The stage-0 encoder of the run's stores; its fingerprint covers what the vectors depend on
        (name, encoder config, stored precision), not the extraction's batch size or device."""
        from genius.models.generative_retriever.api import encoder_weights

        enc = self.manifest["encoder"]
        config = enc.get("extraction", {}).get("encoder")
        return {"name": enc["name"], "dtype": enc.get("dtype"), "extraction": enc.get("extraction", {}),
                "fingerprint": sha256_json({"name": enc["name"], "encoder": config, "dtype": enc.get("dtype")}),
                "embedded_with": encoder_weights(enc)}


def load_run(run: str | Path, device: str = "cpu") -> RunContext:
    """The run of a results folder (run.json) or a setting's config folder; nothing heavy is loaded yet."""
    from genius.models.generative_retriever.api import load_manifest
    from genius.models.generative_retriever.evaluate import EvalConfig

    manifest = load_manifest(run)
    with project_root_set_to(manifest["root"]):
        cfg = load_config(EvalConfig, resolve_path(manifest["config"]))
        fingerprints = model_fingerprints(cfg.paths)
    return RunContext(manifest, cfg, fingerprints, torch.device(device))


def rq_quantize(rq) -> Quantize:
    """The quantizer's IDs and squared reconstruction error for raw stage-0 vectors."""

    @torch.no_grad()
    def quantize(img, txt, img_mask, txt_mask, modality):
        z = rq.embed(img, txt, img_mask, txt_mask)
        codes = rq.encode(z, modality.to(z.device))
        error = (z - rq.decode(codes).float()).pow(2).sum(-1)
        return codes.cpu().numpy().astype(np.int64), error.cpu().numpy().astype(np.float32)

    return quantize


def quantize_rows(run: RunContext, img, txt, img_mask, txt_mask, modality, batch: int = 4096):
    """``run.quantize`` over arrays (or memmaps) in batches: (codes [N, L], errors [N])."""
    codes, errors = [], []
    for start in range(0, len(modality), batch):
        rows = slice(start, start + batch)
        part = [torch.from_numpy(np.asarray(a[rows], np.float32)) for a in (img, txt, img_mask, txt_mask)]
        c, e = run.quantize(*part, torch.from_numpy(np.asarray(modality[rows], np.int64)))
        codes.append(c)
        errors.append(e)
    return np.concatenate(codes), np.concatenate(errors)


# ---- reading ------------------------------------------------------------------------------------
@dataclass
class VersionStore:
    """What retrieval reads of a pool's ``EmbeddingStore``, for an index version: ids, dim, row
    lookup, modalities."""

    ids: np.ndarray
    dim: int
    modality: np.ndarray
    path: Path  # the version folder (where a pool's manifest entry says its store lies)

    @property
    def arrays(self):
        return SimpleNamespace(ids=self.ids, modality=self.modality)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        order = np.argsort(self.ids, kind="stable")
        pos = np.searchsorted(self.ids[order], ids).clip(max=max(len(order) - 1, 0))
        if not len(order) or (self.ids[order][pos] != ids).any():
            raise IndexUserError("some ids are not in this index version")
        return order[pos]


@dataclass
class IndexVersion:
    """One complete version of an index folder, its arrays memory-mapped."""

    path: Path
    manifest: dict
    arrays: dict = field(default_factory=dict)  # ARRAY_FILES stem -> array
    trie: object = None

    @property
    def name(self) -> str:
        return self.path.name

    def __len__(self) -> int:
        return len(self.arrays["ids"])

    def pool(self) -> Pool:
        """This version as the pool ``ranking.rank``, ``GeniusIndex`` and ``api.Retriever`` search."""
        fused = self.arrays["fused"]
        store = VersionStore(np.asarray(self.arrays["ids"]), fused.shape[1], np.asarray(self.arrays["modality"]),
                             self.path)
        cmap = CandidateMap.build(self.trie, np.asarray(self.arrays["codes"]))
        return Pool("index", self.path / "records.jsonl", self.name, store, self.path, self.manifest["codes_hash"],
                    self.path / "trie.bin", self.trie, cmap, self.path, _fused=fused)

    def content_id(self) -> dict:
        """What a search over this version depends on besides the models: its rows (ids), their IDs
        (codes) and the encoder of their vectors; the name tells versions of equal rows apart."""
        return {"version": self.name, "codes": self.manifest["codes_hash"], "ids": sha256_file(self.path / "ids.npy"),
                "encoder": self.manifest["encoder"]["fingerprint"]}

    def check_models(self, models: Models) -> None:
        """Refuse to search this version with models other than the ones its IDs were assigned for."""
        if models.fingerprints != self.manifest["fingerprints"]:
            files = ", ".join(dict.fromkeys(models.files.values())) or "the loaded models"
            raise StaleInputError(f"{self.path / 'manifest.json'}: the index serves the models "
                                  f"{self.manifest['fingerprints']}, {files} are {models.fingerprints}; search it "
                                  "with the run it was built from, or build a new index (genius index build)")


def is_index(path: str | Path) -> bool:
    """Whether ``path`` is an index folder (it has CURRENT), as opposed to a results or setting folder."""
    return (Path(path) / CURRENT).is_file()


def run_results(manifest: dict) -> Path:
    """The results folder of the run an index version serves (its manifest's ``run``)."""
    with project_root_set_to(manifest["run"]["root"]):
        return resolve_path(manifest["run"]["results"])


def version_number(name: str) -> int | None:
    match = VERSION_NAME.match(name)
    return int(match[1]) if match else None


def current_name(index: Path) -> str:
    path = index / CURRENT
    if not path.is_file():
        raise IndexUserError(f"{index}: not an index folder (no {CURRENT} file); make one with genius index build")
    try:
        name = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        name = path.read_bytes()[:40].decode("utf-8", "backslashreplace")
    if version_number(name) is None:
        raise IndexUserError(f"{path}: names {name!r}, not a version folder; the file was edited by hand, "
                             "write the name of an intact version (v000001, ...) into it")
    return name


def open_version(index: str | Path, name: str | None = None, backend: str | None = None) -> IndexVersion:
    """The current version of ``index`` (or version ``name``), checked complete: every file present,
    manifest counts equal to the array lengths. ``backend``: the trie backend (default: the index's)."""
    index = Path(index)
    path = index / (name or current_name(index))
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise IndexUserError(f"{path / missing[0]}: missing from this index version; restore the folder or write "
                             f"an intact version's name into {index / CURRENT}")
    manifest = read_json_object(path / "manifest.json", "restore the folder or write an intact version's name into "
                                f"{index / CURRENT}", IndexUserError)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexUserError(f"{path / 'manifest.json'}: index format {manifest.get('format_version')!r} is not "
                             f"supported (expected {FORMAT_VERSION}); build the index again")
    if content_sha256(path / "codes.npy") != manifest.get("codes_hash"):  # the IDs the trie and the results use
        raise IndexUserError(f"{path / 'codes.npy'}: its SHA-256 is not the one the manifest records; the version "
                             "was modified after it was written, build the index again")
    arrays = {}
    for name in ARRAY_FILES:
        try:
            arrays[name.removesuffix(".npy")] = np.load(path / name, mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:  # truncated, not .npy, object arrays
            raise IndexUserError(f"{path / name}: cannot be read ({' '.join(str(err).split())[:120]}); the version was "
                                 "modified after it was written, build the index again") from None
    count = manifest["counts"]["candidates"]
    wrong = [k for k, a in arrays.items() if len(a) != count]
    if wrong:
        raise IndexUserError(f"{path / (wrong[0] + '.npy')}: {len(arrays[wrong[0]])} rows, the manifest says {count}; "
                             "the version was modified after it was written, build the index again")
    files = manifest.get("files") or {}  # none: a version written before the files were recorded
    changed = [name for name in FILES if name in files and not is_recorded_file(path / name, files[name])]
    if changed:
        raise IndexUserError(f"{path / changed[0]}: not the file the manifest records (its size, time and SHA-256); "
                             "the version was modified after it was written, build the index again")
    trie = trie_lib.load_trie(path / "trie.bin", backend or manifest["trie_backend"])
    return IndexVersion(path, manifest, arrays, trie)


# ---- writing ------------------------------------------------------------------------------------
@dataclass
class Rows:
    """The rows of a version being written (row order of every array and of the records)."""

    ids: np.ndarray
    codes: np.ndarray
    fused: np.ndarray
    modality: np.ndarray
    trained: np.ndarray
    qerror: np.ndarray
    records: Iterable[str]  # one JSON line per row, without the newline


class IndexWriter:
    """The lock of an index folder and the one way a version becomes current (module docstring)."""

    def __init__(self, index: Path, holder: str):
        self.index, self.holder = index, holder

    def __enter__(self) -> "IndexWriter":
        self.fd = acquire_lock(self.index, self.holder)
        for stale in self.index.glob(".v*.tmp"):  # left by a killed writer: never renamed, never current
            shutil.rmtree(stale, ignore_errors=True)
        return self

    def __exit__(self, *exc) -> None:
        release_lock(self.fd)

    def versions(self) -> list[str]:
        return sorted((p.name for p in self.index.iterdir() if version_number(p.name) is not None), key=version_number)

    def publish(self, rows: Rows, manifest: dict, backend: str) -> str:
        """Write ``rows`` as the next version, make it current and prune old versions; its name."""
        existing = self.versions()
        name = f"v{(version_number(existing[-1]) if existing else 0) + 1:06d}"
        tmp = self.index / f".{name}.{os.getpid()}.tmp"  # unique: one writer at a time, stale ones removed
        tmp.mkdir()
        try:
            write_version_files(tmp, rows, {"format_version": FORMAT_VERSION, "version": version_number(name)} | manifest,
                                backend)
            os.rename(tmp, self.index / name)
        except OSError as err:  # a full disk's error names no file
            raise IndexUserError(f"{err.filename or tmp}: {err.strerror or err} while writing version {name}; "
                                 f"{CURRENT} still names the previous version, so free space (or the cause) and "
                                 "run the command again") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        write_current(self.index, name)
        for old in self.versions()[:-KEEP_VERSIONS]:
            shutil.rmtree(self.index / old, ignore_errors=True)
        return name


def write_version_files(folder: Path, rows: Rows, manifest: dict, backend: str) -> None:
    for name in ARRAY_FILES:
        _save_synced(folder / name, getattr(rows, name.removesuffix(".npy")))
    count = 0
    with open(folder / "records.jsonl", "w") as f:
        for line in rows.records:
            f.write(line + "\n")
            count += 1
        _sync(f)
    assert count == len(rows.ids), f"{count} records for {len(rows.ids)} rows"
    save_trie(rows.codes, folder / "trie.bin", backend)
    manifest["codes_hash"] = sha256_file(folder / "codes.npy")
    # every file but the manifest, so that none is used once changed (open_version); the publishing
    # rename keeps their times
    manifest["files"] = {name: file_record(folder / name) for name in FILES if name != "manifest.json"}
    manifest["counts"] = {"candidates": int(len(rows.ids)), "trained": int(rows.trained.sum()),
                          "added": int(len(rows.ids) - rows.trained.sum()),
                          "distinct_ids": int(len(np.unique(rows.codes, axis=0))) if len(rows.codes) else 0}
    manifest["modalities"] = [MODALITIES[m] for m in np.unique(rows.modality)]
    with open(folder / "manifest.json", "w") as f:  # last: a folder with a manifest has every other file
        f.write(json.dumps(manifest, indent=2, default=str) + "\n")
        _sync(f)


def save_trie(codes: np.ndarray, path: Path, backend: str) -> None:
    trie_lib.build_trie(np.asarray(codes), backend).save(path)
    with open(path, "rb+") as f:
        _sync(f)


def write_current(index: Path, name: str) -> None:
    with atomic_path(index / CURRENT) as tmp:
        with open(tmp, "w") as f:
            f.write(name + "\n")
            _sync(f)
    dir_fd = os.open(index, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def _save_synced(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array))
        _sync(f)


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def base_manifest(run: RunContext | None, parent: dict | None, operation: dict) -> dict:
    """The manifest fields a new version inherits (from ``parent``) or takes from the run (build)."""
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    operation = {"time": created, **operation}
    if parent is not None:
        keep = {k: v for k, v in parent.items() if k not in ("version", "created", "parent", "operations")}
        return {**keep, "created": created, "parent": f"v{parent['version']:06d}",
                "operations": parent["operations"] + [operation]}
    return {"format_version": FORMAT_VERSION, "created": created, "parent": None,
            "run": {"results": portable_path(Path(run.manifest["path"]).parent), "root": run.manifest["root"]},
            "fingerprints": run.manifest["fingerprints"], "checkpoint_fingerprints": run.checkpoint_fingerprints,
            "encoder": run.encoder_identity(), "trie_backend": run.cfg.trie_backend, "operations": [operation]}


# ---- build --------------------------------------------------------------------------------------
def _index_leftover(name: str) -> bool:
    """What a killed ``build`` can leave in its folder: the lock, a staging folder, a version never made current."""
    return name == ".lock" or bool(VERSION_NAME.match(name)) or (name.startswith(".v") and name.endswith(".tmp"))


def build(run: RunContext, out: str | Path, pool: str | None = None) -> str:
    """Version 1 of a new index at ``out`` from pool ``pool`` (default: the run's default pool)."""
    out = Path(out)
    if (out / CURRENT).exists():
        raise IndexUserError(f"{out}: already an index (it has {CURRENT}); add to it with genius index add, "
                             "or choose another --out")
    others = [p.name for p in out.iterdir() if not _index_leftover(p.name)] if out.is_dir() else []
    if others:
        raise IndexUserError(f"{out}: a folder with other files in it ({', '.join(sorted(others)[:3])}); an index "
                             "keeps its folder to itself, so choose a new or empty --out")
    pool = pool or run.manifest["default_pool"]
    if pool not in run.manifest["pools"]:
        raise IndexUserError(f"{run.manifest['path']}: pool {pool!r} was not evaluated in this run; choices: "
                             f"{', '.join(run.manifest['pools'])}")
    run.load()
    if run.models.fingerprints != run.manifest["fingerprints"]:
        raise IndexUserError(f"{run.models.changed_files(run.manifest['fingerprints'])}: changed after the run of "
                             f"{run.manifest['path']} was evaluated; run genius eval again")
    entry = run.manifest["pools"][pool]
    with project_root_set_to(run.manifest["root"]):
        opened = open_pool(run.cfg, entry["kind"], resolve_path(entry["jsonl"]), run.models, build_trie=False)
        if opened.codes_hash != entry["codes_hash"]:
            raise IndexUserError(f"{opened.codes_dir}: the codes changed after the run of {run.manifest['path']} "
                                 "was evaluated; run genius eval again")
        fused = opened.fused()
    store, codes = opened.store.arrays, np.load(opened.codes_dir / "codes.npy")
    _, qerror = quantize_rows(run, store.img, store.txt, store.img_mask, store.txt_mask, store.modality)
    # The index's rows are in the order its candidates sharing an ID are returned: the run's (a
    # union pool's local-pool concatenation), so the index answers as the run did.
    rows_in = np.argsort(opened.order, kind="stable") if opened.order is not None else np.arange(len(codes))
    ids = np.asarray(store.ids, np.int64)[rows_in]
    rows = Rows(ids, codes[rows_in], np.asarray(fused, np.float16)[rows_in],
                np.asarray(store.modality, np.int8)[rows_in], np.ones(len(ids), bool), qerror[rows_in],
                ordered_records(opened.path, ids))
    manifest = base_manifest(run, None, {"op": "build", "pool": portable_path(opened.path), "count": int(len(ids))})
    manifest.update(pool=pool, codebook_sizes=run.models.codebook_sizes, modality_mode=run.models.modality_mode,
                    modality_level=run.modality_level)
    with IndexWriter(out, "genius index build") as writer:
        if (out / CURRENT).exists():
            raise IndexUserError(f"{out}: became an index while this one was prepared; choose another --out")
        return writer.publish(rows, manifest, run.cfg.trie_backend)


def ordered_records(pool_file: Path, ids: np.ndarray) -> list[str]:
    """The pool file's records in store row order (a store need not follow its file's order)."""
    by_id = {hash_did(obj["did"]): json.dumps(obj) for _, obj in iter_jsonl(pool_file)}
    return [by_id[i] for i in ids.tolist()]


# ---- add ----------------------------------------------------------------------------------------
def check_serves(version: IndexVersion, run: RunContext) -> None:
    """Refuse to extend an index whose run's checkpoints or encoder changed since it was built."""
    from genius.models.generative_retriever.api import same_weights

    m = version.manifest
    if run.checkpoint_fingerprints != m["checkpoint_fingerprints"]:
        raise IndexUserError(f"{version.path / 'manifest.json'}: built for the models {m['checkpoint_fingerprints']}, "
                             f"the run's checkpoints ({', '.join(map(str, checkpoint_files(run.cfg.paths)))}) are "
                             f"now {run.checkpoint_fingerprints}; new IDs would not be the old ones' kind, build a "
                             "new index with genius index build")
    now = run.encoder_identity()
    if now["fingerprint"] != m["encoder"]["fingerprint"]:
        raise IndexUserError(f"{version.path / 'manifest.json'}: built with encoder {m['encoder']['name']} "
                             f"({m['encoder']['fingerprint'][:12]}), the run of {run.manifest['path']} now "
                             f"records {now['fingerprint'][:12]}; build a new index")
    built_with = m["encoder"].get("embedded_with")  # absent: built before it was recorded
    if built_with and not same_weights(built_with, now["embedded_with"]):
        raise IndexUserError(f"{version.path / 'manifest.json'}: its vectors were embedded with other encoder "
                             f"weights than the run of {run.manifest['path']} records now (extracted again since "
                             "the build); new items would land in another space, so build a new index")


def read_new_pool(path: Path, version: IndexVersion, data_root: Path) -> tuple[list, list[dict]]:
    """The new pool's candidates and raw records, refused whole if any did is already indexed or
    any modality is not one the index holds."""
    candidates = list(iter_candidates(path))
    raw = {obj["did"]: obj for _, obj in iter_jsonl(path)}
    held = version.manifest["modalities"]
    ids = np.asarray(version.arrays["ids"])
    present = np.isin(np.asarray([c.hashed for c in candidates], np.int64), ids)
    for cand, there in zip(candidates, present):
        if there:
            raise IndexUserError(f"{path}:{first_line_with(path, 'did', cand.did)}: did {cand.did} is already in "
                                 f"the index ({version.path}); remove it first (genius index remove) to replace it")
        if cand.modality not in held:
            raise IndexUserError(f"{path}:{first_line_with(path, 'did', cand.did)}: candidate {cand.did} is "
                                 f"{cand.modality}, the index {version.path.parent} holds only {', '.join(held)} "
                                 "candidates (the pool its models were evaluated on); index it elsewhere")
    if any(c.img_path for c in candidates):  # after the checks above: a wrong modality is the clearer message
        for _ in iter_candidates(path, data_root):
            pass
    return candidates, [raw[c.did] for c in candidates]


def embed_candidates(run: RunContext, candidates: list, data_root: Path) -> tuple[torch.Tensor, ...]:
    """Raw stage-0 vectors and masks of candidates, as extraction stores them (texts
    ``format_string``-ed, vectors rounded to the stores' precision)."""
    from genius.models.generative_retriever.api import encode_queries
    from genius.models.generative_retriever.ranking import unpack_query_features

    texts = [format_string(c.text) for c in candidates]
    images = [data_root / c.img_path if c.img_path else None for c in candidates]
    packed = encode_queries(run.encoder, texts, images, what="candidate image")
    dim, dtype = run.encoder.dim, run.manifest["encoder"].get("dtype")
    if dtype:
        packed[:, : 2 * dim] = packed[:, : 2 * dim].astype(dtype).astype(np.float32)
    return unpack_query_features(packed, dim)


def add(run: RunContext, index: str | Path, pool_file: str | Path, data_root: str | Path | None = None) -> str:
    """A new version of ``index`` with the candidates of ``pool_file``; its name."""
    index, pool_file = Path(index), Path(pool_file)
    run_root = run.data_root()
    # absolute: a record's image path outside the run's data root is stored whole, and read later
    # from wherever the search runs
    data_root = Path(data_root).resolve() if data_root is not None else run_root
    with IndexWriter(index, "genius index add") as writer:
        parent = open_version(index)
        check_serves(parent, run)
        candidates, raw = read_new_pool(pool_file, parent, data_root)
        run.load()
        img, txt, img_mask, txt_mask = embed_candidates(run, candidates, data_root)
        modality = np.asarray([MODALITY_CODE[c.modality] for c in candidates], np.int8)
        codes, qerror = quantize_rows(run, img, txt, img_mask, txt_mask, modality)
        if data_root.resolve() != run_root.resolve():  # records are read against the run's data root
            raw = [{**r, "img_path": str(data_root / r["img_path"])} if r.get("img_path") else r for r in raw]
        old = parent.arrays
        rows = Rows(np.concatenate([old["ids"], [c.hashed for c in candidates]]).astype(np.int64),
                    np.concatenate([old["codes"], codes]),
                    np.concatenate([old["fused"], score_fusion(img, txt, img_mask, txt_mask).numpy().astype(np.float16)]),
                    np.concatenate([old["modality"], modality]), np.concatenate([old["trained"], np.zeros(len(codes), bool)]),
                    np.concatenate([old["qerror"], qerror]).astype(np.float32),
                    _chain(text_lines(parent.path / "records.jsonl"), (json.dumps(r) for r in raw)))
        operation = {"op": "add", "pool": str(pool_file.resolve()), "count": len(candidates)}
        return writer.publish(rows, base_manifest(run, parent.manifest, operation), parent.manifest["trie_backend"])


def _chain(parent_lines, new_lines):
    yield from (line.rstrip("\n") for _, line in parent_lines if line.strip())
    yield from new_lines


# ---- remove -------------------------------------------------------------------------------------
def read_id_file(path: Path, ids: np.ndarray, where: Path) -> np.ndarray:
    """The hashed dids of an ids file (one did per line); unknown or repeated dids name their line."""
    seen: dict[int, int] = {}
    for lineno, line in text_lines(path):
        did = line.strip()
        if not did:
            continue
        try:
            hashed = hash_did(did)
        except ValueError as err:
            raise IndexUserError(f"{path}:{lineno}: {did!r} is not a did ({err}); write one did per line") from None
        if hashed in seen:
            raise IndexUserError(f"{path}:{lineno}: did {did} repeats line {seen[hashed]}; list each did once")
        seen[hashed] = lineno
    if not seen:
        raise IndexUserError(f"{path}: no dids; write one did per line")
    wanted = np.fromiter(seen, np.int64, len(seen))
    unknown = ~np.isin(wanted, ids)
    if unknown.any():
        first = int(wanted[unknown][0])
        raise IndexUserError(f"{path}:{seen[first]}: did {line_did(path, seen[first])} is not in the index "
                             f"({where}); {int(unknown.sum())} of {len(wanted)} dids are unknown, remove only indexed ones")
    return wanted


def line_did(path: Path, lineno: int) -> str:
    return next(line.strip() for n, line in text_lines(path) if n == lineno)


def remove(index: str | Path, ids_file: str | Path) -> str:
    """A new version of ``index`` without the candidates listed in ``ids_file``; its name."""
    index, ids_file = Path(index), Path(ids_file)
    with IndexWriter(index, "genius index remove") as writer:
        parent = open_version(index)
        old = parent.arrays
        gone = read_id_file(ids_file, np.asarray(old["ids"]), parent.path)
        keep = ~np.isin(np.asarray(old["ids"]), gone)
        if not keep.any():
            raise IndexUserError(f"{ids_file}: lists every candidate of the index ({parent.path}); an index needs "
                                 "at least one, build a new one instead")
        kept = (line.rstrip("\n") for (_, line), k in zip(text_lines(parent.path / "records.jsonl"), keep) if k)
        rows = Rows(*(np.asarray(old[name])[keep] for name in ("ids", "codes", "fused", "modality", "trained", "qerror")),
                    kept)
        operation = {"op": "remove", "ids": str(ids_file.resolve()), "count": int(len(gone))}
        return writer.publish(rows, base_manifest(None, parent.manifest, operation), parent.manifest["trie_backend"])


# ---- drift report -------------------------------------------------------------------------------
def drift_report(version: IndexVersion) -> dict:
    """What tells a user the models should be retrained: the added items against the items the
    models saw (present at the initial build and still indexed)."""
    codes = np.asarray(version.arrays["codes"])
    trained = np.asarray(version.arrays["trained"], bool)
    qerror = np.asarray(version.arrays["qerror"], np.float64)
    sizes = version.manifest["codebook_sizes"]
    _, bucket, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)  # never empty (remove)
    bucket = bucket.reshape(-1)
    seen_buckets = np.zeros(len(counts), bool)
    seen_buckets[bucket[trained]] = True

    def group(rows: np.ndarray) -> dict:
        n = int(rows.sum())
        return {"count": n,
                "collision_rate": float((counts[bucket[rows]] > 1).mean()) if n else 0.0,
                "largest_bucket": int(counts[bucket[rows]].max()) if n else 0,
                "codes_in_use": [int(len(np.unique(codes[rows, level]))) for level in range(codes.shape[1])],
                "unseen_id_share": float((~seen_buckets[bucket[rows]]).mean()) if n else 0.0,
                "mean_quantization_error": float(qerror[rows].mean()) if n else None}

    return {"index": str(version.path.parent), "version": version.name, "codebook_sizes": sizes,
            "trained": group(trained), "added": group(~trained)}


def format_report(report: dict) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else "/".join(map(str, value)) if isinstance(value, list) \
            else str(value)

    rows = [("items", "count"), ("collision rate", "collision_rate"), ("largest bucket", "largest_bucket"),
            ("ID unseen in training", "unseen_id_share"), ("codes in use per level", "codes_in_use"),
            ("mean ||z - decode||^2", "mean_quantization_error")]
    lines = [f"{report['index']} ({report['version']}), codebook sizes {cell(report['codebook_sizes'])}",
             f"{'':<24} {'at training':>16} {'added':>16}"]
    lines += [f"{label:<24} {cell(report['trained'][key]):>16} {cell(report['added'][key]):>16}" for label, key in rows]
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------
def run_of(index: Path, device: str) -> RunContext:
    """The run an index serves, from its current manifest."""
    return load_run(run_results(open_version(index).manifest), device)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = ArgumentParser(prog="genius index", description="A living index: build it from a finished "
                            "run, add and remove candidates without retraining, report drift.")
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="version 1 from a finished eval run")
    p.add_argument("--run", required=True, help="results directory with run.json, or a setting's config folder")
    p.add_argument("--pool", default=None, help="pool file stem (default: the run's default pool)")
    p.add_argument("--out", required=True, help="the new index folder")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p = sub.add_parser("add", help="embed, quantize and index new candidates (an M-BEIR pool jsonl)")
    p.add_argument("--index", required=True)
    p.add_argument("--pool", required=True, help="M-BEIR candidate records, one per line")
    p.add_argument("--data-root", default=None, help="where the records' images lie (default: the run's data root)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p = sub.add_parser("remove", help="a new version without the listed candidates")
    p.add_argument("--index", required=True)
    p.add_argument("--ids", required=True, help="file with one did per line")
    p = sub.add_parser("stats", help="the drift report: added items against the items present at training")
    p.add_argument("--index", required=True)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    with user_errors_exit(parser):
        if args.command == "build":
            name = build(load_run(args.run, _device(args.device)), args.out, args.pool)
            print(f"{args.out}: {name}")
        elif args.command == "add":
            index = Path(args.index)
            print(f"{index}: {add(run_of(index, _device(args.device)), index, args.pool, args.data_root)}")
        elif args.command == "remove":
            print(f"{args.index}: {remove(args.index, args.ids)}")
        else:
            report = drift_report(open_version(args.index))
            print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


if __name__ == "__main__":
    sys.exit(main())
