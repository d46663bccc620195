"""Causal tracing: which hidden states carry a fact (Meng et al. 2022, "Locating and Editing
Factual Associations in GPT", section 2).

Three kinds of run over one prompt, e.g. "The Space Needle is located in the city of":

1. **clean**: the model as is; remember every state and the probability ``p_clean`` of the
   answer (" Seattle") as the next token.
2. **corrupted**: Gaussian noise (std ``noise_scale``) is added to the input embeddings of the
   subject tokens ("The Space Needle"), so the model no longer knows which subject it reads;
   ``samples`` independent noise draws are averaged: ``p_corrupted``.
3. **corrupted with restoration**: as 2, but the clean value of *one* state is written back.
   If the answer probability climbs back towards ``p_clean``, that state carries the fact.
   The grid of one kind holds, for every (token, layer), the answer probability with that
   state restored:

   - ``"hidden"``: the decoder layer's output (the residual stream) at that token and layer;
   - ``"mlp"`` / ``"attn"``: the MLP / attention module's output at that token, restored in a
     window of ``window`` consecutive layers centred on the layer (``[l - window//2,
     l + ceil(window/2))``, clipped to the model), as in the paper's Figure 1.

The indirect effect of a state is ``grid - p_corrupted``.

How it is computed
------------------
A straightforward implementation re-runs the whole model once per (kind, token, layer):
3 x 10 tokens x 30 layers = 900 forward passes of ``samples`` sequences. This one computes
exactly the same numbers with far less work, using three facts of a causal decoder:

- a restoration at token ``t`` cannot change positions before ``t``: those positions, at every
  layer, are the corrupted run's. Their keys and values are taken from a key/value cache of
  the corrupted prefix, and only positions ``t..T-1`` are computed;
- a restoration starting at layer ``l`` cannot change layers below ``l``: the restored run
  starts from the corrupted run's input of layer ``l`` and calls the decoder layers from there
  (with the same masks and position embeddings the model itself passes them, recorded from one
  real forward pass per token position, so nothing here knows a model family);
- only the last position's next-token distribution is needed: the LM head runs on one
  position per sequence.

All restorations of one token position (every kind and layer) and all noise samples are
batched together (batch = restorations x samples). Restoring at a token before the subject
changes nothing (those inputs are not corrupted), so those rows equal ``p_corrupted`` by
construction. Nothing in the model is modified: restorations are thread-scoped hooks on
module outputs (removed on exit, also on error) and direct calls of the decoder layers.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .adapter import ArchitectureAdapter
from .errors import InvalidRequest, PreconditionFailed
from .hooks import TraceDict

KINDS = ("hidden", "mlp", "attn")
MAX_SAMPLES = 64
DEFAULT_NOISE_MULTIPLIER = 3.0
# "model": every product in the model's own dtype (exact). "bf16": the decoder layers' matrix
# products in bfloat16 (residual stream, norms, LM head and softmax stay in the model's dtype):
# those products run about twice as fast on a CPU with AVX512-BF16; not exact, see docs/TRACING.md.
PRECISIONS = ("model", "bf16")

# rows x positions processed per chunk of restored runs. Large enough for efficient matrix
# products (>= 2048 rows), small enough that a layer's activations (about 2048 x 1536 floats
# for the MLP) stay in the CPU caches: the elementwise work of a layer (norms, activation,
# residual adds, rotary) is memory-bound, and 16384 made it spill to DRAM.
_CHUNK_TOKENS = 2048
# logits computed at once by the LM head (a 262k-vocabulary head is large)
_HEAD_CHUNK_LOGITS = 1 << 24


@dataclass
class TraceResult:
    """The outcome of :func:`causal_trace`; ``grids[kind][token, layer]`` is the answer's
    probability with that state restored (compare with ``clean_prob`` and ``corrupted_prob``)."""

    prompt: str
    subject: str
    tokens: list[str]
    token_ids: list[int]
    subject_range: tuple[int, int]  # [start, end) token indices of the subject
    answer: str
    answer_token_ids: list[int]  # the answer's tokens; only the first is scored
    clean_prob: float
    corrupted_prob: float
    noise_scale: float
    samples: int
    window: int
    seed: int
    num_layers: int
    kinds: tuple[str, ...]
    grids: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> float32 [tokens, layers]
    precision: str = "model"  # one of PRECISIONS: how the products were computed

    @property
    def answer_token_id(self) -> int:
        return self.answer_token_ids[0]

    def indirect_effects(self, kind: str) -> np.ndarray:
        """Restored minus corrupted probability, [tokens, layers]."""
        return self.grids[kind] - self.corrupted_prob

    def to_dict(self) -> dict[str, Any]:
        """Plain Python data (lists, floats, strings): what :func:`editserve.client.trace_plot.plot_trace`
        and JSON take."""
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "tokens": list(self.tokens),
            "token_ids": list(self.token_ids),
            "subject_range": list(self.subject_range),
            "answer": self.answer,
            "answer_token_ids": list(self.answer_token_ids),
            "clean_prob": self.clean_prob,
            "corrupted_prob": self.corrupted_prob,
            "noise_scale": self.noise_scale,
            "samples": self.samples,
            "window": self.window,
            "seed": self.seed,
            "num_layers": self.num_layers,
            "kinds": list(self.kinds),
            "grids": {k: np.asarray(v).tolist() for k, v in self.grids.items()},
            "precision": self.precision,
        }


# --- inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceInputs:
    """A validated, tokenized trace request (shared by the fast tracer and reference ones)."""

    token_ids: list[int]
    subject_range: tuple[int, int]
    answer_token_ids: list[int] | None  # None: the clean run's top token is the answer


def embedding_noise_scale(
    model: nn.Module, adapter: ArchitectureAdapter, multiplier: float = DEFAULT_NOISE_MULTIPLIER
) -> float:
    """``multiplier`` x the standard deviation of the token embeddings the layers receive.

    This is the ROME default (3 sigma of the embeddings). It is measured on the embedding
    module's *output* over the whole vocabulary, so models that scale their embeddings inside
    the module (Gemma multiplies by sqrt(hidden)) get noise on the scale of what the noise is
    added to; for the others it equals the std of the embedding weight. A pure function of the
    weights: callers may cache it (it takes well under a second even for a 262k vocabulary).
    """
    embed = model.get_submodule(adapter.embed_name)
    vocab = embed.weight.shape[0]
    total = 0.0
    total_sq = 0.0
    count = 0
    with torch.no_grad():
        for begin in range(0, vocab, 16384):
            ids = torch.arange(begin, min(vocab, begin + 16384), device=embed.weight.device)
            out = embed(ids).double()
            total += out.sum().item()
            total_sq += out.square().sum().item()
            count += out.numel()
    mean = total / count
    variance = max(total_sq / count - mean * mean, 0.0)
    return multiplier * math.sqrt(variance * count / max(count - 1, 1))


def _subject_token_range(tokenizer: Any, prompt: str, subject: str, token_ids: list[int]) -> tuple[int, int]:
    """Token indices [start, end) covering the first occurrence of ``subject`` in ``prompt``."""
    char_start = prompt.find(subject)
    if char_start < 0:
        raise InvalidRequest(f"subject {subject!r} not found in prompt {prompt!r}")
    char_end = char_start + len(subject)
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    if list(encoded["input_ids"]) != token_ids:
        raise PreconditionFailed("the tokenizer gave different ids with offsets requested")
    covered = [i for i, (a, b) in enumerate(offsets) if b > a and a < char_end and b > char_start]
    if not covered:
        raise InvalidRequest(f"subject {subject!r} covers no token of the prompt")
    return covered[0], covered[-1] + 1


def _answer_token_ids(tokenizer: Any, prompt: str, prompt_ids: list[int], answer: str) -> list[int]:
    """The tokens of ``answer`` as a continuation of ``prompt``.

    A space is put between them unless the prompt ends with whitespace or the answer starts
    with it ("Seattle" after "... city of" is scored as " Seattle"). The answer is tokenized
    together with the prompt, and the tokens after the prompt's are taken, so BOS tokens and
    merges across the boundary come out as the model would see them.
    """
    if not answer.strip():
        raise InvalidRequest("answer is empty: give an answer string or leave it unset for the top token")
    sep = "" if (prompt[-1:].isspace() or answer[:1].isspace()) else " "
    full = list(tokenizer(prompt + sep + answer)["input_ids"])
    if full[: len(prompt_ids)] == prompt_ids:
        ids = full[len(prompt_ids) :]
    else:
        ids = list(tokenizer(sep + answer, add_special_tokens=False)["input_ids"])
    if not ids:
        raise InvalidRequest(f"answer {answer!r} tokenizes to nothing")
    return ids


def prepare_inputs(
    tokenizer: Any,
    adapter: ArchitectureAdapter,
    prompt: str,
    subject: str,
    *,
    answer: str | None,
    samples: int,
    window: int,
    kinds: Sequence[str],
    noise_scale: float | None,
    max_prompt_tokens: int,
    precision: str = "model",
) -> TraceInputs:
    """Validate a trace request (raising :class:`InvalidRequest` naming the bad field) and
    tokenize it."""
    if precision not in PRECISIONS:
        raise InvalidRequest(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("prompt is empty")
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidRequest("subject is empty")
    if not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
        raise InvalidRequest(f"samples must be in [1, {MAX_SAMPLES}], got {samples!r}")
    if not isinstance(window, int) or not 1 <= window <= adapter.num_layers:
        raise InvalidRequest(
            f"window must be in [1, {adapter.num_layers}] (the model's layers), got {window!r}"
        )
    if not kinds:
        raise InvalidRequest(f"kinds is empty: choose from {KINDS}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise InvalidRequest(f"unknown kinds {unknown}: choose from {KINDS}")
    if noise_scale is not None and not (math.isfinite(noise_scale) and noise_scale > 0):
        raise InvalidRequest(f"noise_scale must be a positive number, got {noise_scale!r}")
    token_ids = list(tokenizer(prompt)["input_ids"])
    if not token_ids:
        raise InvalidRequest("prompt is empty: it tokenizes to nothing")
    if len(token_ids) > max_prompt_tokens:
        raise InvalidRequest(
            f"prompt is {len(token_ids)} tokens, longer than max_prompt_tokens={max_prompt_tokens}"
        )
    subject_range = _subject_token_range(tokenizer, prompt, subject, token_ids)
    answer_ids = None if answer is None else _answer_token_ids(tokenizer, prompt, token_ids, answer)
    return TraceInputs(token_ids, subject_range, answer_ids)


def subject_noise(
    samples: int, subject_len: int, hidden: int, scale: float, seed: int, dtype: torch.dtype, device: Any
) -> torch.Tensor:
    """The noise added to the subject's embeddings: [samples, subject_len, hidden], drawn from
    a generator seeded with ``seed`` (the same seed gives the same noise everywhere)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(samples, subject_len, hidden, generator=generator, dtype=torch.float32) * scale
    return noise.to(dtype=dtype, device=device)


def restore_window(layer: int, window: int, num_layers: int) -> range:
    """Layers restored for an "mlp"/"attn" restoration centred on ``layer``."""
    return range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))


def final_logits(model: nn.Module, adapter: ArchitectureAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits from the last decoder layer's output (final norm, LM head, and the
    final logit soft-capping some models apply)."""
    norm = model.get_submodule(adapter.final_norm_name)
    head = model.get_submodule(adapter.lm_head_name)
    logits = head(norm(hidden)).float()
    config = model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None:
        cap = getattr(getattr(config, "text_config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


# --- precision ----------------------------------------------------------------------------


def _layer_matrices(model: nn.Module, adapter: ArchitectureAdapter) -> list[nn.Parameter]:
    """The decoder layers' weight matrices (Linear / Conv1D weights: every floating parameter
    of two or more dimensions inside a layer); norms and biases are vectors."""
    seen: dict[int, nn.Parameter] = {}
    for index in range(adapter.num_layers):
        for param in model.get_submodule(adapter.layer(index)).parameters():
            if param.dim() >= 2 and param.is_floating_point():
                seen.setdefault(id(param), param)
    return list(seen.values())


def _bf16_layers_copy(model: nn.Module, adapter: ArchitectureAdapter) -> nn.Module:
    """A copy of ``model`` whose decoder-layer matrices are bfloat16, for ``precision="bf16"``.

    Why a copy: the served model must not change (a concurrent Generate reads it), and
    autocast alone would re-cast every weight at every layer call (the server's parameters do
    not require grad, so autocast keeps no cast cache): about 20 MB of traffic per call,
    thousands of calls per trace. Only the layer matrices are new tensors (half the bytes of
    the originals); every other parameter (embeddings, norms, the LM head) is the original
    tensor, shared read-only, and hooks (runtime edits such as T-Patcher neurons) are the same
    functions, so the copy computes what the model computes, in bf16 products.
    """
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = param
    for param in _layer_matrices(model, adapter):
        memo[id(param)] = nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False)
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for hook in hooks.values():
                memo[id(hook)] = hook
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def _computed_in(model: nn.Module, adapter: ArchitectureAdapter, precision: str):
    """Yield the module to trace with: ``model`` itself ("model", or "bf16" when its layers
    already are bf16), or a bf16-matrix copy run under autocast, so each layer's products take
    bf16 inputs while the residual stream, norms and softmax stay in the model's dtype."""
    if precision == "model":
        yield model
        return
    device = next(model.parameters()).device
    traced = model
    if any(p.dtype != torch.bfloat16 for p in _layer_matrices(model, adapter)):
        traced = _bf16_layers_copy(model, adapter)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield traced


def _full_precision(hidden: torch.Tensor):
    """Autocast off: the LM head and its softmax run in the model's dtype in every mode (a
    logit of 20 rounded to bf16 is off by up to 0.06, which moves a probability by 6%)."""
    return torch.autocast(device_type=hidden.device.type, enabled=False)


# --- the model's own calls of its decoder layers -----------------------------------------


def _cache_classes():
    from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache

    return Cache, DynamicCache, EncoderDecoderCache


def _find_cache(args: tuple, kwargs: dict) -> Any:
    cache_cls, _, _ = _cache_classes()
    for value in (*args, *kwargs.values()):
        if isinstance(value, cache_cls):
            return value
    return None


def _cache_layers(cache: Any) -> list[Any]:
    _, _, enc_dec = _cache_classes()
    if isinstance(cache, enc_dec):
        cache = cache.self_attention_cache
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise PreconditionFailed(f"causal tracing does not know the key/value cache {type(cache).__name__}")
    return layers


def _cached_kv(cache: Any, num_layers: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per layer, the keys/values a cache holds ([batch, heads, positions, head_dim]) or None."""
    layers = _cache_layers(cache)
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for index in range(num_layers):
        layer = layers[index] if index < len(layers) else None
        keys = getattr(layer, "keys", None)
        values = getattr(layer, "values", None)
        if keys is None or values is None or keys.numel() == 0:
            out.append(None)
        else:
            out.append((keys, values))
    return out


def _new_cache(model: nn.Module) -> Any:
    _, dynamic_cache, _ = _cache_classes()
    return dynamic_cache(config=model.config)


class _LayerCalls:
    """Thread-scoped pre-hooks recording how the model calls each decoder layer (args,
    kwargs: masks, position embeddings, the cache), how many cached positions each layer
    holds at that moment, and the hidden states every layer receives (plus the last layer's
    output, as ``inputs[num_layers]``). Removed on exit, also on error."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, stop_after_layers: bool = False) -> None:
        self.model = model
        # stop the forward pass after the last decoder layer (raising _LayersDone): a pass run
        # only to record the calls skips the final norm and the LM head (which, in bf16 mode,
        # would re-cast the whole head matrix on every pass)
        self.stop_after_layers = stop_after_layers
        self.num_layers = adapter.num_layers
        self.layers = [model.get_submodule(adapter.layer(i)) for i in range(adapter.num_layers)]
        self.calls: list[tuple[tuple, dict]] = [((), {})] * self.num_layers
        self.cached_len = [0] * self.num_layers
        self.inputs: list[torch.Tensor] = [torch.empty(0)] * (self.num_layers + 1)
        self._owner = threading.get_ident()
        self._handles: list[Any] = []

    def __enter__(self) -> _LayerCalls:
        try:
            for index, layer in enumerate(self.layers):
                self._handles.append(layer.register_forward_pre_hook(self._pre_hook(index), with_kwargs=True))
            self._handles.append(self.layers[-1].register_forward_hook(self._last_output))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if threading.get_ident() != self._owner:
                return None
            self.inputs[index] = args[0] if args else kwargs["hidden_states"]
            self.calls[index] = (args, dict(kwargs))
            cache = _find_cache(args, kwargs)
            if cache is not None:
                kv = _cached_kv(cache, self.num_layers)[index]
                self.cached_len[index] = 0 if kv is None else kv[0].shape[-2]
            return None

        return hook

    def _last_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if threading.get_ident() == self._owner:
            self.inputs[self.num_layers] = _first(output)
            if self.stop_after_layers:
                raise _LayersDone

    def call(self, index: int, hidden: torch.Tensor, cache: Any) -> torch.Tensor:
        """Call decoder layer ``index`` as the model did, on other hidden states and a cache
        stand-in (or None)."""
        cache_cls, _, _ = _cache_classes()
        args, kwargs = self.calls[index]
        args = tuple(cache if isinstance(a, cache_cls) else a for a in args)
        kwargs = {k: (cache if isinstance(v, cache_cls) else v) for k, v in kwargs.items()}
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return _first(self.layers[index](*args, **kwargs))


class _LayersDone(Exception):
    """Raised by :class:`_LayerCalls` to end a recording pass after the last decoder layer."""


class _KeysComputed(Exception):
    """Raised by :class:`_PrefixKV` to stop a layer once its keys/values are known."""


class _PrefixKV:
    """Stands in for a key/value cache in a direct call of one decoder layer.

    ``update`` (called by the attention with the keys/values of the positions being computed)
    returns ``prefix ++ new``: the prefix is the corrupted run's, shared by every restoration,
    given once per noise sample and tiled over the ``tiles`` restorations of the batch (rows
    are restoration-major). ``keep`` trims to the number of positions the recorded mask
    expects (a sliding-window layer sees only its window). With ``stop`` the layer is
    interrupted right after: only its keys/values were wanted.
    """

    def __init__(
        self,
        prefix: tuple[torch.Tensor, torch.Tensor] | None,
        tiles: int = 1,
        keep: int | None = None,
        stop: bool = False,
    ) -> None:
        self.prefix = prefix
        self.tiles = tiles
        self.keep = keep
        self.stop = stop
        self.result: tuple[torch.Tensor, torch.Tensor] | None = None

    def _join(self, before: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        if before is None or before.shape[-2] == 0:
            out = new
        else:
            rows, heads, length, dim = new.shape
            out = new.new_empty((rows, heads, before.shape[-2] + length, dim))
            if before.shape[0] == rows:
                out[:, :, : before.shape[-2]] = before
            else:  # one block of samples, tiled over the restorations without an extra copy
                out.view(self.tiles, before.shape[0], heads, -1, dim)[:, :, :, : before.shape[-2]] = before
            out[:, :, before.shape[-2] :] = new
        if self.keep is not None and out.shape[-2] > self.keep:
            out = out[:, :, -self.keep :]
        return out

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys = self._join(None if self.prefix is None else self.prefix[0], key_states)
        values = self._join(None if self.prefix is None else self.prefix[1], value_states)
        if self.stop:
            self.result = (keys, values)
            raise _KeysComputed
        return keys, values


# --- the tracer ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Restoration:
    kind: str
    layer: int  # the grid column
    enter: int  # first decoder layer run on all positions (num_layers: none)
    modules: frozenset[int]  # layers whose "mlp"/"attn" output is restored
    source: int | None = None  # computed as a copy of this restoration (same kind) until `enter`

    @property
    def windowed(self) -> bool:
        return self.kind != "hidden"


def _restorations(kinds: Sequence[str], num_layers: int, window: int) -> list[_Restoration]:
    """Every (kind, layer) restoration, sorted by the layer where it joins the batch.

    A "hidden" restoration of layer l changes the input of layer l+1 at one position. A
    windowed one starting at layer a changes, at layer a, only the restored token's output
    (the other positions attend to unchanged inputs): layer a is computed at that one
    position and the restoration joins at a+1.
    """
    out = []
    for kind in kinds:
        for layer in range(num_layers):
            if kind == "hidden":
                out.append(_Restoration(kind, layer, layer + 1, frozenset()))
            else:
                span = restore_window(layer, window, num_layers)
                out.append(_Restoration(kind, layer, span.start + 1, frozenset(span)))
    out.sort(key=lambda r: (r.enter, r.windowed))
    return out


def _module_name(adapter: ArchitectureAdapter, kind: str, layer: int) -> str:
    return adapter.mlp(layer) if kind == "mlp" else adapter.attn(layer)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _answer_probs(model, adapter, last_hidden: torch.Tensor, answer_id: int) -> torch.Tensor:
    """P(answer) for each row of [rows, hidden] last-position states (the head in chunks)."""
    out = []
    vocab = model.get_submodule(adapter.lm_head_name).weight.shape[0]
    step = max(16, _HEAD_CHUNK_LOGITS // vocab)
    for begin in range(0, last_hidden.shape[0], step):
        with _full_precision(last_hidden):
            logits = final_logits(model, adapter, last_hidden[begin : begin + step])
        out.append(torch.softmax(logits, dim=-1)[:, answer_id])
    return torch.cat(out)


def causal_trace(
    model: nn.Module,
    tokenizer: Any,
    adapter: ArchitectureAdapter,
    prompt: str,
    subject: str,
    *,
    answer: str | None = None,
    samples: int = 10,
    noise_scale: float | None = None,
    window: int = 10,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    max_prompt_tokens: int = 64,
    precision: str = "model",
) -> TraceResult:
    """Trace where ``model`` carries the fact completing ``prompt`` about ``subject``.

    ``answer``: the string whose probability is traced, scored by its *first* token as the
    continuation of the prompt (a space is inserted unless the prompt ends with or the answer
    starts with whitespace; the tokenizer's BOS is handled as the model sees it); None traces
    the clean run's most likely next token. ``noise_scale``: std of the Gaussian noise added to
    the subject's input embeddings; None uses :func:`embedding_noise_scale` (3 sigma of the
    embeddings). ``samples`` noise draws (1..64) are averaged; ``seed`` makes them
    reproducible. ``window``: layers restored together for "mlp" and "attn"
    (1..num_layers). The subject is its first occurrence in the prompt. ``precision``: "model"
    (exact, the model's dtype) or "bf16" (the layers' matrix products in bfloat16: faster on a
    CPU with AVX512-BF16, grids within the deviation stated in docs/TRACING.md).

    Raises :class:`InvalidRequest` for a bad request (the message names the field). Never
    modifies the model; leaves no hook attached, also when it fails.
    """
    kinds = tuple(dict.fromkeys(kinds))
    inputs = prepare_inputs(
        tokenizer,
        adapter,
        prompt,
        subject,
        answer=answer,
        samples=samples,
        window=window,
        kinds=kinds,
        noise_scale=noise_scale,
        max_prompt_tokens=max_prompt_tokens,
        precision=precision,
    )
    if noise_scale is None:
        noise_scale = embedding_noise_scale(model, adapter)
    with torch.no_grad(), _computed_in(model, adapter, precision) as traced:
        tracer = _Tracer(
            traced, tokenizer, adapter, inputs, samples, float(noise_scale), window, seed, kinds,
            exact=precision == "model",
        )
        grids = tracer.run()
    return TraceResult(
        prompt=prompt,
        subject=subject,
        tokens=[tokenizer.decode([i]) for i in inputs.token_ids],
        token_ids=list(inputs.token_ids),
        subject_range=inputs.subject_range,
        answer=tracer.answer_text,
        answer_token_ids=list(tracer.answer_ids),
        clean_prob=tracer.clean_prob,
        corrupted_prob=tracer.corrupted_prob,
        noise_scale=float(noise_scale),
        samples=samples,
        window=window,
        seed=seed,
        num_layers=adapter.num_layers,
        kinds=kinds,
        grids=grids,
        precision=precision,
    )


class _Tracer:
    """One trace: the clean and corrupted runs, then every restoration, token by token."""

    def __init__(
        self, model, tokenizer, adapter, inputs: TraceInputs, samples, noise_scale, window, seed, kinds,
        exact: bool = True,
    ):
        self.model = model
        self.exact = exact  # False: bf16 products (the head and softmax in full precision)
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.inputs = inputs
        self.samples = samples
        self.noise_scale = noise_scale
        self.window = window
        self.seed = seed
        self.kinds = kinds
        self.num_layers = adapter.num_layers
        self.device = next(model.parameters()).device
        self.ids = torch.tensor([inputs.token_ids], device=self.device)
        self.n_tokens = self.ids.shape[1]
        self.windowed_kinds = [k for k in kinds if k != "hidden"]
        self.module_names = [
            _module_name(adapter, k, layer) for k in self.windowed_kinds for layer in range(self.num_layers)
        ]
        # the edits the module hooks make during the current layer call
        self._edit_rows: dict[str, torch.Tensor] = {}
        self._edit_pos: int | None = None
        self._edit_values: dict[str, torch.Tensor] = {}

    # -- the clean and corrupted runs ----------------------------------------------------
    def _clean_run(self) -> None:
        model, adapter, n_layers = self.model, self.adapter, self.num_layers
        layer_names = [adapter.layer(i) for i in range(n_layers)]
        self.clean_cache = _new_cache(model)
        with TraceDict(model, layer_names + self.module_names) as traces:
            logits = (
                model(input_ids=self.ids, past_key_values=self.clean_cache, use_cache=True, logits_to_keep=1)
                .logits[0, -1]
                .float()
            )
        self.clean_states = {"hidden": torch.stack([traces[n].output[0] for n in layer_names])}
        for kind in self.windowed_kinds:
            self.clean_states[kind] = torch.stack(
                [traces[_module_name(adapter, kind, i)].output[0] for i in range(n_layers)]
            )
        probs = torch.softmax(logits, dim=-1)
        # restored runs compute the logits from the last layer's output themselves: check
        with _full_precision(logits):
            own = torch.softmax(final_logits(model, adapter, self.clean_states["hidden"][-1, -1:]), dim=-1)[0]
        # in bf16 the model's own head rounded its logits to bf16: only a gross mismatch (a
        # missing soft-cap or scale) is caught there, and the full-precision head is used
        tolerance = 1e-3 if self.exact else 0.1
        if float((own - probs).abs().max()) > tolerance:
            raise PreconditionFailed(
                f"causal tracing does not know how {type(model).__name__} turns its last hidden state into logits"
            )
        if not self.exact:
            probs = own
        if self.inputs.answer_token_ids is None:
            self.answer_ids = [int(probs.argmax())]
        else:
            self.answer_ids = list(self.inputs.answer_token_ids)
        self.answer_text = self.tokenizer.decode(self.answer_ids)
        self.answer_id = self.answer_ids[0]
        self.clean_prob = float(probs[self.answer_id])
        self.clean_embeds = model.get_submodule(adapter.embed_name)(self.ids)

    def _corrupted_run(self) -> None:
        s0, s1 = self.inputs.subject_range
        noise = subject_noise(
            self.samples,
            s1 - s0,
            self.clean_embeds.shape[-1],
            self.noise_scale,
            self.seed,
            self.clean_embeds.dtype,
            self.device,
        )
        embeds = self.clean_embeds.repeat(self.samples, 1, 1)
        embeds[:, s0:s1] += noise
        self.corrupted_embeds = embeds
        cache = _new_cache(self.model)
        with _LayerCalls(self.model, self.adapter) as calls:
            logits = (
                self.model(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
                .logits[:, -1]
                .float()
            )
        if self.exact:
            self.corrupted_prob = float(torch.softmax(logits, dim=-1)[:, self.answer_id].mean())
        else:  # the same full-precision head as the restored runs
            last = calls.inputs[self.num_layers][:, -1]
            self.corrupted_prob = float(_answer_probs(self.model, self.adapter, last, self.answer_id).mean())
        self.corrupted_inputs = calls.inputs  # per layer [samples, tokens, hidden]
        self.corrupted_kv = self._whole_prompt_kv(cache)
        self.clean_kv = self._whole_prompt_kv(self.clean_cache)

    def _whole_prompt_kv(self, cache) -> list | None:
        """The cache's keys/values of every position, or None where a layer kept fewer
        (a sliding window shorter than the prompt): prefixes are then recomputed."""
        kv = _cached_kv(cache, self.num_layers)
        if any(entry is None or entry[0].shape[-2] != self.n_tokens for entry in kv):
            return None
        return kv

    def _prefix_cache(self, embeds: torch.Tensor, whole: list | None, length: int):
        """A real cache holding the first ``length`` positions of a run."""
        cache = _new_cache(self.model)
        if length == 0:
            return cache
        if whole is not None:
            for index, (keys, values) in enumerate(whole):
                cache.update(keys[:, :, :length], values[:, :, :length], index)
        else:
            self.model(
                inputs_embeds=embeds[:, :length], past_key_values=cache, use_cache=True, logits_to_keep=1
            )
        return cache

    def _record_calls(self, start: int, stop: int) -> _LayerCalls:
        """How the model calls its layers on positions [start, stop) after a cached prefix."""
        cache = self._prefix_cache(self.clean_embeds, self.clean_kv, start)
        with _LayerCalls(self.model, self.adapter, stop_after_layers=True) as calls:
            try:
                self.model(
                    inputs_embeds=self.clean_embeds[:, start:stop],
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            except _LayersDone:
                pass
            else:
                raise PreconditionFailed("the model's last decoder layer was not called")
        return calls

    def _corrupted_prefix(self, t: int) -> list:
        if t == 0:
            return [None] * self.num_layers
        if self.corrupted_kv is not None:
            return [(k[:, :, :t], v[:, :, :t]) for k, v in self.corrupted_kv]
        return _cached_kv(self._prefix_cache(self.corrupted_embeds, None, t), self.num_layers)

    # -- restorations -----------------------------------------------------------------------
    def run(self) -> dict[str, np.ndarray]:
        self._clean_run()
        self._corrupted_run()
        n_tokens, n_layers = self.n_tokens, self.num_layers
        grids = {k: np.full((n_tokens, n_layers), self.corrupted_prob, dtype=np.float32) for k in self.kinds}
        plan = _restorations(self.kinds, n_layers, self.window)
        self.last_calls = self._record_calls(n_tokens - 1, n_tokens)  # the last position alone
        s0 = self.inputs.subject_range[0]
        # before the subject nothing is corrupted: restoring there changes nothing (grid = corrupted)
        with TraceDict(self.model, self.module_names, retain_output=False, edit_output=self._edit):
            for t in range(s0, n_tokens):
                self.t = t
                self.calls = self._record_calls(t, n_tokens)
                self.single_calls = self._record_calls(t, t + 1) if self.windowed_kinds else None
                self.prefix = self._corrupted_prefix(t)
                self._edit_values = {
                    _module_name(self.adapter, kind, layer): self.clean_states[kind][layer, t]
                    for kind in self.windowed_kinds
                    for layer in range(n_layers)
                }
                per_chunk = max(1, _CHUNK_TOKENS // (self.samples * (n_tokens - t)))
                for begin in range(0, len(plan), per_chunk):
                    chunk = plan[begin : begin + per_chunk]
                    chunk, probs = self._run_chunk(chunk)
                    probs = probs.view(len(chunk), self.samples).mean(dim=1).tolist()
                    for restoration, p in zip(chunk, probs, strict=True):
                        grids[restoration.kind][t, restoration.layer] = p
        return grids

    def _edit(self, output: torch.Tensor, name: str) -> torch.Tensor | None:
        rows = self._edit_rows.get(name)
        if rows is None or self._edit_pos is None:
            return None
        output[rows, self._edit_pos] = self._edit_values[name].to(output.dtype)
        return output

    def _set_edits(self, chunk: Sequence[_Restoration], layer: int, pos: int | None) -> None:
        """Make the module hooks restore, in the next call of ``layer``, the rows of those
        restorations of ``chunk`` (rows restoration-major) that restore a module there."""
        self._edit_rows = {}
        self._edit_pos = pos
        for kind in self.windowed_kinds:
            members = [i for i, r in enumerate(chunk) if r.kind == kind and layer in r.modules]
            if members:
                rows = torch.tensor(members, device=self.device)[:, None] * self.samples
                rows = (rows + torch.arange(self.samples, device=self.device)).reshape(-1)
                self._edit_rows[_module_name(self.adapter, kind, layer)] = rows

    def _call(
        self,
        calls: _LayerCalls,
        layer: int,
        hidden: torch.Tensor,
        chunk,
        pos: int | None,
        keep: int | None = None,
    ) -> torch.Tensor:
        """One decoder layer on ``hidden`` (rows of ``chunk``), after the corrupted prefix."""
        self._set_edits(chunk, layer, pos)
        try:
            cache = _PrefixKV(self.prefix[layer], tiles=len(chunk), keep=keep)
            return calls.call(layer, hidden, cache if self.prefix[layer] is not None or keep else None)
        finally:
            self._edit_rows = {}

    def _enter(self, group: Sequence[_Restoration], hidden: torch.Tensor, offset: int) -> None:
        """Initialise the rows of the restorations ``group`` (from row ``offset``) as the input
        of the layer where they join: the corrupted input with the restored token's state
        replaced, or a copy of the restoration they were identical to until now."""
        t, S = self.t, self.samples
        regular = []
        for i, r in enumerate(group):
            if r.source is not None:
                continue
            rows = slice(offset + i * S, offset + (i + 1) * S)
            hidden[rows] = self.corrupted_inputs[r.enter][:, t:]
            if r.windowed:
                regular.append(i)
            else:
                hidden[rows, 0] = self.clean_states["hidden"][r.layer, t]
        if regular:  # their first restored layer, computed at the restored token only
            members = [group[i] for i in regular]
            layer = members[0].enter - 1
            x = self.corrupted_inputs[layer][:, t : t + 1].repeat(len(members), 1, 1)
            out = self._call(self.single_calls, layer, x, members, pos=0)
            for j, i in enumerate(regular):
                hidden[offset + i * S : offset + (i + 1) * S, 0] = out[j * S : (j + 1) * S, 0]
        for i, r in enumerate(group):
            if r.source is not None:
                source = self._index[(r.kind, r.source)]
                hidden[offset + i * S : offset + (i + 1) * S] = hidden[source * S : (source + 1) * S]

    @staticmethod
    def _share_clipped_windows(chunk: list[_Restoration]) -> list[_Restoration]:
        """Windows clipped at layer 0 ([0, b) for the first layers) restore the same modules
        until the shorter one ends: such a restoration is computed as a copy of the longest
        one, made at the layer where it stops restoring. Sorted by the layer where each joins."""
        longest: dict[str, _Restoration] = {}
        for r in chunk:
            if r.windowed and min(r.modules) == 0:
                if r.kind not in longest or max(r.modules) > max(longest[r.kind].modules):
                    longest[r.kind] = r
        out = []
        for r in chunk:
            source = longest.get(r.kind) if r.windowed and min(r.modules) == 0 else None
            if source is not None and source is not r:
                r = replace(r, enter=max(r.modules) + 1, source=source.layer)
            out.append(r)
        out.sort(key=lambda r: (r.enter, r.windowed, r.source is not None))
        return out

    def _run_chunk(self, chunk: list[_Restoration]) -> tuple[list[_Restoration], torch.Tensor]:
        """P(answer) for every (restoration, sample) of ``chunk`` at token ``t``: the
        restorations in the order computed, and [restorations * samples] probabilities,
        restoration-major.

        Restorations are sorted by the layer where they join, so the rows running at layer k
        are always a prefix of the batch, growing as restorations join.
        """
        chunk = self._share_clipped_windows(chunk)
        self._index = {(r.kind, r.layer): i for i, r in enumerate(chunk)}
        t, S, N = self.t, self.samples, self.num_layers
        q = self.n_tokens - t
        first = self.corrupted_inputs[N]
        hidden = first.new_empty((len(chunk) * S, q, first.shape[-1]))
        final = first.new_empty((len(chunk) * S, first.shape[-1]))
        joined = 0

        def join_until(layer: int) -> None:
            nonlocal joined
            end = joined
            while end < len(chunk) and chunk[end].enter <= layer:
                end += 1
            if end > joined:
                self._enter(chunk[joined:end], hidden, joined * S)
                joined = end

        for k in range(chunk[0].enter, N):
            join_until(k)
            active = chunk[:joined]
            rows = joined * S
            if k < N - 1 or q == 1:
                out = self._call(self.calls, k, hidden[:rows], active, pos=0)
                if k < N - 1:
                    hidden[:rows] = out
                else:
                    final[:rows] = out[:, -1]
                continue
            # the last layer: only the last position's output is needed. Its keys/values
            # come from a call interrupted as soon as they are known; then one position.
            recorder = _PrefixKV(self.prefix[k], tiles=len(active), stop=True)
            self._set_edits(active, k, None)
            try:
                self.calls.call(k, hidden[:rows], recorder)
            except _KeysComputed:
                pass
            else:
                raise PreconditionFailed("a decoder layer did not use its key/value cache")
            finally:
                self._edit_rows = {}
            keep = self.last_calls.cached_len[k] + 1
            keys, values = recorder.result
            self.prefix_last = (keys[:, :, :-1], values[:, :, :-1])  # all but the last position
            out = self._call_last(k, hidden[:rows, -1:], active, keep)
            final[:rows] = out[:, 0]
        join_until(N)  # restorations that run no layer (the last layer's output restored)
        for i, r in enumerate(chunk):
            if r.enter == N:
                if r.source is None:
                    final[i * S : (i + 1) * S] = hidden[i * S : (i + 1) * S, -1]
                else:
                    source = self._index[(r.kind, r.source)]
                    final[i * S : (i + 1) * S] = final[source * S : (source + 1) * S]
        return chunk, _answer_probs(self.model, self.adapter, final, self.answer_id)

    def _call_last(self, layer: int, hidden: torch.Tensor, chunk, keep: int) -> torch.Tensor:
        """The last layer at the last position, after the keys/values of all others."""
        pos = 0 if self.t == self.n_tokens - 1 else None
        self._set_edits(chunk, layer, pos)
        try:
            cache = _PrefixKV(self.prefix_last, tiles=1, keep=keep)
            return self.last_calls.call(layer, hidden, cache)
        finally:
            self._edit_rows = {}
