"""CLI verbs for moving edits between servers: ``export``, ``import`` and the ``canary`` flow.

A canary here is a server with its own journal (a one-replica Deployment beside the fleet, in
front of a share of the traffic), not a member of the fleet's shared journal: whatever it
serves never reaches the fleet until promoted. ``canary start`` brings it to the fleet's edit
set (a bundle of the fleet's active edits, imported; what it already has is skipped), makes
the edit there, watches it for a while (still serving, nobody else editing it, its drift on
the probes within the budget), then promotes it (the canary's bundle of that one edit,
imported into the fleet: the same bytes, the budget checked again on the fleet) or leaves it
to ``canary promote`` / ``canary rollback``. docs/OPERATIONS.md walks through it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import click

from editserve.editing.registry import METHODS

from .cli_common import CONNECTION_OPTIONS, Connection, _edit_options, _facts_from_file, _fail
from .errors import EditserveError
from .types import Fact, ImportResult

CANARY_OPTION = click.option("--canary", "canary_server", required=True, envvar="EDITSERVE_CANARY",
                             help="host:port of the canary server (its own journal; the same credentials as "
                                  "--server).")
BUDGET = [
    click.option("--max-drift-kl", type=float, default=None,
                 help="Refuse (and roll back) if the probes' mean KL would pass this (nats)."),
    click.option("--min-top1-agreement", type=float, default=None,
                 help="Refuse (and roll back) if the probes' top-1 agreement would fall under this."),
]


def _budget(command):
    for option in reversed(BUDGET):
        command = option(command)
    return command


def _report_import(result: ImportResult, where: str) -> None:
    applied = [e for e in result.edits if e.edit_id]
    skipped = sum(e.skipped for e in result.edits)
    drift = (f"; drift with them: KL {result.drift.kl:.4g}, top-1 agreement {result.drift.top1_agreement:.3f}"
             if result.drift else "")
    click.echo(f"{where}: {len(applied)} edit(s) imported, {skipped} already there; revision {result.revision}{drift}")


@click.command(name="export")
@click.argument("edit_ids", nargs=-1)
@CONNECTION_OPTIONS
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Bundle file to write.")
def export_edits(edit_ids: tuple[str, ...], connection: Connection, out: Path) -> None:
    """Write a bundle of edits (default: every active one) to a file, for `editserve import`."""
    with connection.client() as client:
        try:
            bundle = client.export_edits(edit_ids)
        except EditserveError as error:
            _fail(error)
    out.write_bytes(bundle)
    click.echo(f"wrote {out} ({len(bundle)} bytes)")


@click.command(name="import")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@CONNECTION_OPTIONS
@click.option("--dry-run", is_flag=True, help="Check the bundle (model, files, drift budget) and apply nothing.")
@_budget
def import_edits(bundle: Path, connection: Connection, dry_run: bool, max_drift_kl: float | None,
                 min_top1_agreement: float | None) -> None:
    """Apply a bundle's edits (the same bytes; edits already active are skipped)."""
    with connection.client() as client:
        try:
            result = client.import_edits(bundle.read_bytes(), dry_run=dry_run, max_drift_kl=max_drift_kl,
                                         min_top1_agreement=min_top1_agreement)
        except EditserveError as error:
            _fail(error)
    _report_import(result, "dry run (nothing applied)" if dry_run else connection.server or "server")


@click.group()
def canary() -> None:
    """Try an edit on a canary server, then promote it to the fleet or roll it back."""


@canary.command()
@CONNECTION_OPTIONS
@CANARY_OPTION
@click.option("--prompt", required=True, help='Template with "{}" for the subject.')
@click.option("--subject", required=True)
@click.option("--target", "target_new", required=True)
@click.option("--target-true", default="")
@click.option("--facts", "facts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON list of facts written in one edit; replaces --prompt/--subject/--target.")
@click.option("--method", default="rome", show_default=True, type=click.Choice(sorted(METHODS)))
@click.option("--layer", type=int, default=None)
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Method option (repeatable).")
@click.option("--description", default="")
@click.option("--watch", "watch_seconds", type=click.FloatRange(0, 86400), default=60.0, show_default=True,
              help="Seconds the canary must keep serving the edit, within the drift budget, before promotion.")
@click.option("--promote/--no-promote", default=False,
              help="Promote to the fleet when the watch passes (default: print the commands instead).")
@_budget
def start(connection: Connection, canary_server: str, prompt: str, subject: str, target_new: str,
          target_true: str, facts_file: Path | None, method: str, layer: int | None, settings: tuple[str, ...],
          description: str, watch_seconds: float, promote: bool, max_drift_kl: float | None,
          min_top1_agreement: float | None) -> None:
    """Sync the canary to the fleet, edit it, watch it, then promote (or print how)."""
    facts = _facts_from_file(facts_file) if facts_file else [Fact(prompt, subject, target_new, target_true)]
    canary_connection = replace(connection, server=canary_server)
    options = _edit_options(method, layer, settings)
    budget = {"max_drift_kl": max_drift_kl, "min_top1_agreement": min_top1_agreement}
    with connection.client() as fleet, canary_connection.client() as target:
        try:
            if fleet.model_info().active_edits:
                _report_import(target.import_edits(fleet.export_edits()), "canary synced to the fleet")
            result = target.edit(facts, method=method, description=description, **budget, **options)
        except EditserveError as error:
            _fail(error)
        drift = f" (drift KL {result.drift.kl:.4g}, top-1 {result.drift.top1_agreement:.3f})" if result.drift else ""
        click.echo(f"canary: edit {result.edit_id} applied at revision {result.revision}{drift}; watching "
                   f"{watch_seconds:.0f} s")
        problem = _watch(target, result.revision, watch_seconds, max_drift_kl, min_top1_agreement)
        if problem:
            click.echo(f"canary: {problem}; rolling back", err=True)
            try:
                target.revert(result.edit_id)
            except EditserveError as error:
                click.echo(f"canary: the rollback failed too: {error}", err=True)
            sys.exit(1)
        if not promote:
            click.echo(f"canary: passed. Promote: editserve canary promote {result.edit_id} --canary "
                       f"{canary_connection.server} --server {connection.server}\n"
                       f"        Roll back: editserve canary rollback {result.edit_id} --canary "
                       f"{canary_connection.server}")
            return
        _promote(fleet, target, result.edit_id, budget, connection.server)


def _watch(target, revision: int, seconds: float, max_kl: float | None, min_top1: float | None) -> str:
    """What went wrong on the canary during the watch ("" if nothing): it stopped serving,
    something else changed its edits, or its drift passed the budget."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if target.health() != "SERVING":
                return "the canary stopped serving"
            info = target.model_info()
        except EditserveError as error:
            return f"the canary cannot be reached ({error})"
        if info.revision != revision:
            return f"the canary's edits changed during the watch (revision {revision} -> {info.revision})"
        if info.drift_revision == revision:
            if max_kl and info.drift_kl > max_kl:
                return f"its drift KL {info.drift_kl:.4g} passed the budget of {max_kl:g}"
            if min_top1 and info.drift_top1_agreement < min_top1:
                return f"its top-1 agreement {info.drift_top1_agreement:.3f} fell under {min_top1:g}"
        if time.monotonic() >= deadline:
            if info.drift_revision != revision:
                return "the canary never measured its drift at the edit's revision during the watch"
            return ""
        time.sleep(min(2.0, max(0.05, deadline - time.monotonic())))


def _promote(fleet, target, edit_id: str, budget: dict, where: str | None) -> None:
    try:
        result = fleet.import_edits(target.export_edits([edit_id]), **budget)
    except EditserveError as error:
        _fail(error)
    _report_import(result, f"fleet ({where})")


@canary.command()
@click.argument("edit_id")
@CONNECTION_OPTIONS
@CANARY_OPTION
@_budget
def promote(edit_id: str, connection: Connection, canary_server: str, max_drift_kl: float | None,
            min_top1_agreement: float | None) -> None:
    """Import a canary's edit into the fleet (the same bytes; the budget is checked there too)."""
    with connection.client() as fleet, replace(connection, server=canary_server).client() as target:
        _promote(fleet, target, edit_id, {"max_drift_kl": max_drift_kl, "min_top1_agreement": min_top1_agreement},
                 connection.server)


@canary.command()
@click.argument("edit_id")
@CONNECTION_OPTIONS
@CANARY_OPTION
def rollback(edit_id: str, connection: Connection, canary_server: str) -> None:
    """Revert the edit on the canary (the fleet never had it); --server is not used."""
    with replace(connection, server=canary_server).client() as target:
        try:
            result = target.revert(edit_id)
        except EditserveError as error:
            _fail(error)
    click.echo(f"canary: reverted {edit_id}; revision {result.revision}")
