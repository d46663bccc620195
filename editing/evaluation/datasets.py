"""Evaluation datasets, normalised to one case shape.

Every loader takes a path (users bring their own files of the same format) and returns
:class:`EvalCase` records. Formats understood:

- ``counterfact``: ROME's original rich CounterFact records (``requested_rewrite``,
  ``paraphrase_prompts``, ``neighborhood_prompts``, ``generation_prompts``; optional
  ``portability`` / ``alternative_subject`` from arXiv 2305.13172's releases).
- ``counterfact_flat``: EasyEdit's flat CounterFact (``prompt``, ``subject``, ``target_new``,
  ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``).
- ``zsre``: MEND/ROME zsRE (``src``, ``subject``, ``alt``, ``answers``, ``rephrase``, ``loc``,
  ``loc_ans``; optional ``portability``, ``alternative_subject``, ``inverse question``).
- ``knowedit``: KnowEdit (``prompt``, ``subject``, ``target_new``, ``ground_truth``,
  ``rephrase_prompt`` (one, or a list), ``locality``/``portability`` dicts of prompt lists;
  ``bench/data/wellknown_facts.json`` uses it for close same-relation neighbours).
``detect_format`` picks one from the first record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..facts import Fact


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer expected from it."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EvalCase:
    case_id: str
    fact: Fact
    paraphrase_prompts: tuple[str, ...] = ()
    # CounterFact neighbourhood: other subjects sharing the true object; expect target_true.
    neighborhood_prompts: tuple[str, ...] = ()
    # Locality probes with their own answers (zsRE "loc", KnowEdit relation specificity).
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)


def _template(prompt: str, subject: str) -> str | None:
    """Turn a filled prompt into a "{}" template; None when the subject is not in it."""
    if "{}" in prompt:
        return prompt
    if subject not in prompt:
        return None
    return prompt.replace(subject, "{}", 1)


def _fact(template: str, subject: str, target_new: str, target_true: str) -> Fact:
    """A case's fact; a "true" answer equal to the new target is dropped.

    zsRE (and KnowEdit, which derives from it) has cases whose edit target is already the
    recorded answer (e.g. alt == answers[0] == "male"). They are kept, as the published
    zsRE tables keep them: token accuracy (Rel/Gen) is defined for them, while the ROME-style
    P(new) > P(true) comparisons are not and are left out of ES/PS/NS for that case.
    """
    if target_true.strip() == target_new.strip():
        target_true = ""
    return Fact(template, subject, target_new, target_true)


def _counterfact(record: dict, index: int) -> EvalCase | None:
    rewrite = record["requested_rewrite"]
    subject = rewrite["subject"]
    template = _template(rewrite["prompt"], subject)
    if template is None:
        return None
    fact = _fact(template, subject, rewrite["target_new"]["str"], rewrite["target_true"]["str"])
    portability = []
    port = record.get("portability")
    if isinstance(port, dict) and port.get("New Question"):
        portability.append(Probe(port["New Question"], port["New Answer"]))
    if record.get("alternative_subject"):
        portability.append(Probe(template.replace("{}", record["alternative_subject"]), fact.target_new))
    return EvalCase(
        case_id=str(record.get("case_id", index)),
        fact=fact,
        paraphrase_prompts=tuple(record.get("paraphrase_prompts", [])),
        neighborhood_prompts=tuple(record.get("neighborhood_prompts", [])),
        portability=tuple(portability),
        generation_prompts=tuple(record.get("generation_prompts", [])),
    )


def _counterfact_flat(record: dict, index: int) -> EvalCase | None:
    template = _template(record["prompt"], record["subject"])
    if template is None:
        return None
    fact = _fact(template, record["subject"], record["target_new"], record.get("ground_truth", ""))
    locality = ()
    if record.get("locality_prompt"):
        locality = (Probe(record["locality_prompt"], record.get("locality_ground_truth", "")),)
    return EvalCase(
        case_id=str(record.get("case_id", index)),
        fact=fact,
        paraphrase_prompts=(record["rephrase_prompt"],) if record.get("rephrase_prompt") else (),
        # EasyEdit's flat file keeps one neighbourhood prompt whose answer is the shared true object
        neighborhood_prompts=(record["locality_prompt"],)
        if record.get("locality_prompt") and record.get("locality_ground_truth") == fact.target_true
        else (),
        locality=locality,
    )


def _zsre(record: dict, index: int) -> EvalCase | None:
    subject = record["subject"]
    template = _template(record["src"], subject)
    if template is None or not str(record.get("alt") or "").strip():  # no new answer: nothing to edit
        return None
    answers = record.get("answers") or [""]
    fact = _fact(template, subject, record["alt"], answers[0])
    portability = []
    port = record.get("portability")
    if isinstance(port, dict) and port.get("New Question"):
        portability.append(Probe(port["New Question"], port["New Answer"]))
    if record.get("alternative_subject"):
        question = record.get("alter_subject_question") or template.replace("{}", record["alternative_subject"])
        portability.append(Probe(question, fact.target_new))
    if record.get("inverse question"):
        portability.append(Probe(record["inverse question"], subject))
    locality = (Probe(record["loc"], record.get("loc_ans", "")),) if record.get("loc") else ()
    return EvalCase(
        case_id=str(record.get("case_id", index)),
        fact=fact,
        paraphrase_prompts=(record["rephrase"],) if record.get("rephrase") else (),
        locality=locality,
        portability=tuple(portability),
    )


def _first(value) -> str:
    while isinstance(value, list):
        value = value[0] if value else ""
    return str(value)


def _knowedit(record: dict, index: int) -> EvalCase | None:
    subject = record["subject"]
    template = _template(record["prompt"], subject)
    if template is None:
        return None
    fact = _fact(template, subject, record["target_new"], _first(record.get("ground_truth", "")))
    locality = [Probe(p["prompt"], _first(p["ground_truth"]))
                for group in (record.get("locality") or {}).values() for p in group]
    portability = [Probe(p["prompt"], _first(p["ground_truth"]))
                   for group in (record.get("portability") or {}).values() for p in group]
    rephrase = record.get("rephrase_prompt") or record.get("rephrase") or ()
    return EvalCase(
        case_id=str(record.get("case_id", index)),
        fact=fact,
        paraphrase_prompts=tuple(rephrase) if isinstance(rephrase, list) else (rephrase,),
        locality=tuple(locality),
        portability=tuple(portability),
    )


LOADERS = {
    "counterfact": _counterfact,
    "counterfact_flat": _counterfact_flat,
    "zsre": _zsre,
    "knowedit": _knowedit,
}


def detect_format(record: dict) -> str:
    if "requested_rewrite" in record:
        return "counterfact"
    if "src" in record and "alt" in record:
        return "zsre"
    if "rephrase_prompt" in record and "locality_prompt" in record:
        return "counterfact_flat"
    if "target_new" in record and "prompt" in record:
        return "knowedit"
    raise ValueError(f"unrecognised dataset record with keys {sorted(record)}")


def load_cases(path: Path | str, *, fmt: str | None = None, limit: int | None = None,
               distinct_subjects: bool = False) -> tuple[list[EvalCase], int]:
    """(cases, skipped): skipped counts records whose subject is not in their prompt (or that have
    no new answer), and with
    ``distinct_subjects`` also records whose subject an earlier kept case already has (the
    first ``limit`` cases are then the first ``limit`` subjects; see :func:`resubjected`)."""
    records = json.loads(Path(path).read_text())
    if not records:
        return [], 0
    fmt = fmt or detect_format(records[0])
    if fmt not in LOADERS:
        raise ValueError(f"unknown dataset format {fmt!r}; choose one of {sorted(LOADERS)}")
    cases, skipped = [], 0
    seen: set[str] = set()
    for i, record in enumerate(records):
        case = LOADERS[fmt](record, i)
        if case is None or (distinct_subjects and case.fact.subject.casefold() in seen):
            skipped += 1
            continue
        seen.add(case.fact.subject.casefold())
        cases.append(case)
        if limit is not None and len(cases) >= limit:
            break
    return cases, skipped


def resubjected(cases: list[EvalCase]) -> int:
    """How many cases give a subject an earlier case already edited a *different* new answer.

    zsRE (the MEND split) asks the same question about one subject in several wordings, each
    with its own sampled counterfactual answer: 24 of its first 100 cases contradict an
    earlier one (e.g. four different makers of USS Leedstown). Edit-measure-revert does not
    mind, but in a sequential run the later edit rightly supersedes the earlier, so the earlier
    case cannot be reliable at the end and the curve measures the data, not the method
    (docs/RESULTS.md, "T-Patcher, sequential on zsRE"). CounterFact's subjects are distinct."""
    first: dict[str, str] = {}
    count = 0
    for case in cases:
        subject = case.fact.subject.casefold()
        if subject in first and first[subject] != case.fact.target_new.strip().casefold():
            count += 1
        first.setdefault(subject, case.fact.target_new.strip().casefold())
    return count
