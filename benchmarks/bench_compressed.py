"""Compressed inference: a Mixtral-architecture model whose experts ``moe.compress`` halved, against
the uncompressed model: expert memory at inference, prefill of 512 tokens, greedy decode at batch 1
with the KV cache.

The model has random weights (speed and memory do not depend on the values): 4 layers, hidden 512,
8 experts of intermediate 1024, top-2, vocab 8k, eager experts. Each case compresses a copy to
``--ratio`` of the expert parameters (calibration: random tokens; the fit's quality is not what is
measured here) and keeps compress's default, memory-bounded inference (no rebuilt-weight cache:
each call streams the tokens through the cores or rebuilds the experts that have tokens).

``expert_memory_ratio``: bytes of the experts' parameters plus every inference weight cache held
after the measured runs, over the uncompressed experts' bytes. Times are medians of interleaved
runs in one process; ratios are within this run. ``--json F`` writes rows ``{case,
expert_memory_ratio, prefill_vs_uncompressed, decode_vs_uncompressed}``.

    python benchmarks/bench_compressed.py [--ratio 0.5] [--repeats 5] [--threads 2] [--json F]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from _timing import interleaved, write_report
import tnmoe.moe as moe
from tnmoe.networks import MPOBank

D, FF, E, TOPK, LAYERS, VOCAB = 512, 1024, 8, 2, 4, 8000


def mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=E,
                        num_experts_per_tok=TOPK, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
                        experts_implementation="eager")
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).eval()


def expert_bytes(model: nn.Module) -> int:
    """The experts' parameter bytes (each tensor once) plus every MPO bank's cached rebuilt weights
    (a base-plus-deltas bank keeps none: it never rebuilds its experts)."""
    params = {id(p): p for n, p in model.named_parameters() if ".experts." in n}
    total = sum(p.numel() * p.element_size() for p in params.values())
    for bank in model.modules():
        if isinstance(bank, MPOBank) and bank.weight_cache.value is not None:
            total += bank.weight_cache.value.numel() * bank.weight_cache.value.element_size()
    return total


CASES = {  # --cases names, label and config
    "rank": ("rank-r per expert (m=2, share none)",
             lambda: moe.MoEConfig(share="none", factors=moe.low_rank_factors(D, FF))),
    "shared-v": ("shared V (m=2, share [1])", lambda: moe.MoEConfig(share=[1], factors=moe.low_rank_factors(D, FF))),
    "mpo": ("MPO per expert (m=5, share none)", lambda: moe.MoEConfig(share="none", m=5)),
    "base-delta": ("shared base + rank-r deltas", lambda: moe.MoEConfig(expert_type="base_delta")),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of the expert parameters kept")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of the cases")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = mixtral()
    g = torch.Generator().manual_seed(1)
    calibration = [{"input_ids": torch.randint(2, VOCAB, (4, 128), generator=g)} for _ in range(2)]
    models, reports = {"uncompressed": base}, {}
    for key in args.cases.split(","):
        if key not in CASES:
            raise SystemExit(f"unknown case {key!r}; known: {', '.join(CASES)}")
        case, make_config = CASES[key]
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        reports[case] = moe.compress(model, make_config(), calibration=calibration, target_ratio=args.ratio,
                                     fit_options={"sweeps": 1}, progress=False)
        models[case] = model.eval()
        print(f"{case}: compressed in {time.perf_counter() - t0:.0f} s, kept {reports[case].ratio:.3f} "
              f"(max_bond {reports[case].config.max_bond})", flush=True)
    prompt = torch.randint(2, VOCAB, (1, args.prefill), generator=g)
    short = prompt[:, :8]
    n = args.new_tokens
    gen = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    def prefill(model):
        def run():
            with torch.inference_mode():
                model(prompt)
        return run

    def decode(model):
        def run():
            with torch.inference_mode():
                model.generate(short, **gen)
        return run

    t_prefill = interleaved({k: prefill(m) for k, m in models.items()}, repeats=args.repeats, warmup=1)
    t_decode = interleaved({k: decode(m) for k, m in models.items()}, repeats=args.repeats, warmup=1)
    uncompressed_bytes = expert_bytes(base)
    rows = []
    for case, model in models.items():
        row = {"case": case, "expert_memory_ratio": expert_bytes(model) / uncompressed_bytes,
               "prefill_vs_uncompressed": t_prefill[case] / t_prefill["uncompressed"],
               "decode_vs_uncompressed": t_decode[case] / t_decode["uncompressed"],
               "prefill_ms": 1e3 * t_prefill[case], "decode_ms_per_token": 1e3 * t_decode[case] / n}
        if case in reports:
            row.update(expert_param_ratio=reports[case].ratio, max_bond=reports[case].config.max_bond)
        rows.append(row)
        print(f"{case:>40}: memory {row['expert_memory_ratio']:.3f}x  prefill {row['prefill_vs_uncompressed']:.2f}x  "
              f"decode {row['decode_vs_uncompressed']:.2f}x", flush=True)
    write_report(args.json, device="cpu", tokens=args.prefill, rows=rows,
                 extra={"new_tokens": n, "repeats": args.repeats, "ratio": args.ratio,
                        "model": f"Mixtral-architecture {LAYERS} layers, d {D}, {E} experts of {FF}, top-{TOPK}"})


if __name__ == "__main__":
    main()
