"""Studies (ablations, factorization): many runs of one recipe -> one summary table and one plot.

Knows no recipe by name: a study script passes a :class:`StudyRecipe` (the recipe's ``main`` and
how to read its ``results.json``), so this module imports no recipe and no recipe imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from run_io import write_rows


@dataclass(frozen=True)
class StudyRecipe:
    """A recipe as a study runs it.

    main: the recipe's ``main(argv) -> result`` (the dict it writes to ``results.json``).
    metrics: ``result -> {name: value}``, every metric the summary averages over seeds;
        includes ``headline``. headline: the metric reported as mean and std and plotted.
    lower_is_better: for the plot's axis label. task: the one task every run is on (e.g.
        ``"wikitext2"``); ``None``: the recipe takes ``--task TASK`` from the study.
    """

    name: str
    main: Callable[[list[str]], dict]
    metrics: Callable[[dict], dict[str, float]]
    headline: str
    lower_is_better: bool = False
    task: str | None = None


@dataclass(frozen=True)
class StudyRun:
    """One run: its folder name under ``runs/``, the recipe's arguments (no ``--output-dir``)
    and the labels (``task``, ``variant``, ``m``, ``seed``) the summary groups by."""

    name: str
    argv: list[str]
    labels: dict[str, object] = field(default_factory=dict)


# --- command line -------------------------------------------------------------------------------
def split_passthrough(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """``(own args, args after '--' for the recipe)``; ``None`` reads ``sys.argv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def study_parser(description: str, recipe_names: Sequence[str]) -> argparse.ArgumentParser:
    """The options every study takes: ``--recipe``, ``--seeds``, ``--output-dir``, ``--existing-only``."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=list(recipe_names), required=True)
    ap.add_argument("--seeds", default="42", help="comma-separated seeds")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--existing-only", action="store_true",
                    help="run nothing new: summarize the runs already in --output-dir")
    return ap


def parse_study_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """``(the study's options, the arguments after '--' for the recipe)``."""
    own, passthrough = split_passthrough(argv)
    return ap.parse_args(own), passthrough


def int_list(text: str) -> list[int]:
    """``'3,5,7'`` -> ``[3, 5, 7]``."""
    return [int(x) for x in text.split(",")]


def grid(recipe: StudyRecipe, *, tasks: Sequence[str], variants: Sequence[str], ms: Sequence[int],
         seeds: Sequence[int], passthrough: Sequence[str]) -> list[StudyRun]:
    """Every (task, variant, m, seed), in that nesting order; run ``<task>-<variant>-m<m>-s<seed>``.
    ``tasks`` is ignored when the recipe has its own :attr:`StudyRecipe.task`."""
    runs = []
    for task in ([recipe.task] if recipe.task else tasks):
        for variant in variants:
            for m in ms:
                for seed in seeds:
                    argv = ([] if recipe.task else ["--task", task]) + [
                        "--variant", variant, "--m", str(m), "--seed", str(seed), *passthrough]
                    runs.append(StudyRun(f"{task}-{variant}-m{m}-s{seed}", argv,
                                         {"task": task, "variant": variant, "m": m, "seed": seed}))
    return runs


# --- running ------------------------------------------------------------------------------------
def run_study(main: Callable[[list[str]], dict], runs: Sequence[StudyRun], runs_dir: Path,
              existing_only: bool = False) -> list[tuple[StudyRun, dict]]:
    """Run each run whose ``runs_dir/<name>/results.json`` does not exist yet (so an interrupted
    study resumes) by calling ``main(argv + ['--output-dir', ...])``; return ``(run, result)``
    for all, in order. With ``existing_only``, missing runs are skipped instead."""
    done = []
    for i, run in enumerate(runs):
        path = runs_dir / run.name / "results.json"
        step = f"[{i + 1}/{len(runs)}] {run.name}:"
        if path.is_file():
            print(f"{step} done earlier, reusing {path}", flush=True)
        elif existing_only:
            print(f"{step} not run, skipped (--existing-only)", flush=True)
            continue
        else:
            print(f"{step} python recipes/... {' '.join(run.argv)}", flush=True)
            main(run.argv + ["--output-dir", str(runs_dir / run.name)])
        result = json.loads(path.read_text())
        result["run"] = run.name
        done.append((run, result))
    return done


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def summarize(recipe: StudyRecipe, results: Sequence[dict], group_keys: Sequence[str]) -> list[dict]:
    """One row per group (same values under ``group_keys``), in order of first appearance:
    ``<headline>_mean``/``_std`` over the group's runs (seeds), ``seeds`` (runs), the first run's
    parameter counts, ``train_seconds_mean`` and ``<metric>_mean`` for every other metric of
    :attr:`StudyRecipe.metrics` that all the group's runs have (e.g. ``rte_accuracy_mean``)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r[k] for k in group_keys), []).append(r)
    rows = []
    for key, rs in groups.items():
        metrics = [recipe.metrics(r) for r in rs]
        m, s = mean_std([x[recipe.headline] for x in metrics])
        row = dict(zip(group_keys, key))
        row.update({f"{recipe.headline}_mean": m, f"{recipe.headline}_std": s, "seeds": len(rs),
                    "total_params": rs[0]["total_params"],
                    "active_params_per_token": rs[0]["active_params_per_token"],
                    "train_seconds_mean": sum(r["train_seconds"] for r in rs) / len(rs)})
        for name in metrics[0]:
            if name != recipe.headline and all(name in x for x in metrics):
                row[f"{name}_mean"] = sum(x[name] for x in metrics) / len(metrics)
        rows.append(row)
    return rows


# --- output -------------------------------------------------------------------------------------
def plot(rows: list[dict], recipe: StudyRecipe, label_key: str, path: Path,
         panel_key: str | None = None, title: str = "") -> None:
    """Headline metric (mean, error bar = std) against total parameters (millions), one point
    per row labelled by ``row[label_key]``, one panel per value of ``row[panel_key]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = recipe.headline
    panels = sorted({r[panel_key] for r in rows}) if panel_key else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for r in (r for r in rows if panel_key is None or r[panel_key] == panel):
            ax.errorbar(r["total_params"] / 1e6, r[f"{metric}_mean"], yerr=r[f"{metric}_std"] or None,
                        fmt="o", capsize=3)
            ax.annotate(str(r[label_key]), (r["total_params"] / 1e6, r[f"{metric}_mean"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("total parameters (M)")
        ax.set_ylabel(metric.replace("_", " ") + (" (lower is better)" if recipe.lower_is_better else ""))
        ax.set_title(str(panel) if panel is not None else title, fontsize=10)
        ax.grid(alpha=0.3)
    if title and panel_key:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_study(recipe: StudyRecipe, results: list[dict], rows: list[dict], out: Path, name: str,
                label_key: str, panel_key: str | None, title: str) -> None:
    """``name.{json,csv}`` (summary rows), ``<name>_runs.{json,csv}`` (every run), ``name.png``."""
    write_rows(rows, out / name)
    write_rows([{k: v for k, v in r.items() if k not in ("history", "samples")} for r in results],
               out / f"{name}_runs")
    plot(rows, recipe, label_key, out / f"{name}.png", panel_key=panel_key, title=title)
    for row in rows:
        print(row)


def conduct_study(recipe: StudyRecipe, runs: Sequence[StudyRun], out: Path, *, group_keys: Sequence[str],
                  name: str, label_key: str, panel_key: str | None, title: str,
                  existing_only: bool = False) -> list[dict]:
    """Run (or reuse, under ``out/runs``) every run, label each result with its run's
    ``group_keys`` labels, summarize, write the study's files; returns the summary rows."""
    results = []
    for run, result in run_study(recipe.main, runs, out / "runs", existing_only=existing_only):
        result.update({k: run.labels[k] for k in group_keys})
        results.append(result)
    rows = summarize(recipe, results, group_keys)
    write_study(recipe, results, rows, out, name, label_key, panel_key, title)
    return rows
