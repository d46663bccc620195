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

from . import bf16_products
from .bf16_products import DecodeScope
from .blocked_linear import ALL_ROWS, BLOCKS, MAX_ROWS, BlockedLinear, use_bf16_products, use_blocked_linear

PRODUCT_CHOICES = ("auto", "plain", "blocked")  # as ServeConfig.decode_products
MEASURED_ROWS = (1, 2, 4, 8, 16)
# the blocked path must be at least this much faster to be used (timings on a busy
# machine wobble by a few per cent; a tie keeps the library's own kernel)
MARGIN = 0.95


@dataclass(frozen=True)
class ProductChoice:
    """The row counts that take the blocked path and the bf16 path, and what the choice rests on."""

    mode: str
    blocked_rows: frozenset[int]
    # rows -> (plain seconds, blocked seconds) per pass, medians; empty unless measured
    timings: dict[int, tuple[float, float]] = field(default_factory=dict)
    seconds: float = 0.0  # what measuring cost
    bf16_rows: frozenset[int] = frozenset()  # decode steps whose products are rounded to bf16
    bf16_timings: dict[int, float] = field(default_factory=dict)  # rows -> bf16 seconds per pass

    def describe(self) -> str:
        rows = ",".join(str(r) for r in sorted(self.blocked_rows)) or "none"
        bf16 = f"; bf16 for rows {_rows_text(self.bf16_rows)}" if self.bf16_rows else ""
        if not self.timings:
            return f"decode products: {self.mode}, blocked for rows {rows}{bf16}"
        measured = "; ".join(f"{r} rows plain {p * 1e3:.1f} ms blocked {b * 1e3:.1f} ms"
                             + (f" bf16 {self.bf16_timings[r] * 1e3:.1f} ms" if r in self.bf16_timings else "")
                             for r, (p, b) in sorted(self.timings.items()))
        return f"decode products: measured in {self.seconds:.2f} s ({measured}); blocked for rows {rows}{bf16}"


def _rows_text(rows: frozenset[int]) -> str:
    return ",".join(str(r) for r in sorted(rows)) or "none"


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


def _time_bf16(layers: list[BlockedLinear], inputs: dict[int, torch.Tensor], scope: DecodeScope) -> float:
    scope.active = True
    try:
        return _time_pass(layers, inputs, frozenset())
    finally:
        scope.active = False


def _spread(measured: dict[int, bool]) -> frozenset[int]:
    """Row counts 1..MAX_ROWS, each taking the verdict of the smallest measured count at or above it."""
    counts = sorted(measured)
    return frozenset(r for r in range(1, MAX_ROWS + 1) if measured.get(next((m for m in counts if m >= r), -1), False))


def measure(model: nn.Module, rows: tuple[int, ...] = MEASURED_ROWS, passes: int = 3, *, bf16_min_rows: int = 0,
            scope: DecodeScope | None = None) -> ProductChoice:
    """Time plain against blocked products over ``model``'s weights for each of ``rows`` and
    return the row counts (1..MAX_ROWS) that should take the blocked path: each count takes
    the verdict of the smallest measured count at or above it. With ``bf16_min_rows``, the
    bf16 path is timed too from that many rows on, and kept where it beats the faster exact
    path clearly."""
    started = time.perf_counter()
    layers = _eligible(model)
    if not layers:
        return ProductChoice("auto", frozenset(), {}, time.perf_counter() - started)
    timings: dict[int, tuple[float, float]] = {}
    bf16: dict[int, float] = {}
    with_bf16 = bool(bf16_min_rows) and scope is not None
    if with_bf16:
        use_bf16_products(model, ALL_ROWS, scope)
    with torch.no_grad():
        for count in rows:
            inputs = {n: torch.randn(count, n) for n in {layer.in_features for layer in layers}}
            timed_bf16 = with_bf16 and count >= bf16_min_rows
            _time_pass(layers, inputs, frozenset()), _time_pass(layers, inputs, ALL_ROWS)  # warm both
            if timed_bf16:
                _time_bf16(layers, inputs, scope)  # warm, and pack the copies once
            plain, blocked, reduced = [], [], []
            for _ in range(passes):  # alternate, so a slow moment hurts all alike
                plain.append(_time_pass(layers, inputs, frozenset()))
                blocked.append(_time_pass(layers, inputs, ALL_ROWS))
                if timed_bf16:
                    reduced.append(_time_bf16(layers, inputs, scope))
            timings[count] = (statistics.median(plain), statistics.median(blocked))
            if timed_bf16:
                bf16[count] = statistics.median(reduced)
    for layer in layers:  # the timing's packed copies: made again where decode steps use them
        if layer.bf16_weight is not None:
            layer.bf16_weight.release()
    blocked_rows = _spread({count: b < MARGIN * p for count, (p, b) in timings.items()})
    bf16_rows = _spread({count: b16 < MARGIN * min(timings[count]) for count, b16 in bf16.items()})
    return ProductChoice("auto", blocked_rows, timings, time.perf_counter() - started,
                         frozenset(r for r in bf16_rows if r >= bf16_min_rows), bf16)


def choose_products(model: nn.Module, mode: str, *, bf16_min_rows: int = 0,
                    scope: DecodeScope | None = None) -> ProductChoice:
    """Apply ``mode`` ("auto": measure; "plain": never blocked; "blocked": always, up to
    MAX_ROWS rows) to every plain linear layer of ``model`` and return the choice.

    ``bf16_min_rows`` (0: never) lets decode steps of at least that many rows round their
    products to bf16 while ``scope`` is active: "auto" keeps it only for the row counts where
    it measured faster; "plain" and "blocked" take it for all of them."""
    if mode not in PRODUCT_CHOICES:
        raise ValueError(f"decode products must be one of {list(PRODUCT_CHOICES)}, got {mode!r}")
    if not 0 <= bf16_min_rows <= MAX_ROWS:
        raise ValueError(f"bf16 products: the least row count must be in [0, {MAX_ROWS}], got {bf16_min_rows}")
    if bf16_min_rows and not bf16_products.available():
        bf16_min_rows = 0  # this torch build has no packed oneDNN linear: exact products only
    if mode == "auto":
        choice = measure(model, bf16_min_rows=bf16_min_rows, scope=scope)
    else:
        bf16_rows = frozenset(range(bf16_min_rows, MAX_ROWS + 1)) if bf16_min_rows else frozenset()
        choice = ProductChoice(mode, ALL_ROWS if mode == "blocked" else frozenset(), bf16_rows=bf16_rows)
    use_blocked_linear(model, choice.blocked_rows)
    use_bf16_products(model, choice.bf16_rows, scope)
    return choice
