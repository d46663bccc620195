"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2023, "Mass-Editing Memory in a
Transformer", section 4).

Many facts are written at once, and spread over a range of MLP layers R = {l_1 < ... < l_L}:

1. Targets. For every fact i, a change delta_i of the residual stream after the *last* layer
   of R, at the subject's last token, is optimised as for ROME's v* (:mod:`.values`, batched
   across facts): z_i = h_i^L + delta_i is the hidden state that makes the model say the new
   object.
2. Spreading. For each layer l of R in ascending order, with the updates of the layers below
   it already in place: k_i = the layer's MLP key for fact i (averaged over context prefixes),
   r_i = (z_i - h_i^L) / (number of layers of R from l on), the residual still missing at
   the last layer, shared out evenly over the layers left. The update is the least-squares
   solution that maps the new keys to r while preserving the keys the layer usually sees
   (C = E[k k^T], weighted by lambda = ``mom2_update_weight``):

       Delta_l = R K^T (lambda C + K K^T)^-1            (solved in float64)

Where a block normalises its MLP output before the residual add (Gemma's sandwich norm),
r_i is a change *after* that norm; it is mapped back to the change of the MLP output whose
normalised value comes closest to the wanted one (:func:`_through_post_norm`).

The artifact is one :class:`~editserve.editing.artifacts.WeightDelta` with one update per
layer, stored as rank-n factors (R, (lambda C + K K^T)^-1 K) while that is smaller than the
dense matrix and densely beyond; revert is exact as for every weight delta. The served
weights are never touched: the updates of lower layers act through thread-scoped previews.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from .artifacts import WeightDelta, compact_keys, preview
from .context import EditingContext
from .covariance import resolve_source
from .errors import PreconditionFailed, StopCheck, check_stop
from .facts import Fact
from .hparams import MemitHyperParams
from .keys import batch_rows, capture_io, locate_subject, pad_id_of
from .value_checkpoint import ValueCheckpoint
from .values import check_facts, compute_value_deltas

ROWS_PER_FORWARD = 256  # rows of (fact, context) run together when reading keys


def _check_request(ctx: EditingContext, facts: list[Fact], hparams: MemitHyperParams) -> MemitHyperParams:
    """Everything that can be wrong with a request, found before any heavy compute."""
    check_facts(ctx.tokenizer, facts)
    hparams = hparams.fitted(ctx.adapter.num_layers)
    resolve_source(hparams.stats_source)
    return hparams


def _keys_and_states(ctx: EditingContext, facts: list[Fact], templates: list[str], layer: int, z_layer: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per fact, at the subject's last token: the MLP key of ``layer`` (mean of the bare
    prompt's key and the context prefixes' mean key, as the reference implementation weighs
    them), the residual stream after ``z_layer`` and ``layer``'s MLP output (bare prompt;
    only where the block has a post-MLP norm, else None)."""
    adapter = ctx.adapter
    device = next(ctx.model.parameters()).device
    key_module, z_module = adapter.mlp_out(layer), adapter.layer(z_layer)
    post_norm = adapter.post_mlp_norm(layer)
    prompts = [locate_subject(ctx.tokenizer, t, f.prompt, f.subject) for f in facts for t in templates]
    keys, states, mlp_outs = [], [], []
    pad = pad_id_of(ctx.tokenizer)
    for start in range(0, len(prompts), ROWS_PER_FORWARD):
        chunk = prompts[start:start + ROWS_PER_FORWARD]
        ids, mask = batch_rows([p.ids for p in chunk], pad, device)
        outputs_of = [z_module] + ([adapter.mlp(layer)] if post_norm else [])
        inputs, outputs = capture_io(ctx.model, [key_module], outputs_of, z_module, ids, mask)
        rows = torch.arange(len(chunk), device=device)
        cols = torch.tensor([p.subject_last for p in chunk], device=device)
        keys.append(inputs[key_module][rows, cols].float())
        states.append(outputs[z_module][rows, cols].float())
        if post_norm:
            mlp_outs.append(outputs[adapter.mlp(layer)][rows, cols].float())
    n_t = len(templates)
    k = torch.cat(keys).reshape(len(facts), n_t, -1)
    key = k[:, 0] if n_t == 1 else 0.5 * (k[:, 0] + k[:, 1:].mean(1))
    z = torch.cat(states).reshape(len(facts), n_t, -1)[:, 0]
    m = torch.cat(mlp_outs).reshape(len(facts), n_t, -1)[:, 0] if post_norm else None
    return key, z, m


def _through_post_norm(ctx: EditingContext, layer: int, mlp_out: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """The change of the MLP output m that moves norm(m) by ``wanted`` as closely as a norm allows.

    An RMS-type norm is norm(m) = s * m / rms(m) with a per-channel scale s, so its outputs are
    exactly the s * u with rms(u) = 1. The target y = norm(m) + wanted is projected onto that
    set and m' = u * rms(m) keeps m's size. The projection minimises ||s u - y|| over
    rms(u) = 1: u_j = s_j y_j / (s_j^2 + mu), with mu found per row by bisection.

    Why not simply u = (y / s) / rms(y / s): trained norms have channels whose scale is zero or
    tiny (Gemma-3 270M has an exact zero at layer 1, since its scale is 1 + weight). Dividing by
    them gives infinities, or lets one channel take all of u's size and flatten the rest; mu > 0
    damps exactly those channels. Channels with a zero scale do not reach the output at all and
    keep their current value."""
    norm = ctx.model.get_submodule(ctx.adapter.post_mlp_norm(layer))
    with torch.no_grad():
        param = next(norm.parameters())
        scale = norm(torch.ones(1, mlp_out.shape[-1], dtype=param.dtype, device=param.device)).float()[0]
        current = norm(mlp_out.to(param.dtype)).float()
    return _project_onto_norm_outputs(scale, mlp_out.float(), current + wanted)


def _project_onto_norm_outputs(scale: torch.Tensor, mlp_out: torch.Tensor, target: torch.Tensor,
                               iterations: int = 60) -> torch.Tensor:
    """See :func:`_through_post_norm`: the change of ``mlp_out`` [n, d] whose normalised value
    s * u (rms(u) = 1) is closest to ``target`` [n, d]."""
    rms = lambda x: x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)  # noqa: E731
    live = scale.abs() > 1e-6 * scale.abs().max()
    fixed = torch.where(live, torch.zeros_like(mlp_out), mlp_out / rms(mlp_out))  # dead channels keep u
    s2, sy = scale.pow(2), scale * target

    def u_of(mu: torch.Tensor) -> torch.Tensor:
        return torch.where(live, sy / (s2 + mu), fixed)

    # rms(u(mu)) falls as mu grows (mu >= 0). Where even mu = 0 leaves rms(u) under 1 the
    # closest point lies at mu < 0; scaling u(0) up is then a close, cheap approximation.
    u0 = u_of(torch.zeros(mlp_out.shape[0], 1, device=mlp_out.device))
    too_big = rms(u0) > 1
    lo = torch.zeros(mlp_out.shape[0], 1, device=mlp_out.device)
    hi = torch.full_like(lo, 1.0)
    while bool(((rms(u_of(hi)) > 1) & too_big).any()):
        hi = torch.where((rms(u_of(hi)) > 1) & too_big, hi * 4, hi)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        over = rms(u_of(mid)) > 1
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    u = torch.where(too_big, u_of(hi), u0)
    u = u / rms(u)
    return u * rms(mlp_out) - mlp_out


def _factors_or_dense(ctx: EditingContext, name: str, resid: torch.Tensor, adj: torch.Tensor, total: WeightDelta,
                      keys: torch.Tensor) -> WeightDelta:
    """Add R adj^T ([out, in]) for parameter ``name``, written for ``keys`` [d_in, n], to
    ``total``, low-rank while it is smaller."""
    u, v = resid.float(), adj.float()  # [d, n], [d_mlp, n]
    if ctx.adapter.mlp_out_is_conv1d:
        u, v = v, u
    factors, dense = dict(total.factors), dict(total.dense)
    rank, (rows, cols) = u.shape[1], (u.shape[0], v.shape[0])
    if rank * (rows + cols) < rows * cols:
        factors[name] = (u.contiguous(), v.contiguous())
    else:
        dense[name] = (u @ v.T).contiguous()
    return WeightDelta(factors=factors, dense=dense, keys={**total.keys, name: compact_keys(keys.cpu()).contiguous()})


def compute_targets(ctx: EditingContext, facts: list[Fact], hparams: MemitHyperParams, templates: list[str],
                    checkpoint: ValueCheckpoint | None = None, should_stop: StopCheck | None = None):
    """Step 1: per fact, the change of the residual stream after the last layer of the range
    that makes the model say the new object (a :class:`~editserve.editing.values.ValueResult`;
    z_i = unedited_i + deltas_i). ``checkpoint`` keeps finished chunks (a resumable run)."""
    return compute_value_deltas(ctx.model, ctx.tokenizer, ctx.adapter.layer(max(hparams.layers)),
                                ctx.adapter.hidden_size, facts, templates, hparams, batch_facts=hparams.batch_facts,
                                label="MEMIT target optimisation", checkpoint=checkpoint, should_stop=should_stop)


def spread(ctx: EditingContext, facts: list[Fact], hparams: MemitHyperParams, templates: list[str],
           targets: torch.Tensor, should_stop: StopCheck | None = None) -> tuple[WeightDelta, list[dict]]:
    """Step 2: write the targets z [n, d] into the layers of the range, lowest first, each layer
    taking an even share of what is still missing at the last one."""
    layers = sorted(hparams.layers)
    z_layer = layers[-1]
    total = WeightDelta()
    per_layer = []
    for i, layer in enumerate(layers):
        check_stop(should_stop, "MEMIT spreading")
        layer_started = time.perf_counter()
        with preview(ctx.model, total) if total.parameter_names else nullcontext():
            keys, states, mlp_out = _keys_and_states(ctx, facts, templates, layer, z_layer)
        missing = targets - states
        resid = missing / (len(layers) - i)  # [n, d]
        if mlp_out is not None:
            resid = _through_post_norm(ctx, layer, mlp_out, resid)
        name = ctx.adapter.mlp_out_weight_name(layer)
        earlier = ctx.preserved_keys(name) if hparams.preserve else None
        if hparams.preserve and hparams.preserve_projection:  # AlphaEdit: in C's null space, earlier keys kept
            adj = ctx.solve_preserving(layer, hparams.stats_source, hparams.stats_tokens, keys.T,
                                       earlier, hparams.null_space_threshold, hparams.preserve_ridge)
        else:  # MEMIT's least squares; with preserve, the earlier active edits' keys join it
            adj = ctx.solve_regularised(layer, hparams.stats_source, hparams.stats_tokens,
                                        hparams.mom2_update_weight, keys.T, earlier)  # [d_mlp, n]
        if not (torch.isfinite(resid).all() and torch.isfinite(adj).all()):
            raise PreconditionFailed(f"MEMIT produced a non-finite update at layer {layer}")
        total = _factors_or_dense(ctx, name, resid.T, adj, total, keys.T)
        per_layer.append({"layer": layer, "missing_norm": float(missing.norm(dim=-1).mean()),
                          "preserved_keys": 0 if earlier is None else int(earlier.shape[1]),
                          "seconds": time.perf_counter() - layer_started})
    return total, per_layer


def compute_memit(ctx: EditingContext, facts: list[Fact], hparams: MemitHyperParams, *,
                  checkpoint: ValueCheckpoint | None = None, should_stop: StopCheck | None = None
                  ) -> tuple[WeightDelta, dict]:
    """The MEMIT edit of ``facts`` as a WeightDelta over ``hparams.layers``, plus diagnostics.

    With a ``checkpoint`` the target optimisation resumes from the chunks it holds and
    saves every chunk it finishes (for runs longer than one sitting: bench/memit_bench.py).

    Raises InvalidRequest for a malformed request (before any compute) and PreconditionFailed
    for an unusable statistics source or a diverged optimisation, and Cancelled once
    ``should_stop()`` is true (checked between statistics batches, steps and layers).
    """
    started = time.perf_counter()
    hparams = _check_request(ctx, facts, hparams)
    layers = sorted(hparams.layers)
    ctx.second_moments(layers, hparams.stats_source, hparams.stats_tokens, should_stop=should_stop)
    stats_seconds = time.perf_counter() - started
    templates = ctx.context_templates(hparams.context_count, hparams.context_length)
    context_seconds = time.perf_counter() - started - stats_seconds

    values = compute_targets(ctx, facts, hparams, templates, checkpoint, should_stop)
    values_seconds = time.perf_counter() - started - stats_seconds - context_seconds
    total, per_layer = spread(ctx, facts, hparams, templates, values.unedited + values.deltas, should_stop)

    diagnostics = {
        "method": "memit",
        "hparams_version": hparams.version,
        "layers": layers,
        "facts_count": len(facts),
        "steps": [f["steps"] for f in values.info],
        "final_loss": [f["final_nll"] for f in values.info],
        "facts": values.info,
        "per_layer": per_layer,
        "timings": {
            "statistics_s": stats_seconds,
            "contexts_s": context_seconds,
            "values_s": values_seconds,
            "spread_s": sum(p["seconds"] for p in per_layer),
            "total_s": time.perf_counter() - started,
        },
        "hparams": hparams.as_dict(),
    }
    return total, diagnostics

