"""Shared fixtures: where the read-only real data lives, and small helpers every test file uses."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("GENIUS_SHARED_DATA", REPO.parent / "shared" / "data"))

# The tests' models are tiny: their matrices gain little from a second intra-op thread and lose a
# lot (OpenMP spin waits) when the cores are shared, which made single tests up to 7x slower here.
torch.set_num_threads(1)


# ---- warnings: deprecated calls of our own fail --------------------------------------------
# pyproject.toml's filterwarnings covers this process. The stages the tests start as processes
# (run scripts, ``python -m genius...``) get the same rule through PYTHONWARNINGS, whose module
# field is an exact name, not a pattern: so every module of the package is listed, and __main__
# (a stage run with ``python -m`` is __main__). Not tests' own business otherwise, so it is set once here.
def _strict_warnings_for_subprocesses() -> str:
    modules = ["__main__"]
    for path in sorted(REPO.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[0] in ("tests", ".venv", "build") or any(p.startswith(".") for p in parts):
            continue
        modules.append(".".join(("genius", *parts[:-1])) if parts[-1] == "__init__" else ".".join(("genius", *parts)))
    rules = [f"error::{category}:{module}" for module in modules
             for category in ("DeprecationWarning", "PendingDeprecationWarning", "FutureWarning")]
    return ",".join(filter(None, [os.environ.get("PYTHONWARNINGS", ""), *rules]))


os.environ["PYTHONWARNINGS"] = _strict_warnings_for_subprocesses()


# ---- parallel runs: what must share a worker --------------------------------------------
# scripts/test.sh runs one pytest-xdist worker per core with ``--dist loadgroup``. A session or
# module fixture is built once per worker that needs it, so a test file stays on one worker (its
# module fixtures are built once), and every test of the finished tiny root (minutes to build)
# joins one group wherever its file is.
TINY_ROOT_FIXTURES = {"finished_tiny_root", "tiny_root_copy"}


def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        group = "finished_tiny_root" if TINY_ROOT_FIXTURES & set(item.fixturenames) else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or $GENIUS_SHARED_DATA); tests that need it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set GENIUS_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def coco_mini(shared_data: Path) -> Path:
    root = shared_data / "coco_mini_mbeir"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    return root


# ---- a finished tiny pipeline, built once per session -------------------------------------
TINY = REPO / "configs_scripts" / "tiny"


def run_tiny_stage(root: Path, script: str, *args: str, check: bool = True, timeout: int = 1800,
                   env: dict | None = None):
    """Run ``configs_scripts/tiny/<script>.sh`` with GENIUS_ROOT=root; returns the CompletedProcess
    (stdout and stderr as text). ``check``: fail the test on a non-zero exit, showing the output."""
    import subprocess

    full_env = {**os.environ, "GENIUS_ROOT": str(root), "GENIUS_LOG_LEVEL": "INFO", **(env or {})}
    result = subprocess.run(["bash", str(TINY / f"{script}.sh"), *args], env=full_env, capture_output=True,
                            text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="session")
def finished_tiny_root(tmp_path_factory) -> Path:
    """A GENIUS_ROOT in which ``configs_scripts/tiny/run_all.sh`` has run every stage. Shared by
    the whole session: never change it; take ``tiny_root_copy`` to change things."""
    root = tmp_path_factory.mktemp("finished_tiny_root")
    result = run_tiny_stage(root, "run_all")
    (root / "run_all.log").write_text(result.stdout + result.stderr)
    return root


@pytest.fixture
def tiny_root_copy(finished_tiny_root: Path, tmp_path: Path) -> Path:
    """A private copy of the finished tiny root (file times kept, as ``cp -a`` does)."""
    import shutil

    copy = tmp_path / "genius_root"
    shutil.copytree(finished_tiny_root, copy, symlinks=True)
    return copy
