"""T-Patcher (Huang et al., ICLR 2023, "Transformer-Patcher: One Mistake Worth One Neuron").

Each fact gets ``neurons_per_fact`` new ReLU neurons in one FFN (:mod:`.neurons`); the base
weights never change, so an edit is a :class:`~editserve.editing.artifacts.RuntimeLayer` and
revert is its removal. A neuron is trained with the base frozen on the paper's three losses
(weights in :class:`~editserve.editing.hparams.TPatcherHyperParams`):

- edit loss: the target's NLL after the prompt, also behind self-generated context prefixes
  (as ROME/MEMIT use them) so the neuron keys on the fact rather than on one exact string;
- activation loss: the neuron must fire (activation >= margin) on the edit's inputs;
- memory loss: it must stay below a negative margin on every token of unrelated text (the
  shipped statistics corpus), so ReLU makes it exactly silent there, and on the edit's own
  prompt filled with other subjects (``negatives`` of them, from a shipped list).

Where the neuron fires (``fire_at``) decides its locality:

- ``"last"``, the paper's placement: the last layer, at the positions that predict the
  target. There the FFN input encodes the relation and the expected answer more than the
  subject, so the neuron fires for same-relation neighbours too (CounterFact NS 31 against
  73 unedited on SmolLM2). Trained jointly: the edit loss moves the value with one model pass
  per step, the hinges move key and bias (:func:`_train_at_prediction`).
- ``"subject"``, the shipped default: the subject's last token in a middle layer (ROME's),
  where the model looks a subject up, so the neuron fires for this subject in any wording and
  stays silent for others. Key and bias are fitted by the hinges alone from a whitened start
  (no model pass), and the value is the change ROME would make to that MLP's output there
  (:func:`_train_at_subject`). Measured: NS 72 against 73 unedited, PS 100, in a quarter of
  the time (docs/RUNTIME_EDITS.md).

Why this is cheap: the neuron's input x (the FFN input at its layer) does not depend on the
neuron, so the activation and memory losses read inputs captured once (by forwards that stop
at the patched layer); only the edit loss runs the model. Facts of one edit are trained one
after another, each on top of the neurons already made (as sequential editing would).
"""

from __future__ import annotations

import time
from importlib import resources

import torch

from .artifacts import RuntimeLayer
from .context import EditingContext
from .errors import PreconditionFailed, StopCheck, check_stop
from .facts import Fact
from .hooks import Trace
from .hparams import RomeHyperParams, TPatcherHyperParams
from .keys import batch_rows, capture_io, pad_id_of
from .neurons import LAYER_TYPE, NeuronBank, preview_neurons
from .values import check_facts, compute_value_deltas, fact_rows

MEMORY_ROW_TOKENS = 32  # tokens per memory row (unrelated text the neurons must ignore)
WHITEN_ROWS = 8192  # negatives the whitened start's covariance reads at most (the hinges read all)


def other_subjects() -> list[str]:
    """The shipped list of subjects for negative prompts (editing/data/subjects.txt)."""
    text = (resources.files("editserve.editing") / "data" / "subjects.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _negative_inputs(ctx: EditingContext, module: str, fact: Fact, count: int, generator: torch.Generator,
                     every_token: bool = False) -> torch.Tensor:
    """FFN inputs of the fact's prompt filled with ``count`` other subjects: at its last token
    ([count, d]; where ``fire_at = "last"`` fires), or at every token (``every_token``,
    [N, d]: a neuron keyed on the subject must stay silent on another subject's name and on
    the relation words that follow it)."""
    if count == 0:
        return torch.zeros(0, ctx.adapter.hidden_size)
    names = [s for s in other_subjects() if s.casefold() != fact.subject.casefold()]
    order = torch.randperm(len(names), generator=generator)[:count].tolist()
    rows = [tuple(ctx.tokenizer(fact.prompt.replace("{}", names[i])).input_ids) for i in order]
    x, mask = _module_inputs(ctx, module, rows)
    if every_token:
        return x[mask.bool()]
    return x[torch.arange(len(rows)), mask.sum(1) - 1]


def _patched_inputs(ctx: EditingContext, module: str, fact: Fact, patched: list[tuple[str, str]]) -> torch.Tensor:
    """FFN inputs at ``module`` for every token of the already patched facts' prompts ([N, d]
    fp32), those about ``fact``'s own subject left out (their inputs are this fact's too).

    Each prompt's inputs are read once and kept per context in bf16 (~11 KB a prompt on
    SmolLM2), only while its fact is patched in: an edit after N others then runs no N
    forwards, only N prompts' worth of hinge terms. They are read through the model as it is
    when first asked, as :func:`memory_inputs` are; neurons at this layer never change them
    (they add to the FFN's output, not to its input)."""
    cache: dict[str, torch.Tensor] = ctx.memo(("t_patcher_patched", module), dict)
    wanted = dict.fromkeys(text for _subject, text in patched)  # ordered: the same batches each run
    for gone in [t for t in cache if t not in wanted]:  # reverted since: forget them
        del cache[gone]
    missing = [t for t in wanted if t not in cache]
    for start in range(0, len(missing), 32):
        chunk = missing[start:start + 32]
        x, mask = _module_inputs(ctx, module, [tuple(ctx.tokenizer(t).input_ids) for t in chunk])
        for row, text in enumerate(chunk):
            cache[text] = x[row][mask[row].bool()].to(torch.bfloat16)
    own = fact.subject.casefold()
    kept = [cache[text].float() for subject, text in patched if subject.casefold() != own]
    return torch.cat(kept) if kept else torch.zeros(0, ctx.adapter.hidden_size)


def _logits_at(model, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits at (row, col) pairs only: the vocabulary projection dominates a small model's
    forward (49k-262k rows), so it is computed at the kept columns alone."""
    keep = torch.unique(cols)
    where = torch.searchsorted(keep, cols)
    try:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    except TypeError:  # a model class without logits_to_keep
        return model(input_ids=ids, attention_mask=mask).logits[rows, cols]
    return logits[rows, where]


def _check_request(ctx: EditingContext, facts: list[Fact], hparams: TPatcherHyperParams) -> TPatcherHyperParams:
    check_facts(ctx.tokenizer, facts)
    return hparams.fitted(ctx.adapter.num_layers)


def _module_inputs(ctx: EditingContext, module: str, rows: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The FFN inputs of ``module`` for right-padded ``rows``: ([B, T, d] fp32, mask [B, T])."""
    device = next(ctx.model.parameters()).device
    ids, mask = batch_rows(rows, pad_id_of(ctx.tokenizer), device)
    inputs, _ = capture_io(ctx.model, [module], (), module, ids, mask)  # stops once ``module`` has run
    return inputs[module].float(), mask


def memory_inputs(ctx: EditingContext, module: str, count: int) -> torch.Tensor:
    """FFN inputs at ``module`` for every token of ``count`` rows of the shipped corpus
    ([M, d], fp32), cached per context (the memory set is fixed, so it is read once).

    They are read through the model as it is when first asked: a later weight edit below the
    layer shifts them slightly; the memory loss only needs typical inputs, not exact ones."""
    if count == 0:
        return torch.zeros(0, ctx.adapter.hidden_size)

    def build() -> torch.Tensor:
        text = (resources.files("editserve.editing") / "data" / "stats_corpus.txt").read_text()
        ids = ctx.tokenizer(text[: count * MEMORY_ROW_TOKENS * 8], add_special_tokens=False)["input_ids"]
        rows = [tuple(ids[i:i + MEMORY_ROW_TOKENS]) for i in range(0, len(ids), MEMORY_ROW_TOKENS)]
        rows = [r for r in rows if len(r) == MEMORY_ROW_TOKENS][:count]
        inputs = []
        for start in range(0, len(rows), 32):
            x, m = _module_inputs(ctx, module, rows[start:start + 32])
            inputs.append(x[m.bool()])
        return torch.cat(inputs)

    return ctx.memo(("t_patcher_memory", module, count), build)


def _initial_bank(edit_x: torch.Tensor, memory: torch.Tensor, hparams: TPatcherHyperParams,
                  generator: torch.Generator) -> NeuronBank:
    """The paper's start (``fire_at = "last"``): k points from the memory's mean input to the
    edit's, scaled so the activation is ``activation_margin + 1`` there and zero at the mean;
    the value is zero, so the patch begins as a no-op and the edit loss grows it."""
    n = hparams.neurons_per_fact
    anchor = memory.mean(0) if len(memory) else torch.zeros_like(edit_x)
    direction = edit_x - anchor
    key = direction / direction.pow(2).sum().clamp_min(1e-12) * (hparams.activation_margin + 1.0)
    keys = key.expand(n, -1).clone()
    if n > 1:  # identical neurons would get identical gradients forever
        keys += torch.randn(keys.shape, generator=generator) * key.norm() * 0.01
    biases = -(keys @ anchor)
    return NeuronBank(keys, biases, torch.zeros_like(keys))


def _train_at_prediction(ctx: EditingContext, module: str, fact: Fact, templates: list[str], memory: torch.Tensor,
                hparams: TPatcherHyperParams, made: list[NeuronBank], generator: torch.Generator,
                should_stop: StopCheck | None = None) -> tuple[NeuronBank, dict]:
    started = time.perf_counter()
    memory = torch.cat([memory, _negative_inputs(ctx, module, fact, hparams.negatives, generator)])
    spec = fact_rows(ctx.tokenizer, fact, templates, kl_prompt=None)
    rows = [ids for ids, _subject_last in spec.rows]
    n_target = len(spec.targets)
    device = next(ctx.model.parameters()).device
    ids, mask = batch_rows(rows, pad_id_of(ctx.tokenizer), device)
    # positions that predict target token j: len(row) - n_target + j
    row_index = torch.tensor([r for r, ids_r in enumerate(rows) for _ in range(n_target)], device=device)
    col_index = torch.tensor([len(ids_r) - n_target + j for ids_r in rows for j in range(n_target)], device=device)
    labels = torch.tensor(list(spec.targets) * len(rows), device=device)

    fixed = [RuntimeLayer(LAYER_TYPE, {"keys": b.keys, "biases": b.biases, "values": b.values}, {"module": module})
             for b in made]
    with preview_neurons(ctx.model, fixed):
        x, _ = _module_inputs(ctx, module, rows)
    edit_x = x[row_index, col_index]  # [rows * n_target, d]
    bank = _initial_bank(edit_x[::n_target].mean(0), memory, hparams, generator)
    params = [bank.keys.clone().requires_grad_(True), bank.biases.clone().requires_grad_(True),
              bank.values.clone().requires_grad_(True)]
    # Adam moves every coordinate by about its learning rate per step. The value starts at
    # zero and has to grow to the size of a residual change: ``value_learning_rate``. The
    # key's coordinates are tiny (the key maps an input of norm ~|x| to an activation of ~1),
    # so an absolute rate would scramble it in a step: key and bias move by
    # ``learning_rate`` *relative* to their initial size instead.
    key_scale = float(bank.keys.abs().mean().clamp_min(1e-12))
    bias_scale = float(bank.biases.abs().mean().clamp_min(hparams.activation_margin + 1.0))
    optimiser = torch.optim.Adam([{"params": [params[0]], "lr": hparams.learning_rate * key_scale},
                                  {"params": [params[1]], "lr": hparams.learning_rate * bias_scale},
                                  {"params": [params[2]], "lr": hparams.value_learning_rate}])
    state = {"bank": bank}
    trace = Trace(ctx.model, module, retain_output=False, retain_input=True, detach=True)
    trace.edit_output = lambda out, _name: out + state["bank"](trace.input)
    nll = act_loss = mem_loss = torch.tensor(0.0)
    taken = 0
    with torch.enable_grad(), preview_neurons(ctx.model, fixed), trace:
        for step in range(1, hparams.steps + 1):
            check_stop(should_stop, "T-Patcher")
            taken = step
            # The edit loss trains the value only: if it could move the key and bias too, it
            # would widen where the neuron fires (more firing, more effect) against the memory
            # hinge. Key and bias are trained by the two hinges alone, a linear separation of
            # the edit's inputs from the memory's, which a neuron in d dimensions can reach.
            state["bank"] = NeuronBank(params[0].detach(), params[1].detach(), params[2])
            full = NeuronBank(*params)
            logits = _logits_at(ctx.model, ids, mask, row_index, col_index).float()
            nll = torch.nn.functional.cross_entropy(logits, labels)
            act = full.activations(edit_x)
            act_loss = torch.relu(hparams.activation_margin - act).mean()
            mem_act = full.activations(memory)
            mem_loss = torch.relu(mem_act - hparams.memory_margin).mean() if len(memory) else torch.tensor(0.0)
            silent = not len(memory) or bool((mem_act <= 0).all())  # ReLU makes it exactly zero there
            if nll.item() < hparams.early_stop_loss and act_loss.item() == 0 and silent:
                break
            loss = nll + hparams.activation_weight * act_loss + hparams.memory_weight * mem_loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    result = NeuronBank(*(p.detach().clone() for p in params))
    if not all(bool(torch.isfinite(t).all()) for t in (result.keys, result.biases, result.values)):
        raise PreconditionFailed("T-Patcher's optimisation diverged (NaN or inf); the model is unchanged")
    memory_firing = float((result.activations(memory) > 0).float().mean()) if len(memory) else 0.0
    return result, {"steps": taken, "final_nll": nll.item(), "activation_loss": act_loss.item(),
                    "memory_loss": mem_loss.item(), "memory_firing_rate": memory_firing,
                    "seconds": time.perf_counter() - started}


def _whitened_start(edit_x: torch.Tensor, negatives: torch.Tensor, hparams: TPatcherHyperParams,
                    generator: torch.Generator) -> NeuronBank:
    """Key and bias from a linear discriminant: k ~ S^-1 (e - mu) for the edit's mean input e
    and the negatives' mean mu and covariance S (ridge 1e-2 of its mean variance), scaled so
    the activation is ``activation_margin + 1`` at e and ``-(activation_margin + 1)`` at mu.

    Why whitened: FFN inputs share a few large common directions; the plain difference e - mu
    is dominated by them, so neighbours that share them (same relation, similar entities)
    would fire too. S^-1 turns the key toward what only this input has (the direction a
    Mahalanobis distance would use), which is what separates one subject from similar ones."""
    n = hparams.neurons_per_fact
    margin = hparams.activation_margin + 1.0
    mu = negatives.mean(0)
    centred = (negatives - mu).double()
    cov = centred.T @ centred / max(len(negatives) - 1, 1)
    cov += 1e-2 * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(cov.shape[0], dtype=cov.dtype)
    w = torch.linalg.solve(cov, (edit_x - mu).double()).float()
    reach = float(w @ (edit_x - mu))
    if not reach > 0:  # the edit's input sits at the negatives' mean: nothing to separate on
        raise PreconditionFailed("T-Patcher cannot separate the fact's input from the negatives")
    key = w * (2 * margin / reach)
    keys = key.expand(n, -1).clone()
    if n > 1:  # identical neurons would get identical gradients forever
        keys += torch.randn(keys.shape, generator=generator) * key.norm() * 0.01
    biases = -(keys @ mu) - margin
    return NeuronBank(keys, biases, torch.zeros_like(keys))


def _fit_key(bank: NeuronBank, edit_x: torch.Tensor, negatives: torch.Tensor, hparams: TPatcherHyperParams,
             should_stop: StopCheck | None) -> tuple[NeuronBank, dict]:
    """Key and bias trained by the activation and memory hinges alone (the inputs are fixed,
    so no model pass runs here): fire >= ``activation_margin`` on every edit input, stay
    <= ``memory_margin`` on every negative. Adam steps relative to the initial sizes, as in
    :func:`_train_at_prediction`."""
    keys = bank.keys.clone().requires_grad_(True)
    biases = bank.biases.clone().requires_grad_(True)
    key_scale = float(bank.keys.abs().mean().clamp_min(1e-12))
    bias_scale = float(bank.biases.abs().mean().clamp_min(hparams.activation_margin + 1.0))
    optimiser = torch.optim.Adam([{"params": [keys], "lr": hparams.learning_rate * key_scale},
                                  {"params": [biases], "lr": hparams.learning_rate * bias_scale}])
    act_loss = mem_loss = torch.tensor(0.0)
    taken = 0
    with torch.enable_grad():
        for step in range(1, hparams.key_steps + 1):
            check_stop(should_stop, "T-Patcher")
            act = edit_x @ keys.T + biases
            mem = negatives @ keys.T + biases
            act_loss = torch.relu(hparams.activation_margin - act).mean()
            mem_loss = torch.relu(mem - hparams.memory_margin).mean()
            if act_loss.item() == 0 and mem_loss.item() == 0:
                break
            taken = step
            optimiser.zero_grad(set_to_none=True)
            (hparams.activation_weight * act_loss + hparams.memory_weight * mem_loss).backward()
            optimiser.step()
    fitted = NeuronBank(keys.detach().clone(), biases.detach().clone(), bank.values)
    return fitted, {"key_steps": taken, "activation_loss": act_loss.item(), "memory_loss": mem_loss.item()}


def _train_at_subject(ctx: EditingContext, module: str, fact: Fact, templates: list[str], memory: torch.Tensor,
                      hparams: TPatcherHyperParams, made: list[NeuronBank], generator: torch.Generator,
                      should_stop: StopCheck | None = None, patched: list[tuple[str, str]] = ()
                      ) -> tuple[NeuronBank, dict]:
    """A neuron that fires at the subject's last token (``fire_at = "subject"``).

    A middle layer's FFN input at the subject's last token is where a transformer looks a
    subject up (ROME's finding), so a neuron keyed there fires for this subject in any
    wording and not for other subjects in the same wording, which is the locality
    CounterFact's neighbourhood prompts test. Its value is what ROME would write there: the
    change of the MLP output at the subject that makes the target likely (v* - W k*,
    optimised as ROME's is: NLL behind the context prefixes, KL on the subject's essence, norm
    decay and clamp, with T-Patcher's own settings for them), divided by the neuron's
    activation on the edit's bare prompt (as ROME anchors its update at the plain key). Key
    and bias come first, from the hinges alone; the value needs one ROME value optimisation.
    No base weight changes.

    ``patched``: (subject, prompt) of the facts already patched into this layer; with
    ``avoid_patched`` their prompts join the negatives, so this neuron does not fire where an
    earlier one answers (an earlier neuron cannot learn about facts that came after it, and
    without this a later neuron for a similar subject adds its value to the earlier fact's
    prompt; measured in docs/RUNTIME_EDITS.md)."""
    started = time.perf_counter()
    fixed = [RuntimeLayer(LAYER_TYPE, {"keys": b.keys, "biases": b.biases, "values": b.values}, {"module": module})
             for b in made]
    parts = [memory, _negative_inputs(ctx, module, fact, hparams.negatives, generator, every_token=True)]
    if hparams.avoid_patched:
        parts.append(_patched_inputs(ctx, module, fact, list(patched)))
    negatives = torch.cat(parts)
    value_hp = RomeHyperParams(steps=hparams.steps, lr=hparams.value_learning_rate, kl_factor=hparams.kl_factor,
                               weight_decay=hparams.weight_decay, clamp_norm_factor=hparams.clamp_norm_factor,
                               early_stop_loss=hparams.early_stop_loss)
    spec = fact_rows(ctx.tokenizer, fact, templates, kl_prompt=None)
    rows = [ids for ids, _subject_last in spec.rows]
    with preview_neurons(ctx.model, fixed):
        x, _ = _module_inputs(ctx, module, rows)
    edit_x = x[torch.arange(len(rows)), torch.tensor([s for _ids, s in spec.rows])]  # [rows, d]
    # The whitening reads at most WHITEN_ROWS negatives (an even subset past that): its
    # covariance costs rows x d^2, which thousands of patched prompts would make seconds per
    # edit; the hinge fit below still keeps silent on every one of them.
    stride = max(1, -(-len(negatives) // WHITEN_ROWS))
    bank = _whitened_start(edit_x.mean(0), negatives[::stride], hparams, generator)
    bank, key_info = _fit_key(bank, edit_x, negatives, hparams, should_stop)
    with preview_neurons(ctx.model, fixed):
        values = compute_value_deltas(ctx.model, ctx.tokenizer, module, ctx.adapter.hidden_size, [fact], templates,
                                      value_hp, label="T-Patcher value optimisation", should_stop=should_stop)
    fires = torch.relu(bank.activations(edit_x))  # [rows, n]
    # Scaled at the bare prompt (row 0, template "{}"), as ROME anchors its update at the plain
    # key: the fact as asked gets exactly the optimised change; context rows get it in proportion.
    total = float(fires[0].sum())
    if not total > 0:
        raise PreconditionFailed("T-Patcher's neuron does not fire on the fact's own prompt")
    result = NeuronBank(bank.keys, bank.biases, (values.deltas[0] / total).expand(bank.size, -1).clone())
    if not all(bool(torch.isfinite(t).all()) for t in (result.keys, result.biases, result.values)):
        raise PreconditionFailed("T-Patcher's optimisation diverged (NaN or inf); the model is unchanged")
    value_info = values.info[0]
    return result, {"steps": value_info["steps"], "final_nll": value_info["final_nll"], **key_info,
                    "memory_firing_rate": float((result.activations(negatives) > 0).float().mean()),
                    "edit_firing_rate": float((fires.amax(1) > 0).float().mean()),
                    "patched_negatives": len(negatives) - len(parts[0]) - len(parts[1]),
                    "seconds": time.perf_counter() - started}


def _train_fact(ctx: EditingContext, module: str, fact: Fact, templates: list[str], memory: torch.Tensor,
                hparams: TPatcherHyperParams, made: list[NeuronBank], generator: torch.Generator,
                should_stop: StopCheck | None, patched: list[tuple[str, str]]) -> tuple[NeuronBank, dict]:
    if hparams.fire_at == "subject":
        return _train_at_subject(ctx, module, fact, templates, memory, hparams, made, generator, should_stop, patched)
    return _train_at_prediction(ctx, module, fact, templates, memory, hparams, made, generator, should_stop)


def compute_tpatcher(ctx: EditingContext, facts: list[Fact], hparams: TPatcherHyperParams, *,
                     should_stop: StopCheck | None = None) -> tuple[RuntimeLayer, dict]:
    """The T-Patcher edit of ``facts``: one runtime layer of neurons in ``hparams.layer``'s FFN,
    plus diagnostics. Raises InvalidRequest for a malformed request (before any compute), and
    Cancelled once ``should_stop()`` is true (checked before every step)."""
    started = time.perf_counter()
    hparams = _check_request(ctx, facts, hparams)
    module = ctx.adapter.mlp(hparams.layer)
    templates = ctx.context_templates(hparams.context_count, hparams.context_length)
    memory = memory_inputs(ctx, module, hparams.memory_rows)
    prepared = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    made: list[NeuronBank] = []
    infos = []
    patched = list(ctx.neuron_prompts(module))  # the active edits' facts in this layer
    for fact in facts:
        bank, info = _train_fact(ctx, module, fact, templates, memory, hparams, made, generator, should_stop, patched)
        made.append(bank)
        infos.append(info)
        patched.append((fact.subject, fact.text))
    total = NeuronBank.concat(made)
    artifact = RuntimeLayer(LAYER_TYPE, {"keys": total.keys, "biases": total.biases, "values": total.values},
                            {"module": module, "layer": hparams.layer, "facts": len(facts),
                             "neurons_per_fact": hparams.neurons_per_fact, "activation": "relu",
                             "prompts": [[f.subject, f.text] for f in facts]})
    diagnostics = {
        "method": "t_patcher",
        "hparams_version": hparams.version,
        "layers": [hparams.layer],
        "facts_count": len(facts),
        "steps": [f["steps"] for f in infos],
        "final_loss": [f["final_nll"] for f in infos],
        "facts": infos,
        "timings": {"prepare_s": prepared, "total_s": time.perf_counter() - started},
        "hparams": hparams.as_dict(),
    }
    return artifact, diagnostics
