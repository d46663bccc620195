"""Who may edit, end to end: `editserve serve` in a subprocess with real certificates (made
here) and token files, the real clients and CLI over a socket.

Two servers, one per configuration, each shared by its tests: TLS with editor and reader
tokens; mTLS with an allow-list of client identities and an editor token."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from editserve.client import (
    AsyncEditserveClient,
    EditserveClient,
    Fact,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from editserve.client.cli import main
from tests.certs import CertificateAuthority
from tests.server_process import start_server

pytestmark = pytest.mark.e2e

EDITOR = "editor-" + "0123456789abcdef" * 2
READER = "reader-" + "fedcba9876543210" * 2
FAST = {"method": "ft_l", "layer": 1, "steps": 4, "learning_rate": 1e-2, "norm_constraint": 0.05}
FACT = Fact("The mother tongue of {} is", "Danielle Darrieux", "English")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(root / "ca", "editserve-test")
    rogue = CertificateAuthority(root / "rogue", "rogue")
    (root / "editor.token").write_text(EDITOR + "\n")
    (root / "reader.token").write_text(READER + "\n")
    return {
        "root": root, "ca": ca.cert, "rogue_ca": rogue.cert, "server": ca.issue_server(),
        "editor_bot": ca.issue("editor-bot"),  # allow-listed by its CN
        "ops_laptop": ca.issue("ops-laptop", dns=("editor.ops.example",)),  # allow-listed by a SAN
        "reader_app": ca.issue("reader-app"),  # signed by the CA, not on the allow-list
        "rogue_bot": rogue.issue("editor-bot"),  # the right name from the wrong CA
        "editor_token": root / "editor.token", "reader_token": root / "reader.token",
    }


def _serve(tiny_model_dir, tmp_path_factory, name: str, args: list[str], client_options: dict):
    root = tmp_path_factory.mktemp(name)
    return start_server(str(tiny_model_dir), root / "state", root / "logs", "--no-prepare-statistics", *args,
                        timeout=120, client_options=client_options)


@pytest.fixture(scope="module")
def tls_server(tiny_model_dir, tmp_path_factory, pki):
    """TLS (no client certificates), an editor token and a reader token."""
    server = _serve(tiny_model_dir, tmp_path_factory, "tls", [
        "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key),
        "--editor-token-file", str(pki["editor_token"]), "--reader-token-file", str(pki["reader_token"]),
    ], {"tls_ca_file": pki["ca"]})
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def mtls_server(tiny_model_dir, tmp_path_factory, pki):
    """mTLS: client certificates required; editor-bot (CN) and editor.ops.example (SAN) edit;
    the editor token also edits; no reader token, so any certificate the CA signed reads."""
    reader_app = pki["reader_app"]
    server = _serve(tiny_model_dir, tmp_path_factory, "mtls", [
        "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key),
        "--tls-client-ca", str(pki["ca"]), "--editor-identity", "editor-bot",
        "--editor-identity", "editor.ops.example", "--editor-token-file", str(pki["editor_token"]),
    ], {"tls_ca_file": pki["ca"], "tls_cert_file": reader_app.cert, "tls_key_file": reader_app.key})
    yield server
    assert server.stop() == 0, server.log()


# --- TLS + tokens --------------------------------------------------------------------------

def test_health_and_reflection_need_no_credential(tls_server, pki):
    with tls_server.client() as client:
        assert client.health() == "SERVING"
    channel = grpc.secure_channel(tls_server.target, grpc.ssl_channel_credentials(pki["ca"].read_bytes()))
    stub = health_pb2_grpc.HealthStub(channel)
    assert stub.Check(health_pb2.HealthCheckRequest(service="editserve.v1.Editing")).status \
        == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    assert "editserve.v1.Editing" in set(ProtoReflectionDescriptorDatabase(channel).get_services())
    channel.close()


def test_editing_needs_the_editor_token(tls_server):
    with tls_server.client() as anonymous, pytest.raises(Unauthenticated, match="Edit needs an editor credential"):
        anonymous.edit(FACT, **FAST)
    with tls_server.client(token=READER) as reader:
        for call in (lambda: reader.edit(FACT, **FAST), lambda: reader.revert("x"), reader.list_edits,
                     lambda: reader.get_edit("x"), lambda: reader.trace("The Space Needle is in", "Space Needle")):
            with pytest.raises(PermissionDenied, match="needs the editor role; the reader token grants reader"):
                call()
    with tls_server.client(token=EDITOR) as editor:
        result = editor.edit(FACT, **FAST)
        assert result.applied and [e.edit_id for e in editor.list_edits()] == [result.edit_id]
        assert editor.revert(result.edit_id).edit_id == result.edit_id
        with pytest.raises(NotFound):
            editor.get_edit("no-such-edit")
    assert tls_server.metric("editserve_requests_total", rpc="Edit", code="UNAUTHENTICATED") >= 1
    assert tls_server.metric("editserve_requests_total", rpc="Edit", code="PERMISSION_DENIED") >= 1


def test_inference_needs_the_reader_token_when_one_is_configured(tls_server):
    with tls_server.client() as anonymous:
        with pytest.raises(Unauthenticated, match="Generate needs a reader credential"):
            anonymous.generate("hello", max_new_tokens=2)
        with pytest.raises(Unauthenticated):
            list(anonymous.stream("hello", max_new_tokens=2))
    for token in (READER, EDITOR):  # editor credentials pass as reader
        with tls_server.client(token=token) as client:
            assert client.generate("hello", max_new_tokens=2, ignore_eos=True).generated_tokens == 2
            assert client.model_info().num_layers == 4


def test_a_wrong_or_malformed_token_is_unauthenticated_and_not_echoed(tls_server, pki):
    wrong = "wrong-" + EDITOR[6:]
    with tls_server.client(token=wrong) as client, pytest.raises(Unauthenticated) as error:
        client.edit(FACT, **FAST)
    assert "not valid" in error.value.details and wrong not in error.value.details and EDITOR not in str(error.value)
    channel = grpc.secure_channel(tls_server.target, grpc.ssl_channel_credentials(pki["ca"].read_bytes()))
    from editserve.client._pb import editing_pb2, editing_pb2_grpc

    with pytest.raises(grpc.RpcError) as raw:
        editing_pb2_grpc.EditingStub(channel).ListEdits(editing_pb2.ListEditsRequest(),
                                                        metadata=(("authorization", f"Basic {EDITOR}"),))
    assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED and EDITOR not in raw.value.details()
    channel.close()
    assert EDITOR not in tls_server.log() and READER not in tls_server.log()


def test_tls_verifies_the_server_and_refuses_plaintext(tls_server, pki):
    with EditserveClient(tls_server.target, tls_ca_file=pki["rogue_ca"]) as client, pytest.raises(Unavailable):
        client.health(timeout=5)
    with EditserveClient(tls_server.target) as plaintext, pytest.raises(Unavailable):
        plaintext.health(timeout=5)
    # the certificate names localhost: a client reaching it by another name says which name to check
    with EditserveClient(tls_server.target, tls_ca_file=pki["ca"], tls_server_name="localhost") as client:
        assert client.health() == "SERVING"


def test_async_client_sends_tls_and_token(tls_server, pki):
    async def run():
        async with AsyncEditserveClient(tls_server.target, tls_ca_file=pki["ca"], token=READER) as client:
            result = await client.generate("Hi", max_new_tokens=3, ignore_eos=True)
            chunks = [c async for c in client.stream("Hi", max_new_tokens=3, ignore_eos=True)]
            try:
                await client.list_edits()
            except PermissionDenied:
                return result, chunks
            raise AssertionError("a reader listed edits")

    result, chunks = asyncio.run(run())
    assert result.generated_tokens == 3 and "".join(c.text for c in chunks) == result.text


def _rotate(path, token: str) -> None:
    fresh = path.with_suffix(".new")
    fresh.write_text(token + "\n")
    fresh.replace(path)  # atomic, as the kubelet swaps a Secret volume


def _wait_until_accepted(server, token: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    with server.client(token=token) as client:
        while True:
            try:
                client.list_edits()
                return
            except Unauthenticated:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def test_editor_token_rotates_without_restart(tls_server, pki):
    rotated = "rotated-" + "5a" * 16
    _rotate(pki["editor_token"], rotated)
    try:
        _wait_until_accepted(tls_server, rotated)
        with tls_server.client(token=EDITOR) as old, pytest.raises(Unauthenticated):
            old.list_edits()
    finally:
        _rotate(pki["editor_token"], EDITOR)
        _wait_until_accepted(tls_server, EDITOR)
    assert "changed: the new token is in use" in tls_server.log()


# --- mTLS ----------------------------------------------------------------------------------

def _as(server, pki, who: str, **kw) -> EditserveClient:
    issued = pki[who]
    return server.client(tls_cert_file=issued.cert, tls_key_file=issued.key, **kw)


def test_allow_listed_client_certificates_may_edit(mtls_server, pki):
    with _as(mtls_server, pki, "editor_bot") as client:
        result = client.edit(FACT, **FAST)
        assert result.applied
        assert client.revert(result.edit_id).edit_id == result.edit_id
    with _as(mtls_server, pki, "ops_laptop") as client:  # by its SAN
        assert client.list_edits() == []


def test_a_certificate_off_the_allow_list_reads_but_may_not_edit(mtls_server, pki):
    with mtls_server.client() as client:  # reader-app
        assert client.health() == "SERVING"
        assert client.generate("hello", max_new_tokens=2, ignore_eos=True).generated_tokens == 2
        with pytest.raises(PermissionDenied, match="client certificate 'reader-app' grants reader"):
            client.edit(FACT, **FAST)
    with mtls_server.client(token=EDITOR) as client:  # the editor token raises its role
        assert client.list_edits() == []


def test_mtls_handshake_needs_a_certificate_from_the_client_ca(mtls_server, pki):
    with EditserveClient(mtls_server.target, tls_ca_file=pki["ca"]) as no_cert, pytest.raises(Unavailable):
        no_cert.health(timeout=5)
    with _as(mtls_server, pki, "rogue_bot") as rogue, pytest.raises(Unavailable):
        rogue.health(timeout=5)
    with _as(mtls_server, pki, "editor_bot", tls_ca_file=pki["rogue_ca"]) as wrong_roots, pytest.raises(Unavailable):
        wrong_roots.health(timeout=5)


def _cli(server, pki, who: str, *args: str, env: dict | None = None):
    issued = pki[who]
    tls = ["--server", server.target, "--tls-ca", str(pki["ca"]), "--tls-cert", str(issued.cert),
           "--tls-key", str(issued.key)]
    verb, *rest = args
    return CliRunner().invoke(main, [verb, *tls, *rest], env=env)


def test_cli_with_tls_options_and_token_file(mtls_server, pki):
    assert _cli(mtls_server, pki, "reader_app", "health").output.strip() == "SERVING"
    denied = _cli(mtls_server, pki, "reader_app", "edits")
    assert denied.exit_code == 2 and "PERMISSION_DENIED" in denied.output, denied.output
    allowed = _cli(mtls_server, pki, "reader_app", "edits", "--token-file", str(pki["editor_token"]))
    assert allowed.exit_code == 0 and "no edits" in allowed.output, allowed.output
    by_env = _cli(mtls_server, pki, "reader_app", "edits", env={"EDITSERVE_TOKEN_FILE": str(pki["editor_token"])})
    assert by_env.exit_code == 0 and "no edits" in by_env.output, by_env.output
    generated = _cli(mtls_server, pki, "reader_app", "generate", "hello", "--max-new-tokens", "2", "--no-stream")
    assert generated.exit_code == 0, generated.output
    missing = _cli(mtls_server, pki, "reader_app", "edits", "--tls-key", str(pki["reader_app"].key),
                   "--token-file", str(pki["root"] / "nope"))
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_eval_through_a_server_with_mtls(mtls_server, pki, tmp_path):
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps([
        {"subject": "Danielle Darrieux", "src": "What language does Danielle Darrieux speak?", "alt": "English",
         "answers": ["French"], "rephrase": "Which language is spoken by Danielle Darrieux?",
         "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"},
    ]))
    result = _cli(mtls_server, pki, "editor_bot", "eval", "--method", "ft_l", "--dataset", str(data), "--n", "1",
                  "--layer", "1", "--set", "steps=4")
    assert result.exit_code == 0, result.output
    assert "| edited |" in result.output and "Reverts checked (P(new) back to its pre-edit value): 1/1" in result.output
