"""The fast paths agree with the plain ones: chain rebuild vs opt_einsum, grouped expert matmul
vs per-expert loop, reconstruction amortized over micro-batches vs plain accumulation,
torch.compile of the dropless layer."""

import contextlib
import math

import pytest
import torch
from torch import nn

import tnmoe.moe as moe
from tiny_models import inputs_for, tiny_gpt2
from tnmoe.moe import DenseExpertBank, ExpertFFN, MoELayer, MPOExpertBank, SwitchRouter, grouped_linear
from tnmoe.networks import (
    ContractionEngine,
    MPOBank,
    MPOLinear,
    accumulate_reconstruction,
    discard_accumulation,
    matmul_permute,
    mpo_core_shapes,
    reconstruct_equation,
)
import tnmoe.networks.blocked as blocked_mod
import tnmoe.networks.chain as chain_mod
from tnmoe.networks.chain import chain_plan, chain_reconstruct


@pytest.mark.parametrize("in_f,out_f,max_bond", [
    ([3, 4, 4, 4, 4], [4, 4, 8, 6, 4], None),  # the paper's m = 5 (T5/GPT-2 up-projection)
    ([4, 4, 8, 6, 4], [3, 4, 4, 4, 4], 64),
    ([2, 3, 2], [3, 2, 2], None),
    ([2, 2, 2, 2, 3, 2, 2, 2, 2], [2, 2, 2, 3, 4, 4, 2, 2, 2], 16),
    ([4, 4], [2, 8], None),
])
@pytest.mark.parametrize("batched", ["central", "none", "all"])
@pytest.mark.parametrize("blocks", [False, True])
def test_chain_rebuild_equals_einsum(in_f, out_f, max_bond, batched, blocks, monkeypatch):
    if blocks:  # one row slice per block, so the blocked matmul_permute path runs wherever it may
        choose = blocked_mod._blocks
        monkeypatch.setattr(blocked_mod, "_blocks", lambda a, b, rows, N, perm, *_: choose(
            a, b, rows, N, perm, math.prod(rows[1:]) * N * a.element_size() if rows else 1, 1))
    shapes = mpo_core_shapes(in_f, out_f, max_bond)
    m = len(shapes)
    flags = {"central": [k != (m - 1) // 2 for k in range(m)], "none": [True] * m, "all": [False] * m}[batched]
    g = torch.Generator().manual_seed(0)
    cores = [torch.randn(((3,) if b else ()) + s, dtype=torch.float64, generator=g, requires_grad=True)
             for s, b in zip(shapes, flags)]
    engine = ContractionEngine()
    plan = chain_plan(tuple(shapes), tuple(flags) if any(flags) else None)
    assert plan.flops == chain_plan(tuple(shapes)).flops  # the layout only breaks ties
    assert plan.flops <= engine.flops(reconstruct_equation(m), shapes) * (1 + 1e-9)  # never worse
    W = chain_reconstruct(cores, flags, plan, engine.contract)
    ref = engine.contract(reconstruct_equation(m, flags), *cores)
    ref = ref.reshape(*ref.shape[: 1 if any(flags) else 0], W.shape[-2], W.shape[-1])
    torch.testing.assert_close(W, ref)
    probe = torch.randn(W.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((W * probe).sum(), cores)
    want = torch.autograd.grad((ref * probe).sum(), cores)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("a_batch,b_batch", [(3, 3), (None, 3), (3, None), (None, None), (1, 3)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("perm", [(0, 2, 4, 1, 3, 5), (2, 0, 4, 1, 3, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_blocked_matmul_permute_equals_one_go(a_batch, b_batch, threads, perm, dtype):
    """Block by block (forced with a tiny block size) gives the values and gradients of
    ``(a @ b).view(rows + cols).permute(perm)``, for batched, broadcast and 2-D operands, with
    the single-threaded blocked backward and the multi-threaded one-go backward."""
    rows, cols = (4, 3, 2, 5), (3, 2)
    M, N, K = 120, 6, 7
    g = torch.Generator().manual_seed(0)
    a = torch.randn(((a_batch,) if a_batch else ()) + (M, K), dtype=dtype, generator=g, requires_grad=True)
    b = torch.randn(((b_batch,) if b_batch else ()) + (K, N), dtype=dtype, generator=g, requires_grad=True)
    lead = (3,) if 3 in (a_batch, b_batch) else (1,) if (a_batch or b_batch) else ()
    ref = (a @ b).reshape(*lead, *rows, *cols).permute(*range(len(lead)), *(len(lead) + p for p in perm))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = matmul_permute(a, b, rows, cols, perm, block_bytes=2 * 30 * 6 * a.element_size(),  # 2 of 4 slices
                             min_block_rows=1)
        fns = [out.grad_fn] + [f for f, _ in out.grad_fn.next_functions]  # 2-D operands: a squeeze last
        assert "_BlockedMatmulPermuteBackward" in [type(f).__name__ for f in fns]  # the blocked path ran
        assert out.is_contiguous() and out.shape == ref.shape
        torch.testing.assert_close(out, ref)
        probe = torch.randn(ref.shape, dtype=dtype, generator=g)
        got = torch.autograd.grad((out * probe).sum().real, (a, b))
    finally:
        torch.set_num_threads(threads_before)
    want = torch.autograd.grad((ref * probe).sum().real, (a, b))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_matmul_permute_twice_differentiable(threads):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 12, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)  # broadcast
    f = lambda a, b: matmul_permute(a, b, (4, 3), (2, 2), (0, 2, 1, 3), block_bytes=2 * 3 * 4 * 8,  # noqa: E731
                                    min_block_rows=1)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert type(f(a, b).grad_fn).__name__ == "_BlockedMatmulPermuteBackward"
        assert torch.autograd.gradcheck(f, (a, b)) and torch.autograd.gradgradcheck(f, (a, b))
    finally:
        torch.set_num_threads(threads_before)


def test_matmul_permute_one_go_and_errors():
    a, b = torch.randn(2, 6, 3), torch.randn(2, 3, 4)
    out = matmul_permute(a, b, (2, 3), (4,), (2, 0, 1))  # small: no blocks
    assert out.grad_fn is None and out.is_contiguous()
    torch.testing.assert_close(out, (a @ b).reshape(2, 2, 3, 4).permute(0, 3, 1, 2))
    big_a, big_b = torch.randn(2, 6, 3, requires_grad=True), torch.randn(2, 3, 4096)
    transposing = matmul_permute(big_a, big_b, (2, 3), (4096,), (2, 0, 1), block_bytes=4096 * 4, min_block_rows=1)
    assert type(transposing.grad_fn).__name__ == "CloneBackward0"  # the innermost dim moves: no blocks
    torch.testing.assert_close(transposing, (big_a @ big_b).reshape(2, 2, 3, 4096).permute(0, 3, 1, 2))
    # forward-mode AD, torch.func transforms and half precision take the one-go path, correctly
    import torch.autograd.forward_ad as fwAD
    from torch.func import jacrev, vmap

    A, B = torch.randn(2, 12, 3, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    f = lambda a, b: matmul_permute(a, b, (4, 3), (2, 2), (0, 2, 1, 3), block_bytes=96, min_block_rows=1)  # noqa: E731
    ref = lambda a, b: (a @ b).reshape(-1, 4, 3, 2, 2).permute(0, 1, 3, 2, 4)  # noqa: E731
    with fwAD.dual_level():
        tangent = torch.randn_like(A)
        jvp = fwAD.unpack_dual(f(fwAD.make_dual(A, tangent), B)).tangent
    torch.testing.assert_close(jvp, ref(tangent, B))
    torch.testing.assert_close(vmap(f)(A.unsqueeze(1), B.unsqueeze(1)).squeeze(1), ref(A, B))
    torch.testing.assert_close(jacrev(f)(A, B), jacrev(ref)(A, B))
    half = f(A.bfloat16().requires_grad_(), B.bfloat16())
    assert type(half.grad_fn).__name__ == "CloneBackward0"
    with pytest.raises(ValueError, match="do not factor"):
        matmul_permute(a, b, (2, 2), (4,), (2, 0, 1))
    with pytest.raises(ValueError, match="not a permutation"):
        matmul_permute(a, b, (2, 3), (4,), (0, 0, 1))


def test_engine_uses_the_chain_for_mpo_matrices():
    engine = ContractionEngine()
    assert engine.rebuild_method(mpo_core_shapes([3, 4, 4, 4, 4], [4, 4, 8, 6, 4])) == "chain"
    plan = chain_plan(tuple(mpo_core_shapes([3, 4, 4, 4, 4], [4, 4, 8, 6, 4])))
    assert (plan.center, plan.right_first) == (2, True)  # L @ (C @ R) around the central core
    # experts sharing the central core: (L @ C) @ R costs the same and L @ C folds the experts
    # into one GEMM; every core shared or every core stacked: nothing folds, L @ (C @ R) stays
    shapes = tuple(mpo_core_shapes([3, 4, 4, 4, 4], [4, 4, 8, 6, 4]))
    assert (lambda p: (p.center, p.right_first))(chain_plan(shapes, (True, True, False, True, True))) == (2, False)
    assert chain_plan(shapes, (True,) * 5).right_first and chain_plan(shapes, (False,) * 5).right_first
    assert chain_plan(shapes, (True, True, False, True, True)).flops == plan.flops
    # a centre the gradient mask froze keeps L @ (C @ R): its backward skips the 2x larger dC
    assert chain_plan(shapes, (True, True, False, True, True), (False, False, True, False, False)).right_first
    # 192*192*12288 + 6144*384*384 multiply-adds: the cheapest rebuild of a 3072x768 expert
    gemms = 2 * (192 * 192 * 12288 + 6144 * 384 * 384)
    assert gemms <= plan.flops <= 1.01 * gemms  # plus the small outer parts


def test_masked_centre_rebuilds_right_first_and_skips_its_gradient():
    """With the shared centre frozen (a masked step) the rebuild takes L @ (C @ R); values and
    the other cores' gradients equal an unmasked rebuild's, and the centre gets none."""
    from tnmoe.moe import MPOExpertBank

    torch.manual_seed(0)
    bank = MPOExpertBank(num_experts=3, in_factors=[3, 4, 4, 4, 4], out_factors=[4, 4, 8, 6, 4],
                         dtype=torch.float64)
    bank.reconstruct_strategy = "batched"
    probe = torch.randn(3, 3072, 768, dtype=torch.float64)
    seen = []
    original = chain_mod.chain_reconstruct

    def spy(cores, batched, plan, contract=None):
        seen.append(plan.right_first)
        return original(cores, batched, plan, contract)

    import tnmoe.networks.contraction as contraction
    contraction.chain_reconstruct = spy
    try:
        (bank.weights() * probe).sum().backward()
        ref = {k: p.grad.clone() for k, p in bank.named_parameters()}
        W_ref = bank.weights().detach()
        bank.zero_grad(set_to_none=True)
        central = bank.cores[2]
        central.requires_grad_(False)
        W = bank.weights()
        (W * probe).sum().backward()
        central.requires_grad_(True)
    finally:
        contraction.chain_reconstruct = original
    assert seen[0] is False and seen[-1] is True  # (L @ C) @ R unmasked, L @ (C @ R) masked
    torch.testing.assert_close(W.detach(), W_ref)
    assert central.grad is None
    for k, p in bank.named_parameters():
        if p is not central:
            torch.testing.assert_close(p.grad, ref[k])


@pytest.mark.parametrize("counts", [[5, 0, 7, 1], [0, 0, 13, 0], [3, 3, 3, 4]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_linear_implementations_agree(counts, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 8, dtype=dtype, generator=g, requires_grad=True)
    W = torch.randn(4, 12, 8, dtype=dtype, generator=g, requires_grad=True)
    probe = torch.randn(sum(counts), 12, dtype=dtype, generator=g)
    rows = [e for e, n in enumerate(counts) for _ in range(n)]
    ref = torch.stack([W[e] @ x[t] for t, e in enumerate(rows)])
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x, W])
    impls = ["loop"] + (["grouped_mm"] if moe.grouped_mm_supported(x, W) else [])
    assert (dtype == torch.float32) == ("grouped_mm" in impls)  # CPU grouped_mm takes float32, not float64
    assert not moe.grouped_mm_supported(x, W[:, :6])  # 6 floats per row: not 16-byte aligned
    for impl in impls:
        y = grouped_linear(x, W, torch.tensor(counts), impl=impl)
        torch.testing.assert_close(y, ref)
        for a, b in zip(torch.autograd.grad((y * probe).sum(), [x, W]), ref_grads):
            torch.testing.assert_close(a, b)
    y = grouped_linear(x, W, counts)  # a plain list of counts works too
    y.sum().backward()  # an expanded (stride-0) gradient: d/dW[e] = every row of e, summed
    for e in range(4):
        mine = x.detach()[[t for t, k in enumerate(rows) if k == e]].sum(0)
        torch.testing.assert_close(W.grad[e], mine.expand(12, 8))
    with pytest.raises(ValueError, match="impl"):
        grouped_linear(x, W, counts, impl="fast")


def test_grouped_linear_under_autocast_casts_like_linear():
    x, W = torch.randn(10, 16), torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_linear(x, W, [4, 6])
        ref = torch.cat([nn.functional.linear(x[:4], W[0]), nn.functional.linear(x[4:], W[1])])
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)


def _converted(seed=0):
    torch.manual_seed(seed)
    model = moe.convert(tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), moe.MoEConfig(num_experts=2, m=3, capacity_factor=None, init_noise=0.1),
                        progress=False).train()
    model.transformer.h[0].attn.c_attn = MPOLinear.from_linear(model.transformer.h[0].attn.c_attn, in_factors=3)
    return model


def _accumulated_grads(model, batches, amortize):
    for i, b in enumerate(batches):
        last = i == len(batches) - 1
        if amortize:
            with accumulate_reconstruction(model, last=last):
                (model(**b, labels=b["input_ids"]).loss / len(batches)).backward()
        else:
            (model(**b, labels=b["input_ids"]).loss / len(batches)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_amortized_reconstruction_gives_plain_accumulation_gradients():
    batches = [inputs_for(tiny_gpt2(), batch=2, seq=8, seed=s) for s in range(4)]
    plain = _accumulated_grads(_converted(), batches, amortize=False)
    model = _converted()
    amortized = _accumulated_grads(model, batches, amortize=True)
    assert plain.keys() == amortized.keys()
    assert any(".cores." in k for k in plain)
    for k in plain:
        torch.testing.assert_close(amortized[k], plain[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # a second optimizer step starts a fresh window from the updated cores
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    again = _accumulated_grads(model, batches[:2], amortize=True)
    fresh = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = _converted()
    with torch.no_grad():
        for n, p in reference.named_parameters():
            p.copy_(fresh[n])
    want = _accumulated_grads(reference, batches[:2], amortize=False)
    for k in want:
        torch.testing.assert_close(again[k], want[k], rtol=1e-4, atol=1e-6)


def test_amortized_reconstruction_rebuilds_once_per_step(monkeypatch):
    model = _converted()
    batches = [inputs_for(model, batch=2, seq=8, seed=s) for s in range(3)]
    calls = []
    bank = moe.moe_layers(model)[0][1].experts.up
    original = type(bank)._rebuild
    monkeypatch.setattr(type(bank), "_rebuild", lambda self, *a: calls.append(id(self)) or original(self, *a))
    _accumulated_grads(model, batches, amortize=True)
    assert calls.count(id(bank)) == 1
    calls.clear()
    _accumulated_grads(model, batches, amortize=False)
    assert calls.count(id(bank)) == 3


def test_amortized_reconstruction_refuses_a_step_inside_the_window():
    model = _converted()
    b = inputs_for(model, batch=2, seq=8)
    with accumulate_reconstruction(model, last=False):
        model(**b, labels=b["input_ids"]).loss.backward()
    cores = [p for n, p in model.named_parameters() if ".cores." in n]
    assert all(p.grad is None for p in cores)  # nothing reaches the cores before the last micro-batch
    with torch.no_grad():
        cores[0].mul_(0.5)  # e.g. a step or an edit inside the window
    with pytest.raises(RuntimeError, match="accumulation window"):
        with accumulate_reconstruction(model, last=True):
            model(**b, labels=b["input_ids"]).loss.backward()


class _FailingForward(Exception):
    pass


def test_a_failed_micro_batch_ends_its_window_and_an_abandoned_one_is_discarded():
    """The gradient of micro-batches before a failure (OOM, interrupt), or of a window a loop
    abandons, must not join the next step's: compared with a fresh model's clean step."""
    batches = [inputs_for(tiny_gpt2(), batch=2, seq=8, seed=s) for s in range(3)]
    want = _accumulated_grads(_converted(), batches[1:], amortize=True)

    model = _converted()
    with accumulate_reconstruction(model, last=False):
        (model(**batches[0], labels=batches[0]["input_ids"]).loss / 2).backward()
    with pytest.raises(_FailingForward):
        with accumulate_reconstruction(model, last=False):
            raise _FailingForward  # the second micro-batch fails: the window is over
    model.zero_grad()
    got = _accumulated_grads(model, batches[1:], amortize=True)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")

    model = _converted()
    with accumulate_reconstruction(model, last=False):  # a window the loop abandons without an error
        (model(**batches[0], labels=batches[0]["input_ids"]).loss / 2).backward()
    banks = sum(isinstance(m, MPOBank) for m in model.modules())
    assert discard_accumulation(model) == banks and discard_accumulation(model) == 0
    model.zero_grad()
    got = _accumulated_grads(model, batches[1:], amortize=True)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")
    with accumulate_reconstruction(model, last=False), pytest.raises(RuntimeError, match="between micro-batches"):
        discard_accumulation(model)


def _head_grads(model, steps, amortize):
    """Micro-batches ``steps``, each a list of ``(head, x)`` losses backpropagated one by one."""
    model.zero_grad(set_to_none=True)
    for i, losses in enumerate(steps):
        window = accumulate_reconstruction(model, last=i == len(steps) - 1) if amortize else contextlib.nullcontext()
        with window:
            outs = [(model[head](x) ** 2).sum() for head, x in losses]
            for j, loss in enumerate(outs):
                loss.backward(retain_graph=j < len(outs) - 1)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _amortization_case(case):
    torch.manual_seed(0)

    def x(n, d=24):
        return torch.randn(n, d, dtype=torch.float64)

    if case == "small-last-batch":  # "auto" would stream 1 token; the step's rebuilt weights must carry it
        head = MPOLinear(in_features=64, out_features=64, in_factors=[4, 4, 4], out_factors=[4, 4, 4], max_bond=4, dtype=torch.float64)
        assert head.explain(1).mode == "stream" and head.explain(16).mode == "reconstruct"
        return nn.ModuleDict({"a": head}), [[("a", x(16, 64))], [("a", x(16, 64))], [("a", x(1, 64))]]
    kw = dict(in_factors=[2, 3, 4], out_factors=[2, 3, 2], dtype=torch.float64, mode="reconstruct")
    model = nn.ModuleDict({"a": MPOLinear(in_features=24, out_features=12, **kw),
                          "b": MPOLinear(in_features=24, out_features=12, **kw)})
    if case == "unused-in-last":  # multi-task: head b is used early, not in the last micro-batch
        return model, [[("a", x(5))], [("b", x(5))], [("a", x(5))]]
    assert case == "two-backward-in-last"  # two losses through the last micro-batch's weights
    return model, [[("a", x(5))], [("a", x(5))], [("a", x(5)), ("a", x(5))]]


@pytest.mark.parametrize("case", ["small-last-batch", "unused-in-last", "two-backward-in-last"])
def test_amortized_reconstruction_matches_plain_accumulation_in_every_micro_batch_pattern(case):
    model, steps = _amortization_case(case)
    plain = _head_grads(model, steps, amortize=False)
    amortized = _head_grads(model, steps, amortize=True)
    assert plain.keys() == amortized.keys() and any(".cores." in k for k in plain)
    for k in plain:
        torch.testing.assert_close(amortized[k], plain[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")


def test_amortized_reconstruction_refuses_an_unflushed_gradient_under_distributed(monkeypatch):
    model, steps = _amortization_case("unused-in-last")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    with pytest.raises(RuntimeError, match="would not be all-reduced"):
        _head_grads(model, steps, amortize=True)


def test_compiled_dropless_layer_is_one_graph():
    torch.manual_seed(0)
    torch._dynamo.reset()
    up = MPOExpertBank(num_experts=4, in_factors=[2, 4, 4], out_factors=[4, 4, 4], share="central")
    down = MPOExpertBank(num_experts=4, in_factors=[4, 4, 4], out_factors=[2, 4, 4], share="central")
    layer = MoELayer(router=SwitchRouter(d_model=32, num_experts=4, capacity_factor=None, drop_tokens=False),
                     experts=ExpertFFN(up=up, down=down, up_bias=True, down_bias=True))
    x = torch.randn(64, 32, requires_grad=True)
    ref = layer(x)
    ref_grad = torch.autograd.grad(ref.sum(), x)[0]
    compiled = torch.compile(layer, fullgraph=True)  # fails on any graph break (e.g. a host sync)
    y = compiled(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], ref_grad, rtol=1e-5, atol=1e-6)


def test_dense_bank_uses_the_same_grouped_path():
    torch.manual_seed(0)
    bank = DenseExpertBank(num_experts=3, in_features=8, out_features=5)
    x = torch.randn(9, 8)
    for impl in ("loop", "grouped_mm"):
        bank.grouped_impl = impl
        y = bank(x, torch.tensor([2, 0, 7]))
        torch.testing.assert_close(y, torch.cat([x[:2] @ bank.weight[0].T, x[2:] @ bank.weight[2].T]))


@pytest.mark.slow
def test_compiled_converted_model_hits_no_recompile_limit():
    """A converted GPT-2 under torch.compile sees 12 different sequence lengths: the stream /
    rebuild decision is one cached threshold comparison, so dynamic shapes do not recompile
    per length (failing on the recompile limit instead of silently falling back to eager)."""
    import torch._dynamo.config as dynamo_config

    torch._dynamo.reset()
    model = moe.convert(tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                        moe.MoEConfig(num_experts=2, m=3, capacity_factor=None, drop_tokens=False),
                        progress=False).eval()
    compiled = torch.compile(model)
    old = dynamo_config.fail_on_recompile_limit_hit
    dynamo_config.fail_on_recompile_limit_hit = True
    try:
        for seq in range(4, 40, 3):
            batch = inputs_for(model, batch=2, seq=seq)
            with torch.no_grad():
                torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-5)
    finally:
        dynamo_config.fail_on_recompile_limit_hit = old


@pytest.mark.parametrize("tokens", [2, 4096])  # the streamed and the grouped (rebuilt) path
def test_float64_expert_bank_under_autocast_stays_float64_like_linear(tokens):
    bank = MPOExpertBank(num_experts=2, in_factors=[4, 8], out_factors=[4, 8], dtype=torch.float64)
    x = torch.randn(tokens, 32, dtype=torch.float64)
    counts = [tokens // 2, tokens - tokens // 2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bank(x, counts)
    with torch.no_grad():
        W = bank.weights()  # (E, out, in)
    want = torch.cat([nn.functional.linear(x[:counts[0]], W[0]), nn.functional.linear(x[counts[0]:], W[1])])
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, want)
