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
