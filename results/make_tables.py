"""Print the README's markdown tables from the committed study summaries (no numbers by hand)."""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(p):
    p = HERE / p
    return json.loads(p.read_text()) if p.is_file() else []


def task_metric(row, task, metric):
    """``<task>_<metric>_mean`` of a GLUE summary row; summaries written before the study runner
    named per-task metrics by their task have one task per row and the plain ``<metric>_mean``."""
    return row.get(f"{task}_{metric}_mean", row.get(f"{metric}_mean"))


def glue_table():
    rows = load("glue_minilm/summary.json")
    if not rows:
        return
    tasks = sorted({r["task"] for r in rows}, key=["rte", "mrpc", "cola", "stsb"].index)
    variants = ["dense", "switch", "mpoe", "mpoe-wo-gm", "mpoe-wo-ps"]
    metric_name = {"rte": "acc", "mrpc": "acc / F1", "cola": "MCC", "stsb": "Pearson"}
    print("| variant | params (M) | " + " | ".join(f"{t.upper()} {metric_name[t]}" for t in tasks)
          + " | train time (s, mean over tasks) |")
    print("|---|---|" + "---|" * len(tasks) + "---|")
    for v in variants:
        sel = {r["task"]: r for r in rows if r["variant"] == v}
        if not sel:
            continue
        cells = []
        for t in tasks:
            r = sel.get(t)
            if r is None:
                cells.append("-")
            elif t == "mrpc":
                cells.append(f"{task_metric(r, t, 'accuracy'):.3f} / {task_metric(r, t, 'f1'):.3f}")
            else:
                cells.append(f"{r['test_score_mean']:.3f}")
        params = next(iter(sel.values()))["total_params"] / 1e6
        t_mean = sum(r["train_seconds_mean"] for r in sel.values()) / len(sel)
        print(f"| {v} | {params:.2f} | " + " | ".join(cells) + f" | {t_mean:.0f} |")


def gpt2_tables():
    for name, key in (("summary.json", "variant"), ("factorization.json", "m")):
        rows = load(f"gpt2_wikitext2/{name}")
        if not rows:
            continue
        print(f"\n| {key} | seeds | params (M) | active/token (M) | test PPL (mean ± std) | BLEU-2 | BLEU-4 | Self-BLEU-2 | train time (s) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[key]} | {r['seeds']} | {r['total_params'] / 1e6:.2f} | {r['active_params_per_token'] / 1e6:.2f} | "
                  f"{r['test_perplexity_mean']:.1f} ± {r['test_perplexity_std']:.1f} | {r.get('bleu2_mean', float('nan')):.2f} | "
                  f"{r.get('bleu4_mean', float('nan')):.2f} | {r.get('self_bleu2_mean', float('nan')):.2f} | "
                  f"{r['train_seconds_mean']:.0f} |")


if __name__ == "__main__":
    glue_table()
    gpt2_tables()
