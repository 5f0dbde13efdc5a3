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
        """How :meth:`stream` contracts ``tokens`` tokens: ``"chain"`` (:func:`stream_chain`
        right to left: one GEMM per core, the cores never copied) or ``"chain_from_left"`` (left
        to right, offered where every core is a GEMM operand as laid out: ``o_k = 1`` or
        ``i_k = 1``, as in a rank-r factorization's ``[out, 1] x [1, in]`` factors), the one of
        fewer FLOPs, for at most :data:`CHAIN_STREAM_MAX_TOKENS` tokens when its FLOPs are within
        :data:`CHAIN_STREAM_FLOP_MARGIN` of opt_einsum's optimal path (whose tensordots copy
        cores into GEMM layout on every call, the dominant cost at a few tokens), else
        ``"opt_einsum"``. Cached per shape signature."""
        if tokens > CHAIN_STREAM_MAX_TOKENS:
            return "opt_einsum"
        return _constant_stream_method(self, _shapes(core_shapes))

    def _stream_method_uncached(self, shapes: tuple[Shape, ...]) -> str:
        x_shape = (1, *(s[2] for s in shapes))
        optimal = float(self._path(apply_equation(len(shapes)), (x_shape, *shapes))[1].opt_cost)
        options = [(stream_chain_flops(shapes, 1), "chain")]
        if chain_from_left_is_copy_free(shapes):
            options.append((stream_chain_flops(shapes, 1, from_left=True), "chain_from_left"))
        flops, method = min(options, key=lambda option: option[0])  # a tie keeps "chain"
        return method if flops <= optimal * CHAIN_STREAM_FLOP_MARGIN else "opt_einsum"

    def stream(self, x: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
        """Apply one MPO matrix's cores to tokens ``x`` ``(N, in)`` -> ``(N, out)``."""
        method = self.stream_method([tuple(c.shape) for c in cores], x.shape[0])
        if method != "opt_einsum":
            return stream_chain(x, cores, from_left=method == "chain_from_left")
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


def stream_chain_flops(core_shapes: Sequence[Shape], tokens: int, from_left: bool = False) -> float:
    """FLOPs (multiply and add counted separately, as opt_einsum does) of :func:`stream_chain`."""
    shapes = _shapes(core_shapes)
    ins, outs = [s[2] for s in shapes], [s[1] for s in shapes]
    total = 0.0
    for k, (r, o, i, r2) in enumerate(shapes):
        # the state's rows: tokens times the modes not taking part in this core's GEMM
        rows = tokens * (_prod(outs[:k]) * _prod(ins[k + 1:]) if from_left else _prod(ins[:k]) * _prod(outs[k + 1:]))
        total += 2.0 * rows * (i * r2) * (r * o)
    return total


def chain_from_left_is_copy_free(core_shapes: Sequence[Shape]) -> bool:
    """Whether every core ``(r, o, i, r')`` is, as laid out, the ``(r i, o r')`` GEMM operand the
    left-to-right chain needs (``o = 1`` or ``i = 1``)."""
    return all(o == 1 or i == 1 for _, o, i, _ in _shapes(core_shapes))


def stream_chain(x: torch.Tensor, cores: Sequence[torch.Tensor], from_left: bool = False) -> torch.Tensor:
    """``x @ W.T`` for tokens ``x`` ``(N, in)`` and one MPO matrix's cores ``(r, o_k, i_k, r')``,
    contracted right to left with one GEMM per core against the core viewed as
    ``(r o_k, i_k r')`` (its own memory layout: the cores are never copied; only the small
    token state is permuted). The state holds ``(N, i_1..i_k, o_{k+1}..o_m, r_k)``-shaped
    partial sums. Differentiable; plain tensor ops, so ``torch.compile`` traces it whole.

    ``from_left``: contract left to right instead, the state holding ``(N, o_1..o_k, r_k,
    i_{k+1}..i_m)``-shaped partial sums and core ``k`` the GEMM operand ``(r i, o r')``: its own
    layout where :func:`chain_from_left_is_copy_free` (else it is copied into it).

    The reshapes and permutations are planned once per shape signature and token count
    (:func:`_chain_steps`); a permutation that moves only unit modes is skipped, so a rank-r
    factorization (``[out, 1] x [1, in]``) streams as its two GEMMs and a reshape."""
    n = int(x.shape[0])
    steps, out = _chain_steps(_shapes(c.shape for c in cores), n, from_left, False)
    return _run_chain(x, _in_order(cores, from_left), steps, from_left).reshape(n, out)


def stream_chain_batched(x: torch.Tensor, cores: Sequence[torch.Tensor], from_left: bool = False) -> torch.Tensor:
    """:func:`stream_chain` for ``B`` matrices at once: tokens ``x`` ``(B, N, in)`` (``N`` tokens
    per matrix), cores ``(B, r, o_k, i_k, r')`` (one per matrix) or ``(r, o_k, i_k, r')`` (shared
    by all); returns ``(B, N, out)``. One batched GEMM per core (``torch.matmul`` broadcasts a
    shared core), so the per-core Python runs once for all ``B`` matrices, not ``B`` times."""
    b, n = int(x.shape[0]), int(x.shape[1])
    steps, out = _chain_steps(_shapes(c.shape[-4:] for c in cores), n, from_left, True)
    return _run_chain(x.reshape(b, n, -1), _in_order(cores, from_left), steps, from_left).reshape(b, n, out)


def stream_chain_grouped(x: torch.Tensor, cores: Sequence[torch.Tensor], stacked: Sequence[bool],
                         counts: Sequence[int], from_left: bool = False) -> torch.Tensor:
    """:func:`stream_chain` of each matrix's tokens: ``x`` ``(N, in)`` sorted by matrix,
    ``counts[e]`` rows for matrix ``e``; cores ``(E, r, o_k, i_k, r')`` where ``stacked``, else
    ``(r, o_k, i_k, r')`` (shared). Returns ``(N, out)``. Shared cores at the start of the
    contraction order run once for all ``N`` tokens, those at its end once on the matrices'
    concatenated states: one GEMM each instead of one per matrix (a shared V of a rank-r bank:
    ``x V`` for every token at once), and only the stacked cores run per matrix."""
    n_all = int(x.shape[0])
    shapes = _shapes(c.shape[-4:] for c in cores)
    if n_all == 0:
        return x.new_zeros(0, _prod(s[1] for s in shapes))
    order = _in_order(list(zip(cores, stacked)), from_left)
    m = len(order)
    head = next((k for k, (_, s) in enumerate(order) if s), m)  # shared cores first in the order
    tail = m - next((k for k, (_, s) in enumerate(reversed(order)) if s), m)  # from here on shared
    steps_all, out = _chain_steps(shapes, n_all, from_left, False)
    state = _run_chain(x, [c for c, _ in order[:head]], steps_all[:head], from_left) if head else x
    if head < m:
        rows = int(state.shape[0]) // n_all  # state rows per token (token-major)
        pieces, start = [], 0
        for e, n in enumerate(counts):
            n = int(n)
            if n == 0:
                continue
            steps = _chain_steps(shapes, n, from_left, False)[0]
            piece = state.narrow(0, start * rows, n * rows)
            pieces.append(_run_chain(piece, [c[e] if s else c for c, s in order[head:tail]], steps[head:tail],
                                     from_left))
            start += n
        state = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)
        if tail < m:
            state = _run_chain(state, [c for c, _ in order[tail:]], steps_all[tail:], from_left)
    return state.reshape(n_all, out)


def _in_order(items: Sequence, from_left: bool) -> list:
    """Cores (or per-core items) in contraction order: left to right, or right to left."""
    return list(items) if from_left else list(items)[::-1]


@dataclass(frozen=True)
class _ChainStep:
    """One core's GEMM in a streamed chain: the state is reshaped to ``pre`` and permuted by
    ``pre_perm`` (``None``: nothing moves) before it is flattened to ``(..., rows, cols)``; the
    GEMM's result is reshaped to ``post`` and permuted by ``post_perm``. ``operand``: the core's
    ``(rows, cols)`` GEMM view; ``copy``: the core must be transposed into it (from the left only)."""

    pre: tuple[int, ...]
    pre_perm: tuple[int, ...] | None
    cols: int
    operand: tuple[int, int]
    copy: bool
    post: tuple[int, ...]
    post_perm: tuple[int, ...] | None


def _moves_data(shape: Sequence[int], perm: Sequence[int]) -> bool:
    """Whether permuting ``shape`` by ``perm`` changes the order of its non-unit modes."""
    kept = [d for d in perm if shape[d] != 1]
    return kept != sorted(kept)


@lru_cache(maxsize=4096)
def _chain_steps(shapes: tuple[Shape, ...], n: int, from_left: bool, batched: bool):
    """The plan of :func:`_run_chain` for ``n`` tokens: ``(steps, out_features)``. Shapes here
    omit the leading matrix dim; it is prepended (``batched``) when the steps run."""
    lead = (-1,) if batched else ()
    off = len(lead)  # permutations index past the leading dim

    def moved(shape, perm):  # the permutation past the leading dim; None when it moves only unit modes
        return _offset(perm, off) if _moves_data(shape, perm) else None

    def step(pre, pre_perm, cols, operand, copy, post, post_perm) -> _ChainStep:
        return _ChainStep(lead + pre, moved(pre, pre_perm), cols, operand, copy, lead + post, moved(post, post_perm))

    steps = []
    if not from_left:
        left, acc = _prod(s[2] for s in shapes), 1
        for r, o, i, r2 in reversed(shapes):
            left //= i
            # (n*left, i, acc, r2) -> (n*left, acc, i, r2);
            # after the GEMM (n*left, acc, r, o) -> (n*left, o, acc, r)
            steps.append(step((n * left, i, acc, r2), (0, 2, 1, 3), i * r2, (r * o, i * r2), False,
                              (n * left, acc, r, o), (0, 3, 1, 2)))
            acc *= o
    else:
        right, acc = _prod(s[2] for s in shapes), 1
        for r, o, i, r2 in shapes:
            right //= i
            # (n*acc, r, i, right) -> (n*acc, right, r, i);
            # after the GEMM (n*acc, right, o, r2) -> (n*acc, o, r2, right)
            steps.append(step((n * acc, r, i, right), (0, 3, 1, 2), r * i, (r * i, o * r2), not (o == 1 or i == 1),
                              (n * acc, right, o, r2), (0, 2, 3, 1)))
            acc *= o
    return tuple(steps), acc


def _offset(perm: tuple[int, ...], off: int) -> tuple[int, ...]:
    return tuple(range(off)) + tuple(d + off for d in perm)


def _run_chain(state: torch.Tensor, ordered: Sequence[torch.Tensor], steps: Sequence[_ChainStep],
               from_left: bool) -> torch.Tensor:
    """Run planned steps on the cores ``ordered`` (in contraction order, one step each):
    ``state`` ``(N, ...)`` or ``(B, N, ...)`` token-major; one GEMM per core."""
    if not steps:
        return state
    lead = state.shape[:-2] if len(steps[0].pre) == 5 else ()
    for core, step in zip(ordered, steps):
        if step.pre_perm is not None:
            state = state.reshape(step.pre).permute(step.pre_perm)
        state = state.reshape(*lead, -1, step.cols)
        if from_left:
            operand = core.transpose(-3, -2) if step.copy else core
            state = state @ operand.reshape(*core.shape[:-4], *step.operand)
        elif core.dim() == 4:  # shared or unbatched: (rows, cols) weight of a linear map
            state = torch.nn.functional.linear(state, core.reshape(step.operand))
        else:
            state = state @ core.reshape(*core.shape[:-4], *step.operand).transpose(-1, -2)
        if step.post_perm is not None:
            state = state.reshape(step.post).permute(step.post_perm)
    return state


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
