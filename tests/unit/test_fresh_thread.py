"""Torch work in a thread that ends with it: results, errors, and no OpenMP team left behind."""

import os
import threading
import time

import pytest
import torch

from editserve.server.fresh_thread import in_fresh_thread


def test_the_result_and_the_error_reach_the_caller_from_a_thread_that_is_gone():
    ran_on: list[threading.Thread] = []

    def work() -> int:
        ran_on.append(threading.current_thread())
        return 7

    assert in_fresh_thread(work, "probe") == 7
    (thread,) = ran_on
    assert thread is not threading.current_thread() and thread.name == "probe" and not thread.is_alive()

    def fail() -> None:
        raise KeyError("no such edit")

    with pytest.raises(KeyError, match="no such edit"):
        in_fresh_thread(fail)


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _settled_threads(timeout: float = 5.0) -> int:
    """The native thread count once it has held still for 0.2 s: a joined thread (and its
    team's worker) leaves /proc a moment after join() returns."""
    deadline = time.monotonic() + timeout
    count, since = _native_threads(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = _native_threads()
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= 0.2:
            break
    return count


def _parallel_op() -> None:
    torch.ones(1 << 22).mul_(2)  # an elementwise op this large runs as an OpenMP parallel region


@pytest.fixture
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_long_lived_thread_keeps_a_team_and_a_fresh_one_does_not(two_torch_threads):
    """The control shows what the fix is for: a thread that ran a parallel operation and lives
    on keeps its OpenMP worker (one more native thread); the same operation through
    in_fresh_thread leaves the process with the threads it had."""
    done, stay = threading.Event(), threading.Event()

    def long_lived() -> None:
        _parallel_op()
        done.set()
        stay.wait(60)

    keeper = threading.Thread(target=long_lived, daemon=True)
    before = _settled_threads()
    keeper.start()
    done.wait(60)
    try:
        assert _settled_threads() == before + 2  # the thread itself and its team's worker
    finally:
        stay.set()
        keeper.join(60)
    settled = _settled_threads()
    assert settled == before
    in_fresh_thread(_parallel_op)
    assert _settled_threads() == settled
