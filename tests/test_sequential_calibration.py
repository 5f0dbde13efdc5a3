"""Sequential (error-correcting) calibration: fitting each FFN to the original model's outputs
from the inputs the already-truncated FFNs before it give. Checked against least squares solved
on the samples themselves and against activations recorded from the models the fits describe."""

from __future__ import annotations

import copy

import pytest
import torch

import tnmoe.moe as moe
from tiny_models import tiny_bert
from tnmoe.models.calibration import collect_referenced_covariances, substitute_matrices
from tnmoe.models.convert import find_target_modules
from tnmoe.moe import MoEConfig
from tnmoe.networks import MPOBank, ReferencedCovariance, fit_mpo_bank
from tnmoe.networks.fit import whitened_svd

F64 = torch.float64


def _pair(n=600, dim=12, seed=0):
    """Reference inputs ``X`` and perturbed inputs ``X' = X + noise``, float64, correlated."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))
    X = torch.randn(n, dim, generator=g, dtype=F64) * torch.logspace(0, -1.5, dim, dtype=F64) @ basis.T + 0.5
    Xp = X + 0.2 * torch.randn(n, dim, generator=g, dtype=F64) * X.std(0)
    return X, Xp


def _objective(W, W_hat, X, Xp) -> float:
    """``||W X^T - Ŵ X'^T||^2`` from the samples."""
    return float(((X @ W.T - Xp @ W_hat.T) ** 2).sum())


def test_referenced_whitened_svd_is_the_least_squares_optimum_on_the_samples():
    X, Xp = _pair()
    W = torch.randn(10, 12, generator=torch.Generator().manual_seed(1), dtype=F64)
    acc = ReferencedCovariance(12, ridge=0.0)  # the exact least-squares problem
    acc.update(Xp[:250], reference=X[:250])
    acc.update(Xp[250:], reference=X[250:])  # streamed in two chunks
    rank = 4
    # independent closed form: with X' = Q R, ||A - Ŵ X'^T|| is minimised by Ŵ = [A Q]_r R^{-T}, A = W X^T
    Q, R = torch.linalg.qr(Xp)
    u, s, vh = torch.linalg.svd(W @ X.T @ Q)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(R.T)
    ours = whitened_svd(W, rank, acc)
    # both solve the same float64 least-squares problem (X' has condition ~22): each solution is off
    # by ~1e-14 relative, and the objective at its minimum moves only at second order in that
    assert _objective(W, ours, X, Xp) <= _objective(W, best, X, Xp) * (1 + 1e-9)
    # the reported error is the samples' relative error (float64 moments of 600 rows)
    direct = (_objective(W, ours, X, Xp) / float(((X @ W.T) ** 2).sum())) ** 0.5
    assert acc.reference_output_error(W, ours) == pytest.approx(direct, rel=1e-9)
    # without perturbation the effective target is the matrix itself
    same = ReferencedCovariance(12)
    same.update(X, reference=X)
    torch.testing.assert_close(same.effective_target(W), W, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ridge", [0.0, 1e-2, 0.5])
def test_effective_target_is_the_full_rank_fit_anchored_to_the_original_by_the_ridge(ridge):
    """``W~`` minimises ``||W X^T - Ŵ X'^T||^2 + λ n ||Ŵ - W||^2`` (λ = ridge * mean(diag C')):
    checked against lstsq on the augmented sample system."""
    X, Xp = _pair()
    W = torch.randn(10, 12, generator=torch.Generator().manual_seed(2), dtype=F64)
    acc = ReferencedCovariance(12, ridge=ridge)
    acc.update(Xp, reference=X)
    n = X.shape[0]
    lam = ridge * float((Xp * Xp).sum(0).mean()) / n
    A = torch.cat([Xp, (lam * n) ** 0.5 * torch.eye(12, dtype=F64)])
    B = torch.cat([X @ W.T, (lam * n) ** 0.5 * W.T])
    expected = torch.linalg.lstsq(A, B).solution.T
    torch.testing.assert_close(acc.effective_target(W), expected, rtol=1e-9, atol=1e-10)
    # a larger ridge keeps the target nearer the original
    if ridge > 0:
        loose = ReferencedCovariance(12, ridge=0.0)
        loose.update(Xp, reference=X)
        assert (acc.effective_target(W) - W).norm() < (loose.effective_target(W) - W).norm()
    for bad in (-1e-3, float("nan"), True, "0.01"):
        with pytest.raises(ValueError, match="ridge"):
            ReferencedCovariance(12, ridge=bad)


def test_referenced_mpo_fit_lowers_the_referenced_objective_and_reports_it():
    X, Xp = _pair(dim=12, seed=3)
    W = torch.randn(12, 12, generator=torch.Generator().manual_seed(4), dtype=F64)
    acc = ReferencedCovariance(12)
    acc.update(Xp, reference=X)
    plain = InputCovarianceOf(Xp)
    in_f, out_f = [3, 4], [4, 3]
    cores_ref, report = fit_mpo_bank(W, in_f, out_f, calibration=acc, max_bond=3, sweeps=6)
    cores_plain, _ = fit_mpo_bank(W, in_f, out_f, calibration=plain, max_bond=3, sweeps=6)
    M_ref = torch.einsum("aoib,bpjc->opij", cores_ref[0][0], cores_ref[1][0]).reshape(12, 12)
    M_plain = torch.einsum("aoib,bpjc->opij", cores_plain[0][0], cores_plain[1][0]).reshape(12, 12)
    # fitting to the reference's outputs does better on them than fitting W to the perturbed inputs
    assert _objective(W, M_ref, X, Xp) < _objective(W, M_plain, X, Xp)
    direct = (_objective(W, M_ref, X, Xp) / float(((X @ W.T) ** 2).sum())) ** 0.5
    assert report.matrices[0].reference_output_error == pytest.approx(direct, rel=1e-9)
    with pytest.raises(ValueError, match="reference="):
        acc.update(Xp)


def InputCovarianceOf(X):
    from tnmoe.networks import InputCovariance

    acc = InputCovariance(X.shape[1])
    acc.update(X)
    return acc


def _batches(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 100, (4, 9), generator=g)
        mask = torch.ones(4, 9, dtype=torch.long)
        mask[1, 5:] = 0
        mask[3, 2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _inputs(model, module, batches) -> torch.Tensor:
    """Non-padding inputs of ``module`` over the batches, float64 rows."""
    rows, current = [], {}
    h = module.register_forward_pre_hook(lambda m, a: rows.append(a[0][current["m"]].double()))
    with torch.no_grad():
        for b in batches:
            current["m"] = b["attention_mask"].bool()
            model(**b)
    h.remove()
    return torch.cat(rows)


def test_referenced_statistics_pair_the_original_and_the_substituted_models_inputs():
    torch.manual_seed(0)
    model = tiny_bert().eval()
    batches = _batches()
    targets = dict(find_target_modules(model))
    first, second = "bert.encoder.layer.0", "bert.encoder.layer.1"
    W_up0 = model.bert.encoder.layer[0].intermediate.dense.weight.detach()
    replaced = {"up": W_up0 * 0.7 + 0.01}
    subs = substitute_matrices(model, targets[first], replaced)
    stats = collect_referenced_covariances(model, second, targets[second], batches, subs, progress=False)
    # independent: the same model with the matrix really replaced
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.bert.encoder.layer[0].intermediate.dense.weight.copy_(replaced["up"])
    for role, module_of in (("up", lambda m: m.bert.encoder.layer[1].intermediate.dense),
                            ("down", lambda m: m.bert.encoder.layer[1].output.dense)):
        X, Xp = _inputs(model, module_of(model), batches), _inputs(edited, module_of(edited), batches)
        acc = stats[role]
        assert acc.count == X.shape[0] == 3 * (36 - 4 - 7)
        # float32 activations of two ways of running the same weights: equal to a few float32 ulps
        torch.testing.assert_close(acc.covariance(), Xp.T @ Xp / len(Xp), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(acc.sum_cross / acc.total_weight, X.T @ Xp / len(X), rtol=1e-5, atol=1e-6)
    assert torch.equal(model.bert.encoder.layer[0].intermediate.dense.weight, W_up0)  # model not modified


def test_sequential_truncation_fits_each_ffn_to_the_original_outputs_from_the_truncated_inputs():
    torch.manual_seed(0)
    model = tiny_bert().eval()
    batches = _batches()
    config = MoEConfig(num_experts=1, m=3, max_bond=2)
    seq = copy.deepcopy(model)
    rows = moe.truncate_ffns(seq, config, method="whitened-svd", calibration=batches, progress=False, sequential=True)
    ind = copy.deepcopy(model)
    rows_ind = moe.truncate_ffns(ind, config, method="whitened-svd", calibration=batches, progress=False)
    # the first FFN sees unperturbed inputs: the same truncation as without sequential
    for a, b in ((seq, ind),):
        torch.testing.assert_close(a.bert.encoder.layer[0].intermediate.dense.weight,
                                   b.bert.encoder.layer[0].intermediate.dense.weight, rtol=1e-5, atol=1e-6)
    # layer 1's up: the rank-r least-squares optimum of the original outputs from the truncated model's inputs
    up_orig = model.bert.encoder.layer[1].intermediate.dense
    X = _inputs(model, up_orig, batches)
    half = copy.deepcopy(seq)  # layer 0 truncated, layer 1 original: the inputs layer 1's fit saw
    with torch.no_grad():
        for name in ("intermediate", "output"):
            getattr(half.bert.encoder.layer[1], name).dense.weight.copy_(
                getattr(model.bert.encoder.layer[1], name).dense.weight)
    Xp = _inputs(half, half.bert.encoder.layer[1].intermediate.dense, batches)
    W = up_orig.weight.detach().double()
    rank = [r for r in rows if r.name.endswith("layer.1") and r.role == "up"][0].rank
    Q, R = torch.linalg.qr(Xp)
    u, s, vh = torch.linalg.svd(W @ X.T @ Q)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(R.T)
    got = seq.bert.encoder.layer[1].intermediate.dense.weight.detach().double()
    # float32 weights and activations against the float64 optimum: within 1e-4 of the objective
    assert _objective(W, got, X, Xp) <= _objective(W, best, X, Xp) * (1 + 1e-4)
    ind_w = ind.bert.encoder.layer[1].intermediate.dense.weight.detach().double()
    assert _objective(W, got, X, Xp) < _objective(W, ind_w, X, Xp)
    # the report's error is against the original outputs
    row = [r for r in rows if r.name.endswith("layer.1") and r.role == "up"][0]
    direct = (_objective(W, got, X, Xp) / float(((X @ W.T) ** 2).sum())) ** 0.5
    assert row.output_error == pytest.approx(direct, abs=1e-4)
    # layer 1's down: fitted after layer 1's up, from the inputs the truncated up gives
    down_orig = model.bert.encoder.layer[1].output.dense
    Xd = _inputs(model, down_orig, batches)
    upped = copy.deepcopy(seq)  # everything truncated but layer 1's down
    with torch.no_grad():
        upped.bert.encoder.layer[1].output.dense.weight.copy_(down_orig.weight)
    Xdp = _inputs(upped, upped.bert.encoder.layer[1].output.dense, batches)
    Wd = down_orig.weight.detach().double()
    rank_d = [r for r in rows if r.name.endswith("layer.1") and r.role == "down"][0].rank
    got_d = seq.bert.encoder.layer[1].output.dense.weight.detach().double()
    # (the undamped optimum is ill-posed here: a rank-limited up leaves near-null input directions,
    # which it fills with entries ~1e6; the fit's ridge keeps them bounded) it beats fitting W
    # itself to those inputs (GPTQ-style) and the independent truncation
    plain = whitened_svd(Wd, rank_d, InputCovarianceOf(Xdp))
    ind_d = ind.bert.encoder.layer[1].output.dense.weight.detach().double()
    assert _objective(Wd, got_d, Xd, Xdp) < _objective(Wd, plain, Xd, Xdp)
    assert _objective(Wd, got_d, Xd, Xdp) < _objective(Wd, ind_d, Xd, Xdp)
    assert len(rows) == len(rows_ind) == 4
    with pytest.raises(ValueError, match="pass calibration"):
        moe.truncate_ffns(copy.deepcopy(model), config, method="data-aware", sequential=True, progress=False)


def test_sequential_convert_reports_the_error_the_converted_model_makes():
    torch.manual_seed(0)
    model = tiny_bert().eval()
    with torch.no_grad():  # FFNs strong enough that layer 0's truncation moves layer 1's inputs
        for layer in model.bert.encoder.layer:
            layer.output.dense.weight.mul_(6.0)
    batches = _batches(seed=2)
    config = MoEConfig(num_experts=2, m=3, max_bond=2, init_noise=0.0)
    conv = moe.convert(copy.deepcopy(model), config, calibration=batches, progress=False, sequential=True,
                       fit_options={"sweeps": 3}).eval()
    layer1 = conv.bert.encoder.layer[1]
    bank = [m for m in layer1.modules() if isinstance(m, MPOBank)][0]  # the up bank
    assert bank.fit_report.matrices[0].reference_output_error is not None
    # what the converted model feeds layer 1's FFN, and what the original layer 1 up computes
    ffn_input = lambda m: m.bert.encoder.layer[1].intermediate  # noqa: E731
    X = _inputs(model, model.bert.encoder.layer[1].intermediate.dense, batches)
    Xp = _inputs(conv, ffn_input(conv), batches)
    W = model.bert.encoder.layer[1].intermediate.dense.weight.detach().double()
    with torch.no_grad():
        W_hat = bank.weights()[0].double()
    direct = (_objective(W, W_hat, X, Xp) / float(((X @ W.T) ** 2).sum())) ** 0.5
    # the MoE layer's float32 activations and the substituted dense FFN's agree to float32
    # rounding (~1e-7 relative), so the two error ratios agree to ~1e-6; calibrating on the
    # original model's inputs instead would be off by ~1e-4 here
    assert bank.fit_report.matrices[0].reference_output_error == pytest.approx(direct, abs=1e-6)


def test_convert_and_truncate_refuse_a_bad_sequential_ridge():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32))
    batches = [{"input_ids": torch.randint(0, 50, (2, 5))}]
    for bad in (-0.1, float("inf")):
        with pytest.raises(ValueError, match="ridge"):
            moe.convert(model, moe.MoEConfig(num_experts=2, m=2, max_bond=2), calibration=batches,
                        sequential=True, sequential_ridge=bad, progress=False)
        with pytest.raises(ValueError, match="ridge"):
            moe.truncate_ffns(model, moe.MoEConfig(num_experts=1, m=2, max_bond=2), method="whitened-svd",
                              calibration=batches, sequential=True, sequential_ridge=bad, progress=False)
    assert not moe.converted_modules(model)
