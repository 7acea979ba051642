"""The one run-state mechanism: run keys, skip / resume / archive, force, and the folder lock."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass, field

import pytest

from genius.common.config import project_root_set_to
from genius.common.runstate import (
    DONE_FILE,
    LOCK_FILE,
    RunKey,
    RunLockedError,
    RunState,
    acquire_lock,
    file_content,
    files_digest,
    release_lock,
)


@dataclass
class Train:
    lr: float = 1e-3
    epochs: int = 2
    log_every: int = 10


@dataclass
class Cfg:
    train: Train = field(default_factory=Train)
    out_dir: str = "runs/x"


NOT_IN_KEY = ("train.log_every", "out_dir")


def key_for(cfg: Cfg, data_file) -> RunKey:
    return RunKey.of(cfg, NOT_IN_KEY, {"data": file_content(data_file)}, world_size=1)


def test_key_ignores_listed_keys_and_names_what_changed(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"a": 1}\n')
    with project_root_set_to(tmp_path):
        base = key_for(Cfg(), data)
        assert key_for(Cfg(train=Train(log_every=99), out_dir="elsewhere"), data).digest == base.digest
        changed = key_for(Cfg(train=Train(lr=2e-3)), data)
        assert changed.digest != base.digest
        assert "train.lr: 0.001 -> 0.002" in changed.changes_from(base.as_dict())
        data.write_text('{"a": 2}\n')  # same size, new content
        assert "input data changed" in key_for(Cfg(), data).changes_from(base.as_dict())


@dataclass
class NewerTrain(Train):
    objective: str = "contrastive"  # an option a later version added


@dataclass
class NewerCfg(Cfg):
    train: NewerTrain = field(default_factory=NewerTrain)


def test_an_option_added_later_keeps_finished_runs_current_at_its_old_value(tmp_path):
    """A run recorded before ``train.objective`` existed is still this run's at the value it
    computed with (no retraining for a new option); any other value is a different run."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"a": 1}\n')
    added = {"train.objective": "contrastive"}
    with project_root_set_to(tmp_path):
        recorded = key_for(Cfg(), data)
        now = RunKey.of(NewerCfg(), NOT_IN_KEY, {"data": file_content(data)}, added_later=added, world_size=1)
        assert now.digest == recorded.digest
        other = RunKey.of(NewerCfg(train=NewerTrain(objective="classification")), NOT_IN_KEY,
                          {"data": file_content(data)}, added_later=added, world_size=1)
        assert other.digest != recorded.digest
        assert "train.objective: '<unset>' -> 'classification'" in other.changes_from(recorded.as_dict())


def test_fingerprints_survive_moving_the_root(tmp_path):
    """Paths are recorded relative to the root and files by content, so a moved root keeps its keys."""
    for name in ("a", "b"):
        (tmp_path / name / "data").mkdir(parents=True)
    (tmp_path / "a/data/f.jsonl").write_text("x\n")
    (tmp_path / "a/data/img.png").write_bytes(b"\x89PNG")
    with project_root_set_to(tmp_path / "a"):
        before = file_content(tmp_path / "a/data/f.jsonl")
    images_a = files_digest([tmp_path / "a/data/img.png"], tmp_path / "a/data")
    shutil.copytree(tmp_path / "a/data", tmp_path / "b/data", dirs_exist_ok=True)
    with project_root_set_to(tmp_path / "b"):
        assert file_content(tmp_path / "b/data/f.jsonl") == before
    assert files_digest([tmp_path / "b/data/img.png"], tmp_path / "b/data") == images_a
    (tmp_path / "b/data/img.png").write_bytes(b"\x89PNG-replaced")
    assert files_digest([tmp_path / "b/data/img.png"], tmp_path / "b/data") != images_a


def test_done_resume_archive_and_force(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("x\n")
    out = tmp_path / "run"
    with project_root_set_to(tmp_path):
        key = key_for(Cfg(), data)
        run = RunState(out, key, ("model.pt", "metrics.jsonl", "checkpoints"), stage="test")
        assert not run.is_done() and run.start(None) is False
        out.mkdir()
        (out / "model.pt").write_text("weights")
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
        run.finish(steps=1)
        assert run.is_done()
        assert json.loads((out / DONE_FILE).read_text())["steps"] == 1
        # A checkpoint of the same key resumes; one of another key does not.
        assert run.start(key.as_dict()) is True
        other = key_for(Cfg(train=Train(epochs=3)), data)
        rerun = RunState(out, other, ("model.pt", "metrics.jsonl", "checkpoints"), stage="test")
        assert not rerun.is_done()
        assert rerun.start(key.as_dict()) is False
        stale = list((out / "stale").iterdir())
        assert len(stale) == 1
        assert sorted(p.name for p in stale[0].iterdir()) == [DONE_FILE, "metrics.jsonl", "model.pt"]
        assert not (out / "metrics.jsonl").exists()  # the logs moved with the run
        # force: a finished run of the same key is redone (and set aside first).
        (out / "model.pt").write_text("weights")
        RunState(out, other, ("model.pt",), stage="test").finish()
        forced = RunState(out, other, ("model.pt",), stage="test", force=True)
        assert not forced.is_done() and forced.start(other.as_dict()) is False
        assert len(list((out / "stale").iterdir())) == 2 and not (out / "model.pt").exists()


def test_the_final_files_recorded_in_done_json(tmp_path):
    out = tmp_path / "run"
    (out / "runs").mkdir(parents=True)
    run = RunState(out, RunKey({"a": 1}, {}), ("model.pt", "runs"), stage="test")
    final, other = out / "model.pt", out / "runs" / "a.run"
    final.write_bytes(b"weights of the run")
    other.write_text("q1 Q0 d1 1 0.5 genius\n")
    run.finish([final, other])
    assert run.finals_changed() is None
    final.write_bytes(b"weights")
    assert run.finals_changed() == f"{final} is not the file its finished run wrote (it has 7 bytes, not 18)"
    final.write_bytes(b"WEIGHTS of the run")
    assert run.finals_changed() == f"{final} is not the file its finished run wrote (its content differs)"
    final.write_bytes(b"weights of the run")
    other.unlink()
    assert run.finals_changed() == f"{other} is missing"
    assert run.is_done()  # the key is still this run's: the stage decides what to make again
    # done.json of a run finished before the final files were recorded: taken as it is
    run.finish()
    assert run.is_done() and run.finals_changed() is None
    (out / "done.json").write_text(json.dumps({**json.loads((out / "done.json").read_text()), "finals": None}))
    assert run.is_done() and run.finals_changed() is None


def _hold_lock(folder, ready, release):
    fd = acquire_lock(folder, "genius test-holder")
    ready.set()
    release.wait(30)
    release_lock(fd)


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunLockedError) as err:
            acquire_lock(tmp_path, "genius second")
        message = str(err.value)
        assert f"process {holder.pid}" in message and "genius test-holder" in message and "\n" not in message
    finally:
        release.set()
        holder.join(30)
    release_lock(acquire_lock(tmp_path, "genius after"))  # free again once the holder let go


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "stage": "genius train-gen",
                                                  "started": "2026-01-01 00:00:00"}) + "\n")
    fd = acquire_lock(tmp_path, "genius train-gen")
    try:
        assert "taking over the lock" in caplog.text and "999999" in caplog.text
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        release_lock(fd)
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released cleanly: nobody holds it
