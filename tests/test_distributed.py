"""GradientMask under torch.distributed (2 CPU processes, gloo) and with replaced parameters.

The 2-process test builds a small non-transformers model so that the spawned processes import
only torch and tnmoe.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import tnmoe.moe as moe
from tnmoe.moe import GradientMask, MoEConfig
from tiny_ffn import TinyFFN, tiny_ffn_registered

D_MODEL, D_FF = 8, 16


class Net(nn.Module):
    """``(B, 4) -> (B,)``: input projection, two FFN blocks (converted to MPO experts), head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, D_MODEL)
        self.blocks = nn.ModuleList([TinyFFN(D_MODEL, D_FF), TinyFFN(D_MODEL, D_FF)])
        self.head = nn.Linear(D_MODEL, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h).squeeze(-1)


def _model():
    """Same weights on every rank (seeded); central MPO core shared by 2 experts per layer."""
    torch.manual_seed(0)
    config = MoEConfig(num_experts=2, factors={D_MODEL: [2, 2, 2], D_FF: [2, 2, 4]}, share="central",
                       init_noise=0.1, router="topk", top_k=1, drop_tokens=False)
    with tiny_ffn_registered():
        return moe.convert(Net(), config, progress=False).train()


def _expert_parameters(model):
    return [p for _, layer in moe.moe_layers(model) for bank in layer.experts.banks().values()
            for p in bank.expert_parameters()]


def _train(model, mask, params, rank, steps):
    """``steps`` SGD steps on rank-dependent data (so ranks' local grads differ); returns decisions."""
    opt = torch.optim.SGD(params, lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)
    decisions = []
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, generator=g)
        loss = nn.functional.mse_loss(model(x), y) + moe.auxiliary_loss(model)
        loss.backward()
        decisions.append(mask.apply())
        opt.step()
        opt.zero_grad()
    return decisions


def _ddp_case(rank):
    model = _model()
    mask = GradientMask(model, p_b=0.5, seed=rank)  # different seeds: the decision must still agree
    ddp = nn.parallel.DistributedDataParallel(model)
    decisions = _train(ddp, mask, ddp.parameters(), rank, steps=6)
    return {"decisions": decisions, "shared": [p.detach().clone() for p in mask.params]}


def _fsdp_case(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mask = GradientMask(model, p_b=1.0, seed=rank)  # built BEFORE sharding replaces the parameters
    before = mask.params  # kept alive: a freed parameter's id could be reused by its replacement
    shared0 = [p.detach().clone() for p in moe.shared_parameters(model)]
    experts0 = [p.detach().clone() for p in _expert_parameters(model)]
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    replaced = all(p is not old for p, old in zip(mask.params, before))
    _train(model, mask, model.parameters(), rank, steps=2)
    full = [p.full_tensor() for p in moe.shared_parameters(model)]
    experts = [p.full_tensor() for p in _expert_parameters(model)]
    return {"replaced": replaced,
            "shared_unchanged": [torch.equal(a, b) for a, b in zip(shared0, full)],
            "experts_changed": [not torch.equal(a, b) for a, b in zip(experts0, experts)]}


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {"ddp": _ddp_case(rank)}
        try:
            result["fsdp"] = _fsdp_case(rank)
        except (ImportError, NotImplementedError, RuntimeError) as err:  # FSDP2 unavailable on this build
            result["fsdp_error"] = repr(err)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_mask_agrees_and_follows_fsdp2(tmp_path):
    """~4 s on 2 idle cores (two spawned interpreters importing torch and tnmoe)."""
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # (a) DDP: same decisions on both ranks despite seeds 0 and 1 (whose own draws differ), so the
    # shared central cores (DDP-averaged grads, same masked steps) stay bit-identical
    assert r0["ddp"]["decisions"] == r1["ddp"]["decisions"]
    assert r0["ddp"]["decisions"] == _draws(seed=0, p_b=0.5, n=6)  # rank 0's generator decides
    assert 0 < sum(r0["ddp"]["decisions"]) < 6
    assert all(torch.equal(a, b) for a, b in zip(r0["ddp"]["shared"], r1["ddp"]["shared"]))
    # (b) FSDP2 after the mask: the sharded parameters are masked, not the stale originals
    assert "fsdp_error" not in r0, f"FSDP2 on CPU/gloo failed: {r0.get('fsdp_error')}"
    for r in (r0, r1):
        assert r["fsdp"]["replaced"]
        assert all(r["fsdp"]["shared_unchanged"]) and len(r["fsdp"]["shared_unchanged"]) == 4
        assert all(r["fsdp"]["experts_changed"])


def _draws(seed, p_b, n):
    """The first ``n`` decisions of a single-process mask with ``seed`` (independent reference)."""
    g = torch.Generator().manual_seed(seed)
    return [bool(torch.rand((), generator=g).item() < p_b) for _ in range(n)]


def test_seeds_used_by_the_two_process_test_disagree():
    """Guards the DDP case: ranks' own draws (seeds 0, 1) differ, so only the broadcast makes
    their decisions agree."""
    assert _draws(0, 0.5, 6) != _draws(1, 0.5, 6)


# --- replaced parameters, in one process ----------------------------------------------------------
def _freeze_check(model, mask):
    shared0 = [p.detach().clone() for p in moe.shared_parameters(model)]
    experts0 = [p.detach().clone() for p in _expert_parameters(model)]
    _train(model, mask, model.parameters(), rank=0, steps=2)
    assert all(torch.equal(a, p) for a, p in zip(shared0, moe.shared_parameters(model)))
    assert all(not torch.equal(a, p) for a, p in zip(experts0, _expert_parameters(model)))


def test_mask_follows_parameters_replaced_by_assign_load():
    model = _model()
    mask = GradientMask(model, p_b=1.0)
    before = mask.params  # kept alive: a freed parameter's id could be reused by its replacement
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new Parameter objects under the same names
    assert all(p is not old for p, old in zip(mask.params, before))
    _freeze_check(model, mask)


def test_mask_follows_parameters_replaced_by_to_empty():
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mask = GradientMask(model, p_b=1.0)
    before = mask.params  # kept alive: a freed parameter's id could be reused by its replacement
    model.to("meta").to_empty(device="cpu")
    model.load_state_dict(state)
    assert all(p is not old for p, old in zip(mask.params, before))
    _freeze_check(model, mask)


def test_mask_with_renamed_parameter_fails_clearly():
    model = _model()
    mask = GradientMask(model, p_b=1.0)
    model.blocks[0] = nn.Identity()  # the masked core of block 0 is gone
    with pytest.raises(RuntimeError, match=r"no parameter 'blocks\.0\..*' any more"):
        mask.apply()
    assert mask.steps == 0  # nothing drawn


def test_mask_from_parameter_list_holds_those_objects():
    model = _model()
    params = moe.shared_parameters(model)
    mask = GradientMask(params, p_b=1.0)
    assert mask.names == [] and all(a is b for a, b in zip(mask.params, params))
    assert all(p.grad is None for p in params) and mask.apply() is True
