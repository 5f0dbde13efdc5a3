"""Converting the routed experts of an MoE model (the model's own router kept) and the probe
that checks an adapter reads an FFN exactly.

:func:`build_routed_experts` turns an :class:`~tnmoe.models.adapters.moe_experts.ExpertsSpec`
into a :class:`~tnmoe.moe.routed.RoutedExperts` (dense bank: a copy; MPO bank: one MPO per
expert, lossless or truncated); :func:`check_routed_config` refuses a config that contradicts
the model's router or asks for an inexact sharing.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..moe.banks import BaseDeltaExpertBank, DenseExpertBank, MPOExpertBank
from ..moe.config import MoEConfig
from ..moe.experts import ExpertFFN
from ..moe.routed import RoutedExperts
from ..networks import MPO, factorize, resolve_share
from ..networks.decompose import check_finite
from .adapters import FFNSpec
from .adapters.moe_experts import ExpertsSpec, experts_forward

__all__ = ["build_routed_experts", "empty_bank", "check_routed_config", "verify_dense_extraction", "verify_experts_extraction"]

#: the issue that builds shared factors fitted to differing experts
_FIT_HINT = ("fitting shared factors to the experts (tnmoe's 'Compress a trained MoE into shared factors "
             "fitted to data' work, not in convert); convert losslessly with share='none' (one MPO per expert) "
             "or expert_type='dense'")


def _identical_experts(spec: ExpertsSpec) -> bool:
    tensors = list(spec.matrices().values()) + [b for b in (spec.up_bias, spec.gate_bias, spec.down_bias)
                                                if b is not None]
    return all(torch.equal(t[e], t[0]) for t in tensors for e in range(1, t.shape[0]))


def check_routed_config(config: MoEConfig, spec: ExpertsSpec, name: str, *, loading: bool) -> None:
    """``ValueError`` when ``config`` cannot convert the experts ``spec`` (module ``name``) exactly
    with the model's router kept. ``loading``: the weights come from a checkpoint (no values)."""
    routed = config.router_options_set()
    if routed:
        opts = ", ".join(f"{k}={v!r} (default {d!r})" for k, (v, d) in routed.items())
        raise ValueError(f"{name} is an MoE model's experts module: the model's own router is kept, so the router "
                         f"options {opts} do not apply; leave them at their defaults")
    if config.num_experts is not None and config.num_experts != spec.num_experts:
        raise ValueError(f"num_experts={config.num_experts} contradicts {name}, which has {spec.num_experts} "
                         "experts; leave num_experts=None (the model's)")
    if config.top_k is not None and config.top_k != spec.top_k:
        raise ValueError(f"top_k={config.top_k} contradicts the model's router, which picks {spec.top_k} experts "
                         f"per token for {name}; leave top_k=None (the model's)")
    if config.init_noise:
        raise ValueError(f"init_noise={config.init_noise}: {name}'s experts are already distinct trained experts; "
                         "converting them adds no noise (set init_noise=0)")
    if config.expert_type != "mpo" or loading:
        return
    m = len(factorize(spec.d_model, config.factors_for(spec.d_model)))
    shared = resolve_share(config.share, m)
    if shared and not _identical_experts(spec):
        raise ValueError(
            f"share={config.share!r} cannot be exact for {name}: its {spec.num_experts} experts differ, and one "
            f"lossless core shared by all of them has far fewer degrees of freedom than the experts it would "
            f"serve. Sharing trained experts' cores needs {_FIT_HINT}")


def matrix_factors(config: MoEConfig, out_dim: int, in_dim: int) -> tuple[list[int], list[int]]:
    """``(in_factors, out_factors)`` of an ``(out_dim, in_dim)`` matrix as ``config`` factorizes
    it (``factors`` / ``m``); ``ValueError`` when the two factorizations differ in length."""
    in_f = factorize(in_dim, config.factors_for(in_dim))
    out_f = factorize(out_dim, config.factors_for(out_dim))
    if len(in_f) != len(out_f):
        raise ValueError(f"factorizations of {in_dim} ({in_f}) and {out_dim} ({out_f}) differ in length")
    return in_f, out_f


def empty_mpo_bank(num_experts: int, out_dim: int, in_dim: int, config: MoEConfig, *,
                   dtype: torch.dtype, device, bond_dims: list[int] | None = None) -> MPOExpertBank:
    """An uninitialised :class:`MPOExpertBank` of ``num_experts`` ``(out_dim, in_dim)`` matrices
    factorized as ``config`` says (``factors`` / ``m``, ``max_bond``, ``share``); ``bond_dims``
    (inner bonds) instead of ``max_bond`` when given."""
    in_f, out_f = matrix_factors(config, out_dim, in_dim)
    return MPOExpertBank(num_experts=num_experts, in_factors=in_f, out_factors=out_f,
                         max_bond=None if bond_dims is not None else config.max_bond, bond_dims=bond_dims,
                         share=config.share, init="empty", dtype=dtype, device=device,
                         cache_weights=config.cache_weights)


def empty_bank(num_experts: int, out_dim: int, in_dim: int, config: MoEConfig, *, dtype: torch.dtype, device,
               init: str = "empty", generator: torch.Generator | None = None):
    """An uninitialised bank of ``num_experts`` ``(out_dim, in_dim)`` matrices of
    ``config.expert_type``: :func:`empty_mpo_bank` for ``"mpo"``, a
    :class:`BaseDeltaExpertBank` of rank ``max_bond`` (``None``: full rank) for ``"base_delta"``,
    a :class:`DenseExpertBank` for ``"dense"``."""
    if config.expert_type == "mpo":
        return empty_mpo_bank(num_experts, out_dim, in_dim, config, dtype=dtype, device=device)
    if config.expert_type == "base_delta":
        rank = min(out_dim, in_dim) if config.max_bond is None else config.max_bond
        return BaseDeltaExpertBank(num_experts=num_experts, in_features=in_dim, out_features=out_dim, rank=rank,
                                   init=init, dtype=dtype, device=device, generator=generator)
    return DenseExpertBank(num_experts=num_experts, in_features=in_dim, out_features=out_dim, dtype=dtype,
                           device=device)


def build_routed_experts(spec: ExpertsSpec, config: MoEConfig, *, init: str = "pretrained") -> RoutedExperts:
    """A :class:`RoutedExperts` holding ``spec``'s experts: ``expert_type="dense"`` copies them,
    ``"base_delta"`` fits their mean plus truncated-SVD deltas (exact at ``max_bond=None``),
    ``"mpo"`` decomposes each expert's matrices into its own MPO (bonds ``config.max_bond``;
    shared cores only for identical experts, see :func:`check_routed_config`). ``init="empty"``
    leaves the weights to be loaded from a checkpoint; meta tensors give a meta module."""
    if init not in ("pretrained", "empty"):
        raise ValueError(f"init must be 'pretrained' or 'empty', got {init!r}")
    E = spec.num_experts
    dtype, device = spec.up.dtype, spec.up.device
    load = init == "pretrained" and not spec.up.is_meta

    def bank(W: torch.Tensor):  # (E, out, in)
        _, out_dim, in_dim = W.shape
        if config.expert_type == "dense":
            b = DenseExpertBank(num_experts=E, in_features=in_dim, out_features=out_dim, dtype=dtype, device=device)
            if load:
                check_finite(W, "the MoE model's expert matrices")
                with torch.no_grad():
                    b.weight.copy_(W.detach())
            return b
        if config.expert_type == "base_delta":  # data-blind: the mean expert + truncated SVD deltas
            b = empty_bank(E, out_dim, in_dim, config, dtype=dtype, device=device)
            if load:
                check_finite(W, "the MoE model's expert matrices")
                b.fit_matrices(W.detach().to(device))
            return b
        b = empty_mpo_bank(E, out_dim, in_dim, config, dtype=dtype, device=device)
        if load:
            _load_per_expert(b, W.detach(), b.in_factors, b.out_factors, config.max_bond)
        return b

    experts = ExpertFFN(up=bank(spec.up), down=bank(spec.down),
                        gate=bank(spec.gate) if spec.gate is not None else None,
                        activation=spec.activation, glu=spec.glu, up_bias=spec.up_bias is not None,
                        gate_bias=spec.gate_bias is not None, down_bias=spec.down_bias is not None,
                        dropout=spec.inner_dropout)
    if load:
        with torch.no_grad():
            for mine, theirs in ((experts.up_bias, spec.up_bias), (experts.gate_bias, spec.gate_bias),
                                 (experts.down_bias, spec.down_bias)):
                if theirs is not None:
                    mine.copy_(theirs.detach())
    return RoutedExperts(experts, top_k=spec.top_k, routing=spec.routing)


@torch.no_grad()
def _load_per_expert(bank: MPOExpertBank, W: torch.Tensor, in_f, out_f, max_bond) -> None:
    """Expert ``e``'s cores := the MPO of ``W[e]``; shared cores from expert 0 (identical experts)."""
    check_finite(W, "the MoE model's expert matrices")
    errors = []
    for e in range(W.shape[0]):
        w = W[e] if W.dtype in (torch.float32, torch.float64) else W[e].float()
        mpo = MPO.from_matrix(w, in_f, out_f, max_bond=max_bond)
        for k, (src, dst, stacked) in enumerate(zip(mpo.cores, bank.cores, bank.batched)):
            want = dst.shape[1:] if stacked else dst.shape
            if tuple(src.shape) != tuple(want):
                raise ValueError(f"core {k}: MPO shape {tuple(src.shape)} does not match the bank's {tuple(want)}")
            if stacked:
                dst[e].copy_(src.to(dst.dtype))
            elif e == 0:
                dst.copy_(src.to(dst.dtype))
        w64 = w.double()
        errors.append(float((mpo.to_matrix().double() - w64).norm() / w64.norm().clamp_min(1e-300)))
    bank.conversion_error = max(errors)


# --- probes: does the adapter read the module exactly? ---------------------------------------------
def _tolerance(dtype: torch.dtype) -> float:
    """Relative Frobenius error allowed between the module and the naive reference: float32 /
    float64 sums over up to a few thousand terms (64 eps); half precision rounds every
    intermediate (8 eps of that dtype)."""
    eps = torch.finfo(dtype).eps
    return (64 if dtype in (torch.float32, torch.float64) else 8) * eps


def _reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The naive reference's dtype: float64 for a float64 model (its tolerance is float64's), else
    float32 (half-precision models are compared against a float32 reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _compare(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
    tol = _tolerance(got.dtype)
    if not err <= tol:
        raise ValueError(
            f"{name}: the adapter's reading of this module does not compute what the module computes (relative "
            f"error {err:.2e} > {tol:.1e} on a random probe), so converting it would change the model. The module "
            "has a feature the experts do not carry; register an adapter that reads it exactly (or leave it out of "
            "target_modules)")


@torch.no_grad()
def verify_dense_extraction(name: str, module: nn.Module, spec: FFNSpec) -> None:
    """Check ``module(x) == spec``'s FFN on a random probe (``ValueError`` otherwise)."""
    if spec.up.is_meta:
        return
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, spec.d_model, generator=g).to(device=spec.up.device, dtype=spec.up.dtype)
    def one(t):  # the FFN as expert 0 of a one-expert spec: the same naive reference as the MoE probe
        return None if t is None else t.unsqueeze(0)
    single = ExpertsSpec(up=one(spec.up), down=one(spec.down), gate=one(spec.gate), activation=spec.activation,
                         up_bias=one(spec.up_bias), down_bias=one(spec.down_bias), top_k=1)
    want = experts_forward(single, x.to(_reference_dtype(x.dtype)), 0)
    with _eval_mode(module):
        got = module(x)
    if not isinstance(got, torch.Tensor):
        raise ValueError(f"{name}: {type(module).__name__}(x) returns {type(got).__name__}, not a tensor; its "
                         "adapter cannot be checked by a probe")
    _compare(name, got, want)


@torch.no_grad()
def verify_experts_extraction(name: str, module: nn.Module, spec: ExpertsSpec) -> None:
    """Call the MoE model's experts module on a random probe routed to every expert and compare with
    the naive sum over ``spec``'s experts (``ValueError`` otherwise)."""
    if spec.up.is_meta:
        return
    E, k = spec.num_experts, spec.top_k
    T = 2 * E
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, spec.d_model, generator=g).to(device=spec.up.device, dtype=spec.up.dtype)
    index = (torch.arange(T).unsqueeze(1) + torch.arange(k).unsqueeze(0)) % E  # k distinct, all experts hit
    weights = torch.rand(T, k, generator=g) + 0.5
    ref = _reference_dtype(x.dtype)
    want = torch.zeros(T, spec.d_model, dtype=ref, device=x.device)
    for e in range(E):
        tok, slot = (index == e).nonzero(as_tuple=True)
        y = experts_forward(spec, x[tok.to(x.device)].to(ref), e)
        want.index_add_(0, tok.to(x.device), y * weights[tok, slot].unsqueeze(1).to(x.device))
    route = index.to(x.device)
    if spec.routing == "one_hot":
        route = nn.functional.one_hot(route, E)
    with _eval_mode(module):
        got = module(x, route, weights.to(x.device))
    _compare(name, got, want)
