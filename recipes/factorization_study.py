"""Factorization study (MPOE Table 4): MPOE with m = 3, 5, 7, 9 local tensors. Uses the
paper's factorizations for 768/3072 and balanced ones for other sizes; writes
``<output-dir>/factorization.{json,csv}``, ``factorization_runs.{json,csv}`` and ``factorization.png``.

    python recipes/factorization_study.py --recipe gpt2 --ms 3,5,7,9 --output-dir results/gpt2 \\
        -- --model runs/base/model --train-file wikitext-2/valid.txt --test-file wikitext-2/test.txt

Arguments after ``--`` go to the recipe unchanged. Runs already present (e.g. from
``ablations.py`` with the same output folder) are reused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_main, run_study, split_passthrough, summarize, write_study  # noqa: E402


def main(argv=None) -> list[dict]:
    own, passthrough = split_passthrough(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=["gpt2", "bert", "t5"], required=True)
    ap.add_argument("--ms", default="3,5,7,9")
    ap.add_argument("--variant", default="mpoe")
    ap.add_argument("--task", default="rte", help="GLUE task (ignored for gpt2)")
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--output-dir", required=True)
    args = ap.parse_args(own)
    ms = [int(m) for m in args.ms.split(",")]
    task = "wikitext2" if args.recipe == "gpt2" else args.task
    out = Path(args.output_dir)
    runs = []
    for m in ms:
        for seed in [int(s) for s in args.seeds.split(",")]:
            extra = [] if args.recipe == "gpt2" else ["--task", task]
            runs.append((f"{task}-{args.variant}-m{m}-s{seed}",
                         extra + ["--variant", args.variant, "--m", str(m), "--seed", str(seed)] + passthrough))
    results = run_study(args.recipe, runs, out / "runs")
    for r, m in zip(results, [m for m in ms for _ in args.seeds.split(",")]):
        r["m"] = m
        r["task"] = task
    rows = summarize(args.recipe, results, ("task", "m"))
    write_study(args.recipe, results, rows, out, "factorization", "m", None,
                f"{args.recipe}: MPOE with m local tensors")
    return rows


if __name__ == "__main__":
    run_main(main)
