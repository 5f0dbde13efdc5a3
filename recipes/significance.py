"""Paired significance tests between two fine-tuned variants on the same test examples.

A GLUE run keeps its per-example test outputs (``results.json["test"]["examples"]``). Two
variants trained with the same seed saw the same test half, so their outputs pair up example by
example; :func:`paired_bootstrap` resamples the test examples (the same resample for both
variants, independently per seed) and reports the mean over seeds of the metric difference, a
95% interval and a two-sided p-value. :func:`seed_ttest` is the coarser test over seeds.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["batched_metric", "paired_bootstrap", "seed_ttest"]


def batched_metric(name: str, preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """GLUE metric ``name`` (``accuracy``, ``f1``, ``matthews``, ``pearson``) of every row of
    ``preds``/``labels`` ``(B, n)``: ``(B,)``. Binary labels for f1/matthews (positive class 1);
    an undefined value (no positives, constant predictions) is 0, as scikit-learn reports it."""
    p, y = np.atleast_2d(preds).astype(float), np.atleast_2d(labels).astype(float)
    if name == "accuracy":
        return (p == y).mean(axis=1)
    if name == "pearson":
        p = np.where(np.isfinite(p), p, 0.0)
        pc, yc = p - p.mean(axis=1, keepdims=True), y - y.mean(axis=1, keepdims=True)
        den = np.sqrt((pc ** 2).sum(axis=1) * (yc ** 2).sum(axis=1))
        return np.divide((pc * yc).sum(axis=1), den, out=np.zeros(len(p)), where=den > 0)
    tp = ((p == 1) & (y == 1)).sum(axis=1).astype(float)
    tn = ((p != 1) & (y != 1)).sum(axis=1).astype(float)
    fp = ((p == 1) & (y != 1)).sum(axis=1).astype(float)
    fn = ((p != 1) & (y == 1)).sum(axis=1).astype(float)
    if name == "f1":
        den = 2 * tp + fp + fn
        return np.divide(2 * tp, den, out=np.zeros(len(p)), where=den > 0)
    if name == "matthews":
        den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return np.divide(tp * tn - fp * fn, den, out=np.zeros(len(p)), where=den > 0)
    raise ValueError(f"unknown metric {name!r}; use accuracy, f1, matthews or pearson")


def paired_bootstrap(metric: str, pairs: Sequence[tuple[Sequence[float], Sequence[float], Sequence[float]]],
                     resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """``pairs``: one ``(preds_a, preds_b, labels)`` per seed, both variants on the same examples.
    Returns ``diff`` (mean over seeds of metric(a) - metric(b)), ``low``/``high`` (95% percentile
    interval of the resampled mean difference) and ``p`` (two-sided: twice the smaller tail
    of the resampled differences on either side of 0, at most 1)."""
    rng = np.random.default_rng(seed)
    observed, boot = [], np.zeros(resamples)
    for a, b, y in pairs:
        a, b, y = np.asarray(a, float), np.asarray(b, float), np.asarray(y, float)
        if not (len(a) == len(b) == len(y)):
            raise ValueError("paired_bootstrap: both variants need outputs for the same test examples")
        observed.append(batched_metric(metric, a, y)[0] - batched_metric(metric, b, y)[0])
        idx = rng.integers(0, len(y), size=(resamples, len(y)))
        boot += batched_metric(metric, a[idx], y[idx]) - batched_metric(metric, b[idx], y[idx])
    boot /= len(pairs)
    p = min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean()))
    return {"diff": float(np.mean(observed)), "low": float(np.quantile(boot, 0.025)),
            "high": float(np.quantile(boot, 0.975)), "p": float(p), "seeds": len(pairs)}


def seed_ttest(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided paired t-test p-value over seeds (``nan`` with fewer than 2 pairs or no variance)."""
    from scipy.stats import ttest_rel

    if len(a) < 2:
        return float("nan")
    return float(ttest_rel(a, b).pvalue)
