"""SIGKILL at random points of edits and reverts, many times (long version of tests/e2e/test_crash.py).

    flock /tmp/editserve-heavy.lock nice -n 10 .venv/bin/python bench/crash_bench.py --kills 200

Rounds of tests/proofs/crash.py on one journal: churn (ROME and T-Patcher edits, reverts) on a
tiny random Llama, SIGKILL at a random moment, restart, check against an event-by-event replay
and the live digest. Prints Markdown for docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import torch

    from tests.proofs.crash import CrashCampaign
    from tests.proofs.models import served_model

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--max-kill-after", type=float, default=2.0, help="seconds; kills land in [0.05, this]")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no new kill point after this long (and report what was done)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        campaign = CrashCampaign(Path(served_model("tiny", root)), root / "campaign", seed=args.seed)
        results = []

        def stop(_signum, _frame) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)  # a SIGTERM still prints the rounds done so far
        try:
            for i in range(args.kills):
                if args.max_seconds and time.monotonic() - started > args.max_seconds:
                    print(f"stopped at --max-seconds after {len(results)} kill points", file=sys.stderr)
                    break
                results.append(campaign.run_round(args.max_kill_after))
                if results[-1].violations:
                    print(f"round {i}: {results[-1].violations}", file=sys.stderr, flush=True)
                if (i + 1) % 10 == 0:
                    print(f"{i + 1} kills, revision {campaign.revision}, {time.monotonic() - started:.0f} s",
                          file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            print(f"stopped after {len(results)} of {args.kills} kill points", file=sys.stderr)
        finally:
            campaign.close()
    elapsed = time.monotonic() - started
    violations = [v for r in results for v in r.violations]
    acked = sum(r.acknowledged for r in results)
    print(f"## crash: {len(results)} SIGKILLs in {elapsed:.0f} s on the tiny Llama ({date.today()}), seed {args.seed}")
    print("| measure | value |")
    print("|---|---|")
    print(f"| kill points (SIGKILL, then restart on the same journal) | {len(results)} |")
    print(f"| operations acknowledged before the kills (edits + reverts) | {acked} |")
    print(f"| final revision (journal events) | {campaign.revision} |")
    print(f"| kills that cut an operation which had already committed (un-acknowledged, found applied) | "
          f"{sum(r.in_flight_committed for r in results)} |")
    print(f"| restarts whose digest was also compared with the live digest served at that revision | "
          f"{sum(r.compared_with_live for r in results)} |")
    print(f"| restarted digest != event-by-event replay of the committed journal | "
          f"{sum(any('replay' in v for v in r.violations) for r in results)} |")
    print(f"| restarted digest != live digest before the kill | "
          f"{sum(any('live digest' in v for v in r.violations) for r in results)} |")
    print(f"| committed operations lost | {sum(any('lost' in v or 'is missing' in v for v in r.violations) for r in results)} |")
    print(f"| rounds with any violation (half-applied, phantom, lost, not serving) | "
          f"{sum(bool(r.violations) for r in results)} |")
    print(f"| restart to SERVING, median / max | {statistics.median(r.restart_s for r in results):.1f} s / "
          f"{max(r.restart_s for r in results):.1f} s |")
    for violation in violations[:50]:
        print("  " + violation[:500])
    if args.out:
        args.out.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0 if not violations else 1


if __name__ == "__main__":
    sys.exit(main())
