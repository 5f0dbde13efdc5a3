"""Rebuilding MPO matrices as two large GEMMs around one core.

An MPO matrix's cores split into a left part (cores ``< c``), a centre core ``c`` and a right
part (cores ``> c``). The outer parts are small for the usual MPOs (their bonds grow
geometrically towards the centre), so contracting each of them first is cheap; the matrix then
costs two GEMMs, ``L @ (C @ R)`` or ``(L @ C) @ R``, which run at the BLAS rate, and one
permutation from the chain's interleaved ``(o_L, i_L, o_c, i_c, o_R, i_R)`` order to
``(out, in)``, fused with the last GEMM block by block on CPU
(:func:`~tnmoe.networks.blocked.matmul_permute`). With an expert axis, shared and stacked cores broadcast through batched matmuls,
so one shared central core multiplies every expert's right part in one call.

:func:`chain_plan` prices every centre and both orders with the same multiply-add count
opt_einsum uses, so :class:`~tnmoe.networks.ContractionEngine` can compare it with the general
opt_einsum path and take the cheaper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import opt_einsum as oe
import torch

from .blocked import matmul_permute

__all__ = ["ChainPlan", "chain_plan", "chain_reconstruct"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ChainPlan:
    """Centre core ``center`` and GEMM order (``right_first``: ``L @ (C @ R)``); ``flops``
    counts multiply and add separately (opt_einsum's convention) for one matrix."""

    center: int
    right_first: bool
    flops: float


def _part_equation(m: int, batched: Sequence[bool], left: bool) -> tuple[str, list[int | None]]:
    """Equation contracting a run of m cores into ``(E?, outs..., ins..., r)`` (a left part,
    whose first bond is 1) or ``(E?, r, outs..., ins...)`` (a right part, whose last bond is
    1), and which dim of each core to squeeze (the size-1 outer bond) or ``None``."""
    e = oe.get_symbol(0)
    bonds = [oe.get_symbol(1 + k) for k in range(m + 1)]
    outs = [oe.get_symbol(2 + m + k) for k in range(m)]
    ins = [oe.get_symbol(2 + 2 * m + k) for k in range(m)]
    terms, squeeze = [], []
    for k, b in enumerate(batched):
        lb, rb, sq = bonds[k], bonds[k + 1], None
        if left and k == 0:
            lb, sq = "", (1 if b else 0)
        if not left and k == m - 1:
            rb, sq = "", -1
        terms.append((e if b else "") + lb + outs[k] + ins[k] + rb)
        squeeze.append(sq)
    body = "".join(outs) + "".join(ins)
    out = (e if any(batched) else "") + (body + bonds[m] if left else bonds[0] + body)
    return ",".join(terms) + "->" + out, squeeze


def _part_flops(shapes: Sequence[Shape], left: bool) -> float:
    if len(shapes) < 2:
        return 0.0
    eq, squeeze = _part_equation(len(shapes), [False] * len(shapes), left)
    dims = [tuple(d for j, d in enumerate(s) if sq is None or j != sq % 4) for s, sq in zip(shapes, squeeze)]
    return float(oe.contract_path(eq, *dims, shapes=True, optimize="auto-hq")[1].opt_cost)


@lru_cache(maxsize=4096)
def chain_plan(core_shapes: tuple[Shape, ...], batched: tuple[bool, ...] | None = None,
               frozen: tuple[bool, ...] | None = None) -> ChainPlan:
    """The cheapest centre and order for cores ``(r, o, i, r')`` of one matrix; among equally
    cheap plans, the largest core as centre (so the two GEMMs carry the work), then the order
    whose first GEMM folds the expert axis into one large GEMM, else ``L @ (C @ R)``.

    ``batched`` (one flag per core: stacked per matrix, else shared): with a shared centre and a
    stacked left part, ``L @ C`` is one ``(E A, r) x (r, B r')`` GEMM for all matrices, where
    ``C @ R`` and ``L @ T`` stay E separate GEMMs (measured on 2 CPU cores, lossless 768x3072
    MPOE experts: the step 7% faster). ``frozen`` (per core: gets no gradient in a backward
    that runs, e.g. a central core the gradient mask skips this step): a frozen centre keeps
    ``L @ (C @ R)``, whose backward then skips ``dC = dT R^T``, the larger of the two orders'
    ``dC`` GEMMs (for MPOE, ``(L @ C) @ R`` would skip only half as much)."""
    cands = []
    for c in range(len(core_shapes)):
        left, (r, o, i, r2), right = core_shapes[:c], core_shapes[c], core_shapes[c + 1:]
        A = math.prod(s[1] * s[2] for s in left)
        D = math.prod(s[1] * s[2] for s in right)
        B = o * i
        outer = _part_flops(left, True) + _part_flops(right, False)
        # L @ (C @ R): (r B, r') x (r', D) then (A, r) x (r, B D)
        right_first = 2.0 * (r * B * r2 * D + A * r * B * D) if right else 2.0 * A * r * B * r2
        # (L @ C) @ R: (A, r) x (r, B r') then (A B, r') x (r', D)
        left_first = 2.0 * (A * r * B * r2 + A * B * r2 * D) if left else 2.0 * r * B * r2 * D
        size = r * B * r2
        folds_left = bool(batched) and not batched[c] and any(batched[:c]) and not (frozen and frozen[c])
        cands += [(outer + right_first, -size, int(folds_left), c, True),
                  (outer + left_first, -size, int(not folds_left), c, False)]
    cheapest = min(f for f, *_ in cands)
    ties = [t for t in cands if t[0] <= cheapest * (1 + 1e-9)]
    flops, _, _, c, rf = min(ties, key=lambda t: t[1:3])
    return ChainPlan(c, rf, flops)


def _part(cores: Sequence[torch.Tensor], batched: Sequence[bool], left: bool, contract) -> torch.Tensor:
    eq, squeeze = _part_equation(len(cores), batched, left)
    return contract(eq, *[t if sq is None else t.squeeze(sq) for t, sq in zip(cores, squeeze)])


def chain_reconstruct(cores: Sequence[torch.Tensor], batched: Sequence[bool], plan: ChainPlan,
                      contract=None) -> torch.Tensor:
    """The matrices ``(E?, out, in)`` of ``cores`` (``(E, r, o, i, r')`` where ``batched``);
    ``contract(eq, *operands)`` contracts the outer parts (default ``opt_einsum.contract``)."""
    contract = contract or (lambda eq, *ops: oe.contract(eq, *ops, backend="torch"))
    c = plan.center
    m = len(cores)
    lead = next((t.shape[0] for t, b in zip(cores, batched) if b), None)
    shapes = [tuple(t.shape[1:]) if b else tuple(t.shape) for t, b in zip(cores, batched)]
    o_l, i_l = math.prod([s[1] for s in shapes[:c]]), math.prod([s[2] for s in shapes[:c]])
    o_r, i_r = math.prod([s[1] for s in shapes[c + 1:]]), math.prod([s[2] for s in shapes[c + 1:]])
    r, o_c, i_c, r2 = shapes[c]
    C = cores[c]
    cb = batched[c]
    E = (lead,) if cb else ()
    L = _part(cores[:c], batched[:c], True, contract) if c > 0 else None
    R = _part(cores[c + 1:], batched[c + 1:], False, contract) if c < m - 1 else None
    if L is not None:
        L = L.reshape(*((L.shape[0],) if any(batched[:c]) else ()), o_l * i_l, r)
    if R is not None:
        R = R.reshape(*((R.shape[0],) if any(batched[c + 1:]) else ()), r2, o_r * i_r)
    # the last GEMM's product, as (E?, *rows, *cols) over the chain's (o_L, i_L, o_c, i_c, o_R, i_R)
    # in some order, and the permutation that makes it (E?, out, in)
    if R is None:  # centre is the last core: W' = L @ C, (o_L, i_L, o_c, i_c) -> (o_L, o_c, i_L, i_c)
        a, b = L, C.reshape(*E, r, o_c * i_c)
        rows, cols, perm = (o_l, i_l), (o_c, i_c), (0, 2, 1, 3)
    elif L is None:  # centre is the first core: W' = C @ R, (o_c, i_c, o_R, i_R) -> (o_c, o_R, i_c, i_R)
        a, b = C.reshape(*E, o_c * i_c, r2), R
        rows, cols, perm = (o_c, i_c), (o_r, i_r), (0, 2, 1, 3)
    elif plan.right_first:
        T = torch.matmul(C.reshape(*E, r * o_c * i_c, r2), R)  # (E?, r B, D)
        T = T.reshape(*T.shape[:-2], r, o_c * i_c * o_r * i_r)
        a, b = L, T  # (T^T L^T: the same GEMM time with retained memory, a transposing permutation)
        rows, cols, perm = (o_l, i_l), (o_c, i_c, o_r, i_r), (0, 2, 4, 1, 3, 5)
    else:
        U = torch.matmul(L, C.reshape(*E, r, o_c * i_c * r2))  # (E?, A, B r')
        a, b = U.reshape(*U.shape[:-2], o_l * i_l * o_c * i_c, r2), R
        rows, cols, perm = (o_l, i_l, o_c, i_c), (o_r, i_r), (0, 2, 4, 1, 3, 5)
    W = matmul_permute(a, b, rows, cols, perm)  # (E?, outs..., ins...)
    return W.reshape(*W.shape[:W.dim() - len(perm)], o_l * o_c * o_r, i_l * i_c * i_r)
