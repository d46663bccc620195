"""Values: the hidden state that makes the model say the new object (ROME's v*, section 3.1;
MEMIT's z_i, section 4.2).

A vector delta is added to one module's output (ROME: the edited layer's MLP output; MEMIT:
the residual stream after the last layer of its range) at the subject's last token, in the
rewrite prompt preceded by every context prefix and in the "essence" prompt "{subject} is a".
It is optimised (Adam, only delta has a gradient) so that

    loss = mean over contexts of the target's mean token NLL   (multi-token targets by teacher forcing)
         + kl_factor * KL(unedited || edited) of the next token after "{subject} is a"
         + weight_decay * ||delta||^2 / ||unedited MLP output||^2

with ||delta|| clamped to clamp_norm_factor * ||unedited MLP output||, stopping early once
the NLL is below early_stop_loss. Then v* = W k* + delta.

Many facts are optimised together (MEMIT's batches): their rows share each forward pass, each
fact has its own delta, KL reference, norm clamp and early stop, and the loss is the sum of
the facts' losses, so each delta gets exactly its own fact's gradient. A fact that reaches
its early-stop loss is frozen and its rows leave the batch; the rest go on.

Speed, without changing the result: nothing before the subject's last token can depend on
delta (attention is causal), so the prefix of every row (context, BOS, the subject but its
last token) runs once and its attention keys/values are cached; each step runs only the
tokens from the subject's last one on, and the LM head only at the positions the loss reads.

The model's weights are never written: delta enters through a thread-scoped output hook
(:class:`editserve.editing.hooks.Trace`) and gradients are taken with ``torch.autograd.grad``
on delta alone, so other threads may generate from the same model meanwhile.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from .adapter import ArchitectureAdapter
from .errors import InvalidRequest, PreconditionFailed, StopCheck, check_stop
from .evaluation.teacher_forcing import continuation_ids
from .facts import Fact, validate_facts
from .hooks import Trace
from .keys import body_of, locate_subject, pad_id_of
from .value_checkpoint import ValueCheckpoint


def target_ids(tokenizer, prompt_text: str, target: str) -> list[int]:
    """Token ids of ``target`` as it follows ``prompt_text`` (leading space added as needed)."""
    ids = continuation_ids(tokenizer, prompt_text, target)[1]
    if not ids:
        raise InvalidRequest(f"target {target!r} tokenizes to nothing")
    return ids


def check_facts(tokenizer, facts: list[Fact]) -> None:
    """Everything about the facts that can be wrong, before any compute (InvalidRequest naming
    the fact): the shape of each (:func:`validate_facts`), two different targets for the same
    subject and prompt, a subject not found among the prompt's tokens, an empty target."""
    validate_facts(facts)
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    for i, fact in enumerate(facts):
        key = (fact.prompt, fact.subject)
        if key in seen and seen[key][1].strip() != fact.target_new.strip():
            raise InvalidRequest(
                f"facts[{seen[key][0]}] and facts[{i}] give the same subject and prompt two different targets "
                f"({seen[key][1]!r}, {fact.target_new!r})")
        seen.setdefault(key, (i, fact.target_new))
        try:
            located = locate_subject(tokenizer, "{}", fact.prompt, fact.subject)
            target_ids(tokenizer, located.text, fact.target_new)
        except InvalidRequest as exc:
            raise InvalidRequest(f"facts[{i}]: {exc}") from None


@dataclass
class _Batch:
    """Rows split at the subject's last token: a cached prefix and a suffix re-run per step.

    The rows may belong to several facts and be any of their rows: ``row_fact`` says which
    (local) fact owns each row. Loss positions are first every NLL position (target tokens of
    rewrite rows), then one KL position per KL row.
    """

    entries: tuple[tuple[int, int], ...]  # (local fact, row index within the fact) per row
    prefix_ids: torch.Tensor | None      # [B, P], left-padded
    prefix_mask: torch.Tensor | None
    prefix_pos: torch.Tensor | None
    suffix_ids: torch.Tensor              # [B, S], right-padded; column 0 = subject's last token
    full_mask: torch.Tensor               # [B, P + S]
    suffix_pos: torch.Tensor
    row_fact: torch.Tensor                # [B] local fact index of each row
    bare_rows: torch.Tensor               # rows holding a fact's bare rewrite prompt ("{}" template)
    bare_fact: torch.Tensor               # ... and their facts
    loss_rows: torch.Tensor               # (row, suffix column) pairs whose logits the loss reads
    loss_cols: torch.Tensor
    loss_targets: torch.Tensor            # [n_nll] target token of each NLL position
    loss_fact: torch.Tensor               # [n_nll] fact of each NLL position
    loss_weight: torch.Tensor             # [n_nll] 1 / (rewrite rows x target tokens) of its fact
    kl_fact: torch.Tensor                 # [n_kl] fact of each KL position
    n_nll: int


@dataclass(frozen=True)
class FactRows:
    """One fact's token rows: rewrite prompts (each ending with target[:-1]), then the KL prompt."""

    rows: tuple[tuple[tuple[int, ...], int], ...]  # (ids, subject_last)
    targets: tuple[int, ...]
    n_rewrite: int

    def suffix_length(self, row: int) -> int:
        ids, subject_last = self.rows[row]
        return len(ids) - subject_last


def fact_rows(tokenizer, fact: Fact, templates: list[str], kl_prompt: str | None) -> FactRows:
    prompts = [locate_subject(tokenizer, t, fact.prompt, fact.subject) for t in templates]
    targets = target_ids(tokenizer, prompts[0].text, fact.target_new)
    rows = [(p.ids + tuple(targets[:-1]), p.subject_last) for p in prompts]
    if kl_prompt is not None:
        kl = locate_subject(tokenizer, "{}", kl_prompt, fact.subject)
        rows.append((kl.ids, kl.subject_last))
    return FactRows(tuple(rows), tuple(targets), len(prompts))


def _build_batch(specs: list[FactRows], entries: list[tuple[int, int]], pad: int, device) -> _Batch:
    """The batch of ``entries`` ((local fact, row) pairs) of the facts ``specs``."""
    rows = [(*specs[f].rows[r], f) for f, r in entries]
    P = max(s for _ids, s, _f in rows)
    S = max(len(ids) - s for ids, s, _f in rows)
    prefix, pmask, ppos, suffix, fmask, spos, owner = [], [], [], [], [], [], []
    for ids, s, f in rows:
        head, tail = list(ids[:s]), list(ids[s:])
        prefix.append([pad] * (P - s) + head)
        pmask.append([0] * (P - s) + [1] * s)
        ppos.append([0] * (P - s) + list(range(s)))
        suffix.append(tail + [pad] * (S - len(tail)))
        fmask.append(pmask[-1] + [1] * len(tail) + [0] * (S - len(tail)))
        spos.append(list(range(s, s + S)))
        owner.append(f)
    loss_rows, loss_cols, loss_targets, loss_fact, loss_weight = [], [], [], [], []
    kl_rows, kl_cols, kl_fact, bare_rows, bare_fact = [], [], [], [], []
    for row, (f, r) in enumerate(entries):
        spec = specs[f]
        ids, s = spec.rows[r]
        if r == 0:
            bare_rows.append(row)
            bare_fact.append(f)
        if r < spec.n_rewrite:
            n_target = len(spec.targets)
            prompt_len = len(ids) - (n_target - 1)
            for j, t in enumerate(spec.targets):
                loss_rows.append(row)
                loss_cols.append(prompt_len - 1 + j - s)
                loss_targets.append(t)
                loss_fact.append(f)
                loss_weight.append(1.0 / (spec.n_rewrite * n_target))
        else:  # the KL ("essence") row
            kl_rows.append(row)
            kl_cols.append(len(ids) - 1 - s)
            kl_fact.append(f)

    def t(x, **kw):
        return torch.tensor(x, device=device, dtype=kw.get("dtype", torch.long))

    return _Batch(
        entries=tuple(entries),
        prefix_ids=t(prefix) if P else None, prefix_mask=t(pmask) if P else None,
        prefix_pos=t(ppos) if P else None, suffix_ids=t(suffix), full_mask=t(fmask), suffix_pos=t(spos),
        row_fact=t(owner), bare_rows=t(bare_rows), bare_fact=t(bare_fact), loss_rows=t(loss_rows + kl_rows),
        loss_cols=t(loss_cols + kl_cols), loss_targets=t(loss_targets), loss_fact=t(loss_fact),
        loss_weight=t(loss_weight, dtype=torch.float32), kl_fact=t(kl_fact), n_nll=len(loss_targets),
    )


ROWS_PER_BUCKET = 48  # below this, rows of different suffix lengths share one padded forward


def _buckets(specs: list[FactRows], facts: list[int]) -> list[list[tuple[int, int]]]:
    """Rows of ``facts`` grouped by suffix length, so each forward pads as little as possible:
    rows sorted by length, a group closed once it has ROWS_PER_BUCKET rows and the next row is
    longer (short groups would waste more in per-forward overhead than padding costs)."""
    rows = sorted(((f, r) for f in facts for r in range(len(specs[f].rows))),
                  key=lambda e: specs[e[0]].suffix_length(e[1]))
    groups: list[list[tuple[int, int]]] = [[]]
    for entry in rows:
        group = groups[-1]
        if len(group) >= ROWS_PER_BUCKET and specs[entry[0]].suffix_length(entry[1]) > \
                specs[group[-1][0]].suffix_length(group[-1][1]):
            groups.append([])
        groups[-1].append(entry)
    return [sorted(g) for g in groups]


# Decoder bodies whose forward was checked (tests/unit/test_rome.py, against plain forwards) to
# run correctly from ``inputs_embeds`` with a shortened ``layers`` list and ``config.layer_types``:
# no absolute position embedding or scaling is applied to ``inputs_embeds`` in the forward.
_UPPER_STACK_BODIES = frozenset({"LlamaModel", "Qwen2Model", "Gemma3TextModel", "GPTNeoXModel"})


@dataclass(frozen=True)
class _UpperStack:
    """The decoder body from layer ``start`` on (a view: the same modules, never a copy of
    weights), and the name of layer ``start`` for capturing what enters it."""

    body: nn.Module
    start: int
    layer_name: str


def _upper_stack(model, module_name: str) -> _UpperStack | None:
    """A view of the body that runs only the layers from the one holding ``module_name`` on.

    Why: no layer below the edited one can see delta, and neither can the edited layer before
    its hooked module, so the hidden state entering that layer is the same at every step; each
    step can start there instead of at the embeddings (SmolLM2 at layer 5: 25 of 30 layers).
    The view is a shallow copy of the body whose ``layers`` list (and ``config.layer_types``,
    which Gemma-3 and Qwen2 index by position) starts at that layer; the served model is not
    changed, so other threads are unaffected. None where the body is not a known one or there
    is nothing to skip (layer 0)."""
    body = body_of(model)
    layers = getattr(body, "layers", None)
    if type(body).__name__ not in _UPPER_STACK_BODIES or not isinstance(layers, nn.ModuleList):
        return None
    target = model.get_submodule(module_name)
    start = next((i for i, layer in enumerate(layers) if any(m is target for m in layer.modules())), None)
    if not start:
        return None
    layer_name = next(name for name, module in model.named_modules() if module is layers[start])
    view = copy.copy(body)
    view.__dict__["_modules"] = {**body._modules, "layers": nn.ModuleList(list(layers)[start:])}
    config = copy.deepcopy(body.config)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[start:]
    view.__dict__["config"] = config
    return _UpperStack(view, start, layer_name)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed input has been captured."""


def _head_and_softcap(model):
    head = model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return head, softcap


class _Runner:
    """Runs the suffix of every row against the cached prefix, with a delta at the subject."""

    def __init__(self, model, module_name: str, batch: _Batch,
                 prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 upper: _UpperStack | None = None) -> None:
        self.model = model
        self.body = body_of(model)
        self.head, self.softcap = _head_and_softcap(model)
        self.batch = batch
        self.module_name = module_name
        self.prefix_kv = prefix_kv
        self.upper = upper
        if prefix_kv is None and batch.prefix_ids is not None:
            with torch.no_grad():
                cache = DynamicCache()
                self.body(input_ids=batch.prefix_ids, attention_mask=batch.prefix_mask,
                          position_ids=batch.prefix_pos, past_key_values=cache, use_cache=True)
            # fully padded prefix rows may hold NaN (a query attending nothing); they are
            # masked out later, but NaN * 0 is NaN, so make them finite
            self.prefix_kv = [(torch.nan_to_num(layer_cache.keys), torch.nan_to_num(layer_cache.values))
                              for layer_cache in cache.layers]
        self.entering = self._entering_hidden() if upper is not None else None

    def _entering_hidden(self) -> torch.Tensor:
        """The suffix's hidden state entering the upper stack's first layer (no delta reaches
        it), from one forward that stops there."""
        assert self.upper is not None
        b, owner, captured = self.batch, threading.get_ident(), []

        def grab(_module, args, kwargs):
            if threading.get_ident() == owner:
                captured.append(args[0] if args else kwargs["hidden_states"])
                raise _StopForward

        handle = self.model.get_submodule(self.upper.layer_name).register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                self.body(input_ids=b.suffix_ids, attention_mask=b.full_mask, position_ids=b.suffix_pos,
                          past_key_values=self._cache(), use_cache=self.prefix_kv is not None)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0].detach()

    def narrowed(self, batch: _Batch, rows: list[int]) -> _Runner:
        """A runner for ``batch``, whose rows are ``rows`` of this one (facts that left), reusing
        the cached prefix: those rows' keys/values, cut to the new (left-padded) prefix width."""
        width = batch.prefix_ids.shape[1] if batch.prefix_ids is not None else 0
        kv = None
        if self.prefix_kv is not None and width:
            index = torch.tensor(rows, device=self.prefix_kv[0][0].device)
            kv = [(k[index][:, :, k.shape[2] - width:], v[index][:, :, v.shape[2] - width:]) for k, v in self.prefix_kv]
        return _Runner(self.model, self.module_name, batch, kv, self.upper)

    def _cache(self) -> DynamicCache | None:
        if self.prefix_kv is None:
            return None
        cache = DynamicCache()
        for index, (k, v) in enumerate(self.prefix_kv):
            cache.update(k, v, index)
        return cache

    def logits(self, delta_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 logits at the loss positions, module output at the subject's last token [B, d]).

        ``delta_rows`` [B, d] is added to the module's output at each row's subject."""
        b = self.batch

        def add_delta(out: torch.Tensor, _name: str) -> torch.Tensor:
            if delta_rows is None:
                return out
            first = out[:, :1] + delta_rows[:, None].to(out.dtype)
            return torch.cat([first, out[:, 1:]], dim=1)

        inputs = ({"input_ids": b.suffix_ids} if self.upper is None
                  else {"inputs_embeds": self.entering})
        body = self.body if self.upper is None else self.upper.body
        with Trace(self.model, self.module_name, retain_output=True, edit_output=add_delta,
                   detach=True) as trace:
            hidden = body(**inputs, attention_mask=b.full_mask, position_ids=b.suffix_pos,
                          past_key_values=self._cache(), use_cache=self.prefix_kv is not None).last_hidden_state
        picked = hidden[b.loss_rows, b.loss_cols].contiguous()
        logits = self.head(picked).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        assert trace.output is not None
        return logits, trace.output[:, 0].float()


@dataclass
class ValueResult:
    """Per fact: the optimised change at the subject, the unedited output there (bare prompt)."""

    deltas: torch.Tensor      # [F, d] fp32
    unedited: torch.Tensor    # [F, d] fp32, the module output at the subject before the change
    info: list[dict]


def compute_value_deltas(model, tokenizer, module_name: str, hidden_size: int, facts: list[Fact],
                         templates: list[str], hparams, *, batch_facts: int = 1, label: str = "value optimisation",
                         checkpoint: ValueCheckpoint | None = None, should_stop: StopCheck | None = None
                         ) -> ValueResult:
    """Optimise one delta per fact at ``module_name``'s output (see the module docstring).

    ``templates`` are context templates ("{}" first); facts are optimised ``batch_facts`` at a
    time. With a ``checkpoint``, facts it already holds are taken from it and every finished
    chunk is written to it, so a stopped run resumes where it stopped. Raises
    PreconditionFailed naming the fact when its optimisation diverges, and Cancelled once
    ``should_stop()`` is true (checked before every step).
    """
    has_kl = hparams.kl_factor > 0
    specs = [fact_rows(tokenizer, f, templates, hparams.kl_prompt if has_kl else None) for f in facts]
    deltas, unedited, info = [None] * len(facts), [None] * len(facts), [None] * len(facts)
    keys: list[str] = []
    if checkpoint is not None:
        device = next(model.parameters()).device
        keys = [checkpoint.fact_key(f, module_name, templates, hparams) for f in facts]
        stored = checkpoint.load()
        for f, key in enumerate(keys):
            if key in stored:
                hit = stored[key]
                deltas[f], unedited[f] = hit.delta.to(device), hit.unedited.to(device)
                info[f] = {**hit.info, "resumed": True}
    todo = [f for f in range(len(facts)) if deltas[f] is None]
    # facts of similar suffix length share a chunk: less padding in every step's forward
    order = sorted(todo, key=lambda i: max(len(ids) - s for ids, s in specs[i].rows))
    for start in range(0, len(order), batch_facts):
        chunk = order[start:start + batch_facts]
        d, u, i = _optimise_chunk(model, tokenizer, module_name, hidden_size, [specs[f] for f in chunk], hparams,
                                  chunk, label, should_stop)
        if checkpoint is not None:
            checkpoint.save([keys[f] for f in chunk], d, u, i)
        for local, f in enumerate(chunk):
            deltas[f], unedited[f], info[f] = d[local], u[local], i[local]
    return ValueResult(torch.stack(deltas), torch.stack(unedited), info)


def _optimise_chunk(model, tokenizer, module_name: str, hidden_size: int, specs: list[FactRows], hparams,
                    indices: list[int], label: str, should_stop: StopCheck | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Optimise the deltas of one chunk of facts (``indices``: their places in the request).

    Each step runs one forward per bucket of rows of similar suffix length (see
    :func:`_buckets`), sums every fact's loss over the buckets, and takes one gradient of the
    active facts' total. Facts are numbered within the chunk throughout (``row_fact``)."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    has_kl = hparams.kl_factor > 0
    stop_at_top = hparams.stop_at_top
    pad = pad_id_of(tokenizer)
    n = len(specs)
    params = [torch.zeros(hidden_size, device=device, dtype=torch.float32, requires_grad=True) for _ in range(n)]
    optimizer = torch.optim.Adam(params, lr=hparams.lr)
    kl_init: list[torch.Tensor | None] = [None] * n
    base_out: list[torch.Tensor | None] = [None] * n
    max_norm = [0.0] * n
    steps_run = [0] * n
    nll0 = [0.0] * n
    last = [(0.0, 0.0)] * n  # (nll, kl) at the fact's last evaluation
    last_missed = [-1.0] * n  # with stop_at_top: target positions not on top at the last evaluation
    trace: list[list[float]] = [[] for _ in range(n)]  # NLL at every evaluation (diagnostics)
    active = list(range(n))
    upper = _upper_stack(model, module_name) if hparams.skip_lower_layers else None
    runners = [_Runner(model, module_name, _build_batch(specs, entries, pad, device), upper=upper)
               for entries in _buckets(specs, active)]
    prepared = time.perf_counter()
    for step in range(hparams.steps + 1):
        check_stop(should_stop, label)
        stacked = torch.stack(params)
        nll = torch.zeros(n, device=device)
        kl = torch.zeros(n, device=device)
        missed = torch.zeros(n, device=device)  # target positions where another token is on top
        for runner in runners:
            b = runner.batch
            logits, out0 = runner.logits(stacked[b.row_fact])
            logp = torch.log_softmax(logits, -1)
            if stop_at_top:
                off_top = (logp[:b.n_nll].detach().argmax(-1) != b.loss_targets).float()
                missed = missed.index_add(0, b.loss_fact, off_top)
            if step == 0:  # delta = 0: these outputs are the unedited ones (KL reference, norms)
                for row, f in zip(b.bare_rows.tolist(), b.bare_fact.tolist(), strict=True):
                    base_out[f] = out0[row].detach()
                for k, f in enumerate(b.kl_fact.tolist()):
                    kl_init[f] = logp[b.n_nll + k].detach()
            token_lp = logp[:b.n_nll].gather(1, b.loss_targets[:, None])[:, 0]
            nll = nll.index_add(0, b.loss_fact, -token_lp * b.loss_weight)
            if has_kl and len(b.kl_fact):
                reference = torch.stack([kl_init[f] for f in b.kl_fact.tolist()])
                kl = kl.index_add(0, b.kl_fact, torch.sum(reference.exp() * (reference - logp[b.n_nll:]), -1))
        if step == 0:
            for f in range(n):
                max_norm[f] = hparams.clamp_norm_factor * float(base_out[f].norm().clamp_min(1e-6))
        norms = torch.stack([base_out[f].norm().clamp_min(1e-6) for f in range(n)])
        decay = stacked.pow(2).sum(-1) / norms.pow(2)
        loss = nll + hparams.kl_factor * kl + hparams.weight_decay * decay
        values = loss.detach().tolist()
        nll_values, kl_values = nll.detach().tolist(), kl.detach().tolist()
        for f in active:
            if not math.isfinite(values[f]):
                raise PreconditionFailed(
                    f"{label} diverged for facts[{indices[f]}] (loss {values[f]}) at step {step}; "
                    "try a smaller learning_rate or another layer")
            last[f] = (nll_values[f], kl_values[f])
            trace[f].append(round(nll_values[f], 4))
            if step == 0:
                nll0[f] = nll_values[f]
        if step == hparams.steps:
            break
        on_top = missed.tolist()
        for f in active:
            last_missed[f] = on_top[f]
        remaining = [f for f in active if nll_values[f] >= hparams.early_stop_loss
                     and not (stop_at_top and on_top[f] == 0)]
        if not remaining:
            break
        grads = torch.autograd.grad(loss[remaining].sum(), [params[f] for f in remaining])
        for p in params:
            p.grad = None
        for f, g in zip(remaining, grads, strict=True):
            params[f].grad = g
        optimizer.step()
        with torch.no_grad():
            for f in remaining:
                steps_run[f] += 1
                norm = float(params[f].norm())
                if norm > max_norm[f]:
                    params[f].mul_(max_norm[f] / norm)
        if len(remaining) < len(active):  # converged facts leave the batch; the rest keep their prefix
            active = remaining
            still = set(active)
            narrowed = []
            for runner in runners:
                kept = [row for row, (f, _r) in enumerate(runner.batch.entries) if f in still]
                if kept:
                    entries = [runner.batch.entries[row] for row in kept]
                    narrowed.append(runner.narrowed(_build_batch(specs, entries, pad, device), kept))
            runners = narrowed
    result = torch.stack([p.detach().clone() for p in params])
    if not bool(torch.isfinite(result).all()):
        raise PreconditionFailed(f"{label} produced a non-finite vector")
    seconds = time.perf_counter() - started
    info = [{
        "steps": steps_run[f],
        "initial_nll": nll0[f],
        "final_nll": last[f][0],
        "final_kl": last[f][1],
        "nll_trace": trace[f],
        "target_prob": math.exp(-last[f][0]),
        **({"positions_off_top": int(last_missed[f])} if stop_at_top else {}),
        "delta_norm": float(result[f].norm()),
        "output_norm": float(base_out[f].norm()),
        "target_tokens": len(specs[f].targets),
        "rows": len(specs[f].rows),
        "batch_facts": n,
        "seconds_prepare": prepared - started,
        "seconds": seconds,
    } for f in range(n)]
    return result, torch.stack(base_out), info


def compute_value_delta(model, tokenizer, adapter: ArchitectureAdapter, layer: int, fact: Fact,
                        templates: list[str], hparams, should_stop: StopCheck | None = None) -> tuple[torch.Tensor, dict]:
    """ROME's delta = v* - W k*: the change of ``layer``'s MLP output at the subject (fp32,
    [d_model]). Returns (delta, diagnostics)."""
    result = compute_value_deltas(model, tokenizer, adapter.mlp_out(layer), adapter.hidden_size, [fact], templates, hparams,
                                  label="ROME value optimisation", should_stop=should_stop)
    info = dict(result.info[0])
    info["mlp_out_norm"] = info["output_norm"]
    return result.deltas[0], info
