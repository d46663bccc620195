"""Choose SERAC's counterfactual template: score prompts as if the scope classifier routed them.

For each candidate template (``{statement}`` is the edit's key with its target, ``{input}`` the
prompt asked), every case's rewrite prompt and paraphrases are wrapped as the server wraps an
in-scope input and scored teacher-forced on the model:

- zsRE (no counterfactual answer): token accuracy of the new answer (EasyEdit's Rel / Gen);
- CounterFact: ES / PS, the share of prompts where the new object is more likely than the true
  one (mean token log-probability, as ROME compares them), and the rewrite's token accuracy.

Routing itself is left out on purpose (its recall is measured by bench/serac_scope.py): this
isolates what the template does. Shipped templates are ``editing.memory.TEMPLATES``, chosen per
model family by ``[serac] template`` in the family's hparams file.

    .venv/bin/python bench/serac_template.py --data ../shared/data --dataset zsre --start 100 --n 200
    .venv/bin/python bench/serac_template.py --data ../shared/data --dataset counterfact --start 200 --n 100
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATASETS = {"zsre": "portability/zsre_mend_eval_portability_gpt4.json",
            "counterfact": "counterfact/counterfact_rich_union.json"}
CANDIDATES = {
    "one line (first shipped)": "New fact: {statement}. Note that {statement}. {input}",
    "two lines": "New fact: {statement}\nNote that {statement}\n{input}",
    "two lines with stops": "New fact: {statement}.\nNote that {statement}.\n{input}",
    "three lines": "New fact: {statement}\nNote that {statement}\nIn other words, {statement}\n{input}",
    "four lines": "New fact: {statement}\nNote that {statement}\nIn other words, {statement}\n"
                  "To repeat, {statement}\n{input}",
    "three lines, answer line": "New fact: {statement}\nNote that {statement}\nIn other words, {statement}\n"
                                "The answer is {target}.\n{input}",
    "question and answer": "Q: {key}\nA: {target}\nQ: {key}\nA: {target}\nQ: {key}\nA: {target}\n{input}",
    "three lines, input repeats": "New fact: {statement}\nNote that {statement}\nIn other words, {statement}\n"
                                  "{input} {target}\n{input}",
    "one line, three statements": "New fact: {statement}. Note that {statement}. In other words, {statement}. {input}",
    "one line, four statements": "New fact: {statement}. Note that {statement}. In other words, {statement}. "
                                 "To repeat, {statement}. {input}",
    "one line, then input line": "New fact: {statement}. Note that {statement}.\n{input}",
    "one line, three statements, then input line": "New fact: {statement}. Note that {statement}. In other words, "
                                                   "{statement}.\n{input}",
    "one line, plain": "{statement}. {statement}. {input}",
}


def _mean_logprob(scored) -> float:
    return statistics.fmean(scored.token_logprobs)


def measure(model, tokenizer, cases, template: str, counterfactual: bool) -> dict[str, float]:
    from editserve.editing.scoring import score

    prompts, targets, groups = [], [], []
    for case in cases:
        fact = case.fact
        key = fact.prompt.replace("{}", fact.subject)
        statement = f"{key} {fact.target_new.strip()}"
        answers = (fact.target_new, fact.target_true) if counterfactual else (fact.target_new,)
        for group, text in [("rewrite", key)] + [("paraphrase", p) for p in case.paraphrase_prompts]:
            for answer in answers:
                prompts.append(template.format(statement=statement, key=key, target=fact.target_new.strip(),
                                               input=text))
                targets.append(answer)
            groups.append(group)
    scores = score(model, tokenizer, prompts, targets)
    width = 2 if counterfactual else 1
    out: dict[str, list[float]] = {}
    for i, group in enumerate(groups):
        new = scores[width * i]
        if group == "rewrite":
            out.setdefault("rewrite token accuracy", []).append(new.token_accuracy)
        else:
            out.setdefault("paraphrase token accuracy", []).append(new.token_accuracy)
        if counterfactual:
            true = scores[width * i + 1]
            name = "ES" if group == "rewrite" else "PS"
            out.setdefault(name, []).append(float(_mean_logprob(new) > _mean_logprob(true)))
    return {k: 100 * statistics.fmean(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="zsre")
    parser.add_argument("--start", type=int, default=100, help="first case (held out from earlier choices)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", action="append", choices=sorted(CANDIDATES),
                        help="measure only this candidate (repeatable; default: all)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editserve.editing.evaluation.datasets import load_cases
    from editserve.editing.memory import TEMPLATES
    from editserve.server.models import resolve_model_dir

    torch.set_num_threads(args.threads)
    path = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    cases, _skipped = load_cases(Path(args.data) / DATASETS[args.dataset], limit=args.start + args.n)
    cases = cases[args.start:]
    counterfactual = args.dataset == "counterfact"
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    print(f"{stamp}, {args.model}, {args.dataset} cases {args.start}..{args.start + len(cases) - 1}, "
          f"{args.threads} thread(s)")
    rows = []
    for name, template in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        shipped = "".join(f" (shipped as {n})" for n, text in TEMPLATES.items() if text == template)
        rows.append((name + shipped, measure(model, tokenizer, cases, template, counterfactual)))
    columns = list(rows[0][1])
    print("| template | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, values in rows:
        print(f"| {name} | " + " | ".join(f"{values[c]:.1f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
