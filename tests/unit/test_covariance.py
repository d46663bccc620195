"""Key statistics C = E[k k^T]: exact on a small text, cached on disk, precise errors for bad sources."""

from __future__ import annotations

import time

import pytest
import torch

from editserve.editing.context import EditingContext
from editserve.editing.covariance import (
    estimate_second_moments,
    iter_paragraphs,
    iter_rows,
    load_or_estimate,
    resolve_source,
)
from editserve.editing.errors import PreconditionFailed
from editserve.editing.keys import capture_projection_inputs
from tests.tiny import tiny_model

torch.set_num_threads(1)

TEXT = "The capital of France is Paris.\n\nMichael Jordan plays the sport of basketball.\n\n" * 20


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_matches_a_direct_computation(arch, tiny_tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    model, tok = tiny_model(arch, tokenizer=tiny_tokenizer)
    from editserve.editing.adapter import ArchitectureAdapter

    adapter = ArchitectureAdapter.from_model(model)
    source = resolve_source(str(tmp_path))
    (moment, count), = estimate_second_moments(model, tok, adapter, [2], source, 300, seq_len=64,
                                               batch_size=2, progress=False).values()
    assert count == 300
    rows = list(iter_rows(tok, iter_paragraphs(source), 64))
    keys = []
    for row in rows:
        k = capture_projection_inputs(model, adapter, [2], torch.tensor([row]))[2][0]
        keys.append(k)  # tiny tokenizer adds no BOS: every position counts
    keys = torch.cat(keys)[:300].double()
    torch.testing.assert_close(moment.double(), keys.T @ keys / 300, rtol=1e-4, atol=1e-6)
    assert torch.allclose(moment, moment.T)


def test_disk_cache_round_trip(tiny_tokenizer, tmp_path):
    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    ctx = EditingContext(model, tok, cache_dir=tmp_path, progress=False)
    first, info = load_or_estimate(model, tok, ctx.adapter, fingerprint=ctx.fingerprint, cache_dir=tmp_path,
                                   layer=1, source="default", tokens=3000, progress=False)
    assert not info["cached"] and info["tokens"] == 3000
    started = time.perf_counter()
    again, info2 = load_or_estimate(model, tok, ctx.adapter, fingerprint=ctx.fingerprint, cache_dir=tmp_path,
                                    layer=1, source="default", tokens=3000, progress=False)
    assert info2["cached"] and time.perf_counter() - started < 1.0
    assert torch.equal(first, again) and info2["path"] == info["path"]
    # a second context (e.g. after a restart) reads the same file through its fingerprint
    assert torch.equal(EditingContext(model, tok, cache_dir=tmp_path).second_moment(1, "default", 3000), first)
    # the fingerprint ignores MLP weights, which edits change
    with torch.no_grad():
        model.get_parameter(ctx.adapter.mlp_out_weight_name(1)).add_(1.0)
    assert EditingContext(model, tok, cache_dir=tmp_path).fingerprint == ctx.fingerprint
    other, _ = tiny_model("llama", seed=1, tokenizer=tiny_tokenizer)
    assert EditingContext(other, tok, cache_dir=tmp_path).fingerprint != ctx.fingerprint


def test_bad_sources(tmp_path):
    with pytest.raises(PreconditionFailed, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(PreconditionFailed, match="no .txt files"):
        resolve_source(str(tmp_path))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa not utf-8")
    with pytest.raises(PreconditionFailed, match="cannot read"):
        list(iter_paragraphs(resolve_source(str(bad))))
    assert resolve_source("default").tag.startswith("default-")
    assert list(iter_paragraphs(resolve_source("default")))[0].startswith("= ")


def test_model_sampled_source(tiny_tokenizer):
    from editserve.editing.adapter import ArchitectureAdapter

    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    source = resolve_source("model")
    assert source.files == () and source.tag.startswith("model-")
    (moment, count), = estimate_second_moments(model, tok, ArchitectureAdapter.from_model(model), [1], source,
                                               500, seq_len=32, batch_size=4, progress=False).values()
    assert count == 500 and torch.isfinite(moment).all()


def test_several_layers_in_one_pass_equal_one_by_one(tiny_tokenizer, tmp_path):
    """MEMIT's layers are estimated together; each equals its own single-layer estimate, and
    layers already on disk are read, not recomputed."""
    from editserve.editing.covariance import load_or_estimate_layers

    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    ctx = EditingContext(model, tok, cache_dir=tmp_path / "a", progress=False)
    single = {layer: load_or_estimate(model, tok, ctx.adapter, fingerprint=ctx.fingerprint, cache_dir=tmp_path / "b",
                                      layer=layer, source="default", tokens=2000, progress=False)[0]
              for layer in (0, 2)}
    ctx.second_moment(2, "default", 2000)  # layer 2 now on disk in cache "a"
    together = load_or_estimate_layers(model, tok, ctx.adapter, fingerprint=ctx.fingerprint, cache_dir=tmp_path / "a",
                                       layers=[0, 2], source="default", tokens=2000, progress=False)
    assert together[2][1]["cached"] and not together[0][1]["cached"]
    for layer in (0, 2):
        torch.testing.assert_close(together[layer][0], single[layer], rtol=1e-5, atol=1e-6)


def test_a_set_stop_event_abandons_the_estimate(tiny_tokenizer, tmp_path):
    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    ctx = EditingContext(model, tok, cache_dir=tmp_path, progress=False)
    ctx.stop.set()
    with pytest.raises(PreconditionFailed, match="abandoned"):
        ctx.second_moments([0, 1], "default", 2000)
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing half-written is left
