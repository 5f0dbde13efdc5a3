"""Mixture-of-experts with factorized experts that share any subset of their tensors.

Pieces: routers (:mod:`.routers`), expert banks (:mod:`.banks`), FFN experts (:mod:`.experts`), dispatch
(:mod:`.dispatch`), the layer (:mod:`.layer`), auxiliary losses (:mod:`.losses`), the gradient
mask (:mod:`.gradient_mask`), conversion of pretrained models (:mod:`.convert`,
:mod:`.adapters`) and persistence (:mod:`.persistence`). transformers integration
(``GradientMaskCallback``, ``MoETrainer``) is imported lazily.
"""

from .adapters import FFNAdapter, FFNSpec, register_adapter, registered_adapters, unregister_adapter
from .config import MoEConfig
from .convert import (
    ParameterCount,
    build_moe_layer,
    conversion_errors,
    convert,
    count_parameters,
    converted_modules,
    find_target_modules,
    get_moe_config,
    print_trainable_parameters,
)
from .dispatch import DispatchPlan, combine, plan_dispatch
from ..networks import resolve_share
from .banks import DenseExpertBank, ExpertBank, MPOExpertBank
from .grouped import GROUPED_IMPLS, grouped_linear, grouped_mm_supported
from .experts import ExpertFFN
from .gradient_mask import GradientMask, shared_parameters
from .layer import MoELayer, RoutingStats, auxiliary_loss, moe_layers
from .losses import load_balancing_loss, router_z_loss
from .persistence import from_pretrained, load_weights, save_pretrained
from .routers import HashRouter, Router, RouterOutput, SwitchRouter, TopKRouter

__all__ = [
    "MoEConfig", "convert", "get_moe_config", "converted_modules", "conversion_errors", "build_moe_layer", "find_target_modules", "count_parameters",
    "print_trainable_parameters", "ParameterCount", "MoELayer", "RoutingStats", "ExpertFFN",
    "ExpertBank", "MPOExpertBank", "DenseExpertBank", "grouped_linear", "grouped_mm_supported", "GROUPED_IMPLS", "resolve_share", "Router", "RouterOutput", "TopKRouter",
    "SwitchRouter", "HashRouter", "DispatchPlan", "plan_dispatch", "combine", "GradientMask",
    "shared_parameters", "auxiliary_loss", "load_balancing_loss", "router_z_loss", "moe_layers",
    "save_pretrained", "from_pretrained", "load_weights", "FFNAdapter", "FFNSpec",
    "register_adapter", "unregister_adapter", "registered_adapters", "GradientMaskCallback", "MoETrainer", "MoETrainerMixin",
]


def __getattr__(name):
    if name in ("GradientMaskCallback", "MoETrainer", "MoETrainerMixin"):
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'tnmoe.moe' has no attribute {name!r}")
