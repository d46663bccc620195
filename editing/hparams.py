"""Typed hyperparameters of every weight-editing method, shipped as versioned TOML files.

A family file (``hparams/<config.model_type>.toml``) holds, per method (a table named as the
method's ``hparams_table`` in :mod:`.registry`), the values measured best for the model it was
tuned on (``tuned_num_layers`` deep); ``default.toml`` serves any other family and any table a
family file lacks. Edited layers are stored as tuned for that depth and scaled to the depth of
the model at hand, so a 4-layer test model of the same family still gets valid layers.

Every field has a bound, declared beside it, and :class:`HyperParams` checks all of them in
one place (``__post_init__``), so a request option that is out of range or not finite fails
with :class:`~editserve.editing.errors.InvalidRequest` naming the field and its limits before
any compute starts. Per-request overrides go through :meth:`HyperParams.with_overrides`.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar, TypeVar

from .errors import InvalidRequest

H = TypeVar("H", bound="HyperParams")

MAX_LAYERS = 1024  # no supported model is deeper; layer options above this are rejected outright


def bounded(default: Any, low: float, high: float, doc: str = "") -> Any:
    """A dataclass field with inclusive bounds (for tuples: bounds of every element)."""
    return field(default=default, metadata={"bounds": (low, high), "doc": doc})


@dataclass(frozen=True)
class HyperParams:
    """Shared machinery: bounds checking, typed overrides, depth scaling, loading."""

    method: ClassVar[str] = ""
    aliases: ClassVar[dict[str, str]] = {}
    version: str = ""
    tuned_num_layers: int = 0  # the depth the layer(s) were chosen for (0: use as is)

    _FIXED: ClassVar[tuple[str, ...]] = ("version", "tuned_num_layers")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            bounds = f.metadata.get("bounds")
            if bounds is None:
                continue
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            low, high = bounds
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
                    raise InvalidRequest(f"{self.method} option {f.name} must be in [{low:g}, {high:g}], got {value!r}")
        self.check()

    def check(self) -> None:
        """Cross-field rules of a subclass (raise InvalidRequest)."""

    @classmethod
    def option_names(cls) -> list[str]:
        return sorted(f.name for f in dataclasses.fields(cls) if f.name not in cls._FIXED)

    def with_overrides(self: H, **overrides: Any) -> H:
        """A copy with some values replaced; unknown names or bad values raise InvalidRequest.

        Request option names are accepted too (e.g. ``learning_rate`` for ROME's ``lr``).
        Setting a layer explicitly pins it (no depth scaling).
        """
        names = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            name = self.aliases.get(key, key)
            if name not in names or name in self._FIXED:
                raise InvalidRequest(f"unknown {self.method} option {key!r}; known: {self.option_names()}")
            changes[name] = _coerce(self.method, key, getattr(self, name), value)
            if name in ("layer", "layers"):
                changes["tuned_num_layers"] = 0
        return dataclasses.replace(self, **changes)

    def _scale(self, layer: int, num_layers: int) -> int:
        scaled = round(layer * (num_layers - 1) / max(self.tuned_num_layers - 1, 1))
        return min(max(scaled, 0), num_layers - 1)

    def for_depth(self: H, num_layers: int) -> H:
        """Layer fields scaled from ``tuned_num_layers`` to a model ``num_layers`` deep."""
        if not self.tuned_num_layers or self.tuned_num_layers == num_layers:
            return dataclasses.replace(self, tuned_num_layers=0)
        changes: dict[str, Any] = {"tuned_num_layers": 0}
        if hasattr(self, "layer"):
            changes["layer"] = self._scale(self.layer, num_layers)
        if hasattr(self, "layers"):
            changes["layers"] = tuple(sorted({self._scale(x, num_layers) for x in self.layers}))
        return dataclasses.replace(self, **changes)

    def fitted(self: H, num_layers: int) -> H:
        """Scaled to a model ``num_layers`` deep (:meth:`for_depth`), with every layer field
        checked against it: InvalidRequest naming the option, before any compute."""
        fitted = self.for_depth(num_layers)
        for name in ("layer", "layers"):
            value = getattr(fitted, name, None)
            for layer in value if isinstance(value, tuple) else (() if value is None else (value,)):
                if not 0 <= layer < num_layers:
                    raise InvalidRequest(f"{self.method} option {name}: layer {layer} out of range: the model has "
                                         f"{num_layers} layers (0..{num_layers - 1})")
        return fitted

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls: type[H], model_type: str, num_layers: int | None = None) -> H:
        """The shipped values for ``config.model_type`` (scaled to ``num_layers`` when given)."""
        folder = resources.files("editserve.editing") / "hparams"
        for name in (f"{model_type}.toml", "default.toml"):
            path = folder / name
            if not path.is_file():
                continue
            data = tomllib.loads(path.read_text())
            table = data.get(cls.method)
            if table is None:
                continue
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
            params = cls(version=str(table.get("version", data.get("version", ""))), **{
                k: v for k, v in values.items() if k != "version"})
            return params.for_depth(num_layers) if num_layers else params
        raise FileNotFoundError(f"no shipped [{cls.method}] hyperparameters (default.toml lacks the table)")


def _coerce(method: str, key: str, current: Any, value: Any) -> Any:
    kind = type(current)
    try:
        if kind is tuple:
            items = value if isinstance(value, (list, tuple)) else [value]
            return tuple(_coerce(method, key, 0, v) for v in items)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"{method} option {key!r} must be {kind.__name__}, got {value!r}") from None


@dataclass(frozen=True)
class ValueHyperParams(HyperParams):
    """The value optimisation (v* / z) and key statistics shared by ROME and MEMIT.

    steps / lr: Adam steps and learning rate of the value optimisation.
    kl_factor: weight of KL(unedited || edited) on ``kl_prompt`` (the subject's "essence").
    clamp_norm_factor: the change is kept within this multiple of the unedited output's norm
        at the subject (MLP output for ROME, residual stream for MEMIT).
    weight_decay: weight of ||delta||^2 / ||unedited output||^2 in the loss.
    early_stop_loss: a fact stops optimising once its mean target-token NLL is below this.
    stop_at_top: a fact also stops as soon as each of its target tokens is the model's top
        token at every context row (ENCORE's most-probable early stopping, Gupta et al. 2025):
        the smallest change that makes the model say the target, so edits that accumulate add
        less to the weights' norm (docs/LIFELONG.md).
    context_count / context_length: self-generated context prefixes (besides the empty one
        "{}") and their length in tokens.
    stats_source: text for the key covariance C = E[k k^T]: "default" (shipped with the
        package), "model" (text the model samples) or a server-side .txt file or directory.
    stats_tokens: how many tokens of that text to average over.
    preserve: write the update only into the directions the layer's usual keys hardly use
        (the null space of C, as AlphaEdit does) and keep the keys of earlier active edits
        unchanged, so accumulated edits do not overwrite each other (docs/LIFELONG.md).
    null_space_threshold: with ``preserve``, eigen-directions of C whose eigenvalue is below
        this fraction of the largest count as the null space.
    preserve_ridge: with ``preserve``, the ridge of the solve, as a fraction of E||k||^2
        (trace C): larger shrinks the update, smaller writes the facts more exactly.
    preserve_projection: with ``preserve``, confine the update to C's null space (AlphaEdit,
        the default). False keeps only the earlier edits' keys: the solve is MEMIT's least
        squares over the whole key space, (lambda C + K K^T + Ke Ke^T)^-1 K with lambda =
        ``mom2_update_weight``, each earlier key held to its current output with the weight a
        new key is written with (for ROME, its C^-1 k* direction bent away from Ke).
    mom2_update_weight: lambda in Delta = R K^T (lambda C + K K^T)^-1: how strongly the
        keys the layer usually sees are preserved, relative to the edited facts (MEMIT's
        solve; ROME reads it only with ``preserve`` and ``preserve_projection`` false).
    skip_lower_layers: each optimisation step starts at the edited layer from its cached
        input instead of running the layers below it again (same result, faster; off only to
        measure the difference or to rule it out).
    """

    steps: int = bounded(25, 0, 1000)
    lr: float = bounded(0.5, 1e-6, 10.0)
    kl_factor: float = bounded(0.0625, 0.0, 100.0)
    clamp_norm_factor: float = bounded(4.0, 1e-3, 1e6)
    weight_decay: float = bounded(0.5, 0.0, 100.0)
    early_stop_loss: float = bounded(0.05, 0.0, 20.0)
    stop_at_top: bool = False
    context_count: int = bounded(10, 0, 50)
    context_length: int = bounded(10, 1, 64)
    kl_prompt: str = "{} is a"
    stats_source: str = "default"
    stats_tokens: int = bounded(100_000, 1, 10_000_000)
    preserve: bool = False
    null_space_threshold: float = bounded(1e-2, 0.0, 1.0)
    preserve_ridge: float = bounded(1e-3, 1e-9, 1e3)
    preserve_projection: bool = True
    mom2_update_weight: float = bounded(15_000.0, 1e-6, 1e9)
    skip_lower_layers: bool = True

    aliases: ClassVar[dict[str, str]] = {"learning_rate": "lr", "stats_token_count": "stats_tokens"}

    def check(self) -> None:
        if self.kl_prompt.count("{}") != 1:
            raise InvalidRequest(f"{self.method} option kl_prompt must contain exactly one '{{}}'")
        if not self.stats_source:
            raise InvalidRequest(f"{self.method} option stats_source must not be empty")


@dataclass(frozen=True)
class RomeHyperParams(ValueHyperParams):
    """ROME: ``layer`` is the block whose MLP output projection is rewritten.

    anchor_plain_key: scale the update so the bare rewrite prompt's MLP output changes by
    exactly the optimised delta (the authors' code) rather than the averaged key's (the
    paper's equation).
    """

    method: ClassVar[str] = "rome"
    layer: int = bounded(0, 0, MAX_LAYERS - 1)
    anchor_plain_key: bool = True


@dataclass(frozen=True)
class MemitHyperParams(ValueHyperParams):
    """MEMIT: the facts' target hidden states z are optimised at the last of ``layers`` (the
    residual stream after that block) and the change is spread over all of ``layers``.

    batch_facts: facts optimised together in one batch of forward passes (memory bound).
    """

    method: ClassVar[str] = "memit"
    layers: tuple[int, ...] = bounded((3, 4, 5, 6, 7), 0, MAX_LAYERS - 1)
    batch_facts: int = bounded(32, 1, 1024)
    clamp_norm_factor: float = bounded(0.75, 1e-3, 1e6)

    def check(self) -> None:
        super().check()
        if not self.layers:
            raise InvalidRequest("memit option layers must name at least one layer")
        if len(set(self.layers)) != len(self.layers):
            raise InvalidRequest(f"memit option layers must not repeat a layer, got {list(self.layers)}")


@dataclass(frozen=True)
class FtHyperParams(HyperParams):
    """FT-L: ``layer``'s MLP output weight is fine-tuned within an L-infinity ball.

    learning_rate / norm_constraint: measured on smollm2-135m (layer 7, CounterFact case 0):
    5e-4/5e-4, the GPT-2 XL values of the reference baselines, leave P(new) unchanged;
    5e-3/5e-3 reach P(new) 0.93. early_stop_loss: stop once the mean target token log-prob is
    above log(0.9).
    """

    method: ClassVar[str] = "ft_l"
    layer: int = bounded(0, 0, MAX_LAYERS - 1)
    steps: int = bounded(25, 1, 500)
    learning_rate: float = bounded(5e-3, 1e-8, 10.0)
    norm_constraint: float = bounded(5e-3, 1e-8, 100.0)
    early_stop_loss: float = bounded(0.105, 0.0, 20.0)


@dataclass(frozen=True)
class TPatcherHyperParams(HyperParams):
    """T-Patcher: ``neurons_per_fact`` ReLU neurons per fact appended to ``layer``'s FFN
    (:mod:`.neurons`), trained with the base frozen on three losses:

    - edit: NLL of the target after the prompt (and after its context-prefixed variants);
    - activation: hinge max(0, activation_margin - a) on the positions that predict the target,
      so the neuron fires on the edit's inputs;
    - memory: hinge max(0, a - memory_margin) on every token of ``memory_rows`` unrelated
      text rows (shipped corpus) and on the edit's prompt filled with ``negatives`` other
      subjects, so it stays silent elsewhere (ReLU makes silent exactly 0).

    steps: Adam steps; learning_rate: the key's and bias's step relative to their initial size;
    value_learning_rate: the value's (absolute) step. early_stop_loss: stop once the target NLL
    is below it, the neuron fires on the edit and is silent on all of the memory.
    fire_at: where the neuron is trained to fire. "last": the positions that predict the
    target (the paper's placement, at the last layer); "subject": the subject's last token at
    a middle layer, with the value ROME would write there (:func:`.tpatcher._train_at_subject`).
    With "subject", learning_rate is the key's and bias's step and value_learning_rate the
    value's; the value is optimised as ROME's is, with ``kl_factor`` (KL on "{subject} is a"),
    ``weight_decay`` and ``clamp_norm_factor`` as in :class:`ValueHyperParams` (unused with "last").
    key_steps: with "subject", the most Adam steps of the key-and-bias fit (the two hinges on
    captured inputs, no model pass: ~1 ms a step); it stops as soon as both hinges are zero,
    which 60 steps missed for 7 % of facts once 100 others were patched in.
    avoid_patched: with "subject", the memory set also holds every token of the rewrite
    prompts of the facts already patched into the layer (the served model's active T-Patcher
    edits and this edit's earlier facts; same-subject facts excepted), so a new neuron stays
    silent where an earlier one answers (:func:`.tpatcher._train_at_subject`).
    """

    method: ClassVar[str] = "t_patcher"
    layer: int = bounded(29, 0, MAX_LAYERS - 1)
    neurons_per_fact: int = bounded(1, 1, 16)
    steps: int = bounded(60, 1, 1000)
    learning_rate: float = bounded(0.05, 1e-6, 10.0)
    value_learning_rate: float = bounded(0.5, 1e-6, 100.0)
    activation_margin: float = bounded(1.0, 0.0, 100.0)
    memory_margin: float = bounded(-0.5, -100.0, 0.0)
    activation_weight: float = bounded(1.0, 0.0, 100.0)
    memory_weight: float = bounded(1.0, 0.0, 100.0)
    memory_rows: int = bounded(64, 0, 4096)
    negatives: int = bounded(32, 0, 256)
    context_count: int = bounded(5, 0, 50)
    context_length: int = bounded(10, 1, 64)
    early_stop_loss: float = bounded(0.05, 0.0, 20.0)
    fire_at: str = "last"
    kl_factor: float = bounded(0.0625, 0.0, 100.0)
    weight_decay: float = bounded(0.5, 0.0, 100.0)
    clamp_norm_factor: float = bounded(4.0, 1e-3, 1e6)
    avoid_patched: bool = True
    key_steps: int = bounded(600, 1, 5000)

    aliases: ClassVar[dict[str, str]] = {"lr": "learning_rate"}

    FIRE_AT: ClassVar[tuple[str, ...]] = ("last", "subject")

    def check(self) -> None:
        if self.fire_at not in self.FIRE_AT:
            raise InvalidRequest(f"t_patcher option fire_at must be one of {list(self.FIRE_AT)}, got {self.fire_at!r}")


@dataclass(frozen=True)
class SeracHyperParams(HyperParams):
    """SERAC (:mod:`.memory`): an input is in an entry's scope when it contains the entry's
    subject and its sentence embedding's cosine similarity to the entry's key is at least
    ``scope_threshold`` (calibrated on CounterFact, docs/RUNTIME_EDITS.md). ``template`` names
    the counterfactual wording (one of :data:`.memory.TEMPLATES`, chosen per model family:
    small models differ in which wording they read a new fact from)."""

    method: ClassVar[str] = "serac"
    scope_threshold: float = bounded(0.4, 0.0, 1.0)
    template: str = "four_lines"

    def check(self) -> None:
        from .memory import TEMPLATES

        if self.template not in TEMPLATES:
            raise InvalidRequest(f"serac option template must be one of {sorted(TEMPLATES)}, got {self.template!r}")


def load_rome_hparams(model_type: str, num_layers: int | None = None) -> RomeHyperParams:
    """The shipped ROME hyperparameters for ``config.model_type`` (see :meth:`HyperParams.load`)."""
    return RomeHyperParams.load(model_type, num_layers)


def hyperparams_class(table: str) -> type[HyperParams]:
    """The class of a registry entry's ``hparams_table``."""
    classes = {cls.method: cls for cls in (RomeHyperParams, MemitHyperParams, FtHyperParams,
                                                   TPatcherHyperParams, SeracHyperParams)}
    return classes[table]
