"""Drift: watches the champion's labelled error and its score distribution; raises alerts and retrains.

Input: ``weir.outcomes`` (label + champion score per payment, in label order).
Two ADWIN detectors (river) per champion version: one over the absolute error
``|label - score|``, one over the score itself. A change in the error whose
recent mean is higher publishes an ``alerts`` record and a ``retrain``
request (at most one per ``cooldown`` outcomes); a change in the score
distribution publishes an alert only. Detectors restart when the champion
version changes, so a new model is judged on its own outcomes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from river.drift import ADWIN

from streams import topics as T
from streams.base import InvalidEvent, Message, Produce, Rejected, StepResult
from streams.codec import AvroCodec


@dataclass
class DriftState:
    version: str
    error: ADWIN
    score: ADWIN
    seen: int = 0
    error_sum: float = 0.0


class DriftDetector:
    """Pure detection logic: ``update`` returns the alerts (as dicts) one outcome raises."""

    def __init__(self, delta: float, min_samples: int = 300) -> None:
        self.delta = delta
        self.min_samples = min_samples
        self.state: DriftState | None = None

    def update(self, outcome: dict[str, Any]) -> list[dict[str, Any]]:
        version = outcome["champion_version"]
        if self.state is None or self.state.version != version:
            self.state = DriftState(version, ADWIN(delta=self.delta), ADWIN(delta=self.delta))
        st = self.state
        err = abs(float(outcome["is_fraud"]) - outcome["champion_score"])
        st.seen += 1
        st.error_sum += err
        before = st.error.estimation
        st.error.update(err)
        alerts = []
        if st.error.drift_detected and st.seen >= self.min_samples and st.error.estimation > before:
            alerts.append(self._alert("adwin_error", "abs_error", st.error.estimation, before, version))
        before_score = st.score.estimation
        st.score.update(outcome["champion_score"])
        if st.score.drift_detected and st.seen >= self.min_samples:
            alerts.append(self._alert("adwin_score", "mean_score", st.score.estimation, before_score, version))
        return alerts

    @staticmethod
    def _alert(detector: str, metric: str, value: float, reference: float, version: str) -> dict[str, Any]:
        return {
            "detector": detector, "metric": metric, "value": float(value), "threshold": float(reference),
            "model_version": version,
            "message": f"{metric} of model {version} changed: {reference:.4f} -> {value:.4f} (ADWIN)",
        }


class DriftStage:
    step_id = "drift"
    topics = [T.I_OUTCOMES]

    def __init__(self, delta: float, *, cooldown: int = 1000, min_samples: int = 300,
                 clock: Callable[[], float] = time.time) -> None:
        self.detector = DriftDetector(delta, min_samples)
        self.cooldown = cooldown
        self.clock = clock
        self.alerts = 0
        self.retrains = 0
        self._since_retrain = cooldown
        self._in = AvroCodec(T.I_OUTCOMES)
        self._alert = AvroCodec(T.ALERTS)
        self._retrain = AvroCodec(T.RETRAIN)

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        for msg in batch:
            try:
                outcome = self._in.decode(msg.value)
            except InvalidEvent as exc:
                result.rejected.append(Rejected(msg, exc))
                continue
            self._since_retrain += 1
            for alert in self.detector.update(outcome):
                self._publish(alert, outcome, result)
        return result

    def _publish(self, alert: dict[str, Any], outcome: dict[str, Any], result: StepResult) -> None:
        now_ms = int(self.clock() * 1000)
        alert = {"alert_id": str(uuid.uuid4()), "ts": now_ms, **alert}
        self.alerts += 1
        result.produce.append(Produce(T.ALERTS, alert["detector"].encode(), self._alert.encode(alert)))
        if alert["detector"] != "adwin_error" or self._since_retrain < self.cooldown:
            return
        self._since_retrain = 0
        self.retrains += 1
        request = {"request_id": str(uuid.uuid4()), "ts": now_ms, "reason": f"drift alert {alert['alert_id']}",
                   "since_ts": None}
        result.produce.append(Produce(T.RETRAIN, b"fraud", self._retrain.encode(request)))
