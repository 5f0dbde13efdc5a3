"""Per-call routing inputs: padding tokens excluded from routing (``ignore_padding``), and token
ids / padding masks that survive activation checkpointing's recomputation in the backward pass."""

import copy
import threading
import pickle

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import tnmoe.moe as moe
from tiny_models import VOCAB, recorded_routing, tiny_bert, tiny_gpt2, tiny_t5
from tnmoe.moe import DenseExpertBank, ExpertFFN, MoEConfig, MoELayer, SwitchRouter
from tnmoe.moe.losses import load_balancing_loss


def checkpointing(model, on: bool, reentrant: bool = False) -> None:
    """HF activation checkpointing on/off (the name since transformers 5.x, else the old one)."""
    name = "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing"
    if on:
        getattr(model, f"{name}_enable")({"use_reentrant": reentrant})
    else:
        getattr(model, f"{name}_disable")()


def _switch_layer(capacity_factor=1.0, d=8, experts=4, seed=0):
    torch.manual_seed(seed)
    layer = MoELayer(router=SwitchRouter(d_model=d, num_experts=experts, capacity_factor=capacity_factor,
                                         gate_scaling="probs"),
                     experts=ExpertFFN(up=DenseExpertBank(num_experts=experts, in_features=d, out_features=16),
                                       down=DenseExpertBank(num_experts=experts, in_features=16, out_features=d)),
                     load_balancing_coef=0.01, z_loss_coef=0.001)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 1.0)  # experts and router differ clearly
    return layer


def _padded(batch=3, seq=6, d=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, d, generator=g)
    lengths = torch.tensor([seq, seq - 2, 2])[:batch]
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    return x, mask


# --- the layer: a padded call equals a call on the real tokens alone ---------------------------
def test_token_mask_routes_exactly_the_real_tokens():
    layer = _switch_layer(capacity_factor=1.0).train()
    x, mask = _padded()
    out = layer(x, token_mask=mask)
    aux, stats = layer.last_aux_loss, layer.last_stats
    reference = layer(x[mask])  # the independent computation: only the 12 real tokens exist
    torch.testing.assert_close(out[mask], reference, rtol=0, atol=0)
    assert torch.count_nonzero(out[~mask]) == 0
    torch.testing.assert_close(aux, layer.last_aux_loss, rtol=0, atol=0)
    assert stats.num_tokens == int(mask.sum()) == 12
    assert torch.equal(stats.kept_per_expert, layer.last_stats.kept_per_expert)
    # the capacity is the real tokens' (ceil(12 / 4) = 3), not the padded batch's (ceil(18 / 4) = 5)
    assert int(stats.kept_per_expert.max()) <= 3
    layer(x)
    assert layer.last_stats.num_tokens == 18


def test_token_mask_gradients_match_the_real_tokens_alone():
    layer = _switch_layer(capacity_factor=1.0).train()
    x, mask = _padded()
    x1 = x.clone().requires_grad_()
    (layer(x1, token_mask=mask).square().sum() + layer.last_aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    x2 = x.clone().requires_grad_()
    (layer(x2[mask]).square().sum() + layer.last_aux_loss).backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-6, atol=1e-7, msg=lambda m: f"{n}: {m}")
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-7)
    assert torch.count_nonzero(x1.grad[~mask]) == 0


def test_token_mask_edge_cases():
    layer = _switch_layer().train()
    x, _ = _padded()
    none = torch.zeros(3, 6, dtype=torch.bool)
    assert torch.count_nonzero(layer(x, token_mask=none)) == 0
    assert layer.last_stats.num_tokens == 0 and float(layer.last_aux_loss) == 0.0
    full = torch.ones(3, 6, dtype=torch.long)  # an int mask, no padding: same as no mask
    torch.testing.assert_close(layer(x, token_mask=full), layer(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="token_mask has shape"):
        layer(x, token_mask=torch.ones(3, 5))


# --- converted models: the model call's attention_mask reaches every layer ---------------------
def _routed_counts(model, **inputs):
    with recorded_routing(model) as picks:
        model(**inputs)
    return [p.shape[0] for p in picks]


@pytest.mark.parametrize("ignore_padding", [True, False])
def test_converted_bert_routes_only_real_tokens(ignore_padding):
    model = moe.convert(tiny_bert(), MoEConfig(num_experts=2, m=3, ignore_padding=ignore_padding),
                        progress=False).train()
    ids = torch.randint(2, VOCAB, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    counts = _routed_counts(model, input_ids=ids, attention_mask=mask)
    assert counts == ([11, 11] if ignore_padding else [14, 14])
    for _, layer in moe.moe_layers(model):
        assert layer.last_stats.num_tokens == counts[0]


def test_converted_bert_aux_loss_is_the_real_tokens_loss():
    """The model's load-balancing loss equals the formula evaluated on the real tokens only."""
    model = moe.convert(tiny_bert(), MoEConfig(num_experts=4, m=3, ignore_padding=True, load_balancing_coef=1.0),
                        progress=False).train()
    ids = torch.randint(2, VOCAB, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4])
    seen = []
    hooks = [layer.router.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
             for _, layer in moe.moe_layers(model)]
    model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    expected = sum(load_balancing_loss(out.router_probs, out.expert_index) for _, out in seen)
    assert all(x.shape[0] == 10 for x, _ in seen)
    torch.testing.assert_close(moe.auxiliary_loss(model), expected, rtol=1e-6, atol=0)


def test_converted_t5_uses_each_stacks_own_mask():
    model = moe.convert(tiny_t5(), MoEConfig(num_experts=2, m=3, ignore_padding=True), progress=False)
    enc_mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4])  # 8 real encoder tokens
    dec_mask = torch.tensor([[1] * 4, [1] * 3 + [0]])  # 7 real decoder tokens
    counts = _routed_counts(model, input_ids=torch.randint(2, VOCAB, (2, 6)), attention_mask=enc_mask,
                            decoder_input_ids=torch.randint(2, VOCAB, (2, 4)), decoder_attention_mask=dec_mask)
    assert counts == [8, 8, 7, 7]  # 2 encoder layers, then 2 decoder layers


def test_left_padded_gpt2_generation_routes_only_real_tokens_and_matches_unpadded():
    """KV-cache decoding: the mask covers past + current positions; the layer takes the current
    ones. Greedy generation of a left-padded prompt equals that prompt generated alone."""
    model = moe.convert(tiny_gpt2(), MoEConfig(num_experts=2, m=3, ignore_padding=True), progress=False).eval()
    prompt = torch.randint(2, VOCAB, (1, 4))
    other = torch.randint(2, VOCAB, (1, 6))
    batch = torch.cat([torch.cat([torch.full((1, 2), 1), prompt], 1), other])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    with recorded_routing(model) as picks, torch.no_grad():
        out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=3, min_new_tokens=3,
                             do_sample=False, pad_token_id=1)
    assert [p.shape[0] for p in picks] == [10, 10] + [2, 2] * 2  # prompt, then one token per row
    with torch.no_grad():
        alone = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                               min_new_tokens=3, do_sample=False, pad_token_id=1)
    assert torch.equal(out[0, 2:], alone[0])


def test_ignore_padding_refuses_a_mask_it_cannot_read():
    model = moe.convert(tiny_bert(), MoEConfig(num_experts=2, m=3, ignore_padding=True), progress=False)
    ids = torch.randint(2, VOCAB, (2, 7))
    with pytest.raises(ValueError, match="2-D .*attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 7, 7))
    model(input_ids=ids)  # no mask: nothing is padding
    assert moe.moe_layers(model)[0][1].last_stats.num_tokens == 14


def test_ignore_padding_without_a_mask_owner_fails_before_converting():
    encoder = tiny_bert().bert.encoder  # its forward takes hidden states, not input_ids
    with pytest.raises(ValueError, match="input_ids and attention_mask"):
        moe.convert(encoder, MoEConfig(num_experts=2, m=3, ignore_padding=True), progress=False)
    assert moe.moe_layers(encoder) == []  # all-or-nothing
    with pytest.raises(ValueError, match="ignore_padding must be True or False"):
        MoEConfig(ignore_padding="yes")


def test_ignore_padding_survives_save_load_deepcopy_and_pickle(tmp_path):
    model = moe.convert(tiny_bert(), MoEConfig(num_experts=2, m=3, ignore_padding=True), progress=False)
    model.save_pretrained(tmp_path)
    loaded = moe.from_pretrained(tmp_path)
    assert moe.get_moe_config(loaded).ignore_padding
    ids = torch.randint(2, VOCAB, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    for m in (loaded, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert _routed_counts(m, input_ids=ids, attention_mask=mask) == [12, 12]


# --- activation checkpointing recomputes with the forward's ids and mask ----------------------
def _grads(model, ckpt, reentrant=False, ignore_padding=True):
    model.zero_grad()
    if ckpt:
        checkpointing(model, True, reentrant)
    else:
        checkpointing(model, False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (3, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    kwargs = {"attention_mask": mask} if ignore_padding else {}
    out = model(input_ids=ids, labels=torch.tensor([0, 1, 1]), **kwargs)
    # reentrant checkpointing runs the forward without a graph: the aux loss has no gradient there
    (out.loss + (0 if reentrant else moe.auxiliary_loss(model))).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("config", [
    MoEConfig(num_experts=4, m=3, ignore_padding=True, capacity_factor=0.5),  # drops: capacity matters
    MoEConfig(num_experts=4, router="hash", expert_type="dense", capacity_factor=1.0),
], ids=["padding", "hash"])
def test_checkpointed_backward_equals_plain_backward(config, reentrant):
    torch.manual_seed(0)
    model = moe.convert(tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), config,
                        progress=False).train()
    padding = config.ignore_padding
    plain = _grads(model, ckpt=False, reentrant=reentrant, ignore_padding=padding)
    checkpointed = _grads(model, ckpt=True, reentrant=reentrant, ignore_padding=padding)
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


def _ckpt_layer_model():
    """An MoE layer under non-reentrant checkpointing, fed by an owner that takes input_ids and
    attention_mask (like an HF base model)."""
    layer = _switch_layer(capacity_factor=1.0)

    class Owner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, 8)
            self.mlp = layer

        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids)
            return checkpoint(lambda t: self.mlp(t).tanh(), h, use_reentrant=False)

    model = Owner()
    from tnmoe.models.convert import _wire_routing_context  # the wiring convert() installs
    _wire_routing_context(model, MoEConfig(ignore_padding=True))
    return model.train()


def test_two_forwards_with_different_masks_before_one_backward_fail_clearly():
    model = _ckpt_layer_model()
    ids = torch.randint(2, VOCAB, (2, 5))
    a = model(ids, torch.tensor([[1] * 5, [1] * 3 + [0] * 2]))
    b = model(ids, torch.tensor([[1] * 5, [1] * 4 + [0]]))
    with pytest.raises(RuntimeError, match="cannot tell which"):
        (a.sum() + b.sum()).backward()


def test_forward_backward_pairs_with_outputs_kept_alive_recompute_their_own_mask():
    model = _ckpt_layer_model()
    ids = torch.randint(2, VOCAB, (2, 5))
    masks = [torch.tensor([[1] * 5, [1] * 3 + [0] * 2]), torch.tensor([[1] * 5, [1] * 4 + [0]])]
    kept = []
    for mask in masks:  # the first output stays alive while the second backward recomputes
        out = model(ids, mask)
        out.sum().backward()
        kept.append(out)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for mask in masks:  # reference: the same calls without checkpointing
        h = model.embed(ids)
        model.mlp(h, token_mask=mask).tanh().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-6, atol=1e-7, msg=lambda m: f"{n}: {m}")


# --- nn.DataParallel replicas ------------------------------------------------------------------
def test_data_parallel_replica_refuses_to_train_without_its_aux_loss_and_has_its_own_context():
    layer = _switch_layer()
    replica = layer._replicate_for_data_parallel()  # what nn.DataParallel does on each GPU
    assert replica.routing_context is not layer.routing_context  # replicas run in parallel threads
    x, mask = _padded()
    with pytest.raises(RuntimeError, match="DataParallel"):
        replica.train()(x, token_mask=mask)
    with torch.no_grad():
        replica.train()(x)  # no graph, no loss: fine
    torch.testing.assert_close(replica.eval()(x, token_mask=mask), layer.eval()(x, token_mask=mask), rtol=0, atol=0)
    layer.load_balancing_coef = layer.z_loss_coef = 0.0
    layer._replicate_for_data_parallel().train()(x)  # nothing would be lost


# --- which forward a recomputation belongs to (found by review) ------------------------------
def _gpt2_padding_model(**config):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=2, m=3, ignore_padding=True, capacity_factor=None, **config)
    return moe.convert(tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), cfg, progress=False).train()


def _two_batches():
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(2, VOCAB, (2, 6), generator=g) for _ in range(2)]
    masks = [torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6]), torch.tensor([[1] * 6, [1, 1, 1, 1, 1, 0]])]
    return ids, masks


def _param_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_pre_ln_block_with_an_earlier_forward_kept_alive_recomputes_its_own_mask():
    """GPT-2 adds the MoE output to the residual, so the output's gradient arrives before the
    recomputation; an earlier forward whose graph is alive (never backwarded) must not be used."""
    model = _gpt2_padding_model()
    (ids_a, ids_b), (mask_a, mask_b) = _two_batches()
    grads = {}
    for ckpt in (False, True):
        model.zero_grad()
        checkpointing(model, ckpt)
        kept = model(input_ids=ids_a, attention_mask=mask_a)  # e.g. a logging forward
        model(input_ids=ids_b, attention_mask=mask_b).logits.square().mean().backward()
        grads[ckpt] = _param_grads(model)
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-6, atol=1e-8, msg=lambda m: f"{n}: {m}")
    assert kept is not None


def test_training_loop_that_keeps_its_losses_alive():
    model = _gpt2_padding_model()
    checkpointing(model, True)
    losses = []
    for ids, mask in zip(*_two_batches()):
        loss = model(input_ids=ids, attention_mask=mask).logits.square().mean()
        loss.backward()
        losses.append(loss)  # not .item(): the graph stays alive
    assert len(losses) == 2


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("router", ["switch", "hash"])
def test_two_forwards_on_different_inputs_then_one_backward(router, reentrant):
    """Chosen/rejected or contrastive pairs: two model calls, one backward, each recomputation
    routes with its own forward's mask / ids (reentrant: forwards ran without a graph)."""
    torch.manual_seed(0)
    cfg = (MoEConfig(num_experts=2, m=3, ignore_padding=True, capacity_factor=None) if router == "switch"
           else MoEConfig(num_experts=4, router="hash", expert_type="dense", capacity_factor=None))
    model = moe.convert(tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), cfg,
                        progress=False).train()
    with torch.no_grad():
        for _, layer in moe.moe_layers(model):
            for p in layer.experts.parameters():
                p.add_(0.1 * torch.randn_like(p))  # trained experts differ
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(2, VOCAB, (2, 7), generator=g) for _ in range(2)]
    masks = [torch.tensor([[1] * 7, [1] * 4 + [0] * 3]), torch.tensor([[1] * 4 + [0] * 3, [1] * 7])]
    grads = {}
    for ckpt in (False, True):
        model.zero_grad()
        if ckpt:
            checkpointing(model, True, reentrant)
        else:
            checkpointing(model, False)
        loss = sum((model.bert(input_ids=i, attention_mask=m).last_hidden_state * m[..., None]).square().sum()
                   for i, m in zip(ids, masks))
        loss.backward()
        grads[ckpt] = _param_grads(model)
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_threads_sharing_a_model_use_their_own_masks():
    torch.manual_seed(0)
    model = moe.convert(tiny_bert(), MoEConfig(num_experts=2, m=3, ignore_padding=True), progress=False).eval()
    with torch.no_grad():
        for _, layer in moe.moe_layers(model):
            for p in layer.experts.parameters():
                p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(2, VOCAB, (4, 16))
    masks = [torch.ones(4, 16, dtype=torch.long), (torch.arange(16) < 5).long().expand(4, 16).contiguous()]
    with torch.no_grad():
        expected = [model.bert(input_ids=ids, attention_mask=m).last_hidden_state for m in masks]
    wrong = [0, 0]

    def serve(k):
        for _ in range(30):
            with torch.no_grad():
                out = model.bert(input_ids=ids, attention_mask=masks[k]).last_hidden_state
            wrong[k] += not torch.equal(out, expected[k])

    threads = [threading.Thread(target=serve, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [0, 0]


def test_context_hooks_read_arguments_as_signature_binding_does():
    """The owner hooks find input_ids / attention_mask where ``inspect.signature(...).bind`` puts
    them: by keyword, by position, and never from ``*args`` when the name is keyword-only."""
    import inspect

    from tnmoe.models.convert import _ContextHooks, _positions

    def plain(input_ids=None, attention_mask=None, labels=None): ...
    def star(hidden, *extra, input_ids=None, attention_mask=None): ...
    def kwonly(hidden, *, attention_mask=None, input_ids=None): ...

    wanted = ("input_ids", "attention_mask")
    a, b, c = torch.ones(1), torch.zeros(1), torch.full((1,), 2.0)
    for fn, calls in ((plain, [((a, b), {}), ((a,), {"attention_mask": b}), ((), {"input_ids": a}), ((), {})]),
                      (star, [((c, b, a), {}), ((c, b), {"input_ids": a}), ((c,), {"attention_mask": b})]),
                      (kwonly, [((c,), {"input_ids": a, "attention_mask": b}), ((c,), {})])):
        hooks = _ContextHooks([], _positions(fn, wanted), True, True)
        for args, kwargs in calls:
            bound = inspect.signature(fn).bind(*args, **kwargs).arguments
            for name in wanted:
                assert hooks._argument(name, args, kwargs) is bound.get(name), (fn.__name__, args, kwargs, name)
