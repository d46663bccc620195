"""MEMIT on CounterFact: quality (ES / PS / NS under preview), cost per stage, peak memory, and
the batched value optimisation against one fact at a time, measured in the same run.

  .venv/bin/python bench/memit_bench.py --model smollm2-135m --facts 30
  ... --facts 30 --value-speed 8            # also: value optimisation of 8 facts, batched vs one by one
  ... --facts 10 --sweep 2-6,3-7,4-8        # layer-range sweep (first-last, inclusive)
  ... --facts 30 --method rome               # ROME on the same facts, sequentially composed
  ... --set batch_facts=16 --set steps=20   # hyperparameter overrides
  timeout 3600 ... --facts 10000 --checkpoint /tmp/ck   # one sitting of a long run; rerun to resume

Statistics and context templates are prepared before the clock starts (they are per model,
cached on disk; the server prepares them at start-up). The unedited row is the same prompts
without an edit. Peak memory is the process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.rome_quality import DEFAULT_DATA, _value  # noqa: E402


def case_items(case) -> list[tuple[str, str, str, str]]:
    """(kind, prompt, answer that should win, answer that should lose) of one case, as ROME's
    CounterFact evaluation compares them (length-normalised target probability): ES and PS
    prefer the new object; NS counts CounterFact neighbourhood prompts that still prefer the
    true object, and locality probes with their own answers (close same-relation neighbours,
    e.g. "The capital of Germany is" -> Berlin) that still prefer that answer to the new one."""
    fact = case.fact
    items = [("es", fact.text, fact.target_new, fact.target_true)]
    items += [("ps", p, fact.target_new, fact.target_true) for p in case.paraphrase_prompts]
    items += [("ns", p, fact.target_true, fact.target_new) for p in case.neighborhood_prompts]
    items += [("ns", probe.prompt, probe.answer, fact.target_new) for probe in case.locality]
    return items


def cases_scores(model, tokenizer, cases) -> list[dict[str, list[bool]]]:
    """ES / PS / NS outcomes of every case (:func:`case_items`), all cases' prompts scored
    together so that batches are full and of similar length."""
    from editserve.editing.scoring import score

    per_case = [case_items(c) for c in cases]
    prompts = [p for items in per_case for _k, p, _good, _bad in items for _ in (0, 1)]
    targets = [t for items in per_case for _k, _p, good, bad in items for t in (good, bad)]
    scores = score(model, tokenizer, prompts, targets, batch_size=64)
    rows, at = [], 0
    for items in per_case:
        out: dict[str, list[bool]] = {"es": [], "ps": [], "ns": []}
        for kind, *_rest in items:
            out[kind].append(scores[at].mean_logprob > scores[at + 1].mean_logprob)
            at += 2
        rows.append(out)
    return rows


def summarize(rows: list[dict[str, list[bool]]]) -> dict[str, float]:
    def share(key):
        flat = [x for r in rows for x in r[key]]
        return round(100.0 * sum(flat) / max(len(flat), 1), 1)

    es, ps, ns = share("es"), share("ps"), share("ns")
    score = 3 / (1 / max(es, 1e-9) + 1 / max(ps, 1e-9) + 1 / max(ns, 1e-9))
    return {"es": es, "ps": ps, "ns": ns, "score": round(score, 1)}


def _layers(text: str) -> tuple[int, ...]:
    first, _, last = text.partition("-")
    return tuple(range(int(first), int(last or first) + 1))


def quality(model, tokenizer, cases, delta=None, reference=None):
    """ES / PS / NS / Score of ``cases`` (under ``delta`` when given), plus drift on the shipped
    probe set against ``reference`` logits (the unedited model's)."""
    from contextlib import nullcontext

    from editserve.editing.artifacts import preview
    from editserve.editing.evaluation.metrics import distribution_drift
    from editserve.editing.evaluation.probes import load_probes, next_token_logits

    with preview(model, delta) if delta is not None else nullcontext():
        result = summarize(cases_scores(model, tokenizer, cases))
        if reference is not None:
            kl, agree = distribution_drift(reference, next_token_logits(model, tokenizer, load_probes()))
            result.update(drift_kl=round(kl, 4), drift_top1=round(100 * agree, 1))
    return result


def load_setup(model_name: str, data: str, start: int, count: int):
    """(model, tokenizer, EditingContext, cases): the model from the user cache and cases
    [start, start + count) of ``data`` that have a true object to compare with."""
    from editserve.editing.context import EditingContext
    from editserve.editing.evaluation.datasets import load_cases
    from editserve.server.models import default_cache_dir, load_model

    model, tokenizer, _ = load_model(model_name, cache_dir=default_cache_dir())
    ctx = EditingContext(model, tokenizer, cache_dir=default_cache_dir() / "stats")
    cases, _skipped = load_cases(Path(data), limit=start + count)
    return model, tokenizer, ctx, [c for c in cases[start:] if c.fact.target_true][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--facts", type=int, default=30)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--method", choices=["memit", "rome", "ft_l", "t_patcher"], default="memit")
    parser.add_argument("--sweep", default="", help="comma-separated layer ranges, e.g. 2-6,3-7")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--value-speed", type=int, default=0, help="facts for the batched-vs-single value timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-quality", action="store_true", help="skip ES/PS/NS (timing only)")
    parser.add_argument("--score-sample", type=int, default=0,
                        help="score a uniform random sample of this many of the edited cases (seed 0), not all")
    parser.add_argument("--skip-unedited", action="store_true",
                        help="do not score the unedited model first (its row is the same for every method)")
    parser.add_argument("--checkpoint", default="",
                        help="MEMIT: keep finished target chunks in this directory; a rerun resumes from them "
                             "(stop a long run with `timeout`, rerun the same command to go on)")
    parser.add_argument("--json", default="", help="append the results as a JSON line to this file")
    parser.add_argument("--spread-only", action="store_true",
                        help="MEMIT: skip the target optimisation and spread synthetic targets (unedited state plus a "
                             "random change of the typical size) to time the spread stage and its memory at scale")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from editserve.editing.evaluation.probes import load_probes, next_token_logits
    from editserve.editing.ft import compute_ft
    from editserve.editing.hparams import (
        FtHyperParams,
        MemitHyperParams,
        RomeHyperParams,
        TPatcherHyperParams,
    )
    from editserve.editing.memit import compute_memit
    from editserve.editing.rome import compute_rome
    from editserve.editing.values import compute_value_deltas

    model, tokenizer, ctx, cases = load_setup(args.model, args.data, args.start, args.facts)
    facts = [c.fact for c in cases]
    scored = cases  # every edited case is scored, unless a sample is asked for
    if args.score_sample and args.score_sample < len(cases):
        import random

        scored = random.Random(0).sample(cases, args.score_sample)
    overrides = {}
    for pair in args.set:
        key, _, raw = pair.partition("=")
        overrides[key] = [_value(x) for x in raw.split(",")] if "," in raw else _value(raw)
    cls = {"memit": MemitHyperParams, "rome": RomeHyperParams, "ft_l": FtHyperParams,
           "t_patcher": TPatcherHyperParams}[args.method]
    base = cls.load(ctx.adapter.model_type, ctx.adapter.num_layers).with_overrides(**overrides)
    print(f"# {datetime.datetime.now().isoformat(timespec='minutes')} {args.model} {args.method} "
          f"facts {args.start}..{args.start + len(facts) - 1} threads {args.threads} overrides {overrides}")
    reference = next_token_logits(model, tokenizer, load_probes())
    if not (args.no_quality or args.skip_unedited):
        print(f"unedited: {quality(model, tokenizer, scored)}", flush=True)
    ranges = [_layers(r) for r in args.sweep.split(",") if r] or [None]
    for layers in ranges:
        hp = base if layers is None else base.with_overrides(**({"layers": layers} if args.method == "memit"
                                                               else {"layer": layers[0]}))
        if args.method not in ("ft_l", "t_patcher"):
            stat_layers = list(getattr(hp.for_depth(ctx.adapter.num_layers), "layers", None) or [hp.layer])
            ctx.second_moments(stat_layers, hp.stats_source, hp.stats_tokens)
            ctx.context_templates(hp.context_count, hp.context_length)
        started = time.perf_counter()
        if args.spread_only:
            from editserve.editing.memit import _keys_and_states, spread

            hp = hp.for_depth(ctx.adapter.num_layers)
            templates = ctx.context_templates(hp.context_count, hp.context_length)
            z_layer = max(hp.layers)
            states = _keys_and_states(ctx, facts, templates, z_layer, z_layer)[1]
            change = torch.randn(states.shape, generator=torch.Generator().manual_seed(0))
            targets = states + change / change.norm(dim=-1, keepdim=True) * states.norm(dim=-1, keepdim=True) * 0.5
            prepared = time.perf_counter() - started
            delta, per_layer = spread(ctx, facts, hp, templates, targets)
            diag = {"layers": sorted(hp.layers), "facts": [], "per_layer": per_layer,
                    "timings": {"unedited_states_s": prepared, "spread_s": time.perf_counter() - started - prepared}}
            args.no_quality = True
        elif args.method == "t_patcher":
            from editserve.editing.tpatcher import compute_tpatcher

            delta, diag = compute_tpatcher(ctx, facts, hp)
            diag = {**diag, "facts": [{**f, "target_prob": math.exp(-f["final_nll"])} for f in diag["facts"]]}
        elif args.method == "ft_l":
            delta, diag = compute_ft(ctx, facts, hp)
            diag = {**diag, "timings": {"total_s": diag["seconds"]}, "facts": []}
        elif args.method == "memit":
            from editserve.editing.value_checkpoint import ValueCheckpoint

            checkpoint = ValueCheckpoint(args.checkpoint, args.model) if args.checkpoint else None
            if checkpoint is not None:
                held = checkpoint.load()
                # every fact of a chunk carries that chunk's time: count each chunk once
                seconds = sum(sec for sec, _n in {(v.info["seconds"], v.info["batch_facts"]) for v in held.values()})
                print(f"checkpoint {args.checkpoint}: {len(held)} facts finished in earlier sittings "
                      f"({seconds:.0f} s of target optimisation, {seconds / max(len(held), 1):.2f} s per fact)",
                      flush=True)
            delta, diag = compute_memit(ctx, facts, hp, checkpoint=checkpoint)
        else:
            delta, diag = compute_rome(ctx, facts, hp)
        seconds = time.perf_counter() - started
        row = {"model": args.model, "method": args.method, "facts": len(facts), "layers": diag["layers"],
               "seconds": round(seconds, 1), "timings": {k: round(v, 1) for k, v in diag["timings"].items()},
               "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
               "hparams_overrides": overrides,
               "target_prob_mean": round(sum(f.get("target_prob", 0) for f in diag["facts"]) / len(facts), 3),
               "steps_mean": round(sum(f.get("steps", 0) for f in diag["facts"]) / len(facts), 1)}
        chunks = {(f.get("seconds"), f.get("batch_facts")) for f in diag["facts"] if "batch_facts" in f}
        resumed = sum(1 for f in diag["facts"] if f.get("resumed"))
        if resumed:  # the edit's own clock saw only part of the target optimisation
            row["resumed_facts"] = resumed
            row["values_all_sittings_s"] = round(sum(sec for sec, _n in chunks), 1)
        if "per_layer" in diag:
            row["missing_norm"] = [round(p["missing_norm"], 2) for p in diag["per_layer"]]
        if not args.no_quality:
            row["quality"] = quality(model, tokenizer, scored, delta, reference)
            row["scored_cases"] = len(scored)
        print(json.dumps(row))
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    if args.value_speed and args.method == "memit":
        hp = base.for_depth(ctx.adapter.num_layers)
        module = ctx.adapter.layer(max(hp.layers))
        templates = ctx.context_templates(hp.context_count, hp.context_length)
        subset = facts[: args.value_speed]
        t0 = time.perf_counter()
        compute_value_deltas(model, tokenizer, module, ctx.adapter.hidden_size, subset, templates, hp,
                             batch_facts=hp.batch_facts)
        batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        for fact in subset:
            compute_value_deltas(model, tokenizer, module, ctx.adapter.hidden_size, [fact], templates, hp)
        single = time.perf_counter() - t0
        print(f"value optimisation, {len(subset)} facts: batched ({hp.batch_facts}/batch) {batched:.1f} s, "
              f"one at a time {single:.1f} s: {single / batched:.2f}x the facts per second")


if __name__ == "__main__":
    main()
