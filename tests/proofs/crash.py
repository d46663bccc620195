"""SIGKILL at random points of a stream of edits and reverts, and what must hold after restart.

One :class:`CrashCampaign` runs rounds on one journal directory. In each round a churn thread
sends edits (ROME with tiny options, and T-Patcher, a runtime layer) and reverts one at a
time; after every acknowledged operation it reads the **live** weights' digest at that
revision. At a random moment the server is SIGKILLed, the journal directory is copied, and the
server is restarted on it. Then:

* **equal to an independent replay**: the restarted server's digest equals the digest of the
  committed journal replayed in this process event by event (``apply`` / ``revert`` in
  revision order onto a freshly loaded base model), a different path from the server's start-up
  replay (all active edits composed at once);
* **equal to the live weights**: when the journal's revision was acknowledged before the kill,
  the restarted digest also equals the digest the killed server itself reported live at that
  revision (the old test compared a replay with a replay; this compares with what was served);
* **0 committed operations lost**: the revision is at least the last acknowledged one, every
  acknowledged edit is in the journal, every acknowledged revert is a revert there;
* **0 half-applied**: the revision is the last acknowledged one or one more, and in the latter
  case the one extra event is exactly the operation in flight at the kill (that edit active,
  or that revert done); the active set listed equals the model's; the restarted server serves.

The restarted server is the next round's server, so each kill point costs one start-up.
"""

from __future__ import annotations

import random
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from editserve.client import EditserveError, Fact
from tests.server_process import ServerProcess, start_server

# ROME on a random tiny model needs room to move (no clamp, no decay) and few statistics
ROME_TINY = {"method": "rome", "layer": 1, "steps": 5, "clamp_norm_factor": 1e4, "weight_decay": 0.0,
             "stats_tokens": 500}
# T-Patcher: neurons added to one MLP (a runtime layer; no parameter changes)
TPATCHER_TINY = {"method": "t_patcher", "layer": 3, "steps": 5, "context_count": 1, "context_length": 4,
                 "memory_rows": 4, "negatives": 2}
_SUBJECTS = ["Danielle Darrieux", "Michael Jordan", "Steve Jobs", "Lionel Messi", "Bill Gates", "Seattle"]
_TARGETS = ["English", "football", "Microsoft", "basketball", "Apple", "Paris"]


def fact(i: int) -> Fact:
    return Fact("The mother tongue of {} is", _SUBJECTS[i % len(_SUBJECTS)], _TARGETS[(i + 1) % len(_TARGETS)])


@dataclass
class Operation:
    kind: str  # "edit" or "revert"
    edit_id: str = ""  # the revert's victim, or the edit's id once acknowledged
    revision: int = 0  # once acknowledged


@dataclass
class RoundResult:
    kill_after_s: float
    acknowledged: int  # operations acknowledged in this round
    revision: int  # the restarted server's
    in_flight_committed: bool  # the operation cut by the kill had reached the journal
    compared_with_live: bool  # the revision was acknowledged: compared with the live digest too
    restart_s: float
    violations: list[str]


@dataclass
class CrashCampaign:
    """Kill/restart rounds on one journal; ``run_round`` returns what it found."""

    model_dir: Path
    root: Path
    seed: int = 0
    runtime_edits: bool = True
    active: list[str] = field(default_factory=list)  # committed and not reverted, in order
    reverted: set[str] = field(default_factory=set)
    revision: int = 0  # committed revision at the end of the last round
    server: ServerProcess | None = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.state = self.root / "state"
        self.counter = 0
        self.churn_errors: list[str] = []

    def start(self) -> ServerProcess:
        t = time.monotonic()
        self.server = start_server(str(self.model_dir), self.state, self.root / "logs", "--no-prepare-statistics",
                                   timeout=300)
        self.last_start_s = time.monotonic() - t
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()

    # --- the stream of operations -----------------------------------------------------
    def _churn(self, stop: threading.Event, acked: list[Operation], live: dict[int, str],
               in_flight: list[Operation]) -> None:
        """Edits and reverts one at a time until the server dies; after each acknowledged
        operation, the live digest at its revision."""
        active = list(self.active)
        with self.server.client(timeout=60) as client:
            while not stop.is_set():
                revert = active and self.rng.random() < 0.35
                op = Operation("revert", self.rng.choice(active)) if revert else Operation("edit")
                in_flight[:] = [op]
                try:
                    if revert:
                        op.revision = client.revert(op.edit_id).revision
                        active.remove(op.edit_id)
                    else:
                        self.counter += 1
                        options = TPATCHER_TINY if self.runtime_edits and self.counter % 3 == 0 else ROME_TINY
                        result = client.edit(fact(self.counter), **options)
                        op.edit_id, op.revision = result.edit_id, result.revision
                        active.append(op.edit_id)
                    in_flight[:] = []
                    acked.append(op)
                    info = client.model_info(include_weights_digest=True)
                    if info.revision == op.revision:  # the only writer is this thread
                        live[info.revision] = info.weights_digest
                except EditserveError:  # the server was killed under us (reset, unavailable)
                    return
                except Exception as error:  # noqa: BLE001 - a harness bug must fail the round, not end it quietly
                    self.churn_errors.append(f"{type(error).__name__}: {error}")
                    return

    # --- one round ----------------------------------------------------------------------
    def run_round(self, max_kill_after_s: float = 2.0) -> RoundResult:
        if self.server is None:
            self.start()
        with self.server.client(timeout=60) as client:
            live = {self.revision: client.model_info(include_weights_digest=True).weights_digest}
        acked: list[Operation] = []
        in_flight: list[Operation] = []
        stop = threading.Event()
        worker = threading.Thread(target=self._churn, args=(stop, acked, live, in_flight), daemon=True)
        kill_after = self.rng.uniform(0.05, max_kill_after_s)
        worker.start()
        time.sleep(kill_after)
        self.server.stop(signal.SIGKILL)
        stop.set()
        worker.join(120)
        snapshot = Path(tempfile.mkdtemp(prefix="journal-", dir=self.root))
        shutil.copytree(self.state, snapshot, dirs_exist_ok=True)
        self.start()
        try:
            return self._check(kill_after, acked, live, in_flight, snapshot)
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def _check(self, kill_after: float, acked: list[Operation], live: dict[int, str],
               in_flight: list[Operation], snapshot: Path) -> RoundResult:
        problems: list[str] = list(self.churn_errors)
        self.churn_errors.clear()
        with self.server.client(timeout=60) as client:
            info = client.model_info(include_weights_digest=True)
            listed = {e.edit_id: e.status for e in client.list_edits(include_reverted=True)}
            active_listed = [e.edit_id for e in client.list_edits()]
            generated = client.generate("The mother tongue of Danielle Darrieux is", max_new_tokens=3)
        last_acked = acked[-1].revision if acked else self.revision
        # what was committed: the acknowledged operations, maybe plus the one in flight
        expected_active, reverted = list(self.active), set(self.reverted)
        for op in acked:
            if op.kind == "edit":
                expected_active.append(op.edit_id)
            else:
                expected_active.remove(op.edit_id)
                reverted.add(op.edit_id)
        committed_extra = info.revision == last_acked + 1
        if info.revision < last_acked:
            problems.append(f"revision {info.revision} < last acknowledged {last_acked}: committed operations lost")
        elif info.revision > last_acked + 1:
            problems.append(f"revision {info.revision} > last acknowledged {last_acked} + 1: phantom operations")
        elif committed_extra:
            op = in_flight[0] if in_flight else None
            if op is None:
                problems.append("one more event than acknowledged, and no operation was in flight")
            elif op.kind == "edit":
                new = [e for e in active_listed if e not in expected_active]
                if len(new) != 1:
                    problems.append(f"the edit in flight committed, but the new active edits are {new}")
                expected_active += new
            else:
                expected_active.remove(op.edit_id)
                reverted.add(op.edit_id)
        for edit_id in expected_active:
            if listed.get(edit_id) != "active":
                problems.append(f"committed edit {edit_id} is {listed.get(edit_id, 'missing')} after restart")
        for edit_id in reverted:
            if listed.get(edit_id) != "reverted":
                problems.append(f"committed revert of {edit_id}: it is {listed.get(edit_id, 'missing')} after restart")
        if active_listed != expected_active:
            problems.append(f"active edits {active_listed} != committed {expected_active}")
        if info.active_edits != len(active_listed):
            problems.append(f"model hosts {info.active_edits} edits, journal lists {len(active_listed)}")
        replayed = replay_events(self.model_dir, snapshot)
        if info.weights_digest != replayed:
            problems.append("restarted digest != independent event-by-event replay of the committed journal")
        compared_live = info.revision in live
        if compared_live and info.weights_digest != live[info.revision]:
            problems.append(f"restarted digest != the live digest the killed server reported at revision {info.revision}")
        if generated.revision != info.revision or not generated.text:
            problems.append(f"the restarted server did not serve (revision {generated.revision}, {generated.text!r})")
        self.active, self.reverted, self.revision = active_listed, {e for e, s in listed.items() if s == "reverted"}, \
            info.revision
        return RoundResult(kill_after, len(acked), info.revision, committed_extra, compared_live, self.last_start_s,
                           problems)


def replay_events(model_dir: Path, state_dir: Path) -> str:
    """Digest of the journal in ``state_dir`` replayed event by event onto a freshly loaded
    base model: each ``apply`` adds its artifact (sha256 checked), each ``revert`` removes it,
    in revision order, as the live server did; not the server's start-up path, which composes
    the active set at once."""
    from editserve.server.host import ModelHost
    from editserve.server.journal import Journal
    from editserve.server.models import load_model

    model, tokenizer, _ = load_model(str(model_dir))
    host = ModelHost(model, tokenizer, name="oracle", dtype="fp32", device="cpu")
    with sqlite3.connect(state_dir / "journal.sqlite3") as db:
        events = db.execute("SELECT revision, kind, edit_id FROM events ORDER BY revision").fetchall()
    journal = Journal(state_dir, host.fingerprint())
    try:
        for revision, kind, edit_id in events:
            if kind == "apply":
                host.apply(edit_id, journal.load_artifact(journal.get(edit_id)), revision)
            else:
                host.revert(edit_id, revision)
        return host.weights_digest()
    finally:
        journal.close()
