"""Edits as data: computed without touching the served weights, applied and removed later.

A :class:`WeightDelta` maps parameter names to a change, stored either as low-rank factors
(ROME's rank-one update is ``u v^T``; MEMIT's is rank <= number of facts) or densely (FT-L).
Factors are tiny on disk and exact to rebuild. Everything is fp32 and in the parameter's own
layout (GPT-2's Conv1D weights are [in, out]); ``delta(name)`` gives the dense change.

``preview`` applies a delta *virtually*, by hooks on the owning modules that add
``x @ delta^T`` to their outputs in the calling thread only. A dry run, or "after"
probabilities measured before the real apply, therefore never touch the served weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .hooks import Trace


@dataclass
class WeightDelta:
    """{parameter name -> change}. ``factors[name] = (u, v)`` means ``delta = u @ v.T``."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def parameter_names(self) -> list[str]:
        return sorted(set(self.factors) | set(self.dense))

    def delta(self, name: str) -> torch.Tensor:
        """The dense fp32 change of one parameter, in that parameter's layout."""
        total: torch.Tensor | None = None
        if name in self.factors:
            u, v = self.factors[name]
            total = u.float() @ v.float().T
        if name in self.dense:
            d = self.dense[name].float()
            total = d if total is None else total + d
        if total is None:
            raise KeyError(name)
        return total

    def norm(self) -> float:
        return float(sum(self.delta(n).pow(2).sum() for n in self.parameter_names) ** 0.5)

    def is_finite(self) -> bool:
        tensors = [t for pair in self.factors.values() for t in pair] + list(self.dense.values())
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    # --- persistence (safetensors; never pickle) ---------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, (u, v) in self.factors.items():
            out[f"factor_u::{name}"] = u.detach().float().contiguous()
            out[f"factor_v::{name}"] = v.detach().float().contiguous()
        for name, d in self.dense.items():
            out[f"dense::{name}"] = d.detach().float().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> WeightDelta:
        delta = cls()
        for key, value in tensors.items():
            kind, _, name = key.partition("::")
            if kind == "factor_u":
                delta.factors[name] = (value, tensors[f"factor_v::{name}"])
            elif kind == "dense":
                delta.dense[name] = value
            elif kind != "factor_v":
                raise ValueError(f"unknown artifact entry {key!r}")
        return delta

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        save_file(self.to_tensors(), str(path), metadata=metadata or {})

    @classmethod
    def load(cls, path: Path) -> WeightDelta:
        return cls.from_tensors(load_file(str(path)))


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _input_adder(trace: Trace, weight_like: torch.Tensor):
    """An output editor adding ``input @ weight_like`` (the input is retained by ``trace``)."""

    def edit(out: torch.Tensor, _name: str) -> torch.Tensor:
        assert trace.input is not None
        return out + (trace.input.to(weight_like.dtype) @ weight_like).to(out.dtype)

    return edit


def _bias_adder(change: torch.Tensor):
    def edit(out: torch.Tensor, _name: str) -> torch.Tensor:
        return out + change.to(out.dtype)

    return edit


@contextmanager
def preview(model: nn.Module, delta: WeightDelta) -> Iterator[None]:
    """Make forward passes *in this thread* behave as if ``delta`` were applied.

    Supports weights and biases of Linear/Conv1D modules, which covers every method here.
    Other threads keep seeing the served weights.
    """
    with ExitStack() as stack:
        for name in delta.parameter_names:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            change = delta.delta(name)
            trace = Trace(model, module_name, retain_output=False, retain_input=(attr == "weight"))
            if attr == "bias":
                trace.edit_output = _bias_adder(change)
            elif attr == "weight":
                # Linear: y = x W^T, so dy = x dW^T; Conv1D stores W as [in, out]: dy = x dW
                trace.edit_output = _input_adder(trace, change if _is_conv1d(module) else change.T)
            else:
                raise ValueError(f"cannot preview a change to {name!r}")
            stack.enter_context(trace)
        yield
