"""One MoE FFN layer at GPT-2/T5 size (768/3072, 8 experts, top-1), one training step.

One timed step = ``--accumulate K`` micro-batches of ``--tokens N`` tokens (forward+backward
each) plus what happens once per optimizer step; the gradient mask draws before the step
(``--p-b P``: with probability P the shared central cores get no gradient at all). Ratios of
medians from interleaved runs in one process:

  * ``tnmoe_mpoe``: lossless MPO experts sharing the central tensor (MPOE), Switch router;
    reconstruction amortized over the K micro-batches (``accumulate_reconstruction``)
  * ``tnmoe_mpoe_bond64``: the same with bonds capped at ``--max-bond`` (default 64)
  * ``tnmoe_dense_moe``: the same router and dispatch with plain expert matrices
  * ``hf_switch``: HF ``SwitchTransformersSparseMLP`` (capacity large enough to drop nothing)
  * ``dense_ffn``: one dense FFN over all tokens
  * ``tnmoe_mpoe_masked``: lossless MPOE on a step the gradient mask skips (``p_b = 1``: the
    central cores get no gradient), timed in the same run; ``vs_unmasked`` = its time over
    ``tnmoe_mpoe``'s (meaningful with the default ``--p-b 0``)
  * ``*_eval_cached``: eval-mode forward (no grad) of MPOE with its weight cache (which
    checks the cores' version counters and counted writes on every call) and of the dense-expert MoE

``vs_gemm_floor`` (dense-expert rows): the time over the expert matmuls' FLOPs alone at that
GEMM rate, the floor of any dense-expert layer.

``vs_flop_floor``: the layer's time over its floor = the dense-expert MoE's step time plus
3x the layer's reconstruction FLOPs per step (forward + backward) at the GEMM rate measured in
this run (a ``(3072, 768) x (768, N/8)`` matmul, an expert's own GEMM).

``--allocator retain`` (the default) runs the whole process under
:func:`tnmoe.retain_freed_cpu_memory` (freed memory is reused without page faults), which
every layer gets alike; ``--allocator default`` leaves the C library's behaviour.

    python benchmarks/bench_moe_layer.py --tokens N [--accumulate K] [--p-b P] [--max-bond B]
                                         [--device cpu|cuda] [--dtype float32|bfloat16]
                                         [--allocator retain|default] [--json F]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from _timing import interleaved, write_report
from tnmoe import retain_freed_cpu_memory
from tnmoe.moe import DenseExpertBank, ExpertFFN, GradientMask, MoELayer, MPOExpertBank, SwitchRouter
from tnmoe.networks import accumulate_reconstruction, mpo_core_shapes
from tnmoe.networks.chain import chain_plan

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


# a masked step skips the central core's gradient: for the lossless chain L @ (C @ R) that is one
# (r B, r') x (r', D) GEMM of the forward's 1.359 GMAC, i.e. 0.906 / 1.359 = 2/3 of a forward
MASKED_SAVING = 2.0 / 3.0


def reconstruction_flops(max_bond: int | None) -> float:
    """FLOPs of rebuilding every expert's up and down matrices once (the chain path)."""
    up = chain_plan(tuple(mpo_core_shapes(F768, F3072, max_bond))).flops
    down = chain_plan(tuple(mpo_core_shapes(F3072, F768, max_bond))).flops
    return E * (up + down)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch")
    ap.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--p-b", type=float, default=0.0, help="gradient-mask probability for the MPOE layers")
    ap.add_argument("--max-bond", type=int, default=64, help="bond cap of the tnmoe_mpoe_bond row")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed rounds first: with retained memory the first 2 steps of a layer still "
                         "grow the heap (page faults); later steps, like a long training run's, take none")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="bfloat16: autocast (weights stay float32)")
    ap.add_argument("--allocator", default="retain", choices=["retain", "default"],
                    help="retain: tnmoe.retain_freed_cpu_memory() for the whole run (every layer); "
                         "default: the C library's own behaviour")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    retained = retain_freed_cpu_memory() if args.allocator == "retain" else False
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    torch.manual_seed(0)
    bond_row = f"tnmoe_mpoe_bond{args.max_bond}"
    layers = {
        "tnmoe_mpoe": tnmoe_layer("mpo").to(dev).train(),
        bond_row: tnmoe_layer("mpo", max_bond=args.max_bond).to(dev).train(),
        "tnmoe_dense_moe": tnmoe_layer("dense").to(dev).train(),
        "hf_switch": hf_switch_layer(args.tokens).to(dev).train(),
        "dense_ffn": nn.Sequential(nn.Linear(D, DFF), nn.GELU(), nn.Linear(DFF, D)).to(dev).train(),
        "tnmoe_mpoe_masked": tnmoe_layer("mpo").to(dev).train(),
    }
    masks = {k: GradientMask(layers[k], p_b=args.p_b, seed=0) for k in ("tnmoe_mpoe", bond_row)}
    masks["tnmoe_mpoe_masked"] = GradientMask(layers["tnmoe_mpoe_masked"], p_b=1.0, seed=0)
    xs = [torch.randn(1, args.tokens, D, device=dev) for _ in range(args.accumulate)]

    def step(name, mod):
        mask = masks.get(name)

        def micro(x):
            with autocast:
                out = mod(x)
            out = out[0] if isinstance(out, tuple) else out
            (out.float().pow(2).mean() / len(xs)).backward()

        def f():
            mod.zero_grad(set_to_none=True)
            if mask is not None:
                mask.begin_step()  # draw before the forward: masked tensors get no gradient
            for i, x in enumerate(xs):
                if isinstance(mod, MoELayer) and len(xs) > 1:
                    with accumulate_reconstruction(mod, last=i == len(xs) - 1):
                        micro(x)
                else:
                    micro(x)
            if mask is not None:
                mask.apply()
        return f

    def evaluate(mod):
        def f():
            with torch.no_grad(), autocast:
                mod(xs[0])
        return f

    # the GEMM rate: an expert's own matmul at its share of the tokens; on a GPU one such matmul
    # takes microseconds, as long as a launch and a sync, so a timed call runs several
    a = torch.randn(DFF, D, device=dev)
    b = torch.randn(D, max(args.tokens // E, 1), device=dev)
    gemm_reps = 1 if dev.type == "cpu" else 50

    def gemm():
        with autocast:
            for _ in range(gemm_reps):
                torch.mm(a, b)

    fns = {k: step(k, m) for k, m in layers.items()}
    eval_layers = {"tnmoe_mpoe_eval_cached": tnmoe_layer("mpo").to(dev).eval(),
                   "tnmoe_dense_moe_eval": tnmoe_layer("dense").to(dev).eval()}
    fns.update({k: evaluate(m) for k, m in eval_layers.items()})
    fns["gemm"] = gemm
    t0 = time.perf_counter()
    t = interleaved(fns, repeats=args.repeats, warmup=args.warmup, sync=sync)
    gemm_rate = 2.0 * DFF * D * b.shape[1] * gemm_reps / t["gemm"]  # FLOP/s
    dense = t["tnmoe_dense_moe"]
    recon = {"tnmoe_mpoe": reconstruction_flops(None), bond_row: reconstruction_flops(args.max_bond),
             "tnmoe_mpoe_masked": reconstruction_flops(None)}
    cache_check = _cache_check_seconds(eval_layers["tnmoe_mpoe_eval_cached"], xs[0], sync)
    print(f"device={dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}) dtype={args.dtype} "
          f"torch={torch.__version__} threads={torch.get_num_threads()} tokens={args.tokens} "
          f"accumulate={args.accumulate} p_b={args.p_b} experts={E} top-1 retained_memory={retained}; median of {args.repeats} interleaved "
          f"steps ({time.perf_counter() - t0:.0f}s); GEMM rate {gemm_rate / 1e9:.1f} GFLOP/s")
    # the expert matmuls alone (top-1: every token through one 768x3072 and one 3072x768 matrix,
    # forward + 2x backward) at the GEMM rate: what any dense-expert layer must spend
    gemm_floor = 3.0 * 2.0 * 2.0 * D * DFF * args.tokens * args.accumulate / gemm_rate
    rows = []
    for k in layers:
        floor = dense + (3.0 if k != "tnmoe_mpoe_masked" else 3.0 - MASKED_SAVING) * recon.get(k, 0.0) / gemm_rate
        rows.append({"layer": k, "median_s": t[k], "vs_tnmoe_dense_moe": t[k] / dense,
                     "vs_hf_switch": t[k] / t["hf_switch"], "vs_flop_floor": t[k] / floor,
                     "reconstruction_gflop_per_step": recon.get(k, 0.0) / 1e9,
                     "params": sum(p.numel() for p in layers[k].parameters())})
        if k == "tnmoe_mpoe_masked":
            rows[-1]["vs_unmasked"] = t[k] / t["tnmoe_mpoe"]
        if k in ("tnmoe_dense_moe", "hf_switch", "dense_ffn"):  # all three do the same expert matmuls
            rows[-1]["vs_gemm_floor"] = t[k] / gemm_floor
    rows.append({"layer": "tnmoe_mpoe_eval_cached", "median_s": t["tnmoe_mpoe_eval_cached"],
                 "vs_tnmoe_dense_moe": t["tnmoe_mpoe_eval_cached"] / t["tnmoe_dense_moe_eval"],
                 "cache_check_s": cache_check, "cache_check_share": cache_check / t["tnmoe_mpoe_eval_cached"]})
    rows.append({"layer": "tnmoe_dense_moe_eval", "median_s": t["tnmoe_dense_moe_eval"], "vs_tnmoe_dense_moe": 1.0})
    for r in rows:
        extra = "".join(f" | {key} {r[key]:.2f}x" for key in ("vs_hf_switch", "vs_flop_floor", "vs_unmasked",
                                                                   "vs_gemm_floor")
                        if key in r)
        print(f"{r['layer']:>24}: {r['vs_tnmoe_dense_moe']:5.2f}x tnmoe dense-expert MoE{extra}")
    print(f"cache check (the default validity check of the cores): {1e3 * cache_check:.2f} ms per eval forward "
          f"({100 * cache_check / t['tnmoe_mpoe_eval_cached']:.1f}% of it)")
    write_report(args.json, device=dev, tokens=args.tokens, rows=rows,
                 extra={"accumulate": args.accumulate, "p_b": args.p_b, "dtype": args.dtype,
                        "gemm_gflops": gemm_rate / 1e9, "max_bond": args.max_bond, "warmup": args.warmup,
                        "retain_freed_cpu_memory": retained})


def _cache_check_seconds(layer: MoELayer, x: torch.Tensor, sync) -> float:
    """Median seconds of the cache's staleness check alone (all banks of the layer)."""
    with torch.no_grad():
        layer(x)  # fill the caches
    banks = list(layer.experts.banks().values())
    times = []
    for _ in range(9):
        sync()
        t0 = time.perf_counter()
        for bank in banks:
            assert bank.weight_cache.is_fresh(list(bank.cores))
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    main()
