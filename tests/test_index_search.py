"""``genius search``, the Python API and ``genius eval`` read an index folder (issue 18, deliverable 3).

On test_index's synthetic world and stand-ins: an added caption is found by a copy of its text
through ``Retriever.load(index)`` and ``genius search --run INDEX``; a removed candidate is never
returned by search or by ``genius eval`` with ``paths.index``; and eval against an index of the
universal pool writes the very run files eval against that pool wrote (the same computation).
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest

from genius.models.generative_retriever import api, evaluate as eval_stage, search
from genius.models.generative_retriever import index as idx
from genius.models.generative_retriever.evaluate import evaluate
from genius.models.generative_retriever.run_models import StaleInputError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_index import COPIED, NEW_TEXT, UNION, new_caption, results, stand_in_run, write_pool  # noqa: E402,F401

METHODS = ("genius_r", "genius", "dense")
NEW = "20:5000"


def load(run: idx.RunContext, index: Path) -> api.Retriever:
    return api.Retriever.load(index, device="cpu", models=run.models, encoder=run.encoder)


def found(ret: api.Retriever, method: str, k: int = 10) -> list[str]:
    return [h.id for h in ret.search(text=NEW_TEXT, instruction="", target_modality="text", method=method, k=k)]


def eval_index(run: idx.RunContext, index: Path, out: Path, **changes):
    cfg = copy.deepcopy(run.cfg)
    cfg.paths.index, cfg.paths.results, cfg.union = str(index), str(out), False
    for key, value in changes.items():
        setattr(cfg, key, value)
    return evaluate(cfg, run.models)


def run_files(results: Path, pool_stem: str) -> dict[str, str]:
    folder = results / "runs" / pool_stem
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*.run"))}


def test_eval_against_an_index_is_eval_against_its_pool(results, tmp_path):
    run = stand_in_run(results)
    index = tmp_path / "index"
    idx.build(run, index)  # the run's default pool: the universal one
    report = eval_index(run, index, tmp_path / "on_index")
    got, want = run_files(tmp_path / "on_index", "v000001"), run_files(results, UNION)
    assert len(got) == 2 * len(METHODS) and got == want
    assert {r.pool_kind for r in report.results} == {"task-specific"}
    pools = json.loads((tmp_path / "on_index" / "run.json").read_text())["pools"]
    assert list(pools) == ["v000001"] and Path(pools["v000001"]["index"]) == index
    assert load(run, tmp_path / "on_index").index == index  # its results search the index

    # the run key holds the version's content, not the index's path: a copy is the same run
    shutil.copytree(index, tmp_path / "copy")
    eval_index(run, tmp_path / "copy", tmp_path / "on_copy")
    keys = [json.loads((tmp_path / out / "done.json").read_text())["key"] for out in ("on_index", "on_copy")]
    assert keys[0] == keys[1] and keys[0]["inputs"]["index"]["version"] == "v000001"
    assert not any(k.startswith("paths.index") for k in keys[0]["config"])


def test_search_finds_an_added_item_by_a_copy_of_its_text(results, tmp_path, monkeypatch, capsys):
    run = stand_in_run(results)
    index = tmp_path / "index"
    idx.build(run, index)
    ret = load(run, index)
    assert NEW not in found(ret, "dense", k=60)
    idx.add(run, index, write_pool(tmp_path / "new.jsonl", [new_caption()]))
    assert NEW not in found(ret, "dense", k=61)  # a loaded retriever keeps its version until refreshed
    assert ret.refresh() and ret.pool.stem == "v000002" and not ret.refresh()
    for ret in (ret, load(run, index)):
        hits = ret.search(text=NEW_TEXT, instruction="", target_modality="text", method="genius_r")
        assert hits[0].id == NEW and hits[0].text == NEW_TEXT  # the index's record
        assert found(ret, "dense")[0] == NEW
        assert NEW in found(ret, "genius")

    monkeypatch.setattr(api, "load_models", lambda cfg, device: run.models)
    monkeypatch.setattr(api, "build_encoder", lambda extraction, device: run.encoder)
    assert search.main(["--run", str(index), "--text", NEW_TEXT, "--instruction", "", "--target-modality", "text",
                        "--method", "dense", "-k", "3", "--device", "cpu"]) == 0
    first = capsys.readouterr().out.splitlines()[1].split()
    assert first[:2] == ["1", NEW] and NEW_TEXT in " ".join(first)


def test_a_retriever_on_a_pruned_version_says_to_refresh(results, tmp_path):
    run = stand_in_run(results)
    index = tmp_path / "index"
    idx.build(run, index)
    ret = load(run, index)
    for n in range(3):  # the last 3 versions are kept: v000001 goes
        idx.add(run, index, write_pool(tmp_path / "new.jsonl", [new_caption(f"20:{5000 + n}")]))
    assert not (index / "v000001").exists()
    with pytest.raises(StaleInputError, match=r"v000001/records.jsonl: gone since it was loaded .* call refresh\(\)"):
        found(ret, "dense")  # a bare FileNotFoundError before
    assert ret.refresh() and found(ret, "dense")


def test_a_removed_item_is_never_returned_by_search_or_eval(results, tmp_path):
    run = stand_in_run(results)
    index = tmp_path / "index"
    idx.build(run, index)
    idx.add(run, index, write_pool(tmp_path / "new.jsonl", [new_caption()]))
    before = eval_index(run, index, tmp_path / "before", missing_positives="keep")
    assert any(f"{COPIED}" in text for text in run_files(tmp_path / "before", "v000002").values())
    gone = tmp_path / "gone.txt"
    gone.write_text(f"{NEW}\n20:{COPIED}\n")
    idx.remove(index, gone)

    ret = load(run, index)
    for method in METHODS:
        hits = found(ret, method, k=60)
        assert hits and NEW not in hits and f"20:{COPIED}" not in hits, method
    # 20:1004 is a query's positive: missing from the index now, so missing_positives decides
    with pytest.raises(ValueError, match="missing_positives"):
        eval_index(run, index, tmp_path / "refused")
    after = eval_index(run, index, tmp_path / "after", missing_positives="keep")
    files = run_files(tmp_path / "after", "v000003")
    assert len(files) == 2 * len(METHODS)
    returned = {line.split()[2] for text in files.values() for line in text.splitlines()}
    assert returned and NEW not in returned and f"20:{COPIED}" not in returned
    assert any(p.any_missing for p in after.positives) and not any(p.any_missing for p in before.positives)


def eval_refused(capsys, results: Path, *sets: str) -> str:
    with pytest.raises(SystemExit) as exited:
        eval_stage.main(["--config", str(results / "config.yaml")] + [a for s in sets for a in ("--set", s)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exited.value.code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_a_wrong_index_setting_is_one_line(results, tmp_path, capsys):
    index = tmp_path / "index"
    idx.build(stand_in_run(results), index)
    line = eval_refused(capsys, results, f"paths.index={index}")  # union stays true
    assert "paths.index" in line and "union: false" in line
    line = eval_refused(capsys, results, f"paths.index={tmp_path}", "union=false")
    assert str(tmp_path) in line and "not an index folder" in line
    line = eval_refused(capsys, results, f"paths.index={index}", "union=false")  # the run's own results folder
    assert line.endswith(f"paths.results: {results} holds the run the index {index} serves; its evaluation would set "
                         "that run aside, so give it a results folder of its own")
    assert (results / "run.json").is_file() and not (results / "stale").exists()


def test_an_index_of_other_models_is_refused(results, tmp_path):
    run = stand_in_run(results)
    index = tmp_path / "index"
    idx.build(run, index)
    manifest = idx.open_version(index).path / "manifest.json"
    recorded = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**recorded, "fingerprints": {"rq": "fake-rq", "generator": "retrained"}}))
    with pytest.raises(StaleInputError, match=r"manifest.json: the index serves the models .*retrained"):
        load(run, index)
    with pytest.raises(StaleInputError, match="manifest.json: the index serves the models"):
        eval_index(run, index, tmp_path / "out")
