"""TT-SVD: sequential truncated SVDs that split an N-d tensor into a train of 3-d cores.

Shared by :class:`~tnmoe.networks.TensorTrain` (general N-d tensors) and
:class:`~tnmoe.networks.MPO` (matrices, whose paired row/column indices form each site).
All functions are pure: tensors in, tensors out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = [
    "SVDTruncation",
    "tt_svd",
    "lossless_bond_dims",
    "left_orthogonalize",
    "right_orthogonalize",
    "move_center",
    "truncate_train",
    "check_finite",
    "check_bond",
]

_DECOMP_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{what} contains {bad} NaN/Inf entries; clean it before decomposing")


def check_bond(max_bond: int | None, rtol: float | None) -> None:
    if max_bond is not None and (not isinstance(max_bond, int) or isinstance(max_bond, bool) or max_bond < 1):
        raise ValueError(f"max_bond must be a positive integer or None, got {max_bond!r}")
    if rtol is not None and not (0.0 <= float(rtol) < 1.0):
        raise ValueError(f"rtol must be in [0, 1), got {rtol!r}")


def lossless_bond_dims(site_dims: Sequence[int], max_bond: int | None = None) -> list[int]:
    """Bond dims ``[1, r_1, ..., r_{m-1}, 1]`` of an exact TT with local dims ``site_dims``.

    ``r_k = min(prod(site_dims[:k]), prod(site_dims[k:]))``, capped at ``max_bond`` when given.
    """
    m = len(site_dims)
    bonds = [1]
    for k in range(1, m):
        r = min(math.prod(site_dims[:k]), math.prod(site_dims[k:]))
        if max_bond is not None:
            r = min(r, max_bond)
        bonds.append(r)
    bonds.append(1)
    return bonds


@dataclass
class SVDTruncation:
    """What a truncation discarded: per cut, the discarded singular values' norm (absolute)."""

    discarded: list[float] = field(default_factory=list)

    @property
    def error_bound(self) -> float:
        """sqrt(sum of squared discarded norms): an upper bound on the Frobenius error
        (exact for a single cut, and for any number of cuts when the rest is orthogonal)."""
        return math.sqrt(sum(d * d for d in self.discarded))


def _norm64(t: torch.Tensor) -> float:
    """Frobenius norm of ``t`` (real or complex), accumulated in float64."""
    return float(torch.linalg.vector_norm(t.abs().double() if t.is_complex() else t.double()))


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype in _DECOMP_DTYPES else torch.float32


def _rank_for(s: torch.Tensor, max_bond: int | None, abs_tol: float) -> int:
    """Smallest rank whose discarded tail norm is <= abs_tol, capped by max_bond."""
    n = s.numel()
    rank = n
    if abs_tol > 0:
        tail = torch.sqrt(torch.flip(torch.cumsum(torch.flip(s.double() ** 2, [0]), 0), [0]))
        # tail[k] = norm of s[k:]; keep the smallest k with tail[k] <= abs_tol
        ok = (tail <= abs_tol).nonzero()
        if ok.numel() > 0:
            rank = max(1, int(ok[0].item()))
    if max_bond is not None:
        rank = min(rank, max_bond)
    return max(1, rank)


def _svd_split(mat: torch.Tensor, max_bond: int | None, abs_tol: float):
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    rank = _rank_for(s, max_bond, abs_tol)
    discarded = float(torch.linalg.vector_norm(s[rank:].double())) if rank < s.numel() else 0.0
    return u[:, :rank], s[:rank], vh[:rank], discarded


def tt_svd(
    tensor: torch.Tensor,
    max_bond: int | None = None,
    rtol: float | None = None,
) -> tuple[list[torch.Tensor], SVDTruncation]:
    """Decompose an N-d ``tensor`` (N >= 2) into cores ``(r_{k-1}, n_k, r_k)``, left to right.

    Without ``max_bond``/``rtol`` the result is exact with bonds ``lossless_bond_dims``.
    ``rtol`` is a relative Frobenius tolerance spread over the N-1 cuts (Oseledets 2011): each cut
    may discard ``rtol * ||tensor|| / sqrt(N-1)``. All cores are left-orthogonal except the last,
    which carries the norm. Decomposition runs in float32 or wider; cores come back in that dtype.
    """
    check_bond(max_bond, rtol)
    if tensor.dim() < 2:
        raise ValueError(f"tt_svd needs a tensor with at least 2 dims, got shape {tuple(tensor.shape)}")
    check_finite(tensor, "the tensor")
    dims = list(tensor.shape)
    work = tensor.to(_work_dtype(tensor))
    d = len(dims)
    abs_tol = 0.0
    if rtol:
        abs_tol = float(rtol) * _norm64(work) / math.sqrt(d - 1)
    cores, info = [], SVDTruncation()
    rest = work.reshape(1, -1)
    r_prev = 1
    for k in range(d - 1):
        mat = rest.reshape(r_prev * dims[k], -1)
        u, s, vh, discarded = _svd_split(mat, max_bond, abs_tol)
        info.discarded.append(discarded)
        r = u.shape[1]
        cores.append(u.reshape(r_prev, dims[k], r))
        rest = s[:, None] * vh
        r_prev = r
    cores.append(rest.reshape(r_prev, dims[-1], 1))
    return cores, info


def _qr_left(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r0, n, r1 = core.shape
    q, r = torch.linalg.qr(core.reshape(r0 * n, r1))
    return q.reshape(r0, n, q.shape[1]), r


def _qr_right(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r0, n, r1 = core.shape
    q, r = torch.linalg.qr(core.reshape(r0, n * r1).mT)
    return q.mT.reshape(q.shape[1], n, r1), r.mT


def left_orthogonalize(cores: list[torch.Tensor], upto: int) -> list[torch.Tensor]:
    """QR sweep making cores ``0..upto-1`` left-orthogonal; the remainder moves into core ``upto``."""
    cores = list(cores)
    for k in range(upto):
        q, r = _qr_left(cores[k])
        cores[k] = q
        cores[k + 1] = torch.einsum("ab,bnc->anc", r, cores[k + 1])
    return cores


def right_orthogonalize(cores: list[torch.Tensor], downto: int) -> list[torch.Tensor]:
    """QR sweep making cores ``downto+1..m-1`` right-orthogonal; the remainder moves into ``downto``."""
    cores = list(cores)
    for k in range(len(cores) - 1, downto, -1):
        q, r = _qr_right(cores[k])
        cores[k] = q
        cores[k - 1] = torch.einsum("anb,bc->anc", cores[k - 1], r)
    return cores


def move_center(cores: list[torch.Tensor], center: int) -> list[torch.Tensor]:
    """Mixed-canonical form with the orthogonality centre on core ``center`` (exact, QR only)."""
    if not 0 <= center < len(cores):
        raise ValueError(f"center must be in [0, {len(cores) - 1}], got {center}")
    cores = left_orthogonalize(cores, center)
    return right_orthogonalize(cores, center)


def truncate_train(
    cores: list[torch.Tensor],
    max_bond: int | None = None,
    rtol: float | None = None,
) -> tuple[list[torch.Tensor], SVDTruncation]:
    """Re-truncate a train of 3-d cores by SVD, right to left after a left-orthogonal sweep.

    Because everything left of each cut is orthogonal, each cut's discarded singular values are
    exactly the error it adds, so :attr:`SVDTruncation.error_bound` is tight for a single cut.
    The result is left in right-canonical form (centre on core 0).
    """
    check_bond(max_bond, rtol)
    m = len(cores)
    cores = left_orthogonalize([c.to(_work_dtype(c)) for c in cores], m - 1)
    abs_tol = 0.0
    if rtol:
        norm = _norm64(cores[-1])
        abs_tol = float(rtol) * norm / math.sqrt(max(m - 1, 1))
    info = SVDTruncation()
    for k in range(m - 1, 0, -1):
        r0, n, r1 = cores[k].shape
        u, s, vh, discarded = _svd_split(cores[k].reshape(r0, n * r1), max_bond, abs_tol)
        info.discarded.insert(0, discarded)
        cores[k] = vh.reshape(vh.shape[0], n, r1)
        cores[k - 1] = torch.einsum("anb,bc->anc", cores[k - 1], u * s[None, :])
    return cores, info
