"""Extra FFN neurons (T-Patcher's patches): what they compute and how they ride on a model.

A patch neuron j of one MLP has a key k_j, a bias b_j and a value v_j. Given the MLP's input x
(the normalised hidden state the block feeds its FFN), it adds relu(k_j . x + b_j) * v_j to the
MLP's output, beside the FFN's own neurons. ReLU, not the FFN's own activation: a neuron below
its threshold then contributes exactly zero, which is what keeps a patch silent on inputs it
was not made for (GELU/SiLU leak small negative values everywhere).

All patches of one layer form a :class:`NeuronBank` (keys [n, d], biases [n], values [n, d]),
so any number of them costs one small matmul pair per token. A bank is immutable: the host
builds a new one on apply or revert and swaps the reference, so a forward pass sees one
revision's patches whole.

As an artifact, one edit's neurons are a
:class:`~editserve.editing.artifacts.RuntimeLayer` of type :data:`LAYER_TYPE` with tensors
``keys``, ``biases``, ``values`` and info ``{"module": <MLP module name>, "layer": int}``,
plus (since t_patcher-*-3) ``"prompts": [[subject, rewrite prompt text], ...]``, one per fact:
the inputs each neuron was made for, which later patches of the same module learn to stay
silent on (:func:`patched_prompts`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .artifacts import RuntimeLayer
from .hooks import Trace

LAYER_TYPE = "ffn_neurons"


@dataclass(frozen=True)
class NeuronBank:
    keys: torch.Tensor  # [n, d]
    biases: torch.Tensor  # [n]
    values: torch.Tensor  # [n, d]

    def __post_init__(self) -> None:
        n, d = self.keys.shape
        if self.biases.shape != (n,) or self.values.shape != (n, d):
            raise ValueError(f"neuron bank shapes disagree: keys {tuple(self.keys.shape)}, "
                             f"biases {tuple(self.biases.shape)}, values {tuple(self.values.shape)}")

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """k . x + b for every neuron (before the ReLU), in fp32: [..., n]."""
        return x.float() @ self.keys.T + self.biases

    def contribution(self, x: torch.Tensor) -> torch.Tensor | None:
        """What the bank adds to the MLP output for input ``x`` [..., d] (in x's dtype), or
        None when no neuron fires on any position of ``x``.

        Only the neurons that fire somewhere in this call read their values: patches are
        made to stay silent off their edits, so on ordinary traffic the value product (half
        the bank's cost) is skipped, and with it the addition to the MLP output."""
        act = torch.relu(self.activations(x))
        live = act.reshape(-1, act.shape[-1]).amax(0) > 0
        count = int(live.sum())
        if count == 0:
            return None
        if count == act.shape[-1]:
            return (act @ self.values).to(x.dtype)
        return (act[..., live] @ self.values[live]).to(x.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """What the bank adds to the MLP output for input ``x`` [..., d] (in x's dtype)."""
        added = self.contribution(x)
        return torch.zeros_like(x) if added is None else added

    @classmethod
    def concat(cls, banks: Iterable[NeuronBank]) -> NeuronBank | None:
        banks = list(banks)
        if not banks:
            return None
        return cls(torch.cat([b.keys for b in banks]), torch.cat([b.biases for b in banks]),
                   torch.cat([b.values for b in banks]))


def bank_of(layer: RuntimeLayer) -> NeuronBank:
    """The neurons an ``ffn_neurons`` artifact holds (fp32)."""
    if layer.layer_type != LAYER_TYPE:
        raise ValueError(f"runtime layer of type {layer.layer_type!r} holds no FFN neurons")
    try:
        return NeuronBank(layer.tensors["keys"].float(), layer.tensors["biases"].float(),
                          layer.tensors["values"].float())
    except KeyError as missing:
        raise ValueError(f"ffn_neurons artifact lacks tensor {missing}") from None


def module_of(layer: RuntimeLayer) -> str:
    module = layer.info.get("module")
    if not isinstance(module, str) or not module:
        raise ValueError("ffn_neurons artifact names no MLP module")
    return module


def banks_by_module(layers: Iterable[RuntimeLayer]) -> dict[str, NeuronBank]:
    """All neurons of the given artifacts, one bank per MLP module, in the given order."""
    grouped: dict[str, list[NeuronBank]] = {}
    for layer in layers:
        grouped.setdefault(module_of(layer), []).append(bank_of(layer))
    return {module: NeuronBank.concat(banks) for module, banks in grouped.items()}


def patched_prompts(layers: Iterable[RuntimeLayer], module: str) -> list[tuple[str, str]]:
    """(subject, prompt text) of every fact the given ``ffn_neurons`` artifacts patched into
    ``module``, in order, without repeats; artifacts made before prompts were recorded add
    none. A new patch keeps silent on these (T-Patcher's memory loss over the active edits)."""
    seen: dict[tuple[str, str], None] = {}
    for layer in layers:
        if layer.layer_type != LAYER_TYPE or layer.info.get("module") != module:
            continue
        for pair in layer.info.get("prompts") or ():
            if isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair):
                seen.setdefault((pair[0], pair[1]), None)
    return list(seen)


def check_fits(model: nn.Module, layer: RuntimeLayer) -> None:
    """ValueError unless the artifact's neurons match its module's width and are finite."""
    bank = bank_of(layer)
    module = module_of(layer)
    try:
        target = model.get_submodule(module)
    except AttributeError:
        raise ValueError(f"ffn_neurons artifact names unknown module {module!r}") from None
    width = _input_width(target)
    if width is not None and bank.keys.shape[1] != width:
        raise ValueError(f"neurons of width {bank.keys.shape[1]} do not fit {module} (width {width})")
    if not layer.is_finite():
        raise ValueError("ffn_neurons artifact contains NaN or inf")


def _input_width(module: nn.Module) -> int | None:
    """The hidden width an MLP reads: the smaller side of its first projection."""
    for child in module.modules():
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and child is not module:
            return int(min(weight.shape))
    return None


def adder(bank_for: callable) -> callable:
    """A forward hook adding ``bank_for()``'s neurons (None: nothing) to a module's output.

    ``bank_for`` is read on every call, so the host swaps banks without touching hooks."""

    def hook(_module: nn.Module, inputs: tuple, output):
        bank = bank_for()
        if bank is None or not inputs:
            return None
        added = bank.contribution(inputs[0])
        if added is None:  # no patch fires on these tokens: the FFN's output as it was
            return None
        if isinstance(output, tuple):
            return (output[0] + added, *output[1:])
        return output + added

    return hook


@contextmanager
def preview_neurons(model: nn.Module, layers: list[RuntimeLayer]) -> Iterator[None]:
    """Forward passes *in this thread* behave as if these neurons were hosted too."""
    banks = banks_by_module(layers)
    traces = []
    for module, bank in banks.items():
        trace = Trace(model, module, retain_output=False, retain_input=True)
        trace.edit_output = _thread_adder(trace, bank)
        traces.append(trace)
    for trace in traces:
        trace.__enter__()
    try:
        yield
    finally:
        for trace in reversed(traces):
            trace.__exit__(None, None, None)


def _thread_adder(trace: Trace, bank: NeuronBank):
    def edit(output: torch.Tensor, _name: str) -> torch.Tensor:
        return output + bank(trace.input)

    return edit
