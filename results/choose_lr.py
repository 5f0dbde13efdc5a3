"""Pick each family's learning rate from the GLUE sweep (validation half only, never the test half).

Reads ``<sweep>/lr*/runs/*/results.json``; for each variant swept (one per family: ``dense`` for
dense/+Switch, ``mpoe`` for the MPOE variants) picks the learning rate with the best mean
``best_validation`` over the swept tasks and seeds. Writes ``<sweep>/chosen.json`` and prints the table.

    python results/choose_lr.py results/glue_minilm/sweep
"""

import json
import sys
from collections import defaultdict
from pathlib import Path


def main(sweep: Path) -> dict:
    scores: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(sweep.glob("lr*/runs/*/results.json")):
        r = json.loads(path.read_text())
        scores[r["variant"]][r["lr"]].append(r["best_validation"])
    if not scores:
        sys.exit(f"no finished sweep runs under {sweep}")
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
    return chosen


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/glue_minilm/sweep"))
