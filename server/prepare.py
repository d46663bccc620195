"""``editserve prepare``: fill the cache a server will use, ahead of time (e.g. at image build).

The model is converted once (GGUF -> safetensors) and the key statistics that every offered
method's shipped hyperparameters need are estimated, exactly as the server would on first
use, so neither the first start nor the first Edit waits for them.
"""

from __future__ import annotations

import time
from pathlib import Path


def prepare_cache(model: str, *, dtype: str = "fp32", cache_dir: Path | None = None, threads: int = 0) -> str:
    """Prepare everything; returns a one-line summary."""
    import torch

    from .host import ModelHost
    from .methods import build_methods
    from .models import default_cache_dir, load_model

    if threads:
        torch.set_num_threads(threads)
    cache = cache_dir or default_cache_dir()
    started = time.perf_counter()
    loaded, tokenizer, model_dir = load_model(model, dtype=dtype, cache_dir=cache)
    host = ModelHost(loaded, tokenizer, name=model, dtype=dtype, device="cpu")
    table = build_methods(host, cache)
    stats_seconds = table.prepare_statistics()
    return (f"prepared {model} in {cache} ({time.perf_counter() - started:.0f} s; key statistics "
            f"{stats_seconds:.0f} s) for {', '.join(sorted(table.compute))}")
