"""Learn: the online learner, trained on each payment's label with the features served when it was scored.

Inputs: ``weir.scored`` (served feature vectors and the champion's score)
and ``labels.fraud``. For every scored payment it publishes the online
learner's score (test, then train) to ``predictions.fraud.online``; when the
label arrives it learns from the served features and emits an outcome
(label, champion score, online score) to ``weir.outcomes`` for the drift
stage. A label may arrive before its scored record: it waits, bounded.

Co-partitioning: both inputs must reach the same worker for a payment; with
one learn worker (the default) that always holds.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from models.online import RiverLearner
from models.progressive import Prediction, ProgressiveEvaluator
from streams import topics as T
from streams.base import Message, Produce, StepResult
from streams.codec import AvroCodec, decoded
from streams.features.definitions import FEATURE_NAMES

ONLINE_MODEL = "fraud-online"


class BoundedMap(OrderedDict[str, Any]):
    """Insertion-ordered map that forgets its oldest entries past ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: str, value: Any) -> None:
        self[key] = value
        while len(self) > self.limit:
            self.popitem(last=False)


class LearnStage:
    """Scores every served payment with the online learner, learns on its label, keeps its progressive metric.

    The metric (``metric``, river's definition) is updated at each label with
    the prediction made when the payment was scored: river's delayed
    progressive validation. Every ``publish_every`` labels it is published to
    ``model.metrics`` (and from there to the ClickHouse table ``model_metrics``).
    """

    step_id = "learn"
    topics = (T.I_SCORED, T.LABELS)

    def __init__(self, learner: RiverLearner, version: str, *, metric: str = "rocauc", publish_every: int = 500,
                 max_pending: int = 500_000, clock: Callable[[], float] = time.time) -> None:
        self.learner = learner
        self.evaluator = ProgressiveEvaluator(learner, metric)
        self.publish_every = publish_every
        self.version = version
        self.clock = clock
        self.pending: BoundedMap = BoundedMap(max_pending)  # payment id -> scored record + online score
        self.early_labels: BoundedMap = BoundedMap(max_pending)  # payment id -> label
        self.learned = 0
        self._codecs = {T.I_SCORED: AvroCodec(T.I_SCORED), T.LABELS: AvroCodec(T.LABELS)}
        self._pred = AvroCodec(T.PREDICTIONS_ONLINE)
        self._outcome = AvroCodec(T.I_OUTCOMES)
        self._metric = AvroCodec(T.MODEL_METRICS)

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        for msg, record in decoded(batch, self._codecs, result):
            if msg.topic == T.I_SCORED:
                for item in record["items"]:
                    self._scored(item, result)
            else:
                self._label(record, result)
        return result

    def _scored(self, item: dict[str, Any], result: StepResult) -> None:
        x = dict(zip(FEATURE_NAMES, item["features"]))
        proba = self.learner.predict_proba_dict(x)
        p = float(proba.get(True, 0.0))
        online = 0.0 if math.isnan(p) else min(1.0, max(0.0, p))
        now_ms = int(self.clock() * 1000)
        pred = {
            "event_id": item["event_id"], "payment_id": item["payment_id"], "card_id": item["card_id"],
            "customer_id": "", "score": online, "model_name": ONLINE_MODEL, "model_version": self.version,
            "latency_ms": 0.0, "event_ts": item["ts_ms"], "predicted_ts": now_ms,
        }
        result.produce.append(Produce(T.PREDICTIONS_ONLINE, item["card_id"].encode(), self._pred.encode(pred)))
        entry = (x, item, online, self.evaluator.prediction(proba))
        label = self.early_labels.pop(item["payment_id"], None)
        if label is None:
            self.pending.put(item["payment_id"], entry)
        else:
            self._learn(entry, label, result)

    def _label(self, label: dict[str, Any], result: StepResult) -> None:
        entry = self.pending.pop(label["payment_id"], None)
        if entry is None:
            self.early_labels.put(label["payment_id"], label)
        else:
            self._learn(entry, label, result)

    def _learn(self, entry: tuple[dict[str, float], dict[str, Any], float, Prediction], label: dict[str, Any],
               result: StepResult) -> None:
        x, item, online, prediction = entry
        self.evaluator.train(x, bool(label["is_fraud"]), prediction)  # the metric, then learn_one
        self.learned += 1
        if self.learned % self.publish_every == 0:
            result.produce.append(self.metric_record())
        outcome = {
            "payment_id": item["payment_id"], "is_fraud": bool(label["is_fraud"]), "ts_ms": item["ts_ms"],
            "champion_score": item["score"], "champion_version": item["model_version"], "online_score": online,
        }
        result.produce.append(Produce(T.I_OUTCOMES, item["payment_id"].encode(), self._outcome.encode(outcome)))

    def metric_record(self) -> Produce:
        """The progressive metric now, as a ``model.metrics`` record."""
        ev = self.evaluator
        record = {
            "metric_id": f"{ONLINE_MODEL}:{self.version}:{ev.metric_name}:{self.learned}",
            "ts": datetime.fromtimestamp(self.clock(), UTC), "model_name": ONLINE_MODEL,
            "model_version": self.version, "metric": ev.metric_name, "value": ev.value, "labels": ev.n,
        }
        return Produce(T.MODEL_METRICS, ONLINE_MODEL.encode(), self._metric.encode(record))
