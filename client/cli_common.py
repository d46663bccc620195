"""What the `editserve` verbs share: how a command reaches a server (``Connection`` and its
options), method options from the command line, facts files, JSON output and failing."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from .errors import EditserveError
from .security import read_token_file
from .sync import EditserveClient
from .types import Fact


@dataclass(frozen=True)
class Connection:
    """Where and how a command reaches a server, from --server, the TLS options and
    --token-file (the token is read when the command line is parsed)."""

    server: str | None
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    token: str | None = field(default=None, repr=False)

    def client(self) -> EditserveClient:
        return EditserveClient(self.server or "localhost:50051", tls=self.tls, tls_ca_file=self.tls_ca,
                               tls_cert_file=self.tls_cert, tls_key_file=self.tls_key,
                               tls_server_name=self.tls_server_name, token=self.token)


def connection_options(*, server_default: str | None = "localhost:50051",
                       server_envvar: str | None = "EDITSERVE_SERVER",
                       server_help: str = "host:port of a running editserve."):
    """--server, --tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name and --token-file,
    handed to the command as one ``connection`` argument."""
    file_type = click.Path(exists=True, dir_okay=False, path_type=Path)
    options = [
        click.option("--server", default=server_default, show_default=server_default is not None,
                     envvar=server_envvar, help=server_help),
        click.option("--tls", is_flag=True, help="Use TLS (implied by the other --tls-* options); without "
                                                 "--tls-ca the system's roots verify the server."),
        click.option("--tls-ca", type=file_type, default=None, envvar="EDITSERVE_TLS_CA",
                     help="PEM CA that signed the server's certificate (env EDITSERVE_TLS_CA)."),
        click.option("--tls-cert", type=file_type, default=None, envvar="EDITSERVE_TLS_CERT",
                     help="PEM client certificate, for a server that requires mTLS (env EDITSERVE_TLS_CERT)."),
        click.option("--tls-key", type=file_type, default=None, envvar="EDITSERVE_TLS_KEY",
                     help="PEM key of --tls-cert (env EDITSERVE_TLS_KEY)."),
        click.option("--tls-server-name", default=None, help="Name to verify in the server's certificate "
                                                             "when it differs from --server's host."),
        click.option("--token-file", type=file_type, default=None, envvar="EDITSERVE_TOKEN_FILE",
                     help="File holding the bearer token sent on every call (env EDITSERVE_TOKEN_FILE)."),
    ]

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, server, tls, tls_ca, tls_cert, tls_key, tls_server_name, token_file, **kwargs):
            if bool(tls_cert) != bool(tls_key):
                raise click.UsageError("--tls-cert and --tls-key go together")
            token = None
            if token_file is not None:
                try:
                    token = read_token_file(token_file)
                except ValueError as error:
                    raise click.BadParameter(str(error), param_hint="--token-file") from None
            connection = Connection(server, tls, tls_ca, tls_cert, tls_key, tls_server_name, token)
            return command(*args, connection=connection, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


CONNECTION_OPTIONS = connection_options()


def _emit_json(value) -> None:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    elif isinstance(value, list):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    click.echo(json.dumps(value, indent=2))


def _typed(raw: str) -> int | float | bool | str | list:
    if "," in raw:  # a list option, e.g. layers=3,4,5
        return [_typed(part.strip()) for part in raw.split(",") if part.strip()]
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(raw.lower(), raw)


def _edit_options(method: str, layer: int | None, pairs: tuple[str, ...]) -> dict:
    """--layer and --set KEY=VALUE as request options, checked against the method's options
    message before anything runs (a typo fails at once, not after a model has loaded)."""
    from .convert import edit_request

    options: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        options[key.strip()] = _typed(raw.strip())
    if layer is not None:
        options["layer"] = layer
    try:
        edit_request(Fact("{} is", "x", "y"), method=method, **options)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--set") from None
    return options


def _facts_from_file(path: Path) -> list[Fact]:
    try:
        records = json.loads(path.read_text())
        if not isinstance(records, list):
            raise ValueError("expected a JSON list of facts")
        return [Fact(r["prompt"], r["subject"], r["target_new"], r.get("target_true", ""),
                     tuple(r.get("paraphrase_prompts", ())), tuple(r.get("neighborhood_prompts", ())))
                for r in records]
    except (ValueError, KeyError, TypeError) as error:
        raise click.BadParameter(f"{path}: {error!r}", param_hint="--facts") from None


# statuses after which an Edit may have been applied without the reply arriving
OUTCOME_UNKNOWN = frozenset({"DEADLINE_EXCEEDED", "UNAVAILABLE", "CANCELLED", "INTERNAL", "UNKNOWN"})

SET_OPTION = click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                          help="Method option for every edit, e.g. steps=40 (repeatable; see the proto's options).")


def _fail(error: EditserveError) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(2)
