"""recipes/moe_compression.py on tiny Mixtral models: the baselines (merging, pruning) against
MoE blocks computed by hand from the original weights, the tnmoe methods' wiring against SVDs
computed here, and a tiny study run end to end (summary from the runs' records, reference PPL
from the saved base model, resume, settings check, the docs table)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT / "results"))
FIX = Path(__file__).resolve().parent / "fixtures"

import moe_compression as mc  # noqa: E402
from tiny_models import MIXTRAL_DIMS, tiny_mixtral, token_batches  # noqa: E402
import tnmoe.moe as moe  # noqa: E402

D, FF, E, K = MIXTRAL_DIMS


def _weights(model, layer):
    """One layer's original matrices: gate, up ``(E, FF, D)``, down ``(E, D, FF)``, router ``(E, D)``."""
    mlp = model.model.layers[layer].mlp
    gu = mlp.experts.gate_up_proj.detach().clone()
    return {"gate": gu[:, :FF], "up": gu[:, FF:], "down": mlp.experts.down_proj.detach().clone(),
            "router": mlp.gate.weight.detach().clone()}


def _expert(w, e, x):
    return (torch.nn.functional.silu(x @ w["gate"][e].T) * (x @ w["up"][e].T)) @ w["down"][e].T


def _top_k(logits):
    """Mixtral's routing by hand: softmax in float32 (as its router computes it), top-k, renormalised."""
    top, idx = torch.softmax(logits.float(), -1).topk(K, -1)
    return (top / top.sum(-1, keepdim=True)).double(), idx


def _routing_counts(model, batches):
    """Top-k picks per expert of every layer, from the routers' own outputs (not the recipe's hooks)."""
    counts = {i: torch.zeros(E, dtype=torch.long) for i in range(2)}

    def count(i):
        def hook(module, args, out):  # returns None: the router's output is unchanged
            counts[i].add_(torch.bincount(out[2].reshape(-1), minlength=E))
        return hook

    hooks = [model.model.layers[i].mlp.gate.register_forward_hook(count(i)) for i in range(2)]
    with torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)
    for h in hooks:
        h.remove()
    return counts


def _block_inputs(seed=5, tokens=40):
    return torch.randn(1, tokens, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_pruning_keeps_the_most_routed_experts_and_their_router_rows():
    model, batches = tiny_mixtral(), token_batches()
    names = mc.experts_names(model)
    counts = _routing_counts(model, batches)
    w = {i: _weights(model, i) for i in range(2)}
    x = _block_inputs()
    with torch.no_grad():
        original = {i: model.model.layers[i].mlp(x) for i in range(2)}
    before = mc.expert_parameters(model, names)
    info = mc.apply_method(model, "prune", 0.5, names, batches, None)
    assert before == 2 * 3 * E * D * FF and mc.expert_parameters(model, names) == before // 2
    for i in range(2):
        keep = sorted(sorted(range(E), key=lambda e: (-int(counts[i][e]), e))[:2])
        assert info["kept_experts"][names[i]] == keep
        assert info["routing_counts"][names[i]] == counts[i].tolist()
        # the pruned block by hand: softmax over the kept router rows, top-2, renormalised
        t = x[0]
        top, idx = _top_k(t @ w[i]["router"][keep].T)
        want = torch.zeros_like(t)
        for slot in range(K):
            for j, e in enumerate(keep):
                sel = idx[:, slot] == j
                want[sel] += top[sel, slot, None] * _expert(w[i], e, t[sel])
        with torch.no_grad():
            got = model.model.layers[i].mlp(x)[0]
        # float64 experts, float32 routing weights computed alike: the same products summed in another order
        assert torch.allclose(got, want, rtol=0, atol=1e-12 * float(want.abs().max()))
        reference = {f"model.layers.{i}.mlp": [(x, original[i])]}
        err = mc.block_output_errors(model, reference)[0]
        assert err == pytest.approx(float((want - original[i][0]).norm() / original[i][0].norm()), rel=1e-9)
        assert err > 0.01  # pruning half the experts changes the block


def test_merging_averages_each_group_by_routing_frequency_and_routes_merged_indices_to_the_survivor():
    model, batches = tiny_mixtral(), token_batches()
    names = mc.experts_names(model)
    counts = _routing_counts(model, batches)
    w = {i: _weights(model, i) for i in range(2)}
    # the first 1024 tokens each experts module sees are the first batches' tokens (no padding), in order
    captured = {i: [] for i in range(2)}
    hooks = [model.model.layers[i].mlp.register_forward_hook(
        lambda mod, args, out, i=i: captured[i].append(args[0].reshape(-1, D).detach().clone())) for i in range(2)]
    with torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)
    for h in hooks:
        h.remove()
    x = _block_inputs()
    info = mc.apply_method(model, "merge", 0.5, names, batches, None)
    assert mc.expert_parameters(model, names) == 2 * 3 * 2 * D * FF
    for i in range(2):
        survivors = sorted(sorted(range(E), key=lambda e: (-int(counts[i][e]), e))[:2])
        calib = torch.cat(captured[i])
        outs = [_expert(w[i], e, calib).reshape(-1) for e in range(E)]
        cos = [[float(torch.dot(a, b) / (a.norm() * b.norm())) for b in outs] for a in outs]
        want_map = [survivors.index(e) if e in survivors else max(range(2), key=lambda g: cos[e][survivors[g]])
                    for e in range(E)]
        assert info["expert_map"][names[i]] == want_map
        assert sorted(set(want_map)) == [0, 1]
        merged = {}
        for role in ("gate", "up", "down"):
            merged[role] = torch.stack([
                sum(counts[i][e].double() * w[i][role][e] for e in range(E) if want_map[e] == g)
                / sum(counts[i][e].double() for e in range(E) if want_map[e] == g) for g in range(2)])
        # the block by hand: the original router over all E rows, each pick runs its group's merged expert
        t = x[0]
        top, idx = _top_k(t @ w[i]["router"].T)
        want = torch.zeros_like(t)
        for slot in range(K):
            for e in range(E):
                sel = idx[:, slot] == e
                want[sel] += top[sel, slot, None] * _expert(merged, want_map[e], t[sel])
        with torch.no_grad():
            got = model.model.layers[i].mlp(x)[0]
        assert torch.allclose(got, want, rtol=0, atol=1e-12 * float(want.abs().max()))


def test_merging_and_pruning_refuse_a_ratio_that_is_not_whole_experts():
    model = tiny_mixtral()
    names = mc.experts_names(model)
    with pytest.raises(mc.RecipeError, match="multiples of 1/E"):
        mc.apply_method(model, "prune", 0.3, names, token_batches(n=1), None)


class _Args:
    m, quiet = 3, True


def _low_rank_bank(model, layer, role):
    return getattr(model.model.layers[layer].mlp.experts.experts, role).weights().detach()


def test_svd_is_the_truncated_svd_of_each_expert_and_data_blind():
    """``svd``: every expert matrix is its own rank-r truncated SVD (r the bond compress chose),
    whatever the calibration data; the count stays within the budget."""
    model, other = tiny_mixtral(), tiny_mixtral()
    names = mc.experts_names(model)
    w = _weights(model, 1)
    before = mc.expert_parameters(model, names)
    info = mc.apply_method(model, "svd", 0.5, names, token_batches(seed=1), _Args())
    mc.apply_method(other, "svd", 0.5, names, token_batches(seed=2, n=1), _Args())
    r = info["max_bond"]
    assert r == int(0.5 * D * FF / (D + FF))  # the largest rank whose r (D + FF) per matrix fits the budget
    assert mc.expert_parameters(model, names) == info["compress_params_after"] == 2 * 3 * E * r * (D + FF) <= before / 2
    for role in ("gate", "up", "down"):
        got = _low_rank_bank(model, 1, role)
        assert torch.equal(got, _low_rank_bank(other, 1, role))  # other calibration data, same matrices
        for e in range(E):
            U, S, Vh = torch.linalg.svd(w[role][e], full_matrices=False)
            want = (U[:, :r] * S[:r]) @ Vh[:r]
            # float64, distinct singular values: the SVD is unique up to rounding
            assert torch.allclose(got[e], want, rtol=0, atol=1e-10 * float(w[role][e].abs().max()))


def test_whitened_svd_beats_svd_on_the_block_output_error_at_the_same_budget():
    model, svd_model = tiny_mixtral(), tiny_mixtral()
    names = mc.experts_names(model)
    reference = mc.capture_blocks(tiny_mixtral(), names, token_batches(seed=3, n=2))
    calibration = token_batches(n=4)
    a = mc.apply_method(model, "whitened-svd", 0.5, names, calibration, _Args())
    b = mc.apply_method(svd_model, "svd", 0.5, names, calibration, _Args())
    assert a["max_bond"] == b["max_bond"]
    assert mc.expert_parameters(model, names) == mc.expert_parameters(svd_model, names)
    # random weights, random tokens: the whitening gains little but must not lose on layer 0
    # (same inputs as calibration's distribution; layer 1 sees compressed inputs in both)
    assert mc.block_output_errors(model, reference)[0] < mc.block_output_errors(svd_model, reference)[0]


def test_base_delta_is_a_shared_base_plus_rank_r_deltas_within_the_budget():
    """``base-delta``: per layer and role one base matrix shared by the experts plus a rank-r delta
    each; r is the largest whose count fits the budget, and the bank is fitted to data (it beats
    the same structure fitted data-blind on the calibration objective's layer 0)."""
    model = tiny_mixtral()
    names = mc.experts_names(model)
    before = mc.expert_parameters(model, names)
    reference = mc.capture_blocks(tiny_mixtral(), names, token_batches(seed=3, n=2))
    info = mc.apply_method(model, "base-delta", 0.5, names, token_batches(n=4), _Args())
    r = info["max_bond"]
    # per matrix: D * FF (base) + E * r * (D + FF) (deltas); 3 matrices, 2 layers
    assert r == int((0.5 * E - 1) * D * FF / (E * (D + FF)))
    assert mc.expert_parameters(model, names) == info["compress_params_after"] \
        == 2 * 3 * (D * FF + E * r * (D + FF)) <= before / 2
    bank = model.model.layers[1].mlp.experts.experts.up
    assert isinstance(bank, moe.BaseDeltaExpertBank) and bank.rank == r
    blind = tiny_mixtral()
    moe.convert(blind, moe.MoEConfig(expert_type="base_delta", max_bond=r), progress=False)
    assert mc.block_output_errors(model, reference)[0] < mc.block_output_errors(blind, reference)[0]


# -- the study end to end -----------------------------------------------------------------------------
def _study_args(out, *extra):
    return ["--output-dir", str(out), "--train-file", str(FIX / "wikitext" / "train.txt"),
            "--test-file", str(FIX / "wikitext" / "test.txt"), "--vocab-size", "300", "--block-size", "32",
            "--layers", "2", "--hidden", "32", "--intermediate", "48", "--experts", "4", "--heads", "2",
            "--kv-heads", "1", "--base-epochs", "1", "--batch-size", "4", "--calibration-blocks", "8",
            "--error-blocks", "4", "--recovery-steps", "2", "--recovery-batch-size", "2", "--m", "3",
            "--seeds", "1", "--ratios", "50", "--threads", "1", "--quiet", *extra]


def _naive_perplexity(model, blocks):
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in blocks:  # one block at a time, summed in float64
            logits = model(input_ids=b[None]).logits[0, :-1].double()
            nll += float(-torch.log_softmax(logits, -1).gather(1, b[1:, None]).sum())
            count += len(b) - 1
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_compression")
    summary = mc.main(_study_args(out, "--methods", "svd,mpoe,merge,prune"))
    return out, summary


def test_tiny_study_summary_is_the_runs_records(tiny_study):
    out, summary = tiny_study
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert sorted(runs) == ["merge-r50-s1", "mpoe-r50-s1", "prune-r50-s1", "svd-r50-s1", "uncompressed-s1"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "pareto.png").stat().st_size > 0
    ref = runs["uncompressed-s1"]
    assert summary["uncompressed_ppl_mean"] == ref["ppl"]
    assert [r["method"] for r in summary["rows"]] == ["svd", "mpoe", "merge", "prune"]
    for row in summary["rows"]:
        run = runs[f"{row['method']}-r50-s1"]
        assert row["family"] == ("baseline" if row["method"] in ("merge", "prune") else "tnmoe")
        assert row["seeds"] == [1] and row["ppl_std"] == 0.0
        assert (row["ppl_mean"], row["ppl_recovered_mean"], row["output_error_mean"]) == (
            run["ppl"], run["ppl_recovered"], sum(run["output_error"]) / 2)
        assert row["expert_param_ratio"] == run["expert_params"] / ref["expert_params"] <= 0.5
        assert run["expert_params_before"] == ref["expert_params"] == 2 * 3 * 4 * 32 * 48
        assert math.isfinite(run["ppl_recovered"]) and len(run["output_error"]) == 2
    assert {r["method"]: r["expert_param_ratio"] for r in summary["rows"]}["prune"] == 0.5


def test_tiny_study_reference_ppl_is_the_saved_base_models(tiny_study):
    """The uncompressed PPL, recomputed here from the saved base model one block at a time."""
    out, summary = tiny_study
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from mpoe_gpt2 import blocks_of, read_lines

    tok = PreTrainedTokenizerFast.from_pretrained(out / "base" / "tokenizer")
    blocks = blocks_of(tok, read_lines(str(FIX / "wikitext" / "test.txt")), 32, None)
    model = AutoModelForCausalLM.from_pretrained(out / "base" / "seed1" / "model").eval()
    # float32 logits; the recipe sums per-token NLL of batches in float32, here in float64: the
    # mean NLL agrees to ~1e-6 relative (a few float32 ulps per term, ~2e3 terms summed)
    assert summary["uncompressed_ppl_mean"] == pytest.approx(_naive_perplexity(model, blocks), rel=1e-5)
    record = json.loads((out / "runs" / "uncompressed-s1.json").read_text())
    assert record["test_tokens"] == blocks.numel()


def test_tiny_study_resumes_and_refuses_runs_of_other_settings(tiny_study, monkeypatch):
    out, summary = tiny_study
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(mc, "apply_method", must_not_run)
    monkeypatch.setattr(mc, "train_base", must_not_run)
    assert mc.main(_study_args(out, "--methods", "svd,mpoe,merge,prune")) == summary
    subset = mc.main(_study_args(out, "--methods", "prune", "--summary-only"))
    assert [r["method"] for r in subset["rows"]] == ["prune"]
    with pytest.raises(mc.StudyError, match="recovery_steps"):
        mc.main(_study_args(out, "--methods", "prune", "--recovery-steps", "3"))


def test_make_tables_prints_the_summary_between_the_docs_markers(tiny_study, tmp_path, capsys):
    import make_tables

    out, _ = tiny_study
    summary = json.loads((out / "summary.json").read_text())  # the resume test may have rewritten it
    doc = tmp_path / "page.md"
    start, end = make_tables.MOE_COMPRESSION_START, make_tables.MOE_COMPRESSION_END
    doc.write_text(f"intro\n\n{start}\nold table\n{end}\n\nafter\n")
    make_tables.moe_compression_table(out / "summary.json", doc)
    printed = capsys.readouterr().out
    text = doc.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("\nafter\n")
    for row in summary["rows"]:
        line = next(ln for ln in printed.splitlines() if ln.startswith(f"| {row['method']} |"))
        assert f"{row['ppl_mean']:.2f}" in line and f"{row['expert_param_ratio']:.3f}" in line
        assert line in text
    with pytest.raises(ValueError, match="markers"):
        make_tables.moe_compression_table(out / "summary.json", tmp_path / "missing.md")


def test_the_docs_table_is_the_committed_summary(capsys):
    """The table in the docs is what make_tables prints from results/moe_compression/summary.json
    (fails after a new run until `python results/make_tables.py moe-compression` is rerun)."""
    import make_tables

    summary = ROOT / "results" / "moe_compression" / "summary.json"
    if not summary.is_file():
        pytest.skip("no committed moe_compression summary yet")
    doc = make_tables.moe_compression_doc()
    text = doc.read_text()
    make_tables.moe_compression_table(summary, None)
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("|"):
            assert line in text, f"{doc} lacks the row {line!r}: rerun python results/make_tables.py moe-compression"


def test_a_pretrained_model_is_compressed_with_calibration_from_a_text_file(tmp_path):
    """``--model PATH --calibration-file F``: no training; the reference PPL is the given model's."""
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    from mpoe_gpt2 import blocks_of, read_lines, train_bpe

    train = read_lines(str(FIX / "wikitext" / "train.txt"))
    tok = train_bpe(train, 300)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    path = tmp_path / "pretrained"
    MixtralForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(train[:20]))
    out = tmp_path / "study"
    summary = mc.main(["--model", str(path), "--calibration-file", str(calib), "--output-dir", str(out),
                       "--train-file", str(FIX / "wikitext" / "train.txt"), "--test-file",
                       str(FIX / "wikitext" / "test.txt"), "--block-size", "32", "--calibration-blocks", "4",
                       "--error-blocks", "2", "--recovery-steps", "1", "--recovery-batch-size", "2",
                       "--methods", "svd,prune", "--ratios", "50", "--seeds", "1", "--quiet"])
    assert not (out / "base").exists() or not any((out / "base").glob("seed*"))  # nothing trained or saved
    blocks = blocks_of(tok, read_lines(str(FIX / "wikitext" / "test.txt")), 32, None)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert summary["uncompressed_ppl_mean"] == pytest.approx(_naive_perplexity(model, blocks), rel=1e-5)
    assert [r["method"] for r in summary["rows"]] == ["svd", "prune"]
    record = json.loads((out / "runs" / "prune-r50-s1.json").read_text())
    # calibration statistics came from the calibration file's 4 blocks of 32 tokens, top-2 each
    assert all(sum(c) == 4 * 32 * 2 for c in record["routing_counts"].values())


def test_a_budget_below_the_smallest_structure_is_recorded_as_not_expressible(tiny_study, capsys, monkeypatch):
    """mpoe at 99% removed: even bond 1 exceeds the budget; the run says so instead of scoring a
    model above the budget, and the summary and the table list it (the saved base model is reused)."""
    import make_tables

    out, _ = tiny_study
    monkeypatch.setattr(mc, "train_base", lambda *a, **k: pytest.fail("the saved base model was not reused"))
    summary = mc.main(_study_args(out, "--methods", "mpoe", "--ratios", "99"))
    record = json.loads((out / "runs" / "mpoe-r99-s1.json").read_text())
    assert "below what bond 1 reaches" in record["error"] and "ppl" not in record
    assert summary["rows"] == [] and summary["not_expressible"] == [
        {"method": "mpoe", "removed_percent": 99, "seed": 1, "error": record["error"]}]
    capsys.readouterr()
    make_tables.moe_compression_table(out / "summary.json", None)
    assert "Not expressible: mpoe at 99% (seed 1)" in capsys.readouterr().out


def test_a_pretrained_model_path_is_compressed_like_the_model_trained_here(tiny_study, tmp_path):
    """``--model PATH``: a saved MoE folder (model + tokenizer) stands in for a pretrained one. It is
    the tiny study's own base model, so the reference PPL and each method's PPL and output errors
    must be the trained-here run's (same weights, tokenizer, calibration and test blocks)."""
    import shutil

    out, _ = tiny_study
    pretrained = tmp_path / "pretrained"
    shutil.copytree(out / "base" / "seed1" / "model", pretrained)
    for f in (out / "base" / "tokenizer").iterdir():
        if f.is_file() and f.name != "made_from.json":
            shutil.copy(f, pretrained / f.name)
    got = mc.main(_study_args(tmp_path / "study", "--model", str(pretrained), "--methods", "svd,prune"))
    want = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    runs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "study" / "runs").glob("*.json")}
    assert sorted(runs) == ["prune-r50-s1", "svd-r50-s1", "uncompressed-s1"]
    assert runs["uncompressed-s1"]["settings"]["base"]["model"] == str(pretrained)
    for name in runs:
        # the same float32 computations in the same order; the model was reloaded, not copied
        assert runs[name]["ppl"] == pytest.approx(want[name]["ppl"], rel=1e-6), name
        assert runs[name]["expert_params"] == want[name]["expert_params"]
    for name in ("svd-r50-s1", "prune-r50-s1"):
        assert runs[name]["output_error"] == pytest.approx(want[name]["output_error"], rel=1e-5, abs=1e-7)
    assert got["uncompressed_ppl_mean"] == pytest.approx(want["uncompressed-s1"]["ppl"], rel=1e-6)
