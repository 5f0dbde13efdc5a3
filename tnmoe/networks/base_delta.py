"""A shared base plus per-matrix low-rank deltas, fitted to data (D²-MoE's structure).

Each of E matrices ``(out, in)`` is ``Ŵ_e = B + U_e V_e``: one base ``B`` ``(out, in)`` shared by
all, and a rank-``r`` delta ``U_e`` ``(out, r)``, ``V_e`` ``(r, in)`` per matrix. That is
``out * in + E * r * (out + in)`` numbers against ``E * out * in``. :func:`fit_base_delta`
minimises the same objective as :func:`~tnmoe.networks.fit.fit_mpo_bank`::

    f = sum_e tr((W_e - Ŵ_e) C_e (W_e - Ŵ_e)^T)

by alternating two exact steps: with the deltas fixed, ``B`` solves the normal equations
``B (sum_e C_e) = sum_e (W_e - U_e V_e) C_e``; with ``B`` fixed, each delta is the whitened
SVD of ``W_e - B`` (the closed-form rank-``r`` minimiser under ``C_e``). Neither step can raise
``f``, so the objective never increases from one sweep to the next. The start is the base of
the first step with zero deltas (the ``C``-weighted mean of the targets), then its deltas.
Without calibration every ``C_e`` is the identity: the plain mean and truncated SVDs.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .fit import (FitReport, InputCovariance, MatrixFitReport, _damped_calibrations, _effective_targets,
                  _reference_errors, _sqrt_psd, _target_matrices,
                  output_error)

__all__ = ["fit_base_delta", "base_delta_params"]


def base_delta_params(num_matrices: int, out_features: int, in_features: int, rank: int) -> int:
    """Numbers in a base-plus-deltas bank: ``out * in + E * rank * (out + in)``."""
    return out_features * in_features + num_matrices * rank * (out_features + in_features)


def _objective(Ws, Cs, B, Us, Vs) -> float:
    total = 0.0
    for W, C, U, V in zip(Ws, Cs, Us, Vs):
        D = W - B - U @ V
        total += float(torch.einsum("oi,ij,oj->", D, C, D))
    return total


def _balanced(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product ``U V`` with each rank component's column of ``U`` and row of ``V``
    rescaled to equal norms. The fit's ``U = u s`` carries the whole scale and ``V`` its inverse;
    a first-order optimizer then moves one factor by far more than the other (Adam steps are
    the same size for every entry), which a fine-tune after compression pays for."""
    a, b = U.norm(dim=0), V.norm(dim=1)
    ok = (a > 0) & (b > 0)
    f = torch.where(ok, (b / torch.where(ok, a, torch.ones_like(a))).sqrt(), torch.ones_like(a))
    return U * f, V / f[:, None]


def fit_base_delta(
    targets: torch.Tensor | Sequence[torch.Tensor],
    rank: int,
    *,
    calibration=None,
    sweeps: int = 4,
    tol: float = 1e-4,
    damping: float = 1e-6,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, FitReport]:
    """Fit ``W_e ≈ B + U_e V_e`` to ``targets`` ``(E, out, in)`` under input statistics.

    Args:
        rank: the deltas' rank ``r`` (at least 1; capped at ``min(out, in)``, where the fit is exact).
        calibration: ``None`` (data-blind: every ``C_e = I``), one for all matrices, or a list
            of E: inputs ``(N, in)`` or :class:`~tnmoe.networks.fit.InputCovariance`. A
            rank-deficient covariance is damped as in :func:`~tnmoe.networks.fit.fit_mpo_bank`.
        sweeps: at most this many (base, deltas) sweeps after the start; stops early when one
            lowers the objective by less than ``tol`` (relative).

    Returns:
        ``(B, U, V, report)``: float64 ``B`` ``(out, in)``, ``U`` ``(E, out, r)``, ``V``
        ``(E, r, in)`` (each rank component's column of ``U`` and row of ``V`` of equal norm);
        the report's ``objective`` is ``f`` after the start and after each sweep.
    """
    t0 = time.perf_counter()
    Ws = _target_matrices(targets)
    out_dim, in_dim = Ws[0].shape
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer (the deltas' rank), got {rank!r}")
    E = len(Ws)
    r = min(rank, out_dim, in_dim)
    device = Ws[0].device
    Ws = [W.detach().to(torch.float64) for W in Ws]
    data_blind = calibration is None
    if data_blind:
        calibration = InputCovariance.from_matrix(torch.eye(in_dim, dtype=torch.float64, device=device))
    originals = Ws
    Ws = [W.to(device) for W in _effective_targets(Ws, calibration)]  # ReferencedCovariance
    stats = _damped_calibrations(calibration, E, in_dim, damping)
    Cs = [s.covariance.to(device) for s in stats]
    roots = {}
    for s in stats:
        if id(s) not in roots:
            roots[id(s)] = _sqrt_psd(s.covariance.to(device))
    Ss = [roots[id(s)] for s in stats]
    C_sum = sum(Cs)

    def base_step(Us, Vs) -> torch.Tensor:
        rhs = sum((W - U @ V) @ C for W, U, V, C in zip(Ws, Us, Vs, Cs))  # (out, in); C_sum symmetric
        return torch.linalg.solve(C_sum, rhs.T).T

    def delta_step(B):
        Us, Vs = [], []
        for W, (S, S_inv) in zip(Ws, Ss):
            u, s, vh = torch.linalg.svd((W - B) @ S, full_matrices=False)
            Us.append(u[:, :r] * s[:r])
            Vs.append(vh[:r] @ S_inv)
        return Us, Vs

    zeros_u = [torch.zeros(out_dim, r, dtype=torch.float64, device=device)] * E
    zeros_v = [torch.zeros(r, in_dim, dtype=torch.float64, device=device)] * E
    B = base_step(zeros_u, zeros_v)
    Us, Vs = delta_step(B)
    history = [_objective(Ws, Cs, B, Us, Vs)]
    bar = tqdm(range(sweeps), desc="fitting base + deltas", disable=not progress)
    for _ in bar:
        B_new = base_step(Us, Vs)
        Us_new, Vs_new = delta_step(B_new)
        value = _objective(Ws, Cs, B_new, Us_new, Vs_new)
        if value > history[-1]:  # round-off at the optimum: keep the better point
            break
        B, Us, Vs = B_new, Us_new, Vs_new
        history.append(value)
        bar.set_postfix(objective=f"{value:.4g}")
        if history[-2] - value <= tol * max(history[-2], 1e-300):
            break
    bar.close()

    Us, Vs = zip(*(_balanced(U, V) for U, V in zip(Us, Vs)))
    reports = []
    W_hats = [B + Us[e] @ Vs[e] for e in range(E)]
    for e, ref_error in enumerate(_reference_errors(originals, W_hats, calibration)):
        norm = float(originals[e].norm()) or 1.0
        reports.append(MatrixFitReport(
            weight_error=float((originals[e] - W_hats[e]).norm()) / norm,
            output_error=output_error(Ws[e], W_hats[e], Cs[e]), tt_svd_weight_error=None, tt_svd_output_error=None,
            calibration_rank=stats[e].rank, calibration_samples=stats[e].count, damping=stats[e].damping,
            reference_output_error=ref_error))
    report = FitReport(reports, start="mean + svd deltas" if data_blind
                       else "weighted mean + whitened-svd deltas", objective=history, seconds=time.perf_counter() - t0,
                       bond_dims=[1, r, 1])
    return B, torch.stack(Us), torch.stack(Vs), report
