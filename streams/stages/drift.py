"""Drift: watches each model's labelled error and its score distribution; raises alerts and retrains.

Input: the project's ``weir.<project>.outcomes`` (label + champion score per
scored event, in label order, every model's). Per model and champion version, three river drift
detectors, each the one the model declares for its signal (:class:`streams.project.spec.Drift`; ADWIN
by default; :mod:`models.drift_detectors`), and one test. An alert's detector is named
``<detector>_<signal>`` (``adwin_error``, ``pagehinkley_missed_positive``, ...):

- ``*_error`` over the absolute error ``|label - score|`` of every outcome (for a
  detector over 0/1 values, whether the decision was wrong);
- ``*_missed_positive`` (a binary model) over "this positive scored below
  the model's decision threshold", fed by positive outcomes only. Positives
  may be a few percent of events, so a new pattern of them moves the overall
  error by a point or two, which ADWIN needs thousands of outcomes to separate
  from noise; among positives the same change moves the miss rate by tens of
  points;
- ``*_score`` over the score itself (the score distribution; alert only);
- ``validation_gap`` (a binary model): once a version has served
  ``min_positives`` labelled positives, a one-sided binomial test of its live
  miss count against the upper bound of the miss rate it had on its own
  validation split (from ``model.events``). A change detector cannot see a
  drift that happened before the model went live; this test can. It fires at
  most once per version.

Detectors count outcomes, not time, and an alert carries the event time of the outcome that raised it
(``event_ts``), so where a change was seen does not depend on how fast the machine processed the stream. An increase found by either of the first two, or a validation gap,
publishes an ``alerts``
record and a ``retrain`` request for the model (at most one per ``cooldown`` of
its outcomes). Detectors restart when the champion version changes, so a new
model is judged on its own outcomes. The threshold is the model's own
(:attr:`streams.project.spec.Model.threshold`), the one inference decides with.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scipy.stats import beta, binom

from models.drift_detectors import DetectorSpec, Watched, parse_detector
from streams import topics as T
from streams.base import Message, Produce, Stage, StepResult
from streams.codec import AvroCodec, decoded
from streams.project.spec import Drift, Model, Project

RETRAIN_SIGNALS = ("error", "missed_positive")  # and the validation gap; the score's alerts only inform
GAP_P_VALUE = 1e-3
GAP_MIN_RATE = 0.05  # floor for a validation miss rate measured on few positives


def detector_specs(drift: Drift, delta: float, missed_delta: float = 0.05) -> dict[str, DetectorSpec]:
    """The detector of each signal: the declared one, else ADWIN (see :class:`~streams.project.spec.Drift`)."""
    return {"error": parse_detector(drift.error or f"ADWIN(delta={delta})"),
            # Positives are few, so the miss detector checks every 4 of them (river's default: 32)
            # and uses a looser confidence: at delta=0.002 ADWIN misses a 0.26 -> 0.70 miss-rate change
            # over 58 + 133 positives; at 0.05 it finds it after ~90 (measured on a demo run).
            "missed_positive": parse_detector(drift.missed_positive or f"ADWIN(delta={missed_delta}, clock=4)"),
            "score": parse_detector(drift.score or f"ADWIN(delta={delta})")}


@dataclass
class DriftState:
    version: str
    error: Watched
    missed: Watched
    score: Watched
    seen: int = 0
    positives: int = 0
    missed_count: int = 0
    gap_alerted: bool = False


class DriftDetector:
    """Pure detection logic for one model: ``update`` returns the alerts (as dicts) one outcome raises.

    ``task`` is the model's (the miss-rate detector and the validation gap are a binary model's),
    ``threshold`` its decision threshold."""

    def __init__(self, delta: float, min_samples: int = 300, min_positives: int = 20, *,
                 threshold: float = 0.5, task: str = "binary", missed_delta: float = 0.05,
                 drift: Drift = Drift()) -> None:
        self.specs = detector_specs(drift, delta, missed_delta)
        self.min_samples = min_samples
        self.min_positives = min_positives
        self.threshold = threshold
        self.binary = task == "binary"
        self.state: DriftState | None = None
        self.baselines: dict[str, float] = {}  # model version -> miss rate of positives on its validation split

    def update(self, outcome: dict[str, Any]) -> list[dict[str, Any]]:
        version = outcome["champion_version"]
        if self.state is None or self.state.version != version:
            s = self.specs
            self.state = DriftState(version, Watched(s["error"]), Watched(s["missed_positive"]), Watched(s["score"]))
        st = self.state
        score, label = outcome["champion_score"], float(outcome["label"])
        st.seen += 1
        alerts = []
        wrong = (score >= self.threshold) != (label >= 0.5)
        change = st.error.update(float(wrong) if st.error.spec.binary else abs(label - score))
        if change is not None and change[1] > change[0] and st.seen >= self.min_samples:
            metric = "decision_error_rate" if st.error.spec.binary else "abs_error"
            alerts.append(self._alert(st.error, "error", metric, change, version))
        if self.binary and label >= 0.5:
            missed = score < self.threshold
            st.positives += 1
            st.missed_count += missed
            gap = self._validation_gap(st)
            if gap is not None:
                alerts.append(gap)
            change = st.missed.update(float(missed))
            if change is not None and change[1] > change[0] and st.positives >= self.min_positives:
                alerts.append(self._alert(st.missed, "missed_positive", "missed_positive_rate", change, version))
        change = st.score.update(score)
        if change is not None and st.seen >= self.min_samples:
            alerts.append(self._alert(st.score, "score", "mean_score", change, version))
        return alerts

    def _validation_gap(self, st: DriftState) -> dict[str, Any] | None:
        baseline = self.baselines.get(st.version)
        if baseline is None or st.gap_alerted or st.positives < self.min_positives or math.isnan(baseline):
            return None
        rate = max(baseline, GAP_MIN_RATE)
        p_value = float(binom.sf(st.missed_count - 1, st.positives, rate))
        if p_value >= GAP_P_VALUE:
            return None
        st.gap_alerted = True
        live = st.missed_count / st.positives
        return {
            "detector": "validation_gap", "metric": "missed_positive_rate", "value": live, "threshold": rate,
            "model_version": st.version,
            "message": f"model {st.version} misses {st.missed_count} of {st.positives} live positives ({live:.3f}); "
                       f"its validation bound is {rate:.3f} (binomial p={p_value:.1e})",
        }

    @staticmethod
    def _alert(watched: Watched, signal: str, metric: str, change: tuple[float, float],
               version: str) -> dict[str, Any]:
        reference, value = change
        return {
            "detector": f"{watched.spec.name.lower()}_{signal}", "metric": metric, "value": value,
            "threshold": reference, "model_version": version,
            "message": f"{metric} of model {version} changed: {reference:.4f} -> {value:.4f} ({watched.spec.text})",
        }


class DriftStage(Stage):
    """Every model's detectors (see the module docstring); outcomes of models it does not know are ignored."""

    step_id = "drift"

    def __init__(self, project: Project, delta: float, *, cooldown: int = 1000, min_samples: int = 300,
                 clock: Callable[[], float] = time.time) -> None:
        self._outcomes = T.internal(project, T.I_OUTCOMES)
        self.topics: tuple[str, ...] = (self._outcomes, T.MODEL_EVENTS)
        self.models: dict[str, Model] = {m.name: m for m in project.models}
        self.detectors = {m.name: DriftDetector(delta, min_samples, threshold=m.threshold, task=m.task,
                                                drift=m.drift) for m in project.models}
        self.cooldown = cooldown
        self.clock = clock
        self.alerts = 0
        self.retrains = 0
        self._since_retrain = dict.fromkeys(self.models, cooldown)
        self._in = {self._outcomes: AvroCodec(T.I_OUTCOMES), T.MODEL_EVENTS: AvroCodec(T.MODEL_EVENTS)}
        self._alert = AvroCodec(T.ALERTS)
        self._retrain = AvroCodec(T.RETRAIN)

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        for msg, record in decoded(batch, self._in, result):
            if msg.topic == T.MODEL_EVENTS:
                self._baseline(record)
                continue
            name = record["model_name"]
            detector = self.detectors.get(name)
            if detector is None:
                continue
            self._since_retrain[name] += 1
            for alert in detector.update(record):
                self._publish(name, {**alert, "event_ts": record["ts_ms"]}, result)
        return result

    def _baseline(self, event: dict[str, Any]) -> None:
        """The miss rate a new version is held to: the 95% upper (Clopper-Pearson) bound of its
        validation miss rate, so that a validation split with few positives is not taken at its word."""
        m, model = event["metrics"], self.models.get(event["model_name"])
        if model is None or "missed_positive_val" not in m or not m.get("positives_val"):
            return
        n = int(m["positives_val"])
        k = round(m["missed_positive_val"] * n)
        self.detectors[model.name].baselines[model.version_name(event["version"])] = float(
            beta.ppf(0.95, k + 1, n - k))

    def _publish(self, name: str, alert: dict[str, Any], result: StepResult) -> None:
        now_ms = int(self.clock() * 1000)
        alert = {"alert_id": str(uuid.uuid4()), "ts": now_ms, **alert}
        self.alerts += 1
        result.produce.append(Produce(T.ALERTS, alert["detector"].encode(), self._alert.encode(alert)))
        retrains = alert["detector"] == "validation_gap" or alert["detector"].endswith(
            tuple(f"_{s}" for s in RETRAIN_SIGNALS))
        if not retrains or self._since_retrain[name] < self.cooldown:
            return
        self._since_retrain[name] = 0
        self.retrains += 1
        request = {"request_id": str(uuid.uuid4()), "model_name": name, "ts": now_ms,
                   "reason": f"drift alert {alert['alert_id']}", "since_ts": None}
        result.produce.append(Produce(T.RETRAIN, name.encode(), self._retrain.encode(request)))
