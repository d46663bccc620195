"""Teacher-forced scoring of CounterFact cases: score_continuations (each distinct prompt runs
once; continuations run after its cached keys/values) against every (prompt, target) pair run
as its own padded sequence (the straightforward way, written out below), in the same run.

  .venv/bin/python bench/score_bench.py --model smollm2-135m --cases 100 --repeats 3

The pairs are what an evaluation scores per case: rewrite, paraphrase and neighbourhood
prompts, each with the new and the true object. Prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.rome_quality import DEFAULT_DATA  # noqa: E402


@torch.no_grad()
def straightforward(model, tokenizer, prompts, targets, batch_size=64):
    """Every pair as its own right-padded sequence, batches in length order: the baseline."""
    from editserve.editing.evaluation.teacher_forcing import continuation_ids

    body, head = model.get_decoder(), model.get_output_embeddings()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs = [continuation_ids(tokenizer, p, t) for p, t in zip(prompts, targets, strict=True)]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out = [0.0] * len(pairs)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        seqs = [pairs[i][0] + pairs[i][1] for i in batch]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        for row, i in enumerate(batch):
            p, c = pairs[i]
            logp = head(hidden[row, len(p) - 1:len(p) - 1 + len(c)]).float().log_softmax(-1)
            out[i] = float(logp.gather(1, torch.tensor(c)[:, None]).sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from editserve.editing.evaluation.datasets import load_cases
    from editserve.editing.evaluation.teacher_forcing import score_continuations
    from editserve.server.models import default_cache_dir, load_model

    model, tokenizer, _ = load_model(args.model, cache_dir=default_cache_dir())
    cases = [c for c in load_cases(Path(args.data), limit=args.cases)[0] if c.fact.target_true]
    prompts, targets = [], []
    for case in cases:
        for prompt in [case.fact.text, *case.paraphrase_prompts, *case.neighborhood_prompts]:
            prompts += [prompt, prompt]
            targets += [case.fact.target_new, case.fact.target_true]
    times: dict[str, list[float]] = {"shared prompts": [], "straightforward": []}
    results = {}
    for _ in range(args.repeats):
        for name in times:  # alternate, so both see the same machine state
            started = time.perf_counter()
            if name == "shared prompts":
                with torch.no_grad():
                    results[name] = [s.logprob for s in score_continuations(model, tokenizer, prompts, targets,
                                                                             batch_size=64)]
            else:
                results[name] = straightforward(model, tokenizer, prompts, targets)
            times[name].append(time.perf_counter() - started)
    worst = max(abs(a - b) for a, b in zip(results["shared prompts"], results["straightforward"], strict=True))
    fast, slow = statistics.median(times["shared prompts"]), statistics.median(times["straightforward"])
    print(f"{args.model}: {len(cases)} cases, {len(prompts)} pairs, {len(set(prompts))} distinct prompts, "
          f"{args.threads} threads, {args.repeats} repeats")
    print(f"shared prompts {fast:.2f} s, straightforward {slow:.2f} s (medians): {slow / fast:.2f}x; "
          f"largest log-prob difference {worst:.2e}")


if __name__ == "__main__":
    main()
