"""MoE layers against a naive per-token reference with experts that differ; reconstruction
strategies; the never-stale weight cache; mixed precision; MPOLinear as nn.Linear."""

import math

import pytest
import torch
from torch import nn

import tnmoe.moe as moe
from references import naive_matrix
from tiny_models import inputs_for, tiny_bert, tiny_gpt2, tiny_t5
from tnmoe.moe import (
    DenseExpertBank,
    ExpertFFN,
    HashRouter,
    MoEConfig,
    MoELayer,
    MPOExpertBank,
    SwitchRouter,
    TopKRouter,
)
from tnmoe.networks import MPO, MPOBank, MPOLinear


def bank_matrix(bank, e):
    if isinstance(bank, DenseExpertBank):
        return bank.weight[e]
    return naive_matrix([bank.core(e, k) for k in range(bank.m)])


def naive_ffn(experts: ExpertFFN, x, e):
    up = bank_matrix(experts.up, e) @ x
    if experts.up_bias is not None:
        up = up + experts.up_bias[e]
    if experts.gate is not None:
        h = experts.activation(bank_matrix(experts.gate, e) @ x) * up
    else:
        h = experts.activation(up)
    y = bank_matrix(experts.down, e) @ h
    if experts.down_bias is not None:
        y = y + experts.down_bias[e]
    return y


def naive_routing(router, x):
    """(experts (T, k), weights (T, k), kept (T, k) bool) token by token, Switch priority."""
    logits = x.float() @ router.gate.weight.float().T
    if router.gate.bias is not None:
        logits = logits + router.gate.bias.float()
    probs = logits.softmax(-1)
    T, k, E = x.shape[0], router.top_k, router.num_experts
    top_p, top_i = probs.topk(k, dim=-1)
    if router.gate_scaling == "preserve":
        w = top_p / top_p.detach() / k
    elif router.gate_scaling == "normalized":
        w = top_p / top_p.sum(-1, keepdim=True)
    else:
        w = top_p
    cap = router.capacity(T)
    kept = torch.ones(T, k, dtype=torch.bool)
    if cap is not None:
        load = [0] * E
        for choice in range(k):  # first choices before second, earlier tokens first
            for t in range(T):
                e = int(top_i[t, choice])
                kept[t, choice] = load[e] < cap
                load[e] += 1
    return top_i, w, kept


def random_experts(kind, share, gated, E=4, d=12, d_ff=24, dtype=torch.float64):
    def bank(i, o):
        if kind == "dense":
            return DenseExpertBank(num_experts=E, in_features=i, out_features=o, dtype=dtype)
        fi = {12: [2, 3, 2], 24: [2, 3, 4], 48: [4, 3, 4]}
        return MPOExpertBank(num_experts=E, in_factors=fi[i], out_factors=fi[o], share=share, dtype=dtype)

    experts = ExpertFFN(up=bank(d, d_ff), down=bank(d_ff, d), gate=bank(d, d_ff) if gated else None,
                        up_bias=True, down_bias=True)
    with torch.no_grad():
        experts.up_bias.normal_()
        experts.down_bias.normal_()
    return experts


CASES = [
    # (expert kind, share, gated, router, top_k, capacity_factor)
    ("mpo", "central", False, "switch", 1, None),
    ("mpo", "central", True, "switch", 1, 0.5),
    ("mpo", "none", False, "topk", 2, None),
    ("mpo", [0, 2], True, "topk", 2, 0.6),
    ("mpo", "auxiliary", False, "topk", 2, 0.75),
    ("dense", None, False, "switch", 1, 0.5),
    ("dense", None, True, "topk", 2, None),
]


@pytest.mark.parametrize("kind,share,gated,router_kind,top_k,cf", CASES)
def test_layer_equals_naive_per_token_reference(kind, share, gated, router_kind, top_k, cf):
    torch.manual_seed(1)
    d, E, T = 12, 4, 23
    experts = random_experts(kind, share, gated, E=E)
    if router_kind == "switch":
        router = SwitchRouter(d_model=d, num_experts=E, capacity_factor=cf, drop_tokens=cf is not None)
    else:
        router = TopKRouter(d_model=d, num_experts=E, top_k=top_k, capacity_factor=cf, bias=True,
                            gate_scaling="normalized")
    with torch.no_grad():
        router.gate.weight.normal_()  # decisive routing: experts really differ per token
        if router.gate.bias is not None:
            router.gate.bias.normal_()
    layer = MoELayer(router=router.double(), experts=experts, load_balancing_coef=0.0)
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(T, d, dtype=torch.float64)

    y = layer(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * probe).sum(), [x] + params, allow_unused=True)

    idx, w, kept = naive_routing(router, x)
    rows = []
    for t in range(T):
        acc = torch.zeros(d, dtype=torch.float64)
        for c in range(idx.shape[1]):
            if kept[t, c]:
                acc = acc + w[t, c].to(acc.dtype) * naive_ffn(experts, x[t], int(idx[t, c]))
        rows.append(acc)
    ref = torch.stack(rows)
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x] + params, allow_unused=True)

    assert len(set(idx[:, 0].tolist())) >= 3, "routing must use several experts"
    if cf is not None:
        assert (~kept).any(), "the capacity case must drop something"
        assert layer.last_stats.dropped == int((~kept).sum())
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    for (name, _), g, r in zip([("x", None)] + list(layer.named_parameters()), grads, ref_grads):
        if r is None:
            assert g is None or g.abs().max() == 0, name
        else:
            torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_reconstruction_strategies_agree():
    torch.manual_seed(0)
    for share in ("central", "none", [0, 3]):
        bank = MPOExpertBank(num_experts=5, in_factors=[2, 3, 2, 2], out_factors=[3, 2, 2, 2],
                             share=share, dtype=torch.float64)
        out = {}
        for strategy in ("loop", "batched"):
            bank.reconstruct_strategy = strategy
            bank.zero_grad()
            W = bank.weights([4, 1, 3])
            probe = torch.randn_like(W, generator=torch.Generator().manual_seed(3))
            (W * probe).sum().backward()
            out[strategy] = (W.detach(), [p.grad.clone() for p in bank.parameters()])
        torch.testing.assert_close(out["loop"][0], out["batched"][0])
        for a, b in zip(out["loop"][1], out["batched"][1]):
            torch.testing.assert_close(a, b)
        ref = torch.stack([naive_matrix([bank.core(e, k) for k in range(bank.m)]) for e in (4, 1, 3)])
        torch.testing.assert_close(out["batched"][0], ref.detach())
    bank.reconstruct_strategy = "fastest"
    with pytest.raises(ValueError, match="reconstruct_strategy"):
        bank.weights()


def test_auto_strategy_batches_on_cpu_only_where_freed_memory_is_retained(monkeypatch):
    import tnmoe.runtime as runtime

    bank = MPOExpertBank(num_experts=3, in_factors=[2, 3, 2], out_factors=[3, 2, 2])
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.setattr(runtime, "_retained", None)
    assert bank._strategy(torch.device("cpu")) == "loop"  # fresh E-fold buffers would page-fault
    assert bank._strategy(torch.device("cuda")) == "batched"
    monkeypatch.setattr(runtime, "_retained", True)
    assert bank._strategy(torch.device("cpu")) == "batched"
    assert bank._strategy(torch.device("mps")) == "loop"  # glibc's setting says nothing there
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    monkeypatch.setattr(runtime, "_retained", False)  # an explicit retain_freed_cpu_memory(False) wins
    assert bank._strategy(torch.device("cpu")) == "loop"
    monkeypatch.setattr(runtime, "_retained", None)
    assert bank._strategy(torch.device("cpu")) == ("batched" if runtime._glibc() else "loop")


# --- the weight cache is never stale ------------------------------------------------------------
def test_mpolinear_cache_sees_edits_through_data():
    layer = MPOLinear(in_features=64, out_features=48, m=3, mode="reconstruct").eval()
    x = torch.randn(7, 64)
    with torch.no_grad():
        a = layer(x)
        layer.cores[1].data.mul_(3.0)  # bypasses the version counter
        b = layer(x)
        fresh = nn.functional.linear(x, naive_matrix(list(layer.cores)), layer.bias)
        torch.testing.assert_close(b, fresh, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a, b)
        layer.cores[0].data = layer.cores[0].data * -1  # a new tensor under the parameter
        c = layer(x)
        fresh = nn.functional.linear(x, naive_matrix(list(layer.cores)), layer.bias)
        torch.testing.assert_close(c, fresh, rtol=1e-5, atol=1e-5)
        layer(x)
    assert layer.weight_cache.hits >= 1  # unchanged cores are served from the cache


def test_converted_model_cache_sees_ema_style_edits():
    model = moe.convert(tiny_gpt2(), MoEConfig(num_experts=2, m=3, init_noise=0.05), progress=False).eval()
    batch = inputs_for(model)
    with torch.no_grad():
        model(**batch)
        for p in model.parameters():  # EMA/SWA-style update through .data
            p.data.mul_(0.9).add_(0.01)
        cached = model(**batch).logits
        for _, layer in moe.moe_layers(model):
            for bank in layer.experts.banks().values():
                bank.cache_weights = False
        fresh = model(**batch).logits
    torch.testing.assert_close(cached, fresh)


# --- conversion: modes, all-or-nothing --------------------------------------------------------
@pytest.mark.parametrize("router", ["switch", "topk", "hash"])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_t5, tiny_bert])
def test_convert_eval_model_stays_in_eval_and_reproduces_it(router, build):
    torch.manual_seed(0)
    model = build().eval()
    batch = inputs_for(model, batch=4, seq=16)
    with torch.no_grad():
        ref = model(**batch).logits
    cfg = MoEConfig(num_experts=4, m=3, router=router, top_k=2 if router == "topk" else 1,
                    capacity_factor=0.5, init_noise=0.0)
    moe.convert(model, cfg, progress=False)
    assert all(not m.training for m in model.modules())
    with torch.no_grad():
        a, b = model(**batch).logits, model(**batch).logits
    assert torch.equal(a, b)
    torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5)
    fresh = build().train()
    moe.convert(fresh, cfg, progress=False)
    assert all(layer.training for _, layer in moe.moe_layers(fresh))


def test_convert_is_all_or_nothing():
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[0, 0] = float("nan")
    before = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="transformer.h.1.mlp.*unchanged.*NaN"):
        moe.convert(model, MoEConfig(num_experts=2, m=3), progress=False)
    assert dict(model.named_modules()).keys() == before.keys()
    assert all(model.get_submodule(n) is m for n, m in before.items())
    assert not moe.moe_layers(model) and moe.get_moe_config(model) is None
    assert not hasattr(model.config, "tnmoe")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], equal_nan=True)
    with pytest.raises(ValueError, match="NaN"):
        moe.convert(model, MoEConfig(num_experts=2, expert_type="dense"), progress=False)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[0, 0] = 0.0
    moe.convert(model, MoEConfig(num_experts=2, m=3), progress=False)  # a retry records everything
    assert moe.converted_modules(model) == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    with pytest.raises(ValueError, match="already converted"):
        moe.convert(model, MoEConfig(num_experts=2, m=3), progress=False)


# --- hash routing uses only this call's ids --------------------------------------------------
def test_hash_routing_never_reuses_ids():
    model = moe.convert(tiny_gpt2(), MoEConfig(num_experts=4, m=3, router="hash", capacity_factor=None),
                        progress=False).eval()
    batch = inputs_for(model, batch=2, seq=8)
    with torch.no_grad():
        model(**batch)
        block = model.transformer.h[0]
        h = torch.randn(2, 8, 32)
        with pytest.raises(ValueError, match="token ids"):
            block.mlp(h)
        ids = torch.randint(0, 100, (2, 8))
        direct = block.mlp(h, token_ids=ids)
        layer = block.mlp
        expected_experts = layer.router.table[ids.reshape(-1) % layer.router.table.numel()]
        assert torch.equal(layer.last_stats.tokens_per_expert,
                           torch.bincount(expected_experts, minlength=4))
        assert direct.shape == h.shape


# --- inputs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(max_bond=2.5), "max_bond"),
    (dict(max_bond=0), "max_bond"),
    (dict(eval_capacity_factor=0), "eval_capacity_factor"),
    (dict(eval_capacity_factor=-1.0), "eval_capacity_factor"),
    (dict(capacity_factor=0), "capacity_factor"),
    (dict(share="centre"), "share"),
    (dict(share=[0.5]), "share"),
    (dict(gate_scaling="softmax"), "gate_scaling"),
    (dict(router="switch", noisy_gating=True), "noisy_gating"),
    (dict(router="topk", top_k=2, jitter_noise=0.1), "jitter_noise"),
    (dict(router="switch", vocab_size=100), "vocab_size"),
    (dict(router="hash", router_bias=True), "router_bias"),
    (dict(router="hash", load_balancing_coef=0.01), "load_balancing_coef"),
    (dict(router="hash", vocab_size=0), "vocab_size"),
    (dict(expert_type="dense", max_bond=8), "max_bond"),
    (dict(num_experts=2.0), "num_experts"),
    (dict(top_k=0, router="topk"), "top_k"),
    (dict(m=1), "m must be"),
    (dict(factors={768: [3, 4, 4, 4, 5]}), "multiply"),
    (dict(drop_tokens="yes"), "drop_tokens"),
])
def test_moe_config_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kwargs)


def test_modules_reject_bad_inputs():
    with pytest.raises(ValueError, match="capacity_factor"):
        TopKRouter(d_model=4, num_experts=2, capacity_factor=0)
    with pytest.raises(ValueError, match="eval_capacity_factor"):
        SwitchRouter(d_model=4, num_experts=2, eval_capacity_factor=-0.5)
    with pytest.raises(ValueError, match="vocab_size"):
        HashRouter(num_experts=2, vocab_size=0)
    with pytest.raises(ValueError, match="max_bond"):
        MPOExpertBank(num_experts=2, in_factors=[2, 2], out_factors=[2, 2], max_bond=0)
    with pytest.raises(ValueError, match="max_bond"):
        MPOLinear(in_features=16, out_features=16, m=2, max_bond=0)
    layer = MPOLinear(in_features=16, out_features=16, m=2)
    with pytest.raises(ValueError, match="dtype.*float64.*float32"):
        layer(torch.randn(3, 16, dtype=torch.float64))
    moe_layer = MoELayer(router=SwitchRouter(d_model=4, num_experts=2),
                         experts=ExpertFFN(up=DenseExpertBank(num_experts=2, in_features=4, out_features=8),
                                           down=DenseExpertBank(num_experts=2, in_features=8, out_features=4)))
    with pytest.raises(ValueError, match="dtype"):
        moe_layer(torch.randn(3, 4, dtype=torch.float64))
    empty = moe_layer(torch.randn(0, 5, 4))
    assert empty.shape == (0, 5, 4) and moe_layer.last_stats.num_tokens == 0
    assert float(moe_layer.last_aux_loss) == 0.0


# --- MPOLinear is nn.Linear ------------------------------------------------------------------
def test_mpolinear_is_a_drop_in_linear():
    lin = nn.Linear(48, 96)
    layer = MPOLinear.from_linear(lin, in_factors=[3, 4, 4], out_factors=[4, 6, 4])
    assert layer.weight.shape == lin.weight.shape and (layer.in_features, layer.out_features) == (48, 96)
    assert layer.bias.shape == lin.bias.shape and layer.truncation_error == 0.0
    x = torch.randn(5, 48)
    torch.testing.assert_close(nn.functional.linear(x, layer.weight, layer.bias), layer(x))
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-4, atol=1e-5)
    small = MPOLinear.from_linear(lin, in_factors=[3, 4, 4], out_factors=[4, 6, 4], max_bond=2)
    err = float(torch.linalg.norm(small.weight - lin.weight).detach())
    assert small.truncation_error > 0 and err <= small.truncation_error * (1 + 1e-4)
    assert MPOLinear(in_features=48, out_features=96, m=3).truncation_error == 0.0
    assert not MPOLinear.from_linear(lin.eval(), in_factors=3).training


def test_cores_shared_across_layers_by_configuration():
    a = MPOBank(num_matrices=2, in_factors=[2, 4, 2], out_factors=[2, 4, 2], share="central")
    b = MPOBank(num_matrices=2, in_factors=[2, 4, 2], out_factors=[2, 4, 2], share="central")
    b.tie_cores(a, [1])
    model = nn.ModuleList([a, b])
    assert b.cores[1] is a.cores[1]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in a.parameters()) + \
        sum(p.numel() for p in b.stacked_parameters())
    with torch.no_grad():
        a.cores[1].mul_(2.0)
    torch.testing.assert_close(b.weights()[0], naive_matrix([b.core(0, k) for k in range(3)]))
    other = MPOBank(num_matrices=3, in_factors=[2, 4, 2], out_factors=[2, 4, 2])
    with pytest.raises(ValueError, match="cannot tie"):
        other.tie_cores(a, [0])  # stacked over 3 matrices vs 2


# --- mixed precision ----------------------------------------------------------------------------
def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [3, 5, 9])
@pytest.mark.parametrize("mode", ["stream", "reconstruct"])
def test_mpolinear_autocast_error_matches_linear(dtype, m, mode):
    torch.manual_seed(0)
    layer = MPOLinear(in_features=512, out_features=512, m=m, max_bond=None if m < 9 else 64, mode=mode)
    lin = layer.to_linear()
    x = torch.randn(96, 512, requires_grad=True)
    ref = layer(x)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
        y_lin = lin(x)
    assert y.dtype == dtype
    assert _rel(y, ref) <= 1.5 * _rel(y_lin, ref) + 1e-6
    y.float().sum().backward()  # backward works and reaches the fp32 cores
    assert all(c.grad is not None and c.grad.dtype == torch.float32 for c in layer.cores)
    layer.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        y_eval = layer(x)
    assert _rel(y_eval, ref) <= 1.5 * _rel(y_lin, ref) + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_converted_model_trains_and_evaluates_under_autocast(dtype):
    torch.manual_seed(0)
    model = tiny_gpt2(n_inner=128)
    cfg = MoEConfig(num_experts=2, m=5, factors={32: [2, 2, 2, 2, 2], 128: [2, 2, 4, 4, 2]})
    moe.convert(model, cfg, progress=False)
    batch = inputs_for(model, batch=2, seq=16)
    with torch.no_grad():
        ref = model.eval()(**batch).logits
    model.train()
    with torch.autocast("cpu", dtype=dtype):
        out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    cores = [p for _, l in moe.moe_layers(model) for p in l.experts.up.parameters()]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cores)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        logits = model(**batch).logits
    assert _rel(logits, ref) < 0.05


def test_bf16_cores_rebuild_in_float32():
    torch.manual_seed(0)
    lin = nn.Linear(256, 256)
    layer = MPOLinear.from_linear(lin, in_factors=[4, 4, 4, 4], out_factors=[4, 4, 4, 4]).to(torch.bfloat16)
    exact = naive_matrix([c.double() for c in layer.cores])  # what the bf16 cores represent
    W = layer.weight
    assert W.dtype == torch.bfloat16
    # one rounding of the exact product, not one per contraction step
    assert _rel(W, exact) <= 1.05 * _rel(exact.to(torch.bfloat16), exact) + 1e-6
    assert math.isfinite(_rel(W, exact))
