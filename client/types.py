"""Typed results: plain dataclasses built from the protobuf replies."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Fact:
    """A fact to write. ``prompt`` holds one "{}" for the subject."""

    prompt: str
    subject: str
    target_new: str
    target_true: str = ""
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "length", "stop" or "cancelled"
    stop_reason: str
    prompt_tokens: int
    generated_tokens: int
    revision: int
    model: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    time_to_first_token_seconds: float = 0.0
    route: Route | None = None  # set when a SERAC edit answered


@dataclass(frozen=True)
class Route:
    """The SERAC edit that answered an input (its memory entry's edit id and scope score)."""

    edit_id: str
    score: float


@dataclass(frozen=True)
class StreamChunk:
    text: str
    revision: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None  # first chunk only
    finish_reason: str | None = None  # last chunk only
    stop_reason: str = ""
    generated_tokens: int | None = None  # last chunk only
    route: Route | None = None  # first chunk only: set when a SERAC edit answered


@dataclass(frozen=True)
class ModelInfo:
    model: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str
    device: str
    revision: int
    active_edits: int
    backend: str
    default_max_new_tokens: int
    max_prompt_tokens: int
    max_new_tokens_limit: int
    has_chat_template: bool
    weights_digest: str = ""
    journal: str = ""  # "sqlite" or "postgresql" (shared by a fleet)
    journal_revision: int = 0  # newest journal revision this server has read (> revision: catching up)
    drift_kl: float = 0.0  # drift from the unedited model on the probes, measured at drift_revision
    drift_top1_agreement: float = 1.0
    drift_revision: int = 0


@dataclass(frozen=True)
class PromptScore:
    prompt: str
    p_new_before: float
    p_true_before: float
    p_new_after: float
    p_true_after: float


@dataclass(frozen=True)
class FactReport:
    fact: Fact
    rewrite: PromptScore
    paraphrase: list[PromptScore]
    neighborhood: list[PromptScore]


@dataclass(frozen=True)
class EditInfo:
    edit_id: str
    method: str
    facts: list[Fact]
    layers: list[int]
    delta_norm: float
    created_unix_seconds: float
    # "active", "reverted", "quarantined" (journaled, not applied: its artifact went bad) or
    # "consolidated" (served through the consolidation that replaced it)
    status: str
    applied_revision: int
    reverted_revision: int
    parameters: list[str]
    description: str
    compute_seconds: float
    quarantine_reason: str = ""
    idempotency_key: str = ""
    consolidates: list[str] = field(default_factory=list)  # a consolidation: the edits it replaced
    consolidated_into: str = ""  # status "consolidated": the consolidation serving it


@dataclass(frozen=True)
class DriftCheck:
    """What the server's drift guard measured with an edit previewed, and its budget (0: none)."""

    kl: float
    top1_agreement: float
    max_kl: float
    min_top1_agreement: float


@dataclass(frozen=True)
class EditResult:
    edit_id: str
    revision: int
    applied: bool
    facts: list[FactReport]
    compute_seconds: float
    apply_seconds: float
    edit: EditInfo | None
    notes: list[str] = field(default_factory=list)
    # the original reply of an earlier Edit with the same idempotency key (nothing done now)
    replayed: bool = False
    drift: DriftCheck | None = None  # set when a drift budget applied


@dataclass(frozen=True)
class ImportedEdit:
    source_edit_id: str  # its id where the bundle came from
    edit_id: str  # its id here; empty when skipped or a dry run
    revision: int
    skipped: bool  # its artifact was already active here
    sha256: str


@dataclass(frozen=True)
class ImportResult:
    edits: list[ImportedEdit]
    revision: int
    drift: DriftCheck | None = None  # set when a drift budget applied (the whole bundle previewed)


@dataclass(frozen=True)
class RevertResult:
    edit_id: str
    revision: int
    revert_seconds: float


@dataclass(frozen=True)
class TraceResult:
    """Causal trace of one prompt; ``grids[kind]`` is a [tokens][layers] list of probabilities."""

    tokens: list[str]
    subject_start: int
    subject_end: int
    answer: str
    clean_prob: float
    corrupted_prob: float
    noise_scale: float
    samples: int
    window: int
    grids: dict[str, list[list[float]]]
    revision: int
    seconds: float
    precision: str = "model"  # "model" (exact) or "bf16" (see docs/TRACING.md for its deviation)

    @property
    def subject_span(self) -> tuple[int, int]:
        return self.subject_start, self.subject_end


@dataclass(frozen=True)
class ContinuationScore:
    """Teacher-forced score of one continuation after its prompt."""

    token_ids: list[int]
    token_logprobs: list[float]
    argmax_ids: list[int]
    logprob: float
    revision: int
    route: Route | None = None  # set when the prompt was in a SERAC edit's scope

    @property
    def probability(self) -> float:
        import math

        return math.exp(self.logprob)

    @property
    def mean_probability(self) -> float:
        import math

        return math.exp(self.logprob / len(self.token_logprobs))

    @property
    def token_accuracy(self) -> float:
        return sum(int(a == t) for a, t in zip(self.argmax_ids, self.token_ids, strict=True)) / len(self.token_ids)
