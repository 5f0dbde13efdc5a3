"""Model-level code: tnmoe layers inside whole models.

* :mod:`.adapters`: one adapter per kind of FFN (how to read it, where the replacement goes);
  a new architecture goes here.
* :mod:`.convert`: upcycle / convert a model's FFNs to MoE layers, parameter accounting.
* :mod:`.persistence` and :mod:`.hf_config`: checkpoints (``save_pretrained`` /
  ``from_pretrained``, transformers' Auto classes).
* :mod:`.trainer`: transformers ``Trainer`` glue (gradient mask callback, auxiliary loss).

Built on :mod:`tnmoe.moe` (the layer) and :mod:`tnmoe.networks`; the same names are available
from :mod:`tnmoe.moe`, the namespace users import (``import tnmoe.moe as moe; moe.convert(...)``).
The trainer glue needs transformers and is imported on first use.
"""

from .adapters import (
    ExpertsAdapter,
    ExpertsSpec,
    FFNAdapter,
    FFNSpec,
    register_adapter,
    register_structural_adapter,
    registered_adapters,
    unregister_adapter,
)
from .convert import (
    ParameterCount,
    build_moe_layer,
    conversion_errors,
    fit_reports,
    convert,
    converted_modules,
    count_parameters,
    ffn_dimensions,
    find_target_modules,
    get_moe_config,
    print_trainable_parameters,
)
from .truncate import TRUNCATION_METHODS, TruncatedMatrix, truncate_ffns
from .persistence import from_pretrained, load_weights, save_pretrained
from .compress import CompressionReport, LayerCompression, compress, low_rank_factors

__all__ = [
    "convert", "get_moe_config", "converted_modules", "conversion_errors", "build_moe_layer", "find_target_modules",
    "count_parameters", "print_trainable_parameters", "ParameterCount", "save_pretrained", "from_pretrained",
    "load_weights", "FFNAdapter", "FFNSpec", "register_adapter", "unregister_adapter", "registered_adapters",
    "ExpertsAdapter", "ExpertsSpec", "register_structural_adapter",
    "GradientMaskCallback", "MoETrainer", "MoETrainerMixin", "ffn_dimensions", "fit_reports",
    "truncate_ffns", "TruncatedMatrix", "TRUNCATION_METHODS",
    "compress", "CompressionReport", "LayerCompression", "low_rank_factors",
]

_TRAINER_NAMES = ("GradientMaskCallback", "MoETrainer", "MoETrainerMixin")


def __getattr__(name):
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'tnmoe.models' has no attribute {name!r}")
