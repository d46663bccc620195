"""Torch work off the decode engine runs in a thread that ends with it.

PyTorch's CPU parallelism is OpenMP (GNU libgomp in the PyPI wheels). Every thread that runs
a parallel operation gets its own team of worker threads, kept docked for the rest of that
thread's life, and libgomp counts every docked worker: once they outnumber the CPUs, all
teams stop spin-waiting between parallel regions and sleep instead, so each of the ~400
parallel regions of a decode step pays a futex wake-up. Measured 2026-12-03 on a 2-core
Xeon (torch 2.13, 2 threads): the 211 weight products of a SmolLM2 decode step took 11 ms
in a thread when no other team existed and 19-22 ms when a long-lived idle thread had once
run one parallel matrix product; the server decoded at 19 tok/s against 30 for the same
forward in-process (bench/serving_bench.py). No environment variable lifts the throttle.

A team is freed when its thread exits. So the server keeps one long-lived team, the
engine's, and runs every other piece of torch work (start-up, edits, scores, traces, drift
refreshes, journal following, SERAC routing) through :func:`in_fresh_thread`: the caller
waits as before, the work runs in a new thread, and the thread and its team are gone when
the call returns. Creating them costs ~0.1 ms, against work of milliseconds to minutes.

Thread-scoped state (the editing hooks, locks) stays consistent because the whole unit of
work, from taking its locks to releasing them, runs inside the one fresh thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_fresh_thread(work: Callable[[], T], name: str = "editserve-torch") -> T:
    """Run ``work`` in a new thread, wait for it, return its result or raise its exception."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as error:  # noqa: BLE001 - handed to the caller as is
            outcome.append((False, error))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
