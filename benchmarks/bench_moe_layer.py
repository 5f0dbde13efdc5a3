"""One MoE FFN layer at GPT-2 size (768/3072, 8 experts, top-1, 4096 tokens), forward+backward.

Ratios of medians from interleaved runs in one process, against tnmoe's dense-expert MoE:
  * tnmoe MPOE (lossless MPO experts, shared central tensor, Switch router), and the same
    with bonds capped at 64 (a compressed MPOE)
  * tnmoe dense-expert MoE (same router and dispatch, plain expert matrices)
  * HF ``SwitchTransformersSparseMLP`` with the same sizes (capacity large enough to drop nothing)
  * a dense FFN (768 -> 3072 -> 768), the cost floor of one expert processing all tokens

All layers route without dropping tokens so they do the same work.

    python benchmarks/bench_moe_layer.py [--tokens 4096] [--repeats 5] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from _timing import interleaved, write_report
from tnmoe.moe import DenseExpertBank, ExpertFFN, MoELayer, MPOExpertBank, SwitchRouter

D, DFF, E = 768, 3072, 8
F768, F3072 = [3, 4, 4, 4, 4], [4, 4, 8, 6, 4]


def tnmoe_layer(kind: str, max_bond: int | None = None) -> MoELayer:
    if kind == "mpo":
        up = MPOExpertBank(num_experts=E, in_factors=F768, out_factors=F3072, share="central", max_bond=max_bond)
        down = MPOExpertBank(num_experts=E, in_factors=F3072, out_factors=F768, share="central", max_bond=max_bond)
    else:
        up = DenseExpertBank(num_experts=E, in_features=D, out_features=DFF)
        down = DenseExpertBank(num_experts=E, in_features=DFF, out_features=D)
    experts = ExpertFFN(up=up, down=down, activation=nn.functional.gelu, up_bias=True, down_bias=True)
    router = SwitchRouter(d_model=D, num_experts=E, drop_tokens=False)
    return MoELayer(router=router, experts=experts)


def hf_switch_layer(tokens: int):
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    cfg = SwitchTransformersConfig(d_model=D, d_ff=DFF, num_experts=E, expert_capacity=tokens,
                                   router_jitter_noise=0.0, dense_act_fn="gelu")
    return SwitchTransformersSparseMLP(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    layers = {
        "tnmoe_mpoe": tnmoe_layer("mpo").to(dev).train(),
        "tnmoe_mpoe_bond64": tnmoe_layer("mpo", max_bond=64).to(dev).train(),
        "tnmoe_dense_moe": tnmoe_layer("dense").to(dev).train(),
        "hf_switch": hf_switch_layer(args.tokens).to(dev).train(),
        "dense_ffn": nn.Sequential(nn.Linear(D, DFF), nn.GELU(), nn.Linear(DFF, D)).to(dev).train(),
    }
    x = torch.randn(1, args.tokens, D, device=dev)

    def step(mod):
        def f():
            mod.zero_grad(set_to_none=True)
            out = mod(x)
            out = out[0] if isinstance(out, tuple) else out
            out.float().pow(2).mean().backward()
        return f

    t = interleaved({k: step(m) for k, m in layers.items()}, repeats=args.repeats, warmup=1, sync=sync)
    base = t["tnmoe_dense_moe"]
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in layers.items()}
    print(f"device={dev} torch={torch.__version__} threads={torch.get_num_threads()} tokens={args.tokens} "
          f"experts={E} top-1, forward+backward, median of {args.repeats} interleaved runs")
    rows = []
    for k in layers:
        rows.append({"layer": k, "median_s": t[k], "vs_tnmoe_dense_moe": t[k] / base, "vs_hf_switch": t[k] / t["hf_switch"],
                     "params": params[k]})
        print(f"{k:>16}: {t[k] / base:5.2f}x tnmoe dense-expert MoE | {t[k] / t['hf_switch']:5.2f}x HF Switch "
              f"| params {params[k] / 1e6:6.2f}M")
    write_report(args.json, device=dev, tokens=args.tokens, rows=rows)


if __name__ == "__main__":
    main()
