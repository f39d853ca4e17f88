"""Drift: watches each model's labelled error, its score and its inputs; raises alerts and retrains.

Input: the project's ``weir.<project>.outcomes`` (label + champion score + online learner score per scored
event, in label order, every model's). Per model, river drift detectors, each the one the model declares
for its signal (:class:`streams.project.spec.Drift`; ADWIN by default; :mod:`models.drift_detectors`), and
one test. An alert's detector is named ``<detector>_<signal>`` (``adwin_error``,
``pagehinkley_missed_positive``, ``adwin_online_missed_positive``, ...):

- ``*_error`` over the absolute error ``|label - score|`` of every outcome (for a detector over 0/1 values,
  whether the decision was wrong);
- ``*_missed_positive`` (a binary model) over "this positive scored below the model's decision threshold",
  fed by positive outcomes only. Positives may be a few percent of events, so a new pattern of them moves
  the overall error by a point or two, which ADWIN needs thousands of outcomes to separate from noise; among
  positives the same change moves the miss rate by tens of points;
- ``*_score`` over the score itself (the score distribution; alert only);
- ``*_online_error`` and ``*_online_missed_positive``: the same two signals of the model's online learner.
  The champion's detectors are per version (a version is judged on its own outcomes; labels come late, so
  outcomes of two versions interleave), and a version promoted shortly before a drift has too few outcomes
  of the old regime for a detector to see the change (measured on a demo run: 4 of 15 positives missed, then
  112 of 139; no ADWIN alarm). The online learner never changes version: its detectors compare the new
  regime with the whole history (the same run: an alarm 14 minutes of event time after the drift);
- ``validation_gap`` (a binary model, ``kind`` model): once a version has served ``min_positives`` labelled
  positives, a one-sided binomial test of its live miss count against the upper bound of the miss rate it
  had on its own validation split (from ``model.events``). A change detector cannot see a drift that
  happened before the model went live; this test can. It fires at most once per version.

**Inputs** (:mod:`streams.monitoring`): the stage also reads the project's ``weir.<project>.scored`` and
feeds each model's scored events (features, score, serving version) to its input monitor, which tests
every closed window of event time against the serving version's reference (its newest complete training rows, registered
next to it as ``v<N>.npz``; loaded when ``model.events`` first names the version) and checks each feature's
data quality. Each report goes to ``weir.<project>.feature_drift`` (ClickHouse ``feature_drift``), its
alerts (``feature_drift``, kind drift; ``data_quality``) to ``alerts``, with an id derived from the window
so that a redelivery repeats it. They inform: labels say whether the model suffers.

Detectors count outcomes, not time; an alert carries the event time of the outcome that raised it
(``event_ts``) and where its detector places the change's start (``change_ts``,
:func:`models.drift_detectors.change_start`), so where a change was seen does not depend on how fast the
machine processed the stream.

**Retraining** (the model's :class:`~streams.project.spec.RetrainPolicy`): an increase found on the error
or the miss rate, or a validation gap, makes a retrain *pending*. A pending retrain with a placed change is
sent once ``min_new_labels`` mature labels (``min_new_positives`` positives) of events at or after the change
are in, mature as the retrain stage counts them (at least the label stream's ``maturity_s`` older than the
newest label); with none placed (a validation gap), at once. Either way at least ``cooldown_labels``
outcomes after the previous request. While one waits, a validation gap sends it without waiting for labels,
a change placed later replaces it, and after ``WAIT_LIMIT`` times ``min_new_labels`` outcomes it goes out
anyway (logged). Only alerts about the serving version or the online learner retrain: late labels of a
replaced version inform. With ``every_labels``, a model is also retrained each time that many outcomes
followed the previous request (the cron ``WEIR_RETRAIN_CRON`` retrains by wall-clock time, which a replay
or a fast stream outruns); such a request carries the latest change a drift request placed. The request
carries the change (``change_ts``): the run weighs the rows after it. The threshold is the model's own (:attr:`streams.project.spec.Model.threshold`), the one inference
decides with.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy.stats import beta, binom

from models.drift_detectors import Alarm, DetectorSpec, Watched, parse_detector
from models.feature_drift import Reference
from streams import topics as T
from streams.base import Message, Produce, Stage, StepResult
from streams.codec import AvroCodec, decoded
from streams.monitoring import InputMonitor
from streams.project.spec import Drift, Model, Project

log = logging.getLogger(__name__)

RETRAIN_SIGNALS = ("error", "missed_positive")  # and the validation gap; the score's alerts only inform
GAP_P_VALUE = 1e-3
GAP_MIN_RATE = 0.05  # floor for a validation miss rate measured on few positives
VERSIONS_KEPT = 4  # champion versions whose detectors are kept (outcomes of older ones are ignored)
WAIT_LIMIT = 10  # a pending retrain goes out after this many times min_new_labels outcomes (1000 at least)
RECENT_OUTCOMES = 50_000  # per model: (event time, positive) of the latest outcomes, to count a change's labels


def detector_specs(drift: Drift, delta: float, missed_delta: float = 0.05) -> dict[str, DetectorSpec]:
    """The detector of each signal: the declared one, else ADWIN (see :class:`~streams.project.spec.Drift`)."""
    return {"error": parse_detector(drift.error or f"ADWIN(delta={delta})"),
            # Positives are few, so the miss detector checks every 4 of them (river's default: 32)
            # and uses a looser confidence: at delta=0.002 ADWIN misses a 0.26 -> 0.70 miss-rate change
            # over 58 + 133 positives; at 0.05 it finds it after ~90 (measured on a demo run).
            "missed_positive": parse_detector(drift.missed_positive or f"ADWIN(delta={missed_delta}, clock=4)"),
            "score": parse_detector(drift.score or f"ADWIN(delta={delta})")}


class Signals:
    """The error and miss-rate detectors over one scorer's outcomes (a champion version, or the online
    learner), and its counts."""

    def __init__(self, specs: dict[str, DetectorSpec]) -> None:
        self.error = Watched(specs["error"])
        self.missed = Watched(specs["missed_positive"])
        self.seen = 0
        self.positives = 0
        self.missed_count = 0


class DriftState(Signals):
    """A champion version's detectors: :class:`Signals`, its score's, and whether its gap was raised."""

    def __init__(self, version: str, specs: dict[str, DetectorSpec]) -> None:
        super().__init__(specs)
        self.version = version
        self.score = Watched(specs["score"])
        self.gap_alerted = False


class DriftDetector:
    """Pure detection logic for one model: ``update`` returns the alerts (as dicts) one outcome raises.

    ``task`` is the model's (the miss-rate detector and the validation gap are a binary model's),
    ``threshold`` its decision threshold, ``online_name`` what its online learner's alerts name."""

    def __init__(self, delta: float, min_samples: int = 300, min_positives: int = 20, *,
                 threshold: float = 0.5, task: str = "binary", missed_delta: float = 0.05,
                 drift: Drift = Drift(), online_name: str = "online") -> None:
        self.specs = detector_specs(drift, delta, missed_delta)
        self.min_samples = min_samples
        self.min_positives = min_positives
        self.threshold = threshold
        self.binary = task == "binary"
        self.online_name = online_name
        self.states: OrderedDict[str, DriftState] = OrderedDict()  # champion version -> its detectors
        self.retired: set[str] = set()  # versions whose detectors were dropped: their late outcomes are ignored
        self.current: str | None = None  # the version seen first most recently: the one serving
        self.online = Signals(self.specs)
        self.baselines: dict[str, float] = {}  # model version -> miss rate of positives on its validation split

    def state(self, version: str) -> DriftState | None:
        """The detectors of ``version``: the :data:`VERSIONS_KEPT` versions seen first most recently are kept,
        an older one's outcomes ignored (None)."""
        st = self.states.get(version)
        if st is None and version not in self.retired:
            st = self.states[version] = DriftState(version, self.specs)
            self.current = version
            while len(self.states) > VERSIONS_KEPT:
                self.retired.add(self.states.popitem(last=False)[0])
        return st

    def serving(self, version: str) -> bool:
        """Whether alerts about ``version`` may retrain: the serving champion's and the online learner's (late
        labels of a replaced version inform only)."""
        return version in (self.current, self.online_name)

    def update(self, outcome: dict[str, Any]) -> list[dict[str, Any]]:
        version = outcome["champion_version"]
        label, at = float(outcome["label"]), outcome.get("ts_ms")
        alerts: list[dict[str, Any]] = []
        st = self.state(version)
        if st is not None:
            alerts += self._signals(st, outcome["champion_score"], label, at, version, "")
            gap = self._validation_gap(st) if self.binary and label >= 0.5 else None
            alerts += [gap] if gap is not None else []
            change = st.score.update(outcome["champion_score"], at)
            if change is not None and st.seen >= self.min_samples:
                alerts.append(self._alert(st.score, "score", "mean_score", change, version, severity="info"))
        if outcome.get("online_score") is not None:
            alerts += self._signals(self.online, outcome["online_score"], label, at, self.online_name, "online_")
        return alerts

    def _signals(self, sig: Signals, score: float, label: float, at: int | None, version: str,
                 prefix: str) -> list[dict[str, Any]]:
        """Feed one outcome of one scorer to its error and miss-rate detectors; the alerts they raise."""
        sig.seen += 1
        alerts = []
        wrong = (score >= self.threshold) != (label >= 0.5)
        change = sig.error.update(float(wrong) if sig.error.spec.binary else abs(label - score), at)
        if change is not None and change.now > change.before and sig.seen >= self.min_samples:
            metric = "decision_error_rate" if sig.error.spec.binary else "abs_error"
            alerts.append(self._alert(sig.error, f"{prefix}error", metric, change, version))
        if self.binary and label >= 0.5:
            missed = score < self.threshold
            sig.positives += 1
            sig.missed_count += missed
            change = sig.missed.update(float(missed), at)
            if change is not None and change.now > change.before and sig.positives >= self.min_positives:
                alerts.append(self._alert(sig.missed, f"{prefix}missed_positive", "missed_positive_rate", change,
                                          version))
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
            "model_version": st.version, "kind": "model", "severity": "critical", "change_ts": None,
            "message": f"model {st.version} misses {st.missed_count} of {st.positives} live positives ({live:.3f}); "
                       f"its validation bound is {rate:.3f} (binomial p={p_value:.1e})",
        }

    @staticmethod
    def _alert(watched: Watched, signal: str, metric: str, change: Alarm, version: str, *,
               severity: str = "warning") -> dict[str, Any]:
        return {
            "detector": f"{watched.spec.name.lower()}_{signal}", "metric": metric, "value": change.now,
            "threshold": change.before, "model_version": version, "kind": "drift", "severity": severity,
            "change_ts": change.since_ms,
            "message": f"{metric} of model {version} changed: {change.before:.4f} -> {change.now:.4f} "
                       f"({watched.spec.text})",
        }


def retrains(alert: dict[str, Any]) -> bool:
    """Whether an alert asks for a retrain: a validation gap, or an increase of an error or a miss rate."""
    detector: str = alert["detector"]
    return detector == "validation_gap" or detector.endswith(tuple(f"_{s}" for s in RETRAIN_SIGNALS))


@dataclass
class PendingRetrain:
    """A retrain an alert asked for, waiting for mature labels of the new regime (and the cool-down).

    ``young`` holds (event time, positive) of labelled events at or after the change not yet mature."""

    alert_id: str
    change_ms: int | None
    young: list[tuple[int, bool]] = field(default_factory=list)
    labels: int = 0
    positives: int = 0
    waited: int = 0  # outcomes since the alert
    urgent: bool = False  # a validation gap came meanwhile: go out without waiting for labels

    def add(self, ts_ms: int, positive: bool) -> None:
        if self.change_ms is not None and ts_ms >= self.change_ms:
            heapq.heappush(self.young, (ts_ms, positive))

    def mature(self, until_ms: int) -> None:
        """Count the events at most ``until_ms``: their labels are mature."""
        while self.young and self.young[0][0] <= until_ms:
            self.positives += heapq.heappop(self.young)[1]
            self.labels += 1


def load_reference(artifact_uri: str) -> Reference | None:
    """The reference registered next to a model's artifact (``v<N>.npz``), if it has one."""
    path = Path(artifact_uri).with_suffix(".npz")
    try:
        return Reference.load(path) if path.is_file() else None
    except (OSError, ValueError, KeyError) as exc:
        log.warning("reference %s unreadable: %s", path, exc)
        return None


class DriftStage(Stage):
    """Every model's detectors and pending retrains (see the module docstring); outcomes of models it does
    not know are ignored. ``cooldown`` overrides every model's ``retrain.cooldown_labels``."""

    step_id = "drift"

    def __init__(self, project: Project, delta: float, *, cooldown: int | None = None, min_samples: int = 300,
                 clock: Callable[[], float] = time.time,
                 load_reference: Callable[[str], Reference | None] = load_reference) -> None:
        self._outcomes = T.internal(project, T.I_OUTCOMES)
        self._scored = T.internal(project, T.I_SCORED)
        self._reports = T.internal(project, T.I_FEATURE_DRIFT)
        self.topics: tuple[str, ...] = (self._outcomes, self._scored, T.MODEL_EVENTS)
        self.models: dict[str, Model] = {m.name: m for m in project.models}
        self.detectors = {m.name: DriftDetector(delta, min_samples, threshold=m.threshold, task=m.task,
                                                drift=m.drift, online_name=m.online_name) for m in project.models}
        self.cooldown = {m.name: m.retrain.cooldown_labels if cooldown is None else cooldown
                         for m in project.models}
        self.clock = clock
        self.alerts = 0
        self.retrains = 0
        self.pending: dict[str, PendingRetrain] = {}
        self._since_request = dict.fromkeys(self.models, 0)  # outcomes since the last request (or the start)
        self._requested: set[str] = set()  # models with a request sent: the cool-down applies
        self._last_change: dict[str, int | None] = dict.fromkeys(self.models)  # the latest change a request sent
        self._newest_label = dict.fromkeys(self.models, 0)
        self._recent: dict[str, deque[tuple[int, bool]]] = {m: deque(maxlen=RECENT_OUTCOMES) for m in self.models}
        self.monitors = {m.name: InputMonitor(m) for m in project.models}
        self.load_reference = load_reference
        self._known: set[str] = set()  # versions whose reference was looked for
        self._in = {self._outcomes: AvroCodec(T.I_OUTCOMES), self._scored: AvroCodec(T.I_SCORED),
                    T.MODEL_EVENTS: AvroCodec(T.MODEL_EVENTS)}
        self._report = AvroCodec(T.I_FEATURE_DRIFT)
        self._alert = AvroCodec(T.ALERTS)
        self._retrain = AvroCodec(T.RETRAIN)

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        for msg, record in decoded(batch, self._in, result):
            if msg.topic == T.MODEL_EVENTS:
                self._baseline(record)
                self._reference(record)
                continue
            if msg.topic == self._scored:
                self._watch(record["items"], result)
                continue
            name = record["model_name"]
            detector = self.detectors.get(name)
            if detector is None:
                continue
            self._since_request[name] += 1
            self._newest_label[name] = max(self._newest_label[name], record["label_ts_ms"])
            seen = (record["ts_ms"], record["label"] >= 0.5)
            self._recent[name].append(seen)
            if name in self.pending:
                self.pending[name].add(*seen)
                self.pending[name].waited += 1
            for alert in detector.update(record):
                self._publish(name, {**alert, "event_ts": record["ts_ms"]}, result)
            self._progress(self.models[name], result)
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

    def _reference(self, event: dict[str, Any]) -> None:
        """Load a new version's reference (its newest training rows) for its model's input monitor."""
        model = self.models.get(event["model_name"])
        if model is None or not event["artifact_uri"]:  # a refused command names no artifact
            return
        version = model.version_name(event["version"])
        if version in self._known:
            return
        self._known.add(version)
        ref = self.load_reference(event["artifact_uri"])
        if ref is None:
            log.warning("%s has no reference next to %s: its inputs are not watched", version, event["artifact_uri"])
        else:
            self.monitors[model.name].reference(version, ref)

    def _watch(self, items: list[dict[str, Any]], result: StepResult) -> None:
        """Feed scored events to their model's input monitor; publish the reports and alerts of closed windows."""
        for item in items:
            monitor = self.monitors.get(item["model_name"])
            if monitor is None:
                continue
            for report in monitor.add(item["features"], item["score"], item["model_version"], item["ts_ms"]):
                now = int(self.clock() * 1000)
                key = f"{report.model_name}/{report.version}/{report.start_ms}"
                result.produce.append(Produce(self._reports, key.encode(), self._report.encode(report.record(now))))
                for alert in report.alerts:  # one id per window and detector: a redelivery repeats it
                    alert_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"weir:{key}/{alert['detector']}"))
                    self._publish(report.model_name, {"alert_id": alert_id, **alert}, result)

    def _publish(self, name: str, alert: dict[str, Any], result: StepResult) -> None:
        alert = {"alert_id": str(uuid.uuid4()), "ts": int(self.clock() * 1000), "model_name": name,
                 "features": [], **alert}
        self.alerts += 1
        result.produce.append(Produce(T.ALERTS, alert["detector"].encode(), self._alert.encode(alert)))
        if not retrains(alert) or not self.detectors[name].serving(alert["model_version"]):
            return
        pending, change = self.pending.get(name), alert["change_ts"]
        if pending is not None and change is None:
            pending.urgent = True  # the model falls short now: retrain with what there is
        elif pending is None or (pending.change_ms is not None and change > pending.change_ms):
            # the first alert, or a change placed later (a new one): count its labels, seen ones too
            pending = self.pending[name] = PendingRetrain(alert["alert_id"], change,
                                                          urgent=pending is not None and pending.urgent)
            for seen in self._recent[name]:
                pending.add(*seen)

    def _progress(self, model: Model, result: StepResult) -> None:
        """Send the model's pending retrain request once its policy allows, or its periodic one (see the module
        docstring)."""
        name, policy = model.name, model.retrain
        pending = self.pending.get(name)
        if pending is None:
            if policy.every_labels and self._since_request[name] >= policy.every_labels:
                self._request(name, f"every {policy.every_labels} labels", self._last_change[name], result)
            return
        pending.mature(self._newest_label[name] - model.maturity_ms)
        enough = pending.change_ms is None or pending.urgent or (
            pending.labels >= policy.min_new_labels
            and (model.task != "binary" or pending.positives >= policy.min_new_positives))
        if not enough and pending.waited >= max(WAIT_LIMIT * policy.min_new_labels, 1000):
            log.warning("retrain of %s sent after %d outcomes without the policy's labels of the new regime "
                        "(%d mature labels, %d positive, since the change)", name, pending.waited, pending.labels,
                        pending.positives)
            enough = True
        if not enough or (name in self._requested and self._since_request[name] < self.cooldown[name]):
            return
        del self.pending[name]
        placed = "" if pending.change_ms is None else \
            f"; {pending.labels} mature labels ({pending.positives} positive) since the change"
        if pending.change_ms is not None:
            self._last_change[name] = pending.change_ms
        self._request(name, f"drift alert {pending.alert_id}{placed}", pending.change_ms, result)

    def _request(self, name: str, reason: str, change_ms: int | None, result: StepResult) -> None:
        self._since_request[name] = 0
        self._requested.add(name)
        self.retrains += 1
        request = {"request_id": str(uuid.uuid4()), "model_name": name, "ts": int(self.clock() * 1000),
                   "reason": reason, "since_ts": None, "change_ts": change_ms}
        result.produce.append(Produce(T.RETRAIN, name.encode(), self._retrain.encode(request)))
