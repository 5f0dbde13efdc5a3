"""Expert banks: ``E`` weight matrices behind one small interface (:class:`ExpertBank`).

:class:`MPOExpertBank` is a :class:`tnmoe.networks.MPOBank` whose matrices are experts (any
subset of cores shared); :class:`DenseExpertBank` holds plain stacked matrices ``(E, out, in)``
(the +MoE / +Switch baselines); :class:`BaseDeltaExpertBank` is one shared base matrix plus a
low-rank delta per expert (D²-MoE's structure). :class:`~tnmoe.moe.ExpertFFN` composes banks through
:class:`ExpertBank` only, so a new kind of bank needs no change there.

Grouped inputs: ``bank(x, counts)`` (the bank's ``forward``; not ``apply``, which
``nn.Module`` reserves for ``model.apply(fn)``) takes tokens grouped by expert, ``x`` ``(A, in)`` whose
first ``counts[0]`` rows go to expert 0, the next ``counts[1]`` to expert 1, ... and returns
``(A, out)``. :func:`~tnmoe.moe.grouped.grouped_linear` is the one place the expert matmuls
happen (``torch._grouped_mm`` where available, a per-expert loop otherwise).
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from ..networks import ContractionEngine, MPOBank, base_delta_params, fit_base_delta
from .grouped import grouped_linear

__all__ = ["ExpertBank", "MPOExpertBank", "DenseExpertBank", "BaseDeltaExpertBank"]


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


def _check_grouped(x: torch.Tensor, counts, num_experts: int):
    if isinstance(counts, torch.Tensor):
        if tuple(counts.shape) != (num_experts,):
            raise ValueError(f"counts must have shape ({num_experts},), got {tuple(counts.shape)}")
        return counts
    counts = [int(c) for c in counts]
    if len(counts) != num_experts or sum(counts) != x.shape[0] or min(counts) < 0:
        raise ValueError(f"counts must be {num_experts} non-negative ints summing to the {x.shape[0]} rows, got {counts}")
    return counts


def _check_num_experts(num_experts: int) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")


class MPOExpertBank(MPOBank):
    """``num_experts`` MPO experts ``(out, in)`` sharing the cores in ``share`` (default the
    central one: MPOE). Shared core ``k``: ``(r, o_k, i_k, r')``; own core: ``(E, r, o_k, i_k, r')``.

    :meth:`forward` streams each expert's tokens through its cores when that is cheaper by FLOP
    estimate (few tokens, small bonds), else rebuilds every expert's matrix (from the inference
    cache when allowed; once per optimizer step inside
    :func:`~tnmoe.networks.accumulate_reconstruction`) and runs :func:`grouped_linear`.
    """

    def __init__(self, *, num_experts: int, in_factors: Sequence[int], out_factors: Sequence[int],
                 max_bond: int | None = None, share: str | Sequence[int] = "central", init: str = "random",
                 engine: ContractionEngine | None = None, cache_weights: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 bond_dims: Sequence[int] | None = None) -> None:
        _check_num_experts(num_experts)
        super().__init__(num_matrices=num_experts, in_factors=in_factors, out_factors=out_factors,
                         max_bond=max_bond, share=share, init=init, engine=engine,
                         cache_weights=cache_weights, dtype=dtype, device=device, bond_dims=bond_dims)
        #: expert matmul implementation, see :func:`grouped_linear`
        self.grouped_impl = "auto"

    @property
    def num_experts(self) -> int:
        return self.num_matrices

    def expert_mpo(self, expert: int):
        return self.mpo(expert)

    def expert_parameters(self) -> list[nn.Parameter]:
        return self.stacked_parameters()

    def num_params_per_expert(self) -> int:
        return self.num_params_per_matrix()

    def forward(self, x: torch.Tensor, counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
        counts = _check_grouped(x, counts, self.num_experts)
        if x.shape[0] == 0:
            return x.new_zeros(0, self.out_features, dtype=self._out_dtype())
        use_cache = self.use_weight_cache()
        per_expert = max(1, x.shape[0] // self.num_experts)
        if not use_cache and not self.accumulating and self.stream_is_cheaper(per_expert):
            counts = counts.tolist() if isinstance(counts, torch.Tensor) else counts
            active = [e for e in range(self.num_experts) if counts[e] > 0]
            n = counts[active[0]]
            if len(active) > 1 and all(counts[e] == n for e in active) and self._batch_streams(len(active)) \
                    and self._chain_method(n) != "opt_einsum":
                # the same token count per active expert (decode: one token each): one batched
                # GEMM per core for all of them instead of a Python loop over the experts
                y = self.stream_batched(x.reshape(len(active), n, self.in_features),
                                        None if len(active) == self.num_experts else active)
                return y.reshape(-1, self.out_features)
            return self.stream_grouped(x, counts)  # shared cores at either end once for all tokens
        if not use_cache and not self.accumulating and not self._needs_core_grad() \
                and not torch.compiler.is_compiling():
            # inference without a cache (cache_weights=False or over the cache budget): rebuild
            # only the experts that have tokens (at decode, one or a few of E)
            counts = counts.tolist() if isinstance(counts, torch.Tensor) else counts
            active = [e for e, c in enumerate(counts) if c > 0]
            if len(active) < self.num_experts:
                return grouped_linear(x, self.weights(active), [counts[e] for e in active], self.grouped_impl)
        W = self._cached_weights() if use_cache else self.weights()
        return grouped_linear(x, W, counts, self.grouped_impl)

    #: a subset of experts is streamed batched only while gathering its stacked cores copies at
    #: most this many bytes: past it the copy costs more than the per-expert Python loop it saves
    #: (measured on CPU: 2 of 8 rank-170 512x1024 experts, 1 MB each: loop 0.40 ms, batched 0.56-0.63 ms)
    BATCHED_STREAM_MAX_COPY_BYTES = 256 * 1024

    def _batch_streams(self, active: int) -> bool:
        if active == self.num_experts:
            return True  # every expert: the stacked cores are used as they are, no copy
        if torch.compiler.is_compiling():
            per_expert = sum(c[0].numel() * c.element_size() for c, b in zip(self.cores, self.batched) if b)
        else:
            per_expert = self._stream_memo(self.core_tensors())[4]
        return active * per_expert <= self.BATCHED_STREAM_MAX_COPY_BYTES

    def _needs_core_grad(self) -> bool:
        return torch.is_grad_enabled() and any(c.requires_grad for c in self.core_tensors())

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
        #: expert matmul implementation, see :func:`grouped_linear`
        self.grouped_impl = "auto"

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

    def forward(self, x: torch.Tensor, counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
        counts = _check_grouped(x, counts, self.num_experts)
        return grouped_linear(x, self.weight, counts, self.grouped_impl)

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


class BaseDeltaExpertBank(nn.Module):
    """``num_experts`` matrices ``W_e = base + delta_out[e] @ delta_in[e]``: ``base``
    ``(out, in)`` shared by every expert, a rank-``rank`` delta per expert, ``delta_out``
    ``(E, out, rank)`` and ``delta_in`` ``(E, rank, in)`` (D²-MoE's shared base plus low-rank
    deltas). ``out * in + E * rank * (out + in)`` parameters.

    :meth:`forward` never builds the experts' matrices: every routed token goes through the base
    (one GEMM) and through its expert's two delta factors (two grouped GEMMs), so inference holds
    only the parameters. ``init``: ``"empty"`` (to be loaded or fitted), or ``"zeros"``
    (``base`` zero; ``delta_out`` zero and ``delta_in`` small random, as LoRA starts, so every
    expert equals the base and the deltas still get gradients).
    """

    def __init__(self, *, num_experts: int, in_features: int, out_features: int, rank: int, init: str = "empty",
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_num_experts(num_experts)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer (each expert's delta rank), got {rank!r}")
        if init not in ("empty", "zeros"):
            raise ValueError(f"init must be 'empty' or 'zeros', got {init!r}")
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.rank = min(rank, in_features, out_features)
        dtype = dtype or torch.get_default_dtype()
        self.base = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.delta_out = nn.Parameter(torch.empty(num_experts, out_features, self.rank, dtype=dtype, device=device))
        self.delta_in = nn.Parameter(torch.empty(num_experts, self.rank, in_features, dtype=dtype, device=device))
        if init == "zeros" and not self.base.is_meta:
            with torch.no_grad():
                self.base.zero_()
                self.delta_out.zero_()
                noise = torch.randn(self.delta_in.shape, generator=generator, dtype=torch.float32, device="cpu")
                self.delta_in.copy_(noise / math.sqrt(in_features))
        #: expert matmul implementation, see :func:`grouped_linear`
        self.grouped_impl = "auto"

    @torch.no_grad()
    def load_matrix(self, W: torch.Tensor) -> None:
        """Every expert := ``W`` ``(out, in)``: ``base = W``, ``delta_out = 0`` (``delta_in`` kept)."""
        self.base.copy_(W.to(self.base.dtype))
        self.delta_out.zero_()

    @torch.no_grad()
    def fit_matrices(self, targets: torch.Tensor, calibration=None, **options):
        """Set ``base`` and the deltas to :func:`~tnmoe.networks.fit_base_delta`'s fit of
        ``targets`` ``(E, out, in)`` (``calibration``: ``None`` for data-blind, one, or a list of
        E; ``options``: ``sweeps``, ``tol``, ``damping``, ``progress``). Returns its FitReport."""
        if targets.dim() != 3 or tuple(targets.shape) != (self.num_experts, self.out_features, self.in_features):
            raise ValueError(f"targets must be ({self.num_experts}, {self.out_features}, {self.in_features}), got "
                             f"shape {tuple(targets.shape)}")
        B, U, V, report = fit_base_delta(list(targets), self.rank, calibration=calibration, **options)
        self.base.copy_(B)
        self.delta_out.copy_(U)
        self.delta_in.copy_(V)
        return report

    def weights(self, experts: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        U, V = self.delta_out, self.delta_in
        if experts is not None:
            idx = torch.as_tensor(experts, dtype=torch.long, device=U.device)
            U, V = U.index_select(0, idx), V.index_select(0, idx)
        return self.base + torch.bmm(U, V)

    def forward(self, x: torch.Tensor, counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
        counts = _check_grouped(x, counts, self.num_experts)
        y = torch.nn.functional.linear(x, self.base)
        h = grouped_linear(x, self.delta_in, counts, self.grouped_impl)  # (A, rank)
        return y + grouped_linear(h, self.delta_out, counts, self.grouped_impl)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.base]

    def expert_parameters(self) -> list[nn.Parameter]:
        return [self.delta_out, self.delta_in]

    def num_shared_params(self) -> int:
        return self.out_features * self.in_features

    def num_params_per_expert(self) -> int:
        return self.rank * (self.out_features + self.in_features)

    def num_params(self) -> int:
        return base_delta_params(self.num_experts, self.out_features, self.in_features, self.rank)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, out={self.out_features}, in={self.in_features}, rank={self.rank}"
