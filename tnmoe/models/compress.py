"""Compress a trained MoE's experts into (shared) MPO factors fitted to calibration data.

:func:`compress` replaces the routed experts of a transformers MoE model (Mixtral, Qwen-MoE,
OLMoE, DeepSeek-V3, gpt-oss, Switch, ...: what :func:`~tnmoe.models.convert.find_target_modules`
finds) or of a tnmoe-converted model (:class:`~tnmoe.moe.routed.RoutedExperts`, and the experts of
:class:`~tnmoe.moe.layer.MoELayer`) by :class:`~tnmoe.moe.banks.MPOExpertBank` experts whose cores
(any subset shared by all experts of a layer) are fitted, per matrix role, to the experts' outputs
on the tokens the model's own router sends them (:func:`~tnmoe.networks.fit.fit_mpo_bank`), or by
a :class:`~tnmoe.moe.banks.BaseDeltaExpertBank` (one shared base per layer and role plus low-rank
deltas per expert, :func:`~tnmoe.networks.fit_base_delta`) fitted to the same objective.

The objective of matrix ``W_e`` (role up / gate / down of expert ``e``) is

    f_e = tr((W_e - Ŵ_e) C_e (W_e - Ŵ_e)^T),   C_e = (1/N) sum_t w_te^2 x_t x_t^T

over the ``N`` (non-padding) tokens ``t`` that reach the layer, ``w_te`` the routing weight of
expert ``e`` for token ``t`` (0 when not routed there) and ``x_t`` the matrix's input (the block's
hidden state for up / gate, the original expert's intermediate ``act(gate x) * (up x)`` (or
``glu(gate x, up x)``) for down). The block output is ``sum_e w_te expert_e(x_t)``, so ``f_e`` is
the mean squared error that matrix's error adds to the block output through expert ``e``
(exactly, for the down projection; cross terms between a token's ``k`` experts not included), and
the joint objective of a layer's bank, ``sum_e f_e``, weighs each expert by how much routing
weight it carries. A shared core is fitted to that joint objective. The per-expert minimiser
does not depend on the ``1/N`` scale (``C_e / sum_t w_te^2`` gives the same fit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..moe.banks import MPOExpertBank
from ..moe.config import MoEConfig
from ..moe.dispatch import plan_dispatch
from ..moe.experts import ExpertFFN
from ..moe.layer import MoELayer
from ..moe.routed import RoutedExperts
from ..networks import resolve_share
from ..networks.fit import InputCovariance
from .adapters import get_adapter
from .adapters.moe_experts import ExpertsSpec
from .convert import _extract, _tnmoe_modules, find_target_modules
from .hf_config import mark_hf_config
from .routed import check_routed_config, empty_bank

__all__ = ["compress", "CompressionReport", "LayerCompression", "low_rank_factors"]

_ROLES = ("up", "gate", "down")


def low_rank_factors(d_model: int, d_ff: int) -> dict[int, list[int]]:
    """``MoEConfig.factors`` that make every expert matrix a rank-``r`` product ``U V`` (an m = 2
    MPO with unit factors; ``r`` = the bond, ``max_bond``): ``{d_model: [1, d_model], d_ff: [d_ff, 1]}``.

    Core 0 is then the ``d_ff``-side factor of every matrix and core 1 the ``d_model``-side one:
    for up / gate ``(d_ff, d_model)`` core 0 is ``U`` ``(d_ff, r)`` and core 1 is ``V`` ``(r, d_model)``;
    for down ``(d_model, d_ff)`` core 0 is ``V`` ``(r, d_ff)`` and core 1 is ``U`` ``(d_model, r)``.
    So ``share=[1]`` shares the basis on the hidden-state side (up / gate's V, MoE-SVD-style, and
    down's U), ``share=[0]`` the ``d_ff``-side one, ``share="none"`` is a per-expert (whitened) SVD.
    """
    d_model, d_ff = int(d_model), int(d_ff)
    if d_model == d_ff:
        raise ValueError(f"d_model == d_ff == {d_model}: one factors entry cannot give both sides' unit "
                         "factors; the rank-r form needs d_model != d_ff")
    return {d_model: [1, d_model], d_ff: [d_ff, 1]}


# -- the report ----------------------------------------------------------------------------------
@dataclass
class LayerCompression:
    """One compressed experts module.

    params_before / params_after: its experts' parameters (each shared core once, biases
    included), counted as :func:`~tnmoe.models.convert.count_parameters` counts them.
    bond_dims: per role, the MPO bonds ``[1, r_1, ..., 1]``.
    output_error: per role, per expert, the relative output error ``||(W - Ŵ) L|| / ||W L||``
    (``L L^T = C_e``) on the calibration covariances; tt_svd_output_error: the same for per-expert
    TT-SVD at the same bonds (``None`` where cores are shared). objective: per role, the fit's
    joint objective ``sum_e f_e`` after the start and after each sweep. routed_tokens: calibration
    tokens routed to each expert. fallback_experts: experts no calibration token reached; their
    covariances are the layer's pooled ones (every token of the layer, weight 1, scaled to the
    mean expert's routing weight).
    """

    name: str
    params_before: int
    params_after: int
    bond_dims: dict[str, list[int]]
    output_error: dict[str, list[float]]
    tt_svd_output_error: dict[str, list[float | None]]
    objective: dict[str, list[float]]
    routed_tokens: list[int]
    fallback_experts: list[int] = field(default_factory=list)


@dataclass
class CompressionReport:
    """What :func:`compress` did: one :class:`LayerCompression` per experts module, the
    :class:`MoEConfig` the model now records (``max_bond`` the bond cap used) and the totals."""

    layers: list[LayerCompression]
    config: MoEConfig
    target_ratio: float | None
    calibration_tokens: int

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def ratio(self) -> float:
        """Experts' parameters kept: after / before."""
        return self.params_after / max(self.params_before, 1)

    @property
    def fallbacks(self) -> dict[str, list[int]]:
        return {r.name: r.fallback_experts for r in self.layers if r.fallback_experts}

    def __str__(self) -> str:
        structure = (f"shared base + rank-{self.config.max_bond} deltas" if self.config.expert_type == "base_delta"
                     else f"max_bond={self.config.max_bond}, share={self.config.share!r}")
        lines = [f"compressed {len(self.layers)} experts modules: {self.params_before:,} -> {self.params_after:,} "
                 f"expert parameters ({self.ratio:.3f}), {structure}, {self.calibration_tokens:,} calibration tokens",
                 f"{'layer':40s} {'params':>10s} {'ratio':>6s}  bonds (up)        mean / max output error by role"]
        for r in self.layers:
            errs = "  ".join(f"{role} {sum(v) / len(v):.4f}/{max(v):.4f}" for role, v in r.output_error.items())
            lines.append(f"{r.name[-40:]:40s} {r.params_after:10,d} {r.params_after / max(r.params_before, 1):6.3f}  "
                         f"{str(r.bond_dims['up']):16s}  {errs}")
        for name, experts in self.fallbacks.items():
            lines.append(f"fallback (no calibration token reached): {name} experts {experts}, fitted to the layer's "
                         "pooled covariance")
        return "\n".join(lines)


# -- targets ---------------------------------------------------------------------------------------
@dataclass
class _Target:
    name: str
    module: nn.Module  # what is replaced: the experts module, a RoutedExperts, or MoELayer.experts
    kind: str  # "hf" (a transformers experts module), "routed" (RoutedExperts), "layer" (MoELayer)
    config: MoEConfig  # the config the compressed module records (max_bond filled in later)
    holder: nn.Module | None = None  # the MoELayer whose experts are replaced (kind "layer")
    training: bool = False  # the replaced module's mode before compress (the replacement gets it)


def _spec_of_experts(ffn: ExpertFFN, top_k: int, routing: str) -> ExpertsSpec:
    """An :class:`ExpertsSpec` of tnmoe experts (MPO banks rebuilt to dense matrices)."""
    with torch.no_grad():
        mats = {role: bank.weights().detach() for role, bank in ffn.banks().items()}
    return ExpertsSpec(up=mats["up"], down=mats["down"], gate=mats.get("gate"), activation=ffn.activation,
                       glu=ffn.glu, top_k=top_k, routing=routing,
                       up_bias=None if ffn.up_bias is None else ffn.up_bias.detach(),
                       gate_bias=None if ffn.gate_bias is None else ffn.gate_bias.detach(),
                       down_bias=None if ffn.down_bias is None else ffn.down_bias.detach(),
                       inner_dropout=float(ffn.dropout.p))


def _shape_spec(model: nn.Module, target: _Target, device) -> ExpertsSpec:
    """``target``'s spec with meta tensors (shapes only); checks an HF target against ``config``."""
    if target.kind == "hf":
        with _materialized(target.module, device):
            spec = _read_spec(model, target)
            check_routed_config(target.config, spec, target.name, loading=True)
    else:
        ffn = target.module.experts if target.kind == "routed" else target.module
        mats = {role: torch.empty(b.num_experts, b.out_features, b.in_features, device="meta")
                for role, b in ffn.banks().items()}
        spec = ExpertsSpec(up=mats["up"], down=mats["down"], gate=mats.get("gate"), activation=ffn.activation,
                           top_k=1, up_bias=ffn.up_bias, gate_bias=ffn.gate_bias, down_bias=ffn.down_bias)
    meta = {k: torch.empty(getattr(spec, k).shape, device="meta") for k in
            ("up", "gate", "down", "up_bias", "gate_bias", "down_bias") if getattr(spec, k) is not None}
    return dataclasses.replace(spec, **meta)


def _read_spec(model: nn.Module, target: _Target) -> ExpertsSpec:
    if target.kind == "hf":
        return _extract(model, target.name, target.module)
    if target.kind == "routed":
        return _spec_of_experts(target.module.experts, target.module.top_k, target.module.routing)
    return _spec_of_experts(target.module, target.holder.router.top_k, "indices")


def _cache_weights(config: MoEConfig) -> bool:
    """What compressed experts record as ``cache_weights``: ``False`` (memory-bounded inference)
    for MPO banks, whose rebuilt-weight cache would hold the uncompressed experts; base-plus-delta
    banks never rebuild their experts' matrices (the field has no effect there)."""
    return config.expert_type != "mpo"


def _expert_fields(config: MoEConfig) -> dict:
    """The fields of ``config`` that shape the compressed experts (a converted model's recorded
    config keeps its other fields); per-matrix bond choices of an earlier conversion are dropped."""
    out = {"expert_type": config.expert_type, "share": config.share, "m": config.m, "factors": config.factors,
           "max_bond": config.max_bond, "init_noise": 0.0, "cache_weights": _cache_weights(config)}
    names = {f.name for f in dataclasses.fields(MoEConfig)}
    out.update({k: None for k in ("target_ratio", "bond_dims") if k in names})
    return out


def _find_targets(model: nn.Module, config: MoEConfig) -> list[_Target]:
    converted = _tnmoe_modules(model)
    if converted:
        if config.target_modules is not None:
            raise ValueError("this model is already converted: compress replaces the experts of every converted "
                             f"layer ({len(converted)}); leave target_modules=None")
        fixed = dict(config.router_options_set())
        fixed.update({k: (getattr(config, k), None) for k in ("num_experts", "top_k")
                      if getattr(config, k) is not None})
        if fixed:
            raise ValueError(f"this model is already converted: compress keeps its layers' routing, so "
                             f"{', '.join(f'{k}={v[0]!r}' for k, v in fixed.items())} does not apply; leave the router "
                             "fields, num_experts and top_k at their defaults")
        out = []
        for name, layer in converted:
            base = layer.moe_config or config
            cfg = dataclasses.replace(base, **_expert_fields(config))
            if isinstance(layer, RoutedExperts):
                out.append(_Target(name, layer, "routed", cfg))
            else:
                out.append(_Target(name + ".experts", layer.experts, "layer", cfg, holder=layer))
        return out
    try:
        found = find_target_modules(model, config.target_modules)
    except ValueError as err:
        raise ValueError(f"compress: {err}") from None
    routed = [(n, m) for n, m in found if get_adapter(m).routed_experts]
    if not routed:
        raise ValueError(f"{type(model).__name__} has no routed experts to compress (found dense FFNs "
                         f"{[n for n, _ in found][:3]}); compress takes MoE models (e.g. Mixtral) or models "
                         "converted by tnmoe.moe.convert. Upcycle a dense model with tnmoe.moe.convert first")
    if len(routed) != len(found):
        raise ValueError(f"target_modules selects dense FFNs {[n for n, m in found if (n, m) not in routed][:3]}; "
                         "compress replaces routed experts only")
    recorded = dataclasses.replace(config, cache_weights=_cache_weights(config))
    return [_Target(n, m, "hf", recorded) for n, m in routed]


# -- parameter counts -------------------------------------------------------------------------------
def _bias_params(spec: ExpertsSpec) -> int:
    return sum(b.numel() for b in (spec.up_bias, spec.gate_bias, spec.down_bias) if b is not None)


def _params_before(target: _Target, spec: ExpertsSpec) -> int:
    if target.kind == "hf":
        return sum(W.numel() for W in spec.matrices().values()) + _bias_params(spec)
    ffn = target.module.experts if target.kind == "routed" else target.module
    return sum(b.num_shared_params() + b.num_experts * b.num_params_per_expert() for b in ffn.banks().values()) \
        + _bias_params(spec)


def _meta_banks(spec: ExpertsSpec, config: MoEConfig) -> dict[str, nn.Module]:
    return {role: empty_bank(W.shape[0], W.shape[1], W.shape[2], config, dtype=torch.float32, device="meta")
            for role, W in spec.matrices().items()}


def _bond_limit(bank: nn.Module) -> int:
    """The bond (MPO) or delta rank (base + deltas) past which the bank is exact."""
    if isinstance(bank, MPOExpertBank):
        return max(bank.bond_dims)
    return min(bank.in_features, bank.out_features)


def _params_after(spec: ExpertsSpec, config: MoEConfig) -> int:
    banks = _meta_banks(spec, config)
    return sum(b.num_shared_params() + b.num_experts * b.num_params_per_expert() for b in banks.values()) \
        + _bias_params(spec)


def _solve_bond(specs: list[ExpertsSpec], configs: list[MoEConfig], budget: float) -> int:
    """The largest uniform bond cap whose total parameters stay within ``budget``."""
    def total(bond: int) -> int:
        return sum(_params_after(s, dataclasses.replace(c, max_bond=bond)) for s, c in zip(specs, configs))

    lossless = max(_bond_limit(b) for s, c in zip(specs, configs)
                   for b in _meta_banks(s, dataclasses.replace(c, max_bond=None)).values())
    if total(1) > budget:
        raise ValueError(f"target_ratio is below what bond 1 reaches ({total(1):,} parameters, budget "
                         f"{int(budget):,}); raise target_ratio (with share={configs[0].share!r} "
                         "and these factors, bond 1 is the smallest structure)")
    lo, hi = 1, lossless  # total is non-decreasing in the bond
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# -- calibration statistics ------------------------------------------------------------------------
class _ExpertStatistics:
    """Streams, per expert, ``sum_t w_te^2 x x^T`` of the block input (up / gate) and of the
    original expert's intermediate (down), float64, over the routed tokens; no activation kept."""

    def __init__(self, spec: ExpertsSpec, device: torch.device) -> None:
        self.spec, self.device = spec, device
        E, d, f = spec.num_experts, spec.d_model, spec.d_ff
        self.sum_in = torch.zeros(E, d, d, dtype=torch.float64, device=device)
        self.sum_mid = torch.zeros(E, f, f, dtype=torch.float64, device=device)
        self.mass = torch.zeros(E, dtype=torch.float64, device=device)
        self.routed = [0] * E
        self.tokens = 0  # N: tokens that reached the layer
        self.pooled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # fallback expert -> (in, mid) sums
        self.pooled_tokens = 0
        self.fallback: list[int] = []  # experts collected in the pooled pass

    def _intermediate(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """The original expert ``e``'s down-projection input on ``x`` ``(n, d_model)``, computed in
        float32 or wider (only that expert's tensors are cast)."""
        s = self.spec
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        x = x.to(dtype)

        def lin(W, b):
            y = x @ W[e].to(device=x.device, dtype=dtype).T
            return y if b is None else y + b[e].to(device=x.device, dtype=dtype)
        h = lin(s.up, s.up_bias)
        if s.gate is not None:
            g = lin(s.gate, s.gate_bias)
            return s.glu(g, h) if s.glu is not None else s.activation(g) * h
        return s.activation(h)

    @torch.no_grad()
    def add(self, x: torch.Tensor, expert: torch.Tensor, token: torch.Tensor, weight: torch.Tensor) -> None:
        """``x`` ``(T, d_model)`` (padding removed), the kept assignments ``(A,)`` each."""
        self.tokens += x.shape[0]
        if self.fallback:
            self._add_pooled(x)
            return
        for e in torch.unique(expert).tolist():
            pick = expert == e
            rows = token[pick]
            w = weight[pick].to(device=x.device, dtype=torch.float64).unsqueeze(1)
            xe = x.index_select(0, rows.to(x.device))
            a = xe.to(torch.float64) * w
            self.sum_in[e].addmm_(a.T.to(self.device), a.to(self.device))
            h = self._intermediate(xe, e).to(torch.float64) * w
            self.sum_mid[e].addmm_(h.T.to(self.device), h.to(self.device))
            self.mass[e] += float((w * w).sum())
            self.routed[e] += int(rows.numel())

    def _add_pooled(self, x: torch.Tensor) -> None:
        self.pooled_tokens += x.shape[0]
        x64 = x.to(torch.float64)
        for e in self.fallback:
            s_in, s_mid = self.pooled.setdefault(
                e, (torch.zeros_like(self.sum_in[e]), torch.zeros_like(self.sum_mid[e])))
            s_in.addmm_(x64.T.to(self.device), x64.to(self.device))
            h = self._intermediate(x, e).to(torch.float64)
            s_mid.addmm_(h.T.to(self.device), h.to(self.device))

    def unreached(self) -> list[int]:
        return [e for e, n in enumerate(self.routed) if n == 0]

    def start_pooled_pass(self) -> None:
        """The next passes collect, for the experts no token reached, every token's statistics."""
        self.fallback = self.unreached()
        self.tokens = 0

    def covariances(self) -> dict[str, list[InputCovariance]]:
        """Per role, one :class:`InputCovariance` per expert (``C_e`` of the module docstring)."""
        N = self.tokens
        if N == 0 or sum(self.routed) == 0:
            raise ValueError("no calibration token reached this layer's experts")
        mean_mass = float(self.mass.sum()) / self.spec.num_experts
        ins, mids = [], []
        for e in range(self.spec.num_experts):
            if self.routed[e]:
                ins.append(InputCovariance.from_matrix(self.sum_in[e] / N, count=self.routed[e]))
                mids.append(InputCovariance.from_matrix(self.sum_mid[e] / N, count=self.routed[e]))
            else:  # the layer's pooled second moment, weighted like the mean expert
                s_in, s_mid = self.pooled[e]
                scale = mean_mass / (self.pooled_tokens * N)
                ins.append(InputCovariance.from_matrix(s_in * scale, count=self.pooled_tokens))
                mids.append(InputCovariance.from_matrix(s_mid * scale, count=self.pooled_tokens))
        out = {"up": ins, "down": mids}
        if self.spec.gate is not None:
            out["gate"] = ins
        return out


def _padding_mask(mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    if mask is None or mask.dim() != 2 or mask.numel() != num_tokens:
        return None  # not this call's positions: keep every token
    flat = mask.reshape(-1).bool()
    return None if bool(flat.all()) else flat


class _Recorder:
    """Hooks one target so each call adds its routed tokens to an :class:`_ExpertStatistics`."""

    def __init__(self, target: _Target, stats: _ExpertStatistics, masks: list) -> None:
        self.target, self.stats, self.masks = target, stats, masks

    def experts_call(self, module, args, kwargs):  # forward pre-hook: (hidden_states, top_k_index, top_k_weights)
        names = ("hidden_states", "top_k_index", "top_k_weights")
        vals = list(args) + [kwargs[n] for n in names[len(args):]]
        x, index, weights = vals[:3]
        T = x.shape[0]
        if self.stats.spec.routing == "one_hot":
            token, slot, expert = index.nonzero(as_tuple=True)
        else:
            k = index.shape[1]
            expert = index.reshape(-1).long()
            token = torch.arange(T, device=expert.device).repeat_interleave(k)
            slot = torch.arange(k, device=expert.device).repeat(T)
            kept = expert < self.stats.spec.num_experts
            expert, token, slot = expert[kept], token[kept], slot[kept]
        w = weights.reshape(T, -1)[token, slot]
        self._add(x, expert, token, w)

    def router_call(self, router, args, output):  # MoELayer router forward hook (padding already removed)
        x = args[0]
        plan = plan_dispatch(output.expert_index, self.stats.spec.num_experts, router.capacity(x.shape[0]))
        expert = output.expert_index.reshape(-1)[plan.assignment]
        w = output.combine_weights.reshape(-1)[plan.assignment]
        self._add(x, expert, plan.token_index, w)

    def _add(self, x, expert, token, w) -> None:
        keep = _padding_mask(self.masks[0], x.shape[0])
        if keep is not None:  # drop padding tokens, renumber the rest
            keep = keep.to(x.device)
            new_index = torch.cumsum(keep.long(), 0) - 1
            ok = keep[token.to(x.device)]
            expert, token, w = expert[ok.to(expert.device)], new_index[token.to(x.device)[ok]], w[ok.to(w.device)]
            x = x[keep]
        self.stats.add(x.detach(), expert, token, w.detach())

    def attach(self) -> list:
        if self.target.kind == "layer":
            return [self.target.holder.router.register_forward_hook(self.router_call)]
        return [self.target.module.register_forward_pre_hook(self.experts_call, with_kwargs=True)]


# -- the fit --------------------------------------------------------------------------------------
def _fit(target: _Target, spec: ExpertsSpec, stats: _ExpertStatistics, fit_options: dict,
         device: torch.device, params_before: int) -> tuple[nn.Module, LayerCompression]:
    """The replacement of ``target`` (on ``device``, in the experts' dtype) and its report."""
    config = target.config
    covs = stats.covariances()
    dtype = spec.up.dtype
    banks, report = {}, {"bonds": {}, "err": {}, "tt": {}, "obj": {}}
    for role, W in spec.matrices().items():
        bank = empty_bank(W.shape[0], W.shape[1], W.shape[2], config, dtype=dtype, device=device)
        with torch.no_grad():
            fit = bank.fit_matrices(W.detach().to(device), covs[role], **fit_options)
        banks[role] = bank
        report["bonds"][role] = list(fit.bond_dims)
        report["err"][role] = [m.output_error for m in fit.matrices]
        report["tt"][role] = [m.tt_svd_output_error for m in fit.matrices]
        report["obj"][role] = list(fit.objective)
    ffn = ExpertFFN(up=banks["up"], down=banks["down"], gate=banks.get("gate"), activation=spec.activation,
                    glu=spec.glu, up_bias=spec.up_bias is not None, gate_bias=spec.gate_bias is not None,
                    down_bias=spec.down_bias is not None, dropout=spec.inner_dropout)
    with torch.no_grad():
        for mine, theirs in ((ffn.up_bias, spec.up_bias), (ffn.gate_bias, spec.gate_bias),
                             (ffn.down_bias, spec.down_bias)):
            if theirs is not None:
                mine.copy_(theirs.detach())
    if target.kind == "layer":
        new: nn.Module = ffn
    else:
        new = RoutedExperts(ffn, top_k=spec.top_k, routing=spec.routing)
        new.moe_config = config
        new.converted_from = target.module.converted_from if target.kind == "routed" else target.name
    new.eval()  # the replacement runs in eval mode during compress; it takes target.training at the end
    params_after = _params_after(spec, config)
    return new, LayerCompression(target.name, params_before, params_after, report["bonds"], report["err"],
                                 report["tt"], report["obj"], list(stats.routed), list(stats.fallback))


# -- placement ------------------------------------------------------------------------------------
def _offloaded(module: nn.Module) -> bool:
    """Whether accelerate's offloading hooks manage ``module``'s parameters (they live off-device
    and are materialised per forward)."""
    if not any(hasattr(m, "_hf_hook") for m in module.modules()):
        return False
    from accelerate.utils import has_offloaded_params

    return any(has_offloaded_params(m) for m in module.modules())


@contextlib.contextmanager
def _materialized(module: nn.Module, device):
    """Inside: ``module``'s offloaded parameters are on ``device`` (accelerate), else as they are."""
    if not _offloaded(module):
        yield
        return
    from accelerate.utils import align_module_device, has_offloaded_params

    with contextlib.ExitStack() as stack:
        for m in module.modules():
            if has_offloaded_params(m):
                stack.enter_context(align_module_device(m, device))
        yield


def _device_of(module: nn.Module) -> torch.device | None:
    devices = {p.device for p in module.parameters()} | {b.device for b in module.buffers()}
    devices.discard(torch.device("meta"))
    if len(devices) > 1:
        raise ValueError(f"{type(module).__name__} has parameters on several devices {sorted(map(str, devices))}; "
                         "compress moves one decoder layer at a time: put each layer on one device")
    return next(iter(devices), None)


@contextlib.contextmanager
def _on_device(module: nn.Module, device):
    """Inside: ``module`` on ``device`` (moved back afterwards); offloaded modules are left to
    accelerate's hooks."""
    home = _device_of(module)
    if device is None or home is None or home == device or _offloaded(module):
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


@contextlib.contextmanager
def _outside_on_device(model: nn.Module, layers: nn.ModuleList, device):
    """Inside: every parameter / buffer of ``model`` outside ``layers`` on ``device`` (the
    embeddings, rotary tables, ... that compute the first layer's inputs)."""
    inside = {id(t) for t in list(layers.parameters()) + list(layers.buffers())}
    moved = []
    if device is not None:
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for key, t in store.items():
                    if t is None or id(t) in inside or t.is_meta or t.device == device:
                        continue
                    moved.append((t, t.device) if isinstance(t, nn.Parameter) else (module, store, key, t))
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.to(device)
                    else:
                        store[key] = t.to(device)
    try:
        yield
    finally:
        for entry in moved:
            if len(entry) == 2:
                entry[0].data = entry[0].data.to(entry[1])
            else:
                module, store, key, t = entry
                store[key] = t


# -- driving the model ----------------------------------------------------------------------------
class _Captured(Exception):
    pass


def _to(obj, device):
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _call(model: nn.Module, batch, device, masks: list) -> Any:
    batch = _to(batch, device)
    if isinstance(batch, Mapping):
        masks[0] = batch.get("attention_mask")
        kwargs = dict(batch)
        if "use_cache" not in kwargs and _accepts(model, "use_cache"):
            kwargs["use_cache"] = False
        return model(**kwargs)
    masks[0] = None
    if isinstance(batch, torch.Tensor):
        return model(batch, use_cache=False) if _accepts(model, "use_cache") else model(batch)
    raise TypeError(f"calibration batches must be dicts of model inputs or tensors, got {type(batch).__name__}")


def _decoder_layers(model: nn.Module, targets: list[_Target]) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder layers holding every target (``model.model.layers``, ...)."""
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not name:
            continue
        if all(t.name.startswith(name + ".") and t.name[len(name) + 1:].split(".")[0].isdigit() for t in targets):
            if best is None or len(name) > len(best[0]):
                best = (name, module)
    if best is None:
        raise ValueError("compress(sequential=True) runs one decoder layer at a time, but the experts "
                         f"{[t.name for t in targets][:3]} are not all inside one nn.ModuleList of layers; pass "
                         "sequential=False (the whole model runs at once)")
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None) or []
    if len(set(layer_types)) > 1:
        raise ValueError(f"{type(model).__name__}'s layers use different attention kinds {sorted(set(layer_types))}, "
                         "so one layer's captured inputs (its attention mask) do not serve the others; pass "
                         "sequential=False")
    return best


def _layer_index(target: _Target, list_name: str) -> int:
    return int(target.name[len(list_name) + 1:].split(".")[0])


def _install(model: nn.Module, target: _Target, new: nn.Module, undo: list) -> None:
    if target.kind == "layer":
        undo.append((target.holder, "experts", target.module, target.holder.moe_config, new, target.training))
        target.holder.experts = new
        target.holder.moe_config = target.config
        return
    parent_name, _, child = target.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    undo.append((parent, child, target.module, None, new, target.training))
    if target.kind == "hf":
        get_adapter(target.module).install(parent, child, target.module, new)
    else:
        setattr(parent, child, new)


def _rollback(undo: list) -> None:
    for parent, child, old, config, _, _ in reversed(undo):
        setattr(parent, child, old)
        if isinstance(parent, MoELayer):
            parent.moe_config = config


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


# -- the entry point ------------------------------------------------------------------------------
def compress(model: nn.Module, config: MoEConfig, *, calibration: Iterable, target_ratio: float | None = None,
             fit_options: dict | None = None, execution_device: torch.device | str | None = None,
             progress: bool = True, sequential: bool = True) -> CompressionReport:
    """Replace the model's routed experts by MPO experts fitted to calibration data, in place.

    Args:
        model: a transformers MoE model (its routed experts modules are replaced by
            :class:`~tnmoe.moe.routed.RoutedExperts`; router, shared experts and auxiliary loss
            kept) or a model converted by :func:`tnmoe.moe.convert` (every converted layer's
            experts are replaced; an ``MoELayer`` keeps its router).
        config: ``expert_type="mpo"``; ``m`` / ``factors`` (see :func:`low_rank_factors` for the
            rank-r form), ``share`` (cores shared by all experts of a layer: any subset) and
            ``max_bond`` (or ``target_ratio``). Or ``expert_type="base_delta"``: one base matrix
            per layer and role shared by every expert plus a rank-``max_bond`` delta per expert
            (:class:`~tnmoe.moe.BaseDeltaExpertBank`, D²-MoE's structure), fitted to the same
            objective (:func:`~tnmoe.networks.fit_base_delta`). Router fields stay at their defaults (the routing is
            the model's).
        calibration: an iterable of batches (dicts of model inputs, or input tensors), run once in
            eval mode without gradients; padding (``attention_mask == 0``) is left out.
        target_ratio: instead of ``max_bond``: the fraction of the experts' parameters to keep
            (shared cores counted once per layer); the largest uniform bond cap within it is used.
        fit_options: passed to :func:`~tnmoe.networks.fit.fit_mpo_bank` (``sweeps``, ``tol``, ...).
        execution_device: where each layer runs and is fitted (default: where it is); the rest
            of the model stays where it is (or offloaded by accelerate).
        sequential: one decoder layer at a time (default; layer ``l``'s statistics come from the
            already compressed layers before it, GPTQ-style); ``False`` calibrates every layer in
            one pass through the original model.

    The objective is the module docstring's (routing-weighted output error per matrix). An expert
    no calibration token reached is fitted to the layer's pooled statistics (reported). All or
    nothing: on an error every replaced module is put back and the model is unchanged.
    Returns a :class:`CompressionReport`.
    """
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a tnmoe.moe.MoEConfig, got {type(config).__name__}")
    if config.expert_type not in ("mpo", "base_delta"):
        raise ValueError(f"compress fits MPO experts (expert_type='mpo') or a shared base plus low-rank deltas "
                         f"(expert_type='base_delta'), got {config.expert_type!r}")
    if getattr(config, "bond_dims", None):
        raise ValueError("compress uses one bond cap for every matrix (max_bond, or the one target_ratio= solves "
                         "for); MoEConfig.bond_dims is not supported here")
    if getattr(config, "target_ratio", None) is not None:  # the config's target_ratio is compress's
        if target_ratio is not None and float(target_ratio) != float(config.target_ratio):
            raise ValueError(f"target_ratio={target_ratio} contradicts config.target_ratio={config.target_ratio}")
        target_ratio = config.target_ratio
        config = dataclasses.replace(config, target_ratio=None)
    if target_ratio is not None:
        if isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float)) \
                or not 0.0 < float(target_ratio) <= 1.0:
            raise ValueError(f"target_ratio must be a number in (0, 1] (the fraction of the experts' parameters "
                             f"to keep), got {target_ratio!r}")
        if config.max_bond is not None:
            raise ValueError(f"give max_bond (={config.max_bond}) or target_ratio, not both")
    if calibration is None:
        raise ValueError("compress needs calibration=: an iterable of batches (dicts of model inputs or tensors)")
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration= holds no batches")
    fit_options = dict(fit_options or {})
    device = torch.device(execution_device) if execution_device is not None else None

    targets = _find_targets(model, config)
    # parameter budget: every target's shapes (meta tensors: no weights copied or rebuilt)
    shapes = [_shape_spec(model, t, device) for t in targets]
    befores = [_params_before(t, s) for t, s in zip(targets, shapes)]
    if target_ratio is not None:
        bond = _solve_bond(shapes, [t.config for t in targets], float(target_ratio) * sum(befores))
        for t in targets:
            t.config = dataclasses.replace(t.config, max_bond=bond)
    for t, s in zip(targets, shapes):
        if t.config.expert_type == "mpo":
            resolve_share(t.config.share, len(_meta_banks(s, t.config)["up"].cores))  # out-of-range share index
        t.config.validate()
    dims = {d for s in shapes for d in (s.d_model, s.d_ff)}
    unused = sorted(set(config.factors) - dims)
    if unused:  # a checkpoint of this config would not load (convert refuses it): refuse it now
        raise ValueError(f"MoEConfig.factors has entries for dimensions {unused}, which no experts matrix has; the "
                         f"experts' dimensions are {sorted(dims)}")

    modes = [(m, m.training) for m in model.modules()]
    for t in targets:
        t.training = t.module.training
    model.eval()
    undo: list = []
    reports: list[LayerCompression] = []
    try:
        with torch.no_grad():
            if sequential:
                tokens = _compress_sequential(model, targets, batches, befores, fit_options, device, progress,
                                              undo, reports)
            else:
                tokens = _compress_at_once(model, targets, batches, befores, fit_options, device, progress,
                                           undo, reports)
    except BaseException as err:
        _rollback(undo)
        _restore_modes(modes)
        if isinstance(err, ValueError):
            raise ValueError(f"compress: {err} (model left unchanged)") from err
        raise
    _restore_modes(modes)
    for _, _, _, _, new, training in undo:
        new.train(training)
    final = targets[0].config
    if targets[0].kind == "hf":
        mark_hf_config(model, final, [t.name for t in targets])
    else:
        from .convert import converted_modules
        mark_hf_config(model, final, converted_modules(model))
    return CompressionReport(reports, final, None if target_ratio is None else float(target_ratio), tokens)


def _restore_modes(modes: list) -> None:
    for module, training in modes:
        module.training = training


def _collect(pairs: list[tuple[_Target, _ExpertStatistics]], masks: list, run) -> None:
    """Run ``run()`` once with every target hooked; then, if some expert of a target got no
    token, once more collecting the pooled statistics of those experts."""
    for _pass in range(2):
        hooks = [h for target, stats in pairs for h in _Recorder(target, stats, masks).attach()]
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
        pairs = [(t, s) for t, s in pairs if _pass == 0 and s.unreached() and sum(s.routed) > 0]
        if not pairs:
            return
        for _, stats in pairs:
            stats.start_pooled_pass()


def _prepare(model, target: _Target, device) -> tuple[ExpertsSpec, _ExpertStatistics]:
    """``target``'s spec (its weights copied when offloaded) and empty statistics on the device."""
    home = device or _device_of(target.module) or torch.device("cpu")
    with _materialized(target.module, device):
        spec = _read_spec(model, target)
        if _offloaded(target.module):  # the materialised weights go back off-device on exit
            spec = dataclasses.replace(spec, **{k: getattr(spec, k).clone() for k in
                                                ("up", "gate", "down", "up_bias", "gate_bias", "down_bias")
                                                if getattr(spec, k) is not None})
    return spec, _ExpertStatistics(spec, home)


def _fit_prepared(target: _Target, spec: ExpertsSpec, stats: _ExpertStatistics, before: int, fit_options):
    try:
        return _fit(target, spec, stats, fit_options, stats.device, before)
    except ValueError as err:
        raise ValueError(f"{target.name}: {err}") from None


def _fit_targets(model, chosen: list[int], targets, befores, fit_options, device, masks, run) -> list:
    """Calibrate the targets ``chosen`` together (one pass of ``run``, plus one for fallbacks) and
    fit each: ``[(index, replacement, report)]``."""
    if not chosen:  # a decoder layer without routed experts (e.g. DeepSeek-V3's dense first layers)
        return []
    prepared = {j: _prepare(model, targets[j], device) for j in chosen}
    _collect([(targets[j], prepared[j][1]) for j in chosen], masks, run)
    return [(j, *_fit_prepared(targets[j], *prepared[j], befores[j], fit_options)) for j in chosen]


def _offload_like(new: nn.Module, old: nn.Module, device) -> nn.Module:
    """Offload ``new`` as ``old`` was (accelerate: parameters kept on the CPU, materialised on the
    execution device for each call), so compressed layers do not pile up on the device. (Its
    MPO banks keep no rebuilt-weight cache: every compressed config has ``cache_weights=False``.)"""
    if not _offloaded(old):
        return new
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    hook = next(m._hf_hook for m in old.modules() if hasattr(m, "_hf_hook"))
    return add_hook_to_module(new, AlignDevicesHook(execution_device=device or hook.execution_device, offload=True,
                                                    io_same_device=False, place_submodules=True))


def _compress_sequential(model, targets, batches, befores, fit_options, device, progress, undo, reports) -> int:
    list_name, layers = _decoder_layers(model, targets)
    contextual = [t.name for t in targets
                  if t.kind == "layer" and (t.config.router == "hash" or t.config.ignore_padding)]
    if contextual:  # their routing reads the model call's input_ids / attention_mask, absent when a layer runs alone
        raise ValueError(f"{contextual[0]}'s layer routes by the model call's input_ids or attention_mask "
                         "(router='hash' / ignore_padding=True), which a decoder layer run on its own does not see; "
                         "pass sequential=False")
    masks: list = [None]
    captured = []

    def stop(module, args, kwargs):
        captured.append((args, kwargs, masks[0]))
        raise _Captured

    hook = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with _outside_on_device(model, layers, device):
            for batch in batches:
                n = len(captured)
                try:
                    _call(model, batch, device, masks)
                except _Captured:
                    pass
                if len(captured) != n + 1:
                    raise ValueError(f"a calibration batch ran through {type(model).__name__} without reaching its "
                                     f"first decoder layer ({list_name}.0)")
    finally:
        hook.remove()
    tokens = sum(int(m.sum()) if (m is not None and m.dim() == 2) else int(_hidden(a, k).shape[:-1].numel())
                 for a, k, m in captured)
    by_layer: dict[int, list[int]] = {}
    for j, t in enumerate(targets):
        by_layer.setdefault(_layer_index(t, list_name), []).append(j)
    last = max(by_layer)
    for i in tqdm(range(last + 1), desc="compressing experts", disable=not progress):
        layer = layers[i]
        with _on_device(layer, device):
            def run():
                for args, kwargs, mask in captured:
                    masks[0] = mask
                    layer(*args, **kwargs)
            for j, new, rep in _fit_targets(model, by_layer.get(i, []), targets, befores, fit_options, device,
                                            masks, run):
                _install(model, targets[j], _offload_like(new, targets[j].module, device), undo)
                reports.append(rep)
            if i < last:  # the (compressed) layer's outputs are the next layer's inputs
                nxt = []
                for args, kwargs, mask in captured:
                    out = layer(*args, **kwargs)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    nxt.append((*_with_hidden(args, kwargs, out), mask))
                captured = nxt
    return tokens


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _compress_at_once(model, targets, batches, befores, fit_options, device, progress, undo, reports) -> int:
    """Every target calibrated in one pass through the original model (its statistics all held
    at once), then fitted and installed."""
    masks: list = [None]

    def run():
        for batch in tqdm(batches, desc="calibrating experts", disable=not progress):
            _call(model, batch, device, masks)
    with _on_device(model, device):
        built = _fit_targets(model, list(range(len(targets))), targets, befores, fit_options, device, masks, run)
        for j, new, rep in built:
            _install(model, targets[j], _offload_like(new, targets[j].module, device), undo)
            reports.append(rep)
    total = 0
    for batch in batches:
        b = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
        total += int(b.sum()) if b is not None else int(ids.numel()) if isinstance(ids, torch.Tensor) else 0
    return total
