"""Truncate a model's FFN matrices in place, keeping the model dense: every FFN matrix is replaced
by its low-parameter approximation (TT-SVD, data-aware MPO fit, plain or whitened SVD at the
MPO's parameter count), reconstructed to a full matrix in the same module.

This separates a decomposition from its parametrisation: a truncated dense model is trained like
the original, so a study can tell what the decomposition loses from what the MPO (or the MoE
routing) changes. The matrices and factorizations are the ones :func:`tnmoe.moe.convert` uses
for the same :class:`~tnmoe.moe.MoEConfig` (``m``/``factors``, ``max_bond``, ``target_modules``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..moe.config import MoEConfig
from ..networks import MPO
from ..networks.fit import CORRECTION_RIDGE, ReferencedCovariance, check_ridge, output_error, whitened_svd
from .adapters import get_adapter
from .calibration import (FFN_STAGES, _holder, collect_ffn_covariances, collect_referenced_covariances,
                          substitute_matrices)
from .convert import find_target_modules
from .routed import matrix_factors

__all__ = ["TRUNCATION_METHODS", "TruncatedMatrix", "truncate_ffns"]

#: ``tt-svd``: the MPO's TT-SVD at ``max_bond``; ``data-aware``: the MPO fitted to the matrix's
#: outputs on calibration inputs (:func:`tnmoe.networks.fit.fit_mpo_bank`); ``svd`` /
#: ``whitened-svd``: rank-r factorizations with r the largest rank whose ``r * (out + in)``
#: parameters do not exceed the MPO's (plain, or SVD-LLM's closed form under the calibration
#: covariance)
TRUNCATION_METHODS = ("tt-svd", "data-aware", "svd", "whitened-svd")
_NEEDS_CALIBRATION = ("data-aware", "whitened-svd")


@dataclass
class TruncatedMatrix:
    """One replaced matrix: ``name`` (the FFN), ``role`` (up/down/gate), ``shape`` ``(out, in)``,
    ``params`` of the approximation (MPO cores, or ``rank * (out + in)``) against ``dense_params``,
    ``rank`` (SVD methods; else ``None``), relative ``weight_error`` ``||W - Ŵ|| / ||W||`` and
    ``output_error`` ``||(W - Ŵ) L|| / ||W L||`` on the calibration inputs (``None`` without)."""

    name: str
    role: str
    shape: tuple[int, int]
    params: int
    dense_params: int
    rank: int | None
    weight_error: float
    output_error: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def truncate_ffns(model: nn.Module, config: MoEConfig, *, method: str = "tt-svd", calibration=None,
                  fit_options: dict | None = None, progress: bool = True,
                  sequential: bool = False, sequential_ridge: float = CORRECTION_RIDGE) -> list[TruncatedMatrix]:
    """Replace every FFN matrix ``config.target_modules`` selects by its truncation, in place.

    ``config`` gives the factorization (``m`` / ``factors``) and ``max_bond`` (required: it sets the
    parameter budget); ``method`` is one of :data:`TRUNCATION_METHODS`. ``calibration``: an
    iterable of batches as for :func:`tnmoe.moe.convert` (required by ``data-aware`` and
    ``whitened-svd``; with the others it only adds ``output_error`` to the report). All matrices
    are computed before any is written, so on an error the model is unchanged. Returns one
    :class:`TruncatedMatrix` per replaced matrix. ``sequential=True``: each FFN is fitted to the
    original model's outputs from the inputs the truncations before it give (as for
    :func:`tnmoe.moe.convert`, with ``sequential_ridge`` as there); ``output_error`` is then
    against the original outputs.
    """
    sequential_ridge = check_ridge(sequential_ridge)
    if method not in TRUNCATION_METHODS:
        raise ValueError(f"method must be one of {TRUNCATION_METHODS}, got {method!r}")
    if config.max_bond is None:
        raise ValueError("truncate_ffns needs config.max_bond (the bond cap that sets each matrix's parameter "
                         "budget); without it nothing is truncated")
    if method in _NEEDS_CALIBRATION and calibration is None:
        raise ValueError(f"method={method!r} fits to the layer inputs: pass calibration= (batches of model inputs)")
    targets = find_target_modules(model, config.target_modules)
    routed = [name for name, module in targets if get_adapter(module).routed_experts]
    if routed:
        raise ValueError(f"truncate_ffns replaces dense FFN matrices; {routed[:3]} hold routed experts "
                         "(use tnmoe.moe.convert or compress for MoE models)")
    if sequential and calibration is None:
        raise ValueError("sequential=True fits each FFN to the original model's outputs: pass calibration= batches")
    if sequential:
        calibration = list(calibration)  # every FFN runs through them twice
    covariances = collect_ffn_covariances(model, targets, calibration, progress=progress) \
        if calibration and not sequential else {}
    planned = []
    substitutes: dict[str, torch.Tensor] = {}  # sequential: the earlier FFNs' truncations
    for name, module in tqdm(targets, desc=f"truncating FFNs ({method})", disable=not progress):
        spec = get_adapter(module).extract(module)
        fitted = {}
        matrices = spec.matrices()
        order = [role for stage in FFN_STAGES for role in stage if role in matrices]
        for role in order:
            matrix = matrices[role]
            if sequential and role not in covariances.get(name, {}):
                # this role's stage: its inputs come after this FFN's earlier-stage fits too
                stage = next(st for st in FFN_STAGES if role in st)
                covariances.setdefault(name, {}).update(collect_referenced_covariances(
                    model, name, module, calibration, substitutes, roles=stage, progress=False,
                    ridge=sequential_ridge))
            if _holder(module, matrix) is None:
                raise ValueError(f"{name}.{role} ({type(module).__name__}) is not held by a linear submodule's weight, "
                                 "so it cannot be replaced in place (model left unchanged)")
            cov = covariances.get(name, {}).get(role)
            W = matrix.detach().double()
            out_dim, in_dim = W.shape
            try:
                in_f, out_f = matrix_factors(config, out_dim, in_dim)
            except ValueError as err:
                raise ValueError(f"{name}.{role}: {err} (model left unchanged)") from None
            mpo = MPO.from_matrix(W, in_f, out_f, max_bond=config.max_bond,
                                  calibration=cov if method == "data-aware" else None,
                                  fit_options=fit_options if method == "data-aware" else None)
            params, rank = sum(c.numel() for c in mpo.cores), None
            if method in ("tt-svd", "data-aware"):
                W_hat = mpo.to_matrix().double()
            else:
                rank = max(1, params // (out_dim + in_dim))
                params = rank * (out_dim + in_dim)
                if method == "whitened-svd":
                    W_hat = whitened_svd(W, rank, cov)
                else:
                    u, s, vh = torch.linalg.svd(W, full_matrices=False)
                    W_hat = (u[:, :rank] * s[:rank]) @ vh[:rank]
            weight_error = float((W_hat - W).norm() / W.norm().clamp_min(1e-300))
            out_err = None if cov is None else cov.reference_output_error(W, W_hat) \
                if isinstance(cov, ReferencedCovariance) else output_error(W, W_hat, cov.covariance())
            fitted[role] = W_hat
            planned.append((matrix, W_hat, TruncatedMatrix(name, role, (out_dim, in_dim), int(params),
                                                           out_dim * in_dim, rank, weight_error, out_err)))
            if sequential:
                substitutes.update(substitute_matrices(model, module, {role: W_hat}, existing=substitutes))
    with torch.no_grad():
        for matrix, W_hat, _ in planned:
            matrix.copy_(W_hat.to(matrix.dtype))  # the spec's matrix is a view of the module's weight
    return [row for *_, row in planned]
