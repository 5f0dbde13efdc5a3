"""Contraction engine: einsum equations for MPO networks, optimized and cached with opt_einsum.

Two ways to apply an MPO matrix ``W`` (shape ``(out, in)``) to tokens ``x`` (shape ``(N, in)``):

* ``"reconstruct"``: contract the cores into ``W``, then one dense matmul ``x @ W.T``;
* ``"stream"``: contract ``x`` (reshaped to ``(N, i_1, ..., i_m)``) through the cores directly.

:class:`ContractionEngine` prices both with opt_einsum's FLOP estimate for the actual ``N`` and
picks the cheaper; paths are computed once per shape signature and cached as
``opt_einsum.contract_expression`` objects (the opt_einsum idiom for repeated contractions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import opt_einsum as oe
import torch

from .chain import ChainPlan, chain_plan, chain_reconstruct

__all__ = [
    "ContractionPlan",
    "ContractionEngine",
    "reconstruct_equation",
    "apply_equation",
    "default_engine",
    "stream_chain",
    "stream_chain_flops",
]

Shape = tuple[int, ...]


def _sym(i: int) -> str:
    return oe.get_symbol(i)


def _mpo_symbols(m: int, batched: Sequence[bool]):
    # symbol layout: batch 'e' (experts) and 'n' (tokens), then bonds, outs, ins
    e, n = _sym(0), _sym(1)
    base = 2
    bonds = [_sym(base + k) for k in range(m + 1)]
    outs = [_sym(base + m + 1 + k) for k in range(m)]
    ins = [_sym(base + 2 * m + 1 + k) for k in range(m)]
    cores = [
        (e if batched[k] else "") + bonds[k] + outs[k] + ins[k] + bonds[k + 1] for k in range(m)
    ]
    return e, n, outs, ins, cores


def reconstruct_equation(m: int, batched: Sequence[bool] | None = None) -> str:
    """Equation turning m cores ``(r, o_k, i_k, r')`` into ``(o_1..o_m, i_1..i_m)``.

    Cores flagged in ``batched`` carry a leading expert dim ``E``; the output then gets it too.
    """
    batched = list(batched) if batched is not None else [False] * m
    e, _, outs, ins, cores = _mpo_symbols(m, batched)
    out = (e if any(batched) else "") + "".join(outs) + "".join(ins)
    return ",".join(cores) + "->" + out


def apply_equation(m: int) -> str:
    """Equation streaming tokens ``(N, i_1..i_m)`` through m cores ``(r, o_k, i_k, r')`` to
    ``(N, o_1..o_m)``."""
    _, n, outs, ins, cores = _mpo_symbols(m, [False] * m)
    return n + "".join(ins) + "," + ",".join(cores) + "->" + n + "".join(outs)


@dataclass(frozen=True)
class ContractionPlan:
    """The engine's decision for one call: ``mode`` is ``"stream"`` or ``"reconstruct"``;
    FLOPs are opt_einsum's estimates (multiply and add counted separately)."""

    mode: str
    tokens: int
    stream_flops: float
    reconstruct_flops: float
    matmul_flops: float
    #: opt_einsum pairwise contraction order (operand index pairs) of each way
    stream_path: tuple = ()
    reconstruct_path: tuple = ()

    @property
    def path(self) -> tuple:
        """The contraction order of the chosen mode (for "reconstruct": the rebuild of W)."""
        return self.stream_path if self.mode == "stream" else self.reconstruct_path

    def __str__(self) -> str:
        recon_total = self.reconstruct_flops + self.matmul_flops
        return (
            f"ContractionPlan(mode={self.mode!r}, tokens={self.tokens}, "
            f"stream={self.stream_flops:.3g} FLOPs, reconstruct={self.reconstruct_flops:.3g} "
            f"+ matmul={self.matmul_flops:.3g} = {recon_total:.3g} FLOPs, path={list(self.path)})"
        )


class ContractionEngine:
    """Caches optimized contraction paths/expressions keyed by (equation, shapes).

    Args:
        stream_margin: streaming runs as many small contractions, slower per FLOP than one
            GEMM; it is chosen only when its FLOP estimate beats reconstruct+matmul by this factor.
        optimize: opt_einsum path optimizer (``"auto-hq"`` by default: exhaustive/dp search for
            the small networks MPOs make; paths are cached so the search runs once per shape).
        cache_size: number of distinct (equation, shapes) entries kept.
    """

    def __init__(
        self, *, stream_margin: float = 1.5, optimize: str = "auto-hq", cache_size: int = 4096
    ) -> None:
        if stream_margin <= 0:
            raise ValueError(f"stream_margin must be positive, got {stream_margin}")
        self.stream_margin = float(stream_margin)
        self.optimize = optimize
        self._path = lru_cache(maxsize=cache_size)(self._path_uncached)
        self._expr = lru_cache(maxsize=cache_size)(self._expr_uncached)
        self._rebuild_method = lru_cache(maxsize=cache_size)(self._rebuild_method_uncached)
        self._threshold = lru_cache(maxsize=cache_size)(self._threshold_uncached)
        self._stream_method = lru_cache(maxsize=cache_size)(self._stream_method_uncached)

    # -- cached primitives -------------------------------------------------------------------
    def _path_uncached(self, eq: str, shapes: tuple[Shape, ...]):
        path, info = oe.contract_path(eq, *shapes, shapes=True, optimize=self.optimize)
        return path, info

    def _expr_uncached(self, eq: str, shapes: tuple[Shape, ...]):
        path, _ = self._path(eq, shapes)
        return oe.contract_expression(eq, *shapes, optimize=path)

    def path_info(self, eq: str, shapes: Sequence[Shape]):
        """opt_einsum ``PathInfo`` (path, FLOPs, largest intermediate) for ``eq`` on ``shapes``."""
        return self._path(eq, tuple(tuple(int(d) for d in s) for s in shapes))[1]

    def flops(self, eq: str, shapes: Sequence[Shape]) -> float:
        return float(self.path_info(eq, shapes).opt_cost)

    def contract(self, eq: str, *operands: torch.Tensor) -> torch.Tensor:
        """Contract torch ``operands`` along ``eq`` with the cached optimal path (autograd-safe).
        Under ``torch.compile`` the contraction is traced once as ``torch.einsum`` (which plans
        with opt_einsum itself)."""
        if torch.compiler.is_compiling():
            return torch.einsum(eq, *operands)
        shapes = tuple(tuple(o.shape) for o in operands)
        return self._expr(eq, shapes)(*operands, backend="torch")

    def cache_info(self):
        return {"paths": self._path.cache_info(), "expressions": self._expr.cache_info()}

    def clear_cache(self) -> None:
        for cache in (self._path, self._expr, self._rebuild_method, self._threshold, self._stream_method):
            cache.cache_clear()

    # -- MPO-specific helpers ----------------------------------------------------------------
    def plan(self, core_shapes: Sequence[Shape], tokens: int, weight_cached: bool = False) -> ContractionPlan:
        """Price streaming vs reconstruct+matmul for ``tokens`` tokens through one MPO matrix
        with cores of ``core_shapes`` ``(r, o_k, i_k, r')``; with ``weight_cached`` the rebuild
        is free (the weight is served from a cache)."""
        m = len(core_shapes)
        shapes = tuple(tuple(int(d) for d in s) for s in core_shapes)
        in_f, out_f = _prod(s[2] for s in shapes), _prod(s[1] for s in shapes)
        n = max(int(tokens), 1)
        x_shape = (n, *(s[2] for s in shapes))
        stream_path, stream_info = self._path(apply_equation(m), (x_shape, *shapes))
        recon_path, recon_info = self._path(reconstruct_equation(m), shapes)
        stream = float(stream_info.opt_cost)
        recon = 0.0 if weight_cached else float(recon_info.opt_cost)
        matmul = 2.0 * n * in_f * out_f
        mode = "stream" if stream * self.stream_margin < recon + matmul else "reconstruct"
        return ContractionPlan(mode, n, stream, recon, matmul, tuple(stream_path), tuple(recon_path))

    def stream_threshold(self, core_shapes: Sequence[Shape], weight_cached: bool = False) -> float:
        """The smallest power-of-two token count at which :meth:`plan` picks ``"reconstruct"``
        (``inf`` if streaming stays cheaper up to 2**24 tokens). Deciding ``tokens < threshold``
        instead of pricing each batch keeps the decision a single comparison, so compiled
        graphs guard on one range instead of specializing per batch size."""
        return _constant_threshold(self, _shapes(core_shapes), bool(weight_cached))

    def _threshold_uncached(self, shapes: tuple[Shape, ...], weight_cached: bool) -> float:
        for p in range(25):
            if self.plan(shapes, 2 ** p, weight_cached=weight_cached).mode == "reconstruct":
                return float(2 ** p)
        return math.inf

    def rebuild_method(self, core_shapes: Sequence[Shape]) -> str:
        """``"chain"`` (two GEMMs around one core, :mod:`tnmoe.networks.chain`) when it costs
        no more FLOPs than opt_einsum's optimal path (it then runs at the BLAS GEMM rate, the
        general path as several tensordots with copies), else ``"opt_einsum"``."""
        return _constant_rebuild_method(self, _shapes(core_shapes))

    def _rebuild_method_uncached(self, shapes: tuple[Shape, ...]) -> str:
        if len(shapes) < 3:
            return "opt_einsum"
        optimal = float(self._path(reconstruct_equation(len(shapes)), shapes)[1].opt_cost)
        return "chain" if chain_plan(shapes).flops <= optimal * (1 + 1e-9) else "opt_einsum"

    def reconstruct(self, cores: Sequence[torch.Tensor], batched: Sequence[bool] | None = None):
        """Contract cores into the dense matrix ``(out, in)`` (``(E, out, in)`` when batched)."""
        m = len(cores)
        batched = list(batched) if batched is not None else [False] * m
        shapes = tuple(tuple(c.shape[1:]) if b else tuple(c.shape) for c, b in zip(cores, batched))
        # cores that get no gradient in a backward that will run (a gradient-masked centre)
        backward = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
        frozen = tuple(backward and not c.requires_grad for c in cores)
        choice = _constant_chain_choice(self, shapes, tuple(batched), frozen)
        if choice is not None:
            return chain_reconstruct(cores, batched, ChainPlan(*choice, 0.0), self.contract)
        full = self.contract(reconstruct_equation(m, batched), *cores)
        lead = full.shape[: 1 if any(batched) else 0]
        half = full.dim() - len(lead)
        out_f = _prod(full.shape[len(lead) : len(lead) + half // 2])
        return full.reshape(*lead, out_f, -1)

    def stream_method(self, core_shapes: Sequence[Shape], tokens: int = 1) -> str:
        """How :meth:`stream` contracts ``tokens`` tokens: ``"chain"`` (:func:`stream_chain`:
        one GEMM per core, the cores never copied) for at most :data:`CHAIN_STREAM_MAX_TOKENS`
        tokens when its FLOPs are within :data:`CHAIN_STREAM_FLOP_MARGIN` of opt_einsum's
        optimal path (whose tensordots copy cores into GEMM layout on every call, the dominant
        cost at a few tokens), else ``"opt_einsum"``. Cached per shape signature."""
        if tokens > CHAIN_STREAM_MAX_TOKENS:
            return "opt_einsum"
        return _constant_stream_method(self, _shapes(core_shapes))

    def _stream_method_uncached(self, shapes: tuple[Shape, ...]) -> str:
        x_shape = (1, *(s[2] for s in shapes))
        optimal = float(self._path(apply_equation(len(shapes)), (x_shape, *shapes))[1].opt_cost)
        return "chain" if stream_chain_flops(shapes, 1) <= optimal * CHAIN_STREAM_FLOP_MARGIN else "opt_einsum"

    def stream(self, x: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
        """Apply one MPO matrix's cores to tokens ``x`` ``(N, in)`` -> ``(N, out)``."""
        if self.stream_method([tuple(c.shape) for c in cores], x.shape[0]) == "chain":
            return stream_chain(x, cores)
        ins = [c.shape[-2] for c in cores]
        y = self.contract(apply_equation(len(cores)), x.reshape(x.shape[0], *ins), *cores)
        return y.reshape(x.shape[0], _prod(c.shape[-3] for c in cores))  # also for 0 tokens


#: the chain streams at most this many tokens (the small-batch decode regime; beyond it the
#: optimal path's extra copies are amortized and its lower FLOP count wins)
CHAIN_STREAM_MAX_TOKENS = 8
#: chain FLOPs allowed over the optimal path's. Measured (benchmarks/bench_decode.py's MPOLinear
#: rows, 1 token, 768x3072 bank slices): the chain at 1.4x / 1.4x / 1.7x the FLOPs (lossless /
#: bond 64 / bond 16) ran in 0.94x / 0.52x / 0.59x the optimal path's time
CHAIN_STREAM_FLOP_MARGIN = 2.0


def stream_chain_flops(core_shapes: Sequence[Shape], tokens: int) -> float:
    """FLOPs (multiply and add counted separately, as opt_einsum does) of :func:`stream_chain`."""
    shapes = _shapes(core_shapes)
    ins, outs = [s[2] for s in shapes], [s[1] for s in shapes]
    total = 0.0
    for k, (r, o, i, r2) in enumerate(shapes):
        rows = tokens * _prod(ins[:k]) * _prod(outs[k + 1:])
        total += 2.0 * rows * (i * r2) * (r * o)
    return total


def stream_chain(x: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x @ W.T`` for tokens ``x`` ``(N, in)`` and one MPO matrix's cores ``(r, o_k, i_k, r')``,
    contracted right to left with one GEMM per core against the core viewed as
    ``(r o_k, i_k r')`` (its own memory layout: the cores are never copied; only the small
    token state is permuted). The state holds ``(N, i_1..i_k, o_{k+1}..o_m, r_k)``-shaped
    partial sums. Differentiable; plain tensor ops, so ``torch.compile`` traces it whole."""
    n = x.shape[0]
    ins = [int(c.shape[2]) for c in cores]
    left, acc = _prod(ins), 1  # input modes not yet contracted; output modes done so far
    state = x.reshape(n * left, 1, 1)  # (rows, i_k * r_k pending, acc) with r_m = 1
    for core in reversed(cores):
        r, o, i, r2 = (int(d) for d in core.shape)
        left //= i
        # (N*left, i, acc, r2) -> (N*left*acc, i*r2): the contracted modes last
        state = state.reshape(n * left, i, acc, r2).transpose(1, 2).reshape(-1, i * r2)
        state = state @ core.reshape(r * o, i * r2).t()  # (N*left*acc, r*o)
        # -> (N*left, o, acc, r): o joins the output modes in front, r waits for the next core
        state = state.reshape(n * left, acc, r, o).permute(0, 3, 1, 2)
        acc *= o
    return state.reshape(n, acc)


def stream_chain_batched(x: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`stream_chain` for ``B`` matrices at once: tokens ``x`` ``(B, N, in)`` (``N`` tokens
    per matrix), cores ``(B, r, o_k, i_k, r')`` (one per matrix) or ``(r, o_k, i_k, r')`` (shared
    by all); returns ``(B, N, out)``. One batched GEMM per core (``torch.matmul`` broadcasts a
    shared core), so the per-core Python runs once for all ``B`` matrices, not ``B`` times."""
    b, n = int(x.shape[0]), int(x.shape[1])
    ins = [int(c.shape[-2]) for c in cores]
    left, acc = _prod(ins), 1
    state = x.reshape(b, n * left, 1, 1)
    for core in reversed(cores):
        r, o, i, r2 = (int(d) for d in core.shape[-4:])
        left //= i
        state = state.reshape(b, n * left, i, acc, r2).transpose(2, 3).reshape(b, -1, i * r2)
        state = state @ core.reshape(*core.shape[:-4], r * o, i * r2).transpose(-1, -2)  # (b, rows, r*o)
        state = state.reshape(b, n * left, acc, r, o).permute(0, 1, 4, 2, 3)
        acc *= o
    return state.reshape(b, n, acc)


# Planning results are constants for torch.compile: computed (and cached) at trace time, once.
@torch.compiler.assume_constant_result
def _constant_stream_method(engine: ContractionEngine, shapes: tuple[Shape, ...]) -> str:
    return engine._stream_method(shapes)


@torch.compiler.assume_constant_result
def _constant_threshold(engine: ContractionEngine, shapes: tuple[Shape, ...], weight_cached: bool) -> float:
    return engine._threshold(shapes, weight_cached)


@torch.compiler.assume_constant_result
def _constant_rebuild_method(engine: ContractionEngine, shapes: tuple[Shape, ...]) -> str:
    return engine._rebuild_method(shapes)


@torch.compiler.assume_constant_result
def _constant_chain_choice(engine: ContractionEngine, shapes: tuple[Shape, ...], batched: tuple[bool, ...],
                          frozen: tuple[bool, ...]) -> tuple[int, bool] | None:
    """``(center, right_first)`` of the chain rebuild, or ``None`` for the opt_einsum path."""
    if engine._rebuild_method(shapes) != "chain":
        return None
    plan = chain_plan(shapes, batched if any(batched) else None, frozen if any(frozen) else None)
    return plan.center, plan.right_first


def _shapes(core_shapes: Sequence[Shape]) -> tuple[Shape, ...]:
    return tuple(tuple(int(d) for d in s) for s in core_shapes)


def _prod(xs) -> int:
    out = 1
    for v in xs:
        out *= int(v)
    return out


_DEFAULT = ContractionEngine()


def default_engine() -> ContractionEngine:
    """The process-wide engine whose path cache layers share unless given their own."""
    return _DEFAULT
