"""Concurrent streams and periodic edits on loopback (long version of tests/e2e/test_load.py).

    flock /tmp/editserve-heavy.lock nice -n 10 .venv/bin/python bench/load_bench.py --streams 64 --duration 600
    flock /tmp/editserve-heavy.lock nice -n 10 .venv/bin/python bench/load_bench.py --model smollm2-135m

Starts a server (loopback only), runs tests/proofs/load.py's run_load, prints Markdown for
docs/RELIABILITY.md. On the tiny model the edit is ROME with tiny options; on a real model it
is FT-L at the family's default layer with few steps (ROME's key statistics for a real model
take minutes to estimate on two cores, which would measure the estimate, not the load).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    from tests.proofs.load import run_load
    from tests.proofs.models import served_model
    from tests.server_process import start_server

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny", help="'tiny' (the tests' random Llama) or e.g. smollm2-135m")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--duration", type=float, default=600.0, help="measured seconds (after a warm-up)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per stream request")
    parser.add_argument("--edit-every", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds of the same load and edits run before the memory baseline is taken")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    edit = None if args.model == "tiny" else {"method": "ft_l", "steps": 5, "learning_rate": 1e-3}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = start_server(served_model(args.model, root), root / "state", root / "logs",
                              "--no-prepare-statistics", "--threads", str(args.threads),
                              "--max-concurrent-requests", str(max(64, args.streams)), timeout=600)
        try:
            result = run_load(server, streams=args.streams, duration_s=args.duration, max_new_tokens=args.tokens,
                              edit_every_s=args.edit_every, edit_options=edit, warmup_s=args.warmup)
        finally:
            code = server.stop()
    summary = result.summary()
    print(f"## load: {args.streams} streams x {args.tokens} tokens, an edit every {args.edit_every:.0f} s, "
          f"{args.duration:.0f} s after {args.warmup:.0f} s of warm-up, model {args.model} ({date.today()})")
    print("| measure | value |")
    print("|---|---|")
    for key, value in summary.items():
        print(f"| {key} | {value} |")
    print(f"server exit code on SIGTERM: {code}")
    for error in result.errors[:20]:
        print("  " + error[:300])
    if args.out:
        args.out.write_text(json.dumps({**summary, "errors_list": result.errors[:100]}, indent=1))
    return 0 if not result.errors and result.rss_growth < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
