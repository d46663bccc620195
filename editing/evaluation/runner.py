"""The evaluation loop: edit -> measure -> revert (or accumulate), per case, resumable.

It talks to an :class:`EditTarget`, so the same loop measures an in-process model (through
the server's own edit manager and journal) or a running server through the public client:
what is measured is what users get. No gRPC or server import here.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
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
from .pre_cache import PreMeasurementCache


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


MEASURE_CHUNK = 8  # cases measured in one score call and one generate call (see _measure_cases)


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


def _measure_cases(target: EditTarget, cases: Sequence[EvalCase], befores: Sequence[dict | None], *,
                   fluency_prompts: int, fluency_tokens: int, generation_tokens: int = 0) -> list[dict]:
    """Every metric of each case against the target's current weights. ``befores[i]`` is case
    i's pre-edit record (None when this is it); ``generation_tokens`` > 0 adds the
    by-generation metrics (:func:`_generation_record`).

    Cases go to the target :data:`MEASURE_CHUNK` at a time: one score call and one generate
    call for all of them (measured 1.6-1.7x faster generation for eight CounterFact cases than
    eight calls, 2026-12-02), which is what a long sequential run spends its time on. Padding
    differs with the batch, so a score may move in the last float digits."""
    records: list[dict] = []
    for start in range(0, len(cases), MEASURE_CHUNK):
        chunk = list(cases[start:start + MEASURE_CHUNK])
        previous = list(befores[start:start + MEASURE_CHUNK])
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


def _measure(target: EditTarget, case: EvalCase, *, fluency_prompts: int, fluency_tokens: int,
             generation_tokens: int = 0, before: dict | None = None) -> dict:
    """:func:`_measure_cases` of one case."""
    return _measure_cases(target, [case], [before], fluency_prompts=fluency_prompts, fluency_tokens=fluency_tokens,
                          generation_tokens=generation_tokens)[0]


def _drift(target: EditTarget, reference) -> dict:
    if reference is None:
        return {"kl": None, "top1_agreement": None}
    kl, agree = distribution_drift(reference, target.probe_logits())
    return {"kl": kl, "top1_agreement": agree}


class Progress:
    """One line per case (non-sequential) or per curve point (sequential): done/total, running
    means and ETA (stderr)."""

    def __init__(self, total: int, stream=sys.stderr) -> None:
        self.total = total
        self.started = time.perf_counter()
        self.stream = stream
        # Cases already in a resumed output file cost nothing now; the rate counts this run's.
        self.resumed_from: int | None = None

    def update(self, done: int, records: list[dict], new: int | None = None) -> None:
        """``new``: how many of the ``done`` cases this process did (default: the first call
        comes after one new case, as in a non-sequential run)."""
        if new is not None:
            self.resumed_from = done - new
        elif self.resumed_from is None:
            self.resumed_from = done - 1
        post = [r["post"] for r in records]
        means = summarize(post, ("es", "ps", "ns"))
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(done - self.resumed_from, 1) * (self.total - done)
        shown = "  ".join(f"{k.upper()} {100 * v:5.1f}" for k, v in means.items() if v is not None)
        print(f"[{done}/{self.total}] {shown}  elapsed {elapsed:5.0f}s  eta {eta:5.0f}s", file=self.stream, flush=True)


def run_non_sequential(target: EditTarget, cases: Sequence[EvalCase], *, out: Path | None = None,
                       fluency_prompts: int = 0, fluency_tokens: int = 50, generation_tokens: int = 0,
                       progress: Callable[[int, list[dict]], None] | None = None,
                       pre_cache: PreMeasurementCache | None = None) -> list[dict]:
    """Edit, measure and revert each case; resumes from ``out`` if it holds earlier records.
    ``generation_tokens`` > 0 also judges each case by greedy generation of that many tokens;
    ``pre_cache`` reuses unedited measurements of earlier runs (:mod:`.pre_cache`)."""
    records: list[dict] = []
    if out is not None and out.exists():
        records = json.loads(out.read_text()).get("records", [])
    done = {r["case_id"] for r in records}
    reference = target.probe_logits()
    for case in cases:
        if case.case_id in done:
            continue
        [pre] = _measure_unedited(target, [case], pre_cache, fluency_prompts=fluency_prompts,
                                  fluency_tokens=fluency_tokens, generation_tokens=generation_tokens)
        # The revert check scores the rewrite alone before the edit and after the revert: the same
        # batch both times, so restored weights give the same number. (Within _measure's batch
        # the same pair differs from a lone forward by up to ~1e-4 relative: padding and matrix
        # shapes change the float summation order, which is not a revert failure.)
        rewrite = [(case.fact.text, case.fact.target_new)]
        before_edit = target.score(rewrite)[0].mean_probability
        edit_id, compute_s, apply_s = target.edit([case.fact])
        post = _measure(target, case, fluency_prompts=fluency_prompts, fluency_tokens=fluency_tokens,
                        generation_tokens=generation_tokens, before=pre)
        drift = _drift(target, reference)
        revert_s = target.revert(edit_id)
        after_revert = target.score(rewrite)[0].mean_probability
        record = {
            "case_id": case.case_id, "fact": asdict(case.fact), "pre": pre, "post": post, **drift,
            "compute_seconds": compute_s, "apply_seconds": apply_s, "revert_seconds": revert_s,
            "p_new_before_edit": before_edit, "p_new_after_revert": after_revert,
            "revert_restored": abs(after_revert - before_edit) <= 1e-12 + 1e-6 * before_edit,
        }
        records.append(record)
        if out is not None:
            _write(out, records)
        if progress:
            progress(len(records), records)
    return records


class ResumeError(RuntimeError):
    """A sequential run's output file does not match the target it would resume on."""


def _load_sequential(out: Path | None, cases: Sequence[EvalCase], batch: int) -> dict | None:
    if out is None or not out.exists():
        return None
    saved = json.loads(out.read_text())
    state = saved.get("sequential")
    if state is None:
        raise ResumeError(f"{out} is not a sequential run's output; choose another --out")
    if state["cases"] != [c.case_id for c in cases] or state["batch"] != batch:
        raise ResumeError(f"{out} was written for other cases or another batch size; choose another --out")
    return saved


def _reference_path(out: Path) -> Path:
    return out.with_suffix(out.suffix + ".reference.pt")


def _measure_unedited(target: EditTarget, cases: Sequence[EvalCase], cache: PreMeasurementCache | None, *,
                      fluency_prompts: int, fluency_tokens: int, generation_tokens: int) -> list[dict]:
    """The cases' pre-edit records: from ``cache`` when the same model, case, options and code
    measured them before, else measured (together, :func:`_measure_cases`) and stored when the
    target says they may be."""
    options = {"fluency_prompts": fluency_prompts, "fluency_tokens": fluency_tokens,
               "generation_tokens": generation_tokens}
    identity = target.unedited_identity() if cache is not None else None
    # without fluency prompts their length measures nothing: a sequential run (0 tokens) and a
    # non-sequential one (50) then share records
    keyed = {**options, "fluency_tokens": fluency_tokens if fluency_prompts else 0}
    keys = [cache.key(identity, case, keyed) if identity is not None else None for case in cases]
    records: list[dict | None] = [None if key is None else cache.get(key) for key in keys]
    missing = [i for i, record in enumerate(records) if record is None]
    for start in range(0, len(missing), MEASURE_CHUNK):  # stored as they come: a stopped run keeps them
        part = missing[start:start + MEASURE_CHUNK]
        measured = _measure_cases(target, [cases[i] for i in part], [None] * len(part), **options)
        for i, record in zip(part, measured, strict=True):
            records[i] = record
            if keys[i] is not None:
                cache.put(keys[i], record)
    return records  # type: ignore[return-value]  # every index was filled


def run_sequential(target: EditTarget, cases: Sequence[EvalCase], *, batch: int = 1,
                   checkpoints: Sequence[int] = (), out: Path | None = None, generation_tokens: int = 0,
                   progress: Callable[..., None] | None = None, keep_edits: bool = False,
                   pre_cache: PreMeasurementCache | None = None, revert_sample: int = 0,
                   revert_seed: int = 0) -> dict:
    """Accumulate edits (``batch`` facts per edit); measure every edited case at each
    checkpoint and after the last edit, to draw the degradation curve; then revert them all
    (unless ``keep_edits``).

    ``revert_sample`` > 0: after the last measurement, that many of the edits, drawn at random
    (``revert_seed``), are reverted *among* the others and every case is measured again: what
    the kept edits and the model's locality become when edits computed before or between them
    go away (:func:`revert_sample_table`; docs/LIFELONG.md, "Reverting one among many").

    Resumable: with ``out``, the run's state (pre-edit measurements, the edits applied so
    far, the curve, the unedited model's probe logits beside it) is written after every
    edit, and a rerun with the same ``out`` goes on from the next case, provided the target
    still holds exactly those edits (a server, or an in-process target with a state
    directory); otherwise :class:`ResumeError` says why. One edit committed after the last
    save (the run was stopped between the two) is reverted and computed again."""
    saved = _load_sequential(out, cases, batch)
    if saved is not None and saved.get("finished"):
        return {**{k: saved.get(k, []) for k in ("records", "curve", "timings", "revert_seconds")},
                "revert_sample": saved.get("revert_sample")}
    if saved is None:
        reference = target.probe_logits()
        measured = _measure_unedited(target, cases, pre_cache, fluency_prompts=0, fluency_tokens=0,
                                     generation_tokens=generation_tokens)
        pre = {c.case_id: record for c, record in zip(cases, measured, strict=True)}
        edits, timings, curve, post = [], [], [], []
        if out is not None and reference is not None:
            import torch

            torch.save(reference, _reference_path(out))
    else:
        state = saved["sequential"]
        pre, edits = state["pre"], state["edits"]
        timings, curve, post = saved.get("timings", []), saved.get("curve", []), saved.get("records", [])
        _resume_edits(target, out, edits, state.get("sample_reverted", []))
        reference = None
        if _reference_path(out).exists():
            import torch

            reference = torch.load(_reference_path(out))

    sampled: list[str] = [] if saved is None else saved["sequential"].get("sample_reverted", [])
    sample: dict | None = None if saved is None else saved.get("revert_sample")

    def save(extra: dict | None = None) -> None:
        if out is not None:
            state = {"cases": [c.case_id for c in cases], "batch": batch, "pre": pre, "edits": edits,
                     "sample_reverted": sampled}
            more = {"revert_sample": sample} if sample is not None else {}
            _write(out, post, extra={"curve": curve, "timings": timings, "sequential": state, **more, **(extra or {})})

    applied = len(edits) * batch
    applied_at_start = applied
    wanted = [c for c in sorted({c for c in checkpoints if c < len(cases)} | {len(cases)}) if c > applied]
    for start in range(applied, len(cases), batch):
        chunk = cases[start : start + batch]
        edit_id, compute_s, apply_s = target.edit([c.fact for c in chunk])
        edits.append(edit_id)
        timings.append({"compute_seconds": compute_s, "apply_seconds": apply_s})
        applied += len(chunk)
        if wanted and applied >= wanted[0]:
            wanted.pop(0)
            post = _measure_edited(target, cases[:applied], pre, generation_tokens)
            curve.append({"edits": applied, **_summary_of(post), **_drift(target, reference)})
            if progress:
                progress(applied, post, new=applied - applied_at_start)
        save()
    if revert_sample and sample is None and edits:
        if not sampled:
            # the draw is saved before any revert, so a stopped run finishes the same sample
            sampled = [edits[i] for i in sorted(random.Random(revert_seed).sample(range(len(edits)),
                                                                                  min(revert_sample, len(edits))))]
            save()
        held = set(target.active_edits())
        for edit_id in sampled:
            if edit_id in held:
                target.revert(edit_id)
        sample = _measure_revert_sample(target, cases, batch, edits, sampled, pre, post, curve, reference,
                                        generation_tokens, revert_seed)
        save()
    remaining = [e for e in edits if e not in set(sampled)]
    reverted = [] if keep_edits else [target.revert(e) for e in reversed(remaining)]
    result = {"records": post, "curve": curve, "timings": timings, "revert_seconds": reverted,
              "revert_sample": sample}
    if not keep_edits:
        edits, sampled = [], []  # nothing left to resume on
    save({"revert_seconds": reverted, "finished": True})
    return result


def _measure_edited(target: EditTarget, cases: Sequence[EvalCase], pre: dict, generation_tokens: int) -> list[dict]:
    """Each case's record for a curve point: its pre-edit measurement beside its measurement now."""
    befores = [pre[c.case_id] for c in cases]
    now = _measure_cases(target, cases, befores, fluency_prompts=0, fluency_tokens=0,
                         generation_tokens=generation_tokens)
    return [{"case_id": c.case_id, "pre": b, "post": r} for c, b, r in zip(cases, befores, now, strict=True)]


def _resume_edits(target: EditTarget, out: Path | None, edits: list[str], sampled: list[str]) -> None:
    """Check that the target holds the run's edits (less those of the revert sample it already
    reverted); an edit committed after the last save is reverted, to be computed again."""
    held = target.active_edits()
    gone = set(sampled)
    expected = [e for e in edits if e not in gone]
    kept = [e for e in held if e not in gone]
    if len(kept) == len(expected) + 1 and kept[:-1] == expected and kept[-1] not in edits:
        target.revert(kept[-1])
        kept = kept[:-1]
    if kept != expected:
        raise ResumeError(f"{out} records {len(expected)} active edits but the target holds {len(held)} other or "
                          "differently ordered ones; resume against the same server or --state-dir")


def _measure_revert_sample(target: EditTarget, cases: Sequence[EvalCase], batch: int, edits: list[str],
                           sampled: list[str], pre: dict, post: list[dict], curve: list[dict], reference,
                           generation_tokens: int, seed: int) -> dict:
    """Every case measured again with the sampled edits reverted, split into the cases whose
    edit stayed and those whose edit went, each beside its measurement before the reverts."""
    gone = set(sampled)
    reverted_cases = {c.case_id for i, e in enumerate(edits) if e in gone for c in cases[i * batch:(i + 1) * batch]}
    edited = cases[:len(edits) * batch]
    after = _measure_edited(target, edited, pre, generation_tokens)
    before = {r["case_id"]: r for r in post}

    def split(records: list[dict], inside: bool) -> list[dict]:
        return [r for r in records if (r["case_id"] in reverted_cases) == inside]

    last = curve[-1] if curve else {}
    return {
        "seed": seed, "reverted_edits": sampled, "reverted_cases": len(reverted_cases),
        "kept_cases": len(edited) - len(reverted_cases),
        "kept": {"before": _summary_of(split([before[c.case_id] for c in edited], False)),
                 "after": _summary_of(split(after, False))},
        "reverted": {"before": _summary_of(split([before[c.case_id] for c in edited], True)),
                     "after": _summary_of(split(after, True)),
                     "unedited": _summary_of([{"post": r["pre"]} for r in split(after, True)])},
        "drift": {"before": {"kl": last.get("kl"), "top1_agreement": last.get("top1_agreement")},
                  "after": _drift(target, reference)},
        "records": after,
    }


def _write(out: Path, records: list[dict], extra: dict | None = None) -> None:
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps({"records": records, **(extra or {})}, indent=1))
    tmp.replace(out)


def _summary_of(records: Sequence[dict]) -> dict:
    post = summarize([r["post"] for r in records], SUMMARY_KEYS)
    post["score"] = harmonic_mean([post["es"], post["ps"], post["ns"]])
    return post


def _quantiles(values: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(values)
    if not ordered:
        return float("nan"), float("nan")
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return statistics.median(ordered), p90


def summary_table(records: Sequence[dict], *, title: str, drift: dict | None = None) -> str:
    """Markdown: the unedited model's row beside the edited one, then costs.

    ``drift`` (kl, top1_agreement) replaces the per-case means: a sequential run measures drift
    once for the model holding all its edits (the curve's last point), not per case."""
    pre = summarize([r["pre"] for r in records], SUMMARY_KEYS)
    pre["score"] = harmonic_mean([pre["es"], pre["ps"], pre["ns"]])
    post = _summary_of(records)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    def num(v: float | None, fmt: str = "{:.3f}") -> str:
        return "-" if v is None else fmt.format(v)

    generated = post.get("gen_es") is not None  # by-generation columns only where measured
    gen_head = " gES | gPS | gNS | gLoc |" if generated else ""
    lines = [
        f"**{title}** ({len(records)} cases)",
        "",
        "| model | Score | ES | PS | NS | EM | PM | NM | Rel | Gen | Loc | Port | GE | KL | top-1 |" + gen_head,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * gen_head.count("|"),
    ]
    kl = drift if drift is not None else summarize(records, ("kl", "top1_agreement"))
    for name, row, drift in (("unedited", pre, {"kl": None, "top1_agreement": None}), ("edited", post, kl)):
        gen = ""
        if generated:
            gen = (f" {pct(row['gen_es'])} | {pct(row['gen_ps'])} | {pct(row['gen_ns'])} | "
                   f"{pct(row['gen_loc']) if name == 'edited' else '-'} |")
        lines.append(
            f"| {name} | {pct(row['score'])} | {pct(row['es'])} | {pct(row['ps'])} | {pct(row['ns'])} | "
            f"{pct(row['em'])} | {pct(row['pm'])} | {pct(row['nm'])} | {pct(row['reliability'])} | "
            f"{pct(row['generalization'])} | {pct(row['locality']) if name == 'edited' else '-'} | "
            f"{pct(row['portability'])} | {num(row['fluency'], '{:.2f}')} | {num(drift['kl'], '{:.4f}')} | "
            f"{pct(drift['top1_agreement'])} |" + gen
        )
    timings = [r for r in records if "compute_seconds" in r]
    if timings:
        lines += ["", *cost_table([r["compute_seconds"] for r in timings], [r["apply_seconds"] for r in timings],
                                  [r["revert_seconds"] for r in timings])]
        restored = sum(bool(r.get("revert_restored")) for r in timings)
        lines += ["", f"Reverts checked (P(new) back to its pre-edit value): {restored}/{len(timings)}"]
    undefined = sum(r["post"].get("es") is None for r in records)
    if undefined:
        lines += ["", f"{undefined} cases have no true answer distinct from the new target: "
                      "ES/PS/NS/EM/PM/NM average over the other cases"]
    return "\n".join(lines)


def cost_table(compute: Sequence[float], apply: Sequence[float], revert: Sequence[float]) -> list[str]:
    """Markdown rows: median and p90 of edit compute (s), apply and revert (ms)."""
    c50, c90 = _quantiles(compute)
    a50, a90 = _quantiles(apply)
    r50, r90 = _quantiles(revert)
    return ["| cost | median | p90 |", "|---|---|---|",
            f"| edit compute (s) | {c50:.2f} | {c90:.2f} |",
            f"| apply (ms) | {1000 * a50:.2f} | {1000 * a90:.2f} |",
            f"| revert (ms) | {1000 * r50:.2f} | {1000 * r90:.2f} |"]


def curve_table(result: dict) -> str:
    """Markdown for a sequential run: the degradation curve, then the edits' costs."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    generated = any(p.get("gen_es") is not None for p in result["curve"])
    lines = ["| edits | ES | PS | NS | Score | Rel | Gen | Loc | KL | top-1 |" + (" gES | gPS | gNS | gLoc |" if generated else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" * 4 if generated else "")]
    for p in result["curve"]:
        kl = "-" if p["kl"] is None else f"{p['kl']:.4f}"
        gen = (f" {pct(p['gen_es'])} | {pct(p['gen_ps'])} | {pct(p['gen_ns'])} | {pct(p['gen_loc'])} |"
               if generated else "")
        lines.append(f"| {p['edits']} | {pct(p['es'])} | {pct(p['ps'])} | {pct(p['ns'])} | {pct(p['score'])} | "
                     f"{pct(p['reliability'])} | {pct(p['generalization'])} | {pct(p['locality'])} | {kl} | "
                     f"{pct(p['top1_agreement'])} |" + gen)
    timings = result["timings"]
    if timings:
        lines += ["", *cost_table([t["compute_seconds"] for t in timings], [t["apply_seconds"] for t in timings],
                                  result.get("revert_seconds") or [])]
    if result.get("revert_sample"):
        lines += ["", revert_sample_table(result["revert_sample"])]
    return "\n".join(lines)


def revert_sample_table(sample: dict) -> str:
    """Markdown: the kept and the reverted edits' cases before and after the sample's reverts
    (and the reverted ones' unedited values), then the drift probes before and after."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    keys = ("es", "ps", "ns", "reliability", "generalization", "gen_es", "gen_ps", "gen_ns")
    lines = [f"{len(sample['reverted_edits'])} edits reverted among the others (seed {sample['seed']}):", "",
             "| cases | measured | ES | PS | NS | Rel | Gen | gES | gPS | gNS |", "|---|---|" + "---:|" * len(keys)]
    rows = [("kept", sample["kept_cases"], "before the reverts", sample["kept"]["before"]),
            ("kept", sample["kept_cases"], "after", sample["kept"]["after"]),
            ("reverted", sample["reverted_cases"], "before the reverts", sample["reverted"]["before"]),
            ("reverted", sample["reverted_cases"], "after", sample["reverted"]["after"]),
            ("reverted", sample["reverted_cases"], "unedited model", sample["reverted"]["unedited"])]
    for name, count, when, values in rows:
        lines.append(f"| {name} ({count}) | {when} | " + " | ".join(pct(values.get(k)) for k in keys) + " |")
    drift = sample["drift"]
    lines += ["", "| drift probes | KL | top-1 |", "|---|---:|---:|"]
    for when in ("before", "after"):
        kl = drift[when]["kl"]
        lines.append(f"| {when} the reverts | {'-' if kl is None else f'{kl:.4f}'} | "
                     f"{pct(drift[when]['top1_agreement'])} |")
    return "\n".join(lines)
