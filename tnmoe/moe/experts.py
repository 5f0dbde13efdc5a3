"""Expert weights: banks of n matrices (MPO with any shared core subset, or dense) and the FFN
experts built from them.

A :class:`MPOBank` stores core ``k`` once as a ``(r, o_k, i_k, r')`` parameter when it is shared,
or stacked as ``(E, r, o_k, i_k, r')`` when each expert has its own, so one batched contraction
builds (or applies) all experts' matrices.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from ..networks import (
    MPO,
    ContractionEngine,
    DerivedTensorCache,
    check_factors,
    default_engine,
    inference_cache_allowed,
    mpo_core_shapes,
)

__all__ = ["resolve_share", "MPOBank", "DenseBank", "ExpertFFN"]

_SHARE_NAMES = ("central", "auxiliary", "all", "none")


def resolve_share(share: str | Sequence[int], m: int) -> list[int]:
    """Indices of the cores shared across experts for an MPO of ``m`` cores.

    ``"central"``: the central core ``(m-1)//2`` (MPOE); ``"auxiliary"``: every other core;
    ``"all"``: every core (all experts identical); ``"none"``: no sharing; or a list of indices
    (negative ones count from the end).
    """
    central = (m - 1) // 2
    if isinstance(share, str):
        if share == "central":
            return [central]
        if share == "auxiliary":
            return [k for k in range(m) if k != central]
        if share == "all":
            return list(range(m))
        if share == "none":
            return []
        raise ValueError(f"share must be one of {_SHARE_NAMES} or a list of core indices, got {share!r}")
    out = []
    for k in share:
        k = int(k)
        if not -m <= k < m:
            raise ValueError(
                f"share index {k} is out of range for an MPO with m={m} cores (valid: 0..{m - 1})"
            )
        out.append(k % m)
    return sorted(set(out))


class MPOBank(nn.Module):
    """``num_experts`` MPO matrices of shape ``(out, in)`` sharing the cores in ``share``.

    Shapes: shared core ``k``: ``(r_{k-1}, out_k, in_k, r_k)``; per-expert core ``k``:
    ``(E, r_{k-1}, out_k, in_k, r_k)``. :meth:`weights` returns ``(E', out, in)``.
    """

    def __init__(
        self,
        *,
        num_experts: int,
        in_factors: Sequence[int],
        out_factors: Sequence[int],
        max_bond: int | None = None,
        share: str | Sequence[int] = "central",
        engine: ContractionEngine | None = None,
        init: str = "random",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if init not in ("random", "empty"):
            raise ValueError(f"init must be 'random' or 'empty', got {init!r}")
        self.num_experts = num_experts
        self.in_factors = check_factors(math.prod(in_factors), in_factors, "input dimension")
        self.out_factors = check_factors(math.prod(out_factors), out_factors, "output dimension")
        if len(self.in_factors) != len(self.out_factors):
            raise ValueError(
                f"in_factors {self.in_factors} and out_factors {self.out_factors} need the same length"
            )
        m = len(self.in_factors)
        self.shared_indices = resolve_share(share, m)
        self.batched = [k not in self.shared_indices for k in range(m)]
        self._engine = engine
        #: how :meth:`weights` contracts several experts: "batched" (one einsum with an expert
        #: dim), "loop" (expert by expert) or "auto" (batched on CUDA, loop on CPU)
        self.reconstruct_strategy = "auto"
        factory = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        shapes = mpo_core_shapes(self.in_factors, self.out_factors, max_bond)
        self.cores = nn.ParameterList(
            [
                nn.Parameter(torch.empty(((num_experts,) if b else ()) + s, **factory))
                for s, b in zip(shapes, self.batched)
            ]
        )
        self._cache = DerivedTensorCache()
        if init == "random" and not self.cores[0].is_meta:
            self._init_random()

    def _init_random(self) -> None:
        self.load_mpo(MPO.random(self.in_factors, self.out_factors, self.bond_dims[1:-1],
                                 std=1.0 / math.sqrt(3 * self.in_features)))

    @property
    def engine(self) -> ContractionEngine:
        return self._engine or default_engine()

    @property
    def m(self) -> int:
        return len(self.in_factors)

    @property
    def in_features(self) -> int:
        return math.prod(self.in_factors)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_factors)

    @property
    def bond_dims(self) -> list[int]:
        shapes = [c.shape[1:] if b else c.shape for c, b in zip(self.cores, self.batched)]
        return [shapes[0][0]] + [s[-1] for s in shapes]

    def core(self, expert: int, k: int) -> torch.Tensor:
        """Core ``k`` of ``expert``: the shared parameter itself, or a view of the stacked one."""
        return self.cores[k][expert] if self.batched[k] else self.cores[k]

    def expert_mpo(self, expert: int) -> MPO:
        return MPO([self.core(expert, k).detach() for k in range(self.m)])

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.cores[k] for k in self.shared_indices]

    def expert_parameters(self) -> list[nn.Parameter]:
        return [c for c, b in zip(self.cores, self.batched) if b]

    def num_shared_params(self) -> int:
        return sum(p.numel() for p in self.shared_parameters())

    def num_params_per_expert(self) -> int:
        return sum(p[0].numel() for p in self.expert_parameters())

    @torch.no_grad()
    def load_mpo(self, mpo: MPO, noise_std: float = 0.0, generator: torch.Generator | None = None) -> None:
        """Set every expert to ``mpo`` (bond dims must match); per-expert cores get
        ``noise_std * std(core)`` Gaussian noise so experts can diverge."""
        for k, (src, dst, b) in enumerate(zip(mpo.cores, self.cores, self.batched)):
            want = dst.shape[1:] if b else dst.shape
            if tuple(src.shape) != tuple(want):
                raise ValueError(f"core {k}: MPO shape {tuple(src.shape)} does not match bank shape {tuple(want)}")
            src = src.to(dst.dtype)
            if b:
                dst.copy_(src.expand_as(dst))
                if noise_std > 0:
                    noise = torch.randn(dst.shape, generator=generator, dtype=torch.float32)
                    dst.add_(noise.to(dst) * noise_std * float(src.float().std()))
            else:
                dst.copy_(src)

    def weights(self, experts: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Dense matrices ``(E', out, in)`` for ``experts`` (default all), differentiable."""
        cores = list(self.cores)
        if experts is not None:
            idx = torch.as_tensor(experts, dtype=torch.long, device=cores[0].device)
            cores = [c.index_select(0, idx) if b else c for c, b in zip(cores, self.batched)]
            n = int(idx.numel())
        else:
            n = self.num_experts
        if not any(self.batched):
            return self.engine.reconstruct(cores).unsqueeze(0).expand(n, -1, -1)
        strategy = self.reconstruct_strategy
        if strategy == "auto":
            strategy = "batched" if cores[0].device.type == "cuda" else "loop"
        if strategy == "loop":
            # one expert at a time: smaller intermediates; measured faster on CPU
            return torch.stack([
                self.engine.reconstruct([c[j] if b else c for c, b in zip(cores, self.batched)])
                for j in range(n)
            ])
        return self.engine.reconstruct(cores, self.batched)

    def cached_weights(self) -> torch.Tensor:
        """All experts' matrices, cached until any core changes (inference)."""
        return self._cache.get(list(self.cores), self.weights)

    def stream(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """``x @ W_expert.T`` by contracting ``x`` ``(N, in)`` through the expert's cores."""
        return self.engine.stream(x, [self.core(expert, k) for k in range(self.m)])

    def plan(self, tokens: int):
        shapes = [tuple(c.shape[1:]) if b else tuple(c.shape) for c, b in zip(self.cores, self.batched)]
        return self.engine.plan(shapes, tokens)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, out_factors={self.out_factors}, "
                f"in_factors={self.in_factors}, bond_dims={self.bond_dims}, "
                f"shared_cores={self.shared_indices}")


class DenseBank(nn.Module):
    """``num_experts`` plain dense matrices, weight ``(E, out, in)`` (the +MoE/+Switch baseline)."""

    def __init__(self, *, num_experts: int, in_features: int, out_features: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features,
                                               dtype=dtype or torch.get_default_dtype(), device=device))
        if not self.weight.is_meta:
            nn.init.uniform_(self.weight, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))

    @torch.no_grad()
    def load_matrix(self, W: torch.Tensor, noise_std: float = 0.0, generator=None) -> None:
        self.weight.copy_(W.to(self.weight.dtype).expand_as(self.weight))
        if noise_std > 0:
            noise = torch.randn(self.weight.shape, generator=generator, dtype=torch.float32)
            self.weight.add_(noise.to(self.weight) * noise_std * float(W.float().std()))

    def weights(self, experts=None) -> torch.Tensor:
        if experts is None:
            return self.weight
        return self.weight.index_select(0, torch.as_tensor(experts, dtype=torch.long, device=self.weight.device))

    def cached_weights(self) -> torch.Tensor:
        return self.weight

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


class ExpertFFN(nn.Module):
    """n FFN experts: ``down(dropout(act(up(x)) [* gate-path]))`` with optional biases.

    Gated variant (T5 v1.1 / LLaMA): ``h = act(gate(x)) * up(x)``. Banks are :class:`MPOBank`
    or :class:`DenseBank` with ``up``/``gate``: ``(E, d_ff, d_model)``, ``down``: ``(E, d_model, d_ff)``.

    :meth:`forward` takes tokens already grouped by expert: ``x`` ``(A, d_model)`` whose first
    ``counts[0]`` rows go to expert 0, the next ``counts[1]`` to expert 1, ... and returns
    ``(A, d_model)``. Only experts with tokens are computed.
    """

    def __init__(
        self,
        *,
        up: nn.Module,
        down: nn.Module,
        gate: nn.Module | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] = nn.functional.gelu,
        up_bias: bool = False,
        down_bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.up, self.down, self.gate = up, down, gate
        self.num_experts = up.num_experts
        self.d_model, self.d_ff = up.in_features, up.out_features
        if down.in_features != self.d_ff or down.out_features != self.d_model:
            raise ValueError(
                f"down bank maps {down.in_features}->{down.out_features}, expected {self.d_ff}->{self.d_model}"
            )
        self.activation = activation
        dev = next(up.parameters()).device
        dt = next(up.parameters()).dtype
        self.up_bias = nn.Parameter(torch.zeros(self.num_experts, self.d_ff, dtype=dt, device=dev)) if up_bias else None
        self.down_bias = nn.Parameter(torch.zeros(self.num_experts, self.d_model, dtype=dt, device=dev)) if down_bias else None
        self.dropout = nn.Dropout(dropout)

    def banks(self) -> dict[str, nn.Module]:
        out = {"up": self.up, "down": self.down}
        if self.gate is not None:
            out["gate"] = self.gate
        return out

    def _use_stream(self, tokens_per_expert: float) -> bool:
        if not isinstance(self.up, MPOBank):
            return False
        n = max(int(round(tokens_per_expert)), 1)
        return all(b.plan(n).mode == "stream" for b in self.banks().values())

    def _use_cache(self) -> bool:
        return inference_cache_allowed(self, list(self.parameters()))

    def forward(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        counts = [int(c) for c in counts]
        active = [e for e, c in enumerate(counts) if c > 0]
        if not active:
            return x.new_zeros(x.shape[0], self.d_model)
        pieces = torch.split(x, counts)
        outs: list[torch.Tensor] = []
        use_cache = self._use_cache()
        stream = not use_cache and self._use_stream(sum(counts) / len(active))
        banks = self.banks()
        weights: dict[str, dict[int, torch.Tensor]] = {}
        if not stream:
            # unbind (not per-expert indexing): backward stacks the experts' grads in one allocation
            all_experts = use_cache or isinstance(self.up, DenseBank) or len(active) == self.num_experts
            for name, bank in banks.items():
                if all_experts:
                    full = bank.cached_weights() if use_cache else bank.weights()
                    weights[name] = dict(enumerate(full.unbind(0)))
                else:
                    weights[name] = dict(zip(active, bank.weights(active).unbind(0)))

        def lin(name: str, h: torch.Tensor, e: int) -> torch.Tensor:
            if stream:
                return banks[name].stream(h, e)
            return nn.functional.linear(h, weights[name][e])

        for e, xe in enumerate(pieces):
            if counts[e] == 0:
                continue
            h = lin("up", xe, e)
            if self.up_bias is not None:
                h = h + self.up_bias[e]
            if self.gate is not None:
                h = self.activation(lin("gate", xe, e)) * h
            else:
                h = self.activation(h)
            h = self.dropout(h)
            y = lin("down", h, e)
            if self.down_bias is not None:
                y = y + self.down_bias[e]
            outs.append(y)
        return torch.cat(outs, 0)
