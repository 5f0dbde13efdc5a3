"""``MPOLinear``: a drop-in ``nn.Linear`` whose weight is a trainable MPO (an ``MPOBank`` of one
matrix)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .bank import MPOBank, check_input_dtype
from .cache import _distributed, serving_key
from .contraction import ContractionEngine, ContractionPlan
from .factorize import factorize
from .mpo import MPO

__all__ = ["MPOLinear", "linear_weight"]

_MODES = ("auto", "stream", "reconstruct")


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


class MPOLinear(MPOBank):
    """Drop-in ``nn.Linear``: ``y = x @ W.T + b`` with ``W = MPO(cores)`` of shape ``(out, in)``.

    Shapes: input ``(..., in_features)`` -> output ``(..., out_features)``; core ``k``:
    ``(r_{k-1}, out_factors[k], in_factors[k], r_k)``. ``layer.weight`` is the rebuilt
    ``(out, in)`` tensor (differentiable), so ``F.linear(x, layer.weight, layer.bias)``
    equals ``layer(x)``.

    Each forward picks ``"stream"`` (tokens through the cores) or ``"reconstruct"`` (rebuild
    ``W``, one matmul) by FLOP estimate for the batch (``mode="auto"``), or as forced by
    ``mode``. The rebuilt weight is served from a cache exactly when the layer is in eval mode,
    no gradient can reach the cores, and ``cache_weights=True``; the cache is reused only while
    every core is unchanged (values compared with a snapshot; inside
    :func:`~tnmoe.networks.frozen_weights` version counters and storages only), see :class:`MPOBank`.

    Args (keyword-only):
        in_features / out_features: dense shape.
        in_factors / out_factors: local dims (default ``factorize(dim, m)``).
        m: number of local tensors when factors are not given.
        max_bond: bond cap (``None``: lossless bonds).
        bias: add a bias (``nn.Linear``'s init).
        init: ``"random"`` (``nn.Linear``'s weight variance) or ``"empty"``.
        engine, cache_weights: see :class:`MPOBank`.
        mode: ``"auto"``, ``"stream"`` or ``"reconstruct"``.

    Attributes:
        truncation_error: Frobenius norm of what the decomposition dropped (``0.0`` unless built
            by :meth:`from_linear` / :meth:`from_mpo` with a truncated MPO).
    """

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
        m: int = 5,
        max_bond: int | None = None,
        bias: bool = True,
        init: str = "random",
        cache_weights: bool = True,
        engine: ContractionEngine | None = None,
        mode: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        in_factors = factorize(in_features, in_factors if in_factors is not None else m)
        out_factors = factorize(out_features, out_factors if out_factors is not None else m)
        super().__init__(num_matrices=1, in_factors=in_factors, out_factors=out_factors, max_bond=max_bond,
                         share="all", init=init, engine=engine, cache_weights=cache_weights,
                         dtype=dtype, device=device)
        self._finish(mode, torch.empty(out_features, dtype=self.cores[0].dtype, device=device) if bias else None)
        if bias and init == "random" and not self.bias.is_meta:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _finish(self, mode: str, bias: torch.Tensor | None, truncation_error: float = 0.0) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.truncation_error = float(truncation_error)

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def from_mpo(cls, mpo: MPO, bias: torch.Tensor | None = None, *, mode: str = "auto",
                 cache_weights: bool = True, engine: ContractionEngine | None = None) -> "MPOLinear":
        """A layer with ``mpo``'s cores (copied) and ``bias`` ``(out,)``."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup([c.detach().clone() for c in mpo.cores], range(mpo.m), 1,
                     engine=engine, cache_weights=cache_weights)
        layer._finish(mode, bias.detach().clone() if bias is not None else None, mpo.truncation_error)
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
        calibration=None,
        target_ratio: float | None = None,
        fit_options: dict | None = None,
        **kwargs,
    ) -> "MPOLinear":
        """Decompose an ``nn.Linear`` (or HF ``Conv1D``) into an ``MPOLinear``.

        ``in_factors``/``out_factors`` are factor lists or an int m (balanced factors); lossless
        unless ``max_bond``/``rtol``/``target_ratio`` is given. With ``calibration`` (the
        layer's inputs ``(N, in)`` or an :class:`~tnmoe.networks.fit.InputCovariance`) the
        cores are fitted to the layer's outputs (:meth:`MPO.from_matrix`); the layer's
        ``fit_report`` then says how. Decomposition runs in float32 or wider and the
        cores are cast back to the layer's dtype. ``kwargs``: ``mode``, ``cache_weights``,
        ``engine``. The result keeps the module's training/eval mode.
        """
        weight, bias = linear_weight(module)
        out_dim, in_dim = weight.shape
        m = in_factors if isinstance(in_factors, int) else len(in_factors)
        in_f = factorize(in_dim, in_factors)
        out_f = factorize(out_dim, out_factors if out_factors is not None else m)
        w = weight.detach()
        work = w if w.dtype in (torch.float32, torch.float64) else w.float()
        mpo = MPO.from_matrix(work, in_f, out_f, max_bond=max_bond, rtol=rtol, calibration=calibration,
                              target_ratio=target_ratio, fit_options=fit_options)
        report = getattr(mpo, "fit_report", None)
        layer = cls.from_mpo(mpo.to(w.dtype), bias.detach() if bias is not None else None, **kwargs)
        layer.fit_report = report  # the data-aware fit's FitReport (None: TT-SVD)
        return layer.train(module.training)

    # -- nn.Linear views -----------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``(out, in)``, differentiable with respect to the cores."""
        return self.weights()[0]

    def to_mpo(self) -> MPO:
        return self.mpo(0)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` holding the rebuilt weight (and the bias)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        dtype=self.cores[0].dtype, device=self.cores[0].device)
        with torch.no_grad():
            lin.weight.copy_(self._rebuild()[0])  # the cores' precision, whatever autocast is on
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.train(self.training)

    def explain(self, tokens: int) -> ContractionPlan:
        """The plan (mode and FLOP estimates) the layer would use for ``tokens`` tokens."""
        return self.plan(tokens)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        serving = self.weight_cache.serving  # the decode fast path: set by the path below
        if (serving is not None and not self.training and not torch.is_grad_enabled() and not _distributed()
                and not torch.compiler.is_compiling()):
            key, (W, in_features, min_tokens, mode, device_type, inference) = serving
            if (x.shape[-1] == in_features and x.dtype == W.dtype and x.numel() >= min_tokens * in_features
                    and self.mode == mode and self.cache_weights and not torch.is_autocast_enabled(device_type)
                    and (not inference or torch.is_inference_mode_enabled())
                    and serving_key(self.core_tensors()) == key):  # every countable write changes it
                self.weight_cache.hits += 1
                return nn.functional.linear(x, W, self.bias)  # live: pruning/parametrizations move it
        cores = self.core_tensors()  # once per call: a forward at a few tokens is Python-bound
        if torch.compiler.is_compiling():  # traced once: no memo state in the graph
            shapes = self.core_shapes
            in_features = math.prod(s[2] for s in shapes)
            thresholds = {cached: self.engine.stream_threshold(shapes, cached) for cached in (False, True)}
        else:
            in_features, thresholds = self._shape_plan(cores)
        if x.shape[-1] != in_features:
            raise ValueError(
                f"MPOLinear expected inputs with {in_features} features (last dim), got "
                f"shape {tuple(x.shape)}"
            )
        check_input_dtype(x, cores[0].dtype, "MPOLinear")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_features)
        use_cache = self.use_weight_cache(cores)
        mode = self.mode
        if mode == "auto":  # inside accumulate_reconstruction the step's weights are rebuilt already
            stream = not (self.accumulating and torch.is_grad_enabled()) and x2.shape[0] < thresholds[use_cache]
            mode = "stream" if stream else "reconstruct"
        bias = self.bias
        if mode == "stream":
            y = self.stream(x2, 0)
            if bias is not None:
                y = y + bias.to(y.dtype)
        else:
            W = (self._cached_weights(cores) if use_cache else self.weights())[0]
            if use_cache and W.dtype == cores[0].dtype and not torch.compiler.is_compiling():
                # served by the fast path above while the cores' key holds (not W cast for autocast)
                self.weight_cache.serve(cores, (W, in_features, 0 if self.mode == "reconstruct" else thresholds[True],
                                                self.mode, cores[0].device.type, W.is_inference()))
            y = nn.functional.linear(x2, W, bias)
        return y.reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"in_factors={self.in_factors}, out_factors={self.out_factors}, "
            f"bond_dims={self.bond_dims}, bias={self.bias is not None}"
        )
