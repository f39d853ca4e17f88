"""A model's inputs and score against its reference: per-column drift tests and data quality.

The reference of a trained version is the newest :data:`~streams.stages.retrain.REFERENCE_ROWS` rows of
its training window whose windowed features were complete, and the scores the version gives them
(:func:`streams.stages.retrain.train_and_export` writes it next to the model as ``v<N>.npz``). A stream's
first rows are no reference: their windowed features are still filling (a count over the last hour, in the
stream's first hour; :func:`streams.features.offline.warm_from_ms`), and on demo runs references holding
them raised feature-drift alerts in windows where nothing had changed.

Which test compares a column follows Evidently's defaults (``_get_default_stattest``): with a reference of
at most 1,000 rows, a column with more than 5 distinct values (reference and current together) is
numeric, tested by two-sample Kolmogorov-Smirnov; 3 to 5 values, chi-squared on the value counts; 2 or
fewer, a two-proportion z-test; drifted when p < 0.05. With a larger reference: the Wasserstein distance
normed by the reference's standard deviation (numeric) or the Jensen-Shannon distance of the value shares
(at most 5 values); drifted at 0.1 or more. The population stability index (10 reference-quantile bins) is
reported beside, never decides.

>>> rng = np.random.default_rng(0)
>>> ref = rng.normal(0, 1, 800)
>>> column_drift(ref, rng.normal(0, 1, 400)).drifted
False
>>> d = column_drift(ref, rng.normal(1, 1, 400))
>>> d.test, d.drifted, d.statistic < 0.05
('ks', True, True)
>>> column_drift(rng.normal(0, 1, 3000), rng.normal(0.5, 1, 400)).test
'wasserstein'
>>> q = quality(np.array([0.0, 0.0, np.nan, 5.0]), default=0.0, low=1.0, high=4.0)
>>> q.null_rate, q.default_rate, q.out_of_range_rate
(0.25, 0.666..., 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats
from scipy.spatial import distance

SMALL_REFERENCE = 1_000  # at most: p-value tests (KS, chi-squared, z); more: distances
CATEGORICAL_VALUES = 5  # at most this many distinct values: the column is tested as categorical
P_VALUE = 0.05
DISTANCE = 0.1
PSI_BINS = 10
_EPS = 1e-4  # share given to an empty bin or value (PSI, Jensen-Shannon), as Evidently does


@dataclass(frozen=True)
class Reference:
    """What a version was validated on: its feature rows (``X``, one column per feature) and its scores."""

    X: np.ndarray
    scores: np.ndarray

    def save(self, path: Path) -> None:
        np.savez(path, X=self.X.astype(np.float32), scores=self.scores.astype(np.float32))

    @classmethod
    def load(cls, path: Path) -> Reference:
        with np.load(path) as f:
            return cls(np.asarray(f["X"], dtype=np.float64), np.asarray(f["scores"], dtype=np.float64))

    @property
    def rows(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class ColumnDrift:
    """One column's test: its name (``ks``, ``chisquare``, ``z``, ``wasserstein``, ``jensenshannon``), its
    statistic (a p-value or a distance), the threshold it is held to, the verdict and the PSI."""

    test: str
    statistic: float
    threshold: float
    drifted: bool
    psi: float


@dataclass(frozen=True)
class Quality:
    """One column's data quality in a window: the share of null (NaN) values, of values equal to the
    feature's default, and of values outside the reference's range."""

    null_rate: float
    default_rate: float
    out_of_range_rate: float


def column_drift(reference: np.ndarray, current: np.ndarray) -> ColumnDrift:
    """Test one column of a window against the same column of the reference (null values left out)."""
    ref, cur = reference[np.isfinite(reference)], current[np.isfinite(current)]
    if len(ref) == 0 or len(cur) == 0:
        return ColumnDrift("none", float("nan"), float("nan"), False, float("nan"))
    values = np.union1d(np.unique(ref), np.unique(cur))
    psi = population_stability(ref, cur)
    if len(ref) <= SMALL_REFERENCE:
        if len(values) > CATEGORICAL_VALUES:
            p = float(stats.ks_2samp(ref, cur).pvalue)
            return ColumnDrift("ks", p, P_VALUE, p < P_VALUE, psi)
        if len(values) > 2:
            p = _chisquare(ref, cur, values)
            return ColumnDrift("chisquare", p, P_VALUE, p < P_VALUE, psi)
        p = _z_test(ref, cur, values)
        return ColumnDrift("z", p, P_VALUE, p < P_VALUE, psi)
    if len(values) > CATEGORICAL_VALUES:
        spread = float(np.std(ref))
        d = float(stats.wasserstein_distance(ref, cur)) / (spread if spread > 0 else 1.0)
        return ColumnDrift("wasserstein", d, DISTANCE, d >= DISTANCE, psi)
    d = float(distance.jensenshannon(_shares(ref, values), _shares(cur, values), base=2))
    return ColumnDrift("jensenshannon", d, DISTANCE, d >= DISTANCE, psi)


def population_stability(ref: np.ndarray, cur: np.ndarray) -> float:
    """PSI over :data:`PSI_BINS` bins at the reference's quantiles (fewer where values repeat)."""
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))
    r = np.maximum(np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / len(ref), _EPS)
    c = np.maximum(np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1) / len(cur), _EPS)
    return float(np.sum((c - r) * np.log(c / r)))


def quality(values: np.ndarray, default: float, low: float, high: float) -> Quality:
    """Data quality of one column: null, default and out-of-range (outside ``[low, high]``) rates; the last two
    over its non-null values."""
    finite = values[np.isfinite(values)]
    n = len(finite)
    return Quality(null_rate=float(1 - n / len(values)) if len(values) else 0.0,
                   default_rate=float(np.mean(finite == default)) if n else 0.0,
                   out_of_range_rate=float(np.mean((finite < low) | (finite > high))) if n else 0.0)


def _shares(x: np.ndarray, values: np.ndarray) -> np.ndarray:
    counts = np.array([np.count_nonzero(x == v) for v in values], dtype=np.float64)
    shares: np.ndarray = np.maximum(counts / counts.sum(), _EPS)
    return shares


def _chisquare(ref: np.ndarray, cur: np.ndarray, values: np.ndarray) -> float:
    """Chi-squared of the window's value counts against those the reference's shares expect."""
    observed = np.array([np.count_nonzero(cur == v) for v in values], dtype=np.float64)
    expected = _shares(ref, values) * len(cur)
    expected *= observed.sum() / expected.sum()
    return float(stats.chisquare(observed, expected).pvalue)


def _z_test(ref: np.ndarray, cur: np.ndarray, values: np.ndarray) -> float:
    """Two-proportion z-test of the share of the first value (a column with one or two values)."""
    p1, p2 = np.mean(ref == values[0]), np.mean(cur == values[0])
    pooled = (p1 * len(ref) + p2 * len(cur)) / (len(ref) + len(cur))
    se = np.sqrt(pooled * (1 - pooled) * (1 / len(ref) + 1 / len(cur)))
    if se == 0:
        return 1.0
    return float(2 * stats.norm.sf(abs(p1 - p2) / se))
