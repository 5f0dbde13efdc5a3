"""Per-matrix budgets in whole models: ``MoEConfig(target_ratio=...)`` in ``convert`` (bonds
chosen across layers, recorded, reloaded) and ``truncate_ffns`` (dense models whose FFN matrices
are replaced by their truncations), against independent computations on captured inputs."""

from __future__ import annotations

import copy

import pytest
import torch

import tnmoe.moe as moe
from tnmoe.moe import MoEConfig
from tnmoe.networks import MPO, MPOBank, allocate_bonds, factorize

F64 = torch.float64


def _batches(n=2, seed=0):
    from tiny_models import VOCAB

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (4, 9), generator=g)
        mask = torch.ones(4, 9, dtype=torch.long)
        mask[1, 5:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _bert():
    from tiny_models import tiny_bert

    torch.manual_seed(0)
    return tiny_bert().to(F64).eval()


def _ffn_linears(model):
    """``{'<ffn>.<role>': nn.Linear}`` of a BERT model's FFN matrices, read by hand."""
    out = {}
    for i, layer in enumerate(model.bert.encoder.layer):
        name = f"bert.encoder.layer.{i}"
        out[f"{name}.up"], out[f"{name}.down"] = layer.intermediate.dense, layer.output.dense
    return out


def _captured_covariances(model, batches):
    """Each FFN matrix's input second moment over non-padding tokens, from forward hooks."""
    linears = _ffn_linears(model)
    seen = {k: [] for k in linears}
    mask = {}
    hooks = [lin.register_forward_hook(lambda m, a, o, k=k: seen[k].append(a[0][mask["m"]]))
             for k, lin in linears.items()]
    with torch.no_grad():
        for b in batches:
            mask["m"] = b["attention_mask"].bool()
            model(**b)
    for h in hooks:
        h.remove()
    out = {}
    for k, xs in seen.items():
        X = torch.cat(xs).double()
        out[k] = X.T @ X / X.shape[0]
    return out


def _factors(W, config):
    out_dim, in_dim = W.shape
    return factorize(in_dim, config.factors_for(in_dim)), factorize(out_dim, config.factors_for(out_dim))


@pytest.mark.parametrize("calibrated", [False, True])
def test_target_ratio_chooses_bonds_across_layers_records_and_reloads_them(tmp_path, calibrated):
    model = _bert()
    batches = _batches()
    config = MoEConfig(num_experts=2, m=3, target_ratio=0.3)
    linears = {k: lin.weight.detach().clone() for k, lin in _ffn_linears(model).items()}
    covs = _captured_covariances(model, batches) if calibrated else None
    converted = moe.convert(copy.deepcopy(model), config, calibration=batches if calibrated else None,
                            progress=False, fit_options={"sweeps": 2}).eval()
    recorded = moe.get_moe_config(converted)
    assert set(recorded.bond_dims) == set(linears)
    # the same choice computed independently: allocate_bonds over every matrix, whitened by the captured inputs
    from tnmoe.networks.fit import InputCovariance

    keys = sorted(linears)
    want = allocate_bonds([linears[k] for k in keys], [_factors(linears[k], config) for k in keys], 0.3,
                          calibration=[InputCovariance.from_matrix(covs[k]) for k in keys] if calibrated else None)
    assert {k: recorded.bond_dims[k] for k in keys} == dict(zip(keys, want))
    banks = {n: b for n, b in converted.named_modules() if isinstance(b, MPOBank)}
    one_expert = sum(b.num_params_per_matrix() for b in banks.values())  # one expert's MPO per matrix
    dense = sum(w.numel() for w in linears.values())
    assert one_expert <= 0.3 * dense
    # every expert starts as the truncation with exactly the recorded bonds (TT-SVD, data-blind)
    if not calibrated:
        up = banks["bert.encoder.layer.0.intermediate.experts.up"]
        W = linears["bert.encoder.layer.0.up"]
        ref = MPO.from_matrix(W, *_factors(W, config), bond_dims=recorded.bond_dims["bert.encoder.layer.0.up"])
        assert up.bond_dims[1:-1] == recorded.bond_dims["bert.encoder.layer.0.up"]
        assert torch.allclose(up.weights()[1], ref.to_matrix(), rtol=1e-10, atol=1e-12)
    # the checkpoint rebuilds the per-matrix shapes and computes the same function
    moe.save_pretrained(converted, tmp_path)
    loaded = moe.from_pretrained(tmp_path, copy.deepcopy(model)).eval()
    assert moe.get_moe_config(loaded).bond_dims == recorded.bond_dims
    with torch.no_grad():
        b = batches[0]
        assert torch.equal(loaded(**b).logits, converted(**b).logits)


def test_target_ratio_errors_are_clear():
    with pytest.raises(ValueError, match="not both"):
        MoEConfig(max_bond=4, target_ratio=0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        MoEConfig(target_ratio=1.5)
    with pytest.raises(ValueError, match="MPO experts only"):
        MoEConfig(expert_type="dense", target_ratio=0.5)
    model = _bert()
    cfg = MoEConfig(num_experts=2, m=3, target_ratio=0.3, bond_dims={"elsewhere.up": [2, 2]})
    with pytest.raises(ValueError, match="no bonds for"):
        moe.convert(model, cfg, progress=False)
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, torch.nn.Linear)  # unchanged


@pytest.mark.parametrize("method", ["tt-svd", "svd", "whitened-svd", "data-aware"])
def test_truncate_ffns_replaces_each_matrix_by_its_truncation(method):
    model = _bert()
    batches = _batches(4)  # 128 tokens for 64 features at most: full-rank covariances, nothing damped
    config = MoEConfig(num_experts=1, m=3, max_bond=3)
    before = {k: lin.weight.detach().clone() for k, lin in _ffn_linears(model).items()}
    covs = _captured_covariances(model, batches)
    needs = method in ("whitened-svd", "data-aware")
    rows = moe.truncate_ffns(model, config, method=method, calibration=batches if needs else None, progress=False)
    after = {k: lin.weight.detach() for k, lin in _ffn_linears(model).items()}
    assert {f"{r.name}.{r.role}" for r in rows} == set(before)
    for r in rows:
        key = f"{r.name}.{r.role}"
        W, got, C = before[key], after[key], covs[key]
        in_f, out_f = _factors(W, config)
        tt = MPO.from_matrix(W, in_f, out_f, max_bond=3)
        tt_params = sum(c.numel() for c in tt.cores)
        if method == "tt-svd":
            assert torch.allclose(got, tt.to_matrix(), rtol=1e-10, atol=1e-12)
        elif method == "data-aware":  # fitted to the outputs: never above TT-SVD's output error
            def out_err(A):
                D = A - W
                return float(torch.einsum("oi,ij,oj->", D, C, D))
            assert out_err(got) <= out_err(tt.to_matrix()) * (1 + 1e-9)
            assert r.params == tt_params
        else:  # rank r at the MPO's parameter count, by an independent closed form
            rank = tt_params // sum(W.shape)
            assert r.rank == rank and r.params == rank * sum(W.shape) <= tt_params
            if method == "svd":
                u, s, vh = torch.linalg.svd(W)
                ref = (u[:, :rank] * s[:rank]) @ vh[:rank]
            else:
                # the up matrices' C is singular (BERT's LayerNorm output at init has beta = 0: a
                # hyperplane); the documented rule damps a numerically rank-deficient C by
                # 1e-6 * mean(diag C), and so does this reference
                n = C.shape[0]
                deficient = int(torch.linalg.matrix_rank(C, hermitian=True, rtol=n * torch.finfo(F64).eps)) < n
                Cd = C + (1e-6 * C.diagonal().mean() if deficient else 0.0) * torch.eye(n, dtype=F64)
                L = torch.linalg.cholesky(Cd)  # another square root than the library's (symmetric)
                u, s, vh = torch.linalg.svd(W @ L)
                trunc = (u[:, :rank] * s[:rank]) @ vh[:rank]  # = ref @ L
                ref = torch.linalg.solve_triangular(L.T, trunc.T, upper=True).T
            # one minimiser (distinct singular values); float64 rounding grows with cond(C) (<= ~1e7
            # here): eps * cond ~ 1e-9 of the entries
            assert torch.allclose(got, ref, rtol=0, atol=1e-8 * float(W.abs().max()))
        assert r.weight_error == pytest.approx(float((got - W).norm() / W.norm()), rel=1e-9)
        if r.output_error is not None:
            D = got - W
            want = (float(torch.einsum("oi,ij,oj->", D, C, D)) / float(torch.einsum("oi,ij,oj->", W, C, W))) ** 0.5
            assert r.output_error == pytest.approx(want, rel=1e-6)


def test_truncate_ffns_is_all_or_nothing_and_says_what_it_needs(monkeypatch):
    import tnmoe.models.truncate as truncate

    model = _bert()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="calibration"):
        moe.truncate_ffns(model, MoEConfig(num_experts=1, m=3, max_bond=3), method="whitened-svd")
    with pytest.raises(ValueError, match="max_bond"):
        moe.truncate_ffns(model, MoEConfig(num_experts=1, m=3), method="tt-svd")
    calls = []

    def fails_on_the_last_matrix(W, rank, calibration):
        calls.append(W.shape)
        if len(calls) == 4:
            raise ValueError("injected failure")
        return real(W, rank, calibration)

    real = truncate.whitened_svd
    monkeypatch.setattr(truncate, "whitened_svd", fails_on_the_last_matrix)
    with pytest.raises(ValueError, match="injected"):  # three matrices were computed, none written
        moe.truncate_ffns(model, MoEConfig(num_experts=1, m=3, max_bond=3), method="whitened-svd",
                          calibration=_batches(), progress=False)
    assert len(calls) == 4
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
