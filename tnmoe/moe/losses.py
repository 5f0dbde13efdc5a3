"""Auxiliary router losses: Switch load balancing and ST-MoE z-loss."""

from __future__ import annotations

import torch

from .dispatch import expert_counts

__all__ = ["load_balancing_loss", "router_z_loss"]


def load_balancing_loss(router_probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``E * sum_i f_i * P_i``.

    ``router_probs``: ``(T, E)``; ``expert_index``: ``(T, k)``. ``f_i`` is the fraction of the
    ``T*k`` assignments routed to expert ``i`` (before capacity), ``P_i`` the mean router
    probability of expert ``i``. Equals 1 for perfectly uniform routing, ``E`` at full collapse.
    """
    E = router_probs.shape[-1]
    counts = expert_counts(expert_index, E).to(router_probs.dtype)
    f = counts / counts.sum().clamp_min(1)
    P = router_probs.mean(0)
    return E * (f * P).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2``."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()
