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
