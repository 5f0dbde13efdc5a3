"""A matmul whose product is then permuted, computed block by block on CPU.

``matmul_permute(a, b, rows, cols, perm)`` is ``(a @ b).view(*lead, *rows, *cols).permute(perm)``
made contiguous: the last step of rebuilding an MPO matrix, whose GEMM leaves the chain's
interleaved ``(o_L, i_L, o_c, i_c, o_R, i_R)`` order that must become ``(out, in)``. Done in one
go, the product (75 MB for eight 3072x768 experts) is written to memory, read back and written
again. Block by block (a few MiB: a slice of the first row factor, a few matrices of the batch),
each block's permutation reads the GEMM's output from cache; single-threaded, the backward does
the same in reverse (permute a block of the gradient, then its two GEMMs). Measured by
``benchmarks/bench_rebuild.py`` (eight 3072x768 experts, bond 64, 2 CPU cores): the forward in
0.69x the time of the one-go version, forward + backward 0.88x.

Blocks are used only where the permutation keeps the innermost dim (it then moves contiguous
runs; a transposing permutation is as slow from cache as from memory) and each block's GEMM
keeps at least ``MIN_BLOCK_ROWS`` rows. On other devices, in half
precision, under autocast, forward-mode AD, ``torch.func`` transforms or ``torch.compile``, or
when a block would not fit, the one-go version runs (its permutation is cheap on a GPU)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.autograd.forward_ad as fwAD

__all__ = ["matmul_permute", "BLOCK_BYTES"]

#: target size of one block of the product (CPU): a few of them fit in a 32 MiB shared L3
BLOCK_BYTES = 4 * 2**20
#: fewest GEMM rows per block: a block of (192 x 192) x (192 x 12288) cut to 48 rows ran the
#: rebuild 9% slower than one go (2 CPU cores, a masked lossless MPOE step)
MIN_BLOCK_ROWS = 512


def matmul_permute(a: torch.Tensor, b: torch.Tensor, rows: Sequence[int], cols: Sequence[int],
                   perm: Sequence[int], block_bytes: int | None = None,
                   min_block_rows: int | None = None) -> torch.Tensor:
    """``(a @ b)`` viewed as ``(*lead, *rows, *cols)`` and permuted by ``perm`` (over the
    ``len(rows) + len(cols)`` matrix dims), contiguous.

    ``a``: ``(M, K)`` or ``(G, M, K)`` with ``M = prod(rows)``; ``b``: ``(K, N)`` or
    ``(G, K, N)`` with ``N = prod(cols)``; a 2-D operand broadcasts over the other's batch.
    Returns ``(G?, *[(rows + cols)[p] for p in perm])``; differentiable in ``a`` and ``b``
    (twice too: the backward is made of differentiable ops).
    ``block_bytes`` / ``min_block_rows``: block size and fewest GEMM rows per block (defaults
    ``BLOCK_BYTES``, ``MIN_BLOCK_ROWS``)."""
    rows, cols, perm = tuple(rows), tuple(cols), tuple(perm)
    M, K = a.shape[-2:]
    N = b.shape[-1]
    if M != math.prod(rows) or N != math.prod(cols) or sorted(perm) != list(range(len(rows) + len(cols))):
        raise ValueError(f"matmul_permute: rows {rows} / cols {cols} do not factor the product "
                         f"{M}x{N}, or perm {perm} is not a permutation of its {len(rows) + len(cols)} dims")
    lead = tuple(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    blocks = _blocks(a, b, rows, N, perm, block_bytes or BLOCK_BYTES,
                     MIN_BLOCK_ROWS if min_block_rows is None else min_block_rows)
    if blocks is None:
        dims = rows + cols
        out = torch.matmul(a, b).reshape(*lead, *dims).permute(*range(len(lead)), *(len(lead) + p for p in perm))
        return out.contiguous()
    out = _BlockedMatmulPermute.apply(a, b, rows, cols, perm, *blocks)
    return out if lead else out.squeeze(0)


# half precision would add dB's per-block parts in half precision: one go
_BLOCK_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def _plain_ops_only(t: torch.Tensor) -> bool:
    """Forward-mode AD (dual tensors) and torch.func transforms (vmap, grad, jacrev) need plain
    ops: the blocked path is an autograd.Function without jvp or vmap rules."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t) or fwAD.unpack_dual(t).tangent is not None


def _largest_divisor(n: int, limit: float) -> int:
    return max((d for d in range(1, n + 1) if n % d == 0 and d <= limit), default=1)


def _blocks(a: torch.Tensor, b: torch.Tensor, rows: tuple[int, ...], N: int, perm: tuple[int, ...],
            block_bytes: int, min_block_rows: int):
    """``(h, g)``: slices of ``rows[0]`` and matrices of the batch per block, or ``None`` for
    the one-go version."""
    if (a.device.type != "cpu" or b.device.type != "cpu" or a.dtype != b.dtype or a.dtype not in _BLOCK_DTYPES
            or a.dim() > 3 or b.dim() > 3 or not rows
            or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()
            or any(_plain_ops_only(t) for t in (a, b))):
        return None
    if perm[-1] != len(perm) - 1:
        # the innermost dim moves: the permutation is a transpose at element granularity, as
        # slow from cache as from memory (measured: the masked rebuild's W'^T = T^T L^T 3% slower)
        return None
    G = max(a.shape[0] if a.dim() == 3 else 1, b.shape[0] if b.dim() == 3 else 1)
    if (a.dim() == 3 and a.shape[0] not in (1, G)) or (b.dim() == 3 and b.shape[0] not in (1, G)):
        return None
    slice_bytes = math.prod(rows[1:]) * N * a.element_size()  # one index of rows[0], one matrix
    if slice_bytes > block_bytes or G * rows[0] * slice_bytes <= block_bytes:
        return None  # a block would not fit in cache, or one block is the whole product
    h = _largest_divisor(rows[0], block_bytes / slice_bytes)
    if h * math.prod(rows[1:]) < min_block_rows:
        return None
    g = _largest_divisor(G, block_bytes / (h * slice_bytes))
    return h, g


class _BlockedMatmulPermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, rows, cols, perm, h, g):
        a3, b3 = (a if a.dim() == 3 else a.unsqueeze(0)), (b if b.dim() == 3 else b.unsqueeze(0))
        G = max(a3.shape[0], b3.shape[0])
        dims = rows + cols
        Mr, N = math.prod(rows[1:]), math.prod(cols)
        out = torch.empty(G, *[dims[p] for p in perm], dtype=a.dtype, device=a.device)
        buf = torch.empty(g, h * Mr, N, dtype=a.dtype, device=a.device)
        at_dest = perm.index(0)  # where the blocked dim rows[0] sits in the output
        to_dest = (0, *(1 + p for p in perm))
        for e in range(0, G, g):
            for r in range(0, rows[0], h):
                a_blk = (a3[e:e + g] if a3.shape[0] > 1 else a3)[:, r * Mr:(r + h) * Mr]
                b_blk = b3[e:e + g] if b3.shape[0] > 1 else b3
                torch.matmul(a_blk, b_blk, out=buf)
                dest = out[e:e + g].narrow(1 + at_dest, r, h)
                dest.copy_(buf.view(g, h, *rows[1:], *cols).permute(*to_dest))
        ctx.save_for_backward(a, b)
        ctx.layout = (rows, cols, perm, h, g)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # plain differentiable ops (no out=, no in-place), so a double backward works too
        a, b = ctx.saved_tensors
        rows, cols, perm, h, g = ctx.layout
        need_a, need_b = ctx.needs_input_grad[:2]
        a3, b3 = (a if a.dim() == 3 else a.unsqueeze(0)), (b if b.dim() == 3 else b.unsqueeze(0))
        G = grad_out.shape[0]
        Mr, N = math.prod(rows[1:]), math.prod(cols)
        at_dest = perm.index(0)
        to_source = (0, *(1 + perm.index(j) for j in range(len(perm))))
        if torch.get_num_threads() > 1:
            # one go: with several threads, a GEMM reading a block that other threads just wrote
            # (dB = A^T dP reads it by columns) runs ~1.6x slower than on the whole gradient
            # (measured, 2 cores), more than blocking saves; blocks pay off single-threaded
            h, g = rows[0], G
        da_parts, db_parts = [], []
        for e in range(0, G, g):
            a_e = a3[e:e + g] if a3.shape[0] > 1 else a3
            b_e = b3[e:e + g] if b3.shape[0] > 1 else b3
            da_rows, db_e = [], None
            for r in range(0, rows[0], h):
                # the block of dP in the product's own (rows, cols) order, copied from cache-sized runs
                blk = grad_out[e:e + g].narrow(1 + at_dest, r, h).permute(*to_source).reshape(g, h * Mr, N)
                if need_a:  # dA = dP B^T
                    da_rows.append(torch.matmul(blk, b_e.mH))  # mH: complex too
                if need_b:  # dB = A^T dP
                    part = torch.matmul(a_e[:, r * Mr:(r + h) * Mr].mH, blk)
                    db_e = part if db_e is None else db_e + part
            if need_a:
                da_parts.append(torch.cat(da_rows, 1) if len(da_rows) > 1 else da_rows[0])
            if need_b:
                db_parts.append(db_e)
        da = db = None
        if need_a:
            da = torch.cat(da_parts) if len(da_parts) > 1 else da_parts[0]
            da = da.sum(0, keepdim=True) if a3.shape[0] == 1 and G > 1 else da
            da = da.squeeze(0) if a.dim() == 2 else da
        if need_b:
            db = torch.cat(db_parts) if len(db_parts) > 1 else db_parts[0]
            db = db.sum(0, keepdim=True) if b3.shape[0] == 1 and G > 1 else db
            db = db.squeeze(0) if b.dim() == 2 else db
        return da, db, None, None, None, None, None
