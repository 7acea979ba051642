"""What ``genius eval`` writes into its results folder, and the run manifest ``genius search`` reads.

    results/<setting>/
      config.yaml, run.json (manifest for genius search), metrics.json, done.json
      results.tsv (UniIR's hit rate), ir_metrics.tsv (standard IR metrics), results.md, recall_by_task.png
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
    RecallResult,
    markdown_report,
    plot_recall_by_task,
    results_tsv,
)

log = logging.getLogger("genius.eval")

MANIFEST_VERSION = 1
# Raised when a finished evaluation lacks what eval now writes, so it is redone rather than
# reported up to date: 2 = ir_metrics.tsv and the hit-rate labels.
OUTPUTS_VERSION = 2
# Everything a run writes in its results folder (the caches decoded/ and fused/ are keyed by
# content and outlive runs); a run set aside moves these to stale/<time>/.
RUN_OUTPUTS = ("config.yaml", "run.json", "metrics.json", "results.tsv", "ir_metrics.tsv", "results.md",
               "recall_by_task.png", "runs")


@dataclass
class EvalReport:
    results: list[RecallResult]
    stats: list[DecodeStats]
    markdown: str
    out_dir: Path
    positives: list[PoolPositives]


def report_markdown(results: list[RecallResult], stats: list[DecodeStats], positives: list[PoolPositives],
                    title: str, note: str) -> str:
    """The paper-layout tables, then (only when any) the positives that are not in their pool."""
    markdown = markdown_report(results, stats, title, note)
    missing = [p for p in positives if p.any_missing]
    if missing:
        markdown += "\n\n### Positives not in the evaluated pool\n\n" + "\n".join(p.describe() for p in missing)
    return markdown


def write_outputs(cfg: Any, models: Models, report: EvalReport, query_files: list[Path],
                  stores: dict[str, EmbeddingStore], pools: dict, qrels_files: dict[str, Path]) -> None:
    """``stores`` and ``qrels_files``: by query file stem; ``pools``: run.json's entries by pool stem."""
    out = report.out_dir
    ir = []
    if cfg.run_files:  # the standard metrics are computed from the run files, as other tools would
        pool_ids = {stem: np.sort(np.asarray(EmbeddingStore.open(resolve_path(p["store"]), verify=False).ids))
                    for stem, p in pools.items()} if cfg.missing_positives == "exclude" else {}
        ir = ir_metrics.score_runs(out / "runs", report.results, report.positives, qrels_files,
                                   {stem: np.asarray(s.ids) for stem, s in stores.items()}, pool_ids)
        atomic_write_text(out / "ir_metrics.tsv", results_tsv(ir, label=lambda r: r.label))
    else:
        log.info("run_files: false, so no standard IR metrics (they are computed from the run files)")
    atomic_write_text(out / "results.tsv", results_tsv(report.results))
    atomic_write_text(out / "results.md", report.markdown + (f"\n{ir_metrics.ir_table(ir)}" if ir else ""))
    metrics = {
        "fingerprints": models.fingerprints,
        "recall": [vars(r) for r in report.results],
        "ir_metrics": {"library": ir_metrics.library_versions(), "results": [vars(r) for r in ir]},
        "decoding": [{**vars(s), "queries_per_second": s.queries_per_second} for s in report.stats],
        "collisions": {stem: p.get("collisions") for stem, p in pools.items()},
    }
    missing = [p.summary() for p in report.positives if p.any_missing]
    if missing:
        metrics["positives_not_in_pool"] = missing
    atomic_write_json(out / "metrics.json", metrics)
    if plot_recall_by_task(report.results, out / "recall_by_task.png"):
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
                    "extraction": first_store.meta.get("config", {}) if first_store is not None else {}},
        "checkpoints": {name: portable_path(path) for name, path in models.files.items()},
        "fingerprints": models.fingerprints,
        "decoding": config_to_dict(cfg.decoding),
        "rerank": cfg.rerank,
        "pools": pools,
        "default_pool": default_pool,
        "query_files": [portable_path(path) for path in query_files],
    }
