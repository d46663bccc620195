"""Typed ROME hyperparameters, shipped as versioned TOML files, one per model family.

A family file (``hparams/<config.model_type>.toml``) holds the values measured best for the
model it was tuned on (``tuned_num_layers`` deep); ``default.toml`` serves any other family.
The edited layer is stored as tuned for that depth and scaled to the depth of the model at
hand, so a 4-layer test model of the same family still gets a valid layer. Per-request
overrides go through :meth:`RomeHyperParams.with_overrides`, which checks names and ranges and
raises :class:`~editserve.editing.errors.InvalidRequest` for anything wrong.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .errors import InvalidRequest

# request option names (protos/editserve/v1/editing.proto RomeOptions) -> field names
_ALIASES = {"learning_rate": "lr", "stats_token_count": "stats_tokens"}


@dataclass(frozen=True)
class RomeHyperParams:
    """Everything ROME needs besides the model and the facts.

    layer: the block whose MLP output projection is rewritten.
    steps / lr: Adam steps and learning rate of the value optimisation (v*).
    kl_factor: weight of KL(unedited || edited) on ``kl_prompt`` (the subject's "essence").
    clamp_norm_factor: the MLP-output change is kept within this multiple of the unedited
        output's norm at the subject.
    weight_decay: weight of ||delta||^2 / ||unedited output||^2 in the loss.
    early_stop_loss: stop once the mean target-token NLL over all contexts drops below this.
    context_count / context_length: how many self-generated context prefixes (besides the
        empty one "{}") and how many tokens each.
    stats_source: text for the key covariance C = E[k k^T]: "default" (shipped with the
        package) or a path to a .txt file or a directory of them.
    stats_tokens: how many tokens of that text to average over.
    anchor_plain_key: scale the update so the bare rewrite prompt's MLP output changes by
        exactly the optimised delta (the authors' code) rather than the averaged key's (the
        paper's equation).
    """

    version: str
    layer: int
    steps: int = 25
    lr: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    weight_decay: float = 0.5
    early_stop_loss: float = 0.05
    context_count: int = 10
    context_length: int = 10
    kl_prompt: str = "{} is a"
    stats_source: str = "default"
    stats_tokens: int = 100_000
    anchor_plain_key: bool = True
    tuned_num_layers: int = 0  # the depth ``layer`` was chosen for (0: use as is)

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 0, "steps must be >= 0"),
            (self.lr > 0, "lr (learning_rate) must be > 0"),
            (self.kl_factor >= 0, "kl_factor must be >= 0"),
            (self.clamp_norm_factor > 0, "clamp_norm_factor must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.context_count >= 0, "context_count must be >= 0"),
            (self.context_length >= 1, "context_length must be >= 1"),
            (self.stats_tokens >= 1, "stats_tokens must be >= 1"),
            (self.kl_prompt.count("{}") == 1, "kl_prompt must contain exactly one '{}'"),
            (bool(self.stats_source), "stats_source must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequest(f"rome hyperparameters: {message}")

    def with_overrides(self, **overrides: Any) -> RomeHyperParams:
        """A copy with some values replaced; unknown names or bad values raise InvalidRequest.

        Request option names are accepted too (``learning_rate`` for ``lr``). Setting ``layer``
        explicitly pins it (no depth scaling).
        """
        names = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            name = _ALIASES.get(key, key)
            if name not in names or name in ("version", "tuned_num_layers"):
                raise InvalidRequest(f"unknown rome option {key!r}; known: {sorted(set(names) - {'version', 'tuned_num_layers'})}")
            kind = type(getattr(self, name))
            try:
                if kind is int and isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                if kind is bool and isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0"):
                        raise ValueError(value)
                    value = value.lower() in ("true", "1")
                changes[name] = kind(value)
            except (TypeError, ValueError):
                raise InvalidRequest(f"rome option {key!r} must be {kind.__name__}, got {value!r}") from None
            if name == "layer":
                changes["tuned_num_layers"] = 0
        return dataclasses.replace(self, **changes)

    def for_depth(self, num_layers: int) -> RomeHyperParams:
        """The layer scaled from ``tuned_num_layers`` to a model ``num_layers`` deep."""
        if not self.tuned_num_layers or self.tuned_num_layers == num_layers:
            return dataclasses.replace(self, tuned_num_layers=0)
        scaled = round(self.layer * (num_layers - 1) / max(self.tuned_num_layers - 1, 1))
        return dataclasses.replace(self, layer=min(max(scaled, 0), num_layers - 1), tuned_num_layers=0)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def hparams_file(model_type: str) -> str:
    """The shipped file name for a family: ``<model_type>.toml`` if shipped, else ``default.toml``."""
    folder = resources.files("editserve.editing") / "hparams"
    name = f"{model_type}.toml"
    return name if (folder / name).is_file() else "default.toml"


def load_rome_hparams(model_type: str, num_layers: int | None = None) -> RomeHyperParams:
    """The shipped ROME hyperparameters for ``config.model_type``.

    With ``num_layers`` the layer is scaled to that depth (do pass it: the tuned layer of a
    30-layer model does not exist in a 4-layer one); :func:`editserve.editing.rome.compute_rome`
    scales it too when it was not.
    """
    text = (resources.files("editserve.editing") / "hparams" / hparams_file(model_type)).read_text()
    data = tomllib.loads(text)
    rome = dict(data.get("rome", {}))
    params = RomeHyperParams(version=str(data["version"]), **rome)
    return params.for_depth(num_layers) if num_layers else params
