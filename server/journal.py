"""The edit journal: SQLite (WAL) for the log, safetensors files for the artifacts.

Write-ahead discipline, so a crash at any instant leaves a consistent story:
1. the artifact file is written to a temporary name, fsynced, and renamed (atomic);
2. the edit row and its "apply" event are committed in one transaction;
3. only then is the edit applied in memory.
A revert commits its "revert" event and status change before the weights change. On start-up
every edit whose row says ACTIVE is replayed from its artifact (no recomputation); an
artifact file without a row (a crash between 1 and 2) is deleted. The revision is the count
of apply/revert events, so it survives restarts and never goes backwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from editserve.editing.artifacts import WeightDelta

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS edits(
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
    reverted_revision INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events(
    revision INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('apply', 'revert')),
    edit_id TEXT NOT NULL REFERENCES edits(edit_id),
    at REAL NOT NULL
);
"""


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    def __init__(self, state_dir: Path, model_fingerprint: str) -> None:
        self.dir = Path(state_dir)
        self.artifacts = self.dir / "artifacts"
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.dir / "journal.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._check_meta(model_fingerprint)

    def _check_meta(self, fingerprint: str) -> None:
        rows = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not rows:
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                self._db.execute("INSERT INTO meta VALUES ('model_fingerprint', ?)", (fingerprint,))
            return
        if rows.get("schema_version") != str(SCHEMA_VERSION):
            raise JournalError(f"journal schema {rows.get('schema_version')} is not supported (expected {SCHEMA_VERSION})")
        if rows.get("model_fingerprint") != fingerprint:
            raise JournalError(
                f"journal in {self.dir} belongs to another model (fingerprint {rows.get('model_fingerprint')}, "
                f"this model {fingerprint}); use another --state-dir"
            )

    def close(self) -> None:
        self._db.close()

    # --- writes ------------------------------------------------------------------------
    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex[:16]

    def write_artifact(self, edit_id: str, delta: WeightDelta) -> tuple[str, str]:
        """Durably write the artifact file; returns (file name, sha256)."""
        name = f"{edit_id}.safetensors"
        final = self.artifacts / name
        partial = self.artifacts / f".{name}.partial"
        delta.save(partial, metadata={"edit_id": edit_id})
        with open(partial, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
            os.fsync(handle.fileno())
        partial.rename(final)
        _fsync_dir(self.artifacts)
        return name, digest

    def record_apply(
        self,
        *,
        edit_id: str,
        method: str,
        facts: list[dict],
        options: dict,
        layers: list[int],
        parameters: list[str],
        delta_norm: float,
        compute_seconds: float,
        description: str,
        artifact: str,
        sha256: str,
    ) -> int:
        """Commit the edit row and its apply event in one transaction; returns the new revision."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            revision = self._db.execute("SELECT COALESCE(MAX(revision), 0) + 1 FROM events").fetchone()[0]
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM edits").fetchone()[0]
            self._db.execute(
                "INSERT INTO edits VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,'active',?,0)",
                (edit_id, seq, method, json.dumps(facts), json.dumps(options), json.dumps(layers),
                 json.dumps(parameters), delta_norm, time.time(), compute_seconds, description,
                 artifact, sha256, revision),
            )
            self._db.execute("INSERT INTO events VALUES (?, 'apply', ?, ?)", (revision, edit_id, time.time()))
        return revision

    def record_revert(self, edit_id: str) -> int:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            status = self._db.execute("SELECT status FROM edits WHERE edit_id = ?", (edit_id,)).fetchone()
            if status is None or status[0] != "active":
                raise KeyError(edit_id)
            revision = self._db.execute("SELECT COALESCE(MAX(revision), 0) + 1 FROM events").fetchone()[0]
            self._db.execute(
                "UPDATE edits SET status = 'reverted', reverted_revision = ? WHERE edit_id = ?", (revision, edit_id)
            )
            self._db.execute("INSERT INTO events VALUES (?, 'revert', ?, ?)", (revision, edit_id, time.time()))
        return revision

    def discard_artifact(self, name: str) -> None:
        (self.artifacts / name).unlink(missing_ok=True)

    # --- reads ---------------------------------------------------------------------------
    def revision(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(revision), 0) FROM events").fetchone()[0]

    def _records(self, where: str = "", args: tuple = ()) -> list[EditRecord]:
        rows = self._db.execute(f"SELECT * FROM edits {where} ORDER BY seq", args).fetchall()
        out = []
        for row in rows:
            (edit_id, seq, method, facts, options, layers, parameters, norm, created, compute, description,
             artifact, sha, status, applied, reverted) = row
            out.append(EditRecord(edit_id, seq, method, json.loads(facts), json.loads(options), json.loads(layers),
                                  json.loads(parameters), norm, created, compute, description, artifact, sha,
                                  status, applied, reverted))
        return out

    def get(self, edit_id: str) -> EditRecord | None:
        found = self._records("WHERE edit_id = ?", (edit_id,))
        return found[0] if found else None

    def list(self, include_reverted: bool = False) -> list[EditRecord]:
        return self._records("" if include_reverted else "WHERE status = 'active'")

    def load_artifact(self, record: EditRecord) -> WeightDelta:
        path = self.artifacts / record.artifact
        data = path.read_bytes() if path.exists() else b""
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise JournalError(f"artifact {path} of edit {record.edit_id} is missing or corrupted (sha256 mismatch)")
        return WeightDelta.load(path)

    def remove_orphans(self) -> list[str]:
        """Delete artifact files that no committed row refers to (crash before commit)."""
        known = {r.artifact for r in self._records()}
        removed = []
        for path in self.artifacts.iterdir():
            if path.name not in known:
                path.unlink()
                removed.append(path.name)
        return removed
