"""Tensor-network core: MPO / tensor-train algebra, contraction engine, ``MPOLinear``.

Knows nothing of experts or routing (see :mod:`tnmoe.moe`).
"""

from .bank import (
    RECONSTRUCT_STRATEGIES,
    SHARE_NAMES,
    MPOBank,
    accumulate_reconstruction,
    check_input_dtype,
    clear_weight_caches,
    discard_accumulation,
    frozen_weights,
    resolve_share,
    set_weight_cache_budget,
    set_weight_cache_validation,
)
from .base_delta import base_delta_params, fit_base_delta
from .blocked import matmul_permute
from .cache import (
    DerivedTensorCache,
    TrackedParameter,
    WeightsChangedError,
    inference_cache_allowed,
    tensor_digest,
    track_parameters,
)
from .contraction import (
    ContractionEngine,
    ContractionPlan,
    apply_equation,
    default_engine,
    reconstruct_equation,
)
from .decompose import SVDTruncation, lossless_bond_dims, move_center, truncate_train, tt_svd
from .factorize import check_factors, factorize
from .fit import (CORRECTION_RIDGE, FitReport, InputCovariance, MatrixFitReport, ReferencedCovariance, allocate_bonds,
                  fit_mpo_bank)
from .interop import (
    contract_network,
    from_finite_mpo,
    from_tensornetwork,
    network_to_einsum,
    to_finite_mpo,
    to_tensornetwork,
)
from .layers import MPOLinear, linear_weight
from .mpo import MPO, TensorTrain, mpo_bond_dims, mpo_core_shapes

__all__ = [
    "MPO",
    "TensorTrain",
    "MPOLinear",
    "MPOBank",
    "accumulate_reconstruction",
    "discard_accumulation",
    "frozen_weights",
    "set_weight_cache_budget",
    "set_weight_cache_validation",
    "clear_weight_caches",
    "WeightsChangedError",
    "tensor_digest",
    "resolve_share",
    "check_input_dtype",
    "SHARE_NAMES",
    "RECONSTRUCT_STRATEGIES",
    "ContractionEngine",
    "ContractionPlan",
    "default_engine",
    "apply_equation",
    "reconstruct_equation",
    "matmul_permute",
    "fit_mpo_bank",
    "fit_base_delta",
    "base_delta_params",
    "allocate_bonds",
    "InputCovariance",
    "ReferencedCovariance",
    "CORRECTION_RIDGE",
    "FitReport",
    "MatrixFitReport",
    "factorize",
    "check_factors",
    "tt_svd",
    "truncate_train",
    "move_center",
    "lossless_bond_dims",
    "mpo_bond_dims",
    "mpo_core_shapes",
    "SVDTruncation",
    "linear_weight",
    "DerivedTensorCache",
    "TrackedParameter",
    "track_parameters",
    "inference_cache_allowed",
    "to_tensornetwork",
    "from_tensornetwork",
    "to_finite_mpo",
    "from_finite_mpo",
    "network_to_einsum",
    "contract_network",
]
