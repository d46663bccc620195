"""The vLLM served state without an engine: what it sends, what it refuses, and the arithmetic
tensor parallelism relies on. (The engine itself is tested end to end in
tests/e2e/test_vllm_backend.py; nothing here imports vLLM.)"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from editserve.editing.artifacts import RuntimeLayer, WeightDelta
from editserve.server.backends.vllm import VLLMHost
from editserve.server.backends.vllm_engine import EngineOptions, VLLMEngine
from editserve.server.backends.vllm_worker import NEURONS_KEY, EditserveWorkerExtension
from editserve.server.host import compose
from editserve.server.methods import unavailable_reason
from editserve.server.state import AnalysisView, ServedState
from tests.tiny import tiny_model

# what vLLM's Llama reports (LlamaForCausalLM.packed_modules_mapping)
LLAMA_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


OPTIONS = EngineOptions(model_dir="unused", dtype="float32", max_model_len=64, max_num_seqs=2,
                        kv_cache_bytes=1 << 20)


def _host(tokenizer, *, neuron_hooks: bool = False, engine: VLLMEngine | None = None) -> VLLMHost:
    model, tok = tiny_model("llama", tokenizer=tokenizer)
    engine = engine or VLLMEngine(OPTIONS, packed_modules=LLAMA_PACKED)
    return VLLMHost(model, tok, name="tiny", dtype="fp32", device="cpu", engine=engine, neuron_hooks=neuron_hooks)


@dataclass
class _RecordingEngine(VLLMEngine):
    """Keeps a copy of every payload a commit would send to the workers (no engine runs here)."""

    keep_in: Path = Path(".")
    sent: list[Path | None] = field(default_factory=list)

    def commit(self, payload: str | None, revision: int) -> float:
        if payload is None:
            self.sent.append(None)
        else:
            self.sent.append(self.keep_in / f"{revision}.safetensors")
            shutil.copyfile(payload, self.sent[-1])
        self.revision = revision
        return 0.0


def _payload(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as opened:
        return {name: opened.get_tensor(name) for name in opened.keys()}, opened.metadata() or {}


def _logits(model, tokenizer, text: str = "the capital of france is") -> torch.Tensor:
    with torch.no_grad():
        return model(tokenizer(text, return_tensors="pt")["input_ids"]).logits


def test_neurons_travel_whole_when_they_change_and_the_worker_serves_them(tiny_tokenizer, tmp_path):
    """An eager engine hosts T-Patcher neurons: a commit that changes the active neurons sends
    every patched MLP's bank, one that does not sends none, and the worker's hooks make its
    model compute what the analysis view computes (a revert empties the bank exactly)."""
    engine = _RecordingEngine(OPTIONS, packed_modules=LLAMA_PACKED, keep_in=tmp_path)
    host = _host(tiny_tokenizer, neuron_hooks=True, engine=engine)
    assert "ffn_neurons" in host.capabilities
    assert unavailable_reason("t_patcher", host.capabilities, host.backend_name) is None
    width = host.model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    patch = RuntimeLayer("ffn_neurons", {"keys": torch.randn(3, width, generator=generator),
                                         "biases": torch.full((3,), 4.0),  # fires on every token
                                         "values": torch.randn(3, width, generator=generator)},
                         {"module": "model.layers.1.mlp", "layer": 1})
    worker_model, _ = tiny_model("llama", tokenizer=tiny_tokenizer)  # the worker's copy
    pristine = _logits(worker_model, tiny_tokenizer)
    worker = EditserveWorkerExtension()
    worker.model_runner = SimpleNamespace(get_model=lambda: worker_model)

    host.apply("n", patch, revision=1)
    tensors, metadata = _payload(engine.sent[-1])
    assert json.loads(metadata[NEURONS_KEY]) == ["model.layers.1.mlp"]
    assert sorted(tensors) == [f"model.layers.1.mlp::{p}" for p in ("biases", "keys", "values")]
    assert torch.equal(tensors["model.layers.1.mlp::keys"], patch.tensors["keys"])
    worker.editserve_load(str(engine.sent[-1]))
    served = _logits(host.model, tiny_tokenizer)
    assert not torch.allclose(served, pristine)
    assert torch.equal(_logits(worker_model, tiny_tokenizer), served)

    host.apply("w", WeightDelta(dense={"model.layers.0.mlp.down_proj.weight": torch.ones(width, 2 * width)}), 2)
    tensors, metadata = _payload(engine.sent[-1])
    assert NEURONS_KEY not in metadata and sorted(tensors) == ["model.layers.0.mlp.down_proj.weight"]
    host.revert("w", revision=3)

    host.revert("n", revision=4)
    tensors, metadata = _payload(engine.sent[-1])
    assert json.loads(metadata[NEURONS_KEY]) == [] and tensors == {}
    worker.editserve_load(str(engine.sent[-1]))
    assert torch.equal(_logits(worker_model, tiny_tokenizer), pristine)


def test_a_fused_member_travels_with_its_group(tiny_tokenizer):
    """vLLM reloads gate/up (and q/k/v) as one layer: sending only the edited member would
    leave the others uninitialised in the worker."""
    host = _host(tiny_tokenizer)
    assert host.engine_names(["model.layers.1.mlp.up_proj.weight"]) == [
        "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert host.engine_names(["model.layers.1.self_attn.k_proj.weight"]) == [
        "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.v_proj.weight"]
    assert host.engine_names(["model.layers.0.mlp.down_proj.weight"]) == ["model.layers.0.mlp.down_proj.weight"]


def test_a_compiled_engine_refuses_neurons_and_names_itself(tiny_tokenizer):
    """With ``vllm_enforce_eager`` off the workers' model runs no Python hooks."""
    host = _host(tiny_tokenizer)
    assert isinstance(host, AnalysisView) and isinstance(host, ServedState)
    assert "ffn_neurons" not in host.capabilities and "routing" in host.capabilities
    reason = unavailable_reason("t_patcher", host.capabilities, host.backend_name)
    assert "the vllm backend lacks" in reason and "ffn_neurons" in reason
    assert unavailable_reason("rome", host.capabilities, host.backend_name) is None
    neurons = RuntimeLayer(layer_type="ffn_neurons", tensors={"keys": torch.zeros(1, 4)}, info={})
    with pytest.raises(ValueError, match="only with vllm_enforce_eager"):
        host.check_delta(neurons)


def test_t_patcher_on_vllm_is_a_failed_precondition(tiny_tokenizer, tmp_path):
    """The Edit RPC maps BackendLacksCapability to FAILED_PRECONDITION (UNIMPLEMENTED stays
    for methods the server does not know)."""
    from editserve.server.edits import BackendLacksCapability, EditManager, MethodUnavailable
    from editserve.server.journal import Journal
    from editserve.server.methods import build_methods
    from editserve.server.metrics import Metrics

    host = _host(tiny_tokenizer)
    table = build_methods(host, tmp_path)
    assert "t_patcher" not in table.compute and "rome" in table.compute
    manager = EditManager(host, Journal(tmp_path / "j", host.fingerprint()), table.compute, table.score, Metrics())
    from editserve.editing.facts import Fact

    fact = Fact("The capital of {} is", "France", "Rome", "Paris")
    with pytest.raises(BackendLacksCapability, match="vllm backend"):
        manager.edit("t_patcher", [fact], {})
    with pytest.raises(MethodUnavailable) as info:
        manager.edit("no_such_method", [fact], {})
    assert not isinstance(info.value, BackendLacksCapability)


def test_row_parallel_shards_of_the_composed_tensor(tiny_tokenizer):
    """Tensor parallelism: a row-parallel projection (down_proj, o_proj) is split by input
    columns, W = [W_0 | W_1 | ...], and rank r computes x_r @ W_r^T before an all-reduce.
    The server sends the full composed tensor and each rank's loader keeps its columns, so
    rank r holds exactly columns r of ``compose(base, deltas)``. For a low-rank delta that is
    ``base_r + U V_r^T``: the same delta with V's rows split, which is what a rank would
    compute if it were sent factors instead (one product per element at rank 1: same bits)."""
    host = _host(tiny_tokenizer)
    name = "model.layers.0.mlp.down_proj.weight"
    base = host.model.get_parameter(name).detach()
    out_features, in_features = base.shape
    torch.manual_seed(0)
    u, v = torch.randn(out_features, 1), torch.randn(in_features, 1)
    delta = WeightDelta(factors={name: (u, v)})
    full = compose(base, [delta], name)
    for shard in torch.arange(in_features).chunk(2):
        sliced = WeightDelta(factors={name: (u, v[shard])})
        assert torch.equal(full[:, shard], compose(base[:, shard].contiguous(), [sliced], name))
    # and the sharded matmuls add up to the full one (what the all-reduce computes)
    x = torch.randn(3, in_features)
    parts = sum(x[:, s] @ full[:, s].T for s in torch.arange(in_features).chunk(2))
    torch.testing.assert_close(parts, x @ full.T)


def _output(token_ids, *, finished=False, finish_reason=None, logprob=-0.5):
    """A vLLM RequestOutput as the engine hands it over (DELTA kind): only what _Stream reads."""
    from types import SimpleNamespace

    logprobs = [{t: SimpleNamespace(logprob=logprob)} for t in token_ids]
    completion = SimpleNamespace(token_ids=list(token_ids), logprobs=logprobs, finish_reason=finish_reason)
    return SimpleNamespace(outputs=[completion], finished=finished)


def _stream(tokenizer, **params):
    import time as _time

    from editserve.server.backends.base import GenerationParams, RequestHandle
    from editserve.server.backends.hf import EngineObserver
    from editserve.server.backends.vllm import _Stream
    from editserve.server.detokenize import IncrementalText

    p = GenerationParams(**params)
    engine = VLLMEngine(EngineOptions(model_dir="unused", dtype="float32", max_model_len=64, max_num_seqs=2,
                                      kv_cache_bytes=1 << 20), revision=7)
    prompt = tokenizer("hello").input_ids
    return _Stream(handle=RequestHandle(), params=p, prompt_ids=prompt, text=IncrementalText(tokenizer, prompt, p.stop),
                   eos={0}, observer=EngineObserver(), engine=engine, submitted_at=_time.perf_counter())


def _events(stream):
    out = []
    while not stream.handle.events.empty():
        out.append(stream.handle.events.get())
    return out


def test_vllm_deltas_become_the_hf_backends_events(tiny_tokenizer):
    """One Tokens event per token with the revision it was produced at, the end-of-sequence
    token decided here and not emitted, the last event a Finished."""
    from editserve.server.backends.base import Finished, FinishReason, Tokens

    ids = tiny_tokenizer("a b c").input_ids
    stream = _stream(tiny_tokenizer, max_new_tokens=10, return_logprobs=True)
    assert stream.on_output(_output(ids[:2]), 3)
    assert not stream.on_output(_output([ids[2], 0]), 4)  # 0 is end-of-sequence
    events = _events(stream)
    tokens = [e for e in events if isinstance(e, Tokens)]
    assert [t.token_ids[0] for t in tokens] == ids[:3]
    assert [t.revision for t in tokens] == [3, 3, 4] and tokens[0].first and not tokens[1].first
    assert all(t.logprobs == [-0.5] for t in tokens)
    assert isinstance(events[-1], Finished) and events[-1].reason == FinishReason.STOP
    assert (events[-1].stop_reason, events[-1].generated_tokens, events[-1].revision) == ("eos", 3, 4)
    stream.on_end(None, False)  # the engine lets go of it afterwards: nothing more is emitted
    assert _events(stream) == []


def test_length_stop_strings_and_cancel(tiny_tokenizer):
    from editserve.server.backends.base import Failed, Finished, FinishReason

    ids = tiny_tokenizer("a b c").input_ids
    done = _stream(tiny_tokenizer, max_new_tokens=2)
    assert not done.on_output(_output(ids[:2], finished=True, finish_reason="length"), 1)
    assert _events(done)[-1].reason == FinishReason.LENGTH
    stop = _stream(tiny_tokenizer, max_new_tokens=10, stop=("b",))
    assert not stop.on_output(_output(ids), 1)  # the stop string ends it: the engine is told to abort
    last = _events(stop)[-1]
    assert isinstance(last, Finished) and (last.reason, last.stop_reason) == (FinishReason.STOP, "b")
    cancelled = _stream(tiny_tokenizer, max_new_tokens=10)
    cancelled.on_end(None, True)
    last = _events(cancelled)[-1]
    assert last.reason == FinishReason.CANCELLED and last.revision == 7  # the engine's revision then
    failed = _stream(tiny_tokenizer, max_new_tokens=10)
    failed.on_end(RuntimeError("engine died"), False)
    assert isinstance(_events(failed)[-1], Failed)
