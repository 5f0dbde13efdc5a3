"""Adapters: how to read a pretrained FFN and where to put the MoE layer that replaces it.

Built in: GPT-2 (``GPT2MLP``, Conv1D weights), T5 (``T5DenseActDense``,
``T5DenseGatedActDense``), BERT-style encoders (``BertLayer`` and siblings: intermediate +
output dense). Add your own with :func:`register_adapter`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..networks import linear_weight

__all__ = ["FFNSpec", "FFNAdapter", "register_adapter", "unregister_adapter", "get_adapter", "registered_adapters"]


@dataclass
class FFNSpec:
    """A pretrained FFN read off a model. Matrices are ``(out, in)`` (nn.Linear layout).

    up: ``(d_ff, d_model)``; down: ``(d_model, d_ff)``; gate: ``(d_ff, d_model)`` or ``None``.
    """

    up: torch.Tensor
    down: torch.Tensor
    activation: Callable[[torch.Tensor], torch.Tensor]
    gate: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    inner_dropout: float = 0.0
    output_dropout: float = 0.0

    @property
    def d_model(self) -> int:
        return self.up.shape[1]

    @property
    def d_ff(self) -> int:
        return self.up.shape[0]


class FFNAdapter:
    """Reads an FFN module (:meth:`extract`) and installs its replacement (:meth:`install`).

    The default :meth:`install` replaces ``parent.<name>`` by the MoE layer, which must then
    accept the FFN's input and return its output.
    """

    def extract(self, module: nn.Module) -> FFNSpec:
        raise NotImplementedError

    def install(self, parent: nn.Module, name: str, module: nn.Module, moe: nn.Module) -> None:
        """Put ``moe`` in place of ``module`` (``parent.<name>``); any module it adds must take
        ``module``'s training/eval mode."""
        setattr(parent, name, moe)


def _p(dropout: nn.Module) -> float:
    return float(getattr(dropout, "p", 0.0))


class GPT2MLPAdapter(FFNAdapter):
    def extract(self, module):
        up, up_b = linear_weight(module.c_fc)
        down, down_b = linear_weight(module.c_proj)
        return FFNSpec(up=up, down=down, activation=module.act, up_bias=up_b, down_bias=down_b,
                       output_dropout=_p(module.dropout))


class T5DenseActDenseAdapter(FFNAdapter):
    def extract(self, module):
        return FFNSpec(up=module.wi.weight, down=module.wo.weight, activation=module.act,
                       up_bias=module.wi.bias, down_bias=module.wo.bias, inner_dropout=_p(module.dropout))


class T5GatedAdapter(FFNAdapter):
    def extract(self, module):
        return FFNSpec(up=module.wi_1.weight, gate=module.wi_0.weight, down=module.wo.weight,
                       activation=module.act, inner_dropout=_p(module.dropout))


class BertLayerAdapter(FFNAdapter):
    """BERT-style layer: ``intermediate`` (dense + act) and ``output`` (dense, dropout, residual,
    LayerNorm). The MoE layer replaces ``intermediate`` and ``output.dense`` becomes identity,
    so the output's dropout, residual and LayerNorm stay as they were."""

    def extract(self, module):
        inter, out = module.intermediate, module.output
        return FFNSpec(up=inter.dense.weight, down=out.dense.weight,
                       activation=inter.intermediate_act_fn, up_bias=inter.dense.bias,
                       down_bias=out.dense.bias)

    def install(self, parent, name, module, moe):
        module.intermediate = moe
        module.output.dense = nn.Identity().train(module.output.dense.training)
        if getattr(module, "chunk_size_feed_forward", 0):
            # chunked feed-forward would call the MoE layer once per chunk: routing capacity per
            # chunk, and the auxiliary loss / stats of the last chunk only; one call sees them all
            warnings.warn(f"{type(module).__name__}: chunk_size_feed_forward="
                          f"{module.chunk_size_feed_forward} set to 0 (the MoE layer routes all tokens at once)")
            module.chunk_size_feed_forward = 0


class LlamaMLPAdapter(FFNAdapter):
    """LLaMA/Mistral/Qwen-style gated MLP: ``down(act(gate(x)) * up(x))``."""

    def extract(self, module):
        if module.gate_proj.bias is not None:  # ExpertFFN's gate has no bias: it would be dropped
            raise NotImplementedError(
                f"{type(module).__name__} has a gate_proj bias (e.g. LlamaConfig(mlp_bias=True)), which tnmoe's "
                "gated experts do not carry; converting would silently change the model. Convert a model "
                "without gate biases, or leave these layers out of target_modules"
            )
        return FFNSpec(up=module.up_proj.weight, gate=module.gate_proj.weight,
                       down=module.down_proj.weight, activation=module.act_fn,
                       up_bias=module.up_proj.bias, down_bias=module.down_proj.bias)


_REGISTRY: dict[str, FFNAdapter] = {}


def register_adapter(class_name: str | type, adapter: FFNAdapter) -> None:
    """Register ``adapter`` for FFN modules of class ``class_name`` (name or class)."""
    name = class_name if isinstance(class_name, str) else class_name.__name__
    if not isinstance(adapter, FFNAdapter):
        raise TypeError(f"adapter must be an FFNAdapter instance, got {type(adapter).__name__}")
    _REGISTRY[name] = adapter


def unregister_adapter(class_name: str | type) -> FFNAdapter:
    """Remove and return the adapter registered for ``class_name`` (``KeyError`` if none)."""
    name = class_name if isinstance(class_name, str) else class_name.__name__
    if name not in _REGISTRY:
        raise KeyError(f"no adapter registered for {name!r}; registered: {registered_adapters()}")
    return _REGISTRY.pop(name)


def get_adapter(module: nn.Module) -> FFNAdapter | None:
    return _REGISTRY.get(type(module).__name__)


def registered_adapters() -> list[str]:
    return sorted(_REGISTRY)


register_adapter("GPT2MLP", GPT2MLPAdapter())
register_adapter("T5DenseActDense", T5DenseActDenseAdapter())
register_adapter("T5DenseGatedActDense", T5GatedAdapter())
for _cls in ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer", "CamembertLayer"):
    register_adapter(_cls, BertLayerAdapter())
for _cls in ("LlamaMLP", "MistralMLP", "Qwen2MLP"):
    register_adapter(_cls, LlamaMLPAdapter())
