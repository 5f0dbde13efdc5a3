"""What an architecture adapter is: :class:`FFNSpec` (a pretrained FFN read off a model),
:class:`FFNAdapter` (read it, install its replacement) and the registry by module class name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


__all__ = ["FFNSpec", "FFNAdapter", "register_adapter", "unregister_adapter", "get_adapter", "registered_adapters",
           "register_structural_adapter"]


@dataclass
class FFNSpec:
    """A pretrained FFN read off a model. Matrices are ``(out, in)`` (nn.Linear layout).

    up: ``(d_ff, d_model)``; down: ``(d_model, d_ff)``; gate: ``(d_ff, d_model)`` or ``None``.
    """

    up: torch.Tensor
    down: torch.Tensor
    activation: Callable[[torch.Tensor], torch.Tensor]
    gate: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    inner_dropout: float = 0.0
    output_dropout: float = 0.0

    def matrices(self) -> dict[str, torch.Tensor]:
        """``{"up", "gate", "down"}`` -> matrix, ``gate`` only for a gated FFN."""
        return {role: w for role, w in (("up", self.up), ("gate", self.gate), ("down", self.down)) if w is not None}

    @property
    def d_model(self) -> int:
        return self.up.shape[1]

    @property
    def d_ff(self) -> int:
        return self.up.shape[0]


class FFNAdapter:
    """Reads an FFN module (:meth:`extract`) and installs its replacement (:meth:`install`).

    The default :meth:`install` replaces ``parent.<name>`` by the MoE layer, which must then
    accept the FFN's input and return its output.

    ``verify_by_probe``: the module is called as ``module(x)`` and :func:`tnmoe.moe.convert`
    checks, on a random probe, that it computes what the extracted :class:`FFNSpec` computes
    (set for adapters that recognise an FFN by its structure rather than its class).
    """

    verify_by_probe: bool = False
    #: an adapter of an MoE block's routed experts (see :mod:`.moe_experts`)
    routed_experts: bool = False

    def extract(self, module: nn.Module) -> FFNSpec:
        raise NotImplementedError

    def install(self, parent: nn.Module, name: str, module: nn.Module, moe: nn.Module) -> None:
        """Put ``moe`` in place of ``module`` (``parent.<name>``); any module it adds must take
        ``module``'s training/eval mode."""
        setattr(parent, name, moe)


_REGISTRY: dict[str, FFNAdapter] = {}
#: ``(name, recognises(module), adapter)``, tried in order for classes not in ``_REGISTRY``
_STRUCTURAL: list[tuple[str, Callable[[nn.Module], bool], FFNAdapter]] = []


def register_structural_adapter(name: str, recognises: Callable[[nn.Module], bool], adapter: FFNAdapter) -> None:
    """Use ``adapter`` for any module (of a class with no registered adapter) for which
    ``recognises(module)`` is true; ``adapter.verify_by_probe`` must be set, so a module that
    looks right but computes something else is refused at conversion, not converted."""
    if not adapter.verify_by_probe:
        raise ValueError("a structural adapter must set verify_by_probe = True")
    _STRUCTURAL.append((name, recognises, adapter))


def register_adapter(class_name: str | type, adapter: FFNAdapter) -> None:
    """Register ``adapter`` for FFN modules of class ``class_name`` (name or class)."""
    name = class_name if isinstance(class_name, str) else class_name.__name__
    if not isinstance(adapter, FFNAdapter):
        raise TypeError(f"adapter must be an FFNAdapter instance, got {type(adapter).__name__}")
    _REGISTRY[name] = adapter


def unregister_adapter(class_name: str | type) -> FFNAdapter:
    """Remove and return the adapter registered for ``class_name`` (``KeyError`` if none)."""
    name = class_name if isinstance(class_name, str) else class_name.__name__
    if name not in _REGISTRY:
        raise KeyError(f"no adapter registered for {name!r}; registered: {registered_adapters()}")
    return _REGISTRY.pop(name)


def get_adapter(module: nn.Module) -> FFNAdapter | None:
    adapter = _REGISTRY.get(type(module).__name__)
    if adapter is not None:
        return adapter
    return next((a for _, recognises, a in _STRUCTURAL if recognises(module)), None)


def registered_adapters() -> list[str]:
    return sorted(_REGISTRY) + [f"<{name}>" for name, _, _ in _STRUCTURAL]
