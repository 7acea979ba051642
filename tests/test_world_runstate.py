"""`genius world` decides through the common run state (done.json): skip, force, a moved root."""
from __future__ import annotations

import json
import shutil

import pytest

from genius.synthetic import world


@pytest.fixture
def fake_writer(monkeypatch):
    """write_world without rendering: a world.json and one data file, counting the calls."""
    calls = []

    def write(out_dir, size, seed=0):
        calls.append((size, seed))
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = {"generator": world.GENERATOR, "format_version": world.FORMAT_VERSION, "size": size, "seed": seed,
                   "size_spec": {}, "images": 0, "queries": dict.fromkeys(world.SPLITS, 0),
                   "candidates": dict.fromkeys(world.SPLITS, 0), "tasks": []}
        (out_dir / "world.json").write_text(json.dumps(summary))
        (out_dir / "query").mkdir(exist_ok=True)
        (out_dir / "query" / "seed.txt").write_text(str(seed))
        return summary

    monkeypatch.setattr(world, "write_world", write)
    return calls


def test_skip_force_and_a_moved_world(tmp_path, fake_writer, capsys):
    out = tmp_path / "w"
    world.main(["--out", str(out), "--size", "test"])
    done = json.loads((out / "done.json").read_text())
    assert done["stage"] == "genius world" and done["key"]["config"]["seed"] == 0
    assert done["key"]["extra"] == {"generator": world.GENERATOR, "format_version": world.FORMAT_VERSION}
    world.main(["--out", str(out), "--size", "test"])
    assert "up to date; nothing to do" in capsys.readouterr().out and len(fake_writer) == 1
    world.main(["--out", str(out), "--size", "test", "--seed", "1"])  # another key: written again
    world.main(["--out", str(out), "--size", "test", "--seed", "1", "--force"])  # force: written again
    assert fake_writer == [("test", 0), ("test", 1), ("test", 1)]
    moved = tmp_path / "elsewhere" / "w"
    shutil.copytree(out, moved)  # the key holds no paths: a copied world is still done
    world.main(["--out", str(moved), "--size", "test", "--seed", "1"])
    assert len(fake_writer) == 3


def test_a_world_from_before_run_states_is_adopted_not_rewritten(tmp_path, fake_writer, capsys):
    out = tmp_path / "w"
    out.mkdir()
    summary = {"generator": world.GENERATOR, "format_version": world.FORMAT_VERSION, "size": "test", "seed": 0,
               "size_spec": world.dataclasses.asdict(world.WORLD_SIZES["test"]), "images": 5}
    (out / "world.json").write_text(json.dumps(summary))
    world.main(["--out", str(out), "--size", "test"])
    assert fake_writer == [] and "up to date" in capsys.readouterr().out
    assert json.loads((out / "done.json").read_text())["images"] == 5
    assert world._is_current(out, "test", 0) and not world._is_current(out, "test", 2)


def test_a_refused_folder_is_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GENIUS_DEBUG", "0")
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exited:
        world.main(["--out", str(foreign), "--size", "test"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and "not a generated world" in err
    assert "Traceback" not in err and (foreign / "keep.txt").read_text() == "mine"
