"""The training plumbing ``glue.py`` and ``mpoe_gpt2.py`` share: their run options, the HF
Trainer with tnmoe's auxiliary loss and gradient mask wired in, and the part of ``results.json``
every run has.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

import tnmoe.moe as moe
from run_io import RecipeError, Timer, data_fingerprint, set_seed
from variants import parameter_summary


def add_training_args(ap: argparse.ArgumentParser, *, epochs: float, lr: float | None, warmup_ratio: float,
                      lr_help: str | None = None, fp16: bool = False) -> None:
    """``--epochs --batch-size --gradient-accumulation-steps --lr --weight-decay --warmup-ratio --seed --bf16 [--fp16]
    --threads --save-model --quiet`` with the recipe's defaults."""
    ap.add_argument("--epochs", type=float, default=epochs)
    ap.add_argument("--batch-size", type=int, default=16, help="per micro-batch")
    ap.add_argument("--gradient-accumulation-steps", type=int, default=1,
                    help="micro-batches per optimizer step (MPO weights are rebuilt once per step)")
    ap.add_argument("--lr", type=float, default=lr, help=lr_help)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup-ratio", type=float, default=warmup_ratio, help="warm-up steps / all steps")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--bf16", action="store_true")
    if fp16:
        ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--save-model", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")


def start_run(args: argparse.Namespace) -> None:
    """Apply ``--threads`` and ``--seed``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)


def make_trainer(model: torch.nn.Module, args: argparse.Namespace, out: Path, train_dataset,
                 mask: moe.GradientMask | None, *, lr: float, lr_scheduler: str, logging_steps: int,
                 data_collator=None, callbacks: Sequence = ()) -> moe.MoETrainer:
    """A :class:`tnmoe.moe.MoETrainer` (adds the MoE auxiliary loss) for the options of
    :func:`add_training_args`; ``mask`` is applied before each optimizer step. Checkpoints go
    nowhere, scratch files to ``out/trainer``; warm-up is ``--warmup-ratio`` of all steps."""
    from transformers import TrainingArguments

    accumulate = getattr(args, "gradient_accumulation_steps", 1)
    if accumulate < 1:
        raise RecipeError(f"--gradient-accumulation-steps must be >= 1, got {accumulate}")
    steps = args.epochs * -(-len(train_dataset) // (args.batch_size * accumulate))
    targs = TrainingArguments(
        output_dir=str(out / "trainer"), num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=accumulate, learning_rate=lr,
        weight_decay=args.weight_decay, lr_scheduler_type=lr_scheduler,
        warmup_steps=int(args.warmup_ratio * steps), logging_steps=logging_steps, save_strategy="no",
        eval_strategy="no", report_to=[], seed=args.seed, bf16=args.bf16, fp16=getattr(args, "fp16", False),
        disable_tqdm=args.quiet, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
    )
    callbacks = list(callbacks) + ([moe.GradientMaskCallback(mask)] if mask is not None else [])
    return moe.MoETrainer(model=model, args=targs, train_dataset=train_dataset, data_collator=data_collator,
                          callbacks=callbacks)


def mask_summary(mask: moe.GradientMask | None) -> dict | None:
    """``{"p_b", "steps", "masked_steps"}`` of the gradient mask (``None`` without one)."""
    return None if mask is None else {"p_b": mask.p_b, "steps": mask.steps, "masked_steps": mask.masked_steps}


def run_record(model: torch.nn.Module, mask: moe.GradientMask | None, train: Timer,
               argv: Sequence[str] | None, train_steps: int | None = None, selection: Timer | None = None) -> dict:
    """The fields every ``results.json`` has: training wall time (s; with ``train_steps``, also
    ``seconds_per_step`` without the ``selection`` time spent on model selection inside training,
    and ``cpu_seconds_per_step``: process CPU time per step over all threads, which pauses and
    waiting for a core do not inflate, with the ``threads`` it ran on), the gradient mask's
    summary, the MoE config (``None`` for dense), the command line, the SHA-256 of the data files
    it names (``data_sha256``, :func:`run_io.data_fingerprint`) and the parameter counts."""
    cfg = moe.get_moe_config(model)
    argv = sys.argv[1:] if argv is None else list(argv)
    selection = selection or Timer()
    steps = {} if train_steps is None else {
        "train_steps": train_steps, "selection_seconds": selection.seconds,
        "seconds_per_step": (train.seconds - selection.seconds) / max(1, train_steps),
        "cpu_seconds_per_step": (train.cpu_seconds - selection.cpu_seconds) / max(1, train_steps),
        "threads": torch.get_num_threads()}
    return {"train_seconds": train.seconds, **steps, "gradient_mask": mask_summary(mask),
            "moe_config": cfg.to_dict() if cfg is not None else None,
            "argv": argv, "data_sha256": data_fingerprint(argv), **parameter_summary(model),
            "conversion_error": conversion_error_summary(model),
            "conversion_output_error": conversion_output_error_summary(model)}


def conversion_error_summary(model: torch.nn.Module) -> dict | None:
    """Relative Frobenius error of the MPO experts (or, for the truncated variant, the truncated
    matrices) against the pretrained matrices at conversion (:func:`tnmoe.moe.conversion_errors`):
    ``mean``/``max`` over matrices; ``None`` without MPO experts."""
    truncation = getattr(model, "truncation", None)
    errors = ([r["weight_error"] for r in truncation] if truncation
              else list(moe.conversion_errors(model).values()))
    if not errors:
        return None
    return {"mean": sum(errors) / len(errors), "max": max(errors), "matrices": len(errors)}


def conversion_output_error_summary(model: torch.nn.Module) -> dict | None:
    """Relative output error ``||(W - Ŵ) L|| / ||W L||`` on the calibration inputs at conversion,
    where calibration was used: ``mean``/``max`` over matrices, and TT-SVD's at the same bonds
    (``tt_svd_mean``) for data-aware MPO fits; ``None`` without calibration."""
    truncation = getattr(model, "truncation", None)
    if truncation:
        errors = [r["output_error"] for r in truncation if r["output_error"] is not None]
        return {"mean": sum(errors) / len(errors), "max": max(errors), "matrices": len(errors)} if errors else None
    rows = [r for report in moe.fit_reports(model).values() for r in report.matrices[:1]]  # experts start alike
    if not rows:
        return None
    # against the original outputs where the fit was sequential (ReferencedCovariance)
    errors = [r.output_error if r.reference_output_error is None else r.reference_output_error for r in rows]
    tt = [r.tt_svd_output_error for r in rows if r.tt_svd_output_error is not None]
    out = {"mean": sum(errors) / len(errors), "max": max(errors), "matrices": len(errors)}
    if tt:
        out["tt_svd_mean"] = sum(tt) / len(tt)
    return out
