"""GLUE fine-tuning with dense / +MoE / +Switch / +MPOE / +MPOE++ variants (MPOE Tables 1-3).

Works with encoder-decoder models in text-to-text form (T5: ``recipes/mpoe_t5.py``) and with
encoder classifiers (BERT family, e.g. the real MiniLM: ``recipes/mpoe_bert.py``). Training uses
the HF Trainer (progress bars, mixed precision, multi-GPU via accelerate) with the MoE auxiliary
loss and the gradient mask wired in. Model selection: after each epoch the validation half is
scored and the best weights are kept; the test half is scored once at the end.

Writes ``<output-dir>/results.json`` (and the model with ``--save-model``); nothing is written
when the run fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from glue_data import GlueTask, get_task, glue_metrics, load_glue  # noqa: E402
from run_io import RecipeError, Timer, atomic_output_dir, finish_run, run_main  # noqa: E402
from training import add_training_args, make_trainer, run_record, start_run  # noqa: E402
from variants import add_moe_args, prepare_model  # noqa: E402

import tnmoe.moe as moe  # noqa: E402


def build_parser(default_model: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=default_model, help="hub name or local path")
    ap.add_argument("--task", default="rte", help="GLUE task, or comma-separated tasks for multi-task (text-to-text only)")
    ap.add_argument("--data-dir", default=None, help="local GLUE folder (<dir>/RTE/train.tsv ...); default: the hub")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--split-protocol", default="paper", choices=["paper", "dev"],
                    help="paper: tasks under 10k training rows halve dev into validation (selection) "
                         "and test; larger ones validate on 1k held-out training rows and test on dev. "
                         "dev: dev for both")
    ap.add_argument("--max-train-samples", type=int, default=None)
    ap.add_argument("--max-eval-samples", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=128)
    add_training_args(ap, epochs=3, lr=None, lr_help="default 3e-4 (T5) / 5e-5 (encoders)", warmup_ratio=0.06,
                      fp16=True)
    add_moe_args(ap)
    return ap


# --- data ---------------------------------------------------------------------------------------
def t5_source(task: GlueTask, ex: dict) -> str:
    """T5 input text, e.g. ``'rte sentence1: ... sentence2: ...'``."""
    return f"{task.name} " + " ".join(f"{k}: {ex[k]}" for k in task.text_keys)


def t5_target(task: GlueTask, label) -> str:
    """T5 target text: the label word, or the score rounded to 0.2 (``'3.8'``) for STS-B."""
    if task.num_labels == 1:
        return f"{round(float(label) * 5) / 5:.1f}"
    return task.label_words[int(label)]


def parse_t5_output(task: GlueTask, text: str) -> int | float:
    """Generated text -> label id (-1 if not a label word) or score (NaN if not a number)."""
    text = text.strip()
    if task.num_labels == 1:
        try:
            return float(text.split()[0])
        except (ValueError, IndexError):
            return float("nan")
    return task.label_words.index(text) if text in task.label_words else -1


class Encoded(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def encode(tok, tasks_and_rows, seq2seq: bool, max_length: int):
    items = []
    for task, rows in tasks_and_rows:
        for ex in rows:
            if seq2seq:
                enc = tok(t5_source(task, ex), truncation=True, max_length=max_length,
                          return_token_type_ids=False)
                enc["labels"] = tok(t5_target(task, ex["label"]), truncation=True, max_length=8)["input_ids"]
            else:
                enc = tok(*[ex[k] for k in task.text_keys], truncation=True, max_length=max_length)
                enc["labels"] = float(ex["label"]) if task.num_labels == 1 else int(ex["label"])
            items.append(dict(enc))
    return Encoded(items)


# --- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def predict(model, tok, task, rows, *, seq2seq, max_length, batch_size, device, desc, quiet):
    """``(predictions, labels)`` over ``rows``: label ids (classification; -1 for an unparseable
    T5 answer) or scores (STS-B)."""
    model.eval()
    preds, labels = [], []
    rows = list(rows)
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False, disable=quiet):
        chunk = rows[i:i + batch_size]
        labels += [r["label"] for r in chunk]
        if seq2seq:
            enc = tok([t5_source(task, r) for r in chunk], truncation=True, max_length=max_length,
                      padding=True, return_tensors="pt", return_token_type_ids=False).to(device)
            out = model.generate(**enc, max_new_tokens=6, do_sample=False)
            preds += [parse_t5_output(task, t) for t in tok.batch_decode(out, skip_special_tokens=True)]
        else:
            enc = tok(*[[r[k] for r in chunk] for k in task.text_keys], truncation=True,
                      max_length=max_length, padding=True, return_tensors="pt").to(device)
            logits = model(**enc).logits.float()
            preds += (logits[:, 0] if task.num_labels == 1 else logits.argmax(-1)).cpu().tolist()
    return preds, labels


def evaluate(model, tok, task, rows, **kw) -> dict[str, float]:
    """The task's GLUE metrics over ``rows`` (see :func:`predict` for the keywords)."""
    return glue_metrics(task, *predict(model, tok, task, rows, **kw))


def study_metrics(result: dict) -> dict[str, float]:
    """The metrics a study averages: ``test_score`` (mean of the tasks' main metrics) and every
    task's own metrics under ``<task>_<metric>`` (e.g. ``rte_accuracy``, ``mrpc_f1``)."""
    out = {"test_score": result["test"]["score"]}
    for task, metrics in result["test"]["tasks"].items():
        out.update({f"{task}_{k}": v for k, v in metrics.items() if k != "score"})
    return out


def main(argv: list[str] | None = None, default_model: str = "t5-base") -> dict:
    """Fine-tune and score one variant; returns (and writes) the ``results.json`` dict."""
    args = build_parser(default_model).parse_args(argv)
    tasks = [get_task(t) for t in args.task.split(",")]
    start_run(args)
    splits = {t.name: load_glue(t, args.data_dir, max_train=args.max_train_samples,
                                max_eval=args.max_eval_samples, split_protocol=args.split_protocol,
                                seed=args.seed) for t in tasks}

    from transformers import (AutoConfig, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                              AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithPadding,
                              TrainerCallback)

    try:
        base_cfg = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        raise RecipeError(f"cannot load model {args.model!r}: {err}") from None
    seq2seq = bool(getattr(base_cfg, "is_encoder_decoder", False))
    if not seq2seq and len(tasks) > 1:
        raise RecipeError("multi-task training needs a text-to-text (encoder-decoder) model such as T5")
    tok = AutoTokenizer.from_pretrained(args.model)
    if seq2seq:
        model = AutoModelForSeq2SeqLM.from_pretrained(args.model)
    else:
        t = tasks[0]
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model, num_labels=t.num_labels, ignore_mismatched_sizes=True,
            problem_type="regression" if t.num_labels == 1 else "single_label_classification")
    def calibration(n: int) -> list[dict]:
        """Padded batches of the first ``n`` training examples (of each task), as the model reads them."""
        ds = encode(tok, [(t, splits[t.name][0].select(range(min(n, len(splits[t.name][0]))))) for t in tasks],
                    seq2seq, args.max_length)
        collate = DataCollatorForSeq2Seq(tok, model=model) if seq2seq else DataCollatorWithPadding(tok)
        items = [dict(x) for x in ds.items]
        if not seq2seq:
            for x in items:
                x.pop("labels")
        return [dict(collate(items[i:i + 32])) for i in range(0, len(items), 32)]

    model, mask = prepare_model(model, args, calibration)
    if not args.quiet:
        moe.print_trainable_parameters(model)

    train_ds = encode(tok, [(t, splits[t.name][0]) for t in tasks], seq2seq, args.max_length)
    collator = (DataCollatorForSeq2Seq(tok, model=model) if seq2seq else DataCollatorWithPadding(tok))
    lr = args.lr if args.lr is not None else (3e-4 if seq2seq else 5e-5)

    def score_all(split_index: int, desc: str, keep_predictions: bool = False) -> dict:
        per_task, predictions = {}, {}
        for t in tasks:
            preds, labels = predict(model, tok, t, splits[t.name][split_index], seq2seq=seq2seq,
                                    max_length=args.max_length, batch_size=max(args.batch_size, 32),
                                    device=model.device, desc=desc, quiet=args.quiet)
            per_task[t.name] = glue_metrics(t, preds, labels)
            if keep_predictions:
                predictions[t.name] = {"predictions": [round(float(p), 5) for p in preds],
                                       "labels": [float(y) if t.num_labels == 1 else int(y) for y in labels],
                                       "ids": [int(i) for i in splits[t.name][split_index]["dev_index"]]}
        res = {"tasks": per_task, "score": float(np.mean([m["score"] for m in per_task.values()]))}
        if keep_predictions:  # per-example test outputs, for paired significance tests between runs
            res["examples"] = predictions
        return res

    history: list[dict] = []
    best = {"score": -float("inf"), "state": None, "epoch": None}

    selection = Timer()  # time spent scoring the validation half inside trainer.train()

    class SelectBest(TrainerCallback):
        def on_epoch_end(self, targs, state, control, **kw):
            with selection:
                self.select(state)

        def select(self, state):
            res = score_all(1, "validation")
            res["epoch"] = round(state.epoch or 0, 3)
            history.append(res)
            if res["score"] > best["score"]:
                best.update(score=res["score"], epoch=res["epoch"],
                            state={k: v.detach().clone() for k, v in model.state_dict().items()})
            model.train()

    with atomic_output_dir(args.output_dir) as out:
        trainer = make_trainer(model, args, out, train_ds, mask, lr=lr, lr_scheduler="linear",
                               logging_steps=max(1, len(train_ds) // args.batch_size // 4),
                               data_collator=collator, callbacks=[SelectBest()])
        with Timer() as timer:
            trainer.train()
        if best["state"] is not None:
            model.load_state_dict(best["state"])
        with Timer() as test_timer:
            test = score_all(2, "test", keep_predictions=True)
        result = {
            "model": args.model, "tasks": [t.name for t in tasks], "variant": args.variant,
            "seed": args.seed, "epochs": args.epochs, "lr": lr, "batch_size": args.batch_size,
            "train_samples": len(train_ds), "split_protocol": args.split_protocol,
            "validation_sizes": {t.name: len(splits[t.name][1]) for t in tasks},
            "test_sizes": {t.name: len(splits[t.name][2]) for t in tasks},
            "best_epoch": best["epoch"], "best_validation": best["score"], "history": history,
            "test": test, "test_seconds": test_timer.seconds,
            **run_record(model, mask, timer, argv, trainer.state.global_step, selection),
        }
        finish_run(out, result, model, tok, args.save_model)
    if not args.quiet:
        print(json.dumps({"variant": args.variant, "tasks": result["tasks"], "test": test["tasks"],
                          "best_validation": best["score"], "train_seconds": round(timer.seconds, 1),
                          "total_params": result["total_params"]}, indent=2))
    return result


if __name__ == "__main__":
    run_main(main)
