"""Factorization study (MPOE Table 4, extended): MPOE with m = 3, 5, 7, 9 local tensors and
bond caps (lossless, 256, 64, 16, ...). Uses the paper's factorizations for 768/3072 and
balanced ones for other sizes. For every (m, bond cap) point it records total and per-expert
parameters, the relative error of the MPO experts against the pretrained matrices at conversion,
the task metric after fine-tuning (mean and std over seeds) and the training step time; writes
``<output-dir>/factorization.{json,csv}``, ``factorization_runs.{json,csv}``,
``factorization.png`` (metric vs parameters) and ``factorization_pareto.png`` (the same with the
Pareto front and ``m/bond`` labels).

    python recipes/factorization_study.py --recipe gpt2 --ms 3,5,7,9 --max-bonds lossless,256,64,16 \\
        --seeds 42 --core-seeds 42,43,44 --output-dir results/gpt2 \\
        -- --model runs/base/model --train-file wikitext-2/valid.txt --test-file wikitext-2/test.txt

``--core-seeds`` (default: ``--seeds``) are the seeds of the m = ``--core-m`` column and the
lossless row; every other point runs ``--seeds``. ``--baseline dense`` adds a reference row: that
variant trained with the same recipe arguments on the core seeds (run ``<task>-dense-m<core-m>-s<seed>``,
as an ablation names it, so an ablation's runs with the same arguments are reused); its row has
``variant`` set and no m or bond cap. Arguments after ``--`` go to the recipe unchanged. Runs already present (e.g. from ``ablations.py`` with the same output folder) are
reused, and the same command started several times side by side shares the runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registry import STUDY_RECIPES, study_recipe  # noqa: E402
from run_io import run_main  # noqa: E402
from studies import (StudyError, conduct_study, grid, int_list, parse_bonds, parse_study_args,  # noqa: E402
                     pareto_plot, study_parser)
from variants import VARIANTS  # noqa: E402


def point_label(row: dict) -> str:
    """``'5/64'``: m and bond cap of a summary row (``'5/64 da'`` for a data-aware conversion,
    ``'trunc 5/64 whitened-svd'`` for a truncated dense model); the variant's name for a baseline row."""
    if row.get("m") is None:
        return str(row["variant"])
    label = f"{row['m']}/{row['max_bond']}"
    if row.get("variant") == "truncated":
        return f"trunc {label} {row.get('conversion')}"
    return label + {"data-aware": " da", "data-aware-sequential": " da-seq"}.get(row.get("conversion"), "")


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the study; returns its summary rows (one per m and bond cap)."""
    ap = study_parser(__doc__, STUDY_RECIPES)
    ap.add_argument("--ms", default="3,5,7,9")
    ap.add_argument("--max-bonds", default="lossless", help="comma-separated bond caps, 'lossless' for none")
    ap.add_argument("--core-seeds", default=None, help="seeds of the --core-m column and the lossless row")
    ap.add_argument("--core-m", type=int, default=5)
    ap.add_argument("--variant", default="mpoe", choices=sorted(VARIANTS))
    ap.add_argument("--task", default="rte", help="GLUE task (ignored for gpt2)")
    ap.add_argument("--baseline", default=None, choices=sorted(VARIANTS),
                    help="also train this variant (e.g. dense) on the core seeds as a reference row")
    ap.add_argument("--conversions", default="tt-svd",
                    help="comma-separated: how truncated points start (tt-svd, data-aware); each truncated "
                         "point runs once per conversion (lossless points: tt-svd, exact)")
    ap.add_argument("--truncated", default=None,
                    help="comma-separated conversions (tt-svd, data-aware, svd, whitened-svd): also train the "
                         "unconverted model with its FFN matrices truncated that way at each capped bond of "
                         "--core-m (variant 'truncated')")
    ap.add_argument("--truncated-seeds", default=None, help="seeds of the --truncated rows (default: the core seeds)")
    args, passthrough = parse_study_args(ap, argv)
    recipe = study_recipe(args.recipe)
    seeds = int_list(args.seeds)
    core = int_list(args.core_seeds) if args.core_seeds else seeds
    bonds = parse_bonds(args.max_bonds)
    runs = grid(recipe, tasks=[args.task], variants=[args.variant], ms=int_list(args.ms),
                bonds=bonds, seeds=seeds, passthrough=passthrough, conversions=args.conversions.split(","),
                seeds_for=lambda m, bond: core if (m == args.core_m or bond is None) else seeds)
    if args.truncated:
        capped = [b for b in bonds if b is not None]
        if not capped:
            raise StudyError("--truncated needs capped --max-bonds (a truncation at lossless bonds is the model itself)")
        runs += grid(recipe, tasks=[args.task], variants=["truncated"], ms=[args.core_m], bonds=capped,
                     seeds=int_list(args.truncated_seeds) if args.truncated_seeds else core,
                     passthrough=passthrough, conversions=args.truncated.split(","))
    if args.baseline is not None:
        if args.baseline == args.variant:
            raise StudyError(f"--baseline {args.baseline} is the study's own --variant; pick another (e.g. dense)")
        reference = grid(recipe, tasks=[args.task], variants=[args.baseline], ms=[args.core_m], seeds=core,
                         passthrough=passthrough)
        for run in reference:
            run.labels.update(m=None, max_bond=None)  # not a point of the m x bond grid
        runs = reference + runs
    title = f"{args.recipe}: MPOE with m local tensors and capped bonds"
    out = Path(args.output_dir)
    rows = conduct_study(recipe, runs, out, group_keys=("task", "variant", "m", "max_bond", "conversion"), name="factorization",
                         label_key=point_label, panel_key=None, existing_only=args.existing_only, wait=args.wait, title=title)
    if rows:
        pareto_plot(rows, recipe, out / "factorization_pareto.png", label=point_label,
                    title=title + " (labels m/bond)", is_reference=lambda row: row.get("m") is None)
    return rows


if __name__ == "__main__":
    run_main(main)
