"""How much locality drift an edit may cause before it is refused (``max_drift``).

Checked on the server's drift probes (the same prompts and KL definition as the
``editserve_drift_*`` gauges) with the edit *previewed*, before anything is journaled: an edit
over budget is FAILED_PRECONDITION naming the figure, and nothing changes. The figures are
those of the served model with the edit added, against the unedited model, so the budget
bounds the drift SREs see on the dashboard, whatever earlier edits already spent.

Imports neither torch nor gRPC: the configuration checks server defaults with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_KL_LIMIT = 100.0  # nats; far above anything a usable model shows (its unedited drift is 0)


@dataclass(frozen=True)
class DriftBudget:
    """``max_kl``: largest mean KL(unedited || edited) over the probes, in nats; 0: no limit.
    ``min_top1_agreement``: smallest share of probes whose top next token is unchanged, in
    [0, 1]; 0: no limit. ``names`` are the two fields as the caller knows them (a request's
    or the configuration's), for the messages."""

    max_kl: float = 0.0
    min_top1_agreement: float = 0.0
    names: tuple[str, str] = ("max_drift.max_kl", "max_drift.min_top1_agreement")

    def __post_init__(self) -> None:
        for name, value, high in ((self.names[0], self.max_kl, MAX_KL_LIMIT),
                                  (self.names[1], self.min_top1_agreement, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0.0 <= value <= high:
                raise ValueError(f"{name} must be a finite number in [0, {high:g}] (0: no limit), got {value!r}")

    @property
    def active(self) -> bool:
        return bool(self.max_kl or self.min_top1_agreement)

    def over(self, override: DriftBudget | None) -> DriftBudget:
        """This budget (the server's default) with the fields ``override`` (one Edit's) sets."""
        if override is None:
            return self
        names = tuple(mine if theirs == 0 else given for mine, theirs, given in
                      zip(self.names, (override.max_kl, override.min_top1_agreement), override.names, strict=True))
        return DriftBudget(override.max_kl or self.max_kl, override.min_top1_agreement or self.min_top1_agreement,
                           names)

    def violation(self, kl: float, agreement: float, probes: int) -> str:
        """Why (kl, agreement) is over this budget, or "" when it is within it."""
        if self.max_kl and not kl <= self.max_kl:  # NaN is over too
            return (f"{self.names[0]}: with this edit the mean KL on the {probes} drift probes would be {kl:.4g} "
                    f"nats, over the budget of {self.max_kl:g}")
        if self.min_top1_agreement and not agreement >= self.min_top1_agreement:
            return (f"{self.names[1]}: with this edit the top-1 agreement on the {probes} drift probes "
                    f"would be {agreement:.4g}, under the budget of {self.min_top1_agreement:g}")
        return ""


@dataclass(frozen=True)
class DriftCheck:
    """What the guard measured for one edit, and the budget it was held to."""

    kl: float
    top1_agreement: float
    budget: DriftBudget
