"""FT-L: constrained fine-tuning of one MLP output projection (the baseline of the ROME and
MEMIT papers; Zhu et al. 2020, "Modifying Memories in Transformer Models").

The change ``dW`` of one layer's MLP output weight is optimised to maximise the
log-probability of target_new after each fact's prompt (teacher forcing), with every entry
of ``dW`` clamped to ``[-norm_constraint, norm_constraint]`` after each step (the L-infinity
constraint that makes FT "-L"). The served weights are never touched: the candidate change
is added to the module's output by a thread-scoped hook (``x @ dW^T``), and the result is
a dense :class:`WeightDelta`.
"""

from __future__ import annotations

import time

import torch

from .artifacts import WeightDelta
from .context import EditingContext
from .errors import InvalidRequest, PreconditionFailed, StopCheck, check_stop
from .evaluation.teacher_forcing import continuation_ids
from .facts import Fact, validate_facts
from .hooks import Trace
from .hparams import FtHyperParams


def compute_ft(ctx: EditingContext, facts: list[Fact], hparams: FtHyperParams, *,
               should_stop: StopCheck | None = None) -> tuple[WeightDelta, dict]:
    """The FT-L change of ``hparams.layer``'s MLP output weight for ``facts`` (dense); Cancelled
    once ``should_stop()`` is true (checked before every step)."""
    model, tokenizer, adapter = ctx.model, ctx.tokenizer, ctx.adapter
    hparams = hparams.fitted(adapter.num_layers)
    validate_facts(facts)
    module_name = adapter.mlp_out(hparams.layer)
    started = time.perf_counter()
    device = next(model.parameters()).device
    weight = model.get_parameter(f"{module_name}.weight")
    out_in = adapter.from_param_layout(weight)
    delta = torch.zeros(out_in.shape, dtype=torch.float32, device=device, requires_grad=True)

    rows, targets = [], []
    for fact in facts:
        prompt_ids, target_ids = continuation_ids(tokenizer, fact.text, fact.target_new)
        if not target_ids:
            raise InvalidRequest(f"target_new {fact.target_new!r} tokenizes to nothing")
        rows.append(prompt_ids + target_ids)
        targets.append((len(prompt_ids), target_ids))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    positions = [(i, start - 1 + j, t) for i, (start, tids) in enumerate(targets) for j, t in enumerate(tids)]
    batch_index = torch.tensor([p[0] for p in positions], device=device)
    seq_index = torch.tensor([p[1] for p in positions], device=device)
    target_tensor = torch.tensor([p[2] for p in positions], device=device)

    trace = Trace(model, module_name, retain_output=False, retain_input=True, detach=False)
    trace.edit_output = lambda out, _n: out + (trace.input.to(delta.dtype) @ delta.T).to(out.dtype)
    optimizer = torch.optim.Adam([delta], lr=hparams.learning_rate)
    losses = []
    with trace, torch.enable_grad():
        for _ in range(hparams.steps):
            check_stop(should_stop, "FT-L")
            optimizer.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask).logits
            picked = logits[batch_index, seq_index].float().log_softmax(-1)
            loss = -picked.gather(1, target_tensor[:, None]).mean()
            if not torch.isfinite(loss):
                raise PreconditionFailed("FT-L loss became NaN/inf; the model is unchanged")
            if loss.item() < hparams.early_stop_loss:
                losses.append(loss.item())
                break
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                delta.clamp_(-hparams.norm_constraint, hparams.norm_constraint)
            losses.append(loss.item())
    change = adapter.to_param_layout(delta.detach().float().cpu())
    return WeightDelta(dense={f"{module_name}.weight": change}), {
        "layers": [hparams.layer], "steps": len(losses), "final_loss": losses[-1],
        "seconds": time.perf_counter() - started,
    }

