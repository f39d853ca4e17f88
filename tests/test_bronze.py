"""The bronze sink keeps every message as received, PII as tokens, and never refuses or crashes on input."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from examples.fraud_shop.project import project as SHOP
from sinks.bronze import BronzeSink
from sinks.clickhouse import ClickHouse
from streams.base import Message
from streams.codec import AvroCodec
from streams.pseudonymize import Pseudonymizer

CLICK = {"event_id": "e1", "event_type": "login", "user_id": "u1", "session_id": "s1",
         "ts": datetime(2026, 1, 1, tzinfo=UTC), "device_id": "dev-RAW", "ip": "198.51.100.7", "page": None,
         "query": None, "product_id": None, "amount": None, "user_agent": None}
STORED = datetime(2026, 1, 2, tzinfo=UTC)
CLICKS, CDC_PAYMENTS = "clickstream.events", "cdc.payments"


def sink() -> BronzeSink:
    return BronzeSink(None, Pseudonymizer(b"k"), SHOP)  # type: ignore[arg-type]  # row() does no I/O


def test_a_record_is_stored_as_json_with_tokens() -> None:
    row = sink().row(Message(CLICKS, 2, 17, b"u1", AvroCodec(CLICKS).encode(CLICK), 5), STORED)
    topic, partition, offset, key, schema_id, status, record, size, sha, *_ = row
    assert (topic, partition, offset, key, status) == (CLICKS, 2, 17, "u1", "ok")
    assert schema_id == AvroCodec(CLICKS).schema_id and size > 0 and len(sha) == 64
    stored = json.loads(record)
    assert stored["event_id"] == "e1" and stored["device_id"].startswith("pii_") and stored["ip"].startswith("pii_")
    assert "RAW" not in record and "198.51.100.7" not in record


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([CLICKS, CDC_PAYMENTS]), st.none() | st.binary(max_size=80), st.integers(0, 40))
def test_any_bytes_become_a_row(topic: str, value: bytes | None, cut: int) -> None:
    if value is not None and cut % 2:  # half the time: a truncated valid record
        value = AvroCodec(CLICKS).encode(CLICK)[:cut]
    row = sink().row(Message(topic, 0, 1, None, value, 0), STORED)
    assert row[5] in {"ok", "tombstone", "undecodable", "unknown_schema_id", "schema_mismatch"}
    assert (row[6] is None) == (row[5] != "ok")


def test_a_batch_lands_in_clickhouse(clickhouse_client: Any, chdb_path: Path) -> None:
    ch = ClickHouse(f"chdb://{chdb_path}", database=clickhouse_client.database)  # this test's own database
    ch.ensure_schema()
    good = AvroCodec(CLICKS).encode(CLICK)
    batch = [Message(CLICKS, 0, i, b"u1", v, 0) for i, v in enumerate([good, b"junk", None, good])]
    sink_ = BronzeSink(ch, Pseudonymizer(b"k"), SHOP)
    sink_.handle(batch)
    sink_.handle(batch)  # re-delivered: collapses on (topic, partition, offset)
    rows = ch.rows("SELECT status, count() FROM bronze_events FINAL GROUP BY status ORDER BY status")
    assert rows == [("ok", 2), ("tombstone", 1), ("undecodable", 1)]


def test_a_restarted_brokers_offsets_replace_no_row(clickhouse_client: Any, chdb_path: Path) -> None:
    """The embedded broker begins every topic at offset 0 after a restart: rows are keyed by the cluster's id
    too (a new one per start), else the second run's messages replaced the first run's rows."""
    ch = ClickHouse(f"chdb://{chdb_path}", database=clickhouse_client.database)
    ch.command("CREATE TABLE bronze_events (topic LowCardinality(String), partition Int32, offset Int64, "
               "key Nullable(String), schema_id Nullable(UInt32), status LowCardinality(String), "
               "record Nullable(String), size UInt32, sha256 String, kafka_ts DateTime64(3, 'UTC'), "
               "stored_ts DateTime64(3, 'UTC')) ENGINE = ReplacingMergeTree ORDER BY (topic, partition, offset)")
    ch.command("INSERT INTO bronze_events (topic, partition, offset, status, size, sha256) "
               "VALUES ('clickstream.events', 0, 0, 'ok', 1, 'old')")  # a row written by an earlier Weir
    ch.ensure_schema()  # an earlier Weir's table gets the key column
    batch = [Message(CLICKS, 0, i, b"u1", AvroCodec(CLICKS).encode(CLICK), 0) for i in range(3)]
    for run in ("weir-run1", "weir-run2", "weir-run2"):  # two runs, the second re-delivered once
        BronzeSink(ch, Pseudonymizer(b"k"), SHOP, log_id=run).handle(batch)
    rows = ch.rows("SELECT log_id, count() FROM bronze_events FINAL GROUP BY log_id ORDER BY log_id")
    assert rows == [("", 1), ("weir-run1", 3), ("weir-run2", 3)]
