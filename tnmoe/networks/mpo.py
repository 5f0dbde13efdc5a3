"""Matrix product operators (tensor-train matrices) and general tensor trains."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .contraction import ContractionEngine, default_engine
from .decompose import (
    SVDTruncation,
    _work_dtype,
    check_finite,
    lossless_bond_dims,
    move_center,
    truncate_train,
    tt_svd,
)
from .factorize import check_factors

__all__ = ["MPO", "TensorTrain", "mpo_bond_dims", "mpo_core_shapes"]


def mpo_bond_dims(
    in_factors: Sequence[int], out_factors: Sequence[int], max_bond: int | None = None
) -> list[int]:
    """Bond dims ``[1, r_1, ..., 1]`` of the exact (optionally capped) MPO of an
    ``(prod(out_factors), prod(in_factors))`` matrix: no weights needed."""
    if len(in_factors) != len(out_factors):
        raise ValueError(
            f"in_factors {list(in_factors)} and out_factors {list(out_factors)} must have the "
            "same length m (one input and one output factor per local tensor)"
        )
    return lossless_bond_dims([o * i for o, i in zip(out_factors, in_factors)], max_bond)


def mpo_core_shapes(
    in_factors: Sequence[int], out_factors: Sequence[int], max_bond: int | None = None
) -> list[tuple[int, int, int, int]]:
    """Core shapes ``(r_{k-1}, out_k, in_k, r_k)`` of :func:`mpo_bond_dims`'s MPO."""
    bonds = mpo_bond_dims(in_factors, out_factors, max_bond)
    return [(bonds[k], o, i, bonds[k + 1]) for k, (o, i) in enumerate(zip(out_factors, in_factors))]


class TensorTrain:
    """A tensor train: cores ``(r_{k-1}, n_k, r_k)`` with ``r_0 = r_N = 1`` for an N-d tensor."""

    def __init__(self, cores: Sequence[torch.Tensor], truncation: SVDTruncation | None = None):
        cores = list(cores)
        if len(cores) < 2:
            raise ValueError(f"a tensor train needs at least 2 cores, got {len(cores)}")
        for k, c in enumerate(cores):
            if c.dim() != 3:
                raise ValueError(f"core {k} must be 3-d (r, n, r'), got shape {tuple(c.shape)}")
        _check_chain([c.shape[0] for c in cores], [c.shape[-1] for c in cores])
        self.cores = cores
        self.truncation = truncation or SVDTruncation([0.0] * (len(cores) - 1))

    @classmethod
    def from_tensor(
        cls, tensor: torch.Tensor, max_bond: int | None = None, rtol: float | None = None
    ) -> "TensorTrain":
        """TT-SVD of ``tensor``; exact unless ``max_bond``/``rtol`` truncate."""
        cores, info = tt_svd(tensor, max_bond=max_bond, rtol=rtol)
        return cls([c.to(tensor.dtype) if tensor.is_floating_point() else c for c in cores], info)

    def to_tensor(self, engine: ContractionEngine | None = None) -> torch.Tensor:
        engine = engine or default_engine()
        import opt_einsum as oe

        m = len(self.cores)
        bonds = [oe.get_symbol(k) for k in range(m + 1)]
        sites = [oe.get_symbol(m + 1 + k) for k in range(m)]
        eq = ",".join(bonds[k] + sites[k] + bonds[k + 1] for k in range(m)) + "->" + "".join(sites)
        return engine.contract(eq, *self.cores)

    @property
    def bond_dims(self) -> list[int]:
        return [self.cores[0].shape[0]] + [c.shape[-1] for c in self.cores]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(c.shape[1] for c in self.cores)

    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    def __repr__(self) -> str:
        return f"TensorTrain(shape={self.shape}, bond_dims={self.bond_dims}, params={self.num_params()})"


def spread(t: torch.Tensor) -> float:
    """Sample standard deviation of ``t``'s entries; ``|t|`` for a single entry, which has none
    (a 1x1 matrix, or a core of bond and factor dims 1)."""
    return float(t.std() if t.numel() > 1 else t.abs().max())


def scale_cores_to_std(cores: Sequence[torch.Tensor], std: float,
                       scalable: Sequence[bool] | None = None) -> list[torch.Tensor]:
    """``cores`` with the ``scalable`` ones (default all) multiplied by one common factor so that
    the matrix they build has standard deviation ``std`` (:func:`spread`)."""
    scalable = [True] * len(cores) if scalable is None else list(scalable)
    actual = spread(MPO(list(cores)).to_matrix())
    per_core = (std / max(actual, 1e-300)) ** (1.0 / sum(scalable))
    return [c * per_core if s else c for c, s in zip(cores, scalable)]


def _check_chain(lefts: Sequence[int], rights: Sequence[int]) -> None:
    if lefts[0] != 1 or rights[-1] != 1:
        raise ValueError(
            f"the boundary bonds must be 1, got r_0={lefts[0]} and r_m={rights[-1]}"
        )
    for k in range(len(lefts) - 1):
        if rights[k] != lefts[k + 1]:
            raise ValueError(
                f"mismatched core shapes: core {k} has right bond {rights[k]} but core {k + 1} "
                f"has left bond {lefts[k + 1]}"
            )
        if rights[k] < 1:
            raise ValueError(f"bond {k + 1} must be positive, got {rights[k]}")


class MPO:
    """Matrix product operator of a matrix ``W`` of shape ``(out, in) = (prod(out_factors),
    prod(in_factors))`` — the ``nn.Linear.weight`` layout, so ``y = x @ W.T``.

    Core ``k`` has shape ``(r_{k-1}, out_k, in_k, r_k)`` with ``r_0 = r_m = 1``;
    ``W[(o_1..o_m), (i_1..i_m)] = G_1[:, o_1, i_1, :] @ ... @ G_m[:, o_m, i_m, :]``
    (row-major multi-indices).

    Attributes:
        cores: list of m tensors.
        truncation: discarded singular-value norms per cut from the last decomposition/truncation.
        center: index of the orthogonality centre, or ``None`` if not in canonical form.
    """

    def __init__(
        self,
        cores: Sequence[torch.Tensor],
        truncation: SVDTruncation | None = None,
        center: int | None = None,
    ) -> None:
        cores = list(cores)
        if len(cores) < 2:
            raise ValueError(f"an MPO needs m >= 2 local tensors, got {len(cores)}")
        for k, c in enumerate(cores):
            if c.dim() != 4:
                raise ValueError(
                    f"MPO core {k} must be 4-d (r_left, out, in, r_right), got shape {tuple(c.shape)}"
                )
        _check_chain([c.shape[0] for c in cores], [c.shape[-1] for c in cores])
        self.cores = cores
        self.truncation = truncation or SVDTruncation([0.0] * (len(cores) - 1))
        self.center = center

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_matrix(
        cls,
        W: torch.Tensor,
        in_factors: Sequence[int],
        out_factors: Sequence[int],
        max_bond: int | None = None,
        rtol: float | None = None,
        center: int | str | None = "central",
        *,
        calibration=None,
        target_ratio: float | None = None,
        fit_options: dict | None = None,
        bond_dims: Sequence[int] | None = None,
    ) -> "MPO":
        """TT-SVD of ``W`` (shape ``(prod(out_factors), prod(in_factors))``), or with
        ``calibration`` the data-aware fit of :func:`tnmoe.networks.fit.fit_mpo_bank`.

        Args:
            W: the matrix (``nn.Linear.weight`` layout).
            in_factors / out_factors: m factors of the column / row dimension.
            max_bond: cap on every bond dimension (``None``: lossless).
            rtol: relative Frobenius tolerance for truncation (``None``: lossless; not with
                ``calibration`` or ``target_ratio``).
            center: where to put the orthogonality centre: ``"central"`` (core ``(m-1)//2``,
                so the central tensor carries the singular values, as in MPOE), an index, or
                ``None`` to keep TT-SVD's left-canonical output (centre on the last core).
            calibration: the layer's inputs ``(N, in)`` or an
                :class:`~tnmoe.networks.fit.InputCovariance`: fit the cores to minimise the
                output error ``||(W - Ŵ) X^T||`` instead of ``||W - Ŵ||``; the returned MPO's
                ``fit_report`` says what the fit did.
            target_ratio: keep this fraction of ``W``'s parameters, bonds chosen by the error
                each costs (:func:`~tnmoe.networks.fit.allocate_bonds`; whitened by
                ``calibration`` when given); instead of ``max_bond``.
            fit_options: keyword arguments of ``fit_mpo_bank`` (``sweeps``, ``progress``, ...).
            bond_dims: the m-1 inner bonds (each capped at lossless), instead of ``max_bond`` /
                ``target_ratio`` (e.g. bonds a budget chose across several matrices).
        """
        if calibration is not None or target_ratio is not None or bond_dims is not None:
            return cls._from_matrix_budgeted(W, in_factors, out_factors, max_bond, rtol, center,
                                             calibration, target_ratio, fit_options, bond_dims)
        if W.dim() != 2:
            raise ValueError(f"from_matrix needs a 2-d matrix, got shape {tuple(W.shape)}")
        if len(in_factors) != len(out_factors):
            raise ValueError(
                f"in_factors {list(in_factors)} and out_factors {list(out_factors)} must have the "
                "same length m"
            )
        out_dim, in_dim = W.shape
        in_factors = check_factors(in_dim, in_factors, "input (column) dimension")
        out_factors = check_factors(out_dim, out_factors, "output (row) dimension")
        check_finite(W, "the matrix W")
        m = len(in_factors)
        t = W.reshape(*out_factors, *in_factors)
        perm = [p for k in range(m) for p in (k, m + k)]  # (o1, i1, o2, i2, ...)
        t = t.permute(perm).reshape([o * i for o, i in zip(out_factors, in_factors)])
        cores3, info = tt_svd(t, max_bond=max_bond, rtol=rtol)
        c = _resolve_center(center, m)
        if c is not None and c != m - 1:
            cores3 = move_center(cores3, c)
        # back to W's dtype, as TensorTrain.from_tensor does (complex W: already; integer W: float32)
        cores = [
            g.reshape(g.shape[0], o, i, g.shape[-1]).to(W.dtype if W.is_floating_point() else g.dtype)
            for g, o, i in zip(cores3, out_factors, in_factors)
        ]
        return cls(cores, info, center=m - 1 if c is None else c)

    @classmethod
    def _from_matrix_budgeted(cls, W, in_factors, out_factors, max_bond, rtol, center, calibration,
                              target_ratio, fit_options, bond_dims=None) -> "MPO":
        from .fit import allocate_bonds, fit_mpo_bank, resolve_bonds, tt_svd_with_bonds

        if rtol is not None:
            raise ValueError("rtol does not combine with calibration=, target_ratio= or bond_dims=: give max_bond "
                             "or target_ratio")
        if sum(x is not None for x in (target_ratio, max_bond, bond_dims)) > 1:
            raise ValueError("give one of max_bond, target_ratio and bond_dims")
        if W.dim() != 2:
            raise ValueError(f"from_matrix needs a 2-d matrix, got shape {tuple(W.shape)}")
        out_dim, in_dim = W.shape
        in_factors = check_factors(in_dim, in_factors, "input (column) dimension")
        out_factors = check_factors(out_dim, out_factors, "output (row) dimension")
        check_finite(W, "the matrix W")
        work = W.detach().to(torch.float64)
        bonds = None if bond_dims is None else resolve_bonds(in_factors, out_factors, None, bond_dims)
        if target_ratio is not None:
            bonds = allocate_bonds([work], [(in_factors, out_factors)], target_ratio,
                                   None if calibration is None else [calibration])[0]
        report = None
        if calibration is None:
            cores = tt_svd_with_bonds(work, in_factors, out_factors, bonds)  # bonds set: ratio or bond_dims given
        else:
            stacked, report = fit_mpo_bank(work, in_factors, out_factors, calibration=calibration,
                                           max_bond=None if bonds is not None else max_bond,
                                           bond_dims=bonds, **(fit_options or {}))
            cores = [c[0] for c in stacked]
        dense = work.norm()
        error = float((MPO(cores).to_matrix() - work).norm()) if float(dense) > 0 else 0.0
        mpo = MPO(cores, SVDTruncation([error] + [0.0] * (len(cores) - 2)))  # exact error as the bound
        c = _resolve_center(center, mpo.m)
        if c is not None:
            mpo = mpo.canonicalize(c)
        out = mpo.to(W.dtype if W.is_floating_point() else torch.float32)
        out.fit_report = report
        return out

    @classmethod
    def random(
        cls,
        in_factors: Sequence[int],
        out_factors: Sequence[int],
        bond_dims: Sequence[int] | int,
        *,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        std: float | None = None,
    ) -> "MPO":
        """Random Gaussian cores with the given inner bond dims (a list of m-1 ints, or one int).

        With ``std``, the cores are rescaled evenly so the reconstructed matrix has that standard
        deviation (e.g. ``1 / sqrt(3 * in)``, the variance of ``nn.Linear``'s default init).
        """
        m = len(in_factors)
        if isinstance(bond_dims, int):
            inner = [min(bond_dims, b) for b in mpo_bond_dims(in_factors, out_factors)[1:-1]]
        else:
            inner = list(bond_dims)
        if len(inner) != m - 1 or any(int(b) < 1 for b in inner):
            raise ValueError(f"need m-1={m - 1} positive bond dims, got {list(bond_dims)}")
        bonds = [1, *inner, 1]
        cores = []
        for k in range(m):
            shape = (bonds[k], out_factors[k], in_factors[k], bonds[k + 1])
            scale = 1.0 / math.sqrt(bonds[k] * in_factors[k])
            cores.append(torch.randn(shape, dtype=torch.float64, generator=generator) * scale)
        if std is not None:
            cores = scale_cores_to_std(cores, std)
        return cls([c.to(dtype) for c in cores])

    # -- properties ----------------------------------------------------------------------------
    @property
    def m(self) -> int:
        return len(self.cores)

    @property
    def in_factors(self) -> list[int]:
        return [c.shape[2] for c in self.cores]

    @property
    def out_factors(self) -> list[int]:
        return [c.shape[1] for c in self.cores]

    @property
    def shape(self) -> tuple[int, int]:
        return (math.prod(self.out_factors), math.prod(self.in_factors))

    @property
    def bond_dims(self) -> list[int]:
        return [self.cores[0].shape[0]] + [c.shape[-1] for c in self.cores]

    @property
    def core_sizes(self) -> list[int]:
        return [c.numel() for c in self.cores]

    def num_params(self) -> int:
        return sum(self.core_sizes)

    @property
    def truncation_error(self) -> float:
        """Frobenius-norm bound on the error the last truncation introduced (tight for one cut)."""
        return self.truncation.error_bound

    @property
    def dtype(self) -> torch.dtype:
        return self.cores[0].dtype

    # -- algebra -------------------------------------------------------------------------------
    def to_matrix(self, engine: ContractionEngine | None = None) -> torch.Tensor:
        """Contract the cores back into ``W`` of shape ``(out, in)``."""
        return (engine or default_engine()).reconstruct(self.cores)

    def apply(self, x: torch.Tensor, engine: ContractionEngine | None = None) -> torch.Tensor:
        """``x @ W.T`` for ``x`` of shape ``(..., in)``, by the cheaper contraction for its size."""
        engine = engine or default_engine()
        if x.shape[-1] != self.shape[1]:
            raise ValueError(f"expected inputs with {self.shape[1]} features, got {x.shape[-1]}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.shape[1])
        plan = engine.plan([tuple(c.shape) for c in self.cores], x2.shape[0])
        if plan.mode == "stream":
            y = engine.stream(x2, self.cores)
        else:
            y = x2 @ engine.reconstruct(self.cores).T
        return y.reshape(*lead, self.shape[0])

    def canonicalize(self, center: int | str = "central") -> "MPO":
        """Exact mixed-canonical form (QR sweeps) with the orthogonality centre at ``center``."""
        c = _resolve_center(center, self.m)
        cores3 = move_center([_to3(g) for g in self.cores], c)
        return MPO([g.to(self.dtype) for g in _to4(cores3, self)], self.truncation, center=c)

    def truncate(
        self,
        max_bond: int | None = None,
        rtol: float | None = None,
        center: int | str | None = "central",
    ) -> "MPO":
        """SVD-truncate the bonds (optimal per cut given orthogonal surroundings).

        Returns a new MPO whose :attr:`truncation_error` is the Frobenius error this call added
        (a bound; exact for a single cut). Canonicalized to ``center`` afterwards.
        """
        cores3, info = truncate_train([_to3(g) for g in self.cores], max_bond=max_bond, rtol=rtol)
        c = _resolve_center(center, self.m)
        if c is not None and c != 0:  # truncate_train leaves the centre on core 0
            cores3 = move_center(cores3, c)
        return MPO([g.to(self.dtype) for g in _to4(cores3, self)], info, center=0 if c is None else c)

    def to(self, *args, **kwargs) -> "MPO":
        return MPO([c.to(*args, **kwargs) for c in self.cores], self.truncation, self.center)

    def __repr__(self) -> str:
        return (
            f"MPO(shape={self.shape}, out_factors={self.out_factors}, in_factors={self.in_factors}, "
            f"bond_dims={self.bond_dims}, params={self.num_params()})"
        )


def _resolve_center(center: int | str | None, m: int) -> int | None:
    if center is None:
        return None
    if center == "central":
        return (m - 1) // 2
    if isinstance(center, str):
        raise ValueError(f"center must be 'central', an int or None, got {center!r}")
    c = int(center) + m if int(center) < 0 else int(center)
    if not 0 <= c < m:
        raise ValueError(f"center must be in [-{m}, {m - 1}] for an MPO of {m} cores, got {center}")
    return c


def _to3(g: torch.Tensor) -> torch.Tensor:
    """``(r, o, i, r')`` -> ``(r, o*i, r')`` in a dtype QR/SVD accept (half precision -> float32)."""
    return g.to(_work_dtype(g)).reshape(g.shape[0], g.shape[1] * g.shape[2], g.shape[3])


def _to4(cores3: Sequence[torch.Tensor], like: MPO) -> list[torch.Tensor]:
    return [
        g.reshape(g.shape[0], o, i, g.shape[-1])
        for g, o, i in zip(cores3, like.out_factors, like.in_factors)
    ]
