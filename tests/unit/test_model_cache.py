"""Processes that start together on one model cache convert the model once, and all start.

Seen on a fresh machine: two `editserve eval` started a second apart both extracted the
built-in GGUF through the same temporary name, and the second failed when the first renamed
it away. Here several processes resolve a built-in model from a fresh cache at the same moment;
the wheel is a small zip made here and the GGUF -> safetensors conversion is replaced by a slow
stand-in that counts its calls (the conversion itself is transformers' and is exercised by every
real-model test), so what is tested is the fetch-extract-convert sequence and its lock.
"""

from __future__ import annotations

import multiprocessing
import os
import zipfile
from pathlib import Path

PROCESSES = 4
GGUF_BYTES = 8 << 20


def _resolve_together(cache: str, barrier, results) -> None:
    """Child: register a wheel-backed built-in, wait for the others, resolve it."""
    import time

    from editserve.server import models

    spec = models.BuiltinModel(
        name="tiny-wheel", description="test", package="tiny-pkg", version="0.0.1",
        gguf_name="tiny.gguf", kind="wheel",
    )
    models.BUILTINS[spec.name] = spec

    def slow_convert(gguf: Path, out_dir: Path) -> None:
        with open(Path(cache) / "conversions", "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(str(gguf.stat().st_size))

    models._convert_gguf = slow_convert
    barrier.wait(timeout=60)
    try:
        out = models.resolve_model_dir(spec.name, Path(cache))
        results.put(("ok", (out / "config.json").read_text()))
    except Exception as exc:  # noqa: BLE001 - the parent reports what failed
        results.put(("error", repr(exc)))


def test_processes_starting_together_convert_once_and_all_start(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with zipfile.ZipFile(downloads / "tiny_pkg-0.0.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("tiny_pkg/tiny.gguf", os.urandom(GGUF_BYTES))

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    results = context.Queue()
    children = [
        context.Process(target=_resolve_together, args=(str(tmp_path), barrier, results))
        for _ in range(PROCESSES)
    ]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)

    assert outcomes == [("ok", str(GGUF_BYTES))] * PROCESSES
    conversions = (tmp_path / "conversions").read_text().split()
    assert len(conversions) == 1, f"converted {len(conversions)} times"
    assert (downloads / "tiny.gguf").stat().st_size == GGUF_BYTES
    assert not list(downloads.glob("*.part"))
