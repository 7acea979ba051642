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
# scripts/test.sh runs one pytest-xdist worker per core. A session or module fixture is built once
# per worker that needs it, so every test of a file goes to one worker (its module fixtures are
# built once), and every test that uses the finished tiny root (minutes to build) goes to one
# worker wherever its file is. xdist's own ``loadgroup`` marks do not work with pytest 9 (they
# rewrite a node id attribute pytest no longer reads), and the scheduler sees only node ids, so
# the tests that need the root are found from the test files' source: test functions taking one
# of TINY_ROOT_FIXTURES, directly or through a fixture of their own file.
TINY_ROOT_FIXTURES = {"finished_tiny_root", "tiny_root_copy"}


def tests_needing_the_tiny_root(test_file: Path) -> set[str]:
    import ast

    functions = [node for node in ast.walk(ast.parse(test_file.read_text(encoding="utf-8")))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    needing, grew = set(TINY_ROOT_FIXTURES), True
    while grew:  # a fixture of the file that takes a root-needing fixture needs it too
        before = len(needing)
        needing |= {f.name for f in functions if {a.arg for a in f.args.args} & needing}
        grew = len(needing) > before
    return {f.name for f in functions if f.name.startswith("test") and f.name in needing}


@pytest.hookimpl(optionalhook=True)  # an xdist hook: without xdist installed it is never called
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":  # another --dist asked for explicitly
        return None
    from xdist.scheduler import LoadScopeScheduling

    needing = {str(path.relative_to(REPO)): tests_needing_the_tiny_root(path)
               for path in (REPO / "tests").glob("test_*.py")}

    class FileOrTinyRoot(LoadScopeScheduling):
        """Work units: the tests of the finished tiny root, then one unit per test file."""

        def _split_scope(self, nodeid: str) -> str:
            path, _, rest = nodeid.partition("::")
            name = rest.split("::")[-1].split("[")[0]
            return "finished_tiny_root" if name in needing.get(path, ()) else path

    return FileOrTinyRoot(config, log)


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


@pytest.fixture
def record_subnormal_mode(monkeypatch):
    """``record(module, name)`` wraps the function ``module.name`` so that each call first records
    whether every torch thread flushes subnormals then (``common/fp_env.py``); returns the list."""
    from genius.common import fp_env

    def record(module, name: str) -> list[bool]:
        seen, real = [], getattr(module, name)

        def recording(*args, **kwargs):
            seen.append(fp_env.flushing_threads() == torch.get_num_threads())
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, recording)
        return seen

    return record


@pytest.fixture
def record_fp32_library(monkeypatch):
    """``record(module, name)`` wraps the function ``module.name`` so that each call first records
    torch's oneDNN fp32 matmul precision then ("bf16": fp32 products in oneDNN, ``common/cpu.py``);
    returns the list."""

    def record(module, name: str) -> list[str]:
        seen, real = [], getattr(module, name)

        def recording(*args, **kwargs):
            seen.append(torch.backends.mkldnn.matmul.fp32_precision)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, recording)
        return seen

    return record
