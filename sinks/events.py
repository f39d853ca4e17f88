"""The ClickHouse sink stage: Weir's outputs, the silver streams, served features, feature log and DLQ.

One stage consumes them all; each topic has a row mapper and a table. The
topics and tables come from the project: one ``silver_<source>`` table per
source, every model's champion and online predictions into ``predictions``,
the project's own internal topics into their tables (all in the project's
ClickHouse database), and Weir's public topics (alerts, model events and
metrics, retrain requests: every project's, each record naming its model). A
batch is written table by table before its offsets are committed; tables
dedup on event id, so a re-delivered batch changes nothing. The project's
source topics go to the bronze table through :mod:`sinks.bronze`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sinks.clickhouse import ClickHouse
from streams import topics as T
from streams.base import Message, Stage, StepResult
from streams.codec import AvroCodec, decoded
from streams.project.contracts import silver_table, silver_topic
from streams.project.spec import Model, Project, Source

Row = list[Any]
Mapper = Callable[[dict[str, Any]], list[Row]]


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _fields(*names: str) -> Mapper:
    return lambda r: [[r[n] for n in names]]


PRED_COLS = ("event_id", "entity_id", "score", "model_name", "model_version", "latency_ms", "event_ts",
             "predicted_ts", "decision", "route", "served_by", "degraded")
ALERT_COLS = ("alert_id", "ts", "detector", "metric", "value", "threshold", "model_version", "message", "event_ts",
              "kind", "severity", "model_name", "features", "change_ts")
RETRAIN_COLS = ("request_id", "model_name", "ts", "reason", "since_ts", "change_ts")
METRIC_COLS = ("metric_id", "ts", "model_name", "model_version", "metric", "value", "labels")
MODEL_COLS = ("event_id", "ts", "model_name", "version", "stage", "artifact_uri", "sha256", "metrics", "actor",
              "reason", "lineage")
AUDIT_COLS = ("event_id", "model_name", "entity_id", "ts", "predicted_ts", "score", "decision", "threshold",
              "model_version", "route", "served_by", "degraded", "feature_vector", "feature_hash", "queue_ms",
              "fetch_ms", "inference_ms", "publish_ms")
SCORED_COLS = ("event_id", "model_name", "entity_id", "ts", "features", "score", "model_version")
OUTCOME_COLS = ("event_id", "model_name", "label", "ts", "label_ts", "champion_score", "champion_version",
                "online_score")
DRIFT_COLS = ("model_name", "model_version", "window_start", "window_end", "feature", "role", "rows", "reference_rows",
              "test", "statistic", "threshold", "drifted", "psi", "null_rate", "default_rate",
              "reference_default_rate", "out_of_range_rate", "drifted_share", "ts")
FLOG_COLS = ("view", "entity_id", "event_id", "ts", "values")
DLQ_COLS = ("topic", "partition", "offset", "reason", "detail", "stage", "source_topic", "source_partition",
            "source_offset", "key", "value_size", "value_sha256", "ts", "log_id")


def _scored(r: dict[str, Any]) -> list[Row]:
    return [[i["event_id"], i["model_name"], i["entity_id"], _dt(i["ts_ms"]), i["features"], i["score"],
             i["model_version"]] for i in r["items"]]


def _outcome(r: dict[str, Any]) -> list[Row]:
    return [[r["event_id"], r["model_name"], r["label"], _dt(r["ts_ms"]), _dt(r["label_ts_ms"]), r["champion_score"],
             r["champion_version"], r["online_score"]]]


def _feature_drift(r: dict[str, Any]) -> list[Row]:
    window = [r["model_name"], r["model_version"], _dt(r["window_start_ms"]), _dt(r["window_end_ms"])]
    return [[*window, c["name"], c["role"], r["rows"], r["reference_rows"], c["test"], c["statistic"], c["threshold"],
             int(c["drifted"]), c["psi"], c["null_rate"], c["default_rate"], c["reference_default_rate"],
             c["out_of_range_rate"], r["drifted_share"], _dt(r["ts"])] for c in r["columns"]]


def _predictions(key: str) -> Mapper:
    """Rows of a model's prediction topic, whose key field is ``key``; fields a schema version lacks (an
    online learner's route, path or decision) get their defaults."""
    def rows(r: dict[str, Any]) -> list[Row]:
        decision = r.get("decision")
        return [[r["event_id"], r.get(key) or "", r["score"], r["model_name"], r["model_version"], r["latency_ms"],
                 r["event_ts"], r["predicted_ts"], None if decision is None else int(decision),
                 r.get("route", "champion"), r.get("served_by", "model"), int(r.get("degraded", False))]]
    return rows


def _silver(source: Source) -> Mapper:
    names = source.fields

    def rows(r: dict[str, Any]) -> list[Row]:
        return [[i["event_id"], _dt(i["ts_ms"]), _dt(i["source_ms"]), *(i[n] for n in names)] for i in r["items"]]
    return rows


def _audit(r: dict[str, Any]) -> list[Row]:
    n, features, vectors = r["n_features"], r["features"], bool(r["features"])
    batch = [_dt(r["predicted_ms"]), r["threshold"], r["fetch_ms"], r["inference_ms"], r["publish_ms"]]
    model = r["model_name"]
    return [[event, model, entity, _dt(ts), batch[0], score, int(decision), batch[1], version, route, by,
             int(degraded), features[i * n:(i + 1) * n] if vectors else [], fhash, queue, *batch[2:]]
            for i, (event, entity, ts, queue, score, decision, version, route, by, degraded, fhash)
            in enumerate(zip(r["event_ids"], r["entity_ids"], r["ts_ms"], r["queue_ms"], r["scores"],
                             r["decisions"], r["model_versions"], r["routes"], r["served_by"], r["degraded"],
                             r["feature_hashes"], strict=True))]


def _feature_log(r: dict[str, Any]) -> list[Row]:
    n, values = r["n_features"], r["values"]
    return [[r["view"], entity, event, _dt(ts), values[i * n:(i + 1) * n]]
            for i, (entity, event, ts) in enumerate(zip(r["entity_ids"], r["event_ids"], r["ts_ms"]))]


Table = tuple[str, tuple[str, ...], Mapper, str]  # table, columns, row mapper, the topic's schema subject

FIXED: dict[str, tuple[str, tuple[str, ...], Mapper]] = {
    T.I_AUDIT: ("prediction_audit", AUDIT_COLS, _audit),
    T.ALERTS: ("alerts", ALERT_COLS, _fields(*ALERT_COLS)),
    T.RETRAIN: ("retrain_requests", RETRAIN_COLS, _fields(*RETRAIN_COLS)),
    T.MODEL_EVENTS: ("model_events", MODEL_COLS, _fields(*MODEL_COLS)),
    T.MODEL_METRICS: ("model_metrics", METRIC_COLS, _fields(*METRIC_COLS)),
    T.I_SCORED: ("scored_features", SCORED_COLS, _scored),
    T.I_OUTCOMES: ("outcomes", OUTCOME_COLS, _outcome),
    T.I_FEATURE_LOG: ("feature_log", FLOG_COLS, _feature_log),
    T.I_FEATURE_DRIFT: ("feature_drift", DRIFT_COLS, _feature_drift),
}
"""Weir's own topics and their tables, the same in every project (the internal ones are the project's own:
``weir.<project>.scored``, …)."""


def _key(project: Project, model: Model) -> str:
    return model.key or project.source(model.source).partition_key


def project_tables(project: Project) -> dict[str, Table]:
    """Topic -> (table, columns, row mapper, schema subject) of everything the sink writes for ``project``."""
    out: dict[str, Table] = {}
    for topic, (table, cols, mapper) in FIXED.items():
        out[T.internal(project, topic) if topic in T.PER_PROJECT else topic] = (table, cols, mapper, topic)
    for s in project.sources:
        topic = silver_topic(project, s)
        out[topic] = (silver_table(s), ("event_id", "ts", "source_ts", *s.fields), _silver(s), topic)
    for m in project.models:  # shadows serve nobody: their answers are in prediction_audit, not here (one row
        for topic in (m.prediction_topic, m.online_topic):  # per model and event: a shadow's would replace it)
            out[topic] = ("predictions", PRED_COLS, _predictions(_key(project, m)), topic)
    return out


def dlq_row(msg: Message, log_id: str = "") -> Row:
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
            len(msg.value or b""), hashlib.sha256(msg.value or b"").hexdigest(), _dt(msg.timestamp_ms), log_id]


class ClickHouseSink(Stage):
    """Writes every table of :func:`project_tables` and the dead letters of every topic."""

    step_id = "sink-clickhouse"

    def __init__(self, ch: ClickHouse, project: Project, log_id: str = "") -> None:
        self.ch = ch
        self.log_id = log_id  # the Kafka cluster's id, in the dead letters' key: see sinks.clickhouse
        self.tables = project_tables(project)
        self.columns = {table: cols for table, cols, _, _ in self.tables.values()} | {"dlq": DLQ_COLS}
        self.topics: tuple[str, ...] = (*self.tables, *(t for t in T.all_topics(project) if t.startswith("dlq.")))
        self._codecs = {t: AvroCodec(subject) for t, (_, _, _, subject) in self.tables.items()}

    def handle(self, batch: list[Message]) -> StepResult:
        tables: dict[str, list[Row]] = {"dlq": [dlq_row(m, self.log_id) for m in batch if m.topic.startswith("dlq.")]}
        undecodable = StepResult()
        for msg, record in decoded([m for m in batch if not m.topic.startswith("dlq.")], self._codecs, undecodable):
            table, _, mapper, _ = self.tables[msg.topic]
            tables.setdefault(table, []).extend(mapper(record))
        result = undecodable
        for table, rows in tables.items():
            self.ch.insert(table, rows, self.columns[table])
        return result
