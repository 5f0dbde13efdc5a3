"""Gradient mask (MPOE, Gao et al. 2022, Sec. 3.2 / Algorithm 1).

At each optimizer step, with probability ``p_b`` the update of the masked tensors (by default
the tensors shared by all experts, i.e. MPOE's central tensors) is discarded entirely: their
``.grad`` is set to ``None`` before ``optimizer.step()``, so torch optimizers skip them — no
gradient step, no momentum/Adam-state update and no decoupled weight decay on that step.
``p_b = 1`` freezes them; ``p_b = 0`` is plain training.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .layer import moe_layers

__all__ = ["GradientMask", "shared_parameters"]


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every tensor shared across experts in the model's MoE layers (each listed once)."""
    seen, out = set(), []
    for _, layer in moe_layers(model):
        for bank in layer.experts.banks().values():
            for p in bank.shared_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


class GradientMask:
    """Seeded Bernoulli(p_b) mask over a set of parameters' updates.

    Args:
        target: a model (masks :func:`shared_parameters` of it) or an iterable of parameters.
        p_b: probability of discarding the update at a step, in [0, 1].
        seed: seed of the mask's own generator (independent of torch's global RNG).

    Use: after ``loss.backward()`` and before ``optimizer.step()``, call :meth:`apply`.
    ``masked_steps`` / ``steps`` count what happened.
    """

    def __init__(self, target: nn.Module | Iterable[nn.Parameter], p_b: float = 0.5, *, seed: int = 0) -> None:
        if not 0.0 <= float(p_b) <= 1.0:
            raise ValueError(f"p_b must be a probability in [0, 1], got {p_b}")
        self.p_b = float(p_b)
        self.params = shared_parameters(target) if isinstance(target, nn.Module) else list(target)
        if not self.params:
            raise ValueError(
                "GradientMask has no tensors to mask: the model's MoE layers share no tensor "
                "(share='none'?); pass the parameters to mask explicitly"
            )
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.masked_steps = 0

    def sample(self) -> bool:
        """Draw this step's decision: ``True`` means discard the update."""
        return bool(torch.rand((), generator=self._gen).item() < self.p_b)

    def apply(self) -> bool:
        """Draw, and if masked set the targets' grads to ``None``. Returns whether it masked."""
        masked = self.sample()
        self.steps += 1
        if masked:
            self.masked_steps += 1
            for p in self.params:
                p.grad = None
        return masked

    def state_dict(self) -> dict:
        return {"p_b": self.p_b, "seed": self.seed, "steps": self.steps,
                "masked_steps": self.masked_steps, "rng": self._gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.p_b, self.seed = state["p_b"], state["seed"]
        self.steps, self.masked_steps = state["steps"], state["masked_steps"]
        self._gen.set_state(state["rng"])

    def __repr__(self) -> str:
        return (f"GradientMask(p_b={self.p_b}, tensors={len(self.params)}, "
                f"masked {self.masked_steps}/{self.steps} steps)")
