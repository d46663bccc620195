"""The evaluation loop: edit -> measure -> revert (or accumulate), per case, resumable.

It talks to an :class:`~.measure.EditTarget`, so the same loop measures an in-process model
(through the server's own edit manager and journal) or a running server through the public
client: what is measured is what users get. What one measurement is lives in :mod:`.measure`,
the reports in :mod:`.tables`. No gRPC or server import here.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from .datasets import EvalCase
from .measure import EditTarget, drift_of, measure_case, measure_cases, measure_chunks, summary_of
from .metrics import summarize
from .pre_cache import PreMeasurementCache


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
        post = measure_case(target, case, fluency_prompts=fluency_prompts, fluency_tokens=fluency_tokens,
                        generation_tokens=generation_tokens, before=pre)
        drift = drift_of(target, reference)
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
    measured them before, else measured (together, :func:`measure_cases`) and stored when the
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
    for group in measure_chunks([cases[i] for i in missing]):  # stored as they come: a stopped run keeps them
        part = [missing[j] for j in group]
        measured = measure_cases(target, [cases[i] for i in part], [None] * len(part), **options)
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
            curve.append({"edits": applied, **summary_of(post), **drift_of(target, reference)})
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
    now = measure_cases(target, cases, befores, fluency_prompts=0, fluency_tokens=0,
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
        "kept": {"before": summary_of(split([before[c.case_id] for c in edited], False)),
                 "after": summary_of(split(after, False))},
        "reverted": {"before": summary_of(split([before[c.case_id] for c in edited], True)),
                     "after": summary_of(split(after, True)),
                     "unedited": summary_of([{"post": r["pre"]} for r in split(after, True)])},
        "drift": {"before": {"kl": last.get("kl"), "top1_agreement": last.get("top1_agreement")},
                  "after": drift_of(target, reference)},
        "records": after,
    }


def _write(out: Path, records: list[dict], extra: dict | None = None) -> None:
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps({"records": records, **(extra or {})}, indent=1))
    tmp.replace(out)
