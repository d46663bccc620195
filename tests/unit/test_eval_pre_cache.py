"""The unedited-measurement cache: reused only for the same model, case, options and code,
and a reused record is what measuring again gives."""

import json
from dataclasses import replace

import pytest

from editserve.editing.evaluation.datasets import load_cases
from editserve.editing.evaluation.pre_cache import PreMeasurementCache, code_digest
from editserve.editing.evaluation.runner import run_non_sequential, run_sequential
from editserve.editing.facts import Fact
from editserve.server.eval_target import InProcessTarget

OPTIONS = {"layer": 1, "steps": 5, "learning_rate": 1e-2, "norm_constraint": 0.05}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cf.json"
    records = [{
        "case_id": i,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": subject,
                              "target_new": {"str": new}, "target_true": {"str": true}},
        "paraphrase_prompts": [f"{subject} speaks"], "neighborhood_prompts": ["The capital of Italy is"],
        "generation_prompts": [f"{subject} is"],
    } for i, (subject, new, true) in enumerate([("Danielle Darrieux", "English", "French"),
                                                ("Michael Jordan", "football", "basketball")])]
    path.write_text(json.dumps(records))
    return load_cases(path)[0]


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


@pytest.fixture(scope="module")
def target(tiny_model_dir, tmp_path_factory):
    t = InProcessTarget(str(tiny_model_dir), method="ft_l", options=OPTIONS,
                        cache_dir=tmp_path_factory.mktemp("cache"))
    yield t
    t.close()


def test_a_second_run_reuses_every_unedited_measurement_and_it_equals_a_fresh_one(target, cases, tmp_path):
    fresh = run_non_sequential(target, cases, generation_tokens=4)  # no cache: measured
    cache = PreMeasurementCache(tmp_path / "pre")
    run_non_sequential(target, cases, generation_tokens=4, pre_cache=cache)
    assert (cache.hits, cache.misses) == (0, 2)
    counting = CountingTarget(target)
    again = PreMeasurementCache(tmp_path / "pre")
    reused = run_non_sequential(counting, cases, generation_tokens=4, pre_cache=again)
    assert (again.hits, again.misses) == (2, 0)
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
    assert (again.hits, again.misses) == (2, 0)
    assert counting.scores == len(cases)  # only the final measurement of each edited case
    assert len(result["records"]) == len(cases)


def test_code_digest_follows_the_source(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("y = 1\n")
    first = code_digest(tmp_path)
    (tmp_path / "tests" / "t.py").write_text("y = 2\n")  # tests do not measure anything
    assert code_digest(tmp_path) == first
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert code_digest(tmp_path) != first


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
