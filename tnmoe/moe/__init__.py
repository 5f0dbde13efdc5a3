"""Mixture-of-experts with factorized experts that share any subset of their tensors.

The layer: routers (:mod:`.routers`), expert banks (:mod:`.banks`), FFN experts (:mod:`.experts`),
dispatch (:mod:`.dispatch`), the layer (:mod:`.layer`), auxiliary losses (:mod:`.losses`) and the
gradient mask (:mod:`.gradient_mask`). None of these modules knows about whole models.

This namespace is also where users find the model-level API of :mod:`tnmoe.models`
(``convert``, ``save_pretrained`` / ``from_pretrained``, adapters, ``MoETrainer``): those names
are resolved on first use, so the layer does not depend on the model code. Importing it
registers the ``tnmoe`` model type with transformers' Auto classes (on transformers' import),
so ``AutoModel*.from_pretrained`` loads converted checkpoints.
"""

from ..networks import resolve_share
from .banks import BaseDeltaExpertBank, DenseExpertBank, ExpertBank, MPOExpertBank
from .config import MoEConfig
from .dispatch import DispatchPlan, combine, plan_dispatch
from .experts import ClampedSwiGLU, ExpertFFN
from .gradient_mask import GradientMask, shared_parameters
from .grouped import GROUPED_IMPLS, grouped_linear, grouped_mm_supported
from .layer import MoELayer, RoutingStats, auxiliary_loss, moe_layers
from .losses import load_balancing_loss, router_z_loss
from .routers import HashRouter, Router, RouterOutput, SwitchRouter, TopKRouter
from .routed import RoutedExperts, routed_experts

_LAYER_NAMES = [
    "MoEConfig", "MoELayer", "RoutingStats", "ExpertFFN", "ClampedSwiGLU", "RoutedExperts", "routed_experts",
    "ExpertBank", "MPOExpertBank", "DenseExpertBank", "BaseDeltaExpertBank",
    "grouped_linear", "grouped_mm_supported", "GROUPED_IMPLS", "resolve_share", "Router", "RouterOutput",
    "TopKRouter", "SwitchRouter", "HashRouter", "DispatchPlan", "plan_dispatch", "combine", "GradientMask",
    "shared_parameters", "auxiliary_loss", "load_balancing_loss", "router_z_loss", "moe_layers",
]
#: names of :mod:`tnmoe.models` served from here (resolved on first use)
_MODEL_NAMES = [
    "convert", "get_moe_config", "converted_modules", "conversion_errors", "build_moe_layer", "find_target_modules",
    "count_parameters", "print_trainable_parameters", "ParameterCount", "save_pretrained", "from_pretrained",
    "load_weights", "FFNAdapter", "FFNSpec", "register_adapter", "unregister_adapter", "registered_adapters",
    "ExpertsAdapter", "ExpertsSpec", "register_structural_adapter",
    "GradientMaskCallback", "MoETrainer", "MoETrainerMixin", "ffn_dimensions", "fit_reports",
    "truncate_ffns", "TruncatedMatrix", "TRUNCATION_METHODS",
    "compress", "CompressionReport", "LayerCompression", "low_rank_factors",
]
__all__ = _LAYER_NAMES + _MODEL_NAMES


def __getattr__(name):
    if name in _MODEL_NAMES:
        from .. import models

        return getattr(models, name)
    raise AttributeError(f"module 'tnmoe.moe' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _converting_model_class(base: type, base_config: type) -> type:
    from ..models.persistence import tnmoe_model_class

    return tnmoe_model_class(base, base_config)


def _register_with_transformers() -> None:
    from ..models.hf_config import ensure_auto_registration

    ensure_auto_registration(_converting_model_class)


_register_with_transformers()  # AutoModel*.from_pretrained on tnmoe checkpoints
