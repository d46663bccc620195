"""Typed server configuration: defaults, a versioned TOML file, then command-line overrides."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

CONFIG_VERSION = 1


@dataclass(frozen=True)
class ServeConfig:
    """Everything `editserve serve` needs. 0 for a port means "pick a free port"."""

    model: str = "smollm2-135m"
    dtype: str = "fp32"
    device: str = "cpu"
    backend: str = "hf"
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9464
    # Journal directory (SQLite + safetensors). Empty: <cache>/state/<model name>.
    state_dir: str = ""
    # Model cache. Empty: $EDITSERVE_CACHE or ~/.cache/editserve.
    cache_dir: str = ""
    max_batch_size: int = 8
    max_pending_requests: int = 64
    max_concurrent_requests: int = 64
    max_prompt_tokens: int = 2048
    max_new_tokens_limit: int = 1024
    default_max_new_tokens: int = 64
    trace_max_prompt_tokens: int = 64
    # facts one Edit may carry (each method also has its own limit in editing/registry.py)
    max_edit_facts: int = 10_000
    # SERAC's sentence encoder: "all-MiniLM-L6-v2" (offline PyPI package) or a local
    # sentence-transformers directory; edits made with another are re-encoded at start-up
    serac_encoder: str = "all-MiniLM-L6-v2"
    # estimate the key statistics of the default edit layers in the background after start-up
    prepare_statistics: bool = True
    # torch intra-op threads; 0 keeps torch's default (all cores).
    torch_threads: int = 0
    grpc_workers: int = 96

    def __post_init__(self) -> None:
        if not 1 <= self.max_edit_facts <= 100_000:
            raise ValueError(f"max_edit_facts must be in [1, 100000], got {self.max_edit_facts}")
        if not self.serac_encoder.strip():
            raise ValueError("serac_encoder must name an encoder")

    @classmethod
    def from_toml(cls, path: Path) -> ServeConfig:
        data = tomllib.loads(path.read_text())
        version = data.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(f"{path}: config version {version} is not supported (expected {CONFIG_VERSION})")
        section = data.get("serve", {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"{path}: unknown [serve] keys {unknown}")
        return cls(**section)

    def with_overrides(self, **overrides: object) -> ServeConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})
