"""Drift: watches the champion's labelled error and its score distribution; raises alerts and retrains.

Input: ``weir.outcomes`` (label + champion score per payment, in label order).
Per champion version, three ADWIN detectors (river) and one test:

- ``adwin_error`` over the absolute error ``|label - score|`` of every outcome;
- ``adwin_missed_fraud`` over "this fraud scored below the decision
  threshold", fed by fraud outcomes only. Fraud is a few percent of payments,
  so a new fraud pattern moves the overall error by a point or two, which
  ADWIN needs thousands of outcomes to separate from noise; among frauds the
  same change moves the miss rate by tens of points;
- ``adwin_score`` over the score itself (the score distribution; alert only);
- ``validation_gap``: once a version has served ``min_frauds`` labelled
  frauds, a one-sided binomial test of its live missed-fraud count against
  the upper bound of the miss rate it had on its own validation split (from
  ``model.events``).
  A change detector cannot see a drift that happened before the model went
  live; this test can. It fires at most once per version.

An increase found by either of the first two, or a validation gap, publishes an ``alerts``
record and a ``retrain`` request (at most one per ``cooldown`` outcomes).
Detectors restart when the champion version changes, so a new model is
judged on its own outcomes.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from river.drift import ADWIN
from scipy.stats import beta, binom

from streams import topics as T
from streams.base import Message, Produce, StepResult
from streams.codec import AvroCodec, decoded
from streams.stages.inference import DECISION_THRESHOLD, MODEL_NAME, model_version_name

RETRAIN_DETECTORS = ("adwin_error", "adwin_missed_fraud", "validation_gap")
GAP_P_VALUE = 1e-3
GAP_MIN_RATE = 0.05  # floor for a validation miss rate measured on few frauds


def _adwin(delta: float, clock: int = 32) -> ADWIN:
    """A river ADWIN detector (river's constructor is untyped)."""
    return ADWIN(delta=delta, clock=clock)  # type: ignore[no-untyped-call]


@dataclass
class DriftState:
    version: str
    error: ADWIN
    missed: ADWIN
    score: ADWIN
    seen: int = 0
    frauds: int = 0
    missed_count: int = 0
    gap_alerted: bool = False


class DriftDetector:
    """Pure detection logic: ``update`` returns the alerts (as dicts) one outcome raises."""

    def __init__(self, delta: float, min_samples: int = 300, min_frauds: int = 20,
                 threshold: float = DECISION_THRESHOLD, missed_delta: float = 0.05) -> None:
        self.delta = delta
        self.missed_delta = missed_delta
        self.min_samples = min_samples
        self.min_frauds = min_frauds
        self.threshold = threshold
        self.state: DriftState | None = None
        self.baselines: dict[str, float] = {}  # model version -> missed-fraud rate on its validation split

    def update(self, outcome: dict[str, Any]) -> list[dict[str, Any]]:
        version = outcome["champion_version"]
        if self.state is None or self.state.version != version:
            # Frauds are few, so the missed-fraud detector checks every 4 of them (river's default: 32)
            # and uses a looser confidence: at delta=0.002 ADWIN misses a 0.26 -> 0.70 miss-rate change
            # over 58 + 133 frauds; at 0.05 it finds it after ~90 (measured on a demo run).
            self.state = DriftState(version, _adwin(self.delta), _adwin(self.missed_delta, clock=4),
                                    _adwin(self.delta))
        st = self.state
        score = outcome["champion_score"]
        st.seen += 1
        alerts = []
        before = self._change(st.error, abs(float(outcome["is_fraud"]) - score))
        if before is not None and st.error.estimation > before and st.seen >= self.min_samples:
            alerts.append(self._alert("adwin_error", "abs_error", st.error.estimation, before, version))
        if outcome["is_fraud"]:
            missed = score < self.threshold
            st.frauds += 1
            st.missed_count += missed
            gap = self._validation_gap(st)
            if gap is not None:
                alerts.append(gap)
            before = self._change(st.missed, float(missed))
            if before is not None and st.missed.estimation > before and st.frauds >= self.min_frauds:
                alerts.append(self._alert("adwin_missed_fraud", "missed_fraud_rate", st.missed.estimation, before,
                                          version))
        before = self._change(st.score, score)
        if before is not None and st.seen >= self.min_samples:
            alerts.append(self._alert("adwin_score", "mean_score", st.score.estimation, before, version))
        return alerts

    def _validation_gap(self, st: DriftState) -> dict[str, Any] | None:
        baseline = self.baselines.get(st.version)
        if baseline is None or st.gap_alerted or st.frauds < self.min_frauds or math.isnan(baseline):
            return None
        rate = max(baseline, GAP_MIN_RATE)
        p_value = float(binom.sf(st.missed_count - 1, st.frauds, rate))
        if p_value >= GAP_P_VALUE:
            return None
        st.gap_alerted = True
        live = st.missed_count / st.frauds
        return {
            "detector": "validation_gap", "metric": "missed_fraud_rate", "value": live, "threshold": rate,
            "model_version": st.version,
            "message": f"model {st.version} misses {st.missed_count} of {st.frauds} live frauds ({live:.3f}); "
                       f"its validation bound is {rate:.3f} (binomial p={p_value:.1e})",
        }

    @staticmethod
    def _change(detector: ADWIN, value: float) -> float | None:
        """Feed one value; when ADWIN detects a change, the mean it had before (else None)."""
        before = float(detector.estimation)
        detector.update(value)  # type: ignore[no-untyped-call]  # river's update is untyped
        return before if detector.drift_detected else None

    @staticmethod
    def _alert(detector: str, metric: str, value: float, reference: float, version: str) -> dict[str, Any]:
        return {
            "detector": detector, "metric": metric, "value": value, "threshold": reference,
            "model_version": version,
            "message": f"{metric} of model {version} changed: {reference:.4f} -> {value:.4f} (ADWIN)",
        }


class DriftStage:
    step_id = "drift"
    topics = (T.I_OUTCOMES, T.MODEL_EVENTS)

    def __init__(self, delta: float, *, cooldown: int = 1000, min_samples: int = 300,
                 clock: Callable[[], float] = time.time) -> None:
        self.detector = DriftDetector(delta, min_samples)
        self.cooldown = cooldown
        self.clock = clock
        self.alerts = 0
        self.retrains = 0
        self._since_retrain = cooldown
        self._in = {t: AvroCodec(t) for t in self.topics}
        self._alert = AvroCodec(T.ALERTS)
        self._retrain = AvroCodec(T.RETRAIN)

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        for msg, record in decoded(batch, self._in, result):
            if msg.topic == T.MODEL_EVENTS:
                self._baseline(record)
                continue
            outcome = record
            self._since_retrain += 1
            for alert in self.detector.update(outcome):
                self._publish(alert, result)
        return result

    def _baseline(self, event: dict[str, Any]) -> None:
        """The miss rate a new version is held to: the 95% upper (Clopper-Pearson) bound of its
        validation miss rate, so that a validation split with few frauds is not taken at its word."""
        m = event["metrics"]
        if event["model_name"] != MODEL_NAME or "missed_fraud_val" not in m or not m.get("frauds_val"):
            return
        n = int(m["frauds_val"])
        k = round(m["missed_fraud_val"] * n)
        self.detector.baselines[model_version_name(event["version"])] = float(beta.ppf(0.95, k + 1, n - k))

    def _publish(self, alert: dict[str, Any], result: StepResult) -> None:
        now_ms = int(self.clock() * 1000)
        alert = {"alert_id": str(uuid.uuid4()), "ts": now_ms, **alert}
        self.alerts += 1
        result.produce.append(Produce(T.ALERTS, alert["detector"].encode(), self._alert.encode(alert)))
        if alert["detector"] not in RETRAIN_DETECTORS or self._since_retrain < self.cooldown:
            return
        self._since_retrain = 0
        self.retrains += 1
        request = {"request_id": str(uuid.uuid4()), "ts": now_ms, "reason": f"drift alert {alert['alert_id']}",
                   "since_ts": None}
        result.produce.append(Produce(T.RETRAIN, b"fraud", self._retrain.encode(request)))
