"""Data-aware MPO fitting: cores fitted to target matrices under their inputs' statistics.

TT-SVD (:func:`~tnmoe.networks.tt_svd`) minimises the weight error ``||W - Ŵ||``. A layer is
judged by its outputs, so under truncation this module minimises the output error instead::

    f = sum_e ||(W_e - Ŵ_e) L_e||_F^2 = sum_e tr((W_e - Ŵ_e) C_e (W_e - Ŵ_e)^T),   C_e = L_e L_e^T

where ``C_e`` (``(in, in)``) is the second moment of matrix ``e``'s calibration inputs
(:class:`InputCovariance`, accumulated streaming in float64; ``||(W - Ŵ) X^T||^2 / N`` for inputs
``X`` ``(N, in)``). ``Ŵ_e`` are the matrices of an MPO bank (any m, bonds, shared cores, E >= 1).

Method: alternating least squares. ``f`` is quadratic in each core, so one local step minimises
it over one core with the others fixed: exactly (Cholesky of the local Hessian) where that
Hessian is small, else by conjugate gradients on it (matrix-free, warm-started at the current
core, so every iterate lowers ``f``). A shared core is solved for jointly over all matrices.
Each step can only lower ``f``, so the joint objective never increases from sweep to sweep.
The start is the better (by ``f``) of TT-SVD and a Kronecker-whitened TT-SVD (TT-SVD of
``W (S_1 ⊗ ... ⊗ S_m)`` with ``S_k`` the square root of site ``k``'s marginal input covariance,
undone on the cores), so the fit's calibration output error is never above TT-SVD's. With m = 2
and unit factors (``in_factors=[1, in]``, ``out_factors=[out, 1]``) that whitened start is the
closed-form optimum (whitened SVD, as in SVD-LLM).

:func:`allocate_bonds` chooses bond dimensions per matrix (and across matrices) for a parameter
budget by the (whitened, when calibration is given) error each bond costs.
"""

from __future__ import annotations

import heapq
import math
import string
import time
from dataclasses import dataclass, field
from typing import Sequence

import opt_einsum as oe
import torch
from tqdm.auto import tqdm

from .decompose import _svd_split, check_finite, lossless_bond_dims
from .factorize import check_factors

__all__ = [
    "InputCovariance",
    "ReferencedCovariance",
    "MatrixFitReport",
    "FitReport",
    "fit_mpo_bank",
    "output_error",
    "whitened_svd",
    "allocate_bonds",
    "resolve_bonds",
    "tt_svd_with_bonds",
    "as_covariance",
]

_EXACT_LOCAL_SIZE = 1536  # local Hessian blocks up to this size are solved exactly (Cholesky)


# -- input statistics ---------------------------------------------------------------------------
class InputCovariance:
    """Streaming second moment ``C = (1/N) sum_t x_t x_t^T`` (``(in, in)``, float64) of a linear
    layer's inputs; no activations are stored.

    ``update(x)`` adds rows of ``x`` ``(..., in)`` (optionally only where ``mask`` ``(...)`` is
    true); :meth:`from_matrix` wraps a covariance you already have.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = int(in_features)
        self.sum_outer = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=device)
        self.count = 0  # rows added
        self.total_weight = 0.0  # their weights' sum (= count without weights)

    @classmethod
    def from_matrix(cls, covariance: torch.Tensor, count: int | None = None) -> "InputCovariance":
        """A given ``(in, in)`` symmetric PSD second-moment matrix (``count``: the samples it
        came from, if known; only reported)."""
        if covariance.dim() != 2 or covariance.shape[0] != covariance.shape[1]:
            raise ValueError(f"a covariance must be a square (in, in) matrix, got shape {tuple(covariance.shape)}")
        check_finite(covariance, "the covariance")
        c = cls(covariance.shape[0], covariance.device)
        c.sum_outer = 0.5 * (covariance.double() + covariance.double().T)
        c.count = 1 if count is None else int(count)
        c.total_weight = float(c.count)
        if count is not None:
            c.sum_outer *= count
        return c

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> None:
        """Add the rows of ``x`` ``(..., in)``; ``mask`` ``(...)``: only where true; ``weight``
        ``(...)``: non-negative weight per row (``C = sum_t w_t x_t x_t^T / sum_t w_t``)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        if weight is not None and tuple(weight.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"weight must have the rows' shape {tuple(x.shape[:-1])}, got {tuple(weight.shape)}")
        if mask is not None:
            keep = mask.to(torch.bool)
            x = x[keep]
            weight = None if weight is None else weight[keep]
        x = x.reshape(-1, self.in_features).to(device=self.sum_outer.device, dtype=torch.float64)
        if x.shape[0] == 0:
            return
        check_finite(x, "the calibration inputs")
        if weight is None:
            self.sum_outer.addmm_(x.T, x)
            self.total_weight += x.shape[0]
        else:
            w = weight.reshape(-1).to(device=x.device, dtype=torch.float64)
            check_finite(w, "the calibration weights")
            if bool((w < 0).any()):
                raise ValueError("calibration weights must be non-negative")
            self.sum_outer.addmm_((x * w[:, None]).T, x)
            self.total_weight += float(w.sum())
        self.count += x.shape[0]

    def covariance(self) -> torch.Tensor:
        """``(in, in)`` float64 second moment."""
        if self.count == 0 or self.total_weight <= 0:
            raise ValueError("no calibration inputs were accumulated (count or total weight is 0): run calibration "
                             "batches first")
        return self.sum_outer / self.total_weight

    def __repr__(self) -> str:
        return f"InputCovariance(in_features={self.in_features}, count={self.count})"


#: default ridge of :meth:`ReferencedCovariance.effective_target`, relative to ``mean(diag C')``
#: (the 1 % of GPTQ's damping)
CORRECTION_RIDGE = 1e-2


def check_ridge(ridge: float) -> float:
    """``ridge`` as a float, or a ValueError unless it is a finite number >= 0."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"the correction ridge must be a finite number >= 0 (relative to the mean input "
                         f"variance; default {CORRECTION_RIDGE}), got {ridge!r}")
    return float(ridge)


class ReferencedCovariance(InputCovariance):
    """Statistics to fit a matrix to a *reference's* outputs from the inputs it will really get:
    minimise ``E||W x - Ŵ x'||^2``, where ``x`` is what the matrix sees in the reference model
    and ``x'`` what it sees once earlier layers are compressed (sequential calibration, which lets
    each layer correct the errors of those before it). Streams, in float64,
    ``C' = E[x' x'^T]`` (what :meth:`covariance` returns, as for :class:`InputCovariance`),
    ``D = E[x x'^T]`` and ``E[x x^T]``.

    The objective is ``||(W~ - Ŵ) L'||^2`` plus a constant, ``L' L'^T = C'``, with the effective
    target ``W~ = W + W (D - C') (C' + λI)^{-1}`` (:meth:`effective_target`; ``W~ = W`` where
    ``x' = x``): every fit that takes an :class:`InputCovariance` fits ``W~`` under ``C'`` when
    given one of these, and reports :meth:`reference_output_error`, ``||W X - Ŵ X'|| / ||W X||``.

    ``ridge``: ``λ`` relative to ``mean(diag C')`` (default :data:`CORRECTION_RIDGE`). The
    correction divides by ``C'``, so a ridge near 0 lets directions the fitted inputs hardly use
    carry large weights: on MiniLM at cap 64, 1e-6 left the fitted FFN matrices 2.5x the original
    norm on average (3.8x at most), 1e-2 at 0.70x with lower hidden-state errors
    (``docs/fitting.md``).
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None, *,
                 ridge: float = CORRECTION_RIDGE) -> None:
        super().__init__(in_features, device)
        self.ridge = check_ridge(ridge)
        self.sum_cross = torch.zeros_like(self.sum_outer)  # sum_t w_t x_t x'_t^T
        self.sum_reference = torch.zeros_like(self.sum_outer)  # sum_t w_t x_t x_t^T

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None, weight: torch.Tensor | None = None, *,
               reference: torch.Tensor | None = None) -> None:
        """Add rows of ``x`` ``(..., in)`` (the fitted model's inputs) with ``reference`` (the
        reference model's inputs at the same positions, same shape); ``mask`` and ``weight`` as
        for :meth:`InputCovariance.update`."""
        if reference is None or tuple(reference.shape) != tuple(x.shape):
            raise ValueError("a ReferencedCovariance needs reference= inputs of the inputs' shape "
                             f"{tuple(x.shape)}, got {None if reference is None else tuple(reference.shape)}")
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"mask must have the rows' shape {tuple(x.shape[:-1])}, got {tuple(mask.shape)}")
        if mask is not None:
            reference = reference[mask.to(torch.bool)]
        super().update(x, mask, weight)  # checks x, mask and weight, adds x' x'^T
        r = reference.reshape(-1, self.in_features).to(device=self.sum_outer.device, dtype=torch.float64)
        if r.shape[0] == 0:
            return
        check_finite(r, "the reference calibration inputs")
        xs = (x if mask is None else x[mask.to(torch.bool)]).reshape(-1, self.in_features).to(r)
        if weight is not None:
            w = (weight if mask is None else weight[mask.to(torch.bool)]).reshape(-1).to(r)
            r_w = r * w[:, None]
        else:
            r_w = r
        self.sum_cross.addmm_(r_w.T, xs)
        self.sum_reference.addmm_(r_w.T, r)

    @classmethod
    def from_matrix(cls, covariance: torch.Tensor, count: int | None = None) -> "ReferencedCovariance":
        raise TypeError("a ReferencedCovariance needs the paired moments of reference and fitted inputs: build it "
                        "with update(x, reference=...), or use InputCovariance.from_matrix for a plain covariance")

    def effective_target(self, W: torch.Tensor, ridge: float | None = None) -> torch.Tensor:
        """``W~ = W + W (D - C') (C' + λI)^{-1}`` ``(out, in)`` float64 (class docstring);
        ``ridge``: ``λ / mean(diag C')``, default this object's :attr:`ridge`."""
        ridge = self.ridge if ridge is None else check_ridge(ridge)
        if W.dim() != 2 or W.shape[1] != self.in_features:
            raise ValueError(f"the calibration covariance is over {self.in_features} features, the matrix has shape "
                             f"{tuple(W.shape)}")
        C = self.covariance()
        D = self.sum_cross / self.total_weight
        scale = float(torch.diagonal(C).mean())
        Cd = C + ridge * (scale if scale > 0 else 1.0) * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
        W = W.to(device=C.device, dtype=torch.float64)
        # (C'+λI) is symmetric: solve for the transpose of the correction
        return W + torch.linalg.solve(Cd, (W @ (D - C)).T).T

    def reference_output_error(self, W: torch.Tensor, W_hat: torch.Tensor) -> float:
        """``||W X - Ŵ X'|| / ||W X||`` on the calibration rows (``X``: reference inputs)."""
        W = W.to(device=self.sum_outer.device, dtype=torch.float64)
        W_hat = W_hat.to(device=self.sum_outer.device, dtype=torch.float64)
        n = self.total_weight
        ref = torch.einsum("oi,ij,oj->", W, self.sum_reference / n, W)
        num = ref - 2 * torch.einsum("oi,ij,oj->", W, self.sum_cross / n, W_hat) \
            + torch.einsum("oi,ij,oj->", W_hat, self.covariance(), W_hat)
        num, ref = float(num.clamp_min(0.0)), float(ref)
        return math.sqrt(num / ref) if ref > 0 else math.sqrt(num)

    def __repr__(self) -> str:
        return f"ReferencedCovariance(in_features={self.in_features}, count={self.count}, ridge={self.ridge:g})"


def _effective_targets(Ws: list[torch.Tensor], calibration) -> list[torch.Tensor]:
    """Each target as its calibration fits it: :meth:`ReferencedCovariance.effective_target`
    (with that covariance's ridge) where the calibration is one, else unchanged."""
    calib = list(calibration) if isinstance(calibration, (list, tuple)) else [calibration] * len(Ws)
    if len(calib) != len(Ws):
        return Ws  # _damped_calibrations says what is wrong
    return [c.effective_target(W) if isinstance(c, ReferencedCovariance) else W for W, c in zip(Ws, calib)]


def _reference_errors(Ws: list[torch.Tensor], mats: list[torch.Tensor], calibration) -> list[float | None]:
    calib = list(calibration) if isinstance(calibration, (list, tuple)) else [calibration] * len(Ws)
    return [c.reference_output_error(W, M) if isinstance(c, ReferencedCovariance) else None
            for W, M, c in zip(Ws, mats, calib)]


def as_covariance(calibration, in_features: int) -> InputCovariance:
    """``calibration`` as an :class:`InputCovariance`: a tensor of inputs ``(N, in)`` (or
    ``(..., in)``), or an :class:`InputCovariance` already. A square tensor is inputs too;
    wrap a covariance matrix with :meth:`InputCovariance.from_matrix`."""
    if isinstance(calibration, InputCovariance):
        if calibration.in_features != in_features:
            raise ValueError(f"the calibration covariance is over {calibration.in_features} features, "
                             f"the matrix has {in_features} inputs")
        return calibration
    if isinstance(calibration, torch.Tensor):
        if calibration.shape[-1] != in_features:
            raise ValueError(f"calibration inputs must have {in_features} features (last dim), got "
                             f"shape {tuple(calibration.shape)}; a covariance goes in InputCovariance.from_matrix")
        acc = InputCovariance(in_features, calibration.device)
        acc.update(calibration)
        return acc
    raise TypeError(f"calibration must be an (N, in) tensor of inputs or an InputCovariance, got "
                    f"{type(calibration).__name__}")


@dataclass
class _Damped:
    covariance: torch.Tensor  # (in, in) float64, damped if needed
    rank: int
    damping: float  # absolute value added to the diagonal (0.0: none)
    count: int


def _damp(cov: InputCovariance, damping: float) -> _Damped:
    """Damp a rank-deficient second moment: ``C + damping * mean(diag C) * I``."""
    C = cov.covariance()
    eig = torch.linalg.eigvalsh(C)
    top = float(eig[-1].clamp_min(0.0))
    rank = int((eig > top * C.shape[0] * torch.finfo(torch.float64).eps).sum()) if top > 0 else 0
    added = 0.0
    if rank < C.shape[0]:
        scale = float(torch.diagonal(C).mean())
        added = damping * (scale if scale > 0 else 1.0)
        C = C + added * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    return _Damped(C, rank, added, cov.count)


def _target_matrices(targets) -> list[torch.Tensor]:
    """``targets`` ``(E, out, in)``, a list of ``(out, in)`` or one ``(out, in)`` as a checked,
    non-empty list of equal-shape finite matrices."""
    Ws = [targets] if isinstance(targets, torch.Tensor) and targets.dim() == 2 else list(targets)
    if not Ws:
        raise ValueError("no target matrices")
    out_dim, in_dim = Ws[0].shape
    for W in Ws:
        if W.dim() != 2 or tuple(W.shape) != (out_dim, in_dim):
            raise ValueError(f"every target must be a matrix of shape {(out_dim, in_dim)}, got {tuple(W.shape)}")
        check_finite(W, "a target matrix")
    return Ws


def _damped_calibrations(calibration, num_matrices: int, in_features: int, damping: float) -> list[_Damped]:
    """One damped second moment per matrix from one calibration for all or a list of one per
    matrix; a calibration given for several matrices is damped once (the same object)."""
    calib = list(calibration) if isinstance(calibration, (list, tuple)) else [calibration] * num_matrices
    if len(calib) != num_matrices:
        raise ValueError(f"got {len(calib)} calibrations for {num_matrices} matrices: give one, or one per matrix")
    by_id: dict[int, _Damped] = {}
    for c in calib:
        if id(c) not in by_id:
            by_id[id(c)] = _damp(as_covariance(c, in_features), damping)
    return [by_id[id(c)] for c in calib]


# -- reports ------------------------------------------------------------------------------------
@dataclass
class MatrixFitReport:
    """One matrix's errors, relative: weight ``||W - Ŵ|| / ||W||``; output
    ``||(W - Ŵ) L|| / ||W L||`` under the (damped) calibration covariance; the same for TT-SVD at
    the same bonds (``None`` when the bank shares cores, where no per-matrix TT-SVD exists)."""

    weight_error: float
    output_error: float
    tt_svd_weight_error: float | None
    tt_svd_output_error: float | None
    calibration_rank: int
    calibration_samples: int
    damping: float  # added to C's diagonal because C was rank-deficient (0.0: not damped)
    #: with a :class:`ReferencedCovariance`: ``||W X - Ŵ X'|| / ||W X||`` against the reference's
    #: outputs (``output_error`` is then against the effective target, under ``C'``)
    reference_output_error: float | None = None


@dataclass
class FitReport:
    """What :func:`fit_mpo_bank` did: the start it chose, the joint objective ``f`` after the
    start and after each sweep, the seconds, and one :class:`MatrixFitReport` per matrix."""

    matrices: list[MatrixFitReport]
    start: str
    objective: list[float] = field(default_factory=list)
    seconds: float = 0.0
    bond_dims: list[int] = field(default_factory=list)

    @property
    def sweeps(self) -> int:
        return len(self.objective) - 1

    def __str__(self) -> str:
        lines = [f"MPO fit: bonds {self.bond_dims}, start {self.start}, {self.sweeps} sweeps, "
                 f"{self.seconds:.1f} s, objective {self.objective[0]:.4g} -> {self.objective[-1]:.4g}",
                 "matrix  weight_err  output_err  tt-svd_weight  tt-svd_output  rank  damping"]
        for e, r in enumerate(self.matrices):
            tw = "-" if r.tt_svd_weight_error is None else f"{r.tt_svd_weight_error:.4f}"
            to = "-" if r.tt_svd_output_error is None else f"{r.tt_svd_output_error:.4f}"
            lines.append(f"{e:6d}  {r.weight_error:10.4f}  {r.output_error:10.4f}  {tw:>13}  {to:>13}  "
                         f"{r.calibration_rank:4d}  {r.damping:.2e}")
        damped = [e for e, r in enumerate(self.matrices) if r.damping > 0]
        if damped:
            lines.append(f"damped (rank-deficient calibration covariance): matrices {damped}")
        return "\n".join(lines)


# -- small helpers ------------------------------------------------------------------------------
def output_error(W: torch.Tensor, W_hat: torch.Tensor, covariance: torch.Tensor) -> float:
    """Relative output error ``||(W - Ŵ) L|| / ||W L||`` with ``L L^T = covariance`` (float64)."""
    W, W_hat, C = W.double(), W_hat.double(), covariance.double()
    D = W - W_hat
    num = float(torch.einsum("oi,ij,oj->", D, C, D).clamp_min(0.0))
    den = float(torch.einsum("oi,ij,oj->", W, C, W))
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _sqrt_psd(C: torch.Tensor, floor: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of a PSD matrix and its inverse; eigenvalues floored at
    ``floor * max`` so the inverse exists."""
    eig, vec = torch.linalg.eigh(C)
    eig = eig.clamp_min(float(eig[-1].clamp_min(1e-300)) * floor)
    root = eig.sqrt()
    return (vec * root) @ vec.T, (vec / root) @ vec.T


def whitened_svd(W: torch.Tensor, rank: int, calibration) -> torch.Tensor:
    """The closed-form minimiser of ``||(W - Ŵ) L||`` over rank-``rank`` matrices ``Ŵ`` (the
    SVD of ``W S``, ``S S^T = C``, mapped back by ``S^{-1}``: SVD-LLM's whitening); float64
    ``(out, in)``. ``calibration``: inputs ``(N, in)`` or an :class:`InputCovariance`
    (rank-deficient covariances are damped as in :func:`fit_mpo_bank`); with a
    :class:`ReferencedCovariance`, of its effective target."""
    W = _effective_targets([W.double()], [calibration])[0]
    C = _damp(as_covariance(calibration, W.shape[1]), 1e-6).covariance
    S, S_inv = _sqrt_psd(C)
    u, s, vh = torch.linalg.svd(W @ S, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank] @ S_inv


def _lossless(in_factors: Sequence[int], out_factors: Sequence[int]) -> list[int]:
    """``[1, r_1, ..., r_{m-1}, 1]``: the exact MPO's bonds."""
    return lossless_bond_dims([o * i for o, i in zip(out_factors, in_factors)])


def _site_tensor(W: torch.Tensor, in_factors, out_factors) -> torch.Tensor:
    """``(out, in)`` -> ``(o_1 i_1, ..., o_m i_m)`` (the MPO's site order)."""
    m = len(in_factors)
    t = W.reshape(*out_factors, *in_factors)
    perm = [p for k in range(m) for p in (k, m + k)]
    return t.permute(perm).reshape([o * i for o, i in zip(out_factors, in_factors)])


def tt_svd_with_bonds(W: torch.Tensor, in_factors: Sequence[int], out_factors: Sequence[int],
                      bond_dims: Sequence[int]) -> list[torch.Tensor]:
    """TT-SVD of ``W`` ``(out, in)`` truncated to the inner bonds ``bond_dims`` (m-1 ints, one
    cap per cut); returns the m cores ``(r, o_k, i_k, r')`` in ``W``'s dtype (float32 or wider)."""
    t = _site_tensor(W, in_factors, out_factors)
    dims = list(t.shape)
    rest, r_prev, cores3 = t.reshape(1, -1), 1, []
    for k in range(len(dims) - 1):
        u, s, vh, _ = _svd_split(rest.reshape(r_prev * dims[k], -1), int(bond_dims[k]), 0.0)
        cores3.append(u.reshape(r_prev, dims[k], u.shape[1]))
        rest, r_prev = s[:, None] * vh, u.shape[1]
    cores3.append(rest.reshape(r_prev, dims[-1], 1))
    return [g.reshape(g.shape[0], o, i, g.shape[-1]) for g, o, i in zip(cores3, out_factors, in_factors)]


def _site_marginals(C: torch.Tensor, in_factors: Sequence[int]) -> list[torch.Tensor]:
    """Per site k, ``C`` ``(in, in)`` traced over every other site: ``(i_k, i_k)``."""
    m = len(in_factors)
    t = C.reshape(*in_factors, *in_factors)
    letters = string.ascii_letters
    out = []
    for k in range(m):
        left = [letters[j] for j in range(m)]
        right = [letters[m + j] if j == k else letters[j] for j in range(m)]
        out.append(torch.einsum("".join(left) + "".join(right) + "->" + letters[k] + letters[m + k], t))
    return out


def _kron_whitened_start(W: torch.Tensor, C: torch.Tensor, in_factors, out_factors, bond_dims) -> list[torch.Tensor]:
    """TT-SVD of ``W (S_1 ⊗ ... ⊗ S_m)``, with ``S_k`` the square root of site ``k``'s marginal
    covariance, then ``S_k^{-1}`` folded into core ``k``'s input leg."""
    roots = [_sqrt_psd(Ck / max(float(torch.diagonal(Ck).mean()), 1e-300)) for Ck in _site_marginals(C, in_factors)]
    m = len(in_factors)
    t = W.reshape(W.shape[0], *in_factors)
    for k, (S, _) in enumerate(roots):
        t = torch.movedim(torch.tensordot(t, S, dims=([k + 1], [0])), -1, k + 1)
    cores = tt_svd_with_bonds(t.reshape(W.shape), in_factors, out_factors, bond_dims)
    return [torch.einsum("aojb,ji->aoib", g, S_inv) for g, (_, S_inv) in zip(cores, roots)]


# -- the local problem --------------------------------------------------------------------------
def _environments(cores: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Left environments ``L_k`` (cores ``0..k-1`` contracted, ``(O_<, I_<, r_{k-1})``) and right
    ones ``R_k`` (cores ``k+1..m-1``, ``(r_k, O_>, I_>)``) for every core ``k``."""
    one = cores[0].new_ones(1, 1, 1)
    lefts = [one]
    for g in cores[:-1]:
        P, I, a = lefts[-1].shape
        _, o, i, b = g.shape
        x = (lefts[-1].reshape(P * I, a) @ g.reshape(a, o * i * b)).reshape(P, I, o, i, b)
        lefts.append(x.permute(0, 2, 1, 3, 4).reshape(P * o, I * i, b))
    rights = [one]
    for g in reversed(cores[1:]):
        b, Q, J = rights[0].shape
        a, o, i, _ = g.shape
        x = (g.reshape(a * o * i, b) @ rights[0].reshape(b, Q * J)).reshape(a, o, i, Q, J)
        rights.insert(0, x.permute(0, 1, 3, 2, 4).reshape(a, o * Q, i * J))
    return lefts, rights


class _Local:
    """Matrix ``e``'s part of the quadratic in core ``k`` (shape ``(a, o, i, b)``):
    ``Ŵ_e = expand(G)`` is linear in ``G``; ``project`` is its adjoint."""

    def __init__(self, W: torch.Tensor, C: torch.Tensor, L: torch.Tensor, R: torch.Tensor,
                 core_shape: Sequence[int]) -> None:
        self.W, self.C, self.L, self.R = W, C, L, R
        self.P, self.I, self.a = L.shape
        self.b, self.Q, self.J = R.shape
        self.o, self.i = core_shape[1], core_shape[2]

    def expand(self, G: torch.Tensor) -> torch.Tensor:
        """``(out, in)`` matrix of core ``G`` in its environments."""
        P, I, a, b, Q, J, o, i = self.P, self.I, self.a, self.b, self.Q, self.J, self.o, self.i
        x = (self.L.reshape(P * I, a) @ G.reshape(a, o * i * b)).reshape(P * I * o * i, b)
        x = x @ self.R.reshape(b, Q * J)
        return x.reshape(P, I, o, i, Q, J).permute(0, 2, 4, 1, 3, 5).reshape(P * o * Q, I * i * J)

    def project(self, M: torch.Tensor) -> torch.Tensor:
        """Adjoint of :meth:`expand`: ``(out, in)`` -> core shape."""
        P, I, a, b, Q, J, o, i = self.P, self.I, self.a, self.b, self.Q, self.J, self.o, self.i
        x = M.reshape(P, o, Q, I, i, J).permute(0, 3, 1, 4, 2, 5).reshape(P * I * o * i, Q * J)
        x = (x @ self.R.reshape(b, Q * J).T).reshape(P * I, o * i * b)
        return (self.L.reshape(P * I, a).T @ x).reshape(a, o, i, b)

    def hessian_block(self) -> torch.Tensor:
        """Half the Hessian of ``tr(D C D^T)`` in the core, one block ``(a i b, a i b)`` (the
        same for every output index ``o``): ``sum_pq M_pq^T C M_pq``."""
        P, I, a, b, Q, J, i = self.P, self.I, self.a, self.b, self.Q, self.J, self.i
        eye = torch.eye(i, dtype=self.C.dtype, device=self.C.device)
        M = torch.einsum("pIa,kK,bqJ->pqIkJaKb", self.L, eye, self.R).reshape(P * Q, I * i * J, a * i * b)
        return torch.einsum("xin,xim->nm", M, torch.matmul(self.C, M))


def _solve_local(locals_: list[_Local], G: torch.Tensor, cg_iters: int) -> tuple[torch.Tensor, float]:
    """Minimise ``q(G) = sum_e tr((W_e - Ŵ_e(G)) C_e (...)^T)`` over ``G`` from the current
    ``G``; returns the new core and the exact change of ``q`` (<= 0). Exact (Cholesky) when
    forming the Hessian costs no more than the conjugate-gradient budget, else CG."""
    def hess(V):  # half the Hessian times V
        return sum(l.project(l.expand(V) @ l.C) for l in locals_)

    g = sum(l.project((l.expand(G) - l.W) @ l.C) for l in locals_)  # half the gradient
    a, o, i, b = G.shape
    n = a * i * b
    l0 = locals_[0]
    design_size = l0.P * l0.Q * l0.C.shape[0] * n  # entries of the stacked M_pq of hessian_block
    # exact when building the Hessian (~n/o products with C) costs no more than CG's budget, or
    # is small outright; bounded in memory either way
    if design_size <= 2 ** 24 and n <= 4096 and (n <= o * max(cg_iters, 8) or n <= 512):
        H = sum(l.hessian_block() for l in locals_)
        rhs = -g.permute(0, 2, 3, 1).reshape(n, o)  # one column per output index
        eye = torch.eye(n, dtype=H.dtype, device=H.device)
        scale = float(torch.diagonal(H).abs().max().clamp_min(1e-300))
        chol, info = torch.linalg.cholesky_ex(H)
        jitter = 1e-13
        while int(info) != 0 and jitter < 1e-3:  # singular (gauge or unseen directions)
            chol, info = torch.linalg.cholesky_ex(H + jitter * scale * eye)
            jitter *= 100
        if int(info) != 0:
            return G, 0.0
        d = torch.cholesky_solve(rhs, chol).reshape(a, i, b, o).permute(0, 3, 1, 2)
        Hd = hess(d)
    else:  # conjugate gradients on H d = -g from d = 0: every iterate lowers q
        d = torch.zeros_like(G)
        Hd = torch.zeros_like(G)
        r = -g
        p = r.clone()
        rr = float((r * r).sum())
        for _ in range(cg_iters):
            if rr == 0.0:
                break
            Hp = hess(p)
            pHp = float((p * Hp).sum())
            if pHp <= 0:
                break
            alpha = rr / pHp
            d = d + alpha * p
            Hd = Hd + alpha * Hp
            r = r - alpha * Hp
            rr_new = float((r * r).sum())
            p = r + (rr_new / rr) * p
            rr = rr_new
    change = 2.0 * float((g * d).sum() + 0.5 * (d * Hd).sum())  # q is twice the half-quadratic
    if not change < 0:  # rounding (or nothing to gain): never increase f
        return G, 0.0
    return G + d, change


# -- the fit -------------------------------------------------------------------------------------
def _objective(Ws, Cs, mats) -> float:
    """``sum_e tr((W_e - M_e) C_e (W_e - M_e)^T)``."""
    return float(sum((((W - M) @ C) * (W - M)).sum() for W, C, M in zip(Ws, Cs, mats)))


def _matrix(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    lefts, _ = _environments(cores)
    L, g = lefts[-1], cores[-1]
    P, I, a = L.shape
    _, o, i, _ = g.shape
    x = (L.reshape(P * I, a) @ g.reshape(a, o * i)).reshape(P, I, o, i)
    return x.permute(0, 2, 1, 3).reshape(P * o, I * i)


def _matrices(cores_per: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [_matrix(c) for c in cores_per]


def _move_gauge(cores: list[torch.Tensor], k: int, right: bool) -> None:
    """Orthogonalise core ``k`` by QR and push the remainder into its neighbour (exact)."""
    g = cores[k]
    a, o, i, b = g.shape
    if right:
        q, r = torch.linalg.qr(g.reshape(a * o * i, b))
        cores[k] = q.reshape(a, o, i, q.shape[1])
        cores[k + 1] = torch.einsum("ab,bxyc->axyc", r, cores[k + 1])
    else:
        q, r = torch.linalg.qr(g.reshape(a, o * i * b).T)
        cores[k] = q.T.reshape(q.shape[1], o, i, b)
        cores[k - 1] = torch.einsum("xoib,bc->xoic", cores[k - 1], r.T)


def fit_mpo_bank(
    targets: torch.Tensor | Sequence[torch.Tensor],
    in_factors: Sequence[int],
    out_factors: Sequence[int],
    *,
    calibration,
    max_bond: int | None = None,
    bond_dims: Sequence[int] | None = None,
    shared: Sequence[int] = (),
    sweeps: int = 4,
    tol: float = 1e-4,
    cg_iters: int = 8,
    damping: float = 1e-6,
    start: str = "auto",
    progress: bool = False,
) -> tuple[list[torch.Tensor], FitReport]:
    """Fit the cores of a bank of E MPO matrices to ``targets`` ``(E, out, in)`` (or one
    ``(out, in)``) under input statistics, minimising ``sum_e ||(W_e - Ŵ_e) L_e||^2``.

    Args:
        calibration: one for all matrices, or a list of E: inputs ``(N, in)`` or
            :class:`InputCovariance`. A rank-deficient covariance gets ``damping * mean(diag C)``
            added to its diagonal (reported per matrix).
        max_bond / bond_dims: one cap on every bond, or the m-1 inner bonds (capped at lossless).
        shared: indices of the cores every matrix shares (fitted jointly to all matrices).
        sweeps: at most this many ALS sweeps (each: left to right, then right to left); stops
            early when a sweep lowers the objective by less than ``tol`` (relative).
        cg_iters: conjugate-gradient iterations of a local step too large to solve exactly.
        start: ``"auto"`` (the better of ``"tt-svd"`` and ``"whitened"`` by the objective),
            ``"tt-svd"`` or ``"whitened"`` (Kronecker-whitened TT-SVD).
        progress: show a progress bar over sweeps.

    Returns:
        ``(cores, report)``: m float64 cores, ``(r, o_k, i_k, r')`` for shared ones and
        ``(E, r, o_k, i_k, r')`` for the others; and a :class:`FitReport`.
    """
    t0 = time.perf_counter()
    Ws = _target_matrices(targets)
    E = len(Ws)
    out_dim, in_dim = Ws[0].shape
    in_factors = check_factors(in_dim, in_factors, "input (column) dimension")
    out_factors = check_factors(out_dim, out_factors, "output (row) dimension")
    if len(in_factors) != len(out_factors):
        raise ValueError(f"in_factors {in_factors} and out_factors {out_factors} must have the same length m")
    if start not in ("auto", "tt-svd", "whitened"):
        raise ValueError(f"start must be 'auto', 'tt-svd' or 'whitened', got {start!r}")
    m = len(in_factors)
    bonds = resolve_bonds(in_factors, out_factors, max_bond, bond_dims)
    shared = sorted({int(k) % m for k in shared})
    device = Ws[0].device
    Ws = [W.detach().to(torch.float64) for W in Ws]
    originals = Ws
    Ws = [W.to(device) for W in _effective_targets(Ws, calibration)]
    stats = _damped_calibrations(calibration, E, in_dim, damping)
    Cs = [s.covariance.to(device) for s in stats]

    # starts: per matrix when nothing is shared, else one start (of the mean target) for all
    groups = [[e] for e in range(E)] if not shared else [list(range(E))]
    cores_per: list[list[torch.Tensor]] = [None] * E  # type: ignore[list-item]
    tt_mats: list[torch.Tensor | None] = [None] * E
    chosen = set()
    for group in groups:
        W_mean = sum(Ws[e] for e in group) / len(group)
        C_mean = sum(Cs[e] for e in group) / len(group)
        cands = {}
        if start in ("auto", "tt-svd"):
            cands["tt-svd"] = tt_svd_with_bonds(W_mean, in_factors, out_factors, bonds)
        if start in ("auto", "whitened"):
            cands["whitened"] = _kron_whitened_start(W_mean, C_mean, in_factors, out_factors, bonds)
        scored = {name: _objective([Ws[e] for e in group], [Cs[e] for e in group],
                                   [_matrix(c)] * len(group)) for name, c in cands.items()}
        best = min(scored, key=scored.get)
        chosen.add(best)
        for e in group:
            cores_per[e] = [c.clone() for c in cands[best]]
            if not shared and "tt-svd" in cands:
                tt_mats[e] = _matrix(cands["tt-svd"])
        if not shared and "tt-svd" not in cands:
            for e in group:
                tt_mats[e] = _matrix(tt_svd_with_bonds(Ws[e], in_factors, out_factors, bonds))

    history = [_objective(Ws, Cs, _matrices(cores_per))]
    gauge = not shared
    bar = tqdm(range(sweeps), desc="fitting MPO cores", disable=not progress)
    order = list(range(m)) + list(range(m - 2, 0, -1))
    for _ in bar:
        if gauge:  # centre on core 0 at the start of a sweep
            for e in range(E):
                for k in range(m - 1, 0, -1):
                    _move_gauge(cores_per[e], k, right=False)
        for pos, k in enumerate(order):
            envs = [_environments(cores_per[e]) for e in range(E)]
            shape = cores_per[0][k].shape
            if k in shared:
                locals_ = [_Local(Ws[e], Cs[e], envs[e][0][k], envs[e][1][k], shape) for e in range(E)]
                G, _ = _solve_local(locals_, cores_per[0][k], cg_iters)
                for e in range(E):
                    cores_per[e][k] = G
            else:
                for e in range(E):
                    local = _Local(Ws[e], Cs[e], envs[e][0][k], envs[e][1][k], shape)
                    G, _ = _solve_local([local], cores_per[e][k], cg_iters)
                    cores_per[e][k] = G
            if gauge:  # move the centre to the next core of the sweep
                nxt = order[pos + 1] if pos + 1 < len(order) else 0
                if nxt != k:
                    for e in range(E):
                        _move_gauge(cores_per[e], k, right=nxt > k)
        exact = _objective(Ws, Cs, _matrices(cores_per))
        history.append(exact)
        bar.set_postfix(objective=f"{exact:.4g}")
        if history[-2] - exact <= tol * max(history[-2], 1e-300):
            break
    bar.close()

    mats = _matrices(cores_per)
    reports = []
    for e, ref_error in enumerate(_reference_errors(originals, mats, calibration)):
        norm = float(originals[e].norm()) or 1.0
        tt = tt_mats[e]
        reports.append(MatrixFitReport(
            weight_error=float((originals[e].to(device) - mats[e]).norm()) / norm,
            output_error=output_error(Ws[e], mats[e], Cs[e]),
            tt_svd_weight_error=None if tt is None else float((originals[e].to(device) - tt).norm()) / norm,
            tt_svd_output_error=None if tt is None else output_error(Ws[e], tt, Cs[e]),
            calibration_rank=stats[e].rank, calibration_samples=stats[e].count, damping=stats[e].damping,
            reference_output_error=ref_error))
    cores = [cores_per[0][k] if k in shared else torch.stack([cores_per[e][k] for e in range(E)])
             for k in range(m)]
    report = FitReport(reports, start="/".join(sorted(chosen)), objective=history,
                       seconds=time.perf_counter() - t0, bond_dims=[1, *bonds, 1])
    return cores, report


def resolve_bonds(in_factors: Sequence[int], out_factors: Sequence[int], max_bond: int | None,
                  bond_dims: Sequence[int] | None) -> list[int]:
    """The m-1 inner bonds: ``bond_dims`` (each capped at lossless) or the lossless bonds capped
    at ``max_bond``."""
    lossless = _lossless(in_factors, out_factors)[1:-1]
    if bond_dims is None:
        return [min(b, max_bond) if max_bond is not None else b for b in lossless]
    if max_bond is not None:
        raise ValueError("give max_bond or bond_dims, not both")
    bond_dims = [int(b) for b in bond_dims]
    if len(bond_dims) != len(lossless) or min(bond_dims) < 1:
        raise ValueError(f"bond_dims must be {len(lossless)} positive ints (the inner bonds), got {bond_dims}")
    return [min(b, l) for b, l in zip(bond_dims, lossless)]


# -- budgets --------------------------------------------------------------------------------------
def _cut_spectra(W: torch.Tensor, in_factors: Sequence[int], out_factors: Sequence[int]) -> list[torch.Tensor]:
    """Squared singular values of ``W``'s site tensor at each of the m-1 cuts (the Schmidt
    spectra: what an MPO bond of that cut discards when truncated)."""
    t = _site_tensor(W, in_factors, out_factors)
    dims = list(t.shape)
    out = []
    for k in range(1, len(dims)):
        s = torch.linalg.svdvals(t.reshape(math.prod(dims[:k]), -1))
        out.append(s.double() ** 2)
    return out


def allocate_bonds(
    matrices: Sequence[torch.Tensor],
    factors: Sequence[tuple[Sequence[int], Sequence[int]]],
    target_ratio: float,
    calibration: Sequence | None = None,
) -> list[list[int]]:
    """Inner bond dims (m-1 per matrix) keeping ``target_ratio`` of the matrices' dense
    parameters in total, chosen by the error each bond costs.

    Each matrix's cost of a bond choice is ``sum_k sum_{j > r_k} s_{k,j}^2 / ||A||^2``: the
    squared Schmidt values its cuts discard, relative (an upper bound on TT-SVD's squared
    relative error, exact for one cut), with ``A = W`` data-blind and ``A = W S`` (``S S^T = C``,
    the whitened matrix, whose error is the output error) when ``calibration`` (one per matrix)
    is given. Starting from lossless bonds, the bond whose next decrement costs the least
    relative error per parameter saved is decremented until the budget holds, across all
    matrices (so layers that compress well give up more).

    Args:
        matrices: targets ``(out, in)``.
        factors: ``(in_factors, out_factors)`` per matrix.
        target_ratio: fraction of ``sum(out * in)`` to keep, in ``(0, 1]``.
        calibration: ``None`` or, per matrix, inputs ``(N, in)`` / :class:`InputCovariance`.
    """
    if not 0.0 < float(target_ratio) <= 1.0:
        raise ValueError(f"target_ratio must be in (0, 1], got {target_ratio!r}")
    if len(factors) != len(matrices):
        raise ValueError(f"got {len(factors)} factor pairs for {len(matrices)} matrices")
    if calibration is not None and len(calibration) != len(matrices):
        raise ValueError(f"got {len(calibration)} calibrations for {len(matrices)} matrices")
    spectra, site_dims, bonds = [], [], []
    for j, (W, (in_f, out_f)) in enumerate(zip(matrices, factors)):
        A = W.detach().double()
        if calibration is not None and calibration[j] is not None:
            S, _ = _sqrt_psd(_damp(as_covariance(calibration[j], A.shape[1]), 1e-6).covariance.to(A.device))
            A = A @ S
        total = float((A * A).sum()) or 1.0
        spectra.append([s / total for s in _cut_spectra(A, in_f, out_f)])
        site_dims.append([o * i for o, i in zip(out_f, in_f)])
        bonds.append(_lossless(in_f, out_f))
    budget = float(target_ratio) * sum(W.shape[0] * W.shape[1] for W in matrices)

    def params(j: int) -> int:
        b, d = bonds[j], site_dims[j]
        return sum(b[k] * d[k] * b[k + 1] for k in range(len(d)))

    def candidate(j: int, k: int):  # (cost per parameter, saved) of decrementing bond k of matrix j
        b, d = bonds[j], site_dims[j]
        if b[k] <= 1:
            return None
        saved = b[k - 1] * d[k - 1] + d[k] * b[k + 1]
        return float(spectra[j][k - 1][b[k] - 1]) / saved, saved

    total_params = sum(params(j) for j in range(len(matrices)))
    version = {}
    heap = []
    for j in range(len(matrices)):
        for k in range(1, len(bonds[j]) - 1):
            c = candidate(j, k)
            version[j, k] = 0
            if c is not None:
                heap.append((c[0], j, k, 0))
    heapq.heapify(heap)
    while total_params > budget and heap:
        cost, j, k, v = heapq.heappop(heap)
        if v != version[j, k]:
            continue
        _, saved = candidate(j, k)
        bonds[j][k] -= 1
        total_params -= saved
        for kk in (k - 1, k, k + 1):  # the neighbours' savings changed
            if 1 <= kk < len(bonds[j]) - 1:
                version[j, kk] += 1
                c = candidate(j, kk)
                if c is not None:
                    heapq.heappush(heap, (c[0], j, kk, version[j, kk]))
    if total_params > budget:
        raise ValueError(f"target_ratio={target_ratio} is below what bonds of 1 reach "
                         f"({total_params / (budget / target_ratio):.4f} of the parameters)")
    return [b[1:-1] for b in bonds]
