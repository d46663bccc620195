"""How a client reaches a server: TLS (optionally with a client certificate) and a bearer token.

Shared by the sync and asyncio clients so both build channels and send credentials the same
way. Files are read when a client is built, never at import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

PathLike = str | Path


def read_token_file(path: PathLike) -> str:
    """The token in a file, surrounding whitespace (a trailing newline) stripped."""
    try:
        token = Path(path).read_text(encoding="ascii", errors="strict").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"token file {path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


@dataclass(frozen=True)
class ChannelSecurity:
    """``tls``: use TLS even without a CA file (the system's roots verify the server).
    ``ca_file``: PEM roots that signed the server's certificate. ``cert_file``/``key_file``: the
    client's certificate for mTLS. ``server_name``: the name to verify in the server's
    certificate when it differs from the target's host. ``token``: sent on every call as
    ``authorization: Bearer <token>``."""

    tls: bool = False
    ca_file: PathLike | None = None
    cert_file: PathLike | None = None
    key_file: PathLike | None = None
    server_name: str | None = None
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate needs its key: give both cert_file and key_file, or neither")
        if self.token is not None:
            token = self.token.strip()
            if not token or any(not 0x21 <= ord(c) <= 0x7E for c in token):
                raise ValueError("the token must be visible ASCII without whitespace")
            object.__setattr__(self, "token", token)

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls or self.ca_file or self.cert_file or self.server_name)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        def read(path: PathLike | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Per-call metadata. Sent as metadata rather than call credentials so a token also
        reaches a plaintext server behind a TLS-terminating proxy or on loopback; gRPC's call
        credentials refuse insecure channels."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def sync_channel(self, target: str) -> grpc.Channel:
        if self.uses_tls:
            return grpc.secure_channel(target, self.channel_credentials(), options=self.channel_options())
        return grpc.insecure_channel(target)

    def aio_channel(self, target: str) -> grpc.aio.Channel:
        if self.uses_tls:
            return grpc.aio.secure_channel(target, self.channel_credentials(), options=self.channel_options())
        return grpc.aio.insecure_channel(target)
