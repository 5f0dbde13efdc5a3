"""The paper's model variants (dense, +MoE, +Switch, MPOE, MPOE++, w/o GM, w/o PS) as
:class:`tnmoe.moe.MoEConfig` s, in one place: the recipes (through their ``--variant`` and MoE
options) and ``param_table.py`` both build their configs with :func:`variant_config`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterable

import torch

import tnmoe.moe as moe
from run_io import RecipeError

#: the paper's factorizations (MPOE Table 4), ``{m: {dim: factors}}``; other dims fall back to
#: balanced factors. For m = 5: 768 -> [3, 4, 4, 4, 4], 3072 -> [4, 4, 8, 6, 4].
PAPER_FACTORS: dict[int, dict[int, list[int]]] = {
    3: {768: [8, 12, 8], 3072: [12, 16, 16]},
    5: {768: [3, 4, 4, 4, 4], 3072: [4, 4, 8, 6, 4]},
    7: {768: [2, 2, 4, 4, 3, 2, 2], 3072: [2, 4, 4, 4, 4, 3, 2]},
    9: {768: [2, 2, 2, 2, 3, 2, 2, 2, 2], 3072: [2, 2, 2, 4, 4, 3, 2, 2, 2]},
}

VARIANTS: dict[str, str] = {
    "dense": "the unconverted model",
    "moe": "+MoE: 8 dense experts (copies of the FFN), softmax top-2",
    "switch": "+Switch: 8 dense experts, Switch top-1",
    "mpoe": "+MPOE: 8 MPO experts sharing the central tensor, Switch top-1, gradient mask",
    "mpoe++": "+MPOE++: 16 MPO experts sharing the central tensor",
    "mpoe-wo-gm": "MPOE without the gradient mask (p_b = 0)",
    "mpoe-wo-ps": "MPOE without parameter sharing (every expert has its own central tensor)",
    "truncated": "the unconverted model with every FFN matrix replaced by its truncation at --max-bond "
                 "(--conversion: tt-svd, data-aware MPO, svd or whitened-svd at the MPO's parameter count)",
}

#: how truncated matrices are initialised (``--conversion``): the MPOE variants take the MPO ones;
#: ``-sequential``: fitted FFN by FFN to the original model's outputs from the inputs the FFNs
#: before give once fitted (``sequential=True`` of ``moe.convert`` / ``moe.truncate_ffns``)
MPO_CONVERSIONS = ("tt-svd", "data-aware", "data-aware-sequential")
CONVERSIONS = (*moe.TRUNCATION_METHODS, "data-aware-sequential", "whitened-svd-sequential")


def conversion_method(conversion: str) -> tuple[str, bool]:
    """``(method, sequential)`` of a ``--conversion`` value: ``'data-aware-sequential'`` ->
    ``('data-aware', True)``."""
    base = conversion.removesuffix("-sequential")
    return base, base != conversion


@dataclass(frozen=True)
class VariantOptions:
    """The knobs a variant leaves open; the defaults are the recipes' command-line defaults.

    num_experts: ``None`` = the variant's (16 for mpoe++, else 8). m: local tensors per MPO.
    factors: ``{dim: factors}``; ``None`` = :data:`PAPER_FACTORS` for ``m`` (balanced for other
    dims). max_bond: bond cap (``None``: lossless). p_b: gradient-mask probability of the MPOE
    variants that keep the mask. lb_coef: load-balancing loss weight. capacity_factor: expert
    capacity ``ceil(tokens * k * cf / E)``. init_noise: relative std of the noise added to each
    expert's own tensors. target_modules: FFN names to convert (``None``: every FFN with an
    adapter). ignore_padding: padding tokens are not routed (see :class:`tnmoe.moe.MoEConfig`);
    off in the published runs. conversion: how truncated matrices start (:data:`CONVERSIONS`;
    ``data-aware`` fits them to the FFN inputs of ``calibration_samples`` training examples).
    """

    num_experts: int | None = None
    m: int = 5
    factors: dict[int, list[int]] | None = None
    max_bond: int | None = None
    p_b: float = 0.5
    lb_coef: float = 0.01
    capacity_factor: float | None = 1.25
    init_noise: float = 0.0
    target_modules: tuple[str, ...] | None = None
    ignore_padding: bool = False
    conversion: str = "tt-svd"
    calibration_samples: int = 640


_DEFAULTS = VariantOptions()


def variant_config(variant: str, options: VariantOptions = _DEFAULTS) -> tuple[moe.MoEConfig | None, float]:
    """``(MoEConfig, p_b)`` for ``variant`` (``(None, 0.0)`` for dense); ``p_b`` is the
    gradient-mask probability (0: no mask). Raises :class:`RecipeError` on a bad variant/option."""
    if variant not in VARIANTS:
        raise RecipeError(f"unknown variant {variant!r}; known: {', '.join(sorted(VARIANTS))}")
    if variant == "dense":
        return None, 0.0
    o = options
    allowed = CONVERSIONS if variant == "truncated" else MPO_CONVERSIONS
    if o.conversion not in allowed:
        raise RecipeError(f"--conversion {o.conversion} does not apply to variant {variant!r} (choices: {', '.join(allowed)})")
    if o.conversion != "tt-svd" and (o.max_bond is None or variant in ("moe", "switch")):
        raise RecipeError(f"--conversion {o.conversion} chooses how truncated MPO matrices start: give --max-bond "
                          "and an MPO variant (mpoe, mpoe++, mpoe-wo-gm, mpoe-wo-ps, truncated)")
    if variant == "truncated":
        if o.max_bond is None:
            raise RecipeError("variant 'truncated' needs --max-bond (the bond cap that sets each matrix's budget)")
        factors = dict(PAPER_FACTORS.get(o.m, {})) if o.factors is None else o.factors
        try:
            return moe.MoEConfig(expert_type="mpo", num_experts=1, m=o.m, factors=factors, max_bond=o.max_bond,
                                 target_modules=list(o.target_modules) if o.target_modules else None), 0.0
        except ValueError as err:
            raise RecipeError(str(err)) from None
    shared = dict(num_experts=o.num_experts or (16 if variant == "mpoe++" else 8),
                  load_balancing_coef=o.lb_coef, capacity_factor=o.capacity_factor,
                  init_noise=o.init_noise, ignore_padding=o.ignore_padding,
                  target_modules=list(o.target_modules) if o.target_modules else None)
    try:
        if variant == "moe":
            return moe.MoEConfig(expert_type="dense", router="topk", top_k=2, **shared), 0.0
        shared["top_k"] = 1
        if variant == "switch":
            return moe.MoEConfig(expert_type="dense", router="switch", **shared), 0.0
        factors = dict(PAPER_FACTORS.get(o.m, {})) if o.factors is None else o.factors
        cfg = moe.MoEConfig(expert_type="mpo", router="switch", share="none" if variant == "mpoe-wo-ps" else "central",
                            m=o.m, factors=factors, max_bond=o.max_bond, **shared)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    return cfg, (0.0 if variant in ("mpoe-wo-gm", "mpoe-wo-ps") else o.p_b)


# --- command line -------------------------------------------------------------------------------
def _capacity(text: str) -> float | None:
    """``--capacity-factor``: a positive number, or ``none`` (keep every token)."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}") from None


def add_moe_args(ap: argparse.ArgumentParser) -> None:
    """``--variant`` and the :class:`VariantOptions` flags (defaults from :class:`VariantOptions`)."""
    g = ap.add_argument_group("MoE")
    g.add_argument("--variant", default="mpoe", choices=sorted(VARIANTS),
                   help="; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    g.add_argument("--num-experts", type=int, default=_DEFAULTS.num_experts, help="default 8 (16 for mpoe++)")
    g.add_argument("--m", type=int, default=_DEFAULTS.m, help="local tensors per MPO")
    g.add_argument("--factors", default=None,
                   help="explicit factorizations, e.g. '768=3,4,4,4,4;3072=4,4,8,6,4' "
                        "(default: the paper's for 768/3072, balanced otherwise)")
    g.add_argument("--max-bond", type=int, default=_DEFAULTS.max_bond, help="bond cap (default lossless)")
    g.add_argument("--p-b", type=float, default=_DEFAULTS.p_b, help="gradient-mask probability for MPOE variants")
    g.add_argument("--lb-coef", type=float, default=_DEFAULTS.lb_coef, help="load-balancing loss weight")
    g.add_argument("--capacity-factor", type=_capacity, default=_DEFAULTS.capacity_factor,
                   help="training expert capacity factor; 'none' keeps every token (no dropping)")
    g.add_argument("--init-noise", type=float, default=_DEFAULTS.init_noise)
    g.add_argument("--target-modules", default=None, help="comma-separated module names (peft style)")
    g.add_argument("--ignore-padding", action="store_true",
                   help="padding tokens take no expert capacity and do not count in the load-balancing loss")
    g.add_argument("--conversion", default=_DEFAULTS.conversion, choices=CONVERSIONS,
                   help="how truncated (--max-bond) matrices start: tt-svd (data-blind), data-aware (MPO fitted to "
                        "the FFN inputs of --calibration-samples training examples; data-aware-sequential: FFN by "
                        "FFN, to the original model's outputs from the inputs the fitted FFNs before give); the "
                        "truncated variant also takes svd / whitened-svd(-sequential) at the MPO's parameter count")
    g.add_argument("--calibration-samples", type=int, default=_DEFAULTS.calibration_samples,
                   help="training examples whose FFN inputs calibrate --conversion data-aware / whitened-svd")


def parse_variants(text: str) -> list[str]:
    """``'mpoe,moe'`` -> ``['mpoe', 'moe']``; :class:`RecipeError` names an unknown variant."""
    variants = text.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise RecipeError(f"unknown variant {v!r}; known: {', '.join(sorted(VARIANTS))}")
    return variants


def parse_factors(text: str | None) -> dict[int, list[int]] | None:
    """``'768=3,4,4,4,4;3072=4,4,8,6,4'`` -> ``{768: [3, 4, 4, 4, 4], 3072: [4, 4, 8, 6, 4]}``;
    ``None``/empty -> ``None`` (the paper's factors for the chosen m)."""
    if not text:
        return None
    out = {}
    try:
        for part in text.split(";"):
            dim, fs = part.split("=")
            out[int(dim)] = [int(f) for f in fs.split(",")]
    except ValueError:
        raise RecipeError(f"--factors must look like '768=3,4,4,4,4;3072=4,4,8,6,4', got {text!r}") from None
    return out


def options_from_args(args: argparse.Namespace) -> VariantOptions:
    """:class:`VariantOptions` from the flags :func:`add_moe_args` added."""
    given = {f.name: getattr(args, f.name) for f in fields(VariantOptions)
             if f.name not in ("factors", "target_modules") and hasattr(args, f.name)}
    return VariantOptions(**given, factors=parse_factors(args.factors),
                          target_modules=tuple(args.target_modules.split(",")) if args.target_modules else None)


def moe_config_for(args: argparse.Namespace) -> tuple[moe.MoEConfig | None, float]:
    """:func:`variant_config` for ``args.variant`` and the command-line options."""
    return variant_config(args.variant, options_from_args(args))


def fit_paper_factors(cfg: moe.MoEConfig, model: torch.nn.Module) -> moe.MoEConfig:
    """``cfg`` with :data:`PAPER_FACTORS`' entries for dimensions ``model``'s FFNs lack dropped
    (those dimensions get balanced factors); factors given otherwise are kept as they are, so
    ``moe.convert`` reports one for a dimension the model lacks."""
    if cfg.expert_type != "mpo" or cfg.factors != PAPER_FACTORS.get(cfg.m):
        return cfg
    dims = set(moe.ffn_dimensions(model, cfg.target_modules))
    return replace(cfg, factors={d: f for d, f in cfg.factors.items() if d in dims})


def prepare_model(model: torch.nn.Module, args: argparse.Namespace,
                  calibration: Callable[[int], Iterable] | None = None,
                  ) -> tuple[torch.nn.Module, moe.GradientMask | None]:
    """Convert ``model`` in place for ``args.variant``; returns ``(model, GradientMask or None)``.
    The config it was converted with is ``moe.get_moe_config(model)`` (``None`` for dense and
    truncated). ``calibration(n)``: batches of model inputs from the first ``n`` training examples,
    for ``--conversion`` methods that fit to data (the recipe's own data pipeline)."""
    cfg, p_b = moe_config_for(args)
    if cfg is None:
        return model, None
    options = options_from_args(args)
    batches = None
    method, sequential = conversion_method(options.conversion)
    if method in ("data-aware", "whitened-svd"):
        if calibration is None:
            raise RecipeError(f"--conversion {options.conversion} needs calibration data, which this recipe does not provide")
        batches = calibration(options.calibration_samples)
    cfg = fit_paper_factors(cfg, model)
    try:
        if args.variant == "truncated":
            model.truncation = [r.to_dict() for r in moe.truncate_ffns(
                model, cfg, method=method, calibration=batches, progress=not getattr(args, "quiet", False),
                sequential=sequential)]
            return model, None
        moe.convert(model, cfg, calibration=batches, progress=not getattr(args, "quiet", False), sequential=sequential)
    except ValueError as err:
        raise RecipeError(f"cannot convert {type(model).__name__}: {err}") from None
    mask = moe.GradientMask(model, p_b=p_b, seed=getattr(args, "seed", 0)) if p_b > 0 else None
    return model, mask


def parameter_summary(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts (scalars) for ``results.json``: total, active per token, shared, per expert."""
    c = moe.count_parameters(model)
    return {"total_params": c.total, "active_params_per_token": c.active_per_token,
            "shared_params": c.shared, "per_expert_params": c.per_expert}
