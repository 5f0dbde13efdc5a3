"""Upcycling: replace a pretrained model's FFNs by MoE layers initialized from them."""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..networks import MPO, allocate_bonds
from ..networks.decompose import check_finite
from ..networks.fit import CORRECTION_RIDGE, check_ridge
from .adapters import FFNSpec, get_adapter, registered_adapters
from ..moe.config import MoEConfig
from .calibration import FFN_STAGES, collect_ffn_covariances, collect_referenced_covariances, substitute_matrices
from .hf_config import mark_hf_config
from ..moe.banks import DenseExpertBank, MPOExpertBank
from ..moe.experts import ExpertFFN
from ..moe.context import RoutingContext
from ..moe.layer import MoELayer, moe_layers
from ..moe.routers import HashRouter, SwitchRouter, TopKRouter
from ..moe.routed import RoutedExperts
from .routed import (
    build_routed_experts,
    check_routed_config,
    empty_bank,
    empty_mpo_bank,
    matrix_factors,
    verify_dense_extraction,
    verify_experts_extraction,
)

__all__ = ["build_moe_layer", "convert", "find_target_modules", "get_moe_config", "converted_modules",
           "ParameterCount", "count_parameters", "print_trainable_parameters", "conversion_errors", "fit_reports", "ffn_dimensions"]


def _make_router(config: MoEConfig, d_model: int, seed: int) -> nn.Module:
    num_experts, top_k = config.upcycling_shape()
    if config.router == "switch":
        return SwitchRouter(d_model=d_model, num_experts=num_experts,
                            capacity_factor=config.capacity_factor, drop_tokens=config.drop_tokens,
                            eval_capacity_factor=config.eval_capacity_factor, jitter_noise=config.jitter_noise, bias=config.router_bias,
                            gate_scaling=config.gate_scaling)
    if config.router == "topk":
        return TopKRouter(d_model=d_model, num_experts=num_experts, top_k=top_k,
                          noisy_gating=config.noisy_gating, bias=config.router_bias,
                          capacity_factor=config.capacity_factor, drop_tokens=config.drop_tokens,
                          eval_capacity_factor=config.eval_capacity_factor, gate_scaling=config.gate_scaling)
    return HashRouter(num_experts=num_experts, vocab_size=config.vocab_size, seed=seed,
                      capacity_factor=config.capacity_factor, drop_tokens=config.drop_tokens,
                      eval_capacity_factor=config.eval_capacity_factor)


def build_moe_layer(spec: FFNSpec, config: MoEConfig, *, init: str = "pretrained",
                    generator: torch.Generator | None = None, seed: int | None = None,
                    calibration: dict | None = None, fit_options: dict | None = None,
                    name: str | None = None) -> MoELayer:
    """An :class:`MoELayer` shaped after ``spec``; with ``init="pretrained"`` every expert starts
    as the MPO decomposition (or copy) of the pretrained matrices, ``"empty"`` leaves the
    weights uninitialized (to be loaded from a checkpoint). Meta tensors give a meta layer.
    ``calibration``: ``{"up"/"down"/"gate": InputCovariance}`` of the FFN's matrices: truncated
    MPO experts are then fitted to the matrices' outputs (``tnmoe.networks.fit``) instead of
    TT-SVD; ``fit_options`` go to that fit. ``name``: the FFN's module name, under which
    ``config.bond_dims`` gives its matrices' bonds (``"<name>.up"``, ...)."""
    if init not in ("pretrained", "empty"):
        raise ValueError(f"init must be 'pretrained' or 'empty', got {init!r}")
    E = config.upcycling_shape()[0]
    d_model = spec.d_model
    dtype, device = spec.up.dtype, spec.up.device
    if spec.down.dtype != dtype:  # e.g. T5 loaded in float16 keeps `wo` in float32 against overflow
        warnings.warn(f"the FFN's output matrix is {spec.down.dtype} and its input matrix {dtype}; the experts "
                      f"are built in {dtype}, losing the model's higher-precision output projection (convert a "
                      "float32 or bfloat16 model, then cast it, to keep every expert matrix alike)")
    meta = spec.up.is_meta
    load = init == "pretrained" and not meta

    def bank(W: torch.Tensor, role: str):
        out_dim, in_dim = W.shape
        if config.expert_type == "dense":
            if load:
                check_finite(W, "the pretrained FFN matrix")
            b = DenseExpertBank(num_experts=E, in_features=in_dim, out_features=out_dim, dtype=dtype, device=device)
            if load:
                b.load_matrix(W.detach(), config.init_noise, generator)
            return b
        if config.expert_type == "base_delta":
            # upcycling: every expert = the pretrained matrix (base), deltas at zero (LoRA-style)
            b = empty_bank(E, out_dim, in_dim, config, dtype=dtype, device=device,
                           init="zeros" if load else "empty", generator=generator)
            if load:
                check_finite(W, "the pretrained FFN matrix")
                b.load_matrix(W.detach())
            return b
        bonds = config.bonds_for(f"{name}.{role}") if name is not None else None
        b = empty_mpo_bank(E, out_dim, in_dim, config, dtype=dtype, device=device, bond_dims=bonds)
        in_f, out_f = b.in_factors, b.out_factors
        if load:
            w = W.detach()
            w = w if w.dtype in (torch.float32, torch.float64) else w.float()
            truncating = config.max_bond is not None or bonds is not None
            cov = calibration.get(role) if calibration and truncating else None
            mpo = MPO.from_matrix(w, in_f, out_f, max_bond=None if bonds is not None else config.max_bond,
                                  bond_dims=bonds, calibration=cov, fit_options=fit_options)
            b.fit_report = getattr(mpo, "fit_report", None)  # data-aware fit's FitReport (None: TT-SVD)
            b.load_mpo(mpo, config.init_noise, generator)
            w64 = w.double()
            b.conversion_error = float((mpo.to_matrix().double() - w64).norm() / w64.norm().clamp_min(1e-300))
        return b

    experts = ExpertFFN(
        up=bank(spec.up, "up"), down=bank(spec.down, "down"),
        gate=bank(spec.gate, "gate") if spec.gate is not None else None,
        activation=spec.activation, up_bias=spec.up_bias is not None,
        down_bias=spec.down_bias is not None, dropout=spec.inner_dropout,
    )
    if load:
        with torch.no_grad():
            if spec.up_bias is not None:
                experts.up_bias.copy_(spec.up_bias.expand_as(experts.up_bias))
            if spec.down_bias is not None:
                experts.down_bias.copy_(spec.down_bias.expand_as(experts.down_bias))
    router = _make_router(config, d_model, config.seed if seed is None else seed)
    if isinstance(router, TopKRouter) and load:
        router.reset_parameters(generator)  # seeded: conversions are reproducible
    router.to(device=device)
    return MoELayer(router=router, experts=experts, load_balancing_coef=config.load_balancing_coef,
                    z_loss_coef=config.z_loss_coef, output_dropout=spec.output_dropout)


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_modules(model: nn.Module, target_modules=None) -> list[tuple[str, nn.Module]]:
    """FFN modules to convert: ``(name, module)``, outermost matches only.

    With ``target_modules=None`` a model with routed experts (an MoE model) gives its experts
    modules only; its dense MLPs (shared experts, dense first layers) only when named.

    Raises ``ValueError`` when ``target_modules`` matches nothing, matches a module for
    which no adapter is registered, or matches a module registered under several names.
    """
    out, taken = [], []
    candidates = [n for n, m in model.named_modules() if get_adapter(m) is not None]
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        adapter = get_adapter(module)
        if target_modules is None:
            if adapter is not None:
                out.append((name, module))
                taken.append(name)
            continue
        if name and _matches(name, target_modules):
            if adapter is None:
                raise ValueError(
                    f"module {name!r} ({type(module).__name__}) matches target_modules but has no FFN "
                    f"adapter; adapters exist for {registered_adapters()} — target one of those "
                    f"(e.g. {candidates[:3]}) or add one with tnmoe.moe.register_adapter"
                )
            out.append((name, module))
            taken.append(name)
    if target_modules is None and any(get_adapter(m).routed_experts for _, m in out):
        out = [(n, m) for n, m in out if get_adapter(m).routed_experts]
    if out:
        aliases: dict[int, list[str]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            aliases.setdefault(id(module), []).append(name)
        shared = [(name, aliases[id(module)]) for name, module in out if len(aliases[id(module)]) > 1]
        if shared:
            name, names = shared[0]
            raise ValueError(
                f"FFN module {name!r} is one module registered under {len(names)} names {names} (weight sharing "
                "across positions): converting it would leave a dense FFN at the other names or one MoE layer "
                "called several times per forward (which keeps only its last call's auxiliary loss). Give each "
                "position its own FFN (e.g. copy.deepcopy) before converting"
            )
    if not out:
        if target_modules is None:
            raise ValueError(
                f"no FFN with a registered adapter found in {type(model).__name__}; adapters exist for "
                f"{registered_adapters()}; add one with tnmoe.moe.register_adapter"
            )
        raise ValueError(
            f"target_modules={target_modules!r} matched no module of {type(model).__name__}; "
            f"convertible FFN modules are e.g. {candidates[:4]} (of {len(candidates)})"
        )
    return out


def convert(model: nn.Module, config: MoEConfig, *, init: str = "pretrained",
            progress: bool = True, calibration=None, fit_options: dict | None = None,
            sequential: bool = False, sequential_ridge: float = CORRECTION_RIDGE) -> nn.Module:
    """Replace the model's FFNs (``config.target_modules``) by MoE layers, in place.

    Each expert starts from the pretrained FFN (MPO-decomposed for ``expert_type="mpo"``);
    with lossless bonds, ``gate_scaling="preserve"`` and no init noise, the converted model
    computes the same outputs as before. All-or-nothing: every target is validated and every
    replacement built before any is installed, so on an error the model is unchanged. Each MoE
    layer takes the training/eval mode of the FFN it replaces and records the config and the
    FFN's name (:func:`get_moe_config`, :func:`converted_modules`); a transformers model's
    config records them too, so ``model.save_pretrained`` checkpoints reload with
    :func:`tnmoe.moe.from_pretrained`. Returns the model.

    ``calibration``: an iterable of batches (dicts of model inputs, or input tensors). When
    ``max_bond`` truncates MPO experts, the batches run through the model first (hooks stream
    each FFN matrix's input second moment, padding left out, no activations kept) and the
    experts are fitted to the matrices' outputs instead of TT-SVD
    (:func:`tnmoe.networks.fit.fit_mpo_bank`, options in ``fit_options``); each bank's
    ``fit_report`` records the errors. Ignored, with a warning, where nothing is truncated.

    ``sequential=True`` (with ``calibration``): the FFNs are fitted in order, each to the outputs
    the *original* model's FFN computes, from the inputs it gets once the FFNs before it are
    replaced by their fits (:class:`tnmoe.networks.ReferencedCovariance`), so later layers correct
    the errors of earlier ones; within an FFN, the output projection is fitted from the inputs its
    fitted up/gate matrices give (:data:`tnmoe.models.calibration.FFN_STAGES`, so those are
    fitted twice: once to calibrate it, once in the layer built). Each FFN costs four passes over
    the batches (kept in memory as a list), the model is not modified until every FFN is built,
    and each earlier fit is held as a dense matrix (the experts' mean) while later ones are
    calibrated. ``sequential_ridge``: the ridge of that correction, relative to the mean input
    variance (:class:`tnmoe.networks.ReferencedCovariance`; near 0 it lets the fitted weights grow
    large in directions the inputs hardly use).

    ``config.target_ratio`` (instead of ``max_bond``): every FFN matrix's bonds are chosen across
    all converted matrices so one MPO per matrix keeps that fraction of their dense parameters
    (:func:`tnmoe.networks.allocate_bonds`, whitened by the calibration inputs when given); the
    choice is recorded as ``bond_dims`` in the config the model records, so checkpoints rebuild it.
    """
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a tnmoe.moe.MoEConfig, got {type(config).__name__}")
    config.validate()
    sequential_ridge = check_ridge(sequential_ridge)
    existing = _tnmoe_modules(model)
    if existing:
        raise ValueError(
            f"this model is already converted ({len(existing)} MoE layers); convert the "
            "original model, or load a converted checkpoint with tnmoe.moe.from_pretrained"
        )
    targets = find_target_modules(model, config.target_modules)
    context_inputs = _context_inputs(config)
    if context_inputs:  # fail before anything is installed
        modules = dict(model.named_modules())
        for name, _ in targets:
            _context_owner(modules, name, context_inputs)
    fitting = _calibration_used(targets, config, init, calibration)
    if sequential and not fitting and calibration is not None:
        sequential = False  # nothing is fitted (the warning said so)
    if sequential and calibration is None:
        raise ValueError("sequential=True fits each FFN to the original model's outputs: pass calibration= batches")
    if sequential:
        calibration = list(calibration)  # every FFN runs through them twice
    covariances = _calibrate(model, targets, calibration, progress) \
        if fitting and (not sequential or config.target_ratio is not None) else {}
    config = _resolve_budget(model, targets, config, init, covariances)
    gen = torch.Generator().manual_seed(config.seed)
    built = []
    substitutes: dict[str, torch.Tensor] = {}  # sequential: the earlier FFNs' fitted matrices
    for i, (name, module) in enumerate(tqdm(targets, desc="converting FFNs to MoE", disable=not progress)):
        adapter = get_adapter(module)
        try:
            if adapter.routed_experts:
                espec = _extract(model, name, module)
                check_routed_config(config, espec, name, loading=init == "empty" or espec.up.is_meta)
                if init == "pretrained":
                    verify_experts_extraction(name, module, espec)
                layer = build_routed_experts(espec, config, init=init)
            else:
                spec = adapter.extract(module)
                if adapter.verify_by_probe and init == "pretrained":
                    verify_dense_extraction(name, module, spec)
                stats = covariances.get(name)
                if sequential:  # the input-side matrices first, then down from their fits' outputs
                    stats = collect_referenced_covariances(model, name, module, calibration, substitutes,
                                                           roles=FFN_STAGES[0], progress=False,
                                                           ridge=sequential_ridge)
                    state = gen.get_state()
                    first = build_moe_layer(spec, config, init=init, generator=gen, seed=config.seed + i,
                                            calibration=stats, fit_options=fit_options, name=name)
                    inner = {r: w for r, w in _mean_expert_matrices(first).items() if r in FFN_STAGES[0]}
                    stats.update(collect_referenced_covariances(
                        model, name, module, calibration,
                        {**substitutes, **substitute_matrices(model, module, inner, existing=substitutes)},
                        roles=FFN_STAGES[1], progress=False, ridge=sequential_ridge))
                    gen.set_state(state)  # the final build draws what a one-pass build draws
                layer = build_moe_layer(spec, config, init=init, generator=gen, seed=config.seed + i,
                                        calibration=stats, fit_options=fit_options, name=name)
                if sequential:
                    substitutes.update(substitute_matrices(model, module, _mean_expert_matrices(layer),
                                                           existing=substitutes))
        except ValueError as err:
            raise ValueError(f"cannot convert {name!r} (model left unchanged): {err}") from None
        layer.train(module.training)
        layer.moe_config = config
        layer.converted_from = name
        built.append((name, module, adapter, layer))
    if config.factors:  # a factorization for a dimension no converted FFN has is a typo, not a no-op
        dims = sorted({d for *_, layer in built for bank in layer.modules() if isinstance(bank, MPOExpertBank)
                       for d in (bank.in_features, bank.out_features)})
        unused = sorted(set(config.factors) - set(dims))
        if unused:
            raise ValueError(f"MoEConfig.factors has entries for dimensions {unused}, which no converted FFN matrix "
                             f"has (model left unchanged); the FFN matrices' dimensions are {dims}")
    for name, module, adapter, layer in built:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapter.install(parent, child, module, layer)
    names = [name for name, *_ in built]
    mark_hf_config(model, config, names)
    if context_inputs:
        _wire_routing_context(model, config)
    return model


def _truncates(config: MoEConfig) -> bool:
    return config.max_bond is not None or config.target_ratio is not None or bool(config.bond_dims)


def _resolve_budget(model: nn.Module, targets, config: MoEConfig, init: str, covariances: dict) -> MoEConfig:
    """``config`` with ``bond_dims`` chosen for ``target_ratio`` (unchanged without one, or when
    ``bond_dims`` already records the choice, as in a checkpoint's config)."""
    if config.target_ratio is not None and config.expert_type == "base_delta":
        raise ValueError("target_ratio= with expert_type='base_delta' chooses the deltas' rank from trained experts: "
                         "use tnmoe.moe.compress(model, config, calibration=..., target_ratio=...), or give max_bond "
                         "(the deltas' rank) here (model left unchanged)")
    if config.target_ratio is None or config.expert_type != "mpo":
        return config
    routed = [name for name, module in targets if get_adapter(module).routed_experts]
    if routed:
        raise ValueError(f"target_ratio= chooses bonds for upcycled dense FFNs; {routed[:3]} hold an MoE model's "
                         "routed experts (compress those with tnmoe.moe.compress) (model left unchanged)")
    names = [f"{name}.{role}" for name, module in targets for role in get_adapter(module).extract(module).matrices()]
    if config.bond_dims is not None:
        missing = [n for n in names if n not in config.bond_dims]
        if missing:
            raise ValueError(f"config.bond_dims (recorded for target_ratio={config.target_ratio}) has no bonds for "
                             f"{missing[:3]}: this config was made for another model or other target_modules")
        return config
    if init != "pretrained":
        raise ValueError(f"target_ratio={config.target_ratio} chooses bonds from the pretrained weights, which "
                         "init='empty' does not read; give the bonds (config.bond_dims, as a converted model's "
                         "config records them) instead")
    matrices, factors, calib = [], [], []
    for name, module in targets:
        for role, w in get_adapter(module).extract(module).matrices().items():
            out_dim, in_dim = w.shape
            factors.append(matrix_factors(config, out_dim, in_dim))
            matrices.append(w.detach())
            calib.append(covariances.get(name, {}).get(role))
    bonds = allocate_bonds(matrices, factors, config.target_ratio,
                           calibration=calib if any(c is not None for c in calib) else None)
    return dataclasses.replace(config, bond_dims=dict(zip(names, bonds)))


def _calibration_used(targets, config: MoEConfig, init: str, calibration) -> bool:
    """Whether ``calibration`` fits anything in this conversion (warns where it is ignored,
    refuses routed-expert FFNs)."""
    if calibration is None:
        return False
    if config.expert_type != "mpo" or not _truncates(config) or init != "pretrained":
        warnings.warn("calibration= ignored: it fits truncated MPO experts (expert_type='mpo', max_bond set, "
                      "init='pretrained'); this conversion is exact or loads no pretrained weights")
        return False
    routed = [name for name, module in targets if get_adapter(module).routed_experts]
    if routed:
        raise ValueError(f"calibration= is not supported for routed-expert FFNs ({routed[:3]}); convert them "
                         "without calibration (model left unchanged)")
    return True


@torch.no_grad()
def _mean_expert_matrices(layer: nn.Module) -> dict[str, torch.Tensor]:
    """``{role: (out, in)}``: the mean over experts of a built MoE layer's matrices (the fit, as the
    experts start alike up to init noise), for sequential calibration of the layers after it."""
    experts = layer.experts
    return {role: getattr(experts, role).weights().mean(0) for role in ("up", "down", "gate")
            if getattr(experts, role, None) is not None}


def _calibrate(model: nn.Module, targets, calibration, progress: bool) -> dict:
    """Per target name, its matrices' input second moments."""
    try:
        return collect_ffn_covariances(model, targets, calibration, progress=progress)
    except ValueError as err:
        raise ValueError(f"{err} (model left unchanged)") from None


def get_moe_config(model: nn.Module) -> MoEConfig | None:
    """The :class:`MoEConfig` ``model`` was converted with (``None`` if it has no MoE layer that
    :func:`convert` installed). Works through wrappers (DDP, ``torch.compile``, ...)."""
    for _, layer in _tnmoe_modules(model):
        if layer.moe_config is not None:
            return layer.moe_config
    return None


def _tnmoe_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """What :func:`convert` installs: :class:`MoELayer` and :class:`RoutedExperts` modules, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (MoELayer, RoutedExperts))]


def converted_modules(model: nn.Module) -> list[str]:
    """Names (relative to the model :func:`convert` was called on) of the converted FFNs."""
    return [layer.converted_from for _, layer in _tnmoe_modules(model) if layer.converted_from is not None]


def _accepts(module: nn.Module, *names: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return all(name in params for name in names)


def _context_inputs(config: MoEConfig) -> tuple[str, ...]:
    """The model inputs the MoE layers need per call: ``input_ids`` (hash routing), and
    ``attention_mask`` (``ignore_padding``; found on the module that takes ``input_ids``)."""
    if config.router != "hash" and not config.ignore_padding:
        return ()
    return ("input_ids",) + (("attention_mask",) if config.ignore_padding else ())


def _context_owner(modules: dict[str, nn.Module], name: str, wanted: tuple[str, ...]) -> str:
    """The deepest strict ancestor of module ``name`` whose forward takes every ``wanted`` input."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        anc = ".".join(parts[:cut])
        if _accepts(modules[anc], *wanted):
            return anc
    raise ValueError(
        f"no ancestor of {name!r} has a forward taking {' and '.join(wanted)} (needed for "
        "router='hash' / ignore_padding=True); call the MoE layers with token_ids= / token_mask= yourself"
    )


def _positions(forward, names: tuple[str, ...]) -> dict[str, int | None]:
    """Index of each of ``names`` among ``forward``'s positional arguments, ``None`` where it can
    only be passed by keyword (after ``*args`` or keyword-only), as ``Signature.bind`` maps them."""
    params = list(inspect.signature(forward).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    out = {}
    for name in names:
        k = next(i for i, p in enumerate(params) if p.name == name)
        out[name] = k if all(p.kind in positional for p in params[:k + 1]) else None
    return out


def _wire_routing_context(model: nn.Module, config: MoEConfig) -> None:
    """Give each MoE layer its model call's ``input_ids`` (hash routing) and/or ``attention_mask``
    (``ignore_padding``): the deepest ancestor of the layer whose forward takes them sets a
    :class:`~tnmoe.moe.context.RoutingContext` on the layers below it for the duration of its call."""
    wanted = _context_inputs(config)
    token_ids, padding = config.router == "hash", config.ignore_padding
    modules = dict(model.named_modules())
    owners: dict[str, list[str]] = {}  # ancestor -> its MoE layers' names relative to it
    for name, _ in moe_layers(model):
        anc = _context_owner(modules, name, wanted)
        owners.setdefault(anc, []).append(name[len(anc) + 1:] if anc else name)
    for anc, names in owners.items():
        hooks = _ContextHooks(names, _positions(modules[anc].forward, wanted), token_ids, padding)
        modules[anc].register_forward_pre_hook(hooks.set_context, with_kwargs=True)
        modules[anc].register_forward_hook(hooks.clear_context, always_call=True)


class _ContextHooks:
    """The owner's forward hooks. They find the layers from the hooked module at call time, so a
    deepcopy of the model (an EMA copy, say) routes its own layers, not the original's; a plain
    class, so models with these hooks pickle (``torch.save(model)``)."""

    def __init__(self, names: list[str], positions: dict[str, int | None], token_ids: bool, padding: bool) -> None:
        self.names, self.positions, self.token_ids, self.padding = names, positions, token_ids, padding

    def _argument(self, name: str, args: tuple, kwargs: dict):
        """The value the owner's call passed for parameter ``name`` (by keyword or position)."""
        if name in kwargs:
            return kwargs[name]
        position = self.positions[name]
        return args[position] if position is not None and position < len(args) else None

    def set_context(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        context = RoutingContext(self._argument("input_ids", args, kwargs) if self.token_ids else None,
                                 self._argument("attention_mask", args, kwargs) if self.padding else None)
        for name in self.names:
            module.get_submodule(name).routing_context.set(context)

    def clear_context(self, module: nn.Module, args: tuple, output) -> None:
        # the context belongs to this call (and its recomputation in the backward pass) only:
        # a later direct call of a layer must never route by it
        for name in self.names:
            module.get_submodule(name).routing_context.clear()


@dataclass
class ParameterCount:
    """Parameter accounting (counts of scalars; each shared tensor counted once).

    total: all parameters. trainable: those with ``requires_grad``. shared: tensors shared by
    all experts of a layer (summed over layers). per_expert: one expert's own tensors (summed
    over layers). router: router parameters. active_per_token: parameters a token touches
    (everything but the ``E - k`` experts it is not routed to).
    """

    total: int
    trainable: int
    shared: int
    per_expert: int
    router: int
    active_per_token: int
    moe_layers: int

    def as_millions(self) -> dict[str, float]:
        return {k: round(v / 1e6, 2) for k, v in self.__dict__.items() if k != "moe_layers"}


def _extract(model: nn.Module, name: str, module: nn.Module):
    """What the adapter of FFN ``name`` (``module``) reads: an experts spec for a pretrained MoE's
    experts module (which also reads its parent, the MoE block), else an :class:`FFNSpec`."""
    adapter = get_adapter(module)
    if adapter.routed_experts:
        parent_name = name.rpartition(".")[0]
        return adapter.extract_experts(module, model.get_submodule(parent_name) if parent_name else model)
    return adapter.extract(module)


def ffn_dimensions(model: nn.Module, target_modules=None) -> list[int]:
    """The dimensions (sorted, each once) of the FFN matrices :func:`convert` would factorize for
    ``target_modules`` (default: every FFN with an adapter), i.e. the keys ``MoEConfig.factors``
    may have: a preset covering more dimensions is restricted with
    ``{d: f for d, f in factors.items() if d in ffn_dimensions(model)}``."""
    dims: set[int] = set()
    for name, module in find_target_modules(model, target_modules):
        spec = _extract(model, name, module)
        for matrix in (spec.up, spec.down, spec.gate):
            if matrix is not None:
                dims.update(int(d) for d in matrix.shape[-2:])
    return sorted(dims)


def conversion_errors(model: nn.Module) -> dict[str, float]:
    """Relative Frobenius error ``||W - W_mpo|| / ||W||`` of every MPO expert bank against the
    pretrained matrix it was decomposed from at :func:`convert` (before ``init_noise``), by bank
    name (e.g. ``'h.0.mlp.experts.up'``); ~1e-7 for lossless bonds. Empty for dense experts and
    for models loaded from a checkpoint (the pretrained matrices are not kept)."""
    return {name: m.conversion_error for name, m in model.named_modules()
            if isinstance(m, MPOExpertBank) and m.conversion_error is not None}


def fit_reports(model: nn.Module) -> dict:
    """The data-aware fit's :class:`~tnmoe.networks.fit.FitReport` of every MPO expert bank that
    :func:`convert` fitted with ``calibration=`` (weight and output errors per matrix, TT-SVD's at
    the same bonds, damping), by bank name; empty for TT-SVD conversions and loaded checkpoints."""
    return {name: m.fit_report for name, m in model.named_modules()
            if isinstance(m, MPOExpertBank) and getattr(m, "fit_report", None) is not None}


def count_parameters(model: nn.Module) -> ParameterCount:
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    shared = per_expert = router = inactive = 0
    layers = _tnmoe_modules(model)
    for _, layer in layers:
        ex = layer.experts
        own = sum(b.num_params_per_expert() for b in ex.banks().values())
        own += sum(b.shape[1] for b in (ex.up_bias, ex.down_bias, ex.gate_bias) if b is not None)
        shared += sum(b.num_shared_params() for b in ex.banks().values())
        per_expert += own
        if isinstance(layer, MoELayer):  # RoutedExperts: the model's router is counted as a plain parameter
            router += sum(p.numel() for p in layer.router.parameters())
        top_k = layer.router.top_k if isinstance(layer, MoELayer) else layer.top_k
        inactive += (layer.num_experts - top_k) * own
    return ParameterCount(total, trainable, shared, per_expert, router, total - inactive, len(layers))


def print_trainable_parameters(model: nn.Module) -> ParameterCount:
    """peft-style summary line, plus the MoE breakdown when the model has MoE layers."""
    c = count_parameters(model)
    print(f"trainable params: {c.trainable:,} || all params: {c.total:,} || "
          f"trainable%: {100 * c.trainable / max(c.total, 1):.4f}")
    if c.moe_layers:
        print(f"moe layers: {c.moe_layers} || shared (once): {c.shared:,} || per expert: {c.per_expert:,} "
              f"|| routers: {c.router:,} || active per token: {c.active_per_token:,}")
    return c
