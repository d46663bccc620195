"""Values: the MLP output that makes the model say the new object (ROME's v*, section 3.1).

A vector delta is added to the edited layer's MLP output at the subject's last token, in the
rewrite prompt preceded by every context prefix and in the "essence" prompt "{subject} is a".
It is optimised (Adam, only delta has a gradient) so that

    loss = mean over contexts of the target's mean token NLL   (multi-token targets by teacher forcing)
         + kl_factor * KL(unedited || edited) of the next token after "{subject} is a"
         + weight_decay * ||delta||^2 / ||unedited MLP output||^2

with ||delta|| clamped to clamp_norm_factor * ||unedited MLP output||, stopping early once
the NLL is below early_stop_loss. Then v* = W k* + delta.

Speed, without changing the result: nothing before the subject's last token can depend on
delta (attention is causal), so the prefix of every row (context, BOS, the subject but its
last token) runs once and its attention keys/values are cached; each step runs only the
tokens from the subject's last one on, and the LM head only at the positions the loss reads.

The model's weights are never written: delta enters through a thread-scoped output hook
(:class:`editserve.editing.hooks.Trace`) and gradients are taken with ``torch.autograd.grad``
on delta alone, so other threads may generate from the same model meanwhile.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .adapter import ArchitectureAdapter
from .errors import InvalidRequest, PreconditionFailed
from .evaluation.teacher_forcing import continuation_ids
from .facts import Fact
from .hooks import Trace
from .keys import PromptTokens, body_of, locate_subject, pad_id_of


def target_ids(tokenizer, prompt_text: str, target: str) -> list[int]:
    """Token ids of ``target`` as it follows ``prompt_text`` (leading space added as needed)."""
    ids = continuation_ids(tokenizer, prompt_text, target)[1]
    if not ids:
        raise InvalidRequest(f"target {target!r} tokenizes to nothing")
    return ids


@dataclass
class _Batch:
    """Rows split at the subject's last token: a cached prefix and a suffix re-run per step."""

    prefix_ids: torch.Tensor | None      # [B, P], left-padded
    prefix_mask: torch.Tensor | None
    prefix_pos: torch.Tensor | None
    suffix_ids: torch.Tensor              # [B, S], right-padded; column 0 = subject's last token
    full_mask: torch.Tensor               # [B, P + S]
    suffix_pos: torch.Tensor
    loss_rows: torch.Tensor               # (row, suffix column) pairs whose logits the loss reads
    loss_cols: torch.Tensor
    loss_targets: torch.Tensor
    loss_owner: torch.Tensor              # which rewrite row each loss position belongs to
    n_rewrite: int
    kl_row: int | None


def _build_batch(rows: list[tuple[tuple[int, ...], int]], targets: list[int], n_rewrite: int,
                 has_kl: bool, pad: int, device) -> _Batch:
    """``rows``: (ids, subject_last). Rewrite rows first (ids end with target[:-1]), then the KL row."""
    splits = [s for _ids, s in rows]
    P = max(splits)
    S = max(len(ids) - s for ids, s in rows)
    prefix, pmask, ppos, suffix, fmask, spos = [], [], [], [], [], []
    for ids, s in rows:
        head, tail = list(ids[:s]), list(ids[s:])
        prefix.append([pad] * (P - s) + head)
        pmask.append([0] * (P - s) + [1] * s)
        ppos.append([0] * (P - s) + list(range(s)))
        suffix.append(tail + [pad] * (S - len(tail)))
        fmask.append(pmask[-1] + [1] * len(tail) + [0] * (S - len(tail)))
        spos.append(list(range(s, s + S)))
    loss_rows, loss_cols, loss_targets, owner = [], [], [], []
    n_target = len(targets)
    for r in range(n_rewrite):
        ids, s = rows[r]
        prompt_len = len(ids) - (n_target - 1)
        for j, t in enumerate(targets):
            loss_rows.append(r)
            loss_cols.append(prompt_len - 1 + j - s)
            loss_targets.append(t)
            owner.append(r)
    kl_row = None
    if has_kl:
        kl_row = len(rows) - 1
        ids, s = rows[kl_row]
        loss_rows.append(kl_row)
        loss_cols.append(len(ids) - 1 - s)

    def t(x):
        return torch.tensor(x, device=device)

    return _Batch(
        prefix_ids=t(prefix) if P else None, prefix_mask=t(pmask) if P else None,
        prefix_pos=t(ppos) if P else None, suffix_ids=t(suffix), full_mask=t(fmask), suffix_pos=t(spos),
        loss_rows=t(loss_rows), loss_cols=t(loss_cols), loss_targets=t(loss_targets), loss_owner=t(owner),
        n_rewrite=n_rewrite, kl_row=kl_row,
    )


def _head_and_softcap(model):
    head = model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return head, softcap


class _Runner:
    """Runs the suffix of every row against the cached prefix, with delta at the subject."""

    def __init__(self, model, adapter: ArchitectureAdapter, layer: int, batch: _Batch) -> None:
        self.model = model
        self.body = body_of(model)
        self.head, self.softcap = _head_and_softcap(model)
        self.batch = batch
        self.module_name = adapter.mlp_out(layer)
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if batch.prefix_ids is not None:
            with torch.no_grad():
                cache = DynamicCache()
                self.body(input_ids=batch.prefix_ids, attention_mask=batch.prefix_mask,
                          position_ids=batch.prefix_pos, past_key_values=cache, use_cache=True)
            # fully padded prefix rows may hold NaN (a query attending nothing); they are
            # masked out later, but NaN * 0 is NaN, so make them finite
            self.prefix_kv = [(torch.nan_to_num(layer_cache.keys), torch.nan_to_num(layer_cache.values))
                              for layer_cache in cache.layers]

    def _cache(self) -> DynamicCache | None:
        if self.prefix_kv is None:
            return None
        cache = DynamicCache()
        for index, (k, v) in enumerate(self.prefix_kv):
            cache.update(k, v, index)
        return cache

    def logits(self, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 logits at the loss positions, MLP output at the subject's last token [B, d])."""
        b = self.batch

        def add_delta(out: torch.Tensor, _name: str) -> torch.Tensor:
            if delta is None:
                return out
            first = out[:, :1] + delta.to(out.dtype)
            return torch.cat([first, out[:, 1:]], dim=1)

        with Trace(self.model, self.module_name, retain_output=True, edit_output=add_delta,
                   detach=True) as trace:
            hidden = self.body(input_ids=b.suffix_ids, attention_mask=b.full_mask, position_ids=b.suffix_pos,
                               past_key_values=self._cache(), use_cache=self.prefix_kv is not None
                               ).last_hidden_state
        picked = hidden[b.loss_rows, b.loss_cols].contiguous()
        logits = self.head(picked).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        assert trace.output is not None
        return logits, trace.output[:, 0].float()


def compute_value_delta(model, tokenizer, adapter: ArchitectureAdapter, layer: int, fact: Fact,
                        templates: list[str], hparams) -> tuple[torch.Tensor, dict]:
    """delta = v* - W k*: the change of the layer's MLP output at the subject (fp32, [d_model]).

    ``templates`` are context templates ("{}" first). Returns (delta, diagnostics).
    """
    started = time.perf_counter()
    device = next(model.parameters()).device
    prompts: list[PromptTokens] = [locate_subject(tokenizer, t, fact.prompt, fact.subject) for t in templates]
    targets = target_ids(tokenizer, prompts[0].text, fact.target_new)
    rows = [(p.ids + tuple(targets[:-1]), p.subject_last) for p in prompts]
    has_kl = hparams.kl_factor > 0
    if has_kl:
        kl = locate_subject(tokenizer, "{}", hparams.kl_prompt, fact.subject)
        rows.append((kl.ids, kl.subject_last))
    batch = _build_batch(rows, targets, len(prompts), has_kl, pad_id_of(tokenizer), device)
    runner = _Runner(model, adapter, layer, batch)

    n_target = len(targets)
    n_loss = len(prompts) * n_target

    def losses(logits: torch.Tensor, delta: torch.Tensor | None, kl_init: torch.Tensor | None):
        logp = torch.log_softmax(logits, -1)
        token_lp = logp[:n_loss].gather(1, batch.loss_targets[:, None])[:, 0]
        nll = -token_lp.reshape(len(prompts), n_target).mean(1).mean()
        kl_term = logp.new_zeros(())
        if kl_init is not None:
            kl_term = torch.sum(kl_init.exp() * (kl_init - logp[n_loss]))
        return nll, kl_term, logp

    # step 0 runs at delta = 0: its outputs are the unedited ones (KL reference, output norm)
    delta = torch.zeros(adapter.hidden_size, device=device, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.lr)
    kl_init: torch.Tensor | None = None
    base_norm = max_norm = None
    steps_run, nll0, nll_value, kl_value = 0, 0.0, 0.0, 0.0
    prepared = time.perf_counter()
    for step in range(hparams.steps + 1):
        logits, mlp_out = runner.logits(delta)
        if step == 0:
            logp0 = torch.log_softmax(logits.detach(), -1)
            kl_init = logp0[n_loss] if has_kl else None
            base_norm = mlp_out[0].detach().norm().clamp_min(1e-6)
            max_norm = hparams.clamp_norm_factor * base_norm
        nll, kl_term, _ = losses(logits, delta, kl_init)
        decay = delta.pow(2).sum() / base_norm.pow(2)
        loss = nll + hparams.kl_factor * kl_term + hparams.weight_decay * decay
        nll_value, kl_value = float(nll.detach()), float(kl_term.detach())
        if step == 0:
            nll0 = nll_value
        if not math.isfinite(float(loss.detach())):
            raise PreconditionFailed(f"ROME value optimisation diverged (loss {float(loss.detach())}) at step {step}; "
                                     "try a smaller learning_rate or another layer")
        if nll_value < hparams.early_stop_loss or step == hparams.steps:
            break
        (grad,) = torch.autograd.grad(loss, [delta])
        optimizer.zero_grad(set_to_none=True)
        delta.grad = grad
        optimizer.step()
        steps_run += 1
        with torch.no_grad():
            norm = delta.norm()
            if norm > max_norm:
                delta.mul_(max_norm / norm)
    result = delta.detach().clone()
    if not bool(torch.isfinite(result).all()):
        raise PreconditionFailed("ROME value optimisation produced a non-finite vector")
    return result, {
        "steps": steps_run,
        "initial_nll": nll0,
        "final_nll": nll_value,
        "final_kl": kl_value,
        "target_prob": math.exp(-nll_value),
        "delta_norm": float(result.norm()),
        "mlp_out_norm": float(base_norm),
        "target_tokens": n_target,
        "rows": len(rows),
        "prefix_len": int(batch.prefix_ids.shape[1]) if batch.prefix_ids is not None else 0,
        "suffix_len": int(batch.suffix_ids.shape[1]),
        "seconds_prepare": prepared - started,
        "seconds_optimise": time.perf_counter() - prepared,
    }
