"""Runs inside every vLLM worker process: receives edited tensors and loads them into the model.

vLLM instantiates this class as a mix-in of its worker (``worker_extension_cls``), so its
methods are reachable from the server through ``collective_rpc`` and ``self`` is the worker.
It imports nothing of editserve beyond this file: the worker process is spawned by vLLM and
should not pay for (or depend on) the server's imports.

Tensors travel as safetensors bytes, not pickles and not Python lists: collective_rpc's
msgpack serialisation carries bytes as they are, and safetensors keeps dtype and shape.

Why ``reload_weights`` and not ``param.data.copy_``: on CPU vLLM repacks linear weights into
oneDNN handles after loading (``layer.weight`` is empty), and on GPU a quantised or fused
layout may differ from the checkpoint's. ``reload_weights(is_checkpoint_format=True)`` runs the
model's own ``load_weights`` on checkpoint-named tensors, so whatever vLLM does at start-up
(fusing q/k/v and gate/up, splitting for tensor parallelism, repacking) happens again.
"""

from __future__ import annotations

import time


class EditserveWorkerExtension:
    """Methods vLLM adds to each worker (the name is what ``worker_extension_cls`` points at)."""

    def editserve_packed_modules(self) -> dict[str, list[str]]:
        """Which checkpoint modules vLLM fuses into one (``qkv_proj`` <- q/k/v, ``gate_up_proj``
        <- gate/up): the server sends every member of a fused group together."""
        model = self.model_runner.get_model()
        mapping = getattr(model, "packed_modules_mapping", None) or {}
        return {str(k): [str(x) for x in v] for k, v in mapping.items()}

    def editserve_load(self, payload: bytes) -> float:
        """Load checkpoint-named tensors (a safetensors blob) into the model; seconds taken."""
        from safetensors.torch import load

        started = time.perf_counter()
        tensors = load(payload)
        self.reload_weights(weights_iterator=list(tensors.items()), is_checkpoint_format=True)
        return time.perf_counter() - started
