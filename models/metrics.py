"""Evaluation metrics in plain numpy (no sklearn dependency).

>>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
0.75
>>> roc_auc([1, 1], [0.2, 0.3])
nan
>>> round(log_loss([0, 1], [0.5, 0.5]), 4)
0.6931
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from models.base import InvalidModelInput

__all__ = ["average_ranks", "log_loss", "roc_auc"]

ArrayLike = npt.ArrayLike


def _as_binary(y_true: ArrayLike) -> npt.NDArray[np.bool_]:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise InvalidModelInput(f"labels must be 1-D, got shape {y.shape}")
    if y.dtype != np.bool_:
        if not np.isin(y, (0, 1)).all():
            raise InvalidModelInput("labels must be binary (0/1 or bool)")
        y = y.astype(np.bool_)
    return y


def _as_scores(scores: ArrayLike, n: int) -> npt.NDArray[np.float64]:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise InvalidModelInput(f"scores shape {s.shape} does not match labels shape ({n},)")
    if np.isnan(s).any():
        raise InvalidModelInput("scores contain NaN")
    return s


def average_ranks(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """1-based ranks of ``values``; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]  # exclusive
    mean_rank = (starts + ends + 1) / 2.0  # mean of (start+1 .. end)
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative),
    ties counting one half (Mann–Whitney U / (n_pos * n_neg)).

    Returns ``nan`` when only one class is present (AUC is undefined).
    Raises :class:`~models.base.InvalidModelInput` on shape mismatch, non-binary
    labels or NaN scores. O(n log n).
    """
    y = _as_binary(y_true)
    s = _as_scores(scores, len(y))
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def log_loss(y_true: ArrayLike, proba: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``proba`` (clipped to ``[eps, 1-eps]``).

    Raises on empty input, shape mismatch, non-binary labels or NaN.
    """
    y = _as_binary(y_true)
    if len(y) == 0:
        raise InvalidModelInput("log_loss of an empty sample is undefined")
    p = np.clip(_as_scores(proba, len(y)), eps, 1.0 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))
