"""Who may call what: roles, the one policy table, and the gRPC interceptor enforcing it.

Two roles. An **editor** changes what the model knows (and may do everything a reader may);
a **reader** asks it things. A caller proves a role with a bearer token (metadata
``authorization: Bearer <token>``, compared in constant time against the token files) or,
under mTLS, with its client certificate: an identity (subject CN or any SAN) on the
``editor_identities`` allow-list is an editor, any other certificate the client CA signed is a
reader (the handshake already proved who it is).

A method's requirement is declared once, in :data:`POLICY`. Editor methods are open only
when no editor credential is configured at all (today's default, warned about at start-up);
reader methods are open unless a reader token is configured. Health and reflection are never
guarded: orchestrators probe them without credentials.

No credential for a guarded method is UNAUTHENTICATED, a malformed or unknown token too; a
valid credential of too low a role is PERMISSION_DENIED. Messages name the method, the role
it needs and the kind of credential seen, never a token.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import grpc

from .config import ServeConfig
from .tokens import TokenFile

log = logging.getLogger(__name__)


class Role(enum.IntEnum):
    """Ordered: a higher role may call everything a lower one may."""

    NONE = 0
    READER = 1
    EDITOR = 2


_INFERENCE = "/editserve.v1.Inference/"
_EDITING = "/editserve.v1.Editing/"

# The whole policy. Trace sits with the editors: it reads no secret, but it holds the edit
# mutex for seconds of CPU per call, so a reader able to call it could stall every Edit.
# ListEdits and GetEdit too: the journal records what operators corrected and why (the
# descriptions), which is the operators' business, not every production caller's.
POLICY: Mapping[str, Role] = MappingProxyType({
    _INFERENCE + "Generate": Role.READER,
    _INFERENCE + "GenerateStream": Role.READER,
    _INFERENCE + "GetModelInfo": Role.READER,
    _INFERENCE + "Score": Role.READER,
    _EDITING + "Edit": Role.EDITOR,
    _EDITING + "Revert": Role.EDITOR,
    _EDITING + "ListEdits": Role.EDITOR,
    _EDITING + "GetEdit": Role.EDITOR,
    _EDITING + "Trace": Role.EDITOR,
    _EDITING + "ExportEdits": Role.EDITOR,  # artifacts say what operators corrected, like ListEdits
    _EDITING + "ImportEdits": Role.EDITOR,
    _EDITING + "Consolidate": Role.EDITOR,
})
# Services every caller may use; any other method not in POLICY needs an editor (deny by default).
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


class _Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _unauthenticated(message: str) -> _Denied:
    return _Denied(grpc.StatusCode.UNAUTHENTICATED, message)


@dataclass(frozen=True)
class AccessPolicy:
    """The credentials a server accepts and what each method requires of its caller."""

    editor_token: TokenFile | None = None
    reader_token: TokenFile | None = None
    editor_identities: frozenset[str] = frozenset()
    client_certificates: bool = False  # mTLS: a verified client certificate proves at least a reader

    @classmethod
    def from_config(cls, config: ServeConfig) -> AccessPolicy:
        return cls(
            editor_token=TokenFile(config.editor_token_file) if config.editor_token_file else None,
            reader_token=TokenFile(config.reader_token_file) if config.reader_token_file else None,
            editor_identities=frozenset(config.editor_identities),
            client_certificates=bool(config.tls_client_ca_file),
        )

    def required(self, method: str) -> Role:
        """The role ``method`` (``/package.Service/Method``) needs under this configuration."""
        if method.startswith(OPEN_SERVICES):
            return Role.NONE
        role = POLICY.get(method, Role.EDITOR)
        if role is Role.EDITOR and self.editor_token is None and not self.editor_identities:
            return Role.NONE  # nothing configured: open, as before (warned at start-up)
        if role is Role.READER and self.reader_token is None:
            return Role.NONE
        return role

    def role_of(self, metadata: tuple, auth_context: Mapping[str, list[bytes]]) -> tuple[Role, str]:
        """The highest role the caller's credentials prove, and a description of them that is
        safe to print (the kind of credential, a certificate name; never a token)."""
        token_role, token_seen = self._token_role(metadata)
        cert_role, cert_seen = self._certificate_role(auth_context)
        if token_role >= cert_role:
            return token_role, token_seen or cert_seen
        return cert_role, cert_seen

    def _token_role(self, metadata: tuple) -> tuple[Role, str]:
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            return Role.NONE, ""
        if len(values) > 1:
            raise _unauthenticated("send one 'authorization' metadata entry, not several")
        scheme, _, token = str(values[0]).strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthenticated("the 'authorization' metadata must be 'Bearer <token>'")
        presented = token.encode("utf-8", "surrogateescape")
        # both comparisons always run: the time taken does not say which token was close
        is_editor = self.editor_token is not None and self.editor_token.matches(presented)
        is_reader = self.reader_token is not None and self.reader_token.matches(presented)
        if is_editor:
            return Role.EDITOR, "the editor token"
        if is_reader:
            return Role.READER, "the reader token"
        raise _unauthenticated("the bearer token is not valid")

    def _certificate_role(self, auth_context: Mapping[str, list[bytes]]) -> tuple[Role, str]:
        if not self.client_certificates:
            return Role.NONE, ""
        common = [v.decode(errors="replace") for v in auth_context.get("x509_common_name", [])]
        alternative = [v.decode(errors="replace") for v in auth_context.get("x509_subject_alternative_name", [])]
        names = common + alternative
        if not names:
            return Role.NONE, ""
        shown = f"client certificate {names[0]!r}"
        if self.editor_identities.intersection(names):
            return Role.EDITOR, shown
        return Role.READER, shown

    def check(self, method: str, required: Role, metadata: tuple,
              auth_context: Mapping[str, list[bytes]]) -> None:
        """Raise :class:`_Denied` unless the caller holds ``required`` for ``method``."""
        role, seen = self.role_of(metadata, auth_context)
        name = method.rsplit("/", 1)[-1]
        wanted = "an editor" if required is Role.EDITOR else "a reader"
        if role is Role.NONE:
            how = "'authorization: Bearer <token>'"
            if required is Role.EDITOR and self.editor_identities:
                how += " or an allow-listed client certificate"
            raise _unauthenticated(f"{name} needs {wanted} credential ({how}); none was sent")
        if role < required:
            raise _Denied(grpc.StatusCode.PERMISSION_DENIED,
                          f"{name} needs the {required.name.lower()} role; {seen} grants {role.name.lower()}")


class AuthInterceptor(grpc.ServerInterceptor):
    """Wraps every guarded method's handler with the policy check. The check runs inside the
    handler because only the handler's context carries the peer's verified certificate;
    unguarded methods (health, reflection, anything open by configuration) pass untouched.
    ``on_denied(rpc, code)`` lets the server count refusals beside its other requests."""

    def __init__(self, policy: AccessPolicy,
                 on_denied: Callable[[str, grpc.StatusCode], None] | None = None) -> None:
        self.policy = policy
        self.on_denied = on_denied

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return None
        required = self.policy.required(method)
        if required is Role.NONE:
            return handler

        def guard(context: grpc.ServicerContext) -> None:
            try:
                self.policy.check(method, required, context.invocation_metadata() or (), context.auth_context())
            except _Denied as denied:
                rpc = method.rsplit("/", 1)[-1]
                log.info("%s from %s refused: %s", rpc, context.peer(), denied.message)
                if self.on_denied is not None:
                    self.on_denied(rpc, denied.code)
                context.abort(denied.code, denied.message)

        return _guarded(handler, guard)


def _guarded(handler: grpc.RpcMethodHandler, guard: Callable[[grpc.ServicerContext], None]) -> grpc.RpcMethodHandler:
    """The same handler with ``guard(context)`` run before the method (eagerly, also for
    streaming methods, so a refused stream never starts)."""

    def wrap(behavior):
        def guarded(request_or_iterator, context):
            guard(context)
            return behavior(request_or_iterator, context)

        return guarded

    serializers = {"request_deserializer": handler.request_deserializer,
                   "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **serializers)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **serializers)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **serializers)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **serializers)


def server_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files (None: plaintext). With a client CA every
    client must present a certificate it signed; the handshake fails otherwise."""
    if not config.tls:
        return None
    client_ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes())],
        root_certificates=client_ca, require_client_auth=client_ca is not None,
    )


def startup_warnings(config: ServeConfig) -> list[str]:
    """What an operator should know about this server's exposure, logged at start-up."""
    warnings = []
    if not config.editing_protected:
        warnings.append(
            f"the Editing service is open: anyone who can reach {config.host}:{config.port} may Edit and Revert "
            "the served model. Set editor_token_file (or mTLS with editor_identities); see docs/SECURITY.md")
    if (config.editor_token_file or config.reader_token_file) and not config.tls:
        warnings.append("bearer tokens are configured but TLS is not: tokens cross the network in plaintext "
                        "unless a proxy or mesh encrypts the connection. Set tls_cert_file and tls_key_file")
    return warnings
