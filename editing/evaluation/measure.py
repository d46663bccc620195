"""One measurement of edit cases against a target's current weights: what the runner records
per case (teacher-forced ES/PS/NS and EasyEdit metrics, by-generation metrics, fluency) and
per model (drift on the probe set), and the means a curve point or table reports.

It talks to an :class:`EditTarget`, so the same code measures an in-process model or a
running server through the public client. No gRPC or server import here.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Protocol

from ..facts import Fact
from .datasets import EvalCase
from .metrics import (
    distribution_drift,
    first_clause,
    harmonic_mean,
    ngram_entropy,
    rome_case_metrics,
    says,
    summarize,
)


class Scored(Protocol):
    token_ids: list[int]
    argmax_ids: list[int]

    @property
    def mean_probability(self) -> float: ...

    @property
    def token_accuracy(self) -> float: ...


class EditTarget(Protocol):
    """What the runner needs from a model that can be edited."""

    def edit(self, facts: list[Fact]) -> tuple[str, float, float]:
        """Apply; returns (edit id, compute seconds, apply seconds)."""

    def revert(self, edit_id: str) -> float: ...

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]: ...

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]: ...

    def probe_logits(self):
        """Next-token logits on the drift probe set, or None where unavailable."""

    def active_edits(self) -> list[str]:
        """The edits the target holds, oldest first (a resumed sequential run checks them)."""

    def unedited_identity(self) -> str | None:
        """A key for the unedited model's measurements (:mod:`.pre_cache`), or None where they
        must not be cached (the target holds edits, or is a server measured as it serves)."""


ROME_KEYS = ("es", "ps", "ns", "em", "pm", "nm")
EASYEDIT_KEYS = ("reliability", "generalization", "locality", "portability")
GENERATION_KEYS = ("gen_es", "gen_ps", "gen_ns", "gen_loc")
SUMMARY_KEYS = ROME_KEYS + EASYEDIT_KEYS + GENERATION_KEYS + ("fluency",)


# prompts generated in one batch (and about half the pairs scored in one call): cases are
# measured together up to this many (see :func:`measure_chunks`)
MEASURE_ROWS = 128


def measure_chunks(cases: Sequence[EvalCase], rows: int | None = None) -> list[list[int]]:
    """Indices of ``cases`` in the groups measured together: consecutive cases up to ``rows``
    generation prompts (:data:`MEASURE_ROWS`), a case with more on its own.

    Why by prompts rather than by cases: what a batch costs is its rows. A rich CounterFact case
    has 13 prompts (rewrite, 2 paraphrases, 10 neighbours), a flat one or a zsRE case 3-4, so
    eight cases at a time (the rule until 2026-12-03) gave the flat sets batches of ~30 rows;
    measured on 64 flat CounterFact cases, SmolLM2, 2 threads: 863 ms a case in groups of 8,
    635 ms in groups of 32 (128 prompts), 1.36x."""
    limit = MEASURE_ROWS if rows is None else rows
    groups: list[list[int]] = []
    filled = 0
    for i, case in enumerate(cases):
        size = len(_generation_prompts(case))
        if groups and filled + size <= limit:
            groups[-1].append(i)
            filled += size
        else:
            groups.append([i])
            filled = size
    return groups


def _generation_prompts(case: EvalCase) -> list[str]:
    """What :func:`_generation_record` reads: the rewrite and paraphrases (asked), then the
    neighbourhood and locality prompts (around)."""
    fact = case.fact
    return [fact.text, *case.paraphrase_prompts, *case.neighborhood_prompts, *(p.prompt for p in case.locality)]


def _generation_record(case: EvalCase, texts: list[str], clauses_before: list[str] | None) -> dict:
    """What the model says, not what it would score: greedy continuations of the rewrite,
    paraphrase, neighbourhood and locality prompts, matched after normalisation
    (:func:`~.metrics.says`). gen_es / gen_ps: the new object is said; gen_ns: a neighbour
    does not say it; gen_loc: a neighbour's or locality prompt's first clause is what the
    unedited model generated (``clauses_before``, from the pre-edit measurement)."""
    fact = case.fact
    asked = 1 + len(case.paraphrase_prompts)
    said_new = [float(says(t, fact.target_new)) for t in texts[:asked]]
    neighbours = texts[asked:asked + len(case.neighborhood_prompts)]
    clauses = [first_clause(t) for t in texts[asked:]]
    record = {
        "gen_es": said_new[0],
        "gen_ps": statistics.fmean(said_new[1:]) if len(said_new) > 1 else None,
        "gen_ns": statistics.fmean(float(not says(t, fact.target_new)) for t in neighbours) if neighbours else None,
        "gen_clauses": clauses,
        "gen_loc": None,
    }
    if clauses_before is not None and clauses:
        record["gen_loc"] = statistics.fmean(float(a == b) for a, b in zip(clauses_before, clauses, strict=True))
    return record


def _score_pairs(case: EvalCase) -> tuple[list[tuple[str, str]], list[str]]:
    """The (prompt, continuation) pairs one case scores, and the group of each prompt: new and
    true object after every rewrite / paraphrase / neighbourhood prompt, then the locality and
    portability answers."""
    fact = case.fact
    groups = [("rewrite", [fact.text])]
    groups += [("paraphrase", list(case.paraphrase_prompts)), ("neighborhood", list(case.neighborhood_prompts))]
    pairs, index = [], []
    for group, prompts in groups:
        for prompt in prompts:
            pairs += [(prompt, fact.target_new), (prompt, fact.target_true or fact.target_new)]
            index.append(group)
    pairs += [(p.prompt, p.answer) for p in case.locality]
    pairs += [(p.prompt, p.answer) for p in case.portability]
    return pairs, index


def _scored_record(case: EvalCase, index: list[str], scores: Sequence[Scored],
                   locality_before: list[list[int]] | None) -> dict:
    """The teacher-forced metrics of one case from its scores (in :func:`_score_pairs` order)."""
    fact = case.fact
    by_group: dict[str, list[tuple[float, float]]] = {"rewrite": [], "paraphrase": [], "neighborhood": []}
    accuracy: dict[str, list[float]] = {"rewrite": [], "paraphrase": []}
    for n, group in enumerate(index):
        new, true = scores[2 * n], scores[2 * n + 1]
        by_group[group].append((new.mean_probability, true.mean_probability))
        if group in accuracy:
            accuracy[group].append(new.token_accuracy)
    offset = 2 * len(index)
    locality = scores[offset : offset + len(case.locality)]
    portability = scores[offset + len(case.locality) :]
    record = rome_case_metrics(by_group["rewrite"][0], by_group["paraphrase"], by_group["neighborhood"])
    if not fact.target_true:
        # No counterfactual answer to beat: ROME's P(new) > P(true) comparisons are undefined.
        record.update(dict.fromkeys(ROME_KEYS))
    record["reliability"] = accuracy["rewrite"][0]
    record["generalization"] = statistics.fmean(accuracy["paraphrase"]) if accuracy["paraphrase"] else None
    record["portability"] = statistics.fmean(s.token_accuracy for s in portability) if portability else None
    record["locality_argmax"] = [s.argmax_ids for s in locality]
    if locality_before is not None and locality:
        shares = [sum(int(a == b) for a, b in zip(pre, s.argmax_ids, strict=True)) / len(pre)
                  for pre, s in zip(locality_before, locality, strict=True)]
        record["locality"] = statistics.fmean(shares)
    else:
        record["locality"] = None
    record["p_new_rewrite"], record["p_true_rewrite"] = by_group["rewrite"][0]
    return record


def measure_cases(target: EditTarget, cases: Sequence[EvalCase], befores: Sequence[dict | None], *,
                   fluency_prompts: int, fluency_tokens: int, generation_tokens: int = 0) -> list[dict]:
    """Every metric of each case against the target's current weights. ``befores[i]`` is case
    i's pre-edit record (None when this is it); ``generation_tokens`` > 0 adds the
    by-generation metrics (:func:`_generation_record`).

    Cases go to the target in :func:`measure_chunks` groups: one score call and one generate
    call for each group (one-off measurement on 2026-12-02, SmolLM2, one thread on a loaded
    machine: 104 prompts x 16 tokens in one batch 1.6-1.7x faster than eight batches of 13, a
    CounterFact case's worth each), which is what a long sequential run spends its time on. Padding
    differs with the batch, so a score may move in the last float digits."""
    records: list[dict] = []
    for group in measure_chunks(cases):
        chunk = [cases[i] for i in group]
        previous = [befores[i] for i in group]
        plans = [_score_pairs(case) for case in chunk]
        scores = target.score([pair for pairs, _index in plans for pair in pairs])
        fluency: list[str] = []
        if fluency_prompts:
            wanted = [list(c.generation_prompts[:fluency_prompts]) for c in chunk]
            fluency = target.generate([p for w in wanted for p in w], fluency_tokens) if any(wanted) else []
        said = (target.generate([p for c in chunk for p in _generation_prompts(c)], generation_tokens)
                if generation_tokens else [])
        offset = fluency_offset = said_offset = 0
        for case, before, (pairs, index) in zip(chunk, previous, plans, strict=True):
            record = _scored_record(case, index, scores[offset:offset + len(pairs)],
                                    None if before is None else before["locality_argmax"])
            offset += len(pairs)
            record["fluency"] = None
            if fluency_prompts and case.generation_prompts:
                n = len(case.generation_prompts[:fluency_prompts])
                record["fluency"] = ngram_entropy(fluency[fluency_offset:fluency_offset + n])
                fluency_offset += n
            if generation_tokens:
                n = len(_generation_prompts(case))
                record.update(_generation_record(case, said[said_offset:said_offset + n],
                                                 None if before is None else before.get("gen_clauses")))
                said_offset += n
            records.append(record)
    return records


def measure_case(target: EditTarget, case: EvalCase, *, fluency_prompts: int, fluency_tokens: int,
             generation_tokens: int = 0, before: dict | None = None) -> dict:
    """:func:`measure_cases` of one case."""
    return measure_cases(target, [case], [before], fluency_prompts=fluency_prompts, fluency_tokens=fluency_tokens,
                          generation_tokens=generation_tokens)[0]


def drift_of(target: EditTarget, reference) -> dict:
    if reference is None:
        return {"kl": None, "top1_agreement": None}
    kl, agree = distribution_drift(reference, target.probe_logits())
    return {"kl": kl, "top1_agreement": agree}


def summary_of(records: Sequence[dict]) -> dict:
    post = summarize([r["post"] for r in records], SUMMARY_KEYS)
    post["score"] = harmonic_mean([post["es"], post["ps"], post["ns"]])
    return post
