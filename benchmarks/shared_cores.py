"""Stage times on shared cores: a setting's pipeline (the demo by default), stage by stage, quiet and
under load (``--busy`` CPU-bound processes this script starts and kills), with the automatic thread
policy (``genius.common.distributed.ThreadPolicy``) and with 1 and 2 pinned threads.

Every stage runs in its own process, as ``configs_scripts/<setting>/run_<stage>.sh`` runs it, with
``GENIUS_ROOT`` set to a work folder (default ``benchmarks/out/shared_cores/work``), so the user's
worlds, checkpoints and results are never touched. The stages are first brought up to date there
(each skips itself when done; ``--seed-from`` copies a finished root in to start from), then each
timed cell re-runs one stage with its ``force`` key. Threads are pinned with OMP_NUM_THREADS,
which the policy leaves alone. For each stage and repeat, the quiet and the loaded cells follow
each other and the modes alternate, so a slow spell of the shared machine hits every mode alike.
Each cell records the load (``/proc/loadavg``) at its start and a digest of what the stage wrote
(the last training loss, or a hash of codes / results), to show that threads do not change results.

Writes ``shared_cores.csv`` and ``shared_cores.md`` under ``benchmarks/out/shared_cores/``.
Usage: bash benchmarks/run_shared_cores.sh [--stages train_rq,train_gen] [--repeats 1] [--busy 3]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from genius.benchmarks.common import OUT_DIR, cpu_model, write_csv

REPO = Path(__file__).resolve().parents[1]
STAGES = ("world", "train_clip", "extract", "train_rq", "assign_codes", "train_gen", "eval")
MODES = ("auto", "1", "2")
LOADS = ("quiet", "busy")
COLUMNS = ("stage", "repeat", "load", "threads", "seconds", "loadavg_at_start", "result")


@dataclass(frozen=True)
class Stage:
    module: str
    force: str  # the --set key that redoes a finished run
    output: str  # the config key of its output folder (for the result digest)


STAGE_INFO = {
    "train_clip": Stage("genius.feature_extraction.train_clip", "output.force", "output.run_dir"),
    "extract": Stage("genius.feature_extraction.extract", "output.force", ""),
    "train_rq": Stage("genius.models.residual_quantization.train", "train.force", "out_dir"),
    "assign_codes": Stage("genius.models.residual_quantization.assign_codes", "force", "out_dir"),
    "train_gen": Stage("genius.models.generative_retriever.train", "train.force", "out_dir"),
    "eval": Stage("genius.models.generative_retriever.evaluate", "force", "paths.results"),
}


def world_args(setting: Path) -> list[str]:
    """The ``genius.synthetic.world`` arguments of the setting's run_world.sh (``--out``, ``--size``)."""
    text = (setting / "run_world.sh").read_text()
    out, size = re.search(r"--out (\S+)", text), re.search(r"--size (\S+)", text)
    if not (out and size):
        raise ValueError(f"{setting / 'run_world.sh'}: no --out/--size found; "
                         "pass a setting folder with a run_world.sh")
    return ["--out", out[1], "--size", size[1], "--seed", "0"]


def command(setting: Path, stage: str, work: Path, overrides: dict[str, list[str]], force: bool) -> list[str]:
    python = [sys.executable, "-m"]
    if stage == "world":
        args = world_args(setting)
        args[1] = str(work / args[1])
        return python + ["genius.synthetic.world", *args, *(["--force"] if force else [])]
    info = STAGE_INFO[stage]
    sets = [f"{info.force}=true"] if force else []
    sets += overrides.get(stage, [])
    return python + [info.module, "--config", str(setting / f"{stage}.yaml"), *(x for s in sets for x in ("--set", s))]


def environment(work: Path, mode: str) -> dict[str, str]:
    env = {**os.environ, "GENIUS_ROOT": str(work), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    if mode != "auto":
        env["OMP_NUM_THREADS"] = mode
    return env


def run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("ab") as out:
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def start_busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def output_dir(setting: Path, stage: str, work: Path) -> Path | None:
    """The stage's output folder in the work root, from its YAML (None: no single folder)."""
    import yaml

    key = STAGE_INFO[stage].output if stage in STAGE_INFO else ""
    if not key:
        return None
    node = yaml.safe_load((setting / f"{stage}.yaml").read_text())
    for part in key.split("."):
        node = node[part]
    return work / node


def digest(setting: Path, stage: str, work: Path) -> str:
    """What the run produced, comparable across cells: the last logged training loss, or a hash
    of the codes or the results table."""
    out = output_dir(setting, stage, work)
    if out is None or not out.is_dir():
        return "-"
    if stage.startswith("train_"):
        log = out / "metrics.jsonl"
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
        losses = [r["loss"] for r in lines if "loss" in r and not r.get("epoch_summary")]
        return f"loss {losses[-1]:.6f}" if losses else "-"
    files = sorted(out.rglob("codes.npy")) if stage == "assign_codes" else [out / "results.tsv"]
    # earlier runs set aside (assign-codes keeps one stale/ per pool) are not this run's output
    files = [f for f in files if f.is_file() and "stale" not in f.relative_to(out).parts]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def drop_stale(setting: Path, stage: str, work: Path) -> None:
    """Forced runs archive the previous one under <out>/stale/ (assign-codes: <out>/<pool>/stale/):
    keep the work root small."""
    out = output_dir(setting, stage, work)
    if out is not None:
        for stale in [out / "stale", *out.glob("*/stale")]:
            shutil.rmtree(stale, ignore_errors=True)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:4])


def measure(args: argparse.Namespace) -> list[dict]:
    setting, work = args.setting.resolve(), args.work.resolve()
    overrides: dict[str, list[str]] = {}
    for item in args.set:
        stage, _, kv = item.partition(":")
        overrides.setdefault(stage, []).append(kv)
    if args.seed_from and not work.exists():
        shutil.copytree(args.seed_from, work, symlinks=True)
    work.mkdir(parents=True, exist_ok=True)
    log = args.out / "stages.log"
    last = max(STAGES.index(s) for s in args.stages)
    for stage in STAGES[:last + 1]:  # bring the stages up to date (each skips itself when done)
        run(command(setting, stage, work, overrides, force=False), environment(work, "auto"), log)
    rows = []
    for stage in args.stages:
        for repeat in range(args.repeats):
            for li, load in enumerate(args.loads):
                busy = start_busy(args.busy) if load == "busy" else []
                try:
                    if busy:
                        time.sleep(args.settle)  # let the run queue fill before timing
                    modes = args.modes if (repeat + li) % 2 == 0 else args.modes[::-1]
                    for mode in modes:
                        at_start = loadavg()
                        cmd = command(setting, stage, work, overrides, force=True)
                        seconds = run(cmd, environment(work, mode), log)
                        drop_stale(setting, stage, work)  # before the digest: it must see this run's outputs only
                        rows.append({"stage": stage, "repeat": repeat, "load": load, "threads": mode,
                                     "seconds": round(seconds, 2), "loadavg_at_start": at_start,
                                     "result": digest(setting, stage, work)})
                        print(f"{stage:13s} {load:5s} threads {mode:4s} {seconds:8.1f} s  load {at_start}  "
                              f"{rows[-1]['result']}", flush=True)
                finally:
                    stop_busy(busy)
    return rows


def best(rows: list[dict], stage: str, load: str, mode: str) -> float | None:
    times = [r["seconds"] for r in rows if (r["stage"], r["load"], r["threads"]) == (stage, load, mode)]
    return min(times) if times else None


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    stages = [s for s in args.stages if any(r["stage"] == s for r in rows)]
    cells = [(load, mode) for load in args.loads for mode in args.modes]
    head = "| stage | " + " | ".join(f"{load} {mode}" for load, mode in cells)
    ratios = [m for m in args.modes] if set(LOADS) <= set(args.loads) else []
    head += "".join(f" | busy/quiet {m}" for m in ratios) + " |"
    lines = [head, "|" + "---|" * (1 + len(cells) + len(ratios))]
    total = {c: 0.0 for c in cells}
    for stage in stages + ["total"]:
        values = {c: (total[c] if stage == "total" else best(rows, stage, *c)) for c in cells}
        if stage != "total":
            for c, v in values.items():
                total[c] += v or 0.0
        row = f"| {stage} | " + " | ".join(f"{v:.1f}" if v else "-" for v in values.values())
        for m in ratios:
            q, b = values[("quiet", m)], values[("busy", m)]
            row += f" | {b / q:.2f}x" if q and b else " | -"
        lines.append(row + " |")
    cells_text = "\n".join(f"- {r['stage']} {r['load']} threads {r['threads']} (repeat {r['repeat']}): "
                           f"{r['seconds']:.1f} s, /proc/loadavg at start {r['loadavg_at_start']}, result {r['result']}"
                           for r in rows)
    return (f"# Stage times on shared cores\n\n{cpu_model()}, {len(os.sched_getaffinity(0))} usable cores; setting "
            f"`{args.setting}`; busy = {args.busy} `while True: pass` processes; best of {args.repeats} repeat(s), "
            f"seconds per stage (the stage's process, start to end).\n\n" + "\n".join(lines)
            + f"\n\nEvery cell (`auto`: the thread policy; 1, 2: OMP_NUM_THREADS):\n\n{cells_text}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", type=Path, default=REPO / "configs_scripts" / "demo")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    parser.add_argument("--modes", default=",".join(MODES), help="auto (the policy) and/or pinned thread counts")
    parser.add_argument("--loads", default=",".join(LOADS), help="quiet and/or busy")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--busy", type=int, default=3, help="CPU-bound processes started for the busy cells")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds the busy processes run before timing")
    parser.add_argument("--work", type=Path, default=OUT_DIR / "shared_cores" / "work",
                        help="the GENIUS_ROOT the stages use")
    parser.add_argument("--seed-from", type=Path, help="a finished root copied into a new --work before the run")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "shared_cores")
    parser.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                        help="an override for one stage, e.g. train_gen:train.epochs=2 (repeatable)")
    args = parser.parse_args(argv)
    args.stages, args.modes, args.loads = (a.split(",") for a in (args.stages, args.modes, args.loads))
    bad = [s for s in args.stages if s not in STAGES] + [x for x in args.loads if x not in LOADS] + \
        [m for m in args.modes if m != "auto" and not m.isdigit()]
    if bad or args.repeats < 1 or args.busy < 0 or args.settle < 0:
        parser.error(f"unknown or out-of-range values {bad or ''}: stages from {STAGES}, loads from {LOADS}, "
                     "modes auto or a thread count, --repeats >= 1, --busy and --settle >= 0")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = measure(args)
    write_csv(args.out / "shared_cores.csv", rows, COLUMNS)
    from genius.common.io import atomic_write_text

    atomic_write_text(args.out / "shared_cores.md", markdown(rows, args))
    print(f"wrote {args.out / 'shared_cores.csv'} and {args.out / 'shared_cores.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
