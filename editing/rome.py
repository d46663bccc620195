"""ROME: Rank-One Model Editing (Meng et al. 2022, "Locating and Editing Factual Associations
in GPT", section 3).

An MLP output projection W (keys k -> values v) gets the rank-one update that maps the
subject's key k* to the value v* the new fact needs, while changing W's output for other keys
as little as possible, measured by the keys' second moment C = E[k k^T]:

    W <- W + Lambda (C^-1 k*)^T,      Lambda = (v* - W k*) / ((C^-1 k*)^T k*)

so that (W + Lambda (C^-1 k*)^T) k* = v* exactly. Here v* - W k* is the optimised MLP-output
change ``delta`` (:mod:`.values`), k* the key averaged over context prefixes (:mod:`.keys`), C
the statistics (:mod:`.covariance`). As in the authors' implementation, the denominator uses
the key of the bare rewrite prompt k0 (``anchor_plain_key``): the direction C^-1 k* still
comes from the averaged key, but the output change at the prompt as asked is exactly delta,
(C^-1 k*)^T k0 / (C^-1 k*)^T k0 = 1, rather than off by the ratio (C^-1 k*)^T k0 / (C^-1 k*)^T k*. The result is a :class:`~editserve.editing.artifacts.WeightDelta` with
one pair of factors per edited weight in the parameter's own layout; the served weights are
never touched here.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from .artifacts import WeightDelta, preview
from .context import EditingContext
from .covariance import resolve_source
from .errors import PreconditionFailed, StopCheck, check_stop
from .facts import Fact
from .hparams import RomeHyperParams
from .keys import compute_keys, locate_subject
from .values import check_facts, compute_value_delta


def _check_request(ctx: EditingContext, facts: list[Fact], hparams: RomeHyperParams) -> RomeHyperParams:
    """Everything that can be wrong with a request, found before any heavy compute."""
    check_facts(ctx.tokenizer, facts)
    hparams = hparams.fitted(ctx.adapter.num_layers)
    resolve_source(hparams.stats_source)
    return hparams


def rank_one_factors(ctx: EditingContext, layer: int, key: torch.Tensor, change: torch.Tensor,
                     hparams: RomeHyperParams, anchor_key: torch.Tensor | None = None,
                     earlier: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) with u @ v.T the update, in the weight's layout: Lambda (C^-1 k*)^T for nn.Linear
    ([out, in]), its transpose for GPT-2's Conv1D ([in, out]).

    ``anchor_key`` (default k*) is the key whose output changes by exactly ``change``. With
    ``hparams.preserve`` the direction C^-1 k* becomes the preserving solve's
    (:meth:`EditingContext.solve_preserving`): confined to C's null space and orthogonal, in
    effect, to the ``earlier`` edits' keys [d_mlp, m], which keep their outputs. Without the
    projection (``preserve_projection`` false) it is (lambda C + Ke Ke^T)^-1 k*: C^-1 k* when
    no edit is active, bent away from the earlier keys as far as lambda lets it."""
    if hparams.preserve and not hparams.preserve_projection:
        # (lambda C + Ke Ke^T)^-1 k*, up to scale: k* k*^T in the system only rescales it
        left = ctx.solve_regularised(layer, hparams.stats_source, hparams.stats_tokens, hparams.mom2_update_weight,
                                     key.cpu()[:, None], earlier)[:, 0].float()
    elif hparams.preserve:
        left = ctx.solve_preserving(layer, hparams.stats_source, hparams.stats_tokens, key.cpu()[:, None], earlier,
                                    hparams.null_space_threshold, hparams.preserve_ridge)[:, 0].float()
    else:
        left = ctx.solve_second_moment(layer, hparams.stats_source, hparams.stats_tokens, key.cpu())
    anchor = (anchor_key if anchor_key is not None else key).cpu()
    denominator = float(left @ anchor)
    if not abs(denominator) > 1e-12:
        raise PreconditionFailed(f"ROME: (C^-1 k*)^T k* = {denominator}; the subject's key is degenerate")
    lam = change.cpu() / denominator
    out_in = (lam[:, None], left[:, None])
    return (out_in[1], out_in[0]) if ctx.adapter.mlp_out_is_conv1d else out_in


def _add_factors(total: WeightDelta, name: str, u: torch.Tensor, v: torch.Tensor, key: torch.Tensor) -> WeightDelta:
    """``total`` plus the rank-one update u v^T of parameter ``name``, written for ``key``."""
    keys = key.float().cpu()[:, None]
    if name in total.factors:
        pu, pv = total.factors[name]
        u, v = torch.cat([pu, u], 1), torch.cat([pv, v], 1)
        keys = torch.cat([total.keys[name], keys], 1)
    return WeightDelta(factors={**total.factors, name: (u, v)}, dense=dict(total.dense),
                       keys={**total.keys, name: keys})


def _joined(*blocks: torch.Tensor | None) -> torch.Tensor | None:
    """Key blocks [d, m_i] side by side (None where there are none)."""
    present = [b.float().cpu() for b in blocks if b is not None and b.numel()]
    return torch.cat(present, 1) if present else None


def compute_rome(ctx: EditingContext, facts: list[Fact], hparams: RomeHyperParams, *,
                 should_stop: StopCheck | None = None) -> tuple[WeightDelta, dict]:
    """The ROME edit for ``facts`` as a WeightDelta, plus diagnostics.

    Several facts are composed sequentially: each is computed against the model as changed by
    the previous ones (through a thread-scoped preview), and their rank-one updates are
    summed (factors of rank len(facts)). Raises InvalidRequest for a malformed request and
    PreconditionFailed for an unusable statistics source or a diverged optimisation, and
    Cancelled once ``should_stop()`` is true (checked between statistics batches and steps).
    """
    started = time.perf_counter()
    hparams = _check_request(ctx, facts, hparams)
    layer = hparams.layer
    weight_name = ctx.adapter.mlp_out_weight_name(layer)

    ctx.second_moments([layer], hparams.stats_source, hparams.stats_tokens, should_stop=should_stop)
    stats_seconds = time.perf_counter() - started
    templates = ctx.context_templates(hparams.context_count, hparams.context_length)
    context_seconds = time.perf_counter() - started - stats_seconds

    total = WeightDelta()
    per_fact = []
    # with preserve: the keys of the served model's active edits of this weight stay where they map
    earlier = ctx.preserved_keys(weight_name) if hparams.preserve else None
    for fact in facts:
        check_stop(should_stop, "ROME")
        fact_started = time.perf_counter()
        with preview(ctx.model, total) if total.parameter_names else nullcontext():
            prompts = [locate_subject(ctx.tokenizer, t, fact.prompt, fact.subject) for t in templates]
            keys = compute_keys(ctx.model, ctx.tokenizer, ctx.adapter, layer, prompts)
            change, info = compute_value_delta(ctx.model, ctx.tokenizer, ctx.adapter, layer, fact, templates,
                                               hparams, should_stop)
        key = keys.mean(0)
        anchor = keys[0] if hparams.anchor_plain_key else None  # templates[0] is the bare "{}"
        prior = _joined(earlier, total.keys.get(weight_name))  # this edit's earlier facts too
        u, v = rank_one_factors(ctx, layer, key, change, hparams, anchor, prior)
        if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
            raise PreconditionFailed("ROME produced a non-finite update")
        total = _add_factors(total, weight_name, u, v, key)
        per_fact.append({**info, "seconds": time.perf_counter() - fact_started})

    diagnostics = {
        "method": "rome",
        "hparams_version": hparams.version,
        "layer": layer,
        "layers": [layer],
        "preserved_keys": 0 if earlier is None else int(earlier.shape[1]),
        "steps": [f["steps"] for f in per_fact],
        "final_loss": [f["final_nll"] for f in per_fact],
        "facts": per_fact,
        "timings": {
            "statistics_s": stats_seconds,
            "contexts_s": context_seconds,
            "total_s": time.perf_counter() - started,
        },
        "hparams": hparams.as_dict(),
    }
    return total, diagnostics

