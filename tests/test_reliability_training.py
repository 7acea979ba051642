"""What a user can do wrong to the three training stages (train-clip, train-rq, train-gen), and
what they can rely on: bad numbers, damaged checkpoints, a kill -9, force, stale runs, two
writers, a lock left by a killed run.

Every failure must end with exit status 2 and one stderr line naming the key or the file, never a
traceback. The runs here are the tiny setting's (``finished_tiny_root``, copied once for the
module) with short settings written into their own output folders, so the tests do not depend on
each other's order.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from genius.common.checkpoint import load_own_checkpoint
from genius.common.ranges import ranged_fields, unranged_numbers
from genius.common.runstate import LOCK_FILE, acquire_lock, release_lock
from genius.feature_extraction import train_clip
from genius.models.generative_retriever import export_official
from genius.models.generative_retriever import train as train_gen
from genius.models.residual_quantization import train as train_rq

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs_scripts" / "tiny"


class Stage:
    def __init__(self, name, module, yaml, cls, out_key, force_key, seed_key, folder, final, short):
        self.name, self.module, self.yaml, self.cls = name, module, TINY / yaml, cls
        self.out_key, self.force_key, self.seed_key = out_key, force_key, seed_key
        self.folder, self.final, self.short = folder, final, short

    def args(self, *sets: str, out: str | None = None) -> list[str]:
        sets = ([f"{self.out_key}={out}"] if out else []) + list(sets)
        return ["--config", str(self.yaml)] + [a for s in sets for a in ("--set", s)]


EXPORT = SimpleNamespace(module=export_official)  # genius export-official reads generator.pt
CLIP_SUBSET = "train_subset.jsonl"  # written into the copied root by the ``root`` fixture
STAGES = {
    "train-clip": Stage("train-clip", train_clip, "train_clip.yaml", train_clip.TrainClipConfig, "output.run_dir",
                        "output.force", "seed", "checkpoint/tiny/clip_sf", "clip_sf.pt",
                        ("optim.epochs=1", "optim.batch_size=16", "optim.warmup_steps=0",
                         f"data.train_queries=query/union_train/{CLIP_SUBSET}")),
    "train-rq": Stage("train-rq", train_rq, "train_rq.yaml", train_rq.RQTrainConfig, "out_dir", "train.force",
                      "train.seed", "checkpoint/tiny/rq", "rq.pt", ("train.epochs=1", "train.kmeans_iters=5")),
    "train-gen": Stage("train-gen", train_gen, "train_gen.yaml", train_gen.TrainGenConfig, "out_dir", "train.force",
                       "train.seed", "checkpoint/tiny/gen", "generator.pt", ("train.epochs=1",)),
}


def run(stage: Stage, capsys, *args: str) -> tuple[int, str]:
    """``genius <stage>`` in this process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        code = stage.module.main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def one_error_line(err: str, stage: str, *names: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"genius {stage}: error: "), err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def root(finished_tiny_root, tmp_path_factory) -> Path:
    """One private copy of the finished tiny root for this module (each test writes its own
    output folders in it, or restores what it changes)."""
    copy = tmp_path_factory.mktemp("reliability") / "genius_root"
    shutil.copytree(finished_tiny_root, copy, symlinks=True)
    queries = copy / "worlds/tiny/query/union_train/mbeir_union_up_train.jsonl"
    (queries.parent / CLIP_SUBSET).write_text("".join(queries.read_text().splitlines(keepends=True)[:64]))
    return copy


@pytest.fixture
def in_root(root, monkeypatch) -> Path:
    monkeypatch.setenv("GENIUS_ROOT", str(root))
    return root


# ---- every number is range-checked before any work -----------------------------------------
# Numbers every value of which is valid: instruction draws are seeded by a string "seed:epoch:index".
ANY_VALUE = {"instructions.seed"}


@pytest.mark.parametrize("stage", STAGES)
def test_every_number_of_a_training_config_declares_its_range(stage):
    assert set(unranged_numbers(STAGES[stage].cls)) - ANY_VALUE == set()


def _out_of_range_cases():
    for name, stage in STAGES.items():
        for key, allowed in ranged_fields(stage.cls).items():
            yield pytest.param(name, key, allowed, id=f"{name}:{key}")


@pytest.mark.parametrize("stage, key, allowed", list(_out_of_range_cases()))
def test_an_out_of_range_number_is_one_line_naming_the_key(stage, key, allowed, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GENIUS_ROOT", str(tmp_path))  # an empty root: nothing may be read or written before the check
    bad = allowed.outside()
    value = int(bad) if float(bad).is_integer() else bad
    text = f"[{value}, {value}]" if key.endswith("betas") else str(value)
    code, err = run(STAGES[stage], capsys, *STAGES[stage].args(f"{key}={text}"))
    assert code == 2
    line = one_error_line(err, stage, key)
    assert "out of range" in line and not any(tmp_path.iterdir())


@pytest.mark.parametrize("stage, sets, key", [
    ("train-rq", ["train.lr=0.001", "train.min_lr=0.01"], "train.min_lr"),
    ("train-rq", ["train.kmeans_init_vectors=10"], "train.kmeans_init_vectors"),
    ("train-gen", ["optim.betas=[0.9]"], "optim.betas"),
    ("train-clip", ["optim.lr=.nan"], "optim.lr"),
])
def test_values_that_do_not_fit_together_are_one_line_too(stage, sets, key, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GENIUS_ROOT", str(tmp_path))
    code, err = run(STAGES[stage], capsys, *STAGES[stage].args(*sets))
    assert code == 2
    one_error_line(err, stage, key)


# ---- damaged checkpoints -------------------------------------------------------------------
def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one flipped byte in the middle (tensor data)
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.fixture
def damaged(in_root):
    """damaged(path, how): damage a file of the copied root; it is restored after the test."""
    saved = []

    def apply(path: Path, how: str) -> Path:
        backup = path.with_name(path.name + ".orig")
        shutil.copy2(path, backup)
        saved.append((path, backup))
        damage(path, how)
        return path

    yield apply
    for path, backup in saved:
        os.replace(backup, path)


@pytest.mark.parametrize("how", ["truncated", "flipped"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_damaged_training_checkpoint_is_one_line_naming_it(stage, how, in_root, damaged, capsys):
    """The run is not finished (no done.json), so its newest checkpoint is read to resume."""
    s = STAGES[stage]
    folder = in_root / s.folder
    newest = sorted((folder / "checkpoints").glob("epoch_*.pt"))[-1]
    done = folder / "done.json"
    kept = done.read_bytes()
    done.unlink()
    try:
        damaged(newest, how)
        code, err = run(s, capsys, *s.args())
    finally:
        done.write_bytes(kept)
    assert code == 2
    one_error_line(err, stage, newest)


@pytest.mark.parametrize("how", ["truncated", "flipped"])
@pytest.mark.parametrize("kind", ["clip_sf.pt", "rq.pt", "generator.pt"])
def test_a_damaged_final_checkpoint_is_one_line_naming_it(kind, how, in_root, damaged, capsys, tmp_path):
    """Each final file, read by a command that consumes it: clip_sf.pt as train-clip's initial
    weights, rq.pt by train-gen, generator.pt by export-official."""
    if kind == "clip_sf.pt":
        path = damaged(in_root / "checkpoint/tiny/clip_sf/clip_sf.pt", how)
        s = STAGES["train-clip"]
        code, err = run(s, capsys, *s.args(*s.short, f"model.init_checkpoint={path}", out=str(tmp_path / "clip")))
        stage = "train-clip"
    elif kind == "rq.pt":
        path = damaged(in_root / "checkpoint/tiny/rq/rq.pt", how)
        s = STAGES["train-gen"]
        code, err = run(s, capsys, *s.args(out=str(tmp_path / "gen")))
        stage = "train-gen"
    else:
        path = damaged(in_root / "checkpoint/tiny/gen/generator.pt", how)
        code, err = run(EXPORT, capsys, "--rq", str(in_root / "checkpoint/tiny/rq/rq.pt"), "--generator", str(path),
                        "--out", str(tmp_path / "export"), "--allow-assigned")
        stage = "export-official"
    assert code == 2
    one_error_line(err, stage, path)


@pytest.mark.parametrize("how", ["truncated", "flipped"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_final_file_damaged_after_its_run_finished_is_made_again(stage, how, in_root, capsys, caplog):
    """done.json records the final file's size and hash: a re-run does not take a damaged final
    file as up to date, it resumes from the run's last checkpoint and writes the same weights."""
    caplog.set_level(logging.INFO, logger="genius")
    s = STAGES[stage]
    out = in_root / f"checkpoint/tiny/refinal_{stage}_{how}"
    assert run(s, capsys, *s.args(*s.short, out=str(out)))[0] == 0
    final = out / s.final
    expected = _weights(final)
    damage(final, how)
    caplog.clear()
    code, err = run(s, capsys, *s.args(*s.short, out=str(out)))
    assert code == 0, err
    assert any("is not the file its finished run wrote" in r.getMessage() and str(final) in r.getMessage()
               for r in caplog.records), caplog.text
    assert any("resuming" in r.getMessage() for r in caplog.records), caplog.text
    remade = _weights(final)
    assert expected.keys() == remade.keys()
    assert all(torch.equal(expected[name], remade[name]) for name in expected)
    assert not (out / "stale").exists()
    caplog.clear()  # the file it wrote again is up to date
    assert run(s, capsys, *s.args(*s.short, out=str(out)))[0] == 0
    assert any("up to date" in r.getMessage() for r in caplog.records), caplog.text


def test_a_damaged_final_file_with_no_checkpoint_left_is_set_aside_and_trained_again(in_root, capsys, caplog):
    s = STAGES["train-rq"]
    out = in_root / "checkpoint/tiny/refinal_no_checkpoint"
    assert run(s, capsys, *s.args(*s.short, out=str(out)))[0] == 0
    expected = _weights(out / s.final)
    shutil.rmtree(out / "checkpoints")
    damage(out / s.final, "truncated")
    damaged_bytes = (out / s.final).read_bytes()
    assert run(s, capsys, *s.args(*s.short, out=str(out)))[0] == 0
    (stale,) = (out / "stale").iterdir()
    assert (stale / s.final).read_bytes() == damaged_bytes  # set aside, not deleted
    remade = _weights(out / s.final)
    assert all(torch.equal(expected[name], remade[name]) for name in expected)  # seeded: the same run


# ---- kill -9 in the middle of training, then resume --------------------------------------------
def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_own_checkpoint(path)["model"]


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    started = time.time()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed:\n{proc.stderr.read()[-3000:]}")
        if time.time() - started > timeout:
            proc.kill()
            raise AssertionError("no checkpoint appeared")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


KILLED = {  # stage: (module, extra sets, the checkpoints after which to kill, reference)
    "train-rq": ("genius.models.residual_quantization.train", (), "epoch_0010.pt", "checkpoint/tiny/rq/rq.pt"),
    "train-gen": ("genius.models.generative_retriever.train", ("train.epochs=4", "train.checkpoint_every=1"),
                  "epoch_0001.pt", None),  # a short run of its own: the tiny run's 50 epochs took 100 s
    "train-clip": ("genius.feature_extraction.train_clip", STAGES["train-clip"].short[1:] + (
        "optim.epochs=2", "output.save_every_steps=1"), "epoch_*.pt", None),  # a step or epoch checkpoint
}


@pytest.mark.parametrize("stage", KILLED)
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(stage, in_root, capsys):
    """The tiny setting's own run is the uninterrupted reference for train-rq; for train-clip and
    train-gen a short run in this process is."""
    s = STAGES[stage]
    module, sets, marker, reference = KILLED[stage]
    out = f"checkpoint/tiny/killed_{stage}"
    if reference is None:
        reference = f"checkpoint/tiny/straight_{stage}/{s.final}"
        assert run(s, capsys, *s.args(*sets, out=str(Path(reference).parent)))[0] == 0
    env = {**os.environ, "GENIUS_ROOT": str(in_root), "GENIUS_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", module, *s.args(*sets, out=out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_when(proc, lambda: any((in_root / out / "checkpoints").glob(marker)))
    assert proc.returncode == -signal.SIGKILL and not (in_root / out / s.final).exists()
    assert (in_root / out / LOCK_FILE).is_file()  # left behind by the killed run: taken over below
    code, err = run(s, capsys, *s.args(*sets, out=out))
    assert code == 0, err
    expected, resumed = _weights(in_root / reference), _weights(in_root / out / s.final)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    lines = [json.loads(line) for line in (in_root / out / "metrics.jsonl").read_text().splitlines()]
    marks = [(r["epoch"], r.get("step"), r.get("epoch_summary")) for r in lines]
    assert len(marks) == len(set(marks))  # the killed attempt's lines past its checkpoint were dropped
    if stage == "train-clip":  # killed mid-epoch: the epoch's means still cover every step of it
        straight = (in_root / reference).with_name("metrics.jsonl").read_text().splitlines()
        summaries = [[v for r in rows if "step" not in r for v in (r["epoch"], r["loss"], r["accuracy"])]
                     for rows in ([json.loads(line) for line in straight], lines)]
        assert summaries[1] == pytest.approx(summaries[0], rel=1e-6) and len(summaries[0]) == 6


# ---- force, stale runs -------------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_force_retrains_a_finished_run_and_a_stale_run_moves_with_its_logs(stage, in_root, capsys):
    s = STAGES[stage]
    out = in_root / f"checkpoint/tiny/force_{stage}"
    assert run(s, capsys, *s.args(*s.short, out=str(out)))[0] == 0
    first = out / s.final
    before, first_metrics = first.stat().st_mtime_ns, (out / "metrics.jsonl").read_text()
    assert run(s, capsys, *s.args(*s.short, out=str(out)))[0] == 0  # finished: skipped
    assert first.stat().st_mtime_ns == before and not (out / "stale").exists()

    assert run(s, capsys, *s.args(*s.short, f"{s.force_key}=true", out=str(out)))[0] == 0
    (forced,) = (out / "stale").iterdir()
    assert first.stat().st_mtime_ns != before  # retrained
    assert {s.final, "checkpoints", "metrics.jsonl", "config.yaml", "done.json"} <= {p.name for p in forced.iterdir()}
    assert (forced / "metrics.jsonl").read_text() == first_metrics
    assert (out / "metrics.jsonl").read_text().count("\n") == first_metrics.count("\n")  # not appended to

    # A changed setting is another run: the finished one moves to stale/ with all its logs.
    changed = [*s.short, f"{s.seed_key}=7"]
    second_metrics = (out / "metrics.jsonl").read_text()
    assert run(s, capsys, *s.args(*changed, out=str(out)))[0] == 0
    stale = sorted((out / "stale").iterdir())
    assert len(stale) == 2 and (stale[-1] / "metrics.jsonl").read_text() == second_metrics
    assert json.loads((out / "done.json").read_text())["key"]["config"][s.seed_key] == 7


@pytest.mark.parametrize("stage, bad_input", [("train-clip", "model.init_checkpoint"),
                                              ("train-gen", "model.pretrained")])
def test_a_bad_new_input_is_refused_before_the_finished_run_is_set_aside(stage, bad_input, in_root, capsys):
    """Pointing a finished run's config at an unreadable initial checkpoint or T5 folder changes the
    run's key; the input is read before the finished run would move to stale/, so it stays usable."""
    s = STAGES[stage]
    out = in_root / f"checkpoint/tiny/bad_input_{stage}"
    assert run(s, capsys, *s.args(*s.short, out=str(out)))[0] == 0
    bad = in_root / f"bad_input_{stage}"
    if bad_input == "model.pretrained":
        bad.mkdir(exist_ok=True)
        (bad / "config.json").write_text("{not json")
    else:
        bad.write_bytes(b"garbage" * 100)
    code, err = run(s, capsys, *s.args(*s.short, f"{bad_input}={bad}", out=str(out)))
    assert code == 2 and str(bad) in one_error_line(err, stage)
    assert (out / s.final).is_file() and (out / "done.json").is_file() and not (out / "stale").exists()


# ---- one writer at a time ----------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_a_second_run_into_a_held_folder_exits_naming_the_holder(stage, in_root, capsys):
    s = STAGES[stage]
    folder = in_root / s.folder
    fd = acquire_lock(folder, "the test's holder")
    try:
        code, err = run(s, capsys, *s.args())
    finally:
        release_lock(fd)
    assert code == 2
    one_error_line(err, stage, folder, f"process {os.getpid()}", "another run is writing here")


@pytest.mark.parametrize("stage", STAGES)
def test_a_lock_left_by_a_dead_process_is_taken_over(stage, in_root, capsys, caplog):
    s = STAGES[stage]
    folder = in_root / s.folder
    (folder / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 17, "host": "gone", "stage": "genius " + stage,
                                                "started": "2020-01-01 00:00:00"}) + "\n")
    final = folder / s.final
    before = final.stat().st_mtime_ns
    code, err = run(s, capsys, *s.args())
    assert code == 0, err
    assert final.stat().st_mtime_ns == before  # the finished run is still skipped
    assert "taking over the lock left by a run that is no longer running" in caplog.text
    assert (folder / LOCK_FILE).read_text() == ""  # released
