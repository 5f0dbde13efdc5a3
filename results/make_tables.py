"""Print the documentation's markdown tables from the committed results (no numbers by hand).

    python results/make_tables.py            # all tables
    python results/make_tables.py benchmarks # the tables of docs/benchmarks.md (results/benchmarks/*.json)
    python results/make_tables.py evidence   # the tables of docs/evidence.md (GLUE, GPT-2, factorization)
    python results/make_tables.py decode     # the table of docs/inference.md (results/benchmarks/decode_cpu.json)
    python results/make_tables.py architectures  # docs/architectures.md (tests/test_model_zoo.py's cases)
    python results/make_tables.py moe-compression  # writes its table into the docs page, between markers
    python results/make_tables.py conversion  # docs/fitting.md's fine-tuning table, between markers
    python results/make_tables.py compressed  # docs/compression.md's compressed-inference table
Paste them into those pages; ``tests/test_recipes.py`` checks that every printed row is there.
Also writes ``glue_minilm/comparison.json`` (the GLUE table's numbers, significance included).
"""

import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "recipes"))
from significance import paired_bootstrap, seed_ttest  # noqa: E402
from studies import check_same_settings, mean_std  # noqa: E402

TASKS = ["cola", "rte", "mrpc", "stsb"]
METRIC = {"cola": "matthews", "rte": "accuracy", "mrpc": "accuracy", "stsb": "pearson"}
VARIANTS = ["dense", "switch", "moe", "mpoe", "mpoe-wo-gm", "mpoe-wo-ps", "mpoe++"]


def load(p):
    p = HERE / p
    return json.loads(p.read_text()) if p.is_file() else []


def glue_runs():
    """The variant grid's runs, ``{(task, variant): {seed: result}}``: folders named
    ``<task>-<variant>-m5-s<seed>`` (the STS-B factorization study keeps its runs in its own
    folder, ``glue_minilm/factorization_stsb``)."""
    import re

    runs = {}
    for path in sorted((HERE / "glue_minilm" / "runs").glob("*/results.json")):
        match = re.fullmatch(r"([a-z]+)-(.+)-m5-s(\d+)", path.parent.name)
        if not match:
            continue
        r = json.loads(path.read_text())
        key = (r["tasks"][0], r["variant"])
        if (key[0], key[1], r["seed"]) != (match[1], match[2], int(match[3])):
            raise ValueError(f"{path}: its contents do not match its folder name")
        runs.setdefault(key, {})[r["seed"]] = r
    return runs


def glue_table(write_json: bool = True) -> list[dict]:
    """Print the GLUE grid's tables; return the rows (and write them to ``comparison.json``)."""
    runs = glue_runs()
    if not runs:
        return []
    sweep = load("glue_minilm/sweep/chosen.json")
    if sweep:
        print("Learning rates chosen on CoLA's validation half (seed 1; best epoch of 3):\n")
        print("| family | lr | validation MCC |\n|---|---|---|")
        for fam, by_lr in sweep["validation"].items():
            for lr, v in sorted(by_lr.items(), key=lambda kv: float(kv[0])):
                mark = " **chosen**" if float(lr) == sweep["lr"][fam] else ""
                print(f"| {fam} | {float(lr):g}{mark} | {v:.3f} |")
        print()
    print("| task (metric) | variant | seeds | test mean ± std | Δ vs dense [95% CI] | p bootstrap | p t-test "
          "| params total / active (M) | s/step | CPU s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    out = []
    for task in TASKS:
        metric = METRIC[task]
        dense = runs.get((task, "dense"), {})
        for v in VARIANTS:
            by_seed = runs.get((task, v))
            if not by_seed:
                continue
            check_same_settings(list(by_seed.values()), f"glue_minilm {task} {v}")
            scores = [r["test"]["tasks"][task][metric] for r in by_seed.values()]
            m, s = mean_std(scores)
            s = s if len(scores) > 1 else float("nan")  # one seed: no spread to report
            first = next(iter(by_seed.values()))
            steps = [r["seconds_per_step"] for r in by_seed.values() if "seconds_per_step" in r]
            row = {"task": task, "metric": metric, "variant": v, "seeds": sorted(by_seed), "mean": m, "std": s,
                   "total_params": first["total_params"], "active_params_per_token": first["active_params_per_token"],
                   "seconds_per_step": sum(steps) / len(steps) if steps else None}
            # process CPU time per step (1 thread: not inflated by pauses or other processes);
            # runs from before it was recorded have wall time only
            cpu = [r["cpu_seconds_per_step"] for r in by_seed.values() if "cpu_seconds_per_step" in r]
            if len({r["threads"] for r in by_seed.values() if "cpu_seconds_per_step" in r}) > 1:
                raise ValueError(f"{task} {v}: runs at different thread counts; CPU time per step is not comparable")
            row["cpu_seconds_per_step"] = sum(cpu) / len(cpu) if cpu else None
            row["cpu_seconds_per_step_runs"] = len(cpu)
            common = [k for k in sorted(by_seed) if k in dense]
            if v != "dense" and common and all("examples" in by_seed[k]["test"] and "examples" in dense[k]["test"]
                                               for k in common):
                ex = [(by_seed[k]["test"]["examples"][task], dense[k]["test"]["examples"][task]) for k in common]
                for k, (a, b) in zip(common, ex):
                    if a["labels"] != b["labels"] or ("ids" in a and "ids" in b and a["ids"] != b["ids"]):
                        raise ValueError(f"{task} seed {k}: {v} and dense were scored on different test examples")
                # runs from before ids were stored: resample each seed on its own (see significance.py)
                ids = [a["ids"] for a, _ in ex] if all("ids" in a and "ids" in b for a, b in ex) else None
                boot = paired_bootstrap(metric, [(a["predictions"], b["predictions"], a["labels"]) for a, b in ex],
                                        ids=ids)
                row.update(diff=boot, ttest_p=seed_ttest([by_seed[k]["test"]["tasks"][task][metric] for k in common],
                                                         [dense[k]["test"]["tasks"][task][metric] for k in common]))
            out.append(row)
            d = row.get("diff")
            delta = (f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] ({d['seeds']} seeds)" if d else "-")
            p_boot = f"{d['p']:.3f}" if d else "-"
            p_t = f"{row['ttest_p']:.3f}" if d and not math.isnan(row["ttest_p"]) else "-"
            extra = ""
            if task == "mrpc":
                f1 = mean_std([r["test"]["tasks"][task]["f1"] for r in by_seed.values()])[0]
                extra = f" (F1 {f1:.3f})"
            sps = f"{row['seconds_per_step']:.2f}" if row["seconds_per_step"] else "-"
            cps = "-" if not cpu else f"{row['cpu_seconds_per_step']:.2f}" + (
                f" ({len(cpu)} of {len(by_seed)} runs)" if len(cpu) < len(by_seed) else "")
            std = "" if math.isnan(s) else f" ± {s:.3f}"
            print(f"| {task.upper()} ({metric}) | {v} | {len(by_seed)} | {m:.3f}{std}{extra} | {delta} | {p_boot} | {p_t} "
                  f"| {row['total_params'] / 1e6:.1f} / {row['active_params_per_token'] / 1e6:.1f} | {sps} | {cps} |")
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in out]
    if write_json:
        (HERE / "glue_minilm" / "comparison.json").write_text(json.dumps(clean, indent=2))  # strict JSON: no NaN
    return clean


def factorization_table(path, metric_label):
    """A factorization study's summary rows; a ``conversion`` column (how truncated points start)
    when any row was not converted by TT-SVD, and truncated dense models (``--variant
    truncated``) labelled as such."""
    rows = load(path)
    if not rows:
        return
    key = next(k for k in rows[0] if k.endswith("_mean") and k.startswith("test_"))
    with_conversion = any(r.get("conversion", "tt-svd") != "tt-svd" or r.get("variant") == "truncated" for r in rows)
    conv_head, conv_rule = ("conversion | ", "---|") if with_conversion else ("", "")
    print(f"\n`{path}`:\n")
    print(f"| m | bond cap | {conv_head}seeds | params total (M) | per expert (K) | conversion error | {metric_label} "
          "(mean ± std) | s/step |")
    print(f"|---|---|{conv_rule}---|---|---|---|---|---|")
    def fmt(x, spec, scale=1.0):
        return "-" if x is None else format(x / scale, spec)

    for r in rows:
        std = f" ± {r[key.replace('_mean', '_std')]:.3f}" if r["seeds"] > 1 else ""
        conv = (f"{r.get('conversion', 'tt-svd') if r.get('max_bond', 'lossless') != 'lossless' else 'exact'} | "
                if with_conversion else "")
        if r.get("m") is None:  # the study's --baseline row (e.g. dense), same recipe arguments
            print(f"| {r['variant']} (reference) | - | {'- | ' if with_conversion else ''}{r['seeds']} | "
                  f"{fmt(r['total_params'], '.2f', 1e6)} | - | - | "
                  f"{r[key]:.3f}{std} | {fmt(r.get('seconds_per_step_mean'), '.2f')} |")
            continue
        m = f"{r['m']} (dense, truncated)" if r.get("variant") == "truncated" else r["m"]
        per_expert = "-" if r.get("variant") == "truncated" else fmt(r.get("per_expert_params"), ".1f", 1e3)
        print(f"| {m} | {r.get('max_bond', 'lossless')} | {conv}{r['seeds']} | {fmt(r['total_params'], '.2f', 1e6)} | "
              f"{per_expert} | {fmt(r.get('conversion_error'), '.3g')} | "
              f"{r[key]:.3f}{std} | {fmt(r.get('seconds_per_step_mean'), '.2f')} |")


def gpt2_table():
    rows = load("gpt2_wikitext2/summary.json")
    if not rows:
        return
    print("\n| variant | seeds | params (M) | active/token (M) | test PPL (mean ± std) | BLEU-2 | BLEU-4 | Self-BLEU-2 "
          "| train time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seeds']} | {r['total_params'] / 1e6:.2f} | {r['active_params_per_token'] / 1e6:.2f} | "
              f"{r['test_perplexity_mean']:.1f} ± {r['test_perplexity_std']:.1f} | {r.get('bleu2_mean', float('nan')):.2f} | "
              f"{r.get('bleu4_mean', float('nan')):.2f} | {r.get('self_bleu2_mean', float('nan')):.2f} | "
              f"{r['train_seconds_mean']:.0f} |")


def _layer_run_label(report):
    label = f"{report['tokens']:,} tokens"
    if report.get("accumulate", 1) > 1:
        label += f", `--accumulate {report['accumulate']}`"
    if report.get("p_b"):
        label += f", `--p-b {report['p_b']}`"
    if report["device"] != "cpu":
        label += f", {report['dtype']}"
    if not report.get("retain_freed_cpu_memory", True) and report["device"] == "cpu":
        label += ", `--allocator default`"
    return label


def moe_layer_table(device):
    """``bench_moe_layer.py`` runs on ``device`` ("cpu" or "cuda"): one row per committed JSON."""
    paths = sorted((HERE / "benchmarks").glob(f"moe_layer_{device}_*.json"))
    reports = [json.loads(p.read_text()) for p in paths]
    if not reports:
        return
    reports.sort(key=lambda r: (r.get("dtype", "float32"), not r.get("retain_freed_cpu_memory", True),
                                r["tokens"], r.get("accumulate", 1)))
    names = sorted({(r["device_name"], r["torch"]) for r in reports})
    print(f"\n`bench_moe_layer.py` on {', '.join(f'{n} (torch {t})' for n, t in names)}:\n")
    print("| run | MPOE lossless: vs dense-expert MoE / vs floor | masked / unmasked | MPOE max_bond B: vs dense / "
          "vs floor | cached eval vs dense | dense-expert MoE vs HF Switch | dense-expert MoE / HF Switch vs GEMM floor "
          "| GEMM rate (GFLOP/s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in reports:
        row = {x["layer"]: x for x in r["rows"]}
        mpoe, masked, dense, hf = (row["tnmoe_mpoe"], row["tnmoe_mpoe_masked"], row["tnmoe_dense_moe"],
                                   row["hf_switch"])
        bond = row[f"tnmoe_mpoe_bond{r['max_bond']}"]
        print(f"| {_layer_run_label(r)} | {mpoe['vs_tnmoe_dense_moe']:.2f}x / {mpoe['vs_flop_floor']:.2f}x "
              f"| {masked['vs_unmasked']:.2f}x | {bond['vs_tnmoe_dense_moe']:.2f}x / {bond['vs_flop_floor']:.2f}x "
              f"(B = {r['max_bond']}) | {row['tnmoe_mpoe_eval_cached']['vs_tnmoe_dense_moe']:.2f}x "
              f"| {dense['vs_hf_switch']:.2f}x | {dense['vs_gemm_floor']:.2f}x / {hf['vs_gemm_floor']:.2f}x "
              f"| {r['gemm_gflops']:.0f} |")


def mpo_linear_table(device):
    """``bench_mpo_linear.py`` on ``device``: MPOLinear vs nn.Linear, and vs tensorly-torch."""
    path = HERE / "benchmarks" / f"mpo_linear_{device}.json"
    if not path.is_file():
        return
    r = json.loads(path.read_text())
    print(f"\n`bench_mpo_linear.py` on {r['device_name']} (torch {r['torch']}), {r['tokens']:,} tokens:\n")
    print("| MPO | forward / nn.Linear | train step / nn.Linear | eval (cached) / nn.Linear | train step / naive rebuild |")
    print("|---|---|---|---|---|")
    for x in r["rows"]:
        if "forward_vs_linear" in x:
            name = x["config"].replace("max_bond=", "max_bond ")
            print(f"| {name} | {x['forward_vs_linear']:.2f}x | {x['train_step_vs_linear']:.2f}x "
                  f"| {x['eval_cached_vs_linear']:.2f}x | {x['train_step_vs_naive']:.2f}x |")
    tl = [x for x in r["rows"] if "ours_vs_tltorch" in x]
    if tl:
        print("\n| vs tensorly-torch block-TT (forward+backward) | tokens | ours / nn.Linear | tltorch / nn.Linear "
              "| ours / tltorch |")
        print("|---|---|---|---|---|")
        for x in tl:
            print(f"| rank {x['config'].split('rank=')[1]} ({x['tltorch_impl']}) | {x['tokens']:,} "
                  f"| {x['ours_vs_linear']:.2f}x | {x['tltorch_vs_linear']:.2f}x | {x['ours_vs_tltorch']:.2f}x |")


def rebuild_table(device):
    """``bench_rebuild.py`` on ``device``: blocked / one-go permutation of a rebuild's last GEMM."""
    path = HERE / "benchmarks" / f"rebuild_{device}.json"
    if not path.is_file():
        return
    r = json.loads(path.read_text())
    print(f"\n`bench_rebuild.py` on {r['device_name']} (torch {r['torch']}), {r['experts']} experts, "
          "blocked / one go:\n")
    print("| threads | MPO | forward | forward + backward | the GEMM alone / one-go forward |")
    print("|---|---|---|---|---|")
    ratios = {(x["threads"], x["mpo"], x["row"]): x["ratio"] for x in r["rows"]}
    for threads, mpo in dict.fromkeys((x["threads"], x["mpo"]) for x in r["rows"]):
        cells = " | ".join(f"{ratios[(threads, mpo, row)]:.2f}x" for row in ("forward", "train", "gemm_only"))
        print(f"| {threads} | {mpo.replace('bond', 'bond ')} | {cells} |")


def decode_table(path=HERE / "benchmarks" / "decode_cpu.json"):
    """``bench_decode.py``: ms per generated token (greedy, batch 1) and MPOLinear at 1 token, vs
    the original model / ``nn.Linear`` (the table of docs/inference.md)."""
    path = Path(path)
    if not path.is_file():
        return
    r = json.loads(path.read_text())
    print(f"\n`bench_decode.py` on {r['device_name']} (torch {r['torch']}, {r['threads']} threads), greedy "
          f"generate, batch 1, {r['tokens']} new tokens, medians of {r['repeats']} interleaved runs:\n")
    print("| model | ms/token | vs original |")
    print("|---|---|---|")
    for x in r["rows"]:
        if x.get("kind") == "generate":
            print(f"| {x['model']} | {x['ms_per_token']:.1f} | {x['vs_original']:.2f}x |")
    print("\n| MPOLinear 384 -> 1536, eval | ms/token | vs nn.Linear |")
    print("|---|---|---|")
    for x in r["rows"]:
        if x.get("kind") == "linear":
            print(f"| {x['model'].removeprefix('MPOLinear 384->1536 ')} | {x['ms_per_token']:.4f} | {x['vs_original']:.2f}x |")
    print(f"\nEntering and leaving `frozen_weights` on the GPT-2-size lossless MPOE: {r['frozen_entry_exit_ms']:.0f} ms.")


def checksum_table(path=HERE / "benchmarks" / "checksum_cpu.json"):
    """``bench_checksum.py``: what the weight-file checksum costs against writing and a warm load
    (the table of docs/checkpoints.md)."""
    path = Path(path)
    if not path.is_file():
        return
    r = json.loads(path.read_text())
    print(f"\n`bench_checksum.py` on {r['device_name']} (torch {r['torch']}, {r['threads']} threads), a "
          f"{r['file_gib']} GiB file in the page cache, medians of interleaved rounds:\n")
    print("| case | s/GiB | / save_file | / warm load |")
    print("|---|---|---|---|")
    for x in r["rows"]:
        print(f"| {x['case']} | {x['s_per_gib']:.3f} | {x['vs_save']:.2f}x | {x['vs_warm_load']:.2f}x |")


def evidence_tables():
    """The tables of docs/evidence.md (writes ``glue_minilm/comparison.json`` too)."""
    glue_table()
    gpt2_table()
    factorization_table("gpt2_wikitext2/factorization.json", "test PPL")
    factorization_table("glue_minilm/factorization_stsb/factorization.json", "STS-B Pearson")


def architecture_table():
    """The table of docs/architectures.md: architecture x way in x checks, from the case list of
    ``tests/test_model_zoo.py`` (a check marked there is a test that runs for that case)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import test_model_zoo as zoo

    bank_names = {"mpo": "lossless MPO", "dense": "dense"}
    print("| Architecture | Upcycle a dense FFN | Convert MoE experts | " + " | ".join(zoo.CHECKS) + " |")
    print("|" + "---|" * (3 + len(zoo.CHECKS)))
    for arch, way in dict.fromkeys((c.arch, c.way) for c in zoo.CASES):
        cases = [c for c in zoo.CASES if (c.arch, c.way) == (arch, way)]
        banks = ", ".join(bank_names[c.bank] for c in cases)
        cells = []
        for check in zoo.CHECKS:
            runs = [c for c in cases if (c.id, check) not in zoo.NOT_APPLICABLE]
            if len(runs) == len(cases):
                cells.append("✓")
            elif runs:
                cells.append("✓ " + ", ".join(bank_names[c.bank] for c in runs))
            else:
                cells.append("n/a: " + zoo.NOT_APPLICABLE[(cases[0].id, check)])
        print(f"| {arch} | {'MPOE (' + banks + ')' if way == 'upcycle' else '—'} | "
              f"{banks if way == 'convert' else '—'} | " + " | ".join(cells) + " |")


def benchmark_tables():
    """The tables of docs/benchmarks.md."""
    for device in ("cpu", "cuda"):
        mpo_linear_table(device)
        moe_layer_table(device)
        rebuild_table(device)


def write_between_markers(doc: Path, start: str, end: str, table: str) -> None:
    """Replace what lies between the lines ``start`` and ``end`` of ``doc`` by ``table``
    (ValueError when ``doc`` lacks either marker)."""
    text = doc.read_text() if doc.is_file() else ""
    if start not in text or end not in text:
        raise ValueError(f"{doc} lacks the markers {start!r} / {end!r}")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    doc.write_text(f"{head}{start}\n{table}\n{end}{tail}")


MOE_COMPRESSION_START = "<!-- moe-compression table: printed by `python results/make_tables.py moe-compression` -->"
MOE_COMPRESSION_END = "<!-- end of moe-compression table -->"


def moe_compression_doc() -> Path:
    """The page holding the moe-compression table: docs/compression.md once it has the markers,
    else docs/moe_compression_study.md."""
    docs = HERE.parent / "docs"
    main = docs / "compression.md"
    if main.is_file() and MOE_COMPRESSION_START in main.read_text():
        return main
    return docs / "moe_compression_study.md"


def moe_compression_table(path=HERE / "moe_compression" / "summary.json", doc=None):
    """``recipes/moe_compression.py``'s summary as a markdown table; printed, and written into
    ``doc`` between :data:`MOE_COMPRESSION_START` / :data:`MOE_COMPRESSION_END` (ValueError if
    ``doc`` lacks them)."""
    path = Path(path)
    if not path.is_file():
        return
    s = json.loads(path.read_text())
    rec = s.get("uncompressed_ppl_recovered_mean")
    lines = [f"Uncompressed: test PPL {s['uncompressed_ppl_mean']:.2f}"
             + (f", {rec:.2f} after the same recovery fine-tune" if rec is not None else "")
             + f" (seeds {', '.join(map(str, s['uncompressed_seeds']))}).", "",
             "| method | family | expert params removed (target) | expert params kept | seeds | test PPL, no retraining "
             "| test PPL after recovery | MoE block output error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        def pm(mean, std):
            return f"{mean:.2f}" + (f" ± {std:.2f}" if len(r["seeds"]) > 1 else "")
        lines.append(f"| {r['method']} | {r['family']} | {r['removed_percent']}% | {r['expert_param_ratio']:.3f} "
                     f"| {len(r['seeds'])} | {pm(r['ppl_mean'], r['ppl_std'])} "
                     f"| {pm(r['ppl_recovered_mean'], r.get('ppl_recovered_std', 0.0))} | {r['output_error_mean']:.4f} |")
    for f in s.get("not_expressible", []):
        lines.append(f"\nNot expressible: {f['method']} at {f['removed_percent']}% (seed {f['seed']}): {f['error']}")
    table = "\n".join(lines)
    print(table)
    if doc is None:
        return
    doc = Path(doc)
    write_between_markers(doc, MOE_COMPRESSION_START, MOE_COMPRESSION_END, table)


CONVERSION_START = "<!-- conversion table: printed by `python results/make_tables.py conversion` -->"
CONVERSION_END = "<!-- end of conversion table -->"


def conversion_table(path=HERE / "glue_minilm" / "factorization_stsb" / "factorization.json",
                     doc=HERE.parent / "docs" / "fitting.md"):
    """The STS-B factorization study's m = 5 rows at lossless bonds and cap 64 with their
    conversion (TT-SVD / data-aware MPOE, truncated dense models) as a markdown table, printed and
    written into ``doc`` between :data:`CONVERSION_START` / :data:`CONVERSION_END`."""
    path = Path(path)
    if not path.is_file():
        return
    rows = json.loads(path.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    tt_ref = {r["max_bond"]: r.get("tt_svd_output_error") for r in rows
              if r.get("m") == 5 and r.get("conversion") == "data-aware" and r["variant"] == "mpoe"}
    lines = ["| model | conversion | total params | output error at conversion | seeds | test Pearson |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        keep = r.get("m") is None or (r.get("m") == 5 and r.get("max_bond") in ("lossless", "64"))
        if not keep:
            continue
        if r["variant"] == "dense" and r.get("m") is None:
            name, conv = "dense MiniLM", "-"
        elif r["variant"] == "truncated":
            name, conv = "dense, FFN matrices truncated at cap 64", r["conversion"]
        else:
            name = f"MPOE, {'lossless' if r['max_bond'] == 'lossless' else 'cap ' + r['max_bond']}"
            conv = "exact" if r["max_bond"] == "lossless" else r["conversion"]
        err = r.get("conversion_output_error")
        if err is None and conv == "tt-svd":
            err = tt_ref.get(r.get("max_bond"))  # TT-SVD's, measured by the data-aware run's fit report
        err_text = "0" if conv == "exact" else ("-" if err is None else f"{err:.3f}")
        mean, std = r["test_score_mean"], r["test_score_std"]
        lines.append(f"| {name} | {conv} | {r['total_params'] / 1e6:.1f}M | {err_text} | {r['seeds']} | "
                     f"{mean:.3f}" + (f" ± {std:.3f}" if r["seeds"] > 1 else "") + " |")
    table = "\n".join(lines)
    print(table)
    doc = Path(doc)
    write_between_markers(doc, CONVERSION_START, CONVERSION_END, table)


COMPRESSED_START = "<!-- compressed-inference table: printed by `python results/make_tables.py compressed` -->"
COMPRESSED_END = "<!-- end of compressed-inference table -->"


def compressed_table(path=HERE / "benchmarks" / "compressed_cpu.json", doc=HERE.parent / "docs" / "compression.md"):
    """``benchmarks/bench_compressed.py``'s rows as a markdown table, printed and written into
    ``doc`` between :data:`COMPRESSED_START` / :data:`COMPRESSED_END`."""
    path = Path(path)
    if not path.is_file():
        return
    d = json.loads(path.read_text())
    lines = [f"{d['model']}; {d['ratio']:.0%} of the expert parameters kept; prefill {d['tokens']} tokens, decode "
             f"{d['new_tokens']} tokens; {d['threads']} thread(s), {d['repeats']} interleaved repeats.", "",
             "| case | expert memory at inference | prefill vs uncompressed | decode vs uncompressed | decode ms/token |",
             "|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['case']} | {r['expert_memory_ratio']:.3f}x | {r['prefill_vs_uncompressed']:.2f}x "
                     f"| {r['decode_vs_uncompressed']:.2f}x | {r['decode_ms_per_token']:.1f} |")
    table = "\n".join(lines)
    print(table)
    doc = Path(doc)
    write_between_markers(doc, COMPRESSED_START, COMPRESSED_END, table)


if __name__ == "__main__":
    SUBCOMMANDS = {
        "compressed": compressed_table,
        "conversion": conversion_table,
        "moe-compression": lambda: moe_compression_table(doc=moe_compression_doc()),
        "benchmarks": benchmark_tables,
        "evidence": evidence_tables,
        "decode": decode_table,
        "checksum": checksum_table,
        "architectures": architecture_table,
    }
    chosen = SUBCOMMANDS.get(sys.argv[1]) if len(sys.argv) == 2 else None
    if chosen is not None:
        chosen()
    else:  # no subcommand (or an unknown one, as before): the default tables
        benchmark_tables()
        decode_table()
        checksum_table()
        evidence_tables()
