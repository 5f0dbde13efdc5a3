"""The MoE configuration inside a transformers model's own config, so that every
``model.save_pretrained`` folder (and so every Trainer checkpoint) says how it was converted."""

from __future__ import annotations

from torch import nn

from .config import MoEConfig

__all__ = ["HF_CONFIG_KEY", "FORMAT", "mark_hf_config"]

#: attribute of the transformers config (and key of ``config.json``) holding the conversion record
HF_CONFIG_KEY = "tnmoe"
#: checkpoint format tag written with the conversion record
FORMAT = "tnmoe-1"


def mark_hf_config(model: nn.Module, config: MoEConfig, modules: list[str]) -> None:
    """Record ``config`` and the converted module names on ``model.config`` when ``model`` is a
    transformers model (no-op otherwise)."""
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_json_string"):
        return
    setattr(hf_config, HF_CONFIG_KEY, {
        "format": FORMAT,
        "moe_config": config.to_dict(),
        "moe_modules": list(modules),
        "base_model_class": type(model).__name__,
    })
