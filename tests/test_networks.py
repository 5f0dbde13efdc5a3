import math

import pytest
import torch
from torch import nn

from tnmoe.networks import (
    MPO,
    ContractionEngine,
    MPOLinear,
    TensorTrain,
    contract_network,
    factorize,
    from_finite_mpo,
    from_tensornetwork,
    mpo_bond_dims,
    to_finite_mpo,
    to_tensornetwork,
    tt_svd,
)

PAPER_768 = {3: [8, 12, 8], 5: [3, 4, 4, 4, 4], 7: [2, 2, 4, 4, 3, 2, 2], 9: [2, 2, 2, 2, 3, 2, 2, 2, 2]}
PAPER_3072 = {3: [12, 16, 16], 5: [4, 4, 8, 6, 4], 7: [2, 4, 4, 4, 4, 3, 2], 9: [2, 2, 2, 4, 4, 3, 2, 2, 2]}


def rel_err(a, b):
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


# --- factorization ---------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [768, 3072, 4096, 1000, 7])
@pytest.mark.parametrize("m", [2, 3, 5, 7, 9])
def test_factorize_product_and_balance(dim, m):
    f = factorize(dim, m)
    assert len(f) == m and math.prod(f) == dim
    assert max(f) == _min_max_factor(dim, m)  # no factorization into m factors is more balanced
    centre = (m - 1) // 2  # mountain: non-increasing away from the centre
    assert f[centre] == max(f)
    assert all(f[k] >= f[k - 1] for k in range(1, centre + 1))
    assert all(f[k] >= f[k + 1] for k in range(centre, m - 1))


def _min_max_factor(dim: int, m: int) -> int:
    """Brute force: the smallest possible largest factor of dim split into m factors."""
    def best(n, parts, cap):
        if parts == 1:
            return n if n <= cap else None
        out = None
        for f in range(1, min(n, cap) + 1):
            if n % f == 0:
                rest = best(n // f, parts - 1, f)
                if rest is not None:
                    cand = max(f, rest)
                    out = cand if out is None else min(out, cand)
        return out
    return best(dim, m, dim)


def test_factorize_paper_shapes():
    # the balanced factorization is the paper's for m = 3 and 5; others are given explicitly
    for m in (3, 5):
        assert factorize(768, m) == PAPER_768[m]
        assert factorize(3072, m) == PAPER_3072[m]
    for m in (7, 9):
        assert factorize(768, PAPER_768[m]) == PAPER_768[m]
        mpo = MPO.from_matrix(torch.randn(3072, 768, dtype=torch.float64), PAPER_768[m], PAPER_3072[m])
        assert mpo.in_factors == PAPER_768[m] and mpo.out_factors == PAPER_3072[m]
    with pytest.raises(ValueError):
        factorize(768, [4, 4, 4, 4, 4])


def test_factorize_errors():
    with pytest.raises(ValueError, match="multiply to"):
        factorize(768, [4, 4, 4])
    with pytest.raises(ValueError, match="m >= 2"):
        factorize(768, 1)


# --- lossless round trips ----------------------------------------------------------------------
@pytest.mark.parametrize("m", [3, 5, 7, 9])
@pytest.mark.parametrize("transpose", [False, True])
def test_round_trip_ffn_shapes_float64(m, transpose):
    g = torch.Generator().manual_seed(m)
    out_f, in_f = (PAPER_3072[m], PAPER_768[m]) if not transpose else (PAPER_768[m], PAPER_3072[m])
    W = torch.randn(math.prod(out_f), math.prod(in_f), dtype=torch.float64, generator=g)
    mpo = MPO.from_matrix(W, in_f, out_f)
    assert rel_err(mpo.to_matrix(), W) < 1e-10
    assert mpo.bond_dims == mpo_bond_dims(in_f, out_f)


@pytest.mark.parametrize("m", [3, 5, 7, 9])
def test_round_trip_ffn_shapes_float32(m):
    W = torch.randn(3072, 768, generator=torch.Generator().manual_seed(1))
    mpo = MPO.from_matrix(W, PAPER_768[m], PAPER_3072[m])
    assert mpo.cores[0].dtype == torch.float32
    assert rel_err(mpo.to_matrix(), W) < 1e-5


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_random_shapes(seed):
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(2, 5, (1,), generator=g))
    out_f = [int(v) for v in torch.randint(1, 5, (m,), generator=g)]
    in_f = [int(v) for v in torch.randint(1, 5, (m,), generator=g)]
    W = torch.randn(math.prod(out_f), math.prod(in_f), dtype=torch.float64, generator=g)
    for center in (None, 0, "central", m - 1):
        assert rel_err(MPO.from_matrix(W, in_f, out_f, center=center).to_matrix(), W) < 1e-10


def test_t5_base_bond_dims_and_core_sizes():
    W = torch.randn(3072, 768)
    mpo = MPO.from_matrix(W, in_factors=[3, 4, 4, 4, 4], out_factors=[4, 4, 8, 6, 4])
    assert mpo.bond_dims == [1, 12, 192, 384, 16, 1]
    assert mpo.core_sizes == [144, 36864, 2359296, 147456, 256]
    assert mpo.num_params() == sum(mpo.core_sizes)


def test_central_canonical_form_puts_norm_in_centre():
    W = torch.randn(64, 48, dtype=torch.float64)
    mpo = MPO.from_matrix(W, [4, 3, 4], [4, 4, 4])
    assert mpo.center == 1
    left, centre, right = mpo.cores
    L = left.reshape(-1, left.shape[-1])
    R = right.reshape(right.shape[0], -1)
    assert torch.allclose(L.T @ L, torch.eye(L.shape[1], dtype=W.dtype), atol=1e-10)
    assert torch.allclose(R @ R.T, torch.eye(R.shape[0], dtype=W.dtype), atol=1e-10)
    assert abs(centre.norm().item() - W.norm().item()) < 1e-8


# --- truncation --------------------------------------------------------------------------------
def test_truncation_error_monotone_in_max_bond():
    torch.manual_seed(0)
    W = torch.randn(256, 256, dtype=torch.float64)
    mpo = MPO.from_matrix(W, [4, 4, 4, 4], [4, 4, 4, 4])
    errs = [(mpo.truncate(max_bond=b).to_matrix() - W).norm().item() for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    assert all(a >= b - 1e-9 for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-9 and errs[0] > 0.5 * W.norm().item()


def test_single_cut_error_equals_discarded_singular_values():
    torch.manual_seed(0)
    W = torch.randn(36, 20, dtype=torch.float64)
    mpo = MPO.from_matrix(W, [4, 5], [6, 6], max_bond=5)
    # the single cut is the SVD of W reshaped to (o1 i1, o2 i2)
    t = W.reshape(6, 6, 4, 5).permute(0, 2, 1, 3).reshape(24, 30)
    s = torch.linalg.svdvals(t)
    expected = s[5:].norm().item()
    actual = (mpo.to_matrix() - W).norm().item()
    assert abs(actual - expected) < 1e-10
    assert abs(mpo.truncation_error - expected) < 1e-10
    # truncating a lossless MPO afterwards agrees too
    trunc = MPO.from_matrix(W, [4, 5], [6, 6]).truncate(max_bond=5)
    assert abs((trunc.to_matrix() - W).norm().item() - expected) < 1e-10
    assert abs(trunc.truncation_error - expected) < 1e-10


def test_rtol_truncation_meets_tolerance():
    torch.manual_seed(0)
    # a low-rank-plus-noise matrix has a clear spectrum gap
    W = (torch.randn(256, 8) @ torch.randn(8, 256) + 1e-3 * torch.randn(256, 256)).double()
    mpo = MPO.from_matrix(W, [4, 4, 4, 4], [4, 4, 4, 4], rtol=1e-2)
    assert rel_err(mpo.to_matrix(), W) <= 1e-2
    assert mpo.num_params() < MPO.from_matrix(W, [4, 4, 4, 4], [4, 4, 4, 4]).num_params()


def test_tensor_train_round_trip_and_truncation():
    torch.manual_seed(0)
    T = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    tt = TensorTrain.from_tensor(T)
    assert tt.bond_dims == [1, 3, 12, 6, 1]
    assert rel_err(tt.to_tensor(), T) < 1e-10
    cores, info = tt_svd(T, max_bond=2)
    assert max(c.shape[-1] for c in cores) <= 2 and info.error_bound > 0
    assert (TensorTrain(cores).to_tensor() - T).norm().item() <= info.error_bound + 1e-9


# --- MPOLinear -------------------------------------------------------------------------------
def test_mpolinear_from_linear_matches_dense_float32():
    torch.manual_seed(0)
    lin = nn.Linear(768, 3072)
    layer = MPOLinear.from_linear(lin, in_factors=[3, 4, 4, 4, 4], out_factors=[4, 4, 8, 6, 4])
    x = torch.randn(2, 7, 768)
    assert rel_err(layer(x), lin(x)) < 1e-5
    assert layer.bond_dims == [1, 12, 192, 384, 16, 1]


def test_mpolinear_from_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 32)  # nf=48 outputs, nx=32 inputs; weight (32, 48)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    layer = MPOLinear.from_linear(conv, in_factors=[4, 8], out_factors=[6, 8])
    x = torch.randn(5, 32)
    assert rel_err(layer(x), conv(x)) < 1e-5


def test_mpolinear_gradcheck_float64():
    torch.manual_seed(0)
    layer = MPOLinear(in_features=12, out_features=8, in_factors=[3, 4], out_factors=[2, 4],
                      max_bond=3, dtype=torch.float64)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    for mode in ("stream", "reconstruct"):
        layer.mode = mode
        assert torch.autograd.gradcheck(
            lambda x, *cores: layer(x), (x, *layer.cores), eps=1e-6, atol=1e-6
        )


def test_mpolinear_gradients_match_dense():
    torch.manual_seed(0)
    lin = nn.Linear(24, 12, dtype=torch.float64)
    layer = MPOLinear.from_linear(lin, in_factors=[2, 3, 4], out_factors=[2, 3, 2])
    x = torch.randn(6, 24, dtype=torch.float64, requires_grad=True)
    (layer(x) ** 2).sum().backward()
    gx_mpo = x.grad.clone()
    x.grad = None
    (lin(x) ** 2).sum().backward()
    assert torch.allclose(gx_mpo, x.grad, atol=1e-10)
    assert torch.allclose(layer.bias.grad, lin.bias.grad, atol=1e-10)
    # the gradient w.r.t. the dense weight, pulled back through the cores, matches d/dcores
    W = layer.weight
    gW = lin.weight.grad
    core_grads = torch.autograd.grad((W * gW).sum(), list(layer.cores))
    for g, c in zip(core_grads, layer.cores):
        assert torch.allclose(g, c.grad, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_mpolinear_dtypes(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(32, 16).to(dtype)
    layer = MPOLinear.from_linear(lin, in_factors=[4, 8], out_factors=[4, 4])
    assert all(c.dtype == dtype for c in layer.cores)
    x = torch.randn(3, 32).to(dtype)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 5e-2}[dtype]
    assert rel_err(layer(x).float(), lin(x).float()) < tol


def test_eval_cache_invalidated_when_core_changes():
    torch.manual_seed(0)
    layer = MPOLinear(in_features=16, out_features=16, in_factors=[4, 4], out_factors=[4, 4], mode="reconstruct")
    layer.eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        y1 = layer(x)
        assert layer.weight_cache.value is not None
        y1b = layer(x)
        assert torch.equal(y1, y1b)
        layer.cores[0].mul_(2.0)  # in-place change bumps the version counter
        y2 = layer(x)
    assert torch.allclose(y2, 2 * (y1 - layer.bias) + layer.bias, atol=1e-5)
    # an optimizer step also invalidates it
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).sum().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        y3 = layer(x)
        ref = x @ layer.weight.T + layer.bias
    assert torch.allclose(y3, ref, atol=1e-5)


def test_engine_chooses_stream_and_reconstruct():
    lin = nn.Linear(768, 3072)
    small = MPOLinear.from_linear(lin, in_factors=[3, 4, 4, 4, 4], out_factors=[4, 4, 8, 6, 4], max_bond=16)
    big = MPOLinear.from_linear(lin, in_factors=[3, 4, 4, 4, 4], out_factors=[4, 4, 8, 6, 4])
    assert small.explain(4).mode == "stream"
    assert big.explain(4096).mode == "reconstruct"
    plan = big.explain(4096)
    assert plan.reconstruct_flops > 0 and plan.matmul_flops > 0 and "FLOPs" in str(plan)
    assert len(plan.path) == 4 and plan.path == plan.reconstruct_path  # m - 1 pairwise contractions
    assert sum(len(step) == 2 for step in small.explain(4).path) == 5  # the input joins the 5 cores
    # both modes agree numerically
    x = torch.randn(4, 768)
    assert small.stream_is_cheaper(4) and not big.stream_is_cheaper(4096)
    threshold = big.engine.stream_threshold(big.core_shapes)
    assert big.explain(int(threshold)).mode == "reconstruct" and big.explain(int(threshold) // 2).mode == "stream"
    y_auto = small(x)
    small.mode = "reconstruct"
    assert rel_err(y_auto, small(x)) < 1e-5


def test_engine_caches_expressions():
    engine = ContractionEngine()
    layer = MPOLinear(in_features=16, out_features=16, in_factors=[4, 4], out_factors=[4, 4], engine=engine)
    x = torch.randn(3, 16)
    layer(x)
    first = engine.cache_info()
    assert first["paths"].misses > 0 and first["expressions"].misses > 0
    layer(x)
    second = engine.cache_info()
    # the second call with the same shapes computes no path and builds no expression
    assert second["paths"].misses == first["paths"].misses
    assert second["expressions"].misses == first["expressions"].misses
    assert second["expressions"].hits > first["expressions"].hits


# --- errors ------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_error():
    W = torch.randn(12, 20)
    with pytest.raises(ValueError, match="multiply to"):
        MPO.from_matrix(W, [4, 4], [3, 4])
    with pytest.raises(ValueError, match="m >= 2"):
        MPO.from_matrix(W, [20], [12])
    with pytest.raises(ValueError, match="max_bond"):
        MPO.from_matrix(W, [4, 5], [3, 4], max_bond=0)
    with pytest.raises(ValueError, match="max_bond"):
        MPO.from_matrix(W, [4, 5], [3, 4], max_bond=-3)
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        MPO.from_matrix(bad, [4, 5], [3, 4])
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        MPO.from_matrix(bad, [4, 5], [3, 4])
    with pytest.raises(ValueError, match="mismatched core shapes"):
        MPO([torch.randn(1, 2, 2, 3), torch.randn(4, 2, 2, 1)])
    with pytest.raises(ValueError, match="same length"):
        MPO.from_matrix(W, [4, 5], [2, 3, 2])
    layer = MPOLinear(in_features=20, out_features=12, in_factors=[4, 5], out_factors=[3, 4])
    with pytest.raises(ValueError, match="20 features"):
        layer(torch.randn(2, 21))


# --- tensornetwork interop --------------------------------------------------------------------
def test_tensornetwork_round_trip_and_contraction():
    torch.manual_seed(0)
    W = torch.randn(24, 30, dtype=torch.float64)
    mpo = MPO.from_matrix(W, [2, 3, 5], [2, 3, 4])
    nodes, outs, ins = to_tensornetwork(mpo)
    assert rel_err(from_tensornetwork(nodes).to_matrix(), W) < 1e-10
    dense = contract_network(nodes, outs + ins).reshape(24, 30)
    assert rel_err(dense, W) < 1e-10
    fmpo = to_finite_mpo(mpo)
    assert fmpo.bond_dimensions == mpo.bond_dims
    assert rel_err(from_finite_mpo(fmpo).to_matrix(), W) < 1e-10


def test_contract_user_built_network_keeps_autograd():
    import tensornetwork as tn

    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 5, dtype=torch.float64)
    c = torch.randn(5, 3, dtype=torch.float64)
    na, nb, nc = (tn.Node(t, backend="pytorch") for t in (a, b, c))
    na[1] ^ nb[0]
    nb[1] ^ nc[0]
    nc[1] ^ na[0]
    trace = contract_network([na, nb, nc])
    assert torch.allclose(trace, torch.trace(a @ b @ c))
    trace.backward()
    assert torch.allclose(a.grad, (b @ c).T)
    with pytest.raises(ValueError, match="dangling"):
        nd = tn.Node(torch.randn(3, 2, dtype=torch.float64), backend="pytorch")
        contract_network([nd])


# --- dtypes, empty batches and edge cases found in review -------------------------------------
def _complex_matrix(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(12, 24, generator=g, dtype=torch.float64),
                         torch.randn(12, 24, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("center", [0, "central", None])
def test_complex_mpo_canonicalize_and_truncate_stay_complex_and_exact(center):
    W = _complex_matrix()
    mpo = MPO.from_matrix(W, [2, 3, 4], [2, 3, 2])
    for out in (mpo.canonicalize(0 if center is None else center), mpo.truncate(max_bond=1000, center=center)):
        assert out.dtype == torch.complex128
        assert rel_err(out.to_matrix(), W) < 1e-12  # exact operations: the imaginary part is kept


def test_rtol_truncation_measures_the_complex_norm():
    R = _complex_matrix().real.contiguous()
    real = MPO.from_matrix(R.to(torch.complex128), [2, 3, 4], [2, 3, 2], rtol=0.5)
    rotated = MPO.from_matrix(1j * R.to(torch.complex128), [2, 3, 4], [2, 3, 2], rtol=0.5)
    assert rotated.bond_dims == real.bond_dims  # a global phase has the same singular values
    assert real.bond_dims[1] < 12  # rtol really truncated
    assert rel_err(rotated.to_matrix(), 1j * R.to(torch.complex128)) <= 0.5


def test_from_matrix_of_an_integer_matrix_gives_float_cores():
    W = torch.arange(12 * 24).reshape(12, 24) % 7 - 3
    mpo = MPO.from_matrix(W, [2, 3, 4], [2, 3, 2])
    assert mpo.dtype == torch.float32
    assert rel_err(mpo.to_matrix(), W.float()) < 1e-5


def test_truncate_and_canonicalize_keep_a_half_precision_dtype():
    mpo = MPO.from_matrix(torch.randn(12, 24, dtype=torch.float64), [2, 3, 4], [2, 3, 2]).to(torch.bfloat16)
    dense = mpo.to_matrix().double()
    for out in (mpo.canonicalize(), mpo.truncate(max_bond=1000), mpo.truncate(max_bond=1000, center=0)):
        assert out.dtype == torch.bfloat16
        assert rel_err(out.to_matrix().double(), dense) < 3e-2


def test_negative_center_counts_from_the_end_and_out_of_range_raises():
    W = torch.randn(8, 8, dtype=torch.float64)
    assert MPO.from_matrix(W, [2, 2, 2], [2, 2, 2], center=-1).center == 2
    with pytest.raises(ValueError, match=r"center must be in \[-3, 2\]"):
        MPO.from_matrix(W, [2, 2, 2], [2, 2, 2], center=-4)


@pytest.mark.parametrize("mode", ["stream", "reconstruct", "auto"])
def test_float64_mpolinear_under_autocast_stays_float64_like_linear(mode):
    lin = nn.Linear(24, 12, dtype=torch.float64)
    layer = MPOLinear.from_linear(lin, in_factors=[2, 3, 4], out_factors=[2, 3, 2], mode=mode)
    x = torch.randn(5, 24, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = layer(x), lin(x)
    assert y.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("mode", ["stream", "reconstruct", "auto"])
@pytest.mark.parametrize("shape", [(0, 24), (0, 5, 24), (3, 0, 24)])
def test_empty_batches_give_empty_outputs_like_linear(mode, shape):
    lin = nn.Linear(24, 12)
    layer = MPOLinear.from_linear(lin, in_factors=[2, 3, 4], out_factors=[2, 3, 2], mode=mode)
    x = torch.randn(*shape)
    assert layer(x).shape == lin(x).shape == (*shape[:-1], 12)
    assert MPO.from_matrix(lin.weight.detach(), [2, 3, 4], [2, 3, 2]).apply(x).shape == (*shape[:-1], 12)


def test_contract_network_refuses_edges_to_nodes_left_out():
    tn = pytest.importorskip("tensornetwork")
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    na, nb = tn.Node(a, backend="pytorch"), tn.Node(b, backend="pytorch")
    na[1] ^ nb[0]
    with pytest.raises(ValueError, match="not in `nodes`"):
        contract_network([na], [na[0]])  # would silently sum over the bond to nb
    torch.testing.assert_close(contract_network([na, nb], [na[0], nb[1]]), a @ b)


# --- edge cases a review found silently wrong ------------------------------------------------
def test_one_entry_matrices_and_cores_get_finite_init_and_noise():
    """A 1x1 matrix or a one-entry core has no sample std: init and noise must stay finite."""
    layer = MPOLinear(in_features=1, out_features=1, m=2)
    assert torch.isfinite(layer.weight).all() and float(layer.weight.detach().abs()) > 0
    from tnmoe.moe import MPOExpertBank
    W = torch.randn(3, 7)
    mpo = MPO.from_matrix(W, in_factors=factorize(7, 3), out_factors=factorize(3, 3))
    assert any(c.numel() == 1 for c in mpo.cores)
    bank = MPOExpertBank(num_experts=3, in_factors=mpo.in_factors, out_factors=mpo.out_factors, share="central")
    bank.load_mpo(mpo, noise_std=0.01, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(c).all() for c in bank.cores)
    with torch.no_grad():
        torch.testing.assert_close(bank.weights(), W.expand(3, 3, 7), rtol=0.1, atol=0.05)


@pytest.mark.parametrize("share", ["central", "auxiliary", "none"])
def test_random_init_gives_every_matrix_the_linear_std(share):
    from tnmoe.moe import MPOExpertBank
    torch.manual_seed(0)
    bank = MPOExpertBank(num_experts=6, in_factors=[2, 3, 4], out_factors=[2, 2, 3], share=share)
    with torch.no_grad():
        stds = bank.weights().double().flatten(1).std(dim=1)
    torch.testing.assert_close(stds, torch.full_like(stds, 1 / math.sqrt(3 * 24)), rtol=1e-5, atol=0)


def test_to_linear_under_autocast_exports_full_precision_weights():
    layer = MPOLinear(in_features=24, out_features=12, in_factors=[2, 3, 4], out_factors=[2, 3, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = layer.to_linear()
    outside = layer.to_linear()
    assert inside.weight.dtype == torch.float32
    assert torch.equal(inside.weight, outside.weight) and torch.equal(inside.bias, outside.bias)


def test_integer_arguments_are_not_truncated():
    from tnmoe.networks import check_factors
    with pytest.raises(TypeError, match="integer"):
        check_factors(6, [6.7, 1.2])
    with pytest.raises(TypeError, match="integer"):
        factorize(6.0, 2)
    with pytest.raises(ValueError, match="max_bond"):
        MPOLinear(in_features=8, out_features=8, m=2, max_bond=True)
    import numpy as np
    assert factorize(np.int64(12), 2) == factorize(12, 2) and check_factors(12, (np.int64(3), 4)) == [3, 4]


def test_weight_cache_filled_under_inference_mode_serves_autograd_later():
    """Eval, frozen weights: an inference_mode forward fills the cache; a later forward whose input
    requires grad (saliency) must not get the inference tensor (it cannot be saved for backward)."""
    layer = MPOLinear(in_features=24, out_features=12, in_factors=[2, 3, 4], out_factors=[2, 3, 2],
                      mode="reconstruct").eval().requires_grad_(False)
    x = torch.randn(5, 24)
    with torch.inference_mode():
        want = layer(x)
    x.requires_grad_(True)
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), want)
    torch.testing.assert_close(x.grad, layer.weight.detach().sum(0).expand(5, 24))


def test_out_of_range_matrix_is_an_error_when_every_core_is_shared():
    from tnmoe.moe import MPOExpertBank
    bank = MPOExpertBank(num_experts=2, in_factors=[2, 3], out_factors=[2, 2], share="all")
    with pytest.raises(IndexError, match="out of range"):
        bank.stream(torch.randn(3, 6), matrix=7)
    with pytest.raises(IndexError, match="out of range"):
        bank.weights([5])
    assert bank.weights([1]).shape == (1, 4, 6)
