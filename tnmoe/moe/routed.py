"""``RoutedExperts``: a tnmoe expert bank behind the experts contract of transformers' MoE models.

transformers 5.x MoE blocks call their experts module as ``experts(hidden_states, top_k_index,
top_k_weights)`` after their own router has chosen the experts (``MixtralExperts``,
``Qwen2MoeExperts``, ``DeepseekV3Experts``, ``GptOssExperts``, ...). :class:`RoutedExperts` keeps
that call and runs an :class:`~tnmoe.moe.experts.ExpertFFN` (dense or MPO banks) instead, so the
model's router, routing function, shared experts and auxiliary loss stay the model's own. The
routing is not this module's: it has no router and no auxiliary loss of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import ExpertFFN

__all__ = ["RoutedExperts", "routed_experts"]

_ROUTING_FORMATS = ("indices", "one_hot")


class RoutedExperts(nn.Module):
    """Experts chosen by someone else's router. ``forward(hidden_states, top_k_index, top_k_weights)``:

    * ``hidden_states`` ``(T, d_model)``;
    * ``top_k_index`` ``(T, k)`` expert ids (``routing="indices"``; an id ``>= num_experts`` is a
      dropped slot, as transformers' expert-parallel sentinel) or ``(T, k, E)`` a 0/1 mask
      (``routing="one_hot"``, Switch Transformers; an all-zero row is a dropped token);
    * ``top_k_weights`` ``(T, k)`` the weight of each slot.

    Returns ``(T, d_model)``: ``sum_j w[t, j] * expert_{i[t, j]}(x_t)`` in ``hidden_states``' dtype
    (dropped slots add nothing), the sum transformers' eager experts compute.

    Attributes: ``experts`` (:class:`ExpertFFN`), ``num_experts``, ``top_k`` (the model's, for
    parameter accounting), and ``moe_config`` / ``converted_from`` (set by ``convert``).
    """

    def __init__(self, experts: ExpertFFN, *, top_k: int, routing: str = "indices") -> None:
        super().__init__()
        if routing not in _ROUTING_FORMATS:
            raise ValueError(f"routing must be one of {_ROUTING_FORMATS}, got {routing!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts.num_experts:
            raise ValueError(f"top_k must be an integer in [1, {experts.num_experts}], got {top_k!r}")
        self.experts = experts
        self.num_experts = experts.num_experts
        self.top_k = top_k
        self.routing = routing
        self.moe_config = None
        self.converted_from: str | None = None

    def _assignments(self, top_k_index: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(expert, token, slot)`` of every kept assignment, flat, in (token, slot) order."""
        if self.routing == "one_hot":
            if top_k_index.dim() != 3 or top_k_index.shape[0] != num_tokens or top_k_index.shape[-1] != self.num_experts:
                raise ValueError(f"one-hot routing must be (T={num_tokens}, k, E={self.num_experts}), "
                                 f"got {tuple(top_k_index.shape)}")
            token, slot, expert = top_k_index.nonzero(as_tuple=True)
            return expert, token, slot
        if top_k_index.dim() != 2 or top_k_index.shape[0] != num_tokens:
            raise ValueError(f"top_k_index must be (T={num_tokens}, k), got {tuple(top_k_index.shape)}")
        k = top_k_index.shape[1]
        expert = top_k_index.reshape(-1).long()
        token = torch.arange(num_tokens, device=expert.device).repeat_interleave(k)
        slot = torch.arange(k, device=expert.device).repeat(num_tokens)
        if bool((expert < 0).any()):
            raise ValueError("top_k_index holds negative expert ids")
        kept = expert < self.num_experts
        return expert[kept], token[kept], slot[kept]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden_states.dim() != 2 or hidden_states.shape[1] != self.experts.d_model:
            raise ValueError(f"RoutedExperts expected hidden states (T, {self.experts.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        num_tokens = hidden_states.shape[0]
        expert, token, slot = self._assignments(top_k_index, num_tokens)
        order = torch.argsort(expert, stable=True)
        expert, token, slot = expert[order], token[order], slot[order]
        counts = torch.bincount(expert, minlength=self.num_experts)
        y = self.experts(hidden_states.index_select(0, token), counts)
        weights = top_k_weights.reshape(num_tokens, -1)[token, slot]
        y = y * weights.unsqueeze(1)
        out = torch.zeros_like(hidden_states)
        return out.index_add_(0, token, y.to(out.dtype))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, routing={self.routing!r}"


def routed_experts(model: nn.Module) -> list[tuple[str, RoutedExperts]]:
    """All :class:`RoutedExperts` modules of ``model`` as ``(name, module)``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedExperts)]
