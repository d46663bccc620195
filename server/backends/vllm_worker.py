"""Runs inside every vLLM worker process: receives edited tensors and loads them into the model.

vLLM instantiates this class as a mix-in of its worker (``worker_extension_cls``), so its
methods are reachable from the server through ``collective_rpc`` and ``self`` is the worker.
It imports nothing of editserve beyond this file and :mod:`editserve.editing.neurons` (torch
only): the worker process is spawned by vLLM and should not pay for (or depend on) the
server's imports.

Tensors travel as a safetensors file the server writes (in /dev/shm where there is one) and
names in the RPC: no pickle, dtype and shape kept, and the RPC, which the engine core serves
between two steps, carries a path instead of megabytes (a 7 MB payload through the RPC took
~35 ms of transport on a 2-core CPU; read from the page cache it takes ~3). Workers on
another host (multi-node tensor parallelism) would need the bytes instead.

Why ``reload_weights`` and not ``param.data.copy_``: on CPU vLLM repacks linear weights into
oneDNN handles after loading (``layer.weight`` is empty), and on GPU a quantised or fused
layout may differ from the checkpoint's. ``reload_weights(is_checkpoint_format=True)`` runs the
model's own ``load_weights`` on checkpoint-named tensors, so whatever vLLM does at start-up
(fusing q/k/v and gate/up, splitting for tensor parallelism, repacking) happens again.
"""

from __future__ import annotations

import json
import logging
import time

# A payload's metadata under this key lists the MLP modules that carry T-Patcher neurons after
# the commit (JSON); its tensors "<module>::keys" / "::biases" / "::values" are their banks.
# Without the key the neurons stay as they are (a weight-only commit).
NEURONS_KEY = "editserve.neurons"
NEURON_SEP = "::"


def neuron_tensor_name(module: str, part: str) -> str:
    """The payload name of one part ("keys", "biases", "values") of ``module``'s neuron bank."""
    return f"{module}{NEURON_SEP}{part}"


class EditserveWorkerExtension:
    """Methods vLLM adds to each worker (the name is what ``worker_extension_cls`` points at)."""

    def editserve_packed_modules(self) -> dict[str, list[str]]:
        """Which checkpoint modules vLLM fuses into one (``qkv_proj`` <- q/k/v, ``gate_up_proj``
        <- gate/up): the server sends every member of a fused group together."""
        model = self.model_runner.get_model()
        mapping = getattr(model, "packed_modules_mapping", None) or {}
        return {str(k): [str(x) for x in v] for k, v in mapping.items()}

    def editserve_load(self, path: str) -> float:
        """Load checkpoint-named tensors (a safetensors file) into the model, and replace the
        T-Patcher neurons when the file carries them (:data:`NEURONS_KEY`); seconds taken.

        This is vLLM's ``reload_weights(is_checkpoint_format=True)`` restricted to the modules
        that own the tensors: vLLM's version prepares and restores every layer of the model
        (~200 ms on a 2-core CPU for a 30-layer model), this one only the touched ones (the
        rest is the same code: a touched layer is rebuilt from the loaded tensors and
        processed as at start-up, then copied into its original storage)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        started = time.perf_counter()
        tensors = load_file(path)
        with safe_open(path, framework="pt") as opened:
            metadata = opened.metadata() or {}
        model = self.model_runner.get_model()
        if NEURONS_KEY in metadata:
            self._editserve_set_neurons(model, json.loads(metadata[NEURONS_KEY]), tensors)
        tensors = {name: t for name, t in tensors.items() if NEURON_SEP not in name}
        if tensors:
            self._editserve_reload(model, tensors)
        return time.perf_counter() - started

    def _editserve_reload(self, model, tensors: dict) -> None:
        """Load checkpoint-named ``tensors`` into the modules owning them (see editserve_load)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        owners = sorted({name.rsplit(".", 2)[0] for name in tensors})  # "model.layers.3.mlp"
        modules = [model.get_submodule(owner) for owner in owners]
        quiet = logging.getLogger("vllm.model_executor.model_loader.reload")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # untouched sub-layers "failed to load": expected, they keep their tensors
        try:
            with set_current_vllm_config(self.vllm_config):
                for module in modules:
                    initialize_layerwise_reload(module)
                model.load_weights(list(tensors.items()))
                for module in modules:
                    finalize_layerwise_reload(module, self.vllm_config.model_config)
        finally:
            quiet.setLevel(level)

    def _editserve_set_neurons(self, model, modules: list[str], tensors: dict) -> None:
        """Make ``modules`` (and only they) carry the banks in ``tensors``: T-Patcher's neurons.

        One forward hook per MLP ever patched, installed on first use, reads the current bank
        from a dict on every call, so a later commit swaps banks (or empties one) without
        touching hooks. This needs an eager model (``vllm_enforce_eager``, the default): a
        compiled or graph-captured forward would not run Python hooks. The MLP's output is the
        full hidden state on every tensor-parallel rank (its down projection all-reduces), and
        each rank adds the same neurons to it."""
        from editserve.editing import neurons

        device = next(model.parameters()).device
        banks = {module: neurons.NeuronBank(*(tensors[neuron_tensor_name(module, part)].to(device)
                                              for part in ("keys", "biases", "values")))
                 for module in modules}
        hooks = self.__dict__.setdefault("_editserve_neuron_hooks", {})
        current = self.__dict__.setdefault("_editserve_banks", {})
        for module in banks.keys() - hooks.keys():
            hooks[module] = model.get_submodule(module).register_forward_hook(
                neurons.adder(lambda module=module: current.get(module)))
        current.clear()  # the engine's scheduler is paused: no forward pass reads it meanwhile
        current.update(banks)
