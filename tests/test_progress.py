"""Progress a person can follow: genius.common.progress, and the stages' use of it.

In a log file (stderr not a terminal) a loop logs a line at most every GENIUS_PROGRESS_SECONDS
and one at the end, with the step, rate, ETA and loss; on a terminal it shows a tqdm bar instead.
train-gen piped to a file reports every epoch; train-rq sums its dead-code resets per epoch.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from genius.common import progress as progress_mod
from genius.common.config import save_config
from genius.common.progress import INTERVAL_ENV, Progress, clock_time

# pytest runs with --import-mode=importlib, which leaves tests/ off sys.path; the tiny worlds are
# test_generator's (train-gen) and test_rq_training's (train-rq).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_generator import gen_config, write_world  # noqa: E402
from test_rq_training import make_world, write_configs  # noqa: E402


class FakeClock:
    """Seconds that advance only when the test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log_file_output(monkeypatch):
    """stderr is not a terminal (as when piped to a file), the default interval."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.delenv(INTERVAL_ENV, raising=False)


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "genius.test"]


def run_loop(steps: int, seconds_per_step: float, clock: FakeClock, done: int = 0, **kwargs) -> Progress:
    progress = Progress(done + steps, "demo: epoch 0", done=done, clock=clock, logger=logging.getLogger("genius.test"),
                        **kwargs)
    for _ in progress.wrap(range(steps)):
        clock.now += seconds_per_step
    return progress


# ---- the helper ----------------------------------------------------------------------------
def test_a_log_gets_a_line_per_interval_and_one_at_the_end_with_rate_eta_and_loss(log_file_output, caplog):
    caplog.set_level(logging.INFO, logger="genius.test")
    clock, reads = FakeClock(), []
    progress = Progress(10, "demo: epoch 0", clock=clock, logger=logging.getLogger("genius.test"))
    progress.set_postfix(loss=lambda: reads.append(1) or 0.5)
    for _ in progress.wrap(range(10)):
        clock.now += 7.0  # a line once 30 s have passed since the last: after steps 5 and (at the end) 10
    assert messages(caplog) == ["demo: epoch 0 step 5/10 (50%), 7 s/step, ETA 00:35, loss 0.5",
                                "demo: epoch 0 step 10/10 (100%), 7 s/step, done in 01:10, loss 0.5"]
    assert len(reads) == 2  # the loss is read only when a line is written


def test_the_interval_comes_from_the_environment_and_fast_loops_show_steps_per_second(log_file_output, caplog,
                                                                                       monkeypatch):
    caplog.set_level(logging.INFO, logger="genius.test")
    monkeypatch.setenv(INTERVAL_ENV, "1")
    run_loop(40, 0.125, FakeClock(), done=20, unit="batch")  # resumed: the rate counts this run's steps
    assert messages(caplog) == [f"demo: epoch 0 batch {done}/60 ({round(100 * done / 60)}%), 8 batch/s, ETA 00:0{eta}"
                                for done, eta in ((28, 4), (36, 3), (44, 2), (52, 1))] + \
        ["demo: epoch 0 batch 60/60 (100%), 8 batch/s, done in 00:05"]


def test_very_fast_and_very_slow_rates_read_without_exponents(log_file_output, caplog):
    caplog.set_level(logging.INFO, logger="genius.test")
    run_loop(2048, 1 / 1024, FakeClock())
    run_loop(2, 250.0, FakeClock())
    assert messages(caplog) == ["demo: epoch 0 step 2048/2048 (100%), 1024 step/s, done in 00:02",
                                "demo: epoch 0 step 1/2 (50%), 250 s/step, ETA 04:10",
                                "demo: epoch 0 step 2/2 (100%), 250 s/step, done in 08:20"]


def test_a_loop_left_early_or_without_end_line_logs_no_end_line(log_file_output, caplog):
    caplog.set_level(logging.INFO, logger="genius.test")
    clock = FakeClock()
    progress = Progress(10, "demo: epoch 0", clock=clock, logger=logging.getLogger("genius.test"))
    for step in progress.wrap(range(10)):
        clock.now += 1.0
        if step == 3:
            break
    run_loop(10, 1.0, clock, end_line=False)
    assert messages(caplog) == []


def test_only_the_main_process_reports(log_file_output, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="genius.test")
    monkeypatch.setattr(progress_mod, "group_rank", lambda: (1, 2))
    run_loop(10, 7.0, FakeClock())
    assert messages(caplog) == []
    monkeypatch.setattr(progress_mod, "group_rank", lambda: (0, 2))
    run_loop(10, 7.0, FakeClock())
    assert len(messages(caplog)) == 2


def test_a_terminal_gets_a_tqdm_bar_and_no_log_lines(monkeypatch, capsys, caplog):
    caplog.set_level(logging.INFO, logger="genius.test")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    run_loop(10, 7.0, FakeClock())
    bar = capsys.readouterr().err
    assert "demo: epoch 0" in bar and "10/10" in bar and "\r" in bar  # tqdm redraws in place
    assert messages(caplog) == []


def test_a_bad_interval_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match=f"^{INTERVAL_ENV}='soon': not a number of seconds"):
        Progress(10, "demo")


def test_clock_time():
    assert [clock_time(s) for s in (0, 59.6, 61, 3599, 3600, 37230)] == \
        ["00:00", "01:00", "01:01", "59:59", "1:00:00", "10:20:30"]


# ---- the stages --------------------------------------------------------------------------------
def test_train_gen_piped_to_a_file_reports_every_epoch(tmp_path):
    """Acceptance: a person reading train-gen's output in a file sees its progress in every epoch
    (step lines with rate, ETA and loss, then the epoch's loss and time), not tqdm's redraws."""
    write_world(tmp_path, n_cands=96, queries_per_cand=1)
    config = tmp_path / "train_gen.yaml"
    epochs = 3
    save_config(gen_config(tmp_path, "gen", epochs=epochs, batch_size=16, cpu_threads=1), config)
    log_path = tmp_path / "train_gen.log"
    env = {**os.environ, "GENIUS_LOG_LEVEL": "INFO", INTERVAL_ENV: "0"}  # a line per step: the run takes seconds
    with open(log_path, "w") as out:
        result = subprocess.run([sys.executable, "-m", "genius.models.generative_retriever.train", "--config",
                                 str(config)], stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600)
    text = log_path.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text
    steps = 96 // 16  # one query per candidate
    for epoch in range(epochs):
        step_lines = re.findall(rf"train-gen: epoch {epoch} step (\d+)/{steps} \(\d+%\), [\d.]+ (?:step/s|s/step), "
                                rf"ETA \d\d:\d\d, loss [\d.]+\n", text)
        assert [int(s) for s in step_lines] == list(range(1, steps + 1)), (epoch, text[-3000:])
        assert re.search(rf"train-gen: epoch {epoch}: loss [\d.]+, exact match [\d.]+, \d\d:\d\d\n", text), epoch
    logged = [json.loads(line) for line in (tmp_path / "gen" / "metrics.jsonl").read_text().splitlines()]
    last = float(re.findall(r"train-gen: epoch 2: loss ([\d.]+)", text)[0])
    window_means = [r["loss"] for r in logged if r["epoch"] == 2]  # windows of train.log_every=4 and 2 steps
    assert last == pytest.approx((4 * window_means[0] + 2 * window_means[1]) / 6, abs=1e-4)


def test_train_rq_sums_dead_code_resets_per_epoch_and_level(tmp_path, caplog):
    """One INFO line per epoch with the resets of each level (as metrics.jsonl records them); each
    step's resets only at DEBUG level."""
    from genius.common.config import load_config
    from genius.models.residual_quantization import train

    world = make_world(tmp_path, num_items=96)
    train_yaml, _ = write_configs(tmp_path, world, batch_size=16, epochs=3)
    caplog.set_level(logging.INFO, logger="genius")
    caplog.set_level(logging.DEBUG, logger="genius.rq")
    train.train(load_config(train.RQTrainConfig, train_yaml))
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "dead codes" in r.getMessage()]
    summaries = [json.loads(line)["dead_code_resets"] for line in (tmp_path / "rq" / "metrics.jsonl").read_text()
                 .splitlines() if json.loads(line).get("epoch_summary")]
    assert info == [f"train-rq: epoch {e}: dead codes reset per level {summaries[e]}" for e in range(3)]
    per_step = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "this step" in r.getMessage()]
    assert sum(map(sum, summaries)) > 0 and len(per_step) > len(info)
    epoch_lines = [r.getMessage() for r in caplog.records if re.match(r"train-rq: epoch \d: loss ", r.getMessage())]
    assert len(epoch_lines) == 3
