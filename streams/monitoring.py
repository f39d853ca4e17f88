"""A model's inputs and score watched over tumbling windows of event time (the drift stage's input monitor).

:class:`InputMonitor` takes a model's scored events (its feature vector, score and serving version, as
inference published them) into windows of the model's :class:`~streams.project.spec.Monitor` ``window_s``;
a window closes once an event ``grace_s`` past its end arrives (later events of a closed window are counted
as ``late`` and left out). Each version's rows in a window are a uniform sample of at most
:data:`SAMPLE_ROWS`; a closed window with at least ``min_rows`` rows of a version whose reference is known
(:class:`models.feature_drift.Reference`) gives a :class:`WindowReport`: every feature and the score tested
against the reference, each feature's data quality, and the alerts the model's thresholds raise: the
share of drifted columns counts the score as one more column, as Evidently's dataset drift does. Versions
without a reference (the rule-based fallback) are not watched.

>>> from examples.minimal.project import project
>>> model = project.models[0]
>>> monitor = InputMonitor(model)
>>> monitor.add([0.0] * len(model.feature_names), 0.5, "v1", ts_ms=0)
[]
>>> monitor.pending_rows
1
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from models.feature_drift import ColumnDrift, Quality, Reference, column_drift, quality
from streams.project.spec import Model

log = logging.getLogger(__name__)

SAMPLE_ROWS = 5_000  # rows of one version kept per window (a uniform sample beyond)
REFERENCES_KEPT = 8  # versions whose reference is kept in memory
STUCK = 0.99  # a null or default rate this high is a feature stuck: the data-quality alert is critical
PREDICTION = "score"  # the prediction's column in a report (its role tells it from a feature of that name)


@dataclass
class _Sample:
    """One version's rows in one window: a uniform sample (Algorithm R) and how many rows there were."""

    rng: random.Random
    rows: list[tuple[list[float], float]] = field(default_factory=list)
    seen: int = 0

    def add(self, features: list[float], score: float) -> None:
        self.seen += 1
        if len(self.rows) < SAMPLE_ROWS:
            self.rows.append((features, score))
        elif (j := self.rng.randrange(self.seen)) < SAMPLE_ROWS:
            self.rows[j] = (features, score)


@dataclass(frozen=True)
class Column:
    """A feature's (or the score's) result in one window."""

    name: str
    role: str  # "feature" or "prediction"
    drift: ColumnDrift
    quality: Quality
    reference_default_rate: float


@dataclass(frozen=True)
class WindowReport:
    """One version's window: its columns, the share of drifted features, and the alerts raised (as dicts
    the drift stage publishes)."""

    model_name: str
    version: str
    start_ms: int
    end_ms: int
    rows: int
    sampled: int
    reference_rows: int
    columns: tuple[Column, ...]
    alerts: tuple[dict[str, Any], ...]

    @property
    def drifted(self) -> list[str]:
        """The drifted columns' names (the score's is :data:`PREDICTION`)."""
        return [c.name for c in self.columns if c.drift.drifted]

    @property
    def drifted_share(self) -> float:
        """Drifted columns over columns, the score counted as one (as Evidently's dataset drift counts it)."""
        return len(self.drifted) / len(self.columns) if self.columns else 0.0

    def record(self, ts_ms: int) -> dict[str, Any]:
        """The report as a ``weir.feature_drift`` record."""
        return {"model_name": self.model_name, "model_version": self.version, "window_start_ms": self.start_ms,
                "window_end_ms": self.end_ms, "rows": self.rows, "sampled": self.sampled,
                "reference_rows": self.reference_rows, "drifted_share": self.drifted_share, "ts": ts_ms,
                "columns": [{"name": c.name, "role": c.role, "test": c.drift.test, "statistic": c.drift.statistic,
                             "threshold": c.drift.threshold, "drifted": c.drift.drifted, "psi": c.drift.psi,
                             "null_rate": c.quality.null_rate, "default_rate": c.quality.default_rate,
                             "reference_default_rate": c.reference_default_rate,
                             "out_of_range_rate": c.quality.out_of_range_rate} for c in self.columns]}


class InputMonitor:
    """One model's windows, references and raised alerts (see the module docstring)."""

    def __init__(self, model: Model, seed: int = 0) -> None:
        self.model = model
        self.settings = model.monitor
        self.window_ms = int(model.monitor.window_s * 1000)
        self.grace_ms = int(model.monitor.grace_s * 1000)
        self.references: OrderedDict[str, Reference] = OrderedDict()
        self.windows: dict[int, dict[str, _Sample]] = {}  # window start -> version -> its sample
        self.closed_until = -(2**62)  # windows ending at or before this event time are closed
        self.newest = -(2**62)
        self.late = 0
        self._rng = random.Random(seed)
        self._raised: dict[tuple[str, str], frozenset[str]] = {}  # (version, detector) -> what the last window raised

    def reference(self, version: str, ref: Reference) -> None:
        """Watch ``version`` against ``ref`` (its columns must be the model's features, in order)."""
        if ref.X.ndim != 2 or ref.X.shape[1] != len(self.model.feature_names):
            log.warning("reference of %s has %s columns, the model %d features: its inputs are not watched",
                        version, ref.X.shape[1:] or "no", len(self.model.feature_names))
            return
        self.references[version] = ref
        self.references.move_to_end(version)
        while len(self.references) > REFERENCES_KEPT:
            self.references.popitem(last=False)

    @property
    def pending_rows(self) -> int:
        """Rows in windows not closed yet."""
        return sum(s.seen for w in self.windows.values() for s in w.values())

    def add(self, features: list[float], score: float, version: str, ts_ms: int) -> list[WindowReport]:
        """Take one scored event; the reports of the windows it closes."""
        if ts_ms - ts_ms % self.window_ms + self.window_ms <= self.closed_until:
            self.late += 1
            return []
        start = ts_ms - ts_ms % self.window_ms
        window = self.windows.setdefault(start, {})
        if version not in window:
            window[version] = _Sample(random.Random(self._rng.random()))
        window[version].add(features, score)
        self.newest = max(self.newest, ts_ms)
        return self.close(self.newest - self.grace_ms)

    def close(self, until_ms: int) -> list[WindowReport]:
        """Close every window ending at or before ``until_ms``; their reports, oldest first."""
        reports = []
        for start in sorted(s for s in self.windows if s + self.window_ms <= until_ms):
            for version, sample in self.windows.pop(start).items():
                report = self._report(start, version, sample)
                if report is not None:
                    reports.append(report)
        self.closed_until = max(self.closed_until, until_ms)
        return reports

    def _report(self, start: int, version: str, sample: _Sample) -> WindowReport | None:
        ref = self.references.get(version)
        if ref is None or sample.seen < self.settings.min_rows:
            log.debug("window %d of %s: %d rows, reference %s: not tested", start, version, sample.seen,
                      "known" if ref is not None else "unknown")
            return None
        X = np.array([r[0] for r in sample.rows], dtype=np.float64)
        scores = np.array([r[1] for r in sample.rows], dtype=np.float64)
        columns = [self._column(name, "feature", ref.X[:, j], X[:, j], default)
                   for j, (name, default) in enumerate(zip(self.model.feature_names, self.model.feature_defaults,
                                                           strict=True))]
        columns.append(self._column(PREDICTION, "prediction", ref.scores, scores, float("nan")))
        report = WindowReport(self.model.name, version, start, start + self.window_ms, sample.seen, len(sample.rows),
                              ref.rows, tuple(columns), ())
        return replace(report, alerts=tuple(self._alerts(report)))

    @staticmethod
    def _column(name: str, role: str, ref: np.ndarray, cur: np.ndarray, default: float) -> Column:
        finite = ref[np.isfinite(ref)]
        low, high = (float(finite.min()), float(finite.max())) if len(finite) else (-np.inf, np.inf)
        return Column(name, role, column_drift(ref, cur), quality(cur, default, low, high),
                      quality(ref, default, low, high).default_rate)

    def _alerts(self, r: WindowReport) -> list[dict[str, Any]]:
        s = self.settings
        alerts = []
        drifted = r.drifted
        if r.drifted_share >= s.drift_share and self._new(r.version, "feature_drift", drifted):
            alerts.append(self._alert(
                r, "feature_drift", "drifted_feature_share", r.drifted_share, s.drift_share, drifted, "warning",
                f"{len(drifted)} of {len(r.columns)} columns of {r.version} (its features and score) drifted from "
                f"its reference: {', '.join(drifted)}"))
        elif r.drifted_share < s.drift_share:
            self._raised.pop((r.version, "feature_drift"), None)
        failing = {c.name: why for c in r.columns if c.role == "feature" and (why := self._failing(c))}
        if failing and self._new(r.version, "data_quality", list(failing)):
            stuck = any(max(c.quality.null_rate, c.quality.default_rate) >= STUCK for c in r.columns
                        if c.name in failing and c.role == "feature")
            worst = max(failing.values(), key=lambda w: w[1])
            alerts.append(self._alert(r, "data_quality", worst[0], worst[1], worst[2], list(failing),
                                      "critical" if stuck else "warning",
                                      f"data quality of {r.version}: " + "; ".join(
                                          f"{name} {w[0]} {w[1]:.3f} (limit {w[2]:.3f})" for name, w in failing.items())))
        elif not failing:
            self._raised.pop((r.version, "data_quality"), None)
        return alerts

    def _failing(self, c: Column) -> tuple[str, float, float] | None:
        """The first data-quality limit a feature's window breaks: (metric, value, limit)."""
        s, q = self.settings, c.quality
        if q.null_rate >= s.null_rate:
            return ("null_rate", q.null_rate, s.null_rate)
        if q.default_rate - c.reference_default_rate >= s.default_rate_increase:
            return ("default_rate", q.default_rate, c.reference_default_rate + s.default_rate_increase)
        if q.out_of_range_rate >= s.out_of_range_rate:
            return ("out_of_range_rate", q.out_of_range_rate, s.out_of_range_rate)
        return None

    def _new(self, version: str, detector: str, names: list[str]) -> bool:
        """Whether an alert about ``names`` is news: the windows of ``version`` since its last one under the
        threshold did not raise them all already."""
        before = self._raised.get((version, detector), frozenset())
        self._raised[(version, detector)] = before | frozenset(names)
        return not frozenset(names) <= before

    @staticmethod
    def _alert(r: WindowReport, detector: str, metric: str, value: float, threshold: float, features: list[str],
               severity: str, message: str) -> dict[str, Any]:
        return {"detector": detector, "metric": metric, "value": value, "threshold": threshold,
                "model_version": r.version, "kind": "data_quality" if detector == "data_quality" else "drift",
                "severity": severity, "features": features, "change_ts": r.start_ms, "event_ts": r.end_ms,
                "message": f"{message} (window {r.start_ms}-{r.end_ms}, {r.rows} rows)"}
