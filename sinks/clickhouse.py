"""ClickHouse: the connection Weir shares in a process, and the tables the sinks write.

chdb (the embedded engine) can be opened by one process at a time, so a
Weir process opens it once and every stage shares this handle; calls are
serialized by a lock (clickhouse-connect's chdb backend is not thread-safe).
Tables are ReplacingMergeTree keyed by event id (bronze rows by their Kafka
coordinates, dead letters by the refused message's source topic, partition
and offset, both with the cluster's id, ``log_id``), so re-delivered batches collapse: read with ``FINAL`` for exact
counts. Medallion layers: ``bronze_events`` holds every message of the
project's source topics as received, ``silver_<source>`` what ingest accepted
(one table per source, generated from the project:
:func:`streams.project.contracts.silver_ddl`); no table holds a raw PII value
(bronze stores tokens, the dead-letter table only a payload's size and
checksum; the raw bytes stay in the ``dlq.*`` topics, for replay). The tables
below are the same in every project: they are keyed by event id and model
name, never by a use case's field.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import clickhouse_connect

DDL = [
    # bronze: every message of a public input topic as received (PII fields as tokens; undecodable ones
    # as their size, checksum and reason), keyed by its Kafka coordinates
    """CREATE TABLE IF NOT EXISTS bronze_events (
        topic LowCardinality(String), partition Int32, offset Int64, key Nullable(String),
        schema_id Nullable(UInt32), status LowCardinality(String), record Nullable(String), size UInt32,
        sha256 String, kafka_ts DateTime64(3, 'UTC'), stored_ts DateTime64(3, 'UTC')
    ) ENGINE = ReplacingMergeTree ORDER BY (topic, partition, offset)""",
    # the cluster the offsets are positions in (a new one at each start of the embedded broker): in the key, so
    # that a restart's offsets do not replace the rows of the last one (columns added before a row is written)
    ("ALTER TABLE bronze_events ADD COLUMN IF NOT EXISTS log_id LowCardinality(String), "
     "MODIFY ORDER BY (topic, partition, offset, log_id)"),
    # every model's predictions (champion, online learners, shadows), keyed by the scored event and model
    """CREATE TABLE IF NOT EXISTS predictions (
        event_id String, entity_id String, score Float64, model_name LowCardinality(String),
        model_version LowCardinality(String), latency_ms Float64, event_ts DateTime64(3, 'UTC'),
        predicted_ts DateTime64(3, 'UTC'), decision Nullable(UInt8), route LowCardinality(String) DEFAULT 'champion',
        served_by LowCardinality(String) DEFAULT 'model', degraded UInt8
    ) ENGINE = ReplacingMergeTree ORDER BY (model_name, event_id)""",
    # one row per answer (the served route's and each shadow's) with what it was computed from and how long
    # each step took; feature_vector is empty when the deployment audits hashes only (WEIR_AUDIT_FEATURES)
    """CREATE TABLE IF NOT EXISTS prediction_audit (
        event_id String, model_name LowCardinality(String), entity_id String, ts DateTime64(3, 'UTC'),
        predicted_ts DateTime64(3, 'UTC'), score Float64, decision UInt8, threshold Nullable(Float64),
        model_version LowCardinality(String), route LowCardinality(String), served_by LowCardinality(String),
        degraded UInt8, feature_vector Array(Float32), feature_hash String, queue_ms Float64, fetch_ms Float64,
        inference_ms Float64, publish_ms Float64
    ) ENGINE = ReplacingMergeTree ORDER BY (event_id, route, model_version)""",
    # tables created by an older Weir get the columns added since (a data dir survives upgrades)
    "ALTER TABLE predictions ADD COLUMN IF NOT EXISTS entity_id String",
    "ALTER TABLE prediction_audit ADD COLUMN IF NOT EXISTS model_name LowCardinality(String)",
    # every scored event joined with its label, per model (the learn stage's outcomes, the drift stage's input)
    """CREATE TABLE IF NOT EXISTS outcomes (
        event_id String, model_name LowCardinality(String), label Float64, ts DateTime64(3, 'UTC'),
        label_ts DateTime64(3, 'UTC'), champion_score Float64, champion_version LowCardinality(String),
        online_score Float64
    ) ENGINE = ReplacingMergeTree ORDER BY (model_name, event_id)""",
    """CREATE TABLE IF NOT EXISTS alerts (
        alert_id String, ts DateTime64(3, 'UTC'), detector LowCardinality(String), metric String,
        value Float64, threshold Float64, model_version String, message String
    ) ENGINE = ReplacingMergeTree ORDER BY alert_id""",
    "ALTER TABLE alerts ADD COLUMN IF NOT EXISTS event_ts Nullable(DateTime64(3, 'UTC'))",
    # alerts written before kinds existed: a validation gap is a model's, every other one a drift
    "ALTER TABLE alerts ADD COLUMN IF NOT EXISTS kind LowCardinality(String) "
    "DEFAULT if(detector = 'validation_gap', 'model', 'drift')",
    "ALTER TABLE alerts ADD COLUMN IF NOT EXISTS severity LowCardinality(String) DEFAULT 'warning'",
    "ALTER TABLE alerts ADD COLUMN IF NOT EXISTS model_name LowCardinality(String)",
    "ALTER TABLE alerts ADD COLUMN IF NOT EXISTS features Array(String)",
    "ALTER TABLE alerts ADD COLUMN IF NOT EXISTS change_ts Nullable(DateTime64(3, 'UTC'))",
    """CREATE TABLE IF NOT EXISTS retrain_requests (
        request_id String, model_name LowCardinality(String), ts DateTime64(3, 'UTC'), reason String,
        since_ts Nullable(DateTime64(3, 'UTC'))
    ) ENGINE = ReplacingMergeTree ORDER BY request_id""",
    "ALTER TABLE retrain_requests ADD COLUMN IF NOT EXISTS model_name LowCardinality(String)",
    "ALTER TABLE retrain_requests ADD COLUMN IF NOT EXISTS change_ts Nullable(DateTime64(3, 'UTC'))",
    """CREATE TABLE IF NOT EXISTS model_events (
        event_id String, ts DateTime64(3, 'UTC'), model_name String, version Int32, stage String,
        artifact_uri String, sha256 String, metrics Map(String, Float64), actor String, reason String,
        lineage Map(String, String)
    ) ENGINE = ReplacingMergeTree ORDER BY event_id""",
    # tables created by an older Weir get the columns added since (a data dir survives upgrades)
    "ALTER TABLE model_events ADD COLUMN IF NOT EXISTS actor String",
    "ALTER TABLE model_events ADD COLUMN IF NOT EXISTS reason String",
    "ALTER TABLE model_events ADD COLUMN IF NOT EXISTS lineage Map(String, String)",
    """CREATE TABLE IF NOT EXISTS model_metrics (
        metric_id String, ts DateTime64(3, 'UTC'), model_name LowCardinality(String), model_version String,
        metric LowCardinality(String), value Float64, labels UInt64
    ) ENGINE = ReplacingMergeTree ORDER BY (model_name, metric_id)""",
    """CREATE TABLE IF NOT EXISTS scored_features (
        event_id String, model_name LowCardinality(String), entity_id String, ts DateTime64(3, 'UTC'),
        features Array(Float32), score Float64, model_version LowCardinality(String)
    ) ENGINE = ReplacingMergeTree ORDER BY (model_name, event_id)""",
    "ALTER TABLE scored_features ADD COLUMN IF NOT EXISTS model_name LowCardinality(String)",
    "ALTER TABLE scored_features ADD COLUMN IF NOT EXISTS entity_id String",
    """CREATE TABLE IF NOT EXISTS feature_log (
        view LowCardinality(String), entity_id String, event_id String, ts DateTime64(3, 'UTC'),
        values Array(Float64)
    ) ENGINE = ReplacingMergeTree ORDER BY (view, entity_id, ts, event_id)""",
    # each closed window of a model version's inputs against its reference: one row per feature (and the score,
    # role 'prediction'); a re-sent report replaces its rows
    """CREATE TABLE IF NOT EXISTS feature_drift (
        model_name LowCardinality(String), model_version LowCardinality(String), window_start DateTime64(3, 'UTC'),
        window_end DateTime64(3, 'UTC'), feature String, role LowCardinality(String), rows UInt32,
        reference_rows UInt32, test LowCardinality(String), statistic Float64, threshold Float64, drifted UInt8,
        psi Float64, null_rate Float64, default_rate Float64, reference_default_rate Float64,
        out_of_range_rate Float64, drifted_share Float64, ts DateTime64(3, 'UTC')
    ) ENGINE = ReplacingMergeTree ORDER BY (model_name, model_version, window_start, role, feature)""",
    """CREATE TABLE IF NOT EXISTS dlq (
        topic String, partition Int32, offset Int64, reason LowCardinality(String), detail String,
        stage String, source_topic String, source_partition Int32, source_offset Int64,
        key Nullable(String), value_size UInt32, value_sha256 String, ts DateTime64(3, 'UTC')
    ) ENGINE = ReplacingMergeTree ORDER BY (source_topic, source_partition, source_offset, stage)""",
    ("ALTER TABLE dlq ADD COLUMN IF NOT EXISTS log_id LowCardinality(String), "
     "MODIFY ORDER BY (source_topic, source_partition, source_offset, stage, log_id)"),
]


class ClickHouseReader(Protocol):
    """What a reader needs of a handle: :class:`ClickHouse`, or a command's handle on the embedded engine
    through the process that owns it (:class:`streams.clickhouse_hub.RemoteClickHouse`)."""

    def rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]: ...

    def scalar(self, sql: str, parameters: dict[str, Any] | None = None) -> Any: ...


class ClickHouse:
    """A process-wide ClickHouse handle: ``chdb://<dir>`` (embedded) or an http(s) URL, on ``database`` (each
    project has its own: see :meth:`for_project`)."""

    def __init__(self, dsn: str, database: str | None = None) -> None:
        self.dsn = dsn
        self.database = database
        extra: dict[str, Any] = {"database": database} if database else {}
        self._client = clickhouse_connect.get_client(dsn=dsn, **extra)
        self._lock = threading.RLock()

    @classmethod
    def for_project(cls, dsn: str, project: str) -> ClickHouse:
        """A handle on the project's database (created if missing): a project's tables are its own, so several
        projects share a ClickHouse."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", project):
            raise ValueError(f"project name {project!r} is not a ClickHouse database name")
        clickhouse_connect.get_client(dsn=dsn).command(f"CREATE DATABASE IF NOT EXISTS `{project}`")
        return cls(dsn, database=project)

    def ensure_schema(self, extra: Sequence[str] = ()) -> None:
        """Create Weir's tables, then ``extra`` (a project's generated ones), if they do not exist."""
        for ddl in (*DDL, *extra):
            self.command(ddl)

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        with self._lock:
            return self._client.command(sql, parameters=parameters)

    def insert(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
        if not rows:
            return
        with self._lock:
            self._client.insert(table, rows, column_names=list(columns))

    def rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self._lock:
            return [tuple(r) for r in self._client.query(sql, parameters=parameters).result_rows]

    def scalar(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        rows = self.rows(sql, parameters)
        return rows[0][0] if rows else None

    @property
    def client(self) -> Any:
        """A clickhouse-connect client whose every call holds this handle's lock."""
        return _Locked(self._client, self._lock)

    def close(self) -> None:
        with self._lock:
            self._client.close()


class _Locked:
    """Proxy that serializes every method call on ``target`` under ``lock``."""

    def __init__(self, target: Any, lock: threading.RLock) -> None:
        self._target = target
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return call
