"""The ClickHouse sink stage: Weir's outputs, the silver streams, served features, feature log and DLQ.

One stage consumes them all; each topic has a row mapper and a table. A
batch is written table by table before its offsets are committed; tables
dedup on event id, so a re-delivered batch changes nothing. The public
input topics go to the bronze table through :mod:`sinks.bronze`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sinks.clickhouse import ClickHouse
from streams import topics as T
from streams.base import Message, StepResult
from streams.codec import AvroCodec, decoded

Row = list[Any]


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _fields(*names: str) -> Callable[[dict[str, Any]], list[Row]]:
    return lambda r: [[r[n] for n in names]]


SILVER_CLICK_COLS = ("event_id", "event_type", "user_id", "session_id", "device_id", "ts", "amount")
SILVER_PAYMENT_COLS = ("event_id", "payment_id", "card_id", "customer_id", "merchant_id", "merchant_category",
                       "amount", "device_id", "ts", "source_ts")
PRED_COLS = ("event_id", "payment_id", "card_id", "customer_id", "score", "model_name", "model_version",
             "latency_ms", "event_ts", "predicted_ts", "decision", "route", "served_by", "degraded")
LABEL_COLS = ("event_id", "payment_id", "is_fraud", "payment_ts", "label_ts")
ALERT_COLS = ("alert_id", "ts", "detector", "metric", "value", "threshold", "model_version", "message")
RETRAIN_COLS = ("request_id", "ts", "reason", "since_ts")
METRIC_COLS = ("metric_id", "ts", "model_name", "model_version", "metric", "value", "labels")
MODEL_COLS = ("event_id", "ts", "model_name", "version", "stage", "artifact_uri", "sha256", "metrics", "actor",
              "reason", "lineage")
AUDIT_COLS = ("event_id", "entity_id", "payment_id", "ts", "predicted_ts", "score", "decision", "threshold",
              "model_version", "route", "served_by", "degraded", "feature_vector", "feature_hash", "queue_ms",
              "fetch_ms", "inference_ms", "publish_ms")
SCORED_COLS = ("event_id", "payment_id", "card_id", "ts", "features", "score", "model_version")
FLOG_COLS = ("view", "entity_id", "event_id", "ts", "values")
DLQ_COLS = ("topic", "partition", "offset", "reason", "detail", "stage", "source_topic", "source_partition",
            "source_offset", "key", "value_size", "value_sha256", "ts")


def _scored(r: dict[str, Any]) -> list[Row]:
    return [[i["event_id"], i["payment_id"], i["card_id"], _dt(i["ts_ms"]), i["features"], i["score"],
             i["model_version"]] for i in r["items"]]


def _prediction(r: dict[str, Any]) -> list[Row]:
    """A prediction; the online learner's topic (schema v1) has no route, path or decision: its defaults."""
    decision = r.get("decision")
    return [[r["event_id"], r["payment_id"], r["card_id"], r["customer_id"], r["score"], r["model_name"],
             r["model_version"], r["latency_ms"], r["event_ts"], r["predicted_ts"],
             None if decision is None else int(decision), r.get("route", "champion"), r.get("served_by", "model"),
             int(r.get("degraded", False))]]


def _audit(r: dict[str, Any]) -> list[Row]:
    n, features, vectors = r["n_features"], r["features"], bool(r["features"])
    batch = [_dt(r["predicted_ms"]), r["threshold"], r["fetch_ms"], r["inference_ms"], r["publish_ms"]]
    return [[event, entity, payment, _dt(ts), batch[0], score, int(decision), batch[1], version, route, by,
             int(degraded), features[i * n:(i + 1) * n] if vectors else [], fhash, queue, *batch[2:]]
            for i, (event, entity, payment, ts, queue, score, decision, version, route, by, degraded, fhash)
            in enumerate(zip(r["event_ids"], r["entity_ids"], r["payment_ids"], r["ts_ms"], r["queue_ms"],
                             r["scores"], r["decisions"], r["model_versions"], r["routes"], r["served_by"],
                             r["degraded"], r["feature_hashes"], strict=True))]


def _silver_clicks(r: dict[str, Any]) -> list[Row]:
    return [[i["event_id"], i["event_type"], i["user_id"], i["session_id"], i["device_id"], _dt(i["ts_ms"]),
             i["amount"]] for i in r["items"]]


def _silver_payments(r: dict[str, Any]) -> list[Row]:
    return [[i["event_id"], i["payment_id"], i["card_id"], i["customer_id"], i["merchant_id"],
             i["merchant_category"], i["amount"], i["device_id"], _dt(i["ts_ms"]), _dt(i["source_ms"])]
            for i in r["items"]]


def _feature_log(r: dict[str, Any]) -> list[Row]:
    n, values = r["n_features"], r["values"]
    return [[r["view"], entity, event, _dt(ts), values[i * n:(i + 1) * n]]
            for i, (entity, event, ts) in enumerate(zip(r["entity_ids"], r["event_ids"], r["ts_ms"]))]


TABLES: dict[str, tuple[str, tuple[str, ...], Callable[[dict[str, Any]], list[Row]]]] = {
    T.I_CLICKS: ("silver_clicks", SILVER_CLICK_COLS, _silver_clicks),
    T.I_PAYMENTS: ("silver_payments", SILVER_PAYMENT_COLS, _silver_payments),
    T.PREDICTIONS: ("predictions", PRED_COLS, _prediction),
    T.PREDICTIONS_ONLINE: ("predictions", PRED_COLS, _prediction),
    T.I_AUDIT: ("prediction_audit", AUDIT_COLS, _audit),
    T.LABELS: ("labels", LABEL_COLS, lambda r: [[r["event_id"], r["payment_id"], int(r["is_fraud"]),
                                                 r["payment_ts"], r["label_ts"]]]),
    T.ALERTS: ("alerts", ALERT_COLS, _fields(*ALERT_COLS)),
    T.RETRAIN: ("retrain_requests", RETRAIN_COLS, _fields(*RETRAIN_COLS)),
    T.MODEL_EVENTS: ("model_events", MODEL_COLS, _fields(*MODEL_COLS)),
    T.MODEL_METRICS: ("model_metrics", METRIC_COLS, _fields(*METRIC_COLS)),
    T.I_SCORED: ("scored_features", SCORED_COLS, _scored),
    T.I_FEATURE_LOG: ("feature_log", FLOG_COLS, _feature_log),
}


COLUMNS = {table: cols for table, cols, _ in TABLES.values()} | {"dlq": DLQ_COLS}


def dlq_row(msg: Message) -> Row:
    h = dict(msg.headers)

    def text(name: str) -> str:
        return h.get(name, b"").decode("utf-8", "replace")

    def number(name: str) -> int:
        try:
            return int(text(name))
        except ValueError:  # a dead letter written by something else than Weir's runtime
            return -1

    return [msg.topic, msg.partition, msg.offset, text("weir.reason"), text("weir.detail"), text("weir.stage"),
            text("weir.topic"), number("weir.partition"), number("weir.offset"),
            msg.key.decode("utf-8", "replace") if msg.key is not None else None,
            len(msg.value or b""), hashlib.sha256(msg.value or b"").hexdigest(), _dt(msg.timestamp_ms)]


class ClickHouseSink:
    step_id = "sink-clickhouse"
    topics = (*TABLES, *T.DLQ)

    def __init__(self, ch: ClickHouse) -> None:
        self.ch = ch
        self._codecs = {t: AvroCodec(t) for t in TABLES}

    def handle(self, batch: list[Message]) -> StepResult:
        tables: dict[str, list[Row]] = {"dlq": [dlq_row(m) for m in batch if m.topic.startswith("dlq.")]}
        undecodable = StepResult()
        for msg, record in decoded([m for m in batch if not m.topic.startswith("dlq.")], self._codecs, undecodable):
            table, _, mapper = TABLES[msg.topic]
            tables.setdefault(table, []).extend(mapper(record))
        result = undecodable
        for table, rows in tables.items():
            self.ch.insert(table, rows, COLUMNS[table])
        return result
