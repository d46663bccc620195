"""The Trace RPC of this checkout against the server of an earlier revision, in one run.

    .venv/bin/python bench/trace_rpc_bench.py --baseline 54f1cca [--facts 5]

Issue 17 measured tracing *through the Trace RPC*. This starts two servers side by side on
the same model, with the same threads: the one of ``--baseline`` (a git worktree of that
revision, its own gRPC stubs, imported ahead of this checkout) and this checkout's. Per fact,
in turn: the baseline server's exact trace, this server's exact trace and this server's bf16
trace (``precision=bf16``), each timed by the client; the exact grids must agree with the
baseline's. Only one server works at a time (the other is idle), so the servers do not share
the cores. Facts: the first known_1000 facts the model answers (bench/trace_speed.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def agreement(ours, reference) -> tuple[float, float]:
    """(mean over kinds of Pearson r, max |difference|) of two client TraceResults' grids, on
    the rows from the subject on (as bench/trace_speed.py compares in-process traces)."""
    import numpy as np

    start = reference.subject_start
    rs, worst = [], 0.0
    for kind, grid in reference.grids.items():
        a, b = np.asarray(ours.grids[kind])[start:].ravel(), np.asarray(grid)[start:].ravel()
        rs.append(float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan"))
        worst = max(worst, float(np.abs(a - b).max()))
    return statistics.fmean(rs), worst


def worktree(revision: str, where: Path) -> Path:
    """A checkout of ``revision`` importable as ``editserve`` from ``where/pkg`` (its stubs
    generated from its own protos, as setup.py does)."""
    tree = where / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision], check=True,
                   capture_output=True)
    generate = (ROOT / "setup.py").read_text().split("class BuildWithStubs")[0]
    namespace = {"__file__": str(tree / "setup.py"), "__name__": "stubs"}
    exec(compile(generate, "setup.py", "exec"), namespace)  # noqa: S102 - our own build hook, run on the old tree
    namespace["generate_stubs"]()
    (where / "pkg").mkdir()
    (where / "pkg" / "editserve").symlink_to(tree)
    return where / "pkg"


def start(pythonpath: str | None, state: Path, threads: int, model: str) -> tuple[subprocess.Popen, int]:
    port_file = state.parent / f"{state.name}.ports"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
    env["PYTHONUNBUFFERED"] = "1"
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    log = open(state.parent / f"{state.name}.log", "w")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen([sys.executable, "-m", "editserve.client.cli", "serve", "--model", model,
                             "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--state-dir", str(state),
                             "--threads", str(threads), "--no-prepare-statistics", "--port-file", str(port_file)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=state.parent)
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError((state.parent / f"{state.name}.log").read_text())
        time.sleep(0.1)
    return proc, json.loads(port_file.read_text())["grpc_port"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", required=True, help="git revision of the server to compare with")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from bench.trace_speed import pick_facts, work_units
    from editserve.client import EditserveClient
    from editserve.editing import tracing
    from editserve.editing.adapter import ArchitectureAdapter
    from editserve.server.fresh_thread import in_fresh_thread
    from editserve.server.models import load_model

    def choose() -> list[dict]:
        model, tokenizer, _ = load_model(args.model)
        return pick_facts(model, tokenizer, ArchitectureAdapter.from_model(model), args.facts,
                          tracing.prepare_inputs, tracing.KINDS)

    facts = in_fresh_thread(choose)
    with tempfile.TemporaryDirectory() as scratch:
        where = Path(scratch)
        servers = {}
        try:
            servers["baseline"] = start(str(worktree(args.baseline, where)), where / "baseline", args.threads, args.model)
            servers["this"] = start(None, where / "this", args.threads, args.model)
            clients = {name: EditserveClient(f"127.0.0.1:{port}") for name, (_, port) in servers.items()}
            for client in clients.values():
                while client.health(timeout=5) != "SERVING":
                    time.sleep(0.5)
            time.sleep(5)  # the drift monitors' first refresh
            runs = (("baseline exact", "baseline", "model"), ("this exact", "this", "model"), ("this bf16", "this", "bf16"))
            print(f"{time.strftime('%Y-%m-%d %H:%M')}, {args.model}, {args.threads} threads per server, "
                  f"{len(facts)} facts, 3 kinds, 10 samples, window 10, baseline server {args.baseline}")
            print("| known_id | tokens | work | " + " | ".join(f"{name} s" for name, _, _ in runs)
                  + " | this exact vs baseline: mean r, max abs diff | bf16 vs baseline |")
            print("|---" * (3 + len(runs) + 2) + "|")
            rows = []
            for fact in facts:
                seconds, results = {}, {}
                for name, server, precision in runs:
                    started = time.perf_counter()
                    results[name] = clients[server].trace(fact["prompt"], fact["subject"], answer=fact["attribute"],
                                                          seed=0, precision=precision, timeout=3600)
                    seconds[name] = time.perf_counter() - started
                exact = agreement(results["this exact"], results["baseline exact"])
                bf16 = agreement(results["this bf16"], results["baseline exact"])
                rows.append(seconds)
                print(f"| {fact['known_id']} | {fact['n_tokens']} | {work_units(fact['n_tokens'], fact['subject_start'])} | "
                      + " | ".join(f"{seconds[name]:.1f}" for name, _, _ in runs)
                      + f" | {exact[0]:.4f}, {exact[1]:.1e} | {bf16[0]:.4f}, {bf16[1]:.1e} |", flush=True)
            medians = {name: statistics.median(r[name] for r in rows) for name, _, _ in runs}
            print("\nmedian seconds per fact: " + ", ".join(f"{n} {m:.1f}" for n, m in medians.items()))
            for name in ("this exact", "this bf16"):
                ratios = [r["baseline exact"] / r[name] for r in rows]
                print(f"baseline exact / {name}: ratio of medians {medians['baseline exact'] / medians[name]:.2f}x, "
                      f"median of per-fact ratios {statistics.median(ratios):.2f}x "
                      f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(60)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where / "tree")],
                           capture_output=True)


if __name__ == "__main__":
    main()
