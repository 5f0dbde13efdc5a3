"""Adapters of the routed experts of transformers' MoE models: the fused 3-D experts modules of
Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 (``gate_up_proj`` ``(E, 2I, H)``, ``down_proj``
``(E, H, I)``), gpt-oss (``gate_up_proj`` ``(E, H, 2I)`` with gate/up interleaved, biases, clamped
SwiGLU) and Switch Transformers (``SwitchTransformersExperts``: one dense FFN module per expert).

Only the experts module is replaced (by :class:`tnmoe.moe.routed.RoutedExperts`); the block around
it (router, shared experts, auxiliary loss) is the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ...moe.experts import ClampedSwiGLU
from .base import FFNAdapter, register_adapter

__all__ = ["ExpertsSpec", "ExpertsAdapter", "FusedGateUpExpertsAdapter", "GptOssExpertsAdapter",
           "SwitchExpertsAdapter", "experts_forward"]


@dataclass
class ExpertsSpec:
    """The routed experts of one MoE block. Matrices are ``(E, out, in)`` (nn.Linear layout).

    up / gate: ``(E, d_ff, d_model)`` (gate ``None`` for an ungated FFN); down: ``(E, d_model, d_ff)``;
    biases ``(E, out)`` or ``None``. ``glu(gate, up)`` replaces ``activation(gate) * up`` when set.
    routing: the call's format (``"indices"`` or ``"one_hot"``, see ``RoutedExperts``).
    """

    up: torch.Tensor
    down: torch.Tensor
    activation: Callable[[torch.Tensor], torch.Tensor]
    top_k: int
    gate: torch.Tensor | None = None
    glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    up_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    inner_dropout: float = 0.0
    routing: str = "indices"

    @property
    def num_experts(self) -> int:
        return self.up.shape[0]

    @property
    def d_model(self) -> int:
        return self.up.shape[2]

    @property
    def d_ff(self) -> int:
        return self.up.shape[1]

    def matrices(self) -> dict[str, torch.Tensor]:
        out = {"up": self.up, "down": self.down}
        if self.gate is not None:
            out["gate"] = self.gate
        return out


def experts_forward(spec: ExpertsSpec, x: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert`` of ``spec`` on ``x`` ``(T, d_model)``, computed naively in ``x``'s dtype
    (a reference; only that expert's tensors are cast)."""
    def lin(inp, W, b):
        y = inp @ W[expert].to(inp.dtype).T
        return y if b is None else y + b[expert].to(inp.dtype)
    h = lin(x, spec.up, spec.up_bias)
    if spec.gate is not None:
        g = lin(x, spec.gate, spec.gate_bias)
        h = spec.glu(g, h) if spec.glu is not None else spec.activation(g) * h
    else:
        h = spec.activation(h)
    return lin(h, spec.down, spec.down_bias)


def _top_k(parent: nn.Module) -> int:
    """The model's experts per token, read off the MoE block holding the experts module."""
    for holder in (parent, getattr(parent, "gate", None), getattr(parent, "router", None)):
        k = getattr(holder, "top_k", None) if holder is not None else None
        if isinstance(k, int) and not isinstance(k, bool):
            return k
    raise ValueError(f"cannot find the experts per token (top_k) of {type(parent).__name__} (looked at it, "
                     ".gate and .router); register an ExpertsAdapter whose extract_experts reads it")


class ExpertsAdapter(FFNAdapter):
    """Reads the routed experts of an MoE block (:meth:`extract_experts`); the replacement, a
    ``RoutedExperts``, takes the experts module's place (default :meth:`install`)."""

    routed_experts = True

    def extract(self, module):
        raise TypeError(f"{type(module).__name__} is an MoE experts module; read it with extract_experts")

    def extract_experts(self, module: nn.Module, parent: nn.Module) -> ExpertsSpec:
        raise NotImplementedError


class FusedGateUpExpertsAdapter(ExpertsAdapter):
    """``gate_up_proj`` ``(E, 2I, H)`` (gate rows first), ``down_proj`` ``(E, H, I)``, ``act_fn``:
    ``down(act(gate x) * up x)`` per expert (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3)."""

    def extract_experts(self, module, parent):
        gate_up, down = module.gate_up_proj, module.down_proj
        if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] != 2 * down.shape[2]:
            raise ValueError(f"{type(module).__name__}: gate_up_proj {tuple(gate_up.shape)} and down_proj "
                             f"{tuple(down.shape)} are not (E, 2I, H) and (E, H, I)")
        for extra in ("gate_up_proj_bias", "down_proj_bias"):
            if getattr(module, extra, None) is not None:
                raise NotImplementedError(f"{type(module).__name__} has {extra}, which this adapter does not read")
        d_ff = down.shape[2]
        return ExpertsSpec(up=gate_up[:, d_ff:], gate=gate_up[:, :d_ff], down=down, activation=module.act_fn,
                           top_k=_top_k(parent))


class GptOssExpertsAdapter(ExpertsAdapter):
    """gpt-oss: ``x @ gate_up_proj[e] + bias`` ``(E, H, 2I)``, gate/up interleaved (even/odd
    columns), ``ClampedSwiGLU(alpha, limit)``, ``down_proj`` ``(E, I, H)`` plus bias."""

    def extract_experts(self, module, parent):
        gate_up, down = module.gate_up_proj, module.down_proj
        return ExpertsSpec(up=gate_up[..., 1::2].transpose(1, 2), gate=gate_up[..., ::2].transpose(1, 2),
                           down=down.transpose(1, 2), activation=nn.Identity(),
                           glu=ClampedSwiGLU(module.alpha, module.limit),
                           up_bias=module.gate_up_proj_bias[:, 1::2], gate_bias=module.gate_up_proj_bias[:, ::2],
                           down_bias=module.down_proj_bias, top_k=_top_k(parent))


class SwitchExpertsAdapter(ExpertsAdapter):
    """``SwitchTransformersExperts``: ``expert_<i>`` modules ``wo(dropout(act(wi x)))``, called with
    a one-hot routing mask ``(T, 1, E)``."""

    def extract_experts(self, module, parent):
        experts = [module[f"expert_{i}"] for i in range(module.num_experts)]
        for e in experts:
            if e.wi.bias is not None or e.wo.bias is not None:
                raise NotImplementedError("Switch experts with biases are not read by this adapter")
        return ExpertsSpec(up=torch.stack([e.wi.weight for e in experts]),
                           down=torch.stack([e.wo.weight for e in experts]), activation=experts[0].act,
                           inner_dropout=float(experts[0].dropout.p), top_k=1, routing="one_hot")


for _cls in ("MixtralExperts", "Qwen2MoeExperts", "Qwen3MoeExperts", "OlmoeExperts", "DeepseekV3Experts"):
    register_adapter(_cls, FusedGateUpExpertsAdapter())
register_adapter("GptOssExperts", GptOssExpertsAdapter())
register_adapter("SwitchTransformersExperts", SwitchExpertsAdapter())
