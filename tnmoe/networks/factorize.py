"""Factorizations of a dimension into m integer factors (the local dims of an MPO)."""

from __future__ import annotations

import math
import operator
from functools import lru_cache
from typing import Sequence

__all__ = ["factorize", "check_factors", "prime_factors"]


def prime_factors(n: int) -> list[int]:
    """Prime factors of ``n`` in increasing order (with multiplicity)."""
    if n < 1:
        raise ValueError(f"cannot factorize {n}: need a positive integer")
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def as_int(value, what: str) -> int:
    """``value`` as an ``int`` when it is an integer (Python, NumPy or 0-d torch); a float or a
    bool is an error rather than silently truncated."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})") from None


def check_factors(dim: int, factors: Sequence[int], what: str = "dimension") -> list[int]:
    """Validate user-given ``factors`` of ``dim``; returns them as a list of ints."""
    dim = as_int(dim, what)
    factors = [as_int(f, f"a factor of the {what}") for f in factors]
    if len(factors) < 2:
        raise ValueError(f"an MPO needs m >= 2 local tensors, got factors {factors} for {what} {dim}")
    if any(f < 1 for f in factors):
        raise ValueError(f"factors must be positive integers, got {factors} for {what} {dim}")
    if math.prod(factors) != dim:
        raise ValueError(
            f"factors {factors} multiply to {math.prod(factors)}, not to the {what} {dim}; "
            f"pick factors whose product is {dim} (e.g. factorize({dim}, {len(factors)}) = "
            f"{_safe_factorize(dim, len(factors))})"
        )
    return factors


def _safe_factorize(dim: int, m: int) -> list[int] | str:
    try:
        return factorize(dim, m)
    except ValueError:
        return "impossible"


def factorize(dim: int, m: int | Sequence[int]) -> list[int]:
    """Split ``dim`` into ``m`` factors whose product is ``dim``, balanced by a greedy rule
    (largest prime first, to the smallest factor so far). It is not always the most balanced
    split: ``factorize(72, 2) == [12, 6]`` where ``[8, 9]`` exists; pass ``m`` as explicit
    factors for a particular split.

    The factors are ordered "mountain"-like (largest in the middle), matching the MPO literature,
    where the central local tensor carries the largest dims: ``factorize(768, 5) == [3, 4, 4, 4, 4]``
    and ``factorize(3072, 5) == [4, 4, 8, 6, 4]`` (the MPOE paper's). ``m`` may also be a sequence of user-given factors, which is validated and returned.

    Factors of 1 are used only when ``dim`` has fewer than ``m`` prime factors.
    """
    if not isinstance(m, int) and hasattr(m, "__len__"):
        return check_factors(dim, m)
    dim, m = as_int(dim, "dimension"), as_int(m, "m (the number of local tensors)")
    if m < 2:
        raise ValueError(f"an MPO needs m >= 2 local tensors, got m={m}")
    if dim < 1:
        raise ValueError(f"cannot factorize dimension {dim}: need a positive integer")
    return list(_balanced(dim, m))


@lru_cache(maxsize=1024)
def _balanced(dim: int, m: int) -> tuple[int, ...]:
    # Greedy: hand out prime factors, largest first, to the currently smallest bucket; this
    # minimizes the max factor well for the smooth numbers met in practice (768, 3072, 4096, ...).
    primes = sorted(prime_factors(dim), reverse=True)
    buckets = [1] * m
    for p in primes:
        i = min(range(m), key=lambda k: buckets[k])
        buckets[i] *= p
    buckets.sort()
    # Arrange as a mountain: largest in the centre, alternating outwards, ties broken to the left.
    order = sorted(buckets, reverse=True)
    arranged = [0] * m
    centre = (m - 1) // 2
    positions = [centre]
    for step in range(1, m):
        left, right = centre - step, centre + step
        if right < m:
            positions.append(right)
        if left >= 0:
            positions.append(left)
    for value, pos in zip(order, positions[:m]):
        arranged[pos] = value
    return tuple(arranged)
