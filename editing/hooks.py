"""Context managers that read or rewrite a module's output for the length of a ``with`` block.

In the spirit of baukit's ``nethook``: hooks are registered on entry and removed on exit, even
when the body raises, so no failed edit or trace leaves anything attached to the served model.

Every hook here is *scoped to the thread that entered the block*: the served model is shared
with concurrent generation running in another thread, and a hook that edits MLP outputs for an
optimisation must not leak into a user's Generate call running at the same moment.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

OutputEditor = Callable[[torch.Tensor, str], torch.Tensor | None]


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, tensor: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    return tensor


class Trace:
    """Retain (and optionally rewrite) the output or input of one module.

    ``edit_output(tensor, name)`` may return a new tensor to replace the module's output
    (for a tuple output, its first element), or None to leave it as is.
    ``retain_input`` keeps the first positional input (e.g. the keys of a projection).
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        *,
        retain_output: bool = True,
        retain_input: bool = False,
        edit_output: OutputEditor | None = None,
        detach: bool = True,
    ) -> None:
        self.name = name
        self.module = model.get_submodule(name)
        self.retain_output = retain_output
        self.retain_input = retain_input
        self.edit_output = edit_output
        self.detach = detach
        self.output: torch.Tensor | None = None
        self.input: torch.Tensor | None = None
        self._owner = threading.get_ident()
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if threading.get_ident() != self._owner:
            return None
        if self.retain_input and inputs:
            value = inputs[0]
            self.input = value.detach() if self.detach else value
        result = None
        if self.edit_output is not None:
            replaced = self.edit_output(_first_tensor(output), self.name)
            if replaced is not None:
                result = _replace_first(output, replaced)
        if self.retain_output:
            value = _first_tensor(result if result is not None else output)
            self.output = value.detach() if self.detach else value
        return result

    def __enter__(self) -> Trace:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class TraceDict(dict[str, Trace]):
    """Several :class:`Trace` at once, keyed by module name, all removed together."""

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        *,
        retain_output: bool = True,
        retain_input: bool = False,
        edit_output: OutputEditor | None = None,
        detach: bool = True,
    ) -> None:
        super().__init__()
        self._stack = ExitStack()
        self._spec = dict(
            retain_output=retain_output,
            retain_input=retain_input,
            edit_output=edit_output,
            detach=detach,
        )
        self._model = model
        self._names = list(dict.fromkeys(names))

    def __enter__(self) -> TraceDict:
        try:
            for name in self._names:
                self[name] = self._stack.enter_context(Trace(self._model, name, **self._spec))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def hooks_attached(model: nn.Module) -> int:
    """How many forward hooks are registered anywhere in the model (tests use it)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
