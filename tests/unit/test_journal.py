import copy
import logging
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from editserve.editing.artifacts import RuntimeLayer, WeightDelta
from editserve.server.host import ModelHost
from editserve.server.journal import DuplicateKey, Journal, JournalError
from tests.tiny import tiny_model

V1_FIXTURE = Path(__file__).resolve().parent.parent / "data" / "journal_v1"
V1_FINGERPRINT = "f1f1f1f1f1f1f1f1"  # stored in the fixture (tests/data/journal_v1/README.md)
V2_FIXTURE = V1_FIXTURE.parent / "journal_v2"
V2_FINGERPRINT = "f2f2f2f2f2f2f2f2"  # stored in the fixture (tests/data/journal_v2/README.md)
DOWN0 = "model.layers.0.mlp.down_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"


def _delta(seed=0):
    g = torch.Generator().manual_seed(seed)
    return WeightDelta(factors={"m.weight": (torch.randn(4, 1, generator=g), torch.randn(3, 1, generator=g))})


def _record(journal, edit_id, artifact, key="", outcome=None, check=None):
    name, sha = journal.write_artifact(edit_id, artifact)
    return journal.record_apply(
        edit_id=edit_id, method="rome", kind=artifact.kind.value,
        facts=[{"prompt": "{} is", "subject": "x", "target_new": "y"}], options={},
        layers=[1], parameters=artifact.parameter_names, delta_norm=artifact.norm(), compute_seconds=1.0,
        description="", artifact=name, sha256=sha, idempotency_key=key, request_sha256="digest" if key else "",
        outcome=outcome, check=check,
    )


def _sql(path: Path, query: str, args: tuple = ()) -> list[tuple]:
    db = sqlite3.connect(path / "journal.sqlite3")
    try:
        with db:
            return db.execute(query, args).fetchall()
    finally:
        db.close()


def _meta(path: Path) -> dict[str, str]:
    return dict(_sql(path, "SELECT key, value FROM meta"))


def _v1_copy(tmp_path: Path) -> Path:
    target = tmp_path / "journal"
    shutil.copytree(V1_FIXTURE, target, ignore=shutil.ignore_patterns("README.md"))
    return target


def _fixture_delta(seed: int) -> WeightDelta:
    """The tensors tests/data/make_journal_v1.py wrote for edit number ``seed`` (restated here
    from its README, so the fixture is checked against the spec, not against itself)."""
    u = (torch.arange(16, dtype=torch.float32).reshape(8, 2) - 8 + seed) / 8
    v = (torch.arange(8, dtype=torch.float32).reshape(4, 2) * (seed + 1) - 3) / 8
    dense = {DOWN1: (torch.arange(32, dtype=torch.float32).reshape(8, 4) - 16) / 8} if seed == 2 else {}
    return WeightDelta(factors={DOWN0: (u, v)}, dense=dense)


def test_apply_revert_and_reopen(tmp_path):
    journal = Journal(tmp_path, "fp")
    assert _record(journal, "a", _delta(0)) == 1
    assert _record(journal, "b", _delta(1)) == 2
    assert journal.record_revert("a") == 3
    with pytest.raises(KeyError):
        journal.record_revert("a")
    journal.close()
    reopened = Journal(tmp_path, "fp")
    assert reopened.revision() == 3 and reopened.schema_version() == 4
    assert [r.edit_id for r in reopened.list()] == ["b"]
    assert [r.status for r in reopened.list(include_reverted=True)] == ["reverted", "active"]
    record = reopened.get("b")
    assert record.kind == "weight_delta"
    assert torch.equal(reopened.load_artifact(record).delta("m.weight"), _delta(1).delta("m.weight"))


def test_runtime_layer_round_trip_and_kind_checks(tmp_path):
    journal = Journal(tmp_path, "fp")
    layer = RuntimeLayer("ffn_neurons", {"keys": torch.arange(6.0).reshape(2, 3)}, {"layer": 3})
    _record(journal, "r", layer)
    record = journal.get("r")
    assert record.kind == "runtime_layer"
    loaded = journal.load_artifact(record)
    assert isinstance(loaded, RuntimeLayer) and loaded.info == {"layer": 3}
    assert torch.equal(loaded.tensors["keys"], layer.tensors["keys"])

    # the row must say what the file holds, checked before anything is committed
    name, sha = journal.write_artifact("w", _delta(0))
    with pytest.raises(JournalError, match="holds a weight_delta"):
        journal.record_apply(edit_id="w", method="rome", kind="runtime_layer", facts=[], options={}, layers=[],
                             parameters=[], delta_norm=0.0, compute_seconds=0.0, description="",
                             artifact=name, sha256=sha)
    with pytest.raises(TypeError, match="kind"):  # no default: every caller says which kind
        journal.record_apply(edit_id="w", method="rome", facts=[], options={}, layers=[], parameters=[],
                             delta_norm=0.0, compute_seconds=0.0, description="", artifact=name, sha256=sha)
    assert journal.get("w") is None and journal.revision() == 1

    # a row whose kind disagrees with its (intact) file is refused at load time
    _sql(tmp_path, "UPDATE edits SET kind = 'weight_delta' WHERE edit_id = 'r'")
    with pytest.raises(JournalError, match="expected a weight_delta"):
        journal.load_artifact(journal.get("r"))
    with pytest.raises(sqlite3.IntegrityError):
        _sql(tmp_path, "UPDATE edits SET kind = 'bogus' WHERE edit_id = 'r'")


def test_other_model_is_refused(tmp_path):
    Journal(tmp_path, "fp1").close()
    with pytest.raises(JournalError, match="another model"):
        Journal(tmp_path, "fp2")
    with pytest.raises(JournalError, match="another model"):  # legacy values only count for schema 1
        Journal(tmp_path, "fp2", legacy_fingerprints=("fp1",))


def test_orphan_artifacts_are_removed_and_corruption_detected(tmp_path):
    journal = Journal(tmp_path, "fp")
    journal.write_artifact("orphan", _delta(0))  # crash before the row was committed
    _record(journal, "kept", _delta(1))
    assert journal.remove_orphans() == ["orphan.safetensors"]
    path = tmp_path / "artifacts" / "kept.safetensors"
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    with pytest.raises(JournalError, match="corrupted"):
        journal.load_artifact(journal.get("kept"))


def test_v1_journal_migrates_in_place(tmp_path, caplog):
    path = _v1_copy(tmp_path)
    assert _meta(path) == {"schema_version": "1", "model_fingerprint": V1_FINGERPRINT}
    before = _sql(path, "SELECT edit_id, seq, status, applied_revision, reverted_revision, sha256 FROM edits "
                        "ORDER BY seq")
    with caplog.at_level(logging.INFO, logger="editserve.server.journal"):
        journal = Journal(path, "new-fingerprint", legacy_fingerprints=("other", V1_FINGERPRINT))
    assert "migrated schema 1 -> 2" in caplog.text and "migrated schema 2 -> 4" in caplog.text
    assert journal.schema_version() == 4 and journal.model_fingerprint() == "new-fingerprint"
    assert journal.revision() == 4
    records = journal.list(include_reverted=True)
    assert [(r.edit_id, r.seq, r.status, r.applied_revision, r.reverted_revision, r.sha256)
            for r in records] == before
    assert [r.edit_id for r in journal.list()] == ["a", "c"]
    assert {r.kind for r in records} == {"weight_delta"}
    assert records[0].facts == [{"prompt": "{} is located in", "subject": "S0", "target_new": "T0"}]
    assert records[2].parameters == [DOWN0, DOWN1] and records[2].description == "fixture edit c"
    for seed, record in enumerate(records):
        loaded, expected = journal.load_artifact(record), _fixture_delta(seed)
        assert isinstance(loaded, WeightDelta) and loaded.parameter_names == expected.parameter_names
        for name in expected.parameter_names:
            assert torch.equal(loaded.delta(name), expected.delta(name))
        assert loaded.norm() == pytest.approx(record.delta_norm)
    assert journal.remove_orphans() == []
    _record(journal, "d", _delta(3))  # the migrated journal takes new edits
    assert journal.revision() == 5
    journal.close()

    # reopening is a no-op: no migration, nothing written
    dump = list(sqlite3.connect(path / "journal.sqlite3").iterdump())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="editserve.server.journal"):
        Journal(path, "new-fingerprint", legacy_fingerprints=(V1_FINGERPRINT,)).close()
    assert "migrated" not in caplog.text
    assert list(sqlite3.connect(path / "journal.sqlite3").iterdump()) == dump
    with pytest.raises(JournalError, match="another model"):  # the old value no longer opens it
        Journal(path, V1_FINGERPRINT)


def test_migrated_and_new_journals_have_the_same_layout(tmp_path):
    Journal(_v1_copy(tmp_path), V1_FINGERPRINT).close()  # the stored value itself also migrates
    Journal(_v2_copy(tmp_path), V2_FINGERPRINT).close()
    Journal(tmp_path / "new", "fp").close()
    for table in ("edits", "events", "meta"):
        new = _sql(tmp_path / "new", f"PRAGMA table_info({table})")
        assert _sql(tmp_path / "journal", f"PRAGMA table_info({table})") == new
        assert _sql(tmp_path / "journal2", f"PRAGMA table_info({table})") == new
    index = "SELECT sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
    assert _sql(tmp_path / "journal", index) == _sql(tmp_path / "journal2", index) == _sql(tmp_path / "new", index)
    assert "idempotency_key" in _sql(tmp_path / "new", index)[0][0]


def _v2_copy(tmp_path: Path) -> Path:
    target = tmp_path / "journal2"
    shutil.copytree(V2_FIXTURE, target, ignore=shutil.ignore_patterns("README.md"))
    return target


def test_v2_journal_migrates_in_place(tmp_path, caplog):
    """A journal the schema-2 code wrote (tests/data/journal_v2) opens, every edit as it was,
    without idempotency keys or quarantines, and takes keyed edits afterwards."""
    path = _v2_copy(tmp_path)
    assert _meta(path) == {"schema_version": "2", "model_fingerprint": V2_FINGERPRINT}
    columns = "edit_id, seq, method, status, applied_revision, reverted_revision, sha256, kind"
    before = _sql(path, f"SELECT {columns} FROM edits ORDER BY seq")
    with caplog.at_level(logging.INFO, logger="editserve.server.journal"):
        journal = Journal(path, V2_FINGERPRINT)
    assert "migrated schema 2 -> 4" in caplog.text
    assert journal.schema_version() == 4 and journal.revision() == 4
    records = journal.list(include_reverted=True)
    assert [(r.edit_id, r.seq, r.method, r.status, r.applied_revision, r.reverted_revision, r.sha256, r.kind)
            for r in records] == before
    assert [r.state for r in records] == ["active", "reverted", "active"]
    assert all(r.idempotency_key == "" and r.quarantined == "" and r.outcome == {} for r in records)
    neurons = journal.load_artifact(records[1])  # the runtime layer, as the v2 code wrote it
    assert isinstance(neurons, RuntimeLayer) and neurons.info == {"module": "model.layers.1.mlp", "layer": 1}
    assert torch.equal(neurons.tensors["biases"], torch.tensor([0.5, -0.25]))
    assert torch.equal(neurons.tensors["values"], (torch.arange(8.0).reshape(2, 4) - 2) / 4)
    for seed in (0, 2):
        loaded = journal.load_artifact(records[seed])
        assert torch.equal(loaded.factors[DOWN0][0], (torch.arange(16.0).reshape(8, 2) - 8 + seed) / 8)
    assert journal.count_quarantined() == 0 and journal.remove_orphans() == []
    _record(journal, "d", _delta(3), key="retry-me")
    assert journal.by_key("retry-me").edit_id == "d" and journal.revision() == 5
    journal.close()
    dump = list(sqlite3.connect(path / "journal.sqlite3").iterdump())
    Journal(path, V2_FINGERPRINT).close()  # reopening migrates nothing
    assert list(sqlite3.connect(path / "journal.sqlite3").iterdump()) == dump


def test_v2_journal_of_another_model_is_refused_untouched(tmp_path):
    path = _v2_copy(tmp_path)
    original = (path / "journal.sqlite3").read_bytes()
    with pytest.raises(JournalError, match="another model"):
        Journal(path, "other", legacy_fingerprints=(V2_FINGERPRINT,))  # legacy values are for schema 1 only
    assert (path / "journal.sqlite3").read_bytes() == original


def test_idempotency_keys_are_unique_and_survive_reopening(tmp_path):
    journal = Journal(tmp_path, "fp")
    _record(journal, "a", _delta(0), key="k-1", outcome={"notes": ["n"], "reports": []})
    with pytest.raises(DuplicateKey):
        _record(journal, "b", _delta(1), key="k-1")
    assert journal.get("b") is None and journal.revision() == 1
    _record(journal, "c", _delta(2))  # no key: any number of those
    _record(journal, "d", _delta(3))
    journal.close()
    reopened = Journal(tmp_path, "fp")
    found = reopened.by_key("k-1")
    assert found.edit_id == "a" and found.request_sha256 == "digest" and found.outcome == {"notes": ["n"], "reports": []}
    assert reopened.by_key("k-2") is None and reopened.get("c").idempotency_key == ""


def test_a_failing_check_inside_the_commit_journals_nothing(tmp_path):
    journal = Journal(tmp_path, "fp")

    def gone():
        raise RuntimeError("the client gave up")

    with pytest.raises(RuntimeError, match="gave up"):
        _record(journal, "a", _delta(0), key="k", check=gone)
    assert journal.get("a") is None and journal.by_key("k") is None and journal.revision() == 0
    assert _record(journal, "a", _delta(0), key="k") == 1  # the same edit, committed this time


def test_undo_takes_back_only_the_last_event(tmp_path):
    journal = Journal(tmp_path, "fp")
    _record(journal, "a", _delta(0))
    _record(journal, "b", _delta(1), key="kb")
    with pytest.raises(JournalError, match="last event"):
        journal.undo_apply("a", 1)
    journal.undo_apply("b", 2)
    assert journal.get("b") is None and journal.by_key("kb") is None and journal.revision() == 1
    revision = journal.record_revert("a")
    journal.undo_revert("a", revision)
    assert journal.get("a").status == "active" and journal.get("a").reverted_revision == 0
    assert journal.revision() == 1 and _record(journal, "b", _delta(1), key="kb") == 2


def test_quarantine_moves_the_file_aside_and_keeps_the_edit(tmp_path):
    journal = Journal(tmp_path, "fp")
    _record(journal, "a", _delta(0))
    _record(journal, "b", _delta(1))
    moved = journal.quarantine("a", "sha256 mismatch")
    assert moved == str(tmp_path / "artifacts" / "quarantine" / "a.safetensors") and Path(moved).exists()
    assert not (tmp_path / "artifacts" / "a.safetensors").exists()
    (tmp_path / "artifacts" / "b.safetensors").unlink()
    assert journal.quarantine("b", "missing") is None
    assert journal.remove_orphans() == []  # the quarantine folder is not an orphan
    journal.close()
    reopened = Journal(tmp_path, "fp")
    assert [(r.edit_id, r.state, r.quarantined) for r in reopened.list()] == [
        ("a", "quarantined", "sha256 mismatch"), ("b", "quarantined", "missing")]
    assert reopened.count_quarantined() == 2
    reopened.record_revert("a")
    assert reopened.get("a").state == "reverted" and reopened.count_quarantined() == 1


def test_v1_journal_of_another_model_is_refused_untouched(tmp_path):
    path = _v1_copy(tmp_path)
    original = (path / "journal.sqlite3").read_bytes()
    with pytest.raises(JournalError, match="schema-1 journal"):
        Journal(path, "new-fingerprint", legacy_fingerprints=("not-this-one",))
    assert _meta(path)["schema_version"] == "1"
    assert "kind" not in {row[1] for row in _sql(path, "PRAGMA table_info(edits)")}
    assert (path / "journal.sqlite3").read_bytes() == original


def test_a_crash_mid_migration_leaves_schema_1(tmp_path, monkeypatch):
    path = _v1_copy(tmp_path)
    real_set_meta = Journal._set_meta

    def crash_at_version(self, key, value):
        if key == "schema_version":  # after the ALTER TABLE and the fingerprint rewrite
            raise RuntimeError("power cut")
        real_set_meta(self, key, value)

    monkeypatch.setattr(Journal, "_set_meta", crash_at_version)
    with pytest.raises(RuntimeError, match="power cut"):
        Journal(path, "new-fingerprint", legacy_fingerprints=(V1_FINGERPRINT,))
    assert _meta(path) == {"schema_version": "1", "model_fingerprint": V1_FINGERPRINT}
    assert "kind" not in {row[1] for row in _sql(path, "PRAGMA table_info(edits)")}
    monkeypatch.undo()
    journal = Journal(path, "new-fingerprint", legacy_fingerprints=(V1_FINGERPRINT,))
    assert journal.schema_version() == 4 and journal.revision() == 4
    journal.close()


@pytest.mark.parametrize("version", ["5", "banana"])
def test_unknown_schema_is_refused(tmp_path, version):
    Journal(tmp_path, "fp").close()
    _sql(tmp_path, "UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
    with pytest.raises(JournalError, match=f"schema '{version}'"):
        Journal(tmp_path, "fp")
    assert _meta(tmp_path)["schema_version"] == version


# --- the model fingerprint ----------------------------------------------------------------------
def _host(model, tokenizer) -> ModelHost:
    return ModelHost(model, tokenizer, name="tiny", dtype="fp32", device="cpu")


def test_fingerprint_ignores_dtype_and_library_fields(tiny_tokenizer):
    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    fp = _host(model, tok).fingerprint()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert _host(bf16, tok).fingerprint() == fp
    assert _host(bf16, tok).legacy_fingerprint() != _host(model, tok).legacy_fingerprint()  # the old problem
    relabelled = copy.deepcopy(model)
    relabelled.config.transformers_version = "0.0.1"
    relabelled.config.dtype = torch.float16
    assert _host(relabelled, tok).fingerprint() == fp
    other, _ = tiny_model("llama", seed=1, tokenizer=tiny_tokenizer)
    assert _host(other, tok).fingerprint() != fp
    reshaped = _host(copy.deepcopy(model), tok)
    reshaped.model.config.intermediate_size = 65  # architecture fields are part of it
    assert reshaped.fingerprint() != fp


def test_fingerprint_of_a_bf16_load_equals_the_fp32_load(tiny_model_dir):
    from editserve.server.models import load_model

    fp32, tok, _ = load_model(str(tiny_model_dir), dtype="fp32")
    bf16, _, _ = load_model(str(tiny_model_dir), dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert _host(fp32, tok).fingerprint() == _host(bf16, tok).fingerprint()


def test_legacy_fingerprint_opens_a_v1_journal_then_any_dtype_does(tmp_path, tiny_tokenizer):
    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    host = _host(model, tok)
    path = _v1_copy(tmp_path)
    # as if this model's server had written the fixture with the old code
    _sql(path, "UPDATE meta SET value = ? WHERE key = 'model_fingerprint'", (host.legacy_fingerprint(),))
    Journal(path, host.fingerprint(), legacy_fingerprints=(host.legacy_fingerprint(),)).close()
    assert _meta(path) == {"schema_version": "4", "model_fingerprint": host.fingerprint()}
    bf16_host = _host(copy.deepcopy(model).to(torch.bfloat16), tok)
    journal = Journal(path, bf16_host.fingerprint(), legacy_fingerprints=(bf16_host.legacy_fingerprint(),))
    assert [r.edit_id for r in journal.list()] == ["a", "c"]
    journal.close()


def test_a_reader_never_sees_a_commit_that_is_rolled_back(tmp_path):
    """The connection is shared by threads: a read while another thread's transaction is open
    would see its uncommitted row (a retry would then return an edit that never was)."""
    import threading

    journal = Journal(tmp_path, "fp")
    seen = []
    reader = threading.Thread(target=lambda: seen.append(journal.by_key("k")))

    def gone():  # runs inside the transaction, its row inserted but not committed
        reader.start()
        reader.join(0.3)
        assert reader.is_alive()  # the read waits for the transaction
        raise RuntimeError("the client gave up")

    with pytest.raises(RuntimeError, match="gave up"):
        _record(journal, "a", _delta(0), key="k", check=gone)
    reader.join(5)
    assert seen == [None]
