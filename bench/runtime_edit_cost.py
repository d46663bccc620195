"""The cost of being there: Generate throughput over gRPC with 0, 100 and 10,000 active
runtime edits, for traffic no edit is about (the drift probe prompts).

    .venv/bin/python bench/runtime_edit_cost.py --model smollm2-135m --counts 0,100,10000

For each count a fresh server is started on its own state directory holding:
- ``serac``: one SERAC edit of N facts (N memory entries; each Generate is routed: embedded,
  searched in the FAISS index, scored against the scope gate), computed in-process as the Edit
  RPC computes it and journaled before start-up (the RPC's before/after report of 10,000 facts
  alone would take over half an hour here);
- ``neurons``: N T-Patcher neurons in the last layer's FFN, journaled before start-up as one
  ffn_neurons artifact (training 10,000 real patches takes days here). Their biases keep them
  silent, as trained patches are on inputs they were not made for (T-Patcher's memory loss),
  so this times the bank's key product on every token, the part no input can skip.
Throughput is measured with 1 client (sequential requests) and with --clients concurrent
streams, greedy, --new-tokens each, medians of --runs; ratios are against no active edit,
measured in the same run. All servers are started first and measured in interleaved rounds
(one busy at a time, the order rotated each round), so a slow spell of the machine falls on
all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def synthetic_facts(n: int):
    """N distinct facts no probe prompt is about (invented subjects)."""
    from editserve.client import Fact

    return [Fact("The favourite colour of {} is", f"Zorbex Quillane {i}", "teal") for i in range(n)]


def _served_host(model_name: str):
    from editserve.server.host import ModelHost
    from editserve.server.models import default_cache_dir, load_model

    model, tokenizer, _ = load_model(model_name, cache_dir=default_cache_dir())
    return ModelHost(model, tokenizer, name=model_name, dtype="fp32", device="cpu")


def _journal(state_dir: Path, host, method: str, artifact, layers: list[int], description: str) -> None:
    """Journal ``artifact`` as one applied edit, for the server to replay at start-up."""
    from editserve.server.journal import Journal

    journal = Journal(state_dir, host.fingerprint())
    edit_id = journal.new_id()
    name, sha = journal.write_artifact(edit_id, artifact)
    journal.record_apply(edit_id=edit_id, method=method, kind=artifact.kind.value, facts=[], options={},
                         layers=layers, parameters=[], delta_norm=0.0, compute_seconds=0.0,
                         description=description, artifact=name, sha256=sha)


def write_neurons(model_name: str, state_dir: Path, n: int) -> None:
    """Journal one ffn_neurons artifact of ``n`` silent neurons for the server to replay."""
    import torch

    from editserve.editing.artifacts import RuntimeLayer
    from editserve.editing.neurons import LAYER_TYPE

    host = _served_host(model_name)
    layer = host.adapter.num_layers - 1
    module = host.adapter.mlp(layer)
    d = host.adapter.hidden_size
    generator = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=-1)
    artifact = RuntimeLayer(LAYER_TYPE, {"keys": keys, "biases": torch.full((n,), -1e4),
                                         "values": torch.randn(n, d, generator=generator) * 0.01},
                            {"module": module, "layer": layer})
    _journal(state_dir, host, "t_patcher", artifact, [layer], f"bench: {n} silent neurons")


def write_memory(model_name: str, state_dir: Path, n: int) -> float:
    """Journal one SERAC edit of ``n`` facts, computed in-process exactly as the Edit RPC
    computes it (the same encoder and artifact), for the server to replay; returns the
    seconds the computation took. The RPC would also score every fact before and after
    (its report: ~0.2 s a fact here, over half an hour for 10,000), which is not what is
    timed here."""
    from editserve.editing.context import EditingContext
    from editserve.editing.facts import Fact
    from editserve.editing.hparams import SeracHyperParams
    from editserve.editing.serac import compute_serac

    host = _served_host(model_name)
    ctx = EditingContext(host.model, host.tokenizer)
    hparams = SeracHyperParams.load(host.adapter.model_type, host.adapter.num_layers)
    started = time.perf_counter()
    facts = [Fact(f.prompt, f.subject, f.target_new) for f in synthetic_facts(n)]
    artifact, _ = compute_serac(ctx, facts, hparams)
    seconds = time.perf_counter() - started
    _journal(state_dir, host, "serac", artifact, [], f"bench: {n} memory entries")
    return seconds


def throughput(client_of, prompts: list[str], clients: int, new_tokens: int) -> float:
    """Generated tokens per second with ``clients`` concurrent streams over ``prompts``."""
    tokens = [0] * clients
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with client_of() as client:
                for prompt in prompts[k::clients]:
                    reply = client.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
                    tokens[k] += reply.generated_tokens
                    if reply.route is not None:
                        raise AssertionError(f"an out-of-scope prompt was routed: {prompt!r} -> {reply.route}")
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(tokens) / (time.perf_counter() - started)


def _prepare(model: str, kind: str, n: int, state: Path) -> None:
    """Journal ``kind``'s runtime layer of ``n`` entries into ``state`` (nothing for n = 0)."""
    if kind == "neurons" and n:
        write_neurons(model, state, n)
    if kind == "serac" and n:
        print(f"  serac: {n} entries computed in {write_memory(model, state, n):.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--counts", default="0,100,10000")
    parser.add_argument("--kinds", default="serac,neurons")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from editserve.editing.evaluation.probes import load_probes
    from tests.server_process import start_server

    prompts = load_probes()[: args.prompts]
    counts = [int(c) for c in args.counts.split(",")]
    # One baseline (nothing active) shared by every kind; then each kind at each non-zero count.
    configs = [("none", 0)] + [(kind, n) for kind in args.kinds.split(",") for n in counts if n]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {args.model}, {args.threads} threads, {len(prompts)} out-of-scope "
          f"prompts x {args.new_tokens} tokens, medians of {args.runs} interleaved rounds")
    singles: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    manys: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        try:
            for kind, n in configs:
                state = Path(tmp) / f"{kind}-{n}"
                _prepare(args.model, kind, n, state)
                servers[(kind, n)] = start_server(
                    args.model, state, Path(tmp) / "logs", "--threads", str(args.threads),
                    "--max-batch-size", str(args.clients), "--no-prepare-statistics",
                    "--max-edit-facts", str(max(counts + [1])), timeout=600)
                if kind == "serac":
                    with servers[(kind, n)].client() as client:
                        (active,) = client.list_edits()
                        assert active.method == "serac", active
                throughput(servers[(kind, n)].client, prompts[:2], 1, 4)  # warm-up
            # All servers stay up and idle but one: each round measures every server once, in an
            # order rotated by one per round, so a slow spell of the machine (they differ from
            # minute to minute) falls on all of them rather than on whichever ran then.
            for round_ in range(args.runs):
                order = configs[round_ % len(configs):] + configs[:round_ % len(configs)]
                for config in order:
                    singles[config].append(throughput(servers[config].client, prompts, 1, args.new_tokens))
                    manys[config].append(throughput(servers[config].client, prompts, args.clients,
                                                    args.new_tokens))
                print(f"  round {round_ + 1}/{args.runs} done", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    base_single = statistics.median(singles[configs[0]])
    base_many = statistics.median(manys[configs[0]])
    for config in configs:
        single, many = statistics.median(singles[config]), statistics.median(manys[config])
        kind, n = config
        print(f"{kind:8s} {n:6d} active: 1 client {single:6.1f} tok/s ({single / base_single:.3f}x), "
              f"{args.clients} clients {many:6.1f} tok/s ({many / base_many:.3f}x); "
              f"{args.clients}-client runs {', '.join(f'{x:.1f}' for x in manys[config])}", flush=True)


if __name__ == "__main__":
    main()
