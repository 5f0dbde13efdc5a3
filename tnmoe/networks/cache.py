"""A cache of a value derived from tensors, invalidated whenever any of them changes."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["DerivedTensorCache", "inference_cache_allowed"]


def inference_cache_allowed(module: torch.nn.Module, params: Sequence[torch.Tensor]) -> bool:
    """True when ``module`` is in eval mode and no gradient can flow to ``params``, so weights
    derived from them may be served from a cache."""
    if module.training:
        return False
    return not (torch.is_grad_enabled() and any(p.requires_grad for p in params))


class DerivedTensorCache:
    """Holds ``fn()`` computed under ``no_grad``, recomputed when any source tensor changed.

    The key is every source's storage pointer, version counter (bumped by in-place ops such as
    optimizer steps, ``copy_`` and ``load_state_dict``), dtype and device.
    """

    def __init__(self) -> None:
        self._key = None
        self._value = None

    @staticmethod
    def _make_key(sources: Sequence[torch.Tensor]):
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)

    def get(self, sources: Sequence[torch.Tensor], fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = self._make_key(sources)
        if self._value is None or key != self._key:
            with torch.no_grad():
                self._value = fn()
            self._key = key
        return self._value

    @property
    def value(self):
        return self._value

    def clear(self) -> None:
        self._key, self._value = None, None
