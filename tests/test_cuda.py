"""The accelerator paths against the CPU float64 layer (itself checked against a naive
per-token reference in test_experts.py): batched reconstruction, grouped expert GEMMs,
bf16 autocast, no host syncs in the dropless path, torch.compile, amortized reconstruction.

Runs on CUDA when a GPU is present and is skipped otherwise. ``TNMOE_TEST_DEVICE=cpu`` runs the
device-generic tests on the CPU (to check the tests themselves on a machine without a GPU);
the host-sync test needs CUDA's sync debug mode and skips there.
"""

import copy
import os

import pytest
import torch

from test_experts import random_experts
from tiny_models import inputs_for, tiny_gpt2
import tnmoe.moe as moe
from tnmoe.moe import (
    HashRouter,
    MoELayer,
    SwitchRouter,
    TopKRouter,
    grouped_linear,
    grouped_mm_supported,
)
from tnmoe.networks import accumulate_reconstruction

DEVICE = os.environ.get("TNMOE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (set TNMOE_TEST_DEVICE=cpu to run these on CPU)")
CUDA = DEVICE is not None and torch.device(DEVICE).type == "cuda"


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """TF32 would make float32 results depend on the card: compare true float32."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against the reference ``b`` (both moved to CPU float64)."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_layer(kind: str, router: str, gated: bool = False, capacity_factor: float | None = None,
               E: int = 4, d: int = 24, d_ff: int = 48) -> MoELayer:
    """A float64 CPU layer with experts that differ (MPO experts share the central core) and
    decisive routing."""
    experts = random_experts(kind, "central", gated, E=E, d=d, d_ff=d_ff)
    if router == "switch":
        r = SwitchRouter(d_model=d, num_experts=E, capacity_factor=capacity_factor,
                         drop_tokens=capacity_factor is not None)
    elif router == "topk":
        r = TopKRouter(d_model=d, num_experts=E, top_k=2, capacity_factor=capacity_factor, gate_scaling="normalized")
    else:
        r = HashRouter(num_experts=E, vocab_size=97)
    if hasattr(r, "gate"):
        with torch.no_grad():
            r.gate.weight.normal_()
    return MoELayer(router=r.double(), experts=experts, load_balancing_coef=0.0)


def run(layer: MoELayer, x: torch.Tensor, ids: torch.Tensor | None, probe: torch.Tensor,
        dtype: torch.dtype | None = None):
    """Output and the gradients of ``(y * probe).sum()`` w.r.t. ``x`` and every parameter
    (``None`` for an unused one, e.g. a shared core on a masked step)."""
    x = x.detach().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = layer(x, token_ids=ids) if ids is not None else layer(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y.float() * probe).sum(), [x] + params, allow_unused=True)
    return y, grads


CASES = [  # expert kind, router, gated, capacity factor
    ("mpo", "switch", False, None),
    ("mpo", "topk", True, 0.75),
    ("dense", "switch", False, 0.5),
    ("dense", "topk", True, None),
]


@pytest.mark.parametrize("kind,router,gated,cf", CASES)
def test_float32_layer_on_device_matches_cpu_float64(kind, router, gated, cf):
    torch.manual_seed(0)
    ref_layer = make_layer(kind, router, gated, cf).train()
    T, d = 96, 24
    x, probe = torch.randn(T, d, dtype=torch.float64), torch.randn(T, d, dtype=torch.float64)
    y_ref, g_ref = run(ref_layer, x, None, probe)
    layer = copy.deepcopy(ref_layer).float().to(DEVICE)
    y, g = run(layer, x.float().to(DEVICE), None, probe.float().to(DEVICE))
    assert y.device.type == torch.device(DEVICE).type and y.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5
    assert layer.last_stats.dropped == ref_layer.last_stats.dropped
    for name, a, b in zip(["x"] + [n for n, p in ref_layer.named_parameters() if p.requires_grad], g, g_ref):
        if b is None:
            assert a is None or not a.any(), name
        else:
            assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("kind", ["dense", "mpo"])
def test_bf16_autocast_layer_on_device_is_close_to_float64(kind):
    """Hash routing (by token id), so bf16 rounding cannot flip a routing decision."""
    torch.manual_seed(0)
    ref_layer = make_layer(kind, "hash").train()
    T, d = 128, 24
    x, probe = torch.randn(T, d, dtype=torch.float64), torch.randn(T, d, dtype=torch.float64)
    ids = torch.randint(0, 97, (T,))
    y_ref, g_ref = run(ref_layer, x, ids, probe)
    layer = copy.deepcopy(ref_layer).float().to(DEVICE)
    y, g = run(layer, x.float().to(DEVICE), ids.to(DEVICE), probe.float().to(DEVICE), dtype=torch.bfloat16)
    assert y.dtype == torch.float32  # the layer returns its input's dtype
    assert 1e-4 < rel_err(y, y_ref) < 3e-2  # bf16 rounding shows: the experts ran in bf16
    for name, a, b in zip(["x"] + [n for n, _ in ref_layer.named_parameters()], g, g_ref):
        assert a.dtype == torch.float32 or name == "x", name  # parameters keep float32 gradients
        assert rel_err(a, b) < 5e-2, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_impls_agree_on_device(dtype):
    torch.manual_seed(0)
    E, A, n_in, n_out = 5, 200, 64, 96
    counts = torch.tensor([37, 0, 81, 2, 80])  # an empty group and a tiny one
    x = torch.randn(A, n_in, dtype=torch.float64)
    W = torch.randn(E, n_out, n_in, dtype=torch.float64)
    probe = torch.randn(A, n_out, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(E), counts)
    ref = torch.einsum("ai,aoi->ao", x, W[rows])
    ref_dx = torch.einsum("ao,aoi->ai", probe, W[rows])
    ref_dW = torch.zeros_like(W).index_add_(0, rows, torch.einsum("ao,ai->aoi", probe, x))
    impls = ["loop"]
    xd, Wd = x.to(DEVICE, dtype), W.to(DEVICE, dtype)
    if grouped_mm_supported(xd, Wd):
        impls.append("grouped_mm")
    elif CUDA and dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] >= 9:
        pytest.fail("torch._grouped_mm should take bf16 operands on this card")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for impl in impls:
        xi, Wi = xd.clone().requires_grad_(True), Wd.clone().requires_grad_(True)
        y = grouped_linear(xi, Wi, counts.to(DEVICE), impl=impl)
        dx, dW = torch.autograd.grad((y * probe.to(DEVICE, dtype)).sum(), [xi, Wi])
        assert rel_err(y, ref) < tol, impl
        assert rel_err(dx, ref_dx) < tol, impl
        assert rel_err(dW, ref_dW) < tol, impl
        assert not dW.cpu()[1].any(), "an expert with no tokens gets a zero gradient"


@pytest.mark.skipif(not CUDA, reason="CUDA's sync debug mode")
@pytest.mark.parametrize("kind", ["dense", "mpo"])
def test_dropless_bf16_training_step_has_no_host_sync(kind):
    """Point 5 of the performance issue on the GPU: with ``torch._grouped_mm`` (bf16, compute
    capability >= 9) the dropless forward and backward never wait on the device."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("torch._grouped_mm on CUDA needs compute capability >= 9.0")
    torch.manual_seed(0)
    layer = make_layer(kind, "switch").float().to(DEVICE).train()
    x = torch.randn(512, 24, device=DEVICE)
    run(layer, x, None, torch.ones_like(x), dtype=torch.bfloat16)  # warm-up: lazy inits may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, _ = run(layer, x, None, torch.ones_like(x), dtype=torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(y).all()


def test_compiled_dropless_layer_on_device_is_one_graph():
    torch.manual_seed(0)
    torch._dynamo.reset()
    layer = make_layer("mpo", "switch").float().to(DEVICE).train()
    x = torch.randn(256, 24, device=DEVICE)
    probe = torch.randn_like(x)
    y_ref, g_ref = run(layer, x, None, probe)
    compiled = torch.compile(layer, fullgraph=True)  # fails on any graph break (e.g. a host sync)
    y, g = run(compiled, x, None, probe)
    assert rel_err(y, y_ref) < 1e-5
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-4


def test_amortized_reconstruction_on_device_equals_plain_accumulation():
    def converted():
        torch.manual_seed(0)
        model = moe.convert(tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                            moe.MoEConfig(num_experts=2, m=3, capacity_factor=None, init_noise=0.1), progress=False)
        return model.to(DEVICE).train()

    batches = [{k: v.to(DEVICE) for k, v in inputs_for(tiny_gpt2(), batch=2, seq=8, seed=s).items()}
               for s in range(3)]
    grads = {}
    for amortize in (False, True):
        model = converted()
        for i, b in enumerate(batches):
            if amortize:
                with accumulate_reconstruction(model, last=i == len(batches) - 1):
                    (model(**b, labels=b["input_ids"]).loss / len(batches)).backward()
            else:
                (model(**b, labels=b["input_ids"]).loss / len(batches)).backward()
        grads[amortize] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and any(".cores." in k for k in grads[True])
    for k, g in grads[False].items():
        assert rel_err(grads[True][k], g) < 1e-5, k


def test_eval_cache_on_device_sees_in_place_edits():
    """The cached eval weights are rebuilt when a core changes in place (an optimizer step)."""
    torch.manual_seed(0)
    layer = make_layer("mpo", "switch").float().to(DEVICE).eval()
    x = torch.randn(64, 24, device=DEVICE)
    with torch.no_grad():
        before = layer(x)
        assert torch.equal(layer(x), before)
        next(layer.experts.up.parameters()).mul_(1.5)
        after = layer(x)
        for bank in layer.experts.banks().values():
            bank.cache_weights = False
        want = layer(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, want)
