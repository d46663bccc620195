"""ROME edit quality and speed on CounterFact (ES / PS / NS), with the unedited model beside it.

For each of the first N cases of the rich CounterFact file: compute the ROME edit (against the
served-weights model, never writing them), measure under ``artifacts.preview``:
  ES  share of cases with P(new) > P(true) on the rewrite prompt,
  PS  share of paraphrase prompts with P(new) > P(true),
  NS  share of neighbourhood prompts with P(true) > P(new),
where P is the length-normalised target probability (exp of the mean token log-prob), as in
ROME's CounterFact evaluation and editserve.editing.evaluation.runner. The unedited row is the
same prompts without an edit. Times are the edit computation (keys, value optimisation,
update) with statistics and context templates cached (they are built before the first case).

  flock /tmp/editserve-heavy.lock .venv/bin/python bench/rome_quality.py --model smollm2-135m --cases 30
  ... --sweep 3,5,7,9,12,15 --cases 30          # layer sweep
  ... --set steps=15 --set kl_factor=0.1        # hyperparameter overrides
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_rich_union.json"


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def load_cases(path: Path, start: int, count: int):
    from editserve.editing.facts import Fact

    records = json.loads(Path(path).read_text())[start : start + count]
    cases = []
    for r in records:
        rw = r["requested_rewrite"]
        cases.append(Fact(rw["prompt"], rw["subject"], rw["target_new"]["str"], rw["target_true"]["str"],
                          tuple(r.get("paraphrase_prompts", ())), tuple(r.get("neighborhood_prompts", ()))))
    return cases


def case_scores(model, tokenizer, fact):
    """(es, ps list, ns list) for one case on the model as it is now (preview included)."""
    from editserve.editing.scoring import score

    groups = [("rewrite", [fact.text])] + [("para", list(fact.paraphrase_prompts)),
                                           ("neigh", list(fact.neighborhood_prompts))]
    prompts, targets, keys = [], [], []
    for group, ps in groups:
        for p in ps:
            for which, target in (("new", fact.target_new), ("true", fact.target_true)):
                prompts.append(p)
                targets.append(target)
                keys.append((group, which))
    scores = score(model, tokenizer, prompts, targets, batch_size=32)
    out = {"rewrite": [], "para": [], "neigh": []}
    for i in range(0, len(scores), 2):
        new, true = scores[i].mean_logprob, scores[i + 1].mean_logprob
        group = keys[i][0]
        out[group].append(new > true if group != "neigh" else true > new)
    return out


def summarize(rows):
    def share(key):
        flat = [x for r in rows for x in r[key]]
        return 100.0 * sum(flat) / max(len(flat), 1)

    return {"ES": share("rewrite"), "PS": share("para"), "NS": share("neigh")}


def run_layer(ctx, cases, hparams, progress=True):
    from editserve.editing.artifacts import preview
    from editserve.editing.rome import compute_rome

    rows, times, steps = [], [], []
    for i, fact in enumerate(cases):
        started = time.perf_counter()
        delta, diag = compute_rome(ctx, [fact], hparams)
        times.append(time.perf_counter() - started)
        steps.append(diag["steps"][0])
        with preview(ctx.model, delta):
            rows.append(case_scores(ctx.model, ctx.tokenizer, fact))
        if progress:
            s = summarize(rows)
            print(f"  [{i + 1}/{len(cases)}] {times[-1]:.2f}s steps={steps[-1]} ES {s['ES']:.0f} PS {s['PS']:.0f} "
                  f"NS {s['NS']:.0f}", file=sys.stderr, flush=True)
    s = summarize(rows)
    times_sorted = sorted(times)
    s.update({
        "median_s": statistics.median(times),
        "p90_s": times_sorted[min(len(times) - 1, int(0.9 * len(times)))],
        "mean_steps": statistics.mean(steps),
    })
    return s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sweep", default="", help="comma-separated layers to compare")
    parser.add_argument("--set", action="append", default=[], help="hyperparameter override key=value")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from editserve.editing.adapter import ArchitectureAdapter
    from editserve.editing.context import EditingContext
    from editserve.editing.hparams import load_rome_hparams
    from editserve.server.models import default_cache_dir, load_model

    model, tokenizer, _ = load_model(args.model, dtype=args.dtype)
    adapter = ArchitectureAdapter.from_model(model)
    ctx = EditingContext(model, tokenizer, adapter, default_cache_dir() / "stats")
    overrides = dict(kv.split("=", 1) for kv in args.set)
    hparams = load_rome_hparams(adapter.model_type, adapter.num_layers).with_overrides(
        **{k: _value(v) for k, v in overrides.items()})
    cases = load_cases(args.data, args.start, args.cases)
    layers = [int(x) for x in args.sweep.split(",")] if args.sweep else [hparams.layer]

    results = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "model": args.model,
               "dtype": args.dtype, "cases": len(cases), "start": args.start, "hparams": hparams.as_dict(),
               "command": " ".join(sys.argv), "rows": {}}
    unedited = [case_scores(model, tokenizer, fact) for fact in cases]
    results["rows"]["unedited"] = summarize(unedited)
    for layer in layers:
        hp = hparams.with_overrides(layer=layer)
        started = time.perf_counter()
        ctx.second_moment(layer, hp.stats_source, hp.stats_tokens)
        ctx.context_templates(hp.context_count, hp.context_length)
        prep = time.perf_counter() - started
        print(f"layer {layer}: statistics + contexts ready in {prep:.1f}s", file=sys.stderr, flush=True)
        results["rows"][f"layer {layer}"] = run_layer(ctx, cases, hp, progress=not args.quiet)

    print(f"\n{args.model} ({args.dtype}), CounterFact cases {args.start}..{args.start + len(cases) - 1}, "
          f"{results['date']}")
    print("| row | ES | PS | NS | median s | p90 s | mean steps |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["rows"].items():
        extra = (f"{r['median_s']:.2f} | {r['p90_s']:.2f} | {r['mean_steps']:.1f}" if "median_s" in r
                 else "- | - | -")
        print(f"| {name} | {r['ES']:.1f} | {r['PS']:.1f} | {r['NS']:.1f} | {extra} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
