"""Every editing method, declared once.

A :class:`MethodSpec` says everything the rest of the system needs about a method: its name
on the command line and in the journal, its value in the proto's ``EditMethod`` enum, the
field of ``EditRequest.options`` that carries its options, the table of the per-family
hyperparameter files it reads, the function that computes it, the kind of artifact it
returns, and what a serving backend must be able to do to host that artifact. The server's
method table, the client's request conversion and the CLI's choices are all derived from
:data:`METHODS`; a test checks the proto against it.

This module is deliberately light (no torch, no transformers, no gRPC): the client imports
it. Compute functions are named as ``"module:function"`` strings and imported on first use.
A method whose ``compute`` is None is declared (its API exists) but not built yet; the server
answers UNIMPLEMENTED for it from one place.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class ArtifactKind(StrEnum):
    """What an edit produces. Backends declare which kinds they can host."""

    WEIGHT_DELTA = "weight_delta"  # composed into parameters (ROME, MEMIT, FT-L)
    RUNTIME_LAYER = "runtime_layer"  # state beside the weights (T-Patcher neurons, SERAC memory)


@dataclass(frozen=True)
class MethodSpec:
    """One editing method.

    name: the method's name everywhere (CLI ``--method``, journal rows, metrics labels).
    proto_enum: its ``EditMethod`` value name in protos/editserve/v1/editing.proto.
    options_field: the ``EditRequest.options`` oneof field holding its options.
    hparams_table: the table in ``editing/hparams/<family>.toml`` with its defaults.
    compute: ``"module:function"`` taking (EditingContext, facts, hyperparameters, *,
        should_stop) and returning (artifact, diagnostics); None while the method is only
        declared.
    artifact: the kind of artifact ``compute`` returns.
    requires: backend capabilities needed to host it (artifact kinds, plus e.g. "ffn_neurons").
    max_facts: the most facts one Edit may carry (bounded input, checked before compute).
    summary: one line for help texts and docs.
    """

    name: str
    proto_enum: str
    options_field: str
    hparams_table: str
    compute: str | None
    artifact: ArtifactKind
    requires: frozenset[str]
    max_facts: int
    summary: str

    @property
    def implemented(self) -> bool:
        return self.compute is not None

    def load_compute(self) -> Callable:
        """The compute function (imports the science on first use)."""
        if self.compute is None:
            raise NotImplementedError(f"edit method {self.name!r} is declared but not implemented")
        module, _, function = self.compute.partition(":")
        return getattr(importlib.import_module(module), function)

    def run(self, ctx, facts: list, options: dict, should_stop: Callable[[], bool] | None = None) -> tuple:
        """Compute an edit: the model family's shipped hyperparameters (``hparams_table``),
        scaled to its depth, with the request's ``options`` (checked against their bounds).
        ``should_stop`` is checked between steps (``editing.errors.check_stop``)."""
        from .hparams import hyperparams_class

        family = hyperparams_class(self.hparams_table).load(ctx.adapter.model_type, ctx.adapter.num_layers)
        return self.load_compute()(ctx, facts, family.with_overrides(**options), should_stop=should_stop)


def _weight_method(name: str, enum: str, field: str, compute: str | None, max_facts: int, summary: str) -> MethodSpec:
    return MethodSpec(name, enum, field, name, compute, ArtifactKind.WEIGHT_DELTA,
                      frozenset({ArtifactKind.WEIGHT_DELTA.value}), max_facts, summary)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        _weight_method("rome", "EDIT_METHOD_ROME", "rome", "editserve.editing.rome:compute_rome", 100,
                       "rank-one update of one MLP output projection (Meng et al. 2022)"),
        _weight_method("memit", "EDIT_METHOD_MEMIT", "memit", "editserve.editing.memit:compute_memit", 10_000,
                       "many facts at once, spread over a range of MLP layers (Meng et al. 2023)"),
        _weight_method("ft_l", "EDIT_METHOD_FT_L", "ft", "editserve.editing.ft:compute_ft", 100,
                       "constrained fine-tuning of one MLP output projection (baseline)"),
        MethodSpec("serac", "EDIT_METHOD_SERAC", "serac", "serac", "editserve.editing.serac:compute_serac", ArtifactKind.RUNTIME_LAYER,
                   frozenset({ArtifactKind.RUNTIME_LAYER.value, "routing"}), 10_000,
                   "scope classifier over a memory of edits plus a counterfactual path (Mitchell et al. 2022)"),
        MethodSpec("t_patcher", "EDIT_METHOD_T_PATCHER", "t_patcher", "t_patcher",
                   "editserve.editing.tpatcher:compute_tpatcher", ArtifactKind.RUNTIME_LAYER,
                   frozenset({ArtifactKind.RUNTIME_LAYER.value, "ffn_neurons"}), 1_000,
                   "extra FFN neurons trained per edit (Huang et al. 2023)"),
    )
}


def method(name: str) -> MethodSpec:
    """The spec of ``name``; ValueError naming the known methods otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown edit method {name!r}; known: {sorted(METHODS)}") from None


def by_proto_enum(enum_name: str) -> MethodSpec | None:
    return next((s for s in METHODS.values() if s.proto_enum == enum_name), None)
