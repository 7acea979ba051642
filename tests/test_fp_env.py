"""The CPU's subnormal mode (training loops, decoding's log-softmax): inside ``subnormals_flushed``
every torch thread reads and writes subnormal floats as zero, and each gets the calling thread's
earlier mode back after the outermost block; another Python thread's block, on its own OpenMP
team, leaves this thread's alone."""
from __future__ import annotations

import threading

import pytest
import torch

from genius.common import fp_env

TINY = torch.finfo(torch.float32).tiny
ROWS = 1 << 21  # large enough that torch splits an element-wise op between its threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def subnormal_results(x: torch.Tensor) -> int:
    """How many of 1e-30 x 1e-10 (a subnormal 1e-40) come out nonzero, over every thread's share."""
    return int((x * 1e-10).count_nonzero())


def subnormal_inputs_read(y: torch.Tensor) -> int:
    """How many subnormal inputs 1e-40 survive x 1.0 (denormals-are-zero reads them as 0)."""
    return int((y * 1.0).count_nonzero())


def test_every_thread_flushes_inside_and_the_mode_is_restored_after(two_threads):
    x, y = torch.full((ROWS,), 1e-30), torch.full((ROWS,), 1e-40)
    assert 0 < y[0] < TINY and subnormal_results(x) == ROWS == subnormal_inputs_read(y)
    assert fp_env.flushing_threads(2) == 0
    normal = x * 1e-5
    with fp_env.subnormals_flushed(torch.device("cpu")):
        assert fp_env.flushing_threads(2) == 2
        assert subnormal_results(x) == 0  # written as zero by both threads
        assert subnormal_inputs_read(y) == 0  # and read as zero
        assert torch.equal(x * 1e-5, normal)  # normal numbers are untouched
    assert fp_env.flushing_threads(2) == 0
    assert subnormal_results(x) == ROWS == subnormal_inputs_read(y)


def test_a_block_inside_another_leaves_the_mode_on_until_the_outermost_ends(two_threads):
    with fp_env.subnormals_flushed(torch.device("cpu")):
        with fp_env.subnormals_flushed(torch.device("cpu")):  # a search's log-softmax inside a training loop
            assert fp_env.flushing_threads(2) == 2
        assert fp_env.flushing_threads(2) == 2
        assert subnormal_results(torch.full((ROWS,), 1e-30)) == 0
    assert fp_env.flushing_threads(2) == 0


def test_a_block_in_another_python_thread_leaves_this_ones_mode_alone(two_threads):
    def other():  # its torch ops run on its own OpenMP team, which its block sets and clears
        with fp_env.subnormals_flushed(torch.device("cpu")):
            pass

    with fp_env.subnormals_flushed(torch.device("cpu")):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert fp_env.flushing_threads(2) == 2
        assert subnormal_results(torch.full((ROWS,), 1e-30)) == 0
    assert fp_env.flushing_threads(2) == 0


def test_a_block_around_one_op_sets_only_the_threads_it_is_given():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the thread policy sets a busy machine
    try:
        assert fp_env.flushing_threads(2) == 0  # the pool's second thread exists, not flushing
        with fp_env.subnormals_flushed(torch.device("cpu"), torch.get_num_threads()):
            assert fp_env.flushing_threads(1) == 1
            assert fp_env.flushing_threads(2) == 1  # the thread the op does not use was left asleep
        assert fp_env.flushing_threads(2) == 0
    finally:
        torch.set_num_threads(before)


def test_threads_added_inside_the_block_flush_too(two_threads):
    with fp_env.subnormals_flushed(torch.device("cpu")):
        torch.set_num_threads(3)  # a third thread: set at entry on a machine of 3+ cores, else it inherits
        assert fp_env.flushing_threads(3) == 3
        assert subnormal_results(torch.full((ROWS,), 1e-30)) == 0
    assert fp_env.flushing_threads(3) == 0


def test_an_earlier_flushing_mode_of_the_calling_thread_is_kept(two_threads):
    assert torch.set_flush_denormal(True)  # torch's own switch: the calling thread only
    try:
        assert fp_env.flushing_threads(2) == 1
        with fp_env.subnormals_flushed(torch.device("cpu")):
            assert fp_env.flushing_threads(2) == 2
        assert fp_env.flushing_threads(2) == 1 == fp_env.flushing_threads(1)  # the calling thread's, as before
    finally:
        torch.set_flush_denormal(False)
    assert fp_env.flushing_threads(2) == 0


def test_a_gpu_run_leaves_the_cpu_mode_alone(two_threads):
    with fp_env.subnormals_flushed(torch.device("cuda")):
        assert fp_env.flushing_threads(2) == 0
        assert subnormal_results(torch.full((ROWS,), 1e-30)) == ROWS
