"""Who may edit, without a server: configuration checks, the policy table against the proto,
token files and their rotation, and role decisions on real metadata and auth contexts."""

from __future__ import annotations

import grpc
import pytest
from click.testing import CliRunner

from editserve.client._pb import editing_pb2, inference_pb2
from editserve.client.cli import main
from editserve.client.security import ChannelSecurity
from editserve.server.auth import POLICY, AccessPolicy, Role, _Denied, startup_warnings
from editserve.server.config import ServeConfig
from editserve.server.tokens import TokenFile, TokenFileError, read_token
from tests.certs import CertificateAuthority

EDITOR = "e" * 32
READER = "r" * 32


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "editor").write_text(EDITOR + "\n")
    (tmp_path / "reader").write_text(READER)
    ca = CertificateAuthority(tmp_path / "pki", "unit")
    server = ca.issue_server()
    return {"dir": tmp_path, "editor": str(tmp_path / "editor"), "reader": str(tmp_path / "reader"),
            "ca": str(ca.cert), "cert": str(server.cert), "key": str(server.key)}


def test_every_rpc_of_the_api_has_a_declared_role():
    methods = {f"/{service.full_name}/{method.name}"
               for module in (inference_pb2, editing_pb2)
               for service in module.DESCRIPTOR.services_by_name.values()
               for method in service.methods}
    assert methods == set(POLICY)
    assert all(role is Role.EDITOR for name, role in POLICY.items() if "/editserve.v1.Editing/" in name)
    assert all(role is Role.READER for name, role in POLICY.items() if "/editserve.v1.Inference/" in name)


def test_default_is_open_and_warned():
    config = ServeConfig()
    policy = AccessPolicy.from_config(config)
    assert policy.required("/editserve.v1.Editing/Edit") is Role.NONE
    assert policy.required("/editserve.v1.Inference/Generate") is Role.NONE
    [warning] = startup_warnings(config)
    assert "Editing service is open" in warning and "docs/SECURITY.md" in warning


@pytest.mark.parametrize("overrides, message", [
    ({"editor_token_file": "/nonexistent/token"}, "cannot read it"),
    ({"editor_token_file": "{dir}/empty"}, "is empty"),
    ({"editor_token_file": "{dir}/short"}, "at least 16 are required"),
    ({"editor_token_file": "{dir}/spaced"}, "visible ASCII without whitespace"),
    ({"tls_cert_file": "{cert}"}, "tls_cert_file and tls_key_file go together"),
    ({"tls_key_file": "{key}"}, "tls_cert_file and tls_key_file go together"),
    ({"tls_cert_file": "{editor}", "tls_key_file": "{key}"}, "not a PEM file"),
    ({"tls_client_ca_file": "{ca}"}, "needs TLS"),
    ({"editor_identities": ("ops",)}, "need tls_client_ca_file"),
    ({"editor_identities": "ops"}, "must be a list of strings"),
    ({"reader_token_file": "{reader}"}, "would leave Editing open"),
    ({"editor_token_file": "{editor}", "reader_token_file": "{dir}/same"}, "hold the same token"),
])
def test_security_options_are_checked_at_start_up(files, overrides, message):
    (files["dir"] / "empty").write_text("\n")
    (files["dir"] / "short").write_text("abc")
    (files["dir"] / "spaced").write_text("a token with spaces in it")
    (files["dir"] / "same").write_text(EDITOR)
    values = {k: v.format(**files) if isinstance(v, str) else v for k, v in overrides.items()}
    with pytest.raises(ValueError, match=message):
        ServeConfig(**values)


def test_a_full_configuration_is_accepted_and_no_longer_warned(files):
    config = ServeConfig(tls_cert_file=files["cert"], tls_key_file=files["key"], tls_client_ca_file=files["ca"],
                         editor_identities=["editor-bot"], editor_token_file=files["editor"],
                         reader_token_file=files["reader"])
    assert config.editor_identities == ("editor-bot",) and config.editing_protected and config.tls
    assert startup_warnings(config) == []
    plaintext = ServeConfig(editor_token_file=files["editor"])
    assert [w for w in startup_warnings(plaintext) if "plaintext" in w]


def test_toml_and_flags_are_validated_together(files):
    toml = files["dir"] / "serve.toml"
    toml.write_text(f'version = 1\n[serve]\ntls_cert_file = "{files["cert"]}"\neditor_identities = []\n')
    config = ServeConfig.load(toml, tls_key_file=files["key"])  # the pair is complete only with the flag
    assert config.tls and config.editor_identities == ()


def test_serve_refuses_a_bad_configuration_before_loading_anything(files):
    result = CliRunner().invoke(main, ["serve", "--editor-token-file", files["dir"] / "missing"])
    assert result.exit_code == 2 and "cannot read it" in result.output, result.output


def test_token_file_rotation_and_a_half_written_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(EDITOR)
    now = [0.0]
    token = TokenFile(path, check_interval=1.0, clock=lambda: now[0])
    assert token.matches(EDITOR.encode()) and not token.matches(READER.encode())
    rotated = tmp_path / "token.new"
    rotated.write_text("n" * 40)
    rotated.replace(path)  # the atomic swap a Kubernetes Secret update does
    now[0] = 0.5
    assert token.matches(EDITOR.encode())  # checked at most once a second
    now[0] = 1.5
    assert token.matches(b"n" * 40) and not token.matches(EDITOR.encode())
    path.write_text("")  # a non-atomic rewrite caught half-way: keep the last good token
    now[0] = 3.0
    assert token.matches(b"n" * 40)
    path.unlink()
    now[0] = 4.5
    assert token.matches(b"n" * 40)
    path.write_text("m" * 20)
    now[0] = 6.0
    assert token.matches(b"m" * 20)
    with pytest.raises(TokenFileError, match="is empty"):
        (tmp_path / "blank").write_text("  \n")
        read_token(tmp_path / "blank")


def _policy(files, **extra) -> AccessPolicy:
    return AccessPolicy(editor_token=TokenFile(files["editor"]), reader_token=TokenFile(files["reader"]), **extra)


@pytest.mark.parametrize("metadata, role", [
    ((), Role.NONE),
    ((("authorization", f"Bearer {EDITOR}"),), Role.EDITOR),
    ((("authorization", f"bearer   {READER} "),), Role.READER),
])
def test_tokens_prove_roles(files, metadata, role):
    assert _policy(files).role_of(metadata, {})[0] is role


@pytest.mark.parametrize("metadata, message", [
    ((("authorization", "Bearer wrong-token-0123456789"),), "not valid"),
    ((("authorization", f"Basic {EDITOR}"),), "must be 'Bearer <token>'"),
    ((("authorization", "Bearer"),), "must be 'Bearer <token>'"),
    ((("authorization", f"Bearer {EDITOR}"), ("authorization", f"Bearer {READER}")), "one 'authorization'"),
])
def test_bad_authorization_is_unauthenticated_and_never_echoed(files, metadata, message):
    with pytest.raises(_Denied) as denied:
        _policy(files).check("/editserve.v1.Editing/Edit", Role.EDITOR, metadata, {})
    assert denied.value.code is grpc.StatusCode.UNAUTHENTICATED and message in denied.value.message
    assert EDITOR not in denied.value.message and "wrong-token" not in denied.value.message


def test_client_certificates_prove_roles_under_mtls(files):
    policy = _policy(files, editor_identities=frozenset({"editor-bot", "spiffe://ops/editor"}),
                     client_certificates=True)
    san = {"x509_common_name": [b"laptop"], "x509_subject_alternative_name": [b"spiffe://ops/editor"]}
    assert policy.role_of((), {"x509_common_name": [b"editor-bot"]})[0] is Role.EDITOR
    assert policy.role_of((), san)[0] is Role.EDITOR
    role, seen = policy.role_of((), {"x509_common_name": [b"reader-app"]})
    assert role is Role.READER and "reader-app" in seen
    with pytest.raises(_Denied) as denied:
        policy.check("/editserve.v1.Editing/Revert", Role.EDITOR, (), {"x509_common_name": [b"reader-app"]})
    assert denied.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert "Revert needs the editor role; client certificate 'reader-app' grants reader" == denied.value.message
    # a token raises the role of a certificate; it never lowers it
    assert policy.role_of((("authorization", f"Bearer {EDITOR}"),), {"x509_common_name": [b"reader-app"]})[0] \
        is Role.EDITOR
    # without mTLS configured, auth context names are ignored
    assert _policy(files).role_of((), {"x509_common_name": [b"editor-bot"]})[0] is Role.NONE


def test_health_and_reflection_are_never_guarded(files):
    policy = _policy(files, editor_identities=frozenset({"x"}), client_certificates=True)
    assert policy.required("/grpc.health.v1.Health/Check") is Role.NONE
    assert policy.required("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is Role.NONE
    assert policy.required("/editserve.v1.Editing/NotYetDeclared") is Role.EDITOR  # deny by default


def test_client_security_options():
    with pytest.raises(ValueError, match="needs its key"):
        ChannelSecurity(cert_file="client.pem")
    with pytest.raises(ValueError, match="visible ASCII"):
        ChannelSecurity(token="two words")
    security = ChannelSecurity(token=" abc\n")
    assert security.metadata() == (("authorization", "Bearer abc"),) and not security.uses_tls
    assert "abc" not in repr(security)
    assert ChannelSecurity(server_name="editserve.internal").uses_tls
