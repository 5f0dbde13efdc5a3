"""``MoELayer``: router + dispatch + experts as separate, swappable pieces."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..networks import check_input_dtype
from .context import ContextSlot, padding_mask
from .dispatch import combine, plan_dispatch
from .experts import ExpertFFN
from .losses import load_balancing_loss, router_z_loss
from .routers import Router

__all__ = ["MoELayer", "RoutingStats", "moe_layers", "auxiliary_loss"]


@dataclass
class RoutingStats:
    """Expert load after a forward: ``tokens_per_expert`` ``(E,)`` assignments routed to each
    expert (before capacity), ``kept_per_expert`` ``(E,)`` after it, ``num_tokens`` the tokens
    routed (padding excluded under a token mask); :attr:`dropped` the number of assignments
    dropped by capacity. Tensors stay on the device (reading :attr:`dropped`
    or :attr:`imbalance` syncs)."""

    tokens_per_expert: torch.Tensor
    kept_per_expert: torch.Tensor
    num_tokens: int

    @property
    def dropped(self) -> int:
        return int(self.tokens_per_expert.sum() - self.kept_per_expert.sum())

    @property
    def imbalance(self) -> float:
        """max / mean tokens per expert (1.0 is perfectly balanced)."""
        t = self.tokens_per_expert.float()
        return float(t.max() / t.mean().clamp_min(1e-9))


class MoELayer(nn.Module):
    """Mixture-of-experts FFN. Input ``(..., d_model)`` -> output ``(..., d_model)``.

    After each forward, ``last_aux_loss`` holds ``load_balancing_coef * LB + z_loss_coef * Z``
    (collect with :func:`tnmoe.moe.auxiliary_loss`) and ``last_stats`` the :class:`RoutingStats`.

    Args (keyword-only):
        router: a :class:`~tnmoe.moe.routers.Router`.
        experts: an :class:`~tnmoe.moe.experts.ExpertFFN`.
        load_balancing_coef / z_loss_coef: weights of the auxiliary losses.
        output_dropout: dropout on the layer output (GPT-2's residual dropout lives here).
    """

    def __init__(self, *, router: Router, experts: ExpertFFN, load_balancing_coef: float = 0.01,
                 z_loss_coef: float = 0.0, output_dropout: float = 0.0) -> None:
        super().__init__()
        if router.num_experts != experts.num_experts:
            raise ValueError(
                f"router has {router.num_experts} experts but the expert bank has {experts.num_experts}"
            )
        self.router, self.experts = router, experts
        self.load_balancing_coef, self.z_loss_coef = load_balancing_coef, z_loss_coef
        self.output_dropout = nn.Dropout(output_dropout)
        self.last_aux_loss: torch.Tensor | None = None
        self.last_stats: RoutingStats | None = None
        #: per-call token ids / padding mask, set by the hooks :func:`tnmoe.moe.convert` installs
        self.routing_context = ContextSlot()
        #: set by :func:`tnmoe.moe.convert`: the config it used and the name of the FFN replaced
        self.moe_config = None
        self.converted_from: str | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def forward(self, hidden_states: torch.Tensor, token_ids: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden_states`` ``(..., d_model)`` -> ``(..., d_model)``.

        token_ids: ``hidden_states.shape[:-1]`` ids for hash routing. token_mask: same shape,
        nonzero for the tokens to route; the others (padding) take no expert capacity, do not count
        in the auxiliary losses or :attr:`last_stats`, and get a zero output. When called inside a
        model converted by :func:`tnmoe.moe.convert`, both default to that model call's
        ``input_ids`` (hash routing) and ``attention_mask`` (``ignore_padding=True``).
        """
        shape = hidden_states.shape
        d = self.experts.d_model
        if shape[-1] != d:
            raise ValueError(f"MoELayer expected hidden size {d}, got shape {tuple(shape)}")
        check_input_dtype(hidden_states, next(self.experts.parameters()).dtype, "MoELayer")
        if getattr(self, "_is_replica", False) and self.training and torch.is_grad_enabled() \
                and (self.load_balancing_coef or self.z_loss_coef) and not self.router.uses_token_ids:
            raise RuntimeError(
                "nn.DataParallel (also what transformers' Trainer uses on several GPUs without a distributed "
                "launch) runs this MoE layer on replicas and discards their auxiliary losses, so the routers "
                "would train without load balancing. Use DistributedDataParallel (torchrun / accelerate launch) "
                "or one GPU (CUDA_VISIBLE_DEVICES=0), or set load_balancing_coef and z_loss_coef to 0."
            )
        context = self.routing_context.resolve(hidden_states)
        if context is not None:
            if token_ids is None:
                token_ids = context.token_ids
            if token_mask is None and context.attention_mask is not None:
                token_mask = padding_mask(context.attention_mask, shape[:-1])
        x = hidden_states.reshape(-1, d)
        num_tokens, kept = x.shape[0], None
        if token_mask is not None:
            if token_mask.shape != shape[:-1]:
                raise ValueError(f"token_mask has shape {tuple(token_mask.shape)}; expected "
                                 f"{tuple(shape[:-1])} (the hidden states' shape without d_model)")
            kept = token_mask.reshape(-1).to(x.device).nonzero().squeeze(1)  # host sync
            if kept.numel() == x.shape[0]:
                kept = None  # no padding in this batch
            else:
                x = x.index_select(0, kept)
                if token_ids is not None:
                    token_ids = token_ids.reshape(-1).to(kept.device).index_select(0, kept)
        out = self._route_tokens(x, token_ids)
        if kept is not None:
            out = out.new_zeros(num_tokens, d).index_copy(0, kept, out)
        out = self.output_dropout(out.to(hidden_states.dtype)).reshape(shape)
        if context is not None and context is self.routing_context.current:
            self.routing_context.record(context, hidden_states, out, self.training)
        return out

    def _replicate_for_data_parallel(self) -> "MoELayer":
        # nn.DataParallel replicas run concurrently: each needs its own routing context
        replica = super()._replicate_for_data_parallel()
        replica.routing_context = ContextSlot()
        return replica

    def _route_tokens(self, x: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor:
        """Route ``x`` ``(T, d_model)``; sets :attr:`last_aux_loss` / :attr:`last_stats`."""
        if x.shape[0] == 0:  # an empty batch: nothing to route
            # like nn.Linear's, the empty output (and the zero auxiliary loss) stays in the autograd
            # graph of the input and the parameters, so a training step's backward runs and gives
            # them zero gradients; sums of empty slices, so non-finite parameters cannot make it NaN
            anchor = x.new_zeros((), dtype=torch.float32)
            if torch.is_grad_enabled():
                for t in [x, *self.parameters()]:
                    if t.requires_grad:
                        anchor = anchor + t.reshape(-1)[:0].sum().float()
            self.last_aux_loss = anchor
            zeros = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
            self.last_stats = RoutingStats(zeros, zeros.clone(), 0)
            return x.new_zeros(x.shape) + anchor.to(x.dtype)
        route = self.router(x, token_ids=token_ids)
        plan = plan_dispatch(route.expert_index, self.num_experts, self.router.capacity(x.shape[0]))
        y = self.experts(x.index_select(0, plan.token_index), plan.counts)
        out = combine(y, plan, route.combine_weights)

        aux = x.new_zeros((), dtype=torch.float32)
        if route.router_logits is not None:
            if self.load_balancing_coef:
                aux = aux + self.load_balancing_coef * load_balancing_loss(route.router_probs, route.expert_index)
            if self.z_loss_coef:
                aux = aux + self.z_loss_coef * router_z_loss(route.router_logits)
        self.last_aux_loss = aux
        self.last_stats = RoutingStats(plan.routed_counts.detach(), plan.counts.detach(), x.shape[0])
        return out


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """All :class:`MoELayer` modules of ``model`` as ``(name, module)`` pairs, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]


def auxiliary_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the weighted auxiliary losses of every MoE layer's most recent forward.

    Add it to the task loss: ``loss = task_loss + tnmoe.moe.auxiliary_loss(model)``.
    Zero (a float32 scalar) when the model has no MoE layer or none has run yet.
    """
    total = None
    for _, layer in moe_layers(model):
        aux = layer.last_aux_loss
        if aux is not None:
            total = aux if total is None else total + aux
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total
