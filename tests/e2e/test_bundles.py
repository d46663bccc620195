"""Moving edits between servers as bundles, and the canary flow, over real sockets: each
server has its own journal; a bundle carries the same bytes, nothing is recomputed."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from editserve.client import FailedPrecondition, InvalidArgument
from tests.e2e.test_edit_lifecycle import FAST, _fact
from tests.server_process import start_server

pytestmark = pytest.mark.e2e


@pytest.fixture()
def servers(tiny_model_dir, tmp_path):
    started = []

    def start(name: str):
        started.append(start_server(str(tiny_model_dir), tmp_path / name, tmp_path / "logs" / name, timeout=120))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def _digest(client) -> str:
    return client.model_info(include_weights_digest=True).weights_digest


def _drift_at(client, revision: int, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while (info := client.model_info()).drift_revision != revision:
        assert time.monotonic() < deadline, info
        time.sleep(0.05)
    return info


def _rewrite_manifest(bundle: bytes, change) -> bytes:
    """The bundle with its manifest passed through ``change`` (a hostile or foreign bundle)."""
    source, out = tarfile.open(fileobj=io.BytesIO(bundle)), io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as target:
        for member in source:
            data = source.extractfile(member).read()
            if member.name == "manifest.json":
                data = json.dumps(change(json.loads(data))).encode()
                member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    return out.getvalue()


def test_a_bundle_moves_edits_bit_exactly_and_only_once(servers):
    a, b = servers("a"), servers("b")
    with a.client() as client_a, b.client() as client_b:
        pristine = _digest(client_b)
        first = client_a.edit(_fact(0), description="from a", **FAST)
        client_a.edit(_fact(1), **FAST)
        bundle = client_a.export_edits()
        dry = client_b.import_edits(bundle, dry_run=True, max_drift_kl=100.0)
        assert [e.skipped for e in dry.edits] == [False, False] and all(not e.edit_id for e in dry.edits)
        assert dry.revision == 0 and _digest(client_b) == pristine  # a dry run applies nothing

        imported = client_b.import_edits(bundle)
        assert [e.revision for e in imported.edits] == [1, 2] and imported.revision == 2
        assert imported.edits[0].source_edit_id == first.edit_id
        assert _digest(client_b) == _digest(client_a)  # the same bytes, composed the same way
        info = client_b.get_edit(imported.edits[0].edit_id)
        assert info.description == "from a" and info.facts[0].subject == "Danielle Darrieux"
        # the drift the import's check previewed (both edits at once) is what serving them measures
        assert _drift_at(client_b, 2).drift_kl == pytest.approx(dry.drift.kl, rel=1e-4)

        again = client_b.import_edits(bundle)  # already active here: nothing happens
        assert all(e.skipped for e in again.edits) and again.revision == 2
        client_b.revert(imported.edits[1].edit_id)
        client_b.revert(imported.edits[0].edit_id)
        assert _digest(client_b) == pristine  # an imported edit reverts exactly


def test_foreign_damaged_or_unknown_bundles_change_nothing(servers):
    a, b = servers("a"), servers("b")
    with a.client() as client_a, b.client() as client_b:
        client_a.edit(_fact(0), **FAST)
        bundle = client_a.export_edits()
        with pytest.raises(FailedPrecondition, match="exported from another base model"):
            client_b.import_edits(_rewrite_manifest(bundle, lambda m: {**m, "model_fingerprint": "0" * 16}))
        damaged = bytearray(bundle)
        artifact = tarfile.open(fileobj=io.BytesIO(bundle)).getmember("artifacts/0.safetensors")
        damaged[artifact.offset_data + artifact.size - 1] ^= 0xFF  # a tensor's last byte
        with pytest.raises(InvalidArgument, match=r"edits\[0\]: artifacts/0.safetensors does not match its sha256"):
            client_b.import_edits(bytes(damaged))
        with pytest.raises(InvalidArgument, match="not a readable tar"):
            client_b.import_edits(b"garbage" * 100)
        with pytest.raises(InvalidArgument, match=r"edits\[0\].method 'bogus' is not a method"):
            client_b.import_edits(_rewrite_manifest(bundle, lambda m: {**m, "edits": [
                {**m["edits"][0], "method": "bogus"}]}))
        with pytest.raises(InvalidArgument, match=r"edits\[0\].facts are not valid facts"):
            client_b.import_edits(_rewrite_manifest(bundle, lambda m: {**m, "edits": [
                {**m["edits"][0], "facts": [{"prompt": 3}]}]}))
        with pytest.raises(FailedPrecondition, match="max_drift.max_kl"):
            client_b.import_edits(bundle, max_drift_kl=1e-12)
        with pytest.raises(InvalidArgument, match="edit_ids: each id needs 1 to 64 characters"):
            client_b.export_edits(["x" * 65])
        with pytest.raises(InvalidArgument, match="edit_ids: each id needs 1 to 64 characters"):
            client_b.consolidate(["x" * 65])
        with pytest.raises(InvalidArgument, match="max_drift.max_kl"):
            client_b.consolidate([], max_drift_kl=-1.0)
        assert client_b.model_info().revision == 0 and client_b.list_edits(include_reverted=True) == []
        with pytest.raises(FailedPrecondition, match="no active edit to export"):
            client_b.export_edits()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "editserve.client.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_canary_syncs_edits_watches_and_promotes(servers):
    fleet, canary = servers("fleet"), servers("canary")
    with fleet.client() as client:
        client.edit(_fact(0), **FAST)  # the fleet's edit set, which the canary must start from
    sets = [f"--set={k}={v}" for k, v in FAST.items() if k != "method"]
    done = _cli("canary", "start", "--server", fleet.target, "--canary", canary.target, "--prompt",
                "The mother tongue of {} is", "--subject", "Michael Jordan", "--target", "French", "--method", "ft_l",
                *sets, "--watch", "2", "--max-drift-kl", "10", "--promote")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "canary synced to the fleet: 1 edit(s) imported" in done.stdout
    assert "fleet (" in done.stdout and "1 edit(s) imported" in done.stdout.split("fleet (")[1]
    with fleet.client() as client_f, canary.client() as client_c:
        assert client_f.model_info().active_edits == client_c.model_info().active_edits == 2
        assert _digest(client_f) == _digest(client_c)
        canary_edit = client_c.list_edits()[-1].edit_id
    rolled = _cli("canary", "rollback", canary_edit, "--canary", canary.target)
    assert rolled.returncode == 0 and f"reverted {canary_edit}" in rolled.stdout
    refused = _cli("canary", "start", "--server", fleet.target, "--canary", canary.target, "--prompt",
                   "The mother tongue of {} is", "--subject", "Steve Jobs", "--target", "Dutch", "--method", "ft_l",
                   *sets, "--watch", "0", "--max-drift-kl", "1e-12", "--promote")
    assert refused.returncode == 2 and "max_drift.max_kl" in refused.stderr
    with fleet.client() as client:
        assert client.model_info().active_edits == 2  # nothing promoted
