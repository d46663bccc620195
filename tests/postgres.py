"""A real, private PostgreSQL server for tests: Debian's binaries, a throw-away cluster.

Started once per test session in a temporary directory, listening on 127.0.0.1 at a free
port with trust authentication, and stopped at the end; each test gets a database of its
own. As root (CI), the cluster runs as the ``postgres`` user the Debian package creates,
since PostgreSQL refuses to run as root. `.ci/run` installs the package.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

USER = "editserve"


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """``start()`` a cluster in ``root``; ``database()`` makes a fresh database, returns its URL."""

    def __init__(self) -> None:
        # not under pytest's temporary tree: it is private to root, and the cluster runs as postgres
        self.root = Path(tempfile.mkdtemp(prefix="editserve-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.initdb, self.pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def available(self) -> bool:
        return bool(self.initdb and self.pg_ctl) and (not self._as or shutil.which("runuser") is not None)

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self._as, *cmd], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        if self._as:
            shutil.chown(self.root, "postgres")
        self._run(self.initdb, "-D", str(self.data), "-U", USER, "--auth=trust", "--no-sync", "-E", "UTF8")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(self.pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w",
                  "-t", "60", "start")

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run([*self._as, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)
