"""What ``genius eval`` writes into its results folder, and the run manifest ``genius search`` reads.

    results/<setting>/
      config.yaml, run.json (manifest for genius search), metrics.json, done.json
      results.tsv (UniIR's hit rate), ir_metrics.tsv (standard IR metrics), results.md, recall_by_task.png
      irgen_table.md, irgen_metrics.tsv      IRGen's P@k / R@k / MAP@100 (report.metrics: irgen only)
      runs/<pool stem>/<query stem>/{dense,genius,genius_r}.run     TREC-style run files

Paths in run.json are relative to the GENIUS_ROOT when they lie inside it, so a root copied
elsewhere keeps a working manifest.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genius.common.config import config_to_dict, project_root, resolve_path
from genius.common.io import atomic_write_json, atomic_write_text
from genius.common.runstate import portable_path
from genius.common.store import EmbeddingStore
from genius.models.generative_retriever import ir_metrics
from genius.models.generative_retriever.positives import PoolPositives
from genius.models.generative_retriever.run_models import Models
from genius.models.generative_retriever.tables import (
    DecodeStats,
    Names,
    RecallResult,
    markdown_report,
    plot_recall_by_task,
    results_tsv,
)

log = logging.getLogger("genius.eval")

MANIFEST_VERSION = 1
# Raised when a finished evaluation lacks what eval now writes, so it is redone rather than
# reported up to date: 2 = ir_metrics.tsv and the hit-rate labels; 3 = the dense column named after
# the encoder, and the rows extraction left out for an empty text; 4 = the universal pool's
# candidates that share an ID in the local pools' concatenation order, and Average rows of the
# printed values (cached decodings are reused).
OUTPUTS_VERSION = 4
# Everything a run writes in its results folder (the caches decoded/ and fused/ are keyed by
# content and outlive runs); a run set aside moves these to stale/<time>/.
RUN_OUTPUTS = ("config.yaml", "run.json", "metrics.json", "results.tsv", "ir_metrics.tsv", "results.md",
               "recall_by_task.png", "irgen_table.md", "irgen_metrics.tsv", "runs")


@dataclass
class EvalReport:
    results: list[RecallResult]
    stats: list[DecodeStats]
    markdown: str
    out_dir: Path
    positives: list[PoolPositives]
    names: Names  # method key -> column header (the dense one names the run's encoder)
    empty_texts: dict[str, dict[str, int]]  # "queries"/"candidates" -> file stem -> rows extraction left out
    irgen_table: str = ""  # IRGen's table (report.metrics: irgen), filled in by write_outputs


def empty_texts(query_stores: dict[str, EmbeddingStore], pool_stores: dict[str, EmbeddingStore]) -> dict:
    """Rows extraction left out for an empty text (data.empty_text: skip), by query file and pool stem."""
    return {"queries": {stem: s.skipped_empty_text for stem, s in query_stores.items() if s.skipped_empty_text},
            "candidates": {stem: s.skipped_empty_text for stem, s in pool_stores.items() if s.skipped_empty_text}}


def describe_empty_texts(skipped: dict) -> str:
    """results.md's section on them (empty when there were none)."""
    lines = [f"- {stem}: {n} queries skipped as empty; not scored (the scores average the file's other queries)"
             for stem, n in skipped["queries"].items()]
    lines += [f"- {stem}: {n} candidates skipped as empty; a positive among them is a positive not in the pool "
              "(missing_positives)" for stem, n in skipped["candidates"].items()]
    title = "### Rows left out at extraction (empty text, data.empty_text: skip)"
    return f"{title}\n\n" + "\n".join(lines) if lines else ""


def report_markdown(results: list[RecallResult], stats: list[DecodeStats], positives: list[PoolPositives],
                    title: str, note: str, names: Names, skipped: dict) -> str:
    """The paper-layout tables, then (only when any) the rows extraction left out and the
    positives that are not in their pool."""
    markdown = markdown_report(results, stats, title, note, names)
    if section := describe_empty_texts(skipped):
        markdown += "\n\n" + section
    missing = [p for p in positives if p.any_missing]
    if missing:
        markdown += "\n\n### Positives not in the evaluated pool\n\n" + "\n".join(p.describe() for p in missing)
    return markdown


def write_outputs(cfg: Any, models: Models, report: EvalReport, query_files: list[Path],
                  stores: dict[str, EmbeddingStore], pools: dict, qrels_files: dict[str, Path]) -> None:
    """``stores`` and ``qrels_files``: by query file stem; ``pools``: run.json's entries by pool stem."""
    out = report.out_dir
    ir, irgen = [], []
    if cfg.run_files:  # the standard metrics are computed from the run files, as other tools would
        pool_ids = {stem: np.sort(np.asarray(EmbeddingStore.open(resolve_path(p["store"]), verify=False).ids))
                    for stem, p in pools.items()} if cfg.missing_positives == "exclude" else {}
        scoring = (out / "runs", report.results, report.positives, qrels_files,
                   {stem: np.asarray(s.ids) for stem, s in stores.items()}, pool_ids)
        ir = ir_metrics.score_runs(*scoring)
        atomic_write_text(out / "ir_metrics.tsv", results_tsv(ir, label=lambda r: r.label, names=report.names))
        if cfg.report.metrics == "irgen":
            irgen = ir_metrics.score_irgen(*scoring, cfg.report.ks)
            report.irgen_table = ir_metrics.irgen_table(irgen, report.names)
            atomic_write_text(out / "irgen_metrics.tsv",
                              results_tsv(irgen, label=lambda r: r.label, names=report.names))
            atomic_write_text(out / "irgen_table.md", report.irgen_table)
    else:
        log.info("run_files: false, so no standard IR metrics (they are computed from the run files)")
    atomic_write_text(out / "results.tsv", results_tsv(report.results, names=report.names))
    ir_part = f"\n{ir_metrics.ir_table(ir, report.names)}" if ir else ""
    irgen_part = f"\n{report.irgen_table}" if report.irgen_table else ""
    atomic_write_text(out / "results.md", report.markdown + ir_part + irgen_part)
    metrics = {
        "fingerprints": models.fingerprints,
        "recall": [vars(r) for r in report.results],
        "ir_metrics": {"library": ir_metrics.library_versions(), "results": [vars(r) for r in ir]},
        **({"irgen_metrics": [vars(r) for r in irgen]} if irgen else {}),
        "decoding": [{**vars(s), "queries_per_second": s.queries_per_second} for s in report.stats],
        "collisions": {stem: p.get("collisions") for stem, p in pools.items()},
    }
    missing = [p.summary() for p in report.positives if p.any_missing]
    if missing:
        metrics["positives_not_in_pool"] = missing
    if any(report.empty_texts.values()):
        metrics["skipped_empty_text"] = report.empty_texts
    atomic_write_json(out / "metrics.json", metrics)
    if plot_recall_by_task(report.results, out / "recall_by_task.png", report.names):
        log.info("wrote %s", out / "recall_by_task.png")
    atomic_write_json(out / "run.json", run_manifest(cfg, models, out, query_files, stores, pools))


def run_manifest(cfg: Any, models: Models, out: Path, query_files: list[Path], stores: dict[str, EmbeddingStore],
                 pools: dict) -> dict:
    first_store = next(iter(stores.values()), None)
    default_pool = next((stem for stem, p in pools.items() if p["kind"] == "universal"), next(iter(pools), None))
    data_root = resolve_path(cfg.paths.data_root)
    return {
        "manifest_version": MANIFEST_VERSION,
        "config": portable_path(out / "config.yaml"),
        "project_root": str(project_root()),
        "eval_config": config_to_dict(cfg),
        "data_root": portable_path(data_root),
        "instructions": portable_path(resolve_path(cfg.paths.instructions, data_root)),
        "encoder": {"name": cfg.paths.encoder,
                    "query_store": portable_path(first_store.path) if first_store is not None else None,
                    "dtype": first_store.meta.get("dtype") if first_store is not None else None,
                    "extraction": first_store.meta.get("config", {}) if first_store is not None else {},
                    # the encoder's fingerprint (its weights' SHA-256s): search refuses other weights
                    "embedded_with": (first_store.meta.get("run_key") or {}).get("inputs", {}).get("encoder")
                    if first_store is not None else None},
        "checkpoints": {name: portable_path(path) for name, path in models.files.items()},
        "fingerprints": models.fingerprints,
        "decoding": config_to_dict(cfg.decoding),
        "rerank": cfg.rerank,
        "pools": pools,
        "default_pool": default_pool,
        "query_files": [portable_path(path) for path in query_files],
    }
