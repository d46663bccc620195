"""Following a shared journal: every replica applies the edits and reverts the others commit.

One thread per server listens on the journal's NOTIFY channel (its own connection) and,
woken by a notification or every ``poll_seconds`` at the latest (the fallback for lost
notifications: a dropped connection, a pooler that does not pass them), asks the edit manager
to follow. Every pass reads *all* events past the served revision, so a replica that was
disconnected, slow or restarted catches up whatever it missed, in order; a dropped connection
is reopened with a growing pause (up to :data:`MAX_BACKOFF_SECONDS`), counted in
``editserve_journal_follow_errors_total``.

Why a notification and not only polling: an edit then reaches every replica within one
database round trip plus the apply (milliseconds), while polling alone would add up to
``poll_seconds`` of disagreement between replicas after every edit.
"""

from __future__ import annotations

import logging
import threading
import time

from .edits import EditManager
from .journal_pg import CHANNEL, PostgresJournal, connect
from .metrics import Metrics

log = logging.getLogger(__name__)

MIN_BACKOFF_SECONDS = 0.5  # first pause after a failure, doubling up to the maximum
MAX_BACKOFF_SECONDS = 30.0
STOP_CHECK_SECONDS = 0.25


class JournalFollower:
    """The follower thread of one server; ``start()`` after the journal was replayed."""

    def __init__(self, journal: PostgresJournal, manager: EditManager, metrics: Metrics, poll_seconds: float) -> None:
        self.journal, self.manager, self.metrics = journal, manager, metrics
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="journal-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def sync(self) -> int:
        """Read the journal's newest revision and apply what this server lacks; returns how
        many events were applied."""
        latest = self.journal.revision()
        self.manager.journal_revision = latest
        self.metrics.journal_revision.set(latest)
        done = self.manager.follow() if latest > self.manager.host.revision else 0
        self.metrics.journal_synced.set(time.time())
        return done

    def _run(self) -> None:
        listener = None
        backoff = MIN_BACKOFF_SECONDS
        while not self._stop.is_set():
            try:
                if listener is None or listener.closed:
                    listener = connect(self.journal.url, self.journal.password_file)
                    listener.execute(f"LISTEN {CHANNEL}")  # before the sync: nothing committed after it is missed
                self.sync()
                self._wait(listener)
                backoff = MIN_BACKOFF_SECONDS
            except Exception as error:  # noqa: BLE001 - the follower must outlive any one failure
                self.metrics.follow_errors.inc()
                log.warning("following the shared journal failed (%s: %s); retrying in %.1f s",
                            type(error).__name__, error, backoff)
                if listener is not None:
                    listener.close()
                    listener = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
        if listener is not None:
            listener.close()

    def _wait(self, listener) -> None:
        """Until a commit is announced, ``poll_seconds`` pass, or the server stops (checked
        every :data:`STOP_CHECK_SECONDS`, so a shutdown never waits for the poll)."""
        deadline = time.monotonic() + self.poll_seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for _notification in listener.notifies(timeout=min(left, STOP_CHECK_SECONDS), stop_after=1):
                return
