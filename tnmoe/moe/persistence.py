"""Save / load converted models: ``model.safetensors`` (each shared tensor stored once) and
``tnmoe_config.json`` (the :class:`MoEConfig`, the converted module names, the base class)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_model, save_model
from torch import nn

from .config import MoEConfig
from .convert import convert, converted_modules, get_moe_config

__all__ = ["save_pretrained", "from_pretrained", "load_weights"]

CONFIG_NAME = "tnmoe_config.json"
WEIGHTS_NAME = "model.safetensors"


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike) -> Path:
    """Write a converted model to ``save_directory`` (created if needed). Returns the path."""
    config = get_moe_config(model)
    if config is None:
        raise ValueError("model has no MoE layers installed by tnmoe.moe.convert; call convert first")
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "moe_config": config.to_dict(),
        "moe_modules": converted_modules(model),
        "base_model_class": type(model).__name__,
        "format": "tnmoe-1",
    }
    base_config = getattr(model, "config", None)
    if base_config is not None and hasattr(base_config, "save_pretrained"):
        base_config.save_pretrained(out)
    save_model(model, str(out / WEIGHTS_NAME))  # de-duplicates tied/shared tensors
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def _read_meta(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a tnmoe checkpoint directory (use save_pretrained)")
    return json.loads(path.read_text())


def load_weights(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a checkpoint into an already converted ``model``; fails with a ``ValueError`` naming
    the mismatch when the structure differs (config fields, converted modules, tensor shapes)."""
    directory = Path(directory)
    meta = _read_meta(directory)
    saved = MoEConfig.from_dict(meta["moe_config"])
    current = get_moe_config(model)
    if current is None:
        raise ValueError("model is not converted; use tnmoe.moe.from_pretrained(directory, model)")
    diff = saved.diff(current)
    if diff:
        lines = ", ".join(f"{k}: checkpoint={a!r} model={b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"checkpoint {directory} does not match the model's MoE config ({lines})")
    names = converted_modules(model)
    if list(meta["moe_modules"]) != names:
        raise ValueError(
            f"checkpoint converted modules {meta['moe_modules'][:3]}... differ from the model's "
            f"{names[:3]}... ({len(meta['moe_modules'])} vs {len(names)})"
        )
    try:
        missing, unexpected = load_model(model, str(directory / WEIGHTS_NAME), strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"checkpoint {directory} does not fit the model: {err}") from None
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {directory} does not fit the model: missing keys {sorted(missing)[:5]}, "
            f"unexpected keys {sorted(unexpected)[:5]}"
        )
    return model


def from_pretrained(directory: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a converted model from ``directory``.

    With ``model`` (an unconverted base model of the same architecture), it is converted with
    the saved config (no decomposition) and loaded. Without it, the base model is built from
    the saved transformers config and class name (requires ``transformers``).
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    config = MoEConfig.from_dict(meta["moe_config"])
    if model is None:
        import transformers

        cls = getattr(transformers, meta["base_model_class"], None)
        if cls is None:
            raise ValueError(f"transformers has no class {meta['base_model_class']!r}; pass model=")
        base_config = transformers.AutoConfig.from_pretrained(directory)
        model = cls(base_config)
    if get_moe_config(model) is None:
        convert(model, config, init="empty", progress=False)
    return load_weights(model, directory)
