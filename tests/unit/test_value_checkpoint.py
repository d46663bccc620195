"""A long target optimisation resumes from its finished chunks, and only from matching ones."""

from __future__ import annotations

import torch

from editserve.editing.context import EditingContext
from editserve.editing.memit import compute_memit
from editserve.editing.value_checkpoint import ValueCheckpoint
from editserve.editing.values import compute_value_deltas
from tests.unit.rome_helpers import learnable_model
from tests.unit.test_memit import FACTS, tiny_memit

torch.set_num_threads(1)


def _setup(tiny_tokenizer, tmp_path):
    model, adapter = learnable_model("llama", tiny_tokenizer, edit_layer=2)
    ctx = EditingContext(model, tiny_tokenizer, adapter, tmp_path / "stats", progress=False)
    hp = tiny_memit(model, steps=6, early_stop_loss=0.0, batch_facts=2)
    return model, adapter, ctx, hp, ctx.context_templates(hp.context_count, hp.context_length)


def test_a_stopped_run_resumes_with_the_same_values(tiny_tokenizer, tmp_path):
    model, adapter, _ctx, hp, templates = _setup(tiny_tokenizer, tmp_path)
    module = adapter.layer(2)
    checkpoint = ValueCheckpoint(tmp_path / "ck", "tiny-llama")

    first = compute_value_deltas(model, tiny_tokenizer, module, adapter.hidden_size, FACTS, templates, hp,
                                 batch_facts=2, checkpoint=checkpoint)
    chunks = sorted((tmp_path / "ck").glob("chunk-*.safetensors"))
    assert len(chunks) == 2 and len(checkpoint.load()) == len(FACTS)
    assert not any(i.get("resumed") for i in first.info)

    # a process stopped during its second chunk: only the first chunk's file exists
    held_before = checkpoint.load()
    chunks[0].unlink()
    held = checkpoint.load()
    assert 0 < len(held) < len(FACTS)
    second = compute_value_deltas(model, tiny_tokenizer, module, adapter.hidden_size, FACTS, templates, hp,
                                  batch_facts=2, checkpoint=checkpoint)
    resumed = [bool(i.get("resumed")) for i in second.info]
    assert sum(resumed) == len(held) and not all(resumed)
    torch.testing.assert_close(second.deltas, first.deltas, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(second.unedited, first.unedited)
    for key in held_before:
        assert key in checkpoint.load()  # the recomputed chunk was saved again


def test_other_settings_or_model_never_reuse_a_chunk(tiny_tokenizer, tmp_path):
    model, adapter, _ctx, hp, templates = _setup(tiny_tokenizer, tmp_path)
    module = adapter.layer(2)
    compute_value_deltas(model, tiny_tokenizer, module, adapter.hidden_size, FACTS[:2], templates, hp,
                         batch_facts=2, checkpoint=ValueCheckpoint(tmp_path / "ck", "tiny-llama"))
    for checkpoint, hparams in [(ValueCheckpoint(tmp_path / "ck", "tiny-llama"), hp.with_overrides(lr=0.1)),
                                (ValueCheckpoint(tmp_path / "ck", "another-model"), hp)]:
        result = compute_value_deltas(model, tiny_tokenizer, module, adapter.hidden_size, FACTS[:2], templates,
                                      hparams, batch_facts=2, checkpoint=checkpoint)
        assert not any(i.get("resumed") for i in result.info)


def test_memit_with_a_checkpoint_gives_the_same_edit(tiny_tokenizer, tmp_path):
    _model, adapter, ctx, hp, _templates = _setup(tiny_tokenizer, tmp_path)
    checkpoint = ValueCheckpoint(tmp_path / "ck", "tiny-llama")
    plain, _ = compute_memit(ctx, FACTS, hp)
    compute_memit(ctx, FACTS, hp, checkpoint=checkpoint)
    resumed, diagnostics = compute_memit(ctx, FACTS, hp, checkpoint=checkpoint)
    assert all(f.get("resumed") for f in diagnostics["facts"])
    for name in plain.parameter_names:
        torch.testing.assert_close(resumed.delta(name), plain.delta(name), atol=1e-3, rtol=1e-3)
