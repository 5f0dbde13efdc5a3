"""``ExpertFFN``: n FFN experts composed from expert banks (:class:`~tnmoe.moe.banks.ExpertBank`)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .banks import ExpertBank

__all__ = ["ExpertFFN", "ClampedSwiGLU"]


class ClampedSwiGLU(nn.Module):
    """gpt-oss's gated activation: ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``
    with ``g = clamp(gate, max=limit)``. Called as ``glu(gate, up)`` (pre-activations, same shape)."""

    def __init__(self, alpha: float, limit: float) -> None:
        super().__init__()
        self.alpha, self.limit = float(alpha), float(limit)

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, limit={self.limit}"


class ExpertFFN(nn.Module):
    """n FFN experts: ``down(dropout(act(up(x)) [* gate path]))`` with optional per-expert biases.

    Gated variant (T5 v1.1 / LLaMA): ``h = act(gate(x)) * up(x)``; with ``glu`` (e.g.
    :class:`ClampedSwiGLU`) ``h = glu(gate(x), up(x))`` instead (``activation`` unused). Banks implement
    :class:`~tnmoe.moe.banks.ExpertBank`: ``up``/``gate`` ``(E, d_ff, d_model)``, ``down``
    ``(E, d_model, d_ff)``.

    :meth:`forward` takes tokens already grouped by expert: ``x`` ``(A, d_model)`` whose first
    ``counts[0]`` rows go to expert 0, the next ``counts[1]`` to expert 1, ... and returns
    ``(A, d_model)``.
    """

    def __init__(
        self,
        *,
        up: ExpertBank,
        down: ExpertBank,
        gate: ExpertBank | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] = nn.functional.gelu,
        up_bias: bool = False,
        down_bias: bool = False,
        dropout: float = 0.0,
        gate_bias: bool = False,
        glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        for name, bank in (("up", up), ("down", down), ("gate", gate)):
            if bank is not None and not isinstance(bank, ExpertBank):
                raise TypeError(f"{name} must implement tnmoe.moe.ExpertBank, got {type(bank).__name__}")
        self.up, self.down, self.gate = up, down, gate
        self.num_experts = up.num_experts
        self.d_model, self.d_ff = up.in_features, up.out_features
        if down.num_experts != self.num_experts or (gate is not None and gate.num_experts != self.num_experts):
            raise ValueError("up, down and gate banks need the same number of experts")
        if down.in_features != self.d_ff or down.out_features != self.d_model:
            raise ValueError(
                f"down bank maps {down.in_features}->{down.out_features}, expected {self.d_ff}->{self.d_model}"
            )
        if gate is not None and (gate.in_features, gate.out_features) != (self.d_model, self.d_ff):
            raise ValueError(f"gate bank maps {gate.in_features}->{gate.out_features}, expected {self.d_model}->{self.d_ff}")
        if (gate_bias or glu is not None) and gate is None:
            raise ValueError("gate_bias / glu need a gate bank")
        self.activation = activation
        self.glu = glu
        ref = next(up.parameters())
        factory = {"dtype": ref.dtype, "device": ref.device}
        self.up_bias = nn.Parameter(torch.zeros(self.num_experts, self.d_ff, **factory)) if up_bias else None
        self.down_bias = nn.Parameter(torch.zeros(self.num_experts, self.d_model, **factory)) if down_bias else None
        self.gate_bias = nn.Parameter(torch.zeros(self.num_experts, self.d_ff, **factory)) if gate_bias else None
        self.dropout = nn.Dropout(dropout)

    def banks(self) -> dict[str, ExpertBank]:
        out = {"up": self.up, "down": self.down}
        if self.gate is not None:
            out["gate"] = self.gate
        return out

    @staticmethod
    def _add_bias(h: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
        if bias is None:
            return h
        return h + bias.index_select(0, rows).to(h.dtype)

    def forward(self, x: torch.Tensor, counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """``x`` ``(A, d_model)`` grouped by expert, ``counts`` ``(E,)`` (a device tensor keeps
        the dropless path free of host syncs) -> ``(A, d_model)``."""
        rows = None
        if self.up_bias is not None or self.down_bias is not None or self.gate_bias is not None:
            # expert of each grouped row, for the per-expert biases (static shapes: no host sync)
            ends = torch.cumsum(torch.as_tensor(counts, device=x.device), 0)
            rows = torch.searchsorted(ends, torch.arange(x.shape[0], device=x.device), right=True)
        h = self._add_bias(self.up(x, counts), self.up_bias, rows)
        if self.gate is not None:
            g = self._add_bias(self.gate(x, counts), self.gate_bias, rows)
            h = self.glu(g, h) if self.glu is not None else self.activation(g) * h
        else:
            h = self.activation(h)
        y = self.down(self.dropout(h), counts)
        return self._add_bias(y, self.down_bias, rows)
