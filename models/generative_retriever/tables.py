"""Evaluation results as UniIR's TSV, Markdown tables in the paper's layout, and a bar chart.

Each writer takes ``names`` (method key -> column header, ``method_names``), so the dense
baseline is named after the encoder the run's stores were made with; without it the headers are
METHOD_COLUMNS' (CLIP-SF, the paper's dense baseline).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Callable

from genius.models.generative_retriever.paper_numbers import DISPLAY_NAME, paper_rank, paper_recall

# method key -> (our column header, the paper's column it compares with)
METHOD_COLUMNS = {
    "dense": ("Dense CLIP-SF", "CLIP-SF"),
    "genius": ("GENIUS", "GENIUS"),
    "genius_r": ("GENIUS^R", "GENIUS^R"),
}
Names = dict[str, str]  # method key -> column header


def method_names(store_meta: dict | None = None) -> Names:
    """Each method's column header; the dense baseline's names the encoder of the stores
    (``store_meta``: a store's meta.json): "Dense CLIP-SF", "Dense MiniLM" (the packaged
    all-MiniLM-L6-v2), "Dense (<model folder>)" for another text encoder, or "Dense (<encoder
    name>)" for a store that records no extraction config."""
    names = {method: header for method, (header, _) in METHOD_COLUMNS.items()}
    if store_meta is not None:
        encoder = (store_meta.get("config") or {}).get("encoder") or {}
        kind, folder = encoder.get("kind"), encoder.get("text_model_dir")
        if kind == "hf_text":
            names["dense"] = f"Dense ({PurePath(folder).name})" if folder else "Dense MiniLM"
        elif kind != "clip_sf":
            names["dense"] = f"Dense ({store_meta.get('encoder')})"
    return names
POOL_TITLES = {"task-specific": "Task-specific pools", "universal": "Universal pool"}
TASK_LABEL = {0: "T→I", 1: "T→T", 2: "T→(I,T)", 3: "I→T", 4: "I→I",
              6: "(I,T)→T", 7: "(I,T)→I", 8: "(I,T)→(I,T)"}
# UniIR calls its hit rate "Recall@k"; trec_eval, pyserini and ranx mean another thing by that name.
HIT_RATE = "hit rate (UniIR's Recall@k)"
TSV_COLUMNS = ["Model", "TaskID", "Task", "Dataset", "Split", "Metric", "CandPool", "Value", "UnionPool", "UnionValue"]


@dataclass(frozen=True)
class RecallResult:
    """One Recall@k of one method on one (query file, task) against one pool."""

    method: str  # key of METHOD_COLUMNS
    pool_kind: str  # "task-specific" | "universal"
    pool: str  # pool file stem
    query_file: str  # query file stem
    dataset: str
    task_id: int
    split: str
    k: int
    value: float  # fraction in [0, 1]
    reported: bool  # the k the paper reports for this dataset (the Markdown table shows these)
    mbeir: bool  # a real M-BEIR file, so the paper's numbers apply


@dataclass(frozen=True)
class DecodeStats:
    """Per (pool, query file): decoding cost and what GENIUS returned."""

    pool_kind: str
    pool: str
    query_file: str
    num_queries: int
    decode_seconds: float
    cached: bool  # decoded IDs reused from an earlier run (seconds are that run's)
    genius_candidates_per_query: float
    rerank_candidates_per_query: float
    target_modality_share: float  # of GENIUS's returned candidates

    @property
    def queries_per_second(self) -> float:
        return self.num_queries / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


# ---- TSV ------------------------------------------------------------------------------------
def hit_rate_label(k: int) -> str:
    return f"HitRate@{k} (UniIR's Recall@{k})"


def results_tsv(results: list, label: Callable[[Any], str] = lambda r: hit_rate_label(r.k),
                names: Names | None = None) -> str:
    """UniIR's result TSV, one row per (method, query file, task, metric): local value beside the union value.

    ``results``: RecallResults (the hit rate), or any results with the same fields and a ``label``
    naming their metric (``ir_metrics.IRResult``).
    """
    names = names or method_names()
    rows: dict[tuple, dict] = {}
    for r in results:
        key = (r.method, r.query_file, r.task_id, label(r))
        row = rows.setdefault(key, {"Model": names[r.method], "TaskID": r.task_id,
                                    "Task": TASK_LABEL.get(r.task_id, str(r.task_id)), "Dataset": r.dataset,
                                    "Split": r.split, "Metric": label(r), "CandPool": "", "Value": "",
                                    "UnionPool": "", "UnionValue": ""})
        pool_col, value_col = ("UnionPool", "UnionValue") if r.pool_kind == "universal" else ("CandPool", "Value")
        row[pool_col], row[value_col] = r.pool, f"{r.value:.4f}"
    lines = ["\t".join(TSV_COLUMNS)]
    lines += ["\t".join(str(row[c]) for c in TSV_COLUMNS) for row in rows.values()]
    return "\n".join(lines) + "\n"


# ---- Markdown --------------------------------------------------------------------------------
def _mean(values: list[float | None]) -> float | None:
    return sum(values) / len(values) if values and all(v is not None for v in values) else None


def _mean_as_shown(values: list[float | None]) -> float | None:
    """The mean of the values as the table prints them (percent, one decimal): the papers average
    their printed rows (UniIR's 50.57 -> 50.6), so an Average row is comparable with theirs."""
    shown = [None if v is None or math.isnan(v) else float(_pct(v)) / 100 for v in values]
    return _mean(shown)


def recall_table(results: list[RecallResult], pool_kind: str, names: Names | None = None) -> str:
    """The paper's layout: Task, Dataset, then one column per method, then an Average row.

    Only each file's reported k is shown. When the files are M-BEIR's, the paper's numbers for
    the same pool kind follow in columns of their own.
    """
    shown = [r for r in results if r.pool_kind == pool_kind and r.reported]
    if not shown:
        return ""
    methods = [m for m in METHOD_COLUMNS if any(r.method == m for r in shown)]
    lines_of: dict[tuple, dict] = {}
    for r in shown:
        line = lines_of.setdefault((r.query_file, r.task_id), {"result": r, "ours": {}})
        line["ours"][r.method] = r.value
    ordered = sorted(lines_of.values(),
                     key=lambda l: (paper_rank(l["result"].dataset, l["result"].task_id), l["result"].query_file))
    with_paper = any(l["result"].mbeir for l in ordered)

    def paper(line, method):
        r = line["result"]
        value = paper_recall(pool_kind, METHOD_COLUMNS[method][1], r.dataset, r.task_id) if r.mbeir else None
        return None if value is None else value / 100

    names = names or method_names()
    header = ["Task", "Dataset", "Metric"] + [names[m] for m in methods]
    if with_paper:
        header += [f"paper {METHOD_COLUMNS[m][1]}" for m in methods]
    out = [f"### {POOL_TITLES.get(pool_kind, pool_kind)}: {HIT_RATE}, %", "", "| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
    for line in ordered:
        r = line["result"]
        cells = [TASK_LABEL.get(r.task_id, str(r.task_id)), DISPLAY_NAME.get(r.dataset, r.dataset), f"HitRate@{r.k}"]
        cells += [_pct(line["ours"].get(m)) for m in methods]
        if with_paper:
            cells += [_pct(paper(line, m)) for m in methods]
        out.append("| " + " | ".join(cells) + " |")
    average = ["", "**Average**", ""] + [f"**{_pct(_mean_as_shown([l['ours'].get(m) for l in ordered]))}**"
                                         for m in methods]
    if with_paper:
        average += [_pct(_mean_as_shown([paper(l, m) for l in ordered])) for m in methods]
    out.append("| " + " | ".join(average) + " |")
    if with_paper:
        out += ["", "Paper columns: GENIUS (CVPR 2025) Tables 1-2; averages are plain means of the rows shown "
                "(published universal averages: CLIP-SF 48.9, GENIUS 28.8, GENIUS^R 38.3)."]
    return "\n".join(out) + "\n"


def decode_table(stats: list[DecodeStats]) -> str:
    if not stats:
        return ""
    out = ["### Decoding", "",
           "| Pool | Query file | Queries | Decode s | Queries/s | GENIUS cands/query | GENIUS^R set/query "
           "| Target modality share |",
           "|---|---|---|---|---|---|---|---|"]
    for s in stats:
        seconds = f"{s.decode_seconds:.2f}" + (" (cached)" if s.cached else "")
        out.append(f"| {s.pool} | {s.query_file} | {s.num_queries} | {seconds} | {s.queries_per_second:.1f} | "
                   f"{s.genius_candidates_per_query:.1f} | {s.rerank_candidates_per_query:.1f} | "
                   f"{_pct(s.target_modality_share)}% |")
    return "\n".join(out) + "\n"


def markdown_report(results: list[RecallResult], stats: list[DecodeStats], title: str, note: str = "",
                    names: Names | None = None) -> str:
    parts = [f"## {title}", ""] + ([note, ""] if note else [])
    parts += [t for kind in POOL_TITLES if (t := recall_table(results, kind, names))]
    parts.append(decode_table(stats))
    return "\n".join(p for p in parts if p is not None)


# ---- chart -----------------------------------------------------------------------------------
def plot_recall_by_task(results: list[RecallResult], path: str | os.PathLike, names: Names | None = None) -> bool:
    """Bar chart of each method's reported Recall per (task, dataset), one panel per pool kind.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from genius.common.io import atomic_path

    kinds = [k for k in POOL_TITLES if any(r.pool_kind == k and r.reported for r in results)]
    if not kinds:
        return False
    names = names or method_names()
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 3.6 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        shown = [r for r in results if r.pool_kind == kind and r.reported]
        rows = sorted({(paper_rank(r.dataset, r.task_id), r.query_file, r.task_id, r.dataset) for r in shown})
        methods = [m for m in METHOD_COLUMNS if any(r.method == m for r in shown)]
        width = 0.8 / max(len(methods), 1)
        for i, method in enumerate(methods):
            value = {(r.query_file, r.task_id): r.value for r in shown if r.method == method}
            ax.bar([x + i * width for x in range(len(rows))], [100 * value.get((q, t), 0.0) for _, q, t, _ in rows],
                   width, label=names[method])
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(rows))])
        ax.set_xticklabels([f"{TASK_LABEL.get(t, t)}\n{DISPLAY_NAME.get(d, d)}" for _, _, t, d in rows], fontsize=8)
        ax.set_ylabel(f"{HIT_RATE}, %")
        ax.set_title(POOL_TITLES[kind])
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True
