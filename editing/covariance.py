"""Second moment of MLP keys, C = E[k k^T], estimated from text and cached on disk.

ROME's update W <- W + Lambda (C^-1 k*)^T changes W's output for the key k* while keeping it
for the keys the layer usually sees, in the least-squares sense weighted by how often they
occur; C is that "usually", the uncentred covariance of the output projection's inputs over
ordinary text. MEMIT uses the same statistics for several layers at once.

Sources: ``"default"`` (a ~1 MB sample of Wikipedia article summaries shipped inside the
package, so a user needs nothing else), ``"model"`` (text the model samples itself, also
self-contained; measured worse, see docs/ROME.md), or a path to a .txt file or a directory
holding .txt files. Text is packed into fixed-length rows (BOS in front where the model adds one; BOS and
padding positions are left out of the average), and the forward pass stops after the deepest
layer asked for. Results are cached as safetensors under
``<cache_dir>/<model fingerprint>/`` keyed by layer, source and token count.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapter import ArchitectureAdapter
from .errors import PreconditionFailed, StopCheck, check_stop
from .keys import capture_projection_inputs

DEFAULT_SOURCE = "default"
MODEL_SOURCE = "model"
_DEFAULT_FILE = "stats_corpus.txt"


@dataclass(frozen=True)
class TextSource:
    """Where statistics text comes from: a name for cache keys and the files to read."""

    tag: str  # stable identity: "default-<size>" or "path-<hash of names, sizes, mtimes>"
    files: tuple[Path, ...]


def resolve_source(source: str) -> TextSource:
    """Check a statistics source now, so a bad one fails before any compute.

    Raises PreconditionFailed naming the path and what is wrong with it.
    """
    if source == MODEL_SOURCE:
        return TextSource("model-sample-1", ())
    if source == DEFAULT_SOURCE:
        shipped = resources.files("editserve.editing") / "data" / _DEFAULT_FILE
        path = Path(str(shipped))
        if not path.is_file():
            raise PreconditionFailed(f"the shipped statistics corpus {path} is missing: reinstall editserve")
        return TextSource(f"default-{path.stat().st_size}", (path,))
    path = Path(source).expanduser()
    if not path.exists():
        raise PreconditionFailed(f"statistics source {source!r} does not exist on the server")
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*.txt") if p.is_file()))
        if not files:
            raise PreconditionFailed(f"statistics source directory {source!r} holds no .txt files")
    elif path.is_file():
        files = (path,)
    else:
        raise PreconditionFailed(f"statistics source {source!r} is neither a file nor a directory")
    digest = hashlib.sha256()
    for f in files:
        if not os.access(f, os.R_OK):
            raise PreconditionFailed(f"statistics source file {str(f)!r} is not readable (permission denied)")
        st = f.stat()
        digest.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return TextSource(f"path-{digest.hexdigest()[:16]}", files)


def iter_paragraphs(source: TextSource) -> Iterator[str]:
    """Non-empty blank-line-separated paragraphs of every file, in order."""
    for path in source.files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PreconditionFailed(f"cannot read statistics source file {str(path)!r}: {exc}") from None
        for paragraph in text.split("\n\n"):
            paragraph = paragraph.strip()
            if paragraph:
                yield paragraph


def _bos_id(tokenizer) -> int | None:
    """The BOS id if the tokenizer puts one in front of a text, else None."""
    ids = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return ids[0] if len(ids) > len(plain) and ids[0] == tokenizer.bos_token_id else None


def iter_rows(tokenizer, paragraphs: Iterator[str], seq_len: int) -> Iterator[list[int]]:
    """Paragraph tokens packed into rows of ``seq_len`` (BOS first where the model adds one)."""
    bos = _bos_id(tokenizer)
    width = seq_len - (bos is not None)
    buffer: list[int] = []
    sep = tokenizer("\n\n", add_special_tokens=False).input_ids
    for paragraph in paragraphs:
        buffer += tokenizer(paragraph, add_special_tokens=False).input_ids + sep
        while len(buffer) >= width:
            row, buffer = buffer[:width], buffer[width:]
            yield ([bos] if bos is not None else []) + row
    if buffer:
        yield ([bos] if bos is not None else []) + buffer


@torch.no_grad()
def sample_rows(model, tokenizer, seq_len: int, batch_size: int = 32, seed: int = 0) -> Iterator[list[int]]:
    """Rows of text the model writes itself (plain sampling, temperature 1), endlessly.

    Each row starts from BOS where the model uses one, else from a neutral seed word.
    """
    from .contexts import SEED_TEXTS

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    bos = _bos_id(tokenizer)
    block = 0
    while True:
        if bos is not None:
            starts = [[bos]] * batch_size
        else:
            starts = [tokenizer(SEED_TEXTS[(block * batch_size + i) % len(SEED_TEXTS)],
                                add_special_tokens=False).input_ids[:1] for i in range(batch_size)]
        ids = torch.tensor(starts, device=device)
        past, step_input = None, ids
        while ids.shape[1] < seq_len:
            out = model(input_ids=step_input, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            probs = torch.softmax(out.logits[:, -1].float(), -1).cpu()
            step_input = torch.multinomial(probs, 1, generator=generator).to(device)
            ids = torch.cat([ids, step_input], 1)
        block += 1
        yield from ids.tolist()


@torch.no_grad()
def estimate_second_moments(model, tokenizer, adapter: ArchitectureAdapter, layers: list[int],
                            source: TextSource, tokens: int, *, seq_len: int = 256, batch_size: int = 8,
                            progress: bool = True, stop: threading.Event | None = None,
                            should_stop: StopCheck | None = None) -> dict[int, tuple[torch.Tensor, int]]:
    """{layer: (C = mean of k k^T in fp32 [d_mlp, d_mlp], number of keys)} over ``tokens`` keys.

    Accumulates in float64. Stops reading text once ``tokens`` keys were seen; fewer tokens
    than asked (a short source) is fine, as long as there are some. Setting ``stop`` abandons
    the estimate between two batches (PreconditionFailed), e.g. when the server shuts down;
    ``should_stop()`` turning true does the same with Cancelled (the caller gave up).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    bos = _bos_id(tokenizer)
    sums: dict[int, torch.Tensor] = {}
    seen = 0
    if source.files:
        rows = iter_rows(tokenizer, iter_paragraphs(source), seq_len)
    else:
        rows = sample_rows(model, tokenizer, seq_len)
    bar = tqdm(total=tokens, unit="tok", desc=f"key statistics, layers {layers}", disable=not progress,
               leave=False)
    try:
        while seen < tokens:
            if stop is not None and stop.is_set():
                raise PreconditionFailed("key statistics estimate abandoned (shutting down)")
            check_stop(should_stop, "the key statistics estimate")
            batch = []
            for row in rows:
                batch.append(row)
                if len(batch) == batch_size:
                    break
            if not batch:
                break
            width = max(len(r) for r in batch)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in batch], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch], device=device)
            keep = mask.bool()
            if bos is not None:
                keep[:, 0] = False
            flat_keep = keep.reshape(-1)
            room = tokens - seen
            if int(flat_keep.sum()) > room:  # take exactly the tokens still needed
                positions = flat_keep.nonzero()[:, 0]
                flat_keep[positions[room:]] = False
            captured = capture_projection_inputs(model, adapter, layers, ids, mask)
            for layer, k in captured.items():
                k = k.reshape(-1, k.shape[-1])[flat_keep].float()
                moment = (k.T @ k).double()
                sums[layer] = moment if layer not in sums else sums[layer] + moment
            count = int(flat_keep.sum())
            seen += count
            bar.update(count)
    finally:
        bar.close()
    if seen == 0:
        raise PreconditionFailed("the statistics source holds no text")
    return {layer: ((s / seen).float(), seen) for layer, s in sums.items()}


def cache_path(cache_dir: Path, fingerprint: str, layer: int, source: TextSource, tokens: int) -> Path:
    return Path(cache_dir) / fingerprint / f"mom2_layer{layer}_{source.tag}_{tokens}.safetensors"


def load_or_estimate_layers(model, tokenizer, adapter: ArchitectureAdapter, *, fingerprint: str, cache_dir: Path,
                           layers: list[int], source: str, tokens: int, progress: bool = True,
                           stop: threading.Event | None = None, should_stop: StopCheck | None = None
                           ) -> dict[int, tuple[torch.Tensor, dict]]:
    """{layer: (C, info)} from the disk cache; every layer missing there is estimated in ONE
    pass over the text (MEMIT needs five or six layers: one pass costs about what the deepest
    layer alone would), then cached. info = {"cached", "tokens", "seconds", "path"}.
    """
    src = resolve_source(source)
    started = time.perf_counter()
    found: dict[int, tuple[torch.Tensor, dict]] = {}
    for layer in sorted(set(layers)):
        path = cache_path(cache_dir, fingerprint, layer, src, tokens)
        if path.is_file():
            try:
                data = load_file(str(path))
                found[layer] = (data["mom2"], {"cached": True, "tokens": int(data["count"].item()),
                                               "seconds": time.perf_counter() - started, "path": str(path)})
            except Exception:  # a torn or foreign file: recompute below and overwrite it
                pass
    missing = sorted(set(layers) - set(found))
    if missing:
        estimated = estimate_second_moments(model, tokenizer, adapter, missing, src, tokens, progress=progress,
                                            stop=stop, should_stop=should_stop)
        seconds = time.perf_counter() - started
        for layer, (moment, count) in estimated.items():
            path = cache_path(cache_dir, fingerprint, layer, src, tokens)
            path.parent.mkdir(parents=True, exist_ok=True)
            # unique per writer: replicas sharing one cache volume are all PID 1 in their containers
            partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
            save_file({"mom2": moment.contiguous(), "count": torch.tensor([count])}, str(partial),
                      metadata={"layer": str(layer), "source": src.tag, "tokens": str(tokens)})
            os.replace(partial, path)
            found[layer] = (moment, {"cached": False, "tokens": count, "seconds": seconds, "path": str(path)})
    return found


def load_or_estimate(model, tokenizer, adapter: ArchitectureAdapter, *, fingerprint: str, cache_dir: Path,
                     layer: int, source: str, tokens: int, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """C for one layer from the disk cache, computing and caching it on a miss."""
    return load_or_estimate_layers(model, tokenizer, adapter, fingerprint=fingerprint, cache_dir=cache_dir,
                                   layers=[layer], source=source, tokens=tokens, progress=progress)[layer]
