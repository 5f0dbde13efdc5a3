"""``MPOLinear``: an ``nn.Linear`` whose weight is a trainable MPO."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .cache import DerivedTensorCache, inference_cache_allowed
from .contraction import ContractionEngine, ContractionPlan, default_engine
from .factorize import factorize
from .mpo import MPO

__all__ = ["MPOLinear", "linear_weight"]


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (out, in), bias)`` of an ``nn.Linear`` or a GPT-2 style ``Conv1D``
    (whose weight is stored transposed as ``(in, out)`` and which has an ``nf`` attribute)."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if hasattr(module, "nf") and hasattr(module, "weight") and module.weight.dim() == 2:
        return module.weight.T, getattr(module, "bias", None)
    raise TypeError(
        f"expected nn.Linear or a Conv1D (transformers.pytorch_utils.Conv1D), got "
        f"{type(module).__name__}"
    )


class MPOLinear(nn.Module):
    """Drop-in ``nn.Linear`` with ``weight = MPO(cores)``; ``y = x @ W.T + b``.

    Shapes: input ``(..., in_features)`` -> output ``(..., out_features)``.
    Core ``k``: ``(r_{k-1}, out_factors[k], in_factors[k], r_k)``.

    In eval mode (or under ``torch.no_grad``) with ``cache_weight=True`` the reconstructed weight
    is cached; the cache key holds every core's storage pointer and version counter, so any
    in-place update (an optimizer step, ``load_state_dict``, ``.copy_``) invalidates it.

    Args (keyword-only):
        in_features / out_features: dense shape.
        in_factors / out_factors: local dims (default ``factorize(dim, m)``).
        m: number of local tensors when factors are not given.
        bond_dim: cap for a random init (``None``: lossless bonds).
        bias: add a bias.
        engine: contraction engine (default: the shared process-wide path cache).
        mode: ``"auto"`` (cheaper by FLOPs), ``"stream"`` or ``"reconstruct"``.
    """

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
        m: int = 5,
        bond_dim: int | None = None,
        bias: bool = True,
        cache_weight: bool = True,
        engine: ContractionEngine | None = None,
        mode: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        in_factors = factorize(in_features, in_factors if in_factors is not None else m)
        out_factors = factorize(out_features, out_factors if out_factors is not None else m)
        # nn.Linear's variance: Var(W) = 1/(3 in) (kaiming_uniform(a=sqrt(5)))
        mpo = MPO.random(in_factors, out_factors, bond_dim if bond_dim is not None else 1 << 30,
                         dtype=dtype or torch.get_default_dtype(), std=1.0 / math.sqrt(3 * in_features))
        self._init_from(
            mpo.cores,
            torch.zeros(out_features, dtype=mpo.dtype) if bias else None,
            cache_weight=cache_weight, engine=engine, mode=mode,
        )
        if bias:
            nn.init.uniform_(self.bias, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))
        if device is not None:
            self.to(device)

    def _init_from(self, cores, bias, *, cache_weight, engine, mode) -> None:
        if mode not in ("auto", "stream", "reconstruct"):
            raise ValueError(f"mode must be 'auto', 'stream' or 'reconstruct', got {mode!r}")
        self.cores = nn.ParameterList([nn.Parameter(c.detach().clone()) for c in cores])
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.in_factors = [c.shape[2] for c in cores]
        self.out_factors = [c.shape[1] for c in cores]
        self.in_features = math.prod(self.in_factors)
        self.out_features = math.prod(self.out_factors)
        self.cache_weight = cache_weight
        self.mode = mode
        self._engine = engine
        self._weight_cache = DerivedTensorCache()
        self.last_plan: ContractionPlan | None = None

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def from_mpo(cls, mpo: MPO, bias: torch.Tensor | None = None, **kwargs) -> "MPOLinear":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_from(
            mpo.cores, bias,
            cache_weight=kwargs.pop("cache_weight", True),
            engine=kwargs.pop("engine", None),
            mode=kwargs.pop("mode", "auto"),
        )
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        return layer

    @classmethod
    def from_linear(
        cls,
        module: nn.Module,
        *,
        in_factors: Sequence[int] | int = 5,
        out_factors: Sequence[int] | int | None = None,
        max_bond: int | None = None,
        rtol: float | None = None,
        **kwargs,
    ) -> "MPOLinear":
        """Decompose an ``nn.Linear`` (or HF ``Conv1D``) into an ``MPOLinear``.

        ``in_factors``/``out_factors`` are factor lists or an int m (balanced factors); lossless
        unless ``max_bond``/``rtol`` is given. Decomposition runs in float32 or wider and the
        cores are cast back to the layer's dtype.
        """
        weight, bias = linear_weight(module)
        out_dim, in_dim = weight.shape
        m = in_factors if isinstance(in_factors, int) else len(in_factors)
        in_f = factorize(in_dim, in_factors)
        out_f = factorize(out_dim, out_factors if out_factors is not None else m)
        w = weight.detach()
        work = w if w.dtype in (torch.float32, torch.float64) else w.float()
        mpo = MPO.from_matrix(work, in_f, out_f, max_bond=max_bond, rtol=rtol).to(w.dtype)
        layer = cls.from_mpo(mpo, bias.detach() if bias is not None else None, **kwargs)
        layer.truncation_error = mpo.truncation_error
        return layer

    # -- views ---------------------------------------------------------------------------------
    @property
    def engine(self) -> ContractionEngine:
        return self._engine or default_engine()

    @property
    def bond_dims(self) -> list[int]:
        return [self.cores[0].shape[0]] + [c.shape[-1] for c in self.cores]

    def to_mpo(self) -> MPO:
        return MPO([c.detach() for c in self.cores])

    def weight(self) -> torch.Tensor:
        """The dense weight ``(out, in)``, differentiable w.r.t. the cores."""
        return self.engine.reconstruct(list(self.cores))

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        dtype=self.cores[0].dtype, device=self.cores[0].device)
        with torch.no_grad():
            lin.weight.copy_(self.weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def explain(self, tokens: int) -> ContractionPlan:
        """The plan (mode and FLOP estimates) the layer would use for ``tokens`` tokens."""
        return self.engine.plan([tuple(c.shape) for c in self.cores], tokens)

    # -- forward -------------------------------------------------------------------------------
    def _cached(self) -> torch.Tensor:
        return self._weight_cache.get(list(self.cores), self.weight)

    def _use_cache(self) -> bool:
        return self.cache_weight and inference_cache_allowed(self, list(self.cores))

    def clear_cache(self) -> None:
        self._weight_cache.clear()

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MPOLinear expected inputs with {self.in_features} features (last dim), got "
                f"shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        use_cache = self._use_cache()
        if self.mode == "auto":
            plan = self.engine.plan(
                [tuple(c.shape) for c in self.cores], x2.shape[0], weight_cached=use_cache
            )
            mode = plan.mode
            self.last_plan = plan
        else:
            mode = self.mode
        if mode == "stream":
            y = self.engine.stream(x2, list(self.cores))
            if self.bias is not None:
                y = y + self.bias
        else:
            W = self._cached() if use_cache else self.weight()
            y = torch.nn.functional.linear(x2, W, self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"in_factors={self.in_factors}, out_factors={self.out_factors}, "
            f"bond_dims={self.bond_dims}, bias={self.bias is not None}"
        )
