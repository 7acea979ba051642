"""Ablation grid on COCO captions: which settings move GENIUS's recall, chosen on validation, tested once.

A grid file (YAML or JSON; ``benchmarks/ablation_grid.yaml``) names cells, each a set of
``coco_t2t.py`` flags, plus ``common`` flags for every cell::

    common: {images: 5000}
    cells:
      baseline: {}                          # coco_t2t's defaults
      ids_L4_K16: {levels: 4, codebook: 16}

Every cell runs ``coco_t2t.main`` in this process on the validation split, as run
``ablate_<grid>/<cell>_val`` of ``--out-dir`` (default coco_t2t's, so all cells and the plain
coco_t2t runs share one caption-embedding cache). Its trained stages (world, quantizer, generator,
codes) go to ``ablate_<grid>/stages/<split>_<digest of the flags that reach them>``: cells that
differ only in evaluation flags (``coco_t2t.EVAL_ONLY``: beams, diverse-beam penalty, order inside
an ID) train once and share them, and the later ones show 0 training seconds. Resumable: a cell
whose result JSON exists and records exactly the cell's flags is skipped; one whose flags changed
is run again.

``--choose [METRIC ...]`` names the best cell on validation (default ``genius_R@5``; all cells must
be finished); further metrics break ties in order (e.g. ``genius_R@5 genius_r_R@5``: the best
GENIUS, and among equals the best GENIUS^R), then grid order. ``--final`` commits to that choice
in ``final.json`` and runs the cell once on the test split; a later ``--final`` that would choose
differently refuses unless ``--force`` (every forced test run stays recorded and in the table).

Outputs in ``<out-dir>/ablate_<grid>/``: ``ablation.{md,csv,json}`` (one row per cell and split:
Recall@1/5/10 of dense, GENIUS and GENIUS^R, the pool's ID statistics, decoding speed, training
time), ``final.json`` and the cells' run directories.

    bash benchmarks/run_ablate.sh [--grid FILE] [--out-dir DIR]     # the grid on validation
    bash benchmarks/run_ablate.sh --choose [genius_R@5]             # the best cell on validation
    bash benchmarks/run_ablate.sh --final [--choose METRIC] [--force]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from genius.benchmarks import coco_t2t
from genius.benchmarks.common import OUT_DIR, markdown_table, rate, write_csv

DEFAULT_GRID = Path(__file__).resolve().parent / "ablation_grid.yaml"
METHODS = {"dense": "dense", "genius": "GENIUS", "genius_r": "GENIUS^R"}
METRICS = tuple(f"{m}_R@{k}" for m in METHODS for k in coco_t2t.KS)
DEFAULT_METRIC = "genius_R@5"
# The harness sets these per cell: a grid that set them would mix splits or share run directories.
OWNED_FLAGS = ("split", "run-name", "out-dir", "stages-dir")
# Where a run's files go, not what it does: not part of the key of a cell's trained stages.
PLACEMENT = ("out_dir", "run_name", "stages_dir")
CELL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
log = logging.getLogger("genius.bench.ablate")


@dataclass
class Cell:
    name: str
    flags: list[str]  # coco_t2t flags, common ones first (argparse keeps the last of a repeated flag)
    own: list[str]  # the cell's own flags, as the table shows them


# ---- the grid file ---------------------------------------------------------------------------
def load_grid(path: Path) -> list[Cell]:
    """The grid's cells, in file order; every cell's flags are checked as coco_t2t would, before any run."""
    import yaml

    from genius.common.stage import one_line

    try:
        grid = yaml.safe_load(path.read_text())  # JSON is YAML too
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML or JSON ({one_line(err)}); fix the grid file") from None
    if not isinstance(grid, dict) or not isinstance(grid.get("cells"), dict) or not grid["cells"]:
        raise ValueError(f"{path}: a grid file is a mapping with a non-empty 'cells' mapping (and optional 'common')")
    unknown = set(grid) - {"common", "cells"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {sorted(unknown)}; the keys are 'common' and 'cells'")
    common = flags_argv(grid.get("common") or {}, f"{path}: common")
    cells = []
    for name, flags in grid["cells"].items():
        if not isinstance(name, str) or not CELL_NAME.match(name):
            raise ValueError(f"{path}: cell name {name!r} must be letters, digits, '_', '.' or '-' (it names a folder)")
        own = flags_argv(flags or {}, f"{path}: cell {name}")
        cell = Cell(name, common + own, own)
        check_cell(cell, f"{path}: cell {name}")
        cells.append(cell)
    return cells


def flags_argv(flags: object, where: str) -> list[str]:
    """``{flag: value}`` of the grid file as coco_t2t command-line words."""
    if not isinstance(flags, dict):
        raise ValueError(f"{where}: expected a mapping of coco_t2t flags to values, got {flags!r}")
    known = {dest.replace("_", "-") for dest in vars(coco_t2t.build_parser().parse_args([]))}
    argv = []
    for flag, value in flags.items():
        if flag in OWNED_FLAGS:
            raise ValueError(f"{where}: '{flag}' is set by the harness (validation grid, then --final); remove it")
        if flag not in known:
            raise ValueError(f"{where}: unknown coco_t2t flag '{flag}'; valid flags: "
                             f"{', '.join(sorted(known - set(OWNED_FLAGS)))}")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{where}: flag '{flag}' needs one number or word, got {value!r}")
        argv += [f"--{flag}", str(value)]
    return argv


def check_cell(cell: Cell, where: str) -> None:
    """Parse and range-check the cell's flags as coco_t2t would; a bad value raises ``ValueError`` naming ``where``."""
    parser = coco_t2t.build_parser()

    def refuse(message: str):
        raise ValueError(f"{where}: {message}; fix the grid file")

    parser.error = refuse  # argparse would print its usage and exit; the grid file is what to fix
    try:
        coco_t2t.check_args(coco_t2t.fill_pool_defaults(parser.parse_args(cell.flags)))
    except ValueError as err:
        refuse(str(err))


def cell_argv(cell: Cell, split: str, out_dir: Path, grid_name: str) -> list[str]:
    run_name = f"ablate_{grid_name}/{cell.name}_{split}"
    argv = cell.flags + ["--split", split, "--out-dir", str(out_dir), "--run-name", run_name]
    return argv + ["--stages-dir", str(out_dir / f"ablate_{grid_name}" / "stages" / stages_key(argv))]


def stages_key(argv: list[str]) -> str:
    """The name of the directory of a cell's trained stages: the split and a digest of every flag that
    reaches stages 1-2, so cells that differ only in coco_t2t.EVAL_ONLY flags train once and share them.
    A flag coco_t2t gained later counts only away from its earlier behaviour, so adding one to
    coco_t2t leaves the names, and the stages already trained, as they were."""
    args = vars(coco_t2t.parse_args(argv))  # the cell's flags were checked when the grid loaded
    trained = {k: v for k, v in args.items() if k not in (*coco_t2t.EVAL_ONLY, *PLACEMENT)
               and not (k in coco_t2t.ADDED_LATER and v == coco_t2t.ADDED_LATER[k])}
    digest = hashlib.sha256(json.dumps(trained, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{args['split']}_{digest}"


# ---- cells: run, skip, read ------------------------------------------------------------------
def recorded(args: argparse.Namespace) -> dict:
    """The flags as coco_t2t's result JSON records them (paths as strings)."""
    return json.loads(json.dumps(vars(args), default=str))


def made_with(flags: object) -> object:
    """Recorded flags as two results are compared: those coco_t2t gained after a result was recorded
    at the value that kept the earlier behaviour (``coco_t2t.ADDED_LATER``), so the result still
    stands for a cell that sets them so; and without ``stages_dir``, since where the stages were kept
    says nothing of how the result was made."""
    if not isinstance(flags, dict):
        return flags
    return {**{k: v for k, v in coco_t2t.ADDED_LATER.items() if k not in flags},
            **{k: v for k, v in flags.items() if k != "stages_dir"}}


def finished_result(args: argparse.Namespace) -> dict | None:
    """The cell's result when its JSON is complete and made with exactly these flags, else None."""
    path = coco_t2t.run_paths(args)[1].with_suffix(".json")
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; the cell counts as not run", path)
        return None
    if not isinstance(result, dict) or made_with(result.get("args")) != made_with(recorded(args)):
        log.info("%s was made with other flags than the cell's; the cell counts as not run", path)
        return None
    return result if {"recall", "pool_stats", "timings"} <= set(result) else None


def run_cell(argv: list[str]) -> None:
    if coco_t2t.main(argv) != 0:
        raise RuntimeError(f"coco_t2t {' '.join(argv)} failed")


def ensure_cell(cell: Cell, split: str, out_dir: Path, grid_name: str) -> None:
    """Run the cell on ``split`` unless its result with exactly these flags is on disk."""
    argv = cell_argv(cell, split, out_dir, grid_name)
    args = coco_t2t.parse_args(argv)
    if finished_result(args) is not None:
        log.info("cell %s (%s) is finished; skipped", cell.name, split)
        return
    log.info("cell %s (%s): coco_t2t %s", cell.name, split, " ".join(argv))
    run_cell(argv)
    assert finished_result(args) is not None, f"cell {cell.name} ran but left no result with its flags"


def cell_results(cells: list[Cell], split: str, out_dir: Path, grid_name: str) -> dict[str, dict | None]:
    return {c.name: finished_result(coco_t2t.parse_args(cell_argv(c, split, out_dir, grid_name))) for c in cells}


def metric_value(result: dict, metric: str) -> float:
    method, _, k = metric.rpartition("_R@")
    return float(result["recall"][method][k])  # JSON keys are strings


def choose(cells: list[Cell], results: dict[str, dict | None], metrics: list[str], grid: Path) -> tuple[Cell, float]:
    """The best cell on validation by ``metrics[0]``, ties broken by the next metrics in order, then by
    grid order (the first wins); with the cell's value of ``metrics[0]``."""
    missing = [name for name, result in results.items() if result is None]
    if missing:
        raise ValueError(f"validation cells {missing} of {grid} are not finished; run the grid first "
                         f"(bash benchmarks/run_ablate.sh --grid {grid})")
    best = max(cells, key=lambda c: (*(metric_value(results[c.name], m) for m in metrics), -cells.index(c)))
    return best, metric_value(results[best.name], metrics[0])


def chosen_by(args: argparse.Namespace) -> list[str]:
    """The metrics of ``--choose`` (the default when none is given)."""
    return args.choose or [DEFAULT_METRIC]


def describe(metrics: list[str]) -> str:
    return ", then ".join(metrics)


# ---- the test split, once --------------------------------------------------------------------
def committed_runs(path: Path) -> list[dict]:
    """The test runs committed so far, oldest first."""
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())["runs"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path} is not a record of test runs as --final writes it; restore it from a backup "
                         "(it is what keeps the test split to one run per choice)") from None


def commit_final(path: Path, cell: Cell, metric: str, value: float, force: bool) -> bool:
    """Record the choice before the test run; False when this exact choice was already committed."""
    from genius.common.io import atomic_write_json

    runs = committed_runs(path)
    if runs and runs[-1]["cell"] == cell.name and runs[-1]["flags"] == cell.flags:
        return False
    if runs and not force:
        last = runs[-1]
        raise ValueError(f"{path}: the test split was already run for cell {last['cell']} (chosen by "
                         f"{last['metric']}); now {cell.name} would be chosen by {metric}: pass --force to run it on "
                         "test as well (both stay recorded)")
    runs.append({"cell": cell.name, "flags": cell.flags, "own": cell.own, "metric": metric, "validation_value": value,
                 "committed": time.strftime("%Y-%m-%d %H:%M:%S")})
    atomic_write_json(path, {"runs": runs})
    return True


# ---- the table -------------------------------------------------------------------------------
COLUMNS = (["cell", "split", "flags"] + [f"{m}_R@{k}" for m in METHODS for k in coco_t2t.KS] +
           ["pool", "distinct_ids", "collision_rate", "largest_bucket", "decode_qps", "train_s"])


def table_row(name: str, split: str, own: list[str], result: dict | None) -> dict:
    row = {"cell": name, "split": "validation" if split == "val" else "test", "flags": " ".join(own) or "(defaults)"}
    if result is None:
        return row
    stats, timings = result["pool_stats"], result["timings"]
    row.update({f"{m}_R@{k}": metric_value(result, f"{m}_R@{k}") for m in METHODS for k in coco_t2t.KS})
    row.update(pool=result["pool"], distinct_ids=stats["distinct_ids"], collision_rate=stats["collision_rate"],
               largest_bucket=stats["largest_bucket"], decode_qps=result["beam_search_qps"],
               train_s=timings["rq_s"] + timings["gen_s"])
    return row


def write_table(table_dir: Path, grid: Path, rows: list[dict], note: str) -> None:
    from genius.common.io import atomic_path, atomic_write_json, atomic_write_text

    def cell(row: dict, key: str) -> str:
        value = row.get(key)
        if value is None:
            return ""
        if key == "decode_qps":
            return rate(value)
        if key == "train_s":
            return f"{value:.1f}"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    header = ["cell", "split", "flags"] + [f"{label} R@{k}" for label in METHODS.values() for k in coco_t2t.KS] + \
        ["pool", "distinct IDs", "collision rate", "largest bucket", "decode q/s", "training s"]
    text = (f"Ablation grid `{grid}`: COCO captions text to text (coco_t2t.py), every cell on the same data.\n"
            f"{note}\nThe split column says which numbers are validation (chosen on) and which test (run once). "
            "Blank numbers: the cell has not finished. Training s is 0 when a cell's stages were already up to "
            "date, as for a cell that differs from an earlier one only in evaluation flags (they share them).\n\n" +
            markdown_table(header, [[cell(r, key) for key in COLUMNS] for r in rows]))
    atomic_write_text(table_dir / "ablation.md", text)
    with atomic_path(table_dir / "ablation.csv") as tmp:
        write_csv(tmp, rows, COLUMNS)
    atomic_write_json(table_dir / "ablation.json", {"grid": str(grid), "note": note, "rows": rows})
    print(text)


def refresh_table(cells: list[Cell], args: argparse.Namespace, table_dir: Path, grid_name: str) -> None:
    """The table from what is on disk: every validation cell, then every committed test run."""
    val = cell_results(cells, "val", args.out_dir, grid_name)
    rows = [table_row(c.name, "val", c.own, val[c.name]) for c in cells]
    runs = committed_runs(table_dir / "final.json")
    for run in runs:
        cell = Cell(run["cell"], run["flags"], run["own"])
        result = finished_result(coco_t2t.parse_args(cell_argv(cell, "test", args.out_dir, grid_name)))
        rows.append(table_row(cell.name, "test", cell.own, result))
    metrics = chosen_by(args)
    if all(r is not None for r in val.values()):
        best, value = choose(cells, val, metrics, args.grid)
        note = f"Best cell on validation by {describe(metrics)}: **{best.name}** ({metrics[0]} {value:.3f})."
    else:
        note = "Validation grid not finished yet."
    if runs:
        note += " Test runs, in order: " + ", ".join(f"{r['cell']} (chosen by {r['metric']})" for r in runs) + "."
    write_table(table_dir, args.grid, rows, note)


# ---- main ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", type=Path, default=DEFAULT_GRID, help="YAML or JSON file naming the cells")
    p.add_argument("--split", choices=("val",), default="val",
                   help="the grid runs on validation only; the test split is run once, by --final")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR / "coco_t2t",
                   help="coco_t2t's output directory (its caption cache is shared by every cell)")
    p.add_argument("--choose", nargs="*", choices=METRICS, metavar="METRIC",
                   help=f"name the best validation cell by METRIC (default {DEFAULT_METRIC}; one of "
                        f"{', '.join(METRICS)}); further metrics break ties in order, then grid order")
    p.add_argument("--final", action="store_true", help="run the chosen cell once on the test split")
    p.add_argument("--force", action="store_true", help="with --final: allow a test run for a different choice")
    return p


def main(argv: list[str] | None = None) -> int:
    from genius.common.stage import setup_logging, user_errors_exit

    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors_exit(parser):
        if not args.grid.is_file():
            raise ValueError(f"--grid {args.grid}: no such file; pass a grid file (see benchmarks/ablation_grid.yaml)")
        if args.force and not args.final:
            raise ValueError("--force only applies to --final; add --final or drop --force")
        cells = load_grid(args.grid)
        grid_name = args.grid.stem
        table_dir = args.out_dir / f"ablate_{grid_name}"
        if args.final:
            metrics = chosen_by(args)
            best, value = choose(cells, cell_results(cells, "val", args.out_dir, grid_name), metrics, args.grid)
            if not commit_final(table_dir / "final.json", best, describe(metrics), value, args.force):
                log.info("the test run of %s was already committed; finishing or reusing it", best.name)
            ensure_cell(best, "test", args.out_dir, grid_name)
        elif args.choose is not None:
            metrics = chosen_by(args)
            best, value = choose(cells, cell_results(cells, "val", args.out_dir, grid_name), metrics, args.grid)
            print(f"best cell on validation by {describe(metrics)}: {best.name} ({metrics[0]} {value:.3f}): "
                  f"{' '.join(best.flags)}")
        else:
            for cell in cells:
                ensure_cell(cell, "val", args.out_dir, grid_name)
                if cell is not cells[-1]:
                    refresh_table(cells, args, table_dir, grid_name)  # a killed grid still leaves its table so far
        refresh_table(cells, args, table_dir, grid_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
