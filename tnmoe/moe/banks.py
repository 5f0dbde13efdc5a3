"""Expert banks: ``E`` weight matrices behind one small interface (:class:`ExpertBank`).

:class:`MPOExpertBank` is a :class:`tnmoe.networks.MPOBank` whose matrices are experts (any
subset of cores shared); :class:`DenseExpertBank` holds plain stacked matrices ``(E, out, in)``
(the +MoE / +Switch baselines). :class:`~tnmoe.moe.ExpertFFN` composes banks through
:class:`ExpertBank` only, so a new kind of bank needs no change there.

Grouped inputs: ``bank(x, counts)`` (the bank's ``forward``; not ``apply``, which
``nn.Module`` reserves for ``model.apply(fn)``) takes tokens grouped by expert, ``x`` ``(A, in)`` whose
first ``counts[0]`` rows go to expert 0, the next ``counts[1]`` to expert 1, ... and returns
``(A, out)``. Experts with no tokens are not computed. :func:`grouped_linear` is the one place
the per-expert matmuls happen (the hook to override with a grouped GEMM).
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from ..networks import ContractionEngine, MPOBank

__all__ = ["ExpertBank", "MPOExpertBank", "DenseExpertBank", "grouped_linear"]


@runtime_checkable
class ExpertBank(Protocol):
    """What :class:`~tnmoe.moe.ExpertFFN` needs from a bank of ``num_experts`` matrices
    ``(out_features, in_features)``."""

    num_experts: int
    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Grouped ``x @ W_e.T``: ``(A, in)`` -> ``(A, out)`` (see the module docstring)."""

    def weights(self, experts: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Dense matrices ``(E', out, in)`` of ``experts`` (default all), differentiable."""

    def shared_parameters(self) -> list[nn.Parameter]:
        """Tensors every expert uses (each once)."""

    def expert_parameters(self) -> list[nn.Parameter]:
        """Tensors with one slice per expert (leading dim ``E``)."""

    def num_shared_params(self) -> int: ...

    def num_params_per_expert(self) -> int: ...


def grouped_linear(x: torch.Tensor, weights: Sequence[torch.Tensor] | dict[int, torch.Tensor],
                   counts: Sequence[int]) -> torch.Tensor:
    """``x`` ``(A, in)`` grouped by expert (``counts``) times each expert's ``weights[e]``
    ``(out, in)``: ``(A, out)``. ``weights`` come from ``W.unbind(0)``, so the backward stacks
    the experts' gradients in one allocation."""
    pieces = torch.split(x, list(counts))
    outs = [nn.functional.linear(p, weights[e]) for e, p in enumerate(pieces) if counts[e] > 0]
    if not outs:
        out_features = next(iter(weights.values() if isinstance(weights, dict) else weights)).shape[0]
        return x.new_zeros(0, out_features)
    return torch.cat(outs, 0) if len(outs) > 1 else outs[0]


def _check_num_experts(num_experts: int) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")


def _counts(counts: Sequence[int], num_experts: int, rows: int) -> list[int]:
    counts = [int(c) for c in counts]
    if len(counts) != num_experts or sum(counts) != rows or min(counts) < 0:
        raise ValueError(f"counts must be {num_experts} non-negative ints summing to the {rows} rows, got {counts}")
    return counts


class MPOExpertBank(MPOBank):
    """``num_experts`` MPO experts ``(out, in)`` sharing the cores in ``share`` (default the
    central one: MPOE). Shared core ``k``: ``(r, o_k, i_k, r')``; own core: ``(E, r, o_k, i_k, r')``.

    :meth:`forward` streams each expert's tokens through its cores when that is cheaper by FLOP
    estimate (few tokens, small bonds), else rebuilds the active experts' matrices (from the
    inference cache when allowed) and runs :func:`grouped_linear`.
    """

    def __init__(self, *, num_experts: int, in_factors: Sequence[int], out_factors: Sequence[int],
                 max_bond: int | None = None, share: str | Sequence[int] = "central", init: str = "random",
                 engine: ContractionEngine | None = None, cache_weights: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        _check_num_experts(num_experts)
        super().__init__(num_matrices=num_experts, in_factors=in_factors, out_factors=out_factors,
                         max_bond=max_bond, share=share, init=init, engine=engine,
                         cache_weights=cache_weights, dtype=dtype, device=device)

    @property
    def num_experts(self) -> int:
        return self.num_matrices

    def expert_mpo(self, expert: int):
        return self.mpo(expert)

    def expert_parameters(self) -> list[nn.Parameter]:
        return self.stacked_parameters()

    def num_params_per_expert(self) -> int:
        return self.num_params_per_matrix()

    def forward(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        counts = _counts(counts, self.num_experts, x.shape[0])
        active = [e for e, c in enumerate(counts) if c > 0]
        if not active:
            return x.new_zeros(0, self.out_features, dtype=self._out_dtype())
        use_cache = self.use_weight_cache()
        if not use_cache and self.plan(max(1, x.shape[0] // len(active))).mode == "stream":
            pieces = torch.split(x, counts)
            return torch.cat([self.stream(pieces[e], e) for e in active], 0)
        if use_cache or len(active) == self.num_experts:
            W = self.weights_for_inference() if use_cache else self.weights()
            return grouped_linear(x, W.unbind(0), counts)
        return grouped_linear(x, dict(zip(active, self.weights(active).unbind(0))), counts)

    def extra_repr(self) -> str:
        return super().extra_repr().replace("num_matrices=", "num_experts=")


class DenseExpertBank(nn.Module):
    """``num_experts`` plain dense matrices, ``weight`` ``(E, out, in)`` (+MoE / +Switch)."""

    def __init__(self, *, num_experts: int, in_features: int, out_features: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        _check_num_experts(num_experts)
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features,
                                               dtype=dtype or torch.get_default_dtype(), device=device))
        if not self.weight.is_meta:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.weight, -bound, bound)

    @torch.no_grad()
    def load_matrix(self, W: torch.Tensor, noise_std: float = 0.0, generator: torch.Generator | None = None) -> None:
        """Every expert := ``W`` ``(out, in)``, plus ``noise_std * std(W)`` Gaussian noise."""
        self.weight.copy_(W.to(self.weight.dtype).expand_as(self.weight))
        if noise_std > 0:
            noise = torch.randn(self.weight.shape, generator=generator, dtype=torch.float32)
            self.weight.add_(noise.to(self.weight) * noise_std * float(W.float().std()))

    def weights(self, experts: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        if experts is None:
            return self.weight
        return self.weight.index_select(0, torch.as_tensor(experts, dtype=torch.long, device=self.weight.device))

    def forward(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        counts = _counts(counts, self.num_experts, x.shape[0])
        return grouped_linear(x, self.weight.unbind(0), counts)

    def shared_parameters(self) -> list[nn.Parameter]:
        return []

    def expert_parameters(self) -> list[nn.Parameter]:
        return [self.weight]

    def num_shared_params(self) -> int:
        return 0

    def num_params_per_expert(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, out={self.out_features}, in={self.in_features}"
