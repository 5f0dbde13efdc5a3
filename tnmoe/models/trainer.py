"""transformers integration: the gradient mask as a ``TrainerCallback`` (saved with and restored
from Trainer checkpoints) and a ``Trainer`` that adds the MoE auxiliary loss, weighted like the
task loss under gradient accumulation.

Auxiliary loss and gradient accumulation in a plain loop: the auxiliary loss of a micro-batch is a
mean over its tokens, like a per-batch task loss, so with N micro-batches per optimizer step
divide both by N::

    for i, batch in enumerate(micro_batches):            # N of them
        loss = model(**batch).loss + moe.auxiliary_loss(model)
        (loss / N).backward()
    mask.apply(); optimizer.step(); optimizer.zero_grad()

If the task loss is already normalized over the whole accumulation window (summed over tokens
and divided by the window's token count, as transformers models do when given
``num_items_in_batch``), divide only the auxiliary loss by N.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..networks import accumulate_reconstruction, discard_accumulation
from ..moe.gradient_mask import GradientMask
from ..moe.layer import auxiliary_loss, moe_layers
from .persistence import prepare_transformers_save, tied_cores

__all__ = ["GradientMaskCallback", "MoETrainer", "MoETrainerMixin", "MASK_STATE_NAME"]

#: file of a Trainer checkpoint folder holding the gradient mask's state
MASK_STATE_NAME = "tnmoe_gradient_mask.pt"


def _history_digest(state) -> str:
    """SHA-256 of the Trainer's ``log_history``: saved with the mask state and compared on
    resume, so a mask state from another run's checkpoint of the same step is not taken."""
    return hashlib.sha256(json.dumps(state.log_history, sort_keys=True, default=str).encode()).hexdigest()


def _save_mask_state(mask: GradientMask, folder: Path, state) -> None:
    """Write ``mask.state_dict()`` (with the step and run history it belongs to) into ``folder``, atomically."""
    path = folder / MASK_STATE_NAME
    tmp = folder / (MASK_STATE_NAME + ".tmp")
    torch.save({"global_step": int(state.global_step), "log_history_sha256": _history_digest(state),
                "mask": mask.state_dict()}, tmp)
    os.replace(tmp, path)


def _load_mask_state(mask: GradientMask, folder: Path, state) -> None:
    """Restore ``mask`` from the checkpoint ``folder`` training resumes from (``state``: the
    Trainer state loaded from it); ``FileNotFoundError`` / ``ValueError`` when the mask state is
    missing or belongs to another step or another run."""
    global_step = state.global_step
    path = folder / MASK_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"resuming at step {global_step}: no gradient mask state {path}. Without it the mask would replay "
            "its draws from the start. Resume from a checkpoint written with GradientMaskCallback; for a "
            "checkpoint outside args.output_dir use MoETrainer.train(resume_from_checkpoint=path) or set "
            "callback.resume_from = path"
        )
    saved = torch.load(path, weights_only=True)
    if int(saved["global_step"]) != int(global_step):
        raise ValueError(f"{path} holds the gradient mask state of step {saved['global_step']}, but training "
                         f"resumes at step {global_step}")
    if saved.get("log_history_sha256", _history_digest(state)) != _history_digest(state):
        raise ValueError(
            f"{path} holds the gradient mask state of another run (its log history differs from the checkpoint "
            "training resumes from). A plain Trainer resuming from a checkpoint outside args.output_dir finds "
            "the mask state only in args.output_dir: use MoETrainer.train(resume_from_checkpoint=path) or set "
            "callback.resume_from = path"
        )
    mask.load_state_dict(saved["mask"])


class GradientMaskCallback(TrainerCallback):
    """Draws a :class:`GradientMask`'s decision at the start of each optimizer step (so masked
    tensors get no gradient in that step's backward, :meth:`GradientMask.begin_step`) and
    applies it right before the optimizer step (after clipping); keeps its state (generator,
    counters) in Trainer checkpoints for exact resumption.

    ``on_save`` writes ``tnmoe_gradient_mask.pt`` into ``<output_dir>/checkpoint-<step>`` (on
    the processes that save). When training resumes (``state.global_step > 0`` at
    ``on_train_begin``), the state is read from ``resume_from`` (set by
    :class:`MoETrainer` to the checkpoint it resumes from) or else from
    ``<output_dir>/checkpoint-<global_step>``; a missing state, or one saved by another run (its
Trainer log history differs from the resumed checkpoint's), is an error, not a silent replay.
    """

    def __init__(self, mask: GradientMask) -> None:
        self.mask = mask
        #: checkpoint folder training resumes from (``None``: look in ``args.output_dir``)
        self.resume_from: str | os.PathLike | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.mask.begin_step()
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.mask.apply()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.mask.release()  # a step begun but never applied (e.g. stopped by a callback) is undone
        return control

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return control
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            warnings.warn(f"GradientMaskCallback: checkpoint folder {folder} not found; the mask state of step "
                          f"{state.global_step} is not saved and resuming from that checkpoint will fail")
            return control
        _save_mask_state(self.mask, folder, state)
        return control

    def on_init_end(self, args, state, control, **kwargs):
        if self.mask.release():  # an earlier run's unfinished masked step: before the optimizer is built
            warnings.warn("GradientMaskCallback: a masked step that never finished had left the masked tensors "
                          "with requires_grad off; switched back on")
        return control

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if getattr(args, "deepspeed_plugin", None) is not None or getattr(args, "deepspeed", None):
            raise NotImplementedError(
                "GradientMaskCallback does not support DeepSpeed: its engine steps the optimizer inside the "
                "backward and keeps gradients in its own partitioned buffers, so a masked step's discarded "
                "gradient would still update the shared tensors. Use DDP or FSDP, or train without the mask"
            )
        frozen = [p for p in self.mask.params if not p.requires_grad]
        if self.mask.release() and optimizer is not None:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            left_out = [p for p in frozen if p.requires_grad and id(p) not in in_optimizer]
            if left_out:
                raise RuntimeError(
                    f"GradientMaskCallback: {len(left_out)} masked tensors had requires_grad off when the optimizer "
                    "was built (a masked step of an earlier run never finished), so the optimizer would never "
                    "update them. Build a new Trainer (or call mask.release() before the optimizer is created); "
                    "MoETrainer releases the mask however training ends"
                )
        if state.global_step > 0:
            folder = self.resume_from or Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            _load_mask_state(self.mask, Path(folder), state)
        return control


class _AccumulationWindowCallback(TrainerCallback):
    """At each optimizer step's first micro-batch, drop a reconstruction-accumulation window a
    previous step left open (its gradient would otherwise join this step's)."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and discard_accumulation(model):
            warnings.warn("MoETrainer: discarded the MPO gradient of an optimizer step that did not finish "
                          "(an accumulation window left open); this step starts from zero")
        return control


class MoETrainerMixin:
    """Mix into any ``Trainer`` subclass (e.g. ``Seq2SeqTrainer``) to add the auxiliary loss.

    The training loss is ``task loss + scale * tnmoe.moe.auxiliary_loss(model)`` where ``scale``
    (:meth:`auxiliary_loss_scale`) makes the auxiliary loss count once per optimizer step under
    gradient accumulation, exactly like the task loss: transformers divides the returned loss
    by the number of accumulation steps only when the task loss is not already normalized over
    the accumulation window (``model_accepts_loss_kwargs`` and ``num_items_in_batch``, or
    ``compute_loss_func``, or ``loss_is_scaled_for_ga``); in those cases the auxiliary loss
    (a per-micro-batch mean) is divided here. It is not multiplied by the number of processes
    under ``average_tokens_across_devices``: DDP's gradient averaging already makes it the mean
    over ranks. Also resumes :class:`GradientMaskCallback` state from the checkpoint passed to
    :meth:`train`.

    With ``gradient_accumulation_steps > 1`` every micro-batch runs inside
    :func:`tnmoe.networks.accumulate_reconstruction`: MPO weights are rebuilt once per optimizer
    step and their gradient reaches the cores once, at the step's last micro-batch (set
    ``amortize_reconstruction = False`` on the trainer to rebuild per micro-batch).

    Checkpoints of a model with cores tied across layers (:meth:`tnmoe.networks.MPOBank.tie_cores`)
    store each tied core once and record the ties in ``config.json``, so they reload tied
    (``tnmoe.moe.from_pretrained``, ``AutoModel*.from_pretrained``, resuming, best-model loading).
    """

    amortize_reconstruction: bool = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(_AccumulationWindowCallback())

    def training_step(self, model, inputs, *args, **kwargs):
        if not self.amortize_reconstruction or self.args.gradient_accumulation_steps <= 1 \
                or self._activation_checkpointing(model):
            return super().training_step(model, inputs, *args, **kwargs)
        with accumulate_reconstruction(model, last=bool(self.accelerator.sync_gradients)):
            return super().training_step(model, inputs, *args, **kwargs)

    def _activation_checkpointing(self, model) -> bool:
        """Whether activation checkpointing is on (it re-runs MPO layers in the backward, so
        reconstruction is not amortized): transformers renamed gradient -> activation
        checkpointing; the new name is read first, so the deprecated one is not touched."""
        return bool(_first_attr(self.args, "activation_checkpointing", "gradient_checkpointing")
                    or _first_attr(self.accelerator.unwrap_model(model), "is_activation_checkpointing",
                                   "is_gradient_checkpointing"))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        path = resume_from_checkpoint
        if isinstance(path, bool):
            path = get_last_checkpoint(self.args.output_dir) if path else None
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, GradientMaskCallback):
                callback.resume_from = path
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            # an exception (KeyboardInterrupt, OOM) inside a masked step would otherwise leave the
            # shared tensors with requires_grad off: every later training run (a notebook rerun,
            # a new mask) would silently never update them; an unfinished accumulation window's
            # gradient would join the next run's first step
            discard_accumulation(self.model)
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, GradientMaskCallback):
                    callback.mask.release()

    def _save(self, output_dir=None, state_dict=None):
        # transformers refuses to write tensors shared in a way it does not know (cores tied
        # across layers): record the ties in the config and store each tied core once
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return super()._save(output_dir, state_dict=prepare_transformers_save(model, state_dict))

    def _issue_warnings_after_load(self, load_result):
        # a tied core is stored once, under its source's name: its other names are not missing
        tied = set(tied_cores(self.accelerator.unwrap_model(self.model, keep_torch_compile=False)))
        if tied and getattr(load_result, "missing_keys", None) and hasattr(load_result, "_replace"):
            load_result = load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in tied])
        return super()._issue_warnings_after_load(load_result)

    def auxiliary_loss_scale(self, num_items_in_batch=None) -> float:
        """Factor of the auxiliary loss in this micro-batch's loss: ``1 / accumulation steps``
        when transformers will not divide the returned loss by them, else 1 (it divides)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (bool(getattr(self, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None) \
                or getattr(self, "compute_loss_func", None) is not None
        if not scaled:
            return 1.0
        steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        return 1.0 / steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if num_items_in_batch is not None:  # transformers < 4.46 has no such argument
            kwargs["num_items_in_batch"] = num_items_in_batch
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if model.training:
            aux = auxiliary_loss(model).to(loss.device)
            if loss.requires_grad and not aux.requires_grad:
                _check_aux_loss_trains(model)
            loss = loss + self.auxiliary_loss_scale(num_items_in_batch) * aux
            own = self._model_auxiliary_term(model, outputs)
            if own is not None:  # the MoE model's own router loss, inside outputs.loss
                loss = loss + (self.auxiliary_loss_scale(num_items_in_batch) - self._loss_factor(num_items_in_batch)) \
                    * torch.as_tensor(own, device=loss.device)  # a Python 0 where a stack has no sparse layer
        return (loss, outputs) if return_outputs else loss

    def _model_auxiliary_term(self, model, outputs):
        """The router loss an MoE model (Mixtral, Qwen-MoE, gpt-oss, Switch, ...) added to its own
        ``outputs.loss`` (``None`` when it added none, or the Trainer did not use that loss). It is
        a per-micro-batch mean, so it is reweighted like :func:`auxiliary_loss` to count once per
        optimizer step under gradient accumulation."""
        if getattr(self, "compute_loss_func", None) is not None or getattr(self, "label_smoother", None) is not None:
            return None
        if not isinstance(outputs, dict) or outputs.get("loss") is None:
            return None
        unwrapped = self.accelerator.unwrap_model(model)
        if outputs.get("aux_loss") is not None and hasattr(unwrapped, "router_aux_loss_coef"):
            return unwrapped.router_aux_loss_coef * outputs["aux_loss"]
        if outputs.get("encoder_aux_loss") is not None and hasattr(unwrapped, "router_z_loss_coef"):  # Switch
            aux = outputs["encoder_aux_loss"] + outputs["decoder_aux_loss"]
            z = outputs["encoder_z_loss"] + outputs["decoder_z_loss"]
            return unwrapped.router_aux_loss_coef * aux + unwrapped.router_z_loss_coef * z
        return None

    def _loss_factor(self, num_items_in_batch) -> float:
        """The factor transformers' ``compute_loss`` applied to the model's loss (the number of
        processes under ``average_tokens_across_devices``, else 1)."""
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and (
                getattr(self, "model_accepts_loss_kwargs", False) or getattr(self, "compute_loss_func", None)):
            return float(self.accelerator.num_processes // getattr(self, "get_tp_size", lambda: 1)() if self.args.n_gpu <= 1
                         else self.args.n_gpu)
        return 1.0


def _first_attr(obj, *names):
    """The value of the first of ``names`` that ``obj`` has, else ``False``."""
    for name in names:
        if hasattr(obj, name):
            return getattr(obj, name)
    return False


def _check_aux_loss_trains(model: nn.Module) -> None:
    """Raise when learned routers with a non-zero auxiliary loss coefficient produced an
    auxiliary loss without autograd: their forward ran under ``no_grad`` (reentrant activation
    checkpointing), so the load-balancing loss would be logged but never train the routers."""
    for name, layer in moe_layers(model):
        learned = any(p.requires_grad for p in layer.router.parameters())
        if learned and (layer.load_balancing_coef or layer.z_loss_coef):
            raise RuntimeError(
                f"{name}: the MoE auxiliary loss carries no gradient (the layer ran without autograd, e.g. "
                "under reentrant activation checkpointing), so it would never train the routers. Use "
                "gradient_checkpointing_kwargs={'use_reentrant': False} (transformers' default), or set "
                "load_balancing_coef and z_loss_coef to 0 if no auxiliary loss is wanted"
            )


class MoETrainer(MoETrainerMixin, Trainer):
    """``Trainer`` whose training loss is ``task loss + tnmoe.moe.auxiliary_loss(model)``, the
    auxiliary loss weighted like the task loss under gradient accumulation (see
    :class:`MoETrainerMixin`)."""
