"""Average indirect effects over known facts, bucketed by token role (ROME, Figure 2).

    flock /tmp/editserve-heavy.lock .venv/bin/python bench/trace_report.py --model smollm2-135m
    flock /tmp/editserve-heavy.lock .venv/bin/python bench/trace_report.py --model gemma3-270m

Walks ../shared/data/causal_tracing/known_1000.json in order, keeps the facts the model
answers correctly (the first token of the attribute is its greedy next token), traces each
with the attribute as the answer, and averages the indirect effect (restored minus corrupted
probability) per token role x layer. Writes docs/img/trace_avg_<model>.png and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "causal_tracing" / "known_1000.json"
BUCKETS = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


def bucket_rows(n_tokens: int, start: int, end: int) -> dict[str, list[int]]:
    """Token indices of each role (as in ROME's figure: a one-token subject is both its first
    and last token; tokens before the subject, e.g. BOS, belong to no role)."""
    last = n_tokens - 1
    return {
        "first subject token": [start],
        "middle subject tokens": list(range(start + 1, end - 1)),
        "last subject token": [end - 1],
        "first subsequent token": [end] if end < last else [],
        "further tokens": list(range(end + 1, last)),
        "last token": [last],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=50, help="correctly answered facts to trace")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--window", type=int, default=0, help="0: a fifth of the layers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = parser.parse_args()

    import numpy as np
    import torch
    from tqdm import tqdm

    from editserve.client.trace_plot import plot_trace
    from editserve.editing.adapter import ArchitectureAdapter
    from editserve.editing.errors import InvalidRequest
    from editserve.editing.tracing import KINDS, causal_trace, embedding_noise_scale, prepare_inputs
    from editserve.server.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(args.model)
    adapter = ArchitectureAdapter.from_model(model)
    n_layers = adapter.num_layers
    window = args.window or max(1, round(n_layers / 5))
    noise = embedding_noise_scale(model, adapter)
    records = json.loads(DATA.read_text())

    sums = {k: np.zeros((len(BUCKETS), n_layers)) for k in KINDS}
    counts = np.zeros(len(BUCKETS))
    clean, corrupted, traced, checked = [], [], [], 0
    started = time.perf_counter()
    bar = tqdm(total=args.facts, desc=f"tracing {args.model}", file=sys.stderr)
    for record in records:
        if len(traced) == args.facts:
            break
        checked += 1
        prompt, subject, attribute = record["prompt"], record["subject"], record["attribute"]
        try:
            inputs = prepare_inputs(
                tokenizer,
                adapter,
                prompt,
                subject,
                answer=attribute,
                samples=args.samples,
                window=window,
                kinds=KINDS,
                noise_scale=noise,
                max_prompt_tokens=64,
            )
        except InvalidRequest:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([inputs.token_ids]), logits_to_keep=1).logits[0, -1]
        if int(logits.argmax()) != inputs.answer_token_ids[0]:
            continue
        result = causal_trace(
            model,
            tokenizer,
            adapter,
            prompt,
            subject,
            answer=attribute,
            samples=args.samples,
            window=window,
            noise_scale=noise,
            seed=len(traced),
        )
        rows = bucket_rows(len(result.tokens), *result.subject_range)
        for b, name in enumerate(BUCKETS):
            if not rows[name]:
                continue
            counts[b] += 1
            for kind in KINDS:
                sums[kind][b] += result.indirect_effects(kind)[rows[name]].mean(axis=0)
        clean.append(result.clean_prob)
        corrupted.append(result.corrupted_prob)
        traced.append(record["known_id"])
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - started

    average = {k: sums[k] / np.maximum(counts, 1)[:, None] for k in KINDS}
    summary = {
        "model": args.model,
        "layers": n_layers,
        "facts_checked": checked,
        "facts_traced": len(traced),
        "known_ids": traced,
        "samples": args.samples,
        "window": window,
        "noise_scale": noise,
        "mean_clean_prob": float(np.mean(clean)),
        "mean_corrupted_prob": float(np.mean(corrupted)),
        "bucket_counts": dict(zip(BUCKETS, counts.astype(int).tolist(), strict=True)),
        "seconds": seconds,
        "average_indirect_effect": {k: average[k].round(5).tolist() for k in KINDS},
        "peaks": {},
    }
    for kind in KINDS:
        b, layer = np.unravel_index(average[kind].argmax(), average[kind].shape)
        summary["peaks"][kind] = {
            "bucket": BUCKETS[b],
            "layer": int(layer),
            "aie": float(average[kind][b, layer]),
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"trace_avg_{args.model}.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_trace(
        {
            "tokens": list(BUCKETS),
            "subject_range": (0, 3),
            "grids": average,
            "kinds": list(KINDS),
            "answer": "the true attribute",
            "clean_prob": summary["mean_clean_prob"],
            "corrupted_prob": 0.0,
            "window": window,
        },
        out / f"trace_avg_{args.model}.png",
        title=(
            f"{args.model}: average indirect effect over {len(traced)} known facts "
            f"(mean p clean {summary['mean_clean_prob']:.3f}, corrupted {summary['mean_corrupted_prob']:.3f}, "
            f"{args.samples} noise samples)"
        ),
        colorbar_label="average indirect effect",
    )
    print(f"{args.model}: {len(traced)} of {checked} facts answered correctly and traced in {seconds:.0f} s")
    print(
        f"mean p(answer): clean {summary['mean_clean_prob']:.3f}, corrupted {summary['mean_corrupted_prob']:.3f}"
    )
    for kind, peak in summary["peaks"].items():
        print(f"  {kind:6s} peak AIE {peak['aie']:.4f} at {peak['bucket']}, layer {peak['layer']}")
    for kind in KINDS:
        print(f"  {kind:6s} AIE by role (max over layers @ layer):")
        for b, name in enumerate(BUCKETS):
            layer = int(average[kind][b].argmax())
            print(f"      {name:24s} {average[kind][b, layer]:.4f} @ {layer}")


if __name__ == "__main__":
    main()
