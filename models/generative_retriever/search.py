"""``genius search``: query a finished evaluation run with a text and/or an image.

    genius search --run results/tiny --text "a small red circle on the left" -k 10
    genius search --run configs_scripts/tiny --image photo.png --target-modality text

``--run`` is a results directory holding ``run.json`` (written by ``genius eval``) or a setting's
config folder (its ``eval.yaml`` names the results directory). The manifest names the stage-0
encoder config the query stores were extracted with, the evaluated pools and the models'
fingerprints; the run's own config (``config.yaml`` beside it) loads the models and opens the pool
exactly as ``genius eval`` did (``run_models``, ``pool_assets``), and the candidates are ranked by
the same function (``ranking``). Paths resolve against the GENIUS_ROOT the results folder lies in
now, so a root copied or moved elsewhere can be searched.

The query is built as in extraction: the instruction for (dataset, query modality, target
modality) from the run's instructions file, picked with the run's instruction mode
(``deterministic``: a stable hash of the query, like evaluation's hash of the qid; ``first``;
``none``), or given with ``--instruction``; then it is encoded by the stage-0 encoder, decoded
under the pool's trie, ranked, and the candidates are printed with their did, modality, text or image
path and score (GENIUS^R cosine when the run re-ranked, else the beam log-probability).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from genius.common.config import load_config, project_root, project_root_set_to, resolve_path
from genius.common.distributed import init_distributed
from genius.common.mbeir import MODALITIES, Instructions, iter_candidates, query_text_with_instruction, unhash_did
from genius.common.stage import setup_logging, user_errors_exit
from genius.models.generative_retriever.evaluate import EvalConfig
from genius.models.generative_retriever.pool_assets import open_pool
from genius.models.generative_retriever.ranking import GeniusIndex, pack_query_features
from genius.models.generative_retriever.run_models import Models, StaleInputError, load_models

log = logging.getLogger("genius.search")


@dataclass(frozen=True)
class Hit:
    rank: int
    did: str
    modality: str
    text: str
    img_path: str | None
    score: float


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
    manifest = json.loads(path.read_text())
    if manifest.get("manifest_version") != 1:
        raise ValueError(f"{path}: run manifest version {manifest.get('manifest_version')!r} is not supported "
                         "(expected 1); run genius eval again")
    manifest["root"] = str(run_root(path, manifest))
    return manifest


def run_root(manifest_path: Path, manifest: dict) -> Path:
    """The GENIUS_ROOT the run's relative paths resolve against: found from where the results
    folder lies now (so a root copied or moved elsewhere works), else the recorded one."""
    results = Path(manifest["eval_config"]["paths"]["results"])
    here = manifest_path.resolve().parent.parts
    if not results.is_absolute() and len(here) > len(results.parts) and here[-len(results.parts):] == results.parts:
        return Path(*here[: -len(results.parts)])
    return Path(manifest.get("project_root", project_root()))


# ---- the query --------------------------------------------------------------------------------
def query_modality(text: str | None, image: str | None) -> str:
    if text and image:
        return "image,text"
    if text or image:
        return "text" if text else "image"
    raise ValueError("give a query: --text, --image or both")


def choose_instruction(instructions: Instructions, mode: str, query_mod: str, target_mod: str, key: str,
                       dataset: int | None = None) -> str:
    """The instruction extraction would give this query, with the query's content standing in for its qid.

    ``dataset`` (an id) selects whose instructions; by default the lowest dataset id that has
    this (query modality, target modality) task. A search must be repeatable, so 'random' runs
    pick like 'deterministic' ones.
    """
    if mode == "none":
        return ""
    if dataset is None:
        datasets = sorted(d for d, q, c in instructions.prompts if (q, c) == (query_mod, target_mod))
        if not datasets:
            raise ValueError(f"the instructions file has no row for {query_mod} -> {target_mod}; "
                             "pass --instruction or another --target-modality")
        dataset = datasets[0]
    variants = instructions.variants(dataset, query_mod, target_mod)
    return variants[0] if mode == "first" else variants[zlib.crc32(key.encode()) % len(variants)]


def encode_query(encoder, text: str, image: str | None) -> np.ndarray:
    """Packed raw features [1, 2D + 2] of one query (``retrieval.pack_query_features``)."""
    dim = encoder.dim
    txt = encoder.encode_texts([text]) if text else np.zeros((1, dim), np.float32)
    if image:
        with Image.open(image) as im:
            img = encoder.encode_images([im.convert("RGB")])
    else:
        img = np.zeros((1, dim), np.float32)
    return pack_query_features(img, txt, [1.0 if image else 0.0], [1.0 if text else 0.0])


# ---- the pool ---------------------------------------------------------------------------------
def open_index(cfg: EvalConfig, pool: str, manifest: dict, models: Models, rerank: bool) -> GeniusIndex:
    """The GENIUS index over one pool of the run, opened as genius eval opened it."""
    entry = manifest["pools"][pool]
    opened = open_pool(cfg, entry["kind"], resolve_path(entry["jsonl"]), models, build_trie=False)
    if opened.codes_hash != entry["codes_hash"]:
        raise StaleInputError(f"{opened.codes_dir}: the codes changed after this run was evaluated; run genius eval again")
    return GeniusIndex(models, opened, rerank)


def describe(pool_jsonl: str | Path, dids: list[int], scores: list[float]) -> list[Hit]:
    """Look the returned candidates up in the pool file (streamed; stops once all are found)."""
    wanted = {unhash_did(d): i for i, d in enumerate(dids)}
    found: dict[str, object] = {}
    for cand in iter_candidates(pool_jsonl):
        if cand.did in wanted:
            found[cand.did] = cand
            if len(found) == len(wanted):
                break
    hits = []
    for rank, (did, score) in enumerate(zip(wanted, scores), 1):
        cand = found.get(did)
        hits.append(Hit(rank, did, cand.modality if cand else "?", cand.text if cand else "",
                        cand.img_path if cand else None, float(score)))
    return hits


def search(run: str | Path, text: str = "", image: str | None = None, instruction: str | None = None,
           target_modality: str | None = None, k: int = 10, pool: str | None = None, rerank: bool | None = None,
           dataset: int | None = None, device: str = "auto", models: Models | None = None,
           encoder_factory: Callable | None = None) -> list[Hit]:
    """Ranked candidates for one query (``models`` / ``encoder_factory`` replace the run's, for tests)."""
    manifest = load_manifest(run)
    pool = pool or manifest["default_pool"]
    if pool not in manifest["pools"]:
        raise ValueError(f"pool {pool!r} was not evaluated in this run; choices: {', '.join(manifest['pools'])}")
    qmod = query_modality(text, image)
    target = target_modality or {"text": "image", "image": "text", "image,text": "image"}[qmod]
    if target not in MODALITIES:
        raise ValueError(f"target modality {target!r} is not one of {', '.join(MODALITIES)}")
    extraction = manifest["encoder"]["extraction"]
    if instruction is None:
        mode = extraction.get("instructions", {}).get("mode", "deterministic")
        with project_root_set_to(manifest["root"]):
            instructions = Instructions.load(resolve_path(manifest["instructions"])) if mode != "none" else None
        instruction = choose_instruction(instructions, mode, qmod, target, f"{text}|{image or ''}", dataset) \
            if instructions else ""
    query_text = query_text_with_instruction(instruction, text)
    log.info("query text: %r (%s -> %s)", query_text, qmod, target)

    dev = init_distributed(device).device
    rerank = manifest["rerank"] if rerank is None else rerank
    with project_root_set_to(manifest["root"]):
        encoder = (encoder_factory or _build_encoder)(extraction, dev)
        cfg = load_config(EvalConfig, resolve_path(manifest["config"]))
        models = models or load_models(cfg, dev)
        if models.fingerprints != manifest["fingerprints"]:
            raise StaleInputError("the run's checkpoints (rq.pt and generator.pt, or its official checkpoint) changed "
                                  "after this run was evaluated; run genius eval again")
        index = open_index(cfg, pool, manifest, models, rerank)
        pool_jsonl = resolve_path(manifest["pools"][pool]["jsonl"])
    packed = encode_query(encoder, query_text, image)
    if manifest["encoder"].get("dtype"):  # round like the stored queries: a test query gets its stored features
        vectors = packed[:, : 2 * encoder.dim]
        packed[:, : 2 * encoder.dim] = vectors.astype(manifest["encoder"]["dtype"]).astype(np.float32)
    scores, ids = index.search(packed, k)
    keep = ids[0] >= 0
    return describe(pool_jsonl, ids[0][keep].tolist(), scores[0][keep].tolist())


def _build_encoder(extraction: dict, device: torch.device):
    from genius.feature_extraction.encoders import EncoderConfig, build_encoder

    if "encoder" not in extraction:
        raise ValueError("the run's query stores do not record their encoder config; re-extract them with genius extract")
    cfg = EncoderConfig(**extraction["encoder"])  # recorded from a validated config
    cfg.validate()
    return build_encoder(cfg, device)


def format_hits(hits: list[Hit]) -> str:
    lines = [f"{'rank':>4}  {'did':<14} {'modality':<10} {'score':>9}  content"]
    for h in hits:
        content = " | ".join(x for x in (h.text, h.img_path or "") if x)
        lines.append(f"{h.rank:>4}  {h.did:<14} {h.modality:<10} {h.score:>9.4f}  {content}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(prog="genius search",
                                     description="Search a finished GENIUS run with a text and/or image query.")
    parser.add_argument("--run", required=True, help="results directory with run.json, or a setting's config folder")
    parser.add_argument("--text", default="", help="query text")
    parser.add_argument("--image", default=None, help="query image file")
    parser.add_argument("--instruction", default=None, help="instruction to prepend (default: chosen as in extraction)")
    parser.add_argument("--target-modality", choices=MODALITIES, default=None,
                        help="what to retrieve (default: image for text queries, text for image queries)")
    parser.add_argument("--dataset", type=int, default=None, help="dataset id whose instructions to use")
    parser.add_argument("-k", type=int, default=10, help="number of results")
    parser.add_argument("--pool", default=None, help="pool file stem (default: the union pool if evaluated)")
    parser.add_argument("--no-rerank", dest="rerank", action="store_false", default=None, help="GENIUS without re-ranking")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    with user_errors_exit(parser):
        hits = search(args.run, args.text, args.image, args.instruction, args.target_modality, args.k, args.pool,
                      args.rerank, args.dataset, args.device)
    print(format_hits(hits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
