"""Inference: score every payment with the champion model, micro-batched.

Input: ``weir.scoring`` micro-batches. The payments one consume call returns,
across partitions, are scored in inference batches of at most ``max_batch``
payments (the consume call's wait is the batch's max wait). Features for the whole batch come from Redis in one
pipelined round trip; the champion runs once per batch. Outputs: one
``predictions.fraud`` record per payment (key card id) and a ``weir.scored``
batch per input partition carrying the served feature vectors, which the
learner and the training sets use, so training never sees other values than
serving did.

The champion is swapped by :class:`ModelSlot` between batches: a batch is
scored entirely by one model version.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from models.base import BatchScorer
from sinks.redis_store import OnlineStore
from streams import topics as T
from streams.base import Message, Produce, StepResult
from streams.codec import AvroCodec, decoded
from streams.features.definitions import CARD, FEATURE_NAMES, USER, FeatureView, request_features, view_key

MODEL_NAME = "fraud"
DECISION_THRESHOLD = 0.5  # a champion score at or above it flags the payment as fraud


def model_version_name(version: int) -> str:
    """How predictions name a registered version of the champion model."""
    return f"{MODEL_NAME}-v{version}"


class ModelSlot:
    """Holds the current champion; ``swap`` replaces it atomically (a reference assignment)."""

    def __init__(self, initial: BatchScorer) -> None:
        self._model = initial
        self._lock = threading.Lock()
        self.swaps = 0

    @property
    def current(self) -> BatchScorer:
        return self._model

    def swap(self, model: BatchScorer) -> None:
        with self._lock:
            self._model = model
            self.swaps += 1


SERVING_VIEWS = ((CARD, "card_id"), (USER, "customer_id"))  # the model's views, in order, and the payment's key


class InferenceStage:
    step_id = "inference"
    topics = (T.I_SCORING,)

    def __init__(self, store: OnlineStore, slot: ModelSlot, *, max_batch: int = 1024,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.max_batch = max_batch
        self.slot = slot
        self.clock = clock
        self.latencies_ms: deque[float] = deque(maxlen=200_000)
        self.scored = 0
        self._in = {T.I_SCORING: AvroCodec(T.I_SCORING)}
        self._pred = AvroCodec(T.PREDICTIONS)
        self._scored = AvroCodec(T.I_SCORED)

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        payments: list[tuple[int, dict[str, Any]]] = []
        for msg, record in decoded(batch, self._in, result):
            payments.extend((msg.partition, p) for p in record["items"])
        for start in range(0, len(payments), self.max_batch):
            self._score(payments[start:start + self.max_batch], result)
        return result

    def features(self, payments: list[dict[str, Any]]) -> np.ndarray:
        """The served feature matrix (n, len(FEATURE_NAMES)), float32, in at most one Redis round trip.

        A view whose values the features stage attached to the payment (``served``: the card view, as of
        this very payment, as the feature log records it for training) is taken from there; the others
        are read from the online store as of the payment's event time."""
        parts: list[list[list[float] | None]] = []
        requests: list[tuple[FeatureView, str]] = []
        slots: list[tuple[int, int]] = []
        as_of: list[int] = []
        for i, p in enumerate(payments):
            served = p.get("served") or {}
            row: list[list[float] | None] = []
            for j, (view, field) in enumerate(SERVING_VIEWS):
                values = served.get(view_key(view))
                if values is None or len(values) != len(view.features):
                    requests.append((view, p[field]))
                    slots.append((i, j))
                    as_of.append(p["ts_ms"])
                row.append(values)
            parts.append(row)
        for (i, j), got in zip(slots, self.store.read(requests, as_of=as_of) if requests else [], strict=True):
            parts[i][j] = got.values
        rows = [[x for values in row for x in values or ()] + request_features(p["amount"], p["merchant_category"])
                for row, p in zip(parts, payments, strict=True)]
        return np.asarray(rows, dtype=np.float32).reshape(len(payments), len(FEATURE_NAMES))

    def _score(self, payments: list[tuple[int, dict[str, Any]]], result: StepResult) -> None:
        items = [p for _, p in payments]
        X = self.features(items)
        model = self.slot.current  # one version for the whole batch
        scores = model.predict(X)
        now_ms = int(self.clock() * 1000)
        scored: dict[int, list[dict[str, Any]]] = {}
        for (part, p), x, s in zip(payments, X, scores):
            latency = float(now_ms - p["source_ms"])
            self.latencies_ms.append(latency)
            pred = {
                "event_id": p["event_id"], "payment_id": p["payment_id"], "card_id": p["card_id"],
                "customer_id": p["customer_id"], "score": float(s), "model_name": MODEL_NAME,
                "model_version": model.version, "latency_ms": latency, "event_ts": p["ts_ms"],
                "predicted_ts": now_ms,
            }
            result.produce.append(Produce(T.PREDICTIONS, p["card_id"].encode(), self._pred.encode(pred)))
            scored.setdefault(part, []).append({
                "event_id": p["event_id"], "payment_id": p["payment_id"], "card_id": p["card_id"],
                "ts_ms": p["ts_ms"], "features": x.tolist(), "score": float(s), "model_version": model.version,
            })
        self.scored += len(payments)
        for part, rows in scored.items():
            result.produce.append(Produce(T.I_SCORED, None, self._scored.encode({"items": rows}), partition=part))
