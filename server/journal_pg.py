"""The shared journal: PostgreSQL (psycopg 3) holds the log *and* the artifacts, so a fleet of
replicas serves one edit set.

Why the artifacts go into the database too: an edit is computed once, by the replica that
received it, and every other replica must read exactly those bytes. Storing them in the same
transaction as the edit's row and event makes "the row is committed" and "the artifact can be
read by everyone" the same fact (no object store to keep consistent with the log). Each
replica keeps a local copy in ``<state_dir>/artifacts`` (written before the commit by the
computing replica, fetched on first use by the others) and checks it against the row's
sha256 on every read; a bad local copy is fetched again, never quarantined.

Revisions stay the number of events, fleet-wide: every write transaction takes one advisory
lock (``pg_advisory_xact_lock``), so revisions are assigned one at a time and never collide,
and announces its revision on the ``editserve_journal`` channel (``pg_notify``, delivered on
commit) for the replicas' followers (:mod:`.replica`).

The log is append-only here. A failed in-memory apply or revert is compensated by a *new*
event (a revert of the edit, or its re-apply), not by deleting the last one as the embedded
journal does: another replica may already have applied that event.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from editserve.editing.artifacts import Artifact

from .journal import (
    _EDIT_COLUMNS,
    ArtifactFiles,
    DuplicateKey,
    EditRecord,
    JournalError,
    JournalUnavailable,
    record_from_row,
)

log = logging.getLogger(__name__)

PG_SCHEMA_VERSION = 1
CHANNEL = "editserve_journal"  # NOTIFY channel: the payload is the committed revision
_LOCK_KEY = 0x65646974  # advisory lock every writer holds: one event at a time, fleet-wide
CONNECT_TIMEOUT_SECONDS = 10
ARTIFACT_CHUNK_BYTES = 64 << 20  # rows of editserve_artifacts (a bytea holds at most 1 GB)

_TABLES = (
    "CREATE TABLE IF NOT EXISTS editserve_meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS editserve_edits(
    edit_id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL UNIQUE,
    method TEXT NOT NULL,
    facts TEXT NOT NULL,
    options TEXT NOT NULL,
    layers TEXT NOT NULL,
    parameters TEXT NOT NULL,
    delta_norm DOUBLE PRECISION NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    compute_seconds DOUBLE PRECISION NOT NULL,
    description TEXT NOT NULL,
    artifact TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'reverted')),
    applied_revision BIGINT NOT NULL,
    reverted_revision BIGINT NOT NULL DEFAULT 0,
    kind TEXT NOT NULL CHECK (kind IN ('weight_delta', 'runtime_layer')),
    idempotency_key TEXT UNIQUE,
    request_sha256 TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL DEFAULT '{}',
    quarantined TEXT NOT NULL DEFAULT '',
    consolidates TEXT NOT NULL DEFAULT '[]',
    consolidated_into TEXT NOT NULL DEFAULT ''
)""",
    """CREATE TABLE IF NOT EXISTS editserve_events(
    revision BIGINT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('apply', 'revert')),
    edit_id TEXT NOT NULL REFERENCES editserve_edits(edit_id),
    at DOUBLE PRECISION NOT NULL
)""",
    # in chunks: a bytea value holds at most 1 GB, and a 10,000-fact MEMIT edit of an 8B model
    # is ~4 GB (docs/ARCHITECTURE.md, "Cost model of a fleet")
    """CREATE TABLE IF NOT EXISTS editserve_artifacts(
    edit_id TEXT NOT NULL REFERENCES editserve_edits(edit_id),
    chunk INTEGER NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (edit_id, chunk)
)""",
)


def _psycopg():
    try:
        import psycopg
    except ImportError as error:  # the server extra installs it; a bare client install may not have it
        raise JournalError(f"a PostgreSQL journal needs psycopg 3: pip install 'psycopg[binary]' ({error})") from None
    return psycopg


def connect(url: str, password_file: str = "", *, autocommit: bool = True):
    """A psycopg connection to the journal's database; the password, if any, is read from
    ``password_file`` at each connect (a mounted Kubernetes Secret may be rotated)."""
    psycopg = _psycopg()
    extra = {}
    if password_file:
        extra["password"] = Path(password_file).read_text().strip()
    try:
        return psycopg.connect(url, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT_SECONDS, **extra)
    except psycopg.OperationalError as error:
        raise JournalUnavailable(f"cannot reach the journal database: {error}".strip()) from error


class PostgresJournal(ArtifactFiles):
    """The journal of one base model in a PostgreSQL database, shared by every replica.

    ``state_dir`` is this replica's own directory (its local artifact copies); replicas must
    not share it. Same interface as :class:`.journal.Journal`, plus what a follower needs.
    """

    shared = True  # other servers write it: follow its events

    def __init__(self, url: str, state_dir: Path, model_fingerprint: str, *, password_file: str = "") -> None:
        super().__init__(state_dir)
        self.url, self.password_file = url, password_file
        self._psycopg = _psycopg()
        self._lock = threading.RLock()  # one transaction at a time on the shared connection
        self._conn = None
        self._open(model_fingerprint)

    # --- connection ----------------------------------------------------------------------
    def _connection(self):
        """The open connection, checked with a round trip first (~0.1 ms): one the server or a
        proxy dropped while idle is replaced before a transaction starts on it, so a restarted
        database fails no request once it is back."""
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.execute("SELECT 1")
                return self._conn
            except self._psycopg.OperationalError:
                self._conn.close()
        self._conn = connect(self.url, self.password_file)
        return self._conn

    @contextmanager
    def _transaction(self, *, repeatable: bool = False) -> Iterator:
        """A cursor inside one transaction (committed on exit, rolled back on an exception).
        A lost connection is JournalUnavailable and is reopened by the next call."""
        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction(), conn.cursor() as cursor:
                    if repeatable:
                        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    yield cursor
            except self._psycopg.OperationalError as error:
                if self._conn is not None:
                    self._conn.close()
                raise JournalUnavailable(f"the journal database failed: {error}".strip()) from error

    def _read(self, query: str, args: tuple = ()) -> list[tuple]:
        with self._transaction() as cursor:
            return cursor.execute(query, args).fetchall()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()

    # --- schema and meta -----------------------------------------------------------------
    def _open(self, fingerprint: str) -> None:
        """Create or check the schema under the writers' lock, so replicas starting together
        create it once."""
        with self._transaction() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            for statement in _TABLES:
                cursor.execute(statement)
            meta = dict(cursor.execute("SELECT key, value FROM editserve_meta").fetchall())
            if not meta:
                cursor.execute("INSERT INTO editserve_meta VALUES ('schema_version', %s), ('model_fingerprint', %s)",
                               (str(PG_SCHEMA_VERSION), fingerprint))
                return
            if meta.get("schema_version") != str(PG_SCHEMA_VERSION):
                raise JournalError(f"the journal database has schema {meta.get('schema_version')!r}; this version "
                                   f"reads schema {PG_SCHEMA_VERSION} (a newer editserve wrote it?)")
            if meta.get("model_fingerprint") != fingerprint:
                raise JournalError(f"the journal database belongs to another model (fingerprint "
                                   f"{meta.get('model_fingerprint')}, this model {fingerprint}); use another database")

    def schema_version(self) -> int:
        return int(self._read("SELECT value FROM editserve_meta WHERE key = 'schema_version'")[0][0])

    def model_fingerprint(self) -> str:
        return self._read("SELECT value FROM editserve_meta WHERE key = 'model_fingerprint'")[0][0]

    # --- writes --------------------------------------------------------------------------
    @staticmethod
    def _next_revision(cursor) -> int:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        return cursor.execute("SELECT COALESCE(MAX(revision), 0) + 1 FROM editserve_events").fetchone()[0]

    @staticmethod
    def _event(cursor, revision: int, kind: str, edit_id: str) -> None:
        cursor.execute("INSERT INTO editserve_events VALUES (%s, %s, %s, %s)", (revision, kind, edit_id, time.time()))
        cursor.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(revision)))

    def record_apply(
        self, *, edit_id: str, method: str, kind: str, facts: list[dict], options: dict, layers: list[int],
        parameters: list[str], delta_norm: float, compute_seconds: float, description: str, artifact: str,
        sha256: str, idempotency_key: str = "", request_sha256: str = "", outcome: dict | None = None,
        check: Callable[[], None] | None = None, consolidates: list[str] = (),
    ) -> int:
        """Commit the edit row, its artifact's bytes and its apply event in one transaction;
        returns the new revision (see :meth:`.journal.Journal.record_apply`)."""
        kind = self.check_kind(artifact, kind)
        data = (self.artifacts / artifact).read_bytes()
        with self._transaction() as cursor:
            revision = self._next_revision(cursor)
            seq = cursor.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM editserve_edits").fetchone()[0]
            if idempotency_key and cursor.execute("SELECT 1 FROM editserve_edits WHERE idempotency_key = %s",
                                                  (idempotency_key,)).fetchone():
                raise DuplicateKey(f"idempotency_key {idempotency_key!r} is already journaled")
            cursor.execute(
                f"INSERT INTO editserve_edits ({_EDIT_COLUMNS}) VALUES "
                "(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,'active',%s,0,%s,%s,%s,%s,'',%s,'')",
                (edit_id, seq, method, json.dumps(facts), json.dumps(options), json.dumps(layers),
                 json.dumps(parameters), delta_norm, time.time(), compute_seconds, description, artifact, sha256,
                 revision, kind, idempotency_key or None, request_sha256, json.dumps(outcome or {}),
                 json.dumps(list(consolidates))),
            )
            for member in consolidates:
                cursor.execute("UPDATE editserve_edits SET consolidated_into = %s WHERE edit_id = %s AND "
                               "status = 'active' AND consolidated_into = '' AND quarantined = ''", (edit_id, member))
                if cursor.rowcount != 1:
                    raise JournalError(f"edit {member} is no longer active on its own: it cannot be consolidated")
            for chunk, start in enumerate(range(0, max(len(data), 1), ARTIFACT_CHUNK_BYTES)):
                cursor.execute("INSERT INTO editserve_artifacts VALUES (%s, %s, %s)",
                               (edit_id, chunk, data[start:start + ARTIFACT_CHUNK_BYTES]))
            self._event(cursor, revision, "apply", edit_id)
            if check is not None:
                check()
        return revision

    def record_revert(self, edit_id: str) -> int:
        """As :meth:`.journal.Journal.record_revert` (a consolidated edit's consolidation is
        reverted first, by its own event)."""
        with self._transaction() as cursor:
            revision = self._next_revision(cursor)
            row = cursor.execute("SELECT status, consolidated_into FROM editserve_edits WHERE edit_id = %s",
                                 (edit_id,)).fetchone()
            if row is None or row[0] != "active":
                raise KeyError(edit_id)
            if row[1]:
                self._revert_row(cursor, row[1], revision)
                revision += 1
            self._revert_row(cursor, edit_id, revision)
        return revision

    def _revert_row(self, cursor, edit_id: str, revision: int) -> None:
        cursor.execute("UPDATE editserve_edits SET status = 'reverted', reverted_revision = %s WHERE edit_id = %s",
                       (revision, edit_id))
        cursor.execute("UPDATE editserve_edits SET consolidated_into = '' WHERE consolidated_into = %s", (edit_id,))
        self._event(cursor, revision, "revert", edit_id)

    def undo_apply(self, edit_id: str, revision: int) -> None:
        """Take back a committed apply whose in-memory apply failed, by a revert event (the
        log is append-only: other replicas may have applied it already)."""
        log.warning("edit %s (revision %d) is taken back by a revert event", edit_id, revision)
        self.record_revert(edit_id)

    def undo_revert(self, edit_id: str, revision: int) -> None:
        """Take back a committed revert whose in-memory revert failed: a new apply event."""
        with self._transaction() as cursor:
            new = self._next_revision(cursor)
            cursor.execute("UPDATE editserve_edits SET status = 'active', reverted_revision = 0 WHERE edit_id = %s",
                           (edit_id,))
            members = json.loads(cursor.execute("SELECT consolidates FROM editserve_edits WHERE edit_id = %s",
                                                (edit_id,)).fetchone()[0])
            for member in members:  # a consolidation's revert freed them: they are replaced again
                cursor.execute("UPDATE editserve_edits SET consolidated_into = %s WHERE edit_id = %s AND "
                               "status = 'active'", (edit_id, member))
            self._event(cursor, new, "apply", edit_id)
        log.warning("the revert of edit %s (revision %d) is taken back by an apply event (revision %d)", edit_id,
                    revision, new)

    def quarantine(self, edit_id: str, reason: str) -> str | None:
        """Mark an edit whose stored artifact cannot be replayed (the database's copy is bad:
        a local copy is fetched again, never a reason). Fleet-wide, like the fact it records."""
        record = self.get(edit_id)
        if record is None:
            raise KeyError(edit_id)
        moved = self.set_aside(record)
        with self._transaction() as cursor:
            cursor.execute("UPDATE editserve_edits SET quarantined = %s WHERE edit_id = %s",
                           (reason or "quarantined", edit_id))
        return moved

    # --- reads ---------------------------------------------------------------------------
    def revision(self) -> int:
        return self._read("SELECT COALESCE(MAX(revision), 0) FROM editserve_events")[0][0]

    def _records(self, where: str = "", args: tuple = ()) -> list[EditRecord]:
        rows = self._read(f"SELECT {_EDIT_COLUMNS} FROM editserve_edits {where} ORDER BY seq", args)
        return [record_from_row(row) for row in rows]

    def get(self, edit_id: str) -> EditRecord | None:
        found = self._records("WHERE edit_id = %s", (edit_id,))
        return found[0] if found else None

    def by_key(self, idempotency_key: str) -> EditRecord | None:
        found = self._records("WHERE idempotency_key = %s", (idempotency_key,))
        return found[0] if found else None

    def list(self, include_reverted: bool = False) -> list[EditRecord]:
        return self._records("" if include_reverted else "WHERE status = 'active'")

    def count_quarantined(self) -> int:
        return self._read("SELECT COUNT(*) FROM editserve_edits WHERE status = 'active' AND quarantined != ''")[0][0]

    def snapshot(self) -> tuple[list[EditRecord], int]:
        """The active edits and the revision they make, from one consistent snapshot (another
        replica may commit between two plain reads)."""
        with self._transaction(repeatable=True) as cursor:
            rows = cursor.execute(f"SELECT {_EDIT_COLUMNS} FROM editserve_edits WHERE status = 'active' ORDER BY seq"
                                  ).fetchall()
            revision = cursor.execute("SELECT COALESCE(MAX(revision), 0) FROM editserve_events").fetchone()[0]
        return [record_from_row(row) for row in rows], revision

    def events_after(self, revision: int) -> list[tuple[int, str, str]]:
        return [tuple(row) for row in self._read(
            "SELECT revision, kind, edit_id FROM editserve_events WHERE revision > %s ORDER BY revision", (revision,))]

    def artifact_bytes(self, record: EditRecord) -> bytes:
        self._ensure_local(record)
        return super().artifact_bytes(record)

    def load_artifact(self, record: EditRecord) -> Artifact:
        """The edit's artifact: the local copy if it matches the row's sha256, else the
        database's bytes (checked, then kept as the local copy)."""
        self._ensure_local(record)
        return self.load_file(record)

    def _ensure_local(self, record: EditRecord) -> None:
        if not self.file_matches(record):
            found = self._read("SELECT data FROM editserve_artifacts WHERE edit_id = %s ORDER BY chunk",
                               (record.edit_id,))
            if not found:
                raise JournalError(f"the artifact of edit {record.edit_id} is missing from the journal database")
            data = b"".join(bytes(row[0]) for row in found)
            if hashlib.sha256(data).hexdigest() != record.sha256:
                raise JournalError(f"the artifact of edit {record.edit_id} in the journal database is corrupted "
                                   "(sha256 mismatch)")
            self.write_bytes(record.artifact, data)

    def remove_orphans(self) -> list[str]:
        """Delete local copies no row refers to (an edit this replica computed whose commit
        never happened)."""
        return self.remove_files_except({r.artifact for r in self._records()})
