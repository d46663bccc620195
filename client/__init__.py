"""Typed client for editserve (sync and asyncio). Imports neither torch nor transformers,
so a production service can depend on the client alone."""

from .aio import AsyncEditserveClient
from .convert import new_idempotency_key
from .errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    EditserveError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from .sync import EditserveClient, GenerationStream
from .types import (
    ContinuationScore,
    DriftCheck,
    EditInfo,
    EditResult,
    Fact,
    FactReport,
    Generation,
    ImportedEdit,
    ImportResult,
    ModelInfo,
    PromptScore,
    RevertResult,
    Route,
    StreamChunk,
    TraceResult,
)

__all__ = [
    "AlreadyExists", "AsyncEditserveClient", "Cancelled", "ContinuationScore", "DeadlineExceeded", "DriftCheck", "EditInfo", "EditResult", "EditserveClient",
    "EditserveError", "Fact", "FactReport", "FailedPrecondition", "Generation", "GenerationStream", "ImportedEdit", "ImportResult",
    "InvalidArgument", "ModelInfo", "NotFound", "PermissionDenied", "PromptScore", "ResourceExhausted",
    "RevertResult", "Route", "StreamChunk", "TraceResult", "Unauthenticated", "Unavailable", "Unimplemented", "new_idempotency_key",
]
