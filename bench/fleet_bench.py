"""What an edit costs a fleet: computed once, then fanned out to the other replicas.

    .venv/bin/python bench/fleet_bench.py --model smollm2-135m --edits 3

Starts a private PostgreSQL (Debian's binaries, tests/postgres.py) and two editserve servers
sharing its journal, each with its own state directory and one torch thread. For each method,
``--edits`` edits (CounterFact-style facts, the method's shipped defaults) are sent to replica
A one after the other; for each it records:

- ``compute_s``: the edit's compute time on A (from the reply), the work a fleet does once;
- ``artifact_bytes``: the size of its journaled artifact, what every other replica reads from
  the database;
- ``fanout_s``: from A's reply to replica B serving the edit's revision (B is notified on
  commit, reads the artifact from PostgreSQL, checks its sha256, composes it and swaps it in),
  polled every 2 ms over gRPC;
- the ratio fanout_s / compute_s, both measured in this run (the baseline is the computation).

Before each edit, B is let settle (key statistics prepared, drift measured at its revision):
both hold the edit mutex, so an edit arriving during B's drift refresh of the previous change
waits for it (up to ~1.7 s for SERAC here, whose refresh also routes the probes).

Medians per method are printed and written to ``--out`` (JSON). Timings of B include its
polling by this process; run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FACTS = [  # (prompt, subject, new, true): CounterFact-style, one per edit
    ("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    ("{} plays the sport of", "Michael Jordan", "football", "basketball"),
    ("{} was founded by", "Apple", "Bill Gates", "Steve Jobs"),
    ("The capital of {} is", "France", "Rome", "Paris"),
    ("{} is a citizen of", "Lionel Messi", "Brazil", "Argentina"),
    ("The official language of {} is", "Japan", "Spanish", "Japanese"),
    ("{} is headquartered in", "Microsoft", "Berlin", "Redmond"),
    ("{} was born in", "Albert Einstein", "Canada", "Germany"),
]


def _wait_revision(client, revision: int, timeout: float = 120.0) -> float:
    started = time.perf_counter()
    while client.model_info().revision < revision:
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"revision {revision} not served in {timeout} s")
        time.sleep(0.002)
    return time.perf_counter() - started


def _settle(server, client, timeout: float = 600.0) -> None:
    """Until ``server`` is idle: key statistics prepared and drift measured at the served
    revision (both hold the edit mutex, which applying a followed edit waits for)."""
    deadline = time.perf_counter() + timeout
    while server.metric("editserve_key_statistics_ready") != 1 or \
            (info := client.model_info()).drift_revision != info.revision:
        if time.perf_counter() > deadline:
            raise TimeoutError("the replica did not settle")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="serac,t_patcher,rome,memit,ft_l")
    parser.add_argument("--edits", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from editserve.client import Fact
    from tests.postgres import PostgresServer
    from tests.server_process import start_server

    postgres = PostgresServer()
    if not postgres.available:
        sys.exit("PostgreSQL's initdb/pg_ctl not found (apt-get install postgresql)")
    postgres.start()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        url = postgres.database()
        replicas = {}
        try:
            for name in ("a", "b"):
                replicas[name] = start_server(args.model, tmp / name, tmp / "logs" / name, "--journal-url", url,
                                              timeout=600)
            a, b = replicas["a"], replicas["b"]
            with a.client(timeout=900) as client_a, b.client() as client_b:
                client_a.edit(Fact(*FACTS[0]), method="rome", dry_run=True)  # statistics ready before timing
                for method in args.methods.split(","):
                    rows = []
                    for i in range(args.edits):
                        fact = Fact(*FACTS[i % len(FACTS)])
                        _settle(b, client_b)  # fan-out of an edit alone, not behind B's drift refresh
                        reply = client_a.edit(fact, method=method)
                        try:
                            fanout = _wait_revision(client_b, reply.revision)
                        except TimeoutError:
                            print(b.log()[-4000:], file=sys.stderr)
                            raise
                        size = (tmp / "a" / "artifacts" / f"{reply.edit_id}.safetensors").stat().st_size
                        rows.append({"compute_s": reply.compute_seconds, "fanout_s": fanout, "artifact_bytes": size})
                        client_a.revert(reply.edit_id)
                        _wait_revision(client_b, reply.revision + 1)
                    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                    med["fanout_over_compute"] = med["fanout_s"] / med["compute_s"]
                    results[method] = {"median": med, "runs": rows}
                    print(f"{method:10s} compute {med['compute_s']:7.2f} s  artifact {med['artifact_bytes'] / 1e3:9.1f} kB"
                          f"  fan-out {med['fanout_s'] * 1e3:7.1f} ms  fan-out/compute {med['fanout_over_compute']:.4f}",
                          flush=True)
                assert client_a.model_info(include_weights_digest=True).weights_digest == \
                    client_b.model_info(include_weights_digest=True).weights_digest
        finally:
            for server in replicas.values():
                server.stop()
            postgres.stop()
    summary = {"model": args.model, "edits_per_method": args.edits, "date": time.strftime("%Y-%m-%d %H:%M"),
               "methods": results}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
