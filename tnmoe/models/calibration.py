"""Calibration for data-aware conversion: stream each target FFN matrix's input second moment
through forward hooks while calibration batches run through the model; no activation is kept.

:func:`collect_ffn_covariances` hooks the module that holds each FFN matrix (an ``nn.Linear``
or a GPT-2 ``Conv1D`` whose weight is the matrix the adapter reads), so it records exactly
what that matrix multiplies. Padding tokens are left out: a batch's ``attention_mask`` pads the
FFNs of a decoder-only or encoder model and an encoder-decoder's encoder, its
``decoder_attention_mask`` the decoder's FFNs (a mask whose shape is not the activation's
``(batch, seq)``, e.g. at a cached decoding step, is not applied). A batch may carry
``token_weight`` ``(batch, seq)`` (not passed to the model): each position's inputs then count
that many times in the encoder's (or a decoder-only model's) statistics, e.g. to weight the
position a classification head reads.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..networks.fit import CORRECTION_RIDGE, InputCovariance, ReferencedCovariance
from .adapters import get_adapter

__all__ = ["FFN_STAGES", "collect_ffn_covariances", "collect_referenced_covariances", "substitute_matrices"]


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last]`` byte addresses ``t``'s elements occupy."""
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def _holds(weight: torch.Tensor, matrix: torch.Tensor) -> bool:
    """``matrix`` lies inside ``weight``'s elements (the weight itself, its transpose (Conv1D) or a
    slice of a fused weight such as Phi-3's ``gate_up_proj``), not merely in the same storage
    (a flat parameter buffer holds every weight)."""
    if weight.untyped_storage().data_ptr() != matrix.untyped_storage().data_ptr():
        return False
    (w0, w1), (m0, m1) = _byte_range(weight), _byte_range(matrix)
    return w0 <= m0 and m1 <= w1


def _holder(ffn: nn.Module, matrix: torch.Tensor) -> nn.Module | None:
    """The submodule of ``ffn`` whose own ``weight`` holds ``matrix`` (see :func:`_holds`)."""
    for module in ffn.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and _holds(weight, matrix):
            return module
    return None


class _Recorder:
    """Forward pre-hook that adds a module's input rows to an :class:`InputCovariance`."""

    def __init__(self, acc: InputCovariance, masks: list, which: int) -> None:
        self.acc, self.masks, self.which = acc, masks, which

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        mask = self.masks[self.which]  # this FFN's stack's padding mask (encoder or decoder)
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            mask = None  # not this call's positions (e.g. a cached decoding step): keep every token
        weight = self.masks[2] if self.which == 0 else None
        if weight is not None and tuple(weight.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"calibration token_weight has shape {tuple(weight.shape)}, but this FFN's inputs are "
                             f"{tuple(x.shape[:-1])} positions; give one weight per input position")
        self.acc.update(x.detach(), None if mask is None else mask.to(x.device).bool(),
                        None if weight is None else weight.to(x.device))


def _mask_index(model: nn.Module, name: str) -> int:
    """Which batch mask pads FFN ``name``'s inputs: 1 (``decoder_attention_mask``) for the decoder
    stack of an encoder-decoder model, else 0 (``attention_mask``)."""
    config = getattr(model, "config", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    return 1 if encoder_decoder and "decoder" in name.split(".") else 0


def _run(model: nn.Module, batch, masks: list, forward=None) -> None:
    forward = forward or model
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "token_weight"}
        masks[0], masks[1] = batch.get("attention_mask"), batch.get("decoder_attention_mask")
        masks[2] = batch.get("token_weight")
        forward(**inputs)
    else:
        masks[0] = masks[1] = masks[2] = None
        forward(batch)


def collect_ffn_covariances(model: nn.Module, targets: list[tuple[str, nn.Module]], batches: Iterable,
                            *, progress: bool = True) -> dict[str, dict[str, InputCovariance]]:
    """Run ``batches`` through ``model`` (eval mode, no grad; the mode is restored) and return,
    per target FFN name, ``{"up": ..., "down": ..., "gate": ...}`` input second moments of its
    matrices (``gate`` only for gated FFNs).

    ``batches``: dicts of model inputs (``model(**batch)``; an optional ``token_weight``
    ``(batch, seq)`` entry weights the positions, see the module docstring) or tensors (``model(batch)``).
    Raises ``ValueError`` when a matrix is not held by a module whose input can be hooked, or
    when no calibration token reached a matrix.
    """
    stats: dict[str, dict[str, InputCovariance]] = {}
    hooks, masks = [], [None, None, None]  # attention_mask, decoder_attention_mask, token_weight
    try:
        for name, ffn in targets:
            spec = get_adapter(ffn).extract(ffn)
            stats[name] = {}
            for role, matrix in spec.matrices().items():
                holder = _holder(ffn, matrix)
                if holder is None:
                    raise ValueError(
                        f"calibration: the {role} matrix of {name!r} ({type(ffn).__name__}) is not the weight of "
                        "a linear submodule whose input could be hooked; convert this FFN kind without calibration")
                acc = InputCovariance(matrix.shape[1])
                stats[name][role] = acc
                hooks.append(holder.register_forward_pre_hook(_Recorder(acc, masks, _mask_index(model, name))))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in tqdm(batches, desc="calibrating", disable=not progress):
                    _run(model, batch, masks)
        finally:
            model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    for name, roles in stats.items():
        for role, acc in roles.items():
            if acc.count == 0:
                raise ValueError(f"calibration: no token reached the {role} matrix of {name!r}; pass batches "
                                 "that run through this layer")
    return stats


class _Pairing:
    """Stands in for a :class:`ReferencedCovariance` in a :class:`_Recorder`: during the reference
    pass it keeps each call's inputs, during the substituted pass it adds each call's inputs with
    the kept ones of the same call (calls come in the same order in both passes)."""

    def __init__(self, acc: ReferencedCovariance) -> None:
        self.acc, self.kept, self.reference_pass = acc, [], True

    def update(self, x: torch.Tensor, mask=None, weight=None) -> None:
        if self.reference_pass:
            self.kept.append(x.clone())  # a later in-place op of the forward must not change it
        else:
            if not self.kept:
                raise ValueError("calibration: the substituted model called an FFN matrix more often than the original")
            self.acc.update(x, mask, weight, reference=self.kept.pop(0))


def substitute_matrices(model: nn.Module, ffn: nn.Module, replacements: dict[str, torch.Tensor],
                        existing: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``{qualified parameter name: tensor}`` that holds ``replacements`` (``{role: (out, in)}``
    matrices) in place of the FFN's matrices, in each holder's own layout (a ``Conv1D``'s
    transpose, a slice of a fused weight): the overrides for :func:`torch.func.functional_call`.
    ``existing``: overrides made before, built on (a fused weight's other slice stays replaced)."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    spec = get_adapter(ffn).extract(ffn)
    out: dict[str, torch.Tensor] = {}
    for role, matrix in spec.matrices().items():
        if role not in replacements:
            continue
        holder = _holder(ffn, matrix)
        if holder is None or id(holder.weight) not in names:
            raise ValueError(f"calibration: the {role} matrix of {type(ffn).__name__} is not a parameter's weight "
                             "that can be substituted; use sequential=False")
        name = names[id(holder.weight)]
        weight = out.get(name, (existing or {}).get(name, holder.weight.detach()))
        # the holder's own strides (clone() of a non-dense weight would not keep them)
        new = torch.empty_strided(weight.shape, holder.weight.stride(), dtype=weight.dtype, device=weight.device)
        new.copy_(weight)
        view = new.as_strided(matrix.shape, matrix.stride(),
                              new.storage_offset() + matrix.storage_offset() - holder.weight.storage_offset())
        view.copy_(replacements[role].to(new.dtype))
        out[name] = new
    return out


#: the order in which sequential calibration fits an FFN's matrices: those that read the FFN's
#: input first, then the output projection, whose inputs depend on their fits
FFN_STAGES = (("up", "gate"), ("down",))


def collect_referenced_covariances(model: nn.Module, name: str, ffn: nn.Module, batches: Iterable,
                                   substitutes: dict[str, torch.Tensor], *, roles=None, progress: bool = True,
                                   ridge: float = CORRECTION_RIDGE) -> dict[str, ReferencedCovariance]:
    """Statistics to fit FFN ``name``'s matrices (``roles``, default all) to what the original
    ``model`` computes, from the inputs they get once earlier matrices are replaced by
    ``substitutes`` (``{qualified parameter name: tensor}``, see :func:`substitute_matrices`):
    ``{role: ReferencedCovariance}``.

    Each batch runs twice, as the model is and with the substitutes (``torch.func.functional_call``:
    the model is not modified); padding and ``token_weight`` as in :func:`collect_ffn_covariances`.
    ``ridge``: the statistics' correction ridge (:class:`ReferencedCovariance`).
    """
    spec = get_adapter(ffn).extract(ffn)
    stats: dict[str, ReferencedCovariance] = {}
    pairings, hooks, masks = [], [], [None, None, None]
    try:
        for role, matrix in spec.matrices().items():
            if roles is not None and role not in roles:
                continue
            holder = _holder(ffn, matrix)
            if holder is None:
                raise ValueError(
                    f"calibration: the {role} matrix of {name!r} ({type(ffn).__name__}) is not the weight of "
                    "a linear submodule whose input could be hooked; convert this FFN kind without calibration")
            stats[role] = ReferencedCovariance(matrix.shape[1], ridge=ridge)
            pairing = _Pairing(stats[role])
            pairings.append(pairing)
            hooks.append(holder.register_forward_pre_hook(_Recorder(pairing, masks, _mask_index(model, name))))
        was_training = model.training
        model.eval()
        substituted = lambda *a, **k: torch.func.functional_call(model, substitutes, a, k, strict=False)  # noqa: E731
        try:
            with torch.no_grad():
                for batch in tqdm(batches, desc=f"calibrating {name}", disable=not progress):
                    for p in pairings:
                        p.reference_pass, p.kept = True, []
                    _run(model, batch, masks)
                    for p in pairings:
                        p.reference_pass = False
                    _run(model, batch, masks, substituted if substitutes else None)
                    if any(p.kept for p in pairings):
                        raise ValueError("calibration: the substituted model called an FFN matrix less often than "
                                         "the original (use sequential=False)")
        finally:
            model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    for role, acc in stats.items():
        if acc.count == 0:
            raise ValueError(f"calibration: no token reached the {role} matrix of {name!r}; pass batches "
                             "that run through this layer")
    return stats
