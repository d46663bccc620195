"""Per-model caches for editing: context templates, key statistics and their factorisation.

One :class:`EditingContext` lives as long as the served model (the server keeps one; a
notebook makes one). It holds no model state of its own: everything in it can be rebuilt,
and the covariance statistics also persist on disk under ``cache_dir`` keyed by the model's
:attr:`fingerprint`. Thread-safe: concurrent edits share one computation per key.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import torch

from .adapter import ArchitectureAdapter
from .contexts import generate_context_templates
from .covariance import load_or_estimate_layers
from .errors import StopCheck


class EditingContext:
    def __init__(self, model, tokenizer, adapter: ArchitectureAdapter | None = None,
                 cache_dir: Path | str | None = None, *, progress: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = adapter or ArchitectureAdapter.from_model(model)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.progress = progress
        self._lock = threading.Lock()
        self.stop = threading.Event()  # set to abandon a running statistics estimate (shutdown)
        self._templates: dict[tuple[int, int, int], list[str]] = {}
        self._moments: dict[tuple[int, str, int], torch.Tensor] = {}
        self._factors: dict[tuple[int, str, int], torch.Tensor] = {}
        self.last_stats_info: dict = {}
        self._memo: dict[tuple, object] = {}
        # builds SERAC's sentence encoder on first use (a server passes its host's, to share one)
        self.encoder_factory = None
        # keys [d_in, m] that the served model's active edits wrote into a parameter, by
        # parameter name (None: none); a server passes its host's, for ``preserve``
        self.preserved_keys: Callable[[str], torch.Tensor | None] = lambda _name: None
        # (subject, prompt) of the facts the served model's active T-Patcher edits patched
        # into an MLP module; a server passes its host's, so a new neuron stays silent on them
        self.neuron_prompts: Callable[[str], list[tuple[str, str]]] = lambda _module: []
        self._projectors: dict[tuple[int, str, int, float], torch.Tensor] = {}

    def memo(self, key: tuple, build):
        """``build()``'s value, computed once per key for this context (e.g. a method's fixed
        memory set read through the model)."""
        with self._lock:
            if key not in self._memo:
                self._memo[key] = build()
            return self._memo[key]

    @cached_property
    def fingerprint(self) -> str:
        """Hash of the config and a sample of weights edits never touch (embeddings, the first
        attention block), so applied edits do not invalidate cached statistics."""
        digest = hashlib.sha256(self.model.config.to_json_string(use_diff=False).encode())
        embed = self.model.get_submodule(self.adapter.embed_name).weight
        sample = [embed.reshape(-1)[:4096], embed.reshape(-1)[-4096:]]
        for _name, param in list(self.model.get_submodule(self.adapter.attn(0)).named_parameters())[:2]:
            sample.append(param.reshape(-1)[:4096])
        for tensor in sample:
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:20]

    def context_templates(self, count: int, length: int, seed: int = 0) -> list[str]:
        key = (count, length, seed)
        with self._lock:
            if key not in self._templates:
                self._templates[key] = generate_context_templates(self.model, self.tokenizer, count, length, seed)
            return list(self._templates[key])

    def second_moments(self, layers: list[int], source: str, tokens: int, *,
                       should_stop: StopCheck | None = None) -> dict[int, torch.Tensor]:
        """C = E[k k^T] of each layer's MLP output projection inputs (fp32, on CPU); layers not
        in memory or on disk are estimated together in one pass over the text. An estimate
        stops between two batches once ``should_stop()`` (the caller gave up: Cancelled) or
        :attr:`stop` (shutdown: PreconditionFailed) says so; nothing partial is cached."""
        for layer in layers:
            self.adapter.check_layer(layer)
        with self._lock:
            missing = [layer for layer in layers if (layer, source, tokens) not in self._moments]
            if missing:
                if self.cache_dir is None:
                    raise ValueError("EditingContext needs a cache_dir for statistics")
                loaded = load_or_estimate_layers(
                    self.model, self.tokenizer, self.adapter, fingerprint=self.fingerprint,
                    cache_dir=self.cache_dir, layers=missing, source=source, tokens=tokens,
                    progress=self.progress, stop=self.stop, should_stop=should_stop)
                for layer, (moment, info) in loaded.items():
                    self._moments[(layer, source, tokens)] = moment
                    self.last_stats_info = info
            return {layer: self._moments[(layer, source, tokens)] for layer in layers}

    def has_second_moments(self, layers: list[int], source: str, tokens: int) -> bool:
        """Whether the statistics are in memory already (an edit will not wait for them)."""
        with self._lock:
            return all((layer, source, tokens) in self._moments for layer in layers)

    def second_moment(self, layer: int, source: str, tokens: int) -> torch.Tensor:
        """C = E[k k^T] for one layer (see :meth:`second_moments`)."""
        return self.second_moments([layer], source, tokens)[layer]

    def solve_regularised(self, layer: int, source: str, tokens: int, weight: float, keys: torch.Tensor,
                          earlier: torch.Tensor | None = None) -> torch.Tensor:
        """(weight * C + K K^T + Ke Ke^T)^-1 K in float64 for keys K [d_mlp, n] (MEMIT's least
        squares); ``earlier`` keys Ke [d_mlp, m] (default none) join it with residual zero, so
        they keep their outputs as closely as the new keys reach theirs.

        K K^T is positive semi-definite and C positive definite up to rounding, so the system
        is solved by Cholesky, with a tiny ridge added only if the factorisation fails."""
        c = self.second_moment(layer, source, tokens).double()
        k = keys.double().cpu()
        system = weight * c + k @ k.T
        if earlier is not None and earlier.numel():
            e = earlier.double().cpu()
            system = system + e @ e.T
        factor, info = torch.linalg.cholesky_ex(system)
        scale = 1e-10 * system.diagonal().mean().clamp_min(1e-30)
        eye = torch.eye(system.shape[0], dtype=system.dtype)
        while int(info) != 0:
            factor, info = torch.linalg.cholesky_ex(system + scale * eye)
            scale = scale * 10
        return torch.cholesky_solve(k, factor)

    def solve_second_moment(self, layer: int, source: str, tokens: int, rhs: torch.Tensor) -> torch.Tensor:
        """C^-1 rhs through a cached Cholesky factor (with a tiny ridge for rank-deficient C)."""
        key = (layer, source, tokens)
        moment = self.second_moment(layer, source, tokens)
        with self._lock:
            if key not in self._factors:
                c = moment.double()
                ridge = 1e-6 * c.diagonal().mean().clamp_min(1e-12)
                eye = torch.eye(c.shape[0], dtype=c.dtype)
                factor, info = torch.linalg.cholesky_ex(c + ridge * eye)
                scale = ridge
                while int(info) != 0:
                    scale = scale * 10
                    factor, info = torch.linalg.cholesky_ex(c + scale * eye)
                self._factors[key] = factor
            factor = self._factors[key]
        b = rhs.double().reshape(-1, 1).cpu()
        return torch.cholesky_solve(b, factor).reshape(rhs.shape).float()

    def null_space(self, layer: int, source: str, tokens: int, threshold: float) -> torch.Tensor:
        """P = U0 U0^T (float64), the projector onto the eigen-directions of C whose eigenvalue
        is below ``threshold`` times the largest: directions the layer's usual keys hardly
        use, so an update confined to them barely changes what the layer does elsewhere
        (AlphaEdit, Fang et al. 2025). Cached per layer and threshold."""
        key = (layer, source, tokens, threshold)
        moment = self.second_moment(layer, source, tokens)
        with self._lock:
            if key not in self._projectors:
                values, vectors = torch.linalg.eigh(moment.double())
                kept = vectors[:, values < threshold * values.max()]
                self._projectors[key] = kept @ kept.T
            return self._projectors[key]

    def solve_preserving(self, layer: int, source: str, tokens: int, keys: torch.Tensor,
                         earlier: torch.Tensor | None, threshold: float, ridge: float) -> torch.Tensor:
        """V = M^-1 P K (float64 [d_mlp, n]) with M = P (K K^T + Ke Ke^T) P + alpha I, so that
        Delta = R V^T is the least-squares update that maps the keys K [d_mlp, n] to the
        residuals R, leaves the earlier edits' keys Ke [d_mlp, m] where they map, and lies in
        the null space P (M commutes with P, so Delta P = Delta). alpha = ridge * trace(C)."""
        p = self.null_space(layer, source, tokens, threshold)
        k = keys.double().cpu()
        gram = k @ k.T
        if earlier is not None and earlier.numel():
            e = earlier.double().cpu()
            gram = gram + e @ e.T
        alpha = ridge * float(self.second_moment(layer, source, tokens).double().trace())
        system = p @ gram @ p + alpha * torch.eye(p.shape[0], dtype=p.dtype)
        return torch.linalg.solve(system, p @ k)
