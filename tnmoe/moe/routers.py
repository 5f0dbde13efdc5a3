"""Routers: map tokens ``(T, d_model)`` to experts. One interface, three families.

Every router returns a :class:`RouterOutput`; capacity (token dropping) is the router's policy,
exposed by :meth:`Router.capacity`, and applied by the dispatcher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["RouterOutput", "Router", "TopKRouter", "SwitchRouter", "HashRouter", "gate_weights", "check_capacity",
           "GATE_SCALINGS"]

GATE_SCALINGS = ("preserve", "probs", "normalized")


@dataclass
class RouterOutput:
    """Routing decision for ``T`` tokens and ``k`` choices each.

    expert_index: ``(T, k)`` long, the chosen experts (first choice first).
    combine_weights: ``(T, k)`` weights multiplying each chosen expert's output.
    router_probs: ``(T, E)`` float32 softmax probabilities (one-hot for hash routing).
    router_logits: ``(T, E)`` float32 logits, or ``None`` when the router has none.
    """

    expert_index: torch.Tensor
    combine_weights: torch.Tensor
    router_probs: torch.Tensor
    router_logits: torch.Tensor | None


def gate_weights(selected_probs: torch.Tensor, scaling: str) -> torch.Tensor:
    """Combine weights ``(T, k)`` from the selected probabilities.

    ``"preserve"``: ``p / p.detach() / k`` — each weight is exactly ``1/k`` in the forward pass,
    so experts that are copies of one FFN reproduce it, while the router still receives
    gradients (``d/dp = 1 / (k p)``; computed as ``(1 + (p - p.detach()) / p.detach()) / k``,
    which stays finite when a selected probability underflows to 0); ``"probs"``: ``p``
    (Switch/Shazeer); ``"normalized"``: ``p / sum_k p``.
    """
    k = selected_probs.shape[-1]
    if scaling == "preserve":
        held = selected_probs.detach()
        tiny = torch.finfo(held.dtype).tiny
        return (1.0 + (selected_probs - held) / held.clamp_min(tiny)) / k
    if scaling == "probs":
        return selected_probs
    if scaling == "normalized":
        return selected_probs / selected_probs.sum(-1, keepdim=True)
    raise ValueError(f"gate scaling must be one of {GATE_SCALINGS}, got {scaling!r}")


class Router(nn.Module):
    """Base class. Subclasses implement :meth:`forward` ``(T, d) -> RouterOutput``."""

    num_experts: int
    top_k: int
    uses_token_ids: bool = False

    def capacity(self, num_tokens: int) -> int | None:
        """Max tokens per expert for a batch of ``num_tokens`` tokens; ``None``: no dropping.

        Training uses ``capacity_factor``, eval ``eval_capacity_factor`` (``None``: no dropping).
        """
        name = "capacity_factor" if self.training else "eval_capacity_factor"
        cf = getattr(self, name, None)
        if cf is None or not getattr(self, "drop_tokens", True):
            return None
        return max(1, math.ceil(num_tokens * self.top_k * cf / self.num_experts))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_capacity(capacity_factor: float | None, eval_capacity_factor: float | None) -> None:
    """Capacity factors are positive numbers or ``None`` (no dropping)."""
    for name, cf in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or not cf > 0):
            raise ValueError(f"{name} must be a positive number or None (keep every token), got {cf!r}")


def _check(num_experts: int, top_k: int, scaling: str | None) -> None:
    if not _is_int(num_experts) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
    if not _is_int(top_k) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in [1, num_experts={num_experts}], got {top_k!r}")
    if scaling is not None and scaling not in GATE_SCALINGS:
        raise ValueError(f"gate_scaling must be one of {GATE_SCALINGS}, got {scaling!r}")


class TopKRouter(Router):
    """Softmax top-k gating (Shazeer et al. 2017), optional learned noisy gating.

    Logits ``x W_g^T (+ b)``; when ``noisy_gating`` and training, ``+ N(0,1) * softplus(x W_n^T)``.
    Computed in float32. ``capacity_factor=None`` keeps every token.
    """

    def __init__(self, *, d_model: int, num_experts: int, top_k: int = 2, noisy_gating: bool = False,
                 bias: bool = False, capacity_factor: float | None = None, drop_tokens: bool = True,
                 eval_capacity_factor: float | None = None, gate_scaling: str = "normalized") -> None:
        super().__init__()
        _check(num_experts, top_k, gate_scaling)
        check_capacity(capacity_factor, eval_capacity_factor)
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(d_model, num_experts, bias=bias)
        self.noise = nn.Linear(d_model, num_experts, bias=False) if noisy_gating else None
        self.reset_parameters()
        self.capacity_factor, self.drop_tokens = capacity_factor, drop_tokens
        self.eval_capacity_factor = eval_capacity_factor
        self.gate_scaling = gate_scaling

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Small Gaussian gate weights (std ``0.1 / sqrt(d_model)``), zero bias and noise weights."""
        w = self.gate.weight
        if w.is_meta:
            return
        d_model = w.shape[1]
        w.copy_(torch.randn(w.shape, generator=generator) * (0.1 * d_model ** -0.5))
        if self.gate.bias is not None:
            self.gate.bias.zero_()
        if self.noise is not None:
            self.noise.weight.zero_()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        b = self.gate.bias.float() if self.gate.bias is not None else None
        logits = nn.functional.linear(xf, self.gate.weight.float(), b)
        if self.noise is not None and self.training:
            std = nn.functional.softplus(nn.functional.linear(xf, self.noise.weight.float()))
            logits = logits + torch.randn_like(logits) * std
        return logits

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> RouterOutput:
        logits = self.logits(x)
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        return RouterOutput(top_i, gate_weights(top_p, self.gate_scaling), probs, logits)


class SwitchRouter(TopKRouter):
    """Switch Transformer top-1 router (Fedus et al. 2021): float32 logits, multiplicative
    jitter noise on the input while training, capacity ``ceil(T * capacity_factor / E)`` with
    overflow tokens dropped (they pass through the residual only) unless ``drop_tokens=False``.
    In eval mode ``eval_capacity_factor`` applies (``None``: no token is dropped)."""

    def __init__(self, *, d_model: int, num_experts: int, capacity_factor: float = 1.25,
                 drop_tokens: bool = True, eval_capacity_factor: float | None = None,
                 jitter_noise: float = 0.0, bias: bool = True, gate_scaling: str = "probs") -> None:
        super().__init__(d_model=d_model, num_experts=num_experts, top_k=1, bias=bias,
                         capacity_factor=capacity_factor, drop_tokens=drop_tokens,
                         eval_capacity_factor=eval_capacity_factor, gate_scaling=gate_scaling)
        if not 0.0 <= jitter_noise < 1.0:
            raise ValueError(f"jitter_noise must be in [0, 1), got {jitter_noise}")
        self.jitter_noise = jitter_noise

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_noise > 0:
            x = x.float() * torch.empty_like(x, dtype=torch.float32).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        return super().logits(x)


class HashRouter(Router):
    """Hash routing (Roller et al. 2021): a fixed token-id -> expert table, no learned weights.

    Needs the token ids ``(T,)`` of the routed positions; :func:`tnmoe.moe.convert` wires them
    from the model's ``input_ids`` for each call (and clears them after it). The table is a
    seeded random balanced assignment over ``vocab_size`` ids; ids beyond it wrap around.
    Capacity (``capacity_factor`` / ``eval_capacity_factor``) applies as for the other routers.
    """

    uses_token_ids = True

    def __init__(self, *, num_experts: int, vocab_size: int = 65536, seed: int = 0,
                 capacity_factor: float | None = None, drop_tokens: bool = True,
                 eval_capacity_factor: float | None = None) -> None:
        super().__init__()
        _check(num_experts, 1, None)
        check_capacity(capacity_factor, eval_capacity_factor)
        if not _is_int(vocab_size) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer (the hash table size), got {vocab_size!r}")
        self.num_experts, self.top_k = num_experts, 1
        g = torch.Generator().manual_seed(seed)
        table = torch.arange(vocab_size) % num_experts
        self.register_buffer("table", table[torch.randperm(vocab_size, generator=g)], persistent=True)
        self.capacity_factor, self.drop_tokens = capacity_factor, drop_tokens
        self.eval_capacity_factor = eval_capacity_factor

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> RouterOutput:
        if token_ids is None:
            raise ValueError(
                "HashRouter needs the token ids of the routed tokens: call the MoE layer with "
                "token_ids=..., or call the model converted by tnmoe.moe.convert (which passes its "
                "input_ids to the layers during that call only)"
            )
        ids = token_ids.reshape(-1).to(self.table.device) % self.table.numel()
        if ids.numel() != x.shape[0]:
            raise ValueError(f"got {ids.numel()} token ids for {x.shape[0]} tokens")
        idx = self.table[ids].unsqueeze(-1)
        probs = nn.functional.one_hot(idx.squeeze(-1), self.num_experts).float()
        ones = torch.ones(idx.shape, dtype=x.dtype, device=x.device)
        return RouterOutput(idx, ones, probs, None)
