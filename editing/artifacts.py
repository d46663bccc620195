"""Edits as data: computed without touching the served weights, applied and removed later.

Two kinds (:class:`~editserve.editing.registry.ArtifactKind`): a :class:`WeightDelta` is
composed into parameters; a :class:`RuntimeLayer` is state that lives beside the weights
(T-Patcher's extra FFN neurons, SERAC's memory entries) and is hosted by a backend that
declares the matching capability. Both are saved as safetensors with a small typed header
(:data:`FORMAT_KEY`, ``kind`` and the kind's own fields) that :func:`load_artifact` checks, so
a journal never applies a file as something it is not. Files written before the header
existed (journal v1) hold only weight deltas and load as such.

A :class:`WeightDelta` maps parameter names to a change, stored either as low-rank factors
(ROME's rank-one update is ``u v^T``; MEMIT's is rank <= number of facts) or densely (FT-L).
Factors are tiny on disk and exact to rebuild. Everything is fp32 and in the parameter's own
layout (GPT-2's Conv1D weights are [in, out]); ``delta(name)`` gives the dense change.

``preview`` applies a delta *virtually*, by hooks on the owning modules that add
``x @ delta^T`` to their outputs in the calling thread only. A dry run, or "after"
probabilities measured before the real apply, therefore never touch the served weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .hooks import Trace
from .registry import ArtifactKind

FORMAT_KEY = "editserve_artifact"
FORMAT_VERSION = "2"


class ArtifactError(ValueError):
    """A file is not an artifact this version understands, or not of the kind expected."""


@dataclass
class WeightDelta:
    """{parameter name -> change}. ``factors[name] = (u, v)`` means ``delta = u @ v.T``.

    ``keys[name]`` [d_in, n], where a method records them, are the inputs the change was
    written for (ROME's k*, MEMIT's K per layer): later edits that preserve earlier ones
    (``preserve``) keep these keys' outputs as they are. They never enter the change itself.
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, torch.Tensor] = field(default_factory=dict)

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
        for name, k in self.keys.items():
            out[f"keys::{name}"] = k.detach().float().contiguous()
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
            elif kind == "keys":
                delta.keys[name] = value
            elif kind != "factor_v":
                raise ValueError(f"unknown artifact entry {key!r}")
        return delta

    kind = ArtifactKind.WEIGHT_DELTA

    def header(self) -> dict[str, str]:
        return {}

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        save_artifact(self, path, metadata)

    @classmethod
    def load(cls, path: Path) -> WeightDelta:
        artifact = load_artifact(path)
        if not isinstance(artifact, cls):
            raise ArtifactError(f"{path} holds a {artifact.kind}, not a weight delta")
        return artifact


@dataclass
class RuntimeLayer:
    """State a backend hosts beside the weights: ``layer_type`` says which host code reads it
    (e.g. ``"ffn_neurons"``: keys, values and biases appended to one FFN; ``"memory"``: SERAC
    entries), ``info`` holds its small typed fields (JSON), ``tensors`` its data (fp32).

    Removing an edit removes its layer whole, so revert is exact by construction.
    """

    layer_type: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    kind = ArtifactKind.RUNTIME_LAYER

    @property
    def parameter_names(self) -> list[str]:
        return []  # base parameters never change

    def norm(self) -> float:
        return 0.0

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.tensors.values() if t.is_floating_point())

    def header(self) -> dict[str, str]:
        return {"layer_type": self.layer_type, "info": json.dumps(self.info, sort_keys=True)}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"runtime::{k}": v.detach().contiguous() for k, v in self.tensors.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> RuntimeLayer:
        data = {}
        for key, value in tensors.items():
            prefix, _, name = key.partition("::")
            if prefix != "runtime":
                raise ArtifactError(f"unknown runtime layer entry {key!r}")
            data[name] = value
        if not header.get("layer_type"):
            raise ArtifactError("runtime layer artifact has no layer_type")
        return cls(header["layer_type"], data, json.loads(header.get("info", "{}")))


Artifact = WeightDelta | RuntimeLayer


def compact_keys(keys: torch.Tensor) -> torch.Tensor:
    """Keys [d, n] as a matrix with the same Gram K K^T and at most d columns.

    Preservation only ever reads K K^T, so once there are more keys than dimensions (a
    10,000-fact MEMIT edit: 10,000 x 1536 floats per layer) a square root of the Gram is
    all that needs keeping: V sqrt(Lambda) from its eigendecomposition, [d, d]."""
    if keys.shape[1] <= keys.shape[0]:
        return keys.float()
    k = keys.double()
    values, vectors = torch.linalg.eigh(k @ k.T)
    return (vectors * values.clamp_min(0).sqrt()).float()


def save_artifact(artifact: Artifact, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``artifact`` as safetensors with its typed header (plus ``metadata``, e.g. the edit id)."""
    header = {**(metadata or {}), **artifact.header(), FORMAT_KEY: FORMAT_VERSION, "kind": artifact.kind.value}
    tensors = artifact.to_tensors()
    if not tensors:  # safetensors needs at least one entry to carry the header
        tensors = {"empty::marker": torch.zeros(1)}
    save_file(tensors, str(path), metadata=header)


def read_header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_artifact(path: Path, expected: ArtifactKind | None = None) -> Artifact:
    """Load and check an artifact file of either kind (v1 files without a header are weight deltas)."""
    header = read_header(path)
    version = header.get(FORMAT_KEY)
    if version is not None and version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format {version} is not supported (this version reads {FORMAT_VERSION})")
    try:
        kind = ArtifactKind(header.get("kind", ArtifactKind.WEIGHT_DELTA.value))
    except ValueError:
        raise ArtifactError(f"{path}: unknown artifact kind {header.get('kind')!r}") from None
    if expected is not None and kind != expected:
        raise ArtifactError(f"{path} holds a {kind.value}, expected a {expected.value}")
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("empty::")}
    if kind == ArtifactKind.WEIGHT_DELTA:
        return WeightDelta.from_tensors(tensors)
    return RuntimeLayer.from_tensors(tensors, header)


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
def preview(model: nn.Module, delta: Artifact) -> Iterator[None]:
    """Make forward passes *in this thread* behave as if ``delta`` were applied (either kind).

    Weight deltas: weights and biases of Linear/Conv1D modules, which covers every method
    here. Runtime layers: the kinds :mod:`.neurons` hosts. Other threads keep seeing the
    served model.
    """
    if isinstance(delta, RuntimeLayer):
        from .neurons import preview_neurons  # neurons imports this module

        with preview_neurons(model, [delta]):
            yield
        return
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
