"""Learn: a model's online learner, trained on each scored event's label with the features served for it.

Inputs: the project's ``weir.<project>.scored`` (served feature vectors and the
champion's score, every model's: this stage keeps its model's) and, for a model
whose label is a stream of its own (:class:`~streams.project.spec.LabelStream`),
that source's silver topic. For every scored event it publishes the online
learner's score (test, then train) to ``predictions.<model>.online``; when the
label arrives it learns from the served features and emits an outcome (label,
champion score, online score) to ``weir.outcomes`` for the drift stage. A label
may arrive before its scored record: it waits. Both waits are bounded: by count
(``max_pending``) and by the label's ``horizon_s`` of event time (a scored
event still without a label when newer events are that much later, or a label
without its scored record, is given up and counted in ``expired``). A model
whose label is a field of the scored event
(:class:`~streams.project.spec.LabelField`) learns as soon as it is scored.

Co-partitioning: both inputs must reach the same worker for an event; with
one learn worker per model (the default) that always holds.

**Recovery.** The stage's whole state (the river model, the progressive
metric, the pending joins, the challengers) is one unit of the runtime's
recovery protocol (:mod:`streams.recovery`): after a commit, at most every
``checkpoint_every_s``, it is saved as a signed snapshot with the offset of
each input partition it is after; on assignment it is restored and each
partition replayed from the snapshot's offset to the committed one without
producing anything (those messages' outputs exist); a missing, altered or
too-new snapshot means relearning from the log's beginning. The model after a
restart is the one before the crash plus the replayed labels; with the
replay's interleaving of the two topics it can differ from an uninterrupted
run's by the order of a few joins. Each save also writes the primary learner
alone (:func:`serving_snapshot`), inference's fallback.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
from river import metrics

from models.online import RiverLearner
from models.progressive import Prediction, ProgressiveEvaluator
from streams import topics as T
from streams.base import Message, Produce, StepResult
from streams.codec import AvroCodec, decoded
from streams.project.contracts import silver_topic
from streams.project.spec import LabelStream, Model, Project
from streams.recovery import Admit, StatefulStage
from streams.state import SignedSnapshots, StateError

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]


def serving_snapshot(model: Model) -> str:
    """The snapshot inference's fallback reads: the model's primary online learner alone."""
    return f"serving:{model.online_name}"


def _clip(p: float) -> float:
    """A probability for a prediction record: NaN as 0, clipped to [0, 1]."""
    p = float(p)
    return 0.0 if math.isnan(p) else min(1.0, max(0.0, p))


class BoundedMap(OrderedDict[str, Any]):
    """Insertion-ordered map that forgets its oldest entries past ``limit``."""

    def __init__(self, limit: int = 500_000) -> None:  # a default: unpickling calls it without arguments
        super().__init__()
        self.limit = limit

    def expire(self, cutoff: int, ts_of: Callable[[Any], int]) -> int:
        """Drop the oldest entries while their time (``ts_of(value)``, ms) is below ``cutoff``; returns how many.
        Entries are in arrival order, which is close to time order: the scan stops at the first newer one."""
        dropped = 0
        while self:
            key = next(iter(self))
            if ts_of(self[key]) >= cutoff:
                break
            del self[key]
            dropped += 1
        return dropped

    def put(self, key: str, value: Any) -> None:
        self[key] = value
        while len(self) > self.limit:
            self.popitem(last=False)


class LearnStage(StatefulStage):
    """Scores every served event of one model with its online learner, learns on its label, keeps its
    progressive metric.

    The metric (``metric``, river's definition; by default the model's: ROC AUC or MAE) is updated at each
    label with the prediction made when the event was scored: river's delayed progressive validation.
    Every ``publish_every`` labels it is published to ``model.metrics`` (and from there to the ClickHouse
    table ``model_metrics``), with the same metric of each champion version's served scores on the same
    labels. ``rename`` maps one of the project's topic names to the one actually used (tests).
    """

    def __init__(self, project: Project, model: Model, learner: RiverLearner, version: str, *,
                 metric: str | None = None, publish_every: int = 500,
                 challengers: dict[str, tuple[RiverLearner, str]] | None = None,
                 max_pending: int = 500_000, clock: Callable[[], float] = time.time,
                 snapshots: SignedSnapshots | None = None, checkpoint_every_s: float = 30.0,
                 monotonic: Callable[[], float] = time.monotonic, rename: dict[str, str] | None = None) -> None:
        super().__init__(snapshots, checkpoint_every_s=checkpoint_every_s, clock=monotonic)
        names = rename or {}
        self.model = model
        self.step_id = f"learn-{model.name}"
        self.features = model.feature_names
        self.key_field = model.key or project.source(model.source).partition_key
        metric = metric or model.metric
        self.evaluator = ProgressiveEvaluator(learner, metric)
        # more online models beside the primary: model name -> (version, their evaluator); they score and learn
        # the same events, publish their own predictions and metrics, and feed nothing downstream
        self.challengers: dict[str, tuple[str, ProgressiveEvaluator]] = {
            f"{model.online_name}-{name}": (v, ProgressiveEvaluator(lr, metric))
            for name, (lr, v) in (challengers or {}).items()}
        self.definition = f"learn:{model.name}:{metric}:{','.join(self.features)}".encode()
        self.publish_every = publish_every
        self.version = version
        self.clock = clock
        self.pending: BoundedMap = BoundedMap(max_pending)  # event id -> scored record + online score
        self.early_labels: BoundedMap = BoundedMap(max_pending)  # event id -> (label, label time)
        label = model.label
        self.label = label if isinstance(label, LabelStream) else None
        self.join_horizon_ms = int(label.horizon_s * 1000) if isinstance(label, LabelStream) else 0
        self.champions: dict[str, list[Any]] = {}  # champion version -> [metric of its served scores, labels]
        self.expired = {"unlabelled": 0, "unscored_labels": 0}  # joins given up after the horizon
        self.unlabelled_values = 0  # label records whose value was null
        self._newest_scored = self._newest_label = 0
        self.learned = 0
        own = {T.I_SCORED: T.internal(project, T.I_SCORED), T.I_OUTCOMES: T.internal(project, T.I_OUTCOMES)}
        scored = names.get(own[T.I_SCORED], own[T.I_SCORED])
        self._codecs = {scored: AvroCodec(T.I_SCORED)}
        self._scored_topic = scored
        if self.label is not None:
            labels = silver_topic(project, project.source(self.label.source))
            self._codecs[names.get(labels, labels)] = AvroCodec(labels)
        self.topics: tuple[str, ...] = tuple(self._codecs)
        self._out = {t: names.get(own.get(t, t), own.get(t, t))
                     for t in (model.online_topic, T.I_OUTCOMES, T.MODEL_METRICS)}
        self._pred = AvroCodec(model.online_topic)
        self._outcome = AvroCodec(T.I_OUTCOMES)
        self._metric = AvroCodec(T.MODEL_METRICS)

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        scratch = StepResult()  # what replayed messages would produce: they produced it before the restart
        for msg in batch:
            admitted = self.admit(msg)
            if admitted is Admit.SEEN:
                continue
            out = scratch if admitted is Admit.REPLAY else result
            for _, record in decoded([msg], self._codecs, out):
                if msg.topic == self._scored_topic:
                    for item in record["items"]:
                        if item["model_name"] == self.model.name:
                            self._scored(item, out)
                else:
                    for item in record["items"]:
                        self._label(item, out)
        return result

    @property
    def learner(self) -> RiverLearner:
        """The primary online model (the evaluator's: restoring a snapshot replaces both at once)."""
        return self.evaluator.learner

    # --- the unit of state of the recovery protocol (streams.recovery): the whole stage ---

    @property
    def snapshot_name(self) -> str:
        return f"learn:{self.model.online_name}:{self.version}"

    def unit_of(self, tp: TopicPartition) -> str:
        return self.snapshot_name  # one learn worker holds every partition: the joins span them

    def dump_unit(self, unit: str) -> Any:
        return {"evaluator": self.evaluator, "pending": self.pending, "early": self.early_labels,
                "learned": self.learned, "expired": dict(self.expired), "champions": self.champions,
                "challengers": self.challengers, "newest": (self._newest_scored, self._newest_label)}

    def load_unit(self, unit: str, state: Any | None) -> None:
        if state is None:  # untrained clones of the configured learners, nothing pending
            state = {"evaluator": ProgressiveEvaluator(self.learner.clone(), self.evaluator.metric_name),
                     "pending": BoundedMap(self.pending.limit), "early": BoundedMap(self.early_labels.limit),
                     "learned": 0, "challengers": {name: (v, ProgressiveEvaluator(ev.learner.clone(), ev.metric_name))
                                                   for name, (v, ev) in self.challengers.items()}}
        if not isinstance(state, dict) or not isinstance(state.get("evaluator"), ProgressiveEvaluator):
            raise StateError("not a learn stage's state")
        self.evaluator = state["evaluator"]
        self.pending, self.early_labels, self.learned = state["pending"], state["early"], state["learned"]
        self.expired = dict(state.get("expired", {"unlabelled": 0, "unscored_labels": 0}))
        self.champions = state.get("champions", {})
        kept = state.get("challengers", {})
        for name in self.challengers:  # the configured ones: restored if the snapshot has them, else fresh
            if name in kept:
                self.challengers[name] = kept[name]
            else:
                version, ev = self.challengers[name]
                self.challengers[name] = (version, ProgressiveEvaluator(ev.learner.clone(), ev.metric_name))
                log.warning("learn: challenger %s is not in the snapshot: it starts untrained", name)
        self._newest_scored, self._newest_label = state.get("newest", (0, 0))

    def drop_unit(self, unit: str) -> None:
        """Keep the state: the next assignment restores or rebuilds it anyway, and what a stopped stage learned
        stays readable (one learn member holds every partition, so nobody else moves on with it)."""

    def after_save(self, unit: str) -> None:
        """Inference's fallback when its model fails: the primary learner alone (streams.serving.resilience)."""
        assert self.snapshots is not None
        try:
            self.snapshots.save(serving_snapshot(self.model), {"version": self.version, "learner": self.learner})
        except redis.RedisError as exc:
            log.warning("learn %s: serving snapshot not saved (%s); retried at the next checkpoint",
                        self.model.name, exc)

    # --- the join and the learning ---

    def _score(self, ev: ProgressiveEvaluator, x: dict[str, float]) -> tuple[float, Prediction]:
        """(the score a prediction record carries, the test-time prediction the metric will get)."""
        if self.model.task == "binary":
            proba = ev.learner.predict_proba_dict(x)
            return _clip(proba.get(True, 0.0)), ev.prediction(proba)
        score = ev.learner.score(x)
        return score, score

    def _scored(self, item: dict[str, Any], result: StepResult) -> None:
        x = dict(zip(self.features, item["features"]))
        online, prediction = self._score(self.evaluator, x)
        now_ms = int(self.clock() * 1000)
        key = item["entity_id"]
        pred = {
            "event_id": item["event_id"], self.key_field: key, "score": online, "model_name": self.model.online_name,
            "model_version": self.version, "latency_ms": 0.0, "event_ts": item["ts_ms"], "predicted_ts": now_ms,
            "decision": online >= self.model.threshold if self.model.task == "binary" else None,
            "threshold": self.model.threshold if self.model.task == "binary" else None,
        }
        topic = self._out[self.model.online_topic]
        result.produce.append(Produce(topic, key.encode(), self._pred.encode(pred)))
        others: dict[str, Prediction] = {}
        for name, (version, ev) in self.challengers.items():
            score, others[name] = self._score(ev, x)
            record = pred | {"score": score, "model_name": name, "model_version": version}
            result.produce.append(Produce(topic, key.encode(), self._pred.encode(record)))
        entry = (x, item, online, prediction, others)
        if item.get("label") is not None:  # the label is a field of the scored event: learn now
            self._learn(entry, float(item["label"]), item["ts_ms"], result)
            return
        early = self.early_labels.pop(item["event_id"], None)
        if early is None:
            self.pending.put(item["event_id"], entry)
            if item["ts_ms"] > self._newest_scored:
                self._newest_scored = item["ts_ms"]
                self.expired["unlabelled"] += self.pending.expire(
                    self._newest_scored - self.join_horizon_ms, lambda e: int(e[1]["ts_ms"]))
        else:
            self._learn(entry, early[0], early[1], result)

    def _label(self, record: dict[str, Any], result: StepResult) -> None:
        """A label source's event: its key names the scored event, its value is the label."""
        assert self.label is not None
        event_id, value = record.get(self.label.key), record.get(self.label.value)
        if event_id is None or value is None:
            self.unlabelled_values += 1
            return
        y, label_ms = float(value), int(record["ts_ms"])
        entry = self.pending.pop(str(event_id), None)
        if entry is None:
            self.early_labels.put(str(event_id), (y, label_ms))
            if label_ms > self._newest_label:
                self._newest_label = label_ms
                self.expired["unscored_labels"] += self.early_labels.expire(
                    label_ms - self.join_horizon_ms, lambda lb: int(lb[1]))
        else:
            self._learn(entry, y, label_ms, result)

    def _learn(self, entry: tuple[dict[str, float], dict[str, Any], float, Prediction, dict[str, Prediction]],
               y: float, label_ms: int, result: StepResult) -> None:
        x, item, online, prediction, others = entry
        target: bool | float = y >= 0.5 if self.model.task == "binary" else y
        self.evaluator.train(x, target, prediction)  # the metric, then learn_one
        for name, (_, ev) in self.challengers.items():
            ev.train(x, target, others.get(name))  # none: added after this event was scored, learn only
        self.learned += 1
        champion = self.champions.get(item["model_version"])
        if champion is None:  # not setdefault: building a metric per event took an eighth of the stage's time
            champion = self.champions[item["model_version"]] = [self._champion_metric(), 0]
        if self.model.task == "binary":
            champion[0].update(target, {True: item["score"], False: 1.0 - item["score"]})  # the served score
        else:
            champion[0].update(target, item["score"])
        champion[1] += 1
        if self.learned % self.publish_every == 0:
            result.produce.append(self.metric_record())
            result.produce += [self._record(name, v, ev.metric_name, ev.value, ev.n)
                               for name, (v, ev) in self.challengers.items()]
            result.produce += [self._record(self.model.name, v, self.model.metric, float(m.get()), n)
                               for v, (m, n) in self.champions.items()]
        outcome = {
            "event_id": item["event_id"], "model_name": self.model.name, "label": y, "ts_ms": item["ts_ms"],
            "label_ts_ms": label_ms, "champion_score": item["score"], "champion_version": item["model_version"],
            "online_score": online,
        }
        result.produce.append(Produce(self._out[T.I_OUTCOMES], item["event_id"].encode(),
                                      self._outcome.encode(outcome)))

    def _champion_metric(self) -> Any:
        return metrics.ROCAUC() if self.model.task == "binary" else metrics.MAE()  # type: ignore[no-untyped-call]

    def metric_record(self) -> Produce:
        """The online model's progressive metric now, as a ``model.metrics`` record."""
        ev = self.evaluator
        return self._record(self.model.online_name, self.version, ev.metric_name, ev.value, ev.n)

    def _record(self, model: str, version: str, metric: str, value: float, labels: int) -> Produce:
        record = {
            "metric_id": f"{model}:{version}:{metric}:{labels}", "ts": datetime.fromtimestamp(self.clock(), UTC),
            "model_name": model, "model_version": version, "metric": metric, "value": value, "labels": labels,
        }
        return Produce(self._out[T.MODEL_METRICS], model.encode(), self._metric.encode(record))
