"""Start-up replay of a journal with many edits: how long until SERVING?

    flock /tmp/editserve-heavy.lock .venv/bin/python bench/journal_replay_bench.py --edits 1000

Writes N rank-one artifacts (the shape ROME produces, spread over 6 layers of the real
model) through the real journal, then times what start-up does: open the journal, verify
and load every artifact, and compose all of them into the weights once. The baseline in the
same run is applying the same edits one by one (what a naive replay would do).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from editserve.editing.artifacts import WeightDelta
    from editserve.server.edits import EditManager
    from editserve.server.host import ModelHost
    from editserve.server.journal import Journal
    from editserve.server.metrics import Metrics
    from editserve.server.models import load_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer, _ = load_model(args.model)
    host = ModelHost(model, tokenizer, name=args.model, dtype="fp32", device="cpu")
    layers = [2, 4, 6, 8, 10, 12]
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(Path(tmp), host.fingerprint())
        started = time.perf_counter()
        deltas = []
        for i in range(args.edits):
            name = host.adapter.mlp_out_weight_name(layers[i % len(layers)])
            p = model.get_parameter(name)
            delta = WeightDelta(factors={name: (torch.randn(p.shape[0], 1, generator=g) * 1e-3,
                                                torch.randn(p.shape[1], 1, generator=g) * 1e-3)})
            deltas.append(delta)
            artifact, sha = journal.write_artifact(f"e{i}", delta)
            journal.record_apply(edit_id=f"e{i}", method="rome", kind="weight_delta", facts=[], options={},
                                 layers=[layers[i % 6]],
                                 parameters=delta.parameter_names, delta_norm=delta.norm(), compute_seconds=0.0,
                                 description="", artifact=artifact, sha256=sha)
        write_seconds = time.perf_counter() - started
        journal.close()

        started = time.perf_counter()
        journal = Journal(Path(tmp), host.fingerprint())
        manager = EditManager(host, journal, {}, lambda p, t: [0.0] * len(p), Metrics())
        replayed = manager.replay()
        replay_seconds = time.perf_counter() - started
        digest = host.weights_digest()

        fresh_model, _, _ = load_model(args.model)
        fresh = ModelHost(fresh_model, tokenizer, name=args.model, dtype="fp32", device="cpu")
        started = time.perf_counter()
        for i, delta in enumerate(deltas):
            fresh.apply(f"e{i}", delta, i + 1)
        one_by_one = time.perf_counter() - started

    print(f"model {args.model}, {args.edits} rank-one edits over {len(layers)} layers, {args.threads} threads")
    print("| measure | value |")
    print("|---|---|")
    print(f"| journal write (fsync'd artifacts + WAL commits) | {write_seconds:.2f} s ({write_seconds / args.edits * 1000:.1f} ms/edit) |")
    print(f"| start-up replay: open, verify sha256, load, compose once | {replay_seconds:.2f} s for {replayed} edits |")
    print(f"| baseline: apply the same edits one by one | {one_by_one:.2f} s |")
    print(f"| speed-up of the batched replay | {one_by_one / replay_seconds:.1f}x |")
    print(f"| weights digest after replay | {digest[:16]} |")


if __name__ == "__main__":
    main()
