"""Dispatch: group token-expert assignments by expert, apply capacity, combine deterministically."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DispatchPlan", "plan_dispatch", "combine", "expert_counts"]


@dataclass
class DispatchPlan:
    """How ``T`` tokens with ``k`` choices each are grouped.

    assignment: ``(A,)`` indices into the flattened ``(T*k)`` assignments that are kept,
        ordered by expert (then priority); ``token = assignment // k``.
    token_index: ``(A,)`` the token of each kept assignment.
    counts: ``(E,)`` kept assignments per expert (rows of each expert's group).
    routed_counts: ``(E,)`` assignments per expert before capacity was applied.
    dropped: ``(T*k,)`` bool, assignments dropped by capacity.
    """

    assignment: torch.Tensor
    token_index: torch.Tensor
    counts: torch.Tensor
    routed_counts: torch.Tensor
    dropped: torch.Tensor
    num_tokens: int
    top_k: int


def expert_counts(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert ``(E,)`` (long) of any-shaped ``expert_index``; unlike
    ``bincount``, the output size never depends on the data (compile-friendly)."""
    flat = expert_index.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    return counts.index_add_(0, flat, torch.ones_like(flat))


def plan_dispatch(expert_index: torch.Tensor, num_experts: int, capacity: int | None = None) -> DispatchPlan:
    """Group ``expert_index`` ``(T, k)`` by expert.

    Priority inside an expert (who is kept when it overflows ``capacity``): first choices before
    second choices, then earlier tokens first — the Switch/GShard convention. Sorting uses
    unique integer keys, so the grouping is identical on every run and device.
    """
    T, k = expert_index.shape
    flat = expert_index.reshape(-1)
    a = torch.arange(T * k, device=flat.device)
    priority = (a % k) * T + a // k
    key = flat * (T * k) + priority
    order = torch.argsort(key)
    sorted_experts = flat[order]
    routed_counts = expert_counts(flat, num_experts)
    if capacity is None:  # dropless: no data-dependent shapes, so no host sync
        dropped = torch.zeros(T * k, dtype=torch.bool, device=flat.device)
        return DispatchPlan(order, order // k, routed_counts, routed_counts, dropped, T, k)
    starts = torch.cumsum(routed_counts, 0) - routed_counts
    position = torch.arange(T * k, device=flat.device) - starts[sorted_experts]
    keep = position < capacity
    assignment = order[keep]
    counts = expert_counts(sorted_experts[keep], num_experts)
    dropped = torch.ones(T * k, dtype=torch.bool, device=flat.device)
    dropped[assignment] = False
    return DispatchPlan(assignment, assignment // k, counts, routed_counts, dropped, T, k)


def combine(expert_out: torch.Tensor, plan: DispatchPlan, combine_weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: ``(A, d)`` -> ``(T, d)``.

    Each kept assignment is written to its own ``(token, choice)`` slot (no atomics), then the
    ``k`` slots are summed in a fixed order: bit-identical results across runs. Dropped
    assignments contribute zero, so a token dropped by every expert gets a zero update and
    passes through the residual connection only.
    """
    T, k = plan.num_tokens, plan.top_k
    w = combine_weights.reshape(-1)[plan.assignment].to(expert_out.dtype)
    buf = expert_out.new_zeros(T * k, expert_out.shape[-1])
    buf = buf.index_copy(0, plan.assignment, expert_out * w[:, None])
    return buf.view(T, k, -1).sum(1)
