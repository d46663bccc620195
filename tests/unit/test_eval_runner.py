"""The evaluation loop on a tiny model through the real edit manager and journal."""

import json
from dataclasses import replace

import pytest

from editserve.editing.evaluation.datasets import load_cases
from editserve.editing.evaluation.pre_cache import PreMeasurementCache, code_digest
from editserve.editing.evaluation.runner import run_non_sequential, run_sequential
from editserve.editing.evaluation.tables import curve_table, summary_table
from editserve.editing.facts import Fact
from editserve.server.eval_target import InProcessTarget

OPTIONS = {"layer": 1, "steps": 10, "learning_rate": 1e-2, "norm_constraint": 0.05}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cf.json"
    records = []
    for i, (subject, new, true) in enumerate([("Danielle Darrieux", "English", "French"),
                                              ("Michael Jordan", "football", "basketball"),
                                              ("Steve Jobs", "Microsoft", "Apple")]):
        records.append({
            "case_id": i,
            "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": subject,
                                  "target_new": {"str": new}, "target_true": {"str": true}},
            "paraphrase_prompts": [f"{subject} speaks"], "neighborhood_prompts": ["The capital of Italy is"],
            "generation_prompts": [f"{subject} is"],
        })
    path.write_text(json.dumps(records))
    return load_cases(path)[0]


@pytest.fixture(scope="module")
def target(tiny_model_dir, tmp_path_factory):
    t = InProcessTarget(str(tiny_model_dir), method="ft_l", options=OPTIONS,
                        cache_dir=tmp_path_factory.mktemp("cache"))
    yield t
    t.close()


def test_non_sequential_measures_and_restores(target, cases, tmp_path):
    digest = target.host.weights_digest()
    out = tmp_path / "results.json"
    records = run_non_sequential(target, cases, out=out, fluency_prompts=1, fluency_tokens=8)
    assert [r["case_id"] for r in records] == ["0", "1", "2"]
    for r in records:
        assert r["revert_restored"] is True
        assert r["post"]["p_new_rewrite"] > r["pre"]["p_new_rewrite"]
        assert r["kl"] > 0 and 0 <= r["top1_agreement"] <= 1 and r["post"]["fluency"] >= 0
    assert target.host.weights_digest() == digest  # every edit was reverted exactly
    table = summary_table(records, title="ft_l tiny")
    assert "| unedited |" in table and "| edited |" in table and "Reverts checked" in table
    # resuming from the output file recomputes nothing
    again = run_non_sequential(target, cases, out=out)
    assert again == json.loads(out.read_text())["records"]
    assert target.manager.journal.revision() == 6


def test_sequential_curve(target, cases):
    digest = target.host.weights_digest()
    result = run_sequential(target, cases, batch=1, checkpoints=[2])
    assert [p["edits"] for p in result["curve"]] == [2, 3]
    assert len(result["records"]) == 3
    assert target.host.weights_digest() == digest
    table = curve_table(result)
    assert table.count("\n| 2 |") == 1 and "\n| 3 |" in table
    assert "| edit compute (s) |" in table and "| revert (ms) |" in table
    last = result["curve"][-1]
    summary = summary_table(result["records"], title="seq", drift={"kl": last["kl"], "top1_agreement": last["top1_agreement"]})
    edited = next(line for line in summary.splitlines() if line.startswith("| edited |"))
    assert edited.endswith(f"| {last['kl']:.4f} | {100 * last['top1_agreement']:.1f} |")


def test_case_without_a_distinct_true_answer_has_no_rome_comparisons(target, tmp_path):
    """ES/PS/NS compare P(new) with P(true); with no true answer they are undefined (None),
    while token accuracy (Rel/Gen) still is, and the case is edited and reverted."""
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([{"subject": "Ann Smith", "src": "What is the sex of Ann Smith?", "alt": "female",
                                 "answers": ["female"], "rephrase": "Ann Smith's sex is?",
                                 "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}]))
    cases, _ = load_cases(path)
    digest = target.host.weights_digest()
    [record] = run_non_sequential(target, cases)
    for key in ("es", "ps", "ns", "em", "pm", "nm"):
        assert record["post"][key] is None and record["pre"][key] is None
    assert 0 <= record["post"]["reliability"] <= 1 and record["post"]["locality"] is not None
    assert record["revert_restored"] is True and target.host.weights_digest() == digest
    table = summary_table([record], title="no true answer")
    assert "| edited |" in table and "1 cases have no true answer distinct from the new target" in table


def test_progress_eta_counts_only_this_runs_cases():
    """A run resumed at case 150 of 200 must not divide its elapsed time by 150."""
    import io

    from editserve.editing.evaluation.runner import Progress

    stream = io.StringIO()
    progress = Progress(200, stream=stream)
    progress.started -= 10.0  # the first new case took 10 s
    progress.update(151, [{"post": {"es": 1.0, "ps": 1.0, "ns": None}}])
    line = stream.getvalue()
    assert line.startswith("[151/200] ES 100.0  PS 100.0")
    eta = float(line.split("eta")[1].strip().rstrip("s"))
    assert eta == pytest.approx(490, abs=2)  # 49 cases left at 10 s each, not 49 * 10/151
    # a sequential run reports at its curve points: 100 edits done, 40 of them by this process
    stream = io.StringIO()
    progress = Progress(1000, stream=stream)
    progress.started -= 400.0
    progress.update(100, [{"post": {"es": 1.0, "ps": 1.0, "ns": 0.5}}], new=40)
    eta = float(stream.getvalue().split("eta")[1].strip().rstrip("s"))
    assert eta == pytest.approx(9000, abs=20)  # 900 left at 10 s each


def test_revert_check_catches_a_revert_that_left_the_edit_in(target, cases):
    """The check is not vacuous: a target whose revert does nothing is reported."""

    class RevertDoesNothing:
        def __init__(self, inner):
            self.inner, self.kept = inner, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def revert(self, edit_id):
            self.kept.append(edit_id)
            return 0.0

    broken = RevertDoesNothing(target)
    [record] = run_non_sequential(broken, cases[:1])
    assert record["revert_restored"] is False
    assert record["p_new_after_revert"] > record["p_new_before_edit"]
    for edit_id in broken.kept:
        target.revert(edit_id)


class _Scripted:
    """An EditTarget whose generations are written out per prompt and state (edited or not):
    the runner's by-generation bookkeeping is checked against answers known in advance."""

    def __init__(self, inner, before: dict[str, str], after: dict[str, str]) -> None:
        self.inner, self.before, self.after, self.edited = inner, before, after, False

    def edit(self, facts):
        self.edited = True
        return "e1", 0.0, 0.0

    def revert(self, edit_id):
        self.edited = False
        return 0.0

    def score(self, pairs):
        return self.inner.score(pairs)

    def generate(self, prompts, max_new_tokens):
        table = self.after if self.edited else self.before
        return [table[p] for p in prompts]

    def probe_logits(self):
        return None


def test_by_generation_columns_count_what_is_said(target, cases):
    case = cases[0]  # Danielle Darrieux: French -> English; one paraphrase, one neighbour
    before = {case.fact.text: " French, of course", "Danielle Darrieux speaks": " French and Italian",
              "The capital of Italy is": " Rome."}
    after = {case.fact.text: " English.", "Danielle Darrieux speaks": " French",
             "The capital of Italy is": " English, they say"}
    records = run_non_sequential(_Scripted(target, before, after), [case], generation_tokens=4)
    pre, post = records[0]["pre"], records[0]["post"]
    assert (pre["gen_es"], pre["gen_ps"], pre["gen_ns"], pre["gen_loc"]) == (0.0, 0.0, 1.0, None)
    assert (post["gen_es"], post["gen_ps"], post["gen_ns"], post["gen_loc"]) == (1.0, 0.0, 0.0, 0.0)
    table = summary_table(records, title="scripted")
    assert "| gES | gPS | gNS | gLoc |" in table
    assert next(line for line in table.splitlines() if line.startswith("| edited |")).endswith(
        "| 100.0 | 0.0 | 0.0 | 0.0 |")


def test_by_generation_on_a_real_tiny_model(target, cases):
    digest = target.host.weights_digest()
    records = run_non_sequential(target, cases[:1], generation_tokens=6)
    post = records[0]["post"]
    assert post["gen_es"] in (0.0, 1.0) and post["gen_ns"] in (0.0, 1.0) and post["gen_loc"] in (0.0, 1.0)
    assert len(post["gen_clauses"]) == len(cases[0].neighborhood_prompts)
    result = run_sequential(target, cases[:2], checkpoints=[1], generation_tokens=6)
    assert all(p["gen_es"] is not None and p["gen_loc"] is not None for p in result["curve"])
    assert "gES" in curve_table(result)
    assert target.host.weights_digest() == digest


class _StopsAt:
    """The real target, stopped (as a killed process would be) before its edit after the first
    ``allowed``, right *after* its ``edits``-th edit commits (before the runner saves it), or
    before its ``reverts``-th revert."""

    def __init__(self, inner, edits: int | None = None, reverts: int | None = None,
                 allowed: int | None = None) -> None:
        self.inner, self.edits, self.reverts, self.allowed = inner, edits, reverts, allowed

    def edit(self, facts):
        if self.allowed is not None:
            if self.allowed == 0:
                raise KeyboardInterrupt("stopped")
            self.allowed -= 1
        result = self.inner.edit(facts)
        if self.edits is not None:
            self.edits -= 1
            if self.edits == 0:
                raise KeyboardInterrupt("stopped after the commit")
        return result

    def revert(self, edit_id):
        if self.reverts is not None:
            self.reverts -= 1
            if self.reverts == 0:
                raise KeyboardInterrupt("stopped before a revert")
        return self.inner.revert(edit_id)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_stopped_sequential_run_resumes_on_its_edits(tiny_model_dir, cases, tmp_path):
    from editserve.editing.evaluation.runner import ResumeError

    def fresh(state: str):
        return InProcessTarget(str(tiny_model_dir), method="ft_l", options=OPTIONS, cache_dir=tmp_path / "cache",
                               state_dir=tmp_path / state)

    whole_target = fresh("whole")
    whole = run_sequential(whole_target, cases, checkpoints=[1, 2], out=tmp_path / "whole.json")
    whole_target.close()

    out = tmp_path / "split.json"
    first = fresh("split")
    with pytest.raises(KeyboardInterrupt):
        run_sequential(_StopsAt(first, allowed=2), cases, checkpoints=[1, 2], out=out)
    assert len(first.active_edits()) == 2  # the sitting ended with two edits applied
    first.close()
    assert len(json.loads(out.read_text())["sequential"]["edits"]) == 2

    with pytest.raises(ResumeError, match="holds 0"):  # a target without those edits cannot resume
        run_sequential(fresh("elsewhere"), cases, checkpoints=[1, 2], out=out)

    second = fresh("split")  # a new process: the journal replays the two edits
    assert len(second.active_edits()) == 2
    resumed = run_sequential(second, cases, checkpoints=[1, 2], out=out)
    assert [p["edits"] for p in resumed["curve"]] == [1, 2, 3]
    for a, b in zip(resumed["curve"], whole["curve"], strict=True):
        assert a["es"] == b["es"] and a["ns"] == b["ns"]
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-7)
    assert second.active_edits() == []  # reverted at the end, as an unbroken run does
    assert run_sequential(second, cases, checkpoints=[1, 2], out=out)["curve"] == resumed["curve"]  # finished


def test_revert_sample_measures_kept_and_reverted_edits_and_survives_a_stop(tiny_model_dir, cases, tmp_path):
    def fresh(state: str):
        return InProcessTarget(str(tiny_model_dir), method="ft_l", options=OPTIONS, cache_dir=tmp_path / "cache",
                               state_dir=tmp_path / state)

    whole_target = fresh("whole")
    pristine = whole_target.host.weights_digest()
    whole = run_sequential(whole_target, cases, out=tmp_path / "whole.json", revert_sample=1, revert_seed=3)
    assert whole_target.active_edits() == [] and whole_target.host.weights_digest() == pristine
    whole_target.close()
    sample = whole["revert_sample"]
    assert (sample["kept_cases"], sample["reverted_cases"], len(sample["reverted_edits"])) == (2, 1, 1)
    before = {r["case_id"]: r["post"]["p_new_rewrite"] for r in whole["records"]}
    after = {r["case_id"]: r["post"]["p_new_rewrite"] for r in sample["records"]}
    unedited = {r["case_id"]: r["pre"]["p_new_rewrite"] for r in sample["records"]}
    moved_back = [c for c in after if abs(after[c] - unedited[c]) < abs(before[c] - unedited[c]) / 2]
    assert len(moved_back) == 1  # exactly the reverted edit's case fell back towards the unedited model
    table = curve_table(whole)
    assert "1 edits reverted among the others (seed 3)" in table and "| reverted (1) | unedited model |" in table

    # Stopped once after an edit committed but before it was saved, and once between the
    # sample's draw and its revert: the resumed run ends where the unbroken one did.
    out = tmp_path / "split.json"
    first = fresh("split")
    with pytest.raises(KeyboardInterrupt):
        run_sequential(_StopsAt(first, edits=2), cases, out=out, revert_sample=1, revert_seed=3)
    assert len(first.active_edits()) == 2 and len(json.loads(out.read_text())["sequential"]["edits"]) == 1
    first.close()
    second = fresh("split")  # its first revert undoes the unsaved edit; the second is the sample's
    with pytest.raises(KeyboardInterrupt):
        run_sequential(_StopsAt(second, reverts=2), cases, out=out, revert_sample=1, revert_seed=3)
    state = json.loads(out.read_text())["sequential"]
    assert len(state["edits"]) == 3 and len(state["sample_reverted"]) == 1 and len(second.active_edits()) == 3
    second.close()
    third = fresh("split")
    resumed = run_sequential(third, cases, out=out, revert_sample=1, revert_seed=3)
    assert third.active_edits() == []
    assert resumed["revert_sample"]["reverted_cases"] == 1
    for part in ("kept", "reverted"):
        for when in ("before", "after"):
            got, want = resumed["revert_sample"][part][when], sample[part][when]
            assert got["es"] == want["es"] and got["ps"] == want["ps"] and got["ns"] == want["ns"]
    third.close()


# The unedited-measurement cache (pre_cache.py): reused only for the same model, case, options
# and code, and a reused record is what measuring again gives.


class CountingTarget:
    """The real in-process target, counting score calls (each measurement makes one)."""

    def __init__(self, inner: InProcessTarget) -> None:
        self.inner = inner
        self.scores = 0

    def score(self, pairs):
        self.scores += 1
        return self.inner.score(pairs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_second_run_reuses_every_unedited_measurement_and_it_equals_a_fresh_one(target, cases, tmp_path):
    fresh = run_non_sequential(target, cases, generation_tokens=4)  # no cache: measured
    cache = PreMeasurementCache(tmp_path / "pre")
    run_non_sequential(target, cases, generation_tokens=4, pre_cache=cache)
    assert (cache.hits, cache.misses) == (0, len(cases))
    counting = CountingTarget(target)
    again = PreMeasurementCache(tmp_path / "pre")
    reused = run_non_sequential(counting, cases, generation_tokens=4, pre_cache=again)
    assert (again.hits, again.misses) == (len(cases), 0)
    # each case: before-edit check, post measurement, after-revert check; no pre measurement
    assert counting.scores == 3 * len(cases)
    assert [r["pre"] for r in reused] == [r["pre"] for r in fresh]
    assert [r["post"]["es"] for r in reused] == [r["post"]["es"] for r in fresh]


def test_another_case_options_or_code_miss(target, cases, tmp_path):
    cache = PreMeasurementCache(tmp_path / "pre")
    run_non_sequential(target, cases[:1], pre_cache=cache)
    changed = replace(cases[0], fact=Fact(cases[0].fact.prompt, cases[0].fact.subject, "German", "French"))
    run_non_sequential(target, [changed], pre_cache=cache)
    run_non_sequential(target, cases[:1], generation_tokens=4, pre_cache=cache)
    assert (cache.hits, cache.misses) == (0, 3)
    other_code = PreMeasurementCache(tmp_path / "pre", code="another build")
    run_non_sequential(target, cases[:1], pre_cache=other_code)
    assert (other_code.hits, other_code.misses) == (0, 1)
    same = PreMeasurementCache(tmp_path / "pre")
    run_non_sequential(target, [changed], pre_cache=same)
    assert (same.hits, same.misses) == (1, 0)


def test_nothing_is_cached_while_the_target_holds_an_edit(target, cases, tmp_path):
    held, _, _ = target.edit([cases[1].fact])
    try:
        assert target.unedited_identity() is None
        cache = PreMeasurementCache(tmp_path / "pre")
        run_non_sequential(target, cases[:1], pre_cache=cache)
        assert not list((tmp_path / "pre").rglob("*.json"))
    finally:
        target.revert(held)
    assert target.unedited_identity() is not None


def test_an_unreadable_record_is_measured_again(target, cases, tmp_path):
    cache = PreMeasurementCache(tmp_path / "pre")
    first = run_non_sequential(target, cases[:1], pre_cache=cache)
    (record,) = list((tmp_path / "pre").rglob("*.json"))
    record.write_text('{"truncated": ')
    again = PreMeasurementCache(tmp_path / "pre")
    second = run_non_sequential(target, cases[:1], pre_cache=again)
    assert (again.hits, again.misses) == (0, 1)
    assert second[0]["pre"] == first[0]["pre"]
    assert json.loads(record.read_text()) == first[0]["pre"]  # rewritten whole


def test_a_sequential_run_reuses_the_non_sequential_runs_measurements(target, cases, tmp_path):
    cache = PreMeasurementCache(tmp_path / "pre")
    run_non_sequential(target, cases, pre_cache=cache)
    counting = CountingTarget(target)
    again = PreMeasurementCache(tmp_path / "pre")
    result = run_sequential(counting, cases, checkpoints=[], pre_cache=again)
    assert (again.hits, again.misses) == (len(cases), 0)
    assert counting.scores == 1  # only the final measurement of the edited cases, in one batch
    assert len(result["records"]) == len(cases)


def test_cases_measured_together_score_as_they_do_alone(target, cases, monkeypatch):
    from editserve.editing.evaluation import measure

    per_case = [len(measure._generation_prompts(case)) for case in cases]
    assert len(set(per_case)) == 1
    monkeypatch.setattr(measure, "MEASURE_ROWS", 2 * per_case[0])  # two cases a group
    counting = CountingTarget(target)
    together = measure.measure_cases(counting, cases, [None] * len(cases), fluency_prompts=1, fluency_tokens=4,
                                     generation_tokens=3)
    assert counting.scores == 2  # three cases in chunks of two
    for case, joint in zip(cases, together, strict=True):
        alone = measure.measure_case(target, case, fluency_prompts=1, fluency_tokens=4, generation_tokens=3)
        for key in ("p_new_rewrite", "p_true_rewrite"):
            assert joint[key] == pytest.approx(alone[key], rel=1e-4)
        assert len(joint["gen_clauses"]) == len(alone["gen_clauses"]) == 1  # one neighbour, no locality prompt
        assert joint["fluency"] is not None and joint["reliability"] == alone["reliability"]


def test_cases_are_grouped_by_the_prompts_they_generate(cases):
    """Groups fill up to MEASURE_ROWS prompts; a case larger than that goes alone, and every
    case is in exactly one group, in order."""
    from editserve.editing.evaluation import measure

    big = replace(cases[0], neighborhood_prompts=tuple(f"{p} {i}" for i in range(9) for p in
                                                       cases[0].neighborhood_prompts))
    mixed = [cases[0], cases[1], big, cases[2]]
    size = len(measure._generation_prompts(cases[0]))
    assert len(measure._generation_prompts(big)) > 3 * size
    groups = measure.measure_chunks(mixed, rows=3 * size)
    assert groups == [[0, 1], [2], [3]]
    assert measure.measure_chunks(mixed, rows=10_000) == [[0, 1, 2, 3]]
    assert measure.measure_chunks(mixed, rows=1) == [[0], [1], [2], [3]]


def test_code_digest_follows_the_measuring_source_only(tmp_path):
    (tmp_path / "pkg" / "evaluation").mkdir(parents=True)
    (tmp_path / "pkg" / "evaluation" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "loader.py").write_text("w = 1\n")
    (tmp_path / "pkg" / "server_option.py").write_text("s = 1\n")
    sources = ("pkg/evaluation", "pkg/loader.py")
    first = code_digest(tmp_path, sources)
    (tmp_path / "pkg" / "server_option.py").write_text("s = 2\n")  # not among the measuring sources
    assert code_digest(tmp_path, sources) == first
    (tmp_path / "pkg" / "evaluation" / ".venv").mkdir()  # nor an environment inside a listed folder
    (tmp_path / "pkg" / "evaluation" / ".venv" / "dep.py").write_text("z = 1\n")
    assert code_digest(tmp_path, sources) == first
    (tmp_path / "pkg" / "loader.py").write_text("w = 2\n")  # a listed file
    assert code_digest(tmp_path, sources) != first
    second = code_digest(tmp_path, sources)
    (tmp_path / "pkg" / "evaluation" / "b.py").write_text("y = 1\n")  # a new file in a listed folder
    assert code_digest(tmp_path, sources) != second


def test_the_measuring_sources_exist():
    """A renamed module must not silently drop out of the key."""
    from editserve.editing.evaluation.pre_cache import MEASURING_SOURCES, PACKAGE_ROOT

    assert all((PACKAGE_ROOT / source).exists() for source in MEASURING_SOURCES)


def test_the_cli_reuses_and_says_so(tiny_model_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from editserve.client.cli import main

    monkeypatch.setenv("EDITSERVE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([{
        "case_id": 7,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                              "target_new": {"str": "English"}, "target_true": {"str": "French"}},
        "paraphrase_prompts": ["Danielle Darrieux speaks"], "neighborhood_prompts": ["The capital of Italy is"],
    }]))
    args = ["eval", "--model", str(tiny_model_dir), "--method", "ft_l", "--dataset", str(data), "--n", "1",
            "--set", "layer=1", "--set", "steps=3"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "unedited measurements reused 0, measured 1" in first.output
    second = CliRunner().invoke(main, args)
    assert "unedited measurements reused 1, measured 0" in second.output, second.output
    off = CliRunner().invoke(main, [*args, "--no-pre-cache"])
    assert off.exit_code == 0 and "reused" not in off.output, off.output
