"""``MPOBank``: the one MPO parameter container. ``E`` matrices ``(out, in)`` whose cores are
each either one shared parameter or stacked per matrix; weights, streaming, planning, mixed
precision and the inference weight cache live here, once.

A bank of ``E`` matrices is tensor algebra: :class:`~tnmoe.networks.MPOLinear` is its ``E = 1``
case, MoE experts (:mod:`tnmoe.moe`) are banks with ``E = num_experts``, and tying a core to
another bank's (:meth:`MPOBank.tie_cores`) shares it across layers.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..runtime import freed_cpu_memory_retained
from .cache import DerivedTensorCache, WeightsChangedError, inference_cache_allowed, track_parameters
from .contraction import (
    CHAIN_STREAM_MAX_TOKENS,
    ContractionEngine,
    ContractionPlan,
    default_engine,
    stream_chain,
    stream_chain_batched,
    stream_chain_grouped,
)
from .decompose import check_bond
from .fit import fit_mpo_bank, resolve_bonds
from .factorize import check_factors
from .mpo import MPO, mpo_core_shapes, scale_cores_to_std, spread

__all__ = ["MPOBank", "accumulate_reconstruction", "clear_weight_caches", "discard_accumulation", "frozen_weights",
           "set_weight_cache_budget", "set_weight_cache_validation",
           "resolve_share", "check_input_dtype", "SHARE_NAMES", "RECONSTRUCT_STRATEGIES"]

SHARE_NAMES = ("central", "auxiliary", "all", "none")
RECONSTRUCT_STRATEGIES = ("auto", "batched", "loop")
_HALF = (torch.float16, torch.bfloat16)


def resolve_share(share: str | Sequence[int], m: int) -> list[int]:
    """Indices of the cores shared by every matrix of a bank of MPOs with ``m`` cores.

    ``"central"``: the central core ``(m-1)//2`` (MPOE); ``"auxiliary"``: every other core;
    ``"all"``: every core (all matrices identical); ``"none"``: no sharing; or a list of
    indices (negative ones count from the end).
    """
    central = (m - 1) // 2
    if isinstance(share, str):
        named = {"central": [central], "auxiliary": [k for k in range(m) if k != central],
                 "all": list(range(m)), "none": []}
        if share not in named:
            raise ValueError(f"share must be one of {SHARE_NAMES} or a list of core indices, got {share!r}")
        return named[share]
    out = []
    for k in share:
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"share indices must be integers, got {k!r}")
        if not -m <= k < m:
            raise ValueError(f"share index {k} is out of range for an MPO with m={m} cores (valid: 0..{m - 1})")
        out.append(k % m)
    return sorted(set(out))


def _autocast_off(device_type: str):
    """A context that disables autocast on ``device_type``; a no-op one when it is off already."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def check_input_dtype(x: torch.Tensor, dtype: torch.dtype, where: str) -> None:
    """Raise a clear ``ValueError`` when ``x``'s dtype cannot meet parameters of ``dtype``
    (outside autocast, which casts both sides itself)."""
    if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
        return
    raise ValueError(
        f"{where}: input dtype {x.dtype} does not match the parameters' dtype {dtype}; cast the "
        f"input (x.to({dtype})) or the module (.to({x.dtype})), or run under torch.autocast"
    )


class MPOBank(nn.Module):
    """``num_matrices`` MPO matrices of shape ``(out, in)``; the cores in ``share`` are shared.

    Shapes: shared core ``k``: ``(r_{k-1}, out_k, in_k, r_k)`` (one parameter); own core ``k``:
    ``(E, r_{k-1}, out_k, in_k, r_k)`` (stacked). :meth:`weights` returns ``(E', out, in)``.

    Precision policy (one for every contraction): MPO contractions run with autocast disabled,
    in the cores' dtype, or in float32 when the cores are float16/bfloat16; the rebuilt weight
    (and a streamed output) is then cast to the autocast dtype when autocast is on, else to the
    cores' dtype. So under ``torch.autocast`` the weight is rounded once, like ``nn.Linear``'s.

    Weight cache: :meth:`weights_for_inference` serves the rebuilt weights from a cache exactly
    when :func:`~tnmoe.networks.inference_cache_allowed` holds (eval mode, and no gradient can
    reach the cores) and ``cache_weights`` is on; a cached value is reused only while every core
    is provably unchanged (:class:`~tnmoe.networks.DerivedTensorCache`): by version counters and
    storages (O(1) per call; the cores are :class:`~tnmoe.networks.TrackedParameter`\ s, which
    count edits through ``.data`` and optimizer steps too), by values where counters cannot see every write
    (shared memory, ``torch.distributed``, ``validation="digest"``), or, inside
    :func:`frozen_weights`, by counters with edits refused loudly.

    Args (keyword-only):
        num_matrices: ``E``.
        in_factors / out_factors: local dims (``prod`` = in / out features), same length m.
        max_bond: bond cap (``None``: lossless bonds).
        bond_dims: instead of ``max_bond``, the m-1 inner bonds (each capped at lossless), e.g.
            chosen per matrix by a budget (:func:`~tnmoe.networks.fit.allocate_bonds`).
        share: cores shared by all matrices (:func:`resolve_share`).
        init: ``"random"`` (Gaussian cores scaled to ``nn.Linear``'s weight variance
            ``1 / (3 in)``) or ``"empty"`` (uninitialized, to be loaded).
        engine: contraction engine (default: the process-wide path cache).
        cache_weights: allow the inference weight cache.
    """

    def __init__(
        self,
        *,
        num_matrices: int = 1,
        in_factors: Sequence[int],
        out_factors: Sequence[int],
        max_bond: int | None = None,
        share: str | Sequence[int] = "none",
        init: str = "random",
        engine: ContractionEngine | None = None,
        cache_weights: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        bond_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_matrices, bool) or not isinstance(num_matrices, int) or num_matrices < 1:
            raise ValueError(f"num_matrices must be a positive integer, got {num_matrices!r}")
        if init not in ("random", "empty"):
            raise ValueError(f"init must be 'random' or 'empty', got {init!r}")
        check_bond(max_bond, None)
        in_factors = check_factors(math.prod(in_factors), in_factors, "input dimension")
        out_factors = check_factors(math.prod(out_factors), out_factors, "output dimension")
        shared = resolve_share(share, len(in_factors))
        if bond_dims is None:
            shapes = mpo_core_shapes(in_factors, out_factors, max_bond)
        else:
            inner = resolve_bonds(in_factors, out_factors, max_bond, bond_dims)
            bonds = [1, *inner, 1]
            shapes = [(bonds[k], o, i, bonds[k + 1]) for k, (o, i) in enumerate(zip(out_factors, in_factors))]
        factory = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        cores = [torch.empty(((num_matrices,) if k not in shared else ()) + s, **factory)
                 for k, s in enumerate(shapes)]
        self._setup(cores, shared, num_matrices, engine=engine, cache_weights=cache_weights)
        if init == "random" and not self.cores[0].is_meta:
            self.reset_parameters()

    def _setup(self, cores: Sequence[torch.Tensor], shared: Sequence[int], num_matrices: int, *,
               engine: ContractionEngine | None, cache_weights: bool) -> None:
        self.num_matrices = num_matrices
        self.shared_indices = list(shared)
        self.batched = [k not in self.shared_indices for k in range(len(cores))]
        self.cores = nn.ParameterList([c if isinstance(c, nn.Parameter) else nn.Parameter(c) for c in cores])
        track_parameters(self.core_tensors())  # from birth: edits through any later .data alias are counted
        self._engine = engine
        self.cache_weights = cache_weights
        #: how :meth:`weights` contracts several matrices: "batched" (one contraction with a
        #: matrix axis), "loop" (one at a time) or "auto" (batched on CUDA, and on CPU when freed
        #: memory is retained (:func:`tnmoe.retain_freed_cpu_memory`); loop otherwise)
        self.reconstruct_strategy = "auto"
        #: the inference weight cache (:class:`DerivedTensorCache`; ``hits``/``misses`` count its use)
        self.weight_cache = DerivedTensorCache()
        self._accumulating: str | None = None  # None, "early" or "last"
        self._accumulation: _Accumulation | None = None
        self._plan_memo: tuple | None = None  # see _shape_plan
        # relative Frobenius error ||W - W_mpo|| / ||W|| of the matrix this bank was converted
        # from (set by tnmoe.moe.convert; None for banks built otherwise; not saved)
        self.conversion_error: float | None = None

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random cores whose matrices have ``nn.Linear``'s weight variance ``1 / (3 in)``;
        every matrix its own draw for stacked cores. The shared cores are matrix 0's draw; each
        later matrix's stacked cores are rescaled against them, so every matrix has that std."""
        target = 1.0 / math.sqrt(3 * self.in_features)
        shared: list[torch.Tensor] = []
        for j in range(self.num_matrices if any(self.batched) else 1):
            mpo = MPO.random(self.in_factors, self.out_factors, self.bond_dims[1:-1], generator=generator,
                             std=target, dtype=torch.float64)
            cores = list(mpo.cores)
            if j == 0:
                shared = cores
            else:
                cores = [c if b else s for c, s, b in zip(cores, shared, self.batched)]
                cores = scale_cores_to_std(cores, target, scalable=self.batched)
            for k, (dst, src) in enumerate(zip(self.cores, cores)):
                if self.batched[k]:
                    dst[j].copy_(src)
                elif j == 0:
                    dst.copy_(src)

    # -- structure -----------------------------------------------------------------------------
    @property
    def engine(self) -> ContractionEngine:
        return self._engine or default_engine()

    @property
    def m(self) -> int:
        return len(self.cores)

    def core_tensors(self) -> list[torch.Tensor]:
        """The cores in order: ``list(self.cores)`` without ``ParameterList``'s per-item lookup
        (~1 us instead of ~15 us: this runs on every forward)."""
        return list(self.cores._parameters.values())

    @property
    def core_shapes(self) -> list[tuple[int, int, int, int]]:
        """Shape ``(r, o_k, i_k, r')`` of each core of one matrix."""
        return [tuple(c.shape[1:]) if b else tuple(c.shape) for c, b in zip(self.core_tensors(), self.batched)]

    @property
    def in_factors(self) -> list[int]:
        return [s[2] for s in self.core_shapes]

    @property
    def out_factors(self) -> list[int]:
        return [s[1] for s in self.core_shapes]

    @property
    def in_features(self) -> int:
        return math.prod(self.in_factors)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_factors)

    @property
    def bond_dims(self) -> list[int]:
        shapes = self.core_shapes
        return [shapes[0][0]] + [s[-1] for s in shapes]

    def core(self, matrix: int, k: int) -> torch.Tensor:
        """Core ``k`` of ``matrix``: the shared parameter itself, or a view of the stacked one."""
        self._check_matrix(matrix)
        return self.cores[k][matrix] if self.batched[k] else self.cores[k]

    def _check_matrix(self, matrix: int) -> None:
        if not -self.num_matrices <= matrix < self.num_matrices:
            raise IndexError(f"matrix {matrix} out of range for a bank of {self.num_matrices} matrices")

    def mpo(self, matrix: int = 0) -> MPO:
        """Matrix ``matrix`` as a detached :class:`MPO`."""
        return MPO([self.core(matrix, k).detach() for k in range(self.m)])

    def shared_parameters(self) -> list[nn.Parameter]:
        """Cores shared by all matrices (each once)."""
        return [self.cores[k] for k in self.shared_indices]

    def stacked_parameters(self) -> list[nn.Parameter]:
        """Cores stacked with one slice per matrix."""
        return [c for c, b in zip(self.cores, self.batched) if b]

    def num_shared_params(self) -> int:
        return sum(p.numel() for p in self.shared_parameters())

    def num_params_per_matrix(self) -> int:
        """Scalars each matrix owns (its slices of the stacked cores)."""
        return sum(p[0].numel() for p in self.stacked_parameters())

    @torch.no_grad()
    def fit_matrices(self, targets: torch.Tensor, calibration, **options):
        """Set the cores to the data-aware fit of ``targets`` ``(E, out, in)`` under
        ``calibration`` (one, or a list of E: inputs ``(N, in)`` or
        :class:`~tnmoe.networks.fit.InputCovariance`), keeping this bank's bonds and shared
        cores (fitted jointly over all matrices); ``options``: of
        :func:`~tnmoe.networks.fit.fit_mpo_bank`. Returns its :class:`~tnmoe.networks.fit.FitReport`."""
        if targets.dim() != 3 or targets.shape[0] != self.num_matrices:
            raise ValueError(f"targets must be ({self.num_matrices}, out, in), got shape {tuple(targets.shape)}")
        cores, report = fit_mpo_bank(list(targets), self.in_factors, self.out_factors, calibration=calibration,
                                     bond_dims=self.bond_dims[1:-1], shared=self.shared_indices, **options)
        for dst, src, b in zip(self.cores, cores, self.batched):
            dst.copy_(src if b else src.reshape(dst.shape))
        self.weight_cache.clear()
        return report

    @torch.no_grad()
    def load_mpo(self, mpo: MPO, noise_std: float = 0.0, generator: torch.Generator | None = None) -> None:
        """Set every matrix to ``mpo`` (core shapes must match); stacked cores get
        ``noise_std * std(core)`` Gaussian noise so the matrices can diverge."""
        for k, (src, dst, b) in enumerate(zip(mpo.cores, self.cores, self.batched)):
            want = dst.shape[1:] if b else dst.shape
            if tuple(src.shape) != tuple(want):
                raise ValueError(f"core {k}: MPO shape {tuple(src.shape)} does not match the bank's {tuple(want)}")
            src = src.to(dst.dtype)
            if b:
                dst.copy_(src.expand_as(dst))
                if noise_std > 0:
                    noise = torch.randn(dst.shape, generator=generator, dtype=torch.float32)
                    dst.add_(noise.to(dst) * noise_std * spread(src.float()))
            else:
                dst.copy_(src)

    def tie_cores(self, other: "MPOBank", cores: Sequence[int]) -> None:
        """Make cores ``cores`` of this bank the very parameters of ``other``'s (sharing across
        layers, e.g. MPOBERT-style central tensors). Shapes and sharing layout must match."""
        for k in cores:
            mine, theirs = self.cores[k], other.cores[k]
            if mine.shape != theirs.shape or self.batched[k] != other.batched[k]:
                raise ValueError(
                    f"core {k}: cannot tie shape {tuple(mine.shape)} (stacked={self.batched[k]}) to "
                    f"{tuple(theirs.shape)} (stacked={other.batched[k]})"
                )
            self.cores[k] = theirs
        self.weight_cache.clear()

    # -- contraction ---------------------------------------------------------------------------
    def _work(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [t.float() if t.dtype in _HALF else t for t in tensors]

    def _out_dtype(self, core: torch.Tensor | None = None) -> torch.dtype:
        """The autocast dtype inside autocast (as nn.Linear's output), else the cores' dtype;
        float64 cores stay float64 (autocast leaves float64 tensors alone). ``core``: the first."""
        core = core if core is not None else self.core_tensors()[0]
        device_type = core.device.type
        if torch.is_autocast_enabled(device_type) and core.dtype != torch.float64:
            return torch.get_autocast_dtype(device_type)
        return core.dtype

    def weights(self, matrices: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Dense matrices ``(E', out, in)`` for ``matrices`` (default all), differentiable with
        respect to the cores; dtype per the precision policy. Inside
        :func:`accumulate_reconstruction` (training, grad enabled) the matrices are rebuilt once
        per optimizer step and their gradient reaches the cores once, at the last micro-batch."""
        if self._accumulating is not None and torch.is_grad_enabled():
            W = self._accumulated_weights()
            if matrices is not None:
                W = W.index_select(0, torch.as_tensor(matrices, dtype=torch.long, device=W.device))
        else:
            W = self._rebuild(matrices)
        return W.to(self._out_dtype())

    def _rebuild(self, matrices=None) -> torch.Tensor:
        """``(E', out, in)`` in the contraction dtype (autocast off), differentiable."""
        cores = self.core_tensors()
        if matrices is not None:
            idx = torch.as_tensor(matrices, dtype=torch.long, device=cores[0].device)
            cores = [c.index_select(0, idx) if b else c for c, b in zip(cores, self.batched)]
            n = int(idx.numel())
        else:
            n = self.num_matrices
        with torch.autocast(cores[0].device.type, enabled=False):
            cores = self._work(cores)
            if not any(self.batched):
                if matrices is not None and not isinstance(matrices, torch.Tensor) \
                        and any(not -self.num_matrices <= int(j) < self.num_matrices for j in matrices):
                    raise IndexError(f"matrices {list(matrices)} out of range for a bank of {self.num_matrices}")
                return self.engine.reconstruct(cores).unsqueeze(0).expand(n, -1, -1)
            if self._strategy(cores[0].device) == "loop":
                return torch.stack([self.engine.reconstruct([c[j] if b else c for c, b in zip(cores, self.batched)])
                                    for j in range(n)])
            return self.engine.reconstruct(cores, self.batched)

    def _accumulated_weights(self) -> torch.Tensor:
        key = tuple((c.data_ptr(), c._version) for c in self.cores)
        state = self._accumulation
        if state is not None and state.key != key:
            raise RuntimeError(
                "the cores changed inside an accumulation window (an optimizer step without a "
                "last=True micro-batch?): call each optimizer step's last micro-batch inside "
                "accumulate_reconstruction(model, last=True)"
            )
        if state is None:
            rebuilt = self._rebuild()
            state = self._accumulation = _Accumulation(key, rebuilt, rebuilt.detach().requires_grad_(True))
        if self._accumulating == "last":
            if state.closing is None:  # once per micro-batch, however often the bank is used
                state.closing = _AddAccumulatedGrad.apply(state.rebuilt, state.leaf)
            return state.closing
        return state.leaf

    @property
    def accumulating(self) -> bool:
        """Inside :func:`accumulate_reconstruction` (weights rebuilt once per optimizer step)."""
        return self._accumulating is not None

    def _strategy(self, device: torch.device) -> str:
        s = self.reconstruct_strategy
        if s not in RECONSTRUCT_STRATEGIES:
            raise ValueError(f"reconstruct_strategy must be one of {RECONSTRUCT_STRATEGIES}, got {s!r}")
        if s == "auto":  # batched allocates E-fold intermediates: cheap where memory is reused
            retained = device.type == "cpu" and freed_cpu_memory_retained()
            return "batched" if device.type == "cuda" or retained else "loop"
        return s

    def use_weight_cache(self, cores: Sequence[torch.Tensor] | None = None) -> bool:
        """Whether :meth:`weights_for_inference` may serve cached weights right now
        (``cores``: :meth:`core_tensors`, when the caller has them already)."""
        return self.cache_weights and inference_cache_allowed(self, cores if cores is not None else self.core_tensors())

    def weights_for_inference(self) -> torch.Tensor:
        """All matrices ``(E, out, in)``: from the cache when :meth:`use_weight_cache` holds
        (recomputed whenever a core changed), else freshly rebuilt."""
        if not self.use_weight_cache():
            return self.weights()
        return self._cached_weights()

    def _cached_weights(self, cores: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """:meth:`weights_for_inference` once :meth:`use_weight_cache` is known to hold."""
        cores = cores if cores is not None else self.core_tensors()
        W = self.weight_cache.get(cores, self._weights_in_core_dtype)
        return W.to(self._out_dtype(cores[0]))

    def _shape_plan(self, cores: Sequence[torch.Tensor]) -> tuple[int, dict[bool, float]]:
        """``(in_features, {weight_cached: stream threshold})`` for the cores' shapes, memoized
        per shape signature and engine (a forward at a few tokens is Python-bound)."""
        memo = self._stream_memo(cores)
        return memo[1], memo[2]

    def _stream_memo(self, cores: Sequence[torch.Tensor]) -> tuple:
        """``(signature, in_features, {weight_cached: stream threshold}, stream method at up to
        CHAIN_STREAM_MAX_TOKENS tokens, bytes of one matrix's slices of the stacked cores)``,
        memoized per shape signature and engine."""
        # the engine by id and the settings its estimate reads (an engine object would make the
        # module unpicklable); a stale entry could only pick stream vs rebuild, or one
        # contraction order for another, by another estimate, never a wrong value
        engine = self.engine
        signature = (tuple(c.shape for c in cores), cores[0].dtype, id(engine), engine.stream_margin,
                     engine.optimize)
        memo = self._plan_memo
        if memo is None or memo[0] != signature:
            shapes = self.core_shapes
            thresholds = {cached: engine.stream_threshold(shapes, cached) for cached in (False, True)}
            stacked = sum(c[0].numel() * c.element_size() for c, b in zip(cores, self.batched) if b)
            memo = self._plan_memo = (signature, math.prod(s[2] for s in shapes), thresholds,
                                      engine.stream_method(shapes, 1), stacked)
        return memo

    def _weights_in_core_dtype(self) -> torch.Tensor:
        with torch.autocast(self.cores[0].device.type, enabled=False):
            return self.weights()

    def clear_cache(self) -> None:
        self.weight_cache.clear()

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def stream(self, x: torch.Tensor, matrix: int = 0) -> torch.Tensor:
        """``x @ W_matrix.T`` for ``x`` ``(N, in)`` by contracting the tokens through the
        cores (never materializing ``W``); dtype per the precision policy."""
        self._check_matrix(matrix)
        every = self.core_tensors()
        cores = [c[matrix] if b else c for c, b in zip(every, self.batched)]
        out_dtype = self._out_dtype(cores[0])
        chain = self._chain_method(int(x.shape[0]), every)
        with _autocast_off(x.device.type):
            work = self._work(cores)
            x = x.to(work[0].dtype)
            if chain == "opt_einsum":
                y = self.engine.stream(x, work)
            else:
                y = stream_chain(x, work, from_left=chain == "chain_from_left")
        return y.to(out_dtype)

    def stream_grouped(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Each matrix's tokens streamed through its cores: ``x`` ``(N, in)`` sorted by matrix,
        ``counts[e]`` rows of matrix ``e``; shared cores at either end of the contraction order run
        once for all tokens (one stream per matrix instead when a matrix has more than
        ``CHAIN_STREAM_MAX_TOKENS`` tokens or no chain order applies)
        (:func:`~tnmoe.networks.contraction.stream_chain_grouped`). Returns ``(N, out)``."""
        every = self.core_tensors()
        chain = self._chain_method(max(counts), every)
        if chain == "opt_einsum":
            pieces = torch.split(x, list(counts))
            return torch.cat([self.stream(pieces[e], e) for e, n in enumerate(counts) if n > 0], 0)
        out_dtype = self._out_dtype(every[0])
        with _autocast_off(x.device.type):
            work = self._work(every)
            y = stream_chain_grouped(x.to(work[0].dtype), work, self.batched, counts,
                                     from_left=chain == "chain_from_left")
        return y.to(out_dtype)

    def stream_batched(self, x: torch.Tensor, matrices: Sequence[int] | None = None) -> torch.Tensor:
        """``x[j] @ W_{matrices[j]}.T`` for ``x`` ``(B, N, in)`` (the same ``N`` tokens per
        matrix): all ``B`` matrices streamed at once (:func:`~tnmoe.networks.contraction.stream_chain_batched`);
        ``matrices=None``: every matrix of the bank, in order. Returns ``(B, N, out)``."""
        if matrices is None:
            cores = list(self.cores)
            if any(self.batched) and x.shape[0] != self.num_matrices:
                raise ValueError(f"x holds {x.shape[0]} matrices' tokens; the bank has {self.num_matrices}")
        else:
            index = torch.as_tensor(list(matrices), dtype=torch.long, device=self.cores[0].device)
            cores = [c.index_select(0, index) if b else c for c, b in zip(self.cores, self.batched)]
        from_left = self._chain_method(int(x.shape[1])) == "chain_from_left"
        with _autocast_off(x.device.type):
            work = self._work(cores)
            y = stream_chain_batched(x.to(work[0].dtype), work, from_left=from_left)
        return y.to(self._out_dtype())

    def _chain_method(self, tokens: int, cores: Sequence[torch.Tensor] | None = None) -> str:
        """The engine's :meth:`~tnmoe.networks.ContractionEngine.stream_method` for ``tokens`` tokens
        per matrix; memoized per shape outside ``torch.compile`` (a few tokens is Python-bound)."""
        if tokens <= CHAIN_STREAM_MAX_TOKENS and not torch.compiler.is_compiling():
            return self._stream_memo(cores if cores is not None else self.core_tensors())[3]
        return self.engine.stream_method(self.core_shapes, tokens)

    def stream_is_cheaper(self, tokens: int, weight_cached: bool = False) -> bool:
        """Whether streaming ``tokens`` tokens through one matrix beats reconstruct+matmul
        (the engine's :meth:`~tnmoe.networks.ContractionEngine.stream_threshold`)."""
        if torch.compiler.is_compiling():
            return tokens < self.engine.stream_threshold(self.core_shapes, weight_cached)
        return tokens < self._stream_memo(self.core_tensors())[2][bool(weight_cached)]

    def plan(self, tokens: int, weight_cached: bool = False) -> ContractionPlan:
        """Stream vs reconstruct for ``tokens`` tokens through one matrix (FLOP estimates)."""
        return self.engine.plan(self.core_shapes, tokens, weight_cached=weight_cached)

    def extra_repr(self) -> str:
        return (f"num_matrices={self.num_matrices}, out_factors={self.out_factors}, "
                f"in_factors={self.in_factors}, bond_dims={self.bond_dims}, "
                f"shared_cores={self.shared_indices}")


@dataclass
class _Accumulation:
    key: tuple  # the cores' storage and versions when the weights were rebuilt
    rebuilt: torch.Tensor  # (E, out, in) with the graph back to the cores
    leaf: torch.Tensor  # the same values, detached: earlier micro-batches accumulate into .grad
    closing: torch.Tensor | None = None  # the last micro-batch's weights (carry the sum back)


class _AddAccumulatedGrad(torch.autograd.Function):
    """Forward: ``rebuilt``. Backward: this micro-batch's gradient plus the earlier
    micro-batches' (``leaf.grad``), so the reconstruction's backward runs once per step."""

    @staticmethod
    def forward(ctx, rebuilt: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        ctx.leaf = leaf
        return rebuilt.view_as(rebuilt)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        earlier = ctx.leaf.grad
        ctx.leaf.grad = None  # added once, however many backward passes run through this graph
        return (grad if earlier is None else grad + earlier), None


@contextlib.contextmanager
def accumulate_reconstruction(module: nn.Module, *, last: bool) -> Iterator[None]:
    """Amortize MPO reconstruction over gradient accumulation: wrap each micro-batch's forward
    and backward; ``last=True`` for the last micro-batch before ``optimizer.step()``.

    Every :class:`MPOBank` in ``module`` (``MPOLinear`` and MPO experts included) rebuilds its
    matrices once, at the first micro-batch of an optimizer step; earlier micro-batches
    accumulate the gradient with respect to the rebuilt matrices, and the last pushes the sum
    through the reconstruction once, inside its own backward (so DDP all-reduces the cores'
    gradients as usual; run earlier micro-batches under ``no_sync()``). A bank the last
    micro-batch leaves unused gets the earlier gradient pushed when its window closes (an error
    under multi-process training, where that gradient would not be all-reduced). The cores'
    gradients equal plain accumulation's up to float rounding. Plain loop::

        for i, batch in enumerate(loader):
            with accumulate_reconstruction(model, last=(i + 1) % K == 0):
                (loss_fn(model(batch)) / K).backward()
            if (i + 1) % K == 0:
                optimizer.step(); optimizer.zero_grad()

    A micro-batch that raises ends its window: the gradient accumulated so far is discarded
    (it would otherwise be added to the next optimizer step's). A window left open without an
    error (the loop stopped before its ``last=True`` micro-batch) keeps its gradient until
    :func:`discard_accumulation` or the next ``last=True`` micro-batch; ``optimizer.zero_grad()``
    does not reach it.

    Not for activation checkpointing that re-runs MPO layers in the backward pass.
    """
    banks = _banks(module)
    for bank in banks:
        bank._accumulating = "last" if last else "early"
    ended = last
    try:
        yield
        if last:
            for bank in banks:
                _flush_accumulated_grad(bank)
    except BaseException:
        ended = True  # a broken window: its earlier gradient must not reach the next step
        raise
    finally:
        for bank in banks:
            bank._accumulating = None
            if ended:  # the next micro-batch belongs to the next optimizer step
                bank._accumulation = None


def discard_accumulation(module: nn.Module) -> int:
    """End every open :func:`accumulate_reconstruction` window in ``module`` without applying
    it: the gradient its micro-batches accumulated is dropped and the next micro-batch rebuilds
    the weights. Call it where a loop abandons a window (stops before its ``last=True``
    micro-batch) and starts a new one, e.g. with ``optimizer.zero_grad()``. Returns the number
    of banks whose window was open."""
    banks = _banks(module)
    if any(bank._accumulating is not None for bank in banks):
        raise RuntimeError("discard_accumulation inside an accumulate_reconstruction block: call it between micro-batches")
    open_windows = [bank for bank in banks if bank._accumulation is not None]
    for bank in open_windows:
        bank._accumulation = None
    return len(open_windows)


@contextlib.contextmanager
def frozen_weights(module: nn.Module) -> Iterator[None]:
    """Declare the weights of every :class:`MPOBank` in ``module`` unchanging inside the block,
    so that the inference weight cache checks only version counters and storages (O(1) per
    call) instead of comparing every core with a snapshot (a read of every core per call).
    The decode-speed mode: wrap ``generate()`` (or a whole serving loop) in it::

        model.eval()
        with torch.inference_mode(), frozen_weights(model):
            out = model.generate(ids, max_new_tokens=64)

    Refused loudly (:class:`~tnmoe.networks.WeightsChangedError`): a core modified in place
    (optimizer step, ``copy_``, ``load_state_dict``) or replaced (``p.data = t``,
    ``load_state_dict(assign=True)``, ``.to(...)``) inside the block raises at the bank's next
    cached forward, as does any optimizer step on them (fused ones bump no version counter;
    a global optimizer step hook, registered for the block's duration, sees them); an edit
    no version counter sees (``p.data.mul_(...)``) raises when the block ends (an XXH3-128
    digest of the cores' bytes taken at entry is compared), as does any other change. Entry and
    exit each read every core once; nested blocks are owned by the outermost. Caches filled inside are kept for the next block (revalidated by digest there);
    outside, the default check rebuilds them once.
    """
    named = [(name, m) for name, m in module.named_modules() if isinstance(m, MPOBank)]
    owned: list[tuple[str, MPOBank]] = []
    try:
        for name, bank in named:
            if not bank.weight_cache.frozen:
                bank.weight_cache.freeze(bank.core_tensors())
                owned.append((name, bank))
    except BaseException:
        for _, bank in owned:
            bank.weight_cache.unfreeze(bank.core_tensors())
        raise
    # fused optimizers (fused=True) update parameters without bumping their version counters:
    # every optimizer step inside the block that touches a frozen core is announced to its cache
    caches = {id(core): bank.weight_cache for _, bank in owned for core in bank.cores}

    def note_step(optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                cache = caches.get(id(p))
                if cache is not None:
                    cache.note_change(f"an optimizer step ({type(optimizer).__name__}) updated the cores")

    hook = register_optimizer_step_post_hook(note_step)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        hook.remove()
        changed = []
        for name, bank in owned:
            why = bank.weight_cache.unfreeze(bank.core_tensors())
            if why is not None:
                changed.append(f"{name or type(bank).__name__}: {why}")
        if changed and not failed:
            raise WeightsChangedError(
                "weights changed inside frozen_weights(), where outputs may have used the old ones: "
                + "; ".join(changed) + ". Edit weights outside the block")


def set_weight_cache_budget(module: nn.Module, budget_bytes: int | None) -> list[dict]:
    """Bound the memory the inference weight caches of ``module``'s :class:`MPOBank`\ s may
    hold: banks are admitted in module order while their rebuilt weights (``E * out * in``
    elements of the cores' dtype each) fit in ``budget_bytes`` together; every other bank gets
    ``cache_weights = False`` and its cache is emptied now, so in inference it streams tokens
    through the cores, or rebuilds only the matrices that have tokens, per call. ``None``:
    no bound (every bank caches). A static plan: nothing is checked per call. On an
    accelerator the checked default cache also keeps a copy of the cores per cached bank (not
    counted; none in host memory, none inside :func:`frozen_weights`). Returns one row per bank: ``{"name", "bytes", "cached"}``."""
    if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int)
                                     or budget_bytes < 0):
        raise ValueError(f"budget_bytes must be a non-negative integer or None, got {budget_bytes!r}")
    plan, used = [], 0
    for name, bank in module.named_modules():
        if not isinstance(bank, MPOBank):
            continue
        size = bank.num_matrices * bank.out_features * bank.in_features * bank.cores[0].element_size()
        cached = budget_bytes is None or used + size <= budget_bytes
        used += size if cached else 0
        bank.cache_weights = cached
        if not cached:
            bank.clear_cache()
        plan.append({"name": name, "bytes": size, "cached": cached})
    return plan


def clear_weight_caches(module: nn.Module) -> int:
    """Empty the inference weight cache of every :class:`MPOBank` in ``module``: call it after
    writing cores through a path PyTorch does not count (a NumPy or DLPack view of a core,
    ``ctypes``), which the default version-counter check cannot see. Returns the number of banks."""
    banks = _banks(module)
    for bank in banks:
        bank.clear_cache()
    return len(banks)


def set_weight_cache_validation(module: nn.Module, validation: str) -> int:
    """How every :class:`MPOBank` in ``module`` proves a cached weight current:
    ``"auto"`` (the default: version counters where they see every write PyTorch makes, O(1)
    per call; values otherwise) or ``"digest"`` (also compare the cores' values on every call:
    one read of every core per call; for code that writes cores through NumPy/DLPack views).
    Returns the number of banks."""
    banks = _banks(module)
    for bank in banks:
        bank.weight_cache.validation = validation
    return len(banks)


def _banks(module: nn.Module) -> list[MPOBank]:
    return [m for m in module.modules() if isinstance(m, MPOBank)]


def _flush_accumulated_grad(bank: MPOBank) -> None:
    """At the end of an optimizer step's last micro-batch: earlier micro-batches' gradient that
    did not reach the cores (the bank was unused in the last micro-batch, streamed it, or ran it
    without grad) is pushed through the reconstruction now."""
    state = bank._accumulation
    if state is None or state.leaf.grad is None:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise RuntimeError(
            f"{type(bank).__name__}: earlier micro-batches' gradient never reached the cores, because "
            "this bank's rebuilt weights were not used with grad in the last micro-batch of the "
            "optimizer step; under distributed training a gradient pushed outside the wrapped "
            "model's backward would not be all-reduced. Use the bank in every last micro-batch, "
            "or train without accumulate_reconstruction (with MoETrainer: set its amortize_reconstruction = False)"
        )
    earlier, state.leaf.grad = state.leaf.grad, None
    torch.autograd.backward(state.rebuilt, earlier)
