"""A living index on real data: COCO captions text-to-text (MiniLM), items added that no stage has seen.

Data: COCO 2017 val captions. Images with at least two captions are shuffled (seeded) into three
disjoint sets: A (``--train-images``) trains the stages, B (``--initial-images``) is the initial
index, C (``--added-images``) is added later with ``genius index add``. For each image of B and C
one caption (seeded) is held out as a query whose positives are the image's other captions; the
held-out caption is in no pool and no training set.

Two runs go through the project as a user runs it: an M-BEIR text root, ``genius new-setting
--encoder hf_text`` (sizes chosen by the scaffold), the setting's ``run_all.sh`` (extract, train-rq,
assign-codes, train-gen, eval), then ``index build --run <results>``:

- **initial**: trained on A's captions (every caption a query, the image's other captions its
  positives), evaluated on B's queries over B's pool; its index (B) then gets C's captions added.
- **retrain** (the comparison): trained on the captions of A, B and C except the held-out queries,
  evaluated on the same queries over the pool B + C.

Recall@1/5/10 (UniIR's hit rate) for dense, GENIUS and GENIUS^R on the queries of B and of C,
searched against each run's index version (``IndexVersion.pool()``) with the run's models, the
queries embedded once by the run's encoder. Also: the add's throughput without encoding (the add
runs with the new captions' MiniLM vectors precomputed, through a caching encoder; the encoding is
timed on its own), the latency of removing 100 added dids, and the drift report (``index stats``).

Outputs: ``--out-dir``/incremental/ (roots, settings, GENIUS_ROOTs with checkpoints and results,
indexes, stage logs) and ``--out-dir``/incremental.{md,json}. Finished stages are skipped on a re-run.

    bash benchmarks/run_incremental.sh [--train-images 1500 --initial-images 500 --added-images 500]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from genius.benchmarks.coco_t2t import DEFAULT_CAPTIONS, TEXT_TASK, did, load_captions, pool_jsonl, queries_jsonl, \
    write_if_changed
from genius.benchmarks.common import OUT_DIR, load_average, machine_description, markdown_table

KS = (1, 5, 10)
METHODS = ("dense", "genius", "genius_r")
LABELS = {"dense": "dense MiniLM (exact cosine)", "genius": "GENIUS", "genius_r": "GENIUS^R (re-ranked)"}
STEM = "mbeir_cococap_task1"
POOL = f"{STEM}_cand_pool"
REMOVED = 100


# ---- data -----------------------------------------------------------------------------------------
@dataclass
class Split:
    train: list[list[int]]  # A: caption rows per image
    initial: list[list[int]]  # B
    added: list[list[int]]  # C
    initial_queries: list[int]  # the held-out caption row of each image of B
    added_queries: list[int]  # of C


def others(images: list[list[int]], queries: list[int]) -> list[list[int]]:
    """Each image's captions without its held-out query."""
    return [[r for r in rows if r != q] for rows, q in zip(images, queries)]


def split_images(image_ids: np.ndarray, args) -> Split:
    by_image: dict[int, list[int]] = {}
    for row, image in enumerate(image_ids.tolist()):
        by_image.setdefault(image, []).append(row)
    images = sorted(i for i, rows in by_image.items() if len(rows) >= 2)
    wanted = args.train_images + args.initial_images + args.added_images
    if wanted > len(images):
        raise ValueError(f"{args.captions}: {len(images)} images with two or more captions, {wanted} asked for "
                         "(--train-images + --initial-images + --added-images); ask for fewer")
    rng = np.random.default_rng(args.seed)
    chosen = [by_image[images[i]] for i in rng.permutation(len(images))[:wanted]]
    a, b = args.train_images, args.train_images + args.initial_images
    initial, added = chosen[a:b], chosen[b:]
    held_out = [rows[int(rng.integers(len(rows)))] for rows in initial + added]
    return Split(chosen[:a], initial, added, held_out[: len(initial)], held_out[len(initial):])


def write_root(root: Path, texts: list[str], train: list[list[int]], test: list[list[int]], query_rows: list[int],
               pool_rows: list[int]) -> None:
    """A text-only M-BEIR root (as ``genius new-setting`` reads it): ``train`` images' captions as training
    pairs, one query per ``test`` image (``query_rows``; positives = the image's other captions) over
    the pool ``pool_rows``."""
    test_others = others(test, query_rows)
    files = {
        f"query/train/{STEM}_train.jsonl": queries_jsonl(train, texts),
        "cand_pool/global/mbeir_union_train_cand_pool.jsonl": pool_jsonl([r for rows in train for r in rows], texts),
        f"query/test/{STEM}_test.jsonl": queries_jsonl(test, texts, query_rows),
        f"cand_pool/local/{POOL}.jsonl": pool_jsonl(pool_rows, texts),
        f"qrels/test/{STEM}_test_qrels.txt": "".join(f"{did(q)} 0 {did(r)} 1 {TEXT_TASK}\n"
                                                     for q, rows in zip(query_rows, test_others) for r in rows),
    }
    for rel, text in files.items():
        write_if_changed(root / rel, text)


# ---- a run, as a user makes it -------------------------------------------------------------------
def run_setting(base: Path, name: str, log_file: Path) -> Path:
    """``genius new-setting`` for ``base``/``name``_root and its ``run_all.sh``; the results folder."""
    root, setting, genius_root = base / f"{name}_root", base / "settings" / name, base / f"{name}_genius"
    env = {**os.environ, "GENIUS_ROOT": str(genius_root)}
    python = sys.executable
    steps = [[python, "-m", "genius.cli", "new-setting", "--root", str(root), "--out", str(setting), "--encoder",
              "hf_text", "--force"], ["bash", str(setting / "run_all.sh")]]
    with open(log_file, "a") as out:
        for step in steps:
            done = subprocess.run(step, cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT)
            if done.returncode:
                raise RuntimeError(f"{shlex.join(step)} failed (exit {done.returncode}); see {log_file}")
    return genius_root / "results" / name


class CachedEncoder:
    """The run's encoder with some texts' vectors computed beforehand: times an add without its encoding."""

    def __init__(self, encoder, texts: list[str]):
        self.dim = encoder.dim
        self.vectors = dict(zip(texts, encoder.encode_texts(texts)))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vectors[t] for t in texts])


# ---- retrieval over an index version --------------------------------------------------------------
def query_features(run, texts: list[str]) -> np.ndarray:
    """Packed raw features of text queries as the run's query stores hold them (no instruction: hf_text)."""
    from genius.common.mbeir import query_text_with_instruction
    from genius.models.generative_retriever.api import encode_queries

    packed = encode_queries(run.encoder, [query_text_with_instruction("", t) for t in texts], [None] * len(texts))
    dtype = run.manifest["encoder"].get("dtype")
    if dtype:
        packed[:, : 2 * run.encoder.dim] = packed[:, : 2 * run.encoder.dim].astype(dtype).astype(np.float32)
    return packed


@torch.no_grad()
def retrieved_ids(run, version, packed: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Hashed dids [Q, k] per method: one beam search serves GENIUS and GENIUS^R."""
    from genius.common.fusion import score_fusion
    from genius.models.generative_retriever.ranking import rank, unpack_query_features
    from genius.models.generative_retriever.retrieval import beam_leaves, beams_as_arrays

    pool = version.pool()
    img, txt, img_mask, txt_mask = unpack_query_features(packed, pool.store.dim)
    beams = run.models.decode(run.models.embed(img, txt, img_mask, txt_mask), pool.trie)
    codes, scores, valid = beams_as_arrays(beams)
    fused = score_fusion(img, txt, img_mask, txt_mask).numpy()
    rankings = rank(pool, beam_leaves(pool.cmap, codes, valid), scores, fused, k, METHODS, run.cfg.dense_backend,
                    run.cfg.dense_chunk, run.device)
    return {m: r.ids(pool.ids) for m, r in rankings.items()}


def recalls(ids: dict[str, np.ndarray], positives: list[list[int]]) -> dict[str, dict[int, float]]:
    from genius.common.mbeir import hash_did
    from genius.models.generative_retriever.metrics import hits_at_k

    relevant = [{hash_did(did(r)) for r in rows} for rows in positives]
    return {m: {k: float(hits_at_k(ids[m], relevant, k).mean()) for k in KS} for m in METHODS}


def evaluate(run, version, packed: np.ndarray, groups: dict[str, list[list[int]]]) -> dict:
    """Recall per query group (the queries of ``packed`` are the groups' in order)."""
    ids, out, start = retrieved_ids(run, version, packed, max(KS)), {}, 0
    for name, positives in groups.items():
        part = slice(start, start + len(positives))
        out[name] = recalls({m: v[part] for m, v in ids.items()}, positives)
        start += len(positives)
    return out


# ---- the benchmark --------------------------------------------------------------------------------
def initial_run(base: Path, texts, split: Split, timings: dict) -> Path:
    write_root(base / "initial_root", texts, split.train, split.initial, split.initial_queries,
               [r for rows in others(split.initial, split.initial_queries) for r in rows])
    t0 = time.perf_counter()
    results = run_setting(base, "initial", base / "initial.log")
    timings["initial_pipeline_s"] = time.perf_counter() - t0
    return results


def retrain_run(base: Path, texts, split: Split, timings: dict) -> Path:
    tested, queries = split.initial + split.added, split.initial_queries + split.added_queries
    pool = [r for rows in others(tested, queries) for r in rows]
    order = np.random.default_rng(len(pool)).permutation(len(pool))  # B and C interleaved, as one collection
    write_root(base / "retrain_root", texts, split.train + others(tested, queries), tested, queries,
               [pool[i] for i in order])
    t0 = time.perf_counter()
    results = run_setting(base, "retrain", base / "retrain.log")
    timings["retrain_pipeline_s"] = time.perf_counter() - t0
    return results


def index_life(run, index: Path, texts: list[str], added_rows: list[int], base: Path, seed: int,
               timings: dict) -> tuple[str, dict, int]:
    """Build the initial index, add the new captions (timed without their encoding), take the drift
    report, then remove up to REMOVED added dids (timed): (the version after the add, its drift
    report, how many were removed). The version after the add stays readable (KEEP_VERSIONS)."""
    from genius.common.mbeir import format_string
    from genius.models.generative_retriever import index as idx

    t0 = time.perf_counter()
    idx.build(run, index, POOL)
    timings["build_s"] = time.perf_counter() - t0
    added_pool = base / "added_pool.jsonl"
    write_if_changed(added_pool, pool_jsonl(added_rows, texts))
    encoder = run.encoder
    t0 = time.perf_counter()
    run.encoder = CachedEncoder(encoder, [format_string(texts[r]) for r in added_rows])
    timings["add_encode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    after_add = idx.add(run, index, added_pool)
    timings["add_s"] = time.perf_counter() - t0
    run.encoder = encoder
    drift = idx.drift_report(idx.open_version(index, after_add))
    removed = min(REMOVED, len(added_rows))
    gone = base / "removed_ids.txt"
    chosen = np.random.default_rng(seed + 2).choice(len(added_rows), removed, replace=False)
    gone.write_text("".join(did(added_rows[i]) + "\n" for i in chosen))
    t0 = time.perf_counter()
    idx.remove(index, gone)
    timings["remove_s"] = time.perf_counter() - t0
    return after_add, drift, removed


def eval_metrics(results: Path) -> dict[str, float]:
    """Recall@5 per method that ``genius eval`` itself wrote for the run's test queries and pool."""
    recall = json.loads((results / "metrics.json").read_text())["recall"]
    return {r["method"]: r["value"] for r in recall if r["k"] == 5 and r["pool_kind"] == "task-specific"}


def measure(args) -> dict:
    from genius.models.generative_retriever import index as idx

    base = args.out_dir / "incremental"
    base.mkdir(parents=True, exist_ok=True)
    texts, image_ids = load_captions(args.captions)
    split = split_images(image_ids, args)
    groups = {"initial": others(split.initial, split.initial_queries),
              "added": others(split.added, split.added_queries)}
    added_rows = [r for rows in groups["added"] for r in rows]
    timings = {"load_start": load_average()}
    started = time.perf_counter()
    initial_results = initial_run(base, texts, split, timings)
    retrain_results = retrain_run(base, texts, split, timings)
    indexes = base / "indexes"
    shutil.rmtree(indexes, ignore_errors=True)  # an index is made fresh each run; the stages are reused

    run = idx.load_run(initial_results)
    after_add, drift, removed = index_life(run, indexes / "initial", texts, added_rows, base, args.seed, timings)
    packed = query_features(run, [texts[r] for r in split.initial_queries + split.added_queries])
    t0 = time.perf_counter()
    result = {"after_add": evaluate(run, idx.open_version(indexes / "initial", after_add), packed, groups)}
    timings["eval_after_add_s"] = time.perf_counter() - t0
    retrained = idx.load_run(retrain_results)
    idx.build(retrained, indexes / "retrain", POOL)
    t0 = time.perf_counter()
    result["retrain"] = evaluate(retrained, idx.open_version(indexes / "retrain"), packed, groups)
    timings["eval_retrain_s"] = time.perf_counter() - t0
    timings.update(total_s=time.perf_counter() - started, load_end=load_average())
    return {**result, "drift": drift, "timings": timings, "retrain_eval_recall5": eval_metrics(retrain_results),
            "counts": {"train_images": len(split.train), "train_captions": sum(map(len, split.train)),
                       "initial_images": len(split.initial), "initial_pool": sum(map(len, groups["initial"])),
                       "added_images": len(split.added), "added_captions": len(added_rows), "removed": removed,
                       "retrain_captions": sum(map(len, split.train)) + len(added_rows)
                       + sum(map(len, groups["initial"]))},
            "settings": {name: setting_sizes(base / "settings" / name) for name in ("initial", "retrain")}}


def setting_sizes(setting: Path) -> dict:
    """What the scaffold chose for a setting (IDs, epochs, batch size, beams)."""
    from genius.common.config import load_config
    from genius.models.generative_retriever.evaluate import EvalConfig
    from genius.models.generative_retriever.train import TrainGenConfig
    from genius.models.residual_quantization.train import RQTrainConfig

    rq = load_config(RQTrainConfig, setting / "train_rq.yaml")
    gen = load_config(TrainGenConfig, setting / "train_gen.yaml")
    return {"levels": rq.model.num_levels, "codebook": rq.model.codebook_size, "rq_epochs": rq.train.epochs,
            "gen_epochs": gen.train.epochs, "gen_batch": gen.train.batch_size,
            "beams": load_config(EvalConfig, setting / "eval.yaml").decoding.num_beams}


# ---- report ---------------------------------------------------------------------------------------
def report(result: dict, command: str, machine: str) -> str:
    t, c, drift = result["timings"], result["counts"], result["drift"]
    rows = []
    for setup, label in (("after_add", "index B + C (C added)"), ("retrain", "full retrain on A + B + C")):
        for group, name in (("initial", "(a) B: initial"), ("added", "(b) C: added")):
            r = result[setup][group]
            rows += [[label, name, LABELS[m]] + [f"{r[m][k]:.3f}" for k in KS] for m in METHODS]
    ratio = {m: result["after_add"]["added"][m][5] / result["after_add"]["initial"][m][5] for m in METHODS}
    n_b, n_c = c["initial_images"], c["added_images"]
    pooled = {m: (n_b * result["retrain"]["initial"][m][5] + n_c * result["retrain"]["added"][m][5]) / (n_b + n_c)
              for m in METHODS}
    own = result["retrain_eval_recall5"]
    added, trained = drift["added"], drift["trained"]
    s = result["settings"]["initial"]
    lines = [
        (f"Images (seeded split of COCO val2017): A = {c['train_images']:,} training images ({c['train_captions']:,} "
         f"captions), B = {c['initial_images']:,} initially indexed, C = {c['added_images']:,} added "
         f"({c['added_captions']:,} captions, seen by no stage). One held-out caption per image of B and C is a "
         "query, the image's other captions its positives; the index after the add holds "
         f"{c['initial_pool'] + c['added_captions']:,} captions. Full retrain: {c['retrain_captions']:,} "
         "training captions (A + B + C without the queries), pool B + C."),
        (f"Machine: {machine}. Load average (1 min) {t['load_start']:.1f} at start, {t['load_end']:.1f} at end."),
        f"Command: `{command}`",
        "",
        markdown_table(["searched", "queries", "method"] + [f"R@{k}" for k in KS], rows),
        (f"Settings chosen by `genius new-setting --encoder hf_text` (initial run): L = {s['levels']} levels, "
         f"K = {s['codebook']}, stage 1 {s['rq_epochs']} epochs, stage 2 {s['gen_epochs']} epochs of batch "
         f"{s['gen_batch']}, {s['beams']} beams; retrain run: {result['settings']['retrain']}."),
        (f"Add: {c['added_captions']:,} captions in {t['add_s']:.2f} s with their MiniLM vectors precomputed = "
         f"{c['added_captions'] / t['add_s']:,.0f} candidates/s excluding encoding (quantize, trie rebuild, "
         f"new version written; encoding them took {t['add_encode_s']:.1f} s). Remove {c['removed']} added dids: "
         f"{t['remove_s'] * 1000:.0f} ms. Build of the initial index: {t['build_s']:.1f} s."),
        ("Check of this evaluation against `genius eval`'s own metrics.json for the retrain run (same queries, "
         "pool B + C), R@5 over all queries: here " + ", ".join(f"{m} {pooled[m]:.3f}" for m in METHODS)
         + "; genius eval " + ", ".join(f"{m} {own.get(m, float('nan')):.3f}" for m in METHODS) + "."),
        "",
        ("Drift report (`genius index stats --json`, after the add; the models were trained on A, the "
         "report compares the added items with those present when the index was built):"),
        "",
        markdown_table(["", "present at the build (B)", "added (C)"], [
            ["items", trained["count"], added["count"]],
            ["collision rate", f"{trained['collision_rate']:.3f}", f"{added['collision_rate']:.3f}"],
            ["largest bucket", trained["largest_bucket"], added["largest_bucket"]],
            ["ID unseen in training", f"{trained['unseen_id_share']:.3f}", f"{added['unseen_id_share']:.3f}"],
            ["codes in use per level", "/".join(map(str, trained["codes_in_use"])),
             "/".join(map(str, added["codes_in_use"]))],
            ["mean quantization error", f"{trained['mean_quantization_error']:.4f}",
             f"{added['mean_quantization_error']:.4f}"]]),
        (f"Wall time: initial pipeline {t['initial_pipeline_s']:.0f} s, retrain pipeline "
         f"{t['retrain_pipeline_s']:.0f} s "
         f"(stages already up to date are skipped), evaluation after the add {t['eval_after_add_s']:.0f} s, of the "
         f"retrain {t['eval_retrain_s']:.0f} s; total {t['total_s'] / 60:.1f} min."),
        "",
        (f"Targets (R@5 on added items / on initial items, index after the add): GENIUS^R {ratio['genius_r']:.2f}x "
         f"(target >= 0.95x: {'met' if ratio['genius_r'] >= 0.95 else 'NOT met'}); GENIUS {ratio['genius']:.2f}x "
         f"(target >= 0.85x: {'met' if ratio['genius'] >= 0.85 else 'NOT met'}); dense {ratio['dense']:.2f}x."),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS)
    p.add_argument("--train-images", type=int, default=1500, help="A: the images whose captions train the stages")
    p.add_argument("--initial-images", type=int, default=500, help="B: the images of the initial index")
    p.add_argument("--added-images", type=int, default=500, help="C: the images added with genius index add")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    if min(args.train_images, args.initial_images, args.added_images) < 1:
        p.error("--train-images, --initial-images and --added-images must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from genius.common.stage import setup_logging

    setup_logging()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = ("bash benchmarks/run_incremental.sh " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()
    machine = machine_description()
    result = measure(args)
    text = report(result, command, machine)
    stem = args.out_dir / "incremental"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({**result, "args": vars(args)}, indent=2, default=str) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
