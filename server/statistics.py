"""Key statistics prepared ahead, so no Edit silently waits for them.

ROME needs C = E[k k^T] for its layer and MEMIT for every layer of its range; estimating them
takes about a minute on a CPU (100,000 tokens through the model up to the deepest layer),
once per model, after which they load from disk in milliseconds. The server prepares the
statistics that the shipped hyperparameters of every method it offers will ask for, in the
background after start-up (holding the edit mutex, so the weights cannot change under the
estimate and an Edit that arrives meanwhile waits and says so), and ``editserve prepare``
does the same at image build time.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from editserve.editing.hparams import hyperparams_class
from editserve.editing.registry import METHODS

log = logging.getLogger(__name__)


def default_plan(model_type: str, num_layers: int, methods: list[str]) -> dict[tuple[str, int], list[int]]:
    """{(stats source, token count): layers} the shipped hyperparameters of ``methods`` need."""
    plan: dict[tuple[str, int], set[int]] = defaultdict(set)
    for name in methods:
        spec = METHODS[name]
        try:
            hparams = hyperparams_class(spec.hparams_table).load(model_type, num_layers)
        except KeyError:
            continue  # a method without key statistics (FT-L)
        if not hasattr(hparams, "stats_source"):
            continue
        layers = getattr(hparams, "layers", None) or (hparams.layer,)
        plan[(hparams.stats_source, hparams.stats_tokens)].update(layers)
    return {key: sorted(layers) for key, layers in plan.items()}


def prepare(context, plan: dict[tuple[str, int], list[int]]) -> float:
    """Load or estimate every planned statistic (one pass over the text per source); seconds taken."""
    started = time.perf_counter()
    for (source, tokens), layers in plan.items():
        if context.has_second_moments(layers, source, tokens):
            continue
        log.info("preparing key statistics for layers %s (%s, %d tokens)", layers, source, tokens)
        context.second_moments(layers, source, tokens)
    seconds = time.perf_counter() - started
    log.info("key statistics ready for %s in %.1f s", {f"{s}/{t}": ls for (s, t), ls in plan.items()}, seconds)
    return seconds
