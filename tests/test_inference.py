"""Inference at decode speed: the weight cache's O(1) validity (tracked by default: version
counters that see every write PyTorch makes; frozen: edits refused loudly) and the chain
streaming path, each against an independent dense computation."""

import copy
import gc
import pickle

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import tnmoe.moe as moe
import tnmoe.networks.cache as cache_module
from references import naive_matrix
from tiny_models import inputs_for, tiny_gpt2
from tnmoe.moe import MoEConfig, MPOExpertBank
from tnmoe.networks import (
    ContractionEngine,
    DerivedTensorCache,
    MPOBank,
    MPOLinear,
    TrackedParameter,
    WeightsChangedError,
    clear_weight_caches,
    frozen_weights,
    set_weight_cache_budget,
    set_weight_cache_validation,
)
from tnmoe.networks.contraction import apply_equation, default_engine, stream_chain, stream_chain_flops


def reference(layer: MPOLinear, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(x, naive_matrix([c.detach() for c in layer.cores]), layer.bias)


def small_layer(dtype=torch.float32) -> MPOLinear:
    return MPOLinear(in_features=24, out_features=12, in_factors=[2, 3, 4], out_factors=[2, 3, 2],
                     mode="reconstruct", dtype=dtype).eval()


# float32 outputs of a 24-long dot product rebuilt in another order: a few ulps of |y| ~ 1
TOL32 = dict(rtol=1e-5, atol=1e-5)


def _count_value_reads(monkeypatch) -> list:
    """Every read of the cores' values by a cache check (digest or snapshot comparison)."""
    reads = []
    digest = cache_module.tensor_digest
    monkeypatch.setattr(cache_module, "tensor_digest", lambda ts: reads.append("digest") or digest(ts))
    match = DerivedTensorCache._values_match
    monkeypatch.setattr(DerivedTensorCache, "_values_match",
                        lambda self, ts: (reads.append("compare") if not self.tracked else None) or match(self, ts))
    return reads


# --- tracked (the default) and frozen: O(1) validity, same values -----------------------------------
def test_tracked_default_reads_no_values_and_serves_the_right_weights(monkeypatch):
    layer, x = small_layer(), torch.randn(5, 24)
    assert all(type(c) is TrackedParameter for c in layer.cores)  # adopted at construction
    reads = _count_value_reads(monkeypatch)
    with torch.no_grad():
        outs = [layer(x) for _ in range(4)]
    assert layer.weight_cache.tracked and not reads  # neither the build nor the hits read values
    assert layer.weight_cache.misses == 1 and layer.weight_cache.hits == 3
    with torch.no_grad(), frozen_weights(layer):  # a block digests at entry and exit only
        outs.append(layer(x))
    assert reads == ["digest", "digest"] and layer.weight_cache.misses == 1
    for y in outs:
        torch.testing.assert_close(y, reference(layer, x), **TOL32)


def test_frozen_cache_reads_no_values_and_serves_the_right_weights(monkeypatch):
    layer, x = small_layer(), torch.randn(5, 24)
    set_weight_cache_validation(layer, "digest")  # the checked mode, which reads values per hit
    reads = _count_value_reads(monkeypatch)
    with torch.no_grad():
        layer(x), layer(x)
        assert "compare" in reads
        with frozen_weights(layer):  # entry: the existing value is checked once and kept
            reads.clear()
            outs = [layer(x) for _ in range(3)]
            assert not reads
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
        logits_tracked = model(want).logits
        with frozen_weights(model):
            logits_frozen = model(want).logits
        set_weight_cache_validation(model, "digest")
        logits_checked = model(want).logits
        clear_weight_caches(model)
        for _, layer in moe.moe_layers(model):
            for bank in layer.experts.banks().values():
                bank.cache_weights = False
        logits_uncached = model(want).logits
    assert torch.equal(got, want)
    assert torch.equal(logits_frozen, logits_tracked)  # the same cached weights, the same kernels
    assert torch.equal(logits_checked, logits_tracked)
    # rebuilt per call (only the routed experts) vs all at once: float32 sums in another order
    torch.testing.assert_close(logits_uncached, logits_tracked, rtol=1e-4, atol=1e-5)


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


# --- the decode fast path: MPOLinear serves a proven cached weight with one F.linear ----------------
def _fast_path_calls(monkeypatch, layer) -> list:
    """Records each slow-path forward (the fast path returns before _shape_plan, which only the
    slow path calls)."""
    calls = []
    plan = type(layer)._shape_plan
    monkeypatch.setattr(type(layer), "_shape_plan", lambda self, cores: calls.append(1) or plan(self, cores))
    return calls


STATE_CHANGES = {
    # each: (change the layer or the context, expect the slow path on the next call)
    "none": lambda layer: None,
    "bias_replaced": lambda layer: setattr(layer, "bias", nn.Parameter(torch.randn(12))),
    "bias_edited": lambda layer: layer.bias.data.add_(1.0),
    "cache_weights_off": lambda layer: setattr(layer, "cache_weights", False),
    "mode_stream": lambda layer: setattr(layer, "mode", "stream"),
    "core_edited": lambda layer: layer.cores[0].mul_(-1.0),
    # same storage address and shape (o_0 = i_0 = 2), other strides: only the rebind count sees it
    "core_view_rebound": lambda layer: setattr(layer.cores[0], "data", layer.cores[0].data.transpose(1, 2)),
    "core_replaced_by_a_view": lambda layer: layer.cores.__setitem__(  # same address and shape, other strides
        0, nn.Parameter(layer.cores[0].detach().transpose(1, 2))),
    "bias_pruned": lambda layer: torch.nn.utils.prune.l1_unstructured(layer, "bias", amount=0.5),  # bias leaves _parameters
    "cache_cleared": lambda layer: clear_weight_caches(layer),
    "validation_digest": lambda layer: set_weight_cache_validation(layer, "digest"),
}


@pytest.mark.parametrize("change", sorted(STATE_CHANGES))
def test_decode_fast_path_serves_the_slow_paths_value_or_steps_aside(change, monkeypatch):
    layer = MPOLinear(in_features=24, out_features=12, in_factors=[2, 3, 4], out_factors=[2, 3, 2]).eval()
    layer.bias.data.normal_()
    x = torch.randn(1, 24)
    calls = _fast_path_calls(monkeypatch, layer)
    with torch.no_grad():
        layer(x)
        layer(x)
        assert len(calls) == 1  # the second call took the fast path
        STATE_CHANGES[change](layer)
        y = layer(x)
        again = layer(x)
    torch.testing.assert_close(y, reference(layer, x), **TOL32)
    torch.testing.assert_close(again, y, rtol=0, atol=0)
    bias_only = change in ("none", "bias_replaced", "bias_edited", "bias_pruned")  # the bias is read live
    rebuilt = ("core_edited", "core_view_rebound", "core_replaced_by_a_view", "cache_cleared")
    assert len(calls) == (1 if bias_only else 2 if change in rebuilt else 3)


def test_decode_fast_path_is_not_taken_in_training_with_grad_autocast_or_another_dtype(monkeypatch):
    layer = MPOLinear(in_features=24, out_features=12, in_factors=[2, 3, 4], out_factors=[2, 3, 2]).eval()
    x = torch.randn(1, 24)
    calls = _fast_path_calls(monkeypatch, layer)
    with torch.no_grad():
        layer(x)
    y = layer(x)  # grad enabled: the output must reach the cores
    assert y.requires_grad and len(calls) == 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        yb = layer(x)  # the cached float32 weight must not be served as the autocast result
    assert yb.dtype == torch.bfloat16 and len(calls) == 3
    with torch.no_grad():
        y32 = layer(x)  # the float32 weight again, by the fast path (a bfloat16 one never becomes it)
        assert y32.dtype == torch.float32 and len(calls) == 3
        torch.testing.assert_close(y32, reference(layer, x), **TOL32)
        with pytest.raises(ValueError, match="input dtype"):
            layer(x.double())
        layer.train()
        layer(x)
    assert len(calls) == 5  # the wrong dtype and train mode took the slow path
    with torch.no_grad():
        layer.eval()(x)  # (train mode dropped the cache) rebuilt outside inference_mode
    with torch.inference_mode():
        layer(x)
    assert len(calls) == 6  # a weight built outside inference_mode serves inside it


def test_decode_fast_path_serves_an_inference_mode_weight_only_in_inference_mode(monkeypatch):
    layer = MPOLinear(in_features=24, out_features=12, in_factors=[2, 3, 4], out_factors=[2, 3, 2]).eval()
    layer.requires_grad_(False)
    x = torch.randn(1, 24)
    calls = _fast_path_calls(monkeypatch, layer)
    with torch.inference_mode():
        layer(x)
        layer(x)
    assert len(calls) == 1
    with torch.no_grad():
        y = layer(x)  # an inference tensor cannot be served outside inference_mode
    assert not y.is_inference() and len(calls) == 2
    torch.testing.assert_close(y, reference(layer, x), **TOL32)


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
    # through .data: a TrackedParameter's .data shares its version counter (a plain one's does not)
    "data_mul": lambda layer: layer.cores[1].data.mul_(3.0),
    "data_copy_ema": lambda layer: layer.cores[1].data.mul_(0.9).add_(0.01),
    "data_alias_rebound": lambda layer: _alias_rebound(layer),
    "data_edit_after_unpickling": lambda layer: _unpickled_then_data_edit(layer),
}


def _alias_rebound(layer):
    """Rebind the core to a copy, edit the old storage through an alias, rebind back: the same
    address as before, only the version counter can tell."""
    alias = layer.cores[1].data
    layer.cores[1].data = alias.clone()
    alias.mul_(-2.0)
    layer.cores[1].data = alias


def _unpickled_then_data_edit(layer):
    """Cores replaced by unpickled ones (plain nn.Parameter: TrackedParameter pickles as one),
    then edited through .data (the next cached call adopts them; the edit changed the storage
    it reads, so it must not serve the old value)."""
    fresh = pickle.loads(pickle.dumps(layer.cores))
    assert all(type(c) is nn.Parameter for c in fresh)
    for k in range(len(layer.cores)):
        layer.cores[k] = fresh[k]
    layer.cores[0].data.mul_(-1.0)


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_tracked_default_rebuilds_after_every_edit(edit, monkeypatch):
    layer, x = small_layer(), torch.randn(5, 24)
    reads = _count_value_reads(monkeypatch)
    with torch.no_grad():
        before = layer(x)
        EDITS[edit](layer)
        xe = x.to(layer.cores[0].dtype)
        after = layer(xe)
        again = layer(xe)
    torch.testing.assert_close(after, reference(layer, xe), **TOL32)
    assert not torch.allclose(after.to(before.dtype), before) or edit == "to_float64"
    assert torch.equal(again, after) and layer.weight_cache.misses == 2 and layer.weight_cache.hits == 1
    assert layer.weight_cache.tracked and not reads  # every core adopted again, no value read


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


def _numpy_mul(layer):
    layer.cores[1].detach().numpy()[...] *= 3.0  # NumPy writes the storage: no PyTorch op counts it


def _numpy_alias_ema(layer):
    alias = torch.from_numpy(layer.cores[1].detach().numpy())  # an alias with a counter of its own
    alias.mul_(0.9).add_(0.01)


UNCOUNTED_EDITS = {"numpy_mul": _numpy_mul, "numpy_alias_ema": _numpy_alias_ema}


@pytest.mark.parametrize("how", sorted(UNCOUNTED_EDITS))
def test_frozen_block_refuses_edits_no_version_counter_sees_at_its_end(how):
    layer, x = small_layer(), torch.randn(5, 24)
    with torch.no_grad():
        with pytest.raises(WeightsChangedError, match="no version counter sees"):
            with frozen_weights(layer):
                layer(x)
                UNCOUNTED_EDITS[how](layer)
                layer(x)
        torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)  # rebuilt after the block


@pytest.mark.parametrize("how", sorted(UNCOUNTED_EDITS))
def test_uncounted_edits_need_clear_or_digest_validation(how):
    """The documented limit of the tracked default: a write outside PyTorch's ops is not seen
    (the old value is served) until clear_weight_caches(); validation="digest" sees it."""
    layer, x = small_layer(), torch.randn(5, 24)
    with torch.no_grad():
        before = layer(x)
        UNCOUNTED_EDITS[how](layer)
        assert torch.equal(layer(x), before)  # served: this is the limit the docs state
        assert clear_weight_caches(layer) == 1
        torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)
        assert set_weight_cache_validation(layer, "digest") == 1
        now = layer(x)
        UNCOUNTED_EDITS[how](layer)
        torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)
        assert not torch.allclose(layer(x), now)


def test_shared_memory_and_process_groups_are_checked_by_value(tmp_path):
    """Writes version counters cannot count by rule: cores in shared memory (another process may
    write them) and any process with a process group (collectives bump no counter) are checked
    by their values on every call."""
    layer, x = small_layer(), torch.randn(5, 24)
    with torch.no_grad():
        layer(x)
        assert layer.weight_cache.tracked
        layer.share_memory()  # moves the storages: rebuilt and checked from now on
        layer(x)
        assert not layer.weight_cache.tracked
        _numpy_mul(layer)  # as a process sharing the memory would write it
        torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)
    layer, x = small_layer(), torch.randn(5, 24)
    with torch.no_grad():
        layer(x)
        if torch.distributed.is_initialized():
            pytest.skip("a process group is already initialized in this process")
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        try:
            assert not layer.weight_cache.tracked  # the tracked value is no longer proof
            misses = layer.weight_cache.misses
            torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)
            assert layer.weight_cache.misses == misses + 1  # rebuilt, with a digest this time
            _numpy_mul(layer)  # as torch.distributed.broadcast into the core would write it
            torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)
        finally:
            torch.distributed.destroy_process_group()


def test_a_data_alias_held_across_calls_is_watched_and_dead_ones_are_forgotten():
    layer, x = small_layer(), torch.randn(5, 24)
    held = layer.cores[2].data  # taken before the cache exists, edited after it was filled
    with torch.no_grad():
        layer(x)
        held.add_(0.25)
        torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)
        for _ in range(100):  # EMA-style temporaries: their witnesses go once they are counted
            layer.cores[2].data.mul_(1.0)
        torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)
    assert len(layer.cores[2].__dict__["_tnmoe_witnesses"]) <= 2  # `held` and at most the last temporary


def test_cores_made_under_inference_mode_are_checked_by_value():
    """Inference tensors have no version counter: such cores are never tracked, and an in-place
    edit (possible only inside inference_mode) is caught by the value check."""
    with torch.inference_mode():
        layer, x = small_layer(), torch.randn(5, 24)
        assert layer.cores[0].is_inference()
        layer(x)
        assert not layer.weight_cache.tracked
        layer.cores[1].mul_(2.0)
        torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)
        assert layer.weight_cache.misses == 2


def test_tracked_parameter_behaves_as_a_parameter():
    """Adoption changes the class in place: identity, optimizer references, deepcopy, state_dict
    and gradients are those of the nn.Parameter it was."""
    lin = nn.Linear(6, 4)
    weight = lin.weight
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    assert cache_module.track_parameters([lin.weight, lin.bias])
    assert lin.weight is weight and isinstance(weight, nn.Parameter) and opt.param_groups[0]["params"][0] is weight
    assert type(copy.deepcopy(lin).weight) is TrackedParameter
    assert type(pickle.loads(pickle.dumps(weight))) is nn.Parameter  # no tnmoe class in pickles
    x = torch.randn(3, 6)
    lin(x).sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones(4, 1) * x.sum(0))
    before = weight.detach().clone()
    opt.step()
    torch.testing.assert_close(weight.detach(), before - 0.5 * weight.grad)
    assert list(lin.state_dict()) == ["weight", "bias"] and type(lin.state_dict()["weight"]) is torch.Tensor
    # .data stays invisible to autograd, as for nn.Parameter (torch's gradcheck perturbs inputs
    # through .data between forward and backward): an edit of a saved weight does not raise
    plain = nn.Linear(6, 4)
    for layer in (lin, plain):
        y = layer(x.requires_grad_(True)).sum()  # saves the weight for the input's gradient
        layer.weight.data.mul_(2.0)
        y.backward()
        assert type(layer.weight.data) is torch.Tensor
    assert weight.grad is not None and cache_module.parameter_writes(weight) >= 2  # the edit and the step


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


def test_tracked_default_sees_data_edits_after_a_frozen_block():
    layer, x = small_layer(), torch.randn(5, 24)
    with torch.no_grad():
        with frozen_weights(layer):
            layer(x)
        layer.cores[1].data.mul_(3.0)  # outside: the version counter must see it
        torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)


def test_checked_cache_in_host_memory_keeps_no_copy_and_serves_on_after_a_frozen_block():
    """The checked mode compares a digest for host-memory cores (no snapshot copy); a value kept
    through a frozen block is served by the checked mode afterwards without a rebuild, and an
    edit no version counter sees after it is still caught by the value check."""
    layer, x = small_layer(), torch.randn(5, 24)
    cache = layer.weight_cache
    cache.validation = "digest"
    with torch.no_grad():
        layer(x)
        assert cache._snapshot is None and cache._checked_digest is not None and not cache.tracked
        with frozen_weights(layer):
            layer(x)
        misses = cache.misses
        torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)
        assert cache.misses == misses and cache.hits >= 2  # served, not rebuilt
        _numpy_mul(layer)
        torch.testing.assert_close(layer(x), reference(layer, x), **TOL32)
        assert cache.misses == misses + 1
    with pytest.raises(ValueError, match="validation must be one of"):
        cache.validation = "never"


# --- the chain streaming path --------------------------------------------------------------------
@pytest.mark.parametrize("in_f,out_f,max_bond", [
    ([3, 4, 4, 4, 4], [4, 4, 8, 6, 4], 16),
    ([2, 3, 2], [3, 2, 2], None),
    ([4, 2, 3], [2, 5, 2], 3),
    ([2, 3], [3, 2], None),
    ([12, 1], [1, 10], 5),  # rank-5 factors, [out, 1] x [1, in] transposed: a down projection's
    ([1, 12], [10, 1], 5),
    ([4, 1, 3], [1, 5, 2], 3),  # not copy-free from the left: its last core is copied
])
@pytest.mark.parametrize("tokens", [0, 1, 5])
@pytest.mark.parametrize("from_left", [False, True])
def test_stream_chain_equals_the_dense_product(in_f, out_f, max_bond, tokens, from_left):
    bank = MPOBank(num_matrices=2, in_factors=in_f, out_factors=out_f, max_bond=max_bond, dtype=torch.float64)
    cores = [bank.core(1, k) for k in range(bank.m)]
    x = torch.randn(tokens, bank.in_features, dtype=torch.float64)
    y = stream_chain(x, cores, from_left=from_left)
    W = naive_matrix([c.detach() for c in cores])
    torch.testing.assert_close(y, x @ W.T, rtol=1e-12, atol=1e-12)
    # its FLOP formula against opt_einsum's count for the optimal order (a chain of pairwise products)
    assert stream_chain_flops(bank.core_shapes, 1, from_left=from_left) >= default_engine().flops(
        apply_equation(bank.m), [(1, *in_f), *bank.core_shapes]) * (1 - 1e-9)


def test_engine_streams_a_rank_factorization_from_the_side_of_fewer_flops():
    """[in, 1] x [1, out] factors (a down projection's W = U V^T): right to left multiplies every
    input by the whole (r, out) core first (an outer product, out*r FLOPs per input); from the
    left it is x V then U, as a rank-r layer computes it."""
    down = MPOBank(num_matrices=3, in_factors=[1024, 1], out_factors=[1, 512], max_bond=240, share=[1])
    up = MPOBank(num_matrices=3, in_factors=[1, 512], out_factors=[1024, 1], max_bond=240, share=[1])
    assert stream_chain_flops(down.core_shapes, 1, from_left=True) == 2.0 * 240 * (1024 + 512)
    assert default_engine().stream_method(down.core_shapes) == "chain_from_left"
    assert default_engine().stream_method(up.core_shapes) == "chain"
    x = torch.randn(3, 2, 1024)
    with torch.no_grad():
        y = down.stream_batched(x)
        W = torch.stack([naive_matrix([down.core(e, k) for k in range(2)]) for e in range(3)])
    torch.testing.assert_close(y, torch.einsum("bni,boi->bno", x, W), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("from_left", [False, True])
def test_stream_chain_gradients_match_the_dense_product(from_left):
    bank = MPOBank(in_factors=[2, 3, 4], out_factors=[3, 2, 2], dtype=torch.float64)
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 12, dtype=torch.float64)
    cores = [bank.core(0, k) for k in range(bank.m)]
    grads = torch.autograd.grad((stream_chain(x, cores, from_left=from_left) * g).sum(), [x, *bank.cores])
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
                            lambda *a, **kw: calls.append(1) or real(*a, **kw))
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


@pytest.mark.parametrize("in_f,out_f,share", [
    ([1, 12], [10, 1], [1]),      # a shared V: the first core right to left, run once for all tokens
    ([12, 1], [1, 10], [1]),      # a down projection's shared U: the last core from the left
    ([2, 3, 4], [4, 2, 3], [0, 2]),  # shared at both ends of the order, a stacked middle
    ([2, 3, 4], [4, 2, 3], "central"),
    ([2, 3, 4], [4, 2, 3], "none"),
])
def test_grouped_stream_runs_shared_end_cores_once_and_equals_each_experts_product(in_f, out_f, share, monkeypatch):
    from tnmoe.networks import contraction

    torch.manual_seed(0)
    bank = MPOExpertBank(num_experts=4, in_factors=in_f, out_factors=out_f, max_bond=5, share=share,
                         cache_weights=False, dtype=torch.float64).eval()
    counts = [2, 0, 1, 3]  # experts with different token counts (no batched stream)
    x = torch.randn(sum(counts), bank.in_features, dtype=torch.float64)
    rows = [e for e, n in enumerate(counts) for _ in range(n)]
    want = torch.stack([naive_matrix([bank.core(e, k).detach() for k in range(bank.m)]) @ x[t]
                        for t, e in enumerate(rows)])
    gemms = []
    real_linear, real_matmul = torch.nn.functional.linear, torch.Tensor.__matmul__
    with torch.no_grad():
        monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: gemms.append(1) or real_linear(*a, **k))
        monkeypatch.setattr(torch.Tensor, "__matmul__", lambda *a: gemms.append(1) or real_matmul(*a))
        got = bank(x, counts)
        monkeypatch.undo()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    shared = set(bank.shared_indices)
    chain = default_engine().stream_method(bank.core_shapes)
    order = list(range(bank.m)) if chain == "chain_from_left" else list(range(bank.m))[::-1]
    head = next((j for j, k in enumerate(order) if k not in shared), bank.m)
    tail = next((j for j, k in enumerate(order[::-1]) if k not in shared), bank.m)
    active = sum(1 for n in counts if n)
    # one GEMM per shared end core for all tokens, one per stacked core and active expert
    assert chain != "opt_einsum" and len(gemms) == head + tail + active * (bank.m - head - tail)
