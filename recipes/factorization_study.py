"""Factorization study (MPOE Table 4): MPOE with m = 3, 5, 7, 9 local tensors. Uses the
paper's factorizations for 768/3072 and balanced ones for other sizes; writes
``<output-dir>/factorization.{json,csv}``, ``factorization_runs.{json,csv}`` and ``factorization.png``.

    python recipes/factorization_study.py --recipe gpt2 --ms 3,5,7,9 --output-dir results/gpt2 \\
        -- --model runs/base/model --train-file wikitext-2/valid.txt --test-file wikitext-2/test.txt

Arguments after ``--`` go to the recipe unchanged. Runs already present (e.g. from
``ablations.py`` with the same output folder) are reused.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registry import STUDY_RECIPES, study_recipe  # noqa: E402
from run_io import run_main  # noqa: E402
from studies import conduct_study, grid, int_list, parse_study_args, study_parser  # noqa: E402
from variants import VARIANTS  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the study; returns its summary rows (one per m)."""
    ap = study_parser(__doc__, STUDY_RECIPES)
    ap.add_argument("--ms", default="3,5,7,9")
    ap.add_argument("--variant", default="mpoe", choices=sorted(VARIANTS))
    ap.add_argument("--task", default="rte", help="GLUE task (ignored for gpt2)")
    args, passthrough = parse_study_args(ap, argv)
    recipe = study_recipe(args.recipe)
    runs = grid(recipe, tasks=[args.task], variants=[args.variant], ms=int_list(args.ms),
                seeds=int_list(args.seeds), passthrough=passthrough)
    return conduct_study(recipe, runs, Path(args.output_dir), group_keys=("task", "m"), name="factorization",
                         label_key="m", panel_key=None, existing_only=args.existing_only,
                         title=f"{args.recipe}: MPOE with m local tensors")


if __name__ == "__main__":
    run_main(main)
