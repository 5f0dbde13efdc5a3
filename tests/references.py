"""Naive references the tests compare against (no contraction engine, no caches)."""

import torch


def naive_matrix(cores):
    """W (out, in) from cores (r, o, i, r') by explicit left-to-right products (no engine)."""
    acc = cores[0][0]  # (o1, i1, r1)
    out, inn = acc.shape[0], acc.shape[1]
    acc = acc.reshape(out, inn, -1)
    for c in cores[1:]:
        r, o, i, r2 = c.shape
        acc = torch.einsum("abr,rcds->acbds", acc, c).reshape(out * o, inn * i, r2)
        out, inn = out * o, inn * i
    return acc[..., 0]
