"""moe.compress: a trained MoE's experts fitted into (shared) MPO factors under routed calibration data.

References are computed here from the routed inputs captured (hooks on the experts modules) on
the original or compressed model: per-expert routing-weighted covariances, TT-SVD, whitened SVD
and the joint objective, in float64.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tnmoe.moe as moe  # noqa: E402
from tnmoe.moe import MoEConfig  # noqa: E402
from tnmoe.networks.fit import InputCovariance, output_error, tt_svd_with_bonds, whitened_svd  # noqa: E402

from references import naive_matrix  # noqa: E402
from tiny_models import MIXTRAL_DIMS, VOCAB, tiny_gpt2, tiny_mixtral, token_batches  # noqa: E402

D, FF, E, K = MIXTRAL_DIMS
_batches = functools.partial(token_batches, seq=24)


def _probe():
    return torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(99))


def _logits(model):
    with torch.no_grad():
        return model(_probe()).logits


@contextlib.contextmanager
def _routed_inputs(model, layer):
    """Records ``(x, top_k_index, top_k_weights)`` of every call of ``layer``'s experts module."""
    calls = []
    experts = model.model.layers[layer].mlp.experts
    hook = experts.register_forward_pre_hook(lambda mod, args: calls.append(tuple(a.detach().clone() for a in args)))
    try:
        yield calls
    finally:
        hook.remove()


def _capture(model, layer, batches):
    with _routed_inputs(model, layer) as calls, torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)
    return calls


def _original_matrices(mixtral_experts):
    """up, gate, down ``(E, out, in)`` of a MixtralExperts module (gate rows first in gate_up_proj)."""
    gu, down = mixtral_experts.gate_up_proj.detach().double(), mixtral_experts.down_proj.detach().double()
    return {"gate": gu[:, :FF], "up": gu[:, FF:], "down": down}


def _reference_covariances(calls, mats, act, masks=None):
    """Per expert: ``C_in = sum_t w^2 x x^T / N`` and ``C_mid`` of the original intermediate, float64,
    over the tokens where ``masks`` (one ``(batch, seq)`` attention mask per call) is 1."""
    if masks is not None:
        keep = [m.reshape(-1).bool() for m in masks]
        calls = [(x[k], index[k], weights[k]) for (x, index, weights), k in zip(calls, keep)]
    N = sum(x.shape[0] for x, _, _ in calls)
    c_in = torch.zeros(E, D, D, dtype=torch.float64)
    c_mid = torch.zeros(E, FF, FF, dtype=torch.float64)
    for x, index, weights in calls:
        x = x.double()
        for e in range(E):
            tok, slot = (index == e).nonzero(as_tuple=True)
            w = weights[tok, slot].double().unsqueeze(1)
            xe = x[tok]
            h = act(xe @ mats["gate"][e].T) * (xe @ mats["up"][e].T)
            c_in[e] += (w * xe).T @ (w * xe)
            c_mid[e] += (w * h).T @ (w * h)
    return c_in / N, c_mid / N


def _bank_weights(model, layer, role):
    return getattr(model.model.layers[layer].mlp.experts.experts, role).weights().detach().double()


# -- exactness ---------------------------------------------------------------------------------------
def test_lossless_bonds_reproduce_the_logits():
    model = tiny_mixtral()
    want = _logits(model)
    config = MoEConfig(share="none", factors={D: [2, 4, 4], FF: [3, 4, 4]})
    model.train()  # calibration runs in eval mode anyway; the modes are restored (and given to the new experts)
    report = moe.compress(model, config, calibration=_batches(n=1), progress=False)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    got = _logits(model)
    assert all(isinstance(model.model.layers[i].mlp.experts, moe.RoutedExperts) for i in range(2))
    # lossless MPOs of float64 matrices rebuild them to ~1e-14 relative; through a 2-layer net the
    # logits move by far less than 1e-9 of their scale
    assert torch.allclose(got, want, rtol=0, atol=1e-9 * float(want.abs().max()))
    assert max(max(v) for r in report.layers for v in r.output_error.values()) < 1e-10


# -- the fit against independent references ---------------------------------------------------------
FACTORS3 = {D: [2, 4, 4], FF: [3, 4, 4]}


def test_truncated_fit_is_never_worse_than_per_expert_tt_svd_on_the_routed_covariances():
    """Padded batches: the padding tokens (attention_mask 0) are left out of the statistics."""
    model = tiny_mixtral()
    batches = _batches()
    for b in batches:  # right padding of 1..4 positions per row
        b["attention_mask"] = torch.ones_like(b["input_ids"])
        for row in range(b["input_ids"].shape[0]):
            b["attention_mask"][row, -(row + 1):] = 0
    original = copy.deepcopy(model)
    calls = _capture(original, 0, batches)
    experts0 = original.model.layers[0].mlp.experts
    mats = _original_matrices(experts0)
    masks = [b["attention_mask"] for b in batches]
    c_in, c_mid = _reference_covariances(calls, mats, experts0.act_fn, masks)
    with_padding = _reference_covariances(calls, mats, experts0.act_fn)[0]
    assert _relative(with_padding, c_in) > 1e-3  # the padding would change the statistics
    report = moe.compress(model, MoEConfig(share="none", factors=FACTORS3, max_bond=3), calibration=batches,
                          progress=False)
    layer0 = report.layers[0]
    all_index = torch.cat([index[m.reshape(-1).bool()] for (_, index, _), m in zip(calls, masks)])
    assert report.calibration_tokens == sum(int(m.sum()) for m in masks)
    assert layer0.routed_tokens == [int((all_index == e).sum()) for e in range(E)]
    for role, C in (("up", c_in), ("gate", c_in), ("down", c_mid)):
        W, fitted = mats[role], _bank_weights(model, 0, role)
        bonds = layer0.bond_dims[role][1:-1]
        assert bonds == [3, 3]
        for e in range(E):
            tt = naive_matrix(tt_svd_with_bonds(W[e], FACTORS3[W.shape[2]], FACTORS3[W.shape[1]], bonds))
            tt_err, fit_err = output_error(W[e], tt, C[e]), output_error(W[e], fitted[e], C[e])
            # compress's covariances (from its hooks) are the reference's: same error, float64 rounding
            assert fit_err == pytest.approx(layer0.output_error[role][e], rel=1e-9)
            assert fit_err <= tt_err * (1 + 1e-12)
            assert fit_err < 0.97 * tt_err  # the data-aware fit actually gains over TT-SVD here


def _whitened_reference(mats, c_in, c_mid, rank):
    """Per role, the per-expert whitened SVD (closed-form optimum of the routed objective)."""
    out = {}
    for role, C in (("up", c_in), ("gate", c_in), ("down", c_mid)):
        out[role] = torch.stack([whitened_svd(mats[role][e], rank, InputCovariance.from_matrix(C[e]))
                                 for e in range(E)])
    return out


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("sequential", [True, False])
def test_rank_r_per_expert_fit_is_the_whitened_svd_of_the_layer_inputs_it_was_given(sequential):
    """m = 2 with unit factors, share="none": each expert's matrix is the whitened SVD under its
    routed covariance. Sequential: layer 1's covariance comes from the compressed layer 0's
    outputs (captured on the compressed model); not sequential: from the original model's."""
    model = tiny_mixtral()
    batches = _batches()
    original = copy.deepcopy(model)
    rank = 5
    config = MoEConfig(share="none", factors=moe.low_rank_factors(D, FF), max_bond=rank)
    moe.compress(model, config, calibration=batches, progress=False, sequential=sequential)
    act = original.model.layers[0].mlp.experts.act_fn
    errors = {}
    for source_name, source in (("compressed", model), ("original", original)):
        calls = _capture(source, 1, batches)
        mats = _original_matrices(original.model.layers[1].mlp.experts)
        want = _whitened_reference(mats, *_reference_covariances(calls, mats, act), rank)
        errors[source_name] = max(_relative(_bank_weights(model, 1, role), want[role]) for role in want)
    # layer 0's inputs are the same either way
    calls0 = _capture(original, 0, batches)
    mats0 = _original_matrices(original.model.layers[0].mlp.experts)
    want0 = _whitened_reference(mats0, *_reference_covariances(calls0, mats0, act), rank)
    assert max(_relative(_bank_weights(model, 0, role), want0[role]) for role in want0) < 1e-8
    # the ALS from the closed-form start changes nothing but rounding: float64, well separated spectra
    matched, other = ("compressed", "original") if sequential else ("original", "compressed")
    assert errors[matched] < 1e-8
    assert errors[other] > 1e-4  # the other layer-1 inputs give a measurably different fit


def test_shared_v_joint_objective_is_the_routed_output_error_of_the_captured_activations():
    """m = 2, share=[1]: one hidden-side basis per layer and role (up / gate's V) fitted to all
    experts jointly; the fit's objective is ``(1/N) sum_t sum_e w_te^2 ||(W_e - Ŵ_e) x_t||^2``."""
    model = tiny_mixtral()
    batches = _batches()
    original = copy.deepcopy(model)
    calls = _capture(original, 0, batches)
    before = moe.count_parameters(original).total
    config = MoEConfig(share=[1], factors=moe.low_rank_factors(D, FF))
    report = moe.compress(model, config, calibration=batches, target_ratio=0.4, progress=False)
    per_expert = moe.compress(copy.deepcopy(original), dataclasses.replace(config, share="none"), calibration=batches,
                              target_ratio=0.4, progress=False)
    for r in (report, per_expert):  # equal budgets, each within it
        assert r.params_after <= 0.4 * r.params_before
    assert report.params_before == per_expert.params_before == before - moe.count_parameters(original).total \
        + sum(p.numel() for n, p in original.named_parameters() if ".experts." in n)
    bank = model.model.layers[0].mlp.experts.experts.up
    assert bank.shared_indices == [1] and bank.bond_dims == [1, report.config.max_bond, 1]
    counted = moe.count_parameters(model)
    assert report.params_after == counted.shared + E * counted.per_expert
    mats = _original_matrices(original.model.layers[0].mlp.experts)
    N = sum(x.shape[0] for x, _, _ in calls)
    for role in ("up", "gate"):
        fitted = _bank_weights(model, 0, role)
        total = 0.0
        for x, index, weights in calls:
            for e in range(E):
                tok, slot = (index == e).nonzero(as_tuple=True)
                err = (x[tok].double() @ (mats[role][e] - fitted[e]).T) * weights[tok, slot].double().unsqueeze(1)
                total += float((err * err).sum())
        # float64 sums of ~1e4 terms on both sides
        assert report.layers[0].objective[role][-1] == pytest.approx(total / N, rel=1e-9)
        # the shared basis really is one tensor: every expert's V is the same
        assert torch.equal(bank.cores[1], model.model.layers[0].mlp.experts.experts.up.cores[1])
    assert all(t is None for v in report.layers[0].tt_svd_output_error.values() for t in v)


def test_an_expert_no_token_reached_is_fitted_to_the_layers_pooled_covariance():
    model = tiny_mixtral()

    def never_expert_3(router, args, output):  # layer 0's router never picks expert 3
        logits = output[0].clone()
        logits[:, 3] = float("-inf")
        top, index = torch.topk(torch.softmax(logits.float(), -1), K, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index

    model.model.layers[0].mlp.gate.register_forward_hook(never_expert_3)
    batches = _batches()
    original = copy.deepcopy(model)
    calls = _capture(original, 0, batches)
    assert not any(bool((index == 3).any()) for _, index, _ in calls)
    rank = 4
    report = moe.compress(model, MoEConfig(share="none", factors=moe.low_rank_factors(D, FF), max_bond=rank),
                          calibration=batches, progress=False)
    assert report.fallbacks == {"model.layers.0.mlp.experts": [3]}
    assert report.layers[0].routed_tokens[3] == 0 and "fallback" in str(report)
    mats = _original_matrices(original.model.layers[0].mlp.experts)
    x = torch.cat([x for x, _, _ in calls]).double()  # every token of the layer, weight 1
    act = original.model.layers[0].mlp.experts.act_fn
    h = act(x @ mats["gate"][3].T) * (x @ mats["up"][3].T)
    for role, inputs in (("up", x), ("gate", x), ("down", h)):
        want = whitened_svd(mats[role][3], rank, inputs)  # the scale of a covariance does not move its optimum
        got = _bank_weights(model, 0, role)[3]
        assert torch.isfinite(got).all()
        assert _relative(got, want) < 1e-8


# -- all or nothing, clear errors -------------------------------------------------------------------
def test_a_failure_in_a_later_layer_leaves_the_model_unchanged(monkeypatch):
    import importlib

    compress_module = importlib.import_module("tnmoe.models.compress")  # the module, not the function

    model = tiny_mixtral()
    want = _logits(model)
    originals = [model.model.layers[i].mlp.experts for i in range(2)]
    real_fit, calls = compress_module._fit, []

    def failing_fit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("injected failure")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(compress_module, "_fit", failing_fit)
    with pytest.raises(ValueError, match="injected failure.*model left unchanged"):
        moe.compress(model, MoEConfig(share="none", m=2, max_bond=2), calibration=_batches(n=1), progress=False)
    assert len(calls) == 2  # layer 0 was fitted and installed before layer 1 failed
    assert [model.model.layers[i].mlp.experts for i in range(2)] == originals
    assert moe.get_moe_config(model) is None and not hasattr(model.config, "tnmoe")
    assert torch.equal(_logits(model), want)


def test_clear_errors():
    model = tiny_mixtral()
    config = MoEConfig(share="none", m=2)
    with pytest.raises(ValueError, match="no routed experts"):
        moe.compress(tiny_gpt2(), config, calibration=[torch.zeros(1, 4, dtype=torch.long)], progress=False)
    with pytest.raises(ValueError, match="needs calibration"):
        moe.compress(model, config, calibration=None, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        moe.compress(model, config, calibration=[], progress=False)
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="target_ratio must be"):
            moe.compress(model, config, calibration=_batches(n=1), target_ratio=bad, progress=False)
    with pytest.raises(ValueError, match="not both"):
        moe.compress(model, dataclasses.replace(config, max_bond=2), calibration=_batches(n=1), target_ratio=0.5)
    with pytest.raises(ValueError, match="below what bond 1 reaches"):
        moe.compress(model, config, calibration=_batches(n=1), target_ratio=1e-4, progress=False)
    with pytest.raises(ValueError, match="expert_type='mpo'"):
        moe.compress(model, MoEConfig(expert_type="dense"), calibration=_batches(n=1), progress=False)
    with pytest.raises(ValueError, match="out of range"):
        moe.compress(model, MoEConfig(share=[5], m=2), calibration=_batches(n=1), progress=False)
    with pytest.raises(ValueError, match="top_k=3 contradicts"):
        moe.compress(model, MoEConfig(share="none", m=2, top_k=3), calibration=_batches(n=1), progress=False)
    with pytest.raises(ValueError, match="router options router='topk'"):
        moe.compress(model, MoEConfig(share="none", m=2, router="topk"), calibration=_batches(n=1), progress=False)
    with pytest.raises(ValueError, match="dimensions \\[64\\], which no experts matrix has"):
        moe.compress(model, MoEConfig(share="none", factors={D: [4, 8], FF: [6, 8], 64: [8, 8]}),
                     calibration=_batches(n=1), progress=False)
    with pytest.raises(ValueError, match="d_model == d_ff"):
        moe.low_rank_factors(32, 32)
    assert moe.get_moe_config(model) is None  # nothing was installed by any of these


# -- persistence ---------------------------------------------------------------------------------------
def test_a_compressed_model_round_trips_through_save_and_load_at_its_compressed_size(tmp_path):
    model = tiny_mixtral(torch.float32)
    uncompressed_bytes = 4 * sum(p.numel() for p in model.parameters())
    experts_bytes = 4 * sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    config = MoEConfig(share=[1], factors=moe.low_rank_factors(D, FF))
    report = moe.compress(model, config, calibration=_batches(), target_ratio=0.5, progress=False)
    want = _logits(model)
    folder = moe.save_pretrained(model, tmp_path / "compressed")
    loaded = moe.from_pretrained(folder)
    assert isinstance(loaded.model.layers[0].mlp.experts, moe.RoutedExperts)
    assert loaded.model.layers[0].mlp.experts.experts.up.shared_indices == [1]
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    got = _logits(loaded)
    # same parameters, same code: equal up to float32 rounding of a different kernel choice
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    size = (folder / "model.safetensors").stat().st_size
    stored = 4 * sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert stored <= size <= stored + 64 * 1024  # the compressed tensors, plus the safetensors header
    assert size - (uncompressed_bytes - experts_bytes) <= 0.5 * experts_bytes + 64 * 1024
    assert report.params_after <= 0.5 * report.params_before
    # memory-bounded inference by default, also after loading: eval forwards cache no rebuilt matrix
    from tnmoe.networks import MPOBank

    for m in (model, loaded):
        banks = [b for b in m.modules() if isinstance(b, MPOBank)]
        assert banks and not any(b.cache_weights for b in banks)
        assert all(b.weight_cache.value is None for b in banks)


# -- tnmoe-converted models ------------------------------------------------------------------------------
def test_the_experts_of_tnmoe_converted_models_compress_too():
    """A converted Mixtral (RoutedExperts, dense bank) and an upcycled GPT-2 (MoELayer: its router
    kept, its experts replaced), lossless: same logits as before compressing."""
    mixtral = tiny_mixtral(torch.float64)  # convert's probe compares a float64 model in float64
    moe.convert(mixtral, MoEConfig(expert_type="dense"), progress=False)
    want = _logits(mixtral)
    report = moe.compress(mixtral, MoEConfig(share="none", factors=FACTORS3), calibration=_batches(n=1),
                          progress=False)
    assert torch.allclose(_logits(mixtral), want, rtol=0, atol=1e-9 * float(want.abs().max()))
    assert moe.get_moe_config(mixtral).expert_type == "mpo" and len(report.layers) == 2

    gpt2 = tiny_gpt2().double().eval()
    moe.convert(gpt2, MoEConfig(expert_type="dense", num_experts=4, router="topk", top_k=2, init_noise=0.1,
                                capacity_factor=None), progress=False)
    routers = [layer.router for _, layer in moe.moe_layers(gpt2)]
    ids = torch.randint(2, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = gpt2(ids).logits
    report = moe.compress(gpt2, MoEConfig(share="none", m=2), calibration=[{"input_ids": ids}], progress=False)
    with torch.no_grad():
        got = gpt2(ids).logits
    assert [layer.router for _, layer in moe.moe_layers(gpt2)] == routers
    assert all(isinstance(layer.experts.up, moe.MPOExpertBank) for _, layer in moe.moe_layers(gpt2))
    assert moe.get_moe_config(gpt2).router == "topk" and moe.get_moe_config(gpt2).expert_type == "mpo"
    assert torch.allclose(got, want, rtol=0, atol=1e-9 * float(want.abs().max()))
    assert [r.name for r in report.layers] == ["transformer.h.0.mlp.experts", "transformer.h.1.mlp.experts"]


# -- memory: one layer at a time -----------------------------------------------------------------------
def test_an_offloaded_model_is_compressed_one_layer_on_the_device_at_a_time():
    """accelerate's ``cpu_offload`` keeps every parameter off the execution device (meta, weights
    in a CPU map) and materialises a module's for its call. Measured: the bytes of the model's
    parameters materialised at every module call during compression (compress's own statistics
    and its copy of the current layer's expert matrices come on top: one layer's). Bound: two
    layers plus the embeddings; the whole model is well over that. The result equals the same
    compression of the model in memory."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_mixtral(torch.float32, layers=4)
    in_memory = copy.deepcopy(model)
    layer_bytes = 4 * sum(p.numel() for p in model.model.layers[0].parameters())
    outside_bytes = 4 * sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n)
    model_bytes = 4 * sum(p.numel() for p in model.parameters())
    config = MoEConfig(share="none", factors=moe.low_rank_factors(D, FF), max_bond=6)
    batches = _batches(n=2, seq=16)
    moe.compress(in_memory, config, calibration=batches, progress=False)
    accelerate.cpu_offload(model, execution_device="cpu")
    peak = []

    def resident(module, args):
        peak.append(sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(resident)
    try:
        moe.compress(model, config, calibration=batches, progress=False, execution_device="cpu")
    finally:
        hook.remove()
    assert model_bytes > 1.8 * (2 * layer_bytes + outside_bytes)
    assert 0 < max(peak) <= 2 * layer_bytes + outside_bytes
    assert not any(not p.is_meta for p in model.parameters())  # the compressed experts are offloaded too
    want = _logits(in_memory)
    assert torch.allclose(_logits(model), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_routing_by_the_model_calls_padding_mask_is_compressed_in_one_pass():
    """ignore_padding=True routes by the model call's attention_mask, which a decoder layer run on
    its own never sees: sequential compression refuses it, sequential=False runs the whole model."""
    gpt2 = tiny_gpt2().double().eval()
    moe.convert(gpt2, MoEConfig(expert_type="dense", num_experts=4, router="topk", top_k=2, init_noise=0.1,
                                capacity_factor=None, ignore_padding=True), progress=False)
    ids = torch.randint(2, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        want = gpt2(**batch).logits
    config = MoEConfig(share="none", m=2)
    with pytest.raises(ValueError, match="pass sequential=False"):
        moe.compress(gpt2, config, calibration=[batch], progress=False)
    report = moe.compress(gpt2, config, calibration=[batch], progress=False, sequential=False)
    assert report.calibration_tokens == 21 and [sum(r.routed_tokens) for r in report.layers] == [42, 42]
    with torch.no_grad():
        got = gpt2(**batch).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-9 * float(want.abs().max()))




def test_per_matrix_bonds_of_an_earlier_conversion_do_not_reach_the_compressed_record(tmp_path):
    """An upcycled model whose convert chose per-matrix bonds (target_ratio -> bond_dims): the
    compressed experts have compress's bonds, and the record says so (else the checkpoint would
    rebuild other shapes). config.target_ratio is compress's target_ratio."""
    gpt2 = tiny_gpt2().eval()
    moe.convert(gpt2, MoEConfig(num_experts=2, router="topk", top_k=1, init_noise=0.1, capacity_factor=None,
                                share="none", m=2, target_ratio=0.5), progress=False)
    assert moe.get_moe_config(gpt2).bond_dims
    ids = torch.randint(2, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    report = moe.compress(gpt2, MoEConfig(share="none", m=2, target_ratio=0.3), calibration=[{"input_ids": ids}],
                          progress=False)
    recorded = moe.get_moe_config(gpt2)
    assert recorded.bond_dims is None and recorded.target_ratio is None and recorded.max_bond == report.config.max_bond
    assert report.ratio <= 0.3
    with torch.no_grad():
        want = gpt2(ids).logits
    loaded = moe.from_pretrained(moe.save_pretrained(gpt2, tmp_path / "c"))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    with pytest.raises(ValueError, match="bond_dims is not supported"):
        moe.compress(gpt2, MoEConfig(share="none", m=2, bond_dims={"x.up": [2]}), calibration=[{"input_ids": ids}])
