"""The grouped expert matmul: tokens grouped by expert times each expert's matrix.

One entry point, :func:`grouped_linear`, the hook through which every expert bank runs its
matmuls. It is a ``torch.library`` custom op with its own backward, so ``torch.compile`` sees
one opaque node (no graph break, no data-dependent shapes) whatever runs inside:
``torch._grouped_mm`` where it takes the operands (one call; group offsets stay on the device),
else one matmul per expert (the fallback, which reads the group sizes on the host).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["grouped_linear", "grouped_mm_supported", "GROUPED_IMPLS"]

GROUPED_IMPLS = ("auto", "grouped_mm", "loop")
_GROUPED_MM_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}


def grouped_mm_supported(x: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: present in this torch, a supported
    device/dtype (CPU: float32/bfloat16/float16; CUDA: bfloat16 on compute capability >= 9.0),
    and rows of 16-byte multiples (``in`` and ``out`` features)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != W.dtype:
        return False
    kind = x.device.type
    if x.dtype not in _GROUPED_MM_DTYPES.get(kind, ()):
        return False
    if kind == "cuda" and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return (W.shape[-1] * W.element_size()) % 16 == 0 and (W.shape[-2] * W.element_size()) % 16 == 0


def _use_grouped_mm(impl: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    return impl == "grouped_mm" or (impl == "auto" and grouped_mm_supported(a, b))


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0).to(torch.int32)


def _forward(x: torch.Tensor, W: torch.Tensor, counts: torch.Tensor, impl: str) -> torch.Tensor:
    if _use_grouped_mm(impl, x, W):
        return torch._grouped_mm(x, W.transpose(-2, -1), offs=_offsets(counts))
    out = x.new_empty(x.shape[0], W.shape[-2])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            torch.mm(x[start:start + n], W[e].t(), out=out[start:start + n])
            start += n
    return out


@torch.library.custom_op("tnmoe::grouped_linear", mutates_args=())
def _grouped_linear_op(x: torch.Tensor, W: torch.Tensor, counts: torch.Tensor, impl: str) -> torch.Tensor:
    return _forward(x, W, counts, impl)


@_grouped_linear_op.register_fake
def _(x, W, counts, impl):
    return x.new_empty(x.shape[0], W.shape[-2])


@torch.library.custom_op("tnmoe::grouped_linear_backward", mutates_args=())
def _grouped_linear_backward_op(grad: torch.Tensor, x: torch.Tensor, W: torch.Tensor, counts: torch.Tensor,
                                impl: str, need_x: bool, need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x = _forward(grad, W.transpose(-2, -1), counts, impl) if need_x else x.new_zeros(0)
    if not need_w:
        return grad_x, W.new_zeros(0)
    if _use_grouped_mm(impl, x, W):  # ragged contraction dim: (out, A) x (A, in) per group
        return grad_x, torch._grouped_mm(grad.t(), x, offs=_offsets(counts))
    grad_w = torch.zeros_like(W)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            torch.mm(grad[start:start + n].t(), x[start:start + n], out=grad_w[e])
            start += n
    return grad_x, grad_w


@_grouped_linear_backward_op.register_fake
def _(grad, x, W, counts, impl, need_x, need_w):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0)), (W.new_empty(W.shape) if need_w else W.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, W, counts, impl = inputs
    ctx.save_for_backward(x, W, counts)
    ctx.impl = impl


def _backward(ctx, grad):
    x, W, counts = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_w = _grouped_linear_backward_op(grad.contiguous(), x, W, counts, ctx.impl, need_x, need_w)
    return (grad_x if need_x else None), (grad_w if need_w else None), None, None


_grouped_linear_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_linear(x: torch.Tensor, W: torch.Tensor, counts: torch.Tensor | Sequence[int],
                   impl: str = "auto") -> torch.Tensor:
    """Tokens ``x`` ``(A, in)`` grouped by expert (the first ``counts[0]`` rows to expert 0,
    ...) times each expert's ``W[e]`` ``(out, in)``: ``(A, out)``.

    ``impl``: ``"grouped_mm"`` (one ``torch._grouped_mm`` call), ``"loop"`` (one matmul per
    expert with tokens) or ``"auto"`` (grouped_mm where :func:`grouped_mm_supported`, else
    loop). Under ``torch.autocast`` both operands are cast to the autocast dtype, as
    ``nn.Linear`` does (float64 ones are left alone, as autocast does).
    """
    if impl not in GROUPED_IMPLS:
        raise ValueError(f"impl must be one of {GROUPED_IMPLS}, got {impl!r}")
    if W.dim() != 3 or W.shape[-1] != x.shape[-1]:
        raise ValueError(f"W must be (E, out, {x.shape[-1]}), got {tuple(W.shape)}")
    counts = torch.as_tensor(counts, device=x.device)
    if torch.is_autocast_enabled(x.device.type) and torch.float64 not in (x.dtype, W.dtype):
        dtype = torch.get_autocast_dtype(x.device.type)  # autocast leaves float64 alone, as for nn.Linear
        x, W = x.to(dtype), W.to(dtype)
    elif x.dtype != W.dtype:
        raise ValueError(f"grouped_linear: input dtype {x.dtype} does not match the weights' {W.dtype}")
    return _grouped_linear_op(x.contiguous(), W, counts, impl)

