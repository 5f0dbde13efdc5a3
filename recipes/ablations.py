"""Ablations (MPOE Table 3): MPOE vs w/o parameter sharing (w/o PS) vs w/o gradient mask
(w/o GM) vs +MoE, and any other variants, over tasks and seeds. Runs the GLUE or GPT-2 recipe
once per (task, variant, seed), resumes interrupted studies, and writes
``<output-dir>/summary.{json,csv}``, ``summary_runs.{json,csv}`` and ``summary.png`` (metric vs parameters).

    python recipes/ablations.py --recipe bert --tasks rte,mrpc --seeds 1,2,3 --output-dir results/glue \\
        -- --data-dir ../shared/data/glue --epochs 3
    python recipes/ablations.py --recipe gpt2 --output-dir results/gpt2 -- --model runs/base/model \\
        --train-file wikitext-2/valid.txt --test-file wikitext-2/test.txt

Arguments after ``--`` go to the recipe unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    VARIANTS,
    RecipeError,
    run_main,
    run_study,
    split_passthrough,
    summarize,
    write_study,
)


def main(argv=None) -> list[dict]:
    own, passthrough = split_passthrough(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=["gpt2", "bert", "t5"], required=True)
    ap.add_argument("--variants", default="mpoe,mpoe-wo-ps,mpoe-wo-gm,moe")
    ap.add_argument("--tasks", default="rte", help="GLUE tasks (ignored for gpt2)")
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--m", type=int, default=5)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--existing-only", action="store_true",
                    help="run nothing new: summarize the runs already in --output-dir")
    args = ap.parse_args(own)
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise RecipeError(f"unknown variant {v!r}; known: {', '.join(sorted(VARIANTS))}")
    tasks = ["wikitext2"] if args.recipe == "gpt2" else args.tasks.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.output_dir)
    runs = []
    for task in tasks:
        for variant in variants:
            for seed in seeds:
                name = f"{task}-{variant}-m{args.m}-s{seed}"
                extra = [] if args.recipe == "gpt2" else ["--task", task]
                runs.append((name, extra + ["--variant", variant, "--m", str(args.m), "--seed", str(seed)]
                             + passthrough))
    results = run_study(args.recipe, runs, out / "runs", existing_only=args.existing_only)
    for r in results:
        r["task"] = r.get("tasks", ["wikitext2"])[0] if args.recipe != "gpt2" else "wikitext2"
    rows = summarize(args.recipe, results, ("task", "variant"))
    write_study(args.recipe, results, rows, out, "summary", "variant", "task",
                f"{args.recipe}: variants (up to {len(seeds)} seed(s))")
    return rows


if __name__ == "__main__":
    run_main(main)
