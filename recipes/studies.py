"""Studies (ablations, factorization): many runs of one recipe -> one summary table and one plot.

Knows no recipe by name: a study script passes a :class:`StudyRecipe` (the recipe's ``main`` and
how to read its ``results.json``), so this module imports no recipe and no recipe imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from run_io import DATA_PATH_OPTIONS, RecipeError, data_fingerprint, write_rows


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
    ap.add_argument("--wait", action="store_true",
                    help="when the same study runs side by side: wait for the runs other processes hold, "
                         "so the summary is complete")
    return ap


def parse_study_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """``(the study's options, the arguments after '--' for the recipe)``."""
    own, passthrough = split_passthrough(argv)
    return ap.parse_args(own), passthrough


def int_list(text: str) -> list[int]:
    """``'3,5,7'`` -> ``[3, 5, 7]``."""
    return [int(x) for x in text.split(",")]


def bond_label(max_bond: int | None) -> str:
    """``None`` -> ``'lossless'``, ``64`` -> ``'64'``."""
    return "lossless" if max_bond is None else str(max_bond)


def parse_bonds(text: str) -> list[int | None]:
    """``'lossless,256,64'`` -> ``[None, 256, 64]``."""
    out = []
    for x in text.split(","):
        x = x.strip().lower()
        if x in ("lossless", "none", "full"):
            out.append(None)
        elif x.isdigit() and int(x) > 0:
            out.append(int(x))
        else:
            raise ValueError(f"bond caps are positive integers or 'lossless', got {x!r}")
    return out


def grid(recipe: StudyRecipe, *, tasks: Sequence[str], variants: Sequence[str], ms: Sequence[int],
         seeds: Sequence[int], passthrough: Sequence[str], bonds: Sequence[int | None] = (None,),
         seeds_for: Callable[[int, int | None], Sequence[int]] | None = None,
         conversions: Sequence[str] = ("tt-svd",)) -> list[StudyRun]:
    """Every (task, variant, m, bond cap, conversion, seed), in that nesting order; run
    ``<task>-<variant>-m<m>[-b<bond>][-<conversion>]-s<seed>`` (no ``-b`` part for lossless
    bonds, no conversion part for ``tt-svd``, so the runs of other studies and of earlier
    versions of this one are reused; lossless bonds have one conversion, ``tt-svd``, exact).
    ``tasks`` is ignored when the recipe has its own :attr:`StudyRecipe.task`; ``seeds_for(m,
    bond)``, when given, overrides ``seeds`` per point. The variant ``truncated`` always names its
    conversion (it has no default one)."""
    runs = []
    for task in ([recipe.task] if recipe.task else tasks):
        for variant in variants:
            for m in ms:
                for bond in bonds:
                    for conversion in (conversions if bond is not None else ("tt-svd",)):
                        for seed in (seeds_for(m, bond) if seeds_for else seeds):
                            argv = ([] if recipe.task else ["--task", task]) + [
                                "--variant", variant, "--m", str(m), "--seed", str(seed), *passthrough]
                            labels = {"task": task, "variant": variant, "m": m, "seed": seed}
                            name = f"{task}-{variant}-m{m}"
                            if bond is not None:
                                argv += ["--max-bond", str(bond)]
                                name += f"-b{bond}"
                            if conversion != "tt-svd" or variant == "truncated":
                                argv += ["--conversion", conversion]
                                name += f"-{conversion}"
                            labels["max_bond"] = bond_label(bond)
                            labels["conversion"] = conversion
                            runs.append(StudyRun(f"{name}-s{seed}", argv, labels))
    return runs


class RunClaim:
    """An exclusive claim on one run, so several copies of the same study command (started side by
    side, e.g. one single-threaded process per core) share its runs instead of repeating them.

    The claim is an exclusive ``flock`` on ``<runs_dir>/<name>.claim``: the kernel releases it
    when the holder exits or dies, so a crashed process's runs are taken over by the next process
    that tries, and two live processes can never hold the same run. The file itself stays (its
    presence means nothing; it notes the last holder's host and pid). Processes must share the
    filesystem's locks (one machine, a local disk).
    """

    def __init__(self, runs_dir: Path, name: str):
        self.path = runs_dir / f"{name}.claim"
        self._fd: int | None = None

    def acquire(self) -> bool:
        """True if this process now holds the run; False if another live process does."""
        import fcntl

        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None


#: recipe options that do not change what a run computes: where it writes its output, how much
#: it prints, how many threads it uses (its timings, not its numbers)
IGNORED_OPTIONS = ("--output-dir", "--quiet", "--threads", "--save-model")
#: data locations (:data:`run_io.DATA_PATH_OPTIONS`) are compared by file or folder name, so the
#: same data elsewhere (another checkout's ``../shared/data``) reuses a run, and by content where
#: the run recorded it (``data_sha256``), so other data under the same name does not


class StudyError(RecipeError):
    """A finished run in the study's folder cannot be reused for this study."""


def option_values(argv: Sequence[str]) -> dict[str, tuple[str | int | float, ...]]:
    """``['--lr', '5e-5', '--quiet']`` -> ``{'--lr': (5e-05,), '--quiet': ()}``: numbers as
    numbers, :data:`DATA_PATH_OPTIONS` by name, the values of a repeated option joined in order,
    without :data:`IGNORED_OPTIONS`."""
    out: dict[str, tuple[str, ...]] = {}
    key = None
    for token in argv:
        if token.startswith("--"):
            key, _, inline = token.partition("=")
            out.setdefault(key, ())
            if inline:
                out[key] += (inline,)
        elif key is not None:
            out[key] += (token,)
        else:
            raise StudyError(f"cannot read recipe arguments {list(argv)}: {token!r} precedes every option")
    return {k: tuple(Path(x).name if k in DATA_PATH_OPTIONS else _canonical(x) for x in v)
            for k, v in out.items() if k not in IGNORED_OPTIONS}


def _canonical(value: str) -> str | int | float:
    """An integer as an int, another number as a float (``5e-5`` and ``5e-05`` are the same
    learning rate; NaN stays text, since NaN != NaN), else the text."""
    for kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            continue
        return value if number != number else number
    return value


def check_reusable(run: StudyRun, result: dict, path: Path, only_given: bool = False) -> None:
    """Raise :class:`StudyError` when the finished run at ``path`` was made with other recipe
    options than ``run`` asks for (so a changed option never silently reuses an old run). Options
    in :data:`IGNORED_OPTIONS` and the order of options do not count; a result without ``argv``
    (not written by a recipe) is not checked. This compares command lines: a run made before a
    recipe's default or code changed is still reused. ``only_given`` (summarizing finished runs,
    ``--existing-only``): options ``run`` does not give are not compared. Data options must also
    name data of the same content (:func:`_check_same_data`)."""
    stored = result.get("argv")
    if stored is None:
        return
    have, want = option_values(stored), option_values(run.argv)
    if only_given:
        have = {k: v for k, v in have.items() if k in want}
    if have != want:
        def show(opts, k):
            return " ".join(map(str, opts[k])) if k in opts else "(absent)"
        diff = [f"{k}: {show(have, k)} there, {show(want, k)} here"
                for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
        raise StudyError(
            f"{path} was made with other options than run {run.name!r} asks for ({'; '.join(diff)}). "
            f"Delete {path.parent} to rerun it, or give this study another --output-dir")
    _check_same_data(run, result, path)


def _check_same_data(run: StudyRun, result: dict, path: Path) -> None:
    """Every data file the run at ``path`` recorded (``data_sha256``) must have the same content
    now. Runs without the record (made before it existed) are compared by name only; data not
    present here cannot be checked (summarizing copied results)."""
    stored = result.get("data_sha256")
    if not stored:
        return
    for option, now in data_fingerprint(run.argv).items():
        if option not in stored:
            continue
        changed = sorted(rel or "(the file)" for rel, digest in stored[option].items() if now.get(rel) != digest)
        if changed:
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            raise StudyError(
                f"{path} was made on other data than run {run.name!r} reads: {option} {shown}: content "
                f"differs or is missing here. Delete {path.parent} to rerun it, or give this study another "
                "--output-dir")


def run_study(main: Callable[[list[str]], dict], runs: Sequence[StudyRun], runs_dir: Path,
              existing_only: bool = False, wait: bool = False,
              poll_seconds: float = 30.0) -> list[tuple[StudyRun, dict]]:
    """Run each run whose ``runs_dir/<name>/results.json`` does not exist yet (so an interrupted
    study resumes) by calling ``main(argv + ['--output-dir', ...])``; return ``(run, result)``
    for the finished ones, in order. With ``existing_only``, missing runs are skipped instead.
    A finished run is reused only if it was made with the same options (:func:`check_reusable`;
    with ``existing_only``, the same values of the options given).

    Runs are claimed (:class:`RunClaim`), so the same command started N times side by side
    works through the runs in parallel; a run another live process holds is skipped here, or,
    with ``wait``, awaited at the end (and run here if its holder dies without finishing it), so
    the returned list is complete.
    """
    done: dict[str, tuple[StudyRun, dict]] = {}
    pending = _run_all(main, runs, runs_dir, existing_only, done)
    while wait and pending:
        time.sleep(poll_seconds)
        pending = _run_all(main, pending, runs_dir, existing_only, done, quiet=True)
    return [done[r.name] for r in runs if r.name in done]


def _run_all(main, runs, runs_dir: Path, existing_only: bool, done: dict, quiet: bool = False) -> list[StudyRun]:
    """Run or reuse each run into ``done``; returns the runs other live processes hold."""
    held_elsewhere = []
    for i, run in enumerate(runs):
        path = runs_dir / run.name / "results.json"
        step = f"[{i + 1}/{len(runs)}] {run.name}:"
        ran_here = False
        if path.is_file():
            if not quiet:
                print(f"{step} done earlier, reusing {path}", flush=True)
        elif existing_only:
            print(f"{step} not run, skipped (--existing-only)", flush=True)
            continue
        else:
            claim = RunClaim(runs_dir, run.name)
            if not claim.acquire():
                if not quiet:
                    print(f"{step} running in another process ({claim.path}), skipped", flush=True)
                held_elsewhere.append(run)
                continue
            try:
                if not path.is_file():  # finished by another process between our check and claim
                    print(f"{step} python recipes/... {' '.join(run.argv)}", flush=True)
                    main(run.argv + ["--output-dir", str(runs_dir / run.name)])
                    ran_here = True
            finally:
                claim.release()
        result = json.loads(path.read_text())
        if not ran_here:  # a run made earlier or elsewhere: only with the same options
            check_reusable(run, result, path, only_given=existing_only)
        result["run"] = run.name
        done[run.name] = (run, result)
    return held_elsewhere


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


#: the options a study sets per run (its labels); every other option is a setting its runs share
LABEL_OPTIONS = ("--task", "--variant", "--m", "--max-bond", "--seed", "--conversion")


def run_settings(result: dict) -> dict:
    """The recipe options of a finished run other than :data:`LABEL_OPTIONS` (and
    :data:`IGNORED_OPTIONS`), as :func:`option_values` reads them; ``{}`` without ``argv``."""
    return {k: v for k, v in option_values(result.get("argv") or []).items() if k not in LABEL_OPTIONS}


def check_same_settings(results: Sequence[dict], what: str) -> None:
    """Raise :class:`StudyError` when runs to be averaged together (``what`` names them) were made
    with different settings (e.g. seed 1 at one learning rate, seed 2 at another)."""
    reference = None
    for r in results:
        if r.get("argv") is None:
            continue
        settings = run_settings(r)
        if reference is None:
            reference = (r, settings)
        elif settings != reference[1]:
            first, have = reference
            diff = [f"{k}: {' '.join(map(str, have.get(k, ('(absent)',))))} in {first.get('run', '?')}, "
                    f"{' '.join(map(str, settings.get(k, ('(absent)',))))} in {r.get('run', '?')}"
                    for k in sorted(set(have) | set(settings)) if have.get(k) != settings.get(k)]
            raise StudyError(f"{what}: runs made with different settings cannot be averaged ({'; '.join(diff)}); "
                             "rerun the odd ones out with the study's settings, or move them to another --output-dir")


def summarize(recipe: StudyRecipe, results: Sequence[dict], group_keys: Sequence[str]) -> list[dict]:
    """One row per group (same values under ``group_keys``; its runs must share every other
    setting, :func:`check_same_settings`), in order of first appearance:
    ``<headline>_mean``/``_std`` over the group's runs (seeds), ``seeds`` (runs), the first run's
    parameter counts, ``train_seconds_mean``, ``seconds_per_step_mean`` (wall) and
    ``cpu_seconds_per_step_mean`` (process CPU time, when every run recorded it at one thread count) and ``<metric>_mean`` for every other metric of
    :attr:`StudyRecipe.metrics` that all the group's runs have (e.g. ``rte_accuracy_mean``)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r[k] for k in group_keys), []).append(r)
    rows = []
    for key, rs in groups.items():
        check_same_settings(rs, "group " + ", ".join(f"{k}={v}" for k, v in zip(group_keys, key)))
        metrics = [recipe.metrics(r) for r in rs]
        m, s = mean_std([x[recipe.headline] for x in metrics])
        row = dict(zip(group_keys, key))
        row.update({f"{recipe.headline}_mean": m, f"{recipe.headline}_std": s, "seeds": len(rs),
                    "total_params": rs[0]["total_params"],
                    "active_params_per_token": rs[0]["active_params_per_token"],
                    "train_seconds_mean": sum(r["train_seconds"] for r in rs) / len(rs)})
        if "per_expert_params" in rs[0]:
            row["per_expert_params"] = rs[0]["per_expert_params"]
        steps = [r["seconds_per_step"] for r in rs if "seconds_per_step" in r]
        if steps:
            row["seconds_per_step_mean"] = sum(steps) / len(steps)
        cpu = [r["cpu_seconds_per_step"] for r in rs if "cpu_seconds_per_step" in r]
        # runs from before it was recorded have wall time only; CPU time at different thread counts
        # is not comparable
        if cpu and len(cpu) == len(rs) and len({r.get("threads") for r in rs}) == 1:
            row["cpu_seconds_per_step_mean"] = sum(cpu) / len(cpu)
        errors = [r["conversion_error"]["mean"] for r in rs if r.get("conversion_error")]
        if errors:
            row["conversion_error"] = errors[0]  # the same decomposition for every seed
        output_errors = [r["conversion_output_error"] for r in rs if r.get("conversion_output_error")]
        if output_errors:  # on the calibration inputs, where the conversion used them
            row["conversion_output_error"] = output_errors[0]["mean"]
            if "tt_svd_mean" in output_errors[0]:
                row["tt_svd_output_error"] = output_errors[0]["tt_svd_mean"]
        for name in metrics[0]:
            if name != recipe.headline and all(name in x for x in metrics):
                row[f"{name}_mean"] = sum(x[name] for x in metrics) / len(metrics)
        rows.append(row)
    return rows


# --- output -------------------------------------------------------------------------------------
def plot(rows: list[dict], recipe: StudyRecipe, label_key: str | Callable[[dict], str], path: Path,
         panel_key: str | None = None, title: str = "") -> None:
    """Headline metric (mean, error bar = std) against total parameters (millions), one point
    per row labelled by ``row[label_key]`` (or ``label_key(row)``), one panel per value of ``row[panel_key]``."""
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
            text = label_key(r) if callable(label_key) else str(r[label_key])
            ax.annotate(text, (r["total_params"] / 1e6, r[f"{metric}_mean"]),
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


def pareto_front(points: Sequence[tuple[float, float]], lower_is_better: bool) -> list[int]:
    """Indices of the points ``(cost, quality)`` no other point beats on both (cost no higher,
    quality no worse, one of them strictly), ordered by cost."""
    sign = -1.0 if lower_is_better else 1.0
    front = []
    for i, (c, q) in enumerate(points):
        dominated = any((c2 <= c and sign * q2 >= sign * q) and (c2 < c or sign * q2 > sign * q)
                        for j, (c2, q2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto_plot(rows: list[dict], recipe: StudyRecipe, path: Path, *, label: Callable[[dict], str],
                title: str = "", is_reference: Callable[[dict], bool] | None = None) -> None:
    """Quality (headline mean, error bar = std over seeds) against total parameters (millions),
    every row labelled ``label(row)``, the Pareto front joined by a line; rows for which
    ``is_reference(row)`` (e.g. a dense baseline) are drawn as orange squares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = recipe.headline
    pts = [(r["total_params"] / 1e6, r[f"{metric}_mean"]) for r in rows]
    front = pareto_front(pts, recipe.lower_is_better)
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for r, (x, y) in zip(rows, pts):
        ref = is_reference is not None and is_reference(r)
        ax.errorbar(x, y, yerr=r[f"{metric}_std"] or None, fmt="s" if ref else "o", capsize=3,
                    color="tab:orange" if ref else "tab:blue", alpha=0.9 if r.get("seeds", 1) > 1 else 0.6)
        ax.annotate(label(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "-", color="tab:red", alpha=0.6,
            label="Pareto front")
    ax.set_xlabel("total parameters (M)")
    ax.set_ylabel(metric.replace("_", " ") + (" (lower is better)" if recipe.lower_is_better else ""))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_row(result: dict) -> dict:
    """A run's result without its bulky parts (training history, samples, per-example test
    outputs), for the ``<name>_runs`` table; the full record stays in the run's ``results.json``."""
    row = {k: v for k, v in result.items() if k not in ("history", "samples")}
    if isinstance(row.get("test"), dict) and "examples" in row["test"]:
        row["test"] = {k: v for k, v in row["test"].items() if k != "examples"}
    return row


def write_study(recipe: StudyRecipe, results: list[dict], rows: list[dict], out: Path, name: str,
                label_key: str, panel_key: str | None, title: str) -> None:
    """``name.{json,csv}`` (summary rows), ``<name>_runs.{json,csv}`` (every run), ``name.png``."""
    write_rows(rows, out / name)
    write_rows([run_row(r) for r in results], out / f"{name}_runs")
    plot(rows, recipe, label_key, out / f"{name}.png", panel_key=panel_key, title=title)
    for row in rows:
        print(row)


def conduct_study(recipe: StudyRecipe, runs: Sequence[StudyRun], out: Path, *, group_keys: Sequence[str],
                  name: str, label_key: str, panel_key: str | None, title: str,
                  existing_only: bool = False, wait: bool = False) -> list[dict]:
    """Run (or reuse, under ``out/runs``) every run, label each result with its run's
    ``group_keys`` labels, summarize, write the study's files; returns the summary rows."""
    results = []
    for run, result in run_study(recipe.main, runs, out / "runs", existing_only=existing_only, wait=wait):
        result.update({k: run.labels[k] for k in group_keys})
        results.append(result)
    if not results:  # only possible with --existing-only: every run was skipped
        raise StudyError(f"no finished run of this study under {out / 'runs'} (--existing-only summarizes "
                         "runs that exist; run the study without it first, or check --output-dir)")
    rows = summarize(recipe, results, group_keys)
    write_study(recipe, results, rows, out, name, label_key, panel_key, title)
    return rows
