"""MPOLinear vs nn.Linear (and vs a naive rebuild) at 768 -> 3072 with 4096 tokens.

Prints ratios (candidate median / nn.Linear median, interleaved runs in one process) for
forward, forward+backward (training step) and eval with the weight cache, for a lossless MPO
and max_bond 64 / 16. "naive" rebuilds W every call with a fixed left-to-right tensordot chain.

    python benchmarks/bench_mpo_linear.py [--tokens 4096] [--repeats 9] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch import nn

from _timing import interleaved, write_report
from tnmoe.networks import MPOLinear

IN_FACTORS, OUT_FACTORS = [3, 4, 4, 4, 4], [4, 4, 8, 6, 4]


def naive_weight(cores):
    """Fixed left-to-right chain: ((G1 G2) G3) ... with tensordot, then permute to (out, in)."""
    acc = cores[0]  # (1, o1, i1, r1)
    for c in cores[1:]:
        acc = torch.tensordot(acc, c, dims=([acc.dim() - 1], [0]))
    m = len(cores)
    acc = acc.squeeze(0).squeeze(-1)  # (o1, i1, o2, i2, ...)
    acc = acc.permute(*range(0, 2 * m, 2), *range(1, 2 * m, 2))
    out = 1
    for c in cores:
        out *= c.shape[1]
    return acc.reshape(out, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="write the ratios to this JSON file")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    lin = nn.Linear(768, 3072, device=dev)
    x = torch.randn(args.tokens, 768, device=dev)
    rows = []
    print(f"device={dev} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"tokens={args.tokens} repeats={args.repeats} ({platform.processor() or platform.machine()})")
    for max_bond in (None, 64, 16):
        mpo = MPOLinear.from_linear(lin, in_factors=IN_FACTORS, out_factors=OUT_FACTORS, max_bond=max_bond)
        label = "lossless" if max_bond is None else f"max_bond={max_bond}"
        plan = mpo.explain(args.tokens)

        def train_step(mod):
            def f():
                mod.zero_grad(set_to_none=True)
                mod(x).sum().backward()
            return f

        def naive_train():
            mpo.zero_grad(set_to_none=True)
            W = naive_weight(list(mpo.cores))
            torch.nn.functional.linear(x, W, mpo.bias).sum().backward()

        def naive_fwd():
            with torch.no_grad():
                torch.nn.functional.linear(x, naive_weight(list(mpo.cores)), mpo.bias)

        def fwd(mod):
            def f():
                with torch.no_grad():
                    mod(x)
            return f

        mpo.train(); lin.train()
        t_train = interleaved({"linear": train_step(lin), "mpo": train_step(mpo), "naive": naive_train},
                              repeats=args.repeats, sync=sync)
        t_fwd = interleaved({"linear": fwd(lin), "mpo": fwd(mpo), "naive": naive_fwd},
                            repeats=args.repeats, sync=sync)
        mpo.eval()
        t_eval = interleaved({"linear": fwd(lin), "mpo": fwd(mpo)}, repeats=args.repeats, sync=sync)
        row = {
            "config": label,
            "bond_dims": mpo.bond_dims,
            "params": sum(p.numel() for p in mpo.parameters()),
            "plan_at_tokens": plan.mode,
            "forward_vs_linear": t_fwd["mpo"] / t_fwd["linear"],
            "train_step_vs_linear": t_train["mpo"] / t_train["linear"],
            "eval_cached_vs_linear": t_eval["mpo"] / t_eval["linear"],
            "forward_vs_naive": t_fwd["mpo"] / t_fwd["naive"],
            "train_step_vs_naive": t_train["mpo"] / t_train["naive"],
        }
        rows.append(row)
        print(f"{label:>13} plan={plan.mode:<11} fwd/linear={row['forward_vs_linear']:.2f}x  "
              f"train/linear={row['train_step_vs_linear']:.2f}x  eval(cached)/linear="
              f"{row['eval_cached_vs_linear']:.2f}x  fwd/naive={row['forward_vs_naive']:.2f}x  "
              f"train/naive={row['train_step_vs_naive']:.2f}x")
    rows += compare_tltorch(dev, sync, args.repeats)
    write_report(args.json, device=dev, tokens=args.tokens, rows=rows)


def compare_tltorch(dev, sync, repeats: int) -> list[dict]:
    """MPOLinear vs tensorly-torch's block-TT ``FactorizedLinear`` with the same factors and
    the same core shapes (rank 16 / 64), forward+backward, 64 and 4096 tokens; tltorch's faster
    implementation (``factorized`` or ``reconstructed``) is the baseline. Skipped when
    tensorly-torch is not installed (``pip install tensorly-torch``)."""
    try:
        import tltorch
    except ImportError:
        print("tensorly-torch not installed: skipping the FactorizedLinear comparison")
        return []
    from tnmoe.networks import MPO

    rows = []
    for rank in (16, 64):
        tl = {impl: tltorch.FactorizedLinear(in_tensorized_features=tuple(IN_FACTORS),
                                             out_tensorized_features=tuple(OUT_FACTORS), factorization="blocktt",
                                             rank=rank, implementation=impl).to(dev)
              for impl in ("factorized", "reconstructed")}
        cores = [f.detach().clone() for f in tl["factorized"].weight.factors]
        ours = MPOLinear.from_mpo(MPO(cores), torch.zeros(3072)).to(dev)
        lin = nn.Linear(768, 3072, device=dev)
        for tokens in (64, 4096):
            x = torch.randn(tokens, 768, device=dev)

            def step(mod):
                def f():
                    mod.zero_grad(set_to_none=True)
                    mod(x).sum().backward()
                return f

            t = interleaved({"linear": step(lin), "ours": step(ours), **{k: step(m) for k, m in tl.items()}},
                            repeats=repeats, sync=sync)
            best = min(("factorized", "reconstructed"), key=lambda k: t[k])
            row = {"config": f"vs tltorch blocktt rank={rank}", "tokens": tokens, "bond_dims": ours.bond_dims,
                   "ours_vs_linear": t["ours"] / t["linear"], "tltorch_vs_linear": t[best] / t["linear"],
                   "tltorch_impl": best, "ours_vs_tltorch": t["ours"] / t[best]}
            rows.append(row)
            print(f"rank {rank:>2}, {tokens:>4} tokens, fwd+bwd: ours {row['ours_vs_linear']:.2f}x nn.Linear, "
                  f"tltorch ({best}) {row['tltorch_vs_linear']:.2f}x -> ours/tltorch {row['ours_vs_tltorch']:.2f}x")
    return rows


if __name__ == "__main__":
    main()
