"""A cache of a value derived from tensors that is served only while they are provably unchanged."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["DerivedTensorCache", "inference_cache_allowed"]


def inference_cache_allowed(module: torch.nn.Module, params: Sequence[torch.Tensor]) -> bool:
    """The one rule for serving derived weights from a cache: ``module`` is in eval mode and
    no gradient can flow to ``params`` (grad mode off, or none of them requires grad)."""
    if module.training:
        return False
    return not (torch.is_grad_enabled() and any(p.requires_grad for p in params))


class DerivedTensorCache:
    """Holds ``fn()`` computed under ``no_grad``; serves it again only while every source tensor
    is provably unchanged.

    Checked on every :meth:`get`: each source's storage pointer, version counter (bumped by
    in-place ops: optimizer steps, ``copy_``, ``load_state_dict``), dtype, device, *and* its
    values against a snapshot taken when the value was computed. The value check catches edits
    that bypass version counters (``p.data.copy_(...)``, EMA/SWA code). It reads the sources
    once per call (cheap next to the weights they rebuild) and keeps one copy of them.
    """

    def __init__(self) -> None:
        self.clear()

    @staticmethod
    def _make_key(sources: Sequence[torch.Tensor]):
        return tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in sources)

    def is_fresh(self, sources: Sequence[torch.Tensor]) -> bool:
        """Whether :meth:`get` would serve the cached value for ``sources`` (the full check)."""
        return self._fresh(sources, self._make_key(sources))

    def _fresh(self, sources: Sequence[torch.Tensor], key) -> bool:
        if self._value is None or key != self._key:
            return False
        if self._value.is_inference() and not torch.is_inference_mode_enabled():
            return False  # an inference tensor cannot take part in autograd outside inference_mode
        return all(torch.equal(s.detach(), snap) for s, snap in zip(sources, self._snapshot))

    def get(self, sources: Sequence[torch.Tensor], fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``fn()`` from the cache when the sources are unchanged, else recomputed and stored."""
        key = self._make_key(sources)
        if not self._fresh(sources, key):
            with torch.no_grad():
                self._value = fn()
                self._snapshot = [s.detach().clone() for s in sources]
            self._key = key
            self.misses += 1
        else:
            self.hits += 1
        return self._value

    @property
    def value(self) -> torch.Tensor | None:
        return self._value

    def clear(self) -> None:
        self._key, self._value, self._snapshot = None, None, []
        self.hits = self.misses = 0
