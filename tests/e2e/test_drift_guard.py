"""The drift guard over a real socket: an edit whose drift on the probes would pass its budget
is refused before anything is journaled; the figures of an accepted one come back."""

from __future__ import annotations

import math

import pytest

from editserve.client import FailedPrecondition, InvalidArgument
from tests.e2e.test_edit_lifecycle import FAST, _fact
from tests.server_process import start_server

pytestmark = pytest.mark.e2e


def _state(client):
    info = client.model_info(include_weights_digest=True)
    return info.revision, info.weights_digest, [e.edit_id for e in client.list_edits(include_reverted=True)]


def test_an_edit_over_its_drift_budget_changes_nothing(tiny_model_dir, tmp_path):
    server = start_server(str(tiny_model_dir), tmp_path / "state", tmp_path / "logs", timeout=120)
    try:
        with server.client() as client:
            before = _state(client)
            dry = client.edit(_fact(0), dry_run=True, max_drift_kl=100.0, **FAST)
            assert dry.drift is not None and dry.drift.max_kl == 100.0 and dry.drift.min_top1_agreement == 0.0
            assert dry.drift.kl > 0 and 0 <= dry.drift.top1_agreement <= 1
            below = dry.drift.kl / 2  # the same edit, held to half the drift it causes
            with pytest.raises(FailedPrecondition, match=r"max_drift.max_kl: with this edit the mean KL on the \d+ "
                                                         r"drift probes would be .* nothing was applied or journaled"):
                client.edit(_fact(0), max_drift_kl=below, **FAST)
            # a heavy-handed edit changes most probes' top token (about 7 % agree on the tiny model)
            strong = {**FAST, "steps": 20, "learning_rate": 0.5, "norm_constraint": 10.0}
            with pytest.raises(FailedPrecondition, match=r"max_drift.min_top1_agreement: with this edit the top-1 "
                                                         r"agreement on the \d+ drift probes would be 0\.\d+, under "
                                                         r"the budget of 0.5"):
                client.edit(_fact(0), min_top1_agreement=0.5, **strong)
            assert _state(client) == before  # nothing journaled, nothing applied
            for bad, named in (({"max_drift_kl": -1.0}, "max_drift.max_kl"), ({"max_drift_kl": math.nan}, "max_kl"),
                               ({"min_top1_agreement": 1.5}, "max_drift.min_top1_agreement")):
                with pytest.raises(InvalidArgument, match=rf"{named}.*must be a finite number in \[0, "):
                    client.edit(_fact(0), **bad, **FAST)
            accepted = client.edit(_fact(0), max_drift_kl=dry.drift.kl * 2, **FAST)
            assert accepted.applied and accepted.drift.kl == pytest.approx(dry.drift.kl, rel=1e-4)
        assert server.metric("editserve_edits_total", method="ft_l", status="rejected_drift") == 2
    finally:
        server.stop()


def test_the_server_default_budget_applies_to_every_edit(tiny_model_dir, tmp_path):
    server = start_server(str(tiny_model_dir), tmp_path / "state", tmp_path / "logs", "--max-drift-kl", "1e-12",
                          timeout=120)
    try:
        with server.client() as client:
            with pytest.raises(FailedPrecondition, match=r"^FAILED_PRECONDITION: max_drift_kl: with this edit"):
                client.edit(_fact(1), **FAST)
            assert client.model_info().revision == 0
            loosened = client.edit(_fact(1), max_drift_kl=100.0, **FAST)  # an editor's explicit budget replaces it
            assert loosened.applied and loosened.drift.max_kl == 100.0
    finally:
        server.stop()
