"""No silent first-edit wait: the server prepares the default layers' key statistics in the
background after start-up, says so in a metric, and an Edit that has to wait for them (or
compute them) says so in its reply."""

from __future__ import annotations

import time

import pytest

from editserve.client import Fact
from tests.server_process import start_server

pytestmark = pytest.mark.e2e


def test_first_edit_says_it_waited_and_the_metric_turns_ready(tiny_model_dir, tmp_path):
    # a fresh statistics cache, so the preparation really runs
    server = start_server(str(tiny_model_dir), tmp_path / "state", tmp_path / "logs",
                          "--cache-dir", str(tmp_path / "cache"), timeout=120)
    try:
        with server.client() as client:
            # ROME with the shipped statistics options: exactly what the server prepares
            result = client.edit(Fact("The mother tongue of {} is", "Danielle Darrieux", "English"),
                                 method="rome", steps=2, dry_run=True)
        assert any("waited" in note or "estimating key statistics" in note for note in result.notes), result.notes
        deadline = time.monotonic() + 60
        while server.metric("editserve_key_statistics_ready") != 1:
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.2)
        assert server.metric("editserve_key_statistics_prepare_seconds") > 0
        with server.client() as client:
            again = client.edit(Fact("The mother tongue of {} is", "Michael Jordan", "English"),
                                method="rome", steps=2, dry_run=True)
        assert again.notes == []
        assert "key statistics ready" in server.log()
    finally:
        assert server.stop() == 0


def test_shutdown_during_preparation_is_clean(tiny_model_dir, tmp_path):
    server = start_server(str(tiny_model_dir), tmp_path / "state", tmp_path / "logs",
                          "--cache-dir", str(tmp_path / "cache"), timeout=120)
    assert server.stop() == 0
    assert "Traceback" not in server.log()
