"""ROME edit quality and speed on CounterFact (ES / PS / NS), with the unedited model beside it.

For each of the first N cases of the rich CounterFact file: compute the ROME edit (against the
served-weights model, never writing them), measure under ``artifacts.preview``:
  ES  share of cases with P(new) > P(true) on the rewrite prompt,
  PS  share of paraphrase prompts with P(new) > P(true),
  NS  share of neighbourhood prompts with P(true) > P(new),
where P is the length-normalised target probability (exp of the mean token log-prob), as in
ROME's CounterFact evaluation and editserve.editing.evaluation.measure. The unedited row is the
same prompts without an edit. Times are the edit computation (keys, value optimisation,
update) with statistics and context templates cached (they are built before the first case).

  flock /tmp/editserve-heavy.lock .venv/bin/python bench/rome_quality.py --model smollm2-135m --cases 30
  ... --sweep 3,5,7,9,12,15 --cases 30          # layer sweep
  ... --set steps=15 --set kl_factor=0.1        # hyperparameter overrides
  ... --variant fast:lr=1.0,early_stop_loss=0.1  # compare option sets against the shipped row

Variants run interleaved with the shipped row, case by case in one process, so their times are
measured under the same machine load; report their ratio to the shipped row, never an absolute
time taken elsewhere.
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


def run_rows(ctx, cases, rows_hparams: dict, progress: bool = True) -> dict[str, dict]:
    """ES/PS/NS, times and steps of every named hyperparameter set, interleaved case by case.

    Each case is edited with every set before the next case (the order alternating from case
    to case), so all sets run under the same machine load and their time ratios mean something
    even on a shared machine."""
    from editserve.editing.artifacts import preview
    from editserve.editing.rome import compute_rome

    names = list(rows_hparams)
    scores: dict[str, list] = {n: [] for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    steps: dict[str, list[int]] = {n: [] for n in names}
    for i, fact in enumerate(cases):
        for name in names if i % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            delta, diag = compute_rome(ctx, [fact], rows_hparams[name])
            times[name].append(time.perf_counter() - started)
            steps[name].append(diag["steps"][0])
            with preview(ctx.model, delta):
                scores[name].append(case_scores(ctx.model, ctx.tokenizer, fact))
        if progress:
            for name in names:
                s = summarize(scores[name])
                print(f"  [{i + 1}/{len(cases)}] {name}: {times[name][-1]:.2f}s steps={steps[name][-1]} "
                      f"ES {s['ES']:.0f} PS {s['PS']:.0f} NS {s['NS']:.0f}", file=sys.stderr, flush=True)
    results = {}
    first = names[0]
    for name in names:
        s = summarize(scores[name])
        ordered = sorted(times[name])
        s.update({
            "median_s": statistics.median(times[name]),
            "p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "mean_steps": statistics.mean(steps[name]),
            "speedup": statistics.median(times[first]) / statistics.median(times[name]),
            "steps_per_case": steps[name],
        })
        results[name] = s
    return results


def parse_variant(text: str) -> tuple[str, dict]:
    """"name:key=value,key=value" -> (name, overrides)."""
    name, _, spec = text.partition(":")
    overrides = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
    return name, {k: _value(v) for k, v in overrides.items()}


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
    parser.add_argument("--variant", action="append", default=[],
                        help="name:key=value,... an option set run beside the shipped one (interleaved)")
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
    rows_hparams = {}
    for layer in layers:
        hp = hparams.with_overrides(layer=layer) if args.sweep else hparams
        rows_hparams[f"layer {layer}"] = hp
        for name, overrides in map(parse_variant, args.variant):
            rows_hparams[f"layer {layer} {name}"] = hp.with_overrides(**overrides)
    for name, hp in rows_hparams.items():
        started = time.perf_counter()
        ctx.second_moment(hp.layer, hp.stats_source, hp.stats_tokens)
        ctx.context_templates(hp.context_count, hp.context_length)
        print(f"{name}: statistics + contexts ready in {time.perf_counter() - started:.1f}s", file=sys.stderr,
              flush=True)
    results["variants"] = {name: hp.as_dict() for name, hp in rows_hparams.items()}
    results["rows"].update(run_rows(ctx, cases, rows_hparams, progress=not args.quiet))

    print(f"\n{args.model} ({args.dtype}), CounterFact cases {args.start}..{args.start + len(cases) - 1}, "
          f"{results['date']}")
    print("| row | ES | PS | NS | median s | p90 s | mean steps | speed-up vs first row |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results["rows"].items():
        extra = (f"{r['median_s']:.2f} | {r['p90_s']:.2f} | {r['mean_steps']:.1f} | {r['speedup']:.2f}x"
                 if "median_s" in r else "- | - | - | -")
        print(f"| {name} | {r['ES']:.1f} | {r['PS']:.1f} | {r['NS']:.1f} | {extra} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
