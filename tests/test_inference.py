"""Inference at decode speed: the frozen weight cache (O(1) validity, edits refused loudly) and
the chain streaming path, each against an independent dense computation."""

import gc

import pytest
import torch
from torch import nn

import tnmoe.moe as moe
from references import naive_matrix
from tiny_models import inputs_for, tiny_gpt2
from tnmoe.moe import MoEConfig, MPOExpertBank
from tnmoe.networks import (
    ContractionEngine,
    DerivedTensorCache,
    MPOBank,
    MPOLinear,
    WeightsChangedError,
    frozen_weights,
    set_weight_cache_budget,
)
from tnmoe.networks.contraction import apply_equation, default_engine, stream_chain, stream_chain_flops


def reference(layer: MPOLinear, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(x, naive_matrix([c.detach() for c in layer.cores]), layer.bias)


def small_layer(dtype=torch.float32) -> MPOLinear:
    return MPOLinear(in_features=24, out_features=12, in_factors=[2, 3, 4], out_factors=[2, 3, 2],
                     mode="reconstruct", dtype=dtype).eval()


# float32 outputs of a 24-long dot product rebuilt in another order: a few ulps of |y| ~ 1
TOL32 = dict(rtol=1e-5, atol=1e-5)


# --- frozen: O(1) validity, same values ------------------------------------------------------------
def test_frozen_cache_reads_no_values_and_serves_the_right_weights(monkeypatch):
    layer, x = small_layer(), torch.randn(5, 24)
    compared = []
    original = DerivedTensorCache._values_match
    monkeypatch.setattr(DerivedTensorCache, "_values_match",
                        lambda self, sources: compared.append(1) or original(self, sources))
    with torch.no_grad():
        layer(x), layer(x)
        assert compared  # the checked default reads the values on every hit
        with frozen_weights(layer):  # entry: the existing value is checked once and kept
            compared.clear()
            outs = [layer(x) for _ in range(3)]
            assert not compared
        misses = layer.weight_cache.misses
        with frozen_weights(layer):  # a later block revalidates by digest: no rebuild
            outs.append(layer(x))
    assert layer.weight_cache.misses == misses == 1
    for y in outs:
        torch.testing.assert_close(y, reference(layer, x), **TOL32)


def test_frozen_converted_model_generates_the_checked_tokens():
    model = moe.convert(tiny_gpt2(), MoEConfig(num_experts=2, m=3, init_noise=0.05), progress=False).eval()
    ids = inputs_for(model, batch=1, seq=5)["input_ids"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        with frozen_weights(model):
            got = model.generate(ids, **kw)
        logits_checked = model(want).logits
        with frozen_weights(model):
            logits_frozen = model(want).logits
    assert torch.equal(got, want)
    assert torch.equal(logits_frozen, logits_checked)  # the same cached weights, the same kernels


def test_frozen_cache_from_inference_mode_serves_autograd_later():
    layer, x = small_layer().requires_grad_(False), torch.randn(5, 24)
    with frozen_weights(layer):
        with torch.inference_mode():
            want = layer(x)
        x.requires_grad_(True)
        y = layer(x)
        y.sum().backward()
    torch.testing.assert_close(y.detach(), want)
    torch.testing.assert_close(x.grad, naive_matrix(list(layer.cores)).sum(0).expand(5, 24), **TOL32)


# --- frozen: every edit the value check used to catch is still caught (refused loudly) ----------------
def _sgd_step(layer):
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    torch.optim.SGD(layer.parameters(), lr=0.1).step()


def _sgd_step_fused(layer):
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    torch.optim.SGD(layer.parameters(), lr=0.1, fused=True).step()


def _adam_step(layer, **kw):
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    torch.optim.Adam(layer.parameters(), lr=0.1, **kw).step()


def _load(layer, assign):
    state = {k: v * 1.5 for k, v in layer.state_dict().items()}
    layer.load_state_dict(state, assign=assign)


EDITS = {
    "in_place_no_grad": lambda layer: layer.cores[1].mul_(2.0),
    "sgd_step": _sgd_step,
    "adam_foreach_step": lambda layer: _adam_step(layer, foreach=True),
    "adam_for_loop_step": lambda layer: _adam_step(layer, foreach=False),
    "adam_fused_step": lambda layer: _adam_step(layer, fused=True),  # bumps no version counter
    "sgd_fused_step": lambda layer: (_sgd_step_fused(layer)),
    "load_state_dict": lambda layer: _load(layer, assign=False),
    "load_state_dict_assign": lambda layer: _load(layer, assign=True),
    "data_rebound": lambda layer: setattr(layer.cores[0], "data", layer.cores[0].data * -1),
    "to_float64": lambda layer: layer.to(torch.float64),
    "param_replaced": lambda layer: layer.cores.__setitem__(2, nn.Parameter(layer.cores[2].detach() * 3)),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_frozen_cache_refuses_an_edit_at_the_next_forward(edit):
    layer, x = small_layer(), torch.randn(5, 24)
    with torch.no_grad():
        with frozen_weights(layer):
            layer(x)
            EDITS[edit](layer)
            with pytest.raises(WeightsChangedError, match="changed inside frozen_weights"):
                layer(x.to(layer.cores[0].dtype))
        # outside, the checked cache rebuilds from the edited cores
        xe = x.to(layer.cores[0].dtype)
        torch.testing.assert_close(layer(xe), reference(layer, xe), **TOL32)


@pytest.mark.parametrize("edit", ["in_place_no_grad", "sgd_step", "adam_fused_step", "data_rebound"])
def test_frozen_block_refuses_an_edit_at_its_end_without_a_forward(edit):
    layer, x = small_layer(), torch.randn(5, 24)
    with torch.no_grad():
        layer(x)
        with pytest.raises(WeightsChangedError, match="in place or replaced|optimizer step"):
            with frozen_weights(layer):
                EDITS[edit](layer)
        torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)


@pytest.mark.parametrize("how", ["data_mul", "data_copy_ema", "alias_rebound"])
def test_frozen_block_refuses_edits_no_version_counter_sees_at_its_end(how):
    layer, x = small_layer(), torch.randn(5, 24)
    alias = layer.cores[1].data  # shares the storage, not the version counter
    with torch.no_grad():
        with pytest.raises(WeightsChangedError, match="no version counter sees"):
            with frozen_weights(layer):
                layer(x)
                if how == "data_mul":
                    layer.cores[1].data.mul_(3.0)
                elif how == "data_copy_ema":
                    layer.cores[1].data.mul_(0.9).add_(0.01)
                else:  # rebind to a new tensor, edit the old storage, rebind back: same address and version
                    layer.cores[1].data = layer.cores[1].data.clone()
                    alias.mul_(-2.0)
                    layer.cores[1].data = alias
                layer(x)
        torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)  # checked again: rebuilt


def test_frozen_cache_keeps_replaced_storage_alive_so_its_address_is_not_reused():
    layer, x = small_layer(), torch.randn(5, 24)
    with torch.no_grad(), frozen_weights(layer):
        layer(x)
        old_ptr = layer.cores[0].data_ptr()
        with pytest.raises(WeightsChangedError):
            layer.cores[0].data = torch.randn_like(layer.cores[0])
            gc.collect()
            fresh = [torch.empty_like(layer.cores[0]) for _ in range(32)]  # a freed address would come back
            assert all(t.data_ptr() != old_ptr for t in fresh)
            layer(x)


def test_frozen_weights_nests_and_cleans_up():
    layer, x = small_layer(), torch.randn(5, 24)
    with torch.no_grad():
        with frozen_weights(layer):
            with frozen_weights(layer):  # owned by the outer block
                layer(x)
            assert layer.weight_cache.frozen
        assert not layer.weight_cache.frozen
        with pytest.raises(ZeroDivisionError):
            with frozen_weights(layer):
                layer.cores[0].mul_(2.0)
                1 / 0  # the block's own error wins; the frozen state still ends
        assert not layer.weight_cache.frozen
        torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)


def test_checked_default_still_sees_data_edits_after_a_frozen_block():
    layer, x = small_layer(), torch.randn(5, 24)
    with torch.no_grad():
        with frozen_weights(layer):
            layer(x)
        layer.cores[1].data.mul_(3.0)  # outside: the value check must see it
        torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)


def test_checked_cache_in_host_memory_keeps_no_copy_and_serves_on_after_a_frozen_block():
    """The checked mode compares a digest for host-memory cores (no snapshot copy); a value kept
    through a frozen block is served by the checked mode afterwards without a rebuild, and an
    edit no version counter sees (p.data) after it is still caught by the value check."""
    layer, x = small_layer(), torch.randn(5, 24)
    cache = layer.weight_cache
    with torch.no_grad():
        layer(x)
        assert cache._snapshot is None and cache._checked_digest is not None
        with frozen_weights(layer):
            layer(x)
        misses = cache.misses
        torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)
        assert cache.misses == misses and cache.hits >= 2  # served, not rebuilt
        layer.cores[2].data.add_(0.5)  # bumps no version counter of the parameter
        torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)
        assert cache.misses == misses + 1


# --- the chain streaming path --------------------------------------------------------------------
@pytest.mark.parametrize("in_f,out_f,max_bond", [
    ([3, 4, 4, 4, 4], [4, 4, 8, 6, 4], 16),
    ([2, 3, 2], [3, 2, 2], None),
    ([4, 2, 3], [2, 5, 2], 3),
    ([2, 3], [3, 2], None),
])
@pytest.mark.parametrize("tokens", [0, 1, 5])
def test_stream_chain_equals_the_dense_product(in_f, out_f, max_bond, tokens):
    bank = MPOBank(num_matrices=2, in_factors=in_f, out_factors=out_f, max_bond=max_bond, dtype=torch.float64)
    cores = [bank.core(1, k) for k in range(bank.m)]
    x = torch.randn(tokens, bank.in_features, dtype=torch.float64)
    y = stream_chain(x, cores)
    W = naive_matrix([c.detach() for c in cores])
    torch.testing.assert_close(y, x @ W.T, rtol=1e-12, atol=1e-12)
    # its FLOP formula against opt_einsum's count for the same order (a chain of pairwise products)
    assert stream_chain_flops(bank.core_shapes, 1) >= default_engine().flops(
        apply_equation(bank.m), [(1, *in_f), *bank.core_shapes]) * (1 - 1e-9)


def test_stream_chain_gradients_match_the_dense_product():
    bank = MPOBank(in_factors=[2, 3, 4], out_factors=[3, 2, 2], dtype=torch.float64)
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 12, dtype=torch.float64)
    cores = [bank.core(0, k) for k in range(bank.m)]
    grads = torch.autograd.grad((stream_chain(x, cores) * g).sum(), [x, *bank.cores])
    want = torch.autograd.grad(((x @ naive_matrix(cores).T) * g).sum(), [x, *bank.cores])
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_engine_streams_small_bonds_by_chain_and_the_layer_agrees():
    layer = MPOLinear(in_features=768, out_features=3072, in_factors=[3, 4, 4, 4, 4],
                      out_factors=[4, 4, 8, 6, 4], max_bond=16, mode="stream", dtype=torch.float64).eval()
    assert default_engine().stream_method(layer.core_shapes) == "chain"
    x = torch.randn(2, 768, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-10, atol=1e-12)


def test_uncached_expert_bank_streams_each_experts_tokens():
    bank = MPOExpertBank(num_experts=4, in_factors=[4, 2, 3], out_factors=[2, 3, 2], max_bond=4,
                         cache_weights=False, dtype=torch.float64).eval()
    x, counts = torch.randn(3, 24, dtype=torch.float64), [0, 2, 0, 1]
    with torch.no_grad():
        assert bank.stream_is_cheaper(1)
        y = bank(x, counts)
    rows = [1, 1, 3]
    want = torch.stack([naive_matrix([bank.core(e, k) for k in range(bank.m)]) @ x[t] for t, e in enumerate(rows)])
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)


# --- the memory-bounded mode ---------------------------------------------------------------------
def _gpt2_mpoe():
    return moe.convert(tiny_gpt2(), MoEConfig(num_experts=2, m=3, init_noise=0.05), progress=False).eval()


def test_cache_budget_admits_banks_in_order_and_the_rest_compute_the_same_outputs():
    model = _gpt2_mpoe()
    batch = inputs_for(model)
    with torch.no_grad():
        want = model(**batch).logits
    sizes = [b.num_matrices * b.out_features * b.in_features * 4 for b in model.modules() if isinstance(b, MPOBank)]
    plan = set_weight_cache_budget(model, sizes[0] + sizes[1] + sizes[2] - 1)  # the third does not fit
    assert [row["cached"] for row in plan] == [True, True] + [False] * (len(sizes) - 2)
    assert [row["bytes"] for row in plan] == sizes
    with torch.no_grad():
        got = model(**batch).logits
    banks = [b for b in model.modules() if isinstance(b, MPOBank)]
    held = sum(b.weight_cache.value.numel() * 4 for b in banks if b.weight_cache.value is not None)
    assert held == sizes[0] + sizes[1] and all(b.weight_cache.value is None for b in banks[2:])
    # the uncached banks stream or rebuild in another order: float32 reordering of short sums
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(row["cached"] for row in set_weight_cache_budget(model, None))
    with pytest.raises(ValueError, match="budget_bytes"):
        set_weight_cache_budget(model, -1)


def test_uncached_inference_rebuilds_only_the_experts_with_tokens(monkeypatch):
    never_stream = ContractionEngine(stream_margin=1e9)
    bank = MPOExpertBank(num_experts=4, in_factors=[2, 3, 4], out_factors=[2, 3, 2], cache_weights=False,
                         engine=never_stream, dtype=torch.float64).eval()
    x, counts = torch.randn(5, 24, dtype=torch.float64), [0, 3, 0, 2]
    assert not bank.stream_is_cheaper(1)  # the rebuild path
    asked = []
    weights = bank.weights
    monkeypatch.setattr(bank, "weights", lambda experts=None: asked.append(experts) or weights(experts))
    with torch.no_grad():
        y = bank(x, counts)
    assert asked == [[1, 3]]
    rows = [1, 1, 1, 3, 3]
    want = torch.stack([naive_matrix([bank.core(e, k) for k in range(bank.m)]) @ x[t] for t, e in enumerate(rows)])
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("share", ["central", "none", "all"])
def test_batched_stream_equals_each_experts_stream_and_decode_takes_it(share, monkeypatch):
    """At the same token count per active expert (decode), the uncached bank streams every active
    expert in one batched chain; it equals streaming each expert alone and the naive product."""
    from tnmoe.networks import contraction

    torch.manual_seed(0)
    bank = MPOExpertBank(num_experts=4, in_factors=[2, 3, 4], out_factors=[4, 2, 3], max_bond=5, share=share,
                         dtype=torch.float64).eval()
    bank.cache_weights = False
    for active in ([1, 3], [0, 1, 2, 3]):
        n = 2
        counts = [n if e in active else 0 for e in range(4)]
        x = torch.randn(n * len(active), 24, dtype=torch.float64)
        want = torch.cat([x[j * n:(j + 1) * n] @ naive_matrix([bank.core(e, k).detach() for k in range(bank.m)]).T
                          for j, e in enumerate(active)])
        per_expert = torch.cat([bank.stream(x[j * n:(j + 1) * n], e) for j, e in enumerate(active)])
        calls = []
        real = contraction.stream_chain_batched
        monkeypatch.setattr("tnmoe.networks.bank.stream_chain_batched",
                            lambda *a: calls.append(1) or real(*a))
        with torch.no_grad():
            got = bank(x, counts)
        assert calls, "the decode path did not take the batched stream"
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, per_expert, rtol=1e-12, atol=1e-12)


def test_batched_stream_gathers_a_subset_of_experts_only_while_the_copy_is_small():
    small = MPOExpertBank(num_experts=4, in_factors=[2, 3, 4], out_factors=[4, 2, 3], max_bond=5, share="none")
    large = MPOExpertBank(num_experts=4, in_factors=[1, 512], out_factors=[1024, 1], max_bond=170, share="none",
                          init="empty")
    per_expert = 170 * (1024 + 512) * 4  # bytes of one expert's stacked cores
    assert per_expert > MPOExpertBank.BATCHED_STREAM_MAX_COPY_BYTES
    assert small._batch_streams(2) and large._batch_streams(4) and not large._batch_streams(2)
