"""Every editing method stops at the first check after its caller gave up (``should_stop``),
checks at least once per optimisation step, and leaves nothing behind: no hook on the
model, no changed weight, no half-estimated statistics on disk."""

from __future__ import annotations

import pytest
import torch

from editserve.editing.context import EditingContext
from editserve.editing.errors import Cancelled
from editserve.editing.facts import Fact
from editserve.editing.hooks import hooks_attached
from editserve.editing.registry import METHODS
from tests.unit.rome_helpers import learnable_model, weights_digest

torch.set_num_threads(1)

FACTS = [Fact("The language of {}", "Danielle Darrieux", "founded", "French")]
STEPS = 6
OPTIONS = {
    "rome": {"layer": 1, "steps": STEPS, "stats_tokens": 300, "context_count": 1},
    "memit": {"layers": [1, 2], "steps": STEPS, "stats_tokens": 300, "context_count": 1},
    "ft_l": {"layer": 1, "steps": STEPS, "early_stop_loss": 0.0},
    "t_patcher": {"layer": 3, "steps": STEPS, "memory_rows": 4, "context_count": 1, "early_stop_loss": 0.0},
    "serac": {},
}


class Countdown:
    """A caller that gives up at the ``at``-th check (never when ``at`` is None)."""

    def __init__(self, at: int | None) -> None:
        self.at, self.calls = at, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.at is not None and self.calls >= self.at


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return learnable_model("llama", tiny_tokenizer, edit_layer=1)


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_a_method_stops_at_the_first_check_after_the_caller_gave_up(method, model, tiny_tokenizer, tmp_path):
    model, adapter = model
    digest = weights_digest(model)
    ctx = EditingContext(model, tiny_tokenizer, adapter, tmp_path / "stats", progress=False)
    if method == "serac":
        pytest.importorskip("sentence_transformers")
    first = Countdown(1)
    with pytest.raises(Cancelled, match="stopped during"):
        METHODS[method].run(ctx, FACTS, OPTIONS[method], first)
    assert first.calls == 1  # nothing ran past the check that said stop
    assert not list((tmp_path / "stats").rglob("*.safetensors"))  # no statistics cached from a torn estimate
    if method == "serac":
        return  # one check only: encoding is a single call
    full = Countdown(None)
    METHODS[method].run(ctx, FACTS, OPTIONS[method], full)
    assert full.calls >= STEPS  # at least once per step
    later = Countdown(full.calls - 1)  # gives up at the last check: mid-way through the optimisation
    with pytest.raises(Cancelled):
        METHODS[method].run(ctx, FACTS, OPTIONS[method], later)
    assert later.calls == full.calls - 1
    assert hooks_attached(model) == 0 and weights_digest(model) == digest
