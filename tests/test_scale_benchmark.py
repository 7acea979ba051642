"""Smoke test of benchmarks/scale.py at toy size: every requested stage runs in its own process and
gets a table row with a finite time and peak RSS; the working files are removed afterwards."""
from __future__ import annotations

import math

from genius.benchmarks import scale
from genius.benchmarks.common import read_csv


def test_scale_benchmark_writes_a_finite_row_per_stage(tmp_path):
    stages = ["write-codes", "write-stores", "trie"]
    work = tmp_path / "work"
    status = scale.main(["--sizes", "2000", "--queries", "8", "--tiny", "--centres", "32", "--threads", "1",
                         "--stages", *stages, "--out-dir", str(tmp_path), "--work-dir", str(work)])
    assert status == 0
    rows = read_csv(tmp_path / "scale.csv")
    assert [row["stage"] for row in rows] == stages
    for row in rows:
        assert row["size"] == "2000" and "FAILED" not in row["note"]
        assert math.isfinite(float(row["wall_s"])) and float(row["wall_s"]) > 0
        assert math.isfinite(float(row["peak_rss_mb"])) and float(row["peak_rss_mb"]) > 0
    assert float(rows[1]["disk_mb"]) > 2000 * 768 * 2 * 2 / 2**20  # the pool's fp16 image and text vectors
    assert "IDs" in rows[2]["note"] and float(rows[2]["disk_mb"]) > 0
    assert all(float(row["peak_anon_mb"]) > 0 for row in rows)
    assert "| trie | 2000 |" in (tmp_path / "scale.md").read_text()
    assert not (work / "n2000").exists()  # cleaned without --keep
