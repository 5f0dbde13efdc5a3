"""Architecture adapters: how to read a model's FFN (dense MLP or fused MoE experts) and where to
put the tnmoe module that replaces it.

One module per kind of FFN: :mod:`.dense` (GPT-2, T5, BERT-family, GPT-NeoX, gated MLPs, recognised
by structure), :mod:`.moe_experts` (the routed experts of transformers' MoE models). A new
architecture is an :class:`FFNAdapter` registered with :func:`register_adapter` for its FFN
class name.
"""

from . import dense, moe_experts  # noqa: F401  (registers the built-in adapters)
from .base import (
    FFNAdapter,
    FFNSpec,
    get_adapter,
    register_adapter,
    register_structural_adapter,
    registered_adapters,
    unregister_adapter,
)
from .moe_experts import ExpertsAdapter, ExpertsSpec

__all__ = ["FFNAdapter", "FFNSpec", "ExpertsAdapter", "ExpertsSpec", "get_adapter", "register_adapter",
           "register_structural_adapter", "registered_adapters", "unregister_adapter"]
