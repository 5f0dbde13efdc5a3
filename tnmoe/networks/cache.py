"""A cache of a value derived from tensors that is served only while they are provably unchanged.

Two ways to prove it (the contract, in one place; ``docs/inference.md`` says the same for users):

* **checked** (the default): every :meth:`DerivedTensorCache.get` compares each source's storage,
  version counter, dtype, device and shape with those of the cached value, *and* its values
  with those it was built from. The value check catches edits that bypass version counters
  (``p.data.mul_(...)``, ``p.data.copy_(...)`` in EMA/SWA code); it reads every source on
  every call. Sources in host memory are compared by an XXH3-128 digest of their bytes (one
  read, no copy kept; 3.5-6x faster than comparing with a copy on one CPU thread); sources on
  an accelerator with a snapshot copy on the device (``torch.equal``, no transfer to the host).
* **frozen** (between :meth:`DerivedTensorCache.freeze` and :meth:`~DerivedTensorCache.unfreeze`,
  i.e. inside :func:`tnmoe.networks.frozen_weights`): the sources are declared unchanging. A call
  checks storage, version counter, dtype, device and shape only (O(1) per source, no read of
  the values, no snapshot kept); any change they reveal (an in-place op, an optimizer step,
  ``load_state_dict`` with or without ``assign``, ``p.data = t``, ``.to(...)``) raises at the
  next call instead of being served; so does a change announced with
  :meth:`~DerivedTensorCache.note_change` (fused optimizer steps, which bump no version counter:
  :func:`~tnmoe.networks.frozen_weights` announces every optimizer step that touches a frozen
  source). Edits that no counter sees (through ``p.data``) are found when the block ends, by
  comparing an XXH3-128 digest of the sources' bytes taken at its start, and raise there.

The cache holds a reference to its sources' storages (no copy) so that a freed storage's
address cannot be reused by a new tensor that would then look identical to the key.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import xxhash

__all__ = ["DerivedTensorCache", "inference_cache_allowed", "WeightsChangedError", "tensor_digest"]


def inference_cache_allowed(module: torch.nn.Module, params: Sequence[torch.Tensor]) -> bool:
    """The one rule for serving derived weights from a cache: ``module`` is in eval mode and
    no gradient can flow to ``params`` (grad mode off, or none of them requires grad)."""
    if module.training:
        return False
    return not (torch.is_grad_enabled() and any(p.requires_grad for p in params))


class WeightsChangedError(RuntimeError):
    """Source tensors of a frozen cache changed (see :func:`tnmoe.networks.frozen_weights`)."""


def tensor_digest(tensors: Sequence[torch.Tensor]) -> bytes:
    """XXH3-128 of the tensors' dtypes, shapes and bytes (copied to the host when elsewhere): a
    hash made to detect changed data at memory speed, the one checkpoints' weight files use."""
    h = xxhash.xxh3_128()
    for t in tensors:
        t = t.detach()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        if t.is_meta or t.numel() == 0:
            continue
        raw = t.contiguous().reshape(-1).view(torch.uint8).cpu()
        h.update(memoryview(raw.numpy()))
    return h.digest()


_Key = tuple


def _make_key(sources: Sequence[torch.Tensor]) -> _Key:
    # get_device(): -1 on the CPU, the index elsewhere (t.device builds an object: twice the cost)
    return tuple((t.data_ptr(), t._version, t.dtype, t.get_device(), t.shape) for t in sources)


class DerivedTensorCache:
    """Holds ``fn()`` computed under ``no_grad``; serves it again only while every source tensor
    is provably unchanged, checked or frozen (module docstring)."""

    def __init__(self) -> None:
        self._frozen_key: _Key | None = None  # the sources' key while frozen
        self._frozen_digest: bytes | None = None  # their digest while frozen
        self._reported = False  # get() refused a change in this frozen period
        self._noted: str | None = None  # a change reported by note_change() in this frozen period
        self.clear()

    def clear(self) -> None:
        """Drop the value (and what proves it), keep the frozen state and reset the counters."""
        self._drop()
        self.hits = self.misses = 0

    def _drop(self) -> None:
        self._key: _Key | None = None
        self._value: torch.Tensor | None = None
        self._snapshot: list[torch.Tensor] | None = None  # checked mode's copy of accelerator sources
        self._checked_digest: bytes | None = None  # checked mode's digest of host-memory sources
        self._held: list[torch.Tensor] = []  # aliases keeping the sources' storages alive
        self._value_digest: bytes | None = None  # digest of the sources the value was built from

    # -- checked and frozen lookups ------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return self._frozen_key is not None

    def is_fresh(self, sources: Sequence[torch.Tensor]) -> bool:
        """Whether :meth:`get` would serve the cached value for ``sources``."""
        key = _make_key(sources)
        if self.frozen:
            return self._servable(key)
        return self._servable(key) and self._values_match(sources)

    def _servable(self, key: _Key) -> bool:
        if self._value is None or key != self._key:
            return False
        # an inference tensor cannot take part in autograd outside inference_mode
        return not (self._value.is_inference() and not torch.is_inference_mode_enabled())

    def _values_match(self, sources: Sequence[torch.Tensor]) -> bool:
        if self._checked_digest is not None:
            return tensor_digest(sources) == self._checked_digest
        return self._snapshot is not None and all(
            torch.equal(s.detach(), snap) for s, snap in zip(sources, self._snapshot))

    @staticmethod
    def _on_host(sources: Sequence[torch.Tensor]) -> bool:
        return all(t.device.type == "cpu" for t in sources)

    def get(self, sources: Sequence[torch.Tensor], fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``fn()`` from the cache when the sources are unchanged, else recomputed and stored.
        Frozen: raises :class:`WeightsChangedError` when a source changed since :meth:`freeze`."""
        key = _make_key(sources)
        if self.frozen:
            if key != self._frozen_key or self._noted is not None:
                self._reported = True  # the block's end need not say it again
                raise WeightsChangedError(self._changed_message(sources, key))
            fresh = self._servable(key)
        else:
            fresh = self._servable(key) and self._values_match(sources)
        if fresh:
            self.hits += 1
            return self._value
        snapshot = digest = None
        with torch.no_grad():
            value = fn()
            if not self.frozen:
                if self._on_host(sources):
                    digest = tensor_digest(sources)
                else:
                    snapshot = [s.detach().clone() for s in sources]
        self._key, self._value, self._snapshot, self._checked_digest = key, value, snapshot, digest
        self._held = [s.detach() for s in sources]
        self._value_digest = self._frozen_digest
        self.misses += 1
        return value

    def _changed_message(self, sources: Sequence[torch.Tensor], key: _Key) -> str:
        what = [self._noted] if self._noted is not None else []
        for k, (now, then) in enumerate(zip(key, self._frozen_key)):
            if now[2:] != then[2:]:
                what.append(f"source {k}: dtype/device/shape {then[2:]} -> {now[2:]}")
            elif now[0] != then[0]:
                what.append(f"source {k}: replaced by another tensor "
                            "(p.data = ..., load_state_dict(assign=True), .to())")
            elif now[1] != then[1]:
                what.append(f"source {k}: modified in place (an optimizer step, copy_, load_state_dict, ...)")
        if len(key) != len(self._frozen_key):
            what.append(f"{len(self._frozen_key)} sources -> {len(key)}")
        return ("weights changed inside frozen_weights(): " + "; ".join(what) + ". Change weights outside "
                "the frozen_weights block (or leave it, edit, and enter a new one)")

    # -- freezing --------------------------------------------------------------------------------
    def freeze(self, sources: Sequence[torch.Tensor]) -> None:
        """Declare ``sources`` unchanging until :meth:`unfreeze`: takes their digest, keeps a
        cached value only if it provably matches them (checked now, or digest from an earlier
        frozen period) and drops the snapshot."""
        if self.frozen:
            raise RuntimeError("this cache is already frozen")
        key, digest = _make_key(sources), tensor_digest(sources)
        keep = self._servable(key) and (self._values_match(sources) or self._value_digest == digest)
        if not keep:
            self._drop()
        self._snapshot = self._checked_digest = None
        self._frozen_key, self._frozen_digest, self._reported, self._noted = key, digest, False, None
        self._value_digest = digest if keep else None

    def note_change(self, what: str) -> None:
        """Record that the sources changed by a path that bumps no version counter (a fused
        optimizer step): frozen lookups refuse from now on, as for a visible change."""
        if self.frozen:
            self._noted = what

    def unfreeze(self, sources: Sequence[torch.Tensor]) -> str | None:
        """End the frozen period; returns ``None`` when ``sources`` are unchanged since
        :meth:`freeze` or a change was already refused by :meth:`get`, else what changed (the
        value is dropped on any change). An unchanged value is kept with its digest, to be
        served again in a later frozen period and, for host-memory sources, by checked lookups
        (on accelerators a checked lookup rebuilds it)."""
        if not self.frozen:
            raise RuntimeError("this cache is not frozen")
        key, then_key, then_digest = _make_key(sources), self._frozen_key, self._frozen_digest
        self._frozen_key = self._frozen_digest = None
        if key != then_key or self._noted is not None:
            self._drop()
            if self._reported:
                return None
            return self._noted or "modified in place or replaced (version counter or storage changed)"
        if tensor_digest(sources) != then_digest:
            self._drop()
            return "values edited through a path no version counter sees (e.g. p.data.mul_(...))"
        if self._value is not None and self._on_host(sources):
            self._checked_digest = then_digest  # checked lookups go on serving it, by the same digest
        return None

    @property
    def value(self) -> torch.Tensor | None:
        return self._value
