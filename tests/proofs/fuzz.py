"""Fuzzing every RPC of the Inference and Editing services of a live server.

A :class:`FuzzSession` sends one hostile request at a time (bytes on the wire, so damaged
payloads go out exactly as drawn) with a drawn credential, then checks the invariants that must
hold whatever the request was:

* the server process is alive;
* the status is one the docs promise (:data:`ALLOWED`): never UNKNOWN, never INTERNAL;
* a missing, invalid or too-low credential is refused as docs/SECURITY.md says;
* the served weights' digest (``GetModelInfo(include_weights_digest=True)``, what the e2e tests
  read) and the revision stay at their baseline: the only way to move them is an Edit that
  answered OK with ``applied``, which the session then reverts and checks the digest is back;
* no edit is journaled unless an Edit said OK (ListEdits is empty after every example);
* a concurrent, valid GenerateStream keeps completing throughout (:class:`BackgroundStream`).

The short version (tests/e2e/test_fuzz.py) raises at the first violation so Hypothesis shrinks
it; the long one (bench/fuzz_bench.py) records every violation and counts outcomes by RPC and
status.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from editserve.client._pb import editing_pb2 as epb
from editserve.client._pb import editing_pb2_grpc, inference_pb2_grpc
from editserve.client._pb import inference_pb2 as ipb
from tests.proofs.messages import mutated_message, random_message, wire_payloads
from tests.server_process import ServerProcess, start_server

EDITOR_TOKEN = "fuzz-editor-" + "0123456789abcdef" * 2
READER_TOKEN = "fuzz-reader-" + "fedcba9876543210" * 2

S = grpc.StatusCode
# What docs/SECURITY.md and the README's status table promise a caller can see; UNAVAILABLE is
# only before the model is loaded, CANCELLED only when the caller cancels: neither is expected
# from a loaded server answering one request at a time.
ALLOWED = frozenset({S.OK, S.INVALID_ARGUMENT, S.UNAUTHENTICATED, S.PERMISSION_DENIED, S.NOT_FOUND,
                     S.RESOURCE_EXHAUSTED, S.FAILED_PRECONDITION, S.UNIMPLEMENTED, S.DEADLINE_EXCEEDED})
EDITING = epb.DESCRIPTOR.services_by_name["Editing"]
INFERENCE = ipb.DESCRIPTOR.services_by_name["Inference"]
CREDENTIALS = ("editor", "reader", "none", "invalid", "two_headers", "not_bearer")


@dataclass(frozen=True)
class Rpc:
    """One method the protos declare, called generically (bytes in, parsed message out)."""

    service: str
    name: str
    input: Descriptor
    output: type[Message]
    streaming: bool
    client_streaming: bool = False  # the payload is sent as the stream's one message

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def needs_editor(self) -> bool:
        return self.service == EDITING.full_name


def declared_rpcs() -> list[Rpc]:
    """Every RPC of the Inference and Editing services, read from the protos themselves so a
    method added later is fuzzed without touching this file."""
    from google.protobuf import message_factory

    out = []
    for service in (INFERENCE, EDITING):
        for method in service.methods:
            out.append(Rpc(service.full_name, method.name, method.input_type,
                           message_factory.GetMessageClass(method.output_type), method.server_streaming,
                           method.client_streaming))
    return out


_FACT = epb.Fact(prompt="The capital of {} is", subject="France", target_new="Rome", target_true="Paris",
                 paraphrase_prompts=["France's capital city is"], neighborhood_prompts=["The capital of Italy is"])
_ROME = epb.RomeOptions(layer=1, steps=3, clamp_norm_factor=1e4, weight_decay=0.0, stats_tokens=500)


def templates() -> dict[str, list[Message]]:
    """Valid, cheap requests per RPC on the tiny Llama (layer 1 of 4, few steps): the seeds
    :func:`mutated_message` damages a field or two of. Edits are dry runs, so only a mutation
    that clears ``dry_run`` applies anything (and the session reverts it)."""
    generate = ipb.GenerateRequest(text="The capital of France is", stopping=ipb.StoppingOptions(max_new_tokens=4))
    return {
        "Generate": [generate, ipb.GenerateRequest(
            token_ids=ipb.TokenIds(ids=[5, 6, 7]), sampling=ipb.SamplingOptions(temperature=0.7, top_p=0.9, top_k=5, seed=1),
            stopping=ipb.StoppingOptions(max_new_tokens=3, stop=["."]),
            response=ipb.ResponseOptions(return_token_ids=True, return_logprobs=True))],
        "GenerateStream": [generate],
        "GetModelInfo": [ipb.GetModelInfoRequest(include_weights_digest=True)],
        "Score": [ipb.ScoreRequest(items=[ipb.ScoreItem(prompt="The capital of France is", continuation="Paris")])],
        "Edit": [
            epb.EditRequest(method=epb.EDIT_METHOD_ROME, facts=[_FACT], dry_run=True, rome=_ROME),
            epb.EditRequest(method=epb.EDIT_METHOD_FT_L, facts=[_FACT], dry_run=True,
                            ft=epb.FtOptions(layer=1, steps=2, learning_rate=1e-2)),
            epb.EditRequest(method=epb.EDIT_METHOD_MEMIT, facts=[_FACT], dry_run=True,
                            memit=epb.MemitOptions(layers=[1, 2], steps=2, stats_tokens=500, batch_facts=2)),
            epb.EditRequest(method=epb.EDIT_METHOD_T_PATCHER, facts=[_FACT], dry_run=True,
                            t_patcher=epb.TPatcherOptions(layer=3, steps=3, context_count=1, context_length=4,
                                                          memory_rows=4, negatives=2)),
        ],
        "Revert": [epb.RevertRequest(edit_id="0" * 32)],
        "ListEdits": [epb.ListEditsRequest(include_reverted=True)],
        "GetEdit": [epb.GetEditRequest(edit_id="0" * 32)],
        "Trace": [epb.TraceRequest(prompt="The capital of France is", subject="France", answer=" Paris", samples=2,
                                   window=2, seed=1, kinds=[epb.TRACE_KIND_HIDDEN]),
                  epb.TraceRequest(prompt="The capital of France is", subject="France", samples=1, window=1,
                                   kinds=[epb.TRACE_KIND_MLP], precision=epb.TRACE_PRECISION_BF16)],
    }


def request_strategy(rpcs: list[Rpc] | None = None) -> st.SearchStrategy[tuple[Rpc, str, bytes, str]]:
    """(rpc, how the payload was made, payload bytes, credential) for any declared RPC."""
    rpcs = rpcs or declared_rpcs()
    seeds = templates()

    def for_rpc(rpc: Rpc) -> st.SearchStrategy[tuple[Rpc, str, bytes, str]]:
        shapes = [random_message(rpc.input)] + [mutated_message(t) for t in seeds.get(rpc.name, [])] * 3
        payload = wire_payloads(st.one_of(shapes), rpc.input)
        credential = st.sampled_from(("editor",) * 12 + CREDENTIALS[1:])
        return st.tuples(st.just(rpc), payload, credential).map(lambda t: (t[0], t[1][0], t[1][1], t[2]))

    return st.sampled_from(rpcs).flatmap(for_rpc)


def metadata_for(credential: str) -> tuple[tuple[str, str], ...]:
    return {
        "editor": (("authorization", f"Bearer {EDITOR_TOKEN}"),),
        "reader": (("authorization", f"Bearer {READER_TOKEN}"),),
        "none": (),
        "invalid": (("authorization", "Bearer " + "x" * 40),),
        "two_headers": (("authorization", f"Bearer {EDITOR_TOKEN}"), ("authorization", f"Bearer {EDITOR_TOKEN}")),
        "not_bearer": (("authorization", EDITOR_TOKEN),),
    }[credential]


def start_fuzz_server(model: str, root: Path, *extra: str, memory_limit_gib: float = 8.0) -> ServerProcess:
    """A server whose Editing service needs the editor token and Inference the reader token (so
    credentials are part of what is fuzzed), under an address-space limit: a request that
    makes it allocate without bound fails there instead of taking the shared machine down."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "editor.token").write_text(EDITOR_TOKEN + "\n")
    (root / "reader.token").write_text(READER_TOKEN + "\n")
    return start_server(model, root / "state", root / "logs", "--editor-token-file", str(root / "editor.token"),
                        "--reader-token-file", str(root / "reader.token"), *extra, timeout=300,
                        client_options={"token": EDITOR_TOKEN}, memory_limit_bytes=int(memory_limit_gib * 2**30))


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    response: Message | None = None
    chunks: int = 0


class BackgroundStream:
    """A valid GenerateStream in a loop on its own channel, recording when each one completes
    and every error: the proof that serving goes on while hostile requests arrive."""

    def __init__(self, target: str, max_new_tokens: int = 8) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.request = ipb.GenerateRequest(text="Once upon a time", stopping=ipb.StoppingOptions(
            max_new_tokens=max_new_tokens, ignore_eos=True))
        self.completed: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="background-stream", daemon=True)
        self.started = self.stopped = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                chunks = list(self.stub.GenerateStream(self.request, timeout=60, metadata=metadata_for("reader")))
                if chunks[-1].finish_reason != ipb.FINISH_REASON_LENGTH:
                    self.errors.append(f"stream ended with {chunks[-1].finish_reason}")
                self.completed.append(time.monotonic())
            except grpc.RpcError as error:
                self.errors.append(f"{error.code().name}: {error.details()}")
                time.sleep(0.5)

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)
        self.stopped = time.monotonic()
        self.channel.close()

    def longest_gap(self) -> float:
        """Longest time without a completed stream, from start to stop."""
        stamps = [self.started, *self.completed, self.stopped]
        return max(b - a for a, b in zip(stamps, stamps[1:], strict=False))


@dataclass
class FuzzSession:
    """Hostile requests against ``server`` one at a time, with the invariants checked after each."""

    server: ServerProcess
    call_timeout: float = 120.0
    counts: Counter = field(default_factory=Counter)  # (rpc, status name) -> requests
    kinds: Counter = field(default_factory=Counter)  # payload shape -> requests
    violations: list[str] = field(default_factory=list)
    applied: int = 0  # edits a mutant applied (each reverted by the session)
    requests: int = 0

    def __post_init__(self) -> None:
        # no receive limit: a large but legal reply must not look like the server's refusal
        self.channel = grpc.insecure_channel(self.server.target, options=[("grpc.max_receive_message_length", -1)])
        self.editing = editing_pb2_grpc.EditingStub(self.channel)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        info = self._info()
        self.baseline_digest, self.revision = info.weights_digest, info.revision

    def close(self) -> None:
        self.channel.close()

    def _info(self) -> ipb.ModelInfo:
        return self.inference.GetModelInfo(ipb.GetModelInfoRequest(include_weights_digest=True), timeout=60,
                                           metadata=metadata_for("editor"))

    def send(self, rpc: Rpc, payload: bytes, credential: str) -> Outcome:
        metadata = metadata_for(credential)
        try:
            if rpc.client_streaming:
                call = self.channel.stream_unary(rpc.path, request_serializer=None,
                                                 response_deserializer=rpc.output.FromString)
                return Outcome(S.OK, "", call(iter([payload]), timeout=self.call_timeout, metadata=metadata))
            if rpc.streaming:
                call = self.channel.unary_stream(rpc.path, request_serializer=None,
                                                 response_deserializer=rpc.output.FromString)
                chunks = list(call(payload, timeout=self.call_timeout, metadata=metadata))
                return Outcome(S.OK, "", chunks[-1] if chunks else None, len(chunks))
            call = self.channel.unary_unary(rpc.path, request_serializer=None,
                                            response_deserializer=rpc.output.FromString)
            return Outcome(S.OK, "", call(payload, timeout=self.call_timeout, metadata=metadata))
        except grpc.RpcError as error:
            return Outcome(error.code(), error.details() or "")

    def run_one(self, rpc: Rpc, kind: str, payload: bytes, credential: str) -> list[str]:
        """Send one request and check every invariant; returns the violations (also recorded)."""
        outcome = self.send(rpc, payload, credential)
        self.requests += 1
        self.counts[(rpc.name, outcome.code.name)] += 1
        self.kinds[kind] += 1
        where = f"{rpc.name} [{kind}, {len(payload)} bytes, credential {credential}]"
        problems = []
        if outcome.code not in ALLOWED:
            problems.append(f"{where}: status {outcome.code.name} is not documented: {outcome.details[:300]}")
        problems += self._check_credential(rpc, credential, outcome, where)
        if self.server.proc.poll() is not None:
            problems.append(f"{where}: the server died (exit {self.server.proc.returncode})")
            self.violations += problems
            return problems
        if rpc.name == "Edit":
            problems += self._settle_edit(outcome, where)
        info = self._info()
        if info.weights_digest != self.baseline_digest:
            problems.append(f"{where}: the weights digest changed without an applied edit")
            self.baseline_digest = info.weights_digest
        if info.revision != self.revision:
            problems.append(f"{where}: the revision moved from {self.revision} to {info.revision}")
            self.revision = info.revision
        self.violations += problems
        return problems

    def _check_credential(self, rpc: Rpc, credential: str, outcome: Outcome, where: str) -> list[str]:
        """A refused credential is refused before anything else (too large a message is cut by
        gRPC's transport before any handler: RESOURCE_EXHAUSTED)."""
        if credential in ("none", "invalid", "two_headers", "not_bearer"):
            expected = {S.UNAUTHENTICATED}
        elif credential == "reader" and rpc.needs_editor:
            expected = {S.PERMISSION_DENIED}
        else:
            return []
        if outcome.code in expected | {S.RESOURCE_EXHAUSTED}:
            return []
        return [f"{where}: expected {sorted(c.name for c in expected)}, got {outcome.code.name}"]

    def _settle_edit(self, outcome: Outcome, where: str) -> list[str]:
        """An applied edit is reverted (exact revert brings the baseline digest back); anything
        else must have journaled nothing."""
        problems = []
        active = self.editing.ListEdits(epb.ListEditsRequest(), timeout=60, metadata=metadata_for("editor")).edits
        applied = outcome.code == S.OK and outcome.response is not None and outcome.response.applied
        if applied:
            self.applied += 1
            if [e.edit_id for e in active] != [outcome.response.edit_id]:
                problems.append(f"{where}: applied edit {outcome.response.edit_id} but active are "
                                f"{[e.edit_id for e in active]}")
            self.revision += 1
            if outcome.response.revision != self.revision:
                problems.append(f"{where}: applied at revision {outcome.response.revision}, expected {self.revision}")
        elif active:
            problems.append(f"{where}: answered {outcome.code.name} yet journaled {[e.edit_id for e in active]}")
            self.revision += 1
        for edit in active:
            reverted = self.editing.Revert(epb.RevertRequest(edit_id=edit.edit_id), timeout=60,
                                           metadata=metadata_for("editor"))
            self.revision += 1
            if reverted.revision != self.revision:
                problems.append(f"{where}: reverted at revision {reverted.revision}, expected {self.revision}")
        return problems

    def report(self) -> str:
        """Counts by RPC and status, as a Markdown table (rows: RPCs; columns: statuses)."""
        codes = sorted({c for _, c in self.counts}, key=lambda c: (c != "OK", c))
        rows = ["| RPC | " + " | ".join(codes) + " | total |", "|---|" + "---:|" * (len(codes) + 1)]
        for name in sorted({r for r, _ in self.counts}):
            cells = [self.counts.get((name, c), 0) for c in codes]
            rows.append(f"| {name} | " + " | ".join(str(c) for c in cells) + f" | {sum(cells)} |")
        totals = [sum(v for (_, c), v in self.counts.items() if c == code) for code in codes]
        rows.append("| **all** | " + " | ".join(str(t) for t in totals) + f" | {sum(totals)} |")
        return "\n".join(rows)
