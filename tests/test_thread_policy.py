"""The CPU thread policy: one thread for small work or a busy machine, the free cores for large work
on idle ones, a pinned count respected, and the periodic re-check following the load."""
import pytest
import torch

from genius.common import distributed
from genius.common.distributed import PARALLEL_MIN_MACS, ThreadPolicy, init_distributed, recheck_threads

LARGE, SMALL = PARALLEL_MIN_MACS * 100, PARALLEL_MIN_MACS / 10


class Load:
    """Other processes' runnable threads, as the test sets them."""

    def __init__(self, running: int = 0):
        self.running, self.reads = running, 0

    def __call__(self) -> int:
        self.reads += 1
        return self.running


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    distributed.start_thread_policy(None)
    torch.set_num_threads(before)


def test_small_work_runs_on_one_thread_even_on_idle_cores():
    load = Load(0)
    assert ThreadPolicy(SMALL, cores=4, read_load=load).threads() == 1
    assert load.reads == 0  # small work never needs to look at the machine


def test_large_work_uses_the_free_cores():
    assert ThreadPolicy(LARGE, cores=4, read_load=Load(0)).threads() == 4
    assert ThreadPolicy(LARGE, cores=4, read_load=Load(1)).threads() == 3
    assert ThreadPolicy(LARGE, cores=8, share=4, read_load=Load(4)).threads() == 4  # a sibling rank's 4 threads


def test_a_busy_machine_gets_one_thread():
    assert ThreadPolicy(LARGE, cores=2, read_load=Load(1)).threads() == 1
    assert ThreadPolicy(LARGE, cores=2, read_load=Load(3)).threads() == 1


def test_a_pinned_count_is_respected_and_stops_the_policy(monkeypatch):
    monkeypatch.setattr(distributed, "others_running", lambda: 0)
    init_distributed("cpu", cpu_threads=3, op_macs=LARGE)
    assert torch.get_num_threads() == 3 and distributed._policy is None
    recheck_threads()
    assert torch.get_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the environment pins too
    init_distributed("cpu", op_macs=SMALL)
    assert torch.get_num_threads() == 3 and distributed._policy is None


def test_init_distributed_applies_the_policy_from_the_work_size(monkeypatch):
    monkeypatch.setattr(distributed, "usable_cores", lambda: 2)
    init_distributed("cpu", op_macs=SMALL)
    assert torch.get_num_threads() == 1
    distributed.start_thread_policy(ThreadPolicy(LARGE, cores=2, read_load=Load(0)))
    assert torch.get_num_threads() == 2


def test_the_periodic_recheck_follows_the_load():
    load, clock = Load(0), Clock()
    distributed.start_thread_policy(ThreadPolicy(LARGE, cores=2, read_load=load, interval=5.0, clock=clock))
    assert torch.get_num_threads() == 2
    load.running = 3  # three other processes start
    clock.now = 4.9
    recheck_threads()
    assert torch.get_num_threads() == 2 and load.reads == 1  # within the interval: not even read
    clock.now = 5.0
    recheck_threads()
    assert torch.get_num_threads() == 1
    load.running = 0  # they end
    clock.now = 10.0
    recheck_threads()
    assert torch.get_num_threads() == 2


def test_others_running_subtracts_this_process(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "_own_running_threads", lambda: 1)
    real_path = distributed.Path
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("3.10 2.00 1.50 4/200 12345\n")
    monkeypatch.setattr(distributed, "Path", lambda p: real_path(loadavg) if p == "/proc/loadavg" else real_path(p))
    assert distributed.others_running(samples=3, gap_seconds=0) == 3
