"""Where T-Patcher neurons fire on each other's facts: for every fact patched by the active
``ffn_neurons`` edits of a state directory, how many *other* facts' neurons fire somewhere on
its rewrite prompt (at any token, in the patched layer), subjects equal to its own excepted.

A neuron firing on another fact's prompt adds its own value there: the failure that makes
reliability fall as sequential T-Patcher edits accumulate (docs/RUNTIME_EDITS.md). Run it on
the state directory of an ``editserve eval --method t_patcher --sequential --state-dir DIR``
run (in-process state: journal + artifacts; ``--all-edits``, since the run reverts its edits
at the end); it reads the journal read-only and loads the artifact files; it needs artifacts made since ``t_patcher-*-3`` (they list their
facts' prompts).

    .venv/bin/python bench/tpatcher_crossfire.py --state-dir ~/runs/tp_seq250_state --all-edits
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def edit_artifacts(state_dir: Path, every: bool) -> list[Path]:
    """Artifact files of the active edits (``every``: of all edits, reverted ones too, as an
    eval run leaves them), in the order they were applied (read-only SQL on the journal: this
    tool must not open it for writing beside a server)."""
    db = sqlite3.connect(f"file:{state_dir / 'journal.sqlite3'}?mode=ro", uri=True)
    where = "" if every else "WHERE status = 'active' "
    try:
        rows = db.execute(f"SELECT artifact FROM edits {where}ORDER BY applied_revision").fetchall()
    finally:
        db.close()
    return [state_dir / "artifacts" / name for (name,) in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--all-edits", action="store_true",
                        help="every edit of the journal, reverted ones too (an eval run reverts its edits at the end)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from editserve.editing.artifacts import load_artifact
    from editserve.editing.context import EditingContext
    from editserve.editing.neurons import LAYER_TYPE, bank_of
    from editserve.editing.tpatcher import _module_inputs
    from editserve.server.models import default_cache_dir, load_model

    layers = [a for a in (load_artifact(p) for p in edit_artifacts(args.state_dir, args.all_edits))
              if getattr(a, "layer_type", None) == LAYER_TYPE]
    facts = [(layer, i, subject, text) for layer in layers for i, (subject, text) in enumerate(layer.info.get("prompts") or [])]
    if not facts:
        raise SystemExit("no active T-Patcher facts with recorded prompts in this state directory")
    model, tokenizer, _ = load_model(args.model, cache_dir=default_cache_dir())
    ctx = EditingContext(model, tokenizer, progress=False)
    module = layers[0].info["module"]
    per_fact = layers[0].info.get("neurons_per_fact", 1)
    keys = torch.cat([bank_of(layer).keys for layer in layers])
    biases = torch.cat([bank_of(layer).biases for layer in layers])
    owner = [subject.casefold() for _layer, _i, subject, _text in facts for _ in range(per_fact)]
    later_counts, earlier_counts = [], []  # per prompt: firing neurons made after / before its own
    for start in range(0, len(facts), 32):
        chunk = facts[start:start + 32]
        x, mask = _module_inputs(ctx, module, [tuple(tokenizer(text).input_ids) for *_rest, text in chunk])
        fired = ((x @ keys.T + biases) > 0) & mask.bool()[..., None]  # [B, T, n]
        any_token = fired.any(1)  # [B, n]
        for row, (_layer, _i, subject, _text) in enumerate(chunk):
            own = (start + row) * per_fact
            others = [j for j in any_token[row].nonzero().flatten().tolist() if owner[j] != subject.casefold()]
            later_counts.append(sum(1 for j in others if j >= own))
            earlier_counts.append(sum(1 for j in others if j < own))
    print(f"{len(facts)} patched facts in {module}; neurons of other subjects fire somewhere on their prompts:")
    for label, counts in (("made later (what avoid_patched prevents)", later_counts),
                          ("made earlier (the fact's own value was optimised with them firing)", earlier_counts)):
        hit = sum(1 for c in counts if c)
        print(f"  {label}: on {hit} prompts ({hit / len(facts):.1%}), {sum(counts)} firings, "
              f"at most {max(counts)} on one prompt")


if __name__ == "__main__":
    main()
