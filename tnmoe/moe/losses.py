"""Auxiliary router losses and their collection from a model (no global state)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["load_balancing_loss", "router_z_loss", "auxiliary_loss", "moe_layers"]


def load_balancing_loss(router_probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``E * sum_i f_i * P_i``.

    ``router_probs``: ``(T, E)``; ``expert_index``: ``(T, k)``. ``f_i`` is the fraction of the
    ``T*k`` assignments routed to expert ``i`` (before capacity), ``P_i`` the mean router
    probability of expert ``i``. Equals 1 for perfectly uniform routing, ``E`` at full collapse.
    """
    E = router_probs.shape[-1]
    counts = torch.bincount(expert_index.reshape(-1), minlength=E).to(router_probs.dtype)
    f = counts / counts.sum().clamp_min(1)
    P = router_probs.mean(0)
    return E * (f * P).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2``."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


def moe_layers(model: nn.Module):
    """All :class:`~tnmoe.moe.MoELayer` modules of ``model`` as ``(name, module)`` pairs."""
    from .layer import MoELayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]


def auxiliary_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the weighted auxiliary losses of every MoE layer's most recent forward.

    Add it to the task loss: ``loss = task_loss + tnmoe.moe.auxiliary_loss(model)``.
    Zero (a float32 scalar) when the model has no MoE layer or none has run yet.
    """
    total = None
    for _, layer in moe_layers(model):
        aux = layer.last_aux_loss
        if aux is not None:
            total = aux if total is None else total + aux
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total
