"""What a generation backend offers the servicers, whatever runs the model underneath.

The Hugging Face backend batches requests itself; a vLLM backend hands them to vLLM's
scheduler. Servicers only see :class:`GenerationBackend`: submit a request, read its events.
"""

from __future__ import annotations

import abc
import queue
import threading
from dataclasses import dataclass, field
from enum import StrEnum


class FinishReason(StrEnum):
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"


class LimitExceeded(Exception):
    """A request asks for more than the server allows (maps to INVALID_ARGUMENT or
    RESOURCE_EXHAUSTED, chosen by ``exhausted``)."""

    def __init__(self, message: str, *, exhausted: bool = False) -> None:
        super().__init__(message)
        self.exhausted = exhausted


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    return_logprobs: bool = False


@dataclass
class Started:
    prompt_tokens: int
    prompt_token_ids: list[int]


@dataclass
class Tokens:
    token_ids: list[int]
    text: str
    logprobs: list[float]
    revision: int
    first: bool = False


@dataclass
class Finished:
    reason: FinishReason
    stop_reason: str
    prompt_tokens: int
    generated_tokens: int
    revision: int
    # text still held back when generation ended (e.g. a partial stop-string prefix)
    text: str = ""


@dataclass
class Failed:
    error: BaseException


Event = Started | Tokens | Finished | Failed


@dataclass
class RequestHandle:
    """The servicer's view of one running request: an event queue and a cancel switch."""

    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self):
        while True:
            event = self.events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return


class GenerationBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def submit(self, prompt_ids: list[int], params: GenerationParams) -> RequestHandle:
        """Queue a request; raises LimitExceeded when it cannot be accepted."""
