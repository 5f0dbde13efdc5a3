"""Parameter columns of MPOE Tables 1, 2 and 4, computed from model configs on the meta device
(no weights, no downloads). Prints our counts next to the paper's where the paper gives one.

    python recipes/param_table.py [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_io import run_main  # noqa: E402
from variants import VariantOptions, fit_paper_factors, variant_config  # noqa: E402

import tnmoe.moe as moe  # noqa: E402

T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
               num_heads=12)
T5_LARGE = dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_decoder_layers=24,
                num_heads=16)

# (model, variant) -> the paper's figure in millions (Tables 1, 2, 4)
PAPER = {
    ("t5-base", "dense"): 223.0, ("t5-base", "mpoe"): 294.0, ("t5-base", "mpoe++"): 365.0,
    ("gpt2", "dense"): 124.0, ("gpt2", "mpoe-m3"): 130.3, ("gpt2", "mpoe-m5"): 157.4,
    ("gpt2", "mpoe-m7"): 198.7, ("gpt2", "mpoe-m9"): 214.6,
}


def meta_model(name: str):
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    with torch.device("meta"):
        if name == "gpt2":
            return GPT2LMHeadModel(GPT2Config())
        return T5ForConditionalGeneration(T5Config(**(T5_BASE if name == "t5-base" else T5_LARGE)))


def row_config(row_variant: str) -> moe.MoEConfig | None:
    """The config of a table row: a recipe ``--variant`` with the recipes' defaults, where
    ``mpoe-m<m>`` is ``--variant mpoe --m <m>`` (the paper's factors for 768/3072)."""
    variant, sep, m = row_variant.rpartition("-m")
    if sep and m.isdigit():
        return variant_config(variant, VariantOptions(m=int(m)))[0]
    return variant_config(row_variant)[0]


ROWS = [
    ("gpt2", ["dense", "moe", "switch", "mpoe-m3", "mpoe-m5", "mpoe-m7", "mpoe-m9"]),
    ("t5-base", ["dense", "moe", "switch", "mpoe", "mpoe++"]),
    ("t5-large", ["dense", "switch", "mpoe", "mpoe++"]),
]


def table() -> list[dict]:
    rows = []
    for model_name, variants in ROWS:
        for variant in variants:
            model = meta_model(model_name)
            cfg = row_config(variant)
            if cfg is not None:
                cfg = fit_paper_factors(cfg, model)
                moe.convert(model, cfg, progress=False)
            c = moe.count_parameters(model)
            paper = PAPER.get((model_name, variant))
            rows.append({
                "model": model_name, "variant": variant,
                "total_M": round(c.total / 1e6, 2), "active_per_token_M": round(c.active_per_token / 1e6, 2),
                "shared_M": round(c.shared / 1e6, 2), "per_expert_M": round(c.per_expert / 1e6, 2),
                "paper_M": paper,
                "rel_diff_vs_paper": None if paper is None else round(c.total / 1e6 / paper - 1, 4),
                "factors": None if cfg is None or cfg.expert_type != "mpo" else
                {str(k): v for k, v in cfg.factors.items()},
            })
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    rows = table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return rows
    print(f"{'model':<9} {'variant':<9} {'total (M)':>10} {'active/token':>13} {'shared':>8} "
          f"{'per expert':>11} {'paper (M)':>10} {'rel. diff':>10}")
    for r in rows:
        paper = f"{r['paper_M']:.1f}" if r["paper_M"] is not None else "-"
        diff = f"{100 * r['rel_diff_vs_paper']:+.1f}%" if r["rel_diff_vs_paper"] is not None else "-"
        print(f"{r['model']:<9} {r['variant']:<9} {r['total_M']:>10.2f} {r['active_per_token_M']:>13.2f} "
              f"{r['shared_M']:>8.2f} {r['per_expert_M']:>11.2f} {paper:>10} {diff:>10}")
    return rows


if __name__ == "__main__":
    run_main(main)
