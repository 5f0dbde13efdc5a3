"""Decode speed: greedy ``generate()``, batch 1, KV cache, ms per generated token, vs the
original model; and ``MPOLinear`` at 1 token vs ``nn.Linear``.

Models (random weights of the real shapes: speed does not depend on the values; experts are
built with ``convert(..., init="empty")`` and random cores, which takes seconds where an SVD
of every FFN would take minutes): GPT-2-size layers (4 layers, 768/3072, vocab 8k) and a
LLaMA-style gated model of the same size, 8 experts, Switch router, no token dropping, eval
mode. MPOE rows are measured up to four ways:

  * ``cached, tracked (default)``: the default weight cache (version counters and storages, O(1) per call)
  * ``cached, checked``: ``validation="digest"`` (every call also reads the cores: an XXH3 digest)
  * ``cached, frozen_weights``: inside one ``frozen_weights(model)`` block (O(1), edits refused loudly)
  * ``cache_weights=False``: tokens streamed through the cores, nothing cached

Times are medians of interleaved runs in one process (``_timing.interleaved``); ratios are
within this run. ``--json F`` writes rows ``{model, ms_per_token, vs_original}``
(``results/make_tables.py decode`` prints them as the docs table).

    python benchmarks/bench_decode.py [--new-tokens 32] [--repeats 5] [--threads 2] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
from torch import nn

from _timing import interleaved, write_report
import tnmoe.moe as moe
from tnmoe.moe import DenseExpertBank, MoEConfig
from tnmoe.networks import MPOBank, MPOLinear, frozen_weights, set_weight_cache_validation

D, DFF, VOCAB, LAYERS, E = 768, 3072, 8000, 4, 8
FACTORS = {768: [3, 4, 4, 4, 4], 3072: [4, 4, 8, 6, 4]}


def gpt2_model() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=D, n_inner=DFF, n_layer=LAYERS, n_head=12, vocab_size=VOCAB, n_positions=256,
                     bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def llama_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=D, intermediate_size=DFF, num_hidden_layers=LAYERS, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=VOCAB, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def checked(model: nn.Module) -> nn.Module:
    set_weight_cache_validation(model, "digest")
    return model


def converted(original: nn.Module, expert_type: str, max_bond: int | None = None) -> nn.Module:
    """``original`` converted to an 8-expert Switch MoE (no dropping), random expert weights."""
    cfg = MoEConfig(num_experts=E, router="switch", expert_type=expert_type, capacity_factor=None,
                    **({"factors": FACTORS, "max_bond": max_bond} if expert_type == "mpo" else {}))
    model = moe.convert(copy.deepcopy(original), cfg, init="empty", progress=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MPOBank):  # W ~ 1/sqrt(in) per entry, without rebuilding W
                for core, (r, _, i, _) in zip(module.cores, module.core_shapes):
                    core.normal_(0.0, 1.0 / (r * i) ** 0.5, generator=gen)
            elif isinstance(module, DenseExpertBank):
                bound = 1 / module.in_features ** 0.5
                module.weight.uniform_(-bound, bound, generator=gen)
        for name, p in model.named_parameters():
            if name.endswith(("up_bias", "down_bias", "gate_bias")):
                p.zero_()
    return model.eval()


def set_cache(model: nn.Module, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, MPOBank):
            module.cache_weights = on


def decode_rows(args) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    ids = torch.randint(2, VOCAB, (1, args.prompt))
    n = args.new_tokens
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    def generate(model, cache=True):
        def run():
            set_cache(model, cache)
            try:
                with torch.inference_mode():
                    model.generate(ids, **kw)
            finally:
                set_cache(model, True)
        return run

    t0 = time.perf_counter()
    gpt2 = gpt2_model()
    llama = llama_model()
    models = {
        "gpt2": gpt2,
        "gpt2_dense_moe": converted(gpt2, "dense"),
        "gpt2_mpoe": converted(gpt2, "mpo"),
        "gpt2_mpoe_checked": checked(converted(gpt2, "mpo")),
        "gpt2_mpoe_frozen": converted(gpt2, "mpo"),
        "gpt2_mpoe64": converted(gpt2, "mpo", max_bond=64),
        "llama": llama,
        "llama_mpoe": converted(llama, "mpo"),
    }
    print(f"built the models in {time.perf_counter() - t0:.0f} s")
    fns = {
        "gpt2": generate(gpt2),
        "gpt2_dense_moe": generate(models["gpt2_dense_moe"]),
        "gpt2_mpoe": generate(models["gpt2_mpoe"]),
        "gpt2_mpoe_checked": generate(models["gpt2_mpoe_checked"]),
        "gpt2_mpoe_frozen": generate(models["gpt2_mpoe_frozen"]),
        "gpt2_mpoe_uncached": generate(models["gpt2_mpoe"], cache=False),
        "gpt2_mpoe64": generate(models["gpt2_mpoe64"]),
        "gpt2_mpoe64_uncached": generate(models["gpt2_mpoe64"], cache=False),
        "llama": generate(llama),
        "llama_mpoe": generate(models["llama_mpoe"]),
    }
    frozen = [m for k, m in models.items() if k.endswith("_frozen")]
    with contextlib.ExitStack() as stack:  # one block around the whole run, as a serving loop would
        for model in frozen:
            stack.enter_context(frozen_weights(model))
        t = interleaved(fns, repeats=args.repeats, warmup=1)
    entry_exit = []
    for _ in range(3):  # what entering and leaving a block costs (a digest of every core, twice)
        t1 = time.perf_counter()
        with frozen_weights(models["gpt2_mpoe_frozen"]):
            pass
        entry_exit.append(time.perf_counter() - t1)
    labels = {
        "gpt2": ("GPT-2-size original", "gpt2"),
        "gpt2_dense_moe": ("GPT-2-size dense-expert MoE", "gpt2"),
        "gpt2_mpoe": ("GPT-2-size lossless MPOE, cached, tracked (default)", "gpt2"),
        "gpt2_mpoe_checked": ("GPT-2-size lossless MPOE, cached, checked (validation=digest)", "gpt2"),
        "gpt2_mpoe_frozen": ("GPT-2-size lossless MPOE, cached, frozen_weights", "gpt2"),
        "gpt2_mpoe_uncached": ("GPT-2-size lossless MPOE, cache_weights=False (streaming)", "gpt2"),
        "gpt2_mpoe64": ("GPT-2-size MPOE bond 64, cached, tracked (default)", "gpt2"),
        "gpt2_mpoe64_uncached": ("GPT-2-size MPOE bond 64, cache_weights=False (streaming)", "gpt2"),
        "llama": ("LLaMA-style gated original", "llama"),
        "llama_mpoe": ("LLaMA-style gated lossless MPOE, cached, tracked (default)", "llama"),
    }
    rows = []
    for key, (label, base) in labels.items():
        rows.append({"model": label, "kind": "generate", "ms_per_token": 1e3 * t[key] / n,
                     "vs_original": t[key] / t[base]})
    return rows, {"frozen_entry_exit_ms": 1e3 * statistics.median(entry_exit)}


def linear_rows(args) -> list[dict]:
    """``MPOLinear`` 384 -> 1536 (eval, no grad) at 1 token and at 512 tokens vs ``nn.Linear``."""
    torch.manual_seed(0)
    lin = nn.Linear(384, 1536).eval()
    calls = 200
    rows = []
    for tokens in (1, 512):
        x = torch.randn(tokens, 384)
        fns = {"linear": lin}
        layers = {}
        for bond in (None, 64, 16):
            name = "lossless" if bond is None else f"bond {bond}"
            layers[f"{name}, cached, tracked (default)"] = MPOLinear.from_linear(
                lin, in_factors=5, max_bond=bond).eval()
            layers[f"{name}, cached, checked"] = checked(MPOLinear.from_linear(lin, in_factors=5, max_bond=bond).eval())
            frozen = MPOLinear.from_linear(lin, in_factors=5, max_bond=bond).eval()
            layers[f"{name}, cached, frozen_weights"] = frozen
            if tokens == 1:
                layers[f"{name}, cache_weights=False"] = MPOLinear.from_linear(
                    lin, in_factors=5, max_bond=bond, cache_weights=False).eval()
        fns.update(layers)
        reps = calls if tokens == 1 else max(1, calls // 20)

        def repeat(mod):
            def run():
                with torch.inference_mode():
                    for _ in range(reps):
                        mod(x)
            return run

        with contextlib.ExitStack() as stack:
            for name, layer in layers.items():
                if name.endswith("frozen_weights"):
                    stack.enter_context(frozen_weights(layer))
            t = interleaved({k: repeat(m) for k, m in fns.items()}, repeats=args.repeats, warmup=1)
        for name in layers:
            rows.append({"model": f"MPOLinear 384->1536 {name}, {tokens} token{'s' if tokens > 1 else ''}",
                         "kind": "linear", "tokens": tokens, "ms_per_token": 1e3 * t[name] / reps / tokens,
                         "vs_original": t[name] / t["linear"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=8, help="prompt length (tokens)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} new_tokens={args.new_tokens} "
          f"repeats={args.repeats}")
    rows, extra = decode_rows(args)
    rows += linear_rows(args)
    for r in rows:
        print(f"{r['model']:>66}: {r['ms_per_token']:8.3f} ms/token  {r['vs_original']:6.2f}x")
    print(f"frozen_weights entry + exit (GPT-2-size lossless MPOE): {extra['frozen_entry_exit_ms']:.0f} ms")
    write_report(args.json, device="cpu", tokens=args.new_tokens, rows=rows,
                 extra={"prompt": args.prompt, "repeats": args.repeats, **extra})


if __name__ == "__main__":
    main()
