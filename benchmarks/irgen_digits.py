"""IRGen's setting against the GENIUS-style setting and the dense baseline on real images: scikit-learn's
handwritten digits, trained end to end on CPU through the project's own stages.

Data and protocol (fixed before any test number was looked at, configs_scripts/irgen_digits/):
the 1,797 digits written as one folder per class (32-px PNGs) and imported with ``genius
import-images --protocol holdout --query-fraction 0.2 --seed 0``: 359 test queries, a database of
1,438 images that every stage trains on and the queries search; a database image is relevant
when it shows the query's digit. Every setting uses the same stage 0 (a small CLIP-SF trained
from scratch on class-neighbour pairs; its vectors are the dense baseline's) and the same sizes;
no hyperparameter was tuned on these test queries (IRGen's defaults: beam 30, label smoothing
0.1, vision tower at 0.01x the learning rate).

- **IRGen setting**: train-rq with IRGen's classification objective and no modality level
  (3 x 32 codes); train-gen with ``model.condition: image_tokens`` (the decoder cross-attends to
  the vision tower's 17 tokens, the tower fine-tuned).
- **GENIUS-style setting**: train-rq with the contrastive objective and the modality level (1 + 3 x
  32 codes); train-gen with prefix vectors and query-target mixing (the paper's method).
- **Dense**: exact cosine over stage 0's vectors.

Precision@K and R@K (hit rate) at K = 1, 10, 20, 30 and MAP@100 come from ``genius eval``
(``report.metrics: irgen``, computed with ir_measures on the run files). Outputs in
``--out-dir``: ``irgen_digits.{md,csv,json}``; the stages' artefacts are under the project's
checkpoint/, extracted_embed/ and results/ (``irgen_digits`` and ``irgen_digits_genius``).
A re-run skips every stage that is up to date.

    bash benchmarks/run_irgen_digits.sh
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from genius.benchmarks.common import OUT_DIR, load_average, machine_description, markdown_table, write_csv

REPO = Path(__file__).resolve().parent.parent
SETTING = REPO / "configs_scripts" / "irgen_digits"
KS = (1, 10, 20, 30)
# The GENIUS-style setting: the same stage 0 and sizes, the paper's stage 1 and 2.
GENIUS_STYLE = {
    "train_rq": ["model.modality_level=true", "model.num_levels=4", "train.objective=contrastive",
                 "out_dir=checkpoint/irgen_digits_genius/rq"],
    "assign_codes": ["rq_path=checkpoint/irgen_digits_genius/rq/rq.pt",
                     "out_dir=checkpoint/irgen_digits_genius/rq/codes"],
    "train_gen": ["model.condition=prefix", "model.vision_checkpoint=null", "model.num_prefix=8",
                  "mixing.enabled=true", "optim.label_smoothing=0.0",
                  "data.rq=checkpoint/irgen_digits_genius/rq/rq.pt", "out_dir=checkpoint/irgen_digits_genius/gen"],
    "eval": ["paths.rq_run=checkpoint/irgen_digits_genius/rq", "paths.gen_run=checkpoint/irgen_digits_genius/gen",
             "paths.results=results/irgen_digits_genius"],
}
RESULTS = {"IRGen setting": "results/irgen_digits", "GENIUS-style setting": "results/irgen_digits_genius"}


def run(script: str, overrides: list[str] | None = None) -> float:
    """One stage's run script (with ``--set`` overrides); returns its wall time in seconds."""
    args = [a for o in overrides or [] for a in ("--set", o)]
    began = time.perf_counter()
    result = subprocess.run(["bash", str(SETTING / f"{script}.sh"), *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{script} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return time.perf_counter() - began


def run_pipelines() -> dict[str, float]:
    seconds = {}
    for stage in ("run_world", "run_train_clip", "run_extract"):
        seconds[stage] = run(stage)
    for stage in ("train_rq", "assign_codes", "train_gen", "eval"):
        seconds[f"IRGen {stage}"] = run(f"run_{stage}")
        seconds[f"GENIUS-style {stage}"] = run(f"run_{stage}", GENIUS_STYLE[stage])
    return seconds


def results_root() -> Path:
    return Path(os.environ.get("GENIUS_ROOT") or REPO)


def read_rows() -> list[dict]:
    """One row per (setting, method) from each eval's metrics.json; dense once (it is the same)."""
    rows = []
    for setting, results in RESULTS.items():
        metrics = json.loads((results_root() / results / "metrics.json").read_text())["irgen_metrics"]
        for method, label in (("dense", "Dense (stage 0 CLIP-SF)"), ("genius", setting),
                              ("genius_r", f"{setting} + re-rank")):
            if method == "dense" and any(r["method"] == label for r in rows):
                continue
            values = {f"{m['metric']}@{m['k']}": m["value"] for m in metrics if m["method"] == method}
            if values:
                rows.append({"method": label, **values})
    return rows


def read_run(path: Path) -> dict[str, list[str]]:
    """A TREC run file: qid -> dids in rank order."""
    ranked: dict[str, list[tuple[int, str]]] = {}
    for line in path.read_text().splitlines():
        qid, _, did, rank, *_ = line.split()
        ranked.setdefault(qid, []).append((int(rank), did))
    return {qid: [did for _, did in sorted(pairs)] for qid, pairs in ranked.items()}


@dataclass(frozen=True)
class Setting:
    """Where one imported IRGen setting's files are, relative to the GENIUS root."""

    world: str
    name: str  # import-images --name
    results: str
    codes: str

    @property
    def pool(self) -> str:
        return f"mbeir_{self.name}_task4_cand_pool"

    @property
    def queries(self) -> str:
        return f"mbeir_{self.name}_task4_test"


DIGITS = Setting("worlds/irgen_digits", "digits", RESULTS["IRGen setting"], "checkpoint/irgen_digits/rq/codes")


def diagnose(setting: Setting, root: Path) -> dict:
    """Where the generated IDs lose precision against dense, measured on the test queries: the
    tokenizer (how pure the database's first-level codes are by class) or the decoder (whether
    its first step lands in a code of the query's class). A class is an image's folder."""
    import numpy as np

    from genius.common.mbeir import hash_did

    world = root / setting.world
    class_of = {}
    for line in open(world / "cand_pool" / "local" / f"{setting.pool}.jsonl"):
        record = json.loads(line)
        class_of[record["did"]] = Path(record["img_path"]).parent.name
    query_class = {}
    for line in open(world / "query" / "test" / f"{setting.queries}.jsonl"):
        record = json.loads(line)
        query_class[record["qid"]] = Path(record["query_img_path"]).parent.name
    codes_path = root / setting.codes / setting.pool
    first_code = dict(zip(np.load(codes_path / "ids.npy").tolist(), np.load(codes_path / "codes.npy")[:, 0].tolist()))
    members: dict[int, list[str]] = {}
    for did, label in class_of.items():
        members.setdefault(first_code[hash_did(did)], []).append(label)
    majority = {code: max(set(labels), key=labels.count) for code, labels in members.items()}
    purity = sum(labels.count(majority[code]) for code, labels in members.items()) / len(class_of)
    runs = root / setting.results / "runs" / setting.pool / setting.queries
    generated, dense = read_run(runs / "genius.run"), read_run(runs / "dense.run")
    step_right = [majority[first_code[hash_did(generated[q][0])]] == c for q, c in query_class.items() if generated.get(q)]
    top_right = [class_of[generated[q][0]] == c for q, c in query_class.items() if generated.get(q)]
    dense_right = [class_of[dense[q][0]] == c for q, c in query_class.items()]
    return {"first_code_purity": purity, "first_step_in_class": float(np.mean(step_right)),
            "generated_top1_in_class": float(np.mean(top_right)), "dense_top1_in_class": float(np.mean(dense_right)),
            "queries": len(query_class)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    seconds = run_pipelines()
    rows = read_rows()
    columns = [f"P@{k}" for k in KS] + [f"R@{k}" for k in KS] + ["MAP@100"]
    table = markdown_table(["Method", *columns],
                           [[r["method"], *(f"{100 * r[c]:.1f}" if c in r else "" for c in columns)] for r in rows])
    timing = markdown_table(["Stage", "Seconds"], [[name, f"{s:.0f}"] for name, s in seconds.items()])
    diagnosis = diagnose(DIGITS, results_root())
    timing += "\n" + markdown_table(["IRGen setting, test queries", "%"], [
        ["database images whose first code's majority class is their own (tokenizer)",
         f"{100 * diagnosis['first_code_purity']:.1f}"],
        ["queries whose first generated code is one of their class's (decoder, step 1)",
         f"{100 * diagnosis['first_step_in_class']:.1f}"],
        ["queries whose top generated image is of their class (P@1)", f"{100 * diagnosis['generated_top1_in_class']:.1f}"],
        ["queries whose top dense image is of their class (dense P@1)", f"{100 * diagnosis['dense_top1_in_class']:.1f}"],
    ])
    header = (f"Digits (scikit-learn, 1,797 real 8x8 images, 10 classes), holdout 0.2 seed 0: 359 queries "
              f"against 1,438 images. {machine_description()}; load average {load_average():.1f} at the end; "
              f"whole run {time.perf_counter() - began:.0f} s.\n\n")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "irgen_digits.md").write_text(header + table + "\n" + timing)
    write_csv(args.out_dir / "irgen_digits.csv", rows, ["method", *columns])
    (args.out_dir / "irgen_digits.json").write_text(json.dumps({"rows": rows, "seconds": seconds, "diagnosis": diagnosis}, indent=1))
    print(header + table + "\n" + timing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
