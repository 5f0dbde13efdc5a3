"""Per-call routing inputs (token ids, padding mask) that a converted model hands its MoE layers.

An HF FFN is called with the hidden states only, so :func:`tnmoe.moe.convert` installs forward
hooks on the module that receives ``input_ids``/``attention_mask`` (``BertModel``, ``T5Stack``,
``GPT2Model``, ...): they give each MoE layer below it a :class:`RoutingContext` for the duration
of that call. Activation checkpointing re-runs the layer in the backward pass, after the call has
ended; :class:`ContextSlot` keeps the context of earlier forwards and finds the one being
recomputed, so the recomputation routes exactly as the forward did.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

__all__ = ["RoutingContext", "ContextSlot", "padding_mask"]


@dataclass(eq=False)
class RoutingContext:
    """token_ids: ``(batch, seq)`` ids of the routed positions (hash routing) or ``None``.
    attention_mask: ``(batch, seq_total)`` padding mask (nonzero = real token) or ``None``;
    with a KV cache ``seq_total`` covers past + current positions."""

    token_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


class _Record:
    """The context of one forward of a layer, with what identifies that forward when activation
    checkpointing re-runs it: the input's shape and a fingerprint of its values (the
    recomputation sees bit-identical inputs). ``consumed``: a recomputation already used it."""

    __slots__ = ("context", "shape", "fingerprint", "consumed", "__weakref__")

    def __init__(self, context: RoutingContext, x: torch.Tensor) -> None:
        self.context, self.shape, self.consumed = context, tuple(x.shape), False
        self.fingerprint = _fingerprint(x)

    def __call__(self, grad: torch.Tensor) -> None:  # a tensor hook: keeps it alive with the graph
        return None


def _fingerprint(x: torch.Tensor) -> torch.Tensor:
    """A position-weighted sum of ``x``'s row sums (float64 scalar on ``x``'s device; no host sync,
    no copy of ``x``: rows are summed in ``x``'s dtype, which is deterministic, and enough to tell
    different inputs apart)."""
    rows = x.detach().reshape(-1, x.shape[-1]).sum(-1).double()
    return rows @ torch.linspace(1.0, 2.0, rows.shape[0], dtype=torch.float64, device=rows.device)


def _in_backward() -> bool:
    """Whether autograd is executing a backward pass (activation checkpointing recomputes there)."""
    return torch._C._current_graph_task_id() != -1


def _same(a: RoutingContext, b: RoutingContext) -> bool:
    def eq(u, v):
        return u is v or (u is not None and v is not None and u.shape == v.shape and bool(torch.equal(u, v)))
    return a is b or (eq(a.token_ids, b.token_ids) and eq(a.attention_mask, b.attention_mask))


class ContextSlot:
    """One MoE layer's routing context: the current call's (per thread), and the contexts of
    earlier forwards for their recomputation in the backward pass (see the module docstring).

    A forward with an autograd graph keeps its record alive as long as that graph (a hook on the
    layer output); a training-mode forward without one (reentrant checkpointing runs the forward
    under ``no_grad``) is kept until a later such forward replaces it once it has been used. A
    recomputation takes the record whose input has the same shape and fingerprint; if several
    forwards with different contexts still match, it raises rather than guess.
    Not copied by ``deepcopy``/pickle of the layer (a copy starts empty)."""

    _MAX_NO_GRAD = 64

    def __init__(self) -> None:
        self._local = threading.local()  # the current call's context, per thread
        self._lock = threading.Lock()
        self._with_graph: list[weakref.ref] = []
        self._without_graph: list[_Record] = []
        self._used = False

    @property
    def current(self) -> RoutingContext | None:
        return getattr(self._local, "context", None)

    def set(self, context: RoutingContext) -> None:
        self._local.context, self._used = context, True

    def clear(self) -> None:
        self._local.context = None

    def resolve(self, x: torch.Tensor) -> RoutingContext | None:
        """The context for a forward of the layer on input ``x`` now, or ``None``: during the
        owner's call, its context; in a backward pass outside any call, the context of the forward
        being recomputed; otherwise (a direct call of the layer) ``None``."""
        current = self.current
        if current is not None:
            return current
        if not self._used or not _in_backward():  # (never set: no check, no compile graph break)
            return None
        with self._lock:
            live = [r for r in (ref() for ref in self._with_graph) if r is not None]
            self._with_graph = [weakref.ref(r) for r in live]
            records = live + self._without_graph
        matches = [r for r in records if r.shape == tuple(x.shape)]
        if len(matches) > 1:
            fingerprint = _fingerprint(x)
            matches = [r for r in matches if bool(torch.equal(r.fingerprint, fingerprint))]
        for candidates in ([r for r in matches if not r.consumed], matches):
            distinct: list[_Record] = []
            for r in candidates:
                if not any(_same(r.context, d.context) for d in distinct):
                    distinct.append(r)
            if len(distinct) > 1:
                raise RuntimeError(
                    f"activation checkpointing is recomputing an MoE layer, and {len(distinct)} earlier forward "
                    "calls on identical inputs but with different token ids / padding masks wait for their "
                    "backward; tnmoe cannot tell which one this recomputation belongs to. Call backward after "
                    "each forward, or concatenate the inputs into one forward call."
                )
            if distinct:
                for r in candidates:
                    r.consumed = True
                return distinct[0].context
        return None

    def record(self, context: RoutingContext, x: torch.Tensor, output: torch.Tensor, training: bool) -> None:
        """Remember ``context`` for a recomputation of this forward (input ``x``, ``output``)."""
        if _in_backward():
            return
        if output.requires_grad:
            rec = _Record(context, x)
            output.register_hook(rec)
            with self._lock:
                self._with_graph = [r for r in self._with_graph if r() is not None] + [weakref.ref(rec)]
        elif training:
            rec = _Record(context, x)
            with self._lock:
                kept = [r for r in self._without_graph if not r.consumed][-(self._MAX_NO_GRAD - 1):]
                self._without_graph = kept + [rec]

    def __deepcopy__(self, memo) -> "ContextSlot":
        return ContextSlot()

    def __reduce__(self):
        return (ContextSlot, ())


def padding_mask(attention_mask: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
    """Bool ``leading_shape`` (= ``(batch, seq)`` of the hidden states) mask of real tokens from a
    ``(batch, seq_total)`` attention mask; with a KV cache the last ``seq`` columns are the current
    positions. Raises ``ValueError`` for masks that are not a 2-D padding mask of this batch."""
    if attention_mask.dim() != 2 or len(leading_shape) != 2 or attention_mask.shape[0] != leading_shape[0] \
            or attention_mask.shape[1] < leading_shape[1]:
        raise ValueError(
            f"ignore_padding needs a 2-D (batch, seq) attention_mask matching hidden states of shape "
            f"{tuple(leading_shape)} + (d_model,); got attention_mask of shape {tuple(attention_mask.shape)}. "
            "Pass a padding mask (1 = token, 0 = padding). transformers builds 4-D masks itself for static "
            "caches (generate(cache_implementation='static')): use the default dynamic cache there, call "
            "the layer with token_mask=..., or convert with ignore_padding=False."
        )
    return attention_mask[:, attention_mask.shape[1] - leading_shape[1]:] != 0
