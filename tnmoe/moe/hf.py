"""transformers integration: the gradient mask as a ``TrainerCallback`` and a ``Trainer`` that
adds the MoE auxiliary loss."""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from .gradient_mask import GradientMask
from .layer import auxiliary_loss

__all__ = ["GradientMaskCallback", "MoETrainer", "MoETrainerMixin"]


class GradientMaskCallback(TrainerCallback):
    """Applies a :class:`GradientMask` right before each optimizer step (after clipping)."""

    def __init__(self, mask: GradientMask) -> None:
        self.mask = mask

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.mask.apply()
        return control


class MoETrainerMixin:
    """Mix into any ``Trainer`` subclass (e.g. ``Seq2SeqTrainer``) to add the auxiliary loss."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        loss, outputs = out
        if model.training:
            loss = loss + auxiliary_loss(model).to(loss.device)
        return (loss, outputs) if return_outputs else loss


class MoETrainer(MoETrainerMixin, Trainer):
    """``Trainer`` whose training loss is ``task loss + tnmoe.moe.auxiliary_loss(model)``."""
