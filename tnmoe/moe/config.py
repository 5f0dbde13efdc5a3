"""``MoEConfig``: everything that decides the structure of a converted model (JSON-serializable)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

from ..networks import SHARE_NAMES
from .routers import GATE_SCALINGS, check_capacity

__all__ = ["MoEConfig"]

_ROUTERS = ("switch", "topk", "hash")
_LEARNED = ("switch", "topk")
_EXPERTS = ("mpo", "dense", "base_delta")
DEFAULT_NUM_EXPERTS, DEFAULT_TOP_K = 8, 1
#: fields that configure tnmoe's own router (and its losses / capacity)
ROUTER_FIELDS = ("router", "capacity_factor", "eval_capacity_factor", "drop_tokens", "ignore_padding",
                 "jitter_noise", "noisy_gating", "router_bias", "gate_scaling", "load_balancing_coef",
                 "z_loss_coef", "vocab_size")


def _int(name: str, value, low: int | None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        want = f"an integer >= {low}" if low is not None else "an integer"
        raise ValueError(f"{name} must be {want}{' (' + hint + ')' if hint else ''}, got {value!r}")


def _number(name: str, value, low: float, high: float | None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value >= low
    if ok and high is not None:
        ok = value < high
    if not ok:
        rng = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a number in {rng}, got {value!r}")


def _bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _choice(name: str, value, choices, hint: str = "") -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}{' ' + hint if hint else ''}, got {value!r}")


@dataclass
class MoEConfig:
    """Structure of the MoE layers :func:`tnmoe.moe.convert` installs.

    Attributes:
        num_experts: experts per layer. ``None`` (default): the model's own number when converting
            an MoE model's experts, else 8 (:meth:`upcycling_shape`).
        top_k: experts per token (``switch`` and ``hash`` use 1). ``None`` (default): the model's
            when converting an MoE model's experts, else 1.
        router: ``"switch"`` (top-1, capacity), ``"topk"`` (softmax top-k, optional noise) or ``"hash"``.
        expert_type: ``"mpo"`` (factorized experts), ``"dense"`` (plain copies: +MoE/+Switch) or
            ``"base_delta"`` (:class:`~tnmoe.moe.BaseDeltaExpertBank`: one shared base matrix plus a
            rank-``max_bond`` delta per expert, D²-MoE's structure; ``max_bond=None``: full rank).
        share: which MPO cores all experts share: ``"central"`` (MPOE), ``"auxiliary"``,
            ``"all"``, ``"none"``, or a list of core indices.
        m: local tensors per MPO when a dimension has no entry in ``factors``.
        factors: ``{dim: [factors]}``, e.g. ``{768: [3,4,4,4,4], 3072: [4,4,8,6,4]}``; the up
            matrix ``(d_ff, d_model)`` uses ``factors[d_ff]`` x ``factors[d_model]`` and the down
            matrix the reverse.
        max_bond: bond cap (``None``: lossless, so converted models reproduce the original).
        target_ratio: instead of ``max_bond``, keep this fraction of the converted FFN matrices'
            parameters (one MPO per matrix against its dense size, summed over every converted
            matrix): :func:`tnmoe.moe.convert` chooses each matrix's bonds by the error each bond
            costs, across layers (:func:`tnmoe.networks.allocate_bonds`; whitened by the inputs
            when ``calibration=`` is given), and records them in ``bond_dims``.
        bond_dims: per-matrix inner bonds ``{"<FFN module name>.<up|gate|down>": [r_1, ...,
            r_{m-1}]}``; filled in by ``convert`` from ``target_ratio`` (so checkpoints rebuild
            the same shapes) or given directly; matrices not named use ``max_bond``.
        cache_weights: MPO banks may keep their rebuilt matrices in the inference weight cache
            (``True``, default: fastest, holds ``E * out * in`` per bank, as many bytes as dense
            experts). ``False``: memory-bounded inference, each call streams tokens through the
            cores or rebuilds only the experts that have tokens; :func:`tnmoe.moe.compress`
            records ``False`` (a cache would hold the uncompressed size).
        capacity_factor / drop_tokens: training capacity ``ceil(T*k*cf/E)``; ``None`` or
            ``drop_tokens=False`` keeps every token. eval_capacity_factor: the same in eval mode
            (``None``: no dropping at inference).
        ignore_padding: padding tokens (``attention_mask == 0`` in the model call) are not routed:
            they take no expert capacity, do not count in the load-balancing / z losses and
            routing stats, and their FFN output is zero (attention never reads them). Default
            ``False``: every position is routed, as in HF Switch Transformers (and this
            project's published results). Needs a 2-D padding mask.
        jitter_noise: Switch input jitter while training (``switch`` only).
        noisy_gating: Shazeer noisy top-k (``topk`` only).
        router_bias: add a bias to the router logits (learned routers; default ``True``).
        gate_scaling: learned routers: ``"preserve"`` (default; forward value 1/k per chosen
            expert, router still learns; converted models reproduce the original), ``"probs"``
            or ``"normalized"``.
        load_balancing_coef / z_loss_coef: auxiliary loss weights (learned routers; default
            0.01 / 0).
        init_noise: relative std of noise added to each expert's own tensors at conversion.
        target_modules: ``None`` (every FFN with an adapter), a list of names (a module matches
            when its name equals an entry or ends with ``"." + entry``) or a regex string
            (full match), as in peft.
        vocab_size: hash routing table size (``hash`` only; default 65536).
        seed: seeds init noise, router init and hash tables.

    Every field is validated on construction; an option that has no effect with the chosen
    router (e.g. ``noisy_gating`` with ``router="switch"``) is an error, not silently ignored.
    Fields left at ``None`` take the router's default (filled in on construction).

    Converting an MoE model's routed experts (Mixtral, Qwen-MoE, DeepSeek-V3, gpt-oss, Switch, ...)
    keeps the model's own router: ``num_experts`` / ``top_k`` must be ``None`` or the model's, and
    every router option (:data:`ROUTER_FIELDS`) must keep its default (:meth:`router_options_set`).
    """

    num_experts: int | None = None
    top_k: int | None = None
    router: str = "switch"
    expert_type: str = "mpo"
    share: str | list[int] = "central"
    m: int = 5
    factors: dict[int, list[int]] = field(default_factory=dict)
    max_bond: int | None = None
    target_ratio: float | None = None
    bond_dims: dict[str, list[int]] | None = None
    cache_weights: bool = True
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = None
    drop_tokens: bool = True
    ignore_padding: bool = False
    jitter_noise: float = 0.0
    noisy_gating: bool = False
    router_bias: bool | None = None
    gate_scaling: str | None = None
    load_balancing_coef: float | None = None
    z_loss_coef: float = 0.0
    init_noise: float = 0.0
    target_modules: list[str] | str | None = None
    vocab_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.factors, dict):
            raise ValueError(f"factors must be a dict {{dim: [factors]}}, got {self.factors!r}")
        self.factors = {int(k): list(v) for k, v in self.factors.items()}
        if self.bond_dims is not None:
            if not isinstance(self.bond_dims, dict):
                raise ValueError(f"bond_dims must be a dict {{'<module>.<role>': [bonds]}}, got {self.bond_dims!r}")
            self.bond_dims = {str(k): list(v) for k, v in self.bond_dims.items()}
        if isinstance(self.share, tuple):
            self.share = list(self.share)
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        learned = self.router in _LEARNED
        defaults = {"router_bias": learned, "gate_scaling": "preserve" if learned else None,
                    "load_balancing_coef": 0.01 if learned else 0.0,
                    "vocab_size": 65536 if self.router == "hash" else None}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.validate()

    def upcycling_shape(self) -> tuple[int, int]:
        """``(num_experts, top_k)`` for upcycling a dense FFN: the set values, else 8 and 1.

        ``ValueError`` when they do not fit the router: ``top_k > 1`` needs ``router="topk"`` (a
        config converting an MoE model may name the model's top_k with the default router, which
        is not used there)."""
        shape = (DEFAULT_NUM_EXPERTS if self.num_experts is None else self.num_experts,
                 DEFAULT_TOP_K if self.top_k is None else self.top_k)
        if self.router in ("switch", "hash") and shape[1] != 1:
            raise ValueError(f"the {self.router} router routes each token to 1 expert; got top_k={shape[1]} "
                             "(a dense FFN gets tnmoe's router: use router='topk' for top_k > 1)")
        if shape[1] > shape[0]:
            raise ValueError(f"top_k must be in [1, num_experts={shape[0]}], got {shape[1]}")
        return shape

    def router_options_set(self) -> dict[str, tuple]:
        """Router fields (:data:`ROUTER_FIELDS`) that differ from a default config's:
        ``{name: (value, default)}``. They configure a tnmoe router, so they contradict an MoE
        model whose own router is kept."""
        default = MoEConfig().to_dict()
        mine = self.to_dict()
        return {k: (mine[k], default[k]) for k in ROUTER_FIELDS if mine[k] != default[k]}

    def validate(self) -> None:
        """Check every field; raises ``ValueError`` naming the field and what it accepts."""
        num_experts = DEFAULT_NUM_EXPERTS if self.num_experts is None else self.num_experts
        top_k = DEFAULT_TOP_K if self.top_k is None else self.top_k
        if self.num_experts is not None:
            _int("num_experts", self.num_experts, 1, "or None: the model's")
        if self.top_k is not None:
            _int("top_k", self.top_k, 1, "or None: the model's")
        _int("m", self.m, 2, "an MPO needs at least 2 local tensors")
        _int("seed", self.seed, None)
        _choice("router", self.router, _ROUTERS)
        _choice("expert_type", self.expert_type, _EXPERTS)
        if self.router == "hash" and top_k != 1:
            raise ValueError(f"the hash router routes each token to 1 expert; got top_k={top_k}")
        if top_k > num_experts and self.num_experts is not None:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if self.max_bond is not None:
            _int("max_bond", self.max_bond, 1, "None means lossless bonds")
        if self.target_ratio is not None:
            _number("target_ratio", self.target_ratio, 0.0, None)
            if not 0.0 < self.target_ratio <= 1.0:
                raise ValueError(f"target_ratio must be in (0, 1] (the fraction of parameters to keep), got {self.target_ratio!r}")
            if self.max_bond is not None:
                raise ValueError(f"give max_bond or target_ratio, not both (got max_bond={self.max_bond}, "
                                 f"target_ratio={self.target_ratio})")
        for key, bonds in (self.bond_dims or {}).items():
            if not bonds or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in bonds):
                raise ValueError(f"bond_dims[{key!r}] must be a list of positive integers (the inner bonds), got {bonds!r}")
        if isinstance(self.share, str):
            _choice("share", self.share, SHARE_NAMES, "or a list of core indices")
        elif not isinstance(self.share, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in self.share):
            raise ValueError(f"share must be one of {SHARE_NAMES} or a list of core indices, got {self.share!r}")
        check_capacity(self.capacity_factor, self.eval_capacity_factor)
        _bool("drop_tokens", self.drop_tokens)
        _bool("cache_weights", self.cache_weights)
        _bool("ignore_padding", self.ignore_padding)
        _bool("noisy_gating", self.noisy_gating)
        _bool("router_bias", self.router_bias)
        _number("jitter_noise", self.jitter_noise, 0.0, 1.0)
        _number("init_noise", self.init_noise, 0.0, None)
        _number("load_balancing_coef", self.load_balancing_coef, 0.0, None)
        _number("z_loss_coef", self.z_loss_coef, 0.0, None)
        if self.gate_scaling is not None:
            _choice("gate_scaling", self.gate_scaling, GATE_SCALINGS)
        if self.vocab_size is not None:
            _int("vocab_size", self.vocab_size, 1)
        self._check_router_options()
        for dim, fs in self.factors.items():
            if not all(isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in fs):
                raise ValueError(f"factors[{dim}] must be positive integers, got {fs}")
            if math.prod(fs) != dim:
                raise ValueError(f"factors[{dim}] = {fs} multiply to {math.prod(fs)}, not {dim}")
        lengths = {len(v) for v in self.factors.values()}
        if len(lengths) > 1:
            raise ValueError(f"all factor lists need the same length m, got lengths {sorted(lengths)}")
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list)):
            raise ValueError(f"target_modules must be None, a list of names or a regex string, got {self.target_modules!r}")

    def _check_router_options(self) -> None:
        """Options with no effect under the chosen router are errors, not silently ignored."""
        ineffective = []
        if self.router != "switch" and self.jitter_noise:
            ineffective.append(f"jitter_noise={self.jitter_noise} (switch only)")
        if self.router != "topk" and self.noisy_gating:
            ineffective.append("noisy_gating=True (topk only)")
        if self.router != "hash" and self.vocab_size is not None:
            ineffective.append(f"vocab_size={self.vocab_size} (hash only)")
        if self.router not in _LEARNED:
            if self.router_bias:
                ineffective.append("router_bias=True (hash routing has no logits)")
            if self.gate_scaling is not None:
                ineffective.append(f"gate_scaling={self.gate_scaling!r} (hash routing has no gate)")
            if self.load_balancing_coef or self.z_loss_coef:
                ineffective.append("load_balancing_coef / z_loss_coef (hash routing has no logits to balance)")
        if self.expert_type == "dense" and (self.max_bond is not None or self.factors or self.share != "central"
                                            or self.target_ratio is not None or self.bond_dims
                                            or not self.cache_weights):
            ineffective.append("max_bond / target_ratio / bond_dims / factors / share / cache_weights=False (MPO "
                               "experts only; expert_type='dense')")
        if self.expert_type == "base_delta" and (self.factors or self.share != "central" or self.bond_dims
                                                 or not self.cache_weights):
            ineffective.append("bond_dims / factors / share / cache_weights=False (MPO experts only; "
                               "expert_type='base_delta' shares its base and takes max_bond as the deltas' rank)")
        if ineffective:
            raise ValueError(f"options with no effect for router={self.router!r}, expert_type={self.expert_type!r}: "
                             + "; ".join(ineffective) + ". Remove them or pick the router/expert type they belong to.")

    def bonds_for(self, matrix: str) -> list[int] | None:
        """The inner bonds :attr:`bond_dims` gives matrix ``"<module>.<role>"`` (``None``: use ``max_bond``)."""
        return None if self.bond_dims is None else self.bond_dims.get(matrix)

    def factors_for(self, dim: int) -> list[int] | int:
        return self.factors.get(dim, self.m if not self.factors else len(next(iter(self.factors.values()))))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["factors"] = {str(k): v for k, v in self.factors.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MoEConfig keys {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def diff(self, other: "MoEConfig") -> dict[str, tuple]:
        """Fields whose values differ: ``{name: (self, other)}``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}
