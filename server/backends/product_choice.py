"""Which kernel a decode step's small products use on this machine, decided by timing both.

``F.linear`` and the blocked product (:mod:`.blocked_linear`) compute the same thing; which
reads the weights faster depends on the CPU, its caches and the torch build. Measured on two
machines of the same cloud kind: blocked was 1.6x faster at one row on an AMD Zen 4
(2026-11-30) and 2.5x *slower* on an Intel Xeon (2026-12-03). A constant choice is therefore
wrong somewhere, and decode at batch 1 is mostly these products. At start-up the engine times
both kernels over the model's own weights, for the row counts decode batches have, and keeps
the blocked path only where it wins clearly.

One pass multiplies every eligible weight once (what one decode step reads), so the cost is
a few dozen decode steps' worth of products: ~1 s for SmolLM2-135M on two cores, logged.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .blocked_linear import ALL_ROWS, BLOCKS, MAX_ROWS, BlockedLinear, use_blocked_linear

PRODUCT_CHOICES = ("auto", "plain", "blocked")  # as ServeConfig.decode_products
MEASURED_ROWS = (1, 2, 4, 8, 16)
# the blocked path must be at least this much faster to be used (timings on a busy
# machine wobble by a few per cent; a tie keeps the library's own kernel)
MARGIN = 0.95


@dataclass(frozen=True)
class ProductChoice:
    """The row counts that take the blocked path, and what the choice rests on."""

    mode: str
    blocked_rows: frozenset[int]
    # rows -> (plain seconds, blocked seconds) per pass, medians; empty unless measured
    timings: dict[int, tuple[float, float]] = field(default_factory=dict)
    seconds: float = 0.0  # what measuring cost

    def describe(self) -> str:
        rows = ",".join(str(r) for r in sorted(self.blocked_rows)) or "none"
        if not self.timings:
            return f"decode products: {self.mode}, blocked for rows {rows}"
        measured = "; ".join(f"{r} rows plain {p * 1e3:.1f} ms blocked {b * 1e3:.1f} ms"
                             for r, (p, b) in sorted(self.timings.items()))
        return f"decode products: measured in {self.seconds:.2f} s ({measured}); blocked for rows {rows}"


def _eligible(model: nn.Module) -> list[BlockedLinear]:
    """The layers whose products the blocked path can take (fp32, contiguous, rows divisible
    into the blocks), switched to :class:`BlockedLinear` so both kernels run through the
    layer's own forward."""
    use_blocked_linear(model)
    return [m for m in model.modules() if type(m) is BlockedLinear and m.weight.dtype == torch.float32
            and m.weight.is_contiguous() and m.out_features % BLOCKS == 0]


def _time_pass(layers: list[BlockedLinear], inputs: dict[int, torch.Tensor], rows: frozenset[int]) -> float:
    for layer in layers:
        layer.blocked_rows = rows
    started = time.perf_counter()
    for layer in layers:
        layer(inputs[layer.in_features])
    return time.perf_counter() - started


def measure(model: nn.Module, rows: tuple[int, ...] = MEASURED_ROWS, passes: int = 3) -> ProductChoice:
    """Time plain against blocked products over ``model``'s weights for each of ``rows`` and
    return the row counts (1..MAX_ROWS) that should take the blocked path: each count takes
    the verdict of the smallest measured count at or above it."""
    started = time.perf_counter()
    layers = _eligible(model)
    if not layers:
        return ProductChoice("auto", frozenset(), {}, time.perf_counter() - started)
    timings: dict[int, tuple[float, float]] = {}
    with torch.no_grad():
        for count in rows:
            inputs = {n: torch.randn(count, n) for n in {layer.in_features for layer in layers}}
            _time_pass(layers, inputs, frozenset()), _time_pass(layers, inputs, ALL_ROWS)  # warm both
            plain, blocked = [], []
            for _ in range(passes):  # alternate, so a slow moment hurts both alike
                plain.append(_time_pass(layers, inputs, frozenset()))
                blocked.append(_time_pass(layers, inputs, ALL_ROWS))
            timings[count] = (statistics.median(plain), statistics.median(blocked))
    wins = {count for count, (p, b) in timings.items() if b < MARGIN * p}
    measured = sorted(timings)
    chosen = frozenset(r for r in range(1, MAX_ROWS + 1)
                       if next((m for m in measured if m >= r), None) in wins)
    return ProductChoice("auto", chosen, timings, time.perf_counter() - started)


def choose_products(model: nn.Module, mode: str) -> ProductChoice:
    """Apply ``mode`` ("auto": measure; "plain": never blocked; "blocked": always, up to
    MAX_ROWS rows) to every plain linear layer of ``model`` and return the choice."""
    if mode not in PRODUCT_CHOICES:
        raise ValueError(f"decode products must be one of {list(PRODUCT_CHOICES)}, got {mode!r}")
    if mode == "auto":
        choice = measure(model)
    else:
        choice = ProductChoice(mode, ALL_ROWS if mode == "blocked" else frozenset())
    use_blocked_linear(model, choice.blocked_rows)
    return choice
