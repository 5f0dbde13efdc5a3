import copy

import pytest
import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

import tnmoe.moe as moe
from tnmoe.moe import (
    DenseExpertBank,
    ExpertFFN,
    GradientMask,
    MoEConfig,
    MoELayer,
    MPOExpertBank,
    SwitchRouter,
    TopKRouter,
    count_parameters,
)
from tiny_ffn import TinyFFN, tiny_ffn_registered
from tiny_models import inputs_for, recorded_routing, tiny_bert, tiny_gpt2, tiny_t5

T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
               num_decoder_layers=12, num_heads=12, tie_word_embeddings=True)
PAPER_FACTORS = {768: [3, 4, 4, 4, 4], 3072: [4, 4, 8, 6, 4]}


def meta_t5_base():
    with torch.device("meta"):
        return T5ForConditionalGeneration(T5Config(**T5_BASE))


# --- parameter counts ---------------------------------------------------------------------------
@pytest.mark.parametrize("experts,expected", [(8, 293.98), (16, 365.06)])
def test_t5_base_mpoe_parameter_counts(experts, expected):
    model = meta_t5_base()
    assert abs(count_parameters(model).total / 1e6 - 222.90) < 0.01
    moe.convert(model, MoEConfig(num_experts=experts, factors=PAPER_FACTORS, share="central",
                                 router="switch", router_bias=True), progress=False)
    c = count_parameters(model)
    assert abs(c.total / 1e6 - expected) < 0.01
    assert c.moe_layers == 24
    # the shared central tensors are stored once: 2 matrices x 24 layers x 2359296
    assert c.shared == 2 * 24 * 2359296
    assert c.per_expert == 2 * 24 * (144 + 36864 + 147456 + 256)


def test_meta_dense_switch_counts():
    model = meta_t5_base()
    moe.convert(model, MoEConfig(num_experts=8, expert_type="dense"), progress=False)
    c = count_parameters(model)
    ffn = 2 * 768 * 3072
    assert c.total == 222903552 + 24 * (7 * ffn + 768 * 8 + 8)
    assert c.active_per_token == c.total - 24 * 7 * ffn


# --- conversion is exact -------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_t5, lambda: tiny_t5(gated=True), tiny_bert],
                         ids=["gpt2", "t5", "t5-gated", "bert"])
@pytest.mark.parametrize("router", ["switch", "topk", "hash"])
def test_lossless_conversion_preserves_logits(factory, router):
    model = factory().eval()
    batch = inputs_for(model)
    with torch.no_grad():
        ref = model(**batch).logits
    converted = moe.convert(copy.deepcopy(model), MoEConfig(
        num_experts=4, m=3, router=router, top_k=2 if router == "topk" else 1), progress=False).eval()
    with torch.no_grad():
        out = converted(**batch).logits
    assert (out - ref).abs().max().item() < 1e-4
    ffns = [n for n, m in model.named_modules() if type(m).__name__ in moe.registered_adapters()]
    assert len(ffns) == (4 if model.config.model_type == "t5" else 2)
    assert moe.converted_modules(converted) == ffns
    # each FFN's MoE layer is where its adapter puts it (BERT: the layer's intermediate)
    bert = model.config.model_type == "bert"
    assert [n for n, _ in moe.moe_layers(converted)] == [n + ".intermediate" if bert else n for n in ffns]


@pytest.mark.parametrize("max_bond", [None, 3])
def test_conversion_errors_match_the_rebuilt_experts(max_bond):
    model = tiny_gpt2()
    # GPT-2's Conv1D stores (in, out): the FFN's matrices are their transposes
    originals = {i: {"up": blk.mlp.c_fc.weight.detach().t().double(), "down": blk.mlp.c_proj.weight.detach().t().double()}
                 for i, blk in enumerate(model.transformer.h)}
    moe.convert(model, MoEConfig(num_experts=2, m=3, max_bond=max_bond, init_noise=0.0), progress=False)
    errors = moe.conversion_errors(model)
    assert sorted(errors) == sorted(f"transformer.h.{i}.mlp.experts.{k}" for i in originals for k in ("up", "down"))
    for name, err in errors.items():
        i, kind = int(name.split(".")[2]), name.rsplit(".", 1)[1]
        W = originals[i][kind]
        rebuilt = model.get_submodule(name).weights().detach().double()
        expect = max(float((rebuilt[e] - W).norm() / W.norm()) for e in range(2))
        if max_bond is None:
            assert err < 1e-5 and expect < 1e-5
        else:
            assert err == pytest.approx(expect, rel=1e-4) and err > 1e-3
    assert moe.conversion_errors(moe.convert(tiny_gpt2(), MoEConfig(num_experts=2, expert_type="dense"),
                                             progress=False)) == {}


def test_conversion_router_still_gets_gradients():
    model = moe.convert(tiny_gpt2(), MoEConfig(num_experts=4, m=3), progress=False).train()
    out = model(**inputs_for(model), labels=inputs_for(model)["input_ids"])
    (out.loss + moe.auxiliary_loss(model)).backward()
    layer = moe.moe_layers(model)[0][1]
    assert layer.router.gate.weight.grad is not None
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_target_modules_selects_subset_and_regex():
    model = moe.convert(tiny_gpt2(), MoEConfig(num_experts=2, m=2, target_modules=["h.1.mlp"]), progress=False)
    assert moe.converted_modules(model) == ["transformer.h.1.mlp"]
    model = moe.convert(tiny_gpt2(), MoEConfig(num_experts=2, m=2, target_modules=r".*h\.0\.mlp"), progress=False)
    assert moe.converted_modules(model) == ["transformer.h.0.mlp"]


# --- sharing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("share,shared_idx", [("none", []), ("central", [2]), ("all", [0, 1, 2, 3, 4]),
                                              ([0, 4], [0, 4]), ("auxiliary", [0, 1, 3, 4])])
def test_share_options(share, shared_idx):
    E = 3
    bank = MPOExpertBank(num_experts=E, in_factors=[2, 2, 3, 2, 2], out_factors=[2, 3, 2, 2, 2], share=share)
    # sites (out*in) = [4, 6, 6, 4, 4] -> lossless bonds [1, 4, 24, 16, 4, 1]
    assert bank.bond_dims == [1, 4, 24, 16, 4, 1]
    sizes = [1 * 2 * 2 * 4, 4 * 3 * 2 * 24, 24 * 2 * 3 * 16, 16 * 2 * 2 * 4, 4 * 2 * 2 * 1]
    expected_total = sum(s if k in shared_idx else E * s for k, s in enumerate(sizes))
    assert sum(p.numel() for p in bank.parameters()) == expected_total
    assert bank.num_shared_params() == sum(sizes[k] for k in shared_idx)
    assert bank.num_params_per_expert() == sum(s for k, s in enumerate(sizes) if k not in shared_idx)
    for k in range(5):
        same = bank.core(0, k) is bank.core(1, k) is bank.core(2, k)
        assert same == (k in shared_idx)
    assert {id(p) for p in bank.shared_parameters()} == {id(bank.cores[k]) for k in shared_idx}


def test_experts_diverge_only_in_own_tensors():
    bank = MPOExpertBank(num_experts=2, in_factors=[4, 4, 4], out_factors=[4, 4, 4], share="central")
    before = bank.weights().detach().clone()
    assert (before[0] - before[1]).abs().max() > 1e-2  # random init: every expert its own draw
    with torch.no_grad():
        bank.cores[0][1].mul_(2.0)  # expert 1's first core
        bank.cores[1].mul_(3.0)  # the shared central core: every expert
    W = bank.weights()
    torch.testing.assert_close(W[1], 6 * before[1])
    torch.testing.assert_close(W[0], 3 * before[0])


# --- gradient mask -------------------------------------------------------------------------------
def _train_masked(p_b, steps=10):
    model = moe.convert(tiny_gpt2(), MoEConfig(num_experts=2, m=3, init_noise=0.01), progress=False)
    model.train()
    mask = GradientMask(model, p_b=p_b, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    shared0 = [p.detach().clone() for p in mask.params]
    aux = [p for _, l in moe.moe_layers(model) for b in l.experts.banks().values() for p in b.expert_parameters()]
    aux0 = [p.detach().clone() for p in aux]
    batch = inputs_for(model)
    for _ in range(steps):
        opt.zero_grad()
        out = model(**batch, labels=batch["input_ids"])
        (out.loss + moe.auxiliary_loss(model)).backward()
        mask.apply()
        opt.step()
    return mask, shared0, aux0, aux


def test_gradient_mask_p1_freezes_shared():
    mask, shared0, aux0, aux = _train_masked(1.0)
    assert len(mask.params) == 4  # central core of c_fc and c_proj in 2 layers
    assert all(torch.equal(a, b) for a, b in zip(shared0, mask.params))
    assert all(not torch.equal(a, b) for a, b in zip(aux0, aux))
    assert mask.masked_steps == 10


def test_gradient_mask_p0_trains_shared():
    mask, shared0, _, _ = _train_masked(0.0)
    assert all(not torch.equal(a, b) for a, b in zip(shared0, mask.params))
    assert mask.masked_steps == 0


def test_gradient_mask_fraction_and_reproducible():
    p = nn.Parameter(torch.ones(3))
    a, b = GradientMask([p], 0.5, seed=7), GradientMask([p], 0.5, seed=7)
    draws_a = [a.apply() for _ in range(200)]
    draws_b = [b.apply() for _ in range(200)]
    assert draws_a == draws_b
    updated = 1 - a.masked_steps / a.steps
    assert 0.4 <= updated <= 0.6


def test_gradient_mask_callback_with_trainer(tmp_path):
    from torch.utils.data import Dataset
    from transformers import TrainingArguments

    model = moe.convert(tiny_gpt2(), MoEConfig(num_experts=2, m=3), progress=False)
    mask = GradientMask(model, p_b=1.0)
    shared0 = [p.detach().clone() for p in mask.params]

    class Data(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.arange(2, 12) + i
            return {"input_ids": ids, "labels": ids}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, weight_decay=0.1, report_to=[], save_strategy="no",
                             disable_tqdm=True, use_cpu=True)
    trainer = moe.MoETrainer(model=model, args=args, train_dataset=Data(),
                             callbacks=[moe.GradientMaskCallback(mask)])
    trainer.train()
    assert mask.steps == 3 and mask.masked_steps == 3
    assert all(torch.equal(a, b) for a, b in zip(shared0, mask.params))


# --- routers, dispatch ---------------------------------------------------------------------------
def _dense_layer(router, d=8, d_ff=16, E=4):
    experts = ExpertFFN(up=DenseExpertBank(num_experts=E, in_features=d, out_features=d_ff),
                        down=DenseExpertBank(num_experts=E, in_features=d_ff, out_features=d))
    return MoELayer(router=router, experts=experts)


def test_switch_capacity_and_dropped_tokens():
    router = SwitchRouter(d_model=8, num_experts=4, capacity_factor=1.0)
    with torch.no_grad():
        router.gate.bias.copy_(torch.tensor([5.0, 0, 0, 0]))  # most tokens want expert 0
    layer = _dense_layer(router).train()
    x = torch.randn(32, 8)
    y = layer(x)
    stats = layer.last_stats
    cap = router.capacity(32)
    assert cap == 8
    assert stats.kept_per_expert.max().item() <= cap
    assert stats.dropped == int((stats.tokens_per_expert - cap).clamp_min(0).sum())
    assert stats.dropped > 0
    # dropped tokens get an exactly-zero MoE output (so they pass through the residual only)
    zero_rows = (y.abs().sum(-1) == 0).sum().item()
    assert zero_rows == stats.dropped
    layer.eval()  # no dropping at inference by default
    layer(x)
    assert layer.last_stats.dropped == 0


def test_load_balancing_loss_uniform_is_one():
    T, E = 64, 4
    probs = torch.full((T, E), 1.0 / E)
    idx = (torch.arange(T) % E).unsqueeze(-1)
    assert torch.isclose(moe.load_balancing_loss(probs, idx), torch.tensor(1.0))
    collapsed = torch.zeros(T, 1, dtype=torch.long)
    onehot = torch.nn.functional.one_hot(collapsed.squeeze(-1), E).float()
    assert torch.isclose(moe.load_balancing_loss(onehot, collapsed), torch.tensor(float(E)))


def _final_imbalance(lb_coef):
    torch.manual_seed(0)
    router = SwitchRouter(d_model=16, num_experts=4, drop_tokens=False)
    with torch.no_grad():
        router.gate.bias.copy_(torch.tensor([2.0, 0, 0, 0]))
    layer = _dense_layer(router, d=16, d_ff=32)
    layer.load_balancing_coef = lb_coef
    target = nn.Linear(16, 16)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x = torch.randn(256, 16, generator=g)
        loss = (layer(x) - target(x).detach()).pow(2).mean() + layer.last_aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer(torch.randn(1024, 16, generator=g))
    return layer.last_stats.imbalance


def test_load_balancing_loss_reduces_imbalance():
    without, with_lb = _final_imbalance(0.0), _final_imbalance(1.0)
    assert with_lb < without
    assert with_lb < 1.5


def test_topk_router_and_noisy_gating():
    router = TopKRouter(d_model=8, num_experts=4, top_k=2, noisy_gating=True)
    with torch.no_grad():
        router.noise.weight.normal_()
    x = torch.randn(4000, 8)
    with torch.no_grad():
        clean = x @ router.gate.weight.T
        std = nn.functional.softplus(x @ router.noise.weight.T)
    with torch.no_grad():
        z = (router.train().logits(x) - clean) / std  # noise / its learned std: standard normal
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1.0) < 0.03
    torch.testing.assert_close(router.eval().logits(x), clean)  # no noise at inference
    out = router(x[:10])
    p = clean[:10].softmax(-1)
    top_p, top_i = p.topk(2, dim=-1)
    assert torch.equal(out.expert_index, top_i)
    torch.testing.assert_close(out.combine_weights, top_p / top_p.sum(-1, keepdim=True))


def test_hash_router_is_fixed_per_token():
    router = moe.HashRouter(num_experts=4, vocab_size=50)
    ids = torch.tensor([3, 7, 3, 9, 7])
    out = router(torch.randn(5, 8), token_ids=ids)
    assert out.expert_index[0] == out.expert_index[2] and out.expert_index[1] == out.expert_index[4]
    with pytest.raises(ValueError, match="token ids"):
        router(torch.randn(5, 8))


def test_dispatch_groups_and_combines_like_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    T, k, E, cap = 13, 2, 4, 4
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    plan = moe.plan_dispatch(idx, E, cap)
    order, load, kept = [], [0] * E, {}
    for c in range(k):  # priority: first choices, then earlier tokens
        for t in range(T):
            e = int(idx[t, c])
            kept[(t, c)] = load[e] < cap
            load[e] += 1
    for e in range(E):  # groups by expert, each in priority order
        order += [t * k + c for c in range(k) for t in range(T) if int(idx[t, c]) == e and kept[(t, c)]]
    assert plan.assignment.tolist() == order
    assert plan.counts.tolist() == [min(cap, int((idx == e).sum())) for e in range(E)]
    out = torch.randn(len(order), 3, dtype=torch.float64, generator=g)
    w = torch.rand(T, k, dtype=torch.float64, generator=g)
    ref = torch.zeros(T, 3, dtype=torch.float64)
    slots = {a: out[i] * w.reshape(-1)[a] for i, a in enumerate(order)}
    for t in range(T):  # the k slots of a token summed in choice order, exactly
        acc = torch.zeros(3, dtype=torch.float64)
        for c in range(k):
            acc = acc + slots.get(t * k + c, torch.zeros(3, dtype=torch.float64))
        ref[t] = acc
    assert torch.equal(moe.combine(out, plan, w), ref)


def test_dispatch_is_deterministic_bitwise():
    model = moe.convert(tiny_gpt2(), MoEConfig(num_experts=4, m=3, router="topk", top_k=2,
                                               init_noise=0.1), progress=False).eval()
    batch = inputs_for(model, batch=4, seq=16)
    with torch.no_grad():
        a = model(**batch).logits
        b = model(**batch).logits
    assert torch.equal(a, b)


def test_mpo_experts_stream_and_reconstruct_agree():
    up = MPOExpertBank(num_experts=3, in_factors=[4, 4], out_factors=[4, 8], max_bond=2)
    down = MPOExpertBank(num_experts=3, in_factors=[4, 8], out_factors=[4, 4], max_bond=2)
    experts = ExpertFFN(up=up, down=down)
    x, counts = torch.randn(6, 16), [1, 0, 5]
    assert up.plan(3).mode == "stream" and down.plan(3).mode == "stream"  # tiny bonds, few tokens
    y_stream = experts(x, counts)
    W_up, W_down = up.weights(), down.weights()
    expert_of_row = [0, 2, 2, 2, 2, 2]
    ref = torch.stack([W_down[e] @ nn.functional.gelu(W_up[e] @ x[t]) for t, e in enumerate(expert_of_row)])
    torch.testing.assert_close(y_stream, ref, atol=1e-5, rtol=1e-5)


def test_eval_weight_cache_invalidated():
    model = moe.convert(tiny_gpt2(), MoEConfig(num_experts=2, m=3), progress=False).eval()
    batch = inputs_for(model)
    with torch.no_grad():
        a = model(**batch).logits
        bank = moe.moe_layers(model)[0][1].experts.up
        bank.cores[1].mul_(0.5)  # the shared central core
        b = model(**batch).logits
    assert not torch.allclose(a, b)


# --- persistence ---------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    model = moe.convert(tiny_t5(), MoEConfig(num_experts=3, m=3, init_noise=0.05), progress=False).eval()
    batch = inputs_for(model)
    with torch.no_grad():
        ref = model(**batch).logits
    moe.save_pretrained(model, tmp_path / "ckpt")
    loaded = moe.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, ref)
    # into a fresh base model of the same architecture
    base = tiny_t5()
    loaded2 = moe.from_pretrained(tmp_path / "ckpt", base).eval()
    with torch.no_grad():
        assert torch.equal(loaded2(**batch).logits, ref)
    # shared tensors stored once
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        central = [k for k in keys if k.endswith("experts.up.cores.1")]
        aux = [k for k in keys if k.endswith("experts.up.cores.0")]
        # one unstacked (4-d) tensor per layer for the shared core; stacked (5-d) per-expert cores
        assert len(central) == 4 and all(len(f.get_slice(k).get_shape()) == 4 for k in central)
        assert len(aux) == 4 and all(f.get_slice(k).get_shape()[0] == 3 for k in aux)


def test_load_into_wrong_config_fails(tmp_path):
    model = moe.convert(tiny_gpt2(), MoEConfig(num_experts=3, m=3), progress=False)
    moe.save_pretrained(model, tmp_path)
    other = moe.convert(tiny_gpt2(), MoEConfig(num_experts=4, m=3), progress=False)
    with pytest.raises(ValueError, match="num_experts: checkpoint=3 model=4"):
        moe.load_weights(other, tmp_path)
    wider = tiny_gpt2(n_inner=256)
    with pytest.raises(ValueError, match="n_inner: checkpoint None, model 256"):  # the base config check
        moe.from_pretrained(tmp_path, wider)


# --- errors --------------------------------------------------------------------------------------
def test_bad_inputs():
    with pytest.raises(ValueError, match="matched no module"):
        moe.convert(tiny_gpt2(), MoEConfig(target_modules=["nope"]), progress=False)
    with pytest.raises(ValueError, match="has no FFN adapter"):
        moe.convert(tiny_gpt2(), MoEConfig(target_modules=["attn"]), progress=False)
    with pytest.raises(ValueError, match="out of range"):
        moe.convert(tiny_gpt2(), MoEConfig(num_experts=2, m=3, share=[0, 5]), progress=False)
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_experts=2, top_k=3, router="topk")
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(d_model=4, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="p_b"):
        GradientMask([nn.Parameter(torch.ones(1))], 1.5)
    with pytest.raises(ValueError, match="p_b"):
        GradientMask([nn.Parameter(torch.ones(1))], -0.1)
    with pytest.raises(ValueError, match="no tensors to mask"):
        GradientMask(moe.convert(tiny_gpt2(), MoEConfig(num_experts=2, m=2, share="none"), progress=False))
    with pytest.raises(ValueError, match="num_experts"):
        MoEConfig(num_experts=0)
    with pytest.raises(ValueError, match="num_experts"):
        MPOExpertBank(num_experts=0, in_factors=[2, 2], out_factors=[2, 2])
    with pytest.raises(ValueError, match="multiply to"):
        MoEConfig(factors={768: [4, 4, 4]})
    with pytest.raises(ValueError, match="already converted"):
        m = moe.convert(tiny_gpt2(), MoEConfig(num_experts=2, m=2), progress=False)
        moe.convert(m, MoEConfig(num_experts=2, m=2), progress=False)
    layer = _dense_layer(SwitchRouter(d_model=8, num_experts=4))
    with pytest.raises(ValueError, match="hidden size 8"):
        layer(torch.randn(3, 9))


def test_register_custom_adapter():
    with tiny_ffn_registered():  # register_adapter, then unregister_adapter on the way out
        assert "TinyFFN" in moe.registered_adapters()
        net = nn.Sequential(TinyFFN(), nn.Identity()).eval()
        x = torch.randn(5, 8)
        ref = net(x)
        moe.convert(net, MoEConfig(num_experts=2, m=2), progress=False)
        assert isinstance(net[0], MoELayer)
        torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)
    assert "TinyFFN" not in moe.registered_adapters()


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_llama_gated_mlp_converts_losslessly_and_refuses_a_gate_bias(mlp_bias):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=100,
                                         mlp_bias=mlp_bias)).eval()
    ids = torch.randint(2, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    config = moe.MoEConfig(num_experts=2, expert_type="dense", router="topk", top_k=1, capacity_factor=None)
    if mlp_bias:  # the experts have no gate bias: converting would silently drop it
        with pytest.raises(NotImplementedError, match="gate_proj bias"):
            moe.convert(model, config, progress=False)
        return
    moe.convert(model, config, progress=False)
    assert len(moe.moe_layers(model)) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_bert_chunked_feed_forward_is_routed_in_one_call():
    torch.manual_seed(0)
    model = tiny_bert(chunk_size_feed_forward=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    batch = inputs_for(model, batch=2, seq=12)
    want = model(**batch).logits.detach()
    with pytest.warns(UserWarning, match="chunk_size_feed_forward=4 set to 0"):
        moe.convert(model, moe.MoEConfig(num_experts=4, router="topk", top_k=2, capacity_factor=None,
                                         expert_type="dense"), progress=False)
    with recorded_routing(model) as picks:
        logits = model(**batch).logits
    assert [p.shape[0] for p in picks] == [24, 24]  # each layer routes all 2 x 12 tokens in one call: aux loss and stats cover them
    assert all(layer.last_stats.num_tokens == 24 for _, layer in moe.moe_layers(model))
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)  # upcycled dense experts: lossless


def test_deepcopy_of_a_hash_routed_model_routes_its_own_layers():
    torch.manual_seed(0)
    model = moe.convert(tiny_gpt2(), moe.MoEConfig(num_experts=2, m=3, router="hash", capacity_factor=None),
                        progress=False).eval()
    copied = copy.deepcopy(model)  # e.g. an EMA copy
    batch = inputs_for(model)
    with recorded_routing(copied) as picks, torch.no_grad():
        got, want = copied(**batch).logits, model(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    table = moe.moe_layers(model)[0][1].router.table
    assert torch.equal(picks[0].flatten(), table[batch["input_ids"].flatten()].flatten())  # routed by the ids


def test_convert_warns_when_the_ffn_output_matrix_has_a_higher_precision(tmp_path):
    tiny_t5(gated=True).save_pretrained(tmp_path)
    model = T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16)  # keeps `wo` float32
    with pytest.warns(UserWarning, match="output matrix is torch.float32 and its input matrix torch.float16"):
        moe.convert(model, moe.MoEConfig(num_experts=2, expert_type="dense"), progress=False)


def test_preserve_gate_stays_finite_when_a_selected_probability_underflows():
    """top-2 with a logit gap > ~104: the second probability is 0 in float32; the weights must
    still be exactly 1/k with finite gradients (p / p.detach() was 0/0 = NaN)."""
    router = TopKRouter(d_model=4, num_experts=4, top_k=2, gate_scaling="preserve")
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[60.0, 0, 0, 0], [-60.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    x = torch.tensor([[2.0, 0, 0, 0], [0.5, 1.0, 0, 0]])
    out = router(x)
    assert float(out.router_probs.detach()[0].topk(2).values[1]) == 0.0  # the case: an underflowed selection
    torch.testing.assert_close(out.combine_weights, torch.full((2, 2), 0.5), rtol=0, atol=0)
    (out.combine_weights * torch.randn(2, 2)).sum().backward()
    assert torch.isfinite(router.gate.weight.grad).all()
    # where nothing underflows, the gradient is the old d(p / p.detach())/dp = 1 / p: compare
    p = torch.tensor([[0.7, 0.2]], dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 2, dtype=torch.float64)
    (moe.routers.gate_weights(p, "preserve") * g).sum().backward()
    torch.testing.assert_close(p.grad, g / p.detach() / 2)


@pytest.mark.parametrize("shared_parent", [False, True])
def test_convert_refuses_an_ffn_registered_under_several_names(shared_parent):
    """One FFN module at two places (weight sharing): converting it at one name would leave the
    dense FFN running at the other; the model must stay unchanged and the error name both."""
    ffn = TinyFFN()
    if shared_parent:
        block = nn.Sequential(ffn)
        model = nn.ModuleDict({"first": block, "second": block})
    else:
        model = nn.ModuleDict({"a": ffn, "b": ffn})
    with tiny_ffn_registered(), pytest.raises(ValueError, match="registered under 2 names"):
        moe.convert(model, MoEConfig(num_experts=2, m=2), progress=False)
    assert not moe.moe_layers(model) and all(type(m) is not moe.MoELayer for m in model.modules())
    with tiny_ffn_registered():  # separate copies convert at every place
        copies = nn.ModuleDict({"a": TinyFFN(), "b": TinyFFN()})
        moe.convert(copies, MoEConfig(num_experts=2, m=2), progress=False)
    assert sorted(moe.converted_modules(copies)) == ["a", "b"]


def test_the_moe_namespace_serves_exactly_the_model_level_names():
    """``tnmoe.moe._MODEL_NAMES`` (served lazily) and ``tnmoe.models.__all__`` are one list written
    twice: a name added to one and not the other is either unreachable as ``moe.<name>`` or not
    exported; every served name resolves to the model-level object itself."""
    import tnmoe.models as models
    import tnmoe.moe as moe_namespace

    assert sorted(moe_namespace._MODEL_NAMES) == sorted(models.__all__)
    for name in moe_namespace._MODEL_NAMES:
        assert getattr(moe_namespace, name) is getattr(models, name)
