"""Published M-BEIR numbers to print beside ours (Recall@5, Recall@10 for Fashion200K and FashionIQ; in %).

Sources (see docs/GENIUS_METHOD.md §6 and docs/MBEIR_UNIIR_PEERS.md §3.5-3.6):
- universal pool: GENIUS paper Table 2 / project page (CLIP-SF, BLIP-FF, GENIUS, GENIUS^R). FashionIQ
  GENIUS is 18.9 on the project page and 13.1 in the README; the README is probably wrong, so 18.9.
- task-specific pools: GENIUS paper Table 1 (CLIP-SF and BLIP-FF there are UniIR's local-pool numbers).
Published averages are kept separately: the paper's universal averages do not all equal the plain
mean of its 16 printed values (CLIP-SF: 48.9 vs 49.05), so we print our own mean of the rows shown.
"""
from __future__ import annotations

# The 16 evaluated (dataset, task) pairs in the paper's universal-table order.
PAPER_ORDER = [
    ("visualnews", 0), ("mscoco", 0), ("fashion200k", 0), ("webqa", 1), ("edis", 2), ("webqa", 2),
    ("visualnews", 3), ("mscoco", 3), ("fashion200k", 3), ("nights", 4), ("oven", 6), ("infoseek", 6),
    ("fashioniq", 7), ("cirr", 7), ("oven", 8), ("infoseek", 8),
]

DISPLAY_NAME = {
    "visualnews": "VisualNews", "mscoco": "MSCOCO", "fashion200k": "Fashion200K", "webqa": "WebQA",
    "edis": "EDIS", "nights": "NIGHTS", "oven": "OVEN", "infoseek": "InfoSeek", "fashioniq": "FashionIQ",
    "cirr": "CIRR", "flickr30k": "Flickr30K",
}

# Recall@k the paper reports; every other M-BEIR dataset uses k = 5.
REPORTED_K = {"fashion200k": 10, "fashioniq": 10}


def default_k(dataset: str) -> int:
    return REPORTED_K.get(dataset, 5)


METHODS = ("CLIP-SF", "BLIP-FF", "GENIUS", "GENIUS^R")

_UNIVERSAL = {  # in PAPER_ORDER
    "CLIP-SF": [42.6, 77.9, 17.8, 84.7, 59.4, 78.8, 42.8, 92.3, 17.9, 33.4, 39.2, 24.0, 26.2, 43.0, 60.2, 44.6],
    "BLIP-FF": [23.0, 75.6, 25.4, 79.5, 50.3, 79.7, 21.1, 88.8, 27.6, 33.0, 34.7, 19.7, 28.5, 51.4, 57.8, 27.7],
    "GENIUS": [18.5, 55.1, 13.7, 31.1, 36.6, 49.0, 18.4, 82.7, 12.8, 8.1, 34.6, 10.4, 18.9, 20.1, 36.5, 14.2],
    "GENIUS^R": [27.3, 68.0, 16.2, 42.9, 44.1, 59.7, 26.8, 90.6, 16.2, 30.2, 38.0, 18.0, 19.2, 38.3, 48.6, 28.6],
}

# Table 1 lists the task-specific numbers in this column order.
_TASK_SPECIFIC_ORDER = [
    ("mscoco", 0), ("visualnews", 0), ("fashion200k", 0), ("webqa", 1), ("edis", 2), ("webqa", 2),
    ("mscoco", 3), ("visualnews", 3), ("fashion200k", 3), ("nights", 4), ("oven", 6), ("infoseek", 6),
    ("fashioniq", 7), ("cirr", 7), ("oven", 8), ("infoseek", 8),
]
_TASK_SPECIFIC = {  # in _TASK_SPECIFIC_ORDER
    "CLIP-SF": [81.1, 42.6, 18.0, 84.7, 59.4, 78.7, 92.3, 43.1, 18.3, 32.0, 45.5, 27.9, 24.4, 44.6, 67.6, 48.9],
    "BLIP-FF": [79.7, 23.4, 26.1, 80.0, 50.9, 79.8, 89.9, 22.8, 28.9, 33.0, 41.0, 22.4, 29.2, 52.2, 55.8, 33.0],
    "GENIUS": [68.1, 18.5, 13.7, 32.5, 37.0, 49.7, 83.2, 18.7, 12.8, 8.2, 36.6, 11.2, 13.2, 20.7, 36.4, 14.6],
    "GENIUS^R": [78.0, 27.4, 16.2, 44.6, 44.3, 60.6, 91.1, 28.4, 16.3, 30.2, 41.9, 20.7, 19.3, 39.5, 52.5, 30.1],
}

PUBLISHED_AVERAGE = {
    "universal": {"CLIP-SF": 48.9, "BLIP-FF": 45.5, "GENIUS": 28.8, "GENIUS^R": 38.3},
    "task-specific": {"CLIP-SF": 50.6, "BLIP-FF": 46.8},
}

PAPER = {
    "universal": {m: dict(zip(PAPER_ORDER, values)) for m, values in _UNIVERSAL.items()},
    "task-specific": {m: dict(zip(_TASK_SPECIFIC_ORDER, values)) for m, values in _TASK_SPECIFIC.items()},
}


def paper_recall(pool_kind: str, method: str, dataset: str, task: int) -> float | None:
    """Published Recall (in %) for an M-BEIR (dataset, task) pair, or None when not published.

    ``pool_kind`` is 'universal' or 'task-specific'; ``method`` one of METHODS.
    """
    if pool_kind not in PAPER:
        raise ValueError(f"pool kind {pool_kind!r} is not one of {', '.join(PAPER)}")
    return PAPER[pool_kind].get(method, {}).get((dataset, task))


def paper_rank(dataset: str, task: int) -> int:
    """Position in the paper's table (pairs it does not list come after, in task order)."""
    pair = (dataset, task)
    return PAPER_ORDER.index(pair) if pair in PAPER_ORDER else len(PAPER_ORDER) + task
