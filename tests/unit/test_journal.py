import pytest
import torch

from editserve.editing.artifacts import WeightDelta
from editserve.server.journal import Journal, JournalError


def _delta(seed=0):
    g = torch.Generator().manual_seed(seed)
    return WeightDelta(factors={"m.weight": (torch.randn(4, 1, generator=g), torch.randn(3, 1, generator=g))})


def _record(journal, edit_id, delta):
    name, sha = journal.write_artifact(edit_id, delta)
    return journal.record_apply(
        edit_id=edit_id, method="rome", facts=[{"prompt": "{} is", "subject": "x", "target_new": "y"}], options={},
        layers=[1], parameters=delta.parameter_names, delta_norm=delta.norm(), compute_seconds=1.0,
        description="", artifact=name, sha256=sha,
    )


def test_apply_revert_and_reopen(tmp_path):
    journal = Journal(tmp_path, "fp")
    assert _record(journal, "a", _delta(0)) == 1
    assert _record(journal, "b", _delta(1)) == 2
    assert journal.record_revert("a") == 3
    with pytest.raises(KeyError):
        journal.record_revert("a")
    journal.close()
    reopened = Journal(tmp_path, "fp")
    assert reopened.revision() == 3
    assert [r.edit_id for r in reopened.list()] == ["b"]
    assert [r.status for r in reopened.list(include_reverted=True)] == ["reverted", "active"]
    record = reopened.get("b")
    assert torch.equal(reopened.load_artifact(record).delta("m.weight"), _delta(1).delta("m.weight"))


def test_other_model_is_refused(tmp_path):
    Journal(tmp_path, "fp1").close()
    with pytest.raises(JournalError, match="another model"):
        Journal(tmp_path, "fp2")


def test_orphan_artifacts_are_removed_and_corruption_detected(tmp_path):
    journal = Journal(tmp_path, "fp")
    journal.write_artifact("orphan", _delta(0))  # crash before the row was committed
    _record(journal, "kept", _delta(1))
    assert journal.remove_orphans() == ["orphan.safetensors"]
    path = tmp_path / "artifacts" / "kept.safetensors"
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    with pytest.raises(JournalError, match="corrupted"):
        journal.load_artifact(journal.get("kept"))
