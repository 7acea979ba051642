"""A user mistake ends every stage command with one line and exit status 2, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from genius.common.mbeir import older_revision_twin

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs_scripts" / "tiny"


CASES = [
    ("extract", "extract.yaml", "worlds/tiny"),  # data.root is checked before the files in it
    ("train-clip", "train_clip.yaml", "mbeir_union_up_train.jsonl"),
    ("train-rq", "train_rq.yaml", "mbeir_union_up_train.jsonl"),
    ("train-gen", "train_gen.yaml", "rq.pt"),
    ("assign-codes", "assign_codes.yaml", "rq.pt"),
    ("eval", "eval.yaml", "worlds/tiny"),
]


def assert_one_error_line(command: str, missing: str, code, stderr: str) -> None:
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if f"genius {command}: error:" in line]
    assert len(error_lines) == 1 and missing in error_lines[0], stderr[-3000:]


@pytest.mark.parametrize("command, config, missing", CASES[:-1])
def test_a_missing_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, command, config, missing):
    """In-process through ``genius.cli.main`` (each stage's imports are paid once per session): the
    stage must end in SystemExit(2) with its one line; any other exception would be a traceback."""
    from genius import cli

    monkeypatch.setenv("GENIUS_ROOT", str(tmp_path))  # an empty root: the setting's inputs do not exist
    monkeypatch.delenv("GENIUS_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--config", str(TINY / config)])
    assert_one_error_line(command, missing, exit_.value.code, capsys.readouterr().err)


@pytest.mark.parametrize("command, config, missing", CASES[-1:])
def test_the_command_line_exits_2_with_one_line(tmp_path, command, config, missing):
    """The same through a real ``python -m genius.cli`` process: exit status and stderr as a user sees them."""
    env = {**os.environ, "GENIUS_ROOT": str(tmp_path)}
    env.pop("GENIUS_DEBUG", None)
    result = subprocess.run([sys.executable, "-m", "genius.cli", command, "--config", str(TINY / config)],
                            env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert_one_error_line(command, missing, result.returncode, result.stderr)


def test_the_older_mbeir_revisions_union_pool_folder_is_found(tmp_path):
    configured = tmp_path / "M-BEIR/cand_pool/global/mbeir_union_test_cand_pool.jsonl"
    assert older_revision_twin(configured) == configured  # neither exists: the configured name is kept
    older = tmp_path / "M-BEIR/cand_pool/union_pool/mbeir_union_test_cand_pool.jsonl"
    older.parent.mkdir(parents=True)
    older.write_text("")
    assert older_revision_twin(configured) == older
    configured.parent.mkdir(parents=True)
    configured.write_text("")
    assert older_revision_twin(configured) == configured  # today's folder wins when both exist
    other = tmp_path / "elsewhere/global/x.jsonl"
    assert older_revision_twin(other) == other


def genius_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    env.pop("GENIUS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "genius.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.mark.parametrize("args, fragment", [
    (["trian-rq"], "genius: error: unknown command 'trian-rq'; did you mean 'train-rq'?"),
    (["train-rq"], "genius train-rq: error: the following arguments are required: --config; see"),
    (["search", "--run", "x", "-k", "abc"], "genius search: error: argument -k: invalid int value"),
    (["search", "--run", "x", "--text", "a", "-k", "100000000000000000000"], "-k 100000000000000000000: expected"),
    (["index", "frobnicate"], "genius index: error: argument command: invalid choice"),
    # a Latin-1 byte: a UnicodeEncodeError on 'surrogates not allowed' before
    (["search", "--run", "x", "--text", "caf\udce9"], "--text: not valid UTF-8 (bytes b'caf\\xe9')"),
])
def test_a_bad_command_line_is_one_line_without_the_usage_block(tmp_path, args, fragment):
    result = genius_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and fragment in result.stderr and "usage:" not in result.stderr, result.stderr


@pytest.mark.parametrize("override, key", [
    ("train.seed=10000000000000", "train.seed"),  # overflowed numpy's seed after the run had been moved aside
    ("train.cpu_threads=100000", "train.cpu_threads"),  # segfaulted the thread pool
    ("model.proj_dim=100000000000000", "model.proj_dim"),  # failed to allocate after the work began
    ("model.num_levels=1000000000", "model.num_levels"),  # hung
    ("train.epochs=1e30", "train.epochs"),
])
def test_a_slip_of_a_digit_is_refused_before_any_work(tmp_path, override, key):
    result = genius_cli("train-rq", "--config", str(TINY / "train_rq.yaml"), "--set", override, cwd=tmp_path,
                        env={"GENIUS_ROOT": str(tmp_path)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: --set {override}: {key}: " in result.stderr, result.stderr  # the value's, not the file's
    assert not any(tmp_path.iterdir())  # nothing ran, nothing was moved or written


def test_a_run_script_reads_a_relative_config_from_the_callers_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "rq.yaml").write_text("train:\n  epochs: 0\n")
    script = TINY / "run_train_rq.sh"
    result = subprocess.run(["bash", str(script), "--config", "mine/rq.yaml"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300, env={**os.environ, "GENIUS_ROOT": str(tmp_path)})
    # the caller's file was read (its epochs: 0 is refused), not looked up in the repository
    assert result.returncode == 2 and f"{tmp_path}/mine/rq.yaml: train.epochs: 0 is out of range" in result.stderr
    bad = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                         env={**os.environ, "NPROC": "abc"})
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "run_train_rq.sh: error: NPROC=abc: expected a whole number of processes >= 1")


@pytest.mark.parametrize("command, config, key", [
    ("train-rq", "train_rq.yaml", "out_dir"),
    ("eval", "eval.yaml", "paths.results"),
])
def test_an_output_folder_that_is_a_file_names_its_key(tmp_path, command, config, key):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    result = genius_cli(command, "--config", str(TINY / config), "--set", f"{key}={afile}/run", cwd=tmp_path,
                        env={"GENIUS_ROOT": str(tmp_path)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {key}: {afile} is a file, not a folder; point {key} at a folder" in result.stderr, result.stderr
