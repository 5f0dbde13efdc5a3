"""Gradient mask (MPOE, Gao et al. 2022, Sec. 3.2 / Algorithm 1).

At each optimizer step, with probability ``p_b`` the update of the masked tensors (by default
the tensors shared by all experts, i.e. MPOE's central tensors) is discarded entirely: their
``.grad`` is set to ``None`` before ``optimizer.step()``, so torch optimizers skip them — no
gradient step, no momentum/Adam-state update and no decoupled weight decay on that step.
``p_b = 1`` freezes them; ``p_b = 0`` is plain training.

Distributed training: under ``torch.distributed`` every rank takes rank 0's decision (each rank
draws from its own generator, then rank 0's draw is broadcast), so the shared tensors stay
identical across ranks whatever seed each rank passed. Every rank of the group must call
:meth:`GradientMask.apply` (and :meth:`~GradientMask.begin_step`): a mask on a model that only
some ranks train needs ``process_group=`` with just those ranks (or a group of one); when the
other ranks never join, the broadcast fails after ``timeout`` seconds with an error saying so
instead of blocking forever. Built from a model, the mask looks its
tensors up by name when it applies, so parameters replaced after it was built (FSDP2
``fully_shard``, ``to_empty``, ``load_state_dict(assign=True)``) are the ones masked.

Resuming: the mask's draws depend on its generator and counters, so save them with the
training state. With the HF ``Trainer``, :class:`tnmoe.moe.GradientMaskCallback` does that. In
a plain loop::

    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "mask": mask.state_dict()}, "ckpt.pt")
    ...
    state = torch.load("ckpt.pt", weights_only=True)
    model.load_state_dict(state["model"]); opt.load_state_dict(state["optimizer"])
    mask.load_state_dict(state["mask"])      # the next apply() draws what it would have drawn
"""

from __future__ import annotations

import time
import warnings
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .layer import moe_layers
from .routed import routed_experts

__all__ = ["GradientMask", "shared_parameters"]

# set on a tensor while a drawn, not yet applied masked step keeps its requires_grad off, so that
# a step that never finished (an exception) is recognized by any later mask on the same tensors
_FROZEN_BY_MASK = "_tnmoe_frozen_by_gradient_mask"


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every tensor shared across experts in the model's MoE layers and routed experts
    (:class:`~tnmoe.moe.routed.RoutedExperts`), each listed once."""
    seen, out = set(), []
    experts = [layer.experts for _, layer in moe_layers(model)] + [m.experts for _, m in routed_experts(model)]
    for ffn in experts:
        for bank in ffn.banks().values():
            for p in bank.shared_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def _parameter_names(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
    """Names (``model.named_parameters()``) of ``params``, in their order."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"{len(missing)} tensors to mask are not parameters of the model")
    return [names[id(p)] for p in params]


def _collective_device(group) -> torch.device:
    """Device of the tensor a broadcast over ``group`` needs: CPU for gloo/mpi, CUDA for nccl."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return accelerator if accelerator is not None else torch.device("cpu")


def _thaw(params: list[nn.Parameter]) -> int:
    for p in params:
        p.requires_grad_(True)
        if hasattr(p, _FROZEN_BY_MASK):
            delattr(p, _FROZEN_BY_MASK)
    return len(params)


class GradientMask:
    """Seeded Bernoulli(p_b) mask over a set of parameters' updates.

    Args:
        target: a model (masks :func:`shared_parameters` of it, looked up by name at each
            :meth:`apply`, so parameters replaced after construction are still found; wrap
            and shard the model as you like, but keep the names) or an iterable of parameters
            (the mask then holds exactly those objects: if they are replaced, e.g. by FSDP or
            ``load_state_dict(assign=True)``, it masks the stale ones, so build it afterwards).
        p_b: probability of discarding the update at a step, in [0, 1].
        seed: seed of the mask's own generator (independent of torch's global RNG). Under
            ``torch.distributed`` the decision is rank 0's whatever the other ranks' seeds.
        process_group: the group whose ranks agree on each decision (default: the world).
        timeout: seconds a decision's broadcast waits for the group's other ranks before it
            raises (they never called :meth:`apply`: a mask used by only some ranks). Default 30
            minutes, like ``torch.distributed``'s gloo default; the process group is unusable
            after such an error.

    Use: after ``loss.backward()`` and before ``optimizer.step()``, call :meth:`apply` (on every
    rank: it is a collective under ``torch.distributed``). Optionally call :meth:`begin_step`
    before the step's first forward: the decision is then drawn up front and, on a masked step,
    the masked tensors get no gradient at all (``requires_grad`` off for the step), so the
    backward skips their contractions; parameters end as with drawing in :meth:`apply`
    (bit-identical where the banks rebuild one matrix at a time, ``reconstruct_strategy="loop"``;
    the ``"batched"`` strategy, chosen on CUDA or after ``retain_freed_cpu_memory()``, rebuilds
    a frozen centre in another order, so there they agree to float rounding), unless gradients
    are clipped by norm: then :meth:`begin_step` leaves the
    masked tensors out of the clipping norm, while :meth:`apply` (after clipping) counts them
    before discarding them, so the kept gradients are scaled slightly differently. (Under DDP
    this needs ``find_unused_parameters=True``, the HF Trainer's default without gradient
    checkpointing.) A step that never reaches :meth:`apply` (an exception) leaves them off until
    :meth:`release` (:class:`~tnmoe.moe.MoETrainer` calls it however training ends,
    :class:`~tnmoe.moe.GradientMaskCallback` when the Trainer is built and when training
    begins) or until a new mask over the same tensors is built (it switches them back on).
    ``masked_steps`` / ``steps`` count
    what happened; :meth:`state_dict` / :meth:`load_state_dict` save and restore the generator
    and counters for exact resumption (see the module docstring).
    """

    def __init__(self, target: nn.Module | Iterable[nn.Parameter], p_b: float = 0.5, *, seed: int = 0,
                 process_group=None, timeout: float | timedelta = 1800.0) -> None:
        if not 0.0 <= float(p_b) <= 1.0:
            raise ValueError(f"p_b must be a probability in [0, 1], got {p_b}")
        timeout = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.p_b = float(p_b)
        if isinstance(target, nn.Module):
            self._model: nn.Module | None = target
            self._names: list[str] = _parameter_names(target, shared_parameters(target))
            self._fixed: list[nn.Parameter] = []
        else:
            self._model, self._names, self._fixed = None, [], list(target)
        if not (self._names or self._fixed):
            raise ValueError(
                "GradientMask has no tensors to mask: the model's MoE layers share no tensor "
                "(share='none'?); pass the parameters to mask explicitly"
            )
        self.process_group = process_group
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.masked_steps = 0
        self._pending: bool | None = None  # drawn by begin_step, consumed by apply
        self._frozen: list[nn.Parameter] = []
        self._thaw_abandoned()

    @property
    def names(self) -> list[str]:
        """Names of the masked parameters in the model (empty when built from a parameter list)."""
        return list(self._names)

    @property
    def params(self) -> list[nn.Parameter]:
        """The masked parameters as they are now (looked up by name when built from a model)."""
        if self._model is None:
            return list(self._fixed)
        out = []
        for name in self._names:
            try:
                out.append(self._model.get_parameter(name))
            except AttributeError:
                raise RuntimeError(
                    f"GradientMask: the model has no parameter {name!r} any more (it was masked when the mask "
                    "was built). Keep module and parameter names when wrapping or sharding the model, or "
                    "build the GradientMask after changing its structure"
                ) from None
        return out

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1

    def sample(self) -> bool:
        """Draw this step's decision: ``True`` means discard the update. Under
        ``torch.distributed`` every rank draws (advancing its generator) and rank 0's draw is
        returned on all ranks (a broadcast: call it on every rank)."""
        masked = bool(torch.rand((), generator=self._gen).item() < self.p_b)
        if not self._distributed():
            return masked
        group = self.process_group
        flag = torch.tensor([int(masked)], dtype=torch.uint8, device=_collective_device(group))
        work = dist.broadcast(flag, src=0 if group is None else dist.get_global_rank(group, 0), group=group,
                              async_op=True)
        self._wait(work, group)
        return bool(flag.item())

    def _wait(self, work, group) -> None:
        """Wait for the decision's broadcast; ``RuntimeError`` after :attr:`timeout` seconds."""
        deadline, pause = time.monotonic() + self.timeout, 0.0
        while not work.is_completed():
            if time.monotonic() > deadline:
                ranks = dist.get_world_size(group)
                raise RuntimeError(
                    f"GradientMask: the broadcast of this step's mask decision waited {self.timeout:g} s for the "
                    f"other ranks of its process group ({ranks} ranks{', the world' if group is None else ''}); "
                    "every rank of the group must call apply() (and begin_step()) each step. If only some ranks "
                    "train this model, build the mask with process_group= a group of just those ranks "
                    "(dist.new_group(ranks)); the process group is unusable after this error"
                )
            time.sleep(pause)
            pause = min(0.01, pause * 2 or 1e-5)
        work.wait()

    def begin_step(self) -> bool:
        """Draw this step's decision before its forward; if masked, switch ``requires_grad``
        off on the targets until :meth:`apply`, so no gradient is computed for them. Returns
        whether the step is masked. Calling it again before :meth:`apply` keeps the decision."""
        if self._pending is not None:
            return self._pending
        params = self.params
        self._pending = self.sample()
        if self._pending:
            self._frozen = [p for p in params if p.requires_grad]
            for p in self._frozen:
                p.requires_grad_(False)
                setattr(p, _FROZEN_BY_MASK, True)
        return self._pending

    def apply(self) -> bool:
        """Take this step's decision (drawn now, or by :meth:`begin_step`) and if masked set
        the targets' grads to ``None``. Returns whether it masked."""
        params = self.params  # resolve first: a missing parameter fails before the draw
        if self._pending is None:
            masked = self.sample()
        else:
            masked, self._pending = self._pending, None
            _thaw(self._frozen)
            self._frozen = []
        self.steps += 1
        if masked:
            self.masked_steps += 1
            for p in params:
                p.grad = None
        return masked

    def release(self) -> int:
        """Cancel a decision :meth:`begin_step` drew and no :meth:`apply` took (a step that never
        finished: an exception, an interrupt): ``requires_grad`` comes back on the tensors it
        switched off. The counters do not change; the next step draws a new decision. Tensors
        that another mask's unfinished step switched off come back too. Returns how many tensors
        came back."""
        thawed = _thaw(self._frozen) + self._thaw_abandoned(warn=False)
        self._pending, self._frozen = None, []
        return thawed

    def _thaw_abandoned(self, warn: bool = True) -> int:
        """Switch ``requires_grad`` back on for targets that a masked step which never finished
        left off (e.g. an interrupted run of another mask, without :meth:`release`)."""
        stale = [p for p in self.params if getattr(p, _FROZEN_BY_MASK, False)]
        if stale and warn:
            warnings.warn(f"GradientMask: {len(stale)} masked tensors still had requires_grad off from a masked "
                          "step that never finished (an interrupted run); switched back on")
        return _thaw(stale)

    def state_dict(self) -> dict:
        """``{"p_b", "seed", "steps", "masked_steps", "rng"}`` (``rng``: the generator's ``uint8``
        state tensor); ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it."""
        return {"p_b": self.p_b, "seed": self.seed, "steps": self.steps,
                "masked_steps": self.masked_steps, "rng": self._gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned: the next draws continue its sequence. The
        saved ``p_b`` and ``seed`` replace the constructor's (a warning says when they differ)."""
        if float(state["p_b"]) != self.p_b or state["seed"] != self.seed:
            warnings.warn(f"GradientMask.load_state_dict: the saved state has p_b={float(state['p_b'])}, "
                          f"seed={state['seed']}, this mask was built with p_b={self.p_b}, seed={self.seed}; "
                          "continuing the saved run's mask (set mask.p_b afterwards to change it)")
        self.p_b, self.seed = float(state["p_b"]), state["seed"]
        self.steps, self.masked_steps = int(state["steps"]), int(state["masked_steps"])
        self._gen.set_state(state["rng"])

    def __repr__(self) -> str:
        return (f"GradientMask(p_b={self.p_b}, tensors={len(self._names) or len(self._fixed)}, "
                f"masked {self.masked_steps}/{self.steps} steps)")
