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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registry import STUDY_RECIPES, study_recipe  # noqa: E402
from run_io import run_main  # noqa: E402
from studies import conduct_study, grid, int_list, parse_study_args, study_parser  # noqa: E402
from variants import parse_variants  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the study; returns its summary rows (one per task and variant)."""
    ap = study_parser(__doc__, STUDY_RECIPES)
    ap.add_argument("--variants", default="mpoe,mpoe-wo-ps,mpoe-wo-gm,moe")
    ap.add_argument("--tasks", default="rte", help="GLUE tasks (ignored for gpt2)")
    ap.add_argument("--m", type=int, default=5)
    args, passthrough = parse_study_args(ap, argv)
    variants = parse_variants(args.variants)
    recipe = study_recipe(args.recipe)
    seeds = int_list(args.seeds)
    runs = grid(recipe, tasks=args.tasks.split(","), variants=variants, ms=[args.m], seeds=seeds,
                passthrough=passthrough)
    return conduct_study(recipe, runs, Path(args.output_dir), group_keys=("task", "variant"), name="summary",
                         label_key="variant", panel_key="task", existing_only=args.existing_only, wait=args.wait,
                         title=f"{args.recipe}: variants (up to {len(seeds)} seed(s))")


if __name__ == "__main__":
    run_main(main)
