"""RSS growth of edits by how many threads run them (the load proof's memory growth).

    .venv/bin/python bench/edit_threads_rss.py

An in-process server on the tiny model; the edit manager is called directly, 40 ROME edits
each followed by the revert of the previous one, first all on one thread, then in a fresh
server each on its own thread that stays alive afterwards (as the gRPC worker pool spreads
calls over its threads). The only difference between the two is which threads run the edits.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CYCLES = 40


class Cycles:
    """Edit-and-revert cycles against one in-process server."""

    def __init__(self) -> None:
        from editserve.server.app import EditserveServer
        from editserve.server.config import ServeConfig
        from tests.proofs.models import served_model

        root = Path(tempfile.mkdtemp())
        config = ServeConfig(model=str(served_model("tiny", root)), host="127.0.0.1", port=0, metrics_port=0,
                             state_dir=str(root / "state"), cache_dir=str(root / "cache"), torch_threads=2,
                             prepare_statistics=False)
        self.server = EditserveServer(config)
        self.server.start()
        self.server.load()
        self.previous: str | None = None
        self.count = 0

    def one(self) -> None:
        from editserve.editing.facts import Fact
        from tests.proofs.crash import ROME_TINY, fact

        client_fact = fact(self.count)
        self.count += 1
        options = {k: v for k, v in ROME_TINY.items() if k != "method"}
        manager = self.server.runtime.edits
        outcome = manager.edit("rome", [Fact(client_fact.prompt, client_fact.subject, client_fact.target_new)],
                               options, report=False)
        if self.previous is not None:
            manager.revert(self.previous)
        self.previous = outcome.edit_id


def on_one_thread(cycles: Cycles, count: int) -> None:
    for _ in range(count):
        cycles.one()


def each_on_its_own_thread(cycles: Cycles, count: int) -> None:
    release = threading.Event()
    for _ in range(count):
        done = threading.Event()

        def work(done: threading.Event = done) -> None:
            cycles.one()
            done.set()
            release.wait()  # stays alive, as a pool thread does

        threading.Thread(target=work, daemon=True).start()
        done.wait()


def measure(run) -> float:
    import psutil

    cycles = Cycles()
    on_one_thread(cycles, 5)  # warm-up: statistics, templates, first allocations
    gc.collect()
    before = psutil.Process().memory_info().rss
    run(cycles, CYCLES)
    gc.collect()
    growth = (psutil.Process().memory_info().rss - before) / 2**20
    cycles.server.stop(0)
    return growth


def main() -> None:
    one = measure(on_one_thread)
    many = measure(each_on_its_own_thread)
    print(f"RSS growth over {CYCLES} edit+revert cycles: one thread {one:.1f} MiB, "
          f"a thread each {many:.1f} MiB")


if __name__ == "__main__":
    main()
