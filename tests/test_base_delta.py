"""A shared base plus low-rank deltas per expert (D²-MoE's structure): the fit, the bank, and the
bank inside compress / convert / save-load. References are computed here in float64: normal
equations, whitened SVDs, per-expert dense products."""

from __future__ import annotations

import copy

import pytest
import torch

import tnmoe.moe as moe
from tnmoe.moe import MoEConfig
from tnmoe.networks import InputCovariance, base_delta_params, fit_base_delta
from tnmoe.networks.fit import whitened_svd

O, I, NE = 24, 16, 4


def _problem(seed: int = 0):
    """NE related matrices (a common part plus a different part each) and one input covariance
    per matrix, from correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(O, I, generator=g, dtype=torch.float64)
    Ws = torch.stack([common + 0.5 * torch.randn(O, I, generator=g, dtype=torch.float64) for _ in range(NE)])
    covs = []
    for _ in range(NE):
        X = torch.randn(400, I, generator=g, dtype=torch.float64) @ torch.randn(I, I, generator=g, dtype=torch.float64)
        c = InputCovariance(I)
        c.update(X)
        covs.append(c)
    return Ws, covs


def _objective(Ws, covs, B, U, V) -> float:
    return sum(float(torch.einsum("oi,ij,oj->", D, c.covariance(), D))
               for D, c in ((Ws[e] - B - U[e] @ V[e], covs[e]) for e in range(len(Ws))))


# -- the fit -------------------------------------------------------------------------------------------
def test_the_fit_never_raises_the_joint_objective_and_ends_at_a_fixed_point_of_both_steps():
    Ws, covs = _problem()
    rank = 3
    B, U, V, report = fit_base_delta(Ws, rank, calibration=covs, sweeps=30, tol=0.0)
    obj = report.objective
    # each step is an exact minimisation, so the sequence is non-increasing up to float64 rounding
    # of a sum of ~NE * O * I terms (relative 1e-12 of its size)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(obj, obj[1:])) and obj[-1] < 0.8 * obj[0]
    assert obj[-1] == pytest.approx(_objective(Ws, covs, B, U, V), rel=1e-10)
    # the deltas are, given B, each matrix's whitened SVD of its residual (independent closed form)
    for e in range(NE):
        want = whitened_svd(Ws[e] - B, rank, covs[e])
        assert torch.allclose(U[e] @ V[e], want, rtol=0, atol=1e-8 * float(want.abs().max()))
    # one sweep from the start, recomputed here: B solves the normal equations
    # B (sum_e C_e) = sum_e (W_e - U_e V_e) C_e for the start's deltas, then the deltas follow
    B0, U0, V0, _ = fit_base_delta(Ws, rank, calibration=covs, sweeps=0)
    B1, U1, V1, _ = fit_base_delta(Ws, rank, calibration=covs, sweeps=1, tol=0.0)
    Cs = [c.covariance() for c in covs]
    want_B = torch.linalg.solve(sum(Cs), sum((Ws[e] - U0[e] @ V0[e]) @ Cs[e] for e in range(NE)).T).T
    assert torch.allclose(B1, want_B, rtol=0, atol=1e-9 * float(want_B.abs().max()))
    for e in range(NE):
        want = whitened_svd(Ws[e] - want_B, rank, covs[e])
        assert torch.allclose(U1[e] @ V1[e], want, rtol=0, atol=1e-8 * float(want.abs().max()))
    # each rank component is balanced: U's column and V's row of equal norm (float64 rescaling)
    assert torch.allclose(U.norm(dim=1), V.norm(dim=2), rtol=1e-10, atol=0)
    assert [m.output_error for m in report.matrices] == pytest.approx(
        [(float(torch.einsum("oi,ij,oj->", Ws[e] - B - U[e] @ V[e], covs[e].covariance(), Ws[e] - B - U[e] @ V[e]))
          / float(torch.einsum("oi,ij,oj->", Ws[e], covs[e].covariance(), Ws[e]))) ** 0.5 for e in range(NE)],
        rel=1e-9)


def test_full_rank_deltas_reproduce_the_targets_and_data_blind_is_the_mean_plus_svd():
    Ws, covs = _problem(1)
    B, U, V, _ = fit_base_delta(Ws, min(O, I), calibration=covs)
    assert torch.allclose(B + torch.bmm(U, V), Ws, rtol=0, atol=1e-10 * float(Ws.abs().max()))
    B, U, V, report = fit_base_delta(Ws, 2, sweeps=0)  # C = I: the plain mean, then truncated SVDs
    assert torch.allclose(B, Ws.mean(0), rtol=0, atol=1e-12 * float(Ws.abs().max()))
    for e in range(NE):
        u, s, vh = torch.linalg.svd(Ws[e] - Ws.mean(0))
        assert torch.allclose(U[e] @ V[e], (u[:, :2] * s[:2]) @ vh[:2], rtol=0, atol=1e-10)
    assert report.sweeps == 0


def test_the_weighted_base_is_what_the_data_asks_for():
    """With experts seen through different inputs, the start's base is the C-weighted mean
    ``(sum W_e C_e)(sum C_e)^-1``, not the plain mean (checked against a solve written here)."""
    Ws, covs = _problem(2)
    B, _, _, _ = fit_base_delta(Ws, 1, calibration=covs, sweeps=0)
    Cs = [c.covariance() for c in covs]
    want = torch.linalg.solve(sum(Cs), sum(W @ C for W, C in zip(Ws, Cs)).T).T
    assert torch.allclose(B, want, rtol=0, atol=1e-9 * float(want.abs().max()))
    assert float((want - Ws.mean(0)).norm()) > 1e-2 * float(want.norm())


# -- the bank -------------------------------------------------------------------------------------------
def test_bank_forward_and_gradients_match_per_expert_dense_products():
    Ws, covs = _problem(3)
    bank = moe.BaseDeltaExpertBank(num_experts=NE, in_features=I, out_features=O, rank=3, dtype=torch.float64)
    report = bank.fit_matrices(Ws, covs)
    assert len(report.matrices) == NE
    x = torch.randn(9, I, dtype=torch.float64, requires_grad=True)
    counts = [3, 0, 4, 2]
    y = bank(x, counts)
    W = bank.weights().detach().requires_grad_(True)
    ref = torch.cat([x[0:3] @ W[0].T, x[3:7] @ W[2].T, x[7:9] @ W[3].T])
    assert torch.allclose(y, ref, rtol=0, atol=1e-12 * float(ref.detach().abs().max()))
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    # dL/dbase = sum_e dL/dW_e; dL/dU_e = dL/dW_e V_e^T; dL/dV_e = U_e^T dL/dW_e
    gW = W.grad
    assert torch.allclose(bank.base.grad, gW.sum(0), rtol=0, atol=1e-10)
    assert torch.allclose(bank.delta_out.grad, gW @ bank.delta_in.detach().transpose(1, 2), rtol=0, atol=1e-10)
    assert torch.allclose(bank.delta_in.grad, bank.delta_out.detach().transpose(1, 2) @ gW, rtol=0, atol=1e-10)
    assert bank.num_shared_params() + NE * bank.num_params_per_expert() == base_delta_params(NE, O, I, 3) \
        == sum(p.numel() for p in bank.parameters())
    assert bank.shared_parameters() == [bank.base] and bank.expert_parameters() == [bank.delta_out, bank.delta_in]


def test_clear_errors():
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        moe.BaseDeltaExpertBank(num_experts=2, in_features=4, out_features=4, rank=0)
    with pytest.raises(ValueError, match="share"):
        MoEConfig(expert_type="base_delta", share="none")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        fit_base_delta(torch.randn(2, 3, 3), 0)


# -- in models -------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")

from tiny_models import MIXTRAL_DIMS, VOCAB, tiny_gpt2, tiny_mixtral, token_batches  # noqa: E402

D, FF, E, K = MIXTRAL_DIMS


def _logits(model):
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        return model(ids).logits


def test_compress_to_base_plus_deltas_within_budget_and_round_trip(tmp_path):
    model = tiny_mixtral(torch.float32)
    original = copy.deepcopy(model)
    experts_bytes = 4 * sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    report = moe.compress(model, MoEConfig(expert_type="base_delta"), calibration=token_batches(seq=24),
                          target_ratio=0.5, progress=False)
    rank = report.config.max_bond
    # per layer and matrix (3 per layer, 2 layers): base out*in + E * r * (out + in); the rank is
    # the largest within half the experts' parameters
    per_rank = 2 * 3 * E * (D + FF)
    assert report.params_before == 2 * 3 * E * D * FF
    assert report.params_after == 2 * 3 * D * FF + rank * per_rank
    assert report.params_after <= 0.5 * report.params_before < report.params_after + per_rank
    bank = model.model.layers[0].mlp.experts.experts.up
    assert isinstance(bank, moe.BaseDeltaExpertBank) and bank.rank == rank
    assert f"shared base + rank-{rank} deltas" in str(report)
    counted = moe.count_parameters(model)
    assert report.params_after == counted.shared + E * counted.per_expert
    for layer in report.layers:  # the fit's joint objective never rises
        assert all(all(b <= a * (1 + 1e-9) for a, b in zip(v, v[1:])) for v in layer.objective.values())
    assert torch.isfinite(_logits(model)).all()
    assert not torch.allclose(_logits(model), _logits(original))
    want = _logits(model)
    folder = moe.save_pretrained(model, tmp_path / "compressed")
    loaded = moe.from_pretrained(folder)
    assert isinstance(loaded.model.layers[1].mlp.experts.experts.down, moe.BaseDeltaExpertBank)
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.allclose(_logits(loaded), want, rtol=0, atol=1e-5 * float(want.abs().max()))
    size = (folder / "model.safetensors").stat().st_size
    others = 4 * sum(p.numel() for n, p in original.named_parameters() if ".experts." not in n)
    assert size - others <= 0.5 * experts_bytes + 64 * 1024  # the compressed size, plus the header


def test_full_rank_compression_and_conversion_reproduce_the_logits():
    model = tiny_mixtral()
    want = _logits(model)
    moe.compress(model, MoEConfig(expert_type="base_delta"), calibration=token_batches(n=1), progress=False)
    # float64 base + full-rank deltas rebuild the experts to ~1e-13 relative
    assert torch.allclose(_logits(model), want, rtol=0, atol=1e-9 * float(want.abs().max()))
    converted = tiny_mixtral()
    moe.convert(converted, MoEConfig(expert_type="base_delta"), progress=False)
    assert isinstance(converted.model.layers[0].mlp.experts.experts.gate, moe.BaseDeltaExpertBank)
    assert torch.allclose(_logits(converted), want, rtol=0, atol=1e-9 * float(want.abs().max()))


def test_upcycling_a_dense_ffn_starts_every_expert_at_the_pretrained_matrix_and_trains_the_deltas():
    gpt2 = tiny_gpt2().double().eval()
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = gpt2(ids).logits
    moe.convert(gpt2, MoEConfig(expert_type="base_delta", max_bond=4, num_experts=4, router="topk", top_k=2,
                                capacity_factor=None), progress=False)
    with torch.no_grad():
        got = gpt2(ids).logits
    # experts = base = the pretrained matrix; gate_scaling "preserve" keeps the FFN's value
    assert torch.allclose(got, want, rtol=0, atol=1e-10 * float(want.abs().max()))
    gpt2.train()
    gpt2(ids, labels=ids).loss.backward()
    bank = next(layer for _, layer in moe.moe_layers(gpt2)).experts.up
    assert isinstance(bank, moe.BaseDeltaExpertBank) and bank.rank == 4
    assert float(bank.delta_out.grad.abs().sum()) > 0  # zero delta_out, random delta_in: LoRA's start
    with pytest.raises(ValueError, match="compress"):
        moe.convert(tiny_gpt2(), MoEConfig(expert_type="base_delta", target_ratio=0.5), progress=False)
