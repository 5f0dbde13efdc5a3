"""A cache of a value derived from tensors, invalidated whenever any of them changes."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["DerivedTensorCache"]


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
