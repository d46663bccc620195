"""The edit journal: SQLite (WAL) for the log, safetensors files for the artifacts.

Write-ahead discipline, so a crash at any instant leaves a consistent story:
1. the artifact file is written to a temporary name, fsynced, and renamed (atomic);
2. the edit row and its "apply" event are committed in one transaction;
3. only then is the edit applied in memory.
A revert commits its "revert" event and status change before the weights change. On start-up
every edit whose row says ACTIVE is replayed from its artifact (no recomputation); an
artifact file without a row (a crash between 1 and 2) is deleted. The revision is the count
of apply/revert events, so it survives restarts and never goes backwards.

Schema 2 records each edit's artifact kind (weight delta or runtime layer), and replay loads
the file as exactly that kind, so a file is never applied as something it is not. Schema 3
adds each edit's idempotency key (unique; with the digest of the request it was made from and
the reply's reports, so a retry gets the original reply) and its quarantine reason (an
artifact found missing or corrupt at start-up: the edit stays in the journal, is not
replayed, and the file is moved to ``artifacts/quarantine/``). Older journals are migrated in
place on open, in one transaction, so a crash leaves either the old or the new schema. The
meta table also holds the base model's fingerprint; a journal of another model is refused
rather than replayed onto wrong weights.

A failed apply or revert after its commit is compensated (:meth:`Journal.undo_apply`,
:meth:`Journal.undo_revert`: the last event and its row change are taken back in one
transaction), so the journal never claims a state the weights do not have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from editserve.editing.artifacts import Artifact, read_header, save_artifact
from editserve.editing.artifacts import load_artifact as load_artifact_file
from editserve.editing.registry import ArtifactKind

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
QUARANTINE_DIR = "quarantine"  # under artifacts/: files of quarantined edits, kept for inspection

# One column definition for new journals and for the ALTERs of a migration, so both layouts
# match (columns a migration adds go last, in this order). Defaults only fill rows that
# predate a column: every v1 edit was a weight delta; no v1/v2 edit had a key or a quarantine.
_KIND_COLUMN = (
    "kind TEXT NOT NULL DEFAULT 'weight_delta' "
    f"CHECK (kind IN ({', '.join(repr(k.value) for k in ArtifactKind)}))"
)
_V3_COLUMNS = (
    ("idempotency_key", "idempotency_key TEXT"),  # NULL: none (the unique index skips NULLs)
    ("request_sha256", "request_sha256 TEXT NOT NULL DEFAULT ''"),
    ("outcome", "outcome TEXT NOT NULL DEFAULT '{}'"),  # the reply's reports and notes (JSON)
    ("quarantined", "quarantined TEXT NOT NULL DEFAULT ''"),  # why; empty: not quarantined
)
# Schema 4: consolidation (docs/LIFELONG.md). An edit that replaced others lists them; an edit
# replaced by one names it, and stays "active" in the log but is not applied while it is.
_V4_COLUMNS = (
    ("consolidates", "consolidates TEXT NOT NULL DEFAULT '[]'"),  # JSON list of edit ids
    ("consolidated_into", "consolidated_into TEXT NOT NULL DEFAULT ''"),
)
_COLUMN_DEFS = (("kind", _KIND_COLUMN), *_V3_COLUMNS, *_V4_COLUMNS)
_KEY_INDEX = ("CREATE UNIQUE INDEX IF NOT EXISTS edits_idempotency_key ON edits(idempotency_key) "
              "WHERE idempotency_key IS NOT NULL")

_TABLES = (
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    f"""CREATE TABLE IF NOT EXISTS edits(
    edit_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    method TEXT NOT NULL,
    facts TEXT NOT NULL,
    options TEXT NOT NULL,
    layers TEXT NOT NULL,
    parameters TEXT NOT NULL,
    delta_norm REAL NOT NULL,
    created REAL NOT NULL,
    compute_seconds REAL NOT NULL,
    description TEXT NOT NULL,
    artifact TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'reverted')),
    applied_revision INTEGER NOT NULL,
    reverted_revision INTEGER NOT NULL DEFAULT 0,
    {", ".join(definition for _name, definition in _COLUMN_DEFS)}
)""",
    """CREATE TABLE IF NOT EXISTS events(
    revision INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('apply', 'revert')),
    edit_id TEXT NOT NULL REFERENCES edits(edit_id),
    at REAL NOT NULL
)""",
)

# Named, not positional: a migrated table and a new one need not agree on column order.
_EDIT_COLUMNS = (
    "edit_id, seq, method, facts, options, layers, parameters, delta_norm, created, compute_seconds, "
    "description, artifact, sha256, status, applied_revision, reverted_revision, kind, "
    "idempotency_key, request_sha256, outcome, quarantined, consolidates, consolidated_into"
)


class JournalError(Exception):
    """The journal cannot be used (wrong model, corrupted artifact)."""


@dataclass(frozen=True)
class EditRecord:
    edit_id: str
    seq: int
    method: str
    facts: list[dict]
    options: dict
    layers: list[int]
    parameters: list[str]
    delta_norm: float
    created: float
    compute_seconds: float
    description: str
    artifact: str
    sha256: str
    status: str
    applied_revision: int
    reverted_revision: int
    kind: str  # an ArtifactKind value: what the artifact file must hold
    idempotency_key: str = ""
    request_sha256: str = ""
    outcome: dict = field(default_factory=dict)  # the original reply's reports and notes
    quarantined: str = ""  # why the edit's artifact could not be replayed; empty: it can
    consolidates: list[str] = field(default_factory=list)  # the edits this one replaced (consolidation)
    consolidated_into: str = ""  # the consolidation replacing this edit while it is active

    @property
    def state(self) -> str:
        """"active", "reverted", "quarantined" (active in the journal, not applied) or
        "consolidated" (active in the journal, served through the edit that replaced it)."""
        if self.status == "active" and self.quarantined:
            return "quarantined"
        if self.status == "active" and self.consolidated_into:
            return "consolidated"
        return self.status

    @property
    def applied(self) -> bool:
        """Whether its own artifact is part of what is served."""
        return self.state == "active"


class DuplicateKey(JournalError):
    """The idempotency key is already journaled (another attempt, maybe on another replica,
    committed first): the caller answers with that edit's reply."""


class JournalUnavailable(JournalError):
    """The journal's database cannot be reached right now (UNAVAILABLE: retry)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record_from_row(row: tuple) -> EditRecord:
    """An :class:`EditRecord` from a row of :data:`_EDIT_COLUMNS` (both journals' layout)."""
    (edit_id, seq, method, facts, options, layers, parameters, norm, created, compute, description,
     artifact, sha, status, applied, reverted, kind, key, request_sha, outcome, quarantined, consolidates,
     consolidated_into) = row
    return EditRecord(edit_id, seq, method, json.loads(facts), json.loads(options), json.loads(layers),
                      json.loads(parameters), norm, created, compute, description, artifact, sha,
                      status, applied, reverted, kind, key or "", request_sha, json.loads(outcome),
                      quarantined, json.loads(consolidates), consolidated_into)


class ArtifactFiles:
    """The artifact files in ``<state_dir>/artifacts``: written durably before their row
    commits, checked against the row's sha256 when read. The SQLite journal keeps its
    artifacts only here; the PostgreSQL journal stores each in the database too and uses this
    directory as the replica's local copy."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.artifacts = self.dir / "artifacts"
        self.artifacts.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex[:16]

    def write_artifact(self, edit_id: str, artifact: Artifact) -> tuple[str, str]:
        """Durably write the artifact file (either kind, typed header included); returns
        (file name, sha256)."""
        name = f"{edit_id}.safetensors"
        partial = self.artifacts / f".{name}.partial"
        save_artifact(artifact, partial, metadata={"edit_id": edit_id})
        with open(partial, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        self._publish_file(partial, name)
        return name, digest

    def write_bytes(self, name: str, data: bytes) -> None:
        """Durably write a file whose bytes came from elsewhere (a replica's copy of an artifact
        stored in the shared journal)."""
        partial = self.artifacts / f".{name}.partial"
        partial.write_bytes(data)
        self._publish_file(partial, name)

    def _publish_file(self, partial: Path, name: str) -> None:
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        partial.rename(self.artifacts / name)
        _fsync_dir(self.artifacts)

    def check_kind(self, artifact: str, kind: str) -> str:
        """The ArtifactKind value ``kind``, after checking the file's header holds that kind:
        a row that disagrees with its file would only fail at the next start-up's replay."""
        kind = ArtifactKind(kind).value
        written = read_header(self.artifacts / artifact).get("kind", ArtifactKind.WEIGHT_DELTA.value)
        if written != kind:
            raise JournalError(f"artifact {artifact} holds a {written}, not the {kind} the edit records")
        return kind

    def discard_artifact(self, name: str) -> None:
        """Delete a file whose edit was never committed (or was taken back)."""
        (self.artifacts / name).unlink(missing_ok=True)

    def file_matches(self, record: EditRecord) -> bool:
        path = self.artifacts / record.artifact
        return path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == record.sha256

    def artifact_bytes(self, record: EditRecord) -> bytes:
        """The bytes of the edit's artifact file, checked against its sha256 (an export)."""
        path = self.artifacts / record.artifact
        data = path.read_bytes() if path.exists() else b""
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise JournalError(f"artifact {path} of edit {record.edit_id} is missing or corrupted")
        return data

    def load_file(self, record: EditRecord) -> Artifact:
        """The edit's artifact file, checked against its sha256 and loaded as the kind its row records."""
        path = self.artifacts / record.artifact
        if not path.exists():
            raise JournalError(f"artifact {path} of edit {record.edit_id} is missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != record.sha256:
            raise JournalError(f"artifact {path} of edit {record.edit_id} is corrupted (sha256 mismatch)")
        try:
            return load_artifact_file(path, expected=ArtifactKind(record.kind))
        except ValueError as exc:  # ArtifactError: another kind, unknown format or entries
            raise JournalError(f"artifact of edit {record.edit_id} cannot be loaded: {exc}") from exc

    def set_aside(self, record: EditRecord) -> str | None:
        """Move a quarantined edit's file (if any) to ``artifacts/quarantine/``; returns where."""
        source = self.artifacts / record.artifact
        if not source.exists():
            return None
        aside = self.artifacts / QUARANTINE_DIR
        aside.mkdir(exist_ok=True)
        target = aside / record.artifact
        os.replace(source, target)
        _fsync_dir(self.artifacts)
        return str(target)

    def remove_files_except(self, known: set[str]) -> list[str]:
        """Delete artifact files that no committed row refers to (crash before commit)."""
        removed = []
        for path in self.artifacts.iterdir():
            if path.name not in known and path.is_file():  # quarantine/ is a directory
                path.unlink()
                removed.append(path.name)
        return removed


class Journal(ArtifactFiles):
    """The journal of one base model in ``state_dir`` (the embedded default: one server owns it).

    ``model_fingerprint`` identifies the base model (``ModelHost.fingerprint()``). A schema-1
    journal stored the older fingerprint (``ModelHost.legacy_fingerprint()``, which changed
    with the dtype and the transformers version); passing it in ``legacy_fingerprints`` lets
    such a journal open once more, and the migration rewrites it to ``model_fingerprint``.
    Legacy values are never accepted for a journal already at schema 2.
    """

    shared = False  # no other server writes it: nothing to follow

    def __init__(self, state_dir: Path, model_fingerprint: str, *,
                 legacy_fingerprints: Iterable[str] = ()) -> None:
        super().__init__(state_dir)
        # Held by every write transaction and every read: the connection is shared by threads,
        # and a read on it during another thread's open transaction would see that thread's
        # uncommitted rows (e.g. an edit whose commit check is about to roll it back).
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.dir / "journal.sqlite3", check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._open(model_fingerprint, tuple(legacy_fingerprints))
        except BaseException:
            self._db.close()
            raise

    # --- schema and meta ---------------------------------------------------------------
    def _columns(self, table: str) -> set[str]:
        return {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def _open(self, fingerprint: str, legacy: tuple[str, ...]) -> None:
        """Create, check or migrate the schema, all in one write transaction, so two processes
        opening the same directory cannot both migrate and a crash leaves no half state."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for statement in _TABLES:
                self._db.execute(statement)
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                # A new journal, or an old one whose creation stopped before its meta rows (so
                # it holds no edits yet): give its edits table the newer columns too.
                self._add_missing_columns()
                self._set_meta("schema_version", str(SCHEMA_VERSION))
                self._set_meta("model_fingerprint", fingerprint)
                return
            version = meta.get("schema_version")
            stored = meta.get("model_fingerprint")
            if version == "1":
                self._migrate_v1(stored, fingerprint, legacy)
                self._migrate_v2()
            elif version in ("2", "3"):
                if stored != fingerprint:
                    raise self._other_model(stored, fingerprint)
                self._migrate_v2()
            elif version != str(SCHEMA_VERSION):
                raise JournalError(
                    f"journal in {self.dir} has schema {version!r}; this version reads schemas 1 to "
                    f"{SCHEMA_VERSION} (a newer editserve wrote it?)"
                )
            elif stored != fingerprint:
                raise self._other_model(stored, fingerprint)

    def _other_model(self, stored: str | None, fingerprint: str) -> JournalError:
        return JournalError(
            f"journal in {self.dir} belongs to another model (fingerprint {stored}, "
            f"this model {fingerprint}); use another --state-dir"
        )

    def _migrate_v1(self, stored: str | None, fingerprint: str, legacy: tuple[str, ...]) -> None:
        """Schema 1 -> 2 inside the caller's transaction: add the ``kind`` column (every v1 edit
        was a weight delta) and store the new fingerprint. Refusing leaves the file untouched."""
        if stored != fingerprint and stored not in legacy:
            error = self._other_model(stored, fingerprint)
            raise JournalError(
                f"{error}. It is a schema-1 journal, whose fingerprint depended on the dtype and the "
                "transformers version: if it is this model's, open it once with the dtype and "
                "transformers version that wrote it, and it is migrated to a fingerprint without them"
            )
        if "kind" not in self._columns("edits"):
            self._db.execute(f"ALTER TABLE edits ADD COLUMN {_KIND_COLUMN}")
        self._set_meta("model_fingerprint", fingerprint)
        self._set_meta("schema_version", "2")
        edits = self._db.execute("SELECT COUNT(*) FROM edits").fetchone()[0]
        log.info("journal %s: migrated schema 1 -> 2 (%d edits recorded as weight deltas%s)", self.dir,
                 edits, "" if stored == fingerprint else f"; fingerprint {stored} -> {fingerprint}")

    def _add_missing_columns(self) -> None:
        present = self._columns("edits")
        for name, definition in _COLUMN_DEFS:
            if name not in present:
                self._db.execute(f"ALTER TABLE edits ADD COLUMN {definition}")
        self._db.execute(_KEY_INDEX)

    def _migrate_v2(self) -> None:
        """Schema 2 or 3 -> 4 inside the caller's transaction: the columns each lacks, added
        with defaults that describe its edits as they were (schema 3: idempotency key, request
        digest, reply outcome, quarantine; schema 4: consolidation, none of it yet). Replay is
        unchanged for them."""
        before = self.schema_version()
        self._add_missing_columns()
        self._set_meta("schema_version", str(SCHEMA_VERSION))
        edits = self._db.execute("SELECT COUNT(*) FROM edits").fetchone()[0]
        log.info("journal %s: migrated schema %d -> %d (%d edits)", self.dir, before, SCHEMA_VERSION, edits)

    def schema_version(self) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])

    def model_fingerprint(self) -> str:
        return self._db.execute("SELECT value FROM meta WHERE key = 'model_fingerprint'").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    # --- writes ------------------------------------------------------------------------
    def record_apply(
        self,
        *,
        edit_id: str,
        method: str,
        kind: str,
        facts: list[dict],
        options: dict,
        layers: list[int],
        parameters: list[str],
        delta_norm: float,
        compute_seconds: float,
        description: str,
        artifact: str,
        sha256: str,
        idempotency_key: str = "",
        request_sha256: str = "",
        outcome: dict | None = None,
        check: Callable[[], None] | None = None,
        consolidates: list[str] = (),
    ) -> int:
        """Commit the edit row and its apply event in one transaction; returns the new revision.
        ``consolidates``: the active edits this one replaces (each is marked consolidated into
        it in the same transaction; JournalError if one is no longer active and unreplaced).

        ``kind`` is required (no default) and must match the artifact file's header: a row
        that disagrees with its file would only fail at the next start-up's replay.
        ``check`` runs inside the transaction, holding the journal's write lock, right before
        the commit: raising there (the client gave up) commits nothing. A key already held
        raises sqlite3.IntegrityError (the caller looks the key up first, under its mutex).
        """
        kind = self.check_kind(artifact, kind)
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            revision = self._db.execute("SELECT COALESCE(MAX(revision), 0) + 1 FROM events").fetchone()[0]
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM edits").fetchone()[0]
            try:
                self._db.execute(
                    f"INSERT INTO edits ({_EDIT_COLUMNS}) VALUES "
                    "(?,?,?,?,?,?,?,?,?,?,?,?,?,'active',?,0,?,?,?,?,'',?,'')",
                    (edit_id, seq, method, json.dumps(facts), json.dumps(options), json.dumps(layers),
                     json.dumps(parameters), delta_norm, time.time(), compute_seconds, description,
                     artifact, sha256, revision, kind, idempotency_key or None, request_sha256,
                     json.dumps(outcome or {}), json.dumps(list(consolidates))),
                )
            except sqlite3.IntegrityError as error:
                if idempotency_key and self._by_key_locked(idempotency_key):
                    raise DuplicateKey(f"idempotency_key {idempotency_key!r} is already journaled") from error
                raise
            for member in consolidates:
                changed = self._db.execute(
                    "UPDATE edits SET consolidated_into = ? WHERE edit_id = ? AND status = 'active' "
                    "AND consolidated_into = '' AND quarantined = ''", (edit_id, member)).rowcount
                if changed != 1:
                    raise JournalError(f"edit {member} is no longer active on its own: it cannot be consolidated")
            self._db.execute("INSERT INTO events VALUES (?, 'apply', ?, ?)", (revision, edit_id, time.time()))
            if check is not None:
                check()
        return revision

    def undo_apply(self, edit_id: str, revision: int) -> None:
        """Take back a committed apply whose in-memory apply failed: its event (which must be
        the last one) and its row, in one transaction. The artifact file is left to the caller."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._require_last_event(revision, "apply", edit_id)
            self._db.execute("DELETE FROM events WHERE revision = ?", (revision,))
            self._db.execute("UPDATE edits SET consolidated_into = '' WHERE consolidated_into = ?", (edit_id,))
            self._db.execute("DELETE FROM edits WHERE edit_id = ?", (edit_id,))

    def undo_revert(self, edit_id: str, revision: int) -> None:
        """Take back a committed revert whose in-memory revert failed: the edit is active again."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._require_last_event(revision, "revert", edit_id)
            self._db.execute("DELETE FROM events WHERE revision = ?", (revision,))
            self._db.execute("UPDATE edits SET status = 'active', reverted_revision = 0 WHERE edit_id = ?",
                             (edit_id,))
            members = json.loads(self._db.execute("SELECT consolidates FROM edits WHERE edit_id = ?",
                                                  (edit_id,)).fetchone()[0])
            for member in members:  # a consolidation's revert freed them: they are replaced again
                self._db.execute("UPDATE edits SET consolidated_into = ? WHERE edit_id = ? AND status = 'active'",
                                 (edit_id, member))

    def _require_last_event(self, revision: int, kind: str, edit_id: str) -> None:
        last = self._db.execute("SELECT revision, kind, edit_id FROM events ORDER BY revision DESC LIMIT 1").fetchone()
        if last is None or tuple(last) != (revision, kind, edit_id):
            raise JournalError(f"cannot undo the {kind} of edit {edit_id} at revision {revision}: the last event "
                               f"is {last}")

    def quarantine(self, edit_id: str, reason: str) -> str | None:
        """Mark an edit whose artifact cannot be replayed, with the reason, and move its file (if
        any) to ``artifacts/quarantine/`` for inspection; returns where it went. The edit stays
        in the journal (its revision and key too); replay skips it from now on."""
        record = self.get(edit_id)
        if record is None:
            raise KeyError(edit_id)
        moved = self.set_aside(record)
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE edits SET quarantined = ? WHERE edit_id = ?", (reason or "quarantined", edit_id))
        return moved

    def record_revert(self, edit_id: str) -> int:
        """Commit the revert of an edit; returns the new revision. Reverting a consolidation
        makes the edits it replaced active on their own again; reverting an edit that is
        consolidated first reverts its consolidation (its own event), then the edit: the others
        it replaced are served on their own again, exactly as if never consolidated."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT status, consolidated_into FROM edits WHERE edit_id = ?",
                                   (edit_id,)).fetchone()
            if row is None or row[0] != "active":
                raise KeyError(edit_id)
            revision = self._db.execute("SELECT COALESCE(MAX(revision), 0) FROM events").fetchone()[0]
            if row[1]:
                revision += 1
                self._revert_row(row[1], revision)
            revision += 1
            self._revert_row(edit_id, revision)
        return revision

    def _revert_row(self, edit_id: str, revision: int) -> None:
        self._db.execute("UPDATE edits SET status = 'reverted', reverted_revision = ? WHERE edit_id = ?",
                         (revision, edit_id))
        self._db.execute("UPDATE edits SET consolidated_into = '' WHERE consolidated_into = ?", (edit_id,))
        self._db.execute("INSERT INTO events VALUES (?, 'revert', ?, ?)", (revision, edit_id, time.time()))

    # --- reads ---------------------------------------------------------------------------
    def _read(self, query: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(query, args).fetchall()

    def revision(self) -> int:
        return self._read("SELECT COALESCE(MAX(revision), 0) FROM events")[0][0]

    def _records(self, where: str = "", args: tuple = ()) -> list[EditRecord]:
        rows = self._read(f"SELECT {_EDIT_COLUMNS} FROM edits {where} ORDER BY seq", args)
        return [record_from_row(row) for row in rows]

    def _by_key_locked(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM edits WHERE idempotency_key = ?", (key,)).fetchone() is not None

    def get(self, edit_id: str) -> EditRecord | None:
        found = self._records("WHERE edit_id = ?", (edit_id,))
        return found[0] if found else None

    def count_quarantined(self) -> int:
        """Edits active in the journal but not applied (their artifacts went bad)."""
        return self._read("SELECT COUNT(*) FROM edits WHERE status = 'active' AND quarantined != ''")[0][0]

    def by_key(self, idempotency_key: str) -> EditRecord | None:
        """The edit made under ``idempotency_key``, if any."""
        found = self._records("WHERE idempotency_key = ?", (idempotency_key,))
        return found[0] if found else None

    def list(self, include_reverted: bool = False) -> list[EditRecord]:
        """Edits in journal order: active ones (quarantined included), or all."""
        return self._records("" if include_reverted else "WHERE status = 'active'")

    def snapshot(self) -> tuple[list[EditRecord], int]:
        """The active edits and the revision they make, read together (replay's starting point)."""
        with self._lock:
            return self.list(), self.revision()

    def events_after(self, revision: int) -> list[tuple[int, str, str]]:
        """(revision, "apply" or "revert", edit id) of every event past ``revision``, in order:
        what a server at ``revision`` has not applied. Empty for a journal one server owns,
        unless it fell behind through a compensated failure."""
        return [tuple(row) for row in self._read(
            "SELECT revision, kind, edit_id FROM events WHERE revision > ? ORDER BY revision", (revision,))]

    def load_artifact(self, record: EditRecord) -> Artifact:
        """The edit's artifact, checked against its sha256 and loaded as the kind its row records."""
        return self.load_file(record)

    def remove_orphans(self) -> list[str]:
        """Delete artifact files that no committed row refers to (crash before commit)."""
        return self.remove_files_except({r.artifact for r in self._records()})
