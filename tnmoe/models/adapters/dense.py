"""Adapters of dense FFNs: GPT-2 (``GPT2MLP``, Conv1D weights), T5 (``T5DenseActDense``,
``T5DenseGatedActDense``), BERT-style encoders (``BertLayer`` and siblings: intermediate + output
dense), GPT-NeoX (``GPTNeoXMLP``) and gated MLPs recognised by their structure: LLaMA-style
``down(act(gate(x)) * up(x))`` (LLaMA, Mistral, Qwen2/3, Gemma 2/3, OLMo 2, ...) and Phi-3's fused
``gate_up_proj``. A structurally recognised module is checked on a random probe at conversion."""

from __future__ import annotations

import warnings

from torch import nn

from ...networks import linear_weight
from .base import FFNAdapter, FFNSpec, register_adapter, register_structural_adapter

__all__ = ["GPT2MLPAdapter", "T5DenseActDenseAdapter", "T5GatedAdapter", "BertLayerAdapter", "LlamaMLPAdapter",
           "FusedGateUpMLPAdapter", "GPTNeoXMLPAdapter"]


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


def _no_gate_bias(module: nn.Module, bias) -> None:
    if bias is not None:  # ExpertFFN's dense-FFN path has no gate bias: it would be dropped
        raise NotImplementedError(
            f"{type(module).__name__} has a gate_proj bias (e.g. LlamaConfig(mlp_bias=True)), which tnmoe's "
            "gated experts do not carry; converting would silently change the model. Convert a model "
            "without gate biases, or leave these layers out of target_modules"
        )


class LlamaMLPAdapter(FFNAdapter):
    """LLaMA/Mistral/Qwen-style gated MLP: ``down(act(gate(x)) * up(x))``."""

    verify_by_probe = True

    def extract(self, module):
        _no_gate_bias(module, module.gate_proj.bias)
        return FFNSpec(up=module.up_proj.weight, gate=module.gate_proj.weight,
                       down=module.down_proj.weight, activation=module.act_fn,
                       up_bias=module.up_proj.bias, down_bias=module.down_proj.bias)


class FusedGateUpMLPAdapter(FFNAdapter):
    """Phi-3-style gated MLP with one fused ``gate_up_proj`` (gate rows first):
    ``down(up * act(gate))`` with ``gate, up = gate_up_proj(x).chunk(2)``."""

    verify_by_probe = True

    def extract(self, module):
        W, b = module.gate_up_proj.weight, module.gate_up_proj.bias
        if W.shape[0] % 2:
            raise ValueError(f"{type(module).__name__}: gate_up_proj has an odd number of rows ({W.shape[0]})")
        d_ff = W.shape[0] // 2
        _no_gate_bias(module, None if b is None else b[:d_ff])
        return FFNSpec(up=W[d_ff:], gate=W[:d_ff], down=module.down_proj.weight, activation=_activation(module),
                       up_bias=None if b is None else b[d_ff:], down_bias=module.down_proj.bias)


class GPTNeoXMLPAdapter(FFNAdapter):
    """GPT-NeoX / Pythia: ``dense_4h_to_h(act(dense_h_to_4h(x)))`` with biases."""

    verify_by_probe = True

    def extract(self, module):
        return FFNSpec(up=module.dense_h_to_4h.weight, down=module.dense_4h_to_h.weight, activation=module.act,
                       up_bias=module.dense_h_to_4h.bias, down_bias=module.dense_4h_to_h.bias)


def _activation(module: nn.Module):
    act = getattr(module, "act_fn", None)
    return act if act is not None else module.activation_fn


def _linears(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _is_gated_mlp(module: nn.Module) -> bool:
    return _linears(module, "gate_proj", "up_proj", "down_proj") and callable(getattr(module, "act_fn", None))


def _is_fused_gated_mlp(module: nn.Module) -> bool:
    return _linears(module, "gate_up_proj", "down_proj") and (
        callable(getattr(module, "act_fn", None)) or callable(getattr(module, "activation_fn", None)))


register_adapter("GPT2MLP", GPT2MLPAdapter())
register_adapter("T5DenseActDense", T5DenseActDenseAdapter())
register_adapter("T5DenseGatedActDense", T5GatedAdapter())
for _cls in ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer", "CamembertLayer"):
    register_adapter(_cls, BertLayerAdapter())
register_adapter("GPTNeoXMLP", GPTNeoXMLPAdapter())
register_structural_adapter("gate_proj/up_proj/down_proj + act_fn", _is_gated_mlp, LlamaMLPAdapter())
register_structural_adapter("gate_up_proj/down_proj + act_fn", _is_fused_gated_mlp, FusedGateUpMLPAdapter())
