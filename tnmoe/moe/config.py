"""``MoEConfig``: everything that decides the structure of a converted model (JSON-serializable)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

__all__ = ["MoEConfig"]

_ROUTERS = ("switch", "topk", "hash")
_EXPERTS = ("mpo", "dense")


@dataclass
class MoEConfig:
    """Structure of the MoE layers :func:`tnmoe.moe.convert` installs.

    Attributes:
        num_experts: experts per layer.
        top_k: experts per token (``switch`` and ``hash`` use 1).
        router: ``"switch"`` (top-1, capacity), ``"topk"`` (softmax top-k, optional noise) or ``"hash"``.
        expert_type: ``"mpo"`` (factorized experts) or ``"dense"`` (plain copies: +MoE/+Switch).
        share: which MPO cores all experts share: ``"central"`` (MPOE), ``"auxiliary"``,
            ``"all"``, ``"none"``, or a list of core indices.
        m: local tensors per MPO when a dimension has no entry in ``factors``.
        factors: ``{dim: [factors]}``, e.g. ``{768: [3,4,4,4,4], 3072: [4,4,8,6,4]}``; the up
            matrix ``(d_ff, d_model)`` uses ``factors[d_ff]`` x ``factors[d_model]`` and the down
            matrix the reverse.
        max_bond: bond cap (``None``: lossless, so converted models reproduce the original).
        capacity_factor / drop_tokens: training capacity ``ceil(T*k*cf/E)``; ``None`` or
            ``drop_tokens=False`` keeps every token. eval_capacity_factor: the same in eval mode
            (``None``: no dropping at inference).
        jitter_noise: Switch input jitter while training. noisy_gating: Shazeer noisy top-k.
        router_bias: add a bias to the router logits.
        gate_scaling: ``"preserve"`` (forward value 1/k per chosen expert, router still learns;
            converted models reproduce the original), ``"probs"`` or ``"normalized"``.
        load_balancing_coef / z_loss_coef: auxiliary loss weights.
        init_noise: relative std of noise added to each expert's own tensors at conversion.
        target_modules: ``None`` (every FFN with an adapter), a list of names (a module matches
            when its name equals an entry or ends with ``"." + entry``) or a regex string
            (full match), as in peft.
        vocab_size: hash routing table size. seed: seeds init noise and hash tables.
    """

    num_experts: int = 8
    top_k: int = 1
    router: str = "switch"
    expert_type: str = "mpo"
    share: str | list[int] = "central"
    m: int = 5
    factors: dict[int, list[int]] = field(default_factory=dict)
    max_bond: int | None = None
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = None
    drop_tokens: bool = True
    jitter_noise: float = 0.0
    noisy_gating: bool = False
    router_bias: bool = True
    gate_scaling: str = "preserve"
    load_balancing_coef: float = 0.01
    z_loss_coef: float = 0.0
    init_noise: float = 0.0
    target_modules: list[str] | str | None = None
    vocab_size: int = 65536
    seed: int = 0

    def __post_init__(self) -> None:
        self.factors = {int(k): [int(f) for f in v] for k, v in (self.factors or {}).items()}
        if not isinstance(self.share, str):
            self.share = [int(k) for k in self.share]
        self.validate()

    def validate(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.router not in _ROUTERS:
            raise ValueError(f"router must be one of {_ROUTERS}, got {self.router!r}")
        if self.expert_type not in _EXPERTS:
            raise ValueError(f"expert_type must be one of {_EXPERTS}, got {self.expert_type!r}")
        if self.router in ("switch", "hash") and self.top_k != 1:
            raise ValueError(f"the {self.router} router routes each token to 1 expert; got top_k={self.top_k}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.m < 2:
            raise ValueError(f"m must be >= 2 (an MPO needs at least 2 local tensors), got {self.m}")
        if self.max_bond is not None and self.max_bond < 1:
            raise ValueError(f"max_bond must be a positive integer or None, got {self.max_bond}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {self.capacity_factor}")
        if self.init_noise < 0:
            raise ValueError(f"init_noise must be >= 0, got {self.init_noise}")
        for dim, fs in self.factors.items():
            if math.prod(fs) != dim:
                raise ValueError(f"factors[{dim}] = {fs} multiply to {math.prod(fs)}, not {dim}")
        lengths = {len(v) for v in self.factors.values()}
        if len(lengths) > 1:
            raise ValueError(f"all factor lists need the same length m, got lengths {sorted(lengths)}")

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
