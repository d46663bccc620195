"""The model host: one object owns the model, its tokenizer, the weight state and the revision.

Readers (generation steps, traces, scoring) hold ``host.lock.read()``; applying or reverting an
edit holds ``host.lock.write()`` only to swap in tensors prepared outside the lock. The live value of every touched tensor is always recomputed as
``base + sum(active deltas)`` from a pristine copy of the base, in one canonical order, so a
revert restores bit-identical weights and a replay after restart reproduces the same bits.

Runtime layers (T-Patcher's FFN neurons) never touch a parameter: the active ones are stacked
into one immutable :class:`~editserve.editing.neurons.NeuronBank` per MLP, which a forward hook
(registered once per MLP, the first time it gets neurons) reads on every call. Apply and revert
swap the bank reference under the same write lock, so a forward pass sees one revision's
neurons whole, and removing an edit's artifact removes exactly its neurons.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from editserve.editing import memory as edit_memory
from editserve.editing import neurons
from editserve.editing.adapter import ArchitectureAdapter
from editserve.editing.artifacts import Artifact, RuntimeLayer, WeightDelta, compact_keys
from editserve.editing.registry import ArtifactKind

from .fresh_thread import in_fresh_thread
from .rwlock import RWLock

# What the model fingerprint reads (see ModelHost.fingerprint); changing any of these changes
# every fingerprint, so every existing journal would be refused.
ARCHITECTURE_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("num_layers", ("num_hidden_layers", "n_layer", "num_layers")),
    ("hidden_size", ("hidden_size", "n_embd", "d_model")),
    ("intermediate_size", ("intermediate_size", "n_inner", "ffn_dim")),
    ("vocab_size", ("vocab_size",)),
    ("num_heads", ("num_attention_heads", "n_head", "num_heads")),
    ("num_kv_heads", ("num_key_value_heads", "num_kv_heads")),
    ("head_dim", ("head_dim",)),
)
FINGERPRINT_PARAMETERS = 8
FINGERPRINT_VALUES = 4096


@dataclass
class _Active:
    edit_id: str
    delta: Artifact


def _weight_deltas(active: Iterable[_Active]) -> Iterable[WeightDelta]:
    return (a.delta for a in active if isinstance(a.delta, WeightDelta))


def _runtime_layers(active: Iterable[_Active], layer_type: str) -> list[tuple[str, RuntimeLayer]]:
    return [(a.edit_id, a.delta) for a in active
            if isinstance(a.delta, RuntimeLayer) and a.delta.layer_type == layer_type]


def compose(base: torch.Tensor, deltas: Iterable[WeightDelta], name: str) -> torch.Tensor:
    """base + sum of the deltas for one tensor, in the given order, cast back to base's dtype.

    Low-rank factors of all deltas are stacked and multiplied once (fast for many small
    edits); dense parts are added in order. The same inputs always give the same bits.
    """
    us, vs, dense = [], [], []
    for delta in deltas:
        if name in delta.factors:
            u, v = delta.factors[name]
            us.append(u.float())
            vs.append(v.float())
        if name in delta.dense:
            dense.append(delta.dense[name].float())
    total = base.float().clone()
    if us:
        total += torch.cat(us, dim=1) @ torch.cat(vs, dim=1).T
    for d in dense:
        total += d
    return total.to(base.dtype)


@dataclass
class ModelHost:
    model: nn.Module
    tokenizer: object
    name: str
    dtype: str
    device: str
    adapter: ArchitectureAdapter = field(init=False)
    lock: RWLock = field(default_factory=RWLock)
    revision: int = 0
    _pristine: dict[str, torch.Tensor] = field(default_factory=dict)
    _active: list[_Active] = field(default_factory=list)
    _state_guard: threading.Lock = field(default_factory=threading.Lock)
    # MLP module name -> the active neurons there (immutable; swapped under the write lock)
    _banks: dict[str, neurons.NeuronBank] = field(default_factory=dict)
    _bank_hooks: dict[str, torch.utils.hooks.RemovableHandle] = field(default_factory=dict)
    # SERAC: the sentence encoder (loaded on first use) and the active entries' index
    encoder_name: str = edit_memory.DEFAULT_ENCODER
    _encoder: edit_memory.Encoder | None = None
    _memory: edit_memory.EditMemory | None = None
    # active edits whose keys :meth:`active_keys` leaves out (a consolidation's members while
    # their joint solve runs: they are being replaced, not preserved)
    _keys_left_out: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.adapter = ArchitectureAdapter.from_model(self.model)

    @property
    def backend_name(self) -> str:
        """The generation backend this served state belongs to (named in refusals)."""
        return "hf"

    @property
    def capabilities(self) -> frozenset[str]:
        """What this served state can host (:class:`~editserve.editing.registry.MethodSpec.requires`):
        weight deltas, composed into the parameters by storage swaps, and runtime layers of
        FFN neurons, added by one hook per patched MLP."""
        return frozenset({ArtifactKind.WEIGHT_DELTA.value, ArtifactKind.RUNTIME_LAYER.value, "ffn_neurons",
                          "routing"})

    # --- SERAC routing ---------------------------------------------------------------
    @property
    def encoder(self) -> edit_memory.Encoder:
        """The sentence encoder of the edit memory, loaded once on first use."""
        with self._state_guard:
            if self._encoder is None:
                self._encoder = edit_memory.Encoder(self.encoder_name)
            return self._encoder

    def _build_memory(self, layers: list[tuple[str, RuntimeLayer]]) -> edit_memory.EditMemory | None:
        if not layers:
            return None
        stale = any(layer.info.get("encoder") != self.encoder_name for _, layer in layers)
        return edit_memory.EditMemory.build(layers, self.encoder if stale else None)

    def route(self, texts: list[str], extra: list[tuple[str, RuntimeLayer]] = ()
              ) -> list[edit_memory.Match | None]:
        """Which memory entry (if any) each input is in scope of, at the current revision,
        plus ``extra`` memory artifacts (a dry run's preview). Costs nothing while no SERAC
        edit is active, and the encoder runs only for inputs that mention an entry's subject."""
        memory = self._memory
        if extra:
            memory = self._build_memory(_runtime_layers(self._active, edit_memory.LAYER_TYPE) + list(extra))
        if memory is None or not len(memory):
            return [None] * len(texts)
        # Generate calls route from gRPC threads, which live on: the encoder (the only torch work
        # here, and only for inputs naming an edited subject) runs in a thread that ends with it,
        # leaving no OpenMP team behind (fresh_thread.py)
        return memory.route(texts, lambda batch: in_fresh_thread(partial(self.encoder.encode, batch), "editserve-route"))

    def routed_prompts(self, texts: list[str], extra: list[tuple[str, RuntimeLayer]] = ()
                       ) -> tuple[list[str], list[edit_memory.Match | None]]:
        """The inputs as the model should read them (the counterfactual path for in-scope
        ones), and the matches."""
        matches = self.route(texts, extra)
        return [t if m is None else edit_memory.counterfactual_input(m, t) for t, m in zip(texts, matches, strict=True)
                ], matches

    # --- weight state ---------------------------------------------------------------
    @property
    def active_edit_ids(self) -> list[str]:
        return [a.edit_id for a in self._active]

    def active_parameter_names(self) -> set[str]:
        """Every tensor some active weight delta changes (what a resync must recompose)."""
        return {n for d in _weight_deltas(self._active) for n in d.parameter_names}

    def active_artifact(self, edit_id: str) -> Artifact:
        """The artifact of an active edit, as applied (KeyError if it is not active)."""
        for active in self._active:
            if active.edit_id == edit_id:
                return active.delta
        raise KeyError(edit_id)

    def active_keys(self, name: str) -> torch.Tensor | None:
        """The keys [d_in, m] the active weight deltas wrote into parameter ``name`` (as a
        compact matrix with the same Gram once they outnumber d_in), or None: what an edit
        with ``preserve`` keeps in place. Edits are computed under the edit mutex, so the
        active set cannot change while one reads this."""
        kept = (a for a in self._active if a.edit_id not in self._keys_left_out)
        blocks = [d.keys[name] for d in _weight_deltas(kept) if name in d.keys]
        return compact_keys(torch.cat(blocks, 1)) if blocks else None

    @contextmanager
    def keys_left_out(self, edit_ids: Iterable[str]) -> Iterator[None]:
        """:meth:`active_keys` without these edits' keys while in the block (on the edit
        thread, under the edit mutex: a consolidation solving for their facts again)."""
        self._keys_left_out = frozenset(edit_ids)
        try:
            yield
        finally:
            self._keys_left_out = frozenset()

    def active_neuron_prompts(self, module: str) -> list[tuple[str, str]]:
        """(subject, prompt) of every fact an active T-Patcher edit patched into ``module``:
        what a new patch there must stay silent on. Read under the edit mutex, like
        :meth:`active_keys`."""
        return neurons.patched_prompts((layer for _id, layer in _runtime_layers(self._active, neurons.LAYER_TYPE)), module)

    def _prepare(self, active: list[_Active], names: Iterable[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """New live values for the named tensors given an active set, and the pristine copies
        still to record (no lock needed: only the edit manager's one writer calls this).

        A tensor seen for the first time has no active edit, so its live value *is* the base;
        since commits swap storage instead of copying into it, that storage is never written
        again and can be kept as the pristine copy without cloning.
        """
        values, pristine = {}, {}
        for name in names:
            base = self._pristine.get(name)
            if base is None:
                base = pristine[name] = self.model.get_parameter(name).detach()
            values[name] = compose(base, _weight_deltas(active), name)
        return values, pristine

    def _commit(self, active: list[_Active], prepared: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
                revision: int) -> float:
        """Swap the prepared tensors in under the write lock; returns the pause in seconds.

        Swapping each parameter's storage (not copying into it) makes the pause independent of
        tensor size: generation waits microseconds, not the milliseconds a copy takes while
        the cores are busy with an edit computation.
        """
        values, pristine = prepared
        banks = neurons.banks_by_module([layer for _, layer in _runtime_layers(active, neurons.LAYER_TYPE)])
        memory_layers = _runtime_layers(active, edit_memory.LAYER_TYPE)
        unchanged = [i for i, _ in memory_layers] == [i for i, _ in _runtime_layers(self._active, edit_memory.LAYER_TYPE)]
        # a weight edit must not pay for rebuilding (or re-encoding) the SERAC index
        memory = self._memory if unchanged else self._build_memory(memory_layers)
        # Record the pristine copies first: they are the current storages, so this is right
        # whatever happens next, and a swap that fails half-way can still be undone from them
        # (:meth:`restore`).
        self._pristine.update(pristine)
        with self.lock.write():
            started = time.perf_counter()
            for name, value in values.items():
                self.model.get_parameter(name).data = value
            for module in banks.keys() - self._bank_hooks.keys():
                self._bank_hooks[module] = self.model.get_submodule(module).register_forward_hook(
                    neurons.adder(lambda module=module: self._banks.get(module)))
            self._banks = banks
            self._memory = memory
            self._active = active
            self.revision = revision
            return time.perf_counter() - started

    def check_delta(self, delta: Artifact) -> None:
        """Raise ValueError unless the artifact fits this model; call before journaling it."""
        if isinstance(delta, RuntimeLayer):
            if delta.layer_type == neurons.LAYER_TYPE:
                neurons.check_fits(self.model, delta)
            elif delta.layer_type == edit_memory.LAYER_TYPE:
                edit_memory.entries_of("check", delta)
                if not delta.is_finite():
                    raise ValueError("memory artifact contains NaN or inf")
            else:
                raise ValueError(f"the hf backend cannot host runtime layers of type {delta.layer_type!r}")
            return
        for name in delta.parameter_names:
            try:
                param = self.model.get_parameter(name)
            except AttributeError as error:
                raise ValueError(f"delta names unknown parameter {name!r}") from error
            shape = tuple(delta.delta(name).shape)
            if shape != tuple(param.shape):
                raise ValueError(f"delta for {name} has shape {shape}, parameter has {tuple(param.shape)}")
        if not delta.is_finite():
            raise ValueError("delta contains NaN or inf")

    def apply(self, edit_id: str, delta: Artifact, revision: int) -> float:
        """Add an edit and set the revision; returns the write-lock pause in seconds."""
        self.check_delta(delta)
        active = [*self._active, _Active(edit_id, delta)]
        prepared = self._prepare(active, delta.parameter_names)
        return self._commit(active, prepared, revision)

    def replace(self, remove: set[str], edit_id: str, delta: Artifact, revision: int) -> float:
        """Swap the active edits ``remove`` for one edit (a consolidation), in one commit."""
        self.check_delta(delta)
        gone = [a for a in self._active if a.edit_id in remove]
        if len(gone) != len(remove):
            raise KeyError(sorted(remove - {a.edit_id for a in gone}))
        active = [a for a in self._active if a.edit_id not in remove] + [_Active(edit_id, delta)]
        names = {n for a in gone for n in a.delta.parameter_names} | set(delta.parameter_names)
        return self._commit(active, self._prepare(active, sorted(names)), revision)

    def revert(self, edit_id: str, revision: int) -> float:
        target = next((a for a in self._active if a.edit_id == edit_id), None)
        if target is None:
            raise KeyError(edit_id)
        active = [a for a in self._active if a.edit_id != edit_id]
        prepared = self._prepare(active, target.delta.parameter_names)
        return self._commit(active, prepared, revision)

    def advance(self, revision: int) -> float:
        """Set the revision without changing what is served (the revert of a quarantined edit,
        which was never applied); returns the write-lock pause."""
        with self.lock.write():
            started = time.perf_counter()
            self.revision = revision
            return time.perf_counter() - started

    def load_state(self, edits: list[tuple[str, Artifact]], revision: int, also: Iterable[str] = ()) -> float:
        """Replay: apply a whole active set at once (start-up), setting the revision. ``also``
        names tensors to recompute although no edit of the set touches them: after a failed
        apply or revert, the tensors it may have swapped half-way go back to base + deltas
        (their pristine copies are recorded before any swap)."""
        active = [_Active(i, d) for i, d in edits]
        names = sorted({n for _, d in edits for n in d.parameter_names} | set(also))
        prepared = self._prepare(active, names)
        return self._commit(active, prepared, revision)

    def weights_digest(self) -> str:
        """sha256 over every parameter's bytes, in name order, then over the hosted runtime
        layers' tensors (MLP module order) when there are any: the served state that decides
        every output, for replay/revert checks."""
        digest = hashlib.sha256()
        with self.lock.read():
            for name, param in sorted(self.model.named_parameters()):
                digest.update(name.encode())
                digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            for module, bank in sorted(self._banks.items()):
                digest.update(module.encode())
                for tensor in (bank.keys, bank.biases, bank.values):
                    digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            for entry in self._memory.entries if self._memory is not None else ():
                digest.update(json.dumps([entry.edit_id, entry.key, entry.subject, entry.target, entry.threshold]
                                         ).encode())
        return digest.hexdigest()

    def fingerprint(self) -> str:
        """Identity of the *base* model, stable across dtypes and library versions.

        Why not the whole config: it records the transformers version and the dtype, so an
        upgrade or ``--dtype bf16`` would make the same weights look like another model and
        the journal would refuse them. This hashes what defines the weights instead: the
        architecture fields (:data:`ARCHITECTURE_FIELDS`) and, for the first
        :data:`FINGERPRINT_PARAMETERS` parameters in name order, their shapes and first
        :data:`FINGERPRINT_VALUES` values rounded to bfloat16. A bf16 load is itself the
        rounding of the fp32 values, so fp32 and bf16 loads give the same hash (fp16, a
        different rounding, may not). Values come from the pristine base, so edits never
        change it. Parameter names are left out: a library may rename modules.
        """
        digest = hashlib.sha256(json.dumps(architecture(self.model.config), sort_keys=True).encode())
        for name, param in sorted(self.model.named_parameters(), key=lambda item: item[0])[:FINGERPRINT_PARAMETERS]:
            base = self._pristine.get(name, param.detach())
            digest.update(json.dumps(list(base.shape)).encode())
            sample = base.flatten()[:FINGERPRINT_VALUES].to(torch.bfloat16).float().cpu()
            digest.update(sample.numpy().tobytes())
        return digest.hexdigest()[:16]

    def legacy_fingerprint(self) -> str:
        """The fingerprint schema-1 journals stored: the full config JSON (transformers version
        and dtype included) plus a weight sample in the loaded dtype. Kept only so such a
        journal opens once, with the setup that wrote it, and migrates to :meth:`fingerprint`."""
        digest = hashlib.sha256(self.model.config.to_json_string(use_diff=False).encode())
        for name, param in sorted(self.model.named_parameters())[:8]:
            base = self._pristine.get(name, param.detach())
            digest.update(base.flatten()[:4096].float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


def _config_field(config: object, keys: tuple[str, ...]) -> int | None:
    """The first integer among ``keys`` on ``config``, else on its ``text_config`` (multimodal
    wrappers), else None (as editing/adapter.py reads the config)."""
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    text_config = getattr(config, "text_config", None)
    if text_config is not None and text_config is not config:
        return _config_field(text_config, keys)
    return None


def architecture(config: object) -> dict[str, str | int | None]:
    """The config fields that define the parameters' shapes, under one name per field whatever
    the family calls it. Derived values a library version may or may not store (head_dim,
    the KV head count) are filled in, so their presence never changes the fingerprint."""
    out: dict[str, str | int | None] = {"model_type": str(getattr(config, "model_type", "unknown"))}
    for field_name, keys in ARCHITECTURE_FIELDS:
        out[field_name] = _config_field(config, keys)
    if out["num_kv_heads"] is None:
        out["num_kv_heads"] = out["num_heads"]
    if out["head_dim"] is None and out["hidden_size"] and out["num_heads"]:
        out["head_dim"] = out["hidden_size"] // out["num_heads"]
    return out
