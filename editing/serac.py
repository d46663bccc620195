"""SERAC edits: the facts become entries of the edit memory (:mod:`.memory`), nothing else.

Computing one is encoding each fact's key with the sentence encoder: milliseconds, no
gradient, no statistics. The artifact keeps the entries' text and embeddings; the host puts
them in its index when the edit is applied, and routing does the rest.
"""

from __future__ import annotations

import time

from .artifacts import RuntimeLayer
from .context import EditingContext
from .errors import StopCheck, check_stop
from .facts import Fact
from .hparams import SeracHyperParams
from .memory import Encoder, memory_layer
from .values import check_facts


def encoder_of(ctx: EditingContext) -> Encoder:
    """The context's sentence encoder (a server seeds it with the host's, so both share one)."""
    return ctx.memo(("serac_encoder",), ctx.encoder_factory or Encoder)


def compute_serac(ctx: EditingContext, facts: list[Fact], hparams: SeracHyperParams, *,
                  should_stop: StopCheck | None = None) -> tuple[RuntimeLayer, dict]:
    started = time.perf_counter()
    check_facts(ctx.tokenizer, facts)
    check_stop(should_stop, "SERAC encoding")  # one encoder call: milliseconds, checked once
    encoder = encoder_of(ctx)
    keys = [f.text for f in facts]
    layer = memory_layer(keys, [f.subject for f in facts], [f.target_new for f in facts], encoder,
                         hparams.scope_threshold, hparams.template)
    seconds = time.perf_counter() - started
    return layer, {"method": "serac", "hparams_version": hparams.version, "layers": [], "facts_count": len(facts),
                   "encoder": encoder.name, "template": hparams.template, "timings": {"total_s": seconds}, "hparams": hparams.as_dict()}
