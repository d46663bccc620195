"""SERAC routing latency against the number of active memory entries (100 .. 100,000).

Entries are synthetic but shaped like real ones: keys "<relation template> <subject>" built
from CounterFact-like templates and generated names, encoded with the real MiniLM encoder (up
to ``--encode-max`` of them; encoding 200,000 sentences would take longer than the benchmark).
Beyond that, entries are copies of real embeddings with noise (renormalised) under distinct
subjects: the exact index's cost does not depend on the values, and the copies crowd the
neighbourhoods of real keys, which is the hard case for an approximate index's recall. Each timing routes a batch of queries the way a
Generate call does (subject scan, encode the input, search, gate, relation score): median per
query over ``--repeats`` batches; the same sentences about a subject no entry has are routed
too (out of scope: the subject scan alone). Recall of the exact index is 1 by construction; an approximate index
(HNSW) is measured beside it for its speed and its recall against exact.

    python bench/serac_retrieval.py [--sizes 100,10000,100000] [--queries 64]
"""

from __future__ import annotations

import argparse
import datetime
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEMPLATES = ["The mother tongue of {} is", "{} is a citizen of", "The headquarters of {} is in", "{} plays the",
             "{} was born in", "The capital of {} is", "{} works in the field of", "{} is produced by"]
SYLLABLES = ["ka", "lo", "mi", "ra", "tes", "vin", "dor", "ul", "ber", "sa", "no", "gre", "pha", "zu", "el", "ti"]


def names(count: int, rng: random.Random) -> list[str]:
    seen: set[str] = set()
    while len(seen) < count:
        first = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        last = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()
        seen.add(f"{first} {last}")
    return sorted(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,10000,100000")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--encode-max", type=int, default=10000)
    args = parser.parse_args()
    import faiss
    import torch

    from editserve.editing.memory import EditMemory, Encoder, MemoryEntry, _encode_keys

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = random.Random(0)
    subjects = names(max(sizes), rng)
    keys = [rng.choice(TEMPLATES).format(s) for s in subjects]
    encoder = Encoder()
    started = time.perf_counter()
    real = min(args.encode_max, len(keys))
    embeddings, relations = _encode_keys(encoder, keys[:real], subjects[:real])
    if real < len(keys):
        noise = np.random.default_rng(0)
        source = noise.integers(0, real, len(keys) - real)

        def jitter(block: np.ndarray) -> np.ndarray:
            out = block[source] + noise.normal(0, 0.05, (len(source), block.shape[1])).astype(np.float32)
            return out / np.linalg.norm(out, axis=1, keepdims=True)

        embeddings = np.concatenate([embeddings, jitter(embeddings)]).astype(np.float32)
        relations = np.concatenate([relations, jitter(relations)]).astype(np.float32)
    print(f"# {datetime.datetime.now().isoformat(timespec='minutes')} serac_retrieval sizes {sizes} "
          f"queries {args.queries} threads {args.threads}; encoded {real} keys x2 in "
          f"{time.perf_counter() - started:.0f} s")
    print("| entries | build index (ms) | route, exact (ms/query) | encoding alone (ms/query) | in scope found |"
          " route, out of scope (ms/query) | HNSW search (ms/query) | HNSW recall@1 vs exact |")
    print("|---|---|---|---|---|---|---|---|")
    for size in sizes:
        entries = [MemoryEntry(str(i), keys[i], subjects[i], "x", 0.4) for i in range(size)]
        t0 = time.perf_counter()
        memory = EditMemory(entries, embeddings[:size], relations[:size])
        build_ms = 1000 * (time.perf_counter() - t0)
        picks = [rng.randrange(min(size, real)) for _ in range(args.queries)]
        queries = [f"Tell me: {keys[i]}" for i in picks]  # in scope of entry i, not its exact key
        # out of scope: the same sentences about a subject no entry has
        outside = [q.replace(subjects[i], "Quentin Outsider") for q, i in zip(queries, picks, strict=True)]
        route_ms, encode_ms, outside_ms, found = [], [], [], 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            encoder.encode(queries)
            t1 = time.perf_counter()
            matches = memory.route(queries, encoder.encode)
            t2 = time.perf_counter()
            missed = memory.route(outside, encoder.encode)
            t3 = time.perf_counter()
            encode_ms.append(1000 * (t1 - t0) / len(queries))
            route_ms.append(1000 * (t2 - t1) / len(queries))
            outside_ms.append(1000 * (t3 - t2) / len(queries))
            found = sum(1 for m, i in zip(matches, picks, strict=True) if m is not None and m.entry.edit_id == str(i))
            if any(m is not None for m in missed):
                raise SystemExit("an input about no entry's subject was routed")
        hnsw = faiss.IndexHNSWFlat(embeddings.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = 64
        hnsw.add(embeddings[:size])
        q = encoder.encode(queries)
        t0 = time.perf_counter()
        _d, approx = hnsw.search(q, 1)
        hnsw_ms = 1000 * (time.perf_counter() - t0) / len(queries)
        _d, exact = memory.index.search(q, 1)
        recall = float(np.mean(approx[:, 0] == exact[:, 0]))
        print(f"| {size:,} | {build_ms:.1f} | {statistics.median(route_ms):.2f} | {statistics.median(encode_ms):.2f} | "
              f"{found}/{len(queries)} | {statistics.median(outside_ms):.4f} | {hnsw_ms:.3f} | {100 * recall:.1f} % |")


if __name__ == "__main__":
    main()
