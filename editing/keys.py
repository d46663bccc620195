"""Keys: what an MLP output projection reads at the subject's last token (ROME's k*).

ROME views an MLP's output projection W as a linear associative memory: the key k is the
projection's input (the activated hidden units), the value v = W k its output. The subject is
"looked up" at its last token, so k* is the projection's input there, averaged over the
rewrite prompt preceded by each context prefix (:mod:`editserve.editing.contexts`).

This module also holds the two pieces every key/value method shares: locating the subject's
last token in a tokenized prompt, and running the model only as far as a layer to capture
projection inputs (covariance statistics reuse it, MEMIT will too).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .adapter import ArchitectureAdapter
from .errors import InvalidRequest
from .hooks import Trace


@dataclass(frozen=True)
class PromptTokens:
    """A tokenized prompt (BOS included where the tokenizer adds one) and where the subject ends."""

    text: str
    ids: tuple[int, ...]
    subject_last: int


def fill(template: str, prompt: str, subject: str) -> tuple[str, int, int]:
    """``template`` ("<context>. {}") around ``prompt`` ("The mother tongue of {} is") with the
    subject written in: (text, subject start char, subject end char)."""
    full = template.replace("{}", prompt, 1)
    before, sep, after = full.partition("{}")
    if not sep:
        raise InvalidRequest(f"prompt {prompt!r} has no '{{}}' for the subject")
    return before + subject + after, len(before), len(before) + len(subject)


def locate_subject(tokenizer, template: str, prompt: str, subject: str) -> PromptTokens:
    """Tokenize the filled prompt and find the index of the subject's last token.

    Uses the fast tokenizer's character offsets (robust to merges at the subject's edges);
    a tokenizer without offsets falls back to tokenizing the text up to the subject's end.
    """
    text, start, end = fill(template, prompt, subject)
    if end <= start:
        raise InvalidRequest("the subject is empty")
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError):
        enc, offsets = tokenizer(text), None
    ids = tuple(enc["input_ids"])
    if offsets is not None:
        hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        index = hits[-1] if hits else -1
    else:
        index = len(tokenizer(text[:end]).input_ids) - 1
    if not 0 <= index < len(ids):
        raise InvalidRequest(f"subject {subject!r} not found among the tokens of {text!r}")
    return PromptTokens(text, ids, index)


def body_of(model):
    """The decoder stack without the LM head (``last_hidden_state`` is after the final norm)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the needed layer has run."""


@torch.no_grad()
def capture_projection_inputs(model, adapter: ArchitectureAdapter, layers: Iterable[int],
                              input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                              ) -> dict[int, torch.Tensor]:
    """{layer: input of that layer's MLP output projection, [batch, seq, d_mlp]}.

    The forward pass stops right after the deepest requested projection: layers above it
    and the LM head never run. Hooks are thread-scoped (see :mod:`.hooks`).
    """
    layers = sorted(set(layers))
    names = {layer: adapter.mlp_out(layer) for layer in layers}
    inputs, _ = capture_io(model, names.values(), (), names[layers[-1]], input_ids, attention_mask)
    return {layer: inputs[name] for layer, name in names.items()}


@torch.no_grad()
def capture_io(model, input_of: Iterable[str], output_of: Iterable[str], stop_after: str,
               input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({module: its first input}, {module: its output}) of one forward pass that ends as
    soon as ``stop_after`` has run (so nothing above it, nor the LM head, is computed)."""
    owner = threading.get_ident()

    def stop(_module, _inputs, _output):
        if threading.get_ident() == owner:
            raise _Stop

    traces = [Trace(model, name, retain_output=False, retain_input=True) for name in dict.fromkeys(input_of)]
    traces += [Trace(model, name, retain_output=True) for name in dict.fromkeys(output_of)]
    for trace in traces:
        trace.__enter__()
    handle = model.get_submodule(stop_after).register_forward_hook(stop)
    try:
        body_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
        for trace in traces:
            trace.close()
    inputs = {t.name: t.input for t in traces if t.retain_input}
    outputs = {t.name: t.output for t in traces if t.retain_output}
    return inputs, outputs


def batch_rows(rows: list[tuple[int, ...]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask for rows of different lengths."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def pad_id_of(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def compute_keys(model, tokenizer, adapter: ArchitectureAdapter, layer: int,
                 prompts: list[PromptTokens]) -> torch.Tensor:
    """The projection input at the subject's last token of each prompt (fp32, [n, d_mlp])."""
    device = next(model.parameters()).device
    ids, mask = batch_rows([p.ids for p in prompts], pad_id_of(tokenizer), device)
    keys = capture_projection_inputs(model, adapter, [layer], ids, mask)[layer]
    rows = torch.arange(len(prompts), device=device)
    cols = torch.tensor([p.subject_last for p in prompts], device=device)
    return keys[rows, cols].float()


def compute_key(model, tokenizer, adapter: ArchitectureAdapter, layer: int,
                prompts: list[PromptTokens]) -> torch.Tensor:
    """k*: the mean projection input at the subject's last token over ``prompts`` (fp32, [d_mlp])."""
    return compute_keys(model, tokenizer, adapter, layer, prompts).mean(0)
