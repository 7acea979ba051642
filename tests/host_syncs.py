"""Counting, on the CPU, the places where code would wait for a GPU.

A device tensor reaches the host only through a copy (``.cpu()``), a read of its values
(``.item()``, ``.tolist()``) or a Python conversion (``if t:``, ``int(t)``, ``float(t)``,
``range(t)``); each blocks the host until the device has caught up. ``.numpy()`` is not counted:
on a device tensor it raises, so on a GPU it always follows one of the above. Running the code on
the CPU with these methods patched counts the syncs it would make on a GPU, except those inside
torch's own kernels (``torch.bincount``, bool-mask indexing), which the code under test avoids.
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch

SYNC_METHODS = ("cpu", "item", "tolist", "__bool__", "__int__", "__float__", "__index__")
REPO = Path(__file__).resolve().parent.parent


def _in_project(filename: str) -> bool:
    path = Path(filename)
    return path.is_relative_to(REPO) and not path.is_relative_to(REPO / ".venv")


@contextlib.contextmanager
def count_host_syncs(project_only: bool = False) -> Iterator[Counter]:
    """A Counter of sync method name -> calls made inside the block (on any tensor).

    ``project_only`` counts only the calls made by the project's own code: torch's optimisers
    read their step counters with ``.item()``, but those live on the host unless ``capturable``."""
    calls: Counter = Counter()

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            if not project_only or _in_project(sys._getframe(1).f_code.co_filename):
                calls[name] += 1
            return original(self, *args, **kwargs)
        return method

    patched = {name: counting(name) for name in SYNC_METHODS}
    for name, method in patched.items():
        setattr(torch.Tensor, name, method)
    try:
        yield calls
    finally:
        for name in patched:
            delattr(torch.Tensor, name)
