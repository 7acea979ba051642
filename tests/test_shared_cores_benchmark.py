"""The shared-cores benchmark at toy size (each stage replaced by a process that records its thread
setting), quiet and under one busy process, with the policy and one pinned thread; and its table."""
import argparse
import csv
import json
import sys

import pytest

from genius.benchmarks import shared_cores


def test_the_benchmark_runs_every_cell_in_its_own_root_pins_threads_and_kills_its_load(tmp_path, monkeypatch):
    seen = tmp_path / "seen.jsonl"
    toy = ("import json, os; open(%r, 'a').write(json.dumps([os.environ['GENIUS_ROOT'], "
           "os.environ.get('OMP_NUM_THREADS')]) + '\\n')" % str(seen))
    monkeypatch.setattr(shared_cores, "command", lambda *args, **kw: [sys.executable, "-c", toy])
    started = []
    real_start = shared_cores.start_busy
    monkeypatch.setattr(shared_cores, "start_busy", lambda n: started.extend(real_start(n)) or started[-n:])
    out, work = tmp_path / "out", tmp_path / "work"
    assert shared_cores.main(["--stages", "world,train_rq", "--modes", "auto,1", "--busy", "1", "--settle", "0",
                              "--work", str(work), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "shared_cores.csv").open()))
    assert {(r["stage"], r["load"], r["threads"]) for r in rows} == {
        (s, load, m) for s in ("world", "train_rq") for load in ("quiet", "busy") for m in ("auto", "1")}
    assert all(float(r["seconds"]) > 0 and len(r["loadavg_at_start"].split()) == 4 for r in rows)
    runs = [json.loads(line) for line in seen.read_text().splitlines()]
    assert {root for root, _ in runs} == {str(work)}  # never the repository's root
    # 4 set-up runs (world .. train_rq) with the policy, then per stage: quiet auto, 1, busy 1, auto
    assert [threads for _, threads in runs] == [None] * 4 + [None, "1", "1", None] * 2
    assert len(started) == 2 and all(p.poll() is not None for p in started)  # each busy process is gone
    table = (out / "shared_cores.md").read_text()
    assert "| train_rq |" in table and "| total |" in table and "busy/quiet auto" in table


def test_the_table_reports_best_times_totals_and_busy_over_quiet_ratios():
    rows = [{"stage": s, "repeat": r, "load": load, "threads": m, "seconds": sec, "loadavg_at_start": "1 1 1 1/1",
             "result": "-"}
            for s, r, load, m, sec in [("train_rq", 0, "quiet", "auto", 10.0), ("train_rq", 1, "quiet", "auto", 8.0),
                                       ("train_rq", 0, "busy", "auto", 20.0), ("train_gen", 0, "quiet", "auto", 2.0),
                                       ("train_gen", 0, "busy", "auto", 6.0)]]
    args = argparse.Namespace(
        stages=["train_rq", "train_gen"], loads=["quiet", "busy"], modes=["auto"], setting="demo", busy=3, repeats=2)
    table = shared_cores.markdown(rows, args)
    assert "| train_rq | 8.0 | 20.0 | 2.50x |" in table
    assert "| train_gen | 2.0 | 6.0 | 3.00x |" in table
    assert "| total | 10.0 | 26.0 | 2.60x |" in table


@pytest.mark.parametrize("flags", [["--stages", "nope"], ["--loads", "loud"], ["--modes", "two"], ["--repeats", "0"]])
def test_bad_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        shared_cores.main(flags)
    assert exit_.value.code == 2 and "unknown or out-of-range" in capsys.readouterr().err


def test_the_codes_digest_is_of_this_run_and_stale_copies_are_dropped(tmp_path):
    """assign-codes sets a forced run's predecessor aside in one stale/ per pool: the digest must
    not read those copies (two cells with equal codes would look different), and they are removed."""
    setting = shared_cores.REPO / "configs_scripts" / "demo"
    out = shared_cores.output_dir(setting, "assign_codes", tmp_path)
    for pool in ("pool_a", "pool_b"):
        (out / pool / "stale" / "20261130-000000").mkdir(parents=True)
        (out / pool / "codes.npy").write_bytes(pool.encode())
    fresh = shared_cores.digest(setting, "assign_codes", tmp_path)
    (out / "pool_a" / "stale" / "20261130-000000" / "codes.npy").write_bytes(b"an earlier run")
    assert shared_cores.digest(setting, "assign_codes", tmp_path) == fresh
    shared_cores.drop_stale(setting, "assign_codes", tmp_path)
    assert not list(out.glob("*/stale")) and (out / "pool_a" / "codes.npy").is_file()
    (out / "pool_b" / "codes.npy").write_bytes(b"other codes")
    assert shared_cores.digest(setting, "assign_codes", tmp_path) != fresh
