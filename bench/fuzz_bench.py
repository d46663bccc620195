"""Fuzz every RPC of a live server with hostile requests (long version of tests/e2e/test_fuzz.py).

    flock /tmp/editserve-heavy.lock nice -n 10 .venv/bin/python bench/fuzz_bench.py --requests 10000

Every violation is recorded (not raised), so one run counts outcomes by RPC and status over
all requests; the invariants are those of tests/proofs/fuzz.py. Prints Markdown for
docs/RELIABILITY.md and writes the raw counts as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import torch
    from hypothesis import HealthCheck, Phase, given, settings

    from tests.proofs.fuzz import BackgroundStream, FuzzSession, request_strategy, start_fuzz_server
    from tests.proofs.models import served_model

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--model", default="tiny", help="'tiny' (the tests' random Llama) or a model name")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop early (and report what was done) after this long")
    parser.add_argument("--server-log", type=Path, default=None, help="keep a copy of the server's log here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = start_fuzz_server(served_model(args.model, root), root / "server")
        session = FuzzSession(server)
        stream = BackgroundStream(server.target)
        started = time.monotonic()
        stream.start()

        class OutOfTime(Exception):
            """Raised to end the run at --max-seconds (generation only, so nothing is shrunk)."""

        @settings(max_examples=args.requests, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(request_strategy())
        def fuzz(request) -> None:
            rpc, kind, payload, credential = request
            if session.requests >= args.requests or server.proc.poll() is not None:
                return
            if args.max_seconds and time.monotonic() - started > args.max_seconds:
                raise OutOfTime
            session.run_one(rpc, kind, payload, credential)
            if session.requests % 500 == 0:
                print(f"{session.requests} requests, {len(session.violations)} violations, "
                      f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

        try:
            from hypothesis import seed

            seed(args.seed)(fuzz)()
        except OutOfTime:
            print(f"stopped at --max-seconds after {session.requests} requests", file=sys.stderr)
        finally:
            stream.stop()
            session.close()
            alive = server.proc.poll() is None
            code = server.stop()
            if args.server_log:
                args.server_log.write_text(server.log())
        elapsed = time.monotonic() - started
    print(f"## fuzz: {session.requests} requests in {elapsed:.0f} s on {args.model} ({date.today()}), seed {args.seed}")
    print(session.report())
    print()
    print("payload shapes: " + ", ".join(f"{k} {v}" for k, v in session.kinds.most_common()))
    print(f"edits a mutant applied (each reverted, digest back to baseline): {session.applied}")
    print(f"server alive at the end: {alive}; exit code on SIGTERM: {code}")
    print(f"background GenerateStream: {len(stream.completed)} completed, {len(stream.errors)} errors, "
          f"longest gap without a completion {stream.longest_gap():.1f} s")
    print(f"violations: {len(session.violations)}")
    for violation in session.violations[:50]:
        print("  " + violation[:500])
    if args.out:
        args.out.write_text(json.dumps({
            "requests": session.requests, "seconds": elapsed, "counts": {f"{r} {c}": n for (r, c), n in
                                                                        sorted(session.counts.items())},
            "kinds": dict(session.kinds), "violations": session.violations, "applied": session.applied,
            "stream_completed": len(stream.completed), "stream_errors": stream.errors,
            "stream_longest_gap_s": stream.longest_gap()}, indent=1))
    return 0 if alive and not session.violations and not stream.errors else 1


if __name__ == "__main__":
    sys.exit(main())
