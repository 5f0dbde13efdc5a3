"""Pick each family's learning rate from the GLUE sweep (validation half only, never the test half).

Reads ``<sweep>/lr*/runs/*/results.json``; for each variant swept (one per family: ``dense`` for
dense/+Switch, ``mpoe`` for the MPOE variants) picks the learning rate with the best mean
``best_validation`` over the swept tasks and seeds. Writes ``<sweep>/chosen.json`` and prints the table.
With ``--reuse-in GRID``, the sweep runs at the chosen rates are copied into ``GRID/runs/`` (when
missing there): they are the grid's runs for their task and seed.

    python results/choose_lr.py results/glue_minilm/sweep [--reuse-in results/glue_minilm]
"""

import argparse
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path


def main(sweep: Path, reuse_in: Path | None = None, expect: int | None = None,
         families: tuple[str, ...] = ("dense", "mpoe")) -> dict:
    scores: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    run_dirs: dict[tuple[str, float], list[Path]] = defaultdict(list)
    for path in sorted(sweep.glob("lr*/runs/*/results.json")):
        if path.parent.name.startswith("."):  # a killed run's temporary folder, not a finished run
            continue
        r = json.loads(path.read_text())
        scores[r["variant"]][r["lr"]].append(r["best_validation"])
        run_dirs[(r["variant"], r["lr"])].append(path.parent)
    if not scores:
        sys.exit(f"no finished sweep runs under {sweep}")
    scores = dict(scores)
    missing = {v: len(scores.get(v, {})) for v in set(scores) | set(families or ())
               if expect is not None and len(scores.get(v, {})) != expect}
    if missing:
        sys.exit(f"incomplete sweep under {sweep}: learning rates finished per variant {missing}, expected {expect}")
    chosen = {}
    print("| family | lr | runs | validation (mean) |\n|---|---|---|---|")
    for variant, by_lr in sorted(scores.items()):
        means = {lr: sum(v) / len(v) for lr, v in by_lr.items()}
        chosen[variant] = max(means, key=means.get)
        for lr in sorted(means):
            mark = " (chosen)" if lr == chosen[variant] else ""
            print(f"| {variant} | {lr:g}{mark} | {len(by_lr[lr])} | {means[lr]:.4f} |")
    (sweep / "chosen.json").write_text(json.dumps({"lr": chosen, "validation": {
        v: {str(lr): sum(x) / len(x) for lr, x in by_lr.items()} for v, by_lr in scores.items()}}, indent=2))
    if reuse_in is not None:
        for variant, lr in chosen.items():
            for src in run_dirs[(variant, lr)]:
                dst = reuse_in / "runs" / src.name
                if (dst / "results.json").is_file():
                    have = json.loads((dst / "results.json").read_text())["lr"]
                    if have != lr:
                        sys.exit(f"{dst} was trained at lr {have:g}, not the chosen {lr:g}: move it away and rerun")
                elif not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copytree(src, dst)
                    print(f"reused {src} as {dst}")
    return chosen


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", nargs="?", default="results/glue_minilm/sweep", type=Path)
    ap.add_argument("--reuse-in", type=Path, default=None)
    ap.add_argument("--expect", type=int, default=None, help="learning rates every variant must have finished")
    args = ap.parse_args()
    main(args.sweep, args.reuse_in, args.expect)
