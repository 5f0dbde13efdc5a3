"""Helpers shared by the recipes: MoE variants, GLUE data and metrics, results I/O.

Uses tnmoe's public API only (``tnmoe.moe``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

import tnmoe.moe as moe

# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------
#: the paper's factorizations (MPOE Table 4); other dims fall back to balanced factors
PAPER_FACTORS = {
    3: {768: [8, 12, 8], 3072: [12, 16, 16]},
    5: {768: [3, 4, 4, 4, 4], 3072: [4, 4, 8, 6, 4]},
    7: {768: [2, 2, 4, 4, 3, 2, 2], 3072: [2, 4, 4, 4, 4, 3, 2]},
    9: {768: [2, 2, 2, 2, 3, 2, 2, 2, 2], 3072: [2, 2, 2, 4, 4, 3, 2, 2, 2]},
}

VARIANTS = {
    "dense": "the unconverted model",
    "moe": "+MoE: 8 dense experts (copies of the FFN), softmax top-2",
    "switch": "+Switch: 8 dense experts, Switch top-1",
    "mpoe": "+MPOE: 8 MPO experts sharing the central tensor, Switch top-1, gradient mask",
    "mpoe++": "+MPOE++: 16 MPO experts sharing the central tensor",
    "mpoe-wo-gm": "MPOE without the gradient mask (p_b = 0)",
    "mpoe-wo-ps": "MPOE without parameter sharing (every expert has its own central tensor)",
}


class RecipeError(Exception):
    """A user error: printed as one line, exit status 2, nothing written."""


def add_moe_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("MoE")
    g.add_argument("--variant", default="mpoe", choices=sorted(VARIANTS),
                   help="; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    g.add_argument("--num-experts", type=int, default=None, help="default 8 (16 for mpoe++)")
    g.add_argument("--m", type=int, default=5, help="local tensors per MPO")
    g.add_argument("--factors", default=None,
                   help="explicit factorizations, e.g. '768=3,4,4,4,4;3072=4,4,8,6,4' "
                        "(default: the paper's for 768/3072, balanced otherwise)")
    g.add_argument("--max-bond", type=int, default=None, help="bond cap (default lossless)")
    g.add_argument("--p-b", type=float, default=0.5, help="gradient-mask probability for MPOE variants")
    g.add_argument("--lb-coef", type=float, default=0.01, help="load-balancing loss weight")
    g.add_argument("--capacity-factor", type=float, default=1.25)
    g.add_argument("--init-noise", type=float, default=0.0)
    g.add_argument("--target-modules", default=None, help="comma-separated module names (peft style)")


def parse_factors(text: str | None, m: int) -> dict[int, list[int]]:
    if not text:
        return dict(PAPER_FACTORS.get(m, {}))
    out = {}
    try:
        for part in text.split(";"):
            dim, fs = part.split("=")
            out[int(dim)] = [int(f) for f in fs.split(",")]
    except ValueError:
        raise RecipeError(f"--factors must look like '768=3,4,4,4,4;3072=4,4,8,6,4', got {text!r}") from None
    return out


def moe_config_for(args, *, vocab_size: int = 65536) -> tuple[moe.MoEConfig | None, float]:
    """(MoEConfig or None for dense, gradient-mask p_b) for ``args.variant``."""
    v = args.variant
    if v == "dense":
        return None, 0.0
    E = args.num_experts or (16 if v == "mpoe++" else 8)
    common = dict(num_experts=E, load_balancing_coef=args.lb_coef, capacity_factor=args.capacity_factor,
                  init_noise=args.init_noise, vocab_size=vocab_size,
                  target_modules=args.target_modules.split(",") if args.target_modules else None)
    try:
        if v == "moe":
            return moe.MoEConfig(expert_type="dense", router="topk", top_k=2, **common), 0.0
        if v == "switch":
            return moe.MoEConfig(expert_type="dense", router="switch", **common), 0.0
        factors = parse_factors(args.factors, args.m)
        share = "none" if v == "mpoe-wo-ps" else "central"
        p_b = 0.0 if v in ("mpoe-wo-gm", "mpoe-wo-ps") else args.p_b
        cfg = moe.MoEConfig(expert_type="mpo", router="switch", share=share, m=args.m, factors=factors,
                            max_bond=args.max_bond, **common)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    return cfg, p_b


def prepare_model(model: torch.nn.Module, args, *, vocab_size: int = 65536):
    """Convert ``model`` for ``args.variant``; returns ``(model, GradientMask | None, MoEConfig | None)``."""
    cfg, p_b = moe_config_for(args, vocab_size=vocab_size)
    if cfg is None:
        return model, None, None
    try:
        moe.convert(model, cfg)
    except ValueError as err:
        raise RecipeError(f"cannot convert {type(model).__name__}: {err}") from None
    mask = moe.GradientMask(model, p_b=p_b, seed=getattr(args, "seed", 0)) if p_b > 0 else None
    return model, mask, cfg


def parameter_summary(model: torch.nn.Module) -> dict:
    c = moe.count_parameters(model)
    return {"total_params": c.total, "active_params_per_token": c.active_per_token,
            "shared_params": c.shared, "per_expert_params": c.per_expert}


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; it replaces ``path`` only on success, so a
    failed run leaves nothing half-written."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def write_rows(rows: list[dict], base: Path) -> None:
    """``base.json`` and ``base.csv`` with the same rows."""
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(base.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})


def mask_summary(mask) -> dict | None:
    return None if mask is None else {"p_b": mask.p_b, "steps": mask.steps, "masked_steps": mask.masked_steps}


def finish_run(out: Path, result: dict, model, tokenizer, moe_cfg, save_model: bool) -> None:
    """Write ``results.json`` (and the model + tokenizer with ``save_model``) into ``out``."""
    shutil.rmtree(out / "trainer", ignore_errors=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    if save_model:
        if moe_cfg is not None:
            moe.save_pretrained(model, out / "model")
        else:
            model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")


def run_main(main) -> None:
    """Run ``main()``, turning :class:`RecipeError` into a one-line message and exit status 2."""
    try:
        main()
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


# ---------------------------------------------------------------------------------------------
# GLUE
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GlueTask:
    name: str            # our key
    hub_name: str        # datasets "glue" config
    folder: str          # local GLUE folder name
    text_keys: tuple[str, ...]
    num_labels: int      # 1 = regression
    label_words: tuple[str, ...] = ()  # T5 text-to-text targets by label id
    main_metric: str = "accuracy"


GLUE_TASKS = {
    "cola": GlueTask("cola", "cola", "CoLA", ("sentence",), 2, ("unacceptable", "acceptable"), "matthews"),
    "rte": GlueTask("rte", "rte", "RTE", ("sentence1", "sentence2"), 2, ("entailment", "not_entailment")),
    "mrpc": GlueTask("mrpc", "mrpc", "MRPC", ("sentence1", "sentence2"), 2, ("not_equivalent", "equivalent")),
    "stsb": GlueTask("stsb", "stsb", "STS-B", ("sentence1", "sentence2"), 1, (), "pearson"),
    "sst2": GlueTask("sst2", "sst2", "SST-2", ("sentence",), 2, ("negative", "positive")),
    "qnli": GlueTask("qnli", "qnli", "QNLI", ("question", "sentence"), 2, ("entailment", "not_entailment")),
    "mnli": GlueTask("mnli", "mnli", "MNLI", ("premise", "hypothesis"), 3,
                     ("entailment", "neutral", "contradiction")),
    "qqp": GlueTask("qqp", "qqp", "QQP", ("question1", "question2"), 2, ("not_duplicate", "duplicate")),
}


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise RecipeError(f"unknown GLUE task {name!r}; known: {', '.join(sorted(GLUE_TASKS))}")
    return GLUE_TASKS[key]


def _read_tsv(path: Path, task: GlueTask) -> list[dict]:
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    if task.name == "cola":  # no header: source, label, mark, sentence
        for ln in lines:
            parts = ln.split("\t")
            if len(parts) >= 4:
                rows.append({"sentence": parts[3], "label": int(parts[1])})
        return rows
    header = lines[0].split("\t")
    col = {h: i for i, h in enumerate(header)}
    for ln in lines[1:]:
        p = ln.split("\t")
        if len(p) < len(header) - 1:
            continue
        if task.name == "mrpc":
            rows.append({"sentence1": p[col["#1 String"]], "sentence2": p[col["#2 String"]], "label": int(p[0])})
        elif task.name == "stsb":
            rows.append({"sentence1": p[col["sentence1"]], "sentence2": p[col["sentence2"]], "label": float(p[-1])})
        else:
            label = p[col["label"]] if "label" in col else p[-1]
            rec = {k: p[col[k]] for k in task.text_keys}
            rec["label"] = task.label_words.index(label) if label in task.label_words else int(label)
            rows.append(rec)
    return rows


def load_glue(task: GlueTask, data_dir: str | None, *, max_train: int | None = None,
              max_eval: int | None = None, split_protocol: str = "paper", seed: int = 42):
    """``(train, validation, test)`` as ``datasets.Dataset``.

    ``data_dir``: a local GLUE folder (``<data_dir>/<Task>/{train,dev}.tsv``); ``None`` loads
    ``glue/<task>`` from the hub with ``datasets``. ``split_protocol="paper"``: the original
    dev set is shuffled (seeded) and halved, one half for model selection, the other as test;
    ``"dev"``: dev is both validation and test.
    """
    import datasets

    if data_dir is not None:
        folder = Path(data_dir) / task.folder
        if not (folder / "train.tsv").is_file() or not (folder / "dev.tsv").is_file():
            raise RecipeError(f"missing {folder}/train.tsv or dev.tsv (expected the GLUE folder layout)")
        train = datasets.Dataset.from_list(_read_tsv(folder / "train.tsv", task))
        dev = datasets.Dataset.from_list(_read_tsv(folder / "dev.tsv", task))
    else:
        ds = datasets.load_dataset("glue", task.hub_name)
        train = ds["train"]
        dev = ds["validation_matched" if task.name == "mnli" else "validation"]
    train = train.shuffle(seed=seed)
    if max_train:
        train = train.select(range(min(max_train, len(train))))
    dev = dev.shuffle(seed=seed)
    if split_protocol == "paper":
        half = len(dev) // 2
        val, test = dev.select(range(half)), dev.select(range(half, len(dev)))
    elif split_protocol == "dev":
        val = test = dev
    else:
        raise RecipeError(f"split protocol must be 'paper' or 'dev', got {split_protocol!r}")
    if max_eval:
        val = val.select(range(min(max_eval, len(val))))
        test = test.select(range(min(max_eval, len(test))))
    return train, val, test


def glue_metrics(task: GlueTask, preds, labels) -> dict[str, float]:
    """Accuracy, F1 (MRPC/QQP), Matthews (CoLA), Pearson/Spearman (STS-B); 'score' = main metric."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds, labels = np.asarray(preds), np.asarray(labels)
    if task.num_labels == 1:
        ok = np.isfinite(preds)
        p = np.where(ok, preds, 0.0)
        out = {"pearson": float(pearsonr(p, labels)[0]) if np.std(p) > 0 else 0.0,
               "spearman": float(spearmanr(p, labels)[0]) if np.std(p) > 0 else 0.0}
    else:
        out = {"accuracy": float(accuracy_score(labels, preds))}
        if task.name in ("mrpc", "qqp"):
            out["f1"] = float(f1_score(labels, preds, zero_division=0))
        if task.name == "cola":
            out["matthews"] = float(matthews_corrcoef(labels, preds))
    out["score"] = out[task.main_metric]
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


# ---------------------------------------------------------------------------------------------
# studies (ablations, factorization): many recipe runs -> one table and one plot
# ---------------------------------------------------------------------------------------------
def recipe_main(name: str):
    """The ``main(argv)`` of a recipe: ``gpt2``, ``bert`` (encoder GLUE) or ``t5`` (text-to-text GLUE)."""
    if name == "gpt2":
        from mpoe_gpt2 import main

        return main
    if name == "bert":
        from glue import main
        from mpoe_bert import default_model

        return lambda argv: main(argv, default_model=default_model())
    if name == "t5":
        from glue import main

        return lambda argv: main(argv, default_model="t5-base")
    raise RecipeError(f"unknown recipe {name!r}; use gpt2, bert or t5")


def metric_of(recipe: str, result: dict) -> tuple[str, float]:
    if recipe == "gpt2":
        return "test_perplexity", result["test_perplexity"]
    return "test_score", result["test"]["score"]


def split_passthrough(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """``(own args, args after '--' for the recipe)``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def write_study(recipe: str, results: list[dict], rows: list[dict], out: Path, name: str, label_key: str,
                panel_key: str | None, title: str) -> None:
    """``name.{json,csv}`` (summary rows), ``<name>_runs.{json,csv}`` (every run), ``name.png``."""
    write_rows(rows, out / name)
    write_rows([{k: v for k, v in r.items() if k not in ("history", "samples")} for r in results],
               out / f"{name}_runs")
    plot_metric_vs_params(rows, recipe, label_key, out / f"{name}.png", panel_key=panel_key, title=title)
    for row in rows:
        print(row)


def run_study(recipe: str, runs: list[tuple[str, list[str]]], runs_dir: Path,
              existing_only: bool = False) -> list[dict]:
    """Run each ``(name, argv)`` whose ``runs_dir/name/results.json`` does not exist yet
    (so an interrupted study resumes), and return all results in order. With
    ``existing_only``, missing runs are skipped instead (summarize what was run)."""
    main = recipe_main(recipe)
    results = []
    for i, (name, argv) in enumerate(runs):
        path = runs_dir / name / "results.json"
        if not path.is_file() and existing_only:
            print(f"[{i + 1}/{len(runs)}] {name}: not run, skipped (--existing-only)", flush=True)
            continue
        if not path.is_file():
            print(f"[{i + 1}/{len(runs)}] {name}: python recipes/... {' '.join(argv)}", flush=True)
            main(argv + ["--output-dir", str(runs_dir / name)])
        else:
            print(f"[{i + 1}/{len(runs)}] {name}: done earlier, reusing {path}", flush=True)
        r = json.loads(path.read_text())
        r["run"] = name
        results.append(r)
    return results


def summarize(recipe: str, results: list[dict], group_keys: tuple[str, ...]) -> list[dict]:
    """Mean/std of the test metric (and wall time) over seeds for each group."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r.get(k) if not isinstance(r.get(k), list) else ",".join(r[k])
                                for k in group_keys), []).append(r)
    rows = []
    for key, rs in groups.items():
        metric, _ = metric_of(recipe, rs[0])
        vals = [metric_of(recipe, r)[1] for r in rs]
        m, s = mean_std(vals)
        row = dict(zip(group_keys, key))
        row.update({f"{metric}_mean": m, f"{metric}_std": s, "seeds": len(rs),
                    "total_params": rs[0]["total_params"],
                    "active_params_per_token": rs[0]["active_params_per_token"],
                    "train_seconds_mean": sum(r["train_seconds"] for r in rs) / len(rs)})
        if recipe == "gpt2":
            for k in ("bleu2", "bleu4", "self_bleu2"):
                if k in rs[0]:
                    row[f"{k}_mean"] = sum(r[k] for r in rs) / len(rs)
        else:
            for sub in rs[0]["test"]["tasks"].values():
                for k in sub:
                    if k != "score":
                        row[f"{k}_mean"] = sum(next(iter(r["test"]["tasks"].values()))[k] for r in rs) / len(rs)
        rows.append(row)
    return rows


def plot_metric_vs_params(rows: list[dict], recipe: str, label_key: str, path: Path,
                          panel_key: str | None = None, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "test_perplexity" if recipe == "gpt2" else "test_score"
    panels = sorted({r[panel_key] for r in rows}) if panel_key else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        sel = [r for r in rows if panel_key is None or r[panel_key] == panel]
        for r in sel:
            ax.errorbar(r["total_params"] / 1e6, r[f"{metric}_mean"], yerr=r[f"{metric}_std"] or None,
                        fmt="o", capsize=3)
            ax.annotate(str(r[label_key]), (r["total_params"] / 1e6, r[f"{metric}_mean"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("total parameters (M)")
        ax.set_ylabel(metric.replace("_", " ") + (" (lower is better)" if recipe == "gpt2" else ""))
        ax.set_title(str(panel) if panel is not None else title, fontsize=10)
        ax.grid(alpha=0.3)
    if title and panel_key:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
