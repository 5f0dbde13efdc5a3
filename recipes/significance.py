"""Paired significance tests between two fine-tuned variants on the same test examples.

A GLUE run keeps its per-example test outputs (``results.json["test"]["examples"]``: predictions,
labels and the examples' dev-set ids). Two variants trained with the same seed saw the same test
half, so their outputs pair up example by example. :func:`paired_bootstrap` resamples the test
examples (the same resample for both variants) and reports the mean over seeds of the metric
difference, a 95% interval and a two-sided p-value. The seeds' test halves are different shuffles
of one dev set and overlap; with ``ids`` the resample is drawn over the dev examples jointly for
all seeds, so an example shared by two seeds is counted as one. The test holds the trained
models fixed (it measures test-set sampling, not training variance); :func:`seed_ttest` is the
coarse test over seeds.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["batched_metric", "paired_bootstrap", "seed_ttest"]


def batched_metric(name: str, preds: np.ndarray, labels: np.ndarray,
                   weights: np.ndarray | None = None) -> np.ndarray:
    """GLUE metric ``name`` (``accuracy``, ``f1``, ``matthews``, ``pearson``) of ``preds`` against
    ``labels`` (``(n,)`` or ``(B, n)``), each example counted ``weights`` times (``(B, n)``,
    default once): ``(B,)``. Binary labels for f1/matthews (positive class 1); a negative
    prediction (an unparseable text-to-text answer) counts as the wrong class, as in
    ``glue_metrics``; an undefined value (no positives, constant predictions) is 0, as
    scikit-learn reports it. Non-finite regression outputs count as 0."""
    p, y = np.atleast_2d(np.asarray(preds, float)), np.atleast_2d(np.asarray(labels, float))
    w = np.ones(np.broadcast_shapes(p.shape, y.shape)) if weights is None else np.atleast_2d(weights).astype(float)
    p, y = np.broadcast_to(p, w.shape), np.broadcast_to(y, w.shape)
    total = w.sum(axis=1)

    def wsum(x):
        return (w * x).sum(axis=1)

    if name == "pearson":
        p = np.where(np.isfinite(p), p, 0.0)
        pc = p - (wsum(p) / total)[:, None]
        yc = y - (wsum(y) / total)[:, None]
        den = np.sqrt(wsum(pc ** 2) * wsum(yc ** 2))
        return np.divide(wsum(pc * yc), den, out=np.zeros(len(w)), where=den > 1e-12 * np.maximum(1.0, total))
    p = np.where(p < 0, 1 - y, p)  # unparseable -> wrong
    if name == "accuracy":
        return wsum(p == y) / total
    tp, tn = wsum((p == 1) & (y == 1)), wsum((p != 1) & (y != 1))
    fp, fn = wsum((p == 1) & (y != 1)), wsum((p != 1) & (y == 1))
    if name == "f1":
        den = 2 * tp + fp + fn
        return np.divide(2 * tp, den, out=np.zeros(len(w)), where=den > 0)
    if name == "matthews":
        den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return np.divide(tp * tn - fp * fn, den, out=np.zeros(len(w)), where=den > 0)
    raise ValueError(f"unknown metric {name!r}; use accuracy, f1, matthews or pearson")


def _row_bincount(idx: np.ndarray, size: int) -> np.ndarray:
    """Per row of ``idx`` ``(B, k)``, how often each of ``0..size-1`` occurs: ``(B, size)``."""
    flat = idx + size * np.arange(idx.shape[0])[:, None]
    return np.bincount(flat.ravel(), minlength=size * idx.shape[0]).reshape(idx.shape[0], size)


def paired_bootstrap(metric: str, pairs: Sequence[tuple[Sequence[float], Sequence[float], Sequence[float]]],
                     resamples: int = 2000, seed: int = 0,
                     ids: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
    """``pairs``: one ``(preds_a, preds_b, labels)`` per seed, both variants on the same examples;
    ``ids``: per seed, the examples' ids in a common pool (e.g. dev-set rows), resampled jointly.
    Returns ``diff`` (mean over seeds of metric(a) - metric(b)), ``low``/``high`` (95% percentile
    interval of the resampled mean difference) and ``p``: two-sided, twice the smaller share of
    resampled differences on either side of 0 (each share counted as ``(k + 1) / (B + 1)``, so
    never 0), at most 1."""
    rng = np.random.default_rng(seed)
    arrays = [tuple(np.asarray(x, float) for x in pair) for pair in pairs]
    for a, b, y in arrays:
        if not (len(a) == len(b) == len(y)):
            raise ValueError("paired_bootstrap: both variants need outputs for the same test examples")
    if ids is not None:
        pool = {i: k for k, i in enumerate(sorted({int(i) for seed_ids in ids for i in seed_ids}))}
        counts = _row_bincount(rng.integers(0, len(pool), size=(resamples, len(pool))), len(pool))
        weights = [counts[:, [pool[int(i)] for i in seed_ids]] for seed_ids in ids]
    else:
        weights = [_row_bincount(rng.integers(0, len(y), size=(resamples, len(y))), len(y)) for _, _, y in arrays]
    observed, boot = [], np.zeros(resamples)
    for (a, b, y), w in zip(arrays, weights):
        observed.append(batched_metric(metric, a, y)[0] - batched_metric(metric, b, y)[0])
        boot += batched_metric(metric, a, y, w) - batched_metric(metric, b, y, w)
    boot /= len(arrays)
    tail = min((boot <= 0).sum(), (boot >= 0).sum())
    return {"diff": float(np.mean(observed)), "low": float(np.quantile(boot, 0.025)),
            "high": float(np.quantile(boot, 0.975)), "p": float(min(1.0, 2 * (tail + 1) / (resamples + 1))),
            "seeds": len(arrays), "joint_resampling": ids is not None}


def seed_ttest(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided paired t-test p-value over seeds (``nan`` with fewer than 2 pairs; when every
    difference is the same, scipy gives 0 for a non-zero and ``nan`` for a zero difference)."""
    from scipy.stats import ttest_rel

    if len(a) < 2:
        return float("nan")
    return float(ttest_rel(a, b).pvalue)
