"""Per-call routing inputs (token ids, padding mask) that a converted model hands its MoE layers.

An HF FFN is called with the hidden states only, so :func:`tnmoe.moe.convert` installs forward
hooks on the module that receives ``input_ids``/``attention_mask`` (``BertModel``, ``T5Stack``,
``GPT2Model``, ...): they give each MoE layer below it a :class:`RoutingContext` for the duration
of that call. Activation checkpointing re-runs the layer in the backward pass, after the call has
ended; :class:`ContextSlot` keeps the context of every forward whose autograd graph is still
alive, so the recomputation routes exactly as the forward did.
"""

from __future__ import annotations

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


class _Pending:
    """A forward's context, kept alive by that forward's autograd graph (as a tensor hook on the
    layer output); ``consumed`` once the backward has passed the layer."""

    __slots__ = ("context", "consumed", "__weakref__")

    def __init__(self, context: RoutingContext) -> None:
        self.context, self.consumed = context, False

    def __call__(self, grad: torch.Tensor) -> None:
        self.consumed = True


def _in_backward() -> bool:
    """Whether autograd is executing a backward pass (activation checkpointing recomputes there)."""
    return torch._C._current_graph_task_id() != -1


class ContextSlot:
    """Holds one MoE layer's routing context: the current call's, and for recomputation in the
    backward pass, those of earlier forwards (see the module docstring).

    Not copied by ``deepcopy``/pickle of the layer (a copy starts empty)."""

    def __init__(self) -> None:
        self.current: RoutingContext | None = None  # set by the owner's hooks during its call
        self._last: RoutingContext | None = None  # last call's context (reentrant checkpointing)
        self._pending: list[weakref.ref] = []

    def set(self, context: RoutingContext) -> None:
        self.current = self._last = context

    def clear(self) -> None:
        self.current = None

    def resolve(self) -> RoutingContext | None:
        """The context for a forward of the layer now, or ``None``: during the owner's call, its
        context; in a backward pass outside any call, the context of the forward being recomputed;
        otherwise (a direct call of the layer) ``None``."""
        if self.current is not None:
            return self.current
        if self._last is None or not _in_backward():  # (never set: no check, no compile graph break)
            return None
        live = [p for p in (r() for r in self._pending) if p is not None]
        self._pending = [weakref.ref(p) for p in live]
        for candidates in ([p for p in live if not p.consumed], live):
            distinct = {id(p.context): p.context for p in candidates}
            if len(distinct) == 1:
                return next(iter(distinct.values()))
            if len(distinct) > 1:
                raise RuntimeError(
                    f"activation checkpointing is recomputing an MoE layer while {len(distinct)} "
                    "forward calls with different token ids / padding masks wait for their backward; "
                    "tnmoe cannot tell which one this recomputation belongs to. Call backward after "
                    "each forward, or concatenate the inputs into one forward call."
                )
        return self._last  # reentrant checkpointing ran the forward without a graph

    def remember(self, context: RoutingContext, output: torch.Tensor) -> None:
        """Keep ``context`` alive for as long as ``output``'s autograd graph (a forward that a
        checkpointed backward may re-run)."""
        if output.requires_grad and not _in_backward():
            pending = _Pending(context)
            output.register_hook(pending)
            self._pending = [r for r in self._pending if r() is not None] + [weakref.ref(pending)]

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
            "Pass a padding mask (1 = token, 0 = padding), call the layer with token_mask=..., or convert "
            "with ignore_padding=False."
        )
    return attention_mask[:, attention_mask.shape[1] - leading_shape[1]:] != 0
