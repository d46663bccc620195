"""One place that knows where things live inside a causal LM.

Editing methods and the tracer never name a model family: they ask the adapter for "the MLP
output projection of layer 7" or "the residual stream after layer 3". The adapter finds these
from the module structure (the ModuleList whose length is the layer count, the MLP's
projection whose output width is the hidden size) and the config, not from substrings of a
model's name, so a new Llama-like family usually works without a line of code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")


def _config_value(config: object, keys: tuple[str, ...]) -> int:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    text_config = getattr(config, "text_config", None)
    if text_config is not None and text_config is not config:
        return _config_value(text_config, keys)
    raise ValueError(f"model config has none of {keys}")


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as [in, out], the transpose of nn.Linear."""
    return type(module).__name__ == "Conv1D"


def _projection_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear or Conv1D, None for anything else."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return weight.shape[0], weight.shape[1]
    return None


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Names of the parts of one model, found once, used by every method.

    All names are fully qualified module names usable with ``model.get_submodule`` and the
    hooks in :mod:`editserve.editing.hooks`; ``{}`` in a template is the layer index.
    """

    model_type: str
    num_layers: int
    hidden_size: int
    layer_template: str
    mlp_template: str
    mlp_out_template: str
    attn_template: str
    embed_name: str
    final_norm_name: str
    lm_head_name: str
    mlp_out_is_conv1d: bool
    # a norm between the MLP's output and the residual add (Gemma's post_feedforward_layernorm);
    # None where the MLP output is added to the residual stream as is
    post_mlp_norm_template: str | None = None

    @classmethod
    def from_model(cls, model: nn.Module) -> ArchitectureAdapter:
        config = model.config
        num_layers = _config_value(config, _LAYER_COUNT_KEYS)
        hidden = _config_value(config, _HIDDEN_KEYS)
        layers_name = cls._find_layers(model, num_layers)
        layer0 = model.get_submodule(f"{layers_name}.0")
        mlp_rel, mlp_out_rel = cls._find_mlp(layer0, hidden)
        attn_rel = cls._find_attention(layer0, mlp_rel)
        embed_name = cls._name_of(model, model.get_input_embeddings())
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError("model has no output embeddings (LM head)")
        lm_head_name = cls._name_of(model, head)
        final_norm_name = cls._find_final_norm(model, layers_name)
        mlp_out = layer0.get_submodule(f"{mlp_rel}.{mlp_out_rel}")
        post_norm = cls._find_post_mlp_norm(layer0)
        return cls(
            model_type=str(getattr(config, "model_type", "unknown")),
            num_layers=num_layers,
            hidden_size=hidden,
            layer_template=f"{layers_name}.{{}}",
            mlp_template=f"{layers_name}.{{}}.{mlp_rel}",
            mlp_out_template=f"{layers_name}.{{}}.{mlp_rel}.{mlp_out_rel}",
            attn_template=f"{layers_name}.{{}}.{attn_rel}",
            embed_name=embed_name,
            final_norm_name=final_norm_name,
            lm_head_name=lm_head_name,
            mlp_out_is_conv1d=_is_conv1d(mlp_out),
            post_mlp_norm_template=f"{layers_name}.{{}}.{post_norm}" if post_norm else None,
        )

    # --- discovery -------------------------------------------------------------------
    @staticmethod
    def _name_of(model: nn.Module, target: nn.Module) -> str:
        for name, module in model.named_modules():
            if module is target:
                return name
        raise ValueError(f"module {type(target).__name__} is not part of the model")

    @staticmethod
    def _find_layers(model: nn.Module, num_layers: int) -> str:
        candidates = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) == num_layers
        ]
        if not candidates:
            raise ValueError(f"no ModuleList of {num_layers} decoder layers found")
        # the shortest name is the outermost list: the decoder stack itself
        return min(candidates, key=len)

    @staticmethod
    def _find_mlp(layer: nn.Module, hidden: int) -> tuple[str, str]:
        """The MLP child of a block and its output projection (intermediate -> hidden)."""
        for child_name, child in layer.named_children():
            outs = []
            for sub_name, sub in child.named_modules():
                shape = _projection_shape(sub)
                if shape is not None and shape[1] == hidden and shape[0] > hidden:
                    outs.append(sub_name)
            ins = [
                sub_name
                for sub_name, sub in child.named_modules()
                if (s := _projection_shape(sub)) is not None and s[0] == hidden and s[1] > hidden
            ]
            if outs and ins and "attn" not in child_name and "attention" not in child_name:
                return child_name, outs[-1]
        raise ValueError("no MLP with an intermediate->hidden projection found in a layer")

    @staticmethod
    def _find_attention(layer: nn.Module, mlp_name: str) -> str:
        for child_name, child in layer.named_children():
            has_projection = any(_projection_shape(m) is not None for m in child.modules())
            named_like = "attn" in child_name or "attention" in child_name
            if child_name != mlp_name and named_like and has_projection:
                return child_name
        raise ValueError("no attention module found in a layer")

    @staticmethod
    def _find_post_mlp_norm(layer: nn.Module) -> str | None:
        """The norm applied to the MLP's output before the residual add, if the block has one
        (sandwich-norm blocks such as Gemma's name it ``post_feedforward_layernorm``)."""
        for child_name, child in layer.named_children():
            is_norm = "norm" in type(child).__name__.lower()
            if is_norm and child_name.startswith("post_") and ("feedforward" in child_name or "mlp" in child_name):
                return child_name
        return None

    @staticmethod
    def _find_final_norm(model: nn.Module, layers_name: str) -> str:
        parent_name = layers_name.rsplit(".", 1)[0] if "." in layers_name else ""
        parent = model.get_submodule(parent_name) if parent_name else model
        for child_name, child in parent.named_children():
            if "norm" in type(child).__name__.lower() or child_name in ("ln_f", "norm"):
                return f"{parent_name}.{child_name}" if parent_name else child_name
        raise ValueError("no final norm found beside the decoder layers")

    # --- accessors -------------------------------------------------------------------
    def layer(self, index: int) -> str:
        self.check_layer(index)
        return self.layer_template.format(index)

    def mlp(self, index: int) -> str:
        self.check_layer(index)
        return self.mlp_template.format(index)

    def mlp_out(self, index: int) -> str:
        self.check_layer(index)
        return self.mlp_out_template.format(index)

    def attn(self, index: int) -> str:
        self.check_layer(index)
        return self.attn_template.format(index)

    def post_mlp_norm(self, index: int) -> str | None:
        self.check_layer(index)
        return self.post_mlp_norm_template.format(index) if self.post_mlp_norm_template else None

    def mlp_out_weight_name(self, index: int) -> str:
        return f"{self.mlp_out(index)}.weight"

    def check_layer(self, index: int) -> None:
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range: the model has {self.num_layers} layers (0..{self.num_layers - 1})")

    def to_param_layout(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """Turn a [out, in] delta (nn.Linear convention) into the MLP output weight's layout."""
        return delta_out_in.T.contiguous() if self.mlp_out_is_conv1d else delta_out_in

    def from_param_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """The MLP output weight viewed as [out, in], whatever the module stores."""
        return weight.T if self.mlp_out_is_conv1d else weight
